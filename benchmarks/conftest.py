"""Benchmark set-up: without CUDA every benchmark skips; the Triton interpreter is
switched on before anything imports triton so that collection still works. With CUDA,
inductor's cache starts from the saved autotuning decisions (recycore.bench.seed_inductor_cache),
so the max-autotune baselines compile without re-benchmarking every GEMM."""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    if torch.cuda.is_available():
        from recycore.bench import seed_inductor_cache

        seed_inductor_cache()
