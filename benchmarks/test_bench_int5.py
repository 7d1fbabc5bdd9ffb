"""K3 int5 matmul on the GPU at the model's weight shapes (N x K = 512x512 Q/O, 256x512 K/V,
1536x512 MLP up with its LeakyReLU² epilogue, 512x1536 MLP down), bf16 x, against bf16 cuBLAS on the
dequantised weight (`torch.mm(x, w.t())`, no activation).

Every timed figure is per call, from a CUDA graph of many back-to-back calls (triton's do_bench
median of graph replays / calls): no host launch cost is counted, as a graph-captured evaluation
would run it.
- Large M (2048, 16384, 65,536 rows): the graph rotates several x buffers that together exceed
  the L2 (at 65,536 rows one x is already larger); each candidate kernel (an Int5Config) and auto.
- Small M (1, 16 rows): "hot" = one weight called repeatedly (in L2, as during decoding with the
  whole int5 model in L2); "cold" = distinct copies of the weight, more than 2x the L2 in total.

`python benchmarks/test_bench_int5.py --table [--out DIR] [--rounds R]` (one device command): compiles
every candidate in parallel processes, times all candidates at all shapes in R interleaved rounds
(default 3; a shape's contenders in a rotated order each round, the median kept, so that clock and
thermal drift during the table fall on every contender alike), prints a compact table with the best
candidate per shape and writes DIR/k3_table.json. `--sm90-check` (no GPU needed) compiles the
candidates for sm_90 offline and prints registers, spills and shared memory.
"""
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import pytest
import torch

from bench_utils import gpu_time, requires_cuda

DEVICE = "cuda"
WEIGHT_SHAPES = [(512, 512), (256, 512), (1536, 512), (512, 1536)]
LARGE_ROWS = [2048, 16384, 65536]
SMALL_ROWS = [1, 16]
L2_BYTES = 50 * 2**20  # H200
GRAPH_MS = 2.0  # GPU time of one captured graph (large M)


def activation_of(N, K):
    return "leaky_relu2" if (N, K) == (1536, 512) else None


def candidates():
    """The fused kernels to compare at large M (names are str(config))."""
    from recycore.kernels.int5 import RESIDENT, STREAM, Int5Config

    return [RESIDENT, dataclasses.replace(RESIDENT, num_stages=2), Int5Config("resident", 32, 128, 8, 4),
            Int5Config("resident", 32, 64, 4, 3, programs_per_sm=2),  # two programs per SM overlap
            STREAM, dataclasses.replace(STREAM, num_stages=3), Int5Config("stream", 256, 128, 8, 2),
            # 64-row x tiles: deeper prefetch (3-4 stages) at two CTAs per SM (offline sm_90: 86-113 KB of
            # shared memory, 93 / 167 registers); the 256-weight-row tiles they replace lost at every shape
            Int5Config("stream", 64, 128, 4, 4), Int5Config("stream", 64, 128, 8, 3),
            Int5Config("splitk", 256, 128, 8, 2, split_k=1)]


def small_m_candidates(M, K=None):
    """(name, impl, config) at M <= 16 rows: auto (SMALL_M_KERNEL), the gemv kernel's variants, the
    template as planned (its splits summed in the kernel) and with the same splits summed by a second
    launch, or with 8 splits; for rows of K <= RESIDENT_MAX_K (or K None: every name), the resident
    kernel with skinny weight tiles, every load of a program issued at once instead of one K step after
    another (offline sm_90: 118-121 registers, 16 KB of shared memory)."""
    from recycore.kernels.int5 import SMALL_M_BLOCK_N, Int5Config

    bm = 1 << (M - 1).bit_length()
    planned = Int5Config("splitk", max(16, bm), SMALL_M_BLOCK_N, 4, 3, group_m=1, reduce_in_kernel=1)
    runs = [("auto", "auto", None), ("gemv", "gemv", None), ("gemv:b2", "gemv", Int5Config("gemv", bm, 2, 4, 3)),
            ("gemv:b4w2", "gemv", Int5Config("gemv", bm, 4, 2, 3)), ("splitk", "splitk", None),
            ("splitk:2l", "splitk", dataclasses.replace(planned, reduce_in_kernel=0)),
            ("splitk:k8r", "splitk", dataclasses.replace(planned, split_k=8))]
    skinny = [(f"resident:{n}", "resident", Int5Config("resident", max(16, bm), n, 4, 1)) for n in (16, 32)]
    return runs + [run for run in skinny if K is None or fits(run[2], K)]


def fits(config, K):
    from recycore.kernels.int5 import RESIDENT_MAX_K

    return config.kernel != "resident" or K <= RESIDENT_MAX_K


def int5_bytes(N, K):
    return N * -(-K // 128) * 20 * 4 + 2 * N


def make_weight(N, K, seed=0):
    """A random int5 weight: (packed, scales, dequantised bf16 q * s)."""
    from recycore.kernels.int5 import pack_gpu_layout

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randint(-15, 16, (N, K), device=DEVICE, generator=g)
    scales = (torch.rand(N, device=DEVICE, generator=g) * 0.02 + 0.005).half()
    return pack_gpu_layout(q + 15), scales, (q.float() * scales.float()[:, None]).bfloat16()


def make_xs(M, K, count):
    return [torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16) for _ in range(count)]


def x_buffers(M, K):
    """How many x buffers to rotate so that together they exceed 2x the L2."""
    return max(1, min(64, math.ceil(2 * L2_BYTES / (M * K * 2))))


def op(impl, config, weight, N, K, activation):
    """x -> y for `impl`: "cublas" (torch.mm on the dequantised weight), or int5_linear(impl, config)."""
    from recycore.kernels import int5_linear

    packed, scales, dense = weight
    if impl == "cublas":
        return lambda x: torch.mm(x, dense.t())
    return lambda x: int5_linear(x, packed, scales, N, K, activation, impl=impl, config=config)


def graph_of(calls):
    """The calls as one CUDA graph replay (warm-up on a side stream first: compiles, allocator pools)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph.replay


def large_m_calls(fn, xs, M, N, K):
    """Back-to-back calls rotating the x buffers, about GRAPH_MS of GPU time at 500 TFLOP/s."""
    per_call_ms = 2 * M * N * K / 500e12 * 1e3
    n = max(len(xs), min(256, round(GRAPH_MS / per_call_ms)))
    return [lambda x=xs[i % len(xs)]: fn(x) for i in range(n)]


def small_m_calls(impl, N, K, M, mode, count=256, config=None):
    """hot: one weight `count` times; cold: distinct weight copies (> 2x L2 of our layout) in turn."""
    copies = 1 if mode == "hot" else min(count, math.ceil(2 * L2_BYTES / int5_bytes(N, K)))
    weights = [make_weight(N, K, seed=i) for i in range(copies)]
    x = make_xs(M, K, 1)[0]
    fns = [op(impl, config, w, N, K, None if impl == "cublas" else activation_of(N, K)) for w in weights]
    return [lambda f=fns[i % copies]: f(x) for i in range(count)]


def call_timer(calls, quick=False):
    """() -> ms per call of the calls, captured once as one graph (each timing a do_bench median)."""
    from triton.testing import do_bench

    replay = graph_of(calls)
    replay()
    torch.cuda.synchronize()
    return lambda: do_bench(replay, warmup=5 if quick else 25, rep=20 if quick else 100,
                            return_mode="median") / len(calls)


def time_calls(calls, quick=False):
    """ms per call of the calls captured as one graph (do_bench median)."""
    return call_timer(calls, quick)()


def time_rounds(timers, rounds):
    """{name: () -> ms} timed `rounds` times each, in an order rotated every round, so that clock and
    thermal drift fall on every contender alike -> {name: median ms, or the error of its set-up}."""
    times, results = {}, {}
    for name, make in timers.items():
        try:
            times[name] = (make(), [])
        except Exception as exc:
            results[name] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    names = list(times)
    for r in range(rounds):
        for name in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
            times[name][1].append(times[name][0]())
    results.update({name: statistics.median(ms) for name, (_, ms) in times.items()})
    return results


def test_time_rounds_interleaves_and_takes_medians():
    """(CPU) every contender once per round, in a rotated order; the median; a failing set-up named."""
    order = []

    def timer(name, values):
        values = iter(values)
        return lambda: order.append(name) or next(values)

    def broken():
        raise RuntimeError("no such kernel")

    got = time_rounds({"a": lambda: timer("a", [3.0, 1.0, 2.0]), "b": lambda: timer("b", [5.0, 4.0, 9.0]),
                       "c": broken}, rounds=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert got == {"a": 2.0, "b": 5.0, "c": "error: RuntimeError: no such kernel"}


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("impl", ["auto", "resident", "stream", "dequant", "cublas"])
@pytest.mark.parametrize("M", LARGE_ROWS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_int5_large_m(benchmark, shape, M, impl):
    N, K = shape
    if impl == "resident" and K > 512:
        pytest.skip("rows of > 512 values do not fit the resident kernel")
    torch.manual_seed(0)
    weight, xs = make_weight(N, K), make_xs(M, K, x_buffers(M, K))
    activation = None if impl == "cublas" else activation_of(N, K)
    calls = large_m_calls(op(impl, None, weight, N, K, activation), xs, M, N, K)
    baseline_ms = time_calls(large_m_calls(op("cublas", None, weight, N, K, None), xs, M, N, K), quick=True)
    replay = graph_of(calls)
    ms = gpu_time(benchmark, replay, group=f"K3 int5 {N}x{K} M={M}", label=impl, flops=2 * M * N * K * len(calls),
                  calls=len(calls), activation=activation or "none", baseline=impl == "cublas",
                  benchmark="K3 int5 matmul", shape=f"{N}x{K} M={M}") / len(calls)
    benchmark.extra_info.update(ms_per_call=ms, tflops_per_call=2 * M * N * K / ms / 1e9,
                                speedup_vs_cublas=baseline_ms / ms, cublas_ms_per_call=baseline_ms)


@requires_cuda
@pytest.mark.parametrize("impl", ["auto", "gemv", "cublas"])
@pytest.mark.parametrize("mode", ["hot", "cold"])
@pytest.mark.parametrize("M", SMALL_ROWS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_int5_small_m(benchmark, shape, M, mode, impl):
    N, K = shape
    torch.manual_seed(0)
    calls = small_m_calls(impl, N, K, M, mode)
    baseline_ms = time_calls(small_m_calls("cublas", N, K, M, mode), quick=True)
    replay = graph_of(calls)
    ms = gpu_time(benchmark, replay, group=f"K3 int5 {N}x{K} M={M} {mode}", label=impl, calls=len(calls),
                  flops=2 * M * N * K * len(calls), baseline=impl == "cublas",
                  benchmark="K3 int5 matmul", shape=f"{N}x{K} M={M} {mode}") / len(calls)
    benchmark.extra_info.update(us_per_call=ms * 1e3, speedup_vs_cublas=baseline_ms / ms,
                                cublas_us_per_call=baseline_ms * 1e3)


# ----------------------------------------------------------------------------------------------
# --table: every candidate at every shape, one device command
# ----------------------------------------------------------------------------------------------
def _table_cases():
    """(impl, config list or None, N, K, M, activation) of every fused call the table makes."""
    cases = []
    for N, K in WEIGHT_SHAPES:
        act = activation_of(N, K)
        for M in LARGE_ROWS:
            cases += [(c.kernel, c.as_list(), N, K, M, act) for c in candidates() if fits(c, K)]
            cases += [("auto", None, N, K, M, act), ("dequant", None, N, K, M, act)]
        cases += [(impl, None if c is None else c.as_list(), N, K, M, act)
                  for M in SMALL_ROWS for _, impl, c in small_m_candidates(M, K)]
    return cases


def _compile_worker(cases):
    """Runs each case once (fills Triton's on-disk cache for the timing process) and checks its result
    against cuBLAS on the dequantised weight: a candidate that computes something else is an error."""
    import torch.nn.functional as F

    from recycore.kernels.int5 import Int5Config

    errors = []
    for impl, config, N, K, M, act in cases:
        try:
            weight = make_weight(N, K)
            x = make_xs(M, K, 1)[0]
            y = op(impl, None if config is None else Int5Config.from_list(config), weight, N, K, act)(x).float()
            ref = op("cublas", None, weight, N, K, None)(x).float()
            if act:
                ref = F.leaky_relu(ref, 0.5).square()
            err = ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            if not err < 1e-2:  # bf16 outputs: ~3e-3
                errors.append(f"{impl} {config} {N}x{K} M={M}: wrong result, relative error {err:.3g}")
        except Exception as exc:  # the timing pass reports it again
            errors.append(f"{impl} {config} {N}x{K} M={M}: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.synchronize()
    return errors


def precompile(cases, processes=8):
    import multiprocessing

    chunks = [cases[i::processes] for i in range(processes) if cases[i::processes]]
    with multiprocessing.get_context("spawn").Pool(len(chunks)) as pool:
        return [e for errors in pool.map(_compile_worker, chunks) for e in errors]


def table(out_dir=None, rounds=3):
    import triton

    start = time.perf_counter()
    errors = precompile(_table_cases())
    print(f"compiled and checked in {time.perf_counter() - start:.0f} s; errors: {errors}", flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "large_m": [], "small_m": [], "compile_errors": errors}
    names = [str(c) for c in candidates()]
    print(f"\n{report['gpu']}, torch {report['torch']}, triton {report['triton']}: per call, CUDA graphs; "
          f"ratio = cuBLAS ms / ours (>= 1: ours faster), medians of {rounds} interleaved rounds; ours with the "
          "model's activation (up: LeakyReLU²)")
    print(f"{'shape':9s} {'M':>6s} {'cuBLAS ms':>10s} {'TFLOP/s':>7s} {'auto':>5s} {'deq':>5s} "
          + " ".join(f"c{i}" .rjust(5) for i in range(len(names))))
    torch.manual_seed(0)
    for N, K in WEIGHT_SHAPES:
        act = activation_of(N, K)
        weight = make_weight(N, K)
        for M in LARGE_ROWS:
            xs = make_xs(M, K, x_buffers(M, K))
            runs = {"cublas": ("cublas", None, None), "auto": ("auto", None, act), "dequant": ("dequant", None, act)}
            runs.update({str(c): (c.kernel, c, act) for c in candidates() if fits(c, K)})
            row = {"shape": f"{N}x{K}", "M": M, "activation": act or "none", "ms": time_rounds(
                {name: lambda impl=impl, config=config, a=a, xs=xs: call_timer(large_m_calls(
                    op(impl, config, weight, N, K, a), xs, M, N, K)) for name, (impl, config, a) in runs.items()},
                rounds)}
            base = row["ms"]["cublas"]
            row["ratio"] = {k: base / v for k, v in row["ms"].items() if isinstance(v, float)}
            report["large_m"].append(row)
            cells = [f"{row['ratio'][k]:5.2f}" if k in row["ratio"] else ("  err" if k in row["ms"] else "    -")
                     for k in ["auto", "dequant", *names]]
            print(f"{N}x{K:<5d} {M:6d} {base:10.4f} {2 * M * N * K / base / 1e9:7.0f} " + " ".join(cells), flush=True)
            del xs
    print("candidates: " + "; ".join(f"c{i} = {n}" for i, n in enumerate(names)))
    best = []
    for r in report["large_m"]:
        ratios = {k: v for k, v in r["ratio"].items() if k in names}
        if r["M"] == 65536 and ratios:
            name = max(ratios, key=ratios.get)
            best.append(f"{r['shape']}: {name} {ratios[name]:.2f}x")
    report["best_at_65536"] = best
    print("best at M = 65,536: " + "; ".join(best))
    small_names = [name for name, _, _ in small_m_candidates(1)]
    print(f"\n{'shape':9s} {'M':>3s} {'mode':4s} {'cuBLAS us':>9s} " + " ".join(n.rjust(9) for n in small_names)
          + "   (ratio = cuBLAS us / ours)")
    for N, K in WEIGHT_SHAPES:
        for M in SMALL_ROWS:
            for mode in ("hot", "cold"):
                runs = [("cublas", "cublas", None), *small_m_candidates(M, K)]
                ms = time_rounds({name: lambda impl=impl, config=config: call_timer(small_m_calls(
                    impl, N, K, M, mode, config=config)) for name, impl, config in runs}, rounds)
                base = ms.pop("cublas")
                row = {"shape": f"{N}x{K}", "M": M, "mode": mode, "cublas_us": base * 1e3, "us": {}, "ratio": {}}
                for name, value in ms.items():
                    row["us"][name] = value * 1e3 if isinstance(value, float) else value
                    if isinstance(value, float):
                        row["ratio"][name] = base / value
                report["small_m"].append(row)
                cells = [f"{row['ratio'][n]:8.2f}x" if n in row["ratio"] else ("      err" if n in ms else "        -")
                         for n in small_names]
                print(f"{N}x{K:<5d} {M:3d} {mode:4s} {base * 1e3:9.2f} " + " ".join(cells), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "k3_table.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out_dir, "k3_rows.jsonl"), "w") as f:  # for report.py --import-pytest-benchmark
            f.writelines(json.dumps(row) + "\n" for row in table_rows(report))


def table_rows(report) -> list[dict]:
    """The table's timings as rows of the results history (without the run's metadata)."""
    rows = []
    for r in report["large_m"]:
        note = ("per call, CUDA graph of back-to-back calls; x rotated beyond L2; activation "
                f"{r['activation']}")
        rows += [{"benchmark": "K3 int5 matmul", "shape": f"{r['shape']} M={r['M']}", "variant": name,
                  "statistic": "ms_per_call", "value": ms, "unit": "ms", "baseline": name == "cublas", "note": note}
                 for name, ms in r["ms"].items() if isinstance(ms, float)]
    for r in report["small_m"]:
        shape = f"{r['shape']} M={r['M']} {r['mode']}"
        rows.append({"benchmark": "K3 int5 matmul small M", "shape": shape, "variant": "cublas",
                     "statistic": "us_per_call", "value": r["cublas_us"], "unit": "us", "baseline": True})
        rows += [{"benchmark": "K3 int5 matmul small M", "shape": shape, "variant": name, "statistic": "us_per_call",
                  "value": us, "unit": "us", "baseline": False} for name, us in r["us"].items() if isinstance(us, float)]
    return rows


def sm90_check():
    """Offline sm_90 compile of each candidate (no GPU): registers, spill bytes, shared memory."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from recycore.kernels import int5

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for config in candidates():
        if config.kernel == "splitk":
            continue
        for act in (0, 1):
            kp = 512 if config.kernel == "resident" else 128
            sig = {"x_desc": f"tensordesc<bf16[{config.block_m},{kp}]>", "x_ptr": "*bf16", "w_ptr": "*i32",
                   "scale_ptr": "*fp16", "y_desc": f"tensordesc<bf16[{config.block_m},{config.block_n}]>",
                   "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                   "tiles_per_program": "i32"}
            consts = dict(ACT=act, TMA_X=True, TMA_Y=True, UPCAST=False, DOT_PRECISION="tf32",
                          BLOCK_M=config.block_m, BLOCK_N=config.block_n)
            if config.kernel == "resident":
                fn, consts["GROUPS"] = int5._int5_resident_kernel, 4
            else:
                fn, consts["GROUP_M"] = int5._int5_stream_kernel, config.group_m
            signature = {n: ("constexpr" if n in consts else sig[n]) for n in fn.arg_names}
            div16 = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
                     for n in ("x_ptr", "w_ptr", "scale_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn")}
            kernel = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=div16),
                                    target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                                       capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            print(f"{str(config):32s} act={act} regs={regs[1]} stack={regs[2]} smem={kernel.metadata.shared}"
                  f" (limit 232448)", flush=True)


if __name__ == "__main__":
    if "--sm90-check" in sys.argv:
        sm90_check()
    elif "--table" in sys.argv:
        out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
        table(out, int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3)
    else:
        print(__doc__)


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
