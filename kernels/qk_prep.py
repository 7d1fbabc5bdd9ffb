"""K4: the attention's q/k preparation as one op, forward and backward, in Triton.

    q_out = rope(rms_norm(q)) * q_gain[h],   k_out = rope(rms_norm(k))

rms_norm over head_dim D with no weight and torch's default eps for fp32/bf16/fp16 inputs (F.rms_norm
computes in fp32 and uses fp32's machine epsilon for all three); rope rotates the first R = 2*HALF
dims as [x1 cos + x2 sin, -x1 sin + x2 cos] (x1 = dims [0, HALF), x2 = [HALF, 2 HALF)), the rest pass
through. Layouts: q (B,T,H,D), k (B,T,Hkv,D) with any strides whose last one is 1 (views into one
fused QKV projection output are fine), cos/sin (T, HALF) fp32, q_gain (H,). Outputs contiguous, in
q's dtype; all arithmetic in fp32.

The rotated halves x1, x2 are loaded a second time as (BLOCK_T, HEADS, HALF) tiles (contiguous
aranges, so vector loads; L1 hits after the full-row load) and written by their own stores; the
full-row tile supplies the norm and the pass-through dims [R, D). Rotation and its transpose:
    o1 = y1 cos + y2 sin,   o2 = -y1 sin + y2 cos          (y = x * rstd)
    u1 = g1 cos - g2 sin,   u2 =  g1 sin + g2 cos          (u = P^T g, g = d out before the gain)

Backward, per (token, head) row, with gain = q_gain[h] (1 for k):
    s = sum_d u*y  (= sum_d g * rotated y, since u = P^T g: the row's share of d q_gain[h])
    dx = gain * rstd * (u - y * s / D)
d q_gain[h] = sum over rows of s: each program writes its per-head partial sum into a small fp32
workspace (programs, H) that one torch sum reduces: deterministic, no atomics.

Saved for backward: the inputs q, k (views, no copies) and nothing else; rstd is recomputed from
x, which backward must read anyway for dx. Saving rstd (B,T,H+Hkv) fp32 would add a 48 B/token
write in forward and a read in backward (the seed shape: +4.7 MB each way per call) and save no
HBM traffic. When q, k are views of one QKV projection output that buffer is kept alive anyway by
v's consumers (attention, the value-residual blend), so saving the views costs no memory either.

Grid: (cdiv(T, BLOCK_T), (H + Hkv) / HEADS, B); one program is BLOCK_T tokens x HEADS heads of
either q (program_id(1) < H/HEADS) or k, so one launch covers both tensors in each direction
(backward: plus the tiny gain reduction). A (BLOCK_T, HEADS, D) tile shares one cos/sin load
among its HEADS heads.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# F.rms_norm's default eps for fp32, bf16 and fp16 inputs alike: it computes in fp32 and takes
# fp32's machine epsilon (checked in tests/test_qk_prep.py).
RMS_EPS = torch.finfo(torch.float32).eps


class QKPrepConfig(NamedTuple):
    """block_t tokens x heads heads per program (heads is lowered to the largest power of two that
    divides both H and Hkv), num_warps per program."""
    block_t: int = 16
    heads: int = 4
    num_warps: int = 4


# GPU defaults: the fastest of the H200 sweep in benchmarks/test_bench_qk_prep.py (benchmarks/README.md).
FWD_CONFIG = QKPrepConfig(32, 1, 4)
BWD_CONFIG = QKPrepConfig(32, 1, 4)
# The CPU interpreter costs ~5 ms per program: few, larger tiles.
INTERPRETER_CONFIG = QKPrepConfig(16, 8, 1)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_halves(rows, t, row_ok, cos_ptr, sin_ptr, cos_st, cos_sd, sin_st, sin_sd,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The two rotated halves of (BT, HEADS) rows, x1 = [0, HALF) and x2 = [HALF, 2 HALF), and
    cos/sin (BT, 1, BLOCK_HALF), all fp32: contiguous aranges, so the loads vectorise (the halves
    are L1 hits: the full-row load just fetched the same lines)."""
    dh = tl.arange(0, BLOCK_HALF)[None, None, :]
    ok = row_ok & (dh < HALF)
    x1 = tl.load(rows + dh, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(rows + HALF + dh, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * cos_st + dh * cos_sd, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * sin_st + dh * sin_sd, mask=ok, other=0.0).to(tl.float32)
    return x1, x2, c, s, dh, ok


@triton.jit
def _fwd_tile(x_base, o_base, gain_ptr, cos_ptr, sin_ptr, offs_t, T, s_xt, s_xh, s_ot, cos_st, cos_sd,
              sin_st, sin_sd, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, APPLY_GAIN: tl.constexpr):
    t = offs_t[:, None, None]
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    row_ok = t < T
    mask = row_ok & (d < HEAD_DIM)
    x_rows = x_base + t * s_xt + h * s_xh
    o_rows = o_base + t * s_ot + h * HEAD_DIM
    x = tl.load(x_rows + d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
    y = x * rstd
    if APPLY_GAIN:
        gain = tl.load(gain_ptr + tl.arange(0, HEADS)).to(tl.float32)[None, :, None]
        y = y * gain
    if HALF > 0:
        x1, x2, c, s, dh, ok = _load_halves(x_rows, t, row_ok, cos_ptr, sin_ptr, cos_st, cos_sd, sin_st, sin_sd,
                                            HALF, BLOCK_HALF)
        y1 = x1 * rstd
        y2 = x2 * rstd
        o1 = y1 * c + y2 * s  # the reference's order: x1 cos + x2 sin, x1 (-sin) + x2 cos
        o2 = y1 * (-s) + y2 * c
        if APPLY_GAIN:
            o1 = o1 * gain
            o2 = o2 * gain
        tl.store(o_rows + dh, o1.to(o_base.dtype.element_ty), mask=ok)
        tl.store(o_rows + HALF + dh, o2.to(o_base.dtype.element_ty), mask=ok)
        mask = mask & (d >= 2 * HALF)  # the full tile writes only the pass-through dims
    tl.store(o_rows + d, y.to(o_base.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, gain_ptr,
                             s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, cos_st, cos_sd, sin_st, sin_sd,
                             T, H, H_KV, eps,
                             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * batch stride can pass 2^31 elements
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n_q = H // HEADS
    # Each branch inlines the whole tile so no pointer/stride has to be merged across branches.
    if pid_h < n_q:
        h0 = pid_h * HEADS
        _fwd_tile(q_ptr + b * s_qb + h0 * s_qh, qo_ptr + (b * T * H + h0) * HEAD_DIM, gain_ptr + h0,
                  cos_ptr, sin_ptr, offs_t, T, s_qt, s_qh, H * HEAD_DIM, cos_st, cos_sd, sin_st, sin_sd, eps,
                  HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, True)
    else:
        h0 = (pid_h - n_q) * HEADS
        _fwd_tile(k_ptr + b * s_kb + h0 * s_kh, ko_ptr + (b * T * H_KV + h0) * HEAD_DIM, gain_ptr,
                  cos_ptr, sin_ptr, offs_t, T, s_kt, s_kh, H_KV * HEAD_DIM, cos_st, cos_sd, sin_st, sin_sd,
                  eps, HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, False)


@triton.jit
def _bwd_tile(x_base, g_base, dx_base, gain_ptr, cos_ptr, sin_ptr, offs_t, T, s_xt, s_xh, s_gt, s_gh, s_dt,
              cos_st, cos_sd, sin_st, sin_sd, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, APPLY_GAIN: tl.constexpr):
    """dx of one tile; returns the per-head sums over its rows of s = sum_d u*y (HEADS,)."""
    t = offs_t[:, None, None]
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    row_ok = t < T
    mask = row_ok & (d < HEAD_DIM)
    x_rows = x_base + t * s_xt + h * s_xh
    g_rows = g_base + t * s_gt + h * s_gh
    dx_rows = dx_base + t * s_dt + h * HEAD_DIM
    x = tl.load(x_rows + d, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_rows + d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
    y = x * rstd
    scale = rstd
    if APPLY_GAIN:
        scale = scale * tl.load(gain_ptr + tl.arange(0, HEADS)).to(tl.float32)[None, :, None]
    if HALF > 0:
        x1, x2, c, s, dh, ok = _load_halves(x_rows, t, row_ok, cos_ptr, sin_ptr, cos_st, cos_sd, sin_st, sin_sd,
                                            HALF, BLOCK_HALF)
        g1 = tl.load(g_rows + dh, mask=ok, other=0.0).to(tl.float32)
        g2 = tl.load(g_rows + HALF + dh, mask=ok, other=0.0).to(tl.float32)
        y1 = x1 * rstd
        y2 = x2 * rstd
        u1 = g1 * c - g2 * s  # the transposed rotation
        u2 = g1 * s + g2 * c
        mask = mask & (d >= 2 * HALF)  # the full tile now stands for the pass-through dims only
        u = tl.where(mask, u, 0.0)
        row_dot = tl.sum(u * y, axis=2) + tl.sum(u1 * y1, axis=2) + tl.sum(u2 * y2, axis=2)
        mean_dot = (row_dot / HEAD_DIM)[:, :, None]
        tl.store(dx_rows + dh, (scale * (u1 - y1 * mean_dot)).to(dx_base.dtype.element_ty), mask=ok)
        tl.store(dx_rows + HALF + dh, (scale * (u2 - y2 * mean_dot)).to(dx_base.dtype.element_ty), mask=ok)
    else:
        row_dot = tl.sum(u * y, axis=2)
        mean_dot = (row_dot / HEAD_DIM)[:, :, None]
    tl.store(dx_rows + d, (scale * (u - y * mean_dot)).to(dx_base.dtype.element_ty), mask=mask)
    return tl.sum(row_dot, axis=0)  # masked rows contribute 0


@triton.jit
def _qk_norm_rope_bwd_kernel(q_ptr, k_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, cos_ptr, sin_ptr, gain_ptr,
                             part_ptr, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_gqb, s_gqt, s_gqh,
                             s_gkb, s_gkt, s_gkh, cos_st, cos_sd, sin_st, sin_sd, T, H, H_KV, eps,
                             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n_q = H // HEADS
    if pid_h < n_q:
        h0 = pid_h * HEADS
        part = _bwd_tile(q_ptr + b * s_qb + h0 * s_qh, gq_ptr + b * s_gqb + h0 * s_gqh,
                         dq_ptr + (b * T * H + h0) * HEAD_DIM, gain_ptr + h0, cos_ptr, sin_ptr, offs_t, T,
                         s_qt, s_qh, s_gqt, s_gqh, H * HEAD_DIM, cos_st, cos_sd, sin_st, sin_sd, eps,
                         HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, True)
        # workspace row = this program's (b, token block); columns = heads
        row = b * tl.num_programs(0) + pid_t
        tl.store(part_ptr + row * H + h0 + tl.arange(0, HEADS), part)
    else:
        h0 = (pid_h - n_q) * HEADS
        _bwd_tile(k_ptr + b * s_kb + h0 * s_kh, gk_ptr + b * s_gkb + h0 * s_gkh,
                  dk_ptr + (b * T * H_KV + h0) * HEAD_DIM, gain_ptr, cos_ptr, sin_ptr, offs_t, T,
                  s_kt, s_kh, s_gkt, s_gkh, H_KV * HEAD_DIM, cos_st, cos_sd, sin_st, sin_sd, eps,
                  HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, False)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_shape(q, k, config, gpu_default):
    """(config, heads per program, grid). A CPU tensor can only run under the interpreter, which
    gets its own small config; nothing else differs (the math is fp32 after every load anyway)."""
    B, T, H, _ = q.shape
    h_kv = k.shape[2]
    config = config or (INTERPRETER_CONFIG if q.device.type == "cpu" else gpu_default)
    heads = config.heads
    while H % heads or h_kv % heads:
        heads //= 2
    return config, heads, (triton.cdiv(T, config.block_t), (H + h_kv) // heads, B)


def qk_norm_rope_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor,
                         config: QKPrepConfig | None = None) -> tuple[Tensor, Tensor]:
    """The forward launch (no autograd): (q_out, k_out), contiguous, in q's dtype."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, T, H, D = q.shape
    h_kv = k.shape[2]
    q_out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    k_out = torch.empty((B, T, h_kv, D), device=q.device, dtype=q.dtype)
    if q_out.numel() == 0:
        return q_out, k_out
    config, heads, grid = _launch_shape(q, k, config, FWD_CONFIG)
    _qk_norm_rope_fwd_kernel[grid](
        q, k, q_out, k_out, cos, sin, q_gain, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        T, H, h_kv, RMS_EPS, HEADS=heads, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), HALF=cos.shape[1],
        BLOCK_HALF=triton.next_power_of_2(max(cos.shape[1], 1)),
        BLOCK_T=config.block_t, num_warps=config.num_warps)
    return q_out, k_out


def qk_norm_rope_backward(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          q_gain: Tensor, config: QKPrepConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward launch: (dq, dk) contiguous in q's/k's dtype, d q_gain (H,) in q_gain's dtype."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    dq_out, dk_out = _last_dim_contiguous(dq_out), _last_dim_contiguous(dk_out)
    B, T, H, D = q.shape
    h_kv = k.shape[2]
    dq = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, T, h_kv, D), device=q.device, dtype=k.dtype)
    if dq.numel() == 0:
        return dq, dk, torch.zeros_like(q_gain)
    config, heads, grid = _launch_shape(q, k, config, BWD_CONFIG)
    # one row of per-head partial sums per (batch, token block): every entry is written
    partials = torch.empty((B * grid[0], H), device=q.device, dtype=torch.float32)
    _qk_norm_rope_bwd_kernel[grid](
        q, k, dq_out, dk_out, dq, dk, cos, sin, q_gain, partials,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        dq_out.stride(0), dq_out.stride(1), dq_out.stride(2), dk_out.stride(0), dk_out.stride(1), dk_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), T, H, h_kv, RMS_EPS,
        HEADS=heads, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), HALF=cos.shape[1],
        BLOCK_HALF=triton.next_power_of_2(max(cos.shape[1], 1)),
        BLOCK_T=config.block_t, num_warps=config.num_warps)
    return dq, dk, partials.sum(0).to(q_gain.dtype)


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, capturable in CUDA graphs) and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("recycore::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor) -> tuple[Tensor, Tensor]:
    return qk_norm_rope_forward(q, k, cos, sin, q_gain)


@_qk_norm_rope_op.register_fake
def _(q, k, cos, sin, q_gain):
    return q.new_empty(q.shape), q.new_empty(k.shape)


@torch.library.custom_op("recycore::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                              q_gain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return qk_norm_rope_backward(dq_out, dk_out, q, k, cos, sin, q_gain)


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, cos, sin, q_gain):
    return q.new_empty(q.shape), k.new_empty(k.shape), q_gain.new_empty(q_gain.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # q, k (views: no copy), cos, sin, q_gain; rstd is recomputed


def _autograd_backward(ctx, dq_out, dk_out):
    q, k, cos, sin, q_gain = ctx.saved_tensors
    dq, dk, d_gain = _qk_norm_rope_backward_op(dq_out, dk_out, q, k, cos, sin, q_gain)
    return dq, dk, None, None, d_gain


_qk_norm_rope_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, cos, sin, q_gain):
    """Few, cheap checks (this runs 14 times per forward in eager)."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be (B,T,H,D) and (B,T,Hkv,D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must be (B,T,Hkv,D) = ({B},{T},Hkv,{D}), got {tuple(k.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"q and k must share one of fp32/bf16/fp16, got {q.dtype} and {k.dtype}")
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[0] != T or 2 * cos.shape[1] > D:
        raise ValueError(f"cos and sin must be (T, R/2) = ({T}, <= {D // 2}), got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if q_gain.shape != (H,):
        raise ValueError(f"q_gain must be (H,) = ({H},), got {tuple(q_gain.shape)}")
    if not (k.device == cos.device == sin.device == q_gain.device == q.device):
        raise ValueError("q, k, cos, sin and q_gain must be on one device")


def qk_norm_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor) -> tuple[Tensor, Tensor]:
    """Fused rms_norm + partial RoPE (+ q_gain on q) of q (B,T,H,D) and k (B,T,Hkv,D); differentiable
    in q, k and q_gain. cos, sin (T, R/2) as recycore.model.rotary_tables makes them ((T, 0): no rope)."""
    _check_inputs(q, k, cos, sin, q_gain)
    return _qk_norm_rope_op(q, k, cos, sin, q_gain)


def _apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """recycore.model.apply_partial_rotary, arithmetic for arithmetic."""
    half = cos.size(-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest), dim=-1)


def qk_norm_rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor) -> tuple[Tensor, Tensor]:
    """Plain torch, exactly CausalSelfAttention.forward's chain: F.rms_norm (default eps), partial
    RoPE (skipped when R = 0, as the model skips it when rope_dims = 0), q * q_gain.to(q.dtype)."""
    q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    if cos.size(-1) > 0:
        q, k = _apply_partial_rotary(q, cos, sin), _apply_partial_rotary(k, cos, sin)
    q = q * q_gain.to(q.dtype)[None, None, :, None]
    return q, k
