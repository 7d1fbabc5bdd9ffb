"""Triton kernels, installed as ``recycore.kernels``."""
