"""The results history (benchmarks/results.jsonl) and benchmarks/report.py, on the CPU."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
REPORT = BENCH / "report.py"
spec = importlib.util.spec_from_file_location("bench_report", REPORT)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def run(*args, check=True):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], capture_output=True, text=True, check=check)


def row(**fields):
    base = dict(date="2026-12-01", gpu="NVIDIA H200", torch="2.11.0", triton="3.6.0", commit="abc1234", run="r1",
                benchmark="K1 MLP fwd+bwd", shape="M=98304 d=512 h=1536", variant="ours", statistic="median_ms",
                value=1.0, source="test")
    return {**base, **fields}


def test_history_rows_have_the_required_fields():
    rows = report.load(BENCH / "results.jsonl")
    assert len(rows) > 1000
    for number, r in enumerate(rows, 1):
        assert not report.problems(r), (number, report.problems(r), r)
    # the historical micro-step rows carry the fused path under its current name
    assert {r["path"] for r in rows if r["benchmark"] == "micro-step" and r["variant"] == "triton"} == {"fused"}
    assert run("--check").returncode == 0


def test_problems_names_what_is_wrong():
    assert report.problems(row()) == []
    found = report.problems({**row(value="1.0", date="28.11.2026", baseline="yes"), "gpu": ""})
    assert any("gpu" in p for p in found) and any("date" in p for p in found)
    assert any("value" in p for p in found) and any("baseline" in p for p in found)


def test_import_pytest_benchmark_turns_extra_info_into_rows(tmp_path):
    data = {"datetime": "2026-12-01T10:20:30.5+00:00", "commit_info": {"id": "unversioned"}, "benchmarks": [
        {"name": "a", "extra_info": {"group": "K3 int5 512x512 M=16", "label": "cublas_bf16", "ms": 2.0, "ms_p20": 1.9,
                                     "ms_p80": 2.2, "calls": 4, "tflops": 1.5, "baseline": True, "gpu": "NVIDIA H200",
                                     "torch": "2.11.0"}},
        {"name": "b", "extra_info": {"group": "model micro-step fwd+bwd (seed, 48x2048)", "label": "triton",
                                     "path": "triton", "ms": 94.0, "peak_gib": 27.9, "batch_seqs": 48, "seq_len": 2048,
                                     "families": {"elementwise/norm": 25.0}, "top_kernels": [["_gemm_kernel", 9.8]],
                                     "gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0"}},
        {"name": "c", "extra_info": {"group": "K2 attention fwd", "label": "new", "ms": 0.5,
                                     "benchmark": "K2 attention fwd", "shape": "B=1 T=8", "gpu": "NVIDIA H200",
                                     "torch": "2.11.0"}},
        {"name": "skipped", "extra_info": {}},
    ]}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "new.jsonl"
    result = run("--import-pytest-benchmark", path, "--commit", "abc1234", "--source", "bash h200.sh suite",
                 "--triton", "3.6.0", "--out", out)
    assert "rows from 1 file" in result.stdout
    rows = report.load(out)
    assert all(not report.problems(r) for r in rows)
    assert {(r["commit"], r["source"], r["date"], r["run"]) for r in rows} == {
        ("abc1234", "bash h200.sh suite", "2026-12-01", "2026-12-01T10:20:30")}
    k3 = {r["statistic"]: r for r in rows if r["benchmark"] == "K3 int5 matmul"}
    assert k3["median_ms"]["shape"] == "512x512 M=16" and k3["median_ms"]["value"] == 0.5  # per call of 4
    assert k3["median_ms"]["calls"] == 4 and k3["median_ms"]["baseline"] is True and k3["tflops"]["value"] == 1.5
    assert k3["median_ms"]["triton"] == "3.6.0" and k3["median_ms"]["unit"] == "ms"
    step = {r["statistic"]: r for r in rows if r["benchmark"] == "micro-step"}
    assert step["median_ms"]["shape"] == "48x2048" and step["median_ms"]["path"] == "fused"
    assert step["median_ms"]["variant"] == "triton" and step["peak_gib"]["value"] == 27.9
    assert step["profile_elementwise_norm_ms"]["value"] == 25.0 and step["kernel_ms:_gemm_kernel"]["value"] == 9.8
    assert [r["shape"] for r in rows if r["variant"] == "new"] == ["B=1 T=8"]
    # importing the same run again adds nothing; --append merges into the history
    assert "0 rows" in run("--import-pytest-benchmark", path, "--commit", "abc1234", "--source", "bash h200.sh suite",
                           "--triton", "3.6.0", "--out", out).stdout
    history = tmp_path / "results.jsonl"
    history.write_text(json.dumps(row()) + "\n")
    assert f"{len(rows)} new rows" in run("--results", history, "--append", out).stdout
    assert len(report.load(history)) == len(rows) + 1
    assert "0 new rows" in run("--results", history, "--append", out).stdout


def test_import_training_log_and_eval_json(tmp_path):
    log = tmp_path / "h200_triton.jsonl"
    records = [{"step": s, "train_loss": 7.0 - s / 10, "train_time_ms": 800.0 * s} for s in (1, 2, 10, 20, 30)]
    records += [{"event": "val", "step": 30, "val_bpb": 1.9}, {"event": "final", "run_id": "h200_triton",
                                                                "peak_allocated_gib": 28.2, "int5_val_bpb": 1.95}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"int5_direct": True, "scheme": "seed", "model_bytes": 10, "val_tokens": 5,
                                      "weight_bytes": {"total": 100}, "standard": {"val_bpb": 2.0, "eval_seconds": 4.0},
                                      "sliding": {"val_bpb": 1.9}}))
    out = tmp_path / "new.jsonl"
    run("--import-pytest-benchmark", log, evaluation, "--variant", "triton", "--shape", "seed config, 30 steps",
        "--date", "2026-12-01", "--out", out)
    rows = report.load(out)
    assert all(not report.problems(r) for r in rows)
    train = {(r["statistic"], r.get("step")): r for r in rows if r["benchmark"] == "training"}
    assert train[("ms_per_step_mean", None)]["value"] == 800.0 and train[("ms_per_step_min10", None)]["value"] == 800.0
    assert train[("peak_gib", None)]["value"] == 28.2 and train[("val_bpb", None)]["value"] == 1.9
    assert train[("train_loss", 30)]["value"] == pytest.approx(4.0) and train[("train_loss", 30)]["path"] == "fused"
    evals = {r["statistic"]: r for r in rows if r["benchmark"] == "eval"}
    assert evals["val_bpb_standard"]["value"] == 2.0 and evals["weight_bytes"]["value"] == 100


def test_readme_rendering_replaces_only_the_marked_text_and_is_stable(tmp_path):
    # an older run first (file order is time order), then the newest: 2.0 ms (baseline) against 1.0 ms
    rows = [row(run="r0", variant="ours", value=5.0), row(run="r0", variant="max_autotune", value=5.0, baseline=True),
            row(variant="max_autotune", value=2.0, baseline=True), row(variant="ours", value=1.0)]
    history = tmp_path / "results.jsonl"
    history.write_text("".join(json.dumps(r) + "\n" for r in rows))
    readme = tmp_path / "README.md"
    before, between, after = "# Title\n\ntext before\n", "\n| old | table |\n", "\ntext after <!-- kept -->\n"
    readme.write_text(f"{before}<!-- results:begin -->{between}<!-- results:end -->{after}"
                      f"<!-- results:begin full -->\n<!-- results:end -->\n")
    run("--results", history, "--readme", readme)
    text = readme.read_text()
    assert text.startswith(before + "<!-- results:begin -->\n") and "| old | table |" not in text
    assert f"<!-- results:end -->{after}" in text and text.endswith("<!-- results:end -->\n")
    # the newest run's pair, ratio computed from the rows: 2.0 ms against 1.0 ms is 2.00x
    line = next(line for line in text.splitlines() if line.startswith("| K1 MLP fwd+bwd vs max-autotune"))
    assert "| 1.000 ms" in line and "2.000 ms (max_autotune)" in line and "| 2.00x |" in line and "missed" not in line
    full = next(line for line in text.splitlines()
                if line.startswith("| K1 MLP fwd+bwd | M=98304 d=512 h=1536 | ours |"))
    assert "| 2.00x |" in full
    again = readme.read_text()
    assert again == text and "unchanged" in run("--results", history, "--readme", readme).stdout


def test_ratios_follow_the_statistic():
    assert report.ratio(1.0, 2.0, "median_ms") == 2.0  # time: baseline / ours
    assert report.ratio(600.0, 300.0, "tflops") == 2.0  # throughput: ours / baseline
    assert report.ratio(1000.0, 500.0, "tokens_per_s") == 2.0
    assert report.fmt(0.0045, "median_ms") == "4.50 us" and report.fmt(94.2253, "median_ms") == "94.23 ms"


def test_readme_without_markers_is_refused(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(row()) + "\n")
    (tmp_path / "README.md").write_text("no markers\n")
    result = run("--results", tmp_path / "results.jsonl", "--readme", tmp_path / "README.md", check=False)
    assert result.returncode != 0 and "markers" in result.stderr


def test_benchmarks_readme_tables_are_current():
    """The committed tables of benchmarks/README.md are what the committed history renders to."""
    text = (BENCH / "README.md").read_text()
    assert report.render_sections(text, report.load(BENCH / "results.jsonl")) == text


def test_latest_keeps_the_newest_row_of_each_key():
    rows = [row(value=3.0), row(value=2.0, run="r2"), row(variant="max_autotune", value=4.0)]
    latest = report.select(rows, latest=True)
    assert sorted((r["variant"], r["value"]) for r in latest) == [("max_autotune", 4.0), ("ours", 2.0)]
    assert report.select(rows, since="2026-12-02") == [] and len(report.select(rows, benchmark="K1*")) == 3


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out.txt"
    report.write_atomic(target, "one\n")
    report.write_atomic(target, "two\n")
    assert target.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_host_cost_compare_alternates_processes_and_takes_the_median(monkeypatch):
    """benchmarks/host_cost.py --compare: one process per version and round, in alternating order, each
    with its tree on PYTHONPATH; per op and version the median of the rounds."""
    spec = importlib.util.spec_from_file_location("bench_host_cost", BENCH / "host_cost.py")
    host_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_cost)
    runs = []

    def fake_run(cmd, env, check):
        label = cmd[cmd.index("--label") + 1]
        runs.append((label, env["PYTHONPATH"]))
        value = {"old": [30.0, 10.0, 20.0], "new": [5.0, 7.0, 6.0]}[label][sum(r[0] == label for r in runs) - 1]
        with open(cmd[2], "w") as f:
            f.write(json.dumps({"benchmark": "host cost per call", "shape": "s", "variant": f"op [{label}]",
                                "statistic": "median", "value": value, "unit": "us", "note": "x"}) + "\n")

    monkeypatch.setattr(host_cost.subprocess, "run", fake_run)
    rows = host_cost.compare({"old": "/trees/old", "new": "/trees/new"}, rounds=3)
    assert runs == [("old", "/trees/old"), ("new", "/trees/new"), ("new", "/trees/new"), ("old", "/trees/old"),
                    ("old", "/trees/old"), ("new", "/trees/new")]
    assert {r["variant"]: r["value"] for r in rows} == {"op [old]": 20.0, "op [new]": 6.0}
    assert "3 alternating processes (10.0 to 30.0)" in rows[0]["note"]


def test_eval_rows_name_the_warm_up_and_bf16_bytes_only_of_packed_models():
    """`recycore eval --json` rows: val_bpb and seconds per mode, the compile warm-up apart, weight bytes;
    the bf16-equivalent bytes only where matrices are packed (for a dense model they are its own)."""
    meta = dict(date="2026-12-02", gpu="g", torch="t", triton="tr", commit="c", run="r", source="s")
    packed = {"int5_direct": True, "scheme": "seed", "model_bytes": 10, "val_tokens": 5, "warmup_seconds": 30.0,
              "standard": {"val_bpb": 1.5, "eval_seconds": 12.0},
              "weight_bytes": {"total": 20, "int5_values": 64, "dequantised_bf16": 59}}
    dense = dict(packed, int5_direct=False, weight_bytes={"total": 116, "int5_values": 0, "dequantised_bf16": 116})
    rows = {(r["variant"], r["statistic"]): r["value"]
            for data in (packed, dense) for r in report.rows_from_eval(data, meta)}
    assert rows == {("int5-direct", "val_bpb_standard"): 1.5, ("int5-direct", "eval_s_standard"): 12.0,
                    ("int5-direct", "eval_s_warmup"): 30.0, ("int5-direct", "weight_bytes"): 20,
                    ("int5-direct", "weight_bytes_if_bf16"): 59,
                    ("dequantised", "val_bpb_standard"): 1.5, ("dequantised", "eval_s_standard"): 12.0,
                    ("dequantised", "eval_s_warmup"): 30.0, ("dequantised", "weight_bytes"): 116}


def test_compare_train_reads_runs_cut_short(tmp_path):
    """benchmarks/compare_train.py: a run without its "final" record still shows its last validation and
    averaged-weights val_bpb; figures a run lacks print as "-"; the plot is written."""
    def write(name, records):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    steps = [{"step": s, "train_loss": 5.0 - s / 10, "ms_per_step": 200.0, "tokens_per_s": 1000.0,
              "train_time_ms": 200.0 * s} for s in range(1, 21)]
    full = write("full", steps + [{"event": "final", "live_val_bpb": 1.7, "prequant_val_bpb": 1.6,
                                   "int5_val_bpb": 1.65, "int5_sliding_val_bpb": 1.64, "peak_allocated_gib": 7.0}])
    cut = write("cut", steps[:15] + [{"event": "val", "step": 15, "val_bpb": 1.9},
                                     {"event": "prequant", "step": 15, "val_bpb": 1.8}])
    out = subprocess.run([sys.executable, str(BENCH / "compare_train.py"), str(full), str(cut), "-o",
                          str(tmp_path / "curves.png"), "--x", "time"], capture_output=True, text=True, check=True).stdout
    assert "| full | 20 | 200.0 | 1,000 | 7.0 | 1.7000 | 1.6000 | 1.6500 | 1.6400 |" in out
    assert "| cut | 15 | 200.0 | 1,000 | - | 1.9000 | 1.8000 | - | - |" in out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_headline_against_another_figure_of_the_same_run_and_variant():
    """baseline_statistic: the ratio of two figures of one row set (int5-direct bytes vs their bf16 size)."""
    rows = [row(benchmark="eval", shape="s", variant="int5-direct", statistic="weight_bytes", value=20.0),
            row(benchmark="eval", shape="s", variant="int5-direct", statistic="weight_bytes_if_bf16", value=59.0),
            row(benchmark="eval", shape="s", variant="int5-direct", statistic="weight_bytes", value=30.0, run="r0")]
    spec = dict(what="w", benchmark="eval", shape=".*", statistic="weight_bytes", ours="int5-direct",
                baseline_statistic="weight_bytes_if_bf16", target=2.9)
    [line] = report.headline_lines(rows, spec, [])
    assert "| 2.95x | >= 2.90x: met |" in line and "(weight_bytes_if_bf16)" in line


def test_seed_artifact_holds_the_initial_weights_and_the_eval_record(tmp_path):
    """benchmarks/seed_artifact.py: an artifact of a config's initial weights (no training) that loads
    back into that model, recording the data and tokenizer for `recycore eval`."""
    import torch

    from recycore.artifact import load_artifact, read_artifact
    from recycore.config import PRESETS, Config
    from recycore.model import GPT

    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not a real tokenizer: only its hash is recorded")
    out = tmp_path / "new" / "init.int5.ptz"  # its folder made as needed
    done = subprocess.run([sys.executable, str(BENCH / "seed_artifact.py"), str(out), "--data-path", str(tmp_path),
                           "--tokenizer-path", str(tokenizer), "--preset", "ci", "--seed", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{out}: " in done.stdout and "initial weights of the ci preset" in done.stdout
    record = read_artifact(out)["evaluation"]
    assert record["tokenizer_path"] == str(tokenizer) and len(record["tokenizer_sha256"]) == 64
    state, cfg, _ = load_artifact(out)
    assert cfg.model_dict() == Config(**PRESETS["ci"]).model_dict()
    model = GPT(cfg)
    model.load_state_dict(state)
    loaded = torch.cat([t.float().flatten() for t in model.state_dict().values()])

    def initial(seed):
        torch.manual_seed(seed)
        return torch.cat([t.float().flatten() for t in GPT(cfg).state_dict().values()])

    # the int5/int8 round trip of seed 3's initial weights: close to them, far from another seed's
    assert (loaded - initial(3)).norm() < 0.1 * (loaded - initial(4)).norm()


def test_k2_sweep_rows_import_as_valid_history_rows(tmp_path):
    """`h200.sh k2sweep`: the sweep's JSON report as rows (configs at the seed shape, each path's fwd and
    fwd+bwd time and TFLOP/s at each length, errors left out) that report.py imports as valid rows."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_attention", BENCH / "test_bench_attention.py")
        bench_attention = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_attention)
    finally:
        sys.path.remove(str(BENCH))
    sweep = {"sweep": {"fwd (64, 64, 4, 3, True)": 0.61, "bwd dkdv (32, 128, 8, 3, True)": 1.9,
                       "bwd dq (64, 64, 4, 3, False)": "error: OutOfResources: shared memory"},
             "paths": {"T=2048 ours_triton": {"fwd_ms": 0.69, "fwd_tflops": 300.0, "fwd_bwd_ms": 2.9,
                                              "fwd_bwd_tflops": 250.0},
                       "T=4096 a_cudnn_compiled_max_autotune": {"fwd_ms": 1.5, "fwd_bwd_ms": "error: x"}}}
    rows = bench_attention.sweep_rows(sweep)
    got = {(r["benchmark"], r["shape"], r["variant"], r["statistic"]): r["value"] for r in rows}
    assert got == {
        ("K2 config sweep", "B=48 T=2048 H=8 Hkv=4 D=64", "fwd (64, 64, 4, 3, True)", "median_ms"): 0.61,
        ("K2 config sweep", "B=48 T=2048 H=8 Hkv=4 D=64", "bwd dkdv (32, 128, 8, 3, True)", "median_ms"): 1.9,
        ("K2 attention fwd", "B=48 T=2048 H=8 Hkv=4 D=64", "ours_triton", "median_ms"): 0.69,
        ("K2 attention fwd", "B=48 T=2048 H=8 Hkv=4 D=64", "ours_triton", "tflops"): 300.0,
        ("K2 attention fwd+bwd", "B=48 T=2048 H=8 Hkv=4 D=64", "ours_triton", "median_ms"): 2.9,
        ("K2 attention fwd+bwd", "B=48 T=2048 H=8 Hkv=4 D=64", "ours_triton", "tflops"): 250.0,
        ("K2 attention fwd", "B=24 T=4096 H=8 Hkv=4 D=64", "a_cudnn_compiled_max_autotune", "median_ms"): 1.5}
    path = tmp_path / "k2_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "new.jsonl"
    run("--import-pytest-benchmark", path, "--out", out, "--commit", "abc1234", "--run", "r", "--source", "s",
        "--gpu", "NVIDIA H200", "--torch", "2.11.0", "--triton", "3.6.0")
    imported = report.load(out)
    assert len(imported) == len(rows) and all(not report.problems(r) for r in imported)


def test_figures_of_different_gpus_are_never_paired_ranged_or_replaced():
    """A later run on another GPU adds its own lines; the first GPU's comparison and ranges stay its own."""
    h100 = "NVIDIA H100 80GB HBM3"
    rows = [row(benchmark="micro-step", shape="48x2048", variant="fused-graphs", value=84.0, run="a"),
            row(benchmark="micro-step", shape="48x2048", variant="reference-compiled-graphs", value=94.0, run="a"),
            row(benchmark="micro-step", shape="48x2048", variant="fused-graphs", value=92.0, run="b", gpu=h100),
            row(benchmark="micro-step", shape="48x2048", variant="reference-compiled-graphs", value=106.0, run="b",
                gpu=h100),
            row(benchmark="optimizer step", shape="seed model, 1 GPU", variant="muon+adamw", value=12.0, run="a"),
            row(benchmark="optimizer step", shape="seed model, 1 GPU", variant="muon+adamw", value=11.0, run="c"),
            row(benchmark="optimizer step", shape="seed model, 1 GPU", variant="muon+adamw", value=9.0, run="b",
                gpu=h100)]
    table = report.headline_table(rows)
    pair_lines = [line for line in table.splitlines() if "both as CUDA graphs" in line]
    assert len(pair_lines) == 2
    assert "| 1.12x |" in pair_lines[0] and pair_lines[0].endswith("| NVIDIA H200 |")
    assert "| 1.15x |" in pair_lines[1] and pair_lines[1].endswith(f"| {h100} |")
    optimiser = [line for line in table.splitlines() if line.startswith("| optimiser step")]
    assert "11 ms to 12 ms over 2 runs" in optimiser[0].replace(".00", "") and "over" not in optimiser[1]
    full = report.full_table(rows)
    assert sum(line.startswith("| micro-step | 48x2048 |") for line in full.splitlines()) == 4
    assert {line.split("|")[-2].strip() for line in full.splitlines()[2:]} == {"H200", "H100"}
