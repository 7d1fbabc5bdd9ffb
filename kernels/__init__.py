"""Triton kernels, installed as ``recycore.kernels``."""
from recycore.kernels.attention import gated_xsa_attention, gated_xsa_attention_reference, xsa_gate  # noqa: E402,F401
from recycore.kernels.mlp import leaky_relu2_mlp, leaky_relu2_mlp_reference  # noqa: E402,F401
from recycore.kernels.int5 import Int5Linear, int5_linear, int5_linear_reference  # noqa: E402,F401
from recycore.kernels.qk_prep import qk_norm_rope, qk_norm_rope_reference  # noqa: E402,F401
from recycore.kernels.head import (  # noqa: E402,F401
    softcap_cross_entropy, softcap_cross_entropy_reference, softcap_token_nll, softcap_token_nll_reference)
