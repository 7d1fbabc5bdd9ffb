"""recycore: hand-written Triton kernels under a thin torch model and training loop for the
parameter-golf "12L RecycledCore Int5" model.

    from recycore import Config, GPT          # the model (docs/SPEC.md §2)
    from recycore import train                # the training loop
    from recycore import load_artifact        # an int5 artifact, dequantised
    from recycore import load_int5_model      # an int5 artifact, matrices kept packed (K3)
    import recycore.kernels                   # the Triton kernels (torch custom ops)

The names load lazily, so `import recycore` stays cheap (no torch.compile, no Triton).
"""
import importlib

_EXPORTS = {
    "Config": "recycore.config",
    "GPT": "recycore.model",
    "train": "recycore.training",
    "load_artifact": "recycore.artifact",
    "export_artifact": "recycore.artifact",
    "load_int5_model": "recycore.int5_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'recycore' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
