"""The tiled GEMM template shared by K1 (LeakyReLU² MLP) and K3 (int5 matmul).

C[M, N] = A[M, K] @ B[N, K]^T, fp32 accumulation, where

- A and B are read through arbitrary strides, so a transposed operand is a stride swap
  (`x.t()` views: the MLP's backward GEMMs need no copies);
- the weight loader (B) is a constexpr choice: BF16 (any float dtype, plain strided loads) or
  INT5 (packed words unpacked in registers, see "INT5 layout"); with INT5 the tile product is
  computed transposed, C^T = B A^T, so that the unpacked weight is the MMA's register operand
  (wgmma reads A from registers, B only from shared memory) and the MMAs stay asynchronous
  (as B operand, written to shared memory in the loop, every MMA had to complete before the next);
- the epilogue is a constexpr choice, after an optional ROW_SCALE (column n times scale[n], the
  scale of weight row n) and M_SCALE (row m times m_scale[m]: K1's folded input RMSNorm): NONE
  (store C), LEAKY_RELU2 (round C to the output dtype as `pre`, store
  `pre` and/or `post = leaky_relu(pre, 0.5)^2`), LEAKY_RELU2_GRAD (C is d_post: store
  d_pre = C * (pre > 0 ? 2 pre : 0.5 pre), reading `pre`); with PRE_AS_SIGN the `pre` slot holds
  instead the sign of pre, one bit per value ((M, N / 32) int32, bit j of word w: pre[:, 32 w + j]
  < 0): LEAKY_RELU2 stores those bits, LEAKY_RELU2_GRAD reads them and `post`, with |pre| =
  sqrt(post) (pre > 0) or 2 sqrt(post): d_pre = C * (pre > 0 ? 2 sqrt(post) : -sqrt(post)); with
  ROW_DOT LEAKY_RELU2_GRAD also hands back each row's sum over the tile of d_pre * pre (the gradient of
  an M_SCALE of the forward, summed over the tiles by the launcher);
- split-K over the second grid axis: each split writes its fp32 partial C into a workspace slice,
  and `_splitk_reduce_kernel` sums the slices and applies ROW_SCALE and the epilogue (no atomics,
  deterministic); or, with REDUCE_IN_KERNEL, the last split of a tile to arrive (an arrival counter
  per tile, reset by that split) sums the slices in split order and stores the epilogue itself: the
  same numbers in one launch, for latency-bound small-M GEMMs;
- `GemmConfig.persistent` (float operands, no split-K) runs `_gemm_persistent_kernel` instead: one
  program per SM loops over the output tiles (same grouped order), reading A and B through TMA
  descriptors and storing the epilogue through them (optionally in two BLOCK_N / 2 halves,
  `epilogue_subtile`, which halves the shared-memory staging of the stores). Why: at K = 512 the
  main loop is short and the fused epilogue (two (M, h) bf16 outputs, or a read of `pre`) dominates;
  a one-tile-per-program kernel cannot overlap that epilogue with anything, while the persistent
  loop (flattened, so the pipeliner prefetches the next tile's first K-steps during the epilogue)
  and the asynchronous TMA stores can. A transposed operand (`x.t()`, unit stride along the rows)
  gets a descriptor on its storage with a transposed block and a `tl.trans` after the load; ragged
  edges rely on TMA (zero padding on loads, clipped stores). Operands or outputs TMA cannot address
  (base or leading stride not 16-byte aligned, no unit stride) fall back to `_gemm_kernel`.

INT5 layout (what `int5.py` transcodes the artifact into, once at load time): per weight row, the
values u = q + 15 in [0, 30] are taken in groups of INT5_GROUP = 128 along K (the row is padded with
u = 15, i.e. q = 0, to a multiple of 128); a group is 20 int32 words, 5 bits per value, laid out for
the MMA's register operand: value k = 8i + 2c + e of a group (pair i = 0..15, lane class c = 0..3,
e = 0..1) is held by the thread of lane class c next to its pair partner (kWidth = 2), so
- class c's 16 pairs live in its own five words, t = 0..3 -> word 4c + t, t = 4 -> word 16 + c;
- pair i < 15 sits in word t = i // 3, value e = 0 at bits 5(i % 3)..+4 and e = 1 sixteen bits higher;
- pair 15 takes the spare bits: bit t of its e = 0 / e = 1 value is bit 15 / bit 31 of word t.
A pair is then unpacked with one shift and one mask (0x001F001F) into the two 16-bit halves of a
register, and OR-ing 0x43004300 turns it into two bf16 128 + u (exact for u in [0, 31]); subtracting
143 gives q. The word loads are one 16-byte vector and one 4-byte load per class, no gathers.
"""
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from recycore.kernels._common import check_tensor, on_interpreter

EPILOGUE_NONE = 0
EPILOGUE_LEAKY_RELU2 = 1
EPILOGUE_LEAKY_RELU2_GRAD = 2

INT5_GROUP = 128  # values per packed group (= BLOCK_K of every INT5 config)
INT5_GROUP_WORDS = 20  # 128 values * 5 bits / 32

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0  # for callers that split K: 0 = default_split_k's choice
    # Persistent TMA kernel (float operands, split_k 1; see the module doc); ignored otherwise.
    persistent: bool = False
    epilogue_subtile: bool = False  # persistent only: store the tile as two BLOCK_N / 2 halves


# The interpreter costs ~5 ms per program-tile step whatever the tile: one config, few big steps.
INTERPRET_CONFIG = GemmConfig(32, 32, 32, group_m=4, num_warps=4, num_stages=1)
INTERPRET_INT5_CONFIG = GemmConfig(32, 32, INT5_GROUP, group_m=4, num_warps=4, num_stages=1)
INTERPRET_PROGRAMS = 3  # the persistent kernel's "SM count" under the interpreter: several tiles each


@lru_cache(maxsize=1024)
def default_config(M, N, K, int5=False, interpreter=False):
    """A reasonable Hopper config for shapes without a tuned entry (callers pass tuned ones); cached,
    as it is asked on every launch."""
    if interpreter:
        return INTERPRET_INT5_CONFIG if int5 else INTERPRET_CONFIG
    block_k = INT5_GROUP if int5 else 64
    if M <= 64:  # skinny: split-K decides the parallelism
        block_m = max(16, triton.next_power_of_2(M))
        return GemmConfig(block_m, 64, block_k, group_m=1, num_warps=4, num_stages=4)
    if M >= 4096 and N >= 256:
        return GemmConfig(128, 256 if not int5 else 128, block_k, group_m=8, num_warps=8, num_stages=3)
    return GemmConfig(128, 128, block_k, group_m=8, num_warps=8 if int5 else 4, num_stages=3 if int5 else 4)


@lru_cache(maxsize=None)
def num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


ARRIVAL_COUNTERS = 4096  # the most output tiles of one REDUCE_IN_KERNEL launch
ARRIVAL_STREAMS = 8  # streams per device with counters of their own
_ARRIVALS: dict = {}  # device -> zeroed (ARRIVAL_STREAMS, ARRIVAL_COUNTERS) int32, made outside any capture
_ARRIVAL_SLOTS: dict = {}  # (device, stream id) -> its row


def arrival_counters(device):
    """The per-tile arrival counters of REDUCE_IN_KERNEL launches on `device`'s current stream (zero
    between launches: each launch's last splits reset theirs; a row per stream, so that launches on
    concurrent streams never share one), or None where there are none to have: inside a CUDA-graph
    capture before any launch outside one on this device (counters made in a capture would be zeroed
    only when that graph replays), or past ARRIVAL_STREAMS streams."""
    on_cuda = device.type == "cuda"
    if device not in _ARRIVALS:
        if on_cuda and torch.cuda.is_current_stream_capturing():
            return None
        _ARRIVALS[device] = torch.zeros(ARRIVAL_STREAMS, ARRIVAL_COUNTERS, dtype=torch.int32, device=device)
    stream_id = torch.cuda.current_stream(device).stream_id if on_cuda else 0
    key = (device, stream_id)
    if key not in _ARRIVAL_SLOTS:
        _ARRIVAL_SLOTS[key] = sum(known[0] == device for known in _ARRIVAL_SLOTS)
    slot = _ARRIVAL_SLOTS[key]
    return _ARRIVALS[device][slot] if slot < ARRIVAL_STREAMS else None


def default_split_k(M, N, K, config, device):
    """Split K so that a GEMM with few output tiles (weight gradients: K = tokens; skinny int5
    GEMMs) still fills the GPU with about four waves, keeping >= 4 K-steps per split."""
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    max_split = max(1, K // (4 * config.block_k))
    return max(1, min(max_split, (4 * num_sms(device.index or 0)) // tiles))


# ----------------------------------------------------------------------------------------------
# Triton building blocks
# ----------------------------------------------------------------------------------------------
@triton.jit
def _leaky_relu2(x):
    """leaky_relu(x, 0.5)^2 in x's dtype (bf16 on the GPU rounds once, like torch's bf16 ops)."""
    y = tl.where(x > 0, x, x * 0.5)
    return y * y


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share B tiles while they are hot in L2."""
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % pids_per_group) % group_size_m
    pid_n = (tile_id % pids_per_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _load_int5_tile(b_ptr, offs_n, mask_n, k0, stride_bn, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """The (BLOCK_N, INT5_GROUP) tile of q = u - 15 for k in [k0, k0 + 128), in bf16 (fp32 under
    UPCAST); weight row n starts at b_ptr + n * stride_bn (see the module doc for the layout)."""
    group = b_ptr + offs_n[:, None, None] * stride_bn + (k0 // 128) * 20
    c = tl.arange(0, 4)[None, :, None]
    mask = mask_n[:, None, None]
    w4 = tl.load(group + 4 * c + tl.arange(0, 4)[None, None, :], mask=mask, other=0)  # (BLOCK_N, c, t)
    w_4 = tl.reshape(tl.load(group + 16 + c, mask=mask, other=0), (BLOCK_N, 4))[:, None, :]
    even, odd = tl.split(tl.reshape(w4, (BLOCK_N, 4, 2, 2)))  # words t = 0, 2 and t = 1, 3
    w_0, w_2 = tl.split(even)
    w_1, w_3 = tl.split(odd)
    w_0 = w_0[:, None, :]  # (BLOCK_N, 1, c), broadcast over the pairs i
    w_1 = w_1[:, None, :]
    w_2 = w_2[:, None, :]
    w_3 = w_3[:, None, :]
    i = tl.arange(0, 16)[None, :, None]
    t = i // 3  # a per-register constant in the operand layout: the selects fold away
    word = tl.where(t == 0, w_0, tl.where(t == 1, w_1, tl.where(t == 2, w_2, tl.where(t == 3, w_3, w_4))))
    pair = (word >> (5 * (i % 3))) & 0x001F001F
    spare = (((w_0 >> 15) & 0x00010001) | ((w_1 >> 14) & 0x00020002) | ((w_2 >> 13) & 0x00040004)
             | ((w_3 >> 12) & 0x00080008) | ((w_4 >> 11) & 0x00100010))
    pair = tl.where(i == 15, spare, pair) | 0x43004300  # two bf16 128 + u
    u = tl.join(pair.to(tl.int16), (pair >> 16).to(tl.int16))  # (BLOCK_N, i, c, e)
    q = tl.reshape(u, (BLOCK_N, 128)).to(tl.bfloat16, bitcast=True)  # column 8i + 2c + e
    if UPCAST:
        return q.to(tl.float32) - 143.0
    return q - 143.0


@triton.jit
def _put(dst, offs, mask, value, TMA: tl.constexpr):
    """Store `value` in dst's dtype: a pointer tile (offs, mask), or under TMA a descriptor block at
    offs = (row, col) (TMA clips the rows and columns past the tensor's edge)."""
    if TMA:
        dst.store(offs, value.to(dst.dtype))
    else:
        tl.store(dst + offs, value.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _sign_word_offsets(offs, mask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offsets, mask) of the sign words of the (BLOCK_M, BLOCK_N) pointer tile at `offs` in the
    (M, N / 32) words (N a multiple of 32; under TMA the words' block is at (row, col // 32))."""
    words = tl.min(tl.reshape(offs, (BLOCK_M, BLOCK_N // 32, 32)), axis=2) // 32
    return words, tl.max(tl.reshape(mask.to(tl.int32), (BLOCK_M, BLOCK_N // 32, 32)), axis=2) != 0


@triton.jit
def _store_epilogue(acc, offs, mask, out_ptr, pre_ptr, post_ptr,
                    EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, STORE_POST: tl.constexpr,
                    UPCAST: tl.constexpr, TMA: tl.constexpr = False, PRE_AS_SIGN: tl.constexpr = False,
                    ROW_DOT: tl.constexpr = False):
    """Apply the epilogue to the fp32 tile `acc` and store it at `offs` (shared by the GEMM, the
    persistent GEMM and the split-K reduction; the outputs are contiguous (M, N) tensors, given as
    pointers, or under TMA as descriptors with offs = the block's (row, col)). PRE_AS_SIGN: pre_ptr
    holds pre's sign bits (see the module doc; 2-D tiles only). Returns, with ROW_DOT (LEAKY_RELU2_GRAD,
    2-D tiles), each row's sum over the tile of d_pre * pre (fp32), else 0."""
    row_dot = 0.0
    if EPILOGUE == 1:  # LEAKY_RELU2: acc is pre
        # post is computed from the pre that backward sees (rounded to its dtype)
        if TMA:
            pre = acc.to(post_ptr.dtype)
        else:
            pre = acc.to(post_ptr.dtype.element_ty)
        if STORE_PRE:
            if PRE_AS_SIGN:
                bits = tl.reshape((pre < 0).to(tl.int32), (acc.shape[0], acc.shape[1] // 32, 32))
                words = tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)  # distinct bits: sum = or
                if TMA:
                    _put(pre_ptr, (offs[0], offs[1] // 32), None, words, TMA)
                else:
                    word_offs, word_mask = _sign_word_offsets(offs, mask, acc.shape[0], acc.shape[1])
                    _put(pre_ptr, word_offs, word_mask, words, TMA)
            else:
                _put(pre_ptr, offs, mask, pre, TMA)
        if STORE_POST:
            if UPCAST:
                pre = pre.to(tl.float32)
            _put(post_ptr, offs, mask, _leaky_relu2(pre), TMA)
    elif EPILOGUE == 2:  # LEAKY_RELU2_GRAD: acc is d_post
        if PRE_AS_SIGN:
            if TMA:  # zero-padded past the edges
                post = post_ptr.load(offs).to(tl.float32)
                words = pre_ptr.load([offs[0], offs[1] // 32])
            else:
                word_offs, word_mask = _sign_word_offsets(offs, mask, acc.shape[0], acc.shape[1])
                post = tl.load(post_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                words = tl.load(pre_ptr + word_offs, mask=word_mask, other=0)
            bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
            negative = tl.reshape(bits, (acc.shape[0], acc.shape[1])) != 0
            root = tl.sqrt(post)  # |pre| (pre > 0), |pre| / 2 (pre < 0)
            d_pre = acc * tl.where(negative, -root, 2.0 * root)
            if ROW_DOT:
                row_dot = tl.sum(d_pre * tl.where(negative, -2.0 * root, root), axis=1)
        else:
            if TMA:
                pre = pre_ptr.load(offs).to(tl.float32)  # zero-padded past the edges
            else:
                pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d_pre = acc * tl.where(pre > 0, 2.0 * pre, 0.5 * pre)
            if ROW_DOT:
                row_dot = tl.sum(d_pre * pre, axis=1)
        _put(out_ptr, offs, mask, d_pre, TMA)
    else:
        _put(out_ptr, offs, mask, acc, TMA)
    return row_dot


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, out_ptr, pre_ptr, post_ptr, scale_ptr, ws_ptr, arrivals_ptr, m_scale_ptr, dot_ptr,
    M, N, K, k_per_split,
    stride_am, stride_ak, stride_bn, stride_bk,
    B_INT5: tl.constexpr,
    EPILOGUE: tl.constexpr, ROW_SCALE: tl.constexpr, STORE_PRE: tl.constexpr, STORE_POST: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRE_AS_SIGN: tl.constexpr = False, M_SCALE: tl.constexpr = False, ROW_DOT: tl.constexpr = False,
):
    """One output tile (and one K split) per program. WRITE_PARTIALS: the fp32 partial goes to the
    split's workspace slice ws[split]; REDUCE_IN_KERNEL: the tile's last split to arrive (counted in
    arrivals[tile], zero between launches) sums the slices and stores the epilogue. M_SCALE: row m
    times m_scale[m] before the epilogue; ROW_DOT: each row's epilogue row dot (see _store_epilogue)
    into dot[pid_n, m] ((cdiv(N, BLOCK_N), M) fp32)."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    if B_INT5:  # C^T = W x^T: the unpacked weight is the MMA's register operand (async wgmma)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        if B_INT5:
            # Values past K are padding (q = 0) or masked out of A: no K mask needed.
            w = _load_int5_tile(b_ptr, offs_n, mask_n, k0, stride_bn, BLOCK_N, UPCAST).to(a.dtype)
            acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
            if EVEN_K:
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if B_INT5:
        acc = tl.trans(acc)

    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if WRITE_PARTIALS:  # split-K: raw fp32 partial into this split's workspace slice
        tl.store(ws_ptr + tl.program_id(1) * M * N + offs, acc, mask=mask)
        if REDUCE_IN_KERNEL:
            # every thread's partial is written before the (release) arrival is counted
            tl.debug_barrier()
            arrived = tl.atomic_add(arrivals_ptr + tl.program_id(0), 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:  # the others' partials are visible (acquire)
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for split in range(tl.num_programs(1)):  # split order, as _splitk_reduce_kernel sums
                    # .cg: from L2, where the other programs' stores are (L1 is not coherent)
                    acc += tl.load(ws_ptr + split * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                _epilogue(acc, offs, offs_m, offs_n, mask, mask_m, mask_n, out_ptr, pre_ptr, post_ptr, scale_ptr,
                          m_scale_ptr, dot_ptr + pid_n * M, EPILOGUE, ROW_SCALE, STORE_PRE, STORE_POST, UPCAST,
                          PRE_AS_SIGN, M_SCALE, ROW_DOT)
                tl.atomic_xchg(arrivals_ptr + tl.program_id(0), 0)  # zero for the next launch
    else:
        _epilogue(acc, offs, offs_m, offs_n, mask, mask_m, mask_n, out_ptr, pre_ptr, post_ptr, scale_ptr,
                  m_scale_ptr, dot_ptr + pid_n * M, EPILOGUE, ROW_SCALE, STORE_PRE, STORE_POST, UPCAST, PRE_AS_SIGN,
                  M_SCALE, ROW_DOT)


@triton.jit
def _epilogue(acc, offs, offs_m, offs_n, mask, mask_m, mask_n, out_ptr, pre_ptr, post_ptr, scale_ptr, m_scale_ptr,
              dot_ptr, EPILOGUE: tl.constexpr, ROW_SCALE: tl.constexpr, STORE_PRE: tl.constexpr,
              STORE_POST: tl.constexpr, UPCAST: tl.constexpr, PRE_AS_SIGN: tl.constexpr, M_SCALE: tl.constexpr,
              ROW_DOT: tl.constexpr):
    """ROW_SCALE and M_SCALE, then the epilogue, of an (BLOCK_M, BLOCK_N) fp32 tile of `_gemm_kernel`;
    ROW_DOT: the tile's row dots stored at dot_ptr + offs_m."""
    if ROW_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if M_SCALE:
        acc = acc * tl.load(m_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    row_dot = _store_epilogue(acc, offs, mask, out_ptr, pre_ptr, post_ptr, EPILOGUE, STORE_PRE, STORE_POST, UPCAST,
                              PRE_AS_SIGN=PRE_AS_SIGN, ROW_DOT=ROW_DOT)
    if ROW_DOT:
        tl.store(dot_ptr + offs_m, row_dot, mask=mask_m)


@triton.jit
def _gemm_persistent_kernel(
    a_desc, b_desc, out_desc, pre_desc, post_desc, scale_ptr, m_scale_ptr, dot_ptr,
    M, N, K,
    A_T: tl.constexpr, B_T: tl.constexpr,
    EPILOGUE: tl.constexpr, ROW_SCALE: tl.constexpr, STORE_PRE: tl.constexpr, STORE_POST: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILE: tl.constexpr, PRE_AS_SIGN: tl.constexpr = False, M_SCALE: tl.constexpr = False,
    ROW_DOT: tl.constexpr = False,
):
    """C = A B^T like `_gemm_kernel` (float operands, no split-K; M_SCALE and ROW_DOT as there), one
    program per SM looping over the tiles. A_T / B_T: the descriptor is over the operand's transposed
    storage ((K, M) / (K, N) row-major, an `x.t()` view), its blocks are (BLOCK_K, rows)."""
    # The program count is a run-time value (not a constexpr): one binary for every grid size.
    num_programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile's coordinates from its own counter, so that nothing of the
    # flattened loop's prologue (the next tile's loads) waits on values held for the epilogue.
    epilogue_tile = tl.program_id(0) - num_programs
    # flatten: tiles x K-steps as one software-pipelined loop, so the next tile's first loads are
    # in flight while this tile's epilogue runs and its TMA stores drain.
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(k_steps):  # K past the edge: TMA pads both operands with zeros
            k0 = ks * BLOCK_K
            if A_T:
                a = tl.trans(a_desc.load([k0, m0]))
            else:
                a = a_desc.load([m0, k0])
            if B_T:
                b = b_desc.load([k0, n0])
            else:
                b = tl.trans(b_desc.load([n0, k0]))
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        epilogue_tile += num_programs
        pid_m, pid_n = _tile_coords(epilogue_tile, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        if ROW_SCALE:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if M_SCALE:
            acc = acc * tl.load(m_scale_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
        if SUBTILE:  # two (BLOCK_M, BLOCK_N / 2) stores: half the shared-memory staging
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            row_dot = _store_epilogue(acc0, (m0, n0), None, out_desc, pre_desc, post_desc, EPILOGUE, STORE_PRE,
                                      STORE_POST, UPCAST, TMA=True, PRE_AS_SIGN=PRE_AS_SIGN, ROW_DOT=ROW_DOT)
            row_dot += _store_epilogue(acc1, (m0, n0 + BLOCK_N // 2), None, out_desc, pre_desc, post_desc, EPILOGUE,
                                       STORE_PRE, STORE_POST, UPCAST, TMA=True, PRE_AS_SIGN=PRE_AS_SIGN,
                                       ROW_DOT=ROW_DOT)
        else:
            row_dot = _store_epilogue(acc, (m0, n0), None, out_desc, pre_desc, post_desc, EPILOGUE, STORE_PRE,
                                      STORE_POST, UPCAST, TMA=True, PRE_AS_SIGN=PRE_AS_SIGN, ROW_DOT=ROW_DOT)
        if ROW_DOT:
            tl.store(dot_ptr + pid_n * M + offs_m, row_dot, mask=offs_m < M)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, out_ptr, pre_ptr, post_ptr, scale_ptr, MN, N, split_k,
    EPILOGUE: tl.constexpr, ROW_SCALE: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_POST: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(split_k):
        acc += tl.load(ws_ptr + split * MN + offs, mask=mask, other=0.0)
    if ROW_SCALE:
        acc = acc * tl.load(scale_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    _store_epilogue(acc, offs, mask, out_ptr, pre_ptr, post_ptr, EPILOGUE, STORE_PRE, STORE_POST, UPCAST)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _check_output(t, name, shape, device):
    check_tensor(t, name, ndim=2, dtypes=_FLOAT_DTYPES, device=device, contiguous=True)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def gemm(a, b, *, out=None, pre=None, post=None, scale=None, epilogue=EPILOGUE_NONE,
         int5_k=None, split_k=1, config=None, pre_sign=False, m_scale=None, row_dot=None):
    """C = a @ b^T through the template; writes into the given contiguous (M, N) buffers.

    a: (M, K), b: (N, K), any strides (pass `x.t()` for a transposed operand), float dtypes;
    or, with int5_k=K, b is the (N, words) int32 INT5 layout of an (N, K) weight.
    epilogue NONE and LEAKY_RELU2_GRAD write `out` (the latter reads `pre`); LEAKY_RELU2 writes
    `pre` and/or `post`. `scale` (N,) multiplies column n before the epilogue (ROW_SCALE), `m_scale` (M,)
    fp32 row m (M_SCALE). `row_dot` (M,) fp32, LEAKY_RELU2_GRAD only: gets each row's sum of d_pre * pre
    (the tiles' partial sums in a workspace, summed in a fixed order).
    split_k > 1 sums fp32 partials in a workspace (not with LEAKY_RELU2_GRAD).
    pre_sign: `pre` is the (M, N / 32) int32 sign bits of pre (N a multiple of 32; see the module doc):
    LEAKY_RELU2 stores them (with post), LEAKY_RELU2_GRAD reads them and `post`.
    config.persistent: the persistent TMA kernel, when split_k is 1, b is not INT5 and every tensor
    suits TMA (see `_launch_persistent`); otherwise the one-tile-per-program kernel runs.
    """
    check_tensor(a, "a", ndim=2, dtypes=_FLOAT_DTYPES)
    device = a.device
    M, K = a.shape
    if int5_k is None:
        check_tensor(b, "b", ndim=2, dtypes=_FLOAT_DTYPES, device=device)
        if b.shape[1] != K:
            raise ValueError(f"a is (M, K) = {tuple(a.shape)} but b is {tuple(b.shape)}, not (N, {K})")
        if b.dtype != a.dtype:
            raise TypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
        N = b.shape[0]
    else:
        check_tensor(b, "packed weight", ndim=2, dtypes=(torch.int32,), device=device, contiguous=True)
        if int5_k != K or b.shape[1] != triton.cdiv(K, INT5_GROUP) * INT5_GROUP_WORDS:
            raise ValueError(f"packed weight {tuple(b.shape)} does not hold rows of K = {K} values")
        N = b.shape[0]
    if M * max(N, K) >= 2**31 or N * K >= 2**31:
        raise ValueError(f"GEMM ({M} x {N} x {K}) too large for 32-bit offsets")
    store_pre, store_post = pre is not None, post is not None
    if pre_sign:
        _check_sign_words(pre, post, epilogue, split_k, M, N, device)
    if epilogue == EPILOGUE_LEAKY_RELU2:
        if not (store_pre or store_post):
            raise ValueError("the LEAKY_RELU2 epilogue needs a pre and/or a post buffer")
        for t, name in ((pre, "pre"), (post, "post")):
            if t is not None and not (pre_sign and name == "pre"):
                _check_output(t, name, (M, N), device)
        if store_pre and store_post and pre.dtype != post.dtype and not pre_sign:
            raise TypeError("pre and post must have one dtype")
        out = post if pre_sign or not store_pre else pre
    else:
        if out is None:
            raise ValueError("epilogue NONE / LEAKY_RELU2_GRAD needs an out buffer")
        _check_output(out, "out", (M, N), device)
        if epilogue == EPILOGUE_LEAKY_RELU2_GRAD:
            if not pre_sign:
                _check_output(pre, "pre", (M, N), device)
            if split_k > 1:
                raise ValueError("split-K is not supported with the LEAKY_RELU2_GRAD epilogue")
        elif epilogue != EPILOGUE_NONE:
            raise ValueError(f"unknown epilogue {epilogue!r}")
    if scale is not None:
        check_tensor(scale, "scale", ndim=1, device=device, contiguous=True)
        if scale.shape[0] != N:
            raise ValueError(f"scale must have N = {N} entries, got {scale.shape[0]}")
    for t, name in ((m_scale, "m_scale"), (row_dot, "row_dot")):
        if t is not None:
            check_tensor(t, name, ndim=1, dtypes=(torch.float32,), device=device, contiguous=True)
            if t.shape[0] != M:
                raise ValueError(f"{name} must have M = {M} entries, got {t.shape[0]}")
    if row_dot is not None and epilogue != EPILOGUE_LEAKY_RELU2_GRAD:
        raise ValueError("row_dot is for the LEAKY_RELU2_GRAD epilogue")

    if config is None:
        config = default_config(M, N, K, int5=int5_k is not None, interpreter=on_interpreter(a))
    if int5_k is not None and config.block_k != INT5_GROUP:
        raise ValueError(f"INT5 configs need block_k = {INT5_GROUP}")
    dots = None if row_dot is None else torch.empty((triton.cdiv(N, config.block_n), M), device=device,
                                                    dtype=torch.float32)
    launch_template(a, b, out, pre, post, scale, epilogue=epilogue, int5=int5_k is not None, split_k=split_k,
                    config=config, pre_sign=pre_sign, m_scale=m_scale, dots=dots)
    if row_dot is not None:
        torch.sum(dots, dim=0, out=row_dot)


def launch_template(a, b, out, pre, post, scale, *, epilogue, int5, split_k, config, pre_sign=False,
                    reduce_in_kernel=False, m_scale=None, dots=None):
    """The template's launches on inputs already checked (by `gemm`, or once per call by int5.py's op):
    `out` is the tensor the epilogue writes (for LEAKY_RELU2 the stored `post`, else `pre`), `pre` is
    stored (LEAKY_RELU2) or read (LEAKY_RELU2_GRAD), `post` stored (LEAKY_RELU2) or, with pre_sign, read;
    `dots` ((cdiv(N, block_n), M) fp32) gets each tile's row dots (ROW_DOT, without split-K).
    K is cut into at most `split_k` splits of whole blocks (none empty); their fp32 partials are summed
    by `_splitk_reduce_kernel`, or with reduce_in_kernel by each tile's last split, where there are
    arrival counters for it (else by the reduction launch: the same sums in the same order)."""
    M, K = a.shape
    N = b.shape[0]
    upcast = on_interpreter(a)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty splits
    store_pre, store_post = pre is not None, post is not None and epilogue == EPILOGUE_LEAKY_RELU2
    pre_arg = pre if pre is not None else out
    post_arg = post if post is not None else out
    scale_arg = scale if scale is not None else out
    if dots is not None and split_k > 1:
        raise ValueError("row dots are not summed over K splits")
    if split_k == 1 and config.persistent and not int5:
        outputs = [t for t in (out, pre, post) if t is not None and not (pre_sign and t is pre)]
        if _launch_persistent(a, b, out, pre_arg, post_arg, scale, outputs, epilogue, store_pre, store_post,
                              M, N, K, config, pre_sign, m_scale, dots):
            return
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    arrivals = None
    if split_k > 1 and reduce_in_kernel and tiles <= ARRIVAL_COUNTERS:
        arrivals = arrival_counters(a.device)
    workspace = torch.empty((split_k, M, N), device=a.device, dtype=torch.float32) if split_k > 1 else out
    _gemm_kernel[(tiles, split_k)](
        a, b, out, pre_arg, post_arg, scale_arg, workspace, out if arrivals is None else arrivals,
        out if m_scale is None else m_scale, out if dots is None else dots,
        M, N, K, k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        B_INT5=int5,
        EPILOGUE=epilogue, ROW_SCALE=scale is not None, STORE_PRE=store_pre, STORE_POST=store_post,
        WRITE_PARTIALS=split_k > 1, REDUCE_IN_KERNEL=arrivals is not None, EVEN_K=K % config.block_k == 0,
        UPCAST=upcast, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        PRE_AS_SIGN=pre_sign, M_SCALE=m_scale is not None, ROW_DOT=dots is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1 and arrivals is None:
        _splitk_reduce_kernel[(triton.cdiv(M * N, _REDUCE_BLOCK),)](
            workspace, out, pre_arg, post_arg, scale_arg, M * N, N, split_k,
            EPILOGUE=epilogue, ROW_SCALE=scale is not None,
            STORE_PRE=store_pre, STORE_POST=store_post, UPCAST=upcast, BLOCK=_REDUCE_BLOCK,
        )


def _check_sign_words(pre, post, epilogue, split_k, M, N, device):
    """pre_sign: pre holds (M, N / 32) int32 sign words, and the epilogue has the post it needs."""
    if epilogue not in (EPILOGUE_LEAKY_RELU2, EPILOGUE_LEAKY_RELU2_GRAD):
        raise ValueError("pre_sign is for the LEAKY_RELU2 and LEAKY_RELU2_GRAD epilogues")
    if N % 32:
        raise ValueError(f"pre_sign packs 32 columns per word: N = {N} is not a multiple of 32")
    check_tensor(pre, "pre (sign words)", ndim=2, dtypes=(torch.int32,), device=device, contiguous=True)
    if tuple(pre.shape) != (M, N // 32):
        raise ValueError(f"pre (sign words) must have shape {(M, N // 32)}, got {tuple(pre.shape)}")
    if post is None:
        raise ValueError("pre_sign needs post (stored with the sign, or read with it for the gradient)")
    _check_output(post, "post", (M, N), device)
    if split_k > 1:
        raise ValueError("split-K is not supported with pre_sign")


def _tma_aligned(t, lead_stride):
    """TMA addresses t with unit last stride: 16-byte aligned base and leading stride."""
    return t.data_ptr() % 16 == 0 and (lead_stride * t.element_size()) % 16 == 0


def _operand_descriptor(x, block_rows, block_k):
    """(descriptor, transposed) for an (R, K) operand, or None when TMA cannot read it: rows
    contiguous -> blocks (block_rows, block_k) of x; an `x.t()` view (unit stride along R) -> blocks
    (block_k, block_rows) of its (K, R) storage, transposed in the kernel."""
    rows, k = x.shape
    if x.stride(1) == 1 and _tma_aligned(x, x.stride(0)):
        return TensorDescriptor(x, [rows, k], [x.stride(0), 1], [block_rows, block_k]), False
    if x.stride(0) == 1 and _tma_aligned(x, x.stride(1)):
        return TensorDescriptor(x, [k, rows], [x.stride(1), 1], [block_k, block_rows]), True
    return None


def _launch_persistent(a, b, out, pre, post, scale, outputs, epilogue, store_pre, store_post, M, N, K, config,
                       pre_sign=False, m_scale=None, dots=None):
    """Launch `_gemm_persistent_kernel`; False (nothing launched) when a tensor does not suit TMA."""
    if min(M, N, K) == 0 or not all(_tma_aligned(t, N) for t in outputs):
        return False
    store_n = config.block_n // 2 if config.epilogue_subtile else config.block_n
    # sign words: TMA moves rows of >= 16 bytes (4 words: 128 columns) with 16-byte aligned strides
    if pre_sign and (store_n % 128 or not _tma_aligned(pre, N // 32)):
        return False
    a_view = _operand_descriptor(a, config.block_m, config.block_k)
    b_view = _operand_descriptor(b, config.block_n, config.block_k)
    if a_view is None or b_view is None:
        return False
    # out / pre / post are contiguous (M, N) (pre_sign: pre is (M, N / 32)); unused slots get any valid
    # descriptor (pruned constexpr)
    out_desc, post_desc = (TensorDescriptor(t, [M, N], [N, 1], [config.block_m, store_n]) for t in (out, post))
    pre_desc = (TensorDescriptor(pre, [M, N // 32], [N // 32, 1], [config.block_m, store_n // 32]) if pre_sign
                else TensorDescriptor(pre, [M, N], [N, 1], [config.block_m, store_n]))
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    upcast = on_interpreter(a)
    programs = min(tiles, INTERPRET_PROGRAMS if upcast else num_sms(a.device.index or 0))
    _gemm_persistent_kernel[(programs,)](
        a_view[0], b_view[0], out_desc, pre_desc, post_desc, scale if scale is not None else out,
        out if m_scale is None else m_scale, out if dots is None else dots,
        M, N, K,
        A_T=a_view[1], B_T=b_view[1],
        EPILOGUE=epilogue, ROW_SCALE=scale is not None, STORE_PRE=store_pre, STORE_POST=store_post,
        UPCAST=upcast, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        SUBTILE=config.epilogue_subtile, PRE_AS_SIGN=pre_sign, M_SCALE=m_scale is not None, ROW_DOT=dots is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return True
