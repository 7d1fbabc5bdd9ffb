"""K1 fused LeakyReLU² MLP on the GPU at the seed shape (M = 48 x 2048 = 98,304 rows, d = 512,
h = 1536, bf16 activations, fp32 master weights), forward and forward+backward:
  ours = recycore.kernels.leaky_relu2_mlp (Triton GEMM template with the activation epilogues + cuBLAS;
  ours_tiled: its one-tile-per-program GEMMs; ours_sign: the forward keeps pre's sign bits, not pre;
  ours_row_scale: with per-row input scales, as the model folds its RMSNorm in: the epilogues' extra cost);
  baseline = the same math (leaky_relu2_mlp_reference) under torch.compile(mode="max-autotune");
  cublas = the bare cuBLAS GEMMs alone (up + down; the 6 GEMMs of forward+backward), no activation.
TFLOP/s count the GEMMs: 2 * 2*M*d*h forward, 6 * 2*M*d*h forward+backward.

`python benchmarks/test_bench_mlp.py OUT_DIR --precompile` compiles the sweep's kernels in parallel
processes (Triton's disk cache), `python benchmarks/test_bench_mlp.py OUT_DIR` then sweeps block
configs and split-K for each of the six GEMMs, times the alternatives of each (Triton vs cuBLAS;
the M-tiled GEMMs also on the template's persistent TMA kernel, GemmConfig(persistent=True)),
writes the best configs of the template GEMMs (OUT_DIR/k1_best.json, persistent or not: copy the winners into
kernels/mlp.py's SEED_CONFIGS), profiles our forward+backward with the committed configs and times ours and the
bare cuBLAS GEMMs (OUT_DIR/k1_sweep.json). `... OUT_DIR --baseline` times ours (every variant) against the
max-autotune baseline in a fresh process (OUT_DIR/k1_baseline.json).
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
# name -> (variant, saved, row scales: the model's folded input norm, M_SCALE and ROW_DOT epilogues)
OURS = {"ours": ("persistent", "pre", False), "ours_tiled": ("tiled", "pre", False),
        "ours_sign": ("persistent", "sign", False), "ours_row_scale": ("persistent", "pre", True)}


def _step(name, inputs, backward):
    from recycore.kernels import leaky_relu2_mlp, leaky_relu2_mlp_reference

    if name == "cublas_gemms_only":
        return _cublas_gemms(*inputs, backward)
    if name in OURS:
        variant, saved, scaled = OURS[name]
        row_scale = (torch.rand(SEED_M, device="cuda") + 0.5).requires_grad_(backward) if scaled else None

        def fn(u, w_up, w_down):
            return leaky_relu2_mlp(u, w_up, w_down, variant, saved, row_scale)
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
@pytest.mark.parametrize("name", [*OURS, "max_autotune", "cublas_gemms_only"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_bench_mlp(benchmark, name, backward):
    torch.manual_seed(0)
    step = _step(name, make_inputs(requires_grad=backward), backward)
    group = f"K1 MLP {'fwd+bwd' if backward else 'fwd'}"
    gpu_time(benchmark, step, group=group, label=name, flops=(6 if backward else 2) * GEMM_FLOPS,
             baseline=name == "max_autotune", benchmark=group, shape=f"M={SEED_M} d={SEED_D} h={SEED_H}")


# ----------------------------------------------------------------------------------------------
# Sweep (one GPU call): every GEMM of the MLP over block configs / split-K / alternatives -> JSON
# ----------------------------------------------------------------------------------------------
# The template GEMMs of leaky_relu2_mlp and the variant it runs (down, du and dW_down run on cuBLAS;
# the other rows of the sweep are the alternatives that benchmarks/README.md weighs).
OUR_VARIANTS = {"up": "pre+post", "d_pre": "grad epilogue", "dw_up": "plain"}


def precompile(worker, cases, processes=8):
    """Compile the Triton kernels behind `cases` in parallel processes. `worker(cases)` (a
    module-level function) runs each case once on small tensors with the same specialisation as
    the timed ones (sizes and strides divisible by 16, the same constexprs), which fills Triton's
    on-disk cache; the timing process then only loads the binaries. Returns the errors."""
    import multiprocessing

    chunks = [cases[i::processes] for i in range(processes) if cases[i::processes]]
    with multiprocessing.get_context("spawn").Pool(len(chunks)) as pool:
        return [error for errors in pool.map(worker, chunks) for error in errors]


def run_cases(tensors, make_call, cases):
    errors = []
    for case in cases:
        try:
            make_call(tensors, *case)()
        except Exception as exc:  # recorded; the timing pass reports it again
            errors.append(f"{case}: {type(exc).__name__}: {str(exc)[:160]}")
    torch.cuda.synchronize()
    return errors


def _k1_tensors(M, d, h):
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    t = {"u": torch.randn(M, d, **bf16), "w_up": (torch.randn(h, d, device=DEVICE) / d**0.5).bfloat16(),
         "w_down": (torch.randn(d, h, device=DEVICE) / h**0.5).bfloat16(), "d_out": torch.randn(M, d, **bf16),
         "out": torch.empty(M, d, **bf16), "du": torch.empty(M, d, **bf16),
         "dw_up": torch.empty(h, d, device=DEVICE), "dw_down": torch.empty(d, h, device=DEVICE)}
    t["pre"], t["post"], t["d_pre"] = (torch.empty(M, h, **bf16) for _ in range(3))
    return t


def _k1_call(t, role, variant, config, split_k):
    """The GEMM `role` of the MLP as `variant` with `config` (None: cuBLAS) on tensors t."""
    from recycore.kernels.gemm import EPILOGUE_LEAKY_RELU2, EPILOGUE_LEAKY_RELU2_GRAD, gemm

    if config is None:
        a, b, out = {"up": ("u", "w_up", "pre"), "down": ("post", "w_down", "out"),
                     "d_pre": ("d_out", "w_down", "d_pre"), "du": ("d_pre", "w_up", "du"),
                     "dw_down": ("d_out", "post", "dw_down"), "dw_up": ("d_pre", "u", "dw_up")}[role]
        a, b, out = t[a], t[b], t[out]
        a = a.t() if role.startswith("dw") else a
        b = b.t() if role in ("up", "down") else b
        out = out.bfloat16() if role.startswith("dw") else out  # cuBLAS writes the GEMM's dtype
        return lambda: torch.mm(a, b, out=out)
    kw = dict(config=config)
    if role == "up":
        post = t["post"] if variant == "pre+post" else None
        return lambda: gemm(t["u"], t["w_up"], pre=t["pre"], post=post, epilogue=EPILOGUE_LEAKY_RELU2, **kw)
    if role == "down":
        return lambda: gemm(t["post"], t["w_down"], out=t["out"], **kw)
    if role == "d_pre":
        return lambda: gemm(t["d_out"], t["w_down"].t(), out=t["d_pre"], pre=t["pre"],
                            epilogue=EPILOGUE_LEAKY_RELU2_GRAD, **kw)
    if role == "du":
        return lambda: gemm(t["d_pre"], t["w_up"].t(), out=t["du"], **kw)
    if role == "dw_down":
        return lambda: gemm(t["d_out"].t(), t["post"].t(), out=t["dw_down"], split_k=split_k, **kw)
    return lambda: gemm(t["d_pre"].t(), t["u"].t(), out=t["dw_up"], split_k=split_k, **kw)


# Persistent TMA configs (gemm.py, config.persistent) for the M-tiled GEMMs at K = 512 / 1536.
# Shared memory per CTA, as the offline sm_90 compiles of gemm._gemm_persistent_kernel measured it:
# stages x (BM + BN) x BK bf16 operand ring + one BM x BN' bf16 staging tile for the TMA stores
# (pre and post share it) + one more for the `pre` that the d_pre epilogue reads (BN' = BN / 2 with
# epilogue_subtile); a config that exceeds the H200's 227 KB per block is left out of that role.
_SMEM_PER_BLOCK = 227 * 1024


def _persistent_smem(config, reads_pre):
    store_n = config.block_n // 2 if config.epilogue_subtile else config.block_n
    ring = config.num_stages * (config.block_m + config.block_n) * config.block_k * 2
    return ring + (2 if reads_pre else 1) * config.block_m * store_n * 2


def _persistent_configs():
    from recycore.kernels.gemm import GemmConfig

    shapes = [(128, 256, 3), (128, 256, 4), (256, 128, 3), (256, 128, 4), (128, 128, 4)]
    return [GemmConfig(bm, bn, 64, 8, 8, stages, persistent=True, epilogue_subtile=sub)
            for bm, bn, stages in shapes for sub in (False, True)]


def _k1_cases():
    from recycore.kernels.gemm import GemmConfig, default_split_k

    # Candidates that compile for sm_90 without register spills in most roles (checked offline
    # with triton.compile + cuobjdump -res-usage); 128x256 spills in the d_pre epilogue.
    big_m = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 256, 64, 8, 8, 4), GemmConfig(256, 128, 64, 8, 8, 3),
             GemmConfig(256, 128, 64, 8, 8, 4), GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(128, 128, 128, 8, 8, 3)]
    weight_grad = [GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(128, 128, 64, 8, 4, 4),
                   GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 128, 128, 8, 8, 3)]
    cases = []
    for c in big_m:
        cases += [("up", "pre+post", c, 1), ("d_pre", "grad epilogue", c, 1), ("down", "plain(post)", c, 1),
                  ("du", "plain", c, 1)]
    for c in big_m[:2]:
        cases.append(("up", "pre", c, 1))
    # The same roles and variants on the persistent kernel: the best row per (role, variant) may be
    # either kind, and _apply_best then selects it (the config carries persistent=True).
    for c in _persistent_configs():
        for role, variant in (("up", "pre+post"), ("up", "pre"), ("d_pre", "grad epilogue"),
                              ("down", "plain(post)"), ("du", "plain")):
            if _persistent_smem(c, reads_pre=role == "d_pre") <= _SMEM_PER_BLOCK:
                cases.append((role, variant, c, 1))
    for c in weight_grad:
        split = default_split_k(SEED_D, SEED_H, SEED_M, c, torch.device(DEVICE))
        for s in sorted({max(2, split // 2), split, 2 * split}):
            cases += [("dw_up", "plain", c, s), ("dw_down", "plain(post)", c, s)]
    return cases


def _k1_worker(cases):
    # Small sizes with the seed's divisibility (and K a multiple of every block_k): same binaries.
    return run_cases(_k1_tensors(1024, 128, 384), _k1_call, cases)


def _ms(fn):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=80, return_mode="median")


def _dump(report, out_dir, name):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(report, f, indent=1, default=str)


def _time_contenders(report, names, out_dir, name):
    contenders = report.setdefault("contenders", {})
    for backward in (False, True):
        inputs = make_inputs(requires_grad=backward)
        for impl in names:
            key = f"{impl} {'fwd+bwd' if backward else 'fwd'}"
            try:
                start = time.perf_counter()
                step = _step(impl, inputs, backward)
                step()
                torch.cuda.synchronize()
                row = {"first_call_s": time.perf_counter() - start, "ms": _ms(step)}
                row["tflops"] = (6 if backward else 2) * GEMM_FLOPS / row["ms"] / 1e9
            except Exception as exc:
                row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            contenders[key] = row
            _dump(report, out_dir, name)
            print(key, row, flush=True)
    for key, row in contenders.items():
        impl, what = key.split()
        ratios = [f"{contenders[f'{base} {what}']['ms'] / row['ms']:.2f}x vs {base}"
                  for base in ("max_autotune", "cublas_gemms_only")
                  if "ms" in row and "ms" in contenders.get(f"{base} {what}", {})]
        print(f"{key:28s} {row.get('ms', float('nan')):.4f} ms {row.get('tflops', 0):5.0f} TF  {'  '.join(ratios)}")


def precompile_sweep(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    cases = _k1_cases()
    start = time.perf_counter()
    errors = precompile(_k1_worker, cases)
    _dump({"cases": len(cases), "seconds": time.perf_counter() - start, "errors": errors}, out_dir,
          "k1_precompile.json")
    print(f"K1: precompiled {len(cases)} cases in {time.perf_counter() - start:.1f} s", errors, flush=True)


def sweep(out_dir):
    import dataclasses

    import triton

    from recycore.kernels import mlp

    os.makedirs(out_dir, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": []}
    cases = _k1_cases()

    torch.manual_seed(0)
    t = _k1_tensors(SEED_M, SEED_D, SEED_H)
    _k1_call(t, "up", "pre+post", mlp.SEED_CONFIGS["persistent"]["up"], 1)()  # pre and post hold real values
    cublas = [(role, "cublas", None, 1) for role in ("up", "down", "d_pre", "du", "dw_down", "dw_up")]
    for role, variant, config, split_k in cases + cublas:
        row = {"role": role, "variant": variant, "config": config, "split_k": split_k}
        try:
            row["ms"] = _ms(_k1_call(t, role, variant, config, split_k))
            row["tflops"] = GEMM_FLOPS / row["ms"] / 1e9
        except Exception as exc:  # a config that does not compile / fit is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        report["rows"].append(row)
        _dump(report, out_dir, "k1_sweep.json")
        print(f"{role:8s} {variant:14s} {str(config):95s} split={split_k:<3d} {row.get('ms', float('nan')):.4f} ms "
              f"{row.get('tflops', 0):4.0f} TF {row.get('error', '')}", flush=True)

    best, best_by_kind = {}, {}
    for row in report["rows"]:
        key = (row["role"], row["variant"])
        kind = "cublas" if row["config"] is None else "persistent" if row["config"].persistent else "tiled"
        if "ms" in row and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
        if "ms" in row and ((*key, kind) not in best_by_kind or row["ms"] < best_by_kind[(*key, kind)]["ms"]):
            best_by_kind[(*key, kind)] = row
    print("\nbest per GEMM, variant and kernel (tiled = one tile per program, persistent = TMA loop):")
    for (role, variant, kind), row in sorted(best_by_kind.items()):
        print(f"{role:8s} {variant:14s} {kind:10s} {row['ms']:.4f} ms {row['tflops']:4.0f} TF  {row['config']} "
              f"split={row['split_k']}")
    report["best_by_kind"] = [{"role": r, "variant": v, "kind": k, "ms": row["ms"], "config": row["config"]}
                              for (r, v, k), row in sorted(best_by_kind.items())]
    chosen = {}
    for role, variant in OUR_VARIANTS.items():
        row = best[(role, variant)]
        fields = dataclasses.asdict(row["config"])
        fields["split_k"] = row["split_k"] if role.startswith("dw") else 0
        chosen[role] = fields
    report["chosen"] = chosen
    _dump(chosen, out_dir, "k1_best.json")

    # Where the time of our forward+backward goes, kernel by kernel, with the committed configs.
    u, w_up, w_down = make_inputs(requires_grad=True)
    d_out = torch.randn_like(u)

    def step():
        torch.autograd.grad(mlp.leaky_relu2_mlp(u, w_up, w_down), (u, w_up, w_down), d_out)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    report["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
    print(report["profile"])
    _time_contenders(report, ("ours", "cublas_gemms_only"), out_dir, "k1_sweep.json")


def baseline(out_dir):
    import triton

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    torch.manual_seed(0)
    _time_contenders(report, (*OURS, "cublas_gemms_only", "max_autotune"), out_dir, "k1_baseline.json")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    if "--precompile" in sys.argv:
        precompile_sweep(out)
    elif "--baseline" in sys.argv:
        baseline(out)
    else:
        sweep(out)
