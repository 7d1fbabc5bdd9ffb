"""K1: the fused LeakyReLU² MLP, out = leaky_relu(u W_up^T, 0.5)^2 W_down^T, forward and backward.

The two GEMMs with an elementwise neighbour run on the shared GEMM template (gemm.py) with the
activation fused in registers; the plain GEMMs run where they measured fastest on the H200
(benchmarks/README.md: cuBLAS, except dW_up whose split-K Triton GEMM writes the fp32 gradient
directly):

Forward:  pre, post = u @ W_up^T, leaky_relu(pre, 0.5)^2   [template, epilogue LEAKY_RELU2: one pass]
          out = post @ W_down^T                             [cuBLAS]
Backward: d_pre = (d_out @ W_down) * (pre > 0 ? 2 pre : 0.5 pre)  [template, epilogue LEAKY_RELU2_GRAD]
          dW_down = d_out^T @ post                          [cuBLAS]
          du = d_pre @ W_up                                 [cuBLAS]
          dW_up = d_pre^T @ u                               [template, split-K, fp32 partials]
`pre` and `post` are both saved: recomputing post from pre in the prologue of the GEMMs that read
it measured slower than writing it once in the up GEMM's epilogue (benchmarks/README.md). With
saved="sign" the up GEMM writes, instead of pre, its sign (one bit per value: 1/16 of pre's bytes,
and that much less memory held for backward), and d_pre's epilogue takes |pre| from post
(post = pre^2 or pre^2 / 4): d_pre = d_post * (pre > 0 ? 2 sqrt(post) : -sqrt(post)).
up and d_pre run on the template's persistent TMA variant (gemm.py: each tile's epilogue overlaps
the next tile's loads), or with variant="tiled" on the one-tile-per-program kernel; the configs of
each variant are tuned for the seed's shapes (benchmarks/README.md) and chosen by `configs_for`.
Weights may be fp32 masters: they are cast to u's dtype for the GEMMs (as F.linear(x, w.to(x.dtype))
does) and their gradients are returned in the weights' dtype.
With row_scale (M,) fp32 the MLP is that of row_scale * u, the scale applied to the up GEMM's rows in
its epilogue (M_SCALE): (s u) W_up^T = s (u W_up^T). So a caller folds its input RMSNorm in, u =
rms(x) * c -> x with s = c / rms(x), and the normed input is never written nor kept for backward.
Backward: the d_pre epilogue scales its rows by s too (d(u W_up^T) = s d_pre, what du and dW_up take),
and hands back each row's sum of s d_pre * pre (ROW_DOT), so d s = sum_n d_pre (u W_up^T) = that / s^2.
"""
import dataclasses
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from recycore.kernels._common import check_tensor, on_interpreter
from recycore.kernels.gemm import (
    EPILOGUE_LEAKY_RELU2,
    EPILOGUE_LEAKY_RELU2_GRAD,
    GemmConfig,
    default_config,
    default_split_k,
    gemm,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Configs tuned on the H200 at the seed's shapes (d = 512, h = 1536, many tokens; benchmarks/README.md),
# per template GEMM of the MLP and variant. up and d_pre read K = d = 512: short main loops, so the
# persistent kernel overlaps each tile's large epilogue stores with the next tile's loads. d_pre also
# stages the `pre` it reads, so it fits shared memory only with the epilogue in two halves. dW_up
# reduces over the tokens (K = M): split-K.
SEED_D, SEED_H = 512, 1536
SEED_MIN_TOKENS = 8192  # below this the seed configs' tiles leave most SMs idle: the default configs
SEED_CONFIGS = {
    "persistent": {
        "up": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, persistent=True),
        "d_pre": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, persistent=True,
                            epilogue_subtile=True),
        "dw_up": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, split_k=11),
    },
    "tiled": {
        "up": GemmConfig(256, 128, 64, group_m=8, num_warps=8, num_stages=3),
        "d_pre": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
        "dw_up": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, split_k=11),
    },
}
VARIANTS = tuple(SEED_CONFIGS)
PERSISTENT_ROLES = ("up", "d_pre")
SAVED = ("pre", "sign")  # what the forward keeps for the activation's gradient


@lru_cache(maxsize=1024)
def configs_for(tokens: int, d: int, h: int, variant: str = "persistent", interpreter: bool = False) -> dict:
    """role -> GemmConfig for an MLP of `tokens` rows, width d and hidden h: the tuned seed configs at
    the seed's d and h, else the template's defaults (persistent for up and d_pre unless "tiled").
    Cached (asked on every launch): the returned dict is shared, read it only."""
    if variant not in SEED_CONFIGS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not interpreter and (d, h) == (SEED_D, SEED_H) and tokens >= SEED_MIN_TOKENS:
        return SEED_CONFIGS[variant]
    shapes = {"up": (tokens, h, d), "d_pre": (tokens, h, d), "dw_up": (h, d, tokens)}
    configs = {role: default_config(*mnk, interpreter=interpreter) for role, mnk in shapes.items()}
    if variant == "persistent":
        for role in PERSISTENT_ROLES:  # d_pre stages its `pre` tile too: halves keep the config in SMEM
            configs[role] = dataclasses.replace(configs[role], persistent=True, epilogue_subtile=role == "d_pre")
    return configs


def _saved_like(u, h, saved):
    """The tensor the forward keeps for the activation's gradient: pre (M, h), or its sign words."""
    if saved == "sign":
        return torch.empty((u.shape[0], h // 32), device=u.device, dtype=torch.int32)
    return torch.empty((u.shape[0], h), device=u.device, dtype=u.dtype)


@torch.library.custom_op("recycore::leaky_relu2_mlp", mutates_args=())
def _mlp_forward(u: Tensor, w_up: Tensor, w_down: Tensor, variant: str, saved: str = "pre",
                 row_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """u (M, d); w_up (h, d), w_down (d, h) in any float dtype; row_scale (M,) fp32 or None -> (out (M, d),
    pre (M, h) or its sign words (M, h / 32) (saved), post (M, h))."""
    M, d = u.shape
    h = w_up.shape[0]
    kept = _saved_like(u, h, saved)
    post = torch.empty((M, h), device=u.device, dtype=u.dtype)
    config = configs_for(M, d, h, variant, on_interpreter(u))["up"]
    gemm(u, w_up.to(u.dtype), pre=kept, post=post, epilogue=EPILOGUE_LEAKY_RELU2, config=config,
         pre_sign=saved == "sign", m_scale=row_scale)
    return torch.mm(post, w_down.to(u.dtype).t()), kept, post


@_mlp_forward.register_fake
def _(u, w_up, w_down, variant, saved="pre", row_scale=None):
    M, h = u.shape[0], w_up.shape[0]
    return u.new_empty((M, w_down.shape[0])), _saved_like(u, h, saved), u.new_empty((M, h))


@torch.library.custom_op("recycore::leaky_relu2_mlp_backward", mutates_args=())
def _mlp_backward(d_out: Tensor, u: Tensor, w_up: Tensor, w_down: Tensor, kept: Tensor, post: Tensor, variant: str,
                  saved: str = "pre", row_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, dW_up, dW_down, d row_scale) of the MLP, each in its input's dtype (kept: the
    forward's pre or sign words, as `saved` says; d row_scale empty without one)."""
    M, d = u.shape
    h = w_up.shape[0]
    configs = configs_for(M, d, h, variant, on_interpreter(u))
    d_pre = torch.empty_like(post)
    sign = saved == "sign"
    row_dot = None if row_scale is None else torch.empty(M, device=u.device, dtype=torch.float32)
    gemm(d_out, w_down.to(u.dtype).t(), out=d_pre, pre=kept, post=post if sign else None,
         epilogue=EPILOGUE_LEAKY_RELU2_GRAD, config=configs["d_pre"], pre_sign=sign, m_scale=row_scale,
         row_dot=row_dot)
    dw_down = torch.mm(d_out.t(), post).to(w_down.dtype)
    du = torch.mm(d_pre, w_up.to(u.dtype))
    dw_up = torch.empty_like(w_up)
    config = configs["dw_up"]
    split_k = config.split_k or default_split_k(h, d, M, config, u.device)
    gemm(d_pre.t(), u.t(), out=dw_up, config=config, split_k=split_k)
    d_row_scale = u.new_empty(0, dtype=torch.float32) if row_scale is None else row_dot / row_scale.square()
    return du, dw_up, dw_down, d_row_scale


@_mlp_backward.register_fake
def _(d_out, u, w_up, w_down, kept, post, variant, saved="pre", row_scale=None):
    d_row_scale = u.new_empty(0, dtype=torch.float32) if row_scale is None else torch.empty_like(row_scale)
    return torch.empty_like(u), torch.empty_like(w_up), torch.empty_like(w_down), d_row_scale


def _setup_context(ctx, inputs, output):
    u, w_up, w_down, variant, saved, row_scale = inputs
    _, kept, post = output
    ctx.save_for_backward(u, w_up, w_down, kept, post, row_scale)
    ctx.variant, ctx.saved = variant, saved
    ctx.mark_non_differentiable(kept, post)
    ctx.set_materialize_grads(False)  # no (M, h) zero-filled gradients for pre and post


def _backward(ctx, d_out, _d_kept, _d_post):
    u, w_up, w_down, kept, post, row_scale = ctx.saved_tensors
    du, dw_up, dw_down, d_row_scale = torch.ops.recycore.leaky_relu2_mlp_backward(
        d_out, u, w_up, w_down, kept, post, ctx.variant, ctx.saved, row_scale)
    return du, dw_up, dw_down, None, None, None if row_scale is None else d_row_scale


_mlp_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(u, w_up, w_down):
    check_tensor(u, "u", dtypes=_FLOAT_DTYPES, contiguous=True)
    check_tensor(w_up, "w_up", ndim=2, dtypes=_FLOAT_DTYPES, device=u.device, contiguous=True)
    check_tensor(w_down, "w_down", ndim=2, dtypes=_FLOAT_DTYPES, device=u.device, contiguous=True)
    if u.ndim < 1 or u.shape[-1] != w_up.shape[1]:
        raise ValueError(f"u (..., d) = {tuple(u.shape)} does not match w_up (h, d) = {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (w_up.shape[1], w_up.shape[0]):
        raise ValueError(f"w_down must be (d, h) = {(w_up.shape[1], w_up.shape[0])}, got {tuple(w_down.shape)}")


def leaky_relu2_mlp(u: Tensor, w_up: Tensor, w_down: Tensor, variant: str = "persistent",
                    saved: str = "pre", row_scale: Tensor | None = None) -> Tensor:
    """leaky_relu(u W_up^T, 0.5)^2 W_down^T for u (..., d), w_up (h, d), w_down (d, h); differentiable.
    variant: "persistent" or "tiled" template GEMMs for up and d_pre (see `configs_for`); saved: what
    the forward keeps for the activation's gradient, "pre" or "sign" (h a multiple of 32; module doc);
    row_scale (...) fp32: the MLP of row_scale * u (applied in the up GEMM's epilogue; module doc)."""
    _check_inputs(u, w_up, w_down)
    if row_scale is not None:
        check_tensor(row_scale, "row_scale", dtypes=(torch.float32,), device=u.device)
        if row_scale.shape != u.shape[:-1]:
            raise ValueError(f"row_scale must have u's leading shape {tuple(u.shape[:-1])}, got "
                             f"{tuple(row_scale.shape)}")
        row_scale = row_scale.reshape(-1).contiguous()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if saved not in SAVED:
        raise ValueError(f"saved must be one of {SAVED}, got {saved!r}")
    if saved == "sign" and w_up.shape[0] % 32:
        raise ValueError(f"saved='sign' packs 32 hidden units per word: h = {w_up.shape[0]} is not a multiple of 32")
    out, _, _ = torch.ops.recycore.leaky_relu2_mlp(u.reshape(-1, u.shape[-1]), w_up, w_down, variant, saved,
                                                   row_scale)
    return out.reshape(u.shape)


def leaky_relu2_mlp_reference(u: Tensor, w_up: Tensor, w_down: Tensor, row_scale: Tensor | None = None) -> Tensor:
    """Plain torch: F.leaky_relu(u W_up^T, 0.5).square() W_down^T, weights cast to u's dtype; with row_scale
    (...) the product u W_up^T scaled per row (in fp32, rounded to u's dtype)."""
    pre = F.linear(u, w_up.to(u.dtype))
    if row_scale is not None:
        pre = (pre.float() * row_scale[..., None]).to(u.dtype)
    return F.linear(F.leaky_relu(pre, negative_slope=0.5).square(), w_down.to(u.dtype))
