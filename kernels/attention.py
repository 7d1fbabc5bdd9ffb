"""K2: gated XSA flash attention (causal, GQA), forward and backward, in Triton.

Y = sigmoid(g) * Z with Z = O - (O.n) n if xsa else O, where O = causal softmax(q k^T / sqrt(D)) v,
query head h reads kv head h // (H/Hkv), and n = v_t/||v_t|| is the value at the query's own position
in its kv head (eps 1e-12, as F.normalize).

Layouts: q (B,T,H,D), k and v (B,T,Hkv,D), gate_logits (B,T,H), any strides with D contiguous.
Saved for backward: O (B,T,H,D) in q's dtype and the log2-domain LSE (B,H,T) fp32.

Kernels
- `_attn_fwd_kernel`: online softmax (exp2, log2(e)*scale folded), the key blocks left of the
  diagonal without masks and the diagonal ones with the causal mask, XSA + gate on the same tile.
- `_xsa_gate_bwd_kernel`: the epilogue's backward (dO, dg, the XSA term of dv at the query's own
  position summed over the group's heads) and delta = rowsum(dO*O), one program per kv head so the
  group sum needs no atomics. Also the backward of the standalone `xsa_gate` epilogue.
- `_attn_bwd_dkdv_kernel`: dK, dV of one key block summed over the group's query heads (no atomics),
  plus the XSA term of dv; `_attn_bwd_dq_kernel`: dQ of one query block. With one_pass the dK/dV
  kernel also adds its key block's share of dQ into an fp32 buffer (atomics) and the dQ kernel, which
  recomputes QK^T and dP, does not run: 5 matmuls instead of 7.

`xsa_gate` (+ `_xsa_gate_fwd_kernel`) is the same epilogue as a stand-alone op, to put around any
attention core (SDPA/cuDNN); `attention(..., impl=)` dispatches between the Triton kernels (two- or
one-pass backward) and that path, "auto" by measurement.
"""
import math
import warnings
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from recycore.kernels._common import check_tensor, on_interpreter

LOG2E = 1.4426950408889634
NORM_EPS = 1e-12  # F.normalize's default eps
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, PACK_GQA / ONE_PASS) per kernel, chosen on the H200 for D=64
# (benchmarks/README.md, K2). Forward/dQ need BLOCK_M % BLOCK_N == 0, dK/dV BLOCK_N % BLOCK_M == 0.
# PACK_GQA: one forward/dQ tile holds BLOCK_M positions of every query head of a kv group, so the
# group's heads share each K/V tile (dK/dV always loops over the group's heads).
# ONE_PASS: the dK/dV kernel also adds each key block's dQ share into an fp32 buffer (atomics, so dQ's
# sums are not in a fixed order) and the dQ kernel does not run.
FWD_CONFIG = (64, 64, 4, 3, True)
DKDV_CONFIG = (32, 128, 4, 3, False)
DQ_CONFIG = (64, 64, 4, 3, False)
# the one-pass backward's dK/dV tile: 8 warps, where the two-pass one's 4 would spill (benchmarks/README.md)
ONE_PASS_DKDV_CONFIG = (32, 128, 8, 3, True)
EPILOGUE_BLOCK_M = 64
# every program-tile step costs ~5 ms in the interpreter: few, small tiles
INTERPRET_CONFIGS = dict(fwd=(32, 32, 4, 1, True), dkdv=(32, 32, 4, 1, False), dkdv_one_pass=(32, 32, 4, 1, True),
                         dq=(32, 32, 4, 1, False), epilogue_block_m=32)
GPU_CONFIGS = dict(fwd=FWD_CONFIG, dkdv=DKDV_CONFIG, dkdv_one_pass=ONE_PASS_DKDV_CONFIG, dq=DQ_CONFIG,
                   epilogue_block_m=EPILOGUE_BLOCK_M)


def _configs(t):
    return INTERPRET_CONFIGS if on_interpreter(t) else GPU_CONFIGS


# ----------------------------------------------------------------------------------------------
# Epilogue math shared by the fused attention and the stand-alone xsa_gate op
# ----------------------------------------------------------------------------------------------
@triton.jit
def _xsa_gate_apply(o, v_self, g, XSA: tl.constexpr):
    """o, v_self (BLOCK_M, D) and g (BLOCK_M,) in fp32 -> Y = sigmoid(g) * (O - (O.n) n)."""
    if XSA:
        norm = tl.sqrt(tl.sum(v_self * v_self, axis=1))
        n = v_self / tl.maximum(norm, 1e-12)[:, None]
        o = o - tl.sum(o * n, axis=1)[:, None] * n
    return tl.sigmoid(g)[:, None] * o


@triton.jit
def _xsa_gate_grad(dy, o, v_self, g, XSA: tl.constexpr):
    """Backward of `_xsa_gate_apply`: returns (dO, dg, dv_self), all fp32."""
    s = tl.sigmoid(g)
    if XSA:
        norm = tl.sqrt(tl.sum(v_self * v_self, axis=1))
        inv_norm = 1.0 / tl.maximum(norm, 1e-12)
        n = v_self * inv_norm[:, None]
        o_n = tl.sum(o * n, axis=1)
        z = o - o_n[:, None] * n
    else:
        z = o
    dg = s * (1.0 - s) * tl.sum(dy * z, axis=1)
    dz = s[:, None] * dy
    if XSA:
        dz_n = tl.sum(dz * n, axis=1)
        do = dz - dz_n[:, None] * n
        dn = -(dz_n[:, None] * o + o_n[:, None] * dz)
        # n = v / max(||v||, eps): the radial part only has a gradient while the norm is not clamped
        dn_n = tl.where(norm > 1e-12, tl.sum(dn * n, axis=1), 0.0)
        dv_self = (dn - dn_n[:, None] * n) * inv_norm[:, None]
    else:
        do = dz
        dv_self = tl.zeros_like(dy)
    return do, dg, dv_self


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T,
                    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if DIAGONAL:  # only diagonal blocks can reach past T
            col_ok = offs_n < T
            k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if DIAGONAL:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        # the scale goes into the max of the row and into one FMA before exp2
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _packed_rows(pid_bg, H, T, start_m, GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of a tile of HEADS query heads (1, or the whole GQA group, which then shares each K/V tile)
    x BLOCK_M positions: returns (batch, kv head, each row's head, each row's position)."""
    n_head_blocks = H // HEADS
    b = (pid_bg // n_head_blocks).to(tl.int64)
    h0 = (pid_bg % n_head_blocks) * HEADS
    offs_r = tl.arange(0, HEADS * BLOCK_M)
    return b, h0 // GROUP, h0 + offs_r // BLOCK_M, start_m + offs_r % BLOCK_M


@triton.jit
def _attn_fwd_kernel(Q, K, V, G, Y, O, LSE,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_gb, stride_gt, stride_gh,
                     T, H, qk_scale,
                     GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, XSA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # the longest (most diagonal-distant) query blocks first, for a better tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    start_m = pid_m * BLOCK_M
    b, kv_h, h, offs_m = _packed_rows(tl.program_id(1), H, T, start_m, GROUP, HEADS, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh

    m_i = tl.full([HEADS * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_M], tl.float32)
    acc = tl.zeros([HEADS * BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                    0, start_m, T, qk_scale, HEAD_DIM, BLOCK_N, False, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                    start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                                    HEAD_DIM, BLOCK_N, True, UPCAST, DOT_PRECISION)
    o = acc / l_i[:, None]
    tl.store(LSE + (b * H + h) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)

    row_off = ((b * T + offs_m) * H + h) * HEAD_DIM  # O and Y are contiguous (B,T,H,D)
    tl.store(O + row_off[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    if XSA:
        v_self = tl.load(v_base + offs_m[:, None] * stride_vt + offs_d[None, :], mask=row_ok[:, None],
                         other=0.0).to(tl.float32)
    else:
        v_self = o
    g = tl.load(G + b * stride_gb + offs_m * stride_gt + h * stride_gh, mask=row_ok, other=0.0).to(tl.float32)
    y = _xsa_gate_apply(o, v_self, g, XSA)
    tl.store(Y + row_off[:, None] + offs_d[None, :], y.to(Y.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Stand-alone epilogue: forward, and backward (which is also the attention backward's preprocessing)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _xsa_gate_fwd_kernel(O, V, G, Y,
                         stride_ob, stride_ot, stride_oh, stride_vb, stride_vt, stride_vh,
                         stride_gb, stride_gt, stride_gh,
                         T, H, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         XSA: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    if XSA:
        v_self = tl.load(V + b * stride_vb + (h // GROUP) * stride_vh + offs_m[:, None] * stride_vt
                         + offs_d[None, :], mask=row_ok, other=0.0).to(tl.float32)
    else:
        v_self = o
    g = tl.load(G + b * stride_gb + offs_m * stride_gt + h * stride_gh, mask=offs_m < T, other=0.0).to(tl.float32)
    y = _xsa_gate_apply(o, v_self, g, XSA)
    row_off = ((b * T + offs_m) * H + h) * HEAD_DIM
    tl.store(Y + row_off[:, None] + offs_d[None, :], y.to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def _xsa_gate_bwd_kernel(DY, O, V, G, DO, DG, DV, DELTA,
                         stride_dyb, stride_dyt, stride_dyh, stride_ob, stride_ot, stride_oh,
                         stride_dob, stride_dot, stride_doh,
                         stride_vb, stride_vt, stride_vh, stride_gb, stride_gt, stride_gh,
                         T, H_KV, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         XSA: tl.constexpr, WRITE_DELTA: tl.constexpr):
    """One program per (query block, kv head): the group's heads in turn, dv summed in registers.
    Writes dO (strided like O, so an SDPA backward needs no copy), DV (B,T,Hkv,D) contiguous,
    dg (B,T,H) contiguous, delta (B,H,T)."""
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // H_KV).to(tl.int64)
    kv_h = pid_bk % H_KV
    H = H_KV * GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    if XSA:
        v_self = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_m[:, None] * stride_vt + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0).to(tl.float32)
    else:
        v_self = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dv_self = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j in tl.static_range(GROUP):
        h = kv_h * GROUP + j
        dy = tl.load(DY + b * stride_dyb + h * stride_dyh + offs_m[:, None] * stride_dyt + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
        o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        g = tl.load(G + b * stride_gb + offs_m * stride_gt + h * stride_gh, mask=row_ok, other=0.0).to(tl.float32)
        do, dg, dv_h = _xsa_gate_grad(dy, o, v_self, g, XSA)
        row = (b * T + offs_m) * H + h
        tl.store(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 do.to(DO.dtype.element_ty), mask=row_ok[:, None])
        tl.store(DG + row, dg.to(DG.dtype.element_ty), mask=row_ok)
        if WRITE_DELTA:
            tl.store(DELTA + (b * H + h) * T + offs_m, tl.sum(do * o, axis=1), mask=row_ok)
        dv_self += dv_h
    if XSA:
        row_kv = (b * T + offs_m) * H_KV + kv_h
        tl.store(DV + row_kv[:, None] * HEAD_DIM + offs_d[None, :], dv_self.to(DV.dtype.element_ty),
                 mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Backward: dK/dV and dQ
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                         offs_n, lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         DIAGONAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q_t = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q_t = q_t.to(tl.float32)
            do = do.to(tl.float32)
        # an infinite LSE gives the rows past T p = 0
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if DIAGONAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk += tl.dot(ds_t, tl.trans(q_t), input_precision=DOT_PRECISION)
        if DQ_ATOMIC:  # this key block's share of dQ (unscaled), summed over key blocks in fp32
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dot + offs_d[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DV_SELF, DQ_ACC,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                          stride_vb, stride_vt, stride_vh,
                          T, H_KV, sm_scale, qk_scale,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, XSA: tl.constexpr, DQ_ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """dK, dV of one key block, summed over the GROUP query heads that read it (no atomics); with
    DQ_ATOMIC also every query row's dQ share of this key block, added (fp32 atomics, unscaled) into
    DQ_ACC, so that no second pass recomputes P and dP for dQ (5 matmuls instead of 7).
    DO and DQ_ACC are contiguous (B,T,H,D); LSE, DELTA (B,H,T); DK, DV, DV_SELF contiguous (B,T,Hkv,D)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // H_KV).to(tl.int64)
    kv_h = pid_bk % H_KV
    H = H_KV * GROUP
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for j in tl.static_range(GROUP):
        h = kv_h * GROUP + j
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + (b * T * H + h) * HEAD_DIM
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        dq_base = DQ_ACC + (b * T * H + h) * HEAD_DIM
        # query blocks on the diagonal (causal mask), then all the ones below it
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt,
                                      H * HEAD_DIM, offs_n, start_n, diag_end, T, qk_scale, HEAD_DIM,
                                      BLOCK_M, True, DQ_ATOMIC, UPCAST, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt,
                                      H * HEAD_DIM, offs_n, start_n + BLOCK_N, T, T, qk_scale, HEAD_DIM,
                                      BLOCK_M, False, DQ_ATOMIC, UPCAST, DOT_PRECISION)
    row_kv = (b * T + offs_n) * H_KV + kv_h
    if XSA:  # the XSA term of dv at the query's own position, already summed over the group
        dv += tl.load(DV_SELF + row_kv[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    tl.store(DK + row_kv[:, None] * HEAD_DIM + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + row_kv[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T,
                       qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if DIAGONAL:  # only diagonal blocks can reach past T
            col_ok = offs_n < T
            k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
            v_t = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None])
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v_t = v_t.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if DIAGONAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh,
                        T, H, sm_scale, qk_scale,
                        GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of one query block of HEADS heads; DO and DQ contiguous (B,T,H,D), LSE and DELTA (B,H,T)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    start_m = pid_m * BLOCK_M
    b, kv_h, h, offs_m = _packed_rows(tl.program_id(1), H, T, start_m, GROUP, HEADS, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    row = (b * T + offs_m) * H + h
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    dq = tl.zeros([HEADS * BLOCK_M, HEAD_DIM], tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, 0, start_m, T,
                            qk_scale, HEAD_DIM, BLOCK_N, False, UPCAST, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, start_m,
                            tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_N, True, UPCAST,
                            DOT_PRECISION)
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _dot_precision(q):
    """fp32 inputs get exact fp32 dots (tf32 would miss the fp32 tolerance); 16-bit ones use the MMA."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _packed_heads(pack_gqa, group, block_m):
    """Query heads per forward/dQ tile: the whole kv group when packing keeps the tile <= 128 rows
    (the measured 2 x 64; larger tiles would spill registers), else one."""
    return group if pack_gqa and group * block_m <= 128 else 1


def _d_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def supports_head_dim(head_dim: int) -> bool:
    """Whether the fused kernels run this head size (one power-of-two tile along D)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check_attention_inputs(q, k, v, gate_logits):
    check_tensor(q, "q", ndim=4, dtypes=_FLOAT_DTYPES)
    device = q.device
    check_tensor(k, "k", ndim=4, dtypes=(q.dtype,), device=device)
    check_tensor(v, "v", ndim=4, dtypes=(q.dtype,), device=device)
    check_tensor(gate_logits, "gate_logits", ndim=3, dtypes=_FLOAT_DTYPES, device=device)
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be (B,T,Hkv,D) = ({B},{T},Hkv,{D}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(gate_logits.shape) != (B, T, H):
        raise ValueError(f"gate_logits must be (B,T,H) = {(B, T, H)}, got {tuple(gate_logits.shape)}")
    if k.shape[2] == 0 or H % k.shape[2] != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads ({k.shape[2]})")
    if not supports_head_dim(D):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")


def _attention_forward(q, k, v, gate_logits, xsa, config=None):
    """Launch the fused forward: returns (Y, O, LSE2) with LSE2 = log2-domain log-sum-exp (B,H,T) fp32."""
    _check_attention_inputs(q, k, v, gate_logits)
    q, k, v, gate_logits = (_d_contiguous(t) for t in (q, k, v, gate_logits))
    B, T, H, D = q.shape
    block_m, block_n, warps, stages, pack_gqa = config or _configs(q)["fwd"]
    heads = _packed_heads(pack_gqa, H // k.shape[2], block_m)
    y = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    o = torch.empty_like(y)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if y.numel() == 0:
        return y, o, lse
    grid = (triton.cdiv(T, block_m), B * H // heads)
    _attn_fwd_kernel[grid](
        q, k, v, gate_logits, y, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gate_logits.stride(0), gate_logits.stride(1), gate_logits.stride(2),
        T, H, LOG2E / math.sqrt(D),
        GROUP=H // k.shape[2], HEADS=heads, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, XSA=xsa,
        UPCAST=on_interpreter(q),
        DOT_PRECISION=_dot_precision(q),
        num_warps=warps, num_stages=stages)
    return y, o, lse


def _xsa_gate_backward(dy, o, v, gate_logits, xsa, *, delta=None, dv_dtype=None):
    """Launch the epilogue backward: returns (dO, dv_self or None, dg); fills delta (B,H,T) when given."""
    B, T, H, D = o.shape
    h_kv = v.shape[2]
    do = torch.empty_like(o)  # O's layout: an SDPA core's backward takes it without a copy
    dg = torch.empty((B, T, H), device=o.device, dtype=gate_logits.dtype)
    dv = torch.empty((B, T, h_kv, D), device=o.device, dtype=dv_dtype or v.dtype) if xsa else None
    if do.numel() == 0:
        return do, (dv.zero_() if xsa else None), dg
    block_m = _configs(o)["epilogue_block_m"]
    grid = (triton.cdiv(T, block_m), B * h_kv)
    _xsa_gate_bwd_kernel[grid](
        dy, o, v, gate_logits, do, dg, dv if xsa else do, delta if delta is not None else dg,
        dy.stride(0), dy.stride(1), dy.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gate_logits.stride(0), gate_logits.stride(1), gate_logits.stride(2),
        T, h_kv, GROUP=H // h_kv, HEAD_DIM=D, BLOCK_M=block_m, XSA=xsa, WRITE_DELTA=delta is not None)
    return do, dv, dg


def _attention_backward(dy, q, k, v, gate_logits, o, lse, xsa, dkdv_config=None, dq_config=None):
    """Launch the fused backward: returns (dq, dk, dv, dg)."""
    dy, q, k, v, gate_logits = (_d_contiguous(t) for t in (dy, q, k, v, gate_logits))
    B, T, H, D = q.shape
    h_kv = k.shape[2]
    group = H // h_kv
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    o = o.contiguous()  # dK/dV and dQ read dO with the contiguous (B,T,H,D) layout O has
    do, dv_self, dg = _xsa_gate_backward(dy, o, v, gate_logits, xsa, delta=delta, dv_dtype=torch.float32)
    dq = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, T, h_kv, D), device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk)
    if dq.numel() == 0:
        return dq, dk, dv, dg
    sm_scale = 1.0 / math.sqrt(D)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    configs = _configs(q)
    block_m, block_n, warps, stages, one_pass = dkdv_config or configs["dkdv"]
    dq_acc = torch.zeros((B, T, H, D), device=q.device, dtype=torch.float32) if one_pass else dq
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, block_n), B * h_kv)](
        q, k, v, do, lse, delta, dk, dv, dv_self if xsa else dv, dq_acc, *strides, T, h_kv, sm_scale,
        sm_scale * LOG2E, GROUP=group, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, XSA=xsa,
        DQ_ATOMIC=bool(one_pass), UPCAST=on_interpreter(q), DOT_PRECISION=_dot_precision(q),
        num_warps=warps, num_stages=stages)
    if one_pass:
        torch.mul(dq_acc, sm_scale, out=dq)
        return dq, dk, dv, dg
    block_m, block_n, warps, stages, pack_gqa = dq_config or configs["dq"]
    heads = _packed_heads(pack_gqa, group, block_m)
    _attn_bwd_dq_kernel[(triton.cdiv(T, block_m), B * H // heads)](
        q, k, v, do, lse, delta, dq, *strides, T, H, sm_scale, sm_scale * LOG2E,
        GROUP=group, HEADS=heads, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=on_interpreter(q),
        DOT_PRECISION=_dot_precision(q),
        num_warps=warps, num_stages=stages)
    return dq, dk, dv, dg


def _check_epilogue_inputs(o, v, gate_logits):
    check_tensor(o, "o", ndim=4, dtypes=_FLOAT_DTYPES)
    check_tensor(v, "v", ndim=4, dtypes=_FLOAT_DTYPES, device=o.device)
    check_tensor(gate_logits, "gate_logits", ndim=3, dtypes=_FLOAT_DTYPES, device=o.device)
    B, T, H, D = o.shape
    if v.shape[0] != B or v.shape[1] != T or v.shape[3] != D:
        raise ValueError(f"v must be (B,T,Hkv,D) = ({B},{T},Hkv,{D}), got {tuple(v.shape)}")
    if tuple(gate_logits.shape) != (B, T, H):
        raise ValueError(f"gate_logits must be (B,T,H) = {(B, T, H)}, got {tuple(gate_logits.shape)}")
    if v.shape[2] == 0 or H % v.shape[2] != 0:
        raise ValueError(f"the number of heads of o ({H}) must be a multiple of v's heads ({v.shape[2]})")
    if D & (D - 1):
        raise ValueError(f"head_dim must be a power of two, got {D}")


def _xsa_gate_forward(o, v, gate_logits, xsa):
    _check_epilogue_inputs(o, v, gate_logits)
    o, v, gate_logits = (_d_contiguous(t) for t in (o, v, gate_logits))
    B, T, H, D = o.shape
    y = torch.empty((B, T, H, D), device=o.device, dtype=o.dtype)
    if y.numel() == 0:
        return y
    block_m = _configs(o)["epilogue_block_m"]
    _xsa_gate_fwd_kernel[(triton.cdiv(T, block_m), B * H)](
        o, v, gate_logits, y, o.stride(0), o.stride(1), o.stride(2), v.stride(0), v.stride(1), v.stride(2),
        gate_logits.stride(0), gate_logits.stride(1), gate_logits.stride(2),
        T, H, GROUP=H // v.shape[2], HEAD_DIM=D, BLOCK_M=block_m, XSA=xsa)
    return y


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces through them) and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("recycore::gated_xsa_attention", mutates_args=())
def _gated_xsa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor,
                            xsa: bool, one_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """one_pass: which backward the autograd formula runs (the forward is the same)."""
    return _attention_forward(q, k, v, gate_logits, xsa)


@_gated_xsa_attention_op.register_fake
def _(q, k, v, gate_logits, xsa, one_pass=False):
    B, T, H, D = q.shape
    y = q.new_empty((B, T, H, D))
    return y, torch.empty_like(y), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("recycore::gated_xsa_attention_backward", mutates_args=())
def _gated_xsa_attention_backward_op(
        dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor,
        o: torch.Tensor, lse: torch.Tensor, xsa: bool,
        one_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """one_pass: dQ summed by the dK/dV kernel (its one-pass tile), else the two kernels."""
    return _attention_backward(dy, q, k, v, gate_logits, o, lse, xsa,
                               dkdv_config=_configs(q)["dkdv_one_pass"] if one_pass else None)


@_gated_xsa_attention_backward_op.register_fake
def _(dy, q, k, v, gate_logits, o, lse, xsa, one_pass=False):
    B, T, H, D = q.shape
    kv_shape = (B, T, k.shape[2], D)
    return (q.new_empty((B, T, H, D)), k.new_empty(kv_shape), k.new_empty(kv_shape),
            gate_logits.new_empty((B, T, H)))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, gate_logits, xsa, one_pass = inputs
    _, o, lse = output
    ctx.mark_non_differentiable(o, lse)  # saved for backward, not part of the result
    ctx.save_for_backward(q, k, v, gate_logits, o, lse)
    ctx.xsa, ctx.one_pass = xsa, one_pass


def _attention_autograd_backward(ctx, dy, _do, _dlse):
    q, k, v, gate_logits, o, lse = ctx.saved_tensors
    dq, dk, dv, dg = _gated_xsa_attention_backward_op(dy, q, k, v, gate_logits, o, lse, ctx.xsa, ctx.one_pass)
    return dq, dk, dv, dg, None, None


_gated_xsa_attention_op.register_autograd(_attention_autograd_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("recycore::xsa_gate", mutates_args=())
def _xsa_gate_op(o: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, xsa: bool) -> torch.Tensor:
    return _xsa_gate_forward(o, v, gate_logits, xsa)


@_xsa_gate_op.register_fake
def _(o, v, gate_logits, xsa):
    return o.new_empty(o.shape)


@torch.library.custom_op("recycore::xsa_gate_backward", mutates_args=())
def _xsa_gate_backward_op(dy: torch.Tensor, o: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor,
                          xsa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (do, dv, dg); dv is zero when xsa is False."""
    dy, o, v, gate_logits = (_d_contiguous(t) for t in (dy, o, v, gate_logits))
    do, dv, dg = _xsa_gate_backward(dy, o, v, gate_logits, xsa)
    return do, (dv if xsa else torch.zeros_like(v)), dg


@_xsa_gate_backward_op.register_fake
def _(dy, o, v, gate_logits, xsa):
    return torch.empty_like(o), v.new_empty(v.shape), gate_logits.new_empty(gate_logits.shape)


def _xsa_gate_setup_context(ctx, inputs, output):
    o, v, gate_logits, xsa = inputs
    ctx.save_for_backward(o, v, gate_logits)
    ctx.xsa = xsa


def _xsa_gate_autograd_backward(ctx, dy):
    o, v, gate_logits = ctx.saved_tensors
    do, dv, dg = _xsa_gate_backward_op(dy, o, v, gate_logits, ctx.xsa)
    return do, (dv if ctx.xsa else None), dg, None


_xsa_gate_op.register_autograd(_xsa_gate_autograd_backward, setup_context=_xsa_gate_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def gated_xsa_attention(q, k, v, gate_logits, xsa: bool, one_pass: bool = False):
    """Fused Triton causal GQA attention + XSA + sigmoid gate; q (B,T,H,D), k, v (B,T,Hkv,D), g (B,T,H).
    one_pass: the backward in one kernel (dQ summed into an fp32 buffer by atomics: not in a fixed order)."""
    return _gated_xsa_attention_op(q, k, v, gate_logits, bool(xsa), bool(one_pass))[0]


def xsa_gate(o, v, gate_logits, xsa: bool):
    """Fused XSA + sigmoid gate epilogue around any attention core: o (B,T,H,D), v (B,T,Hkv,D), g (B,T,H)."""
    return _xsa_gate_op(o, v, gate_logits, bool(xsa))


def xsa_gate_reference(o, v, gate_logits, xsa: bool):
    """Plain torch XSA (as SPEC §2) and the gate (none when gate_logits is None)."""
    B, T, H, D = o.shape
    h_kv = v.shape[2]
    if xsa:
        n = F.normalize(v, dim=-1, eps=NORM_EPS).unsqueeze(3)  # (B,T,Hkv,1,D)
        o_grouped = o.reshape(B, T, h_kv, H // h_kv, D)
        o = (o_grouped - (o_grouped * n).sum(-1, keepdim=True) * n).reshape(B, T, H, D)
    if gate_logits is not None:
        o = o * torch.sigmoid(gate_logits).unsqueeze(-1)
    return o


# The "sdpa_fused" path's core: cuDNN first (it takes GQA natively; benchmarks/README.md, K2).
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


def _sdpa_gqa(q, k, v):
    """Plain causal GQA SDPA on (B,T,H,D) views (backend as the caller's context picks); O as (B,T,H,D)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _sdpa_core(q, k, v):
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        return _sdpa_gqa(q, k, v)


def gated_xsa_attention_reference(q, k, v, gate_logits, xsa: bool):
    """Plain torch: SDPA core, then XSA exactly like SPEC, then the gate."""
    return xsa_gate_reference(_sdpa_gqa(q, k, v), v, gate_logits, xsa)


# ----------------------------------------------------------------------------------------------
# Dispatch: "auto" takes whichever fused path measured fastest on the shapes and layouts the caller passes
# (the order depends on both), by forward+backward time for a call that will be differentiated and by
# forward time for one that will not, once per signature, device and use, cached.
# ----------------------------------------------------------------------------------------------
FUSED_IMPLS = ("triton", "triton_one_pass", "sdpa_fused")
# what auto measures: the one-pass backward lost to the two-pass one at the seed shape by about a third
# (benchmarks/README.md, K2), so start-up does not spend time capturing it; it stays an explicit impl
AUTO_IMPLS = ("triton", "sdpa_fused")
UNMEASURED_IMPL = "sdpa_fused"  # when no measurement can run (inside a trace or a graph capture)
_CHOICES: dict = {}  # signature + (backward,) -> {"impl": ..., "ms": {impl: ms}}


def _signature(q, k, v, gate_logits, xsa):
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in (q, k, v, gate_logits)) + (bool(xsa), str(q.device))


def _can_measure(q) -> bool:
    return (not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and type(q) is torch.Tensor)


def measure_impls(q, k, v, gate_logits, xsa: bool, backward: bool = True, repeats: int = 7) -> dict[str, float]:
    """Median ms of forward+backward (or, backward False, the forward) of each of AUTO_IMPLS on fresh random
    inputs with the given tensors' shapes, strides and dtypes (never their values), each replayed as a
    CUDA graph: the GPU time of its kernels, which is what the captured training step and evaluation pay
    (an eager timing adds each impl's host time, which differs between the Triton launchers and cuDNN's).
    The impls take turns, repeat by repeat, so that the clocks' ramp from idle (this runs at start-up)
    does not fall on the first one alone. Where a capture fails, every impl is timed eagerly instead."""
    def like(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).normal_()

    inputs = [like(t).requires_grad_(backward) for t in (q, k, v, gate_logits)]
    d_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def run(impl):
        if backward:
            torch.autograd.grad(attention(*inputs, xsa, impl=impl), inputs, d_out)
        else:
            attention(*inputs, xsa, impl=impl)

    side = torch.cuda.Stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side):  # compiles, autotuning and cuDNN's plans before any capture
        for impl in AUTO_IMPLS:
            run(impl)
    torch.cuda.current_stream(q.device).wait_stream(side)
    try:
        graphs = {}
        for impl in AUTO_IMPLS:
            graphs[impl] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[impl]):
                run(impl)
        calls = {impl: graph.replay for impl, graph in graphs.items()}
    except RuntimeError as exc:
        warnings.warn(f"attention's measurement could not capture its impls ({str(exc)[:120]}); timing them eagerly")
        calls = {impl: partial(run, impl) for impl in AUTO_IMPLS}
    samples = {impl: [] for impl in AUTO_IMPLS}
    for _ in range(repeats):
        for impl, call in calls.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples[impl].append(start.elapsed_time(end))
    return {impl: sorted(ms)[len(ms) // 2] for impl, ms in samples.items()}


def choose_impl(q, k, v, gate_logits, xsa: bool) -> str:
    """The measured fastest fused impl for this signature and use (measured on its first call, then
    cached): by forward+backward time where this call will be differentiated (training), by forward
    time where not (evaluation: no_grad, inference_mode, or inputs that need no gradient)."""
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gate_logits))
    key = _signature(q, k, v, gate_logits, xsa) + (backward,)
    if key not in _CHOICES:
        if not _can_measure(q):
            return UNMEASURED_IMPL
        with torch.inference_mode(False), torch.enable_grad():  # its own inputs, whatever the caller's mode
            ms = measure_impls(q, k, v, gate_logits, xsa, backward=backward)
        _CHOICES[key] = {"impl": min(ms, key=ms.get), "ms": ms}
    return _CHOICES[key]["impl"]


def measured_choices() -> list[dict]:
    """What `auto` chose, per signature and use, with the timings it chose by."""
    return [{"shapes": [list(shape) for shape, _, _ in key[:4]], "xsa": key[4], "backward": key[6], **value}
            for key, value in _CHOICES.items()]


def attention(q, k, v, gate_logits, xsa: bool, impl: str = "auto"):
    """Gated XSA attention by `impl`: "triton" (fully fused), "triton_one_pass" (the same with its
    one-kernel backward), "sdpa_fused" (SDPA core + fused Triton epilogue), "reference", or "auto" (on
    CUDA the fused one measured fastest for these shapes and layouts, see `choose_impl`; the reference
    on the CPU)."""
    if impl == "auto":
        impl = choose_impl(q, k, v, gate_logits, xsa) if q.is_cuda else "reference"
    if impl in ("triton", "triton_one_pass"):
        if torch.is_autocast_enabled(q.device.type):  # as autocast casts SDPA's inputs (norms may give fp32)
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return gated_xsa_attention(q, k, v, gate_logits, xsa, one_pass=impl == "triton_one_pass")
    if impl == "sdpa_fused":
        return xsa_gate(_sdpa_core(q, k, v), v, gate_logits, xsa)
    if impl == "reference":
        return gated_xsa_attention_reference(q, k, v, gate_logits, xsa)
    raise ValueError(f"impl must be 'auto', {', '.join(repr(i) for i in FUSED_IMPLS)} or 'reference', got {impl!r}")
