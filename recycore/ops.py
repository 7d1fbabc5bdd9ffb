"""The model's dispatch points: each heavy op in plain torch ("reference") or
through the Triton kernels ("triton"). The reference path is the specification
(SPEC.md §2); the kernels must compute the same functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dim, no weight, torch's default eps."""
    return F.rms_norm(x, (x.size(-1),))


def _packed_linear(x: Tensor, w, activation: str | None = None) -> Tensor:
    """A packed matrix's own kernel on x, taking x in the autocast dtype as F.linear would under
    autocast (custom ops are not cast by autocast: fp32 activations would run fp32 GEMMs)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return w.linear(x, activation)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x @ w^T (+ b) with the (fp32 master) weight cast to the activation dtype. A bank matrix
    may instead be packed (not a Tensor: recycore.int5_model.PackedInt5Weight, no bias), which
    runs its own kernel (K3, int5 dequant-matmul) so no dense copy of it is ever made."""
    if not isinstance(w, Tensor):
        return _packed_linear(x, w)
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def leaky_relu2_mlp(u: Tensor, w_up: Tensor, w_down: Tensor, kernels: str = "reference") -> Tensor:
    """MLP(u) = leaky_relu(u W_up^T, 0.5)^2 W_down^T (KERNELS.md K1). A packed W_up (see
    `linear`) applies the activation in K3's epilogue; W_down goes through `linear`."""
    if not isinstance(w_up, Tensor):
        return linear(_packed_linear(u, w_up, activation="leaky_relu2"), w_down)
    if kernels == "triton" and isinstance(w_down, Tensor):
        from recycore.kernels import leaky_relu2_mlp as fused_mlp

        return fused_mlp(u, w_up.to(u.dtype), w_down.to(u.dtype))
    return linear(F.leaky_relu(linear(u, w_up), negative_slope=0.5).square(), w_down)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """Remove from each head's output its component along its own position's value
    direction: y_h - (y_h . n) n, n = v/||v|| of the head's kv group.
    y: (B, T, H, D); v: (B, T, Hkv, D)."""
    B, T, H, D = y.shape
    group = H // v.size(-2)
    y_grouped = y.reshape(B, T, v.size(-2), group, D)
    n = F.normalize(v, dim=-1).unsqueeze(-2)
    return (y_grouped - (y_grouped * n).sum(dim=-1, keepdim=True) * n).reshape(B, T, H, D)


def gated_xsa_attention(q: Tensor, k: Tensor, v: Tensor, gate_logits: Tensor | None, use_xsa: bool,
                        kernels: str = "reference") -> Tensor:
    """Causal GQA attention, then XSA (if use_xsa), then the sigmoid head gate
    (KERNELS.md K2). q: (B, T, H, D); k, v: (B, T, Hkv, D); gate_logits: (B, T, H)."""
    if kernels == "triton" and gate_logits is not None:
        from recycore.kernels.attention import attention

        # On CUDA "auto" takes the faster measured path (fully fused Triton, or the SDPA/cuDNN
        # core with the fused XSA+gate epilogue); on CPU the Triton interpreter runs the kernel.
        return attention(q, k, v, gate_logits, use_xsa, impl="auto" if q.is_cuda else "triton")
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=q.size(2) != k.size(2),
    ).transpose(1, 2)
    if use_xsa:
        y = xsa(y, v)
    if gate_logits is not None:
        y = y * torch.sigmoid(gate_logits).unsqueeze(-1)
    return y
