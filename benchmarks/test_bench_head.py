"""K4 fused head on the GPU: final RMSNorm + tied projection (V = 1024, d = 512) + soft-cap 30 +
mean cross-entropy, forward+backward, bf16 x and weight under bf16 autocast, N = 98,304 (48 x 2048)
and 24,576 tokens:
  ours          = recycore.kernels.head.softcap_cross_entropy (chunked; cuBLAS GEMMs + Triton kernels)
  ref_compiled  = softcap_cross_entropy_reference under torch.compile (default mode, fullgraph)
  ref_eager     = the same chain in eager mode (what the seed's model runs without compile)
TFLOP/s count the 3 GEMMs (logits, dh, dW) of 2*N*d*V each; forward-only rows (token NLL) count one.
Peak memory: torch.cuda.max_memory_allocated during one step, minus what was allocated before it.

`python3 benchmarks/test_bench_head.py [OUT.json]` prints the whole comparison as a table (plus a
chunk-size sweep, the fp32/bf16 GEMM-output variants, CUDA-graph replays, a CE-kernel config sweep,
a kernel profile of ours and the numerics at N = 98,304) in about a minute or two on an H200.
"""
import json
import sys
import time

import pytest
import torch

from bench_utils import gpu_time, requires_cuda

D, V, CAP = 512, 1024, 30.0
SIZES = (48 * 2048, 12 * 2048)


def gemm_flops(n, gemms=3):
    return gemms * 2 * n * D * V


def make_inputs(n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, D, device="cuda", generator=g).bfloat16().requires_grad_()
    # logits of std ~4 (a trained head's scale; the soft-cap bends the largest)
    w = (torch.randn(V, D, device="cuda", generator=g) * 4 / D**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    return x, w, t


_COMPILED = {}


def loss_fn(name):
    """name -> f(x, w, t) -> loss. ours[_c<rows>][_bf16out]; ref_compiled; ref_eager."""
    from recycore.kernels import head

    if name.startswith("ours"):
        kw = {"chunk_rows": 0, "fp32_gemm_out": "bf16out" not in name}
        for part in name.split("_"):
            if part.startswith("c") and part[1:].isdigit():
                kw["chunk_rows"] = int(part[1:])
        return lambda x, w, t: head.softcap_cross_entropy(x, w, t, CAP, **kw)
    if name == "ref_compiled":
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(head.softcap_cross_entropy_reference, fullgraph=True, dynamic=False)
        return lambda x, w, t: _COMPILED[name](x, w, t, CAP)
    if name == "ref_eager":
        return lambda x, w, t: head.softcap_cross_entropy_reference(x, w, t, CAP)
    raise ValueError(name)


def nll_fn(name):
    from recycore.kernels import head

    if name == "ours":
        return lambda x, w, t: head.softcap_token_nll(x, w, t, CAP)
    if "nll" not in _COMPILED:
        _COMPILED["nll"] = torch.compile(head.softcap_token_nll_reference, fullgraph=True, dynamic=False)
    return lambda x, w, t: _COMPILED["nll"](x, w, t, CAP)


def fwd_bwd_step(fn, x, w, t):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, w, t)
        torch.autograd.grad(loss, (x, w))
    return step


def fwd_step(fn, x, w, t):
    x, w = x.detach(), w.detach()

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fn(x, w, t)
    return step


def peak_mib(step):
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@requires_cuda
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name", ["ours", "ref_compiled", "ref_eager"])
def test_bench_head_fwd_bwd(benchmark, name, n):
    step = fwd_bwd_step(loss_fn(name), *make_inputs(n))
    peak = peak_mib(step)
    gpu_time(benchmark, step, group=f"K4 head fwd+bwd N={n}", label=name, flops=gemm_flops(n),
             peak_mib=peak, baseline=name == "ref_compiled")


@requires_cuda
@pytest.mark.parametrize("name", ["ours", "ref_compiled"])
def test_bench_head_token_nll(benchmark, name):
    n = SIZES[0]
    step = fwd_step(nll_fn(name), *make_inputs(n))
    peak = peak_mib(step)
    gpu_time(benchmark, step, group=f"K4 head token NLL N={n}", label=name, flops=gemm_flops(n, 1),
             peak_mib=peak, baseline=name == "ref_compiled")


# ----------------------------------------------------------------------------------------------
# One device command: python3 benchmarks/test_bench_head.py [OUT.json]
# ----------------------------------------------------------------------------------------------
def _bench(step, graph=False):
    from triton.testing import do_bench, do_bench_cudagraph

    step()
    torch.cuda.synchronize()
    if graph:
        return do_bench_cudagraph(step, rep=100, return_mode="median")
    return do_bench(step, warmup=25, rep=150, return_mode="median")


def _row(rows, key, fn):
    try:
        rows[key] = fn()
    except Exception as exc:  # recorded, not fatal: the rest of the table still prints
        rows[key] = f"error: {type(exc).__name__}: {str(exc)[:160]}"


def _ce_kernel_sweep(n_rows=8192):
    """The soft-cap CE kernel alone on one default chunk (fp32 logits in, bf16 dz out) per
    (BLOCK_M rows per program, num_warps)."""
    import triton

    from recycore.kernels import head

    z = torch.randn(n_rows, V, device="cuda") * 4
    dz = torch.empty(n_rows, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (n_rows,), device="cuda")
    loss = torch.empty(n_rows, device="cuda")
    count = torch.tensor(n_rows, device="cuda")
    out = {}
    for block_m, warps in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 16)):
        def run():
            head._softcap_ce_kernel[(triton.cdiv(n_rows, block_m),)](
                z, dz, t, loss, count, n_rows, V, z.stride(0), dz.stride(0), CAP, 1 / CAP, head.IGNORE_INDEX,
                BLOCK_M=block_m, BLOCK_V=V, COMPUTE_GRAD=True, UPCAST=False, num_warps=warps)
        _row(out, f"BLOCK_M={block_m} warps={warps}",
             lambda: (lambda ms: f"{ms * 1e3:.1f} us  {n_rows * V * 6 / ms / 1e9:.2f} TB/s")(_bench(run)))
    return out


def _numerics(n):
    from recycore.kernels import head

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    x, w, t = make_inputs(n, seed=1)
    res = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head.softcap_cross_entropy(x, w, t, CAP)
        ref = head.softcap_cross_entropy_reference(x, w, t, CAP)
    dx, dw = torch.autograd.grad(loss, (x, w))
    rdx, rdw = torch.autograd.grad(ref, (x, w))
    x64, w64 = (a.detach().double().requires_grad_() for a in (x, w))
    h = torch.nn.functional.rms_norm(x64, (D,), eps=torch.finfo(torch.float32).eps)
    l64 = torch.nn.functional.cross_entropy(CAP * torch.tanh(h @ w64.t() / CAP), t)
    dx64, dw64 = torch.autograd.grad(l64, (x64, w64))
    res["loss ours / ref / float64"] = f"{loss.item():.6f} / {ref.item():.6f} / {l64.item():.6f}"
    res["rel err vs float64 (loss, dx, dW): ours"] = f"{rel(loss, l64):.2e} {rel(dx, dx64):.2e} {rel(dw, dw64):.2e}"
    res["rel err vs float64 (loss, dx, dW): ref "] = f"{rel(ref, l64):.2e} {rel(rdx, dx64):.2e} {rel(rdw, dw64):.2e}"
    return res


def main(out_path=None):
    import triton

    start = time.time()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "fwd_bwd": {}, "token_nll": {}}
    names = {SIZES[0]: ["ours", "ours_c4096", "ours_c16384", "ours_c98304", "ours_bf16out", "ref_compiled",
                        "ref_eager"],
             SIZES[1]: ["ours", "ours_c4096", "ours_bf16out", "ref_compiled", "ref_eager"]}
    for n in SIZES:
        inputs = make_inputs(n)
        for name in names[n]:
            row = report["fwd_bwd"].setdefault(f"N={n} {name}", {})
            t0 = time.time()
            try:
                step = fwd_bwd_step(loss_fn(name), *inputs)
                step()
                torch.cuda.synchronize()
            except Exception as exc:
                row["ms"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            row["first_call_s"] = time.time() - t0
            _row(row, "ms", lambda: _bench(step))
            if isinstance(row["ms"], float):
                row["tflops"] = gemm_flops(n) / row["ms"] / 1e9
            _row(row, "peak_mib", lambda: peak_mib(step))
            if name in ("ours", "ref_compiled"):
                _row(row, "graph_ms", lambda: _bench(step, graph=True))
    n = SIZES[0]
    inputs = make_inputs(n)
    for name in ("ours", "ref_compiled"):
        row = report["token_nll"].setdefault(f"N={n} {name}", {})
        step = fwd_step(nll_fn(name), *inputs)
        _row(row, "ms", lambda: _bench(step))
        _row(row, "peak_mib", lambda: peak_mib(step))
    _row(report, "ce_kernel_8192_rows", _ce_kernel_sweep)
    _row(report, "numerics_N98304", lambda: _numerics(SIZES[0]))
    try:
        step = fwd_bwd_step(loss_fn("ours"), *make_inputs(SIZES[0]))
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        report["profile_ours"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    except Exception as exc:
        report["profile_ours"] = f"error: {type(exc).__name__}: {exc}"
    report["wall_s"] = time.time() - start

    def cell(v, fmt):
        return fmt.format(v) if isinstance(v, float) else ("-" if v is None else str(v)[:60])

    print(f"{report['gpu']}  torch {report['torch']}  triton {report['triton']}  wall {report['wall_s']:.0f}s")
    print(f"{'fwd+bwd':28s} {'ms':>8s} {'graph ms':>9s} {'TFLOP/s':>8s} {'peak MiB':>9s} {'1st call s':>10s}")
    for key, row in report["fwd_bwd"].items():
        print(f"{key:28s} {cell(row.get('ms'), '{:8.3f}'):>8s} {cell(row.get('graph_ms'), '{:9.3f}'):>9s} "
              f"{cell(row.get('tflops'), '{:8.1f}'):>8s} {cell(row.get('peak_mib'), '{:9.1f}'):>9s} "
              f"{cell(row.get('first_call_s'), '{:10.1f}'):>10s}")
    print(f"{'token NLL (forward only)':28s} {'ms':>8s} {'peak MiB':>9s}")
    for key, row in report["token_nll"].items():
        print(f"{key:28s} {cell(row.get('ms'), '{:8.3f}'):>8s} {cell(row.get('peak_mib'), '{:9.1f}'):>9s}")
    for section in ("ce_kernel_8192_rows", "numerics_N98304"):
        print(section + ":")
        items = report[section].items() if isinstance(report[section], dict) else [("", report[section])]
        for key, val in items:
            print(f"  {key:42s} {val}")
    print(report["profile_ours"])
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("benchmarks/test_bench_head.py needs a CUDA GPU")
    main(sys.argv[1] if len(sys.argv) > 1 else None)
