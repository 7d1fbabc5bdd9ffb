"""What a person sees on the terminal: progress with an ETA for long loops, and the end-of-run summary.

Progress goes to stderr through tqdm: one updating line on a terminal. When stderr is not a terminal (a
log file, CI, `make demo | tee`) a plain line is printed at most every PROGRESS_INTERVAL seconds and
every tenth of the work, and none for a loop that ends sooner, so logs stay short.

The summary puts the headline figure (the int5 artifact's sliding-window val_bpb, and its bytes against
the budget) on its own line, then a short table of the other figures; the full results go to the
metrics files (logs/<run_id>.jsonl, `recycore eval --json`), not the terminal."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

PROGRESS_INTERVAL = 30.0
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed} elapsed, {remaining} left]"


class Progress:
    """Progress of one loop of `total` units: `update(n)` as work is done, `close()` at the end (or use it
    as a context manager). enabled=False (other ranks, quiet callers) makes every call a no-op."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True,
                 interval: float = PROGRESS_INTERVAL, stream=None):
        self.total, self.desc, self.unit, self.enabled, self.interval = total, desc, unit, enabled, interval
        self.stream = stream or sys.stderr
        self.done = self.shown = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True,
                            unit_scale=unit == "char")

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self.last >= self.interval and (self.done - self.shown) * 10 >= self.total:
                self._line(now, note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.shown and self.done > self.shown:  # a long loop's lines end at 100%
            self._line(time.monotonic(), None)

    def _line(self, now: float, note: str | None) -> None:
        text = tqdm.format_meter(self.done, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                 bar_format=_LOG_FORMAT, unit_scale=self.unit == "char")
        print("  " + text + (f" {note}" if note else ""), file=self.stream, flush=True)
        self.last, self.shown = now, self.done

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True):
    """Iterate with a Progress of one unit per item (`total` defaults to len(iterable))."""
    with Progress(len(iterable) if total is None else total, desc, unit, enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


# ---------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------
def headline(val_bpb: float, what: str, total_bytes: int | None, budget_bytes: int) -> str:
    """'val_bpb 1.234567  int5 artifact, sliding window (stride 64) | 1,234,567 of 16,000,000 bytes ...'"""
    line = f"val_bpb {val_bpb:.6f}  {what}"
    if total_bytes is not None:
        over = total_bytes - budget_bytes
        line += (f" | {total_bytes:,} of {budget_bytes:,} bytes, "
                 + (f"OVER by {over:,}" if over > 0 else f"{-over:,} to spare"))
    return line


def figure_rows(rows: list[tuple[str, float | None, float | None]]) -> list[str]:
    """A small table of (what, val_bpb, val_loss); rows without a figure are left out."""
    width = max(len(what) for what, _, _ in rows)
    lines = [f"  {'':<{width}}  {'val_bpb':>9}  {'val_loss':>8}"]
    for what, bpb, loss in rows:
        if bpb is not None:
            lines.append(f"  {what:<{width}}  {bpb:9.6f}  " + (f"{loss:8.4f}" if loss is not None else ""))
    return lines


def training_summary(results: dict, stride: int, budget_bytes: int) -> list[str]:
    """The lines that end a training run (recycore train, recycore demo)."""
    kept = results.get("averaging", "ema").upper()
    lines = [headline(results["int5_sliding_val_bpb"], f"int5 artifact, sliding window (stride {stride})",
                      results.get("total_bytes"), budget_bytes)]
    lines += figure_rows([
        ("int5 artifact, standard", results.get("int5_val_bpb"), results.get("int5_val_loss")),
        (f"pre-quantisation ({kept}, kept)", results.get("prequant_val_bpb"), results.get("prequant_val_loss")),
        ("EMA (not kept)", results.get("ema_val_bpb"), results.get("ema_val_loss")),
        ("live weights", results.get("live_val_bpb"), results.get("live_val_loss")),
    ])
    memory = results.get("peak_allocated_gib")
    memory = (f"peak memory {memory:.2f} GiB (CUDA)" if memory is not None else
              f"peak memory {results['peak_rss_gib']:.2f} GiB (RSS)" if "peak_rss_gib" in results else "")
    lines.append(f"  {results['steps']} steps | {results['ms_per_step']:.1f} ms/step | training "
                 f"{results['training_time_ms'] / 1000:.1f}s" + (f" | {memory}" if memory else ""))
    lines.append(f"  artifact {results.get('artifact')} | metrics {results.get('metrics')}")
    return lines


def eval_summary(results: dict, budget_bytes: int) -> list[str]:
    """The lines that end `recycore eval`."""
    best = "sliding" if "sliding" in results else "standard"
    what = (f"int5 artifact, sliding window (stride {results['eval_stride']})" if best == "sliding"
            else "int5 artifact, standard")
    lines = [headline(results[best]["val_bpb"], what, results.get("total_bytes"), budget_bytes)]
    rows = [(f"int5 artifact, {name}", results[name]["val_bpb"], results[name]["val_loss"])
            for name in ("standard", "sliding") if name in results]
    lines += figure_rows(rows)
    times = ", ".join(f"{name} {results[name]['eval_seconds']:.1f}s" for name in ("standard", "sliding")
                      if name in results)
    if "warmup_seconds" in results:
        times += f" (after {results['warmup_seconds']:.1f}s compiling)"
    lines.append(f"  {results['val_tokens']:,} validation tokens, seq_len {results['eval_seq_len']} | {times} "
                 f"on {results['device']}")
    return lines
