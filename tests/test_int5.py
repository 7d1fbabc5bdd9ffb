"""K3: the int5 GPU layout (lossless transcoding of the artifact bytes), the decoder, and int5_linear
against x @ (q*s)^T in float64: the fused kernel (small-M split-K and large-M tiles) and the dequant
path, with and without the LeakyReLU² epilogue."""
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rel_err, requires_cuda

from recycore.kernels import Int5Linear, int5_linear, int5_linear_reference
from recycore.kernels.gemm import EPILOGUE_LEAKY_RELU2, INT5_GROUP, default_config, gemm
from recycore.kernels.int5 import SMALL_M_MAX, dequantize, pack_gpu_layout, transcode_artifact, unpack_gpu_layout
from recycore.int5_codec import pack_int5

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE.type == "cpu" else 1e-2}
N, K = 72, 200  # ragged against the 32-row tiles and the 128-value groups


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
    y = x.double() @ (q.to(DEVICE).double() * scales.double()[:, None]).t()
    return F.leaky_relu(y, 0.5).square() if activation == "leaky_relu2" else y


@pytest.mark.parametrize("rows,cols", [(37, 200), (3, 128), (1, 5), (16, 1536)])
def test_gpu_layout_round_trip_and_size(rows, cols):
    q = _random_q(rows, cols)
    words = pack_gpu_layout(q + 15)
    assert words.dtype == torch.int32
    assert torch.equal(unpack_gpu_layout(words, cols), q + 15)
    padded = -(-cols // INT5_GROUP) * INT5_GROUP
    assert words.numel() * 32 == rows * padded * 5  # 5 bits per weight, rows padded to 128 values


def test_transcode_artifact_bytes_is_lossless():
    q = _random_q(37, 200)
    artifact = pack_int5(q)  # SPEC §4 bytes, from the artifact codec (recycore.int5_codec)
    words = transcode_artifact(artifact, 37, 200)
    assert torch.equal(words, pack_gpu_layout(q + 15))
    assert torch.equal(unpack_gpu_layout(words, 200) - 15, q)
    with pytest.raises(ValueError, match=r"must be \d+ uint8 bytes"):
        transcode_artifact(artifact[:-1], 37, 200)
    with pytest.raises(ValueError, match="> 30"):
        transcode_artifact(torch.full_like(artifact, 255), 37, 200)


@pytest.mark.parametrize("M, impl", [(5, "auto"), (SMALL_M_MAX + 13, "auto"), (SMALL_M_MAX + 13, "fused"),
                                     (5, "dequant")], ids=["small_m", "large_m", "large_m_fused", "small_m_dequant"])
@pytest.mark.parametrize("activation", [None, "leaky_relu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int5_linear(M, impl, activation, dtype):
    q, scales, packed = _weight(N, K)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype) * 3
    y = int5_linear(x, packed, scales, N, K, activation, impl=impl)
    ref = _reference(x, q, scales, activation)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(int5_linear_reference(x, packed, scales, N, K, activation), ref) < TOL[dtype]


@pytest.mark.parametrize("rows, cols", [(N, K), (33, 128), (1, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_the_dequantised_models_weight(rows, cols, dtype):
    """Bit for bit what the dequantised model multiplies by: q * s in fp32, rounded to dtype."""
    q, scales, packed = _weight(rows, cols)
    w = dequantize(packed, scales, rows, cols, dtype)
    assert w.dtype == dtype and w.shape == (rows, cols)
    expected = (q.to(DEVICE).float() * scales.float()[:, None]).to(dtype)
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:  # the interpreter's fp32 -> bf16 cast truncates
        torch.testing.assert_close(w.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(w, expected)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(packed, scales, rows, cols + 128)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("leaky", [False, True])
def test_raw_launcher_writes_every_element(split_k, leaky):
    q, scales, packed = _weight(N, K)
    M = 33
    x = torch.randn(M, K, device=DEVICE)
    y = torch.full((M, N), float("nan"), device=DEVICE)
    buffers = dict(post=y, epilogue=EPILOGUE_LEAKY_RELU2) if leaky else dict(out=y)
    gemm(x, packed, scale=scales, int5_k=K, split_k=split_k, config=default_config(M, N, K, int5=True), **buffers)
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


@requires_cuda
@pytest.mark.parametrize("shape", [(512, 512), (256, 512), (1536, 512), (512, 1536)])
@pytest.mark.parametrize("M", [1, 16, 64, 65536])
def test_model_shapes_bf16(shape, M):
    q, scales, packed = _weight(*shape)
    x = torch.randn(M, shape[1], device=DEVICE, dtype=torch.bfloat16)
    for activation in (None, "leaky_relu2"):
        for impl in ("auto", "fused", "dequant"):
            y = int5_linear(x, packed, scales, *shape, activation, impl=impl)
            assert rel_err(y, _reference(x, q, scales, activation)) < 1e-2, (activation, impl)
