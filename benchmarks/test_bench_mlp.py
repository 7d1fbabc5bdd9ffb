"""K1 fused LeakyReLU² MLP on the GPU at the seed shape (M = 48 x 2048 = 98,304 rows, d = 512,
h = 1536, bf16 activations, fp32 master weights), forward and forward+backward:
  ours = recycore.kernels.leaky_relu2_mlp (Triton GEMM template, pre saved, post recomputed);
  baseline = the same math (leaky_relu2_mlp_reference) under torch.compile(mode="max-autotune");
  cublas = the bare cuBLAS GEMMs alone (up + down; the 6 GEMMs of forward+backward), no activation.
TFLOP/s count the GEMMs: 2 * 2*M*d*h forward, 6 * 2*M*d*h forward+backward.

`python benchmarks/test_bench_mlp.py OUT_DIR` sweeps block configs and split-K for each of the six
GEMMs, times the alternatives of each (post stored vs recomputed, Triton vs cuBLAS), prints the
table and writes OUT_DIR/k1_sweep.json.
"""
import json
import os
import sys
import time

import pytest
import torch

from bench_utils import gpu_time, requires_cuda

SEED_M, SEED_D, SEED_H = 48 * 2048, 512, 1536
GEMM_FLOPS = 2 * SEED_M * SEED_D * SEED_H
DEVICE = "cuda"


def make_inputs(requires_grad):
    u = torch.randn(SEED_M, SEED_D, device="cuda", dtype=torch.bfloat16)
    w_up = torch.randn(SEED_H, SEED_D, device="cuda") / SEED_D**0.5
    w_down = torch.randn(SEED_D, SEED_H, device="cuda") / SEED_H**0.5
    return [t.requires_grad_(requires_grad) for t in (u, w_up, w_down)]


def _cublas_gemms(u, w_up, w_down, backward):
    """The GEMMs alone, into preallocated outputs: up + down (+ the 4 backward GEMMs)."""
    u, w_up, w_down = u.detach(), w_up.detach().bfloat16(), w_down.detach().bfloat16()
    pre = torch.empty(SEED_M, SEED_H, device="cuda", dtype=torch.bfloat16)
    out, du = torch.empty_like(u), torch.empty_like(u)
    d_out, d_pre = torch.randn_like(u), torch.empty_like(pre)
    dw_up, dw_down = torch.empty_like(w_up), torch.empty_like(w_down)

    def step():
        torch.mm(u, w_up.t(), out=pre)
        torch.mm(pre, w_down.t(), out=out)
        if backward:
            torch.mm(d_out, w_down, out=d_pre)
            torch.mm(d_out.t(), pre, out=dw_down)
            torch.mm(d_pre, w_up, out=du)
            torch.mm(d_pre.t(), u, out=dw_up)
    return step


_COMPILED = {}


def _step(name, inputs, backward):
    from recycore.kernels import leaky_relu2_mlp, leaky_relu2_mlp_reference

    if name == "cublas_gemms_only":
        return _cublas_gemms(*inputs, backward)
    if name == "ours":
        fn = leaky_relu2_mlp
    else:
        if "max_autotune" not in _COMPILED:
            _COMPILED["max_autotune"] = torch.compile(leaky_relu2_mlp_reference, mode="max-autotune", fullgraph=True)
        fn = _COMPILED["max_autotune"]
    if not backward:
        def forward():
            with torch.no_grad():
                fn(*inputs)
        return forward
    d_out = torch.randn_like(inputs[0])

    def forward_backward():
        torch.autograd.grad(fn(*inputs), inputs, d_out)
    return forward_backward


@requires_cuda
@pytest.mark.parametrize("name", ["ours", "max_autotune", "cublas_gemms_only"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_bench_mlp(benchmark, name, backward):
    torch.manual_seed(0)
    step = _step(name, make_inputs(requires_grad=backward), backward)
    gpu_time(benchmark, step, group=f"K1 MLP {'fwd+bwd' if backward else 'fwd'}", label=name,
             flops=(6 if backward else 2) * GEMM_FLOPS, baseline=name == "max_autotune")


# ----------------------------------------------------------------------------------------------
# Sweep (one GPU call): every GEMM of the MLP over block configs / split-K / alternatives -> JSON
# ----------------------------------------------------------------------------------------------
def _candidate_configs():
    from recycore.kernels.gemm import GemmConfig

    big_m = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 256, 64, 8, 8, 4), GemmConfig(256, 128, 64, 8, 8, 3),
             GemmConfig(128, 128, 64, 8, 4, 4), GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(128, 128, 128, 8, 8, 3)]
    weight_grad = [GemmConfig(128, 128, 64, 8, 4, 4), GemmConfig(128, 128, 64, 8, 8, 4),
                   GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(256, 128, 64, 8, 8, 3)]
    return big_m, weight_grad


def _ms(fn):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=80, return_mode="median")


def sweep(out_dir):
    import triton

    from recycore.kernels import mlp
    from recycore.kernels.gemm import EPILOGUE_LEAKY_RELU2, EPILOGUE_LEAKY_RELU2_GRAD, default_split_k, gemm

    os.makedirs(out_dir, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": []}

    def record(role, variant, config, fn, split_k=None):
        row = {"role": role, "variant": variant, "config": str(config), "split_k": split_k}
        try:
            row["ms"] = _ms(fn)
            row["tflops"] = GEMM_FLOPS / row["ms"] / 1e9
        except Exception as exc:  # a config that does not compile / fit is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        report["rows"].append(row)
        with open(os.path.join(out_dir, "k1_sweep.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"{role:8s} {variant:26s} {str(config):70s} split={split_k} "
              f"{row.get('ms', float('nan')):.4f} ms {row.get('tflops', 0):6.0f} TF {row.get('error', '')}", flush=True)

    torch.manual_seed(0)
    M, d, h = SEED_M, SEED_D, SEED_H
    u = torch.randn(M, d, device=DEVICE, dtype=torch.bfloat16)
    w_up32, w_down32 = torch.randn(h, d, device=DEVICE) / d**0.5, torch.randn(d, h, device=DEVICE) / h**0.5
    w_up, w_down = w_up32.bfloat16(), w_down32.bfloat16()
    pre, post, d_pre = (torch.empty(M, h, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    out, du, d_out = torch.empty_like(u), torch.empty_like(u), torch.randn_like(u)
    gemm(u, w_up, pre=pre, post=post, epilogue=EPILOGUE_LEAKY_RELU2)
    dw_up, dw_down = torch.empty(h, d, device=DEVICE), torch.empty(d, h, device=DEVICE)
    big_m, weight_grad = _candidate_configs()

    for c in big_m:
        record("up", "pre", c, lambda: gemm(u, w_up, pre=pre, epilogue=EPILOGUE_LEAKY_RELU2, config=c))
        record("down", "a_leaky(pre)", c, lambda: gemm(pre, w_down, out=out, a_leaky=True, config=c))
        record("d_pre", "grad epilogue", c, lambda: gemm(d_out, w_down.t(), out=d_pre, pre=pre,
                                                         epilogue=EPILOGUE_LEAKY_RELU2_GRAD, config=c))
        record("du", "plain", c, lambda: gemm(d_pre, w_up.t(), out=du, config=c))
    for c in big_m[:2]:
        record("up", "pre+post", c, lambda: gemm(u, w_up, pre=pre, post=post, epilogue=EPILOGUE_LEAKY_RELU2, config=c))
        record("down", "plain(post)", c, lambda: gemm(post, w_down, out=out, config=c))
    for c in weight_grad:
        s = default_split_k(d, h, M, c, u.device)
        for split in sorted({max(1, s // 2), s, 2 * s}):
            record("dw_down", "b_leaky(pre)", c, lambda: gemm(d_out.t(), pre.t(), out=dw_down, b_leaky=True,
                                                              config=c, split_k=split), split)
            record("dw_up", "plain", c, lambda: gemm(d_pre.t(), u.t(), out=dw_up, config=c, split_k=split), split)
        record("dw_down", "plain(post)", c, lambda: gemm(d_out.t(), post.t(), out=dw_down, config=c, split_k=s), s)
    w_up_t, w_down_t = w_up.t(), w_down.t()
    record("up", "cublas", None, lambda: torch.mm(u, w_up_t, out=pre))
    record("down", "cublas(post)", None, lambda: torch.mm(post, w_down_t, out=out))
    record("d_pre", "cublas(no epilogue)", None, lambda: torch.mm(d_out, w_down, out=d_pre))
    record("du", "cublas", None, lambda: torch.mm(d_pre, w_up, out=du))
    dw_up_bf, dw_down_bf = dw_up.bfloat16(), dw_down.bfloat16()
    record("dw_down", "cublas(post)", None, lambda: torch.mm(d_out.t(), post, out=dw_down_bf))
    record("dw_up", "cublas", None, lambda: torch.mm(d_pre.t(), u, out=dw_up_bf))
    record("cast", "2 weights fp32->bf16", None, lambda: (w_up32.bfloat16(), w_down32.bfloat16()))

    # Where the time of our forward+backward goes, kernel by kernel.
    u.requires_grad_(), w_up32.requires_grad_(), w_down32.requires_grad_()
    step = lambda: torch.autograd.grad(mlp.leaky_relu2_mlp(u, w_up32, w_down32), (u, w_up32, w_down32), d_out)  # noqa: E731
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    report["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(report["profile"])

    # The pytest benchmark's contenders side by side (max-autotune's compile timed on its own).
    contenders = report["contenders"] = {}
    for backward in (False, True):
        inputs = make_inputs(requires_grad=backward)
        for name in ("ours", "cublas_gemms_only", "max_autotune"):
            key = f"{name} {'fwd+bwd' if backward else 'fwd'}"
            try:
                start = time.perf_counter()
                step = _step(name, inputs, backward)
                step()
                torch.cuda.synchronize()
                contenders[key] = {"first_call_s": time.perf_counter() - start, "ms": _ms(step)}
                contenders[key]["tflops"] = (6 if backward else 2) * GEMM_FLOPS / contenders[key]["ms"] / 1e9
            except Exception as exc:
                contenders[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            with open(os.path.join(out_dir, "k1_sweep.json"), "w") as f:
                json.dump(report, f, indent=1)
            print(key, contenders[key], flush=True)

    best = {}
    for row in report["rows"]:
        key = (row["role"], row["variant"])
        if "ms" in row and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    report["best"] = {f"{r} / {v}": row for (r, v), row in best.items()}
    with open(os.path.join(out_dir, "k1_sweep.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\nbest per GEMM and variant (SEED_CONFIGS now:", {k: str(v) for k, v in mlp.SEED_CONFIGS.items()}, ")")
    for (role, variant), row in sorted(best.items()):
        print(f"{role:8s} {variant:26s} {row['ms']:.4f} ms {row['tflops']:5.0f} TF  {row['config']} split={row['split_k']}")
    for key, row in contenders.items():
        base = contenders.get(key.replace(key.split()[0], "max_autotune"), {}).get("ms")
        ratio = f"  {base / row['ms']:.2f}x vs max-autotune" if "ms" in row and base else ""
        print(f"{key:28s} {row.get('ms', float('nan')):.4f} ms {row.get('tflops', 0):5.0f} TF{ratio}")


if __name__ == "__main__":
    sweep(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
