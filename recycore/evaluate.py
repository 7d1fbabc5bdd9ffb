"""Bits per byte (docs/SPEC.md §5): byte tables from the SentencePiece model, the
standard non-overlapping evaluation and the sliding-window evaluation in which
every target token is scored exactly once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from recycore.console import Progress
from recycore.graphs import Captured

LogitsFn = Callable[[Tensor], Tensor]  # ids (B, T) -> logits (B, T, vocab)


def load_tokenizer(path, vocab_size: int):
    """A SentencePiece processor; clear errors for a missing file or a vocab mismatch."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TOKENIZER_PATH {path} does not exist (run `recycore data demo`, or point "
                                "TOKENIZER_PATH at a SentencePiece .model file)")
    if path.suffix != ".model":
        raise ValueError(f"TOKENIZER_PATH {path} is not a SentencePiece .model file")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"VOCAB_SIZE={vocab_size} does not match the tokenizer {path} "
                         f"(vocab {sp.vocab_size()})")
    return sp


@dataclass
class ByteTables:
    """Per token id: UTF-8 bytes of the piece (leading '▁' removed), whether it had
    that leading space, and whether it is a boundary token (control/unknown/unused)."""
    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor

    def to(self, device) -> "ByteTables":
        return ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

    def count(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Bytes of each target after its previous token (float64)."""
        extra = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].double() + extra.double()


def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    size = max(sp.vocab_size(), vocab_size)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def token_nll(logits_fn: LogitsFn, x: Tensor, y: Tensor) -> Tensor:
    """Per-token negative log-likelihood in nats, (B, T) fp32, under bf16 autocast."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = logits_fn(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                           reduction="none").reshape(y.shape)


def batch_nll(logits_fn: LogitsFn, graphs: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """token_nll of logits_fn as a function of (x, y), replayed as a CUDA graph per batch shape when
    `graphs` (recycore.graphs; its output is valid until the next call)."""
    return Captured(lambda x, y: token_nll(logits_fn, x, y), "evaluation batch", enabled=graphs)


def _reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _result(nll_sum: float, tokens: float, byte_sum: float, device) -> tuple[float, float]:
    nll_sum, tokens, byte_sum = _reduce([nll_sum, tokens, byte_sum], device)
    val_loss = nll_sum / tokens
    return val_loss, nll_sum / math.log(2.0) / byte_sum


@torch.inference_mode()
def evaluate_standard(logits_fn: LogitsFn, val_tokens: Tensor, tables: ByteTables, seq_len: int,
                      batch_seqs: int, device, rank: int = 0, world_size: int = 1,
                      progress: bool = False, graphs: bool = False) -> tuple[float, float]:
    """Non-overlapping seq_len windows split across ranks -> (val_loss, val_bpb)."""
    device = torch.device(device)
    tables = tables.to(device)
    total_seqs = (val_tokens.numel() - 1) // seq_len
    first, last = total_seqs * rank // world_size, total_seqs * (rank + 1) // world_size
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, bytes (no per-batch host sync)
    nll = batch_nll(logits_fn, graphs and device.type == "cuda")
    bar = Progress(last - first, "standard eval", "windows", progress and rank == 0)
    for start in range(first, last, batch_seqs):
        end = min(start + batch_seqs, last)
        local = val_tokens[start * seq_len:end * seq_len + 1].to(device=device, dtype=torch.int64)
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        sums[0] += nll(x, y).double().sum()
        sums[1] += tables.count(x, y).sum()
        bar.update(end - start)
    bar.close()
    nll_sum, byte_sum = sums.tolist()
    return _result(nll_sum, (last - first) * seq_len, byte_sum, device)


def sliding_windows(total_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first scored position) of each window. The first window
    scores all its positions; each later one scores the positions no earlier
    window scored (its last `stride`, or fewer at the tail), so every target
    0..total_targets-1 is scored exactly once, with >= seq_len - stride context
    once the first window is full."""
    windows = [(0, min(seq_len, total_targets), 0)]
    scored_end = windows[0][1]
    while scored_end < total_targets:
        end = min(scored_end + stride, total_targets)
        start = max(end - seq_len, 0)
        windows.append((start, end - start, scored_end - start))
        scored_end = end
    return windows


def batch_shapes(n_tokens: int, seq_len: int, stride: int, batch_seqs: int, modes=("standard", "sliding"),
                 rank: int = 0, world_size: int = 1) -> set[tuple[int, int]]:
    """The (batch, seq_len) shapes of the batches the evaluations `modes` run on this rank for
    n_tokens validation tokens: the full batch and each evaluation's last, partial one."""
    def shapes(count):
        mine = count * (rank + 1) // world_size - count * rank // world_size
        return {(min(batch_seqs, mine), seq_len)} | ({(mine % batch_seqs, seq_len)} if mine % batch_seqs else set())

    out = set()
    if "standard" in modes:
        out |= shapes((n_tokens - 1) // seq_len)
    if "sliding" in modes:  # as sliding_windows: one full window, then one per stride of the rest
        out |= shapes(1 + -(-max(0, n_tokens - 1 - seq_len) // stride))
    return {shape for shape in out if shape[0] > 0}


@torch.inference_mode()
def warm_up(logits_fn: LogitsFn, shapes: set[tuple[int, int]], device) -> None:
    """One forward of each batch shape, so that compiling (torch.compile, Triton) is not timed as
    evaluation."""
    for batch, seq_len in sorted(shapes, reverse=True):
        x = torch.zeros(batch, seq_len, dtype=torch.int64, device=device)
        token_nll(logits_fn, x, x)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate_sliding(logits_fn: LogitsFn, val_tokens: Tensor, tables: ByteTables, seq_len: int, stride: int,
                     batch_seqs: int, device, rank: int = 0, world_size: int = 1,
                     progress: bool = False, graphs: bool = False) -> tuple[float, float]:
    """Sliding-window evaluation, windows split across ranks -> (val_loss, val_bpb)."""
    device = torch.device(device)
    tables = tables.to(device)
    windows = sliding_windows(val_tokens.numel() - 1, seq_len, stride)
    mine = windows[len(windows) * rank // world_size:len(windows) * (rank + 1) // world_size]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nll, bytes
    nll = batch_nll(logits_fn, graphs and device.type == "cuda")
    positions = torch.arange(seq_len)
    scored = 0
    bar = Progress(len(mine), f"sliding eval (stride {stride})", "windows", progress and rank == 0)
    for b in range(0, len(mine), batch_seqs):
        batch = mine[b:b + batch_seqs]
        x = torch.zeros(len(batch), seq_len, dtype=torch.int64)
        y = torch.zeros(len(batch), seq_len, dtype=torch.int64)
        for i, (start, length, _) in enumerate(batch):
            chunk = val_tokens[start:start + length + 1].to(torch.int64)
            x[i, :length], y[i, :length] = chunk[:-1], chunk[1:]
        first = torch.tensor([w[2] for w in batch])[:, None]
        length = torch.tensor([w[1] for w in batch])[:, None]
        mask = ((positions >= first) & (positions < length)).to(device)
        scored += int(mask.sum())
        x, y = x.to(device), y.to(device)
        sums[0] += nll(x, y).double()[mask].sum()
        sums[1] += tables.count(x, y)[mask].sum()
        bar.update(len(batch))
    bar.close()
    nll_sum, byte_sum = sums.tolist()
    return _result(nll_sum, scored, byte_sum, device)
