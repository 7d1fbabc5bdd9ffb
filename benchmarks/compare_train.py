"""Overlay the loss curves of training runs and tabulate their speed, memory and final figures.

    python benchmarks/compare_train.py RUN.jsonl RUN.jsonl [...] -o curves.png [--md table.md] [--x time]

Each RUN.jsonl is the metrics file `recycore train` writes (logs/<run_id>.jsonl). The table gives
steps, steady ms/step (the mean over the steps after the first tenth, so compile and warm-up
stragglers do not count), tokens/s, peak memory and the val_bpb figures of the "final" record (for a
run cut short before it, those of its last validation and averaging records; "-" where a run has
none); the agreement line compares each run's train loss with the first run's over their common steps
(mean and largest relative difference of a 10-step moving average, since single-step losses of
two bf16 runs drift apart by noise).
"""
import argparse
import json
import statistics
from pathlib import Path


def load(path):
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if "event" not in r]
    # a run cut short before its "final" record still logged its last validation and the averaged weights'
    final = {}
    for r in records:
        if r.get("event") == "val":
            final["live_val_bpb"] = r["val_bpb"]
        elif r.get("event") == "prequant":
            final["prequant_val_bpb"] = r["val_bpb"]
        elif r.get("event") == "final":
            final.update(r)
    return steps, final


def steady_ms_per_step(steps):
    """Mean ms of the steps after the first tenth (from the cumulative training time)."""
    if len(steps) < 3:
        return float("nan")
    first = steps[len(steps) // 10]
    last = steps[-1]
    return (last["train_time_ms"] - first["train_time_ms"]) / max(last["step"] - first["step"], 1)


def smoothed(losses, window=10):
    out, total = [], 0.0
    for i, value in enumerate(losses):
        total += value
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out


def agreement(reference, other):
    """(mean, max) relative difference of the smoothed train losses over the common steps."""
    ref = {r["step"]: r["train_loss"] for r in reference}
    common = [r for r in other if r["step"] in ref]
    if not common:
        return float("nan"), float("nan")
    a = smoothed([ref[r["step"]] for r in common])
    b = smoothed([r["train_loss"] for r in common])
    diffs = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    return statistics.fmean(diffs), max(diffs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="metrics files (JSON lines) of `recycore train`")
    parser.add_argument("-o", "--output", required=True, help="the overlaid loss curves (PNG)")
    parser.add_argument("--md", default=None, help="also write the table as markdown here")
    parser.add_argument("--x", choices=("step", "time"), default="step",
                        help="the curves' x axis: the step, or the training time in seconds (runs of one wall clock)")
    args = parser.parse_args(argv)

    runs = []
    for path in args.runs:
        steps, final = load(path)
        if not steps:
            raise SystemExit(f"{path}: no step records (is it a `recycore train` metrics file?)")
        runs.append((Path(path).stem, steps, final))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, steps, final in runs:
        xs = [r["step"] if args.x == "step" else r["train_time_ms"] / 1000 for r in steps]
        bpb = final.get("prequant_val_bpb", final.get("live_val_bpb"))
        label = f"{name}: {steps[-1]['step']} steps" + ("" if bpb is None else f", val_bpb {bpb:.4f}")
        ax.plot(xs, [r["train_loss"] for r in steps], lw=1, label=label)
    ax.set_xlabel("step" if args.x == "step" else "training time (s)")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    plt.close(fig)

    lines = ["| run | steps | ms/step (steady) | tokens/s | peak GiB | val_bpb live | pre-quant | int5 | int5 sliding |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, steps, final in runs:
        ms = steady_ms_per_step(steps)
        tokens_per_step = steps[-1]["tokens_per_s"] * steps[-1]["ms_per_step"] / 1000
        figures = [final.get(k) for k in ("live_val_bpb", "prequant_val_bpb", "int5_val_bpb", "int5_sliding_val_bpb")]
        peak = final.get("peak_allocated_gib")
        lines.append(f"| {name} | {steps[-1]['step']} | {ms:.1f} | {tokens_per_step / ms * 1000:,.0f} | "
                     + ("-" if peak is None else f"{peak:.1f}") + " | "
                     + " | ".join("-" if v is None else f"{v:.4f}" for v in figures) + " |")
    base_name, base_steps, _ = runs[0]
    for name, steps, _ in runs[1:]:
        mean, worst = agreement(base_steps, steps)
        lines.append(f"\n{name} vs {base_name}: train loss (10-step average) differs by {100 * mean:.2f}% on "
                     f"average, {100 * worst:.2f}% at most")
    table = "\n".join(lines)
    print(table)
    if args.md:
        Path(args.md).write_text(table + f"\n\n![loss curves]({Path(args.output).name})\n")


if __name__ == "__main__":
    main()
