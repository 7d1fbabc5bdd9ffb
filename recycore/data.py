"""Token shards in the parameter-golf format, the training stream and the
validation split (docs/SPEC.md §1).

A shard is 256 little-endian int32 header words (magic 20240520, version 1,
num_tokens) followed by num_tokens little-endian uint16 token ids.
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recycore.errors import DataError
from recycore.files import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
TRAIN_PATTERN = "*_train_*.bin"  # fineweb_train_000001.bin, demo_train_000000.bin
VAL_PATTERN = "*_val_*.bin"


class ShardError(DataError):
    """A shard file that is not in the parameter-golf format."""


def write_shard(path, tokens) -> None:
    """Write token ids (each in 0..65535) as a shard, atomically."""
    tokens = np.asarray(tokens.cpu().numpy() if isinstance(tokens, Tensor) else tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"write_shard({path}): token ids must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u2").tobytes())


def shard_tokens(path) -> int:
    """The number of tokens a shard holds, from its header; ShardError naming the file if malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"shard not found: {path}") from None
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ShardError(f"{path}: file is {size} bytes but its header promises {num_tokens} tokens "
                         f"({expected} bytes); truncated or corrupt")
    return num_tokens


def read_shard(path) -> Tensor:
    """Token ids of one shard as a uint16 tensor; ShardError naming the file if malformed."""
    num_tokens = shard_tokens(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def find_shards(data_path, pattern: str) -> list[Path]:
    """Sorted shard paths; a clear error when there are none."""
    if not Path(data_path).is_dir():
        raise FileNotFoundError(f"DATA_PATH {data_path} does not exist (run `recycore data demo` for the demo "
                                "data, or point DATA_PATH at a parameter-golf dataset folder)")
    files = [Path(p) for p in sorted(glob.glob(str(Path(data_path) / pattern)))]
    if not files:
        raise FileNotFoundError(f"no shards matching {pattern} in {data_path}")
    return files


def check_train_shards(data_path, tokens_per_step: int) -> list[Path]:
    """The train shards, refused (naming them) when together they hold no token: such data would
    make the stream spin forever."""
    files = find_shards(data_path, TRAIN_PATTERN)
    total = sum(shard_tokens(f) for f in files)
    if total == 0:
        names = ", ".join(f.name for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise DataError(f"the train shards in {data_path} hold no tokens ({names}); a step needs "
                        f"{tokens_per_step:,}")
    return files


class TokenStream:
    """Shards in sorted order, read sequentially, wrapping around."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.file_idx, self.pos = 0, 0
        self.tokens = read_shard(self.files[0])

    def take(self, n: int) -> Tensor:
        chunks, remaining, empty_in_a_row = [], n, 0
        while remaining > 0:
            available = self.tokens.numel() - self.pos
            if available <= 0:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.files):  # a whole pass gave nothing: never spin
                    raise DataError(f"the train shards ({self.files[0].parent}) hold no tokens")
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.file_idx]), 0
                continue
            empty_in_a_row = 0
            k = min(remaining, available)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def state_dict(self) -> dict:
        return {"file_idx": self.file_idx, "pos": self.pos, "files": [str(f) for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"files", "file_idx", "pos"} <= set(state):
            raise DataError("the data stream's state must be a dict of files, file_idx and pos")
        if [str(f) for f in self.files] != state["files"]:
            raise DataError("the data stream's shard list differs from the checkpoint's; "
                            "resume with the same DATA_PATH")
        file_idx, pos = state["file_idx"], state["pos"]
        if (not isinstance(file_idx, int) or not isinstance(pos, int) or isinstance(file_idx, bool)
                or not 0 <= file_idx < len(self.files) or pos < 0):
            raise DataError(f"the data stream's position (file {file_idx!r:.20}, token {pos!r:.20}) is not in "
                            f"its {len(self.files)} shards")
        self.file_idx, self.pos = file_idx, pos
        self.tokens = read_shard(self.files[self.file_idx])


def local_batch_tokens(global_tokens: int, seq_len: int, world_size: int, grad_accum_steps: int) -> int:
    """Tokens one rank processes per micro-step; errors if the batch does not split evenly."""
    parts = world_size * grad_accum_steps
    if global_tokens % parts or (global_tokens // parts) % seq_len:
        raise ValueError(
            f"TRAIN_BATCH_TOKENS={global_tokens} must be divisible by world_size x grad_accum_steps x "
            f"TRAIN_SEQ_LEN = {world_size} x {grad_accum_steps} x {seq_len} = {parts * seq_len}")
    return global_tokens // parts


class DistributedTokenLoader:
    """Each micro-step takes (local_tokens + 1) * world_size contiguous tokens;
    rank r uses [r*span, (r+1)*span), x = span[:-1], y = span[1:]."""

    def __init__(self, data_path, rank: int = 0, world_size: int = 1, device="cpu"):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.stream = TokenStream(find_shards(data_path, TRAIN_PATTERN))

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        span = local_batch_tokens(global_tokens, seq_len, self.world_size, grad_accum_steps) + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].to(torch.int64)
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def load_validation_tokens(data_path, seq_len: int, max_tokens: int = 0) -> Tensor:
    """All val shards concatenated, trimmed to ((N-1)//seq_len)*seq_len + 1 tokens
    (after an optional cap of max_tokens, for quick evaluations)."""
    tokens = torch.cat([read_shard(f) for f in find_shards(data_path, VAL_PATTERN)])
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        files = ", ".join(f.name for f in find_shards(data_path, VAL_PATTERN))
        raise DataError(f"the validation split in {data_path} ({files}: {tokens.numel()} tokens) is shorter than "
                        f"one sequence of {seq_len} tokens")
    return tokens[:usable + 1]
