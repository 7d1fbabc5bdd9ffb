"""Shared GPU timing for the pytest-benchmark suite.

Every benchmark skips without CUDA. `gpu_time` times a callable with CUDA events
(triton's do_bench: warm-up, then the median of many synchronised runs) and
records ms, TFLOP/s and TB/s in the benchmark's extra_info (with `benchmark` and `shape`, the keys of
benchmarks/results.jsonl), which `benchmarks/report.py --import-pytest-benchmark` turns into rows of
the results history. pytest-benchmark's own statistics come from a synchronised wrapper of the same
callable.
"""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")


def gpu_time(fixture, fn, /, *, group, label, flops=None, bytes_moved=None, rounds=20, **extra):
    """Median GPU milliseconds of fn(); stores figures in the pytest-benchmark fixture's extra_info and returns ms."""
    import triton
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
    lo, hi = do_bench(fn, warmup=10, rep=200, quantiles=[0.2, 0.8])
    info = fixture.extra_info
    info.update(group=group, label=label, ms=ms, ms_p20=lo, ms_p80=hi, gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, **extra)
    if flops is not None:
        info["tflops"] = flops / ms / 1e9
    if bytes_moved is not None:
        info["tbps"] = bytes_moved / ms / 1e9

    def synced():
        fn()
        torch.cuda.synchronize()

    fixture.pedantic(synced, rounds=rounds, warmup_rounds=2)
    return ms
