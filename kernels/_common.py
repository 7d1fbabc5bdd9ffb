"""Helpers shared by the kernel families: the interpreter convention and input checks.

Kernels run on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, which the test suite
sets before triton is imported). The interpreter computes bf16 arithmetic wrongly (tl.dot, +, *,
tl.sum silently; tl.exp raises) and costs ~5 ms per program-tile step, so a launcher whose tensors
are on the CPU passes UPCAST=True (fp32 arithmetic behind that constexpr) and picks small tiles."""
import torch
import triton

# Whether Triton runs kernels under its interpreter in this process (read once: Dynamo cannot trace the
# knob's lookup, and the launchers' checks run inside compiled graphs).
INTERPRETER_ENABLED = bool(triton.knobs.runtime.interpret)


def on_interpreter(t: torch.Tensor) -> bool:
    """True when t's kernels run under the interpreter (a CPU tensor)."""
    return t.device.type == "cpu"


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
    if t.device.type == "cpu" and not INTERPRETER_ENABLED:
        raise ValueError(
            f"{name} is on the CPU: the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 for the slow CPU interpreter)"
        )
