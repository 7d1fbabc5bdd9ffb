"""The artifact's int5 byte format (one home, used by the quantiser and the GPU transcoder).

Values q in [-INT5_MAX, INT5_MAX] are stored as codes u = q + INT5_MAX in [0, 30]; each group of
8 codes is one little-endian 40-bit word with code j in bits 5j..5j+4, i.e. 5 bytes; the tail group
is padded with zero bits."""
from __future__ import annotations

import torch
from torch import Tensor

from recycore.errors import ArtifactError

INT5_MAX = 15
INT5_MAX_CODE = 2 * INT5_MAX
_VALUE_SHIFTS = torch.arange(0, 40, 5, dtype=torch.int64)  # code j at bits 5j..5j+4
_BYTE_SHIFTS = torch.arange(0, 40, 8, dtype=torch.int64)  # byte k holds bits 8k..8k+7


def packed_size(numel: int) -> int:
    """Bytes of `numel` int5 values."""
    return -(-numel // 8) * 5


def pack_int5(q: Tensor) -> Tensor:
    """Row-major values in [-15, 15] -> uint8 bytes, packed_size(numel) of them."""
    flat = q.detach().cpu().flatten().to(torch.int64)
    if flat.numel() and (flat.min() < -INT5_MAX or flat.max() > INT5_MAX):
        raise ValueError(f"pack_int5: values must lie in [-15, 15], got [{int(flat.min())}, {int(flat.max())}]")
    groups = torch.nn.functional.pad(flat + INT5_MAX, (0, -flat.numel() % 8)).view(-1, 8)
    words = (groups << _VALUE_SHIFTS).sum(dim=1)
    return ((words[:, None] >> _BYTE_SHIFTS) & 0xFF).to(torch.uint8).flatten()


def unpack_codes(packed: Tensor, numel: int) -> Tensor:
    """The first `numel` codes u in [0, 30] (int64, on packed's device); ArtifactError when the byte
    count does not fit `numel` or a code is above 30."""
    expected = packed_size(numel)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ArtifactError(f"int5 data must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != expected:
        raise ArtifactError(f"int5 data of {numel} values must be {expected} uint8 bytes, got {packed.numel()}")
    shifts = _BYTE_SHIFTS.to(packed.device)
    words = (packed.to(torch.int64).view(-1, 5) << shifts).sum(dim=1)
    codes = ((words[:, None] >> _VALUE_SHIFTS.to(packed.device)) & 0x1F).flatten()[:numel]
    if numel and int(codes.max()) > INT5_MAX_CODE:
        raise ArtifactError(f"int5 data holds code {int(codes.max())} > {INT5_MAX_CODE} (corrupted)")
    return codes


def unpack_int5(packed: Tensor, shape) -> Tensor:
    """The inverse of pack_int5: int8 values in [-15, 15] of the given shape."""
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    return (unpack_codes(packed, numel) - INT5_MAX).to(torch.int8).view(shape)
