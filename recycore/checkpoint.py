"""Training checkpoints and weight averages.

A checkpoint is a `torch.save` dict of tensors and plain data (model, optimiser and averaging state,
the data stream's position, RNG states, the config); it is always written atomically and always read
with `weights_only=True`, so a file can never run code. `WeightAverages` keeps the EMA of every
tensor and the SWA running sum; `averaging_choice` is the seed's rule for which one to keep, used for
live training state and for checkpoint files alike.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recycore.config import MODEL_FIELDS, Config
from recycore.errors import CheckpointError
from recycore.files import atomic_write

CHECKPOINT_KEYS = ("model", "optimizers", "ema", "swa", "data", "step", "rng", "config", "training_time_ms")


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def save_checkpoint(path, obj: dict) -> Path:
    """torch.save(obj) to `path`, atomically (see recycore.files)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path):
    """The object a checkpoint file holds, read as data only (weights_only=True); one clear line for a
    missing, truncated, corrupted or code-carrying file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data; refused "
                                  "(files are loaded as data only, never as code)") from exc
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable pickle)") from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError) as exc:  # the forms a damaged zip container takes
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})") from exc


def load_checkpoint(path) -> dict:
    """A recycore training checkpoint (every CHECKPOINT_KEYS entry present)."""
    obj = read_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a recycore training checkpoint (missing: {', '.join(missing)})")
    if not isinstance(obj["config"], dict):
        raise CheckpointError(f"{path}: its config is not a dict")
    return obj


def check_model_config(cfg: Config, ckpt: dict, source) -> None:
    diff = cfg.differences(ckpt["config"], MODEL_FIELDS)
    if diff:
        raise CheckpointError(f"checkpoint {source} was trained with a different model config: " + "; ".join(diff))


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------
# Weight averaging
# ---------------------------------------------------------------------------
def averaging_choice(swa_count: int) -> str:
    """The seed's rule: the SWA average when it has more than one snapshot, else the EMA."""
    return "swa" if swa_count > 1 else "ema"


def effective_ema_decay(cfg: Config) -> float:
    """EMA_DECAY, lowered for short runs so the EMA horizon (1/(1-decay) steps) stays at most a tenth
    of the run: 0.997 at the seed's 20,000 iterations, 0.967 at 300 (with 0.997 a 300-step run's EMA
    would still hold ~40% of the initial weights)."""
    if cfg.iterations <= 0:
        return cfg.ema_decay
    return min(cfg.ema_decay, max(0.0, 1.0 - 10.0 / cfg.iterations))


class WeightAverages:
    """fp32 EMA of every tensor (each step) and the SWA running sum (late in the warm-down)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = list(model.state_dict())
        self.ema = [t.detach().float().clone() for t in model.state_dict().values()]
        self.swa: list[Tensor] | None = None
        self.swa_count = 0

    @staticmethod
    def _current(model) -> list[Tensor]:
        return [t.detach().float() for t in model.state_dict().values()]

    @torch.no_grad()
    def update_ema(self, model) -> None:
        torch._foreach_mul_(self.ema, self.decay)
        torch._foreach_add_(self.ema, self._current(model), alpha=1.0 - self.decay)

    @torch.no_grad()
    def add_swa(self, model) -> None:
        current = self._current(model)
        if self.swa is None:
            self.swa = [t.clone() for t in current]
        else:
            torch._foreach_add_(self.swa, current)
        self.swa_count += 1

    def choice(self) -> str:
        return averaging_choice(self.swa_count)

    def snapshot(self) -> list[Tensor]:
        return [t.clone() for t in self.ema]

    def restore(self, snapshot: list[Tensor]) -> None:
        """The EMA back to a snapshot, in place (a captured step holds these tensors)."""
        torch._foreach_copy_(self.ema, snapshot)

    def averaged_state(self, model, kind: str | None = None) -> dict[str, Tensor]:
        """The weights of `kind` ("swa" or "ema"; default: the rule's choice) in the model's dtypes."""
        template = model.state_dict()
        if (kind or self.choice()) == "swa":
            tensors = [t / self.swa_count for t in self.swa]
        else:
            tensors = self.ema
        return {n: t.to(template[n].dtype) for n, t in zip(self.names, tensors)}

    def state_dict(self) -> tuple[dict, dict | None]:
        ema = {n: t.cpu() for n, t in zip(self.names, self.ema)}
        swa = None if self.swa is None else {"sum": {n: t.cpu() for n, t in zip(self.names, self.swa)},
                                             "count": self.swa_count}
        return ema, swa

    def load_state_dict(self, ema: dict, swa: dict | None) -> None:
        """In place: the EMA tensors keep their storage (a captured step may hold them)."""
        for tensor, name in zip(self.ema, self.names):
            tensor.copy_(ema[name])
        if swa is None:
            self.swa, self.swa_count = None, 0
        else:
            device = self.ema[0].device
            self.swa = [swa["sum"][n].to(device, torch.float32) for n in self.names]
            self.swa_count = int(swa["count"])


# ---------------------------------------------------------------------------
# Weights of a checkpoint file (for export)
# ---------------------------------------------------------------------------
def select_weights(ckpt: dict, weights: str) -> tuple[dict[str, Tensor], str]:
    """The state dict to export from a training checkpoint. "auto" is the seed's rule (as training
    keeps: the SWA average when it has more than one snapshot, else the EMA; the live weights when the
    file has neither); "model", "ema" and "swa" pick one. Averages come back in the live dtypes."""
    live = ckpt.get("model")
    swa = ckpt.get("swa")
    swa_count = int(swa.get("count", 0)) if isinstance(swa, dict) else 0
    if weights == "auto":
        weights = averaging_choice(swa_count)
        if weights == "ema" and not isinstance(ckpt.get("ema"), dict):
            weights = "model"
    if weights == "swa":
        if swa_count <= 1:
            raise CheckpointError("the checkpoint has no SWA average (fewer than two snapshots)")
        chosen = {k: v / swa_count for k, v in swa["sum"].items()}
    else:
        chosen = ckpt.get(weights)
    if not isinstance(chosen, dict):
        raise CheckpointError(f"the checkpoint has no {weights!r} state dict (keys: {', '.join(map(str, ckpt))})")
    if isinstance(live, dict):
        chosen = {k: v.to(live[k].dtype) if k in live else v for k, v in chosen.items()}
    return chosen, weights


def load_weights(path, weights: str, cfg: Config) -> tuple[dict[str, Tensor], Config, str]:
    """(state dict, config, which weights) from a training checkpoint (its model fields over `cfg`) or
    a plain state dict (`cfg` as given)."""
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        state_dict, weights = obj, "state dict"
    else:
        state_dict, weights = select_weights(obj, weights)
        if isinstance(obj.get("config"), dict):
            cfg = cfg.with_stored(obj["config"], MODEL_FIELDS)
    # torch.compile wraps the module: strip its prefix
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}, cfg, weights
