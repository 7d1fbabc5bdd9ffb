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
workspace (H, programs), d gate_bias's beside it, that one torch sum over contiguous rows reduces:
deterministic, no atomics.

Saved for backward: the inputs q, k (views, no copies) and nothing else; rstd is recomputed from
x, which backward must read anyway for dx. Saving rstd (B,T,H+Hkv) fp32 would add a 48 B/token
write in forward and a read in backward (the seed shape: +4.7 MB each way per call) and save no
HBM traffic. When q, k are views of one QKV projection output that buffer is kept alive anyway by
v's consumers (attention, the value-residual blend), so saving the views costs no memory either.

Grid: (cdiv(T, BLOCK_T), (H + Hkv) / HEADS, B); one program is BLOCK_T tokens x HEADS heads of
either q (program_id(1) < H/HEADS) or k, so one launch covers both tensors in each direction
(backward: plus the tiny gain reduction). A (BLOCK_T, HEADS, D) tile shares one cos/sin load
among its HEADS heads.

`qkv_prep` is the same op on the whole packed projection output [q | k | v | gate logits] (the model's
one GEMM for q, k, v and the head gate): it also hands out the values and gate logits + bias, so its
backward receives all four gradients and writes the packed gradient in one pass. Autograd through views
of the projection output would instead concatenate dq, dk, dv and the gate's gradient in a copy (the
custom op's outputs cannot be written in place by inductor). Grid: Hkv / HEADS more programs along
axis 1 for v's heads; the first of them also does the gate's H columns. The values are the model's
whole chain on v: raw = v + value embedding, then the value residual lambda_0 v0 + lambda_1 raw, so
that v is read and written once (inductor's kernels after the op read v, v0 and the embedding and
wrote the blend again); backward, d raw = lambda_1 dv goes into the packed gradient and d lambda =
(sum dv v0, sum dv raw) joins the partial sums. With row scales the op also takes the projection's
input RMSNorm: the GEMM multiplies the un-normed x, and each row of its output is scaled by
s / rms(x) of its token on load (rms_norm(x) s W^T = (x W^T) s / rms(x)), so the normed input u is never
written nor kept for backward; backward scales the packed gradient's rows likewise and returns d scale
per token (sum over the row of d(scaled) * loaded), each program's share in a row of a
(programs along axis 1, B T) workspace that one sum reduces.
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
def _row_scales(rs_base, offs_t, T, ROW_SCALE: tl.constexpr):
    """The tokens' row scales (BLOCK_T,) fp32 (ones without ROW_SCALE: unread)."""
    if ROW_SCALE:
        rs = tl.load(rs_base + offs_t, mask=offs_t < T, other=0.0)
    else:
        rs = tl.full(offs_t.shape, 1.0, tl.float32)
    return rs


@triton.jit
def _row_scaled(x, rs, dtype: tl.constexpr, ROW_SCALE: tl.constexpr):
    """With ROW_SCALE, x times its row's scale rounded to the projection's dtype (the model rounds the
    projection of its normed input there), in fp32; else x."""
    if ROW_SCALE:
        x = (x * rs).to(dtype).to(tl.float32)
    return x


@triton.jit
def _fwd_tile(x_base, o_base, gain_ptr, cos_ptr, sin_ptr, rs, offs_t, T, s_xt, s_xh, s_ot, cos_st, cos_sd,
              sin_st, sin_sd, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, APPLY_GAIN: tl.constexpr, ROW_SCALE: tl.constexpr):
    t = offs_t[:, None, None]
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    row_ok = t < T
    mask = row_ok & (d < HEAD_DIM)
    x_rows = x_base + t * s_xt + h * s_xh
    o_rows = o_base + t * s_ot + h * HEAD_DIM
    dtype = x_base.dtype.element_ty
    x = _row_scaled(tl.load(x_rows + d, mask=mask, other=0.0).to(tl.float32), rs, dtype, ROW_SCALE)
    rstd = tl.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
    y = x * rstd
    if APPLY_GAIN:
        gain = tl.load(gain_ptr + tl.arange(0, HEADS)).to(tl.float32)[None, :, None]
        y = y * gain
    if HALF > 0:
        x1, x2, c, s, dh, ok = _load_halves(x_rows, t, row_ok, cos_ptr, sin_ptr, cos_st, cos_sd, sin_st, sin_sd,
                                            HALF, BLOCK_HALF)
        y1 = _row_scaled(x1, rs, dtype, ROW_SCALE) * rstd
        y2 = _row_scaled(x2, rs, dtype, ROW_SCALE) * rstd
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
def _raw_values(v_base, e_base, rs, t, h, d, mask, s_vt, s_vh, s_et, s_eh, HAS_VE: tl.constexpr,
                ROW_SCALE: tl.constexpr):
    """v's (BLOCK_T, HEADS, D) tile of the projection as loaded, and raw = v (row-scaled) plus the value
    embedding's tile, each step rounded to v's dtype as the model's chain rounds it; both fp32."""
    dtype = v_base.dtype.element_ty
    v = tl.load(v_base + t * s_vt + h * s_vh + d, mask=mask, other=0.0).to(tl.float32)
    raw = _row_scaled(v, rs, dtype, ROW_SCALE)
    if HAS_VE:
        e = tl.load(e_base + t * s_et + h * s_eh + d, mask=mask, other=0.0).to(tl.float32)
        raw = (raw + e).to(dtype).to(tl.float32)
    return v, raw


@triton.jit
def _blend_weights(mix_ptr, dtype: tl.constexpr):
    """lambda_0, lambda_1 rounded to the activations' dtype, as the model's `.to(v.dtype)` rounds them."""
    return tl.load(mix_ptr).to(dtype).to(tl.float32), tl.load(mix_ptr + 1).to(dtype).to(tl.float32)


@triton.jit
def _value_fwd_tile(v_base, e_base, v0_base, mix_ptr, o_base, rs, offs_t, T, s_vt, s_vh, s_et, s_eh, s_ot,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_VE: tl.constexpr,
                    RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr):
    """The values attention reads, (BLOCK_T, HEADS, D) rows: raw (see _raw_values), then with RESIDUAL
    lambda_0 v0 + lambda_1 raw (v0 laid out as the output: token stride s_ot, heads packed)."""
    t = offs_t[:, None, None]
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (t < T) & (d < HEAD_DIM)
    _, v = _raw_values(v_base, e_base, rs, t, h, d, mask, s_vt, s_vh, s_et, s_eh, HAS_VE, ROW_SCALE)
    if RESIDUAL:
        lam0, lam1 = _blend_weights(mix_ptr, o_base.dtype.element_ty)
        v0 = tl.load(v0_base + t * s_ot + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
        v = lam0 * v0 + lam1 * v
    tl.store(o_base + t * s_ot + h * HEAD_DIM + d, v.to(o_base.dtype.element_ty), mask=mask)


@triton.jit
def _gate_fwd_tile(g_base, go_base, bias_ptr, rs, offs_t, T, s_gt, H, BLOCK_H: tl.constexpr,
                   ROW_SCALE: tl.constexpr):
    """gate_out = g (row-scaled) + bias for (BLOCK_T, H) gate logits (the bias added in fp32)."""
    t = offs_t[:, None]
    h = tl.arange(0, BLOCK_H)[None, :]
    mask = (t < T) & (h < H)
    g = tl.load(g_base + t * s_gt + h, mask=mask, other=0.0).to(tl.float32)
    g = _row_scaled(g, rs, g_base.dtype.element_ty, ROW_SCALE)
    g += tl.load(bias_ptr + h, mask=h < H, other=0.0).to(tl.float32)
    tl.store(go_base + t * H + h, g.to(go_base.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, e_ptr, v0_ptr, mix_ptr, rs_ptr, qo_ptr, ko_ptr, vo_ptr,
                             go_ptr, cos_ptr, sin_ptr, gain_ptr, bias_ptr, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb,
                             s_vt, s_vh, s_gb, s_gt, s_eb, s_et, s_eh, cos_st, cos_sd, sin_st, sin_sd, T, H, H_KV,
                             eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                             PACKED: tl.constexpr, BLOCK_H: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
                             HAS_VE: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr):
    """Programs along axis 1: q heads, k heads, then (PACKED) v heads (plus the value embedding e, then
    blended with v0: contiguous (B,T,Hkv,D)), the first of which also adds the gate's bias. ROW_SCALE:
    every input row is first multiplied by its token's scale (rs: contiguous (B,T) fp32)."""
    if ROWS_ALIGNED:  # strides known to be multiples of 8 elements: 16-byte accesses (see _rows_aligned)
        s_qb, s_qt, s_qh = s_qb // 8 * 8, s_qt // 8 * 8, s_qh // 8 * 8
        s_kb, s_kt, s_kh = s_kb // 8 * 8, s_kt // 8 * 8, s_kh // 8 * 8
        s_vb, s_vt, s_vh = s_vb // 8 * 8, s_vt // 8 * 8, s_vh // 8 * 8
        s_gb, s_gt = s_gb // 8 * 8, s_gt // 8 * 8
        s_eb, s_et, s_eh = s_eb // 8 * 8, s_et // 8 * 8, s_eh // 8 * 8
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * batch stride can pass 2^31 elements
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rs = _row_scales(rs_ptr + b * T, offs_t, T, ROW_SCALE)
    n_q = H // HEADS
    n_k = H_KV // HEADS
    # Each branch inlines the whole tile so no pointer/stride has to be merged across branches.
    if pid_h < n_q:
        h0 = pid_h * HEADS
        _fwd_tile(q_ptr + b * s_qb + h0 * s_qh, qo_ptr + (b * T * H + h0) * HEAD_DIM, gain_ptr + h0,
                  cos_ptr, sin_ptr, rs[:, None, None], offs_t, T, s_qt, s_qh, H * HEAD_DIM, cos_st, cos_sd, sin_st,
                  sin_sd, eps, HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, True, ROW_SCALE)
    elif pid_h < n_q + n_k:
        h0 = (pid_h - n_q) * HEADS
        _fwd_tile(k_ptr + b * s_kb + h0 * s_kh, ko_ptr + (b * T * H_KV + h0) * HEAD_DIM, gain_ptr,
                  cos_ptr, sin_ptr, rs[:, None, None], offs_t, T, s_kt, s_kh, H_KV * HEAD_DIM, cos_st, cos_sd,
                  sin_st, sin_sd, eps, HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, False, ROW_SCALE)
    elif PACKED:
        h0 = (pid_h - n_q - n_k) * HEADS
        out = (b * T * H_KV + h0) * HEAD_DIM
        _value_fwd_tile(v_ptr + b * s_vb + h0 * s_vh, e_ptr + b * s_eb + h0 * s_eh, v0_ptr + out, mix_ptr,
                        vo_ptr + out, rs[:, None, None], offs_t, T, s_vt, s_vh, s_et, s_eh, H_KV * HEAD_DIM, HEADS,
                        HEAD_DIM, BLOCK_D, HAS_VE, RESIDUAL, ROW_SCALE)
        if h0 == 0:
            _gate_fwd_tile(g_ptr + b * s_gb, go_ptr + b * T * H, bias_ptr, rs[:, None], offs_t, T, s_gt, H, BLOCK_H,
                           ROW_SCALE)


@triton.jit
def _bwd_tile(x_base, g_base, dx_base, gain_ptr, cos_ptr, sin_ptr, rs, offs_t, T, s_xt, s_xh, s_gt, s_gh, s_dt,
              cos_st, cos_sd, sin_st, sin_sd, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, APPLY_GAIN: tl.constexpr,
              ROW_SCALE: tl.constexpr):
    """dx of one tile (ROW_SCALE: of the unscaled input, rs * the scaled input's); returns the per-head sums
    over its rows of s = sum_d u*y (HEADS,) and (ROW_SCALE) the per-token sums of d(scaled) * x, the row
    scales' gradient shares (BLOCK_T,)."""
    t = offs_t[:, None, None]
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    row_ok = t < T
    mask = row_ok & (d < HEAD_DIM)
    x_rows = x_base + t * s_xt + h * s_xh
    g_rows = g_base + t * s_gt + h * s_gh
    dx_rows = dx_base + t * s_dt + h * HEAD_DIM
    dtype = x_base.dtype.element_ty
    x = tl.load(x_rows + d, mask=mask, other=0.0).to(tl.float32)
    xs = _row_scaled(x, rs, dtype, ROW_SCALE)
    u = tl.load(g_rows + d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xs * xs, axis=2) / HEAD_DIM + eps)[:, :, None]
    y = xs * rstd
    scale = rstd
    if APPLY_GAIN:
        scale = scale * tl.load(gain_ptr + tl.arange(0, HEADS)).to(tl.float32)[None, :, None]
    token_dot = tl.zeros(offs_t.shape, tl.float32)
    if HALF > 0:
        x1, x2, c, s, dh, ok = _load_halves(x_rows, t, row_ok, cos_ptr, sin_ptr, cos_st, cos_sd, sin_st, sin_sd,
                                            HALF, BLOCK_HALF)
        g1 = tl.load(g_rows + dh, mask=ok, other=0.0).to(tl.float32)
        g2 = tl.load(g_rows + HALF + dh, mask=ok, other=0.0).to(tl.float32)
        y1 = _row_scaled(x1, rs, dtype, ROW_SCALE) * rstd
        y2 = _row_scaled(x2, rs, dtype, ROW_SCALE) * rstd
        u1 = g1 * c - g2 * s  # the transposed rotation
        u2 = g1 * s + g2 * c
        mask = mask & (d >= 2 * HALF)  # the full tile now stands for the pass-through dims only
        u = tl.where(mask, u, 0.0)
        row_dot = tl.sum(u * y, axis=2) + tl.sum(u1 * y1, axis=2) + tl.sum(u2 * y2, axis=2)
        mean_dot = (row_dot / HEAD_DIM)[:, :, None]
        dx1 = scale * (u1 - y1 * mean_dot)
        dx2 = scale * (u2 - y2 * mean_dot)
        if ROW_SCALE:
            token_dot += tl.sum(tl.sum(dx1 * x1 + dx2 * x2, axis=2), axis=1)
            dx1 = dx1 * rs
            dx2 = dx2 * rs
        tl.store(dx_rows + dh, dx1.to(dx_base.dtype.element_ty), mask=ok)
        tl.store(dx_rows + HALF + dh, dx2.to(dx_base.dtype.element_ty), mask=ok)
    else:
        row_dot = tl.sum(u * y, axis=2)
        mean_dot = (row_dot / HEAD_DIM)[:, :, None]
    dx = scale * (u - y * mean_dot)
    if ROW_SCALE:
        token_dot += tl.sum(tl.sum(tl.where(mask, dx * x, 0.0), axis=2), axis=1)
        dx = dx * rs
    tl.store(dx_rows + d, dx.to(dx_base.dtype.element_ty), mask=mask)
    return tl.sum(row_dot, axis=0), token_dot  # masked rows contribute 0


@triton.jit
def _value_bwd_tile(gv_base, v_base, e_base, v0_base, mix_ptr, d_base, rs, offs_t, T, s_gvt, s_gvh, s_vt, s_vh,
                    s_et, s_eh, s_v0t, s_dt, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_VE: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr):
    """d raw = lambda_1 dv (dv without RESIDUAL), times rs (ROW_SCALE), into the packed gradient's v
    columns; returns the per-head sums over the tile of dv * v0 and dv * raw (lambda's gradient shares;
    zeros without RESIDUAL) and the per-token sums of d raw * v (the row scales' shares; zeros without
    ROW_SCALE)."""
    t = offs_t[:, None, None]
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (t < T) & (d < HEAD_DIM)
    g = tl.load(gv_base + t * s_gvt + h * s_gvh + d, mask=mask, other=0.0).to(tl.float32)
    dot0 = tl.zeros([HEADS], tl.float32)
    dot1 = tl.zeros([HEADS], tl.float32)
    token_dot = tl.zeros(offs_t.shape, tl.float32)
    if RESIDUAL or ROW_SCALE:
        v, raw = _raw_values(v_base, e_base, rs, t, h, d, mask, s_vt, s_vh, s_et, s_eh, HAS_VE, ROW_SCALE)
        if RESIDUAL:
            _, lam1 = _blend_weights(mix_ptr, d_base.dtype.element_ty)
            v0 = tl.load(v0_base + t * s_v0t + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
            dot0 = tl.sum(tl.sum(g * v0, axis=2), axis=0)  # masked lanes load 0
            dot1 = tl.sum(tl.sum(g * raw, axis=2), axis=0)
            g = (lam1 * g).to(d_base.dtype.element_ty).to(tl.float32)  # d raw, as the model's bf16 autograd has it
        if ROW_SCALE:
            token_dot = tl.sum(tl.sum(g * v, axis=2), axis=1)
            g = g * rs
    tl.store(d_base + t * s_dt + h * HEAD_DIM + d, g.to(d_base.dtype.element_ty), mask=mask)
    return dot0, dot1, token_dot


@triton.jit
def _gate_bwd_tile(dg_base, g_base, d_base, rs, offs_t, T, s_dgt, s_dgh, s_gt, s_dt, H, BLOCK_H: tl.constexpr,
                   ROW_SCALE: tl.constexpr):
    """The gate logits' gradient (times rs with ROW_SCALE) into the packed gradient (d_base: its gate
    columns); returns its per-head sums over the tile's tokens (the bias's gradient share, (BLOCK_H,)) and
    the per-token sums of d gate * g (the row scales' shares; zeros without ROW_SCALE)."""
    t = offs_t[:, None]
    h = tl.arange(0, BLOCK_H)[None, :]
    mask = (t < T) & (h < H)
    dg = tl.load(dg_base + t * s_dgt + h * s_dgh, mask=mask, other=0.0).to(tl.float32)
    token_dot = tl.zeros(offs_t.shape, tl.float32)
    d_raw = dg
    if ROW_SCALE:
        g = tl.load(g_base + t * s_gt + h, mask=mask, other=0.0).to(tl.float32)
        token_dot = tl.sum(dg * g, axis=1)
        d_raw = dg * rs
    tl.store(d_base + t * s_dt + h, d_raw.to(d_base.dtype.element_ty), mask=mask)
    return tl.sum(dg, axis=0), token_dot


@triton.jit
def _qk_norm_rope_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, e_ptr, v0_ptr, mix_ptr, rs_ptr, gq_ptr, gk_ptr, gv_ptr,
                             gg_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, cos_ptr, sin_ptr, gain_ptr, part_ptr,
                             bias_part_ptr, mix_part_ptr, rs_part_ptr,
                             s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_gb, s_gt, s_eb, s_et, s_eh,
                             s_gqb, s_gqt, s_gqh, s_gkb, s_gkt, s_gkh,
                             s_gvb, s_gvt, s_gvh, s_ggb, s_ggt, s_ggh, s_dqb, s_dqt, s_dkb, s_dkt,
                             cos_st, cos_sd, sin_st, sin_sd, T, H, H_KV, eps,
                             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                             PACKED: tl.constexpr, BLOCK_H: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
                             HAS_VE: tl.constexpr, RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr):
    """Programs as in forward. PACKED: dq, dk, dv and the gate's gradient are column ranges of one
    packed gradient (dq's strides for all four); the v programs write d raw (RESIDUAL: lambda_1 dv, and
    the d lambda partials from v, e and v0 as forward read them), the first also the gate's. ROW_SCALE:
    every gradient row times its token's scale, and each program's per-token share of the scales'
    gradient in row pid_h of the (programs along axis 1, B T) workspace at rs_part_ptr."""
    if ROWS_ALIGNED:  # strides known to be multiples of 8 elements: 16-byte accesses (see _rows_aligned)
        s_qb, s_qt, s_qh = s_qb // 8 * 8, s_qt // 8 * 8, s_qh // 8 * 8
        s_kb, s_kt, s_kh = s_kb // 8 * 8, s_kt // 8 * 8, s_kh // 8 * 8
        s_vb, s_vt, s_vh = s_vb // 8 * 8, s_vt // 8 * 8, s_vh // 8 * 8
        s_gb, s_gt = s_gb // 8 * 8, s_gt // 8 * 8
        s_eb, s_et, s_eh = s_eb // 8 * 8, s_et // 8 * 8, s_eh // 8 * 8
        s_gqb, s_gqt, s_gqh = s_gqb // 8 * 8, s_gqt // 8 * 8, s_gqh // 8 * 8
        s_gkb, s_gkt, s_gkh = s_gkb // 8 * 8, s_gkt // 8 * 8, s_gkh // 8 * 8
        s_gvb, s_gvt, s_gvh = s_gvb // 8 * 8, s_gvt // 8 * 8, s_gvh // 8 * 8
        s_ggb, s_ggt = s_ggb // 8 * 8, s_ggt // 8 * 8
        s_dqb, s_dqt = s_dqb // 8 * 8, s_dqt // 8 * 8
        s_dkb, s_dkt = s_dkb // 8 * 8, s_dkt // 8 * 8
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = offs_t < T
    rs = _row_scales(rs_ptr + b * T, offs_t, T, ROW_SCALE)
    n_q = H // HEADS
    n_k = H_KV // HEADS
    # workspace: a row per head, a column per program's (b, token block), so the sums reduce contiguous rows
    col = b * tl.num_programs(0) + pid_t
    n_cols = tl.num_programs(0) * tl.num_programs(2)
    if pid_h < n_q:
        h0 = pid_h * HEADS
        part, token_dot = _bwd_tile(q_ptr + b * s_qb + h0 * s_qh, gq_ptr + b * s_gqb + h0 * s_gqh,
                                    dq_ptr + b * s_dqb + h0 * HEAD_DIM, gain_ptr + h0, cos_ptr, sin_ptr,
                                    rs[:, None, None], offs_t, T, s_qt, s_qh, s_gqt, s_gqh, s_dqt, cos_st, cos_sd,
                                    sin_st, sin_sd, eps, HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, True, ROW_SCALE)
        tl.store(part_ptr + (h0 + tl.arange(0, HEADS)) * n_cols + col, part)
    elif pid_h < n_q + n_k:
        h0 = (pid_h - n_q) * HEADS
        _, token_dot = _bwd_tile(k_ptr + b * s_kb + h0 * s_kh, gk_ptr + b * s_gkb + h0 * s_gkh,
                                 dk_ptr + b * s_dkb + h0 * HEAD_DIM, gain_ptr, cos_ptr, sin_ptr, rs[:, None, None],
                                 offs_t, T, s_kt, s_kh, s_gkt, s_gkh, s_dkt, cos_st, cos_sd, sin_st, sin_sd, eps,
                                 HEADS, HEAD_DIM, BLOCK_D, HALF, BLOCK_HALF, False, ROW_SCALE)
    else:  # PACKED: the launch has v programs only then
        h0 = (pid_h - n_q - n_k) * HEADS
        dot0, dot1, token_dot = _value_bwd_tile(
            gv_ptr + b * s_gvb + h0 * s_gvh, v_ptr + b * s_vb + h0 * s_vh, e_ptr + b * s_eb + h0 * s_eh,
            v0_ptr + (b * T * H_KV + h0) * HEAD_DIM, mix_ptr, dv_ptr + b * s_dqb + h0 * HEAD_DIM, rs[:, None, None],
            offs_t, T, s_gvt, s_gvh, s_vt, s_vh, s_et, s_eh, H_KV * HEAD_DIM, s_dqt, HEADS, HEAD_DIM, BLOCK_D,
            HAS_VE, RESIDUAL, ROW_SCALE)
        if RESIDUAL:
            heads = h0 + tl.arange(0, HEADS)
            tl.store(mix_part_ptr + heads * n_cols + col, dot0)
            tl.store(mix_part_ptr + (H_KV + heads) * n_cols + col, dot1)
        if h0 == 0:
            part, gate_token_dot = _gate_bwd_tile(gg_ptr + b * s_ggb, g_ptr + b * s_gb, dg_ptr + b * s_dqb,
                                                  rs[:, None], offs_t, T, s_ggt, s_ggh, s_gt, s_dqt, H, BLOCK_H,
                                                  ROW_SCALE)
            token_dot += gate_token_dot
            h = tl.arange(0, BLOCK_H)
            tl.store(bias_part_ptr + h * n_cols + col, part, mask=h < H)
    if ROW_SCALE:
        tl.store(rs_part_ptr + pid_h * (tl.num_programs(2) * T) + b * T + offs_t, token_dot, mask=token_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows_aligned(*tensors: Tensor) -> bool:
    """Whether every stride but the last of every tensor is a multiple of 8 elements. Triton only knows of
    a stride's divisibility by 16, so the packed projection's rows ((H + 2 Hkv) D + H = 1032 apart at the
    seed's shape) compiled to 2-byte loads and stores (the sm_90 PTX). With ROWS_ALIGNED the kernels round
    each stride down to a multiple of 8, the identity on these strides, which is how the compiler learns
    the divisibility (tl.multiple_of cannot mark a scalar argument): 16-byte accesses, as with rows 1024
    apart."""
    return all(s % 8 == 0 for t in tensors for s in t.stride()[:-1])


def _launch_shape(q, k, config, gpu_default, packed=False):
    """(config, heads per program, grid). A CPU tensor can only run under the interpreter, which
    gets its own small config; nothing else differs (the math is fp32 after every load anyway).
    Packed: the v heads' programs follow the k heads'."""
    B, T, H, _ = q.shape
    h_kv = k.shape[2]
    config = config or (INTERPRETER_CONFIG if q.device.type == "cpu" else gpu_default)
    heads = config.heads
    while H % heads or h_kv % heads:
        heads //= 2
    return config, heads, (triton.cdiv(T, config.block_t), (H + (2 if packed else 1) * h_kv) // heads, B)


def _split_packed(qkv: Tensor, num_heads: int, num_kv_heads: int):
    """Views q (B,T,H,D), k and v (B,T,Hkv,D), gate logits (B,T,H) of a packed [q | k | v | gate]
    projection output (B,T,(H + 2 Hkv) D + H)."""
    B, T, N = qkv.shape
    D = (N - num_heads) // (num_heads + 2 * num_kv_heads)
    q, k, v, g = qkv.split((num_heads * D, num_kv_heads * D, num_kv_heads * D, num_heads), dim=-1)
    return q.unflatten(-1, (num_heads, D)), k.unflatten(-1, (num_kv_heads, D)), v.unflatten(-1, (num_kv_heads, D)), g


def _value_inputs(v, v_embed, v0, v_mix, stand_in):
    """The value blend's kernel arguments: v_embed as (B,T,Hkv,D), v0 contiguous, and unread stand-ins
    for the absent ones."""
    e = stand_in if v_embed is None else _last_dim_contiguous(v_embed).unflatten(-1, v.shape[2:])
    v0 = stand_in if v0 is None else v0.contiguous()
    return e, v0, stand_in if v_mix is None else v_mix


def _forward(q, k, cos, sin, q_gain, config, v=None, g=None, gate_bias=None, v_embed=None, v0=None, v_mix=None,
             row_scale=None):
    """The forward launch: (q_out, k_out), plus with v, g (packed) (v_out, gate_out): all contiguous.
    v_out = v (+ v_embed), blended with v0 by v_mix when given; (packed) every row times row_scale first
    (see `qkv_prep`)."""
    B, T, H, D = q.shape
    h_kv = k.shape[2]
    packed = v is not None
    q_out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    k_out = torch.empty((B, T, h_kv, D), device=q.device, dtype=q.dtype)
    v_out = torch.empty((B, T, h_kv, D), device=q.device, dtype=q.dtype) if packed else q_out
    g_out = torch.empty((B, T, H), device=q.device, dtype=q.dtype) if packed else q_out
    outputs = (q_out, k_out, v_out, g_out) if packed else (q_out, k_out)
    if q_out.numel() == 0:
        return outputs
    v, g, gate_bias = (v, g, gate_bias) if packed else (q, q, q_gain)  # unread stand-ins
    e, v0_in, mix = _value_inputs(v, v_embed, v0, v_mix, q)
    config, heads, grid = _launch_shape(q, k, config, FWD_CONFIG, packed)
    _qk_norm_rope_fwd_kernel[grid](
        q, k, v, g, e, v0_in, mix, q if row_scale is None else row_scale.contiguous(), q_out, k_out, v_out, g_out,
        cos, sin, q_gain, gate_bias,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), e.stride(0), e.stride(1), e.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        T, H, h_kv, RMS_EPS, HEADS=heads, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), HALF=cos.shape[1],
        BLOCK_HALF=triton.next_power_of_2(max(cos.shape[1], 1)),
        BLOCK_T=config.block_t, PACKED=packed, BLOCK_H=triton.next_power_of_2(H),
        ROWS_ALIGNED=_rows_aligned(q, k, v, g, e, v0_in), HAS_VE=v_embed is not None, RESIDUAL=v0 is not None,
        ROW_SCALE=row_scale is not None, num_warps=config.num_warps)
    return outputs


def _backward(dq_out, dk_out, q, k, cos, sin, q_gain, config, dv_out=None, dg_out=None, d_packed=None, v=None,
              g=None, v_embed=None, v0=None, v_mix=None, row_scale=None):
    """The backward launch: dq, dk (contiguous, or column ranges of d_packed, which then also gets d raw
    values and the gate's gradient), the fp32 sums: d q_gain (H,), then (packed) d gate_bias (H,), then
    (v0 given) d v_mix's per-kv-head shares (2 Hkv,); and d row_scale (B,T) fp32 (None without one)."""
    B, T, H, D = q.shape
    h_kv = k.shape[2]
    packed = d_packed is not None
    if packed:
        dq, dk, dv, dg = _split_packed(d_packed, H, h_kv)
    else:
        dq = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, T, h_kv, D), device=q.device, dtype=k.dtype)
        v, g, dv, dg, dv_out, dg_out = q, q, dq, dq, dq_out, dq_out  # unread stand-ins
    e, v0_in, mix = _value_inputs(v, v_embed, v0, v_mix, q)
    config, heads, grid = _launch_shape(q, k, config, BWD_CONFIG, packed)
    # per-head partial sums of each (batch, token block), every entry written: one reduction sums them all
    rows = H * (2 if packed else 1) + (2 * h_kv if v0 is not None else 0)
    partials = torch.empty((rows, B * grid[0]), device=q.device, dtype=torch.float32)
    # the row scales' gradient: each program's per-token share, a row per program along axis 1
    token_partials = None if row_scale is None else torch.empty((grid[1], B * T), device=q.device,
                                                                dtype=torch.float32)
    if dq.numel() == 0:
        d_row_scale = None if row_scale is None else token_partials.zero_().sum(0).view(B, T)
        return dq, dk, partials.zero_().sum(-1), d_row_scale
    _qk_norm_rope_bwd_kernel[grid](
        q, k, v, g, e, v0_in, mix, q if row_scale is None else row_scale.contiguous(), dq_out, dk_out, dv_out,
        dg_out, dq, dk, dv, dg, cos, sin, q_gain, partials, partials[H:] if packed else partials,
        partials[2 * H:] if v0 is not None else partials, partials if row_scale is None else token_partials,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), e.stride(0), e.stride(1), e.stride(2),
        dq_out.stride(0), dq_out.stride(1), dq_out.stride(2), dk_out.stride(0), dk_out.stride(1), dk_out.stride(2),
        dv_out.stride(0), dv_out.stride(1), dv_out.stride(2), dg_out.stride(0), dg_out.stride(1), dg_out.stride(2),
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), T, H, h_kv, RMS_EPS,
        HEADS=heads, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), HALF=cos.shape[1],
        BLOCK_HALF=triton.next_power_of_2(max(cos.shape[1], 1)),
        BLOCK_T=config.block_t, PACKED=packed, BLOCK_H=triton.next_power_of_2(H),
        ROWS_ALIGNED=_rows_aligned(q, k, v, g, e, v0_in, dq_out, dk_out, dv_out, dg_out, dq, dk),
        HAS_VE=v_embed is not None, RESIDUAL=v0 is not None, ROW_SCALE=row_scale is not None,
        num_warps=config.num_warps)
    d_row_scale = None if row_scale is None else token_partials.sum(0).view(B, T)
    return dq, dk, partials.sum(-1), d_row_scale


def qk_norm_rope_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor,
                         config: QKPrepConfig | None = None) -> tuple[Tensor, Tensor]:
    """The forward launch (no autograd): (q_out, k_out), contiguous, in q's dtype."""
    return _forward(_last_dim_contiguous(q), _last_dim_contiguous(k), cos, sin, q_gain, config)


def qk_norm_rope_backward(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          q_gain: Tensor, config: QKPrepConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward launch: (dq, dk) contiguous in q's/k's dtype, d q_gain (H,) in q_gain's dtype."""
    dq, dk, sums, _ = _backward(*(_last_dim_contiguous(t) for t in (dq_out, dk_out, q, k)), cos, sin, q_gain, config)
    return dq, dk, sums.to(q_gain.dtype)


def qkv_prep_forward(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, gate_bias: Tensor, num_heads: int,
                     num_kv_heads: int, v_embed: Tensor | None = None, v0: Tensor | None = None,
                     v_mix: Tensor | None = None, row_scale: Tensor | None = None,
                     config: QKPrepConfig | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The packed forward launch (no autograd): (q_out, k_out, v, gate_logits), contiguous, in qkv's dtype."""
    q, k, v, g = _split_packed(_last_dim_contiguous(qkv), num_heads, num_kv_heads)
    return _forward(q, k, cos, sin, q_gain, config, v=v, g=g, gate_bias=gate_bias, v_embed=v_embed, v0=v0,
                    v_mix=v_mix, row_scale=row_scale)


def qkv_prep_backward(dq_out: Tensor, dk_out: Tensor, dv_out: Tensor, dg_out: Tensor, qkv: Tensor, cos: Tensor,
                      sin: Tensor, q_gain: Tensor, gate_bias: Tensor, num_heads: int, num_kv_heads: int,
                      v_embed: Tensor | None = None, v0: Tensor | None = None, v_mix: Tensor | None = None,
                      row_scale: Tensor | None = None,
                      config: QKPrepConfig | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The packed backward launch: d qkv (qkv's shape, contiguous, its dtype), d q_gain, d gate_bias,
    d v_mix (zeros without v0), d row_scale (B,T) fp32 (empty without it). The gradients of v0 (lambda_0 dv)
    and of the value embedding (d raw = lambda_1 dv) are left to the caller: a multiply each, which the
    compiler fuses into the sum over the blocks' shares and the embedding's own backward."""
    qkv = _last_dim_contiguous(qkv)
    q, k, v, g = _split_packed(qkv, num_heads, num_kv_heads)
    d_qkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    _, _, sums, d_row_scale = _backward(*(_last_dim_contiguous(t) for t in (dq_out, dk_out)), q, k, cos, sin, q_gain,
                                        config, dv_out=_last_dim_contiguous(dv_out), dg_out=dg_out, d_packed=d_qkv,
                                        v=v, g=g, v_embed=v_embed, v0=v0, v_mix=v_mix, row_scale=row_scale)
    H, h_kv = num_heads, num_kv_heads
    if v0 is None:
        d_mix = sums.new_zeros(2)
    else:  # the gradient of the blend weights as the model's bf16 copy of them receives it, then cast back
        d_mix = sums[2 * H:].view(2, h_kv).sum(-1).to(qkv.dtype).to(v_mix.dtype)
    if d_row_scale is None:
        d_row_scale = sums.new_empty(0)
    # a custom op's outputs may not alias each other: one of the two rows is copied
    return d_qkv, sums[:H].to(q_gain.dtype), sums[H:2 * H].to(gate_bias.dtype, copy=True), d_mix, d_row_scale


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


# Stride order, not exact strides: on the GPU inductor pads the projection's rows (1032 -> 1088 elements)
# and would otherwise copy the whole packed output to contiguous rows before each of these ops (the
# launchers take any row stride).
_PADDED_ROWS_OK = (torch.Tag.needs_fixed_stride_order,)


@torch.library.custom_op("recycore::qkv_prep", mutates_args=(), tags=_PADDED_ROWS_OK)
def _qkv_prep_op(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, gate_bias: Tensor, num_heads: int,
                 num_kv_heads: int, v_embed: Tensor | None, v0: Tensor | None, v_mix: Tensor | None,
                 row_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return qkv_prep_forward(qkv, cos, sin, q_gain, gate_bias, num_heads, num_kv_heads, v_embed, v0, v_mix,
                            row_scale)


@_qkv_prep_op.register_fake
def _(qkv, cos, sin, q_gain, gate_bias, num_heads, num_kv_heads, v_embed, v0, v_mix, row_scale):
    q, k, v, g = _split_packed(qkv, num_heads, num_kv_heads)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape)


@torch.library.custom_op("recycore::qkv_prep_backward", mutates_args=(), tags=_PADDED_ROWS_OK)
def _qkv_prep_backward_op(dq_out: Tensor, dk_out: Tensor, dv_out: Tensor, dg_out: Tensor, qkv: Tensor, cos: Tensor,
                          sin: Tensor, q_gain: Tensor, gate_bias: Tensor, num_heads: int, num_kv_heads: int,
                          v_embed: Tensor | None, v0: Tensor | None, v_mix: Tensor | None,
                          row_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return qkv_prep_backward(dq_out, dk_out, dv_out, dg_out, qkv, cos, sin, q_gain, gate_bias, num_heads,
                             num_kv_heads, v_embed, v0, v_mix, row_scale)


@_qkv_prep_backward_op.register_fake
def _(dq_out, dk_out, dv_out, dg_out, qkv, cos, sin, q_gain, gate_bias, num_heads, num_kv_heads, v_embed, v0, v_mix,
      row_scale):
    return (qkv.new_empty(qkv.shape), q_gain.new_empty(q_gain.shape), gate_bias.new_empty(gate_bias.shape),
            q_gain.new_empty(2), q_gain.new_empty(0 if row_scale is None else row_scale.shape))


def _packed_setup_context(ctx, inputs, output):
    qkv, cos, sin, q_gain, gate_bias, ctx.num_heads, ctx.num_kv_heads, v_embed, v0, v_mix, row_scale = inputs
    # rstd is recomputed from qkv; v0 and the value embedding are kept alive by their other readers anyway
    ctx.save_for_backward(qkv, cos, sin, q_gain, gate_bias, v_embed, v0, v_mix, row_scale)


def _packed_autograd_backward(ctx, dq_out, dk_out, dv_out, dg_out):
    qkv, cos, sin, q_gain, gate_bias, v_embed, v0, v_mix, row_scale = ctx.saved_tensors
    d_qkv, d_gain, d_bias, d_mix, d_row_scale = _qkv_prep_backward_op(
        dq_out, dk_out, dv_out, dg_out, qkv, cos, sin, q_gain, gate_bias, ctx.num_heads, ctx.num_kv_heads, v_embed,
        v0, v_mix, row_scale)
    lam = None if v0 is None else v_mix.to(dv_out.dtype)
    d_embed = None
    if v_embed is not None:  # d raw
        d_embed = (dv_out if v0 is None else dv_out * lam[1]).reshape(v_embed.shape)
    return (d_qkv, None, None, d_gain, d_bias, None, None, d_embed, None if v0 is None else dv_out * lam[0],
            None if v0 is None else d_mix, None if row_scale is None else d_row_scale)


_qkv_prep_op.register_autograd(_packed_autograd_backward, setup_context=_packed_setup_context)


# ----------------------------------------------------------------------------------------------
# The row scales of a folded input RMSNorm (qkv_prep's, and K1's through recycore.ops)
# ----------------------------------------------------------------------------------------------
class _NormRowScale(torch.autograd.Function):
    """s / rms(x) per row, with a backward that keeps only x (which the consumer's GEMM keeps anyway) and
    the fp32 row scales: autograd's own formula for the mean of squares saves 2 x in fp32, a (rows, d)
    fp32 tensor per call that the compiler's partitioner kept (seen on a compiled block)."""

    @staticmethod
    def forward(ctx, x, norm_scale):
        ms = x.to(torch.promote_types(x.dtype, torch.float32)).square().mean(-1)  # fp32 at least
        row_scale = torch.rsqrt(ms + RMS_EPS) * norm_scale.to(ms.dtype)
        ctx.save_for_backward(x, row_scale, norm_scale)
        return row_scale

    @staticmethod
    def backward(ctx, d_row_scale):
        x, row_scale, norm_scale = ctx.saved_tensors
        s = norm_scale.to(row_scale.dtype)
        # d (s (ms + eps)^-1/2) / dx = -s (ms + eps)^-3/2 x / d = -(row_scale^3 / s^2) x / d
        coef = -d_row_scale * row_scale.pow(3) / (s.square() * x.shape[-1])
        dx = (x * coef[..., None]).to(x.dtype)  # promoted by the multiply: no fp32 copy of x to keep
        d_norm_scale = None
        if ctx.needs_input_grad[1]:
            d_norm_scale = ((d_row_scale * row_scale).sum() / s).to(norm_scale.dtype)
        return dx, d_norm_scale


def norm_row_scale(x: Tensor, norm_scale: Tensor) -> Tensor:
    """norm_scale / rms(x) per row of x (fp32, F.rms_norm's eps), norm_scale a 0-d tensor: rms_norm(x) *
    norm_scale as a row scale that a fused kernel applies to the rows of x W^T (rms_norm(x) s W^T =
    (x W^T) s / rms(x)), so that the normed input is never written (`qkv_prep`'s and K1's row_scale)."""
    if norm_scale.ndim != 0:
        raise ValueError(f"norm_scale must be a 0-d tensor, got shape {tuple(norm_scale.shape)}")
    return _NormRowScale.apply(x, norm_scale)


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


def qkv_prep(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, gate_bias: Tensor, num_heads: int,
             num_kv_heads: int, v_embed: Tensor | None = None, v0: Tensor | None = None,
             v_mix: Tensor | None = None, row_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The attention's inputs from one packed projection output qkv (B,T,(H + 2 Hkv) D + H) = [q | k | v |
    gate logits]: q_out, k_out as `qk_norm_rope` makes them, the values (B,T,Hkv,D), gate logits +
    gate_bias (B,T,H), all contiguous; differentiable in every tensor but cos and sin. The values are
    raw = v + v_embed (B,T,Hkv*D; none: v), then with the value residual v_mix[0] v0 + v_mix[1] raw (v0
    (B,T,Hkv,D), v_mix (2,), both or neither), each add rounded to qkv's dtype as the model's chain rounds
    it (`value_blend_reference`). row_scale (B,T) fp32: every row of qkv is first multiplied by its token's
    scale (and rounded to qkv's dtype), which folds the projection's input RMSNorm into this op: for
    u = rms(x) s, u W^T = (x W^T) * s / rms(x), so the GEMM takes x and u is never written. Its backward
    writes the packed gradient in one pass (no concatenation of the four gradients)."""
    if qkv.ndim != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be (B,T,N) with a contiguous last dim, got shape {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    per_head = qkv.shape[-1] - num_heads
    if num_heads % num_kv_heads or per_head <= 0 or per_head % (num_heads + 2 * num_kv_heads):
        raise ValueError(f"qkv's last dim {qkv.shape[-1]} is not (H + 2 Hkv) D + H for H = {num_heads}, "
                         f"Hkv = {num_kv_heads}")
    if gate_bias.shape != (num_heads,) or gate_bias.device != qkv.device:
        raise ValueError(f"gate_bias must be (H,) = ({num_heads},) on qkv's device, got {tuple(gate_bias.shape)} "
                         f"on {gate_bias.device}")
    q, k, v, _ = _split_packed(qkv, num_heads, num_kv_heads)
    _check_inputs(q, k, cos, sin, q_gain)
    _check_value_inputs(v, v_embed, v0, v_mix)
    if row_scale is not None and (row_scale.shape != qkv.shape[:2] or row_scale.dtype != torch.float32
                                  or row_scale.device != qkv.device):
        raise ValueError(f"row_scale must be (B,T) = {tuple(qkv.shape[:2])} fp32 on qkv's device, got "
                         f"{tuple(row_scale.shape)} {row_scale.dtype} on {row_scale.device}")
    return _qkv_prep_op(qkv, cos, sin, q_gain, gate_bias, num_heads, num_kv_heads, v_embed, v0, v_mix, row_scale)


def _check_value_inputs(v, v_embed, v0, v_mix):
    B, T, h_kv, D = v.shape
    if v_embed is not None and (v_embed.shape != (B, T, h_kv * D) or v_embed.dtype != v.dtype
                                or v_embed.device != v.device):
        raise ValueError(f"v_embed must be (B,T,Hkv*D) = ({B},{T},{h_kv * D}) in {v.dtype} on {v.device}, got "
                         f"{tuple(v_embed.shape)} in {v_embed.dtype} on {v_embed.device}")
    if (v0 is None) != (v_mix is None):
        raise ValueError("v0 and v_mix come together (the value residual) or not at all")
    if v0 is not None and (v0.shape != v.shape or v0.dtype != v.dtype or v0.device != v.device):
        raise ValueError(f"v0 must be (B,T,Hkv,D) = {tuple(v.shape)} in {v.dtype} on {v.device}, got "
                         f"{tuple(v0.shape)} in {v0.dtype} on {v0.device}")
    if v_mix is not None and (v_mix.shape != (2,) or v_mix.device != v.device):
        raise ValueError(f"v_mix must be (2,) on {v.device}, got {tuple(v_mix.shape)} on {v_mix.device}")


def qkv_prep_reference(qkv: Tensor, cos: Tensor, sin: Tensor, q_gain: Tensor, gate_bias: Tensor, num_heads: int,
                       num_kv_heads: int, v_embed: Tensor | None = None, v0: Tensor | None = None,
                       v_mix: Tensor | None = None, row_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain torch: the packed output times row_scale (rounded to its dtype), split, qk_norm_rope_reference
    on q and k, value_blend_reference on v, the bias added to the gate logits (in fp32, rounded once to
    qkv's dtype)."""
    if row_scale is not None:
        qkv = (qkv * row_scale[..., None]).to(qkv.dtype)
    q, k, v, g = _split_packed(qkv, num_heads, num_kv_heads)
    q, k = qk_norm_rope_reference(q, k, cos, sin, q_gain)
    return q, k, value_blend_reference(v, v_embed, v0, v_mix), (g.float() + gate_bias.float()).to(qkv.dtype)


def value_blend_reference(v: Tensor, v_embed: Tensor | None, v0: Tensor | None, v_mix: Tensor | None) -> Tensor:
    """The model's chain on v (B,T,Hkv,D): raw = v + v_embed; with the value residual
    v_mix[0] v0 + v_mix[1] raw, v_mix in v's dtype."""
    if v_embed is not None:
        v = v + v_embed.view_as(v)
    if v0 is not None:
        lam = v_mix.to(v.dtype)
        v = lam[0] * v0 + lam[1] * v
    return v


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
