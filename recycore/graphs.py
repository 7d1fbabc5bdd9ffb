"""CUDA-graph capture of a function of tensors, with an eager fallback.

`Captured(fn)` calls fn eagerly the first time it sees a given input signature (shapes, dtypes and an
optional extra key, e.g. whether late QAT is on), which compiles and autotunes everything fn launches;
the next call with that signature captures fn into a CUDA graph and from then on each call copies the
inputs into the graph's static buffers and replays it: one launch instead of hundreds of Python-side
kernel launches. The outputs of a replay are the graph's static tensors, valid until the next call.

Everything fn reads besides its inputs (weights, gradients, optimiser state, schedule values) must live
in device tensors whose storage never changes: the graph replays the addresses it recorded. A capture
that fails (an operation that cannot be captured, out of memory) is reported once on one line and that
signature runs eagerly from then on; with `check`, the first replay is compared with the eager result
on the same inputs, and a mismatch also falls back, so a replay is never silently wrong.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor


def _as_tuple(out) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


class Captured:
    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], name: str, *, enabled: bool = True,
                 pool=None, stream: torch.cuda.Stream | None = None, check: Callable | None = None,
                 extra_key: Callable[[], object] = lambda: None, log: Callable[[str], None] | None = None):
        """fn(*tensors) -> a tensor or a tuple of tensors. enabled: capture at all (False: always eager).
        check(eager_outputs, replay_outputs) -> None, or a reason why the replay is wrong."""
        self.fn, self.name, self.enabled = fn, name, enabled and torch.cuda.is_available()
        self.check, self.extra_key = check, extra_key
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.pool = pool
        self.stream = stream
        self._seen: set = set()
        self._graphs: dict = {}  # signature -> (graph, static inputs, static outputs)
        self._eager: set = set()  # signatures that fell back

    def __call__(self, *args: Tensor):
        if not self.enabled or not all(a.is_cuda for a in args):
            return self.fn(*args)
        key = (tuple((tuple(a.shape), a.dtype) for a in args), self.extra_key())
        if key in self._graphs:
            return self._replay(key, args)
        if key in self._eager or key not in self._seen:
            self._seen.add(key)
            return self._run_on_side_stream(args)
        return self._capture(key, args)

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def _side_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _run_on_side_stream(self, args):
        """Eager calls run on the capture stream, as torch.cuda.graphs asks of warm-up iterations."""
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self.fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _replay(self, key, args):
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(static_in, args):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out if len(static_out) > 1 else static_out[0]

    def _capture(self, key, args):
        static_in = tuple(a.clone() for a in args)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self.pool, stream=self._side_stream()):
                static_out = _as_tuple(self.fn(*static_in))
        except Exception as exc:  # noqa: BLE001 - any failure means: run this step eagerly
            return self._fall_back(key, args, f"capture failed ({type(exc).__name__}: {_first_line(exc)})", graph)
        self._graphs[key] = (graph, static_in, static_out)
        if self.check is None:
            return self._replay(key, args)
        eager = tuple(t.clone() for t in _as_tuple(self._run_on_side_stream(args)))
        replayed = self._replay(key, args)
        problem = self.check(eager, _as_tuple(replayed))
        if problem:
            del self._graphs[key]
            return self._fall_back(key, args, f"the replay differs from the eager run ({problem})", graph)
        return replayed

    def _fall_back(self, key, args, reason: str, graph):
        del graph
        self._eager.add(key)
        torch.cuda.synchronize()  # a capture error that poisoned the context surfaces here, not later
        self.log(f"warning: cuda graphs: {self.name}: {reason}; running it uncaptured")
        return self._run_on_side_stream(args)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def relative_check(tolerance: float):
    """A `check` for Captured: every output within `tolerance` relative (in norm) of the eager one."""
    def check(eager: tuple[Tensor, ...], replayed: tuple[Tensor, ...]) -> str | None:
        for i, (a, b) in enumerate(zip(eager, replayed)):
            a64, b64 = a.double(), b.double()
            if not torch.isfinite(b64).all():
                return f"output {i} is not finite"
            err = ((a64 - b64).norm() / a64.norm().clamp_min(1e-30)).item()
            if err > tolerance:
                return f"output {i} off by {err:.2e} relative"
        return None
    return check
