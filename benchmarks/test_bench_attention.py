"""K2 gated XSA attention on the GPU: ours vs SDPA baselines, forward and forward+backward.

pytest (seed shape B=48 H=8 Hkv=4 T=2048 D=64, bf16):
  ours = the fully fused Triton kernel and SDPA(cuDNN) core + our fused xsa_gate epilogue;
  (a) the fastest SDPA backend (cuDNN on the H200) + XSA + gate under torch.compile(mode="max-autotune");
  (b) the flash SDPA backend + XSA + gate (eager).
TFLOP/s count the causal attention FLOPs: 4*B*H*T^2*D/2 forward, x3.5 for forward+backward.

`python benchmarks/test_bench_attention.py OUT_DIR` sweeps the Triton block configs at T=1024/2048/4096
(98,304 tokens each), times every path side by side, profiles the kernels, and writes OUT_DIR/k2_sweep.json.
"""
import json
import os
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_utils import gpu_time, requires_cuda

SEED_SHAPE = (48, 2048, 8, 4, 64)


def attention_flops(B, T, H, D, backward):
    fwd = 4 * B * H * T * T * D / 2
    return fwd * 3.5 if backward else fwd


def make_inputs(B, T, H, h_kv, D, requires_grad=True, device="cuda"):
    """Views of one fused projection output, as the model produces them."""
    qkv = torch.randn(B, T, (H + 2 * h_kv) * D, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.split([H * D, h_kv * D, h_kv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, h_kv, D), v.view(B, T, h_kv, D)
    g = 2 * torch.randn(B, T, H, device=device, dtype=torch.bfloat16)
    return [t.detach().requires_grad_(requires_grad) for t in (q, k, v, g)]


def _with_backend(fn, backends):
    def run(*args):
        with sdpa_kernel(backends):
            return fn(*args)
    return run


def _expand_kv_reference(q, k, v, g, xsa):
    """The reference with kv heads repeated to H, for an SDPA backend that refuses enable_gqa."""
    from recycore.kernels.attention import xsa_gate_reference
    rep = q.shape[2] // k.shape[2]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2),
        is_causal=True)
    return xsa_gate_reference(o.transpose(1, 2), v, g, xsa)


def _compiled_cudnn_baseline():
    """Baseline (a): SDPA restricted to cuDNN + XSA + gate under torch.compile(max-autotune); GQA by
    enable_gqa, or by expanding kv heads if cuDNN refuses it (decided on the first call)."""
    from recycore.kernels.attention import gated_xsa_attention_reference

    chosen = []

    def run(q, k, v, g):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            if not chosen:
                try:
                    fn = torch.compile(gated_xsa_attention_reference, mode="max-autotune", fullgraph=True)
                    fn(q, k, v, g, True)
                except Exception as exc:
                    print(f"cuDNN + enable_gqa under compile failed ({type(exc).__name__}); expanding kv heads")
                    fn = torch.compile(_expand_kv_reference, mode="max-autotune", fullgraph=True)
                chosen.append(fn)
            return chosen[0](q, k, v, g, True)
    return run


def implementations():
    """name -> callable(q, k, v, g) for every path we compare (XSA on, as in the last 4 layers)."""
    from recycore.kernels.attention import attention, gated_xsa_attention_reference

    return {
        "ours_triton": lambda q, k, v, g: attention(q, k, v, g, True, impl="triton"),
        "ours_triton_one_pass": lambda q, k, v, g: attention(q, k, v, g, True, impl="triton_one_pass"),
        "ours_sdpa_fused": lambda q, k, v, g: attention(q, k, v, g, True, impl="sdpa_fused"),
        "a_cudnn_compiled_max_autotune": _compiled_cudnn_baseline(),
        "b_flash_eager": _with_backend(lambda q, k, v, g: gated_xsa_attention_reference(q, k, v, g, True),
                                       [SDPBackend.FLASH_ATTENTION]),
    }


def _fwd_bwd(fn, inputs):
    y = fn(*inputs)
    dy = torch.randn_like(y)

    def step():
        torch.autograd.grad(fn(*inputs), inputs, dy, allow_unused=True)  # core-only paths skip g
    return step


_IMPLS = {}


def _impl(name):
    if not _IMPLS:
        _IMPLS.update(implementations())
    return _IMPLS[name]


@requires_cuda
@pytest.mark.parametrize("name", ["ours_triton", "ours_triton_one_pass", "ours_sdpa_fused", "a_cudnn_compiled_max_autotune", "b_flash_eager"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_bench_attention(benchmark, name, backward):
    B, T, H, h_kv, D = SEED_SHAPE
    torch.manual_seed(0)
    inputs = make_inputs(*SEED_SHAPE, requires_grad=backward)
    fn = _impl(name)
    if backward:
        step = _fwd_bwd(fn, inputs)
    else:
        def step():
            with torch.no_grad():
                fn(*inputs)
    group = f"K2 attention {'fwd+bwd' if backward else 'fwd'}"
    gpu_time(benchmark, step, group=group, label=name, flops=attention_flops(B, T, H, D, backward),
             baseline=name == "a_cudnn_compiled_max_autotune", benchmark=group, shape=f"B={B} T={T} H={H} Hkv={h_kv} D={D}")


# ----------------------------------------------------------------------------------------------
# Sweep script (one GPU call): configs, all paths side by side, kernel profile -> JSON
# ----------------------------------------------------------------------------------------------
FWD_CONFIGS = [(128, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 32, 4, 3, False),
               (128, 64, 4, 4, False), (64, 64, 4, 3, True), (64, 32, 4, 3, True), (64, 64, 8, 3, True),
               (128, 64, 8, 3, True)]
# the last field: ONE_PASS (dQ summed by the dK/dV kernel, no dQ kernel; the tiles its offline sm_90 build
# keeps without spills); "bwd dkdv" times the whole backward, so the two kinds compare directly. 16-row
# query blocks keep the default's 128 keys per program with 40 bytes of stack instead of 232 (offline sm_90)
DKDV_CONFIGS = [(64, 128, 8, 3, False), (32, 128, 4, 3, False), (64, 128, 4, 3, False), (32, 64, 4, 3, False),
                (64, 64, 4, 3, False), (32, 128, 8, 3, False), (128, 128, 8, 2, False), (16, 128, 4, 3, False),
                (32, 128, 8, 3, True), (64, 128, 8, 2, True), (32, 64, 4, 3, True), (32, 128, 4, 3, True)]
DQ_CONFIGS = [(128, 64, 8, 3, False), (128, 32, 4, 3, False), (128, 64, 4, 3, False), (64, 64, 4, 3, False),
              (128, 128, 8, 2, False), (64, 32, 4, 3, True), (64, 64, 8, 3, True), (64, 32, 8, 3, True)]


def _ms(fn):
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def _safe(results, key, fn):
    try:
        results[key] = _ms(fn)
    except Exception as exc:  # a config that does not compile/fit is recorded, not fatal
        results[key] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return results[key]


def sweep(out_dir, shape=SEED_SHAPE, seq_lens=(2048, 1024, 4096)):
    import importlib
    import time

    import triton

    attn = importlib.import_module("recycore.kernels.attention")
    start = time.time()

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "sweep": {}, "paths": {}}
    os.makedirs(out_dir, exist_ok=True)

    def dump():  # after every stage, so a timed-out run still leaves its figures
        with open(os.path.join(out_dir, "k2_sweep.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(out_dir, "k2_rows.jsonl"), "w") as f:  # for report.py --import-pytest-benchmark
            f.writelines(json.dumps(row) + "\n" for row in sweep_rows(report, shape))
    torch.manual_seed(0)
    B, T_seed, H, h_kv, D = shape
    q, k, v, g = (t.detach() for t in make_inputs(*shape))
    dy = torch.randn_like(q)
    try:
        y, o, lse = attn._attention_forward(q, k, v, g, True)
    except Exception as exc:
        report["fatal"] = f"{type(exc).__name__}: {exc}"
        dump()
        raise
    sw = report["sweep"]
    for cfg in FWD_CONFIGS:
        _safe(sw, f"fwd {cfg}", lambda: attn._attention_forward(q, k, v, g, True, config=cfg))
    for cfg in DKDV_CONFIGS:
        _safe(sw, f"bwd dkdv {cfg}", lambda: attn._attention_backward(dy, q, k, v, g, o, lse, True, dkdv_config=cfg))
    for cfg in DQ_CONFIGS:
        _safe(sw, f"bwd dq {cfg}", lambda: attn._attention_backward(dy, q, k, v, g, o, lse, True, dq_config=cfg))
    _safe(sw, "bwd epilogue+delta only",
          lambda: attn._xsa_gate_backward(dy, o, v, g, True, delta=torch.empty_like(lse), dv_dtype=torch.float32))
    _safe(sw, "xsa_gate fwd only", lambda: attn._xsa_gate_forward(o, v, g, True))

    def best(prefix, configs):
        timed = [(sw[f"{prefix} {c}"], c) for c in configs if isinstance(sw[f"{prefix} {c}"], float)]
        return min(timed)[1]
    best_fwd, best_dkdv, best_dq = best("fwd", FWD_CONFIGS), best("bwd dkdv", DKDV_CONFIGS), best("bwd dq", DQ_CONFIGS)
    # the winners go into kernels/attention.py's GPU_CONFIGS by hand; the paths below run the committed ones
    report["best"] = {"fwd": best_fwd, "dkdv": best_dkdv, "dq": best_dq}
    dump()

    def expand_kv(q, k, v):  # kv heads repeated to H before the core
        group = q.shape[2] // k.shape[2]
        return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)

    impls = implementations()
    impls["ours_sdpa_fused_expand_kv"] = lambda q, k, v, g: attn.xsa_gate(attn._sdpa_core(q, *expand_kv(q, k, v)), v, g, True)
    impls["core_only_sdpa_cudnn_gqa"] = lambda q, k, v, g: attn._sdpa_core(q, k, v)
    impls["core_only_sdpa_cudnn_expand_kv"] = lambda q, k, v, g: attn._sdpa_core(q, *expand_kv(q, k, v))
    impls["core_only_sdpa_default"] = lambda q, k, v, g: attn._sdpa_gqa(q, k, v)
    for T in seq_lens:
        if time.time() - start > 150:  # leave the call's time for the summary
            break
        Bt = B * T_seed // T
        inputs = make_inputs(Bt, T, H, h_kv, D)
        for name, fn in impls.items():
            if name.startswith("a_") and T != T_seed:  # max-autotune compiles are slow: the seed shape only
                continue
            row = report["paths"].setdefault(f"T={T} {name}", {})
            with torch.no_grad():
                ms = _safe(row, "fwd_ms", lambda: fn(*inputs))
            if isinstance(ms, float):
                row["fwd_tflops"] = attention_flops(Bt, T, H, D, False) / ms / 1e9
            try:
                step = _fwd_bwd(fn, inputs)
            except Exception as exc:
                row["fwd_bwd_ms"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            ms = _safe(row, "fwd_bwd_ms", step)
            if isinstance(ms, float):
                row["fwd_bwd_tflops"] = attention_flops(Bt, T, H, D, True) / ms / 1e9
        dump()

    inputs = make_inputs(*shape)
    for name in ("ours_triton", "ours_triton_one_pass", "ours_sdpa_fused", "a_cudnn_compiled_max_autotune"):
        if time.time() - start > 185:
            break
        try:
            step = _fwd_bwd(impls[name], inputs)
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        except Exception as exc:
            table = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        report.setdefault("profile", {})[name] = table

    dump()
    print("best configs:", report["best"])
    for key, val in sw.items():
        print(f"{key:45s} {val if isinstance(val, str) else f'{val:.3f} ms'}")
    for key, row in report["paths"].items():
        cells = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"{key:45s} {cells}")


def sweep_rows(report, shape=SEED_SHAPE) -> list[dict]:
    """The sweep's timings as rows of the results history (without the run's metadata): each config at
    the seed shape ("K2 config sweep"), each path at each length ("K2 attention fwd" / "fwd+bwd")."""
    B, T, H, h_kv, D = shape

    def shape_at(t):  # the same tokens per call at every length
        return f"B={B * T // t} T={t} H={H} Hkv={h_kv} D={D}"
    rows = [{"benchmark": "K2 config sweep", "shape": shape_at(T), "variant": key, "statistic": "median_ms",
             "value": ms, "unit": "ms"} for key, ms in report.get("sweep", {}).items() if isinstance(ms, float)]
    for key, figures in report.get("paths", {}).items():
        length, name = key.split(" ", 1)
        for prefix, benchmark in (("fwd", "K2 attention fwd"), ("fwd_bwd", "K2 attention fwd+bwd")):
            for statistic, unit in (("ms", "ms"), ("tflops", "TFLOP/s")):
                value = figures.get(f"{prefix}_{statistic}")
                if isinstance(value, float):
                    rows.append({"benchmark": benchmark, "shape": shape_at(int(length.removeprefix("T="))),
                                 "variant": name, "statistic": "median_ms" if statistic == "ms" else "tflops",
                                 "value": value, "unit": unit, "baseline": name == "a_cudnn_compiled_max_autotune"})
    return rows


if __name__ == "__main__":
    sweep(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
