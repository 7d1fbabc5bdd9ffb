"""K4 fused q/k rms_norm + partial RoPE + q_gain vs the plain-torch reference (autograd, float64)."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from helpers import DEVICE, rel_err, requires_cuda
from recycore.bench import pure_copy_kernels
from recycore.kernels.qk_prep import (RMS_EPS, norm_row_scale, qk_norm_rope, qk_norm_rope_backward,
                                      qk_norm_rope_forward, qk_norm_rope_reference, qkv_prep, qkv_prep_reference)

qk_prep = importlib.import_module("recycore.kernels.qk_prep")
# bf16: the interpreter truncates fp32 -> bf16 casts instead of rounding, and the values' chain rounds
# up to four times (row-scaled projection, + embedding, blend weights, blend)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE.type == "cpu" else 1e-2}
# (B, T, H, Hkv, D, R): T not a multiple of the block (16 on CPU, 32 on GPU), B*T odd in some,
# GQA 4/2 and 8/4, D 32 and 64, R 0, 8 and 16; last, D and R/2 not powers of two (masked lanes).
SHAPES = [(2, 37, 4, 2, 64, 16), (3, 21, 8, 4, 64, 16), (1, 45, 4, 2, 32, 8), (2, 19, 8, 4, 32, 0),
          (1, 9, 4, 2, 64, 8), (1, 13, 4, 2, 48, 12)]


def _tables(T, R, device=DEVICE):
    """Fresh random angles (not the model's table: every entry of cos/sin should matter)."""
    angles = 10 * torch.rand(T, R // 2, device=device)
    return angles.cos(), angles.sin()


def _inputs(B, T, H, h_kv, D, R, dtype, device=DEVICE):
    """q, k as views of one [q | k | v] projection output (D contiguous, other strides not)."""
    qkv = 3 * torch.randn(B, T, (H + 2 * h_kv) * D, device=device, dtype=dtype) + 0.5
    qkv.requires_grad_()
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + h_kv) * D].view(B, T, h_kv, D)
    cos, sin = _tables(T, R, device)
    q_gain = (torch.rand(H, device=device) + 0.5).requires_grad_()
    return qkv, q, k, cos, sin, q_gain


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty made during the test is NaN-filled: an output element the kernels do not
    write (or a workspace entry, for d q_gain) shows up as NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _check(B, T, H, h_kv, D, R, dtype, device=DEVICE):
    qkv, q, k, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, dtype, device)
    q_out, k_out = qk_norm_rope(q, k, cos, sin, q_gain)
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.is_contiguous() and k_out.is_contiguous()
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    d_qkv, d_gain = torch.autograd.grad((q_out, k_out), (qkv, q_gain), (dq_out, dk_out))

    ref_qkv = qkv.detach().double().requires_grad_()
    ref_gain = q_gain.detach().double().requires_grad_()
    ref_q, ref_k = ref_qkv[..., :H * D].view(B, T, H, D), ref_qkv[..., H * D:(H + h_kv) * D].view(B, T, h_kv, D)
    ref_q_out, ref_k_out = qk_norm_rope_reference(ref_q, ref_k, cos.double(), sin.double(), ref_gain)
    ref_d_qkv, ref_d_gain = torch.autograd.grad((ref_q_out, ref_k_out), (ref_qkv, ref_gain),
                                                (dq_out.double(), dk_out.double()))
    tol = TOL[dtype]
    assert rel_err(q_out, ref_q_out) < tol
    assert rel_err(k_out, ref_k_out) < tol
    assert d_qkv.dtype == dtype and d_gain.dtype == torch.float32
    assert rel_err(d_qkv[..., :H * D], ref_d_qkv[..., :H * D]) < tol  # dq
    assert rel_err(d_qkv[..., H * D:(H + h_kv) * D], ref_d_qkv[..., H * D:(H + h_kv) * D]) < tol  # dk
    assert d_qkv[..., (H + h_kv) * D:].abs().max() == 0  # v's slice gets no gradient
    assert rel_err(d_gain, ref_d_gain) < tol


def _packed_inputs(B, T, H, h_kv, D, R, dtype, device=DEVICE, row_pad=0):
    """A packed [q | k | v | gate] projection output (row_pad > 0: a column slice of a wider buffer, so
    its rows are further apart than its width), tables, q_gain and the gate's bias."""
    width = (H + 2 * h_kv) * D + H
    buffer = 3 * torch.randn(B, T, width + row_pad, device=device, dtype=dtype) + 0.5
    qkv = buffer[..., :width].detach().requires_grad_()
    cos, sin = _tables(T, R, device)
    q_gain = (torch.rand(H, device=device) + 0.5).requires_grad_()
    gate_bias = torch.randn(H, device=device).requires_grad_()
    return qkv, cos, sin, q_gain, gate_bias


def _optional_inputs(B, T, h_kv, D, dtype, options, device=DEVICE):
    """qkv_prep's optional inputs: v_embed (B,T,Hkv*D) with "embed" in options; v0 and the blend weights
    v_mix with "residual"; the row scales (B,T) fp32 with "scale"."""
    v_embed = v0 = v_mix = row_scale = None
    if "embed" in options:
        v_embed = torch.randn(B, T, h_kv * D, device=device, dtype=dtype).requires_grad_()
    if "residual" in options:
        v0 = (2 * torch.randn(B, T, h_kv, D, device=device, dtype=dtype)).requires_grad_()
        v_mix = (torch.rand(2, device=device) + 0.25).requires_grad_()
    if "scale" in options:
        row_scale = (torch.rand(B, T, device=device) + 0.2).requires_grad_()
    return v_embed, v0, v_mix, row_scale


def _check_packed(B, T, H, h_kv, D, R, dtype, device=DEVICE, row_pad=0, strided_grads=False, options=""):
    qkv, cos, sin, q_gain, gate_bias = _packed_inputs(B, T, H, h_kv, D, R, dtype, device, row_pad)
    extra = _optional_inputs(B, T, h_kv, D, dtype, options, device)
    outs = qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, *extra)
    shapes = [(B, T, H, D), (B, T, h_kv, D), (B, T, h_kv, D), (B, T, H)]
    assert [tuple(o.shape) for o in outs] == shapes
    assert all(o.dtype == dtype and o.is_contiguous() for o in outs)
    if strided_grads:  # gradients in SDPA's (B,H,T,D) layout, the gate's transposed too
        grads = [torch.randn(B, s[2], T, *s[3:], device=device, dtype=dtype).transpose(1, 2) for s in shapes]
    else:
        grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    present = [t for t in extra if t is not None]
    got = torch.autograd.grad(outs, (qkv, q_gain, gate_bias, *present), grads)

    ref_in = [t.detach().double().requires_grad_() for t in (qkv, q_gain, gate_bias, *present)]
    ref_extra = iter(ref_in[3:])
    ref = qkv_prep_reference(ref_in[0], cos.double(), sin.double(), ref_in[1], ref_in[2], H, h_kv,
                             *(None if t is None else next(ref_extra) for t in extra))
    want = torch.autograd.grad(ref, ref_in, [g.double() for g in grads])
    tol = TOL[dtype]
    for o, r in zip(outs, ref):
        assert rel_err(o, r) < tol
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    bounds = [0, H * D, (H + h_kv) * D, (H + 2 * h_kv) * D, qkv.shape[-1]]  # dq, dk, dv, d gate columns
    for lo, hi in zip(bounds, bounds[1:]):
        assert rel_err(got[0][..., lo:hi], want[0][..., lo:hi]) < tol
    for g, w, t in zip(got[1:], want[1:], (q_gain, gate_bias, *present)):
        assert g.dtype == t.dtype and g.shape == t.shape and rel_err(g, w) < tol


# qk_norm_rope on q/k views; qkv_prep on the whole output, without and with every optional input
ALL_OPTIONS = "embed+residual+scale"
CHECKS = {"views": _check, "packed": _check_packed,
          "packed-options": lambda *shape: _check_packed(*shape, options=ALL_OPTIONS)}


@pytest.mark.parametrize("layout", CHECKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape, layout, nan_empty):
    CHECKS[layout](*shape, torch.float32)


@pytest.mark.parametrize("layout", CHECKS)
@pytest.mark.parametrize("shape", [(1, 33, 4, 2, 64, 16), (2, 17, 8, 4, 64, 8)])
def test_matches_reference_bf16(shape, layout, nan_empty):
    CHECKS[layout](*shape, torch.bfloat16)


def test_packed_strided_input_and_grads(nan_empty):
    """qkv rows further apart than its width; every output gradient in a transposed layout."""
    _check_packed(2, 23, 8, 4, 32, 16, torch.float32, row_pad=24, strided_grads=True, options=ALL_OPTIONS)


@pytest.mark.parametrize("options", ["embed", "residual", "scale", "embed+scale"])
def test_optional_inputs_alone(options, nan_empty):
    _check_packed(2, 19, 4, 2, 32, 8, torch.float32, options=options)


@requires_cuda
def test_values_follow_the_models_bf16_chain():
    """In bf16 the values are the model's chain to the bit where it rounds once per op: the row-scaled
    projection rounded, raw = v + v_embed rounded, the blend weights rounded to bf16, lambda_0 v0 +
    lambda_1 raw rounded once (as the compiled model, which keeps the blend's products in fp32; up to a
    fused multiply-add); the gate logits exactly. GPU only: the CPU interpreter truncates casts."""
    B, T, H, h_kv, D, R = 2, 2048, 8, 4, 64, 16
    cuda = torch.device("cuda")
    qkv, cos, sin, q_gain, gate_bias = (t.detach() for t in _packed_inputs(B, T, H, h_kv, D, R, torch.bfloat16, cuda))
    v_embed, v0, v_mix, row_scale = (t.detach() for t in _optional_inputs(B, T, h_kv, D, torch.bfloat16, ALL_OPTIONS,
                                                                           cuda))
    _, _, v, gate = qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, v_embed, v0, v_mix, row_scale)
    scaled = (qkv * row_scale[..., None]).to(torch.bfloat16)
    raw = scaled[..., (H + h_kv) * D:(H + 2 * h_kv) * D].view(B, T, h_kv, D) + v_embed.view(B, T, h_kv, D)
    lam = v_mix.to(torch.bfloat16).float()
    want = (lam[0] * v0.float() + lam[1] * raw.float()).to(torch.bfloat16).float()
    # the kernel's blend may be one fused multiply-add (a rounding fewer): now and then one bf16 ulp off
    off = (v.float() - want).abs()
    assert (off <= want.abs() * 2.0**-7).all() and (off == 0).float().mean() > 0.99
    assert torch.equal(gate, (scaled[..., (H + 2 * h_kv) * D:].float() + gate_bias).to(torch.bfloat16))


def test_packed_is_the_split_op():
    """q_out, k_out of the packed op equal the view op's on the same projection output, and its d q_gain
    equals the view op's with the same q/k gradients (one kernel, two launch layouts)."""
    B, T, H, h_kv, D, R = 2, 21, 8, 4, 64, 16
    qkv, cos, sin, q_gain, gate_bias = (t.detach() for t in _packed_inputs(B, T, H, h_kv, D, R, torch.float32))
    q_out, k_out, v, gate = qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + h_kv) * D].view(B, T, h_kv, D)
    assert all(torch.equal(a, b) for a, b in zip((q_out, k_out), qk_norm_rope(q, k, cos, sin, q_gain)))
    assert torch.equal(v, qkv[..., (H + h_kv) * D:(H + 2 * h_kv) * D].view(B, T, h_kv, D))
    g_q, g_k = torch.randn_like(q_out), torch.randn_like(k_out)
    d_qkv, d_gain, d_bias, _, _ = qk_prep.qkv_prep_backward(g_q, g_k, torch.zeros_like(v), torch.zeros_like(gate), qkv,
                                                      cos, sin, q_gain, gate_bias, H, h_kv)
    dq, dk, d_gain_views = qk_norm_rope_backward(g_q, g_k, q, k, cos, sin, q_gain)
    assert torch.equal(d_qkv[..., :H * D], dq.flatten(2)) and torch.equal(d_qkv[..., H * D:(H + h_kv) * D], dk.flatten(2))
    assert torch.equal(d_gain, d_gain_views) and not d_bias.any()


def _rotate(x, cos, sin):
    """SPEC §2's partial RoPE, written out: [x1 cos + x2 sin, -x1 sin + x2 cos, rest]."""
    half = cos.size(-1)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest), dim=-1)


def test_reference_is_the_models_chain():
    """qk_norm_rope_reference (the model's reference path) computes bit for bit the chain the model
    computed before it was fused: rms_norm, partial RoPE, q_gain, in that order and those dtypes."""
    from recycore import ops
    from recycore.model import rotary_tables

    B, T, H, h_kv, D, R = 2, 40, 4, 2, 64, 16
    cos, sin = rotary_tables(T, R, 10000.0, 16, DEVICE)  # T > train length: NTK-scaled base
    for dtype in (torch.float32, torch.bfloat16):
        _, q, k, _, _, q_gain = _inputs(B, T, H, h_kv, D, R, dtype)
        q, k, q_gain = q.detach(), k.detach(), q_gain.detach()
        q_ref, k_ref = ops.rms_norm(q), ops.rms_norm(k)
        q_ref, k_ref = _rotate(q_ref, cos, sin), _rotate(k_ref, cos, sin)
        q_ref = q_ref * q_gain.to(q_ref.dtype)[None, None, :, None]
        q_out, k_out = qk_norm_rope_reference(q, k, cos, sin, q_gain)
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
        # R = 0: the model skips the rotation; so does the reference (an empty table)
        empty = torch.empty(T, 0, device=DEVICE)
        q_out, k_out = qk_norm_rope_reference(q, k, empty, empty, q_gain)
        assert torch.equal(k_out, ops.rms_norm(k))
        assert torch.equal(q_out, ops.rms_norm(q) * q_gain.to(dtype)[None, None, :, None])


def test_norm_row_scale_is_the_rms_norm_as_a_row_scale():
    """norm_row_scale(x, s) * x == F.rms_norm(x) * s, and its hand-written backward is the derivative
    (float64 gradcheck, the scale's gradient too)."""
    x = torch.randn(3, 7, 24, dtype=torch.float64, device=DEVICE) * 3
    s = torch.tensor(0.7, dtype=torch.float64, device=DEVICE)
    assert rel_err(norm_row_scale(x, s)[..., None] * x, F.rms_norm(x, (24,), eps=RMS_EPS) * s) < 1e-12
    torch.autograd.gradcheck(norm_row_scale, (x.requires_grad_(), s.requires_grad_()))
    with pytest.raises(ValueError, match="0-d"):
        norm_row_scale(x, s.expand(1))


def test_rms_eps_is_torchs_default():
    """F.rms_norm's default eps is fp32's for fp32 and bf16 inputs (it computes in fp32)."""
    x = torch.full((3, 64), 3e-5)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        manual = xd.float() * torch.rsqrt(xd.float().pow(2).mean(-1, keepdim=True) + RMS_EPS)
        assert torch.equal(F.rms_norm(xd, (64,)), manual.to(dtype))


def test_kernel_uses_the_default_eps():
    """Tiny rows (mean square ~ eps): the eps term is visible, and the kernel's matches F.rms_norm's."""
    q = torch.full((1, 3, 4, 32), 2e-4, device=DEVICE) * torch.randn(1, 3, 4, 32, device=DEVICE)
    k = torch.full((1, 3, 2, 32), 2e-4, device=DEVICE) * torch.randn(1, 3, 2, 32, device=DEVICE)
    cos, sin = _tables(3, 8)
    gain = torch.ones(4, device=DEVICE)
    out = qk_norm_rope(q, k, cos, sin, gain)
    ref = qk_norm_rope_reference(q, k, cos, sin, gain)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 1e-5
        assert r.norm() < 0.95 * r.numel() ** 0.5  # the eps term really shrinks these rows


def test_backward_strided_grads_and_determinism(nan_empty):
    """Output gradients in SDPA's (B,H,T,D)-transposed layout; d q_gain identical run to run."""
    B, T, H, h_kv, D, R = 2, 23, 8, 4, 32, 16
    _, q, k, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, torch.float32)
    q, k, q_gain = q.detach(), k.detach(), q_gain.detach()
    dq_out = torch.randn(B, H, T, D, device=DEVICE).transpose(1, 2)
    dk_out = torch.randn(B, h_kv, T, D, device=DEVICE).transpose(1, 2)
    dq, dk, d_gain = qk_norm_rope_backward(dq_out, dk_out, q, k, cos, sin, q_gain)
    dq2, dk2, d_gain2 = qk_norm_rope_backward(dq_out.contiguous(), dk_out.contiguous(), q.contiguous(),
                                              k.contiguous(), cos, sin, q_gain)
    assert torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(d_gain, d_gain2)
    qd, kd, gd = (t.double().requires_grad_() for t in (q, k, q_gain))
    ref = qk_norm_rope_reference(qd, kd, cos.double(), sin.double(), gd)
    ref_grads = torch.autograd.grad(ref, (qd, kd, gd), (dq_out.double(), dk_out.double()))
    for got, want in zip((dq, dk, d_gain), ref_grads):
        assert rel_err(got, want) < 1e-5


def test_launcher_configs_agree():
    """Other block configs (several heads per program, or one) give the same result."""
    B, T, H, h_kv, D, R = 1, 21, 8, 4, 64, 16
    _, q, k, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, torch.float32)
    q, k, q_gain = q.detach(), k.detach(), q_gain.detach()
    base = qk_norm_rope_forward(q, k, cos, sin, q_gain)
    other = qk_norm_rope_forward(q, k, cos, sin, q_gain, config=qk_prep.QKPrepConfig(8, 1, 1))
    for a, b in zip(base, other):
        assert rel_err(a, b) < 1e-6


def test_opcheck():
    B, T, H, h_kv, D, R = 1, 5, 4, 2, 32, 8
    _, q, k, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    torch.library.opcheck(torch.ops.recycore.qk_norm_rope.default, (q, k, cos, sin, q_gain))
    g_q, g_k = torch.randn(B, T, H, D, device=DEVICE), torch.randn(B, T, h_kv, D, device=DEVICE)
    torch.library.opcheck(torch.ops.recycore.qk_norm_rope_backward.default,
                          (g_q, g_k, q.detach(), k.detach(), cos, sin, q_gain.detach()))


def test_opcheck_packed():
    B, T, H, h_kv, D, R = 1, 5, 4, 2, 32, 8
    qkv, cos, sin, q_gain, gate_bias = _packed_inputs(B, T, H, h_kv, D, R, torch.float32)
    grads = (torch.randn(B, T, H, D, device=DEVICE), torch.randn(B, T, h_kv, D, device=DEVICE),
             torch.randn(B, T, h_kv, D, device=DEVICE), torch.randn(B, T, H, device=DEVICE))
    for options in ("", ALL_OPTIONS):
        extra = _optional_inputs(B, T, h_kv, D, torch.float32, options)
        torch.library.opcheck(torch.ops.recycore.qkv_prep.default, (qkv, cos, sin, q_gain, gate_bias, H, h_kv, *extra))
        torch.library.opcheck(torch.ops.recycore.qkv_prep_backward.default,
                              (*grads, qkv.detach(), cos, sin, q_gain.detach(), gate_bias.detach(), H, h_kv,
                               *(None if t is None else t.detach() for t in extra)))


def test_packed_input_checks():
    B, T, H, h_kv, D, R = 1, 4, 4, 2, 32, 8
    qkv, cos, sin, q_gain, gate_bias = (t.detach() for t in _packed_inputs(B, T, H, h_kv, D, R, torch.float32))
    with pytest.raises(ValueError, match="not \\(H \\+ 2 Hkv\\) D \\+ H"):
        qkv_prep(qkv[..., :-1], cos, sin, q_gain, gate_bias, H, h_kv)
    with pytest.raises(ValueError, match="gate_bias must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias[:-1], H, h_kv)
    with pytest.raises(ValueError, match="contiguous last dim"):
        qkv_prep(qkv.mT.contiguous().mT, cos, sin, q_gain, gate_bias, H, h_kv)
    with pytest.raises(ValueError, match="q_gain"):
        qkv_prep(qkv, cos, sin, q_gain[:-1], gate_bias, H, h_kv)
    v_embed, v0, v_mix, row_scale = (t.detach() for t in _optional_inputs(B, T, h_kv, D, torch.float32, ALL_OPTIONS))
    with pytest.raises(ValueError, match="v_embed must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, v_embed[..., :-1])
    with pytest.raises(ValueError, match="v_embed must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, v_embed.double())
    with pytest.raises(ValueError, match="come together"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, None, v0, None)
    with pytest.raises(ValueError, match="v0 must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, None, v0[:, :-1], v_mix)
    with pytest.raises(ValueError, match="v_mix must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, None, v0, v_mix[:1])
    with pytest.raises(ValueError, match="row_scale must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, row_scale=row_scale[:, :-1])
    with pytest.raises(ValueError, match="row_scale must be"):
        qkv_prep(qkv, cos, sin, q_gain, gate_bias, H, h_kv, row_scale=row_scale.double())


def test_torch_compile_fullgraph():
    """The op inside a compiled function (views of a projection output in, a loss out)."""
    B, T, H, h_kv, D, R = 1, 19, 4, 2, 32, 8
    qkv, _, _, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, torch.float32)

    def f(qkv, cos, sin, q_gain):
        q = qkv[..., :H * D].view(B, T, H, D)
        k = qkv[..., H * D:(H + h_kv) * D].view(B, T, h_kv, D)
        q_out, k_out = qk_norm_rope(q, k, cos, sin, q_gain)
        return (q_out.square().mean(-1) * k_out.repeat_interleave(H // h_kv, 2).sum(-1)).sum()

    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager_loss = f(qkv, cos, sin, q_gain)
    eager_grads = torch.autograd.grad(eager_loss, (qkv, q_gain))
    loss = compiled(qkv, cos, sin, q_gain)
    grads = torch.autograd.grad(loss, (qkv, q_gain))
    assert rel_err(loss, eager_loss) < 1e-5
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 1e-5


def test_packed_torch_compile_fullgraph():
    """The packed op after a projection inside a compiled function, a loss of all four outputs."""
    B, T, H, h_kv, D, R = 1, 19, 4, 2, 32, 8
    qkv, cos, sin, q_gain, gate_bias = _packed_inputs(B, T, H, h_kv, D, R, torch.float32)
    w = torch.randn(qkv.shape[-1], qkv.shape[-1], device=DEVICE, requires_grad=True)

    def f(x, w, q_gain, gate_bias):
        q, k, v, gate = qkv_prep(x @ w.t(), cos, sin, q_gain, gate_bias, H, h_kv)
        return (q.square().mean(-1) * k.repeat_interleave(H // h_kv, 2).sum(-1)).sum() + (v * v).sum() \
            + gate.sigmoid().sum()

    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    inputs = (qkv, w, q_gain, gate_bias)
    eager_loss = f(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    assert rel_err(loss, eager_loss) < 1e-5
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 1e-5


def test_input_checks():
    B, T, H, h_kv, D, R = 1, 4, 4, 2, 32, 8
    _, q, k, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, torch.float32)
    with pytest.raises(ValueError, match="cos and sin"):
        qk_norm_rope(q, k, cos[:-1], sin[:-1], q_gain)
    with pytest.raises(ValueError, match="q_gain"):
        qk_norm_rope(q, k, cos, sin, q_gain[:-1])
    with pytest.raises(TypeError, match="share"):
        qk_norm_rope(q, k.double(), cos, sin, q_gain)
    with pytest.raises(ValueError, match="k must be"):
        qk_norm_rope(q, k[:, :-1], cos, sin, q_gain)


# ----------------------------------------------------------------------------------------------
# GPU: the seed's shape, bf16, the fused-projection layout; CUDA-graph capture
# ----------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("B", [4, 8])
def test_seed_shape_bf16_cuda(B):
    _check(B, 2048, 8, 4, 64, 16, torch.bfloat16, device=torch.device("cuda"))


@requires_cuda
def test_packed_seed_shape_bf16_cuda():
    _check_packed(8, 2048, 8, 4, 64, 16, torch.bfloat16, device=torch.device("cuda"))


@requires_cuda
def test_seed_shape_fp32_cuda():
    _check(4, 2048, 8, 4, 64, 16, torch.float32, device=torch.device("cuda"))


@requires_cuda
def test_cuda_graph_capture():
    """Forward + backward captured in one CUDA graph replays to the eager result."""
    B, T, H, h_kv, D, R = 4, 2048, 8, 4, 64, 16
    qkv, _, _, cos, sin, q_gain = _inputs(B, T, H, h_kv, D, R, torch.bfloat16, torch.device("cuda"))
    g_q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    g_k = torch.randn(B, T, h_kv, D, device="cuda", dtype=torch.bfloat16)

    def step():
        q = qkv[..., :H * D].view(B, T, H, D)
        k = qkv[..., H * D:(H + h_kv) * D].view(B, T, h_kv, D)
        q_out, k_out = qk_norm_rope(q, k, cos, sin, q_gain)
        return (q_out, k_out) + torch.autograd.grad((q_out, k_out), (q, k, q_gain), (g_q, g_k))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        qkv.add_(0.1 * torch.randn_like(qkv))  # new values in the static input buffer
    expected = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@requires_cuda
def test_padded_projection_rows_are_read_in_place_under_inductor():
    """Inductor pads the rows of the model's packed projection output (1032 -> 1088 elements) on the GPU;
    qkv_prep and its backward take them where they are, with no copy to contiguous rows either way."""
    B, T, H, h_kv, D, R = 2, 256, 8, 4, 64, 16
    cuda = torch.device("cuda")
    width = (H + 2 * h_kv) * D + H
    x = torch.randn(B, T, 512, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(width, 512, device=cuda) / 512 ** 0.5).to(torch.bfloat16).requires_grad_()
    cos, sin = _tables(T, R, cuda)
    q_gain = (torch.rand(H, device=cuda) + 0.5).requires_grad_()
    gate_bias = torch.randn(H, device=cuda).requires_grad_()

    def loss(x, w, q_gain, gate_bias):
        q, k, v, gate = qkv_prep(F.linear(x, w), cos, sin, q_gain, gate_bias, H, h_kv)
        return q.float().square().sum() + k.float().sum() + v.float().sum() + gate.float().sigmoid().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    inputs = (x, w, q_gain, gate_bias)
    with torch.compiler.config.patch(force_disable_caches=True):  # a cache hit generates no code
        _, codes = run_and_get_code(lambda: torch.autograd.grad(compiled(*inputs), inputs))
    code = "\n".join(codes)
    assert "1088, 1)" in code, "premise: inductor no longer pads the projection's rows here; this test checks nothing"
    assert pure_copy_kernels(code) == []
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for g, e in zip(got, want):
        assert rel_err(g, e) < 1e-2
