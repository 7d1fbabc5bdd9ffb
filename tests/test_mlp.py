"""K1: the fused LeakyReLU² MLP (kernels/mlp.py) against a float64 reference, forward and all
three gradients, in fp32 and bf16, also on the template's persistent TMA variant; the custom op's
registration (opcheck, torch.compile)."""
import pytest
import torch
from helpers import DEVICE, rel_err, requires_cuda

from recycore.kernels import gemm as gemm_module
from recycore.kernels import leaky_relu2_mlp, leaky_relu2_mlp_reference
from recycore.kernels import mlp as mlp_module

# bf16: the interpreter truncates fp32 -> bf16 casts (pre, post, outputs) instead of rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE.type == "cpu" else 1e-2}


def _inputs(lead, d, h, dtype, weight_dtype=torch.float32):
    u = torch.randn(*lead, d, device=DEVICE, dtype=dtype).requires_grad_()
    # orthogonal-like scale: pre ~ N(0, 1), so about half of it takes the 0.5 slope
    w_up = (torch.randn(h, d, device=DEVICE) / d**0.5).to(weight_dtype).requires_grad_()
    w_down = (torch.randn(d, h, device=DEVICE) / h**0.5).to(weight_dtype).requires_grad_()
    return u, w_up, w_down


def _check_against_float64(u, w_up, w_down, tol, variant="persistent", saved="pre", row_scale=None):
    out = leaky_relu2_mlp(u, w_up, w_down, variant, saved, row_scale)
    d_out = torch.randn_like(out)
    inputs = (u, w_up, w_down) + (() if row_scale is None else (row_scale,))
    grads = torch.autograd.grad(out, inputs, d_out)
    # The function computed: the weights as cast to u's dtype, everything else in float64.
    ref_inputs = [t.detach().to(u.dtype).double().requires_grad_() for t in (u, w_up, w_down)]
    if row_scale is not None:
        ref_inputs.append(row_scale.detach().double().requires_grad_())
    ref = leaky_relu2_mlp_reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, d_out.double())
    pre = ref_inputs[0].detach() @ ref_inputs[1].detach().t()
    assert 0.3 < (pre < 0).double().mean() < 0.7  # both slopes of leaky_relu² exercised
    assert out.dtype == u.dtype and out.shape == u.shape
    assert rel_err(out, ref) < tol
    for name, g, g_ref, x in zip(("du", "dW_up", "dW_down", "d row_scale"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert rel_err(g, g_ref) < tol, name


def _row_scale(lead):
    """Per-row scales as a folded RMSNorm makes them (positive, varied)."""
    return (torch.rand(lead, device=DEVICE) + 0.25).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients(dtype):
    # M = 3 * 13 = 39 rows (odd), d = 40 and h = 72: ragged against the 32-blocks of the interpreter
    _check_against_float64(*_inputs((3, 13), 40, 72, dtype), TOL[dtype])


@pytest.mark.parametrize("variant", mlp_module.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_and_tiled_paths(dtype, variant, monkeypatch):
    """up (pre+post epilogue) and d_pre (grad epilogue, B = w_down.t()) on the persistent TMA kernel
    (the default variant) or on the one-tile-per-program kernel ("tiled"); M = 39 rows, ragged
    against the blocks."""
    launches = []
    kernel = gemm_module._gemm_persistent_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(gemm_module, "_gemm_persistent_kernel", Counting())
    _check_against_float64(*_inputs((3, 13), 40, 72, dtype), TOL[dtype], variant)
    assert len(launches) == (2 if variant == "persistent" else 0)  # up and d_pre (dW_up: split-K)


@pytest.mark.parametrize("saved", mlp_module.SAVED)
@pytest.mark.parametrize("variant", mlp_module.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_scale(dtype, variant, saved):
    """The MLP of row_scale * u: the scale in the up GEMM's epilogue, its gradient from the d_pre
    epilogue's row dots; M = 39 rows ragged, h = 96 (whole sign words)."""
    _check_against_float64(*_inputs((3, 13), 40, 96, dtype), TOL[dtype], variant, saved, _row_scale((3, 13)))


@pytest.mark.parametrize("variant", mlp_module.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saving_the_sign_of_pre(dtype, variant):
    """saved="sign": the forward keeps pre's sign bits ((M, h / 32) int32) instead of pre, the backward
    takes |pre| from post; M = 39 and d = 40 ragged, h = 96."""
    u, w_up, w_down = _inputs((3, 13), 40, 96, dtype)
    _check_against_float64(u, w_up, w_down, TOL[dtype], variant, "sign")
    _, kept, post = torch.ops.recycore.leaky_relu2_mlp(u.detach().reshape(39, 40), w_up.detach(), w_down.detach(),
                                                      variant, "sign")
    assert kept.dtype == torch.int32 and kept.shape == (39, 3) and post.shape == (39, 96)


def test_saving_the_sign_needs_whole_words():
    u, w_up, w_down = (t.detach() for t in _inputs((5,), 40, 72, torch.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        leaky_relu2_mlp(u, w_up, w_down, saved="sign")
    with pytest.raises(ValueError, match="saved must be one of"):
        leaky_relu2_mlp(u, w_up, w_down, saved="post")


@pytest.mark.parametrize("seqs", [12, 24, 48])
def test_seed_shapes_get_the_tuned_configs(seqs):
    """At the seed's d and h the tuned configs are selected for every micro-batch the benchmarks and
    training use (12 to 48 sequences of 2048), for each role, both variants; elsewhere the defaults."""
    tokens = seqs * 2048
    for variant in mlp_module.VARIANTS:
        assert mlp_module.configs_for(tokens, 512, 1536, variant) == mlp_module.SEED_CONFIGS[variant]
    configs = mlp_module.configs_for(tokens, 512, 1536)
    assert configs["up"].persistent and configs["d_pre"].persistent and configs["d_pre"].epilogue_subtile
    assert configs["dw_up"].split_k == 11 and not configs["dw_up"].persistent
    assert mlp_module.configs_for(tokens, 512, 1536, interpreter=True) != mlp_module.SEED_CONFIGS["persistent"]
    assert mlp_module.configs_for(tokens, 256, 768) != mlp_module.SEED_CONFIGS["persistent"]


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        mlp_module.configs_for(1024, 512, 1536, "fastest")


def test_bf16_weights_give_bf16_grads():
    _check_against_float64(*_inputs((29,), 48, 80, torch.bfloat16, torch.bfloat16), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("saved", mlp_module.SAVED)
def test_opcheck(dtype, saved):
    u, w_up, w_down = _inputs((21,), 40, 96, dtype)
    for row_scale in (None, _row_scale((21,))):
        torch.library.opcheck(torch.ops.recycore.leaky_relu2_mlp, (u, w_up, w_down, "persistent", saved, row_scale))
        scale = None if row_scale is None else row_scale.detach()
        _, kept, post = torch.ops.recycore.leaky_relu2_mlp(u.detach(), w_up.detach(), w_down.detach(), "persistent",
                                                          saved, scale)
        d_out = torch.randn(21, 40, device=DEVICE, dtype=dtype)
        torch.library.opcheck(torch.ops.recycore.leaky_relu2_mlp_backward,
                              (d_out, u.detach(), w_up.detach(), w_down.detach(), kept, post, "persistent", saved,
                               scale))


def test_torch_compile_fullgraph():
    u, w_up, w_down = _inputs((2, 17), 40, 72, torch.float32)
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # no C++ toolchain needed on CPU
    compiled = torch.compile(lambda *x: leaky_relu2_mlp(*x).sum(), fullgraph=True, backend=backend)
    loss = compiled(u, w_up, w_down)
    grads = torch.autograd.grad(loss, (u, w_up, w_down))
    ref_loss = leaky_relu2_mlp_reference(u, w_up, w_down).sum()
    ref_grads = torch.autograd.grad(ref_loss, (u, w_up, w_down))
    assert rel_err(loss, ref_loss) < 1e-5
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) < 1e-5


def test_bad_inputs_raise_clear_errors():
    u, w_up, w_down = (t.detach() for t in _inputs((5,), 40, 72, torch.float32))
    with pytest.raises(ValueError, match="does not match w_up"):
        leaky_relu2_mlp(u[:, :39].contiguous(), w_up, w_down)
    with pytest.raises(ValueError, match="w_down must be"):
        leaky_relu2_mlp(u, w_up, w_down.t().contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        leaky_relu2_mlp(u, w_up, w_down.t().contiguous().t())
    with pytest.raises(TypeError, match="u must be one of"):
        leaky_relu2_mlp(u.to(torch.int64), w_up, w_down)
    with pytest.raises(ValueError, match="row_scale must have"):
        leaky_relu2_mlp(u, w_up, w_down, row_scale=torch.ones(4, device=DEVICE))
    with pytest.raises(TypeError, match="row_scale must be one of"):
        leaky_relu2_mlp(u, w_up, w_down, row_scale=torch.ones(5, device=DEVICE, dtype=torch.float64))
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="other inputs are on"):
            leaky_relu2_mlp(u, w_up.cpu(), w_down)


@requires_cuda
@pytest.mark.parametrize("saved", mlp_module.SAVED)
def test_seed_shapes_bf16(saved):
    """M = 48 x 2048 = 98,304 rows, d = 512, h = 1536: the configs the seed runs (split-K included), with
    the row scales of the model's folded RMSNorm."""
    _check_against_float64(*_inputs((48, 2048), 512, 1536, torch.bfloat16), TOL[torch.bfloat16], saved=saved,
                           row_scale=_row_scale((48, 2048)))
