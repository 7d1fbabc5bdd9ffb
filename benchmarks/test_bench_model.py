"""Whole-model micro-step (seed config, 48 x 2048 tokens, forward + backward):
the Triton kernels against the reference model under torch.compile.

RECYCORE_BENCH_PATHS picks the paths (default recycore.bench.SUITE_PATHS: the
per-block max-autotune baseline, the default compile, the fused kernels). The max-autotune
compile takes minutes: conftest.py seeds inductor's cache with the committed
autotuning decisions, and TORCHINDUCTOR_CACHE_DIR in an ignored folder such as
.cache/inductor lets a later run reuse the whole compile."""
import os
import re

import pytest
import torch
from bench_utils import requires_cuda

from recycore.bench import SUITE_PATHS
from recycore.config import Config

PATHS = re.split("[,+]", os.environ.get("RECYCORE_BENCH_PATHS", SUITE_PATHS))
# speed-ups are against max-autotune when it runs (the headline; the whole-model compile before the
# per-block one), else against the default compile
BASELINE = next((p for p in ("reference-max-autotune-whole", "reference-max-autotune") if p in PATHS),
                "reference-compiled")
# fwd+bwd matmul work per micro-step (docs/KERNELS.md): ~19.8 TFLOP of GEMMs + ~10.1 TFLOP of attention
STEP_TFLOP = 19.8 + 10.1


# sequences of 2048 per micro-step: the seed's 48, and the smaller ones where host overhead shows
BATCHES = [int(b) for b in os.environ.get("RECYCORE_BENCH_BATCHES", "12,24,48").split(",")]


@requires_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch_seqs", BATCHES)
def test_bench_micro_step(benchmark, batch_seqs, path):
    from recycore.bench import format_profile, micro_step

    result = micro_step(path, Config(), batch_seqs=batch_seqs, with_profile=True)
    info = benchmark.extra_info
    import triton

    info.update(group=f"model micro-step fwd+bwd (seed, {result['batch_seqs']}x{result['seq_len']})", label=path,
                benchmark="micro-step", shape=f"{result['batch_seqs']}x{result['seq_len']}",
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                tflops=STEP_TFLOP / result["ms"] * 1e3 * result["batch_seqs"] / 48,
                tokens_per_s=result["batch_seqs"] * result["seq_len"] / result["ms"] * 1e3,
                baseline=path == BASELINE, **result)
    print(f"\n{path}: {result['ms']:.2f} ms/micro-step, compile {result['compile_s']:.0f}s, "
          f"peak {result['peak_gib']:.1f} GiB")
    print(format_profile(result))
    benchmark.pedantic(lambda: None, rounds=1)  # figures come from CUDA events above


@requires_cuda
def test_bench_optimizer_step(benchmark):
    """One optimiser step of the seed model on one GPU (Muon with NS5 on the four banks, AdamW on
    embeddings and scalars, the global-norm clip), on random non-zero gradients; it runs once per
    training step, after the micro-steps."""
    from bench_utils import gpu_time

    from recycore.model import GPT
    from recycore.optim import OptimizerSet

    cfg = Config()
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = OptimizerSet(model, cfg)
    optimizers.set_schedule(1.0, cfg.muon_momentum)
    # NS5 work: 5 iterations x 3 matmuls of the (rows x cols) bank matrices, rows <= cols
    ns_flops = 0
    for bank in optimizers.muon.param_groups[0]["params"]:
        rows, cols = sorted(bank.shape[-2:])
        ns_flops += 5 * bank.shape[0] * (2 * 2 * rows * rows * cols + 2 * rows * rows * rows)
    gpu_time(benchmark, optimizers.step, group="optimizer step (seed model, 1 GPU)", label="muon+adamw",
             flops=ns_flops, params=sum(p.numel() for p in model.parameters()), benchmark="optimizer step",
             shape="seed model, 1 GPU")
