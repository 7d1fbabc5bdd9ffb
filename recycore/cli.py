"""recycore's command line: `recycore data | demo | train | export | eval | bench`.

Each command is an argument parser (`add_*_arguments`) and a runner (`run_*`); the work itself lives
in the domain modules, which know nothing of argparse. Config flags are built from the Config fields
of the groups a command uses; every field also reads its environment variable (recycore.config)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from recycore.config import GROUPS, MODEL_FIELDS, PRESETS, Config, env_values, parse_bool, parse_field, type_name

ALL_GROUPS = tuple(GROUPS)


# ---------------------------------------------------------------------------
# Config flags
# ---------------------------------------------------------------------------
def _flag_type(f: dataclasses.Field):
    def parse(text):
        try:
            return parse_field(f, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type_name(f)}, got {text!r}") from None
    parse.__name__ = type_name(f)
    return parse


def add_config_flags(parser: argparse.ArgumentParser, groups=ALL_GROUPS) -> None:
    """One --flag per Config field of `groups`, under a heading per group; unset flags leave the
    environment's or the default value alone."""
    for group in groups:
        section = parser.add_argument_group(GROUPS[group])
        for f in dataclasses.fields(Config):
            if f.metadata["group"] != group:
                continue
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            if f.type == "bool":
                default = int(default)
            section.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=_flag_type(f),
                                 metavar=f.name.upper(),
                                 help=f"{f.metadata['help']} (default {default!s}; env {f.name.upper()})")


def config_from(args: argparse.Namespace, environ=None, **defaults) -> Config:
    """Config from `defaults` (a preset, a checkpoint's config) < the environment < the flags."""
    values = {**defaults, **env_values(environ)}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if getattr(args, f.name, None) is not None})
    return Config(**values)


def explicit_fields(args: argparse.Namespace, names, environ=None) -> set[str]:
    """Which of `names` the user set, by flag or environment variable."""
    environ = os.environ if environ is None else environ
    return {n for n in names if getattr(args, n, None) is not None or n.upper() in environ}


# ---------------------------------------------------------------------------
# data, demo
# ---------------------------------------------------------------------------
def add_data_arguments(parser) -> None:
    parser.add_argument("what", choices=["demo"], help="which dataset to prepare (demo: the embedded demo corpus)")
    parser.add_argument("--root", default="./data", help="where data/ lives (default ./data)")


def run_data(args) -> None:
    from recycore.demo import ensure_demo_data

    data_path, tokenizer_path = ensure_demo_data(args.root)
    print(f"DATA_PATH={data_path} TOKENIZER_PATH={tokenizer_path}")


def add_demo_arguments(parser) -> None:
    parser.add_argument("--root", default="./data", help="where data/ lives (default ./data)")
    add_config_flags(parser)


def run_demo(args) -> dict:
    """Prepare the demo data, train the demo preset on it, report val_bpb."""
    from recycore.demo import ensure_demo_data
    from recycore.training import train

    data_path, tokenizer_path = ensure_demo_data(args.root)
    cfg = config_from(args, **{**PRESETS["demo"], "data_path": str(data_path), "tokenizer_path": str(tokenizer_path)})
    results = train(cfg)
    print(json.dumps(results, indent=2), file=sys.stderr)
    return results


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="demo: a small model for a few CPU minutes; ci: seconds (default: the seed's config)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue the run of this checkpoint (its config, unless env/flags override)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="checkpoints go to DIR/<run_id>/ (default checkpoints)")
    parser.add_argument("--log-dir", default="logs", help="logs, metrics and plot go to DIR/<run_id>.* (default logs)")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing the outputs of a finished run")
    add_config_flags(parser)


def run_train(args: argparse.Namespace) -> dict:
    from recycore.checkpoint import load_checkpoint
    from recycore.training import train

    defaults = dict(PRESETS[args.preset]) if args.preset else {}
    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        defaults.update(Config().with_stored(resume["config"]).to_dict())  # the run's own config
    cfg = config_from(args, **defaults)
    results = train(cfg, checkpoint_dir=args.checkpoint_dir, resume=resume, log_dir=args.log_dir,
                    overwrite=args.overwrite)
    if results.get("interrupted"):
        sys.exit(143 if results.get("signal") == "SIGTERM" else 130)
    return results


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def _scheme(text: str) -> str:
    from recycore import quant

    if text == "fit":
        return text
    try:
        quant.scheme_floor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from recycore import quant

    parser.add_argument("checkpoint", help="a training checkpoint (a dict with 'model' and 'config') or a plain "
                        "state dict (the config then comes from the flags/env)")
    parser.add_argument("-o", "--output", default="final_model.int5.ptz", help="the artifact to write")
    parser.add_argument("--scheme", type=_scheme, default="seed", metavar="|".join((*quant.SCHEMES, "rowfloor:F", "fit")),
                        help="seed: the seed's quantiser, byte for byte; rowmse: no scale floor, per-row clip "
                        "(lower error, more bytes); rowfloor[:F]: per-row clip under the seed's floor [or the int5 "
                        "floor F]; fit: rowfloor with the smallest floor that fits the budget (bisection, ~8 exports)")
    parser.add_argument("--int5-storage", choices=quant.INT5_STORAGES, default="packed",
                        help="packed: 8 values in 5 bytes (the seed's); int8: one per byte under the seed's int8 "
                        "format (the seed's loader reads it too; LZMA makes it smaller)")
    parser.add_argument("--weights", choices=("auto", "model", "ema", "swa"), default="auto",
                        help="auto: the seed's rule (SWA average if >1 snapshot, else EMA), as training keeps")
    parser.add_argument("--code-size", choices=("raw", "lzma"), default="raw",
                        help="count the sources raw (as the seed counted its script) or as an xz tarball")
    parser.add_argument("--allow-over-budget", action="store_true",
                        help="write the artifact even above 16,000,000 bytes (default: refuse, write nothing)")
    add_config_flags(parser, ("model",))


def run_export(args: argparse.Namespace) -> dict:
    from recycore.artifact import BUDGET_BYTES, export_artifact, fit_floor
    from recycore.checkpoint import load_weights

    state_dict, cfg, weights = load_weights(args.checkpoint, args.weights, config_from(args))
    start = time.perf_counter()
    scheme = args.scheme
    if scheme == "fit":
        scheme = fit_floor(state_dict, cfg, args.code_size, args.int5_storage)
    result = export_artifact(state_dict, cfg, args.output, scheme=scheme, code_size=args.code_size,
                             int5_storage=args.int5_storage, allow_over_budget=args.allow_over_budget)
    over = result["total_bytes"] - BUDGET_BYTES
    print(f"artifact {result['path']} ({weights} weights, scheme {scheme}, int5 {args.int5_storage}, "
          f"{time.perf_counter() - start:.1f}s)")
    print(f"  model bytes: {result['model_bytes']:>12,}")
    print(f"  code bytes:  {result['code_bytes']:>12,}  ({args.code_size}; {result['code_files']} files: "
          f"raw {result['code_bytes_raw']:,}, xz tarball {result['code_bytes_lzma']:,})")
    print(f"  total:       {result['total_bytes']:>12,}  of {BUDGET_BYTES:,} "
          + (f"-> OVER by {over:,} (written: --allow-over-budget)" if over > 0 else f"-> {-over:,} to spare"))
    return result


# ---------------------------------------------------------------------------
# eval
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
    add_config_flags(parser, ("data", "model", "execution", "eval"))


def _load_eval_model(args, ctx, say):
    """(model, cfg, info, int5_direct) for `recycore eval`, with notes on ignored model flags."""
    from recycore.artifact import build_eval_model, load_artifact
    from recycore.int5_model import load_int5_model

    requested = config_from(args)
    int5_direct = ctx.on_cuda if args.int5_direct is None else args.int5_direct
    if int5_direct:
        model, cfg, info = load_int5_model(args.artifact, requested, ctx.device)
    else:
        state_dict, cfg, info = load_artifact(args.artifact, requested)
        model = build_eval_model(state_dict, cfg, ctx.device)
    for name in sorted(explicit_fields(args, MODEL_FIELDS)):
        if getattr(cfg, name) != getattr(requested, name):
            say(f"note: {name.upper()}={getattr(requested, name)} ignored; the artifact's model has {getattr(cfg, name)}")
    return model, cfg, info, int5_direct


def _describe_weights(model, info, int5_direct: bool) -> tuple[dict, str]:
    from recycore.int5_model import weight_bytes

    sizes = weight_bytes(model)
    if not int5_direct:
        return sizes, " (dequantised)"
    return sizes, (f" ({info['int5_matrices']} int5 matrices packed at {sizes['int5_bits_per_weight']:.2f} "
                   f"bits/weight; dequantised: fp32 banks {sizes['dequantised_fp32']:,}, bf16 {sizes['dequantised_bf16']:,})")


def run_eval(args: argparse.Namespace) -> dict:
    import torch

    from recycore.runtime import process_context

    ctx = process_context(args.device)
    ctx.start()
    say = print if ctx.master else (lambda *a, **k: None)
    try:
        model, cfg, info, int5_direct = _load_eval_model(args, ctx, say)
        say(f"artifact {args.artifact}: {info['model_bytes']:,} bytes, scheme {info['scheme']}, "
            f"{cfg.num_layers} layers x {cfg.model_dim}, device {ctx.device}, world size {ctx.world_size}")
        sizes, packed = _describe_weights(model, info, int5_direct)
        say(f"weights on {ctx.device}: {sizes['total']:,} bytes{packed}")
        logits_fn = model.forward_logits
        if cfg.compile_model and ctx.on_cuda:
            logits_fn = torch.compile(logits_fn, dynamic=False)
        results = {"artifact": str(args.artifact), "scheme": info["scheme"], "model_bytes": info["model_bytes"],
                   "world_size": ctx.world_size, "device": str(ctx.device), "int5_direct": int5_direct,
                   "weight_bytes": sizes}
        results.update(_evaluate_modes(args.mode, logits_fn, cfg, ctx, say))
        if args.json and ctx.master:
            from recycore.files import atomic_write_text

            atomic_write_text(args.json, json.dumps(results, indent=2))
        return results
    finally:
        ctx.stop()


def _evaluate_modes(mode: str, logits_fn, cfg: Config, ctx, say) -> dict:
    import torch

    from recycore.data import load_validation_tokens
    from recycore.evaluate import build_byte_tables, evaluate_sliding, evaluate_standard, load_tokenizer

    tables = build_byte_tables(load_tokenizer(cfg.tokenizer_path, cfg.vocab_size), cfg.vocab_size)
    val_tokens = load_validation_tokens(cfg.data_path, cfg.eval_seq_len, cfg.val_max_tokens)
    say(f"validation: {val_tokens.numel() - 1:,} target tokens, seq_len {cfg.eval_seq_len}")
    common = dict(device=ctx.device, rank=ctx.rank, world_size=ctx.world_size, progress=True)
    runs = {
        "standard": lambda: evaluate_standard(logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_batch_seqs,
                                              **common),
        "sliding": lambda: evaluate_sliding(logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_stride,
                                            cfg.eval_batch_seqs, **common),
    }
    results = {"val_tokens": val_tokens.numel() - 1}
    for name, evaluate in runs.items():
        if mode not in ("both", name):
            continue
        start = time.perf_counter()
        val_loss, val_bpb = evaluate()
        if ctx.on_cuda:
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - start
        results[name] = {"val_loss": val_loss, "val_bpb": val_bpb, "eval_seconds": seconds}
        label = "int5 roundtrip" if name == "standard" else f"int5 sliding window (stride {cfg.eval_stride})"
        say(f"{label}: val_loss {val_loss:.6f} val_bpb {val_bpb:.6f} eval_time {seconds * 1000:.0f}ms")
    return results


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------
def add_bench_arguments(parser) -> None:
    from recycore.bench import PATHS, PROFILE_PATHS, SUITE_PATHS

    parser.add_argument("--profile", action="store_true",
                        help="print the GPU time of one micro-step and one optimiser step by kernel family, for each path")
    parser.add_argument("--paths", default=None,
                        help=f"comma-separated micro-step paths (of {', '.join(PATHS)}); default: "
                             f"{SUITE_PATHS} for the suite, {PROFILE_PATHS} for --profile")
    parser.add_argument("--autotune-archive", default=None,
                        help="inductor autotuning decisions (.tgz) to seed the cache with before compiling; "
                             "'none' for none (default: RECYCORE_AUTOTUNE_ARCHIVE, else the committed H200 one)")
    parser.add_argument("--batch-seqs", type=int, default=48, help="sequences per micro-step (default 48, the seed's)")
    parser.add_argument("--json", default="benchmarks/results/latest.json",
                        help="where the suite writes pytest-benchmark JSON")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to pick benchmarks")
    add_config_flags(parser, ("model", "execution"))


def run_bench(args) -> None:
    import subprocess

    import torch

    from recycore.bench import PATHS, PROFILE_PATHS, SUITE_PATHS, format_profile, profile, seed_inductor_cache

    paths = args.paths or (PROFILE_PATHS if args.profile else SUITE_PATHS)
    unknown = [path for path in paths.split(",") if path not in PATHS]
    if unknown:
        raise ValueError(f"unknown micro-step path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("recycore bench needs a CUDA GPU (the suite skips every benchmark without one)")
    if args.autotune_archive is not None:  # the suite's pytest process reads it too (benchmarks/conftest.py)
        os.environ["RECYCORE_AUTOTUNE_ARCHIVE"] = args.autotune_archive
    if args.profile:
        cfg = config_from(args)
        if "max-autotune" in paths:
            seed_inductor_cache()
        results = [profile(path, cfg, args.batch_seqs) for path in paths.split(",")]
        for result in results:
            print(format_profile(result))
        print(json.dumps(results, indent=1, default=str), file=sys.stderr)
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    suite = Path(__file__).resolve().parent.parent / "benchmarks"
    command = [sys.executable, "-m", "pytest", str(suite), "-q", f"--benchmark-json={args.json}"]
    if args.select:
        command += ["-k", args.select]
    print("+", " ".join(command), flush=True)
    status = subprocess.call(command, env={**os.environ, "RECYCORE_BENCH_PATHS": paths})
    if status:
        sys.exit(status)
    subprocess.check_call([sys.executable, str(suite / "report.py"), args.json])


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
COMMANDS = {
    "data": (add_data_arguments, run_data, "prepare a dataset (`data demo`: the embedded demo corpus)"),
    "demo": (add_demo_arguments, run_demo, "prepare the demo data and train a small model on it (CPU)"),
    "train": (add_train_arguments, run_train, "train (torchrun --nproc_per_node=N -m recycore train for several GPUs)"),
    "export": (add_export_arguments, run_export, "write the int5 artifact of a checkpoint"),
    "eval": (add_eval_arguments, run_eval, "evaluate an int5 artifact (val_bpb, standard and sliding window)"),
    "bench": (add_bench_arguments, run_bench, "run the GPU benchmark suite and write the results table"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recycore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's arguments (and their imports)
            add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Bad input gets one clear line, not a traceback.
        if os.environ.get("RECYCORE_DEBUG"):
            raise
        print(f"recycore {args.command}: error: {exc} (RECYCORE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
