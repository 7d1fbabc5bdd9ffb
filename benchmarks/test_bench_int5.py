"""K3 int5 dequant-matmul on the GPU at the model's weight shapes (512x512, 256x512, 1536x512,
512x1536) for M in {1, 16, 64, 2048, 65536} bf16 rows:
  ours = recycore.kernels.int5_linear as the model runs it (impl="auto": the fused kernel, unpacking
  in registers, for M <= 64; above, the matrix decoded into a transient bf16 buffer + cuBLAS);
  ours_fused = the fused kernel at every M (M >= 2048 rows only: below it is what `ours` runs);
  baseline = bf16 cuBLAS (F.linear) on the dequantised weights.
For M <= 2048 one timed call is a CUDA graph of `calls` back-to-back calls, each on its own copy of
the weight, so the weights are read from HBM (the copies of our layout add up to > 2x the L2) and
launch overhead is not measured; ms are per graph, TB/s count the weight bytes each call reads
(ours: 5 bits/weight + fp16 scales; baseline: 2 bytes/weight). M = 65,536 is one plain call.

`python benchmarks/test_bench_int5.py OUT_DIR --precompile` compiles the sweep's kernels in parallel
processes; `python benchmarks/test_bench_int5.py OUT_DIR` sweeps the large-M tile configs and the
small-M (split-K) variants, keeps the best, prints the ours-vs-cuBLAS table and writes OUT_DIR/k3_sweep.json.
"""
import dataclasses
import json
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from bench_utils import gpu_time, requires_cuda

DEVICE = "cuda"
WEIGHT_SHAPES = [(512, 512), (256, 512), (1536, 512), (512, 1536)]
ROWS = [1, 16, 64, 2048, 65536]
L2_BYTES = 60e6


def int5_bytes(N, K):
    return N * -(-K // 128) * 20 * 4 + 2 * N


def make_weights(N, K, copies):
    """`copies` distinct copies of one random int5 weight: (packed, scales, dequantised bf16)."""
    from recycore.kernels.int5 import pack_gpu_layout

    q = torch.randint(-15, 16, (N, K), device=DEVICE)
    scales = (torch.rand(N, device=DEVICE) * 0.02 + 0.005).half()
    packed = pack_gpu_layout(q + 15)
    dequantised = (q.float() * scales.float()[:, None]).bfloat16()
    return [(packed.clone(), scales.clone(), dequantised.clone()) for _ in range(copies)]


def weight_copies(N, K, M):
    return 1 if M > 2048 else min(512, int(-(-2 * L2_BYTES // int5_bytes(N, K))))


def make_calls(impl, weights, N, K, M, activation=None):
    from recycore.kernels import int5_linear

    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    if impl.startswith("ours"):
        how = "fused" if impl == "ours_fused" else "auto"
        return [lambda p=p, s=s: int5_linear(x, p, s, N, K, activation, impl=how) for p, s, _ in weights]
    return [lambda w=w: F.linear(x, w) for _, _, w in weights]


def as_one_fn(calls):
    """The calls as one function: a CUDA graph replaying them back to back, or the single call."""
    if len(calls) == 1:
        return calls[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: compiles, allocator pools
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph.replay


@requires_cuda
@pytest.mark.parametrize("impl", ["ours", "ours_fused", "cublas_bf16"])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_int5(benchmark, shape, M, impl):
    N, K = shape
    if impl == "ours_fused" and M < 2048:
        pytest.skip("below 2048 rows `ours` is the fused kernel")
    torch.manual_seed(0)
    calls = make_calls(impl, make_weights(N, K, weight_copies(N, K, M)), N, K, M)
    weight_bytes = 2 * N * K if impl == "cublas_bf16" else int5_bytes(N, K)
    gpu_time(benchmark, as_one_fn(calls), group=f"K3 int5 {N}x{K} M={M}", label=impl,
             flops=2 * M * N * K * len(calls), bytes_moved=weight_bytes * len(calls), calls=len(calls),
             baseline=impl == "cublas_bf16", benchmark="K3 int5 matmul", shape=f"{N}x{K} M={M}")


# ----------------------------------------------------------------------------------------------
# Sweep (one GPU call): large-M tile configs, small-M split-K variants, then the table -> JSON
# ----------------------------------------------------------------------------------------------
def _large_m_configs():
    from recycore.kernels.gemm import GemmConfig

    # block_n = weight rows = the MMA's M side (64 per warpgroup); 256-row tiles at 3 stages do not fit.
    return [GemmConfig(128, 128, 128, 8, 8, 3), GemmConfig(128, 128, 128, 8, 8, 2), GemmConfig(64, 128, 128, 8, 8, 3),
            GemmConfig(128, 64, 128, 8, 4, 3), GemmConfig(256, 128, 128, 8, 8, 2), GemmConfig(128, 256, 128, 8, 8, 3)]


SMALL_M_VARIANTS = [(block_n, programs) for block_n in (16, 32, 64) for programs in (0, 2, 4)]


def _configure(large=None, small=None):
    from recycore.kernels import int5

    if large is not None:
        int5.LARGE_M_CONFIG = large
    if small is not None:
        int5.SMALL_M_BLOCK_N, int5.SMALL_M_PROGRAMS_PER_SM = small


def _k3_worker(cases):
    """Runs int5_linear once per (large config | small variant, M, N, K, activation) case."""
    errors = []
    for large, small, M, N, K, activation in cases:
        try:
            _configure(large, small)
            (call,) = make_calls("ours_fused", make_weights(N, K, 1), N, K, M, activation)
            call()
        except Exception as exc:
            errors.append(f"{large} {small} M={M}: {type(exc).__name__}: {str(exc)[:160]}")
    torch.cuda.synchronize()
    return errors


def _total(times):
    """Sum of timings; a failed one (an error string) disqualifies."""
    return sum(t if isinstance(t, float) else float("inf") for t in times)


def _ms(fn):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=5, rep=60, return_mode="median")


def precompile_sweep(out_dir):
    from test_bench_mlp import precompile

    os.makedirs(out_dir, exist_ok=True)
    # Binaries depend on M == 1 and the block/split/activation constexprs, not on N and K here.
    cases = [(c, None, 256, 512, 512, act) for c in _large_m_configs() for act in (None, "leaky_relu2")]
    cases += [(None, v, M, 1536, 512, None) for v in SMALL_M_VARIANTS for M in (1, 16, 64)]
    start = time.perf_counter()
    errors = precompile(_k3_worker, cases)
    with open(os.path.join(out_dir, "k3_precompile.json"), "w") as f:
        json.dump({"cases": len(cases), "seconds": time.perf_counter() - start, "errors": errors}, f, indent=1)
    print(f"K3: precompiled {len(cases)} cases in {time.perf_counter() - start:.1f} s", errors, flush=True)


def sweep(out_dir):
    import triton

    os.makedirs(out_dir, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "large_m": {}, "small_m": {}, "table": []}

    def dump():
        with open(os.path.join(out_dir, "k3_sweep.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    torch.manual_seed(0)
    weights = {(N, K, M): make_weights(N, K, weight_copies(N, K, M)) for N, K in WEIGHT_SHAPES for M in (1, 65536)}
    for c in _large_m_configs():
        _configure(large=c)
        for N, K in WEIGHT_SHAPES:
            key = f"{c} {N}x{K}"
            try:
                report["large_m"][key] = _ms(as_one_fn(make_calls("ours_fused", weights[N, K, 65536], N, K, 65536)))
            except Exception as exc:
                report["large_m"][key] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            print(f"large M {key:80s} {report['large_m'][key]}", flush=True)
    dump()
    best_large = min(_large_m_configs(),
                     key=lambda c: _total(report["large_m"][f"{c} {N}x{K}"] for N, K in WEIGHT_SHAPES))

    for variant in SMALL_M_VARIANTS:
        _configure(small=variant)
        for M in (1, 16):
            for N, K in WEIGHT_SHAPES:
                calls = make_calls("ours", weights[N, K, 1], N, K, M)
                key = f"block_n={variant[0]} programs/SM={variant[1]} M={M} {N}x{K}"
                try:
                    report["small_m"][key] = _ms(as_one_fn(calls)) / len(calls)
                except Exception as exc:
                    report["small_m"][key] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                print(f"small M {key:60s} {report['small_m'][key]}", flush=True)
    dump()
    best_small = min(SMALL_M_VARIANTS, key=lambda v: _total(
        report["small_m"][f"block_n={v[0]} programs/SM={v[1]} M={M} {N}x{K}"]
        for M in (1, 16) for N, K in WEIGHT_SHAPES))
    report["chosen"] = {"large_m": dataclasses.asdict(best_large), "small_m": best_small}
    _configure(best_large, best_small)
    print("chosen:", report["chosen"], flush=True)

    print(f"\n{'shape':10s} {'M':>6s} {'calls':>5s} {'ours ms/call':>13s} {'cuBLAS ms/call':>15s} {'speedup':>8s} "
          f"{'ours TB/s':>10s} {'cuBLAS TB/s':>12s}")
    for N, K in WEIGHT_SHAPES:
        for M in ROWS:
            weights = make_weights(N, K, weight_copies(N, K, M))
            row = {"shape": f"{N}x{K}", "M": M, "calls": len(weights)}
            for impl, nbytes in (("ours", int5_bytes(N, K)), ("cublas_bf16", 2 * N * K)):
                calls = make_calls(impl, weights, N, K, M)
                row[f"{impl}_ms"] = _ms(as_one_fn(calls)) / len(calls)
                row[f"{impl}_tbps"] = nbytes / row[f"{impl}_ms"] / 1e9
            row["speedup"] = row["cublas_bf16_ms"] / row["ours_ms"]
            report["table"].append(row)
            dump()
            print(f"{row['shape']:10s} {M:6d} {row['calls']:5d} {row['ours_ms']:13.5f} {row['cublas_bf16_ms']:15.5f} "
                  f"{row['speedup']:7.2f}x {row['ours_tbps']:10.2f} {row['cublas_bf16_tbps']:12.2f}", flush=True)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    if "--precompile" in sys.argv:
        precompile_sweep(out)
    else:
        sweep(out)


# ----------------------------------------------------------------------------------------------
# Whole sliding-window evaluation: the seed model from an int5 artifact, int5-direct vs dequantised
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_artifact(tmp_path_factory):
    """An artifact of the seed config with random (non-zero) weights; exported once."""
    from recycore.artifact import export_artifact
    from recycore.config import Config
    from recycore.model import GPT

    cfg = Config()
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    path = tmp_path_factory.mktemp("artifact") / "seed_random.int5.ptz"
    export_artifact(model.state_dict(), cfg, path)
    return path, cfg


@requires_cuda
@pytest.mark.parametrize("path", ["int5_direct", "dequantised"])
def test_bench_eval_throughput(benchmark, seed_artifact, path):
    """One batch of the sliding-window evaluation (EVAL_BATCH_SEQS windows of EVAL_SEQ_LEN tokens,
    forward + per-token NLL), both models under torch.compile as `recycore eval` runs them."""
    from recycore.artifact import build_eval_model, load_artifact
    from recycore.evaluate import token_nll
    from recycore.int5_model import load_int5_model, weight_bytes

    artifact_path, cfg = seed_artifact
    if path == "int5_direct":
        model, cfg, _ = load_int5_model(artifact_path, cfg, DEVICE)
    else:
        state_dict, cfg, _ = load_artifact(artifact_path, cfg)
        model = build_eval_model(state_dict, cfg, DEVICE)
    logits_fn = torch.compile(model.forward_logits, dynamic=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (cfg.eval_batch_seqs, cfg.eval_seq_len + 1), generator=g).to(DEVICE)
    x, y = ids[:, :-1], ids[:, 1:]

    def batch():
        with torch.no_grad():
            token_nll(logits_fn, x, y)

    ms = gpu_time(benchmark, batch, group=f"eval batch ({cfg.eval_batch_seqs}x{cfg.eval_seq_len}, seed model)",
                  label=path, baseline=path == "dequantised", weight_bytes=weight_bytes(model)["total"],
                  benchmark="eval batch", shape=f"{cfg.eval_batch_seqs}x{cfg.eval_seq_len}, seed model")
    windows_per_s = cfg.eval_batch_seqs / ms * 1e3
    benchmark.extra_info.update(windows_per_s=windows_per_s, tokens_per_s=windows_per_s * cfg.eval_seq_len,
                                scored_tokens_per_s=windows_per_s * cfg.eval_stride)
