"""The int5 artifact (SPEC.md §4): export, load, the 16 MB budget, and the
`recycore export` / `recycore eval` commands.

Container (the seed's): lzma(preset 9) of torch.save({"w": tensors, "m": formats, ...})
with recycore.quant's names and formats. We add keys the seed's loader never
reads: "config" (the model fields of the Config), "scheme" (the quantiser) and
"int5_storage". Seed-written artifacts have none; their config comes from flags/env.
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch import Tensor

from recycore import quant
from recycore.config import MODEL_FIELDS, Config
from recycore.quant import ArtifactError

BUDGET_BYTES = 16_000_000
LZMA_PRESET = 9
CODE_PACKAGES = ("recycore", "recycore.kernels")


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
    from recycore.model import GPT

    with torch.device("meta"):
        return GPT(cfg).state_dict()


def check_state_dict(state_dict: dict[str, Tensor], cfg: Config) -> None:
    """A clear error when the state dict does not fit GPT(cfg)."""
    template = model_template(cfg)
    missing = [name for name in template if name not in state_dict]
    extra = [name for name in state_dict if name not in template]
    if missing or extra:
        raise ValueError(f"the state dict does not fit the config's model: "
                         + (f"missing {missing[0]} ({len(missing)} missing) " if missing else "")
                         + (f"unexpected {extra[0]} ({len(extra)} unexpected)" if extra else ""))
    for name, ref in template.items():
        if tuple(state_dict[name].shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)} but the config's model has "
                             f"{tuple(ref.shape)}")


def model_config_dict(cfg: Config) -> dict:
    values = cfg.to_dict()
    return {name: values[name] for name in MODEL_FIELDS}


def serialize_artifact(state_dict: dict[str, Tensor], cfg: Config, scheme: str = "seed",
                       int5_storage: str = "packed") -> bytes:
    """The artifact's bytes for a banked state dict (see quant.quantize_state_dict)."""
    check_state_dict(state_dict, cfg)
    flat = quant.unbank_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, cfg.num_layers)
    w, m = quant.quantize_state_dict(flat, scheme, int5_storage)
    buf = io.BytesIO()  # a buffer, as the seed: torch.save names the zip's folder after a file
    torch.save({"w": w, "m": m, "config": model_config_dict(cfg), "scheme": scheme, "int5_storage": int5_storage},
               buf)
    return lzma.compress(buf.getvalue(), preset=LZMA_PRESET)


def export_artifact(state_dict: dict[str, Tensor], cfg: Config, path, scheme: str = "seed",
                    code_size: str = "raw", int5_storage: str = "packed") -> dict:
    """Write the artifact -> dict(model_bytes, code_bytes, total_bytes, ...); code_bytes is
    the raw source size unless code_size="lzma"."""
    blob = serialize_artifact(state_dict, cfg, scheme, int5_storage)
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    sizes = code_sizes()
    code_bytes = sizes[code_size]
    return {"path": str(path), "scheme": scheme, "model_bytes": len(blob), "code_bytes": code_bytes,
            "code_size": code_size, "code_bytes_raw": sizes["raw"], "code_bytes_lzma": sizes["lzma"],
            "code_files": sizes["files"], "total_bytes": len(blob) + code_bytes, "budget_bytes": BUDGET_BYTES}


def fit_floor(state_dict: dict[str, Tensor], cfg: Config, code_size: str = "raw", int5_storage: str = "packed",
              steps: int = 6, log=print) -> str:
    """The "rowfloor:F" scheme with the smallest floor F in [0, 1/15] whose artifact plus code
    fits BUDGET_BYTES, by bisection (bytes fall as F grows: a coarser step, fewer levels).
    Only sizes decide, never validation data. When even F = 1/15 does not fit, that is
    returned and the export reports the overflow."""
    limit = BUDGET_BYTES - code_sizes()[code_size]

    def size(floor: float) -> int:
        n = len(serialize_artifact(state_dict, cfg, f"rowfloor:{floor}", int5_storage))
        log(f"  fit: rowfloor:{floor} -> {n:,} model bytes ({'fits' if n <= limit else 'over'} {limit:,})")
        return n

    lo, hi = 0.0, round(1.0 / quant.INT5_MAX, 5)
    if size(hi) > limit:
        return f"rowfloor:{hi}"
    if size(lo) <= limit:
        return f"rowfloor:{lo}"
    for _ in range(steps):
        mid = round((lo + hi) / 2, 5)
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if size(mid) <= limit else (mid, hi)
    return f"rowfloor:{hi}"


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------
def read_artifact(path) -> dict:
    """The artifact's top-level dict, with clear errors for a missing, truncated or
    corrupted file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    blob = path.read_bytes()
    try:
        raw = lzma.decompress(blob)
    except lzma.LZMAError as exc:
        raise ArtifactError(f"artifact {path} is not a complete LZMA stream ({exc}); "
                            "the file is truncated or corrupted") from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a damaged container; all mean the same here
        raise ArtifactError(f"artifact {path} decompresses but is not a torch.save container "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("w"), dict) or not isinstance(obj.get("m"), dict):
        raise ArtifactError(f"artifact {path} lacks the 'w' (tensors) and 'm' (formats) dicts")
    return obj


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
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    try:
        return (cfg or Config()).replace(**fields)
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
    info = {"formats": obj["m"], "scheme": obj.get("scheme", "seed (no scheme recorded)"),
            "has_config": "config" in obj, "model_bytes": Path(path).stat().st_size}
    return state_dict, cfg, info


# ---------------------------------------------------------------------------
# `recycore export`
# ---------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (a dict with 'model' and 'config') or a plain "
                        "state dict (the config then comes from the flags/env)")
    parser.add_argument("-o", "--output", default="final_model.int5.ptz", help="the artifact to write")
    parser.add_argument("--scheme", type=_scheme, default="seed", metavar="|".join((*quant.SCHEMES, "rowfloor:F", "fit")),
                        help="seed: the seed's quantiser, byte for byte; rowmse: no scale floor, per-row clip "
                        "(lower error, more bytes); rowfloor[:F]: per-row clip under the seed's floor [or the int5 floor F]; "
                        "fit: rowfloor with the smallest floor that fits the budget (bisection, ~8 exports)")
    parser.add_argument("--int5-storage", choices=quant.INT5_STORAGES, default="packed",
                        help="packed: 8 values in 5 bytes (the seed's); int8: one per byte under the seed's int8 "
                        "format (the seed's loader reads it too; LZMA makes it smaller)")
    parser.add_argument("--weights", choices=("auto", "model", "ema", "swa"), default="auto",
                        help="auto: the seed's rule (SWA average if >1 snapshot, else EMA), as training exports")
    parser.add_argument("--code-size", choices=("raw", "lzma"), default="raw",
                        help="count the sources raw (as the seed counted its script) or as an xz tarball")
    parser.add_argument("--allow-over-budget", action="store_true", help="exit 0 even above 16,000,000 bytes")
    Config.add_arguments(parser)


def select_weights(ckpt: dict, weights: str) -> tuple[dict[str, Tensor], str]:
    """The state dict to export from a training checkpoint. "auto" is the seed's rule
    (the SWA average when it has more than one snapshot, else the EMA, else the live
    weights); "model", "ema" and "swa" pick one. Averages come back in the live dtypes."""
    live = ckpt.get("model")
    swa = ckpt.get("swa")
    has_swa = isinstance(swa, dict) and int(swa.get("count", 0)) > 1
    if weights == "auto":
        weights = "swa" if has_swa else "ema" if isinstance(ckpt.get("ema"), dict) else "model"
    if weights == "swa":
        if not has_swa:
            raise ValueError("the checkpoint has no SWA average (fewer than two snapshots)")
        chosen = {k: v / swa["count"] for k, v in swa["sum"].items()}
    else:
        chosen = ckpt.get(weights)
    if not isinstance(chosen, dict):
        raise ValueError(f"the checkpoint has no {weights!r} state dict (keys: {', '.join(map(str, ckpt))})")
    if isinstance(live, dict):
        chosen = {k: v.to(live[k].dtype) if k in live else v for k, v in chosen.items()}
    return chosen, weights


def _scheme(text: str) -> str:
    if text == "fit":
        return text
    try:
        quant.scheme_floor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def load_checkpoint(path, weights: str, args: argparse.Namespace) -> tuple[dict[str, Tensor], Config, str]:
    """(state dict, config, which weights) from a training checkpoint (a dict with "model",
    "config" and maybe "ema"/"swa") or a plain state dict (config from flags/env)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:  # our own training output: it holds optimizer/RNG state that weights_only refuses
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    cfg = Config.from_args(args)
    if all(isinstance(v, Tensor) for v in obj.values()):
        state_dict, weights = obj, "state dict"
    else:
        state_dict, weights = select_weights(obj, weights)
        if isinstance(obj.get("config"), dict):
            stored = {k: v for k, v in obj["config"].items() if k in MODEL_FIELDS}
            cfg = cfg.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    # torch.compile wraps the module: strip its prefix
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}, cfg, weights


def run_export(args: argparse.Namespace) -> dict:
    state_dict, cfg, weights = load_checkpoint(args.checkpoint, args.weights, args)
    start = time.perf_counter()
    scheme = args.scheme
    if scheme == "fit":
        scheme = fit_floor(state_dict, cfg, args.code_size, args.int5_storage)
    result = export_artifact(state_dict, cfg, args.output, scheme=scheme, code_size=args.code_size,
                             int5_storage=args.int5_storage)
    over = result["total_bytes"] - BUDGET_BYTES
    print(f"artifact {result['path']} ({weights} weights, scheme {scheme}, int5 {args.int5_storage}, "
          f"{time.perf_counter() - start:.1f}s)")
    print(f"  model bytes: {result['model_bytes']:>12,}")
    print(f"  code bytes:  {result['code_bytes']:>12,}  ({args.code_size}; {result['code_files']} files: "
          f"raw {result['code_bytes_raw']:,}, xz tarball {result['code_bytes_lzma']:,})")
    print(f"  total:       {result['total_bytes']:>12,}  of {BUDGET_BYTES:,} "
          + (f"-> OVER by {over:,}" if over > 0 else f"-> {-over:,} to spare"))
    if over > 0 and not args.allow_over_budget:
        print(f"recycore export: error: the artifact plus code is {over:,} bytes over the budget "
              "(written anyway; --allow-over-budget accepts it)", file=sys.stderr)
        sys.exit(1)
    return result


# ---------------------------------------------------------------------------
# `recycore eval`
# ---------------------------------------------------------------------------
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="an int5 artifact (ours or the seed's)")
    parser.add_argument("--mode", choices=("both", "standard", "sliding"), default="both",
                        help="standard: non-overlapping windows; sliding: stride EVAL_STRIDE (the headline)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (rank 0)")
    parser.add_argument("--int5-direct", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the int5 matrices packed on the device and run them through the K3 kernel "
                             "(default: on with CUDA, off on the CPU)")
    Config.add_arguments(parser)


def build_eval_model(state_dict: dict[str, Tensor], cfg: Config, device) -> torch.nn.Module:
    """GPT(cfg) with the dequantised weights, in eval mode on `device` (the other way is
    recycore.int5_model.load_int5_model, which keeps the int5 matrices packed)."""
    from recycore.model import GPT

    model = GPT(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def _explicit_model_fields(args: argparse.Namespace) -> set[str]:
    return {name for name in MODEL_FIELDS if getattr(args, name, None) is not None or name.upper() in os.environ}


def run_eval(args: argparse.Namespace) -> dict:
    from recycore.data import load_validation_tokens
    from recycore.evaluate import build_byte_tables, evaluate_sliding, evaluate_standard, load_tokenizer
    from recycore.train import process_context

    ctx = process_context()  # rank/world size from torchrun; nccl on CUDA, gloo on the CPU
    if args.device:
        ctx.device = torch.device(args.device)
    ctx.start()
    world_size, rank, device = ctx.world_size, ctx.rank, ctx.device
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        from recycore.int5_model import load_int5_model, weight_bytes

        requested = Config.from_args(args)
        int5_direct = device.type == "cuda" if args.int5_direct is None else args.int5_direct
        if int5_direct:
            model, cfg, info = load_int5_model(args.artifact, requested, device)
        else:
            state_dict, cfg, info = load_artifact(args.artifact, requested)
            model = build_eval_model(state_dict, cfg, device)
        for name in sorted(_explicit_model_fields(args)):
            if getattr(cfg, name) != getattr(requested, name):
                say(f"note: {name.upper()}={getattr(requested, name)} ignored; the artifact's model has "
                    f"{getattr(cfg, name)}")
        say(f"artifact {args.artifact}: {info['model_bytes']:,} bytes, scheme {info['scheme']}, "
            f"{cfg.num_layers} layers x {cfg.model_dim}, device {device}, world size {world_size}")
        sizes = weight_bytes(model)
        packed = (f" ({info['int5_matrices']} int5 matrices packed at {sizes['int5_bits_per_weight']:.2f} bits/weight;"
                  f" dequantised: fp32 banks {sizes['dequantised_fp32']:,}, bf16 {sizes['dequantised_bf16']:,})"
                  if int5_direct else " (dequantised)")
        say(f"weights on {device}: {sizes['total']:,} bytes{packed}")
        logits_fn = model.forward_logits
        if cfg.compile_model and device.type == "cuda":
            logits_fn = torch.compile(logits_fn, dynamic=False)
        tables = build_byte_tables(load_tokenizer(cfg.tokenizer_path, cfg.vocab_size), cfg.vocab_size)
        val_tokens = load_validation_tokens(cfg.data_path, cfg.eval_seq_len, cfg.val_max_tokens)
        say(f"validation: {val_tokens.numel() - 1:,} target tokens, seq_len {cfg.eval_seq_len}")
        results = {"artifact": str(args.artifact), "scheme": info["scheme"], "model_bytes": info["model_bytes"],
                   "val_tokens": val_tokens.numel() - 1, "world_size": world_size, "device": str(device),
                   "int5_direct": int5_direct, "weight_bytes": sizes}
        runs = []
        if args.mode in ("both", "standard"):
            runs.append(("standard", lambda: evaluate_standard(
                logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_batch_seqs, device, rank, world_size,
                progress=True)))
        if args.mode in ("both", "sliding"):
            runs.append(("sliding", lambda: evaluate_sliding(
                logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, device,
                rank, world_size, progress=True)))
        for name, run in runs:
            start = time.perf_counter()
            val_loss, val_bpb = run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            results[name] = {"val_loss": val_loss, "val_bpb": val_bpb, "eval_seconds": seconds}
            label = "int5 roundtrip" if name == "standard" else f"int5 sliding window (stride {cfg.eval_stride})"
            say(f"{label}: val_loss {val_loss:.6f} val_bpb {val_bpb:.6f} eval_time {seconds * 1000:.0f}ms")
        if args.json and rank == 0:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    finally:
        ctx.stop()
