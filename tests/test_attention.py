"""K2 gated XSA attention and the xsa_gate epilogue vs the plain-torch reference (autograd)."""
import importlib
import math
import warnings

import pytest
import torch

from helpers import DEVICE, rel_err, requires_cuda
from recycore.kernels.attention import (attention, gated_xsa_attention, gated_xsa_attention_reference, xsa_gate,
                                        xsa_gate_reference)

attn = importlib.import_module("recycore.kernels.attention")  # the module (the package may export a function)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# (B, T, H, Hkv, D): ragged T (not a multiple of any block), GQA group 1 and 2, D 16 and 64
SHAPES = [(2, 37, 4, 2, 16), (2, 130, 2, 2, 64), (1, 100, 4, 2, 64)]


def _inputs(B, T, H, h_kv, D, dtype, *, strided=False):
    """Random q, k, v, gate logits; `strided` takes them as views of one fused projection output."""
    if strided:  # like reshapes of a [q | k | v] linear output: D contiguous, other strides not
        qkv = torch.randn(B, T, (H + 2 * h_kv) * D, device=DEVICE, dtype=dtype)
        q, k, v = qkv.split([H * D, h_kv * D, h_kv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, h_kv, D), v.view(B, T, h_kv, D)
    else:
        q = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
        k = torch.randn(B, T, h_kv, D, device=DEVICE, dtype=dtype)
        v = torch.randn(B, T, h_kv, D, device=DEVICE, dtype=dtype)
    g = 2 * torch.randn(B, T, H, device=DEVICE, dtype=dtype)
    return [t.detach().requires_grad_() for t in (q, k, v, g)]


def _check_against_reference(fn, ref_fn, inputs, dtype, **kw):
    """Output and all input gradients of fn vs ref_fn run in fp32 on the same (upcast) inputs."""
    out = fn(*inputs, **kw)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, d_out, allow_unused=True)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_inputs, **kw)
    ref_grads = torch.autograd.grad(ref, ref_inputs, d_out.float(), allow_unused=True)
    assert rel_err(out, ref) < TOL[dtype]
    for name, grad, ref_grad in zip("abcd", grads, ref_grads):
        if ref_grad is None:
            assert grad is None or grad.abs().max() == 0, name
            continue
        assert grad.dtype == inputs["abcd".index(name)].dtype
        if ref_grad.norm() < 1e-6:  # a vanishing gradient (T=1: dq = dk = 0): rounding noise only
            assert grad.abs().max() < 1e-5, name
        else:
            assert rel_err(grad, ref_grad) < TOL[dtype], name


@pytest.mark.parametrize("xsa", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_reference_fp32(shape, xsa):
    _check_against_reference(gated_xsa_attention, gated_xsa_attention_reference,
                             _inputs(*shape, torch.float32), torch.float32, xsa=xsa)


@pytest.mark.parametrize("xsa", [True, False])
def test_attention_bf16_strided_views(xsa):
    _check_against_reference(gated_xsa_attention, gated_xsa_attention_reference,
                             _inputs(2, 45, 4, 2, 64, torch.bfloat16, strided=True), torch.bfloat16, xsa=xsa)


def test_attention_single_token():
    # T=1: O = v, so XSA would give exactly zero; check the plain path
    _check_against_reference(gated_xsa_attention, gated_xsa_attention_reference,
                             _inputs(2, 1, 4, 2, 16, torch.float32), torch.float32, xsa=False)


@pytest.mark.parametrize("xsa", [True, False])
@pytest.mark.parametrize("shape", [(2, 37, 4, 2, 16), (2, 130, 2, 2, 64)])
def test_xsa_gate_matches_reference(shape, xsa):
    B, T, H, h_kv, D = shape
    o, _, v, g = _inputs(B, T, H, h_kv, D, torch.float32)
    _check_against_reference(xsa_gate, xsa_gate_reference, [o, v, g], torch.float32, xsa=xsa)


def test_xsa_gate_bf16_strided_o():
    # the SDPA core returns (B,H,T,D) memory viewed as (B,T,H,D)
    o = torch.randn(2, 4, 45, 64, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    _, _, v, g = _inputs(2, 45, 4, 2, 64, torch.bfloat16)
    _check_against_reference(xsa_gate, xsa_gate_reference, [o, v, g], torch.bfloat16, xsa=True)
    d_o = attn._xsa_gate_backward_op(torch.randn_like(o), o.detach(), v.detach(), g.detach(), True)[0]
    assert d_o.stride() == o.stride()  # the core's backward gets dO in O's layout, without a copy


def test_xsa_gate_zero_value_vector():
    # ||v|| below eps: F.normalize clamps the norm, so only dn/eps flows back
    o, _, v, g = _inputs(1, 33, 2, 1, 16, torch.float32)
    with torch.no_grad():
        v[0, 5] = 0.0
    _check_against_reference(xsa_gate, xsa_gate_reference, [o, v, g], torch.float32, xsa=True)


@pytest.mark.parametrize("impl", ["triton", "triton_one_pass", "sdpa_fused", "reference", "auto"])
def test_dispatcher(impl):
    inputs = _inputs(1, 40, 4, 2, 16, torch.float32)
    _check_against_reference(lambda *a, xsa: attention(*a, xsa, impl=impl), gated_xsa_attention_reference, inputs,
                             torch.float32, xsa=True)


@pytest.mark.parametrize("impl", ["triton", "sdpa_fused"])
def test_dispatcher_under_autocast_with_mixed_input_dtypes(impl):
    # under bf16 autocast a norm may hand over fp32 k while q is bf16: both paths compute in bf16
    q, k, v, g = _inputs(1, 40, 4, 2, 16, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = attention(q.bfloat16(), k, v, g, True, impl=impl)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, gated_xsa_attention_reference(q, k, v, g, True)) < 2e-2
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, g))


def test_dispatcher_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        attention(*_inputs(1, 4, 2, 1, 16, torch.float32), xsa=True, impl="flash3")


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN: unwritten elements show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(math.nan))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: real_empty_like(*a, **kw).fill_(math.nan))


@pytest.mark.parametrize("xsa,one_pass", [(True, False), (False, False), (True, True)])
def test_raw_launchers_write_every_element(nan_poisoned_empty, xsa, one_pass):
    q, k, v, g = (t.detach() for t in _inputs(2, 45, 4, 2, 16, torch.float32))
    y, o, lse = attn._attention_forward(q, k, v, g, xsa)
    dy = torch.randn_like(q)
    dkdv_config = attn._configs(q)["dkdv"][:4] + (one_pass,)
    grads = attn._attention_backward(dy, q, k, v, g, o, lse, xsa, dkdv_config=dkdv_config)
    y_epi = attn._xsa_gate_forward(o, v, g, xsa)
    epi_grads = attn._xsa_gate_backward(dy, o, v, g, xsa)
    for t in (y, o, lse, *grads, y_epi, *(t for t in epi_grads if t is not None)):
        assert torch.isfinite(t).all()
    assert rel_err(y, gated_xsa_attention_reference(q, k, v, g, xsa)) < 1e-4
    assert rel_err(y_epi, y) < 1e-5


@pytest.mark.parametrize("pack_gqa,one_pass", [(True, False), (False, False), (False, True)])
def test_gqa_packed_and_per_head_tiles(pack_gqa, one_pass):
    """Forward and dQ tiles holding the whole kv group's heads, or one head, or dQ summed by the dK/dV
    kernel (one pass): all match the reference."""
    q, k, v, g = (t.detach() for t in _inputs(2, 45, 4, 2, 16, torch.float32))
    config = (32, 16, 4, 1, pack_gqa)
    y, o, lse = attn._attention_forward(q, k, v, g, True, config=config)
    dy = torch.randn_like(y)
    dq, dk, dv, dg = attn._attention_backward(dy, q, k, v, g, o, lse, True, dkdv_config=(16, 32, 4, 1, one_pass),
                                              dq_config=config)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, g)]
    ref = gated_xsa_attention_reference(*ref_inputs, True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy)
    assert rel_err(y, ref) < 1e-4
    for grad, ref_grad in zip((dq, dk, dv, dg), ref_grads):
        assert rel_err(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("one_pass", [False, True])
def test_opcheck_attention(one_pass):
    q, k, v, g = _inputs(1, 20, 2, 1, 16, torch.float32)
    torch.library.opcheck(attn._gated_xsa_attention_op, (q, k, v, g, True, one_pass))
    q, k, v, g = (t.detach() for t in (q, k, v, g))  # no double backward: the backward op alone
    _, o, lse = attn._gated_xsa_attention_op(q, k, v, g, True, one_pass)
    torch.library.opcheck(attn._gated_xsa_attention_backward_op,
                          (torch.randn_like(q), q, k, v, g, o, lse, True, one_pass))


def test_one_pass_impl_runs_the_one_pass_backward(monkeypatch):
    """impl="triton_one_pass" reaches the backward with the one-pass dK/dV config (and "triton" with the
    default), and both give the reference's gradients."""
    configs = []
    real = attn._attention_backward
    monkeypatch.setattr(attn, "_attention_backward",
                        lambda *a, **kw: configs.append(kw.get("dkdv_config")) or real(*a, **kw))
    q, k, v, g = _inputs(2, 37, 4, 2, 32, torch.float32)
    dy = torch.randn_like(q)
    ref = torch.autograd.grad(gated_xsa_attention_reference(q, k, v, g, True), (q, k, v, g), dy)
    for impl in ("triton", "triton_one_pass"):
        grads = torch.autograd.grad(attention(q, k, v, g, True, impl=impl), (q, k, v, g), dy)
        for got, want in zip(grads, ref):
            assert rel_err(got, want) < 1e-4, impl
    assert configs == [None, attn._configs(q)["dkdv_one_pass"]] and configs[1][4] is True


def test_opcheck_xsa_gate():
    o, _, v, g = _inputs(1, 20, 4, 2, 16, torch.float32)
    for xsa in (True, False):
        torch.library.opcheck(attn._xsa_gate_op, (o, v, g, xsa))
        plain = [t.detach() for t in (o, v, g)]  # no double backward: the backward op alone
        torch.library.opcheck(attn._xsa_gate_backward_op, (torch.randn_like(o), *plain, xsa))


def test_traces_under_torch_compile_fullgraph():
    inputs = _inputs(1, 24, 2, 1, 16, torch.float32)

    def fn(q, k, v, g):
        return gated_xsa_attention(q, k, v, g, True), attention(q, k, v, g, True, impl="sdpa_fused")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs = compiled(*inputs)
    sum(out.sum() for out in outs).backward()
    for out, eager in zip(outs, fn(*[t.detach() for t in inputs])):  # tensors, not sums that may cancel
        assert rel_err(out, eager) < 1e-5
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


def test_bad_inputs():
    q, k, v, g = (t.detach() for t in _inputs(1, 8, 4, 2, 16, torch.float32))
    with pytest.raises(ValueError, match="k and v"):
        gated_xsa_attention(q, k[:, :7], v, g, True)
    with pytest.raises(ValueError, match="multiple"):
        gated_xsa_attention(q[:, :, :3], k, v, g[:, :, :3], True)
    with pytest.raises(ValueError, match="gate_logits"):
        gated_xsa_attention(q, k, v, g[:, :, :2], True)
    with pytest.raises(TypeError, match="k must be"):
        gated_xsa_attention(q, k.double(), v, g, True)
    with pytest.raises(TypeError, match="q must be"):
        gated_xsa_attention(q.long(), k, v, g, True)
    with pytest.raises(ValueError, match="head_dim"):
        gated_xsa_attention(q[..., :12], k[..., :12], v[..., :12], g, True)
    with pytest.raises(ValueError, match="multiple"):
        xsa_gate(q, v[:, :, :1].expand(1, 8, 3, 16), g, True)
    with pytest.raises(ValueError, match="gate_logits"):
        xsa_gate(q, v, g[:1, :4], True)
    with pytest.raises(TypeError, match="o must be"):
        xsa_gate(q.long(), v, g, True)
    other_device = "cpu" if q.is_cuda else "meta"
    with pytest.raises(ValueError, match="k is on"):
        attn._attention_forward(q, k.to(other_device), v, g, True)
    with pytest.raises(ValueError, match="v is on"):
        attn._xsa_gate_forward(q, v.to(other_device), g, True)


@requires_cuda
@pytest.mark.parametrize("xsa", [True, False])
def test_seed_shape_on_gpu(xsa):
    torch.manual_seed(0)
    inputs = _inputs(48, 2048, 8, 4, 64, torch.bfloat16, strided=True)
    for impl in attn.FUSED_IMPLS:
        _check_against_reference(lambda *a, xsa: attention(*a, xsa, impl=impl), gated_xsa_attention_reference,
                                 inputs, torch.bfloat16, xsa=xsa)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_auto_runs_the_reference_for_a_head_size_the_kernels_cannot_run(device):
    """head_dim 68 (not a power of two): "auto" gives the reference's output on any device, "fused"
    refuses in one line naming the head size (CPU tensors on a machine whose suite runs without the
    interpreter, i.e. with CUDA: naming the CPU first)."""
    from recycore import ops
    from recycore.kernels._common import INTERPRETER_ENABLED

    torch.manual_seed(0)
    q, g = torch.randn(2, 24, 4, 68, device=device), torch.randn(2, 24, 4, device=device)
    k, v = torch.randn(2, 24, 2, 68, device=device), torch.randn(2, 24, 2, 68, device=device)
    expected = gated_xsa_attention_reference(q, k, v, g, True)
    torch.testing.assert_close(ops.gated_xsa_attention(q, k, v, g, True, "auto"), expected)
    refusal = ("head_dim must be a power of two >= 16, got 68" if device == "cuda" or INTERPRETER_ENABLED
               else "q is on the CPU: the Triton kernels need a CUDA tensor")
    with pytest.raises(ValueError, match=refusal):
        ops.gated_xsa_attention(q, k, v, g, True, "fused")


def test_auto_chooses_per_use_by_forward_backward_or_forward_time(monkeypatch):
    """auto's choice is measured once per signature and use: by forward+backward time where the call will
    be differentiated (grad mode on, an input that requires grad), by forward time where not."""
    monkeypatch.setattr(attn, "_CHOICES", {})
    monkeypatch.setattr(attn, "_can_measure", lambda q: True)  # (on the CPU too: the timing is faked)
    measured = []

    def fake_measure(q, k, v, g, xsa, backward=True):
        measured.append(backward)
        return {"triton": 1.0, "sdpa_fused": 2.0} if backward else {"triton": 2.0, "sdpa_fused": 1.0}
    monkeypatch.setattr(attn, "measure_impls", fake_measure)
    q, k, v, g = _inputs(1, 16, 4, 2, 16, torch.float32)
    assert attn.choose_impl(q, k, v, g, True) == "triton"
    with torch.no_grad():
        assert attn.choose_impl(q, k, v, g, True) == "sdpa_fused"
    assert attn.choose_impl(*(t.detach() for t in (q, k, v, g)), True) == "sdpa_fused"
    assert attn.choose_impl(q, k, v, g, True) == "triton"
    assert measured == [True, False]
    assert sorted(choice["backward"] for choice in attn.measured_choices()) == [False, True]
    from recycore import ops  # what training and evaluation log
    assert ops.kernel_choices() == [
        "attention q (1, 16, 4, 16) xsa True by fwd+bwd: triton (triton 1.000, sdpa_fused 2.000 ms)",
        "attention q (1, 16, 4, 16) xsa True by fwd: sdpa_fused (triton 2.000, sdpa_fused 1.000 ms)"]


@requires_cuda
def test_auto_measures_each_signature_once_and_takes_the_faster(monkeypatch):
    """"auto": each impl of AUTO_IMPLS timed (in turns, each replayed as a CUDA graph) on the first call of a
    signature, the fastest taken and recorded with its timings; a second call with the same shapes and
    layouts measures nothing."""
    monkeypatch.setattr(attn, "_CHOICES", {})
    q, k, v, g = _inputs(1, 256, 4, 2, 64, torch.bfloat16)
    calls = []
    real = attn.measure_impls
    monkeypatch.setattr(attn, "measure_impls", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            attention(q, k, v, g, True)
    assert not [w for w in caught if "could not capture" in str(w.message)]  # timed as graphs, not eagerly
    assert len(calls) == 1
    [choice] = attn.measured_choices()
    assert set(choice["ms"]) == set(attn.AUTO_IMPLS) and all(ms > 0 for ms in choice["ms"].values())
    assert choice["impl"] == min(choice["ms"], key=choice["ms"].get)


@requires_cuda
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_auto_measures_a_first_call_made_without_autograd(monkeypatch, mode):
    """An evaluation can be the first call of a signature: it is timed by the forward alone, and the output
    is the chosen impl's."""
    monkeypatch.setattr(attn, "_CHOICES", {})
    q, k, v, g = _inputs(2, 192, 4, 2, 64, torch.bfloat16)
    with mode():
        out = attention(q, k, v, g, True)
    [choice] = attn.measured_choices()
    assert choice["impl"] in attn.AUTO_IMPLS and not choice["backward"]
    torch.testing.assert_close(out, attention(q, k, v, g, True, impl=choice["impl"]), rtol=0, atol=0)
