"""K3: int5 dequant-matmul, y = (x @ q^T) * s, for evaluating the int5 artifact with the weights
kept packed on the GPU (5 bits per weight + one fp16 scale per output row).

- The artifact layout (SPEC §4: values q + 15 in groups of 8 as little-endian 40-bit words) is
  transcoded once at load time (`transcode_artifact`) into the GPU layout of gemm.py ("INT5
  layout": per row, groups of 128 values in 20 int32 words — 16 nibble words + 4 high-bit words),
  losslessly and still 5 bits per weight (rows padded to a multiple of 128 values).
- Two ways through the shared GEMM template's INT5 loader (gemm.py: q unpacked in registers to
  bf16, exact for -15..15):
  "fused": the template with the INT5 loader, fp32 accumulation and the ROW_SCALE epilogue
  (+ LEAKY_RELU2). Used for M <= SMALL_M_MAX (decoding-style, 1..64 rows): skinny tiles (16 weight
  rows x 16..64 input rows); rows longer than 512 values are split over K, the fp32 partials
  summed, scaled and activated by the split-K reduction kernel.
  "dequant": `dequantize` decodes the one matrix into a transient (N, K) buffer of bf16(q * s)
  (<= 1.5 MB at the seed's shapes, freed after the call; the resident weights stay packed), then
  cuBLAS (or the template's BF16 path with the LEAKY_RELU2 epilogue). Used for M > SMALL_M_MAX
  (sliding-window eval, 65,536 rows): there the fused kernel unpacks every weight tile again for
  each of the M / BLOCK_M row tiles and ran at 0.19-0.36x cuBLAS (benchmarks/NOTES_K1_K3.md),
  while decoding once costs a few microseconds. Its weights equal the dequantised model's
  (bf16(q * s), q * s in fp32), so the two evaluations agree to cuBLAS's summation order.
- `int5_linear` is a torch.library custom op with a fake impl (eval only, not differentiable);
  `Int5Linear.from_artifact` builds the module from the artifact's bytes, scales and shape.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

import triton.language as tl

from recycore.int5_codec import INT5_MAX, unpack_codes
from recycore.kernels._common import check_tensor, on_interpreter

from recycore.kernels.gemm import (
    EPILOGUE_LEAKY_RELU2,
    EPILOGUE_NONE,
    INT5_GROUP,
    INT5_GROUP_WORDS,
    INTERPRET_INT5_CONFIG,
    GemmConfig,
    _load_int5_tile,
    gemm,
    num_sms,
)

SMALL_M_MAX = 64
ACTIVATIONS = ("none", "leaky_relu2")
IMPLS = ("auto", "fused", "dequant")

# Measured on the H200 (benchmarks/NOTES_K1_K3.md) at the model's weight shapes. block_n (weight rows)
# is the M side of the MMA (y^T = W x^T, see gemm.py).
LARGE_M_CONFIG = GemmConfig(256, 128, INT5_GROUP, group_m=8, num_warps=8, num_stages=2)
SMALL_M_BLOCK_N = 16
# Small M is latency-bound: a second launch (the split-K reduction) costs more than it saves on
# rows of <= 4 groups (K <= 512); longer rows split K until ~2 programs per SM.
SMALL_M_UNSPLIT_GROUPS = 4
SMALL_M_PROGRAMS_PER_SM = 2


def _large_m_config(interpreter):
    return INTERPRET_INT5_CONFIG if interpreter else LARGE_M_CONFIG


def _small_m_config(M, interpreter):
    if interpreter:
        return INTERPRET_INT5_CONFIG
    return GemmConfig(max(16, triton.next_power_of_2(M)), SMALL_M_BLOCK_N, INT5_GROUP, group_m=1, num_warps=4,
                      num_stages=3)


def _small_m_split_k(N, K, device):
    groups = triton.cdiv(K, INT5_GROUP)
    if device.type != "cuda" or groups <= SMALL_M_UNSPLIT_GROUPS:
        return 1
    tiles = triton.cdiv(N, SMALL_M_BLOCK_N)
    return max(1, min(groups, SMALL_M_PROGRAMS_PER_SM * num_sms(device.index or 0) // tiles))


# ----------------------------------------------------------------------------------------------
# Layouts (plain torch, run once at load time)
# ----------------------------------------------------------------------------------------------
def _to_int32(words):
    """int64 values in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gpu_layout(u: Tensor) -> Tensor:
    """(rows, cols) codes u = q + 15 in [0, 30] -> (rows, groups * 20) int32 words (gemm.py's INT5 layout)."""
    rows, cols = u.shape
    groups = triton.cdiv(cols, INT5_GROUP)
    u = F.pad(u.to(torch.int64), (0, groups * INT5_GROUP - cols), value=INT5_MAX)  # pad with q = 0
    grid = u.view(rows, groups, 8, 16)  # [s, r] = value 16*s + r of the group
    nibble_shift = 4 * torch.arange(8, device=u.device).view(8, 1)
    nibble_words = ((grid & 15) << nibble_shift).sum(dim=2)  # (rows, groups, 16): word r
    r = torch.arange(16, device=u.device)
    high_shift = (8 * (r % 4)).view(1, 16) + torch.arange(8, device=u.device).view(8, 1)  # bit 8*(r%4) + s
    high_bits = (((grid >> 4) & 1) << high_shift).view(rows, groups, 8, 4, 4).sum(dim=(2, 4))  # word r // 4
    words = torch.cat([nibble_words, high_bits], dim=2)
    return _to_int32(words).view(rows, groups * INT5_GROUP_WORDS)


def unpack_gpu_layout(words: Tensor, cols: int) -> Tensor:
    """The inverse of pack_gpu_layout: (rows, cols) int64 codes u in [0, 30]."""
    rows = words.shape[0]
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(rows, -1, INT5_GROUP_WORDS)
    s = torch.arange(8, device=words.device).view(8, 1)
    r = torch.arange(16, device=words.device).view(1, 16)
    nibbles = (w[:, :, None, :16] >> (4 * s)) & 15  # (rows, groups, 8, 16)
    high = (w[:, :, 16 + r // 4] >> (8 * (r % 4) + s)) & 1
    return (nibbles | (high << 4)).view(rows, -1)[:, :cols]


def transcode_artifact(packed: Tensor, rows: int, cols: int) -> Tensor:
    """The artifact's int5 bytes (SPEC §4) of a (rows, cols) matrix -> the GPU layout words."""
    return pack_gpu_layout(unpack_codes(packed, rows * cols).view(rows, cols))


# ----------------------------------------------------------------------------------------------
# Decoding a whole matrix (the "dequant" path)
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
    # the tile's columns are values k0 + 16*s + r in order (see gemm.py's INT5 layout)
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
# The op
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, packed, scales, out_features, in_features, activation, impl):
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


@torch.library.custom_op("recycore::int5_linear", mutates_args=())
def _int5_linear(x: Tensor, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                 activation: str, impl: str) -> Tensor:
    """x (M, in_features) -> (M, out_features) in x's dtype."""
    M = x.shape[0]
    leaky = activation == "leaky_relu2"
    if impl == "dequant" or (impl == "auto" and M > SMALL_M_MAX):
        w = _dequantize(packed, scales, out_features, in_features, x.dtype)
        if not leaky:
            return torch.mm(x, w.t())
        y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
        gemm(x, w, post=y, epilogue=EPILOGUE_LEAKY_RELU2)
        return y
    y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
    outputs = dict(post=y, epilogue=EPILOGUE_LEAKY_RELU2) if leaky else dict(out=y, epilogue=EPILOGUE_NONE)
    if M <= SMALL_M_MAX:
        config, split_k = _small_m_config(M, on_interpreter(x)), _small_m_split_k(out_features, in_features, x.device)
    else:
        config, split_k = _large_m_config(on_interpreter(x)), 1
    gemm(x, packed, scale=scales, int5_k=in_features, config=config, split_k=split_k, **outputs)
    return y


@_int5_linear.register_fake
def _(x, packed, scales, out_features, in_features, activation, impl):
    return x.new_empty((x.shape[0], out_features))


def int5_linear(x: Tensor, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                activation: Optional[str] = None, impl: str = "auto") -> Tensor:
    """y = (x @ q^T) * s (then leaky_relu(y, 0.5)^2 if activation == "leaky_relu2").

    x (..., in_features) float; packed: the (out_features, in_features) int5 weight in the GPU layout
    (`transcode_artifact` / `pack_gpu_layout`); scales (out_features,) fp16. Eval only (no autograd).
    impl: "fused" (unpacked in the GEMM's registers), "dequant" (decoded into a transient buffer,
    then cuBLAS) or "auto" (fused for M <= SMALL_M_MAX rows, else dequant; see the module doc).
    """
    activation = activation or "none"
    _check_inputs(x, packed, scales, out_features, in_features, activation, impl)
    x2 = x.reshape(-1, in_features)
    y = torch.ops.recycore.int5_linear(x2, packed, scales, out_features, in_features, activation, impl)
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
