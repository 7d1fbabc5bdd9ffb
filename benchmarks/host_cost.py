"""Host (CPU) cost per call of every custom-op launcher, in microseconds (issue 17, item 3).

    python benchmarks/host_cost.py OUT.jsonl [--label NAME]
    python benchmarks/host_cost.py OUT.jsonl --compare before=TREE after=TREE [--rounds 5]

Each op runs on inputs so small that the GPU finishes every kernel long before the host issues the
next one, so the wall time of a call is what the host spends in it: Python, the op's checks and
config choice, the custom-op dispatch, descriptor set-up and the Triton or cuBLAS launch. The median
of SAMPLES calls (the queue drained every DRAIN calls, outside the timing) per op; torch.mm and an
elementwise torch op give the floor of one launch from Python.
Two code versions cannot share a process (one `recycore` package per process), and one process per
version is not enough: two processes of one call measured the floor itself (one torch.mm) 1.3x apart
(benchmarks/README.md). `--compare` therefore runs ROUNDS processes per version, alternating, each
with PYTHONPATH=TREE (a directory holding a `recycore` package), and reports per op and version the
median of the rounds' medians, with the rounds' range.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SAMPLES = 400
DRAIN = 32


def host_us(fn, samples=SAMPLES):
    """(median, p20, p80) microseconds of host time per call of fn()."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(samples):
        if i % DRAIN == 0:
            torch.cuda.synchronize()
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    torch.cuda.synchronize()
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[4 * len(times) // 5]


def cases():
    """name -> (shape note, call). Small shapes: the GPU must never be what a call waits for."""
    from recycore.kernels import attention, gemm, int5, mlp, qk_prep

    dev, bf16 = "cuda", torch.bfloat16

    def rand(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, dtype=dtype)

    M, d, h = 256, 512, 1536
    u, w_up, w_down = rand(M, d), rand(h, d), rand(d, h)
    out, pre, post = mlp._mlp_forward(u, w_up, w_down, "persistent")
    B, T, H, Hkv, D = 1, 128, 8, 4, 64
    q, k, v, g = rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D), rand(B, T, H)
    cos, sin, gain = rand(T, 8, dtype=torch.float32), rand(T, 8, dtype=torch.float32), rand(H, dtype=torch.float32)
    y, o, lse = torch.ops.recycore.gated_xsa_attention(q, k, v, g, True)
    codes = torch.randint(0, 31, (512, 512), device=dev, dtype=torch.int32)
    packed, scales = int5.pack_gpu_layout(codes), torch.rand(512, device=dev, dtype=torch.float16)
    x16, x4k = rand(16, 512), rand(4096, 512)
    a, c = rand(M, d), torch.empty(M, h, device=dev, dtype=bf16)
    mlp_shape, attn_shape = f"M={M} d={d} h={h}", f"B={B} T={T} H={H} Hkv={Hkv} D={D}"
    return {
        "torch.mm (floor: one cuBLAS launch)": (mlp_shape, lambda: torch.mm(u, w_up.t())),
        "torch.add (floor: one elementwise launch)": (mlp_shape, lambda: torch.add(u, u)),
        "gemm template launcher": (mlp_shape, lambda: gemm.gemm(a, w_up, out=c)),
        "K1 leaky_relu2_mlp forward (public)": (mlp_shape, lambda: mlp.leaky_relu2_mlp(u, w_up, w_down)),
        "K1 leaky_relu2_mlp backward (op)": (mlp_shape, lambda: torch.ops.recycore.leaky_relu2_mlp_backward(
            u, u, w_up, w_down, pre, post, "persistent")),
        "K2 gated_xsa_attention forward (public)": (attn_shape, lambda: attention.gated_xsa_attention(q, k, v, g, True)),
        "K2 gated_xsa_attention backward (op)": (attn_shape, lambda: torch.ops.recycore.gated_xsa_attention_backward(
            y, q, k, v, g, o, lse, True)),
        "K2 attention(impl=auto) forward": (attn_shape, lambda: attention.attention(q, k, v, g, True)),
        "K4 qk_norm_rope forward (public)": (attn_shape, lambda: qk_prep.qk_norm_rope(q, k, cos, sin, gain)),
        "K4 qk_norm_rope backward (op)": (attn_shape, lambda: torch.ops.recycore.qk_norm_rope_backward(
            q, k, q, k, cos, sin, gain)),
        "K3 int5_linear M=16 (public)": ("512x512", lambda: int5.int5_linear(x16, packed, scales, 512, 512)),
        "K3 int5_linear M=4096 (public)": ("512x512", lambda: int5.int5_linear(x4k, packed, scales, 512, 512)),
    }


def measure(label):
    """Rows (one per op) of this process's code, printed as they come."""
    rows = []
    for name, (shape, fn) in cases().items():
        median, p20, p80 = host_us(fn)
        rows.append({"benchmark": "host cost per call", "shape": shape, "variant": f"{name} [{label}]",
                     "statistic": "median", "value": round(median, 2), "unit": "us",
                     "note": f"p20 {p20:.1f}, p80 {p80:.1f}; {SAMPLES} calls"})
        print(f"{name:48s} {median:8.1f} us  (p20 {p20:.1f}, p80 {p80:.1f})  [{label}]", flush=True)
    return rows


def compare(trees, rounds):
    """{label: PYTHONPATH tree} measured `rounds` times each in alternating processes -> rows of the
    median over the rounds (a round's figure: its process's median of SAMPLES calls)."""
    per_round = {label: [] for label in trees}
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for label in order:
            with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
                env = dict(os.environ, PYTHONPATH=trees[label])
                subprocess.run([sys.executable, __file__, tmp.name, "--label", label], env=env, check=True)
                per_round[label].append([json.loads(line) for line in open(tmp.name)])
    rows = []
    for label, runs in per_round.items():
        for i, row in enumerate(runs[0]):
            values = sorted(run[i]["value"] for run in runs)
            rows.append(dict(row, value=round(statistics.median(values), 2),
                             note=f"median of {rounds} alternating processes ({values[0]:.1f} to {values[-1]:.1f}); "
                                  f"each the median of {SAMPLES} calls"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON lines to append a row per op to")
    parser.add_argument("--label", default="current", help="names the code version in each row's variant")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=TREE",
                        help="versions to compare in alternating processes, each a directory holding `recycore`")
    parser.add_argument("--rounds", type=int, default=5, help="processes per version with --compare")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_cost.py measures CUDA launches: no CUDA device here")
    if args.compare:
        trees = dict(item.split("=", 1) for item in args.compare)
        rows = compare(trees, args.rounds)
        print("\nmedian over the rounds:")
        for r in rows:
            print(f"{r['variant']:64s} {r['value']:8.1f} us  ({r['note'].split('(')[1].split(')')[0]})")
    else:
        rows = measure(args.label)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
