"""One training step: gradient accumulation over micro-batches, then the optimiser step.

`TrainStep.forward_backward` runs `accum` micro-steps (forward under bf16 autocast, backward of the
loss / accum) and returns the mean loss; `TrainStep.update` runs the optimiser step (cross-rank
averaging, clipping, Muon, AdamW) and the EMA update, and returns the pre-clip gradient norm. The
training loop checks the loss between the two, so a non-finite loss never reaches the weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

from recycore.checkpoint import WeightAverages
from recycore.optim import OptimizerSet


class TrainStep:
    def __init__(self, runner, model: torch.nn.Module, optimizers: OptimizerSet, averages: WeightAverages,
                 device: torch.device):
        """runner: the model or its compiled wrapper (called as runner(x, y) -> loss); model: the module
        that owns the weights."""
        self.runner, self.model, self.optimizers, self.averages = runner, model, optimizers, averages
        self.device = device

    def forward_backward(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Zero the gradients, accumulate those of every micro-batch; the mean loss (0-dim, detached)."""
        self.optimizers.zero_grad()
        total = torch.zeros((), device=self.device)
        scale = 1.0 / len(batches)
        for x, y in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.runner(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            total += loss.detach()
            (loss * scale).backward()
        return total / len(batches)

    def update(self) -> Tensor:
        """The optimiser step on the accumulated gradients, then the EMA; the pre-clip gradient norm."""
        grad_norm = self.optimizers.step()
        self.averages.update_ema(self.model)
        return grad_norm
