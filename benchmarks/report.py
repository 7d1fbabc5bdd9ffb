"""The results history (benchmarks/results.jsonl): import runs into it, render its tables and charts.

    python benchmarks/report.py [--benchmark PATTERN] [--since DATE] [--latest]   # print the rows as a table
    python benchmarks/report.py --readme README.md --readme benchmarks/README.md  # rewrite the generated tables
    python benchmarks/report.py --plots                                          # charts into benchmarks/plots/
    python benchmarks/report.py --import-pytest-benchmark OUT/*.json --commit SHA --source CMD [--out NEW.jsonl]
    python benchmarks/report.py --append NEW.jsonl                               # merge new rows into the history
    python benchmarks/report.py --check                                          # every row has the required fields
    python benchmarks/report.py RUN.json [more.json ...] [--name STEM] [--out DIR]  # one run's table + charts

results.jsonl is append-only, one JSON object per measured statistic (REQUIRED fields below, plus
`unit`, `baseline` (true on the row the others in its run are compared with), `path` (the
normalised micro-step path: historical "triton" rows are `fused`), `step` (a point of a curve),
`calls` (K3 rows: figures are per call of a CUDA graph of that many calls) and `note`). Rows of one
`run` (one process or one device call) are the only ones ever compared with each other: a ratio in
a table comes from two rows of the same run, never from two runs. "Latest" means last in the file.

--import-pytest-benchmark also takes the JSON of `recycore eval --json` and the metrics JSONL of
`recycore train` (detected by content). The last form (positional JSON, no flags) is the quick view
of one pytest-benchmark run (`recycore bench` writes it beside the JSON); it is not the history.
"""
import argparse
import fnmatch
import json
import math
import os
import re
import statistics as stats
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
PLOTS = HERE / "plots"
REQUIRED = ("date", "gpu", "torch", "triton", "commit", "run", "benchmark", "shape", "variant", "statistic",
            "value", "source")
FIELD_ORDER = REQUIRED[:6] + ("benchmark", "shape", "variant", "path", "statistic", "value", "unit", "baseline",
                              "step", "calls", "note", "source")
# historical micro-step paths under their current names (the fused-kernel path was called "triton")
PATH_NAMES = {"triton": "fused"}
BEGIN = re.compile(r"<!-- results:begin(?: (\w+))? -->")
END = "<!-- results:end -->"


# --- the history: read, check, write ---------------------------------------------------------
def load(path=RESULTS):
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not JSON ({exc})")
    return rows


def problems(row):
    """What is wrong with one row (empty list: nothing)."""
    found = [f"missing {key}" for key in REQUIRED if row.get(key) in (None, "")]
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(row.get("date", ""))):
        found.append(f"date {row.get('date')!r} is not YYYY-MM-DD")
    value = row.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        found.append(f"value {value!r} is not a finite number")
    if "baseline" in row and not isinstance(row["baseline"], bool):
        found.append("baseline is not a bool")
    return found


def ordered(row):
    return {key: row[key] for key in FIELD_ORDER if key in row} | {k: v for k, v in row.items() if k not in FIELD_ORDER}


def dumps(row):
    return json.dumps(ordered(row), ensure_ascii=False)


def write_atomic(path, text):
    """Write text to path through a temporary file in the same folder (flush, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_rows(path, rows):
    """Append rows (checked) to a JSONL file, skipping rows it already holds; returns how many were added."""
    for row in rows:
        if problems(row):
            raise SystemExit(f"refusing a row with {', '.join(problems(row))}: {dumps(row)}")
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    seen = {dumps(row) for row in load(path)}
    new = []
    for row in rows:
        line = dumps(row)
        if line not in seen:
            seen.add(line)
            new.append(line)
    if new:
        write_atomic(path, old + ("\n" if old and not old.endswith("\n") else "") + "\n".join(new) + "\n")
    return len(new)


# --- units and direction ---------------------------------------------------------------------
def unit_of(statistic):
    if statistic.endswith("_per_s"):  # tokens_per_s -> tokens/s
        return statistic[:-len("_per_s")].rsplit("_", 1)[-1] + "/s"
    if statistic == "us_per_call":
        return "us"
    if statistic.endswith("_pct"):
        return "%"
    for pattern, unit in (("*_ms", "ms"), ("*_ms:*", "ms"), ("kernel_ms*", "ms"), ("ms_per_*", "ms"),
                          ("*_s", "s"), ("*_gib", "GiB"), ("tflops", "TFLOP/s"), ("tbps", "TB/s"),
                          ("*bytes*", "B"),
                          ("*bpb*", "bpb"), ("*loss*", "nats")):
        if fnmatch.fnmatch(statistic, pattern):
            return unit
    return None


def higher_is_better(statistic):
    return statistic in ("tflops", "tbps", "steps") or statistic.endswith("per_s")


def fmt(value, statistic):
    unit = unit_of(statistic)
    if unit == "ms":
        if value < 0.1:
            return f"{value * 1e3:.2f} us"
        return f"{value:.3f} ms" if value < 10 else f"{value:.2f} ms" if value < 1000 else f"{value:,.0f} ms"
    if unit == "us":
        return f"{value:.2f} us"
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "B":
        return f"{value / 1e6:.1f} MB"
    if unit == "GiB":
        return f"{value:.1f} GiB"
    if unit == "TFLOP/s":
        return f"{value:.0f} TFLOP/s" if value >= 10 else f"{value:.2g} TFLOP/s"
    if unit == "TB/s":
        return f"{value:.2f} TB/s"
    if unit and unit.endswith("/s"):
        return f"{value:,.0f} {unit}"
    if unit == "bpb":
        return f"{value:.8f}"
    if unit == "s":
        return f"{value:.0f} s"
    if unit == "nats":
        return f"{value:.4f}"
    return f"{value:g}"


# --- import ----------------------------------------------------------------------------------
STAT_KEYS = {"ms": "median_ms", "ms_p20": "p20_ms", "ms_p80": "p80_ms", "tflops": "tflops", "tbps": "tbps",
             "tokens_per_s": "tokens_per_s", "scored_tokens_per_s": "scored_tokens_per_s",
             "windows_per_s": "windows_per_s", "peak_gib": "peak_gib", "compile_s": "compile_s",
             "total_ms": "profile_total_ms", "weight_bytes": "weight_bytes"}
PER_CALL = ("ms", "ms_p20", "ms_p80")
K1_SHAPE = "M=98304 d=512 h=1536"
K2_SHAPE = "B=48 T=2048 H=8 Hkv=4 D=64"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def normalised_path(name):
    """A micro-step path under its current name: "triton (K1 tiled)" -> "fused (K1 tiled)"."""
    head, sep, rest = name.partition(" ")
    return PATH_NAMES.get(head, head) + sep + rest


def benchmark_and_shape(group, info):
    """The benchmark and shape of a pytest-benchmark group (explicit in newer runs' extra_info)."""
    if "benchmark" in info:
        return info["benchmark"], str(info.get("shape", ""))
    if group.startswith("model micro-step"):
        return "micro-step", f"{info.get('batch_seqs', 48)}x{info.get('seq_len', 2048)}"
    match = re.fullmatch(r"K3 int5 (\d+x\d+) M=(\d+)", group)
    if match:
        return "K3 int5 matmul", f"{match[1]} M={match[2]}"
    if group.startswith("K1 MLP"):
        return group, K1_SHAPE
    if group.startswith("K2 attention"):
        return group, K2_SHAPE
    match = re.fullmatch(r"(.*?) \((.*)\)", group)
    if match:
        return match[1], match[2]
    return group, ""


def base_row(meta, **fields):
    row = {key: meta[key] for key in ("date", "gpu", "torch", "triton", "commit", "run") if key in meta}
    row.update({key: value for key, value in fields.items() if value is not None})
    row.setdefault("source", meta.get("source", "unknown"))
    if row.get("statistic") and "unit" not in row and unit_of(row["statistic"]):
        row["unit"] = unit_of(row["statistic"])
    return row


def rows_from_pytest_benchmark(data, meta, baseline_labels=()):
    """Rows of one pytest-benchmark JSON (the suite's figures live in each benchmark's extra_info).
    meta: date, run, commit, source, and gpu/torch/triton for runs whose extra_info lacks them."""
    when = data.get("datetime", "")
    commit = data.get("commit_info", {}).get("id")
    meta = {"date": when[:10] or today(), "run": when[:19] or "unknown",
            "commit": commit[:7] if commit and commit != "unversioned" else "unknown", **meta}
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "ms" not in info:
            continue
        benchmark, shape = benchmark_and_shape(info.get("group", bench["name"]), info)
        label = info.get("label", bench["name"])
        calls = info.get("calls") if (info.get("calls") or 1) > 1 else None
        versions = {key: info.get(key, meta.get(key, "unknown")) for key in ("gpu", "torch", "triton")}
        common = dict(**versions, benchmark=benchmark, shape=shape, variant=label, calls=calls,
                      baseline=bool(info.get("baseline", label in baseline_labels)))
        if benchmark == "micro-step":
            common["path"] = normalised_path(label)
        numbers = [key for key in STAT_KEYS
                   if isinstance(info.get(key), (int, float)) and not isinstance(info.get(key), bool)]
        figures = [(STAT_KEYS[key], info[key] / (calls or 1) if key in PER_CALL else info[key]) for key in numbers]
        if isinstance(info.get("weight_bytes"), dict):
            figures.append(("weight_bytes", info["weight_bytes"]["total"]))
        figures += [(f"profile_{slug(family)}_ms", ms) for family, ms in (info.get("families") or {}).items()]
        figures += [(f"kernel_ms:{name[:120]}", ms) for name, ms in (info.get("top_kernels") or [])]
        rows += [base_row(meta, **common, statistic=statistic, value=value) for statistic, value in figures]
    return rows


def rows_from_eval(data, meta, benchmark=None, shape=None, variant=None):
    """Rows of `recycore eval --json`: val_bpb (standard, sliding), eval seconds, weight bytes."""
    variant = variant or ("int5-direct" if data.get("int5_direct") else "dequantised")
    benchmark = benchmark or "eval"
    shape = shape or (f"{data.get('scheme', '?')} artifact {data.get('model_bytes', '?')} B, "
                      f"{data.get('val_tokens', '?')} val tokens")
    rows = []
    for mode in ("standard", "sliding"):
        if mode in data:
            rows.append(base_row(meta, benchmark=benchmark, shape=shape, variant=variant,
                                 statistic=f"val_bpb_{mode}", value=data[mode]["val_bpb"]))
            if "eval_seconds" in data[mode]:
                rows.append(base_row(meta, benchmark=benchmark, shape=shape, variant=variant,
                                     statistic=f"eval_s_{mode}", value=data[mode]["eval_seconds"]))
    if "warmup_seconds" in data:  # compiling every batch shape, before the timed evaluations
        rows.append(base_row(meta, benchmark=benchmark, shape=shape, variant=variant, statistic="eval_s_warmup",
                             value=data["warmup_seconds"]))
    weights = data.get("weight_bytes") or {}
    if "total" in weights:
        rows.append(base_row(meta, benchmark=benchmark, shape=shape, variant=variant, statistic="weight_bytes",
                             value=weights["total"]))
    if weights.get("int5_values"):  # what the same model would hold with its packed matrices in bf16
        rows.append(base_row(meta, benchmark=benchmark, shape=shape, variant=variant,
                             statistic="weight_bytes_if_bf16", value=weights["dequantised_bf16"]))
    return rows


def training_figures(records):
    """Speed and quality figures of one `recycore train` metrics log (list of its JSON records)."""
    steps = [r for r in records if "event" not in r and "train_time_ms" in r]
    final = next((r for r in records if r.get("event") == "final"), {})
    out = {}
    if steps:
        out["steps"] = steps[-1]["step"]
        out["ms_per_step_mean"] = steps[-1]["train_time_ms"] / steps[-1]["step"]
        if len(steps) >= 2:
            a, b = steps[-2], steps[-1]
            out["ms_per_step_last"] = (b["train_time_ms"] - a["train_time_ms"]) / (b["step"] - a["step"])
        intervals = [(b["train_time_ms"] - a["train_time_ms"]) / (b["step"] - a["step"])
                     for a, b in zip(steps, steps[1:]) if b["step"] - a["step"] >= 10]
        if intervals:  # logged every 10 steps after the first 10: the spread of 10-step stretches
            out["ms_per_step_min10"] = min(intervals)
            out["ms_per_step_median10"] = stats.median(intervals)
        out["train_loss"] = steps[-1]["train_loss"]
    for key in ("peak_allocated_gib", "peak_reserved_gib"):
        if key in final:
            out[key.replace("_allocated", "")] = final[key]
    val = [r for r in records if r.get("event") == "val"]
    if val:
        out["val_bpb"] = val[-1]["val_bpb"]
    prequant = next((r for r in records if r.get("event") == "prequant"), None)
    if prequant:
        out["prequant_val_bpb"] = prequant["val_bpb"]
    for key in ("int5_val_bpb", "int5_sliding_val_bpb", "model_bytes", "code_bytes", "total_bytes"):
        if key in final:
            out[key] = final[key]
    return out, [(r["step"], r["train_loss"]) for r in steps]


def rows_from_train(records, meta, benchmark=None, shape=None, variant=None, curve=True):
    """Rows of one `recycore train` metrics log: speed, memory, losses and val_bpb, and the loss curve
    (rows with `step`). variant: the kernels setting (a historical "triton" gets path "fused")."""
    figures, curve_points = training_figures(records)
    final = next((r for r in records if r.get("event") == "final"), {})
    variant = variant or final.get("run_id") or "run"
    common = dict(benchmark=benchmark or "training", shape=shape or "seed config", variant=variant)
    if normalised_path(variant) != variant:
        common["path"] = normalised_path(variant)
    rows = [base_row(meta, **common, statistic=statistic, value=value) for statistic, value in figures.items()]
    if curve:
        rows += [base_row(meta, **common, statistic="train_loss", value=loss, step=step) for step, loss in curve_points]
    return rows


def today():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def import_file(path, meta, baseline_labels=(), variant=None, shape=None, benchmark=None):
    """Rows of one file: pytest-benchmark JSON, `recycore eval --json` output, a training metrics JSONL,
    or rows lacking only the run's metadata (benchmarks/host_cost.py).
    meta holds what the caller knows (commit, source, run, date, gpu, torch, triton); a pytest-benchmark
    JSON supplies its own date, start time (the run) and versions, the other files fall back to today
    and the file's name."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "benchmarks" in data:
        return rows_from_pytest_benchmark(data, meta, baseline_labels)
    meta = {"date": today(), "run": Path(path).stem, "commit": "unknown", "gpu": "unknown", "torch": "unknown",
            "triton": "unknown", **meta}
    if isinstance(data, dict) and "standard" in data and "int5_direct" in data:
        return rows_from_eval(data, meta, benchmark=benchmark, shape=shape, variant=variant)
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if data is None else [data]
    if records and any("train_loss" in r for r in records):
        return rows_from_train(records, meta, benchmark=benchmark, shape=shape, variant=variant)
    if records and all({"benchmark", "shape", "variant", "statistic", "value"} <= r.keys() for r in records):
        return [{**meta, **r} for r in records]  # rows a script wrote without the run's metadata
    raise SystemExit(f"{path}: neither pytest-benchmark JSON, `recycore eval --json` output, a training log "
                     "nor rows")


# --- selection -------------------------------------------------------------------------------
def key_variant(row):
    return row.get("path", row["variant"])


def select(rows, since=None, benchmark=None, latest=False):
    rows = [r for r in rows if (since is None or r["date"] >= since)
            and (benchmark is None or fnmatch.fnmatch(r["benchmark"], benchmark))]
    if latest:
        newest = {}
        for r in rows:  # file order is time order: the last row of a key wins
            newest[(r["benchmark"], key_variant(r), r["shape"], r["statistic"], r.get("step"))] = r
        rows = list(newest.values())
    return rows


def pair(rows, benchmark, shape, statistic, ours, baseline):
    """The ours and baseline rows of the latest run that has both (None, None if no run has them)."""
    found = {}
    for r in rows:
        if r["benchmark"] == benchmark and r["shape"] == shape and r["statistic"] == statistic and "step" not in r:
            found.setdefault(r["run"], {})[key_variant(r)] = r
    for run in reversed(list(found)):
        if ours in found[run] and (baseline is None or baseline in found[run]):
            return found[run][ours], found[run].get(baseline)
    return None, None


def pair_statistics(rows, benchmark, shape, statistic, base_statistic, variant):
    """Two figures of one variant in the latest run that has both (None, None if no run has them)."""
    for run in reversed(first_seen(r["run"] for r in rows)):
        ours, base = (find(rows, run, benchmark, shape, s, variant) for s in (statistic, base_statistic))
        if ours is not None and base is not None:
            return ours, base
    return None, None


def ratio(ours, base, statistic):
    """How many times better ours is than the baseline (time: base/ours; throughput: ours/base)."""
    if not ours or not base:
        return None
    return ours / base if higher_is_better(statistic) else base / ours


def first_seen(values):
    return list(dict.fromkeys(values))


# --- tables ----------------------------------------------------------------------------------
# The headline table: what each line compares; every figure and ratio comes from results.jsonl.
# shape is a regular expression (one line per matching shape); target: the least ratio that meets
# the goal (or, with compare="difference", the largest absolute difference).
HEADLINES = [
    dict(what="whole micro-step fwd+bwd, fused kernels + CUDA graphs vs torch.compile default", benchmark="micro-step",
         shape=r"(12|24|48)x2048", statistic="median_ms", ours="fused-graphs", baseline="reference-compiled",
         extra=("peak_gib",), target=1.05),
    dict(what="training at 196,608 tokens/step (8 x 12 x 2048), 1 GPU, 300 steps: ms/step, default kernels "
         "(fused + CUDA graphs) vs the reference compiled and graphed (target <= 240)",
         benchmark="training (196,608 tokens/step)", shape=".*300 steps", statistic="ms_per_step_mean", ours="auto",
         baseline="reference", extra=("peak_gib",)),
    dict(what="the same wall clock (240 s) at 196,608 tokens/step, 1 GPU: steps made, default kernels vs the reference",
         benchmark="training (196,608 tokens/step)", shape=".*240 s cap", statistic="steps", ours="auto",
         baseline="reference"),
    dict(what="the same wall clock (240 s): val_bpb of the averaged weights at the end (lower is better), default "
         "kernels minus the reference", benchmark="training (196,608 tokens/step)", shape=".*240 s cap",
         statistic="prequant_val_bpb", ours="auto", baseline="reference", compare="difference"),
    dict(what="training at the seed's 786,432 tokens/step (8 x 48 x 2048), 1 GPU, default kernels: ms/step "
         "(target: not above 800)", benchmark="training (786,432 tokens/step)", shape=".*",
         statistic="ms_per_step_mean", ours="auto"),
    dict(what="graphed vs uncaptured training, mean relative train-loss difference (%), 200 steps",
         benchmark="training (196,608 tokens/step)", shape=".*", statistic="mean_rel_loss_diff_pct",
         ours="graphed vs uncaptured"),
    dict(what="fused vs reference model training, mean relative train-loss difference (%), 200 steps",
         benchmark="training (196,608 tokens/step)", shape=".*", statistic="mean_rel_loss_diff_pct",
         ours="fused vs reference (both graphed)"),
    dict(what="whole micro-step fwd+bwd, both as CUDA graphs: fused kernels vs torch.compile default",
         benchmark="micro-step", shape=r"(12|24|48)x2048", statistic="median_ms", ours="fused-graphs",
         baseline="reference-compiled-graphs", extra=("peak_gib",)),
    dict(what="whole micro-step fwd+bwd vs torch.compile max-autotune (per block)", benchmark="micro-step",
         shape="48x2048", statistic="median_ms", ours="fused", baseline="reference-max-autotune",
         extra=("peak_gib",), target=1.3),
    dict(what="whole micro-step fwd+bwd vs torch.compile default (whole model)", benchmark="micro-step",
         shape="48x2048", statistic="median_ms", ours="fused", baseline="reference-compiled", extra=("peak_gib",)),
    dict(what="optimiser step (Muon NS5 + AdamW + clip, 1 GPU)", benchmark="optimizer step",
         shape="seed model, 1 GPU", statistic="median_ms", ours="muon+adamw", spread=True),
    dict(what="K1 MLP fwd+bwd vs max-autotune", benchmark="K1 MLP fwd+bwd", shape=K1_SHAPE, statistic="median_ms",
         ours="ours", baseline="max_autotune", extra=("tflops",), target=1.25),
    dict(what="K1 MLP fwd vs max-autotune", benchmark="K1 MLP fwd", shape=K1_SHAPE, statistic="median_ms",
         ours="ours", baseline="max_autotune"),
    dict(what="K1 MLP fwd vs the bare cuBLAS GEMM pair", benchmark="K1 MLP fwd", shape=K1_SHAPE,
         statistic="median_ms", ours="ours", baseline="cublas_gemms_only", target=1 / 1.1),
    dict(what="K2 attention + XSA + gate fwd+bwd (cuDNN core + fused epilogue) vs max-autotune",
         benchmark="K2 attention fwd+bwd", shape=K2_SHAPE, statistic="median_ms", ours="ours_sdpa_fused",
         baseline="a_cudnn_compiled_max_autotune", extra=("tflops",), target=1.3),
    dict(what="K2 attention fwd vs max-autotune", benchmark="K2 attention fwd", shape=K2_SHAPE,
         statistic="median_ms", ours="ours_sdpa_fused", baseline="a_cudnn_compiled_max_autotune"),
    dict(what="K3 fused int5 matmul (auto) vs bf16 cuBLAS on the dequantised weight", benchmark="K3 int5 matmul",
         shape=r"\d+x\d+ M=65536", statistic="ms_per_call", ours="auto", baseline="cublas", target=0.9),
    dict(what="K3 fused int5 matmul (auto) per call, CUDA graph, vs bf16 cuBLAS", benchmark="K3 int5 matmul small M",
         shape=r"\d+x\d+ M=16 hot", statistic="us_per_call", ours="auto", baseline="cublas", target=1.0),
    dict(what="K4 fused head (norm + tied linear + soft-cap + CE) fwd+bwd, CUDA graph, vs the compiled reference",
         benchmark="K4 head fwd+bwd", shape=r"N=98304 .*", statistic="graph_ms", ours="ours", baseline="ref_compiled"),
    dict(what="K3 int5 matmul vs bf16 cuBLAS on the dequantised weight (dequant path)", benchmark="K3 int5 matmul",
         shape=r"\d+x\d+ M=65536", statistic="median_ms", ours="ours", baseline="cublas_bf16", target=0.9),
    dict(what="K3 int5 matmul per call (CUDA graph) vs bf16 cuBLAS (old kernel)", benchmark="K3 int5 matmul",
         shape=r"\d+x\d+ M=16", statistic="median_ms", ours="ours", baseline="cublas_bf16", target=2.5),
    dict(what="int5-direct eval, val_bpb (standard) vs dequantised", benchmark="eval",
         shape=".*", statistic="val_bpb_standard", ours="int5-direct", baseline="dequantised",
         compare="difference", target=1e-3, latest_only=True),
    dict(what="int5-direct eval, weights held on the GPU vs dequantised", benchmark="eval", shape=".*",
         statistic="weight_bytes", ours="int5-direct", baseline="dequantised", latest_only=True),
    dict(what="int5-direct eval, weights held on the GPU vs the same model's matrices in bf16", benchmark="eval",
         shape=".*", statistic="weight_bytes", ours="int5-direct", baseline_statistic="weight_bytes_if_bf16",
         target=2.9, latest_only=True),
    dict(what="int5-direct eval batch vs dequantised, both compiled", benchmark="eval batch",
         shape="32x2048, seed model", statistic="median_ms", ours="int5_direct", baseline="dequantised", target=1.0),
    dict(what="training, seed config, 1 GPU, 200 steps: fastest 10-step stretch", benchmark="training",
         shape="seed config, demo data, 1 GPU, 200 steps", statistic="ms_per_step_min10", ours="fused",
         baseline="reference", extra=("ms_per_step_mean",)),
    dict(what="data-parallel training, 2 GPUs vs 1 at the same global batch, step time",
         benchmark="data-parallel training",
         shape=".*", statistic="ms_per_step_last", ours="2 GPUs", baseline="1 GPU", latest_only=True),
]


EXTRA_LABELS = {"ms_per_step_mean": "mean over the run", "tflops": "", "peak_gib": "peak", "peak_allocated_gib": "peak"}
# the order of the full table's groups (others follow in the order they first appear)
BENCH_ORDER = ["micro-step", "optimizer step", "K1 MLP fwd", "K1 MLP fwd+bwd", "K2 attention fwd",
               "K2 attention fwd+bwd", "K3 int5 matmul", "eval batch"]


def matching_shapes(rows, benchmark, pattern):
    return first_seen(r["shape"] for r in rows if r["benchmark"] == benchmark and re.fullmatch(pattern, r["shape"]))


def find(rows, run, benchmark, shape, statistic, variant):
    """The last row of one run with these keys, or None."""
    return next((r for r in reversed(rows) if r["run"] == run and r["benchmark"] == benchmark and r["shape"] == shape
                 and r["statistic"] == statistic and key_variant(r) == variant and "step" not in r), None)


def headline_lines(rows, spec, shown):
    """The table lines of one HEADLINES entry; the rows they show are added to `shown`."""
    statistic = spec["statistic"]
    found = [(shape, *pair(rows, spec["benchmark"], shape, statistic, spec["ours"], spec.get("baseline")))
             for shape in matching_shapes(rows, spec["benchmark"], spec["shape"])]
    found = [(shape, ours, base) for shape, ours, base in found if ours is not None]
    if "baseline_statistic" in spec:  # the baseline: another figure of the same run and variant
        found = [(shape, *pair_statistics(rows, spec["benchmark"], shape, statistic, spec["baseline_statistic"],
                                          spec["ours"])) for shape, _, _ in found]
        found = [item for item in found if item[1] is not None]
    if spec.get("latest_only"):  # the newest comparison only, whatever its shape
        found.sort(key=lambda item: max(rows.index(item[1]), rows.index(item[2]) if item[2] else 0))
        found = found[-1:]
    lines = []
    for shape, ours, base in found:
        shown += [ours] + ([base] if base else [])
        extras = []
        for extra in spec.get("extra", ()):
            got = find(rows, ours["run"], spec["benchmark"], shape, extra, spec["ours"])
            if got is not None:
                label = EXTRA_LABELS.get(extra, extra.replace("_", " "))
                extras.append(f"{fmt(got['value'], extra)} {label}".strip())
        if spec.get("spread"):
            values = [r["value"] for r in rows if r["benchmark"] == spec["benchmark"] and r["shape"] == shape
                      and r["statistic"] == statistic and key_variant(r) == spec["ours"] and "step" not in r]
            if len(values) > 1:
                extras.append(f"{fmt(min(values), statistic)} to {fmt(max(values), statistic)} over {len(values)} runs")
        cell = fmt(ours["value"], statistic) + (f" ({'; '.join(extras)})" if extras else "")
        base_cell = result = target = ""
        if base is not None:
            base_cell = f"{fmt(base['value'], statistic)} ({spec.get('baseline_statistic', key_variant(base))})"
            if spec.get("compare") == "difference":
                value = ours["value"] - base["value"]
                result = f"{value:+.2g}" if value else "0 (identical)"
                if "target" in spec:
                    target = f"<= {spec['target']:g}: {'met' if abs(value) <= spec['target'] else 'missed'}"
            else:
                value = ratio(ours["value"], base["value"], statistic)
                result = f"{value:.2f}x"
                if "target" in spec:
                    target = f">= {spec['target']:.2f}x: {'met' if value >= spec['target'] else 'missed'}"
        what = spec["what"] + (f", {shape}" if spec["shape"] != shape else "")
        lines.append(f"| {what} | {cell} | {base_cell} | {result} | {target} | {ours['date']} | "
                     f"{ours['commit']} | {ours['gpu']} |")
    return lines


def headline_table(rows, specs=HEADLINES):
    lines = ["| what | ours | baseline | ratio | target | date | commit | GPU |",
             "|---|---:|---:|---:|---|---|---|---|"]
    shown = []
    by_gpu = {gpu: [r for r in rows if r["gpu"] == gpu] for gpu in first_seen(r["gpu"] for r in rows)}
    for spec in specs:  # figures of different GPUs are never paired, ranged or replaced by each other
        for gpu_rows in by_gpu.values():
            lines += headline_lines(gpu_rows, spec, shown)
    setups = first_seen((r["gpu"], r["torch"], r["triton"]) for r in shown)
    lines += ["", f"_Generated by `python benchmarks/report.py --readme FILE` from `benchmarks/results.jsonl` "
                  f"({'; '.join(f'{g}, torch {t}, triton {tr}' for g, t, tr in setups) or 'no rows'}). "
                  "Ratio: how many times faster (or smaller) ours is, from two rows of one run._"]
    return "\n".join(lines)


def gpu_tag(row) -> str:
    """The GPU's short name for labels: "H200" of "NVIDIA H200", "H100" of "NVIDIA H100 80GB HBM3"."""
    return row["gpu"].removeprefix("NVIDIA ").split()[0] if row.get("gpu") else "?"


def comparison_runs(rows, primary="median_ms"):
    """Per (benchmark, shape, GPU) with `primary` figures (sweeps and curves aside), the rows of the
    latest run that compares several variants (else the latest run)."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["statistic"] == primary and "step" not in r and "sweep" not in r["benchmark"]:
            groups[(r["benchmark"], r["shape"], r["gpu"])][r["run"]].append(r)
    chosen = {}
    for key, runs in groups.items():
        several = [run for run, members in runs.items() if len({key_variant(m) for m in members}) > 1]
        chosen[key] = runs[several[-1] if several else list(runs)[-1]]
    return chosen


def full_table(rows):
    """Every benchmark's latest comparison: median, TFLOP/s and the ratio to its run's baseline row."""
    lines = ["| benchmark | shape | variant | median | TFLOP/s | vs baseline | date | commit | GPU |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    tflops = {(r["run"], r["benchmark"], r["shape"], key_variant(r)): r["value"]
              for r in rows if r["statistic"] == "tflops"}
    groups = comparison_runs(rows)
    order = sorted(groups, key=lambda key: (BENCH_ORDER.index(key[0]) if key[0] in BENCH_ORDER else len(BENCH_ORDER)))
    for benchmark, shape, gpu in order:
        members = groups[(benchmark, shape, gpu)]
        base = next((m for m in members if m.get("baseline")), None)
        for m in members:
            speed = ratio(m["value"], base["value"], "median_ms") if base else None
            mark = " (baseline)" if m is base else ""
            tf = tflops.get((m["run"], benchmark, shape, key_variant(m)))
            tf_cell = "" if tf is None else fmt(tf, "tflops").split()[0]
            speed_cell = "" if speed is None else f"{speed:.2f}x"
            lines.append(f"| {benchmark} | {shape} | {key_variant(m)}{mark} | {fmt(m['value'], 'median_ms')} | "
                         f"{tf_cell} | {speed_cell} | {m['date']} | {m['commit']} | {gpu_tag(m)} |")
    return "\n".join(lines)


def rows_table(rows):
    lines = ["| date | commit | run | benchmark | shape | variant | statistic | value |",
             "|---|---|---|---|---|---|---|---:|"]
    for r in rows:
        statistic = r["statistic"] + (f" @ step {r['step']}" if "step" in r else "")
        mark = " (baseline)" if r.get("baseline") else ""
        lines.append(f"| {r['date']} | {r['commit']} | {r['run']} | {r['benchmark']} | {r['shape']} | "
                     f"{key_variant(r)}{mark} | {statistic} | {fmt(r['value'], r['statistic'])} |")
    return "\n".join(lines)


def render(kind, rows):
    if kind in (None, "headline"):
        return headline_table(rows)
    if kind == "full":
        return full_table(rows)
    raise SystemExit(f"unknown results section {kind!r} (headline, full)")


def render_sections(text, rows):
    """Replace what lies between each `<!-- results:begin [KIND] -->` and the next `<!-- results:end -->`."""
    out, pos = [], 0
    for match in BEGIN.finditer(text):
        if match.start() < pos:
            raise SystemExit("a results:begin marker sits inside another section")
        end = text.find(END, match.end())
        if end < 0:
            raise SystemExit(f"{match[0]} has no {END}")
        out += [text[pos:match.end()], "\n", render(match[1], rows), "\n"]
        pos = end
    if not out:
        raise SystemExit(f"no <!-- results:begin --> ... {END} markers")
    return "".join(out) + text[pos:]


# --- charts ----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    """Lay the figure out, write it as a PNG at `path`, free it; -> path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _bars(ax, members, title):
    members = sorted(members, key=lambda m: -m["value"])
    base = next((m for m in members if m.get("baseline")), None)
    labels = [key_variant(m) for m in members]
    ax.barh(labels, [m["value"] for m in members], color=["#888" if m is base else "#2a7" for m in members])
    for y, m in enumerate(members):
        speed = ratio(m["value"], base["value"], "median_ms") if base else None
        ax.text(m["value"], y, f" {fmt(m['value'], 'median_ms')}" + (f" ({speed:.2f}x)" if speed else ""),
                va="center", fontsize=8)
    ax.set_title(f"{title}  [{members[0]['date']}, {members[0]['commit']}]", fontsize=9)
    ax.set_xlabel("median ms (lower is better)")
    ax.set_xlim(0, max(m["value"] for m in members) * 1.35)


def plot_groups(rows, names, path):
    runs = comparison_runs(rows)
    panels = [(b, s, m) for (b, s, _), m in runs.items() if b in names]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(0.8 + 0.4 * len(m) for _, _, m in panels)), squeeze=False)
    for ax, (benchmark, shape, members) in zip(axes[:, 0], panels):
        _bars(ax, members, f"{benchmark}, {shape}, {gpu_tag(members[0])}")
    return _save(fig, path)


def plot_k3(rows, path):
    """Speed of ours against cuBLAS by number of rows M, one line per weight shape (latest runs)."""
    points = defaultdict(dict)
    for (benchmark, shape, _), members in comparison_runs(rows).items():
        if benchmark != "K3 int5 matmul":
            continue
        by = {key_variant(m): m for m in members}
        if "ours" in by and "cublas_bf16" in by:
            weight, m = shape.split(" M=")
            points[f"{weight}, {gpu_tag(members[0])}"][int(m)] = ratio(by["ours"]["value"], by["cublas_bf16"]["value"], "median_ms")
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for weight, line in points.items():
        xs = sorted(line)
        ax.plot(xs, [line[x] for x in xs], marker="o", label=f"weight {weight}")
    ax.axhline(1.0, color="#888", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows M (M <= 2048: per call in a CUDA graph)")
    ax.set_ylabel("speed vs bf16 cuBLAS (x)")
    ax.set_title("K3 int5 matmul against cuBLAS on the dequantised weight", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(rows, path, benchmark="training", statistic="train_loss"):
    """The loss curves of the latest run with curves of several variants."""
    runs = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["benchmark"] == benchmark and r["statistic"] == statistic and "step" in r:
            runs[r["run"]][key_variant(r)].append((r["step"], r["value"], r))
    several = [run for run, curves in runs.items() if len(curves) > 1]
    if not several:
        return None
    curves = runs[several[-1]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, points in curves.items():
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=variant)
    first = next(iter(curves.values()))[0][2]
    ax.set_xlabel("step")
    ax.set_ylabel(statistic.replace("_", " "))
    ax.set_title(f"{benchmark}, {first['shape']}  [{first['date']}, {first['gpu']}]", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_history(rows, path, benchmark="micro-step", statistic="median_ms"):
    """One point per run and path: how the micro-step moved over the sessions."""
    series = defaultdict(list)
    runs = first_seen(r["run"] for r in rows if r["benchmark"] == benchmark and r["statistic"] == statistic)
    commits = {r["run"]: r["commit"] for r in rows if r["benchmark"] == benchmark}
    for r in rows:
        if r["benchmark"] == benchmark and r["statistic"] == statistic and "step" not in r:
            series[(key_variant(r), r["shape"], gpu_tag(r))].append((runs.index(r["run"]), r["value"]))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for (variant, shape, gpu), points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{variant} ({shape}, {gpu})")
    ax.set_xticks(range(len(runs)), [f"{run}\n{commits[run]}" for run in runs], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("median ms per micro-step")
    ax.set_title(f"{benchmark}: every run in results.jsonl", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_batch(rows, path, benchmark="micro-step", statistic="median_ms"):
    """ms per micro-step against batch sequences, when rows exist for several sizes."""
    series = defaultdict(dict)
    for r in rows:
        if r["benchmark"] == benchmark and r["statistic"] == statistic and re.fullmatch(r"\d+x\d+", r["shape"]):
            # the latest row per size and GPU wins
            series[f"{key_variant(r)}, {gpu_tag(r)}"][int(r["shape"].split("x")[0])] = r["value"]
    if not any(len(points) > 1 for points in series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=variant)
    ax.set_xlabel("sequences per micro-step (x 2048 tokens)")
    ax.set_ylabel("median ms per micro-step")
    ax.set_title(f"{benchmark}: time against batch size", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plots(rows, out_dir=PLOTS):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [plot_groups(rows, {"micro-step"}, out_dir / "micro_step.png"),
            plot_history(rows, out_dir / "micro_step_history.png"),
            plot_batch(rows, out_dir / "micro_step_batch.png"),
            plot_groups(rows, {"K1 MLP fwd", "K1 MLP fwd+bwd"}, out_dir / "k1_mlp.png"),
            plot_groups(rows, {"K2 attention fwd", "K2 attention fwd+bwd"}, out_dir / "k2_attention.png"),
            plot_k3(rows, out_dir / "k3_int5.png"),
            plot_groups(rows, {"eval batch"}, out_dir / "eval_batch.png"),
            plot_curves(rows, out_dir / "training_loss.png")]
    return [path for path in made if path]


# --- one run's quick view (pytest-benchmark JSON -> <name>.md + <name>_NN.png beside it) -------
def load_run(path):
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    rows = [{**bench["extra_info"], "name": bench["name"]} for bench in data["benchmarks"]
            if "ms" in bench.get("extra_info", {})]
    return rows, {"date": data.get("datetime", "")[:10], "python": machine.get("python_version", "")}


def speedups(rows, baseline_labels=()):
    """Speed-up of each row against its group's baseline: the row flagged `baseline`, else (for
    results recorded without the flag) the first row whose label is in baseline_labels."""
    by_group = defaultdict(list)
    for row in rows:
        by_group[row["group"]].append(row)
    for group_rows in by_group.values():
        base = next((r for r in group_rows if r.get("baseline")), None)
        if base is None:
            base = next((r for r in group_rows if r["label"] in baseline_labels), None)
            if base is not None:
                base["baseline"] = True
        for row in group_rows:
            row["speedup"] = base["ms"] / row["ms"] if base else None
    return by_group


def run_markdown(by_group, meta, rows):
    gpu = rows[0].get("gpu", "?") if rows else "?"
    versions = {r.get("torch", "") for r in rows} | {r.get("triton", "") for r in rows}
    lines = [f"GPU: {gpu}; torch/triton: {', '.join(sorted(v for v in versions if v))}; date: {meta['date']}", "",
             "| group | variant | ms | TFLOP/s | TB/s | tokens/s | speedup vs baseline | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for group, group_rows in by_group.items():
        for r in group_rows:
            def cell(key, spec):
                return format(r[key], spec) if r.get(key) is not None else ""
            mark = " (baseline)" if r.get("baseline") else ""
            lines.append(f"| {group} | {r['label']}{mark} | {r['ms']:.3f} | {cell('tflops', '.0f')} | "
                         f"{cell('tbps', '.2f')} | {cell('tokens_per_s', ',.0f')} | "
                         f"{cell('speedup', '.2f')}{'x' if r.get('speedup') else ''} | {cell('peak_gib', '.1f')} |")
    return "\n".join(lines) + "\n"


def run_charts(by_group, out_dir, stem):
    try:
        plt = _pyplot()
    except ImportError:
        print("matplotlib is not installed: no charts")
        return []
    paths = []
    for i, (group, group_rows) in enumerate(by_group.items()):
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(group_rows)))
        ax.barh([r["label"] for r in group_rows], [r["ms"] for r in group_rows],
                color=["#888" if r.get("baseline") else "#2a7" for r in group_rows])
        for y, r in enumerate(group_rows):
            ax.text(r["ms"], y, f" {r['ms']:.3f} ms" + (f" ({r['speedup']:.2f}x)" if r.get("speedup") else ""),
                    va="center", fontsize=8)
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(group, fontsize=9)
        ax.invert_yaxis()
        paths.append(_save(fig, Path(out_dir) / f"{stem}_{i:02d}.png"))
    return paths


def run_view(paths, out, name, baseline_labels):
    rows, meta = [], None
    for path in paths:
        more, more_meta = load_run(path)
        rows += more
        meta = meta or more_meta
    if not rows:
        raise SystemExit(f"{', '.join(paths)}: no benchmark figures (were they all skipped without CUDA?)")
    by_group = speedups(rows, baseline_labels)
    out_dir = Path(out or Path(paths[0]).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or Path(paths[0]).stem
    table = run_markdown(by_group, meta, rows)
    write_atomic(out_dir / f"{stem}.md", table)
    print(table)
    for path in run_charts(by_group, out_dir, stem):
        print(f"wrote {path}")


# --- command line ----------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:10]))
    parser.add_argument("json", nargs="*", help="quick view: pytest-benchmark JSON of one run (no history involved)")
    parser.add_argument("--results", default=str(RESULTS), help="the history (default: benchmarks/results.jsonl)")
    parser.add_argument("--since", metavar="YYYY-MM-DD", help="only rows of that date or later")
    parser.add_argument("--benchmark", metavar="PATTERN", help="only these benchmarks (shell pattern: 'K3*')")
    parser.add_argument("--latest", action="store_true",
                        help="only the newest row per benchmark, variant, shape, statistic")
    parser.add_argument("--readme", action="append", default=[], metavar="FILE",
                        help="rewrite the generated sections of FILE (between results:begin/end markers); repeatable")
    parser.add_argument("--plots", nargs="?", const=str(PLOTS), metavar="DIR",
                        help="write the charts (default folder: benchmarks/plots)")
    parser.add_argument("--check", action="store_true", help="check every row of the history; exit 1 on a bad row")
    parser.add_argument("--import-pytest-benchmark", nargs="+", dest="imports", metavar="FILE",
                        help="turn these runs into rows (pytest-benchmark JSON; also `recycore eval --json` output "
                             "and training metrics JSONL)")
    parser.add_argument("--commit", help="import: the commit that ran (default: the JSON's, else unknown)")
    parser.add_argument("--source", help="import: the command that produced the files")
    parser.add_argument("--run", help="import: one id for these rows (default: each JSON's start time)")
    parser.add_argument("--gpu", help="import: the GPU, for files that do not record it")
    parser.add_argument("--torch", help="import: the torch version, for files that do not record it")
    parser.add_argument("--triton", help="import: the triton version, for files that do not record it")
    parser.add_argument("--date", help="import: YYYY-MM-DD, for files that do not record it (default: today)")
    parser.add_argument("--variant", help="import of a training log or eval JSON: the variant (the kernels setting)")
    parser.add_argument("--shape", help="import of a training log or eval JSON: the shape (what ran)")
    parser.add_argument("--as-benchmark",
                        help="import of a training log or eval JSON: the benchmark (default: training, eval)")
    parser.add_argument("--append", nargs="+", metavar="FILE", help="merge these JSONL files' rows into the history")
    parser.add_argument("--out", help="import: the JSONL the rows go to (default: the history); quick view: the folder")
    parser.add_argument("--name", help="quick view: output stem (default: the first JSON's)")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL",
                        help="the baseline of groups recorded without a baseline flag (repeatable)")
    args = parser.parse_args(argv)

    if args.json:
        if args.imports or args.append or args.readme or args.plots or args.check:
            parser.error("a positional JSON is the quick view of one run; it takes none of the history's options")
        return run_view(args.json, args.out, args.name, args.baseline)
    acted = False
    if args.imports:
        meta = {k: getattr(args, k) for k in ("commit", "source", "run", "gpu", "torch", "triton", "date")
                if getattr(args, k)}
        rows = [row for path in args.imports
                for row in import_file(path, {"source": f"{Path(path).name} (no --source given)", **meta},
                                       args.baseline, args.variant, args.shape, args.as_benchmark)]
        added = append_rows(args.out or args.results, rows)
        print(f"{added} rows from {len(args.imports)} file(s) -> {args.out or args.results}")
        acted = True
    if args.append:
        rows = [row for path in args.append for row in load(path)]
        added = append_rows(args.results, rows)
        print(f"{added} new rows of {len(rows)} -> {args.results}")
        acted = True
    rows = load(args.results)
    if args.check:
        bad = [(i, p) for i, row in enumerate(rows, 1) if (p := problems(row))]
        for line, found in bad:
            print(f"{args.results}:{line}: {', '.join(found)}", file=sys.stderr)
        print(f"{len(rows)} rows, {len(bad)} with problems")
        if bad:
            return 1
        acted = True
    for readme in args.readme:
        path = Path(readme)
        text = path.read_text()
        new = render_sections(text, rows)
        if new != text:
            write_atomic(path, new)
        print(f"{readme}: {'rewritten' if new != text else 'unchanged'}")
        acted = True
    if args.plots:
        for path in plots(rows, args.plots):
            print(f"wrote {path}")
        acted = True
    if not acted or args.since or args.benchmark or args.latest:
        print(rows_table(select(rows, args.since, args.benchmark, args.latest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
