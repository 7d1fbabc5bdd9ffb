"""recycore: data, training, benchmarks and int5 evaluation of the 12L RecycledCore model.

Each command lives in its own module, imported only when it runs, as
(module, add-arguments function, run function)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "data": ("recycore.demo", "add_data_arguments", "run_data", "prepare a dataset (`data demo`: the embedded demo corpus)"),
    "demo": ("recycore.demo", "add_demo_arguments", "run_demo", "prepare the demo data and train a small model on it (CPU)"),
    "train": ("recycore.train", "add_arguments", "run", "train (torchrun --nproc_per_node=N -m recycore train for several GPUs)"),
    "export": ("recycore.artifact", "add_export_arguments", "run_export", "write the int5 artifact of a checkpoint"),
    "eval": ("recycore.artifact", "add_eval_arguments", "run_eval", "evaluate an int5 artifact (val_bpb, standard and sliding window)"),
    "bench": ("recycore.bench", "add_arguments", "run", "run the GPU benchmark suite and write the results table"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recycore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, add_args, _, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module of the command being run
            getattr(importlib.import_module(module), add_args)(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module, _, run, _ = COMMANDS[args.command]
    try:
        getattr(importlib.import_module(module), run)(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Bad input gets one clear line, not a traceback.
        if os.environ.get("RECYCORE_DEBUG"):
            raise
        print(f"recycore {args.command}: error: {exc} (RECYCORE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
