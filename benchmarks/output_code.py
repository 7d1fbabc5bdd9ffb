"""Inductor's generated code for one micro-step (forward and backward graphs): its layout copies and where
its memory traffic goes.

`python3 benchmarks/output_code.py OUT_FILE [--path fused] [--batch-seqs 12] [--top 12]` on a GPU
(`h200.sh outputcode`), or with `--device cpu` on a machine without one
(`recycore.bench.generated_code_on_cpu`: inductor's own fusion for an sm_90 target, without the GPU's
row padding; compare its totals with other CPU runs): writes every compiled graph's module into
OUT_FILE, prints how many graphs and Triton kernels there are, names every kernel that only copies, with
its traffic (a load stored unchanged: such a kernel beside a custom op means a layout constraint and a
producer's layout disagree; benchmarks/README.md, the packed projection), and ranks each graph's Triton
kernels by inductor's estimate of their memory traffic (`recycore.bench.kernel_traffic`): where the
elementwise family's time goes, without a profile.
"""
import argparse
import re

from recycore.bench import PATHS, generated_code, generated_code_on_cpu, kernel_traffic, pure_copy_kernels
from recycore.config import Config
from recycore.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="file for the generated code")
    parser.add_argument("--path", default="fused", choices=sorted(PATHS), help="benchmark path (recycore.bench)")
    parser.add_argument("--batch-seqs", type=int, default=12, help="sequences per micro-step")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per graph, by estimated traffic")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: generate the GPU code without a GPU (whole-model paths)")
    args = parser.parse_args()
    if args.device == "cpu":
        codes = generated_code_on_cpu(args.path, Config(), args.batch_seqs)
    else:
        codes = generated_code(args.path, Config(), args.batch_seqs)
    text = "\n\n".join(f"# ===== compiled graph {i}\n{code}" for i, code in enumerate(codes))
    atomic_write_text(args.out, text)
    kernels = len(re.findall(r"^def triton_", text, re.M))
    traffic = {name: nbytes for code in codes for name, _, nbytes in kernel_traffic(code)}
    copies = [f"{name} ({traffic.get(name, 0) / 1e6:.1f} MB)" for name in pure_copy_kernels(text)]
    print(f"{args.path}, {args.batch_seqs} sequences ({args.device}): {len(codes)} compiled graphs, {kernels} Triton kernels -> {args.out}")
    print("pure-copy kernels: " + (", ".join(copies) if copies else "none"))
    for i, code in enumerate(codes):
        rows = kernel_traffic(code)
        print(f"graph {i}: {sum(n for _, n, _ in rows)} Triton launches, inductor's traffic estimate "
              f"{sum(b for *_, b in rows) / 1e9:.2f} GB; the largest:")
        for name, launches, nbytes in rows[:args.top]:
            print(f"  {nbytes / 1e9:7.3f} GB  x{launches:<3d} {name}")


if __name__ == "__main__":
    main()
