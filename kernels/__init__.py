"""Triton kernels, installed as ``recycore.kernels``."""
from recycore.kernels.attention import gated_xsa_attention, gated_xsa_attention_reference, xsa_gate  # noqa: E402,F401
from recycore.kernels.mlp import leaky_relu2_mlp, leaky_relu2_mlp_reference  # noqa: E402,F401
from recycore.kernels.int5 import Int5Linear, int5_linear, int5_linear_reference  # noqa: E402,F401
