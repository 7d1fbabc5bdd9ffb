"""recycore: Triton kernels and a thin torch model for the 12L RecycledCore Int5 record."""
