"""One training step: gradient accumulation over micro-batches, then the optimiser step.

`TrainStep.forward_backward` runs the micro-steps (forward under bf16 autocast, backward of the loss /
accum, gradients accumulated in place) and returns the mean loss and the squared gradient norm;
`TrainStep.update` runs the optimiser step (cross-rank averaging, clipping, Muon, AdamW) and the EMA
update and returns the pre-clip gradient norm. The training loop checks the loss between the two, so
a non-finite loss never reaches the weights.

On CUDA (with `graphs`) each half replays as a CUDA graph (recycore.graphs.Captured): the first call of
a signature runs eagerly (compiling), the second captures; forward+backward per late-QAT state, the
optimiser step once. Its first replay is checked against an eager run of the same batch. The
optimiser step stays eager across ranks (its collectives run between the graphs' replays).
"""
from __future__ import annotations

import torch
from torch import Tensor

from recycore.checkpoint import WeightAverages
from recycore.graphs import Captured, relative_check
from recycore.optim import OptimizerSet

# eager vs first replay of forward+backward: the loss is deterministic; the gradients may differ in
# their summation order (atomics in attention backward kernels), far below this
REPLAY_TOLERANCE = 1e-3


class TrainStep:
    def __init__(self, runner, model: torch.nn.Module, optimizers: OptimizerSet, averages: WeightAverages,
                 device: torch.device, *, graphs: bool = False, log=None):
        """runner: the model or its compiled wrapper (runner(x, y) -> loss); model: the module that owns
        the weights; graphs: capture both halves in CUDA graphs (CUDA only)."""
        self.runner, self.model, self.optimizers, self.averages = runner, model, optimizers, averages
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs = graphs = graphs and device.type == "cuda"
        # one memory pool and stream for all of the step's graphs: they never run at the same time
        shared = dict(pool=torch.cuda.graph_pool_handle(), stream=torch.cuda.Stream(device)) if graphs else {}
        self._forward_backward = Captured(self._forward_backward_body, "forward+backward", enabled=graphs,
                                          check=relative_check(REPLAY_TOLERANCE), extra_key=self._qat_state, log=log,
                                          **shared)
        self._update = Captured(self._update_body, "optimizer step", log=log, **shared,
                                enabled=graphs and not optimizers.distributed and optimizers.capturable)

    @property
    def captured(self) -> int:
        """How many CUDA graphs the step replays (0 without capture)."""
        return self._forward_backward.captured + self._update.captured

    def forward_backward(self, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Gradients of the mean loss over the micro-batches, accumulated into .grad -> (mean loss,
        squared gradient norm), both 0-dim fp32 (this rank's)."""
        xs = torch.stack([x for x, _ in batches]).to(self.device, non_blocking=True)
        ys = torch.stack([y for _, y in batches]).to(self.device, non_blocking=True)
        loss, grad_sq = self._forward_backward(xs, ys)
        return loss.clone(), grad_sq.clone()

    def update(self) -> Tensor:
        """The optimiser step on the accumulated gradients, then the EMA -> the pre-clip gradient norm."""
        return self._update().clone()

    def _qat_state(self) -> tuple[bool, ...]:
        return tuple(getattr(m, "qat", False) for m in self.model.modules() if hasattr(m, "qat"))

    def _forward_backward_body(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        total = torch.zeros((), device=self.device)
        for x, y in zip(xs, ys):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.runner(x, y)
            total += loss.detach()
            (loss * (1.0 / xs.size(0))).backward()
        norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        return total / xs.size(0), torch.stack(norms).float().square().sum()

    def _update_body(self) -> Tensor:
        grad_norm = self.optimizers.step()
        self.averages.update_ema(self.model)
        return grad_norm
