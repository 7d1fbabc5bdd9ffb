"""The shared GEMM template (kernels/gemm.py): operand strides, epilogues, split-K, and the
persistent TMA variant (config.persistent) with its fallback to the pointer kernel.

Ragged shapes (M odd, N and K not multiples of the blocks), NaN-poisoned outputs, float64
references. The INT5 weight loader is tested with K3 in test_int5.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, rel_err

from recycore.kernels import gemm as gemm_module
from recycore.kernels.gemm import (
    EPILOGUE_LEAKY_RELU2,
    EPILOGUE_LEAKY_RELU2_GRAD,
    EPILOGUE_NONE,
    default_config,
    gemm,
)

# bf16: the interpreter truncates fp32 -> bf16 casts (pre, post, outputs) instead of rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE.type == "cpu" else 1e-2}
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


# ----------------------------------------------------------------------------------------------
# Persistent TMA variant. Under the interpreter it runs INTERPRET_PROGRAMS = 3 programs over the
# 2 x 3 tiles of (M, N) = (37, 72): every program loops over two tiles, all tiles are ragged in K.
# ----------------------------------------------------------------------------------------------
def _tma_operand(rows, cols, dtype, transposed):
    """Like _operand, but a transposed view's storage rows are padded to 16 bytes (TMA-addressable
    with rows = 37): the descriptor then covers (cols, rows) of a (cols, 40)-strided storage."""
    if not transposed:
        return _operand(rows, cols, dtype, False)
    return _as_padded_t(torch.randn(rows, cols, device=DEVICE, dtype=dtype))


def _as_padded_t(x):
    """x's values as the transposed view of a row-padded (cols, rows rounded up to 8) storage."""
    rows, cols = x.shape
    storage = torch.full((cols, -(-rows // 8) * 8), float("nan"), device=DEVICE, dtype=x.dtype)
    storage[:, :rows] = x.t()
    return storage[:, :rows].t()


def _persistent(subtile=False):
    return dataclasses.replace(default_config(M, N, K), persistent=True, epilogue_subtile=subtile)


class _Forbidden:
    def __getitem__(self, grid):
        raise AssertionError("this kernel should not have been launched")


@pytest.fixture
def persistent_only(monkeypatch):
    """The non-persistent kernel must not run (the persistent path did not fall back)."""
    monkeypatch.setattr(gemm_module, "_gemm_kernel", _Forbidden())


@pytest.mark.usefixtures("persistent_only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize("subtile", [False, True], ids=["whole", "subtile"])
def test_persistent_plain_gemm_strides(dtype, a_t, b_t, subtile):
    a, b = _tma_operand(M, K, dtype, a_t), _tma_operand(N, K, dtype, b_t)
    out = _nan(M, N, torch.float32)
    gemm(a, b, out=out, config=_persistent(subtile))
    assert rel_err(out, a.double() @ b.double().t()) < TOL[dtype]


@pytest.mark.usefixtures("persistent_only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subtile", [False, True], ids=["whole", "subtile"])
def test_persistent_leaky_relu2_epilogue(dtype, subtile):
    """pre+post (the MLP's up GEMM), pre only, post only; A transposed in the last call."""
    a, b = _operand(M, K, dtype, False), _operand(N, K, dtype, False)
    ref = a.double() @ b.double().t()
    assert 0.3 < (ref < 0).double().mean() < 0.7  # both slopes exercised
    pre, post = _nan(M, N, dtype), _nan(M, N, dtype)
    gemm(a, b, pre=pre, post=post, epilogue=EPILOGUE_LEAKY_RELU2, config=_persistent(subtile))
    assert rel_err(pre, ref) < TOL[dtype]
    assert rel_err(post, _leaky_relu2(ref)) < 2 * TOL[dtype]
    pre_only = _nan(M, N, dtype)
    gemm(a, b, pre=pre_only, epilogue=EPILOGUE_LEAKY_RELU2, config=_persistent(subtile))
    assert torch.equal(pre_only, pre)
    post_only = _nan(M, N, dtype)
    gemm(_as_padded_t(a), b, post=post_only, epilogue=EPILOGUE_LEAKY_RELU2, config=_persistent(subtile))
    assert rel_err(post_only, _leaky_relu2(ref)) < 2 * TOL[dtype]


@pytest.mark.usefixtures("persistent_only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("subtile", [False, True], ids=["whole", "subtile"])
def test_persistent_leaky_relu2_grad_epilogue(dtype, subtile):
    """The MLP's d_pre GEMM: B is a transposed view (w_down.t()), the epilogue reads pre."""
    a, b = _operand(M, K, dtype, False), _operand(N, K, dtype, True)
    pre = torch.randn(M, N, device=DEVICE, dtype=dtype)
    out = _nan(M, N, dtype)
    gemm(a, b, out=out, pre=pre, epilogue=EPILOGUE_LEAKY_RELU2_GRAD, config=_persistent(subtile))
    pre64 = pre.double()
    ref = (a.double() @ b.double().t()) * torch.where(pre64 > 0, 2 * pre64, 0.5 * pre64)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.usefixtures("persistent_only")
def test_persistent_row_scale_few_tiles_and_short_k():
    """ROW_SCALE; fewer tiles than programs (one program); K shorter than one block."""
    a, b = _tma_operand(M, K, torch.float32, True), _operand(N, K, torch.float32, False)
    scale = torch.rand(N, device=DEVICE, dtype=torch.float16) + 0.5
    out, post = _nan(M, N, torch.float32), _nan(M, N, torch.float32)
    gemm(a, b, out=out, scale=scale, config=_persistent(True))
    gemm(a, b, post=post, scale=scale, epilogue=EPILOGUE_LEAKY_RELU2, config=_persistent())
    ref = (a.double() @ b.double().t()) * scale.double()
    assert rel_err(out, ref) < 1e-5
    assert rel_err(post, _leaky_relu2(ref)) < 1e-5
    a, b = _operand(20, 8, torch.bfloat16, False), _operand(24, 8, torch.bfloat16, True)
    out = _nan(20, 24, torch.float32)
    gemm(a, b, out=out, config=_persistent())
    assert rel_err(out, a.double() @ b.double().t()) < TOL[torch.bfloat16]


def test_persistent_falls_back_when_tma_cannot_address(monkeypatch):
    """Misaligned base / leading stride (also of a transposed view), an output row not a multiple
    of 16 bytes, split-K: the pointer kernel runs (the persistent one must not)."""
    monkeypatch.setattr(gemm_module, "_gemm_persistent_kernel", _Forbidden())
    config = _persistent()
    a = torch.randn(M, K + 1, device=DEVICE)[:, 1:]  # base 4 bytes off, row stride 324 bytes
    b = _operand(N, K, torch.float32, True)
    out = _nan(M, N, torch.float32)
    gemm(a, b, out=out, config=config)
    assert rel_err(out, a.double() @ b.double().t()) < 1e-5
    a = _operand(M, K, torch.bfloat16, True)  # (K, 37) storage: rows of 74 bytes
    b = _operand(N, K, torch.bfloat16, False)
    gemm(a, b, out=out, config=config)
    assert rel_err(out, a.double() @ b.double().t()) < TOL[torch.bfloat16]
    a, b = _operand(M, K, torch.float32, False), _operand(N - 1, K, torch.float32, False)  # out rows 71 x 4 bytes
    out = _nan(M, N - 1, torch.float32)
    gemm(a, b, out=out, config=config)
    assert rel_err(out, a.double() @ b.double().t()) < 1e-5
    b = _operand(N, K, torch.float32, False)
    out = _nan(M, N, torch.float32)
    gemm(a, b, out=out, config=config, split_k=2)
    assert rel_err(out, a.double() @ b.double().t()) < 1e-5


def _sign_bits(words, cols):
    """(rows, cols) bool: bit j of word w is column 32 w + j."""
    return ((words[:, :, None] >> torch.arange(32, device=words.device)) & 1).reshape(words.shape[0], cols) != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["pointer", "persistent", "persistent-subtile"])
def test_sign_of_pre_instead_of_pre(dtype, kernel, monkeypatch):
    """pre_sign: LEAKY_RELU2 stores post and the sign bits of pre; LEAKY_RELU2_GRAD reads them and
    post for d_pre. N = 256: 128-column blocks (TMA's 16-byte rows of words), ragged M and K."""
    rows, cols, inner = 37, 256, 40
    if kernel == "pointer":
        config = dataclasses.replace(default_config(rows, cols, inner), block_n=64)
    else:
        monkeypatch.setattr(gemm_module, "_gemm_kernel", _Forbidden())
        config = dataclasses.replace(default_config(rows, cols, inner), block_m=32, block_n=256, block_k=32,
                                     num_stages=2, persistent=True, epilogue_subtile=kernel.endswith("subtile"))
    a, b = _operand(rows, inner, dtype, False), _operand(cols, inner, dtype, False)
    words = torch.full((rows, cols // 32), -1, device=DEVICE, dtype=torch.int32)
    post = _nan(rows, cols, dtype)
    gemm(a, b, pre=words, post=post, epilogue=EPILOGUE_LEAKY_RELU2, config=config, pre_sign=True)
    pre = torch.empty(rows, cols, device=DEVICE, dtype=dtype)
    gemm(a, b, pre=pre, epilogue=EPILOGUE_LEAKY_RELU2, config=config)
    assert 0.3 < (pre < 0).double().mean() < 0.7
    assert torch.equal(_sign_bits(words, cols), pre < 0)  # the sign of the pre that post is made of
    assert rel_err(post, _leaky_relu2(a.double() @ b.double().t())) < 2 * TOL[dtype]
    a2, b2 = _operand(rows, 24, dtype, False), _operand(cols, 24, dtype, True)  # b2: a w_down.t() view
    d_pre = _nan(rows, cols, dtype)
    gemm(a2, b2, out=d_pre, pre=words, post=post, epilogue=EPILOGUE_LEAKY_RELU2_GRAD, config=config, pre_sign=True)
    pre64 = pre.double()
    ref = (a2.double() @ b2.double().t()) * torch.where(pre64 > 0, 2 * pre64, 0.5 * pre64)
    assert rel_err(d_pre, ref) < 2 * TOL[dtype]


def test_sign_of_pre_is_checked():
    a, b = _operand(8, 16, torch.float32, False), _operand(64, 16, torch.float32, False)
    post, words = _nan(8, 64, torch.float32), torch.zeros(8, 2, device=DEVICE, dtype=torch.int32)
    cases = [(dict(pre=words, post=post, split_k=2), "split-K"),
             (dict(pre=words), "needs post"),
             (dict(pre=torch.zeros(8, 3, device=DEVICE, dtype=torch.int32), post=post), r"shape \(8, 2\)"),
             (dict(pre=words.float(), post=post), "sign words")]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            gemm(a, b, epilogue=EPILOGUE_LEAKY_RELU2, pre_sign=True, **kwargs)
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm(a, b[:40], pre=words, post=post[:, :40].contiguous(), epilogue=EPILOGUE_LEAKY_RELU2, pre_sign=True)
