"""Turn pytest-benchmark JSON into the results table (markdown) and PNG charts, written
beside the JSON as <name>.md and <name>_NN.png (one chart per benchmark group).

    python benchmarks/report.py benchmarks/results/h200.json [more.json ...] [--out DIR] [--name STEM]

Several JSON files (runs of parts of the suite, e.g. on different GPUs of one host) merge into
one table named after the first (or --name).

Every benchmark stores its figures in extra_info (bench_utils.gpu_time or the
model benchmark): group, label, ms, tflops / tbps, and `baseline` on the entry
the group's speedups are measured against.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_rows(path):
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "ms" not in info:
            continue
        rows.append({**info, "name": bench["name"]})
    return rows, {"date": data.get("datetime", "")[:10], "python": machine.get("python_version", ""),
                  "cpu": machine.get("cpu", {}).get("brand_raw", "")}


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


def markdown(by_group, meta, rows):
    gpu = rows[0].get("gpu", "?") if rows else "?"
    versions = {r.get("torch", "") for r in rows} | {r.get("triton", "") for r in rows}
    lines = [f"GPU: {gpu}; torch/triton: {', '.join(sorted(v for v in versions if v))}; date: {meta['date']}", "",
             "| group | variant | ms | TFLOP/s | TB/s | tokens/s | speedup vs baseline | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for group, group_rows in by_group.items():
        for r in group_rows:
            fmt = lambda key, spec: (format(r[key], spec) if r.get(key) is not None else "")  # noqa: E731
            mark = " (baseline)" if r.get("baseline") else ""
            lines.append(f"| {group} | {r['label']}{mark} | {r['ms']:.3f} | {fmt('tflops', '.0f')} | "
                         f"{fmt('tbps', '.2f')} | {fmt('tokens_per_s', ',.0f')} | {fmt('speedup', '.2f')}{'x' if r.get('speedup') else ''} | "
                         f"{fmt('peak_gib', '.1f')} |")
    return "\n".join(lines) + "\n"


def charts(by_group, out_dir, stem):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts")
        return []
    paths = []
    for i, (group, group_rows) in enumerate(by_group.items()):
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(group_rows)))
        labels = [r["label"] for r in group_rows]
        ax.barh(labels, [r["ms"] for r in group_rows],
                color=["#888" if r.get("baseline") else "#2a7" for r in group_rows])
        for y, r in enumerate(group_rows):
            ax.text(r["ms"], y, f" {r['ms']:.3f} ms" + (f" ({r['speedup']:.2f}x)" if r.get("speedup") else ""),
                    va="center", fontsize=8)
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(group, fontsize=9)
        ax.invert_yaxis()
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}_{i:02d}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--out", default=None,
                        help="folder for <name>.md and <name>_NN.png (default: beside the first JSON)")
    parser.add_argument("--name", default=None, help="output stem (default: the first JSON's)")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL",
                        help="the baseline of groups whose results carry no baseline flag (repeatable)")
    args = parser.parse_args()
    rows, meta = [], None
    for path in args.json:
        more, more_meta = load_rows(path)
        rows += more
        meta = meta or more_meta
    if not rows:
        raise SystemExit(f"{', '.join(args.json)}: no benchmark figures (were they all skipped without CUDA?)")
    by_group = speedups(rows, args.baseline)
    out_dir = Path(args.out or Path(args.json[0]).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or Path(args.json[0]).stem
    table = markdown(by_group, meta, rows)
    (out_dir / f"{stem}.md").write_text(table)
    print(table)
    for path in charts(by_group, out_dir, stem):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
