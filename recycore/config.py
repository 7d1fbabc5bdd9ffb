"""One dataclass with every default of docs/SPEC.md (the seed's defaults), and the small presets.

Precedence: dataclass defaults < a preset < environment variables with the seed's names
(NUM_LAYERS=11, ...) < command-line flags (--num-layers 11). Field `foo_bar` reads the variable
FOO_BAR and the flag --foo-bar. Each field carries its group and a one-line description, from which
the command line builds its flags (recycore.cli).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

from recycore.errors import RecycoreError

GROUPS = {  # group -> heading of its flags in --help, in the order --help lists them
    "model": "model (the artifact records these)",
    "training": "training",
    "eval": "evaluation",
    "data": "data",
    "execution": "execution (kernels, compilation, CUDA graphs)",
}
KERNEL_CHOICES = ("auto", "fused", "reference")


class ConfigError(RecycoreError):
    """A config value that is out of range or does not fit the other fields; one line naming the field."""


def _field(default, group: str, help: str, **kwargs):
    return dataclasses.field(default=default, metadata={"group": group, "help": help}, **kwargs)


def _int_list(value) -> tuple[int, ...]:
    """(3, 4) from "3,4", [3, 4] or (3, 4)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(int(part) for part in parts if str(part).strip())


@dataclass
class Config:
    # --- data (SPEC §1) ---
    data_path: str = _field("./data/datasets/fineweb10B_sp1024", "data",
                            "folder of *_train_*.bin / *_val_*.bin token shards")
    tokenizer_path: str = _field("./data/tokenizers/fineweb_1024_bpe.model", "data",
                                 "SentencePiece .model file (byte counts for bits per byte)")
    # --- model (SPEC §2) ---
    vocab_size: int = _field(1024, "model", "tokenizer vocabulary size")
    num_layers: int = _field(12, "model", "physical transformer blocks")
    model_dim: int = _field(512, "model", "width of the residual stream")
    num_heads: int = _field(8, "model", "query heads (head_dim = model_dim / num_heads)")
    num_kv_heads: int = _field(4, "model", "key/value heads (grouped-query attention)")
    mlp_mult: float = _field(3.0, "model", "MLP hidden width as a multiple of model_dim")
    rope_base: float = _field(10000.0, "model", "RoPE base frequency")
    rope_dims: int = _field(16, "model", "leading dims of each head that RoPE rotates (0: none)")
    rope_train_seq_len: int = _field(1024, "model", "the rotary table's train length (NTK scaling beyond it)")
    qk_gain_init: float = _field(1.5, "model", "initial per-head query gain")
    logit_softcap: float = _field(30.0, "model", "logits = cap * tanh(logits / cap)")
    tied_embed_init_std: float = _field(0.005, "model", "init std of the tied token embedding")
    bigram_vocab_size: int = _field(2048, "model", "bigram-hash embedding buckets (0: off)")
    bigram_dim: int = _field(128, "model", "bigram-hash embedding width")
    xsa_last_n: int = _field(4, "model", "XSA on the last N physical layers")
    ln_scale: bool = _field(True, "model", "scale each block's normed input by 1/sqrt(layer+1)")
    ve_enabled: bool = _field(True, "model", "value embeddings on VE_LAYERS")
    ve_dim: int = _field(128, "model", "value-embedding table width")
    ve_layers: tuple[int, ...] = _field((10, 11), "model", "layers that add the value embedding (comma list)")
    gated_attention: bool = _field(True, "model", "per-head sigmoid gate on the attention output")
    value_residual: bool = _field(True, "model", "blend layer 0's values into every later layer")
    recycle_layers: tuple[int, ...] = _field((3, 4), "model", "physical layers replayed as the recycled core")
    recycle_repeats: int = _field(1, "model", "how many times the recycled core is replayed")
    parallel_residual_last_n: int = _field(0, "model", "parallel attention+MLP residual on the last N layers")
    # --- execution ---
    kernels: str = _field("auto", "execution",
                          "auto: the fused Triton kernels on CUDA, plain torch on the CPU; fused: the Triton "
                          "kernels everywhere (interpreted on the CPU: slow); reference: plain torch")
    compile_model: bool = _field(True, "execution", "torch.compile the model on CUDA (ignored on the CPU)")
    cuda_graphs: bool = _field(True, "execution",
                               "replay the training step and evaluation forwards as CUDA graphs (CUDA only)")
    # --- training (SPEC §3) ---
    seed: int = _field(1337, "training", "random seed of the initialisation")
    run_id: str = _field("", "training", "names logs/<run_id>.* and checkpoints/<run_id>/ (default: time + random)")
    train_batch_tokens: int = _field(786_432, "training", "tokens per optimiser step, over all ranks")
    train_seq_len: int = _field(2048, "training", "training sequence length")
    iterations: int = _field(20_000, "training", "optimiser steps (the wall-clock cap may stop earlier)")
    max_wallclock_seconds: float = _field(600.0, "training",
                                          "training-time cap in seconds, eval and compile excluded (0: none)")
    warmdown_iters: int = _field(3500, "training", "steps (or their time, with a cap) of linear LR warm-down")
    warmup_steps: int = _field(20, "training", "compile/capture steps before training, then everything is reset")
    grad_accum_steps: int = _field(0, "training", "micro-steps per step (0: 8 // world_size, as the seed)")
    matrix_lr: float = _field(0.025, "training", "Muon learning rate of the weight banks")
    scalar_lr: float = _field(0.025, "training", "AdamW learning rate of scalars and control tensors")
    tied_embed_lr: float = _field(0.035, "training", "AdamW learning rate of the embedding tables")
    muon_momentum: float = _field(0.99, "training", "Muon momentum after its warm-up")
    muon_momentum_warmup_start: float = _field(0.92, "training", "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = _field(1500, "training", "steps of the linear momentum warm-up")
    muon_backend_steps: int = _field(5, "training", "Newton-Schulz iterations")
    muon_wd: float = _field(0.04, "training", "Muon decoupled weight decay")
    adam_wd: float = _field(0.04, "training", "AdamW weight decay")
    beta1: float = _field(0.9, "training", "AdamW beta1")
    beta2: float = _field(0.95, "training", "AdamW beta2")
    adam_eps: float = _field(1e-8, "training", "AdamW epsilon")
    grad_clip_norm: float = _field(0.3, "training", "global gradient-norm clip (0: off)")
    ema_decay: float = _field(0.997, "training", "EMA decay (shortened for short runs)")
    swa_enabled: bool = _field(True, "training", "SWA snapshots late in the warm-down")
    swa_every: int = _field(50, "training", "steps between SWA snapshots")
    swa_threshold: float = _field(0.2, "training", "SWA starts once the LR multiplier is below this")
    late_qat_threshold: float = _field(0.15, "training", "int6 fake quantisation once the LR multiplier is below this")
    val_loss_every: int = _field(4000, "training", "steps between validations (0: only at the end)")
    train_log_every: int = _field(500, "training", "steps between training-loss log lines")
    checkpoint_every: int = _field(0, "training", "steps between checkpoints (0: none)")
    checkpoint_seconds: float = _field(1800.0, "training", "training seconds between checkpoints (0: none)")
    # --- evaluation (SPEC §5) ---
    eval_seq_len: int = _field(2048, "eval", "evaluation window length")
    eval_stride: int = _field(64, "eval", "sliding-window stride (tokens scored per later window)")
    eval_batch_seqs: int = _field(32, "eval", "windows per evaluation batch (per rank)")
    val_batch_size: int = _field(524_288, "training", "tokens per validation batch while training, over all ranks "
                                 "and micro-steps, as the seed (recycore eval batches by EVAL_BATCH_SEQS)")
    val_max_tokens: int = _field(0, "eval", "cap on the validation tokens (0: the whole split)")
    # Not a field: the names the user set (env, flags), so that an error blames the field they chose
    # (MODEL_DIM=7 is model_dim's fault, not num_heads') -- Config(**values, explicit={...}).
    explicit: dataclasses.InitVar[frozenset] = frozenset()

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
    def __post_init__(self, explicit=frozenset()):
        for f in fields(self):  # env strings, flags and stored configs may give lists as "3,4" or [3, 4]
            if f.type == "tuple[int, ...]" and not isinstance(getattr(self, f.name), tuple):
                setattr(self, f.name, _int_list(getattr(self, f.name)))
        self.validate(explicit)

    def validate(self, explicit=()) -> None:
        """ConfigError naming the bad field. When a rule ties fields together (model_dim and num_heads),
        the error names first the field of `explicit` (the ones the user set) that takes part in it."""
        def bad(name, why):
            raise ConfigError(f"invalid config: {name}={getattr(self, name)!r}: {why}")

        def conflict(rule, *names):  # names[0] is blamed unless the user set another of them
            first = next((n for n in names if n in explicit), names[0])
            others = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if n != first)
            raise ConfigError(f"invalid config: {first}={getattr(self, first)!r} (with {others}): {rule}")

        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                     "train_seq_len", "train_batch_tokens", "eval_seq_len", "eval_stride",
                     "eval_batch_seqs", "rope_train_seq_len", "logit_softcap", "val_batch_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        for name in ("iterations", "warmup_steps", "warmdown_iters", "recycle_repeats", "xsa_last_n",
                     "bigram_vocab_size", "swa_every", "grad_accum_steps", "rope_dims",
                     "parallel_residual_last_n", "val_max_tokens", "checkpoint_every", "checkpoint_seconds"):
            if getattr(self, name) < 0:
                bad(name, "must not be negative")
        self._validate_shapes(conflict)
        if self.rope_dims == 2:
            bad("rope_dims", "must be 0 or >= 4 (NTK scaling divides by rope_dims - 2)")
        if self.mlp_dim <= 0:
            bad("mlp_mult", "gives an empty MLP")
        if self.bigram_vocab_size == 1:
            bad("bigram_vocab_size", "must be 0 (off) or at least 2")
        if self.kernels not in KERNEL_CHOICES:
            bad("kernels", "must be one of " + ", ".join(KERNEL_CHOICES))
        if not 0.0 < self.ema_decay < 1.0:
            bad("ema_decay", "must be in (0, 1)")

    def _validate_shapes(self, conflict) -> None:
        """The rules between fields; conflict(rule, *fields) raises, blaming the field the user set."""
        if self.model_dim % self.num_heads:
            conflict("model_dim must be a multiple of num_heads (head_dim = model_dim / num_heads)",
                     "num_heads", "model_dim")
        if self.num_heads % self.num_kv_heads:
            conflict("num_heads must be a multiple of num_kv_heads", "num_kv_heads", "num_heads")
        if self.head_dim % 2:
            conflict(f"head_dim = model_dim / num_heads = {self.head_dim} is odd; RoPE needs it even",
                     "model_dim", "num_heads")
        if self.rope_dims % 2 or self.rope_dims > self.head_dim:
            conflict(f"rope_dims must be even and at most head_dim = model_dim / num_heads = {self.head_dim}",
                     "rope_dims", "model_dim", "num_heads")
        for name in ("recycle_layers", "ve_layers"):
            outside = [idx for idx in getattr(self, name) if not 0 <= idx < self.num_layers]
            if outside:
                conflict(f"layer id {outside[0]} of {name} is outside 0..num_layers-1", name, "num_layers")
        for name in ("xsa_last_n", "parallel_residual_last_n"):
            if getattr(self, name) > self.num_layers:
                conflict(f"{name} must be at most num_layers", name, "num_layers")
        if self.eval_stride > self.eval_seq_len:
            conflict("eval_stride must be at most eval_seq_len", "eval_stride", "eval_seq_len")

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Config":
        """Defaults, then the seed's environment variables, then keyword overrides."""
        return cls(**{**env_values(environ), **overrides})

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

    def model_dict(self) -> dict:
        """The model fields (what an artifact records and a checkpoint must match)."""
        values = self.to_dict()
        return {name: values[name] for name in MODEL_FIELDS}

    def with_stored(self, stored: dict, names=None) -> "Config":
        """This config with the fields of a stored config dict (a checkpoint's or an artifact's) put
        over it; `names` limits which fields are taken. Unknown names are ignored."""
        known = {f.name for f in fields(self)}
        take = known if names is None else known & set(names)
        return self.replace(**{k: v for k, v in stored.items() if k in take})

    def differences(self, stored: dict, names) -> list[str]:
        """'name: stored X vs now Y' for each of `names` where a stored config dict differs."""
        other = Config().with_stored(stored, names)
        return [f"{k}: stored {getattr(other, k)!r} vs now {getattr(self, k)!r}"
                for k in names if getattr(other, k) != getattr(self, k)]


MODEL_FIELDS = tuple(f.name for f in fields(Config) if f.metadata["group"] == "model")


def field_info(name: str) -> dataclasses.Field:
    return next(f for f in fields(Config) if f.name == name)


def parse_field(f: dataclasses.Field, raw):
    """A field's value from a string (env variable or flag); ValueError naming the variable."""
    try:
        if f.type == "bool":
            return parse_bool(raw)
        if f.type == "int":
            return int(str(raw).strip().replace("_", ""))
        if f.type == "float":
            return float(raw)
        if f.type == "tuple[int, ...]":
            return _int_list(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"{f.name.upper()}={raw!r}: expected {type_name(f)}") from None


def type_name(f: dataclasses.Field) -> str:
    return {"bool": "0 or 1", "int": "an integer", "float": "a number",
            "tuple[int, ...]": "a comma-separated list of integers"}.get(f.type, "a string")


def parse_bool(raw) -> bool:
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 0/1/true/false, got {raw!r}")


def env_values(environ=None) -> dict:
    """The config fields set by environment variables (FIELD_NAME in upper case)."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Config):
        if f.name.upper() in environ:
            try:
                values[f.name] = parse_field(f, environ[f.name.upper()])
            except ConfigError as exc:
                raise ConfigError(f"environment variable {exc}") from None
    return values


# Small models of the same architecture, for the CPU demo and for tests.
_SMALL_COMMON = dict(
    max_wallclock_seconds=0.0, warmup_steps=0, compile_model=False, grad_accum_steps=1,
    muon_momentum_warmup_steps=50,
)
PRESETS = {
    # A few minutes on 2 idle CPU cores. d=160 makes the MLP matrices (480 x 160) large enough to
    # be int5-quantised (the seed passes tensors of <= 65,536 values through as fp16), so the demo's
    # int5 figures measure a real round trip.
    "demo": dict(
        _SMALL_COMMON, num_layers=6, model_dim=160, num_heads=4, num_kv_heads=2, rope_dims=16,
        recycle_layers=(1, 2), ve_layers=(4, 5), xsa_last_n=2, bigram_vocab_size=2048, bigram_dim=64,
        ve_dim=64, train_seq_len=256, train_batch_tokens=8192, iterations=200, warmdown_iters=64,
        swa_every=4, val_loss_every=100, train_log_every=25, eval_seq_len=256, eval_stride=64,
        eval_batch_seqs=64, val_batch_size=16_384, val_max_tokens=32_768),
    # Seconds: for tests and smoke runs.
    "ci": dict(
        _SMALL_COMMON, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
        recycle_layers=(1,), ve_layers=(2, 3), xsa_last_n=2, bigram_vocab_size=256, bigram_dim=32, ve_dim=32,
        train_seq_len=64, train_batch_tokens=2048, iterations=40, warmdown_iters=10, swa_every=2,
        val_loss_every=0, train_log_every=5, eval_seq_len=64, eval_stride=32, eval_batch_seqs=32,
        val_batch_size=4096, val_max_tokens=4096),
}
