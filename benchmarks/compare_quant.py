"""Seed vs rowmse quantiser on one trained model: round-trip val_bpb and artifact bytes.

    python benchmarks/compare_quant.py                       # trains the demo preset on CPU first
    python benchmarks/compare_quant.py --checkpoint CKPT     # or uses a training checkpoint
    python benchmarks/compare_quant.py --set iterations=150 --set model_dim=320   # demo preset overrides

Both schemes quantise the same weights (the seed's averaging rule: SWA if it has more
than one snapshot, else EMA). Per scheme: artifact bytes (LZMA 9), standard and
sliding-window val_bpb of the dequantised model, and per tensor kind the fraction of
rows that round to all zeros and the relative squared error ||w_q - w||^2 / ||w||^2.
Results go to stdout (markdown) and --json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from recycore import artifact, quant
from recycore.config import MODEL_FIELDS, Config
from recycore.data import load_validation_tokens
from recycore.demo import ensure_demo_data
from recycore.evaluate import build_byte_tables, evaluate_sliding, evaluate_standard, load_tokenizer
from recycore.model import GPT


def tensor_kind(name: str) -> str:
    """blocks.3.mlp.fc.weight -> mlp.fc; tok_emb.weight -> tok_emb."""
    return re.sub(r"^blocks\.\d+\.", "", name).removesuffix(".weight")


def train_model(args, data_path, tokenizer_path, work: Path) -> Path:
    from recycore.train import PRESETS, train

    env = {key.upper(): value for key, value in (item.split("=", 1) for item in args.set)}
    cfg = Config.from_args(argparse.Namespace(), environ=env, **{
        **PRESETS["demo"], "data_path": str(data_path), "tokenizer_path": str(tokenizer_path),
        "run_id": "quant_compare"})
    results = train(cfg, checkpoint_dir=work / "checkpoints", log_dir=work / "logs")
    return Path(results["checkpoint"])


def evaluate(model_sd, cfg, val_tokens, tables) -> dict:
    model = GPT(cfg)
    model.load_state_dict(model_sd)
    model.eval()
    out = {}
    for name, run in (("standard", lambda: evaluate_standard(model.forward_logits, val_tokens, tables,
                                                              cfg.eval_seq_len, cfg.eval_batch_seqs, "cpu")),
                      ("sliding", lambda: evaluate_sliding(model.forward_logits, val_tokens, tables, cfg.eval_seq_len,
                                                           cfg.eval_stride, cfg.eval_batch_seqs, "cpu"))):
        start = time.perf_counter()
        loss, bpb = run()
        out[name] = {"val_loss": loss, "val_bpb": bpb, "seconds": time.perf_counter() - start}
    return out


def tensor_stats(flat: dict, deq: dict, formats: dict) -> dict:
    """Per tensor kind: quantised rows that became all zero, relative squared error, row max |w|."""
    acc = defaultdict(lambda: {"rows": 0, "zero_rows": 0, "err": 0.0, "norm": 0.0, "row_amax": []})
    for name, fmt in formats.items():
        if isinstance(fmt, str):
            continue
        w, q = flat[name].float(), deq[name].float()
        a = acc[f"{tensor_kind(name)} ({fmt['type']})"]
        a["rows"] += w.shape[0]
        a["zero_rows"] += int(((q == 0).all(dim=1) & (w != 0).any(dim=1)).sum())
        a["err"] += float((q - w).pow(2).sum())
        a["norm"] += float(w.pow(2).sum())
        a["row_amax"].append(w.abs().amax(dim=1))
    return {kind: {"rows": a["rows"], "zero_row_frac": a["zero_rows"] / a["rows"],
                   "rel_sq_err": a["err"] / max(a["norm"], 1e-30),
                   "median_row_max": float(torch.cat(a["row_amax"]).median())}
            for kind, a in sorted(acc.items())}


def int5_as_int8_bytes(state_dict, cfg, scheme: str) -> int:
    """Artifact bytes with the int5 values stored one per byte (the seed's int8 format,
    same dequantised tensors): what the 5-bit packing costs LZMA."""
    return len(artifact.serialize_artifact(state_dict, cfg, scheme, int5_storage="int8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint (default: train the demo preset)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the demo preset for training (repeatable)")
    parser.add_argument("--work-dir", default=None, help="where training writes (default: a temporary folder)")
    parser.add_argument("--schemes", default=",".join(quant.SCHEMES), help="comma-separated (rowfloor:F too)")
    parser.add_argument("--json", default="benchmarks/results/quant_compare.json")
    args = parser.parse_args()

    data_path, tokenizer_path = ensure_demo_data()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="quant_compare_"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else train_model(args, data_path, tokenizer_path, work)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state_dict, weights = artifact.select_weights(ckpt, "auto")
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    cfg = Config(**stored).replace(data_path=str(data_path), tokenizer_path=str(tokenizer_path))

    tables = build_byte_tables(load_tokenizer(cfg.tokenizer_path, cfg.vocab_size), cfg.vocab_size)
    val_tokens = load_validation_tokens(cfg.data_path, cfg.eval_seq_len, cfg.val_max_tokens)
    flat = quant.unbank_state_dict(state_dict, cfg.num_layers)
    report = {"checkpoint": str(checkpoint), "weights": weights, "steps": ckpt.get("step"),
              "model": {k: getattr(cfg, k) for k in MODEL_FIELDS}, "val_tokens": val_tokens.numel() - 1,
              "eval_seq_len": cfg.eval_seq_len, "eval_stride": cfg.eval_stride,
              "torch": torch.__version__, "prequant": evaluate(state_dict, cfg, val_tokens, tables), "schemes": {}}
    print(f"prequant: {json.dumps(report['prequant'])}", file=sys.stderr, flush=True)
    for scheme in args.schemes.split(","):
        path = work / f"{scheme.replace(':', '_')}.int5.ptz"
        start = time.perf_counter()
        sizes = artifact.export_artifact(state_dict, cfg, path, scheme=scheme)
        export_s = time.perf_counter() - start
        deq_sd, _, info = artifact.load_artifact(path)
        deq_flat = quant.unbank_state_dict(deq_sd, cfg.num_layers)
        report["schemes"][scheme] = {
            "model_bytes": sizes["model_bytes"], "export_seconds": export_s,
            "model_bytes_int5_as_int8": int5_as_int8_bytes(state_dict, cfg, scheme),
            "eval": evaluate(deq_sd, cfg, val_tokens, tables),
            "tensors": tensor_stats(flat, deq_flat, info["formats"]),
        }
        print(f"{scheme}: {json.dumps(report['schemes'][scheme]['eval'])}", file=sys.stderr, flush=True)
    report["code_bytes"] = artifact.code_sizes()

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print_markdown(report)


def print_markdown(report: dict) -> None:
    pre = report["prequant"]
    print(f"| weights | artifact bytes | bytes, int5 stored as int8 | val_bpb standard | "
          f"val_bpb sliding (stride {report['eval_stride']}) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| pre-quantisation ({report['weights']}) | - | - | {pre['standard']['val_bpb']:.4f} | "
          f"{pre['sliding']['val_bpb']:.4f} |")
    for scheme, r in report["schemes"].items():
        ev = r["eval"]
        unpacked = r.get("model_bytes_int5_as_int8")
        print(f"| int5 `{scheme}` | {r['model_bytes']:,} | {unpacked or 0:,} | {ev['standard']['val_bpb']:.4f} | "
              f"{ev['sliding']['val_bpb']:.4f} |")
    print()
    schemes = list(report["schemes"])
    print("| tensor kind | rows | median row max |w| | " +
          " | ".join(f"{s}: all-zero rows | {s}: rel. sq. error" for s in schemes) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(schemes))
    for kind, first in report["schemes"][schemes[0]]["tensors"].items():
        cells = []
        for s in schemes:
            t = report["schemes"][s]["tensors"][kind]
            cells += [f"{t['zero_row_frac']:.1%}", f"{t['rel_sq_err']:.2e}"]
        print(f"| {kind} | {first['rows']} | {first['median_row_max']:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
