"""Every Triton kernel compiled offline for Hopper (sm_90, through ptxas) as the launchers launch it on
the GPU at the seed's shapes (bf16; d 512, h 1536, 8 heads, 4 kv heads, head_dim 64, T 2048, vocab
1024). The CPU interpreter runs a kernel's Python, so it misses what only the GPU compiler rejects
(a name bound in a run-time `if` and read after it, ...), shared memory past an SM's 227 KB, and
registers spilled to the stack (cuobjdump's resource usage of the cubin).

Nothing here restates a launcher: each scenario runs the real launch code (the custom ops' bodies,
which call the launchers) on meta tensors, which take the GPU paths (UPCAST off, the GPU configs and
tiles) without data, with every @triton.jit kernel replaced by a recorder; where the launch code asks
the device (SM count, device type) it is told an H200. Each recorded launch is specialized by
Triton's own argument binder (dtypes, divisibility by 16, ints equal to 1, the constexprs, num_warps,
num_stages) and compiled for sm_90 by a worker process without TRITON_INTERPRET, never from Triton's
disk cache. The whole module skips where Triton has no ptxas.
"""
import multiprocessing
import os
import re
import subprocess
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import pytest
import torch
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature
    from triton.tools.tensor_descriptor import TensorDescriptor

    assert triton.knobs.nvidia.ptxas.path and triton.knobs.nvidia.cuobjdump.path  # raise when Triton has neither
    TARGET = GPUTarget("cuda", 90, 32)
    BACKEND = make_backend(TARGET)
except Exception as error:  # any missing piece of the offline CUDA toolchain
    pytest.skip(f"no offline sm_90 compile here (Triton's ptxas / NVIDIA backend): {error}",
                allow_module_level=True)

from recycore.config import Config
from recycore.kernels import attention, gemm, head, int5, mlp, qk_prep

KERNEL_MODULES = (gemm, mlp, attention, qk_prep, int5, head)
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
# (scenario, kernel) -> the bytes of stack per thread (spilled registers) its sm_90 build has: a bound, so
# they spill no more; every other kernel must not spill at all. K2's two-pass dK/dV tile measured fastest
# with all the same (benchmarks/README.md). K1's "tiled" variant, a comparison path (the model runs the
# persistent one): its d_pre epilogue at 128x256 spilled 48 / 16 bytes before session 13's folded norm,
# and with the norm's row scales and row dots 528 / 1120 (and 88 in its sign-saving up GEMM); untuned since.
KNOWN_SPILLS = {("mlp-tiled-bwd", "_gemm_kernel"): 528, ("mlp-tiled-sign-bwd", "_gemm_kernel"): 1120,
                ("mlp-tiled-sign-fwd", "_gemm_kernel"): 88,
                ("attention-bwd-xsa1", "_attn_bwd_dkdv_kernel"): 232,
                ("attention-bwd-xsa0", "_attn_bwd_dkdv_kernel"): 216}
H200_SMS = 132
META, CUDA = torch.device("meta"), torch.device("cuda")
BF16 = torch.bfloat16

SEED = Config()
D, H_MLP, T, VOCAB = SEED.model_dim, SEED.mlp_dim, SEED.train_seq_len, SEED.vocab_size
HEADS, KV_HEADS, HEAD_DIM = SEED.num_heads, SEED.num_kv_heads, SEED.head_dim
TOKENS = SEED.train_batch_tokens // 8  # one micro-step per rank (grad_accum_steps = 8 // world_size)
BATCH = TOKENS // T
EVAL_ROWS = SEED.eval_batch_seqs * SEED.eval_seq_len  # rows of one evaluation batch (the int5 model)


def _empty(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device=META)


def _body(op):
    """The Python function behind a torch.library custom op (torch's CustomOpDef keeps it as _init_fn;
    the op itself, called on meta tensors, would run its fake implementation)."""
    return op._init_fn


# ----------------------------------------------------------------------------------------------
# Scenarios: the model's calls of each kernel family, on meta tensors
# ----------------------------------------------------------------------------------------------
def _mlp(variant, direction, saved="pre"):
    """K1: the forward (up GEMM) or the backward (d_pre, dW_up) custom op of one micro-step, with the row
    scales of the model's folded RMSNorm."""
    u, w_up, w_down = _empty(TOKENS, D), _empty(H_MLP, D), _empty(D, H_MLP)
    row_scale = _empty(TOKENS, dtype=torch.float32)
    if direction == "fwd":
        _body(mlp._mlp_forward)(u, w_up, w_down, variant, saved, row_scale)
    else:
        kept = _empty(TOKENS, H_MLP // 32, dtype=torch.int32) if saved == "sign" else _empty(TOKENS, H_MLP)
        _body(mlp._mlp_backward)(_empty(TOKENS, D), u, w_up, w_down, kept, _empty(TOKENS, H_MLP), variant, saved,
                                 row_scale)


def _attention_inputs():
    return (_empty(BATCH, T, HEADS, HEAD_DIM), _empty(BATCH, T, KV_HEADS, HEAD_DIM),
            _empty(BATCH, T, KV_HEADS, HEAD_DIM), _empty(BATCH, T, HEADS))


def _attention(direction, xsa):
    """K2 fully fused (impl "triton"): the forward, or the backward (epilogue backward, dK/dV, dQ)."""
    q, k, v, g = _attention_inputs()
    if direction == "fwd":
        _body(attention._gated_xsa_attention_op)(q, k, v, g, xsa)
    else:
        o, lse = _empty(*q.shape), _empty(BATCH, HEADS, T, dtype=torch.float32)
        _body(attention._gated_xsa_attention_backward_op)(_empty(*q.shape), q, k, v, g, o, lse, xsa)


def _attention_one_pass():
    """K2's backward with dQ summed by the dK/dV kernel (impl "triton_one_pass", one of "auto"'s choices)."""
    q, k, v, g = _attention_inputs()
    o, lse = _empty(*q.shape), _empty(BATCH, HEADS, T, dtype=torch.float32)
    _body(attention._gated_xsa_attention_backward_op)(_empty(*q.shape), q, k, v, g, o, lse, True, True)


def _xsa_gate(direction, xsa):
    """K2's stand-alone epilogue around an SDPA core (impl "sdpa_fused"): forward or backward."""
    o, _, v, g = _attention_inputs()
    if direction == "fwd":
        _body(attention._xsa_gate_op)(o, v, g, xsa)
    else:
        _body(attention._xsa_gate_backward_op)(_empty(*o.shape), o, v, g, xsa)


def _qk_prep(direction):
    """K4 q/k prep, q and k views of the fused QKV projection's output (as the model passes them)."""
    qkv = _empty(BATCH, T, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[..., :HEADS * HEAD_DIM].view(BATCH, T, HEADS, HEAD_DIM)
    k = qkv[..., HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(BATCH, T, KV_HEADS, HEAD_DIM)
    cos = sin = _empty(T, SEED.rope_dims // 2, dtype=torch.float32)
    q_gain = _empty(HEADS, dtype=torch.float32)
    if direction == "fwd":
        _body(qk_prep._qk_norm_rope_op)(q, k, cos, sin, q_gain)
    else:
        _body(qk_prep._qk_norm_rope_backward_op)(_empty(*q.shape), _empty(*k.shape), q, k, cos, sin, q_gain)


def _qkv_prep(direction, values=False):
    """K4 q/k prep on the packed [q | k | v | gate] projection output (the model's training path); values:
    with the row scales (the folded RMSNorm), a value embedding and the value residual (layers that have
    all three)."""
    qkv = _empty(BATCH, T, (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS)
    cos = sin = _empty(T, SEED.rope_dims // 2, dtype=torch.float32)
    q_gain, gate_bias = _empty(HEADS, dtype=torch.float32), _empty(HEADS, dtype=torch.float32)
    extra = (None, None, None, None)
    if values:
        extra = (_empty(BATCH, T, KV_HEADS * HEAD_DIM), _empty(BATCH, T, KV_HEADS, HEAD_DIM),
                 _empty(2, dtype=torch.float32), _empty(BATCH, T, dtype=torch.float32))
    if direction == "fwd":
        _body(qk_prep._qkv_prep_op)(qkv, cos, sin, q_gain, gate_bias, HEADS, KV_HEADS, *extra)
    else:
        grads = (_empty(BATCH, T, HEADS, HEAD_DIM), _empty(BATCH, T, KV_HEADS, HEAD_DIM),
                 _empty(BATCH, T, KV_HEADS, HEAD_DIM), _empty(BATCH, T, HEADS))
        _body(qk_prep._qkv_prep_backward_op)(*grads, qkv, cos, sin, q_gain, gate_bias, HEADS, KV_HEADS, *extra)


# The int5 model's packed matrices (c_v is shaped as c_k, attn.proj as c_q): (out, in, activation)
INT5_MATRICES = {
    "c_q": (D, D, None),
    "c_k": (SEED.kv_dim, D, None),
    "mlp.fc": (H_MLP, D, "leaky_relu2"),
    "mlp.proj": (D, H_MLP, None),
}
SPLIT_K_MATRIX = "mlp.proj"  # the one row of more than SMALL_M_UNSPLIT_GROUPS groups: split-K + reduction


def _int5(matrix, rows, impl="auto", config=None):
    """K3: the int5_linear custom op (its dispatch and launch) on x (rows, in_features)."""
    n, k, activation = INT5_MATRICES[matrix]
    packed = _empty(n, triton.cdiv(k, gemm.INT5_GROUP) * gemm.INT5_GROUP_WORDS, dtype=torch.int32)
    _body(int5._int5_linear)(_empty(rows, k), packed, _empty(n, dtype=torch.float16), n, k,
                             activation or "none", impl, None if config is None else config.as_list())


def _large_m_kernel(matrix):
    """The fused int5 kernel int5_linear picks for an evaluation batch."""
    n, k, _ = INT5_MATRICES[matrix]
    choice = int5._choose(EVAL_ROWS, n, k, BF16, CUDA, "auto", None)
    return {"resident": "_int5_resident_kernel", "stream": "_int5_stream_kernel"}[choice.kernel]


def _head(op):
    """The fused head (K4 head): training loss with gradients, evaluation NLL, or the backward."""
    x, w, targets = _empty(TOKENS, D), _empty(VOCAB, D), _empty(TOKENS, dtype=torch.int64)
    cap = SEED.logit_softcap
    # chunk_rows 0, block_v 0, fp32_gemm_out True: the public functions' defaults
    if op == "ce":
        _body(head._softcap_ce_op)(x, w, targets, cap, BF16, 0, 0, True, True, True)
    elif op == "nll":
        _body(head._softcap_token_nll_op)(x, w, targets, cap, BF16, 0, 0, True)
    else:
        _body(head._softcap_ce_backward_op)(_empty(dtype=torch.float32), _empty(TOKENS, D),
                                            _empty(VOCAB, D, dtype=torch.float32), BF16, BF16)


def _template_kernel(variant, role):
    return "_gemm_persistent_kernel" if mlp.SEED_CONFIGS[variant][role].persistent else "_gemm_kernel"


def _scenarios():
    """name -> (the scenario, the kernels it launches, each a test case)."""
    s = {}
    for variant in mlp.VARIANTS:
        for saved in mlp.SAVED:
            name = f"mlp-{variant}" + ("-sign" if saved == "sign" else "")
            s[f"{name}-fwd"] = partial(_mlp, variant, "fwd", saved), [_template_kernel(variant, "up")]
            s[f"{name}-bwd"] = partial(_mlp, variant, "bwd", saved), sorted(
                {_template_kernel(variant, "d_pre"), "_gemm_kernel", "_splitk_reduce_kernel"})  # d_pre, dW_up
    for xsa in (True, False):
        s[f"attention-fwd-xsa{xsa:d}"] = partial(_attention, "fwd", xsa), ["_attn_fwd_kernel"]
        s[f"attention-bwd-xsa{xsa:d}"] = partial(_attention, "bwd", xsa), [
            "_xsa_gate_bwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
        for direction in ("fwd", "bwd"):
            s[f"xsa_gate-{direction}-xsa{xsa:d}"] = partial(_xsa_gate, direction, xsa), [
                f"_xsa_gate_{direction}_kernel"]
    s["attention-bwd-one-pass"] = _attention_one_pass, ["_attn_bwd_dkdv_kernel"]
    for direction in ("fwd", "bwd"):
        s[f"qk_prep-{direction}"] = partial(_qk_prep, direction), [f"_qk_norm_rope_{direction}_kernel"]
        s[f"qkv_prep-{direction}"] = partial(_qkv_prep, direction), [f"_qk_norm_rope_{direction}_kernel"]
        s[f"qkv_prep-values-{direction}"] = partial(_qkv_prep, direction, True), [f"_qk_norm_rope_{direction}_kernel"]
    for matrix in INT5_MATRICES:  # the int5 model's evaluation
        s[f"int5-{matrix}-M{EVAL_ROWS}"] = partial(_int5, matrix, EVAL_ROWS), [_large_m_kernel(matrix)]
    for matrix in ("c_q", "mlp.fc", "mlp.proj"):  # small M: the template (splitk, its split rows summed in
        for rows in (1, int5.SMALL_M_MAX):      # the kernel: one launch), the gemv candidate
            s[f"int5-splitk-{matrix}-M{rows}"] = partial(_int5, matrix, rows), ["_gemm_kernel"]
        for rows in (1, int5.GEMV_MAX_M):
            s[f"int5-gemv-{matrix}-M{rows}"] = partial(_int5, matrix, rows, "gemv"), ["_int5_gemv_kernel"]
    # the split rows summed by a second launch instead (a contender of the benchmark's table)
    two_launches = int5.Int5Config("splitk", 16, int5.SMALL_M_BLOCK_N, 4, 3, group_m=1, reduce_in_kernel=0)
    s["int5-splitk-two-launches"] = partial(_int5, SPLIT_K_MATRIX, int5.GEMV_MAX_M, config=two_launches), [
        "_gemm_kernel", "_splitk_reduce_kernel"]
    s["int5-dequant"] = partial(_int5, "mlp.proj", EVAL_ROWS, "dequant"), ["_dequantize_kernel"]
    s["head-ce"] = partial(_head, "ce"), ["_rms_norm_fwd_kernel", "_softcap_ce_kernel", "_rms_norm_bwd_kernel"]
    s["head-nll"] = partial(_head, "nll"), ["_softcap_ce_kernel"]
    s["head-bwd"] = partial(_head, "bwd"), ["_scale_kernel"]
    return s


SCENARIOS = _scenarios()
CASES = [(scenario, kernel) for scenario, (_, kernels) in SCENARIOS.items() for kernel in kernels]


# ----------------------------------------------------------------------------------------------
# Recording the launches
# ----------------------------------------------------------------------------------------------
def _is_jit(value):
    return isinstance(value, (JITFunction, InterpretedFunction))


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, self.kernel, args, kwargs))


def _as_cuda(fn):
    """fn (a choice by device) asked as on the GPU: a meta device reads as CUDA. Uncached (an
    lru_cache's __wrapped__): nothing of this test stays in the launchers' caches."""
    raw = getattr(fn, "__wrapped__", fn)
    return lambda *args: raw(*(CUDA if isinstance(a, torch.device) and a.type == "meta" else a for a in args))


def _record(scenario):
    """[(kernel name, kernel, args, kwargs)] of every launch the scenario makes, as on an H200."""
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        for module in KERNEL_MODULES:
            for name, value in list(vars(module).items()):
                if _is_jit(value):
                    mp.setattr(module, name, _Recorder(name, value, launches))
        for module in (gemm, int5):
            mp.setattr(module, "num_sms", lambda device_index: H200_SMS)
        for name in ("_choose", "_small_m_plan", "_sms"):
            mp.setattr(int5, name, _as_cuda(getattr(int5, name)))
        SCENARIOS[scenario][0]()
    return launches


# ----------------------------------------------------------------------------------------------
# Compiling the recorded launches for sm_90, in a worker process
# ----------------------------------------------------------------------------------------------
class _Pointer:
    """What the binder reads of a tensor argument: dtype and address (a meta tensor's address is its
    offset into the base allocation, which CUDA aligns to 256 bytes)."""

    def __init__(self, t):
        self.dtype, self._ptr = t.dtype, t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


def _device_arg(arg):
    if isinstance(arg, torch.Tensor):
        return _Pointer(arg)
    if isinstance(arg, TensorDescriptor):
        return TensorDescriptor(_Pointer(arg.base), arg.shape, arg.strides, arg.block_shape, arg.padding)
    return arg


def _specialize(jit, args, kwargs):
    """(signature, constexprs, attrs, options) of a launch, as JITFunction.run derives them."""
    kwargs = dict(kwargs, debug=kwargs.get("debug", jit.debug) or triton.knobs.runtime.debug,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(jit.signature, jit.params, BACKEND)
    bound, specialization, options = binder(*map(_device_arg, args), **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(BACKEND, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _variants(scenario, kernel, cache_dir):
    """(In the worker.) [(jit, signature, constexprs, attrs, options)] of each distinct specialization of
    `kernel` that the scenario launches; compiles from here on go to cache_dir, never from a cache."""
    triton.knobs.compilation.always_compile = True
    triton.knobs.cache.dir = cache_dir
    variants = {}
    for name, jit, args, kwargs in _record(scenario):
        if name == kernel:
            assert isinstance(jit, JITFunction), f"{name} is {jit!r}: TRITON_INTERPRET is on in the worker"
            spec = _specialize(jit, args, kwargs)
            variants.setdefault(repr(spec), (jit, *spec))
    return list(variants.values())


def _compile_case(scenario, kernel, cache_dir):
    """(In the worker.) [(launch description, its UPCAST, shared bytes, compile error)] for each distinct
    specialization of `kernel` that the scenario launches, compiled for sm_90 (not from a cache)."""
    results = []
    for jit, signature, constexprs, attrs, options in _variants(scenario, kernel, cache_dir):
        named = {jit.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        what = (f"{kernel}({', '.join(f'{n}={v}' for n, v in named.items())}, "
                f"num_warps={options.num_warps}, num_stages={options.num_stages})")
        try:
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=TARGET,
                                      options=options.__dict__)
            stack = _stack_bytes(compiled.asm["cubin"], cache_dir)
            results.append((what, named.get("UPCAST"), compiled.metadata.shared, stack, None))
        except Exception as error:  # the compiler's message is the result
            results.append((what, named.get("UPCAST"), None, None, f"{type(error).__name__}: {error}"))
    return results


def _stack_bytes(cubin: bytes, directory: str) -> int:
    """Bytes of stack per thread of the cubin's kernel (cuobjdump -res-usage): where ptxas spills registers."""
    path = os.path.join(directory, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True,
                           check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def _global_accesses(scenario, kernel, cache_dir):
    """(In the worker.) {PTX global load/store instruction: count} of each distinct specialization of
    `kernel` that the scenario launches, compiled for sm_90."""
    found = []
    for jit, signature, constexprs, attrs, options in _variants(scenario, kernel, cache_dir):
        ptx = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=TARGET,
                             options=options.__dict__).asm["ptx"]
        found.append(dict(Counter(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx))))
    return found


def _interpreting():
    return bool(triton.knobs.runtime.interpret)


@pytest.fixture(scope="module")
def sm90_worker():
    """One process that compiles with Triton's GPU front end. Not this one: under TRITON_INTERPRET=1 (the
    CPU test run) @triton.jit made interpreter wrappers, and a kernel run by the interpreter leaves
    parts of triton.language patched for it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        worker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        assert not worker.submit(_interpreting).result()  # (starts the worker in this environment)
    yield worker
    worker.shutdown()


@pytest.mark.parametrize("scenario,kernel", CASES, ids=[f"{s}::{k}" for s, k in CASES])
def test_kernel_compiles_for_sm90(scenario, kernel, sm90_worker, tmp_path):
    results = sm90_worker.submit(_compile_case, scenario, kernel, str(tmp_path)).result()
    assert results, f"{scenario} no longer launches {kernel}"
    for what, upcast, shared, stack, error in results:
        if error is not None:
            pytest.fail(f"{what} does not compile for sm_90:\n{error}", pytrace=False)
        assert upcast in (None, False), f"{what}: not the GPU path"
        assert shared <= SMEM_LIMIT, f"{what}: {shared} bytes of shared memory, an sm_90 block has {SMEM_LIMIT}"
        assert stack <= KNOWN_SPILLS.get((scenario, kernel), 0), (
            f"{what}: {stack} bytes of stack per thread (registers spilled), more than the "
            f"{KNOWN_SPILLS.get((scenario, kernel), 0)} known for {scenario}")


def test_every_kernel_has_a_case():
    """A new kernel (a launched @triton.jit function, named *_kernel) needs a scenario here."""
    kernels = {name for module in KERNEL_MODULES for name, value in vars(module).items()
               if _is_jit(value) and name.endswith("_kernel")}
    assert kernels == {kernel for _, kernel in CASES}


@pytest.mark.parametrize("values", ["", "-values"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_packed_projection_rows_move_16_bytes_per_access(direction, values, sm90_worker, tmp_path):
    """qkv_prep reads (forward) and writes (backward) rows 1032 elements apart, which Triton cannot tell
    are 16-byte aligned: without the kernels' alignment promise its sm_90 build moved them 2 bytes at a
    time (58 such accesses each way). Left: the gate's 8 columns (2 accesses each way; backward with the
    row scales reads its raw logits too: 2 more). "-values": the value embedding and v0 read, the blend
    written, as 16-byte vectors too."""
    [counts] = sm90_worker.submit(_global_accesses, f"qkv_prep{values}-{direction}", f"_qk_norm_rope_{direction}_kernel",
                                  str(tmp_path)).result()
    two_byte = counts.get("ld.global.b16", 0) + counts.get("st.global.b16", 0)
    gate_accesses = 6 if values and direction == "bwd" else 4
    assert two_byte <= gate_accesses and counts.get("ld.global.v4.b32", 0) + counts.get("st.global.v4.b32", 0) >= 8, \
        counts
