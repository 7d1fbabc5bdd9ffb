"""The process context: rank, world size, device, the distributed set-up and tear-down, and the
rank-0 console/log/metrics output. One per process, for training and evaluation alike."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from recycore.errors import RecycoreError


class Context:
    """Rank, world size, device and the logging of one process."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.master = rank == 0
        self.device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not (torch.cuda.is_available()
                                               and (self.device.index or 0) < torch.cuda.device_count()):
            raise RecycoreError(f"device {self.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
                                + ("" if device else " for LOCAL_RANK " + str(local_rank)))
        self.owns_group = False
        self.tf32_before = None  # the process's TF32 switches before start(), put back by stop()
        self.log_path: Path | None = None
        self.metrics_path: Path | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> None:
        if self.on_cuda:
            torch.cuda.set_device(self.device)
            self.tf32_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.distributed and not dist.is_initialized():
            if self.on_cuda:
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
            self.owns_group = True

    def stop(self) -> None:
        """Undo start(): a caller's later fp32 matmuls (a notebook's, a test's) get the precision it had set."""
        if self.tf32_before is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32_before
            self.tf32_before = None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def sync(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the ranks (every rank must call this)."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, msg: str) -> None:
        if not self.master:
            return
        print(msg, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                print(msg, file=f)

    def record(self, **fields) -> None:
        """One JSON object per line in the metrics file (rank 0)."""
        if self.master and self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                print(json.dumps(fields), file=f)


def process_context(device=None) -> Context:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or an existing process group."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)
    return Context(0, 1, 0, device)
