"""Quantisation of the model's state dict into the seed's artifact format (docs/SPEC.md §4).

The artifact holds two dicts: `w` (tensors) and `m` (a format per original
tensor name). Per tensor, in the seed's order:
  * not floating point, or at most 65,536 elements -> "passthrough" (floats as fp16)
  * a control tensor (CONTROL_TENSOR_NAME_PATTERNS) -> "passthrough_ctrl" (fp32)
  * attention / MLP matrices -> {"type": "int5_packed"}: name.q (packed bytes),
    name.scale (fp16, one per row), name.shape (int32)
  * everything else -> {"type": "int8"}: name.q (int8), name.scale (fp16 per row)
The schemes choose the int5/int8 values; all write the same format, so the
seed's loader reads any of them:
  * "seed":     s = max(clip/qmax, 1/qmax), one clip quantile per tensor (the seed's
                exact numbers, byte for byte).
  * "rowmse":   no scale floor, and a clip chosen per row from a finer grid, by the
                row's own squared error. The floor of 1/15 zeroes every row whose
                values are all below 1/30 (the zero-initialised output/down
                projections early in training) and coarsens every row with max
                |w| < 1; without it the error drops ~10x but LZMA has more to code.
  * "rowfloor": rowmse's per-row clip search under the seed's floors, so about the
                seed's bytes (the floor is also what keeps the artifact small).
                "rowfloor:F" sets the int5 floor to F (int8: F*15/127), a knob
                between the two: rowfloor:0 is rowmse, rowfloor:0.0667 the seed's.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from recycore.banks import bank_slices
from recycore.errors import ArtifactError
from recycore.int5_codec import INT5_MAX, pack_int5, unpack_int5

CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
    "skip_weight", "skip_weights", "smear", "dtg_gate", "ve_layer_scales", "ve_shared.scale", "attn_gate",
    "vr_lambda",
)
PASSTHROUGH_MAX_NUMEL = 65_536
INT8_MAX = 127
INT5_CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 1.0)
INT8_CLIP_QUANTILE = 99.99984 / 100.0  # written as the seed computes it, so the float is identical
# rowmse: clip candidates as fractions of the row's max |w|, next to the seed's quantiles.
ROWMSE_CLIP_FRACTIONS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# rowmse scale floor: the smallest normal fp16, only to keep s > 0 for all-zero rows.
ROWMSE_MIN_SCALE = float(torch.finfo(torch.float16).tiny)
SCHEMES = ("seed", "rowmse", "rowfloor")
INT5_STORAGES = ("packed", "int8")
INT5_CATEGORIES = ("mlp", "attn")

PASSTHROUGH, PASSTHROUGH_CTRL = "passthrough", "passthrough_ctrl"
INT5_PACKED, INT8 = "int5_packed", "int8"


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------
def classify_param(name: str) -> str:
    """The seed's categories: "embed", "mlp", "attn" (which includes any `.proj.`
    outside an MLP, e.g. bigram.proj) or "other"."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name or (".proj." in name and ".mlp." not in name):
        return "attn"
    return "other"


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_TENSOR_NAME_PATTERNS)


def tensor_format(name: str, t: Tensor) -> str:
    """PASSTHROUGH, PASSTHROUGH_CTRL, INT5_PACKED or INT8 for one (un-banked) tensor."""
    if not t.is_floating_point() or t.numel() <= PASSTHROUGH_MAX_NUMEL:
        return PASSTHROUGH
    if is_control_tensor(name):
        return PASSTHROUGH_CTRL
    if classify_param(name) in INT5_CATEGORIES and t.ndim >= 1:
        return INT5_PACKED
    return INT8


# ---------------------------------------------------------------------------
# Per-row quantisers
# ---------------------------------------------------------------------------
def _round_clamp(t32: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(t32 / scale), -qmax, qmax).to(torch.int8)


def scheme_floor(scheme: str) -> float | None:
    """The int5 scale floor of a scheme: None for "seed" (its own code path), 0 for
    "rowmse", 1/15 for "rowfloor", F for "rowfloor:F"."""
    name, _, value = scheme.partition(":")
    if name in SCHEMES and not value:
        return {"seed": None, "rowmse": 0.0, "rowfloor": 1.0 / INT5_MAX}[name]
    if name == "rowfloor":
        try:
            floor = float(value)
        except ValueError:
            floor = -1.0
        if floor >= 0:
            return floor
    raise ValueError(f"unknown quantisation scheme {scheme!r}; choose one of {', '.join(SCHEMES)} "
                     "or rowfloor:F with a floor F >= 0")


def _check_scheme(scheme: str) -> None:
    scheme_floor(scheme)


def _min_scale(scheme: str, qmax: int) -> float:
    """The scheme's scale floor for values in [-qmax, qmax] (int8 keeps the seed's
    ratio 15/127 to int5), never below the smallest normal fp16."""
    return max(scheme_floor(scheme) * INT5_MAX / qmax, ROWMSE_MIN_SCALE)


def quantize_int5(t: Tensor, scheme: str = "seed") -> tuple[Tensor, Tensor]:
    """int5 values in [-15, 15] (int8) and fp16 scales: one per row for a matrix,
    a single scale otherwise."""
    _check_scheme(scheme)
    t32 = t.float()
    if t32.ndim != 2:
        floor = 1.0 / INT5_MAX if scheme == "seed" else _min_scale(scheme, INT5_MAX)
        scale = (t32.abs().amax() / INT5_MAX).clamp_min(floor).to(torch.float16)
        return _round_clamp(t32, scale.float(), INT5_MAX), scale
    if scheme == "seed":
        return _int5_seed_rows(t32)
    return _best_clip_per_row(t32, _rowmse_clip_candidates(t32, INT5_CLIP_QUANTILES), INT5_MAX,
                              _min_scale(scheme, INT5_MAX))


def _int5_seed_rows(t32: Tensor) -> tuple[Tensor, Tensor]:
    """The seed's search: one clip quantile for the whole matrix, the one with the
    lowest mean squared error (the first on ties)."""
    best = None
    for clip in _clip_candidates(t32.abs(), INT5_CLIP_QUANTILES):
        scale = (clip / INT5_MAX).clamp_min(1.0 / INT5_MAX).to(torch.float16)
        q = _round_clamp(t32, scale.float()[:, None], INT5_MAX)
        err = (t32 - q.float() * scale.float()[:, None]).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, q, scale)
    return best[1], best[2]


def _clip_candidates(a: Tensor, quantiles: tuple[float, ...]) -> Tensor:
    """(K, rows): per row of `a` (= |w|) the given quantiles, 1.0 meaning the row max.
    One torch.quantile call for all of them (bit-identical to one call per quantile:
    torch turns a scalar q into a float32 tensor too)."""
    probs = [p for p in quantiles if p < 1.0]
    rows = [torch.quantile(a, torch.tensor(probs, dtype=a.dtype), dim=1)] if probs else []
    if 1.0 in quantiles:
        rows.append(a.amax(dim=1)[None])
    return torch.cat(rows)


def _rowmse_clip_candidates(t32: Tensor, quantiles: tuple[float, ...]) -> Tensor:
    """(K, rows) clip values: the given quantiles of |w| per row and fractions of the row max."""
    a = t32.abs()
    fractions = torch.tensor(ROWMSE_CLIP_FRACTIONS, dtype=torch.float32)[:, None] * a.amax(dim=1)[None, :]
    return torch.cat((_clip_candidates(a, (*quantiles, 1.0)), fractions))


def _best_clip_per_row(t32: Tensor, clips: Tensor, qmax: int, min_scale: float) -> tuple[Tensor, Tensor]:
    """For each row, the candidate clip (of K) whose fp16 scale gives the lowest
    squared error; q is computed with the stored (fp16) scale."""
    best_err = torch.full((t32.shape[0],), float("inf"))
    best_q = torch.empty(t32.shape, dtype=torch.int8)
    best_scale = torch.empty(t32.shape[0], dtype=torch.float16)
    for clip in clips:  # K candidates (about a dozen), each fully vectorised over the matrix
        scale = (clip / qmax).clamp_min(min_scale).to(torch.float16)
        q = _round_clamp(t32, scale.float()[:, None], qmax)
        err = (t32 - q.float() * scale.float()[:, None]).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q[better] = q[better]
        best_scale[better] = scale[better]
    return best_q, best_scale


def quantize_int8(t: Tensor, scheme: str = "seed") -> tuple[Tensor, Tensor]:
    """int8 values in [-127, 127] and scales: fp16 per row for a matrix (clip at the
    99.99984th percentile of |w|), one fp32 scale otherwise (as the seed)."""
    _check_scheme(scheme)
    t32 = t.float()
    if t32.ndim != 2:
        clip = float(torch.quantile(t32.abs().flatten(), INT8_CLIP_QUANTILE)) if t32.numel() else 0.0
        scale = torch.tensor(clip / INT8_MAX if clip > 0 else 1.0, dtype=torch.float32)
        return _round_clamp(torch.clamp(t32, -clip, clip), scale, INT8_MAX), scale
    if scheme == "seed":
        # The seed clips first, rounds with the fp32 scale and stores it in fp16.
        clip = torch.quantile(t32.abs(), INT8_CLIP_QUANTILE, dim=1)
        clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
        scale = (clip / INT8_MAX).clamp_min(1.0 / INT8_MAX)
        return _round_clamp(clipped, scale[:, None], INT8_MAX), scale.to(torch.float16)
    return _best_clip_per_row(t32, _rowmse_clip_candidates(t32, (INT8_CLIP_QUANTILE,)), INT8_MAX,
                              _min_scale(scheme, INT8_MAX))


# ---------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------
def unbank_state_dict(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Banks -> one 2-D matrix per layer under the seed's names (the bank's place in
    the order is taken by its matrices, Q_i/O_i and K_i/V_i interleaved)."""
    slices = bank_slices(num_layers)
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name in slices:
            if t.ndim != 3 or t.shape[0] != max(j for j, _ in slices[name]) + 1:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, not a bank of the "
                                 f"{num_layers}-layer model")
            for j, matrix_name in slices[name]:
                out[matrix_name] = t[j]
        else:
            out[name] = t
    return out


def rebank_state_dict(sd: dict[str, Tensor], num_layers: int, template: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of unbank_state_dict; banks take the dtype of the template's banks."""
    slices = bank_slices(num_layers)
    consumed: set[str] = set()
    out: dict[str, Tensor] = {}
    for bank, parts in slices.items():
        missing = [name for _, name in parts if name not in sd]
        if missing:
            raise ArtifactError(f"missing tensor {missing[0]} (needed for {bank})")
        out[bank] = torch.stack([sd[name] for _, name in sorted(parts)]).to(template[bank].dtype)
        consumed.update(name for _, name in parts)
    out.update((name, t) for name, t in sd.items() if name not in consumed)
    return out


def quantize_state_dict(sd: dict[str, Tensor], scheme: str = "seed",
                        int5_storage: str = "packed") -> tuple[dict[str, Tensor], dict]:
    """An un-banked state dict -> (w, m) in the seed's format and order. int5_storage
    "int8" stores the int5 values one per byte under the seed's {"type": "int8"} format
    (the seed's loader reads it the same way): LZMA codes bytes better than 5-bit
    groups that straddle them, so the artifact is smaller for the same values."""
    _check_scheme(scheme)
    if int5_storage not in INT5_STORAGES:
        raise ValueError(f"int5_storage must be one of {', '.join(INT5_STORAGES)}, got {int5_storage!r}")
    w: dict[str, Tensor] = {}
    m: dict[str, object] = {}
    for name, tensor in sd.items():
        t = tensor.detach().cpu().contiguous()
        fmt = tensor_format(name, t)
        if fmt == PASSTHROUGH:
            w[name] = t.to(torch.float16) if t.is_floating_point() else t
            m[name] = PASSTHROUGH
        elif fmt == PASSTHROUGH_CTRL:
            w[name] = t.float()
            m[name] = PASSTHROUGH_CTRL
        elif fmt == INT5_PACKED and int5_storage == "int8":
            w[name + ".q"], w[name + ".scale"] = quantize_int5(t, scheme)
            m[name] = {"type": INT8}
        elif fmt == INT5_PACKED:
            q, scale = quantize_int5(t, scheme)
            w[name + ".q"] = pack_int5(q)
            w[name + ".scale"] = scale
            w[name + ".shape"] = torch.tensor(list(q.shape), dtype=torch.int32)
            m[name] = {"type": INT5_PACKED}
        else:
            q, scale = quantize_int8(t, scheme)
            w[name + ".q"] = q
            w[name + ".scale"] = scale
            m[name] = {"type": INT8}
    return w, m


def _scaled(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    s = scale.float()
    if s.ndim > 0:
        s = s.view(q.shape[0], *([1] * (q.ndim - 1)))
    return (q.float() * s).to(dtype)


def dequantize_state_dict(w: dict[str, Tensor], m: dict, template: dict[str, Tensor]) -> dict[str, Tensor]:
    """(w, m) -> an un-banked state dict with the template's names, shapes and dtypes
    (template: un-banked tensors, meta tensors are fine). Missing, extra, malformed or
    mis-shaped tensors raise ArtifactError naming the tensor."""
    if not isinstance(w, dict) or not isinstance(m, dict):
        raise ArtifactError("artifact's 'w' and 'm' must be dicts")
    extra = sorted(map(str, set(m) - set(template)))
    if extra:
        raise ArtifactError(f"artifact holds tensor {extra[0]} that the config's model does not have "
                            f"({len(extra)} such); does the config match the artifact?")
    out: dict[str, Tensor] = {}
    for name, ref in template.items():
        if name not in m:
            raise ArtifactError(f"artifact lacks tensor {name} (no entry in its format map)")
        t = _dequantize_one(name, m[name], w, ref.dtype)
        if tuple(t.shape) != tuple(ref.shape):
            raise ArtifactError(f"tensor {name} has shape {tuple(t.shape)} in the artifact but the config's "
                                f"model expects {tuple(ref.shape)}; does the config match the artifact?")
        out[name] = t
    return out


def _dequantize_one(name: str, fmt, w: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """One tensor of the template from its artifact entries; ArtifactError for a missing entry, a
    non-tensor, or a dtype the format does not allow (an integer tensor where the model holds floats,
    non-int8 int8 data, non-float scales, a shape tensor that is not a list of sizes)."""
    def get(key: str) -> Tensor:
        if key not in w:
            raise ArtifactError(f"artifact lacks tensor {key} (format {fmt!r:.60} of {name})")
        if not isinstance(w[key], Tensor):
            raise ArtifactError(f"artifact entry {key} is a {type(w[key]).__name__}, not a tensor")
        return w[key]

    if fmt in (PASSTHROUGH, PASSTHROUGH_CTRL, "passthrough_fp16"):
        t = get(name)
        if t.is_floating_point() != dtype.is_floating_point or (not t.is_floating_point() and t.dtype != dtype):
            raise ArtifactError(f"tensor {name} is {t.dtype} in the artifact but the config's model holds {dtype}")
        return t.to(dtype)
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == INT5_PACKED:
        q = unpack_int5(get(name + ".q"), _stored_shape(name, get(name + ".shape")))
    elif kind == INT8:
        q = get(name + ".q")
        if q.dtype != torch.int8:
            raise ArtifactError(f"int8 data of {name} is {q.dtype}, not int8")
    else:
        raise ArtifactError(f"tensor {name} has unknown format {fmt!r:.60}")
    scale = get(name + ".scale")
    if not scale.is_floating_point():
        raise ArtifactError(f"{name}.scale is {scale.dtype}, not a float tensor")
    if scale.ndim > 0 and (q.ndim == 0 or scale.numel() != q.shape[0]):
        raise ArtifactError(f"{name}.scale has {scale.numel()} entries for {tuple(q.shape)} values")
    return _scaled(q, scale, dtype)


def _stored_shape(name: str, shape: Tensor) -> list[int]:
    """The sizes an int5 entry's .shape tensor holds (whole non-negative numbers, at most 8 of them)."""
    if shape.ndim != 1 or shape.numel() > 8 or shape.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ArtifactError(f"{name}.shape must be a short 1-D list of sizes, got {shape.dtype} {tuple(shape.shape)}")
    sizes = shape.tolist()
    if any(not math.isfinite(size) or size != int(size) or size < 0 for size in sizes):
        raise ArtifactError(f"{name}.shape holds {sizes}, not sizes")
    return [int(size) for size in sizes]
