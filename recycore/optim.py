"""Optimisers and schedules of docs/SPEC.md §3.

* Muon on the four weight banks: Nesterov momentum, Newton-Schulz (NS5)
  orthogonalisation in bf16, decoupled weight decay, shape-scaled step. Across
  ranks the bank gradients are reduce-scattered along the bank dim, each rank
  orthogonalises its shard, and the updates are all-gathered while the AdamW
  step of the replicated parameters runs.
* AdamW on everything else: embedding tables at tied_embed_lr, scalars and
  control tensors at scalar_lr.
* Gradient clipping at a global norm over all parameters, the LR multiplier
  (wall-clock or iteration warm-down) and the Muon momentum warm-up.

`OptimizerSet` owns the whole step (communication, clipping, the three
updates), so a single process and N ranks with the same global batch take the
same step: the clip norm is that of the rank-averaged gradient (the seed clips
each rank's local gradient, which makes its step depend on the world size; the
two agree on one process).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from recycore.banks import BANK_NAMES

NS5_COEFFS = (3.4445, -4.7750, 2.0315)
EMBEDDING_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")


# ---------------------------------------------------------------------------
# Newton-Schulz
# ---------------------------------------------------------------------------
def newton_schulz5(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate orthogonalisation U V^T of each matrix in g (..., rows, cols), in bf16.

    X = g / (||g||_F + eps), iterated X <- aX + (bA + cA^2)X with A = X X^T on the
    wide orientation (transposed when rows > cols so A is the small Gram matrix).
    The quintic's coefficients trade exactness for speed: singular values land
    in roughly [0.7, 1.2] rather than exactly 1."""
    a, b, c = NS5_COEFFS
    x = g.bfloat16()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


# ---------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------
# Schedule values are Python floats, or 0-dim device tensors in a captured step (a CUDA graph reads
# them at replay). With floats these run the seed's own ops; with tensors the same math in fp32, since
# a 0-dim device tensor would be rounded to a bf16 operand's dtype (0.99 -> 0.98828125).
def _decay_momentum(buf: Tensor, g: Tensor, momentum: Tensor | float) -> None:
    """buf = momentum * buf + g, in place (bf16)."""
    if isinstance(momentum, Tensor):
        buf.copy_(g.float() + buf.float() * momentum)
    else:
        buf.mul_(momentum).add_(g)


def _nesterov(g: Tensor, buf: Tensor, momentum: Tensor | float) -> Tensor:
    """g + momentum * buf."""
    return g.float() + buf.float() * momentum if isinstance(momentum, Tensor) else g.add(buf, alpha=momentum)


def _add_scaled(p: Tensor, update: Tensor, scale: Tensor | float) -> None:
    """p += scale * update, in place."""
    if isinstance(scale, Tensor):
        p.add_(update.to(p.dtype) * scale)
    else:
        p.add_(update.to(p.dtype), alpha=scale)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _has_reduce_scatter() -> bool:
    """NCCL has it; other backends are probed once with a tiny collective (every rank)."""
    if dist.get_backend() == "nccl":
        return True
    probe = torch.zeros(dist.get_world_size())
    try:
        dist.reduce_scatter_tensor(probe[:1].clone(), probe, op=dist.ReduceOp.SUM)
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False


class Muon(torch.optim.Optimizer):
    """Muon for 3-D banks (bank, rows, cols), one matrix per bank entry:

        buf = m*buf + g;  u = NS5(g + m*buf)
        p *= 1 - lr*wd;   p -= lr * max(1, rows/cols)^0.5 * u

    g and buf are bf16, as in the seed. With N ranks, rank r owns entries
    [r*S, (r+1)*S) of the bank dim padded to N*S; its momentum holds only that
    shard. The step is split in phases so the caller can overlap them with
    other work: `reduce_gradients` (async reduce-scatter), `wait_gradients`
    (-> squared norm of the local shards, for global clipping),
    `launch_updates(clip)` (NS5 on the shard, async all-gather) and
    `apply_updates`. `step()` runs all four on one process or N."""

    def __init__(self, banks, lr: float, momentum: float, backend_steps: int = 5, weight_decay: float = 0.0,
                 distributed: bool | None = None, use_reduce_scatter: bool = True):
        banks = list(banks)
        for p in banks:
            if p.ndim != 3:
                raise ValueError(f"Muon expects 3-D banks (bank, rows, cols), got shape {tuple(p.shape)}")
        super().__init__(banks, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                     weight_decay=weight_decay))
        self.distributed = _distributed() if distributed is None else distributed
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        # Backends without reduce-scatter (older gloo) fall back to all-reduce + a local slice.
        self.use_reduce_scatter = use_reduce_scatter and (not self.distributed or _has_reduce_scatter())
        self._banks = []
        for group in self.param_groups:
            for p in group["params"]:
                shard = math.ceil(p.size(0) / self.world_size)
                self._banks.append(dict(
                    p=p, group=group, shard=shard, lo=min(self.rank * shard, p.size(0)),
                    hi=min((self.rank + 1) * shard, p.size(0)), scale=max(1.0, p.size(-2) / p.size(-1)) ** 0.5))
        # Largest first: its reduce-scatter is launched first and waited on first.
        self._banks.sort(key=lambda b: -b["p"].numel())
        self._pending: list = []

    def _momentum(self, bank: dict) -> Tensor:
        state = self.state[bank["p"]]
        if "momentum_buffer" not in state:
            p = bank["p"]
            state["momentum_buffer"] = torch.zeros(bank["shard"], *p.shape[1:], device=p.device,
                                                   dtype=torch.bfloat16)
        return state["momentum_buffer"]

    # ---- phase 1 -----------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Start averaging each bank's gradient into this rank's shard (fp32, async)."""
        self._pending = []
        for bank in self._banks:
            p = bank["p"]
            if p.grad is None:
                raise RuntimeError("Muon: a bank has no gradient; run backward before the step")
            if not self.distributed:
                bank["grad_shard"] = p.grad
                continue
            padded = p.grad.new_zeros(bank["shard"] * self.world_size, *p.shape[1:])
            padded[:p.size(0)].copy_(p.grad)
            bank["padded_grad"] = padded
            if self.use_reduce_scatter:
                bank["grad_shard"] = p.grad.new_empty(bank["shard"], *p.shape[1:])
                self._pending.append(dist.reduce_scatter_tensor(bank["grad_shard"], padded, op=dist.ReduceOp.SUM,
                                                                async_op=True))
            else:
                self._pending.append(dist.all_reduce(padded, op=dist.ReduceOp.SUM, async_op=True))
                bank["grad_shard"] = padded[self.rank * bank["shard"]:(self.rank + 1) * bank["shard"]]

    # ---- phase 2 -----------------------------------------------------------
    def wait_gradients(self) -> Tensor:
        """Finish the averaging; squared L2 norm of this rank's gradient shards (fp32)."""
        for work in self._pending:
            work.wait()
        self._pending = []
        total = None
        for bank in self._banks:
            if self.distributed:
                bank["grad_shard"].div_(self.world_size)
                bank.pop("padded_grad", None)
            sq = bank["grad_shard"].float().square().sum()
            total = sq if total is None else total + sq
        return total

    # ---- phase 3 -----------------------------------------------------------
    @torch.no_grad()
    def launch_updates(self, clip: Tensor | float = 1.0) -> None:
        """Momentum + NS5 on this rank's shards (gradients scaled by `clip`), then
        start gathering the full updates."""
        self._pending = []
        for bank in self._banks:
            group = bank["group"]
            momentum = group["momentum"]
            g = (bank.pop("grad_shard") * clip).bfloat16()
            buf = self._momentum(bank)
            _decay_momentum(buf, g, momentum)
            update = newton_schulz5(_nesterov(g, buf, momentum), steps=group["backend_steps"])
            if self.distributed:
                full = update.new_empty(bank["shard"] * self.world_size, *update.shape[1:])
                self._pending.append(dist.all_gather_into_tensor(full, update.contiguous(), async_op=True))
                bank["update"] = full
            else:
                bank["update"] = update

    # ---- phase 4 -----------------------------------------------------------
    @torch.no_grad()
    def apply_updates(self) -> None:
        """Wait for the gathered updates; decoupled weight decay, then the scaled step."""
        for work in self._pending:
            work.wait()
        self._pending = []
        for bank in self._banks:
            p, group = bank["p"], bank["group"]
            update = bank.pop("update")[:p.size(0)]
            if group["weight_decay"] > 0:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            _add_scaled(p, update, -group["lr"] * bank["scale"])

    @torch.no_grad()
    def step(self, closure=None, clip: Tensor | float = 1.0):
        if closure is not None:
            raise ValueError("Muon.step does not take a closure")
        self.reduce_gradients()
        self.wait_gradients()
        self.launch_updates(clip)
        self.apply_updates()

    # ---- state (world-size independent: momentum gathered to full banks) ----
    def state_dict(self) -> dict:
        """Hyper-parameters and full (unsharded) bf16 momentum per bank, in
        parameter order. Collective when distributed: every rank must call it."""
        buffers = []
        for p in (p for group in self.param_groups for p in group["params"]):
            bank = next(b for b in self._banks if b["p"] is p)
            buf = self._momentum(bank)
            if self.distributed:
                full = buf.new_empty(bank["shard"] * self.world_size, *buf.shape[1:])
                dist.all_gather_into_tensor(full, buf.contiguous())
                buf = full
            buffers.append(buf[:p.size(0)].cpu().clone())
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "momentum": buffers}

    def load_state_dict(self, state: dict) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        if len(state["momentum"]) != len(params) or len(state["param_groups"]) != len(self.param_groups):
            raise ValueError("Muon state does not match this optimiser's banks")
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        for p, full in zip(params, state["momentum"]):
            if full.shape != p.shape:
                raise ValueError(f"Muon momentum of shape {tuple(full.shape)} does not fit bank {tuple(p.shape)}")
            bank = next(b for b in self._banks if b["p"] is p)
            buf = self._momentum(bank)
            buf.zero_()
            buf[:bank["hi"] - bank["lo"]].copy_(full[bank["lo"]:bank["hi"]])


# ---------------------------------------------------------------------------
# The full optimiser set
# ---------------------------------------------------------------------------
def split_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(banks, embedding tables, scalars/control tensors) by state-dict name:
    the four banks go to Muon, the three embedding tables to AdamW at the
    embedding LR, everything else (scales, mixes, q_gain, gates, vr lambdas,
    skip weights, smear gate, recycle modulation, bigram/VE scales and
    projections) to AdamW at the scalar LR."""
    banks, embeddings, scalars = [], [], []
    for name, p in model.named_parameters():
        if name in BANK_NAMES:
            banks.append(p)
        elif name in EMBEDDING_NAMES:
            embeddings.append(p)
        else:
            scalars.append(p)
    if len(banks) != len(BANK_NAMES):
        raise ValueError(f"model has {len(banks)} of the {len(BANK_NAMES)} weight banks {BANK_NAMES}")
    return banks, embeddings, scalars


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of the Muon momentum from `start` to `end` over `warmup_steps`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


def lr_multiplier(step: int, elapsed_ms: float, iterations: int, warmdown_iters: int,
                  max_wallclock_ms: float | None) -> float:
    """1 until the warm-down, then a linear decay to 0.

    With a wall-clock cap the warm-down lasts warmdown_iters steps' worth of
    time at the mean step time so far: mult = remaining_ms / (warmdown_iters *
    mean_step_ms) once remaining_ms is below that. Without a cap it is linear
    over the last warmdown_iters iterations."""
    if warmdown_iters <= 0:
        return 1.0
    if not max_wallclock_ms or max_wallclock_ms <= 0:
        if max(iterations - warmdown_iters, 0) <= step < iterations:
            return max((iterations - step) / warmdown_iters, 0.0)
        return 1.0
    warmdown_ms = warmdown_iters * (elapsed_ms / max(step, 1))
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


SCHEDULE_KEYS = ("lr", "momentum")  # the param-group values set_schedule changes every step


def _set(group: dict, key: str, value: float) -> None:
    if isinstance(group[key], Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


class OptimizerSet:
    """Muon (banks) + AdamW (embeddings, scalars), the global-norm clip and the
    cross-rank gradient averaging, as one step:

    1. start the banks' reduce-scatter (async, largest bank first);
    2. all-reduce the replicated parameters' gradients (one fp32 buffer);
    3. global norm over all (averaged) gradients -> clip coefficient;
    4. Muon: NS5 on the local shards, start the all-gathers;
    5. AdamW on the replicated parameters while the all-gathers run;
    6. apply the gathered bank updates.
    """

    def __init__(self, model: nn.Module, cfg, device=None, distributed: bool | None = None,
                 use_reduce_scatter: bool = True, capturable: bool = False):
        """capturable: the step will be captured in a CUDA graph, so the learning rates and the Muon
        momentum live in device tensors that `set_schedule` fills in place (CUDA only)."""
        self.cfg = cfg
        self.distributed = _distributed() if distributed is None else distributed
        self.world_size = dist.get_world_size() if self.distributed else 1
        banks, embeddings, scalars = split_parameters(model)
        self.replicated = embeddings + scalars
        self.muon = Muon(banks, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                         weight_decay=cfg.muon_wd, distributed=self.distributed,
                         use_reduce_scatter=use_reduce_scatter)
        device = torch.device(device) if device is not None else banks[0].device
        self.device = device
        self.capturable = capturable and device.type == "cuda"
        self.adam = torch.optim.AdamW(
            [dict(params=embeddings, lr=cfg.tied_embed_lr, name="embed"),
             dict(params=scalars, lr=cfg.scalar_lr, name="scalar")],
            betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.adam_wd,
            fused=device.type == "cuda", capturable=self.capturable)
        for opt in (self.muon, self.adam):
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
                if self.capturable:
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if self.capturable:
            for group in self.muon.param_groups:
                group["momentum"] = torch.tensor(float(group["momentum"]), device=device)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.muon, self.adam)

    def set_schedule(self, lr_mult: float, muon_momentum: float) -> None:
        """The step's learning rates and Muon momentum (device tensors filled in place when capturable)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                _set(group, "lr", group["base_lr"] * lr_mult)
        for group in self.muon.param_groups:
            _set(group, "momentum", muon_momentum)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _state_tensors(self) -> list[Tensor]:
        tensors = []
        for opt in self.optimizers:
            for state in opt.state.values():
                tensors += [v for v in state.values() if isinstance(v, Tensor)]
            for group in opt.param_groups:
                tensors += [v for k, v in group.items() if k != "params" and isinstance(v, Tensor)]
        return tensors

    def snapshot(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Copies of every state tensor, for `restore` (the warm-up puts the optimisers back)."""
        return {id(t): (t, t.clone()) for t in self._state_tensors()}

    def restore(self, snapshot: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Back to the snapshot, in place (a captured step keeps its tensors): tensors the snapshot has
        get their values back; state made since (moments, steps, momentum buffers: all created as
        zeros) is zeroed, which is what a fresh optimiser holds."""
        for t in self._state_tensors():
            if id(t) in snapshot:
                t.copy_(snapshot[id(t)][1])
            else:
                t.zero_()

    @torch.no_grad()
    def _all_reduce_replicated(self, grads: list[Tensor]) -> None:
        """Average the replicated gradients across ranks in place, through one fp32 buffer (cat promotes
        the bf16 tables' gradients itself)."""
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])

    @torch.no_grad()
    def step(self) -> Tensor:
        """One optimiser step on all parameters; returns the pre-clip global grad norm."""
        self.muon.reduce_gradients()
        # The replicated parameters are about a hundred small tensors: one foreach kernel per list, not one
        # per tensor (the distributed step runs eagerly, so its launches are in the step's time).
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if self.distributed and grads:
            self._all_reduce_replicated(grads)
        squared = self.muon.wait_gradients()  # the banks' part (this rank's shards)
        if self.distributed:  # each rank holds different bank shards, the same replicated grads
            dist.all_reduce(squared, op=dist.ReduceOp.SUM)
        if grads:
            squared = squared + torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        norm = squared.sqrt()
        clip = 1.0
        if self.cfg.grad_clip_norm > 0:
            clip = (self.cfg.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
            if grads:
                torch._foreach_mul_(grads, clip)
        self.muon.launch_updates(clip)
        self.adam.step()
        self.muon.apply_updates()
        return norm

    # ---- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Collective when distributed (Muon gathers its momentum shards). Schedule values are saved as
        plain floats, so a checkpoint loads on any device, captured or not."""
        state = {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}
        for part in state.values():
            part["param_groups"] = [{k: float(v) if k in SCHEDULE_KEYS and isinstance(v, Tensor) else v
                                     for k, v in group.items()} for group in part["param_groups"]]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
        for opt in self.optimizers:  # floats, or device tensors for a captured step, as this instance runs
            for group in opt.param_groups:
                for key in SCHEDULE_KEYS:
                    if key in group:
                        value = float(group[key])
                        group[key] = torch.tensor(value, device=self.device) if self.capturable else value
