"""K4 fused q/k rms_norm + partial RoPE + q_gain on the GPU: ours vs the same chain in plain torch,
under torch.compile (default mode) and eager; forward and forward+backward.

Seed shape: B=48, T=2048, H=8, Hkv=4, D=64, R=16, bf16; q and k are views of one (B,T,1024)
[q | k | v] projection output, as the model will pass them. TB/s count the minimal bytes:
forward reads q, k and writes q_out, k_out once (2 x 151 MB); backward reads dq_out, dk_out, q, k
and writes dq, dk (3 x 151 MB); forward+backward is the sum (5 x 151 MB).

`python3 benchmarks/test_bench_qk_prep.py` (from the repo root, recycore installed or not) sweeps a
few block configs of each kernel, then prints ours / compiled / eager side by side (< 1 min on an H200).
"""
import importlib
import importlib.util
import os
import sys

import pytest
import torch

from bench_utils import gpu_time, requires_cuda

SEED_SHAPE = (48, 2048, 8, 4, 64, 16)  # B, T, H, Hkv, D, R
DEVICE = "cuda"
IMPLS = ("ours_triton", "torch_compiled", "torch_eager")


def load_qk_prep():
    """recycore.kernels.qk_prep, or the file itself when recycore is not importable (it imports
    only torch and triton)."""
    try:
        return importlib.import_module("recycore.kernels.qk_prep")
    except ImportError:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "qk_prep.py")
        spec = importlib.util.spec_from_file_location("recycore_qk_prep", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def minimal_bytes(B, T, H, h_kv, D, R, backward_only=False, fwd_bwd=False, itemsize=2):
    one = B * T * (H + h_kv) * D * itemsize  # q and k once (151 MB at the seed shape)
    return one * (5 if fwd_bwd else 3 if backward_only else 2)


def make_inputs(B, T, H, h_kv, D, R, requires_grad, device=None):
    """q, k as views of one projection output; the model's rotary tables (NTK-scaled at T > 1024)."""
    device = device or DEVICE
    qkv = torch.randn(B, T, (H + 2 * h_kv) * D, device=device, dtype=torch.bfloat16).requires_grad_(requires_grad)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + h_kv) * D].view(B, T, h_kv, D)
    base = 10000.0 * (T / 1024) ** (R / (R - 2)) if T > 1024 else 10000.0
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float32, device=device) / R))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
    q_gain = torch.full((H,), 1.5, device=device).requires_grad_(requires_grad)
    return q, k, freqs.cos(), freqs.sin(), q_gain


def implementations(mod):
    return {
        "ours_triton": mod.qk_norm_rope,
        "torch_compiled": torch.compile(mod.qk_norm_rope_reference),
        "torch_eager": mod.qk_norm_rope_reference,
    }


def step_fn(fn, inputs, backward):
    """forward only (no autograd graph), or forward + the gradients of q, k (the views) and q_gain."""
    q, k, cos, sin, q_gain = inputs
    if not backward:
        def fwd():
            with torch.no_grad():
                fn(q, k, cos, sin, q_gain)
        return fwd
    q_out, k_out = fn(q, k, cos, sin, q_gain)
    grads = (torch.randn_like(q_out), torch.randn_like(k_out))

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, cos, sin, q_gain), (q, k, q_gain), grads)
    return fwd_bwd


_CACHE = {}


@requires_cuda
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_bench_qk_prep(benchmark, name, backward):
    if not _CACHE:
        _CACHE.update(implementations(load_qk_prep()))
    torch.manual_seed(0)
    inputs = make_inputs(*SEED_SHAPE, requires_grad=backward)
    gpu_time(benchmark, step_fn(_CACHE[name], inputs, backward),
             group=f"K4 qk norm+rope+gain {'fwd+bwd' if backward else 'fwd'}", label=name,
             bytes_moved=minimal_bytes(*SEED_SHAPE, fwd_bwd=backward), baseline=name == "torch_compiled")


# ----------------------------------------------------------------------------------------------
# One-command table: config sweep of each kernel, then the three paths side by side
# ----------------------------------------------------------------------------------------------
# (block_t, heads per program, num_warps)
SWEEP = [(8, 4, 4), (16, 4, 4), (32, 4, 8), (16, 2, 4), (32, 1, 4), (64, 1, 8), (16, 4, 8)]


def _ms(fn):
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    mod = load_qk_prep()
    torch.manual_seed(0)
    B, T, H, h_kv, D, R = SEED_SHAPE
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  B={B} T={T} H={H} Hkv={h_kv} D={D} "
          f"R={R} bf16, q/k views of a (B,T,{(H + 2 * h_kv) * D}) projection output")
    fwd_bytes, bwd_bytes = minimal_bytes(*SEED_SHAPE), minimal_bytes(*SEED_SHAPE, backward_only=True)
    q, k, cos, sin, q_gain = make_inputs(*SEED_SHAPE, requires_grad=False)
    dq_out, dk_out = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16), torch.randn(
        B, T, h_kv, D, device=DEVICE, dtype=torch.bfloat16)
    # the (B,H,T,D)-transposed layout SDPA's backward hands back
    dq_out_t = dq_out.transpose(1, 2).contiguous().transpose(1, 2)

    print(f"\n{'kernel config (block_t, heads, warps)':<44}{'ms':>8}{'TB/s':>8}")
    best = {}
    for label, run, nbytes, key in (
            ("fwd", lambda c: mod.qk_norm_rope_forward(q, k, cos, sin, q_gain, config=c), fwd_bytes, "fwd"),
            ("bwd", lambda c: mod.qk_norm_rope_backward(dq_out, dk_out, q, k, cos, sin, q_gain, config=c),
             bwd_bytes, "bwd"),
            ("bwd, dq_out (B,H,T,D)-strided", lambda c: mod.qk_norm_rope_backward(
                dq_out_t, dk_out, q, k, cos, sin, q_gain, config=c), bwd_bytes, None)):
        for cfg in SWEEP:
            config = mod.QKPrepConfig(*cfg)
            try:
                ms = _ms(lambda: run(config))
            except Exception as exc:  # a config that does not compile is reported, not fatal
                print(f"{label + ' ' + str(cfg):<44} error: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            print(f"{label + ' ' + str(cfg):<44}{ms:8.4f}{nbytes / ms / 1e9:8.2f}")
            if key and (key not in best or ms < best[key][1]):
                best[key] = (config, ms)
    for key in best:
        print(f"best {key}: {tuple(best[key][0])} {best[key][1]:.4f} ms")
    # the winners go into kernels/qk_prep.py's FWD_CONFIG / BWD_CONFIG by hand; the paths below run those

    impls = implementations(mod)
    # (the whole training step is what replays as a CUDA graph: recycore bench's fused-graphs path)
    print(f"\n{'path':<16}{'fwd ms':>9}{'TB/s':>7}{'fwd+bwd ms':>12}{'TB/s':>7}{'x compiled (fwd+bwd)':>22}")
    rows = {}
    for name, fn in impls.items():
        fwd = _ms(step_fn(fn, make_inputs(*SEED_SHAPE, requires_grad=False), False))
        fb = _ms(step_fn(fn, make_inputs(*SEED_SHAPE, requires_grad=True), True))
        rows[name] = (fwd, fb)
    ref_fb = rows["torch_compiled"][1]
    total = fwd_bytes + bwd_bytes
    for name, (fwd, fb) in rows.items():
        print(f"{name:<16}{fwd:9.4f}{fwd_bytes / fwd / 1e9:7.2f}{fb:12.4f}{total / fb / 1e9:7.2f}{ref_fb / fb:21.2f}x")

    # the three paths agree at the seed shape (bf16 vs a float64 reference)
    qd, kd, gd = (t.detach().double() for t in (q, k, q_gain))
    ref = mod.qk_norm_rope_reference(qd, kd, cos.double(), sin.double(), gd)
    outs = mod.qk_norm_rope(q, k, cos, sin, q_gain)
    errs = [((o.double() - r).norm() / r.norm()).item() for o, r in zip(outs, ref)]
    print(f"\nours vs float64 reference: rel err q_out {errs[0]:.2e}, k_out {errs[1]:.2e}")
    packed_vs_views(mod)


def packed_vs_views(mod):
    """The gradient of the whole projection output, two ways: `qkv_prep` on the packed [q | k | v | gate]
    output (one kernel writes it) against `qk_norm_rope` on views of a [q | k | v] output, where autograd
    concatenates dq, dk and dv (the gate then has its own projection, not counted here)."""
    B, T, H, h_kv, D, R = SEED_SHAPE
    _, _, cos, sin, q_gain = make_inputs(*SEED_SHAPE, requires_grad=True)
    bias = torch.zeros(H, device=DEVICE, requires_grad=True)
    packed = torch.randn(B, T, (H + 2 * h_kv) * D + H, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    views = torch.randn(B, T, (H + 2 * h_kv) * D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    shapes = [(B, T, H, D), (B, T, h_kv, D), (B, T, h_kv, D), (B, T, H)]
    grads = [torch.randn(s, device=DEVICE, dtype=torch.bfloat16) for s in shapes]

    def run_packed():
        torch.autograd.grad(mod.qkv_prep(packed, cos, sin, q_gain, bias, H, h_kv), (packed, q_gain, bias), grads)

    def run_views():
        q, k, v = views.split((H * D, h_kv * D, h_kv * D), dim=-1)
        q_out, k_out = mod.qk_norm_rope(q.unflatten(-1, (H, D)), k.unflatten(-1, (h_kv, D)), cos, sin, q_gain)
        torch.autograd.grad((q_out, k_out, v.unflatten(-1, (h_kv, D))), (views, q_gain), grads[:3])
    print(f"\n{'d(projection output), fwd+bwd':<44}{'ms':>8}")
    for name, fn in (("qkv_prep, packed", run_packed), ("qk_norm_rope on views + autograd's cat", run_views)):
        print(f"{name:<44}{_ms(fn):8.4f}")
    folds_vs_inductor(mod)


def folds_vs_inductor(mod):
    """One layer's attention inputs from the block input x, fwd+bwd under torch.compile, two ways: the
    model's fused path (the input norm folded into `qkv_prep` as row scales, the value embedding and the
    value residual in it too: sessions 13's folds) against the norm, the projection and `qkv_prep`, with
    the embedding and the blend in inductor's kernels after it (the model before). By the bytes (bf16, seed
    shape): u (100 MB) neither written nor kept for backward, and about 100 MB less each way for the values."""
    import torch.nn.functional as F
    B, T, H, h_kv, D, R = SEED_SHAPE
    d = 512
    _, _, cos, sin, q_gain = make_inputs(*SEED_SHAPE, requires_grad=True)
    bias = torch.zeros(H, device=DEVICE, requires_grad=True)
    x = torch.randn(B, T, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn((H + 2 * h_kv) * D + H, d, device=DEVICE) / d ** 0.5).to(torch.bfloat16).requires_grad_()
    v_embed = torch.randn(B, T, h_kv * D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v0 = torch.randn(B, T, h_kv, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v_mix = torch.tensor([0.5, 0.5], device=DEVICE, requires_grad=True)
    norm_scale = torch.tensor(0.5, device=DEVICE)
    shapes = [(B, T, H, D), (B, T, h_kv, D), (B, T, h_kv, D), (B, T, H)]
    grads = [torch.randn(s, device=DEVICE, dtype=torch.bfloat16) for s in shapes]
    inputs = (x, w, q_gain, bias, v_embed, v0, v_mix)

    def folded(x, w, q_gain, bias, v_embed, v0, v_mix):
        row_scale = torch.rsqrt(x.float().square().mean(-1) + mod.RMS_EPS) * norm_scale
        return mod.qkv_prep(F.linear(x, w), cos, sin, q_gain, bias, H, h_kv, v_embed, v0, v_mix, row_scale)

    def unfolded(x, w, q_gain, bias, v_embed, v0, v_mix):
        u = F.rms_norm(x, (d,)) * norm_scale
        q, k, v, g = mod.qkv_prep(F.linear(u, w), cos, sin, q_gain, bias, H, h_kv)
        return q, k, mod.value_blend_reference(v, v_embed, v0, v_mix), g

    print(f"\n{'attention inputs from x, compiled':<44}{'fwd ms':>8}{'fwd+bwd ms':>12}")
    for name, fn in (("norm, values folded into qkv_prep", folded), ("norm, values by inductor", unfolded)):
        compiled = torch.compile(fn, fullgraph=True)

        def fwd():
            with torch.no_grad():
                compiled(*inputs)

        def fwd_bwd():
            torch.autograd.grad(compiled(*inputs), inputs, grads)
        print(f"{name:<44}{_ms(fwd):8.4f}{_ms(fwd_bwd):12.4f}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
