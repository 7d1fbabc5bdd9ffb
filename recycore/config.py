"""One dataclass with every default of SPEC.md (the seed's defaults).

Precedence: dataclass defaults < environment variables with the seed's names
(NUM_LAYERS=11, ...) < command-line flags (--num-layers 11). Field `foo_bar`
reads the variable FOO_BAR and the flag --foo-bar.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields


def _int_list(value) -> tuple[int, ...]:
    """(3, 4) from "3,4", [3, 4] or (3, 4)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(int(part) for part in parts if str(part).strip())


@dataclass
class Config:
    # --- data (SPEC §1) ---
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    # --- model (SPEC §2) ---
    vocab_size: int = 1024
    num_layers: int = 12
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    rope_train_seq_len: int = 1024  # the rotary table's "train length" (NTK scaling beyond it)
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    bigram_vocab_size: int = 2048
    bigram_dim: int = 128
    xsa_last_n: int = 4
    ln_scale: bool = True
    ve_enabled: bool = True
    ve_dim: int = 128
    ve_layers: tuple[int, ...] = (10, 11)
    gated_attention: bool = True
    value_residual: bool = True
    recycle_layers: tuple[int, ...] = (3, 4)
    recycle_repeats: int = 1
    parallel_residual_last_n: int = 0  # off in the seed (its README's option)
    kernels: str = "reference"  # "reference" (plain torch) or "triton"
    # --- training (SPEC §3) ---
    seed: int = 1337
    run_id: str = ""
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    iterations: int = 20_000
    max_wallclock_seconds: float = 600.0
    warmdown_iters: int = 3500
    warmup_steps: int = 20
    grad_accum_steps: int = 0  # 0: 8 // world_size, as the seed
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.997
    swa_enabled: bool = True
    swa_every: int = 50
    swa_threshold: float = 0.2
    late_qat_threshold: float = 0.15
    compile_model: bool = True
    val_loss_every: int = 4000
    train_log_every: int = 500
    checkpoint_every: int = 0
    # --- evaluation (SPEC §5) ---
    eval_seq_len: int = 2048
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    val_batch_size: int = 524_288
    val_max_tokens: int = 0  # 0: the whole validation split

    # ---- derived -----------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def xsa_layers(self) -> tuple[int, ...]:
        return tuple(range(max(0, self.num_layers - self.xsa_last_n), self.num_layers))

    # ---- validation --------------------------------------------------------
    def __post_init__(self):
        for f in fields(self):  # env strings and flags may give lists as "3,4"
            if f.type == "tuple[int, ...]" and not isinstance(getattr(self, f.name), tuple):
                setattr(self, f.name, _int_list(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"invalid config: {name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                     "train_seq_len", "train_batch_tokens", "eval_seq_len", "eval_stride",
                     "eval_batch_seqs", "rope_train_seq_len", "logit_softcap", "val_batch_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        for name in ("iterations", "warmup_steps", "warmdown_iters", "recycle_repeats", "xsa_last_n",
                     "bigram_vocab_size", "swa_every", "grad_accum_steps", "rope_dims",
                     "parallel_residual_last_n", "val_max_tokens", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, "must not be negative")
        if self.model_dim % self.num_heads:
            bad("num_heads", f"must divide model_dim={self.model_dim}")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("model_dim", f"gives an odd head_dim={self.head_dim}; RoPE needs it even")
        if self.rope_dims % 2 or self.rope_dims > self.head_dim:
            bad("rope_dims", f"must be even and at most head_dim={self.head_dim}")
        if self.rope_dims == 2:
            bad("rope_dims", "must be 0 or >= 4 (NTK scaling divides by rope_dims - 2)")
        if self.mlp_dim <= 0:
            bad("mlp_mult", "gives an empty MLP")
        if self.bigram_vocab_size == 1:
            bad("bigram_vocab_size", "must be 0 (off) or at least 2")
        for name in ("recycle_layers", "ve_layers"):
            for idx in getattr(self, name):
                if not 0 <= idx < self.num_layers:
                    bad(name, f"layer id {idx} is outside 0..{self.num_layers - 1}")
        if self.xsa_last_n > self.num_layers:
            bad("xsa_last_n", f"exceeds num_layers={self.num_layers}")
        if self.parallel_residual_last_n > self.num_layers:
            bad("parallel_residual_last_n", f"exceeds num_layers={self.num_layers}")
        if self.kernels not in ("reference", "triton"):
            bad("kernels", "must be 'reference' or 'triton'")
        if not 0.0 < self.ema_decay < 1.0:
            bad("ema_decay", "must be in (0, 1)")
        if self.eval_stride > self.eval_seq_len:
            bad("eval_stride", f"exceeds eval_seq_len={self.eval_seq_len}")

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Config":
        """Defaults, then the seed's environment variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One --flag per field; unset flags leave the env/default value alone."""
        group = parser.add_argument_group("config (each flag also reads the env variable of the same name)")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                group.add_argument(flag, dest=f.name, default=None, type=_parse_bool, metavar="0|1")
            else:
                group.add_argument(flag, dest=f.name, default=None, type=lambda s, f=f: _parse(f, s),
                                   metavar=f.name.upper())

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ=None, **defaults) -> "Config":
        """Config from env and parsed flags; `defaults` sit under both (a preset)."""
        environ = os.environ if environ is None else environ
        values = dict(defaults)
        for f in fields(cls):
            raw = environ.get(f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
            flag_value = getattr(args, f.name, None)
            if flag_value is not None:
                values[f.name] = flag_value
        return cls(**values)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**values)


MODEL_FIELDS = (
    "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_base", "rope_dims",
    "rope_train_seq_len", "qk_gain_init", "logit_softcap", "tied_embed_init_std", "bigram_vocab_size",
    "bigram_dim", "xsa_last_n", "ln_scale", "ve_enabled", "ve_dim", "ve_layers", "gated_attention",
    "value_residual", "recycle_layers", "recycle_repeats", "parallel_residual_last_n",
)


def _parse_bool(raw) -> bool:
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {raw!r}")


def _parse(f: dataclasses.Field, raw):
    try:
        if f.type == "bool":
            return _parse_bool(raw)
        if f.type == "int":
            return int(str(raw).strip().replace("_", ""))
        if f.type == "float":
            return float(raw)
        if f.type == "tuple[int, ...]":
            return _int_list(raw)
        return str(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"invalid value for {f.name.upper()}: {raw!r} ({exc})") from None
