"""K3: int5 dequant-matmul, y = (x @ q^T) * s, for evaluating the int5 artifact with the weights
kept packed on the GPU (5 bits per weight + one fp16 scale per output row), at every batch size.

- The artifact layout (SPEC §4: values q + 15 in groups of 8 as little-endian 40-bit words) is
  transcoded once at load time (`transcode_artifact`) into the GPU layout of gemm.py ("INT5
  layout": per row, groups of 128 values in 20 int32 words, each value next to its partner in the
  MMA's register operand), losslessly and still 5 bits per weight (rows padded to 128 values).
- The weight is never expanded: every kernel unpacks it in registers to bf16 (exact for -15..15),
  multiplies with fp32 accumulation and applies the per-row scale (+ LeakyReLU²) in the epilogue.
  All products are computed transposed, y^T = W x^T, so that the unpacked weight is the MMA's
  register operand (wgmma reads only its B operand, the x tile, from shared memory).
  Kernels (`Int5Config.kernel`):
  "resident" (large M, K <= 512): each program owns one tile of weight rows, unpacks it ONCE for
      the whole K and keeps it in registers, then streams its share of the M tiles of x through
      it (TMA loads, software-pipelined); programs sharing an M range run side by side, so each x
      tile is read from HBM once and from L2 by the other weight tiles.
  "stream" (large M, any K): one (M tile, weight tile) per program, a K loop that unpacks one
      128-value group per step into the MMA operand while the previous step's MMAs run.
  "splitk" (M <= SMALL_M_MAX, decoding-style): gemm.py's template with the INT5 loader; rows of
      more than 4 groups are split over K (fp32 partials, summed by each tile's last split to arrive).
  "gemv" (M <= 16, a candidate for decoding): a few weight rows per program (no MMA tile minimum,
      so ~1-2 programs per SM at the model's shapes), fp32 multiply-add, one launch.
  SMALL_M_KERNEL and `AUTO_LARGE_M` pick the kernel per regime and weight shape; "dequant" (the
  matrix decoded into a transient bf16 buffer, then cuBLAS) is an explicit `impl` for comparison.
- `int5_linear` is a torch.library custom op with a fake impl (eval only, not differentiable);
  `Int5Linear.from_artifact` builds the module from the artifact's bytes, scales and shape.
"""
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from recycore.int5_codec import INT5_MAX, unpack_codes
from recycore.kernels._common import check_tensor, on_interpreter
from recycore.kernels.gemm import (
    EPILOGUE_LEAKY_RELU2,
    EPILOGUE_NONE,
    INT5_GROUP,
    INT5_GROUP_WORDS,
    GemmConfig,
    _load_int5_tile,
    _store_epilogue,
    _tile_coords,
    launch_template,
    num_sms,
)

SMALL_M_MAX = 64
RESIDENT_MAX_K = 4 * INT5_GROUP  # the whole row of a weight tile stays in registers
ACTIVATIONS = ("none", "leaky_relu2")
KERNELS = ("resident", "stream", "splitk", "gemv")
IMPLS = ("auto", "fused", "dequant") + KERNELS


@dataclass(frozen=True)
class Int5Config:
    """One kernel and its tiles. block_m: x rows per tile (the MMA's N side); block_n: weight rows
    per tile (the MMA's M side: 64 per warpgroup). resident: programs_per_sm programs per SM share
    the M tiles; stream: group_m M tiles share the weight tiles while they are hot in L2; splitk:
    split_k splits of K (0: the small-M plan's), summed by a second launch or, with reduce_in_kernel,
    by each tile's last split (one launch); gemv: block_m >= M rows of x, block_n weight rows per program."""
    kernel: str
    block_m: int
    block_n: int
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    programs_per_sm: int = 1
    split_k: int = 0
    reduce_in_kernel: int = 0  # 0 / 1 (an int: the custom op's list argument holds ints)

    def as_list(self) -> List[int]:
        """The config as the custom op's list argument (see `from_list`)."""
        return [KERNELS.index(self.kernel), self.block_m, self.block_n, self.num_warps, self.num_stages,
                self.group_m, self.programs_per_sm, self.split_k, self.reduce_in_kernel]

    @classmethod
    def from_list(cls, values: List[int]) -> "Int5Config":
        return cls(KERNELS[values[0]], *values[1:])

    def __str__(self):
        extra = {"resident": f"p{self.programs_per_sm}", "stream": f"g{self.group_m}",
                 "splitk": f"k{self.split_k}" + ("r" if self.reduce_in_kernel else ""), "gemv": ""}[self.kernel]
        return f"{self.kernel}:{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}{extra}"


# GPU configs (checked offline for sm_90: registers, no spills in the loops, shared memory).
RESIDENT = Int5Config("resident", 64, 128, num_warps=8, num_stages=3)
STREAM = Int5Config("stream", 128, 128, num_warps=8, num_stages=2)  # fits twice per SM (registers, shared memory)
STREAM_FP32 = Int5Config("stream", 64, 64, num_warps=4, num_stages=2)  # fp32 x: FMA dot, correctness only
SPLITK_LARGE = Int5Config("splitk", 256, 128, num_warps=8, num_stages=2, split_k=1)  # the template at large M
# Large M (> SMALL_M_MAX rows, 16-bit x on a GPU), per weight shape (N, K): a config, or "dequant"
# to decode the matrix into a transient bf16 buffer and call cuBLAS. Shapes not listed: resident
# for K <= RESIDENT_MAX_K, else stream.
AUTO_LARGE_M = {  # the H200 table's winners at M = 65,536 (benchmarks/README.md, K3)
    (512, 512): RESIDENT,
    (256, 512): RESIDENT,
    (1536, 512): Int5Config("resident", 32, 64, num_warps=4, num_stages=3, programs_per_sm=2),
    (512, 1536): STREAM,
}
# Small M: skinny template tiles (SMALL_M_BLOCK_N weight rows x 16..64 input rows). Small M is
# latency-bound: rows of <= SMALL_M_UNSPLIT_GROUPS groups are not split; longer rows split K until about
# SPLITK_PROGRAMS_PER_SM programs per SM, the splits summed by each tile's last split to arrive (one
# launch; the H200 table: faster than a second, reducing launch, and than more splits).
SMALL_M_BLOCK_N = 16
SMALL_M_UNSPLIT_GROUPS = 4
SPLITK_PROGRAMS_PER_SM = 1
SMALL_M_REDUCE_IN_KERNEL = True
SMALL_M_KERNEL = "splitk"  # or "gemv" (M <= GEMV_MAX_M only)
GEMV_MAX_M = 16
GEMV_PROGRAMS_PER_SM = 2

# Under the CPU interpreter (~5 ms per program-tile step): small tiles, and a few "SMs" so that the
# resident kernel's programs each get several M tiles.
CPU_CONFIGS = {
    "resident": Int5Config("resident", 16, 32, num_warps=4, num_stages=1),
    "stream": Int5Config("stream", 32, 32, num_warps=4, num_stages=1),
    "splitk": Int5Config("splitk", 32, 32, num_warps=4, num_stages=1),
    "gemv": Int5Config("gemv", 16, 4, num_warps=4, num_stages=1),
}
CPU_SMS = 3


def _sms(device):
    return num_sms(device.index or 0) if device.type == "cuda" else CPU_SMS


# ----------------------------------------------------------------------------------------------
# Layouts (plain torch, run once at load time)
# ----------------------------------------------------------------------------------------------
def _to_int32(words):
    """int64 values in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _word_of(t, c):
    """Word index (in a group) of word t = 0..4 of lane class c (see gemm.py's INT5 layout)."""
    return torch.where(t < 4, 4 * c + t, 16 + c)


def pack_gpu_layout(u: Tensor) -> Tensor:
    """(rows, cols) codes u = q + 15 in [0, 30] -> (rows, groups * 20) int32 words (gemm.py's INT5 layout)."""
    rows, cols = u.shape
    groups = triton.cdiv(cols, INT5_GROUP)
    dev = u.device
    u = F.pad(u.to(torch.int64), (0, groups * INT5_GROUP - cols), value=INT5_MAX)  # pad with q = 0
    v = u.view(rows, groups, 16, 4, 2)  # [i, c, e] = value 8i + 2c + e of the group
    lo, hi = v[..., 0], v[..., 1]  # (rows, groups, pair i, class c)
    i = torch.arange(16, device=dev).view(16, 1)
    c = torch.arange(4, device=dev).view(1, 4)
    words = torch.zeros(rows, groups, INT5_GROUP_WORDS, dtype=torch.int64, device=dev)
    # pairs 0..14: word i // 3, bits 5 (i % 3) (+16 for the partner)
    shift = 5 * (i[:15] % 3)
    fields = (lo[:, :, :15] << shift) | (hi[:, :, :15] << (16 + shift))  # (rows, groups, 15, 4)
    index = _word_of(i[:15] // 3, c).expand(15, 4).reshape(-1)
    words.index_add_(2, index, fields.reshape(rows, groups, -1))  # disjoint bit fields: + is |
    # pair 15: bit t of each value in bit 15 / 31 of word t
    t = torch.arange(5, device=dev).view(5, 1)
    spare = (((lo[:, :, 15, None, :] >> t) & 1) << 15) | (((hi[:, :, 15, None, :] >> t) & 1) << 31)  # (.., 5, 4)
    words.index_add_(2, _word_of(t, c).reshape(-1), spare.reshape(rows, groups, -1))
    return _to_int32(words).view(rows, groups * INT5_GROUP_WORDS)


def unpack_gpu_layout(words: Tensor, cols: int) -> Tensor:
    """The inverse of pack_gpu_layout: (rows, cols) int64 codes u in [0, 30]."""
    rows = words.shape[0]
    dev = words.device
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(rows, -1, INT5_GROUP_WORDS)
    i = torch.arange(16, device=dev).view(16, 1)
    c = torch.arange(4, device=dev).view(1, 4)
    word = w[:, :, _word_of(torch.clamp(i // 3, max=4), c)]  # (rows, groups, 16, 4)
    shift = 5 * (i % 3)
    lo, hi = (word >> shift) & 31, (word >> (16 + shift)) & 31
    t = torch.arange(5, device=dev).view(5, 1)
    spare = w[:, :, _word_of(t, c)]  # (rows, groups, 5, 4)
    lo[:, :, 15] = (((spare >> 15) & 1) << t).sum(dim=2)
    hi[:, :, 15] = (((spare >> 31) & 1) << t).sum(dim=2)
    return torch.stack([lo, hi], dim=-1).view(rows, -1)[:, :cols]


def transcode_artifact(packed: Tensor, rows: int, cols: int) -> Tensor:
    """The artifact's int5 bytes (docs/SPEC.md §4, recycore.int5_codec) of a (rows, cols) matrix -> the
    GPU layout words; ArtifactError for a wrong byte count or a code above 30."""
    return pack_gpu_layout(unpack_codes(packed, rows * cols).view(rows, cols))


# ----------------------------------------------------------------------------------------------
# Decoding a whole matrix (the "dequant" path, for comparison)
# ----------------------------------------------------------------------------------------------
_DEQUANT_BLOCK_N = 32


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, out_ptr, N, K, stride_pn,
                       UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n, k] = q[n, k] * scale[n] for one (BLOCK_N rows, 128 values) tile; q * s in fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = tl.program_id(1) * 128
    q = _load_int5_tile(packed_ptr, offs_n, mask_n, k0, stride_pn, BLOCK_N, UPCAST).to(tl.float32)
    w = q * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    offs_k = k0 + tl.arange(0, 128)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k < K)[None, :])


def dequantize(packed: Tensor, scales: Tensor, out_features: int, in_features: int,
               dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The (out_features, in_features) weight q * s (computed in fp32, stored in `dtype`) of a
    GPU-layout int5 matrix."""
    check_tensor(packed, "packed", ndim=2, dtypes=(torch.int32,), contiguous=True)
    check_tensor(scales, "scales", ndim=1, dtypes=(torch.float16, torch.float32), device=packed.device,
                 contiguous=True)
    words = (out_features, triton.cdiv(in_features, INT5_GROUP) * INT5_GROUP_WORDS)
    if tuple(packed.shape) != words or scales.shape[0] != out_features:
        raise ValueError(f"packed {tuple(packed.shape)} / scales {tuple(scales.shape)} do not hold an "
                         f"({out_features}, {in_features}) int5 matrix (expected {words} words)")
    return _dequantize(packed, scales, out_features, in_features, dtype)


def _dequantize(packed, scales, out_features, in_features, dtype):
    """`dequantize` on checked inputs (int5_linear has checked them: no second pass per call)."""
    out = torch.empty((out_features, in_features), device=packed.device, dtype=dtype)
    grid = (triton.cdiv(out_features, _DEQUANT_BLOCK_N), triton.cdiv(in_features, INT5_GROUP))
    _dequantize_kernel[grid](packed, scales, out, out_features, in_features, packed.stride(0),
                             UPCAST=on_interpreter(packed), BLOCK_N=_DEQUANT_BLOCK_N, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Fused kernels for large M
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_x(x_desc, x_ptr, m0, k0, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
            TMA: tl.constexpr, UPCAST: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) tile of x at (m0, k0), zero past M and K (TMA pads with zeros)."""
    if TMA:
        x = x_desc.load([m0, k0])
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_y(acc, scale, y_desc, y_ptr, m0, n0, M, N, ACT: tl.constexpr, TMA: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc (BLOCK_N weight rows, BLOCK_M x rows) fp32 -> y[m0.., n0..] = (acc * scale)^T, activated."""
    acc = tl.trans(acc * scale[:, None])
    if TMA:  # TMA clips rows and columns past the edges
        _store_epilogue(acc, (m0, n0), None, y_desc, y_desc, y_desc, ACT, False, True, UPCAST, TMA=True)
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs = offs_m[:, None] * N + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        _store_epilogue(acc, offs, mask, y_ptr, y_ptr, y_ptr, ACT, False, True, UPCAST)


@triton.jit
def _cat_k(a, b, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """[a | b] along K for two (BLOCK_N, WIDTH) tiles."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BLOCK_N, 2 * WIDTH))


@triton.jit
def _load_int5_rows(w_ptr, offs_n, mask_n, K, stride_wn, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                    UPCAST: tl.constexpr):
    """q of weight rows offs_n for k < GROUPS * 128 (GROUPS in 1, 2, 4; groups past K are not read)."""
    n_groups = tl.cdiv(K, 128)
    w = _load_int5_tile(w_ptr, offs_n, mask_n, 0, stride_wn, BLOCK_N, UPCAST)
    if GROUPS >= 2:
        w = _cat_k(w, _load_int5_tile(w_ptr, offs_n, mask_n & (n_groups > 1), 128, stride_wn, BLOCK_N, UPCAST),
                   BLOCK_N, 128)
    if GROUPS == 4:
        w2 = _load_int5_tile(w_ptr, offs_n, mask_n & (n_groups > 2), 256, stride_wn, BLOCK_N, UPCAST)
        w3 = _load_int5_tile(w_ptr, offs_n, mask_n & (n_groups > 3), 384, stride_wn, BLOCK_N, UPCAST)
        w = _cat_k(w, _cat_k(w2, w3, BLOCK_N, 128), BLOCK_N, 256)
    return w


@triton.jit
def _resident_tile(w, scale, x_desc, x_ptr, y_desc, y_ptr, m0, n0, M, N, K, stride_xm,
                   ACT: tl.constexpr, TMA_X: tl.constexpr, TMA_Y: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr):
    x = _load_x(x_desc, x_ptr, m0, 0, M, K, stride_xm, BLOCK_M, KP, TMA_X, UPCAST)
    acc = tl.dot(w.to(x.dtype), tl.trans(x), input_precision=DOT_PRECISION)  # one MMA chain over all of K
    _store_y(acc, scale, y_desc, y_ptr, m0, n0, M, N, ACT, TMA_Y, UPCAST, BLOCK_M, BLOCK_N)


@triton.jit
def _int5_resident_kernel(x_desc, x_ptr, w_ptr, scale_ptr, y_desc, y_ptr, M, N, K, stride_xm, stride_wn,
                          tiles_per_program,
                          ACT: tl.constexpr, TMA_X: tl.constexpr, TMA_Y: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          GROUPS: tl.constexpr):
    """Program p: weight tile p % n_tiles (unpacked once, kept in registers) x M tiles
    [c * tiles_per_program, (c + 1) * tiles_per_program) with c = p // n_tiles (never empty)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    n0 = (tl.program_id(0) % n_tiles) * BLOCK_N
    t0 = (tl.program_id(0) // n_tiles) * tiles_per_program
    t1 = tl.minimum(t0 + tiles_per_program, tl.cdiv(M, BLOCK_M))
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = _load_int5_rows(w_ptr, offs_n, mask_n, K, stride_wn, BLOCK_N, GROUPS, UPCAST)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    # The first tile outside the loop: its MMA converts w to the operand layout before the loop,
    # and the loop's MMAs reuse those registers (inside the loop alone, the compiler keeps w in
    # shared memory and reloads it for every tile).
    _resident_tile(w, scale, x_desc, x_ptr, y_desc, y_ptr, t0 * BLOCK_M, n0, M, N, K, stride_xm,
                   ACT, TMA_X, TMA_Y, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, GROUPS * 128)
    for t in range(t0 + 1, t1):
        _resident_tile(w, scale, x_desc, x_ptr, y_desc, y_ptr, t * BLOCK_M, n0, M, N, K, stride_xm,
                       ACT, TMA_X, TMA_Y, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, GROUPS * 128)


@triton.jit
def _int5_stream_kernel(x_desc, x_ptr, w_ptr, scale_ptr, y_desc, y_ptr, M, N, K, stride_xm, stride_wn,
                        ACT: tl.constexpr, TMA_X: tl.constexpr, TMA_Y: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """One (M tile, weight tile) per program, grouped order; K in steps of one 128-value group."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m0 = pid_m * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # The first step outside the loop: the MMA initialises the accumulator (a zero-filled one,
    # written by ordinary instructions, makes ptxas serialise every MMA of the loop).
    x = _load_x(x_desc, x_ptr, m0, 0, M, K, stride_xm, BLOCK_M, 128, TMA_X, UPCAST)
    w = _load_int5_tile(w_ptr, offs_n, mask_n, 0, stride_wn, BLOCK_N, UPCAST)
    acc = tl.dot(w.to(x.dtype), tl.trans(x), input_precision=DOT_PRECISION)
    for k0 in range(128, K, 128):  # the group past K is row padding (q = 0) against x zeros
        x = _load_x(x_desc, x_ptr, m0, k0, M, K, stride_xm, BLOCK_M, 128, TMA_X, UPCAST)
        w = _load_int5_tile(w_ptr, offs_n, mask_n, k0, stride_wn, BLOCK_N, UPCAST)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_y(acc, scale, y_desc, y_ptr, m0, pid_n * BLOCK_N, M, N, ACT, TMA_Y, UPCAST, BLOCK_M, BLOCK_N)


def _tma_ok(t):
    """TMA addresses a row-major 2-D tensor: unit last stride, 16-byte aligned base and row stride."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _launch_large_m(x, packed, scales, y, N, K, leaky, config):
    M = x.shape[0]
    upcast = on_interpreter(x)  # fp32 arithmetic under the interpreter
    resident = config.kernel == "resident"
    groups = triton.next_power_of_2(triton.cdiv(K, INT5_GROUP)) if resident else 1
    block_k = groups * INT5_GROUP
    tma_x, tma_y = _tma_ok(x), _tma_ok(y)
    # descriptors in unused slots are never read (pruned constexpr branches): any valid one
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [config.block_m, block_k]) if tma_x else x
    y_desc = TensorDescriptor(y, [M, N], [N, 1], [config.block_m, config.block_n]) if tma_y else y
    meta = dict(ACT=EPILOGUE_LEAKY_RELU2 if leaky else EPILOGUE_NONE, TMA_X=tma_x, TMA_Y=tma_y, UPCAST=upcast,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                num_warps=config.num_warps, num_stages=config.num_stages)
    m_tiles, n_tiles = triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n)
    if resident:
        chunks = max(1, _sms(x.device) * config.programs_per_sm // n_tiles)
        per_program = triton.cdiv(m_tiles, chunks)
        grid = (n_tiles * triton.cdiv(m_tiles, per_program),)
        _int5_resident_kernel[grid](x_desc, x, packed, scales, y_desc, y, M, N, K, x.stride(0), packed.stride(0),
                                    per_program, GROUPS=groups, **meta)
    else:
        _int5_stream_kernel[(m_tiles * n_tiles,)](x_desc, x, packed, scales, y_desc, y, M, N, K, x.stride(0),
                                                  packed.stride(0), GROUP_M=config.group_m, **meta)


# ----------------------------------------------------------------------------------------------
# Small M: gemm.py's template with the INT5 loader, split over K for long rows
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _small_m_plan(M, N, K, device):
    """(GemmConfig, split_k) for M <= SMALL_M_MAX rows (cached: no per-call arithmetic); split_k is the
    number of splits launched (each a whole number of groups, none empty)."""
    if device.type != "cuda":
        c = CPU_CONFIGS["splitk"]
        return GemmConfig(c.block_m, c.block_n, INT5_GROUP, group_m=1, num_warps=c.num_warps,
                          num_stages=c.num_stages), 1
    config = GemmConfig(max(16, triton.next_power_of_2(M)), SMALL_M_BLOCK_N, INT5_GROUP, group_m=1, num_warps=4,
                        num_stages=3)
    groups = triton.cdiv(K, INT5_GROUP)
    if groups <= SMALL_M_UNSPLIT_GROUPS:
        return config, 1
    tiles = triton.cdiv(N, SMALL_M_BLOCK_N)
    split_k = max(1, min(groups, SPLITK_PROGRAMS_PER_SM * num_sms(device.index or 0) // tiles))
    return config, triton.cdiv(groups, triton.cdiv(groups, split_k))  # no empty splits: the count launched


def _launch_splitk(x, packed, scales, y, N, K, leaky, config):
    """The template (gemm.py) on the INT5 weight; inputs checked once by int5_linear."""
    M = x.shape[0]
    if config is None:
        gemm_config, split_k = _small_m_plan(M, N, K, x.device)
        in_kernel = SMALL_M_REDUCE_IN_KERNEL
    else:
        gemm_config = GemmConfig(config.block_m, config.block_n, INT5_GROUP, group_m=config.group_m,
                                 num_warps=config.num_warps, num_stages=config.num_stages)
        split_k = config.split_k or (_small_m_plan(M, N, K, x.device)[1] if M <= SMALL_M_MAX else 1)
        in_kernel = bool(config.reduce_in_kernel)
    launch_template(x, packed, y, None, y if leaky else None, scales,
                    epilogue=EPILOGUE_LEAKY_RELU2 if leaky else EPILOGUE_NONE, int5=True, split_k=split_k,
                    config=gemm_config, reduce_in_kernel=in_kernel)


@triton.jit
def _int5_gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                      ACT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[:M, n..n + BLOCK_N] for the program's BLOCK_N weight rows: fp32 products summed over K."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, 128):  # the group past K is row padding (q = 0) against x zeros
        w = _load_int5_tile(w_ptr, offs_n, mask_n, k0, stride_wn, BLOCK_N, UPCAST).to(tl.float32)
        offs_k = k0 + tl.arange(0, 128)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None, :] * x[None, :, :], axis=2)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = tl.trans(acc * scale[:, None])
    offs = offs_m[:, None] * N + offs_n[None, :]
    _store_epilogue(acc, offs, mask_m[:, None] & mask_n[None, :], y_ptr, y_ptr, y_ptr, ACT, False, True, UPCAST)


def _gemv_config(M, N, device):
    """block_n: about GEMV_PROGRAMS_PER_SM programs per SM at the model's widths."""
    if device.type != "cuda":
        return CPU_CONFIGS["gemv"]
    rows = max(1, N // (GEMV_PROGRAMS_PER_SM * num_sms(device.index or 0)))
    block_n = min(16, triton.next_power_of_2(rows))
    return Int5Config("gemv", max(1, triton.next_power_of_2(M)), block_n, num_warps=4, num_stages=3)


def _launch_gemv(x, packed, scales, y, N, K, leaky, config):
    M = x.shape[0]
    if config.block_m < M:
        raise ValueError(f"the gemv kernel's block_m = {config.block_m} holds fewer than the {M} rows of x")
    _int5_gemv_kernel[(triton.cdiv(N, config.block_n),)](
        x, packed, scales, y, M, N, K, x.stride(0), packed.stride(0),
        ACT=EPILOGUE_LEAKY_RELU2 if leaky else EPILOGUE_NONE, UPCAST=on_interpreter(x),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------
def _choose(M, N, K, dtype, device, impl, config):
    """-> "dequant" or the Int5Config to run (explicit, else by regime and shape)."""
    if config is not None:
        return config
    if impl == "dequant":
        return "dequant"
    if impl in KERNELS:
        kernel = impl
    elif M <= SMALL_M_MAX:
        kernel = SMALL_M_KERNEL if M <= GEMV_MAX_M else "splitk"
    elif device.type != "cuda":
        kernel = "resident" if K <= RESIDENT_MAX_K else "stream"
    elif dtype == torch.float32:
        return STREAM_FP32
    else:
        choice = AUTO_LARGE_M.get((N, K), RESIDENT if K <= RESIDENT_MAX_K else STREAM)
        if choice == "dequant" and impl == "fused":
            return RESIDENT if K <= RESIDENT_MAX_K else STREAM
        return choice
    if device.type != "cuda":
        return dataclasses.replace(CPU_CONFIGS[kernel], block_m=max(16, triton.next_power_of_2(M))) \
            if kernel == "gemv" else CPU_CONFIGS[kernel]
    if kernel == "splitk":
        return None if M <= SMALL_M_MAX else SPLITK_LARGE  # None: _small_m_plan
    if kernel == "gemv":
        return _gemv_config(M, N, device)
    if kernel == "stream" and dtype == torch.float32:
        return STREAM_FP32
    return {"resident": RESIDENT, "stream": STREAM}[kernel]


@torch.library.custom_op("recycore::int5_linear", mutates_args=())
def _int5_linear(x: Tensor, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                 activation: str, impl: str, config: Optional[List[int]] = None) -> Tensor:
    """x (M, in_features) -> (M, out_features) in x's dtype."""
    M = x.shape[0]
    leaky = activation == "leaky_relu2"
    choice = _choose(M, out_features, in_features, x.dtype, x.device, impl,
                     None if config is None else Int5Config.from_list(config))
    if choice == "dequant":
        w = _dequantize(packed, scales, out_features, in_features, x.dtype)
        y = torch.mm(x, w.t())
        return F.leaky_relu(y, 0.5).square() if leaky else y
    y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    if x.stride(1) != 1 and choice is not None and choice.kernel != "splitk":
        x = x.contiguous()  # the other kernels read rows of x with unit stride
    if choice is None or choice.kernel == "splitk":
        _launch_splitk(x, packed, scales, y, out_features, in_features, leaky, choice)
    elif choice.kernel == "gemv":
        _launch_gemv(x, packed, scales, y, out_features, in_features, leaky, choice)
    else:
        _launch_large_m(x, packed, scales, y, out_features, in_features, leaky, choice)
    return y


@_int5_linear.register_fake
def _(x, packed, scales, out_features, in_features, activation, impl, config=None):
    return x.new_empty((x.shape[0], out_features))


def _check_inputs(x, packed, scales, out_features, in_features, activation, impl, config):
    check_tensor(x, "x", dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor(packed, "packed", ndim=2, dtypes=(torch.int32,), device=x.device, contiguous=True)
    check_tensor(scales, "scales", ndim=1, dtypes=(torch.float16, torch.float32), device=x.device, contiguous=True)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x (..., in_features) = {tuple(x.shape)} does not have in_features = {in_features}")
    words = (out_features, triton.cdiv(in_features, INT5_GROUP) * INT5_GROUP_WORDS)
    if tuple(packed.shape) != words:
        raise ValueError(f"packed must be the GPU layout {words} of an ({out_features}, {in_features}) weight "
                         f"(see transcode_artifact), got {tuple(packed.shape)}")
    if scales.shape[0] != out_features:
        raise ValueError(f"scales must have out_features = {out_features} entries, got {scales.shape[0]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if config is not None:
        _check_config(config, impl)
    rows = x.numel() // max(1, in_features)
    if rows * max(out_features, in_features) >= 2**31:
        raise ValueError(f"int5_linear of {rows} rows x ({out_features}, {in_features}) is too large for 32-bit "
                         "offsets: split x")
    kernel = impl if config is None else config.kernel
    if kernel == "gemv" and x.numel() > GEMV_MAX_M * in_features:
        raise ValueError(f"the gemv kernel runs at most {GEMV_MAX_M} rows, got {rows}")
    if kernel == "resident" and in_features > RESIDENT_MAX_K:
        raise ValueError(f"the resident kernel holds rows of <= {RESIDENT_MAX_K} values, got in_features = "
                         f"{in_features}")


def _check_config(config, impl):
    if not isinstance(config, Int5Config) or config.kernel not in KERNELS:
        raise TypeError(f"config must be an Int5Config of one of the kernels {KERNELS}, got {config!r}")
    if impl not in ("auto", "fused", config.kernel):
        raise ValueError(f"impl={impl!r} does not match config {config}")
    if config.reduce_in_kernel not in (0, 1) or (config.reduce_in_kernel and config.kernel != "splitk"):
        raise ValueError(f"config.reduce_in_kernel must be 0 or 1 (1 for the splitk kernel only), got {config}")
    low = 1 if config.kernel == "gemv" else 16  # the MMA kernels' smallest tile side
    for name in ("block_m", "block_n"):
        value = getattr(config, name)
        if value < low or value & (value - 1):
            raise ValueError(f"config.{name} must be a power of two >= {low}, got {value}")


def int5_linear(x: Tensor, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                activation: Optional[str] = None, impl: str = "auto", config: Optional[Int5Config] = None) -> Tensor:
    """y = (x @ q^T) * s (then leaky_relu(y, 0.5)^2 if activation == "leaky_relu2").

    x (..., in_features) float; packed: the (out_features, in_features) int5 weight in the GPU layout
    (`transcode_artifact` / `pack_gpu_layout`); scales (out_features,) fp16. Eval only (no autograd).
    impl: "auto" (splitk for M <= SMALL_M_MAX rows, else AUTO_LARGE_M's choice for the shape),
    "fused" (auto's choice, never the dense path), "resident" / "stream" / "splitk" (that kernel,
    its default tiles), or "dequant" (decode into a transient bf16 buffer, then cuBLAS: comparison
    only). config: an Int5Config to run exactly (its kernel; impl must be auto/fused or that kernel).
    """
    activation = activation or "none"
    _check_inputs(x, packed, scales, out_features, in_features, activation, impl, config)
    x2 = x.reshape(-1, in_features)
    y = torch.ops.recycore.int5_linear(x2, packed, scales, out_features, in_features, activation, impl,
                                       None if config is None else config.as_list())
    return y.reshape(*x.shape[:-1], out_features)


def int5_linear_reference(x: Tensor, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                          activation: Optional[str] = None) -> Tensor:
    """Plain torch: dequantise w = q * s to x's dtype, F.linear (then the activation)."""
    q = unpack_gpu_layout(packed, in_features) - INT5_MAX
    y = F.linear(x, (q.float() * scales.float()[:, None]).to(x.dtype))
    return F.leaky_relu(y, 0.5).square() if activation == "leaky_relu2" else y


class Int5Linear(torch.nn.Module):
    """A linear layer (no bias) whose weight stays int5-packed in the GPU layout; eval only."""

    def __init__(self, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                 activation: Optional[str] = None):
        super().__init__()
        self.out_features, self.in_features, self.activation = out_features, in_features, activation
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales.to(torch.float16))

    @classmethod
    def from_artifact(cls, packed_bytes: Tensor, scales: Tensor, shape, activation: Optional[str] = None):
        """From the artifact's int5 entry: uint8 bytes, fp16 per-row scales, (rows, cols)."""
        rows, cols = (int(n) for n in shape)
        return cls(transcode_artifact(packed_bytes, rows, cols), scales, rows, cols, activation)

    def forward(self, x: Tensor) -> Tensor:
        return int5_linear(x, self.packed, self.scales, self.out_features, self.in_features, self.activation)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"

