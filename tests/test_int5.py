"""K3: the int5 GPU layout (lossless transcoding of the artifact bytes), the decoder, and int5_linear
against x @ (q*s)^T in float64 for every kernel (resident, stream, splitk, gemv) and the dense
comparison path, with and without the LeakyReLU² epilogue; ragged shapes, NaN-poisoned outputs,
the TMA and pointer paths; the weight is never decoded into a dense matrix (CPU: the decoder is
never called; GPU: no allocation besides the outputs, at the model's shapes)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rel_err, requires_cuda

from recycore.kernels import Int5Linear, int5_linear, int5_linear_reference
from recycore.kernels import gemm as gemm_module
from recycore.kernels import int5 as int5_module
from recycore.kernels.gemm import EPILOGUE_LEAKY_RELU2, INT5_GROUP, arrival_counters, default_config, gemm
from recycore.kernels.int5 import (
    CPU_CONFIGS,
    SMALL_M_MAX,
    Int5Config,
    dequantize,
    pack_gpu_layout,
    transcode_artifact,
    unpack_gpu_layout,
)
from recycore.int5_codec import pack_int5

CPU = DEVICE.type == "cpu"
# bf16: outputs rounded to bf16 (the interpreter truncates the fp32 -> bf16 casts)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if CPU else 1e-2}
N, K = 72, 200  # ragged against the 32-row tiles and the 128-value groups
LARGE_M = SMALL_M_MAX + 13  # odd, above the small-M regime
KERNEL_IMPLS = ("resident", "stream", "splitk", "gemv")
MODEL_SHAPES = [(512, 512), (256, 512), (1536, 512), (512, 1536)]  # Q/O, K/V, MLP up, MLP down


def _random_q(rows, cols):
    """Fresh int5 values with every value -15..15 present (when there are at least 31)."""
    q = torch.randint(-15, 16, (rows, cols), dtype=torch.int64)
    n = min(31, q.numel())
    q.view(-1)[:n] = torch.arange(-15, 16)[torch.randperm(31)[:n]]
    return q[torch.randperm(rows)]


def _weight(rows, cols):
    q = _random_q(rows, cols)
    scales = (torch.rand(rows) * 0.02 + 0.005).to(torch.float16)
    packed = pack_gpu_layout(q + 15).to(DEVICE)
    return q, scales.to(DEVICE), packed


def _reference(x, q, scales, activation=None):
    y = x.double() @ (q.to(x.device).double() * scales.double()[:, None]).t()
    return F.leaky_relu(y, 0.5).square() if activation == "leaky_relu2" else y


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", [(37, 200), (3, 128), (1, 5), (16, 1536)])
def test_gpu_layout_round_trip_and_size(rows, cols):
    q = _random_q(rows, cols)
    words = pack_gpu_layout(q + 15)
    assert words.dtype == torch.int32
    assert torch.equal(unpack_gpu_layout(words, cols), q + 15)
    padded = -(-cols // INT5_GROUP) * INT5_GROUP
    assert words.numel() * 32 == rows * padded * 5  # 5 bits per weight, rows padded to 128 values


def test_gpu_layout_bit_positions():
    """gemm.py's INT5 layout, spot-checked: value k = 8i + 2c + e of a group, pair i < 15 in word
    (4c + i // 3 or 16 + c) at bit 5 (i % 3) + 16 e; pair 15 in bits 15 / 31 of its class's words."""
    u = torch.full((1, 128), 15, dtype=torch.int64)
    u[0, 8 * 7 + 2 * 2 + 1] = 30  # i = 7, c = 2, e = 1: word 4*2 + 2, bits 21..25
    u[0, 8 * 15 + 2 * 3 + 0] = 1  # i = 15, c = 3, e = 0: bit 0 -> bit 15 of word 4*3 + 0
    words = pack_gpu_layout(u).to(torch.int64) & 0xFFFFFFFF
    assert (words[0, 10] >> 21) & 31 == 30
    assert (words[0, 12] >> 15) & 1 == 1 and (words[0, 13] >> 15) & 1 == 0 and (words[0, 19] >> 15) & 1 == 0
    assert (words[0, 16 + 3] >> 15) & 1 == 0  # bit 4 of the value: word t = 4 of class 3


def test_transcode_artifact_bytes_is_lossless():
    q = _random_q(37, 200)
    artifact = pack_int5(q)  # SPEC §4 bytes, from the artifact codec (recycore.int5_codec)
    words = transcode_artifact(artifact, 37, 200)
    assert torch.equal(words, pack_gpu_layout(q + 15))
    assert torch.equal(unpack_gpu_layout(words, 200) - 15, q)
    with pytest.raises(ValueError, match=r"must be \d+ uint8 bytes"):
        transcode_artifact(artifact[:-1], 37, 200)
    with pytest.raises(ValueError, match=r"must be \d+ uint8 bytes"):
        transcode_artifact(torch.cat([artifact, artifact[:5]]), 37, 200)
    with pytest.raises(ValueError, match="> 30"):
        transcode_artifact(torch.full_like(artifact, 255), 37, 200)
    last = artifact.clone()
    last[-5:] = torch.tensor([0, 0, 0, 0, 0x1F << 3], dtype=torch.uint8)  # value 7 of the last word = 31
    with pytest.raises(ValueError, match="code 31"):
        transcode_artifact(last, 37, 200)
    with pytest.raises(ValueError, match="1-D uint8"):
        transcode_artifact(artifact.to(torch.int8), 37, 200)


@pytest.mark.parametrize("rows, cols", [(N, K), (33, 128), (1, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_the_dequantised_models_weight(rows, cols, dtype):
    """Bit for bit what the dequantised model multiplies by: q * s in fp32, rounded to dtype."""
    q, scales, packed = _weight(rows, cols)
    w = dequantize(packed, scales, rows, cols, dtype)
    assert w.dtype == dtype and w.shape == (rows, cols)
    expected = (q.to(DEVICE).float() * scales.float()[:, None]).to(dtype)
    if CPU and dtype == torch.bfloat16:  # the interpreter's fp32 -> bf16 cast truncates
        torch.testing.assert_close(w.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(w, expected)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(packed, scales, rows, cols + 128)


# ----------------------------------------------------------------------------------------------
# int5_linear: every kernel, both activations, fp32 and bf16 x
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["auto", "fused", *KERNEL_IMPLS, "dequant"])
@pytest.mark.parametrize("M", [5, LARGE_M])
@pytest.mark.parametrize("activation", [None, "leaky_relu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int5_linear(impl, M, activation, dtype):
    if impl == "gemv" and M > int5_module.GEMV_MAX_M:
        pytest.skip("the gemv kernel is for M <= 16")
    q, scales, packed = _weight(N, K)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype) * 3
    y = int5_linear(x, packed, scales, N, K, activation, impl=impl)
    ref = _reference(x, q, scales, activation)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(int5_linear_reference(x, packed, scales, N, K, activation), ref) < TOL[dtype]


def _cpu_config(kernel, **changes):
    return dataclasses.replace(CPU_CONFIGS[kernel], **changes) if CPU else None


# (rows, cols): K = 300 / 5 / 513 (3 groups masked out of 4 / one short group / 5 groups), N = 40 / 20
# (N * 2 bytes not a multiple of 16: y without TMA), K = 5 (x rows of 10 bytes: x without TMA)
RAGGED = [(N, K), (40, 300), (20, 5), (24, 513)]


@pytest.mark.parametrize("kernel", KERNEL_IMPLS)
@pytest.mark.parametrize("rows, cols", RAGGED, ids=lambda v: str(v))
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_write_every_element(kernel, rows, cols, leaky, dtype):
    """The launchers on a NaN-poisoned output: every element written, against float64."""
    if kernel == "resident" and cols > int5_module.RESIDENT_MAX_K:
        pytest.skip("rows of > 512 values do not fit the resident kernel")
    q, scales, packed = _weight(rows, cols)
    M = 45
    x = torch.randn(M, cols, device=DEVICE, dtype=dtype)
    y = torch.full((M, rows), float("nan"), device=DEVICE, dtype=dtype)
    if kernel == "splitk":
        int5_module._launch_splitk(x, packed, scales, y, rows, cols, leaky,
                                   _cpu_config("splitk", block_m=16, block_n=16, split_k=2) or
                                   Int5Config("splitk", 16, 16, 4, 3, group_m=1, split_k=2))
    elif kernel == "gemv":
        M = 13
        x, y = x[:M], y[:M]
        int5_module._launch_gemv(x, packed, scales, y, rows, cols, leaky, Int5Config("gemv", 16, 8, 4, 2))
    else:
        config = _cpu_config(kernel, block_m=16, programs_per_sm=2) or (
            int5_module.RESIDENT if kernel == "resident" else int5_module.STREAM)
        if dtype == torch.float32 and not CPU:
            if kernel == "resident":
                pytest.skip("fp32 x: the resident kernel would hold an fp32 weight tile (CPU-tested)")
            config = int5_module.STREAM_FP32
        int5_module._launch_large_m(x, packed, scales, y, rows, cols, leaky, config)
    assert not y.isnan().any()
    assert rel_err(y, _reference(x, q, scales, "leaky_relu2" if leaky else None)) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("block_n", [16, 32])
def test_skinny_resident_tiles_at_small_m(M, block_n):
    """The small-M table's resident candidates (one x tile, weight tiles of 16 or 32 rows): every element
    written, against float64, with a ragged N and K."""
    rows, cols = 40, 300
    q, scales, packed = _weight(rows, cols)
    x = torch.randn(M, cols, device=DEVICE, dtype=torch.bfloat16)
    y = torch.full((M, rows), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    int5_module._launch_large_m(x, packed, scales, y, rows, cols, False, Int5Config("resident", 16, block_n, 4, 1))
    assert not y.isnan().any()
    assert rel_err(y, _reference(x, q, scales, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("kernel", ["resident", "stream", "gemv"])
def test_kernels_with_strided_x_and_many_programs(kernel):
    """x as a column slice of a wider tensor (row stride not TMA-aligned: pointer loads) and as a
    transposed view, M tiles split unevenly over the resident programs (the last range is clipped)."""
    q, scales, packed = _weight(N, K)
    rows = 13 if kernel == "gemv" else LARGE_M
    wide = torch.randn(rows, K + 3, device=DEVICE, dtype=torch.bfloat16)
    x = wide[:, 1:K + 1]
    config = _cpu_config(kernel, block_m=16, programs_per_sm=4) if CPU and kernel != "gemv" else None
    transposed = torch.randn(K, rows, device=DEVICE, dtype=torch.bfloat16).t()
    for xs in (x, x.contiguous(), transposed):
        y = int5_linear(xs, packed, scales, N, K, "leaky_relu2", impl=kernel, config=config)
        assert rel_err(y, _reference(xs, q, scales, "leaky_relu2")) < TOL[torch.bfloat16]


def test_configs_choose_kernels():
    """impl / config dispatch; auto and fused never choose the dense path on a GPU (decided without one)."""
    gpu = torch.device("cuda")
    for shape in MODEL_SHAPES:
        for M in (1, 16, 64, 65, 2048, 65536):
            for impl in ("auto", "fused"):
                choice = int5_module._choose(M, *shape, torch.bfloat16, gpu, impl, None)
                assert choice != "dequant"
                if M <= SMALL_M_MAX:
                    assert choice is None  # the small-M plan (SMALL_M_KERNEL = "splitk")
                else:
                    assert choice.kernel == ("resident" if shape[1] <= 512 else "stream")
    assert int5_module._choose(65536, 512, 1536, torch.float32, gpu, "auto", None).kernel == "stream"
    config = Int5Config("stream", 64, 128)
    assert Int5Config.from_list(config.as_list()) == config
    assert int5_module._choose(65536, 512, 512, torch.bfloat16, gpu, "stream", config) is config


def test_auto_table_may_choose_dequant_but_fused_never_does(monkeypatch):
    monkeypatch.setitem(int5_module.AUTO_LARGE_M, (512, 512), "dequant")
    gpu = torch.device("cuda")
    assert int5_module._choose(65536, 512, 512, torch.bfloat16, gpu, "auto", None) == "dequant"
    assert int5_module._choose(65536, 512, 512, torch.bfloat16, gpu, "fused", None).kernel == "resident"


@pytest.mark.parametrize("M", [1, 16, LARGE_M])
def test_the_weight_is_never_decoded(monkeypatch, M):
    """Every fused path runs without calling the decoder (the dequant path calls it once)."""
    calls = []
    real = int5_module._dequantize

    def counting(*args):
        calls.append(args[2:4])
        return real(*args)

    monkeypatch.setattr(int5_module, "_dequantize", counting)
    q, scales, packed = _weight(N, K)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    for impl in ("auto", "fused", *KERNEL_IMPLS):
        if impl == "gemv" and M > int5_module.GEMV_MAX_M:
            continue
        for activation in (None, "leaky_relu2"):
            int5_linear(x, packed, scales, N, K, activation, impl=impl)
    assert calls == []
    int5_linear(x, packed, scales, N, K, impl="dequant")
    assert calls == [(N, K)]


@pytest.mark.parametrize("rows, cols, split_k", [(N, K, 2), (40, 300, 3), (24, 513, 2), (24, 513, 5)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("leaky", [False, True])
def test_split_rows_summed_in_kernel_match_the_reduction_launch(rows, cols, split_k, leaky):
    """reduce_in_kernel (each tile's last split sums the partials): the numbers of the two-launch
    split-K bit for bit (the same sums in the same order), every element written, against float64,
    twice in a row (the arrival counters are left zero for the next launch)."""
    q, scales, packed = _weight(rows, cols)
    M = 37  # ragged against the 16-row tiles
    base = _cpu_config("splitk", block_m=16, block_n=16, split_k=split_k) or \
        Int5Config("splitk", 16, 16, 4, 3, group_m=1, split_k=split_k)
    for _ in range(2):
        x = torch.randn(M, cols, device=DEVICE, dtype=torch.bfloat16)
        outputs = []
        for config in (base, dataclasses.replace(base, reduce_in_kernel=1)):
            y = torch.full((M, rows), float("nan"), device=DEVICE, dtype=torch.bfloat16)
            int5_module._launch_splitk(x, packed, scales, y, rows, cols, leaky, config)
            outputs.append(y)
        assert not outputs[1].isnan().any()
        assert torch.equal(outputs[1], outputs[0])
        assert rel_err(outputs[1], _reference(x, q, scales, "leaky_relu2" if leaky else None)) < TOL[torch.bfloat16]
        assert not arrival_counters(DEVICE).any()


def test_reduce_in_kernel_is_checked_and_named():
    x = torch.randn(3, K, device=DEVICE)
    _, scales, packed = _weight(N, K)
    for config in (Int5Config("splitk", 16, 16, reduce_in_kernel=2), Int5Config("stream", 16, 16, reduce_in_kernel=1)):
        with pytest.raises(ValueError, match="reduce_in_kernel"):
            int5_linear(x, packed, scales, N, K, config=config)
    config = Int5Config("splitk", 16, 16, split_k=3, reduce_in_kernel=1)
    assert str(config).endswith("k3r") and Int5Config.from_list(config.as_list()) == config


@requires_cuda
def test_reduce_in_kernel_first_met_inside_a_capture_takes_two_launches(monkeypatch):
    """No counters exist yet when a capture first asks for them (counters made inside a capture would be
    zero only once that graph replays): that launch sums with the reduction launch, the same numbers."""
    monkeypatch.setattr(gemm_module, "_ARRIVALS", {})
    monkeypatch.setattr(gemm_module, "_ARRIVAL_SLOTS", {})
    q, scales, packed = _weight(512, 1536)
    x = torch.randn(16, 1536, device=DEVICE, dtype=torch.bfloat16)
    config = Int5Config("splitk", 16, 16, 4, 3, group_m=1, split_k=0, reduce_in_kernel=1)
    expected = int5_linear(x, packed, scales, 512, 1536, config=dataclasses.replace(config, reduce_in_kernel=0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int5_linear(x, packed, scales, 512, 1536, config=config)
    assert gemm_module._ARRIVALS == {}
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


@requires_cuda
def test_reduce_in_kernel_replays_in_a_cuda_graph():
    """One launch per call, replayed from a CUDA graph: the counters reset inside the replays."""
    q, scales, packed = _weight(512, 1536)
    x = torch.randn(16, 1536, device=DEVICE, dtype=torch.bfloat16)
    config = Int5Config("splitk", 16, 16, 4, 3, group_m=1, split_k=0, reduce_in_kernel=1)
    expected = int5_linear(x, packed, scales, 512, 1536, config=config)  # warm-up: compile
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        int5_linear(x, packed, scales, 512, 1536, config=config)  # this stream's counters, outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = int5_linear(x, packed, scales, 512, 1536, config=config)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected)
    assert rel_err(y, _reference(x, q, scales)) < TOL[torch.bfloat16]


def test_raw_template_launcher_writes_every_element():
    """gemm.py's template with the INT5 loader (used for small M) through its public launcher."""
    q, scales, packed = _weight(N, K)
    M = 33
    for split_k in (1, 2):
        for leaky in (False, True):
            x = torch.randn(M, K, device=DEVICE)
            y = torch.full((M, N), float("nan"), device=DEVICE)
            buffers = dict(post=y, epilogue=EPILOGUE_LEAKY_RELU2) if leaky else dict(out=y)
            gemm(x, packed, scale=scales, int5_k=K, split_k=split_k, config=default_config(M, N, K, int5=True),
                 **buffers)
            assert rel_err(y, _reference(x, q, scales, "leaky_relu2" if leaky else None)) < 1e-5


def test_module_from_artifact_opcheck_and_compile():
    q = _random_q(N, K)
    scales = (torch.rand(N) * 0.02 + 0.005).to(torch.float16)
    layer = Int5Linear.from_artifact(pack_int5(q), scales, (N, K)).to(DEVICE)
    x = torch.randn(2, 7, K, device=DEVICE)
    y = layer(x)
    assert y.shape == (2, 7, N)
    assert rel_err(y, _reference(x, q, layer.scales)) < 1e-5
    torch.library.opcheck(torch.ops.recycore.int5_linear, (x[0], layer.packed, layer.scales, N, K, "leaky_relu2", "auto"))
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    assert rel_err(compiled(x), y) < 1e-6


def test_bad_inputs_raise_clear_errors():
    q, scales, packed = _weight(N, K)
    x = torch.randn(4, K, device=DEVICE)
    with pytest.raises(ValueError, match="in_features"):
        int5_linear(x[:, 1:], packed, scales, N, K)
    with pytest.raises(ValueError, match="GPU layout"):
        int5_linear(x, packed[:, 1:].contiguous(), scales, N, K)
    with pytest.raises(ValueError, match="scales must have"):
        int5_linear(x, packed, scales[1:], N, K)
    with pytest.raises(ValueError, match="activation"):
        int5_linear(x, packed, scales, N, K, "relu")
    with pytest.raises(ValueError, match="impl"):
        int5_linear(x, packed, scales, N, K, impl="cublas")
    with pytest.raises(TypeError, match="packed must be one of"):
        int5_linear(x, packed.to(torch.int64), scales, N, K)
    with pytest.raises(ValueError, match="does not match config"):
        int5_linear(x, packed, scales, N, K, impl="stream", config=Int5Config("resident", 16, 32))
    with pytest.raises(ValueError, match="power of two"):
        int5_linear(x, packed, scales, N, K, config=Int5Config("stream", 48, 32))
    q2, scales2, packed2 = _weight(N, 600)
    with pytest.raises(ValueError, match="resident kernel holds rows of <= 512"):
        int5_linear(torch.randn(4, 600, device=DEVICE), packed2, scales2, N, 600, impl="resident")
    with pytest.raises(TypeError, match="Int5Config"):
        int5_linear(x, packed, scales, N, K, config=[1, 2, 3])
    with pytest.raises(ValueError, match="at most 16 rows"):
        int5_linear(torch.randn(17, K, device=DEVICE), packed, scales, N, K, impl="gemv")


# ----------------------------------------------------------------------------------------------
# GPU: the model's shapes, and no dense weight in memory
# ----------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("M", [1, 16, 64, 65, 2048, 65536])
def test_model_shapes_bf16(shape, M):
    q, scales, packed = _weight(*shape)
    x = torch.randn(M, shape[1], device=DEVICE, dtype=torch.bfloat16)
    impls = ["auto", "fused", "stream", "splitk", "dequant"] + (["resident"] if shape[1] <= 512 else [])
    impls += ["gemv"] if M <= 16 else []
    for activation in (None, "leaky_relu2"):
        ref = _reference(x, q, scales, activation)
        for impl in impls:
            y = int5_linear(x, packed, scales, *shape, activation, impl=impl)
            assert rel_err(y, ref) < 1e-2, (activation, impl)


def _allocation_sizes(fn):
    """Sizes of the CUDA caching allocator's allocations while fn() runs (memory history snapshot)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return [e["size"] for trace in snapshot["device_traces"] for e in trace if e["action"] == "alloc"]


def _rounded(nbytes):
    return -(-nbytes // 512) * 512  # the caching allocator's granularity


@requires_cuda
@pytest.mark.parametrize("M", [32, 65536])
def test_no_dense_weight_is_made_at_the_model_shapes(monkeypatch, M):
    """int5_linear (auto, as the model calls it) at the model's four shapes: the decoder never runs and
    the allocations are exactly the outputs (and the small-M split-K workspace), nothing weight-sized."""
    calls = []
    real = int5_module._dequantize
    monkeypatch.setattr(int5_module, "_dequantize", lambda *a: calls.append(a[2:4]) or real(*a))
    weights = [(shape, _weight(*shape)) for shape in MODEL_SHAPES]
    x = {k: torch.randn(M, k, device=DEVICE, dtype=torch.bfloat16) for k in (512, 1536)}

    def run():
        for (n, k), (_, scales, packed) in weights:
            int5_linear(x[k], packed, scales, n, k, "leaky_relu2" if n == 1536 else None)

    run()  # compile outside the recorded region
    sizes = _allocation_sizes(run)
    assert calls == []
    expected = []
    for n, k in MODEL_SHAPES:
        expected.append(_rounded(M * n * 2))  # the bf16 output
        if M <= SMALL_M_MAX:
            _, split_k = int5_module._small_m_plan(M, n, k, x[k].device)
            if split_k > 1:
                expected.append(_rounded(split_k * M * n * 4))  # fp32 partials
    assert sorted(map(_rounded, sizes)) == sorted(expected)  # nothing else: no decoded weight
