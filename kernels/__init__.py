"""Triton kernels, installed as ``recycore.kernels``."""
from recycore.kernels.attention import gated_xsa_attention, gated_xsa_attention_reference, xsa_gate
from recycore.kernels.mlp import leaky_relu2_mlp, leaky_relu2_mlp_reference
from recycore.kernels.int5 import Int5Linear, int5_linear, int5_linear_reference
from recycore.kernels.qk_prep import qk_norm_rope, qk_norm_rope_reference, qkv_prep, qkv_prep_reference
from recycore.kernels.head import (
    softcap_cross_entropy, softcap_cross_entropy_reference, softcap_token_nll, softcap_token_nll_reference)

__all__ = [
    "gated_xsa_attention", "gated_xsa_attention_reference", "xsa_gate",
    "leaky_relu2_mlp", "leaky_relu2_mlp_reference",
    "Int5Linear", "int5_linear", "int5_linear_reference",
    "qk_norm_rope", "qk_norm_rope_reference", "qkv_prep", "qkv_prep_reference",
    "softcap_cross_entropy", "softcap_cross_entropy_reference", "softcap_token_nll", "softcap_token_nll_reference",
]
