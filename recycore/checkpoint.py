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
from recycore.files import atomic_write, zip_damage

CHECKPOINT_KEYS = ("model", "optimizers", "ema", "swa", "data", "step", "rng", "config", "training_time_ms")


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def save_checkpoint(path, obj: dict) -> Path:
    """torch.save(obj) to `path`, atomically (see recycore.files)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path):
    """The object a checkpoint file holds, read as data only (weights_only=True); one clear line for a
    missing, truncated, corrupted or code-carrying file. The zip members' CRC-32s are checked first
    (torch.load does not), so a damaged tensor is refused instead of loading as other numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        try:
            damaged = zip_damage(f) if zipfile.is_zipfile(f) else None
        except Exception as exc:  # zipfile raises many kinds for a damaged container
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable zip container: "
                                  f"{type(exc).__name__})") from exc
        if damaged is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: its member {damaged} fails its CRC-32 check")
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data; refused "
                                      "(files are loaded as data only, never as code)") from exc
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable pickle)") from exc
        except Exception as exc:  # torch raises many kinds for a damaged container; all mean the same here
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})") from exc


def load_checkpoint(path) -> dict:
    """A recycore training checkpoint: every CHECKPOINT_KEYS entry present, and everything a resume
    restores fitting the checkpoint's own config (see check_checkpoint)."""
    obj = read_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a recycore training checkpoint (missing: {', '.join(missing)})")
    if not isinstance(obj["config"], dict):
        raise CheckpointError(f"{path}: its config is not a dict")
    check_checkpoint(obj, path)
    return obj


# ---------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------
def check_checkpoint(ckpt: dict, source) -> None:
    """Refuse (CheckpointError naming `source` and the first misfit) a checkpoint whose contents do not
    fit the model of its own config: the weights (names, shapes, dtypes), the EMA/SWA averages, the
    optimisers' states (Muon momentum per bank, AdamW moments per parameter), the data position, the
    RNG states and the step and clock. weights_only=True guarantees the file is data; this guarantees
    the data fits, so a resume never fails halfway through restoring it with a raw torch error.
    (A resume also checks that the run's config has the same model: check_model_config.)"""
    model, optimizers = _templates(ckpt, source)
    weights = model.state_dict()

    def bad(message: str):
        raise CheckpointError(f"checkpoint {source}: {message}")

    _check_tensors(ckpt["model"], weights, "model", bad, exact_dtype=True)
    _check_tensors(ckpt["ema"], weights, "ema", bad)
    swa = ckpt["swa"]
    if swa is not None:
        if not isinstance(swa, dict) or not _is_count(swa.get("count")):
            bad("swa must be None or a dict with a non-negative integer 'count' and a 'sum'")
        _check_tensors(swa.get("sum"), weights, "swa sum", bad)
    if "averaged" in ckpt:
        _check_tensors(ckpt["averaged"], weights, "averaged", bad)
    _check_optimizers(ckpt["optimizers"], optimizers, bad)
    _check_data(ckpt["data"], bad)
    _check_rng(ckpt["rng"], bad)
    if not _is_count(ckpt["step"]):
        bad(f"step must be a non-negative integer, got {ckpt['step']!r:.60}")
    ms = ckpt["training_time_ms"]
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < float("inf"):
        bad(f"training_time_ms must be a finite non-negative number, got {ms!r:.60}")
    if not isinstance(ckpt.get("qat", False), bool):
        bad("qat must be a bool")


def _templates(ckpt: dict, source):
    """GPT and OptimizerSet of the checkpoint's model config, on the meta device (no memory)."""
    from recycore.model import GPT
    from recycore.optim import OptimizerSet

    try:
        cfg = Config().with_stored(ckpt["config"], MODEL_FIELDS)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source}: its model config is invalid ({exc})") from exc
    with torch.device("meta"):
        model = GPT(cfg)
    return model, OptimizerSet(model, cfg, device="meta", distributed=False)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensors(tensors, template: dict[str, Tensor], what: str, bad, exact_dtype: bool = False) -> None:
    if not isinstance(tensors, dict):
        bad(f"{what} is a {type(tensors).__name__}, not a dict of tensors")
    missing = [name for name in template if name not in tensors]
    extra = [str(name) for name in tensors if name not in template]
    if missing or extra:
        bad(f"{what} does not fit its config's model ("
            + (f"missing {missing[0]}, {len(missing)} in all" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[0]:.80}, {len(extra)} in all" if extra else "") + ")")
    for name, ref in template.items():
        t = tensors[name]
        if not isinstance(t, Tensor):
            bad(f"{what} {name} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            bad(f"{what} {name} has shape {tuple(t.shape)} but its config's model has {tuple(ref.shape)}")
        if (t.dtype != ref.dtype) if exact_dtype else not t.is_floating_point():
            bad(f"{what} {name} is {t.dtype}, but its config's model holds {ref.dtype}")


def _check_optimizers(saved, optimizers, bad) -> None:
    """Muon: one momentum tensor per bank, of the bank's shape; AdamW: the groups and parameter counts
    of the model, and per parameter moments of its shape."""
    if not (isinstance(saved, dict) and isinstance(saved.get("muon"), dict) and isinstance(saved.get("adam"), dict)):
        bad("optimizers must be a dict with 'muon' and 'adam' state dicts")
    muon, adam = saved["muon"], saved["adam"]
    banks = [p for group in optimizers.muon.param_groups for p in group["params"]]
    momentum = muon.get("momentum")
    if not isinstance(momentum, list) or len(momentum) != len(banks):
        bad(f"Muon's momentum must be a list of {len(banks)} tensors (one per bank)")
    for i, (buf, p) in enumerate(zip(momentum, banks)):
        if not isinstance(buf, Tensor) or not buf.is_floating_point() or buf.shape != p.shape:
            bad(f"Muon's momentum {i} must be a float tensor of shape {tuple(p.shape)}, got "
                + (f"{buf.dtype} {tuple(buf.shape)}" if isinstance(buf, Tensor) else type(buf).__name__))
    _check_groups(muon.get("param_groups"), optimizers.muon.param_groups, "Muon", bad)
    _check_groups(adam.get("param_groups"), optimizers.adam.param_groups, "AdamW", bad)
    params = [p for group in optimizers.adam.param_groups for p in group["params"]]
    saved_ids = [i for group in adam["param_groups"] for i in group.get("params", ())]
    if len(saved_ids) != len(params) or not all(_is_count(i) for i in saved_ids) or len(set(saved_ids)) != len(params):
        bad(f"AdamW's groups must name {len(params)} distinct parameters")
    shapes = dict(zip(saved_ids, (p.shape for p in params)))
    state = adam.get("state")
    if not isinstance(state, dict):
        bad("AdamW's state must be a dict")
    keys = {"step", "exp_avg", "exp_avg_sq"}
    for key, entry in state.items():
        if key not in shapes or not isinstance(entry, dict):
            bad(f"AdamW's state has an entry {key!r:.40} for no parameter")
        if not keys <= set(entry) or set(entry) != set(next(iter(state.values()))):
            bad(f"AdamW's state of parameter {key} lacks some of {sorted(keys)} or differs from the others'")
        for name, value in entry.items():
            if name == "step":
                if isinstance(value, bool) or not (isinstance(value, (int, float)) or (
                        isinstance(value, Tensor) and value.is_floating_point() and value.numel() == 1)):
                    bad(f"AdamW's step of parameter {key} is not a number")
            elif isinstance(value, Tensor) and (not value.is_floating_point() or value.shape != shapes[key]):
                bad(f"AdamW's {name:.40} of parameter {key} must be a float tensor of shape "
                    f"{tuple(shapes[key])}, got {value.dtype} {tuple(value.shape)}")


def _check_groups(saved, groups: list[dict], which: str, bad) -> None:
    """As many parameter groups as the optimiser has, each with its hyper-parameters as numbers."""
    if not isinstance(saved, list) or len(saved) != len(groups):
        bad(f"{which} must have {len(groups)} parameter group(s)")
    for saved_group, group in zip(saved, groups):
        if not isinstance(saved_group, dict):
            bad(f"{which}'s parameter groups must be dicts")
        for key, value in group.items():  # the hyper-parameters that are numbers (or pairs: betas)
            if key != "params" and _hyper(value) and not _like(saved_group.get(key), value):
                bad(f"{which}'s hyper-parameter {key} must be like {value!r}, got {saved_group.get(key)!r:.40}")
    if which == "AdamW" and any(not isinstance(g.get("params"), list) or len(g["params"]) != len(group["params"])
                                for g, group in zip(saved, groups)):
        bad(f"{which}'s parameter groups do not hold the model's parameters")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hyper(value) -> bool:
    """A hyper-parameter worth checking: a number, or a tuple of numbers (AdamW's betas)."""
    return _number(value) or (isinstance(value, tuple) and all(_number(v) for v in value))


def _like(saved, value) -> bool:
    if isinstance(value, tuple):
        return isinstance(saved, (tuple, list)) and len(saved) == len(value) and all(_number(v) for v in saved)
    return _number(saved)


def _check_data(data, bad) -> None:
    if (not isinstance(data, dict) or not isinstance(data.get("files"), list) or not data["files"]
            or not all(isinstance(f, str) for f in data["files"])):
        bad("data must be a dict with the list of train shard paths ('files')")
    if not _is_count(data.get("file_idx")) or data["file_idx"] >= len(data["files"]) or not _is_count(data.get("pos")):
        bad(f"the data position (file_idx {data.get('file_idx')!r:.20}, pos {data.get('pos')!r:.20}) is not one "
            f"of its {len(data['files'])} shards")


def _check_rng(rng, bad) -> None:
    """The structures set_rng_state hands to torch, numpy and random."""
    def ints(seq, n):
        return isinstance(seq, (list, tuple)) and len(seq) == n and all(_is_count(v) for v in seq)

    ok = isinstance(rng, dict)
    if ok:
        cpu, cuda, numpy_state, python = (rng.get(k) for k in ("torch", "cuda", "numpy", "python"))
        ok = (isinstance(cpu, Tensor) and cpu.dtype == torch.uint8 and cpu.shape == torch.get_rng_state().shape
              and isinstance(cuda, list) and all(isinstance(t, Tensor) and t.dtype == torch.uint8 for t in cuda)
              and isinstance(numpy_state, (list, tuple)) and len(numpy_state) == 5
              and numpy_state[0] == "MT19937" and isinstance(numpy_state[1], Tensor)
              and not numpy_state[1].is_floating_point() and numpy_state[1].shape == (624,)
              and all(isinstance(v, int) for v in numpy_state[2:4]) and isinstance(numpy_state[4], (int, float))
              and isinstance(python, (list, tuple)) and len(python) == 3 and isinstance(python[0], int)
              and ints(python[1], 625) and (python[2] is None or isinstance(python[2], float)))
    if not ok:
        bad("its RNG states are malformed (torch, cuda, numpy, python)")


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
        if all(k in obj for k in CHECKPOINT_KEYS) and isinstance(obj["config"], dict):
            check_checkpoint(obj, path)  # a training checkpoint: everything in it fits its config
        try:
            state_dict, weights = select_weights(obj, weights)
            if isinstance(obj.get("config"), dict):
                cfg = cfg.with_stored(obj["config"], MODEL_FIELDS)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
            raise CheckpointError(f"checkpoint {path}: its {weights!r} weights or config are malformed "
                                  f"({type(exc).__name__})") from exc
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()):
        raise CheckpointError(f"checkpoint {path}: its {weights} weights are not a dict of named tensors")
    # torch.compile wraps the module: strip its prefix
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}, cfg, weights
