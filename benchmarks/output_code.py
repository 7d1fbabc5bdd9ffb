"""Inductor's generated code for one micro-step (forward and backward graphs) and the layout copies in it.

`python3 benchmarks/output_code.py OUT_FILE [--path fused] [--batch-seqs 12]` on a GPU (`h200.sh outputcode`):
writes every compiled graph's module into OUT_FILE, prints how many graphs and Triton kernels there are
and names every kernel that only copies (a load stored unchanged): such a kernel beside a custom op
means a layout constraint and a producer's layout disagree (benchmarks/README.md, the packed projection).
"""
import argparse
import re

from recycore.bench import PATHS, generated_code, pure_copy_kernels
from recycore.config import Config
from recycore.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="file for the generated code")
    parser.add_argument("--path", default="fused", choices=sorted(PATHS), help="benchmark path (recycore.bench)")
    parser.add_argument("--batch-seqs", type=int, default=12, help="sequences per micro-step")
    args = parser.parse_args()
    codes = generated_code(args.path, Config(), args.batch_seqs)
    text = "\n\n".join(f"# ===== compiled graph {i}\n{code}" for i, code in enumerate(codes))
    atomic_write_text(args.out, text)
    kernels = len(re.findall(r"^def triton_", text, re.M))
    copies = pure_copy_kernels(text)
    print(f"{args.path}, {args.batch_seqs} sequences: {len(codes)} compiled graphs, {kernels} Triton kernels -> {args.out}")
    print("pure-copy kernels: " + (", ".join(copies) if copies else "none"))


if __name__ == "__main__":
    main()
