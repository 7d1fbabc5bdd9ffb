"""The shared GEMM template (kernels/gemm.py): operand strides, epilogues, split-K.

Ragged shapes (M odd, N and K not multiples of the blocks), NaN-poisoned outputs, float64
references. The INT5 weight loader is tested with K3 in test_int5.py."""
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rel_err

from recycore.kernels._common import INTERPRET
from recycore.kernels.gemm import (
    EPILOGUE_LEAKY_RELU2,
    EPILOGUE_LEAKY_RELU2_GRAD,
    EPILOGUE_NONE,
    gemm,
)

# bf16: the interpreter truncates fp32 -> bf16 casts (pre, post, outputs) instead of rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if INTERPRET else 1e-2}
M, N, K = 37, 72, 80  # 32-blocks under the interpreter: ragged in every dimension


def _operand(rows, cols, dtype, transposed):
    """A fresh random (rows, cols) operand, optionally as the transposed view of a (cols, rows) tensor."""
    if transposed:
        return torch.randn(cols, rows, device=DEVICE, dtype=dtype).t()
    return torch.randn(rows, cols, device=DEVICE, dtype=dtype)


def _nan(rows, cols, dtype):
    return torch.full((rows, cols), float("nan"), device=DEVICE, dtype=dtype)


def _leaky_relu2(x):
    return F.leaky_relu(x, 0.5).square()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_plain_gemm_strides_and_split_k(dtype, a_t, b_t, split_k):
    a, b = _operand(M, K, dtype, a_t), _operand(N, K, dtype, b_t)
    out = _nan(M, N, torch.float32)
    gemm(a, b, out=out, split_k=split_k)
    assert rel_err(out, a.double() @ b.double().t()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_relu2_epilogue_stores_pre_and_post(dtype):
    a, b = _operand(M, K, dtype, False), _operand(N, K, dtype, False)
    pre, post = _nan(M, N, dtype), _nan(M, N, dtype)
    gemm(a, b, pre=pre, post=post, epilogue=EPILOGUE_LEAKY_RELU2)
    ref = a.double() @ b.double().t()
    assert 0.3 < (ref < 0).double().mean() < 0.7  # both slopes exercised
    assert rel_err(pre, ref) < TOL[dtype]
    assert rel_err(post, _leaky_relu2(ref)) < 2 * TOL[dtype]
    post_only = _nan(M, N, dtype)
    gemm(a, b, post=post_only, epilogue=EPILOGUE_LEAKY_RELU2, split_k=2)
    assert rel_err(post_only, _leaky_relu2(ref)) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_relu2_grad_epilogue(dtype):
    a, b = _operand(M, K, dtype, False), _operand(N, K, dtype, True)
    pre = torch.randn(M, N, device=DEVICE, dtype=dtype)
    out = _nan(M, N, dtype)
    gemm(a, b, out=out, pre=pre, epilogue=EPILOGUE_LEAKY_RELU2_GRAD)
    pre64 = pre.double()
    ref = (a.double() @ b.double().t()) * torch.where(pre64 > 0, 2 * pre64, 0.5 * pre64)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 2])
def test_row_scale_then_leaky_relu2(split_k):
    a, b = _operand(M, K, torch.float32, False), _operand(N, K, torch.float32, False)
    scale = torch.rand(N, device=DEVICE, dtype=torch.float16) + 0.5
    out, post = _nan(M, N, torch.float32), _nan(M, N, torch.float32)
    gemm(a, b, out=out, scale=scale, split_k=split_k)
    gemm(a, b, post=post, scale=scale, epilogue=EPILOGUE_LEAKY_RELU2, split_k=split_k)
    ref = (a.double() @ b.double().t()) * scale.double()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(post, _leaky_relu2(ref)) < 1e-5


def test_bad_inputs_raise_clear_errors():
    a = torch.randn(M, K, device=DEVICE)
    b = torch.randn(N, K, device=DEVICE)
    out = torch.empty(M, N, device=DEVICE)
    with pytest.raises(ValueError, match="not \\(N, 80\\)"):
        gemm(a, torch.randn(N, K + 1, device=DEVICE), out=out)
    with pytest.raises(TypeError, match="one dtype"):
        gemm(a, b.bfloat16(), out=out)
    with pytest.raises(ValueError, match="shape"):
        gemm(a, b, out=torch.empty(M, N + 1, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        gemm(a, b, out=torch.empty(N, M, device=DEVICE).t())
    with pytest.raises(ValueError, match="pre and/or a post"):
        gemm(a, b, epilogue=EPILOGUE_LEAKY_RELU2)
    with pytest.raises(ValueError, match="split-K"):
        gemm(a, b, out=out, pre=out.clone(), epilogue=EPILOGUE_LEAKY_RELU2_GRAD, split_k=2)
    with pytest.raises(TypeError, match="a must be one of"):
        gemm(a.to(torch.int32), b, out=out, epilogue=EPILOGUE_NONE)
