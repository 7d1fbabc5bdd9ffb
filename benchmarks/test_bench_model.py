"""Whole-model micro-step (seed config, 48 x 2048 tokens, forward + backward):
the Triton kernels against the reference model under torch.compile.

RECYCORE_BENCH_PATHS picks the paths (default: reference-compiled,triton; add
reference-max-autotune for the per-block max-autotune compile, which takes
minutes: keep TORCHINDUCTOR_CACHE_DIR in an ignored folder such as
.cache/inductor so a later run reuses its autotuning)."""
import os

import pytest
import torch
from bench_utils import requires_cuda

from recycore.config import Config

PATHS = os.environ.get("RECYCORE_BENCH_PATHS", "reference-compiled,triton").split(",")
# fwd+bwd matmul work per micro-step (KERNELS.md): ~19.8 TFLOP of GEMMs + ~10.1 TFLOP of attention
STEP_TFLOP = 19.8 + 10.1


@requires_cuda
@pytest.mark.parametrize("path", PATHS)
def test_bench_micro_step(benchmark, path):
    from recycore.bench import format_profile, micro_step

    result = micro_step(path, Config(), batch_seqs=int(os.environ.get("RECYCORE_BENCH_BATCH", "48")),
                        with_profile=True)
    info = benchmark.extra_info
    info.update(group="model micro-step fwd+bwd (seed, 48x2048)", label=path, gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, tflops=STEP_TFLOP / result["ms"] * 1e3 * result["batch_seqs"] / 48,
                baseline=path == "reference-compiled", **result)
    print(f"\n{path}: {result['ms']:.2f} ms/micro-step, compile {result['compile_s']:.0f}s, "
          f"peak {result['peak_gib']:.1f} GiB")
    print(format_profile(result))
    benchmark.pedantic(lambda: None, rounds=1)  # figures come from CUDA events above
