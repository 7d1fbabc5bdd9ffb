"""K4: the model's head fused, forward and backward: final RMSNorm, tied projection, logit soft-cap
and cross-entropy, so that the (N, V) logits never exist in memory.

    h = rms_norm(x)  (no weight, eps = fp32 eps as F.rms_norm's default)
    z = h @ W^T      (the tied embedding, V x d)
    s = cap * tanh(z / cap)
    loss = mean_i [logsumexp(s_i) - s_i[t_i]]   (targets == -100 ignored, as F.cross_entropy)

Rows are processed in chunks of `chunk_rows` (a shape-derived default, `default_chunk_rows`), each
chunk with buffers of its own size only:
    1. `_rms_norm_fwd_kernel`: h (C, d) in the GEMM dtype and rstd (C,) fp32 from x (C, d).
    2. z = h @ W^T by cuBLAS, written in fp32 (`torch.mm(..., out_dtype=torch.float32)`, fp32
       accumulation kept; `fp32_gemm_out=False` writes z in the GEMM dtype instead).
    3. `_softcap_ce_kernel`: reads each row of z once (V = 1024 is one register tile; larger V loops
       over tiles with an online logsumexp and a second pass), soft-caps in fp32, writes the row's
       loss and dz = (softmax(s) - onehot(t)) * (1 - tanh^2) / n_valid in the GEMM dtype.
    4. dh = dz @ W (cuBLAS, fp32 out) and `_rms_norm_bwd_kernel` -> dx rows in x's dtype.
    5. dW += dz^T @ h (cuBLAS, fp32 out, summed into an fp32 (V, d) accumulator).
The gradients are computed during the forward (the loss is the graph's last op, as Liger-Kernel's
fused linear cross-entropy does): the backward only multiplies dx and dW by the incoming 0-dim
grad_output on the device (`_scale_kernel`, fp32 math), with no host sync.

GEMM dtype: the autocast dtype when autocast is on for x's device (as F.linear under autocast),
else x's dtype if it equals the weight's, else the narrower of the two. The weight is cast to it
(its gradient comes back in the weight's own dtype, accumulated in fp32).

Numerics against the model's reference chain (`softcap_cross_entropy_reference`): with bf16 GEMM
operands both round h to bf16 identically, but the reference also rounds z to bf16 (relative
2^-9, up to ~0.03 absolute near the cap) and evaluates z/cap, tanh and *cap each in bf16, whereas
here z stays fp32 from the cuBLAS accumulator and the soft-cap, softmax and logsumexp run in fp32.
So the fused loss is closer to the exact value than the reference (tests compare both to a float64
evaluation); the two losses differ by ~1e-4..1e-3 relative. dz is rounded to bf16 for the backward GEMMs, as the
reference's autograd rounds its bf16 logits' gradient.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100  # F.cross_entropy's default
RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for fp32/bf16/fp16 inputs (opmath eps)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Chunk rule: ~2^23 logits per chunk (8192 rows at V = 1024: 32 MB of fp32 logits + 16 MB of bf16
# dz, within the H200's L2), rows balanced over the chunks, a multiple of 128 rows.
CHUNK_LOGITS = 1 << 23
CHUNK_ALIGN = 128


def default_chunk_rows(n_rows: int, vocab: int, target_logits: int = CHUNK_LOGITS) -> int:
    """Rows per chunk: about target_logits / vocab, balanced so the last chunk is not a sliver."""
    rows = max(CHUNK_ALIGN, target_logits // vocab)
    chunks = triton.cdiv(n_rows, rows)
    return min(n_rows, triton.cdiv(triton.cdiv(n_rows, chunks), CHUNK_ALIGN) * CHUNK_ALIGN)


def _configs(device, vocab, dim, block_v):
    """(ce_block_m, block_v, ce_warps, norm_block_m, norm_warps) for this call. Under the CPU
    interpreter each program costs ~5 ms whatever its size: few, tall programs there."""
    block_v = block_v or min(triton.next_power_of_2(vocab), 4096)
    if device.type == "cpu":
        return 64, block_v, 4, 64, 4
    block_d = triton.next_power_of_2(dim)
    # ~4K fp32 elements per program: 4 rows of V = 1024, 8 rows of d = 512
    return max(1, 4096 // block_v), block_v, 8, max(1, 4096 // block_d), 4


# ----------------------------------------------------------------------------------------------
# Kernels. All arithmetic is fp32 after the loads (the interpreter's bf16 arithmetic bugs do not
# apply). UPCAST (true only for CPU tensors, i.e. under the interpreter): the interpreter truncates
# fp32->bf16 stores, which biases h and dz by ~2^-9 in one direction; there they are rounded to
# nearest-even by hand first, so the CPU tests see the GPU's rounding.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cast_for(v, dst_ptr, UPCAST: tl.constexpr):
    """v (fp32) in dst_ptr's element type, rounded to nearest-even."""
    if UPCAST:
        if dst_ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)  # exactly representable: the truncating cast is exact
    return v.to(dst_ptr.dtype.element_ty)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, h_ptr, rstd_ptr, n_rows, dim, stride_x, stride_h, eps,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < dim)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / dim + eps)
    h = x * rstd[:, None]
    tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], _cast_for(h, h_ptr, UPCAST), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, dh_ptr, rstd_ptr, dx_ptr, n_rows, dim, stride_x, stride_dh, stride_dx,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dx = rstd * (dh - xhat * mean(dh * xhat)), xhat = x * rstd (the unrounded normalised row)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < dim)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    xhat = x * rstd[:, None]
    c = tl.sum(dh * xhat, axis=1) / dim
    dx = (dh - xhat * c[:, None]) * rstd[:, None]
    tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], _cast_for(dx, dx_ptr, UPCAST), mask=mask)


@triton.jit
def _softcap(z, inv_cap, cap):
    """(cap * tanh(z / cap), 1 - tanh^2) in fp32 by exp2 (no libdevice: the interpreter lacks it).
    With e = exp(-2|u|) in (0, 1]: tanh|u| = (1 - e)/(1 + e), 1 - tanh^2 = 4e/(1 + e)^2, neither
    overflows nor cancels near the cap."""
    u = z * inv_cap
    e = tl.exp2((-2.0 * 1.4426950408889634) * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(u < 0, -th, th)
    one_plus = 1.0 + e
    return cap * th, 4.0 * e / (one_plus * one_plus)


@triton.jit
def _softcap_ce_kernel(z_ptr, dz_ptr, targets_ptr, loss_ptr, count_ptr, n_rows, vocab, stride_z, stride_dz,
                       cap, inv_cap, ignore_index,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, ONE_TILE: tl.constexpr,
                       COMPUTE_GRAD: tl.constexpr, UPCAST: tl.constexpr):
    """Per row: loss = logsumexp(s) - s[t] (0 for ignored rows); with COMPUTE_GRAD, in dz_ptr:
    (softmax(s) - onehot(t)) * (1 - tanh^2) / n_valid, n_valid read from count_ptr."""
    LOG2E_C: tl.constexpr = 1.4426950408889634
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    cols = tl.arange(0, BLOCK_V)
    z_row = z_ptr + rows64[:, None] * stride_z
    # Only columns are masked to -inf: padding rows load 0 and stay finite (no inf - inf).
    # ONE_TILE (BLOCK_V >= vocab) is a constexpr: the tiles it keeps in registers (p, dtanh) must be
    # visible to the gradient below, which only a compile-time branch allows
    if ONE_TILE:  # one tile: the row is read once and stays in registers
        col_mask = cols < vocab
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(z_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s, dtanh = _softcap(z, inv_cap, cap)
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp2((s - m[:, None]) * LOG2E_C)
        l = tl.sum(p, axis=1)
    else:  # pass 1: online max / sum over the tiles
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            col_mask = (v0 + cols) < vocab
            mask = row_mask[:, None] & col_mask[None, :]
            z = tl.load(z_row + v0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s, _ = _softcap(z, inv_cap, cap)
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp2((m - m_new) * LOG2E_C) + tl.sum(tl.exp2((s - m_new[:, None]) * LOG2E_C), axis=1)
            m = m_new
    lse = m + tl.log2(l) * 0.6931471805599453
    # the target's logit, gathered (masked: an ignored or out-of-range target reads nothing)
    in_range = valid & (tgt >= 0) & (tgt < vocab)
    z_t = tl.load(z_ptr + rows64 * stride_z + tgt, mask=in_range, other=0.0).to(tl.float32)
    s_t, _ = _softcap(z_t, inv_cap, cap)
    tl.store(loss_ptr + rows, tl.where(valid, lse - s_t, 0.0), mask=row_mask)
    if COMPUTE_GRAD:
        inv_n = 1.0 / tl.load(count_ptr).to(tl.float32)
        row_scale = tl.where(valid, inv_n, 0.0)
        inv_l = 1.0 / l
        dz_row = dz_ptr + rows64[:, None] * stride_dz
        if ONE_TILE:
            g = (p * inv_l[:, None] - (cols[None, :] == tgt[:, None]).to(tl.float32)) * dtanh * row_scale[:, None]
            tl.store(dz_row + cols[None, :], _cast_for(g, dz_ptr, UPCAST), mask=mask)
        else:  # pass 2: re-read each tile (L2-resident at the default chunk size)
            for v0 in range(0, vocab, BLOCK_V):
                col_mask = (v0 + cols) < vocab
                mask = row_mask[:, None] & col_mask[None, :]
                z = tl.load(z_row + v0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                s, dtanh = _softcap(z, inv_cap, cap)
                p = tl.exp2((s - m[:, None]) * LOG2E_C) * inv_l[:, None]
                onehot = ((v0 + cols)[None, :] == tgt[:, None]).to(tl.float32)
                g = (p - onehot) * dtanh * row_scale[:, None]
                tl.store(dz_row + v0 + cols[None, :], _cast_for(g, dz_ptr, UPCAST), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, scale_ptr, dst_ptr, n, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """dst = src * scale in fp32 (scale a 0-dim device tensor: no host sync, no bf16 rounding of it)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr).to(tl.float32)
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, _cast_for(v * scale, dst_ptr, UPCAST), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b with fp32 accumulation. An fp32 `out` from bf16/fp16 operands uses cuBLAS's fp32
    output (torch >= 2.8, CUDA only); the CPU has no such kernel, there the upcast operands give the
    same products (exact in fp32) summed in fp32."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif a.device.type == "cuda":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _head_forward(x: Tensor, weight: Tensor, targets: Tensor, cap: float, gemm_dtype: torch.dtype,
                  chunk_rows: int, block_v: int, fp32_gemm_out: bool, needs_dx: bool, needs_dw: bool):
    """Runs the chunks. Returns (row losses (N,) fp32, n_valid (0-dim int64), dx (N, d) in x's dtype
    or None, dW (V, d) fp32 or None); gradients are already divided by n_valid."""
    N, d = x.shape
    V = weight.shape[0]
    dev = x.device
    chunk = chunk_rows if chunk_rows > 0 else default_chunk_rows(N, V)
    chunk = max(1, min(chunk, N))
    ce_block_m, block_v, ce_warps, norm_block_m, norm_warps = _configs(dev, V, d, block_v)
    block_d = triton.next_power_of_2(d)
    out_dtype = torch.float32 if fp32_gemm_out else gemm_dtype
    compute_grad = needs_dx or needs_dw
    upcast = dev.type == "cpu"  # a CPU tensor can only be run by the interpreter

    w = weight.to(gemm_dtype).contiguous()
    losses = torch.empty(N, device=dev, dtype=torch.float32)
    count = (targets != IGNORE_INDEX).sum()
    dx = torch.empty_like(x) if needs_dx else None
    dw = torch.empty((V, d), device=dev, dtype=torch.float32) if needs_dw else None
    # per-chunk buffers, reused by every chunk (stream order keeps them apart)
    h_buf = torch.empty((chunk, d), device=dev, dtype=gemm_dtype)
    rstd_buf = torch.empty(chunk, device=dev, dtype=torch.float32)
    z_buf = torch.empty((chunk, V), device=dev, dtype=out_dtype)
    dz_buf = torch.empty((chunk, V), device=dev, dtype=gemm_dtype) if compute_grad else z_buf
    dh_buf = torch.empty((chunk, d), device=dev, dtype=out_dtype) if needs_dx else None
    direct_dw = out_dtype == torch.float32  # the first chunk's partial lands in dw itself
    dw_part = (torch.empty((V, d), device=dev, dtype=out_dtype)
               if needs_dw and (N > chunk or not direct_dw) else None)

    for start in range(0, N, chunk):
        rows = min(chunk, N - start)
        xc, h, rstd = x[start:start + rows], h_buf[:rows], rstd_buf[:rows]
        norm_grid = (triton.cdiv(rows, norm_block_m),)
        _rms_norm_fwd_kernel[norm_grid](xc, h, rstd, rows, d, xc.stride(0), h.stride(0), RMS_EPS,
                                        BLOCK_M=norm_block_m, BLOCK_D=block_d, UPCAST=upcast, num_warps=norm_warps)
        z, dz = z_buf[:rows], dz_buf[:rows]
        _mm_into(h, w.t(), z)
        _softcap_ce_kernel[(triton.cdiv(rows, ce_block_m),)](
            z, dz, targets[start:start + rows], losses[start:start + rows], count, rows, V, z.stride(0),
            dz.stride(0), float(cap), 1.0 / float(cap), IGNORE_INDEX,
            BLOCK_M=ce_block_m, BLOCK_V=block_v, ONE_TILE=block_v >= V, COMPUTE_GRAD=compute_grad, UPCAST=upcast,
            num_warps=ce_warps)
        if needs_dx:
            dh = dh_buf[:rows]
            _mm_into(dz, w, dh)
            dxc = dx[start:start + rows]
            _rms_norm_bwd_kernel[norm_grid](xc, dh, rstd, dxc, rows, d, xc.stride(0), dh.stride(0),
                                            dxc.stride(0), BLOCK_M=norm_block_m, BLOCK_D=block_d,
                                            UPCAST=upcast, num_warps=norm_warps)
        if needs_dw:
            if start == 0 and direct_dw:
                _mm_into(dz.t(), h, dw)
            else:
                _mm_into(dz.t(), h, dw_part)
                if start == 0:
                    dw.copy_(dw_part)
                else:
                    dw.add_(dw_part)
    return losses, count, dx, dw


def _scale(src: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty(src.shape, device=src.device, dtype=dtype)
    n = src.numel()
    if n == 0:  # a gradient that was not asked for
        return out
    block = 4096 if src.device.type == "cpu" else 1024
    _scale_kernel[(triton.cdiv(n, block),)](src, scale, out, n, BLOCK=block, UPCAST=src.device.type == "cpu",
                                             num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("recycore::softcap_cross_entropy", mutates_args=())
def _softcap_ce_op(x: Tensor, weight: Tensor, targets: Tensor, cap: float, gemm_dtype: torch.dtype,
                   chunk_rows: int, block_v: int, fp32_gemm_out: bool, needs_dx: bool,
                   needs_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, d), weight (V, d), targets (N,) int64 -> (mean loss (0-dim fp32), dx (N, d) in x's dtype
    or empty, dW (V, d) fp32 or empty): the gradients of the mean loss, made during the forward."""
    losses, count, dx, dw = _head_forward(x, weight, targets, cap, gemm_dtype, chunk_rows, block_v,
                                          fp32_gemm_out, needs_dx, needs_dw)
    loss = losses.sum() / count
    dx = dx if dx is not None else x.new_empty(0)
    dw = dw if dw is not None else x.new_empty(0, dtype=torch.float32)
    return loss, dx, dw


@_softcap_ce_op.register_fake
def _(x, weight, targets, cap, gemm_dtype, chunk_rows, block_v, fp32_gemm_out, needs_dx, needs_dw):
    loss = x.new_empty((), dtype=torch.float32)
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dw = x.new_empty(weight.shape, dtype=torch.float32) if needs_dw else x.new_empty(0, dtype=torch.float32)
    return loss, dx, dw


@torch.library.custom_op("recycore::softcap_cross_entropy_backward", mutates_args=())
def _softcap_ce_backward_op(grad_loss: Tensor, dx: Tensor, dw: Tensor, x_dtype: torch.dtype,
                            w_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(grad_loss * dx in x_dtype, grad_loss * dw in w_dtype), fp32 products, grad_loss on device."""
    return _scale(dx, grad_loss, x_dtype), _scale(dw, grad_loss, w_dtype)


@_softcap_ce_backward_op.register_fake
def _(grad_loss, dx, dw, x_dtype, w_dtype):
    return dx.new_empty(dx.shape, dtype=x_dtype), dw.new_empty(dw.shape, dtype=w_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, _targets, _cap, _gemm_dtype, _chunk, _bv, _fp32, needs_dx, needs_dw = inputs
    _, dx, dw = output
    ctx.save_for_backward(dx, dw)
    ctx.mark_non_differentiable(dx, dw)
    ctx.set_materialize_grads(False)
    ctx.needs = (needs_dx, needs_dw)
    ctx.dtypes = (x.dtype, weight.dtype)


def _backward(ctx, grad_loss, _grad_dx, _grad_dw):
    nones = (None,) * 8
    if grad_loss is None:
        return (None, None) + nones
    dx, dw = ctx.saved_tensors
    gdx, gdw = torch.ops.recycore.softcap_cross_entropy_backward(grad_loss, dx, dw, *ctx.dtypes)
    needs_dx, needs_dw = ctx.needs
    return (gdx if needs_dx else None, gdw if needs_dw else None) + nones


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("recycore::softcap_token_nll", mutates_args=())
def _softcap_token_nll_op(x: Tensor, weight: Tensor, targets: Tensor, cap: float, gemm_dtype: torch.dtype,
                          chunk_rows: int, block_v: int, fp32_gemm_out: bool) -> Tensor:
    """Per-row NLL (N,) fp32 (0 for ignored targets); forward only."""
    losses, _, _, _ = _head_forward(x, weight, targets, cap, gemm_dtype, chunk_rows, block_v, fp32_gemm_out,
                                    False, False)
    return losses


@_softcap_token_nll_op.register_fake
def _(x, weight, targets, cap, gemm_dtype, chunk_rows, block_v, fp32_gemm_out):
    return x.new_empty(targets.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _gemm_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype == weight.dtype:
        return x.dtype
    return x.dtype if x.element_size() < weight.element_size() else weight.dtype


def _prepare(x, weight, targets):
    for t, name in ((x, "x"), (weight, "weight")):
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64:
        raise TypeError("targets must be an int64 tensor")
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., d) = {tuple(x.shape)} does not match weight (V, d) = {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have x's leading shape {tuple(x.shape[:-1])}")
    if weight.device != x.device or targets.device != x.device:
        raise ValueError("x, weight and targets must be on one device")
    return x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), targets.reshape(-1).contiguous()


def softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, cap: float = 30.0, *,
                          chunk_rows: int = 0, block_v: int = 0, fp32_gemm_out: bool = True) -> Tensor:
    """Mean cross-entropy (0-dim fp32) of cap * tanh((rms_norm(x) @ weight^T) / cap) against targets,
    x (..., d) the un-normalised residual stream, weight (V, d), targets (...) int64 (-100 ignored).
    Differentiable in x and weight. chunk_rows (0: `default_chunk_rows`), block_v (0: the whole row,
    up to 4096) and fp32_gemm_out (cuBLAS writes fp32 logits / dh / dW partials) are configuration."""
    x2, w, t = _prepare(x, weight, targets)
    grad = torch.is_grad_enabled()
    needs_dx, needs_dw = grad and x.requires_grad, grad and weight.requires_grad
    loss, _, _ = torch.ops.recycore.softcap_cross_entropy(x2, w, t, float(cap), _gemm_dtype(x, weight),
                                                          chunk_rows, block_v, fp32_gemm_out, needs_dx, needs_dw)
    return loss


def softcap_token_nll(x: Tensor, weight: Tensor, targets: Tensor, cap: float = 30.0, *,
                      chunk_rows: int = 0, block_v: int = 0, fp32_gemm_out: bool = True) -> Tensor:
    """Per-token NLL in nats, fp32 of targets' shape (0 where targets == -100); forward only."""
    x2, w, t = _prepare(x, weight, targets)
    out = torch.ops.recycore.softcap_token_nll(x2, w, t, float(cap), _gemm_dtype(x, weight), chunk_rows,
                                               block_v, fp32_gemm_out)
    return out.reshape(targets.shape)


# ----------------------------------------------------------------------------------------------
# Plain-torch references: exactly the model's arithmetic (GPT.hidden_states' final rms_norm,
# GPT.logits, GPT.loss; evaluate.token_nll on top of the logits) in the caller's autocast context
# ----------------------------------------------------------------------------------------------
def softcap_logits_reference(x: Tensor, weight: Tensor, cap: float = 30.0) -> Tensor:
    h = F.rms_norm(x, (x.size(-1),))
    logits = F.linear(h, weight)
    return cap * torch.tanh(logits / cap)


def softcap_cross_entropy_reference(x: Tensor, weight: Tensor, targets: Tensor, cap: float = 30.0) -> Tensor:
    logits = softcap_logits_reference(x, weight, cap)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def softcap_token_nll_reference(x: Tensor, weight: Tensor, targets: Tensor, cap: float = 30.0) -> Tensor:
    logits = softcap_logits_reference(x, weight, cap)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           reduction="none").reshape(targets.shape)
