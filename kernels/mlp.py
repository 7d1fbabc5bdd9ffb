"""K1: the fused LeakyReLU² MLP, out = leaky_relu(u W_up^T, 0.5)^2 W_down^T, forward and backward.

Everything runs through the shared GEMM template (gemm.py); only `pre = u W_up^T` (M, h) is saved
for backward, and `post = leaky_relu(pre, 0.5)^2` never touches memory: it is recomputed in registers
by the prologue of the two GEMMs that read it.

Forward (2 GEMMs):  pre = u @ W_up^T                [epilogue LEAKY_RELU2, stores pre only]
                    out = post(pre) @ W_down^T      [A prologue LEAKY_RELU2]
Backward (4 GEMMs): d_pre = (d_out @ W_down) * (pre > 0 ? 2 pre : 0.5 pre)  [epilogue LEAKY_RELU2_GRAD]
                    dW_down = d_out^T @ post(pre)   [B prologue, split-K, fp32 partials]
                    du = d_pre @ W_up
                    dW_up = d_pre^T @ u             [split-K, fp32 partials]
Weights may be fp32 masters: they are cast to u's dtype for the GEMMs (as F.linear(x, w.to(x.dtype))
does), and their gradients are written in the weights' dtype straight from the fp32 split-K sums.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from recycore.kernels._common import INTERPRET, check_tensor
from recycore.kernels.gemm import (
    EPILOGUE_LEAKY_RELU2,
    EPILOGUE_LEAKY_RELU2_GRAD,
    GemmConfig,
    default_config,
    default_split_k,
    gemm,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Configs measured on the H200 at the seed's shapes (d = 512, h = 1536, M = 98,304 rows;
# benchmarks/NOTES_K1_K3.md), per GEMM of the MLP. Other shapes use gemm.default_config.
SEED_D, SEED_H = 512, 1536
SEED_CONFIGS = {
    "up": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    "down": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    "d_pre": GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
    "du": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
    "dw_down": GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
    "dw_up": GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
}


def _config(role, M, N, K, d, h):
    if not INTERPRET and (d, h) == (SEED_D, SEED_H) and min(M, K) >= 8192:
        return SEED_CONFIGS[role]
    return default_config(M, N, K)


def _weight_grad(a, b, out, role, d, h, **prologue):
    """out = a @ b^T for a weight gradient (K = tokens): split-K fills the GPU."""
    M, K = a.shape
    N = b.shape[0]
    config = _config(role, M, N, K, d, h)
    split_k = config.split_k or default_split_k(M, N, K, config, a.device)
    gemm(a, b, out=out, config=config, split_k=split_k, **prologue)
    return out


@torch.library.custom_op("recycore::leaky_relu2_mlp", mutates_args=())
def _mlp_forward(u: Tensor, w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor]:
    """u (M, d); w_up (h, d), w_down (d, h) in any float dtype -> (out (M, d), pre (M, h))."""
    M, d = u.shape
    h = w_up.shape[0]
    pre = torch.empty((M, h), device=u.device, dtype=u.dtype)
    out = torch.empty((M, d), device=u.device, dtype=u.dtype)
    gemm(u, w_up.to(u.dtype), pre=pre, epilogue=EPILOGUE_LEAKY_RELU2, config=_config("up", M, h, d, d, h))
    gemm(pre, w_down.to(u.dtype), out=out, a_leaky=True, config=_config("down", M, d, h, d, h))
    return out, pre


@_mlp_forward.register_fake
def _(u, w_up, w_down):
    return u.new_empty((u.shape[0], w_down.shape[0])), u.new_empty((u.shape[0], w_up.shape[0]))


@torch.library.custom_op("recycore::leaky_relu2_mlp_backward", mutates_args=())
def _mlp_backward(d_out: Tensor, u: Tensor, w_up: Tensor, w_down: Tensor, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (du, dW_up, dW_down) of the MLP, each in its input's dtype."""
    M, d = u.shape
    h = w_up.shape[0]
    d_pre = torch.empty_like(pre)
    gemm(d_out, w_down.to(u.dtype).t(), out=d_pre, pre=pre, epilogue=EPILOGUE_LEAKY_RELU2_GRAD,
         config=_config("d_pre", M, h, d, d, h))
    dw_down = _weight_grad(d_out.t(), pre.t(), torch.empty_like(w_down), "dw_down", d, h, b_leaky=True)
    du = torch.empty_like(u)
    gemm(d_pre, w_up.to(u.dtype).t(), out=du, config=_config("du", M, d, h, d, h))
    dw_up = _weight_grad(d_pre.t(), u.t(), torch.empty_like(w_up), "dw_up", d, h)
    return du, dw_up, dw_down


@_mlp_backward.register_fake
def _(d_out, u, w_up, w_down, pre):
    return torch.empty_like(u), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output):
    u, w_up, w_down = inputs
    ctx.save_for_backward(u, w_up, w_down, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, d_out, _d_pre):
    u, w_up, w_down, pre = ctx.saved_tensors
    return torch.ops.recycore.leaky_relu2_mlp_backward(d_out, u, w_up, w_down, pre)


_mlp_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(u, w_up, w_down):
    check_tensor(u, "u", dtypes=_FLOAT_DTYPES, contiguous=True)
    check_tensor(w_up, "w_up", ndim=2, dtypes=_FLOAT_DTYPES, device=u.device, contiguous=True)
    check_tensor(w_down, "w_down", ndim=2, dtypes=_FLOAT_DTYPES, device=u.device, contiguous=True)
    if u.ndim < 1 or u.shape[-1] != w_up.shape[1]:
        raise ValueError(f"u (..., d) = {tuple(u.shape)} does not match w_up (h, d) = {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (w_up.shape[1], w_up.shape[0]):
        raise ValueError(f"w_down must be (d, h) = {(w_up.shape[1], w_up.shape[0])}, got {tuple(w_down.shape)}")


def leaky_relu2_mlp(u: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """leaky_relu(u W_up^T, 0.5)^2 W_down^T for u (..., d), w_up (h, d), w_down (d, h); differentiable."""
    _check_inputs(u, w_up, w_down)
    out, _ = torch.ops.recycore.leaky_relu2_mlp(u.reshape(-1, u.shape[-1]), w_up, w_down)
    return out.reshape(u.shape)


def leaky_relu2_mlp_reference(u: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Plain torch: F.leaky_relu(u W_up^T, 0.5).square() W_down^T, weights cast to u's dtype."""
    pre = F.linear(u, w_up.to(u.dtype))
    return F.linear(F.leaky_relu(pre, negative_slope=0.5).square(), w_down.to(u.dtype))
