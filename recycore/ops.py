"""The model's dispatch points. One switch, `kernels` (Config.kernels): "reference" runs each op's
plain-torch reference, "fused" its Triton kernel, "auto" the kernels on CUDA and the reference on the
CPU. The references live beside their kernels in recycore.kernels; this module only dispatches.
An int5-packed matrix (recycore.kernels.int5.Int5Linear) is recognised by its type and always runs
its own kernel (K3), so no dense copy of it is ever made."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from recycore.kernels import attention as attention_kernels
from recycore.kernels import head as head_kernels
from recycore.kernels import mlp as mlp_kernels
from recycore.kernels import qk_prep as qk_kernels
from recycore.kernels.int5 import Int5Linear, int5_linear


def fused(kernels: str, x: Tensor) -> bool:
    """Whether the switch selects the Triton kernels for a tensor on x's device."""
    return kernels == "fused" or (kernels == "auto" and x.is_cuda)


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dim, no weight, torch's default eps."""
    return F.rms_norm(x, (x.size(-1),))


def _packed_linear(x: Tensor, w: Int5Linear, activation: str | None = None) -> Tensor:
    """The packed matrix's kernel on x, taking x in the autocast dtype as F.linear would under
    autocast (custom ops are not cast by autocast: fp32 activations would run fp32 GEMMs)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return int5_linear(x, w.packed, w.scales, w.out_features, w.in_features, activation)


def linear(x: Tensor, w: Tensor | Int5Linear, b: Tensor | None = None) -> Tensor:
    """x @ w^T (+ b) with the (fp32 master) weight cast to the activation dtype; a packed int5
    matrix (no bias) runs K3."""
    if isinstance(w, Int5Linear):
        return _packed_linear(x, w)
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def _folds_scale(kernels: str, x: Tensor, w) -> bool:
    """Whether an output scale is folded into w's rows: (x W^T) * s = x (s W)^T, the same product with the
    scale applied to the (small) weight instead of the (M x N) output. Backward then needs no pass over
    the output's gradient for the scale and no column sum over the M rows for its gradient (a sum over
    the weight instead); the rounding moves from the output to the weight. Fused kernels, dense weights."""
    return fused(kernels, x) and not isinstance(w, Int5Linear)


def scaled_linear(x: Tensor, w: Tensor | Int5Linear, scale: Tensor, kernels: str) -> Tensor:
    """scale * (x @ w^T), scale (N,) per output feature; folded into w where `_folds_scale` says."""
    if _folds_scale(kernels, x, w):
        return F.linear(x, (w * scale[:, None]).to(x.dtype))
    return scale * linear(x, w)


def qk_norm_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, kernels: str) -> tuple[Tensor, Tensor]:
    """q, k = rms(q), rms(k) over head_dim; partial RoPE (tables cos, sin (T, rope_dims/2)); q *= q_gain."""
    if fused(kernels, q):
        if torch.is_autocast_enabled(q.device.type):  # attention consumes the autocast dtype
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k = q.to(dtype), k.to(dtype)
        return qk_kernels.qk_norm_rope(q, k, cos, sin, q_gain)
    return qk_kernels.qk_norm_rope_reference(q, k, cos, sin, q_gain)


def attention_inputs(x: Tensor, norm_scale: Tensor, w_q, w_k, w_v, gate_w: Tensor | None, gate_b: Tensor | None,
                     cos: Tensor, sin: Tensor, q_gain: Tensor, num_heads: int, num_kv_heads: int, kernels: str,
                     v_embed: Tensor | None = None,
                     value_residual: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The attention's inputs from its block's input x (B,T,d), normed as u = rms(x) * norm_scale:
    q = rope(rms(u W_q^T)) * q_gain (B,T,H,D), k = rope(rms(u W_k^T)) (B,T,Hkv,D), the values (B,T,Hkv,D),
    gate logits u W_g^T + b_g (B,T,H) or None (no gate); rms over head_dim, partial RoPE by the tables
    cos, sin (T, rope_dims/2). The values: raw = u W_v^T + v_embed (B,T,kv_dim; none: no add), then with
    value_residual = (v0, lambda) lambda_0 v0 + lambda_1 raw.
    Fused, with dense weights and a gate: one GEMM of x itself on the stacked weights [W_q; W_k; W_v; W_g]
    (one wide GEMM instead of four, one input- and one weight-gradient GEMM in backward) and `qkv_prep`,
    which reads its packed output as it is, applies each row's norm scale norm_scale / rms(x) (so u is
    never written, nor kept for backward), adds and blends the values on the way out, and writes the
    packed gradient in one pass."""
    v0, v_mix = value_residual or (None, None)
    if fused(kernels, x) and gate_w is not None and not any(isinstance(w, Int5Linear) for w in (w_q, w_k, w_v)):
        qkv = F.linear(x, torch.cat((w_q, w_k, w_v, gate_w)).to(x.dtype))
        return qk_kernels.qkv_prep(qkv, cos, sin, q_gain, gate_b, num_heads, num_kv_heads,
                                   None if v_embed is None else v_embed.to(qkv.dtype),
                                   None if v0 is None else v0.to(qkv.dtype), v_mix, qk_kernels.norm_row_scale(x, norm_scale))
    u = rms_norm(x) * norm_scale
    if fused(kernels, u) and not any(isinstance(w, Int5Linear) for w in (w_q, w_k, w_v)):
        # no gate: one GEMM, q and k go to the op as views of its output
        q, k, v = F.linear(u, torch.cat((w_q, w_k, w_v)).to(u.dtype)).split(
            (w_q.shape[0], w_k.shape[0], w_v.shape[0]), dim=-1)
    else:
        q, k, v = linear(u, w_q), linear(u, w_k), linear(u, w_v)
    q, k, v = q.unflatten(-1, (num_heads, -1)), k.unflatten(-1, (num_kv_heads, -1)), v.unflatten(-1, (num_kv_heads, -1))
    q, k = qk_norm_rope(q, k, cos, sin, q_gain, kernels)
    v = qk_kernels.value_blend_reference(v, v_embed, v0, v_mix)
    return q, k, v, None if gate_w is None else linear(u, gate_w, gate_b)


def softcap_logits(x: Tensor, weight: Tensor, cap: float) -> Tensor:
    """cap * tanh(rms(x) @ weight^T / cap)."""
    return head_kernels.softcap_logits_reference(x, weight, cap)


def softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Mean cross-entropy of softcap_logits(x, weight, cap). No kernel switch here: the fused head
    (recycore.kernels.head: no N x V logits in memory) measured slower on the H200 than the reference
    under torch.compile, which the model runs (benchmarks/README.md, K4 head)."""
    return head_kernels.softcap_cross_entropy_reference(x, weight, targets, cap)


def leaky_relu2_mlp(u: Tensor, w_up: Tensor | Int5Linear, w_down: Tensor | Int5Linear, kernels: str,
                    out_scale: Tensor | None = None, norm_scale: Tensor | None = None) -> Tensor:
    """MLP(u) = leaky_relu(u W_up^T, 0.5)^2 W_down^T (K1), times out_scale (d,) per output feature if given
    (folded into W_down where `_folds_scale` says); with norm_scale, of u's norm rms(u) * norm_scale
    (fused with dense weights: folded into K1 as row scales, the normed input never written). A packed
    W_up applies the activation in K3's epilogue; W_down then goes through `linear`."""
    dense = not isinstance(w_up, Int5Linear) and not isinstance(w_down, Int5Linear)
    if norm_scale is not None and dense and fused(kernels, u):
        row_scale = qk_kernels.norm_row_scale(u, norm_scale)
    else:
        row_scale = None
        u = u if norm_scale is None else rms_norm(u) * norm_scale
    if isinstance(w_up, Int5Linear):
        out = linear(_packed_linear(u, w_up, activation="leaky_relu2"), w_down)
    elif isinstance(w_down, Int5Linear):
        out = linear(F.leaky_relu(linear(u, w_up), negative_slope=0.5).square(), w_down)
    elif fused(kernels, u):
        if out_scale is not None:  # fused with dense weights: `_folds_scale` holds, nothing left to scale after
            w_down, out_scale = w_down * out_scale[:, None], None
        out = mlp_kernels.leaky_relu2_mlp(u, w_up.to(u.dtype), w_down.to(u.dtype), row_scale=row_scale)
    else:
        out = mlp_kernels.leaky_relu2_mlp_reference(u, w_up, w_down)
    return out if out_scale is None else out_scale * out


def kernel_choices() -> list[str]:
    """What the kernel families with several implementations chose by measurement in this process, a line
    each: the attention's, per signature and use, with the timings it chose by."""
    return [f"attention q {tuple(c['shapes'][0])} xsa {c['xsa']} by {'fwd+bwd' if c['backward'] else 'fwd'}: "
            f"{c['impl']} (" + ", ".join(f"{impl} {ms:.3f}" for impl, ms in c["ms"].items()) + " ms)"
            for c in attention_kernels.measured_choices()]


def gated_xsa_attention(q: Tensor, k: Tensor, v: Tensor, gate_logits: Tensor | None, use_xsa: bool,
                        kernels: str) -> Tensor:
    """Causal GQA attention, XSA (if use_xsa), the sigmoid head gate (K2). q: (B, T, H, D);
    k, v: (B, T, Hkv, D); gate_logits: (B, T, H) or None (no gate). "auto" runs the reference where the
    kernels cannot (a head size that is not a power of two); "fused" then raises."""
    runs_kernel = kernels == "fused" or attention_kernels.supports_head_dim(q.shape[-1])
    if fused(kernels, q) and gate_logits is not None and runs_kernel:
        # the kernel family's own choice among its implementations; on the CPU only the Triton
        # kernel (under the interpreter) is a kernel at all
        return attention_kernels.attention(q, k, v, gate_logits, use_xsa, impl="auto" if q.is_cuda else "triton")
    return attention_kernels.gated_xsa_attention_reference(q, k, v, gate_logits, use_xsa)
