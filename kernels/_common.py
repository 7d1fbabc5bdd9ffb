"""Helpers shared by the kernel families: interpreter detection and input checks."""
import os

import torch

# Under TRITON_INTERPRET=1 bf16 arithmetic (tl.dot, +, *, tl.sum) is computed
# wrongly and tl.exp raises on bf16: kernels upcast to fp32 behind this flag.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(t, name, *, ndim=None, dtypes=None, device=None, contiguous=False):
    """Raise a ValueError/TypeError naming `name` when `t` is not what a kernel needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be one of ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{name} is on the CPU: the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 for the slow CPU interpreter)"
        )
