"""Triton kernels, installed as ``recycore.kernels``."""
from recycore.kernels.attention import gated_xsa_attention, gated_xsa_attention_reference, xsa_gate  # noqa: E402,F401
