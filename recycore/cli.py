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

from recycore.config import GROUPS, MODEL_FIELDS, PRESETS, Config, env_values, parse_field, type_name

ALL_GROUPS = tuple(GROUPS)


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------
def _flag_type(f: dataclasses.Field):
    def parse(text):
        try:
            return parse_field(f, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type_name(f)}, got {text!r}") from None
    parse.__name__ = type_name(f)
    return parse


def integer(text: str) -> int:
    """argparse type: 'argument --x: expected an integer, got 'y'' (as the config flags say it)."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def show_default(f: dataclasses.Field) -> str:
    if isinstance(f.default, tuple):
        return ",".join(map(str, f.default)) or "none"
    if f.type == "bool":
        return str(int(f.default))
    return repr(f.default) if f.default == "" else str(f.default)


def add_config_flags(parser: argparse.ArgumentParser, groups=ALL_GROUPS, headings=None) -> None:
    """One --flag per Config field of `groups`, under a heading per group (`headings` overrides some);
    unset flags leave the environment's or the default value alone."""
    for group in groups:
        section = parser.add_argument_group((headings or {}).get(group, GROUPS[group]))
        for f in dataclasses.fields(Config):
            if f.metadata["group"] != group:
                continue
            text = f.metadata["help"]  # a help that explains its default keeps that explanation
            suffix = f"env {f.name.upper()}" if "(default" in text else f"default {show_default(f)}; env {f.name.upper()}"
            section.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=_flag_type(f),
                                 metavar=f.name.upper(), help=f"{text} ({suffix})")


def config_from(args: argparse.Namespace, environ=None, **defaults) -> Config:
    """Config from `defaults` (a preset, a checkpoint's config) < the environment < the flags; an
    invalid combination blames the field the user set (MODEL_DIM=7: model_dim, not num_heads)."""
    values = {**defaults, **env_values(environ)}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if getattr(args, f.name, None) is not None})
    user_set = explicit_fields(args, [f.name for f in dataclasses.fields(Config)], environ)
    return Config(**values, explicit=frozenset(user_set))


def explicit_fields(args: argparse.Namespace, names, environ=None) -> set[str]:
    """Which of `names` the user set, by flag or environment variable."""
    environ = os.environ if environ is None else environ
    return {n for n in names if getattr(args, n, None) is not None or n.upper() in environ}


# ---------------------------------------------------------------------------
# data, demo
# ---------------------------------------------------------------------------
def add_data_arguments(parser) -> None:
    parser.add_argument("what", choices=["demo"], help="which dataset to prepare (demo: the demo corpus, "
                        "fetched with npm and tokenized here; the only choice)")
    parser.add_argument("--root", default="./data", metavar="DIR",
                        help="where the datasets/ and tokenizers/ folders go (default ./data)")


def run_data(args) -> None:
    from recycore.demo import ensure_demo_data

    data_path, tokenizer_path = ensure_demo_data(args.root)
    print(f"DATA_PATH={data_path} TOKENIZER_PATH={tokenizer_path}")


DEMO_GROUPS = ("model", "training", "eval", "execution")  # the data is the demo's own (--root)


def add_demo_arguments(parser) -> None:
    parser.add_argument("--root", default="./data", metavar="DIR",
                        help="where the demo data is built, or found when it is there (default ./data)")
    add_config_flags(parser, DEMO_GROUPS, {"model": "model (default: the demo preset's)",
                                           "training": "training (default: the demo preset's)",
                                           "eval": "evaluation (default: the demo preset's)"})


def run_demo(args) -> dict:
    """Prepare the demo data, train the demo preset on it, end on the headline figure."""
    from recycore.artifact import BUDGET_BYTES
    from recycore.console import headline
    from recycore.demo import ensure_demo_data
    from recycore.training import train

    data_path, tokenizer_path = ensure_demo_data(args.root)
    cfg = config_from(args, **PRESETS["demo"]).replace(data_path=str(data_path), tokenizer_path=str(tokenizer_path))
    results = train(cfg)
    if "int5_sliding_val_bpb" in results:
        print(f"evaluate it again (the same figures): recycore eval {results['artifact']}")
        print(headline(results["int5_sliding_val_bpb"], f"int5 artifact, sliding window (stride {cfg.eval_stride})",
                       results.get("total_bytes"), BUDGET_BYTES))
    return results


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a small config: demo, a few CPU minutes; ci, seconds (default: none, "
                        "the seed's config)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue the run of this checkpoint, with its config unless env/flags override "
                        "(default: a new run)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", metavar="DIR",
                        help="checkpoints and the artifact go to DIR/<run_id>/ (default checkpoints)")
    parser.add_argument("--log-dir", default="logs", metavar="DIR",
                        help="the log, metrics (JSON lines) and loss plot go to DIR/<run_id>.* (default logs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow replacing the outputs of a finished run with the same RUN_ID (default: refuse)")
    parser.add_argument("--device", default=None,
                        help="where to train, e.g. cpu (default: cuda:LOCAL_RANK when CUDA is there, else cpu)")
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
                    overwrite=args.overwrite, device=args.device)
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

    parser.add_argument("checkpoint", help="a training checkpoint (a dict with 'model' and 'config': its model, "
                        "eval settings and data paths are recorded) or a plain state dict (the model then comes "
                        "from the flags/env)")
    parser.add_argument("-o", "--output", default="final_model.int5.ptz", metavar="ARTIFACT",
                        help="the artifact to write (default final_model.int5.ptz)")
    parser.add_argument("--scheme", type=_scheme, default="seed", metavar="|".join((*quant.SCHEMES, "rowfloor:F", "fit")),
                        help="seed: the seed's quantiser, byte for byte; rowmse: no scale floor, per-row clip "
                        "(lower error, more bytes); rowfloor[:F]: per-row clip under the seed's floor [or the int5 "
                        "floor F]; fit: rowfloor with the smallest floor that fits the budget (bisection, ~8 "
                        "exports) (default seed)")
    parser.add_argument("--int5-storage", choices=quant.INT5_STORAGES, default="packed",
                        help="packed: 8 values in 5 bytes (the seed's); int8: one per byte under the seed's int8 "
                        "format (the seed's loader reads it too; LZMA makes it smaller) (default packed)")
    parser.add_argument("--weights", choices=("auto", "model", "ema", "swa"), default="auto",
                        help="which weights of a checkpoint: auto, the seed's rule (the SWA average if it has > 1 "
                        "snapshot, else the EMA), as training keeps; model: the live weights (default auto)")
    parser.add_argument("--code-size", choices=("raw", "lzma"), default="raw",
                        help="count the sources raw (as the seed counted its script) or as an xz tarball "
                        "(default raw)")
    parser.add_argument("--allow-over-budget", action="store_true",
                        help="write the artifact even above 16,000,000 bytes (default: refuse, write nothing)")
    add_config_flags(parser, ("model",), {"model": "model (default: the checkpoint's; these for a plain state dict)"})


def _checkpoint_evaluation(path) -> dict | None:
    """The evaluation record of a training checkpoint's config (None for a plain state dict). The file
    is memory-mapped: only its config is read."""
    import torch

    from recycore.artifact import evaluation_record

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    stored = obj.get("config") if isinstance(obj, dict) else None
    return evaluation_record(Config().with_stored(stored)) if isinstance(stored, dict) else None


def run_export(args: argparse.Namespace) -> dict:
    from recycore.artifact import BUDGET_BYTES, export_artifact, fit_floor
    from recycore.checkpoint import load_weights

    state_dict, cfg, weights = load_weights(args.checkpoint, args.weights, config_from(args))
    evaluation = _checkpoint_evaluation(args.checkpoint)
    start = time.perf_counter()
    scheme = args.scheme
    if scheme == "fit":
        scheme = fit_floor(state_dict, cfg, args.code_size, args.int5_storage, evaluation=evaluation)
    result = export_artifact(state_dict, cfg, args.output, scheme=scheme, code_size=args.code_size,
                             int5_storage=args.int5_storage, allow_over_budget=args.allow_over_budget,
                             evaluation=evaluation)
    over = result["total_bytes"] - BUDGET_BYTES
    print(f"artifact {result['path']} ({weights} weights, scheme {scheme}, int5 {args.int5_storage}, "
          f"{time.perf_counter() - start:.1f}s)")
    print(f"  model bytes: {result['model_bytes']:>12,}")
    print(f"  code bytes:  {result['code_bytes']:>12,}  ({args.code_size}; {result['code_files']} files: "
          f"raw {result['code_bytes_raw']:,}, xz tarball {result['code_bytes_lzma']:,})")
    print(f"  total:       {result['total_bytes']:>12,}  of {BUDGET_BYTES:,} "
          + (f"-> OVER by {over:,} (written: --allow-over-budget)" if over > 0 else f"-> {-over:,} to spare"))
    print("  evaluation: " + ("the checkpoint's eval settings, data and tokenizer are recorded for `recycore eval`"
                            if evaluation else "nothing recorded (a plain state dict): `recycore eval` uses "
                            "its defaults, env and flags"))
    return result


# ---------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------
EVAL_SETTINGS = ("eval_seq_len", "eval_stride", "eval_batch_seqs", "val_max_tokens", "data_path", "tokenizer_path")
EVAL_HEADINGS = {"data": "data (default: where the artifact's training run found it, else these)",
                 "model": "model (an artifact of ours records these; flags only for a seed artifact)",
                 "eval": "evaluation (default: the settings the artifact records, else these)"}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="an int5 artifact (ours, from `recycore train` or `recycore export`, "
                        "or the seed's)")
    parser.add_argument("--mode", choices=("both", "standard", "sliding"), default="both",
                        help="standard: non-overlapping windows; sliding: stride EVAL_STRIDE, the headline figure "
                        "(default both)")
    parser.add_argument("--device", default=None,
                        help="where to evaluate (default: cuda:LOCAL_RANK when CUDA is there, else cpu)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write every result to this JSON file, rank 0 (default: none; the summary is printed)")
    parser.add_argument("--int5-direct", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the int5 matrices packed on the device and run them through the K3 kernel "
                             "(default: on with CUDA, off on the CPU)")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="evaluate even when the tokenizer's sha256 differs from the one the artifact was "
                        "trained with (default: refuse; bits per byte would count other bytes)")
    add_config_flags(parser, ("eval", "data", "model", "execution"), EVAL_HEADINGS)


def _load_eval_model(args, ctx, say):
    """(model, cfg, info, int5_direct) for `recycore eval`, with notes on ignored model flags;
    info["evaluation"] is the artifact's evaluation record ({} if none)."""
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


def eval_config(args, model_cfg: Config, recorded: dict) -> tuple[Config, list[str]]:
    """The config `recycore eval` runs: the artifact's model; its recorded eval settings and data paths
    under env and flags; else the defaults -> (config, the names taken from the artifact). A recorded
    path that is not here is an error naming the flag to pass."""
    hints = {k: recorded[k] for k in EVAL_SETTINGS if k in recorded}  # (val_batch_size is training's)
    taken = sorted(set(hints) - explicit_fields(args, hints))
    cfg = config_from(args, **hints).with_stored(model_cfg.model_dict())
    for name in ("data_path", "tokenizer_path"):
        path, what, flag = getattr(cfg, name), name.split("_")[0], f"--{name.replace('_', '-')} ({name.upper()})"
        if name in taken and not Path(path).exists():
            raise FileNotFoundError(f"the artifact's training run read its {what} from {path}, which is not "
                                    f"here; pass {flag}")
        if name not in hints and name not in explicit_fields(args, [name]) and not Path(path).exists():
            raise FileNotFoundError(f"no {what} at {path}, the default (the artifact records no {what} path); "
                                    f"pass {flag}")
    return cfg, taken


def check_tokenizer(cfg: Config, recorded: dict, allow_other: bool, say) -> str | None:
    """The tokenizer's sha256 against the artifact's: refused when they differ (bits per byte would count
    other bytes per token), unless allow_other. -> the sha256 (None without a file)."""
    from recycore.artifact import file_sha256
    from recycore.errors import ArtifactError

    if not Path(cfg.tokenizer_path).is_file():
        return None  # load_tokenizer names the missing file
    have, want = file_sha256(cfg.tokenizer_path), recorded.get("tokenizer_sha256")
    if want and have != want:
        why = (f"the tokenizer {cfg.tokenizer_path} (sha256 {have[:16]}) is not the one the artifact was trained "
               f"with (sha256 {want[:16]}, then at {recorded.get('tokenizer_path')})")
        if not allow_other:
            raise ArtifactError(f"{why}; pass that tokenizer with --tokenizer-path, or --allow-other-tokenizer "
                                "to evaluate anyway (bits per byte would count other bytes)")
        say(f"warning: {why}; evaluating anyway (--allow-other-tokenizer)")
    return have


def _describe_weights(model, info, int5_direct: bool) -> tuple[dict, str]:
    from recycore.int5_model import weight_bytes

    sizes = weight_bytes(model)
    if not int5_direct:
        return sizes, " (dequantised)"
    return sizes, (f" ({info['int5_matrices']} int5 matrices packed at {sizes['int5_bits_per_weight']:.2f} "
                   f"bits/weight; dequantised: fp32 banks {sizes['dequantised_fp32']:,}, bf16 {sizes['dequantised_bf16']:,})")


def run_eval(args: argparse.Namespace) -> dict:
    import torch

    from recycore.artifact import BUDGET_BYTES, code_sizes
    from recycore.console import eval_summary
    from recycore.ops import kernel_choices
    from recycore.runtime import process_context

    ctx = process_context(args.device)
    ctx.start()
    say = print if ctx.master else (lambda *a, **k: None)
    try:
        model, model_cfg, info, int5_direct = _load_eval_model(args, ctx, say)
        cfg, taken = eval_config(args, model_cfg, info["evaluation"])
        sha256 = check_tokenizer(cfg, info["evaluation"], args.allow_other_tokenizer, say)
        sizes, packed = _describe_weights(model, info, int5_direct)
        say(f"artifact {args.artifact}: {info['model_bytes']:,} bytes, scheme {info['scheme']}, "
            f"{cfg.num_layers} layers x {cfg.model_dim}; weights on {ctx.device}: {sizes['total']:,} bytes{packed}")
        say(f"eval settings: seq_len {cfg.eval_seq_len}, stride {cfg.eval_stride}, {cfg.eval_batch_seqs} windows per "
            f"batch, {f'{cfg.val_max_tokens:,}' if cfg.val_max_tokens else 'all'} validation tokens"
            + (" (as the artifact records; env/flags override)" if taken else " (the defaults, env, flags)"))
        say(f"data {cfg.data_path}, tokenizer {cfg.tokenizer_path}"
            + (" (sha256 as recorded)" if sha256 and sha256 == info["evaluation"].get("tokenizer_sha256") else ""))
        model.choose_kernels(cfg.eval_batch_seqs, cfg.eval_seq_len, training=False)  # before a compile traces it
        for line in kernel_choices():
            say(f"measured: {line}")
        logits_fn = model.forward_logits
        if cfg.compile_model and ctx.on_cuda:
            logits_fn = torch.compile(logits_fn, dynamic=False)
        code_bytes = code_sizes()["raw"]
        results = {"artifact": str(args.artifact), "scheme": info["scheme"], "model_bytes": info["model_bytes"],
                   "code_bytes": code_bytes, "total_bytes": info["model_bytes"] + code_bytes,
                   "world_size": ctx.world_size, "device": str(ctx.device), "int5_direct": int5_direct,
                   "weight_bytes": sizes, "from_artifact": taken, "tokenizer_sha256": sha256,
                   **{name: getattr(cfg, name) for name in EVAL_SETTINGS}}
        results.update(_evaluate_modes(args.mode, logits_fn, cfg, ctx))
        for line in eval_summary(results, BUDGET_BYTES):
            say(line)
        if args.json and ctx.master:
            from recycore.files import atomic_write_text

            atomic_write_text(args.json, json.dumps(results, indent=2))
        return results
    finally:
        ctx.stop()


def _evaluate_modes(mode: str, logits_fn, cfg: Config, ctx) -> dict:
    import torch

    from recycore.data import load_validation_tokens
    from recycore.evaluate import (batch_shapes, build_byte_tables, evaluate_sliding, evaluate_standard,
                                   load_tokenizer, warm_up)

    tables = build_byte_tables(load_tokenizer(cfg.tokenizer_path, cfg.vocab_size), cfg.vocab_size)
    val_tokens = load_validation_tokens(cfg.data_path, cfg.eval_seq_len, cfg.val_max_tokens)
    common = dict(device=ctx.device, rank=ctx.rank, world_size=ctx.world_size, progress=True,
                  graphs=cfg.cuda_graphs and ctx.on_cuda)
    runs = {
        "standard": lambda: evaluate_standard(logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_batch_seqs,
                                              **common),
        "sliding": lambda: evaluate_sliding(logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_stride,
                                            cfg.eval_batch_seqs, **common),
    }
    runs = {name: evaluate for name, evaluate in runs.items() if mode in ("both", name)}
    results = {"val_tokens": val_tokens.numel() - 1}
    if ctx.on_cuda:  # compile every batch shape first: the timings below are of evaluation only
        start = time.perf_counter()
        warm_up(logits_fn, batch_shapes(val_tokens.numel(), cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs,
                                        tuple(runs), ctx.rank, ctx.world_size), ctx.device)
        results["warmup_seconds"] = time.perf_counter() - start
    for name, evaluate in runs.items():
        start = time.perf_counter()
        val_loss, val_bpb = evaluate()
        if ctx.on_cuda:
            torch.cuda.synchronize(ctx.device)
        results[name] = {"val_loss": val_loss, "val_bpb": val_bpb, "eval_seconds": time.perf_counter() - start}
    return results


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------
def add_bench_arguments(parser) -> None:
    from recycore.bench import PATHS, PROFILE_PATHS, SUITE_PATHS

    parser.add_argument("--profile", action="store_true",
                        help="print the GPU time of one micro-step and one optimiser step by kernel family, for "
                        "each path, instead of running the suite (default: the suite)")
    parser.add_argument("--paths", default=None,
                        help=f"comma-separated micro-step paths (of {', '.join(PATHS)}); default: "
                             f"{SUITE_PATHS} for the suite, {PROFILE_PATHS} for --profile")
    parser.add_argument("--autotune-archive", default=None, metavar="TGZ",
                        help="inductor autotuning decisions (.tgz) to seed the cache with before compiling; "
                             "'none' for none (default: RECYCORE_AUTOTUNE_ARCHIVE, else the committed H200 one)")
    parser.add_argument("--batch-seqs", type=integer, default=48,
                        help="sequences per micro-step (default 48, the seed's)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="where the results go as JSON (default: benchmarks/results/latest.json for the "
                        "suite; none for --profile)")
    parser.add_argument("-k", dest="select", default=None, metavar="EXPRESSION",
                        help="pytest -k expression to pick benchmarks (default: all)")
    add_config_flags(parser, ("model", "execution"), {"model": "model (the micro-step's shapes)"})


def run_bench(args) -> None:
    import subprocess

    import torch

    from recycore.bench import PATHS, PROFILE_PATHS, SUITE_PATHS, format_profile, profile, seed_inductor_cache
    from recycore.console import progress

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
        # each path compiles first (minutes with max-autotune): the progress line's ETA covers that
        results = [profile(path, cfg, args.batch_seqs) for path in progress(paths.split(","), "profile", unit="paths")]
        for result in results:
            print(format_profile(result))
        if args.json:
            from recycore.files import atomic_write_text

            atomic_write_text(args.json, json.dumps(results, indent=1, default=str))
        return
    json_path = args.json or "benchmarks/results/latest.json"
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    suite = Path(__file__).resolve().parent.parent / "benchmarks"
    command = [sys.executable, "-m", "pytest", str(suite), "-q", f"--benchmark-json={json_path}"]
    if args.select:
        command += ["-k", args.select]
    print("+", " ".join(command), flush=True)
    status = subprocess.call(command, env={**os.environ, "RECYCORE_BENCH_PATHS": paths})
    if status:
        sys.exit(status)
    subprocess.check_call([sys.executable, str(suite / "report.py"), json_path])


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
COMMANDS = {  # name: (arguments, runner, description, usage after the name)
    "data": (add_data_arguments, run_data, "prepare a dataset (`data demo`: the demo corpus)", "demo [--root DIR]"),
    "demo": (add_demo_arguments, run_demo, "prepare the demo data and train a small model on it (CPU, minutes)",
             "[options]"),
    "train": (add_train_arguments, run_train,
              "train (torchrun --nproc_per_node=N -m recycore train for several GPUs)", "[options]"),
    "export": (add_export_arguments, run_export, "write the int5 artifact of a checkpoint",
               "CHECKPOINT [-o ARTIFACT] [options]"),
    "eval": (add_eval_arguments, run_eval, "evaluate an int5 artifact (val_bpb, standard and sliding window), "
             "by default as its training run did", "ARTIFACT [options]"),
    "bench": (add_bench_arguments, run_bench, "run the GPU benchmark suite and write the results table", "[options]"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recycore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (add_arguments, _, help_text, usage) in COMMANDS.items():
        # a short usage line: argparse's own lists ~80 flags before any error message
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, usage=f"recycore {name} {usage}")
        if name == chosen:  # only the chosen command's arguments (and their imports)
            add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    run = COMMANDS[args.command][1]
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Bad input gets one clear line, not a traceback.
        if os.environ.get("RECYCORE_DEBUG"):
            raise
        print(f"recycore {args.command}: error: {exc} (RECYCORE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
