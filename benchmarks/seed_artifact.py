"""An int5 artifact of the seed config's initial weights, with no training: what `recycore eval` times
(int5-direct against the dequantised model) depends only on the shapes, so a device call can measure
eval throughput in seconds instead of training a model first.

    python benchmarks/seed_artifact.py OUT.int5.ptz --data-path DIR --tokenizer-path TOK.model [--preset ci]

The artifact records the data and tokenizer, so `recycore eval OUT.int5.ptz` evaluates as a run would.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recycore.artifact import evaluation_record, export_artifact
from recycore.config import PRESETS, Config
from recycore.model import GPT


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the artifact to write")
    parser.add_argument("--data-path", required=True, help="the dataset folder the artifact records")
    parser.add_argument("--tokenizer-path", required=True, help="the tokenizer the artifact records")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a smaller config (default: the seed's)")
    parser.add_argument("--seed", type=int, default=0, help="the initial weights' seed (default 0)")
    args = parser.parse_args(argv)
    cfg = Config(**{**(PRESETS[args.preset] if args.preset else {}), "data_path": args.data_path,
                    "tokenizer_path": args.tokenizer_path})
    torch.manual_seed(args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sizes = export_artifact(GPT(cfg).state_dict(), cfg, args.out, allow_over_budget=True,
                            evaluation=evaluation_record(cfg))
    print(f"{args.out}: {sizes['total_bytes']:,} bytes (model {sizes['model_bytes']:,}), initial weights of "
          f"{'the ' + args.preset + ' preset' if args.preset else 'the seed config'}, "
          f"{time.perf_counter() - start:.1f} s")
    return sizes


if __name__ == "__main__":
    main()
