"""Whole-model step timing and the profiler view (`recycore bench`).

`micro_step` builds the model for one path — the reference under torch.compile
(default or max-autotune, whole model or per block) or the fused kernels —
and times one forward+backward micro-step with CUDA events. `kernel_family`
sorts profiler kernel names into the families of docs/KERNELS.md so
`recycore bench --profile` shows where the step's GPU time goes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from recycore.config import Config
from recycore.graphs import Captured
from recycore.model import GPT
from recycore.ops import kernel_choices

PATHS = {
    # name: (kernels, compile mode, per-block compile, CUDA graphs)
    "reference-eager": ("reference", None, False, False),
    "reference-compiled": ("reference", "default", False, False),
    "reference-compiled-graphs": ("reference", "default", False, True),
    "reference-max-autotune": ("reference", "max-autotune-no-cudagraphs", True, False),
    # the same mode over the whole model: cross-block fusions, but its compile does not finish within a
    # 10-minute device call on an H200 even with the saved GEMM decisions (benchmarks/README.md)
    "reference-max-autotune-whole": ("reference", "max-autotune-no-cudagraphs", False, False),
    "fused": ("fused", "default", False, False),
    # the step as training runs it: compiled, replayed as a CUDA graph (recycore.graphs)
    "fused-graphs": ("fused", "default", False, True),
}

FAMILIES = (  # first match wins; patterns are searched in lower-cased kernel names
    ("attention", r"attn|flash|fmha|sdpa|cudnn|softmax_bwd|_xsa"),
    ("gemm", r"gemm|xmma|cutlass|nvjet|wgmma|matmul|_mlp|int5|triton_tem|mm_kernel|splitk"),
    ("optimizer", r"multi_tensor|adam|foreach|muon|newton"),
    ("elementwise/norm", r"triton_(poi|red|per)|elementwise|reduce|norm|vectorized|unrolled|copy|fill|cat"),
)


# GEMM autotune timings and pointwise best configs of the H200 runs (benchmarks/README.md): with them a
# bare H200 compiles the per-block max-autotune reference without benchmarking every GEMM again
AUTOTUNE_ARCHIVE = Path(__file__).resolve().parent.parent / "benchmarks" / "h200_inductor_autotune.tgz"


def seed_inductor_cache(archive: str | Path | None = None, cache_dir: str | Path | None = None) -> int:
    """Unpack saved autotuning decisions into inductor's cache (TORCHINDUCTOR_CACHE_DIR, else its
    default), keeping every entry already there; returns the number of files added. The archive is
    RECYCORE_AUTOTUNE_ARCHIVE if set ("none": no seeding), else the committed H200 one when present.
    Entries are keyed by GPU, torch and triton versions: on another setup they are never looked up."""
    import gzip
    import tarfile
    import zlib

    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    # an install without benchmarks/ has no committed archive: nothing to seed
    archive = archive or os.environ.get("RECYCORE_AUTOTUNE_ARCHIVE") or (
        AUTOTUNE_ARCHIVE if AUTOTUNE_ARCHIVE.exists() else "none")
    if str(archive) == "none":
        return 0
    if not Path(archive).is_file():
        raise FileNotFoundError(f"autotune archive {archive} does not exist (RECYCORE_AUTOTUNE_ARCHIVE=none: no seeding)")
    target = Path(cache_dir or inductor_cache_dir())
    added = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and not (target / member.name).exists():
                    tar.extract(member, target, filter="data")  # the data filter refuses absolute paths and '..'
                    added += 1
    except tarfile.FilterError as error:
        raise ValueError(f"autotune archive {archive} holds an unsafe member: {error}") from error
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"autotune archive {archive} is not a readable .tgz: {error}") from error
    print(f"inductor cache {target}: {added} autotuning decisions added from {archive}", flush=True)
    return added


# the micro-step paths `recycore bench` measures: the suite against the max-autotune baseline (minutes of
# compile, see AUTOTUNE_ARCHIVE), the profile view the quick pair
SUITE_PATHS = "reference-max-autotune,reference-compiled,fused,fused-graphs"
PROFILE_PATHS = "reference-compiled,fused"


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, pattern in FAMILIES:
        if re.search(pattern, lowered):
            return family
    return "other"


def build(path: str, cfg: Config, device="cuda", backend: str = "inductor", batch_seqs: int = 48):
    """(model, step function) for one benchmark path; the step runs fwd+bwd once.
    (`backend` other than inductor, e.g. aot_eager, is for CPU tests of the compile layout.)"""
    kernels, mode, per_block, graphs = PATHS[path]
    model = GPT(cfg.replace(kernels=kernels)).to(device)
    model.choose_kernels(batch_seqs, cfg.train_seq_len, training=True)
    if mode is not None:
        options = dict(backend=backend, dynamic=False, fullgraph=True)
        if backend == "inductor" and mode != "default":
            options["mode"] = mode
        if per_block:  # whole-model max-autotune compiles take too long (benchmarks/README.md): compile blocks
            # The blocks share Block.forward: each structural variant (XSA, value embeddings, ...) is a
            # dynamo recompile of that one code object; configs may have more than its default limit of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for module in (*model.blocks, *model.recycle_mods):
                module.compile(**options)
            # the tied head and the loss (98,304 x 1,024 logits) too; the embedding prelude, the
            # skip adds and the final norm stay eager (< 1% of the step's work)
            model.loss = torch.compile(model.loss, **options)
            runner = model
        else:
            runner = torch.compile(model, **options)
    else:
        runner = model

    params = list(model.parameters())

    def step(x, y):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = runner(x, y)
        loss.backward()
        return loss.detach()

    return model, Captured(step, path, enabled=graphs)


def pure_copy_kernels(code: str) -> list[str]:
    """The Triton kernels of inductor's generated `code` whose whole body is one load stored unchanged:
    layout copies, e.g. a custom op's stride constraint meeting a padded producer."""
    kernels = re.findall(r"def (triton_\w+)\(.*?\):\n(.*?)''', device_str", code, re.S)
    return [name for name, body in kernels
            if body.count("tl.load") == 1 and body.count("tl.store") == 1
            and not re.search(r"tmp\d+ = (?!tl\.load)", body)]


def kernel_traffic(code: str) -> list[tuple[str, int, float]]:
    """(kernel, launches, bytes) for each Triton kernel that one compiled graph's generated `code` launches,
    largest first: bytes is inductor's own estimate of the kernel's memory traffic (the sum of its
    `tiling_scores`, which count an in-place buffer twice), times the launches in the graph's `call`."""
    per_launch = {name: sum(float(v) for v in re.findall(r":\s*([0-9.e+]+)", scores))
                  for name, scores in re.findall(r"'kernel_name': '(\w+)'.*?'tiling_scores': \{([^}]*)\}", code)}
    call = code[code.find("def call("):]
    launches = Counter(re.findall(r"\b(triton_\w+)\.run\(", call))
    rows = [(name, count, per_launch.get(name, 0.0) * count) for name, count in launches.items()]
    return sorted(rows, key=lambda row: -row[2])


def generated_code(path: str, cfg: Config, batch_seqs: int = 48, device="cuda") -> list[str]:
    """Inductor's generated code of `path`'s first micro-step, a module per compiled graph (forward and
    backward), compiled afresh: a cache hit would generate nothing."""
    from torch._inductor.utils import run_and_get_code

    with torch.compiler.config.patch(force_disable_caches=True):
        _, step = build(path, cfg, device=device, batch_seqs=batch_seqs)
        _, codes = run_and_get_code(step, *random_batch(cfg, batch_seqs, device))
    return codes


class _CodeKept(Exception):
    """Raised where inductor would compile a generated module: its code is kept instead."""


def _stand_in(gm: torch.fx.GraphModule):
    """A boxed callable returning uninitialised tensors of gm's output shapes, strides and dtypes."""
    metas = [None if node is None else node.meta["val"] for node in gm.graph.output_node().args[0]]

    def run(args):
        return [torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype)
                if isinstance(v, torch.Tensor) else v for v in metas]
    run._boxed_call = True
    return run


def _code_keeping_backend():
    """A torch.compile backend that has inductor generate each forward and backward graph's code (kept
    through the patch of `_sm90_codegen_on_cpu`) and then runs the graph's stand-in."""
    import copy

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    def compiler(is_backward):
        def compile_graph(gm, example_inputs):
            try:  # post-grad passes rewrite the graph they get: a copy
                compile_fx_inner(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)), example_inputs,
                                 is_backward=is_backward)
            except Exception as error:  # inductor wraps what the hook raises (InductorError.inner_exception)
                if not isinstance(getattr(error, "inner_exception", error), _CodeKept):
                    raise
            return _stand_in(gm)
        return compile_graph

    return aot_autograd(fw_compiler=compiler(False), bw_compiler=compiler(True), decompositions=select_decomp_table(),
                        partition_fn=min_cut_rematerialization_partition)


@contextlib.contextmanager
def _sm90_codegen_on_cpu(codes: list[str]):
    """Inductor generating Triton code for CPU tensors against Triton's offline sm_90 backend, each graph's
    code appended to `codes` where the module would be compiled (which raises _CodeKept)."""
    from unittest import mock

    import torch._inductor.config as inductor_config
    import torch._inductor.graph as inductor_graph
    import torch._inductor.scheduler as inductor_scheduler
    import torch.utils._triton as torch_triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from recycore.kernels import _common

    def keep_code(graph):  # stands for GraphLowering._compile_to_module
        code, _ = graph.codegen()
        codes.append(getattr(code, "value", code))
        raise _CodeKept

    sm90 = make_backend(GPUTarget("cuda", 90, 32))
    patches = [mock.patch.object(torch_triton, "triton_backend", lambda: sm90),
               mock.patch.object(torch_triton, "triton_hash_with_backend", lambda: "sm90-offline"),
               mock.patch.object(inductor_graph.GraphLowering, "_compile_to_module", keep_code),
               inductor_config.patch(cpu_backend="triton"),
               torch.compiler.config.patch(force_disable_caches=True),  # a cache hit would generate nothing
               # the launchers' checks refuse CPU tensors outside the interpreter; no kernel is launched here
               mock.patch.object(_common, "INTERPRETER_ENABLED", True)]
    if hasattr(inductor_scheduler, "_is_gpu_triton_backend"):  # GPU-only fusions (mix-order reductions) too
        patches.append(mock.patch.object(inductor_scheduler, "_is_gpu_triton_backend", lambda *nodes: True))
    quiet = logging.getLogger("torch._inductor.utils")  # it warns of the cache dir each stopped compile keeps
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.callback(quiet.setLevel, quiet.level)
        quiet.setLevel(logging.ERROR)
        yield


def generated_code_on_cpu(path: str, cfg: Config, batch_seqs: int = 12) -> list[str]:
    """What `generated_code` returns, on a machine without a GPU: inductor's Triton code for `path`'s
    micro-step (its forward and backward graphs) at cfg's shapes, for an sm_90 target. The model runs on
    the CPU with inductor's Triton backend (`cpu_backend="triton"`) against Triton's offline NVIDIA
    backend; each graph's code is kept, not compiled, and a stand-in returns uninitialised outputs of
    the graph's shapes so that autograd reaches the backward graph. Fusion and partitioning are
    inductor's own; what it decides by asking the device differs from a GPU compile (no row padding,
    so no copies beside the custom ops; the CPU's autocast lists; the attention kernels' CPU choice),
    so compare totals of this function with each other, not with a GPU's. Whole-model paths only."""
    kernels, mode, per_block, _ = PATHS[path]
    if mode != "default" or per_block:
        raise ValueError(f"generated_code_on_cpu compiles whole-model default-mode paths, not {path!r}")
    torch.manual_seed(0)
    model = GPT(cfg.replace(kernels=kernels))
    x, y = random_batch(cfg, batch_seqs, device="cpu")
    codes: list[str] = []
    with _sm90_codegen_on_cpu(codes):
        runner = torch.compile(model, backend=_code_keeping_backend(), dynamic=False, fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = runner(x, y)
        loss.backward()
    return codes


def random_batch(cfg: Config, batch_seqs: int, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch_seqs, cfg.train_seq_len + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def micro_step(path: str, cfg: Config, batch_seqs: int = 48, repeats: int = 20, with_profile: bool = False) -> dict:
    """Compile time, median/p20/p80 ms of one fwd+bwd micro-step, peak memory, and
    (with_profile) the GPU time of one more step by kernel family."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, step = build(path, cfg, batch_seqs=batch_seqs)
    x, y = random_batch(cfg, batch_seqs)
    start = time.perf_counter()
    step(x, y)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    for _ in range(3):
        step(x, y)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step(x, y)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    times.sort()
    result = {"path": path, "ms": statistics.median(times), "ms_p20": times[len(times) // 5],
              "ms_p80": times[4 * len(times) // 5], "compile_s": compile_s,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "batch_seqs": batch_seqs,
              "seq_len": cfg.train_seq_len}
    result["kernel_choices"] = kernel_choices()
    if with_profile:
        result.update(profile_step(step, x, y))
    model.zero_grad(set_to_none=True)
    return result


def profile_step(step, *args, device="cuda") -> dict:
    """Milliseconds of one (warm) call of step(*args) per kernel family, and the top kernels: GPU time
    of the CUDA kernels, or on the CPU (the tests) the operators' own CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        step(*args)
        if on_gpu:
            torch.cuda.synchronize()
    families: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        ms = (event.device_time_total if on_gpu else event.self_cpu_time_total) / 1000.0
        if ms <= 0:
            continue
        families[kernel_family(event.key)] = families.get(kernel_family(event.key), 0.0) + ms
        kernels[event.key] = kernels.get(event.key, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
    # the largest of each family too: the elementwise family is many small kernels, none in the top 12
    by_family: dict[str, list] = {}
    for name, ms in ranked:
        listed = by_family.setdefault(kernel_family(name), [])
        if len(listed) < 15:
            listed.append((name, ms))
    return {"total_ms": sum(families.values()), "families": families, "top_kernels": ranked[:12],
            "family_kernels": by_family}


def profile(path: str, cfg: Config, batch_seqs: int = 48, device="cuda") -> dict:
    """The profiler view of one micro-step of one path, then of the optimiser step that ends a
    training step (once per step: with the seed's 8 GPUs, once per micro-step). All of the optimiser
    step's kernels count as `optimizer`, its Newton-Schulz matmuls too; the top kernels are the
    micro-step's."""
    from recycore.optim import OptimizerSet

    model, step = build(path, cfg, device=device, batch_seqs=batch_seqs)
    x, y = random_batch(cfg, batch_seqs, device=device)
    optimizers = OptimizerSet(model, cfg)
    optimizers.set_schedule(1.0, cfg.muon_momentum)
    for _ in range(3):  # warm: compiles, autotuning, the optimiser's state
        step(x, y)
        optimizers.step()
        optimizers.zero_grad()
    result = {"path": path, **profile_step(step, x, y, device=device)}
    optimizer_ms = profile_step(optimizers.step, device=device)["total_ms"]
    result["families"]["optimizer"] = result["families"].get("optimizer", 0.0) + optimizer_ms
    result["total_ms"] += optimizer_ms
    return result


def format_profile(result: dict) -> str:
    with_optimizer = " (micro-step + optimiser step)" if "optimizer" in result["families"] else ""
    lines = [f"{result['path']}: {result['total_ms']:.1f} ms of kernels{with_optimizer}"]
    lines += [f"  measured: {line}" for line in result.get("kernel_choices", [])]
    for family, ms in sorted(result["families"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {family:<18} {ms:8.2f} ms  {100 * ms / result['total_ms']:5.1f}%")
    lines.append("  top kernels of the micro-step:")
    for name, ms in result["top_kernels"]:
        lines.append(f"    {ms:8.2f} ms  [{kernel_family(name)}] {name[:90]}")
    for family, listed in result.get("family_kernels", {}).items():
        if family in ("elementwise/norm", "gemm"):
            lines.append(f"  largest {family} kernels:")
            lines += [f"    {ms:8.2f} ms  {name[:110]}" for name, ms in listed]
    return "\n".join(lines)
