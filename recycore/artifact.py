"""The int5 artifact (docs/SPEC.md §4): export, load and the 16 MB budget.

Container (the seed's): lzma(preset 9) of torch.save({"w": tensors, "m": formats, ...})
with recycore.quant's names and formats. We add keys the seed's loader never
reads: "config" (the model fields of the Config), "scheme" (the quantiser),
"int5_storage" and "evaluation" (how the training run evaluated it: the eval
settings, where its data and tokenizer were, the tokenizer's sha256 and vocab size;
`recycore eval` starts from these). Seed-written artifacts have none; their config
comes from flags/env.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import pickle
import tarfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from recycore import quant
from recycore.config import MODEL_FIELDS, Config
from recycore.console import Progress
from recycore.errors import ArtifactError
from recycore.files import atomic_write_bytes, zip_damage
from recycore.model import GPT

BUDGET_BYTES = 16_000_000
LZMA_PRESET = 9
MAX_DECOMPRESSED_BYTES = 1 << 30  # what read_artifact inflates at most
CODE_PACKAGES = ("recycore", "recycore.kernels")
# The settings an artifact records so that `recycore eval` reproduces its training run's figures.
EVAL_FIELDS = ("eval_seq_len", "eval_stride", "eval_batch_seqs", "val_max_tokens", "val_batch_size")


# ---------------------------------------------------------------------------
# Code size
# ---------------------------------------------------------------------------
def code_files() -> list[Path]:
    """The .py sources of recycore/ and its kernels (kernels/): what a user must ship."""
    import importlib.util

    files = []
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)  # does not import recycore.kernels (nor triton)
        for folder in spec.submodule_search_locations:
            files += sorted(p for p in Path(folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def code_sizes() -> dict[str, int]:
    """raw: the bytes of the sources (how the seed counted its script); lzma: an
    xz-compressed tar of them (a file one could ship instead)."""
    files = code_files()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{path.parent.name}/{path.name}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return {"raw": sum(p.stat().st_size for p in files), "lzma": len(lzma.compress(buf.getvalue(), preset=LZMA_PRESET)),
            "files": len(files)}


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def model_template(cfg: Config) -> dict[str, Tensor]:
    """The banked state dict of GPT(cfg) as meta tensors (names, shapes, dtypes; no memory)."""
    with torch.device("meta"):
        return GPT(cfg).state_dict()


def check_state_dict(state_dict: dict[str, Tensor], cfg: Config) -> None:
    """A clear error when the state dict does not fit GPT(cfg)."""
    template = model_template(cfg)
    missing = [name for name in template if name not in state_dict]
    extra = [name for name in state_dict if name not in template]
    if missing or extra:
        raise ValueError("the state dict does not fit the config's model: "
                         + (f"missing {missing[0]} ({len(missing)} missing) " if missing else "")
                         + (f"unexpected {extra[0]} ({len(extra)} unexpected)" if extra else ""))
    for name, ref in template.items():
        if tuple(state_dict[name].shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)} but the config's model has "
                             f"{tuple(ref.shape)}")


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def evaluation_record(cfg: Config) -> dict:
    """What evaluating an artifact as `cfg`'s run did takes: the eval settings, the data and tokenizer
    paths (absolute; hints, the data may move) and the tokenizer's identity (sha256 of the .model file,
    when it is there, and the vocab size)."""
    record = {name: getattr(cfg, name) for name in EVAL_FIELDS}
    record["data_path"] = str(Path(cfg.data_path).resolve())
    record["tokenizer_path"] = str(Path(cfg.tokenizer_path).resolve())
    if Path(cfg.tokenizer_path).is_file():
        record["tokenizer_sha256"] = file_sha256(cfg.tokenizer_path)
    record["tokenizer_vocab_size"] = cfg.vocab_size
    return record


def serialize_artifact(state_dict: dict[str, Tensor], cfg: Config, scheme: str = "seed",
                       int5_storage: str = "packed", evaluation: dict | None = None) -> bytes:
    """The artifact's bytes for a banked state dict (see quant.quantize_state_dict); `evaluation`
    (evaluation_record) is stored when given."""
    check_state_dict(state_dict, cfg)
    flat = quant.unbank_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, cfg.num_layers)
    w, m = quant.quantize_state_dict(flat, scheme, int5_storage)
    obj = {"w": w, "m": m, "config": cfg.model_dict(), "scheme": scheme, "int5_storage": int5_storage}
    if evaluation is not None:
        obj["evaluation"] = evaluation
    buf = io.BytesIO()  # a buffer, as the seed: torch.save names the zip's folder after a file
    torch.save(obj, buf)
    return lzma.compress(buf.getvalue(), preset=LZMA_PRESET)


class BudgetError(ArtifactError):
    """An artifact whose bytes plus the code's exceed BUDGET_BYTES (nothing was written)."""


def export_artifact(state_dict: dict[str, Tensor], cfg: Config, path, scheme: str = "seed",
                    code_size: str = "raw", int5_storage: str = "packed", allow_over_budget: bool = False,
                    evaluation: dict | None = None) -> dict:
    """Write the artifact atomically -> dict(model_bytes, code_bytes, total_bytes, ...); code_bytes is
    the raw source size unless code_size="lzma". Over the budget it raises BudgetError and writes
    nothing (an existing file at `path` stays as it was), unless allow_over_budget. `evaluation`:
    see evaluation_record."""
    try:
        blob = serialize_artifact(state_dict, cfg, scheme, int5_storage, evaluation)
    except ValueError as exc:  # e.g. a state dict that does not fit the config
        raise ArtifactError(f"{exc}; nothing was written to {path}") from exc
    sizes = code_sizes()
    code_bytes = sizes[code_size]
    result = {"path": str(path), "scheme": scheme, "model_bytes": len(blob), "code_bytes": code_bytes,
              "code_size": code_size, "code_bytes_raw": sizes["raw"], "code_bytes_lzma": sizes["lzma"],
              "code_files": sizes["files"], "total_bytes": len(blob) + code_bytes, "budget_bytes": BUDGET_BYTES}
    over = result["total_bytes"] - BUDGET_BYTES
    if over > 0 and not allow_over_budget:
        raise BudgetError(f"the artifact ({len(blob):,} bytes) plus code ({code_bytes:,}) is {over:,} bytes over "
                          f"the {BUDGET_BYTES:,}-byte budget; nothing was written to {path}")
    try:
        atomic_write_bytes(path, blob)
    except OSError as exc:
        raise ArtifactError(f"could not write {path} ({exc.strerror or type(exc).__name__}); nothing was written "
                            "there") from exc
    return result


def fit_floor(state_dict: dict[str, Tensor], cfg: Config, code_size: str = "raw", int5_storage: str = "packed",
              steps: int = 6, log=print, evaluation: dict | None = None) -> str:
    """The "rowfloor:F" scheme with the smallest floor F in [0, 1/15] whose artifact plus code
    fits BUDGET_BYTES, by bisection (bytes fall as F grows: a coarser step, fewer levels).
    Only sizes decide, never validation data. When even F = 1/15 does not fit, that is
    returned and the export reports the overflow. `evaluation` is what the export will store
    (its bytes count too)."""
    limit = BUDGET_BYTES - code_sizes()[code_size]
    sizes = {}
    bar = Progress(steps + 2, "fit: bisecting the int5 floor", "exports")

    def size(floor: float) -> int:
        sizes[floor] = len(serialize_artifact(state_dict, cfg, f"rowfloor:{floor}", int5_storage, evaluation))
        bar.update(1, note=f"rowfloor:{floor} -> {sizes[floor]:,} bytes")
        return sizes[floor]

    lo, hi = 0.0, round(1.0 / quant.INT5_MAX, 5)
    with bar:
        if size(hi) > limit:
            chosen = hi
        elif size(lo) <= limit:
            chosen = lo
        else:
            for _ in range(steps):
                mid = round((lo + hi) / 2, 5)
                if mid in (lo, hi):
                    break
                lo, hi = (lo, mid) if size(mid) <= limit else (mid, hi)
            chosen = hi
    log(f"fit: rowfloor:{chosen} -> {sizes[chosen]:,} model bytes "
        f"({'within' if sizes[chosen] <= limit else 'over'} the {limit:,} left beside the code; "
        f"{len(sizes)} trial exports)")
    return f"rowfloor:{chosen}"


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------
def read_artifact(path) -> dict:
    """The artifact's top-level dict, with clear errors for a missing, truncated, corrupted,
    code-carrying or mistaken file (a training checkpoint is named as one). Read as data only
    (weights_only=True), after the LZMA stream's own check and the inner zip's CRC-32s."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    blob = path.read_bytes()
    if blob.startswith(ZIP_MAGIC):
        raise ArtifactError(describe_torch_file(path, blob))
    raw = _decompress(blob, path)
    try:
        damaged = zip_damage(io.BytesIO(raw)) if zipfile.is_zipfile(io.BytesIO(raw)) else None
    except Exception as exc:  # zipfile raises many kinds for a damaged container
        raise ArtifactError(f"artifact {path} decompresses but is not a readable torch.save container "
                            f"({type(exc).__name__})") from exc
    if damaged is not None:
        raise ArtifactError(f"artifact {path} is corrupt: its member {damaged} fails its CRC-32 check")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise ArtifactError(f"artifact {path} holds objects other than tensors and plain data; refused "
                                "(files are loaded as data only, never as code)") from exc
        raise ArtifactError(f"artifact {path} decompresses but is not a readable torch.save container "
                            f"({type(exc).__name__})") from exc
    except Exception as exc:  # torch raises many kinds for a damaged container; all mean the same here
        raise ArtifactError(f"artifact {path} decompresses but is not a readable torch.save container "
                            f"({type(exc).__name__})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("w"), dict) or not isinstance(obj.get("m"), dict):
        raise ArtifactError(f"artifact {path} lacks the 'w' (tensors) and 'm' (formats) dicts")
    return obj


def _decompress(blob: bytes, path) -> bytes:
    """The one LZMA stream of an artifact, at most MAX_DECOMPRESSED_BYTES of it (a 16 MB artifact
    holds tens of MB; a hostile stream could expand ~1000x)."""
    decompressor = lzma.LZMADecompressor()
    try:
        raw = decompressor.decompress(blob, max_length=MAX_DECOMPRESSED_BYTES)
    except lzma.LZMAError as exc:
        raise ArtifactError(f"artifact {path} is not a complete LZMA stream; "
                            "the file is truncated or corrupted") from exc
    if not decompressor.eof and not decompressor.needs_input:
        raise ArtifactError(f"artifact {path} decompresses to more than {MAX_DECOMPRESSED_BYTES:,} bytes; refused")
    if not decompressor.eof or decompressor.unused_data:
        raise ArtifactError(f"artifact {path} is not a complete LZMA stream"
                            + (" (bytes follow its end)" if decompressor.eof else "")
                            + "; the file is truncated or corrupted")
    return raw


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's container: training checkpoints, state dicts


def describe_torch_file(path, blob: bytes) -> str:
    """Why a torch.save (zip) file is not an artifact, naming what it is and what to do."""
    export = f"; export it first with `recycore export {path} -o {Path(path).stem}.int5.ptz`"
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        return f"{path} is a truncated or damaged torch.save file (a training checkpoint cut short?), not an artifact"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
    except Exception:  # any unreadable content: the message only describes the file
        return f"{path} is an unreadable torch.save file, not an artifact"
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj:
        run = obj["config"].get("run_id") or "?"
        return f"{path} is a training checkpoint (run {run}, step {obj.get('step', '?')}), not an artifact" + export
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return f"{path} is a plain state dict ({len(obj)} tensors), not an artifact" + export + " and model flags"
    return f"{path} is a torch.save file holding a {type(obj).__name__}, not an artifact"


def artifact_evaluation(obj: dict) -> dict:
    """The artifact's evaluation record (see evaluation_record); {} for a seed artifact or one written
    before artifacts kept it."""
    record = obj.get("evaluation")
    if record is None:
        return {}
    if not isinstance(record, dict) or not all(isinstance(k, str) for k in record):
        raise ArtifactError(f"the artifact's evaluation record is malformed: {record!r:.200}")
    return record


def artifact_config(obj: dict, cfg: Config | None) -> Config:
    """The artifact's model fields over `cfg` (or the defaults); `cfg` alone for a
    seed artifact, which carries no config."""
    stored = obj.get("config")
    if stored is None:
        if cfg is None:
            raise ArtifactError("the artifact carries no config (a seed artifact): give the model's config "
                                "(flags such as --num-layers 11, or the seed's env variables)")
        return cfg
    if not isinstance(stored, dict) or set(stored) - set(MODEL_FIELDS):
        raise ArtifactError(f"the artifact's config is malformed: {stored!r:.200}")
    try:
        return (cfg or Config()).with_stored(stored)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the artifact's config is invalid: {exc}") from None


def load_artifact(path, cfg: Config | None = None) -> tuple[dict[str, Tensor], Config, dict]:
    """-> (dequantised banked state dict for GPT(cfg).load_state_dict, cfg, info)."""
    obj = read_artifact(path)
    cfg = artifact_config(obj, cfg)
    template = model_template(cfg)
    flat_template = quant.unbank_state_dict(template, cfg.num_layers)
    try:
        flat = quant.dequantize_state_dict(obj["w"], obj["m"], flat_template)
    except ArtifactError as exc:
        raise ArtifactError(f"artifact {path}: {exc}") from None
    state_dict = quant.rebank_state_dict(flat, cfg.num_layers, template)
    return state_dict, cfg, artifact_info(obj, path)


def artifact_info(obj: dict, path) -> dict:
    """What a loader reports about the artifact read from `path`: formats, scheme, whether it holds a
    config, its size in bytes and its evaluation record."""
    return {"formats": obj["m"], "scheme": obj.get("scheme", "seed (no scheme recorded)"),
            "has_config": "config" in obj, "model_bytes": Path(path).stat().st_size,
            "evaluation": artifact_evaluation(obj)}


def build_eval_model(state_dict: dict[str, Tensor], cfg: Config, device) -> torch.nn.Module:
    """GPT(cfg) with the dequantised weights, in eval mode on `device` (the other way is
    recycore.int5_model.load_int5_model, which keeps the int5 matrices packed)."""
    model = GPT(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()
