"""The training loop (SPEC.md §3): `recycore train` on one process, or
`torchrun --nproc_per_node=N -m recycore train` (NCCL on GPU, gloo on CPU).

One step: grad_accum micro-batches under bf16 autocast, then OptimizerSet.step
(cross-rank averaging, global-norm clip 0.3, Muon on the banks, AdamW on the
rest), then the EMA update and, late in the warm-down, SWA snapshots and late
QAT. Training time excludes validation, checkpointing and the compile warm-up;
every rank stops at the same step when the wall-clock cap is reached.

Outputs: console + logs/<run_id>.txt, one JSON object per logged step or eval
in logs/<run_id>.jsonl, the loss curve logs/<run_id>.png, checkpoints under
checkpoints/<run_id>/ (every CHECKPOINT_EVERY steps, at the end, and on Ctrl-C),
and at the end the int5 artifact with its three figures (pre-quantisation,
int5 standard, int5 sliding window).

Weight averaging. The seed's rule is kept at the seed's defaults: the SWA
average when it has more than one snapshot, else the EMA. Short runs get an
EMA whose horizon fits them: decay = min(EMA_DECAY, 1 - 10/ITERATIONS) (0.997
for the seed's 20,000 iterations, 0.967 for 300), because with 0.997 a 300-step
run's EMA still holds ~40% of the initial weights. Both the live and the
averaged weights are evaluated and reported; the averaged ones are kept (the
rule is fixed in advance, not picked on the validation set).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from recycore.config import MODEL_FIELDS, Config
from recycore.data import DistributedTokenLoader, TRAIN_PATTERN, find_shards, load_validation_tokens, local_batch_tokens
from recycore.evaluate import build_byte_tables, evaluate_sliding, evaluate_standard, load_tokenizer
from recycore.model import GPT
from recycore.optim import OptimizerSet, lr_multiplier, muon_momentum_at

# Small models of the same architecture. Values sit under env variables and flags.
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

CHECKPOINT_KEYS = ("model", "optimizers", "ema", "swa", "data", "step", "rng", "config", "training_time_ms")


# ---------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------
class Context:
    """Rank, world size, device and the logging of one training process."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.master = rank == 0
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        self.owns_group = False
        self.log_path: Path | None = None
        self.metrics_path: Path | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.distributed and not dist.is_initialized():
            if self.device.type == "cuda":
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
            self.owns_group = True

    def stop(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

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


def process_context() -> Context:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or an existing process group."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    return Context(0, 1, 0)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    if cfg.grad_accum_steps:
        return cfg.grad_accum_steps
    if world_size <= 0 or 8 % world_size:
        raise ValueError(f"WORLD_SIZE={world_size} must divide 8 (grad_accum_steps = 8 // world_size, as the "
                         "seed), or set GRAD_ACCUM_STEPS explicitly")
    return 8 // world_size


def check_inputs(cfg: Config, world_size: int) -> tuple[int, object]:
    """Every bad-input error before any GPU work -> (grad_accum, tokenizer)."""
    accum = grad_accum_steps(cfg, world_size)
    local_batch_tokens(cfg.train_batch_tokens, cfg.train_seq_len, world_size, accum)
    find_shards(cfg.data_path, TRAIN_PATTERN)
    sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    return accum, sp


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, obj: dict) -> None:
    """Written atomically: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """A training checkpoint, with clear errors for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncation and corruption surface as several exception types
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {first_line})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"{path} is not a recycore training checkpoint (missing: {', '.join(missing)})")
    return obj


def checkpoint_config(ckpt: dict) -> dict:
    """The checkpoint's config as Config keyword arguments."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}


def check_model_config(cfg: Config, ckpt: dict, source) -> None:
    stored = checkpoint_config(ckpt)
    diff = [f"{k}: checkpoint {stored.get(k)!r} vs now {getattr(cfg, k)!r}"
            for k in MODEL_FIELDS if stored.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint {source} was trained with a different model config: " + "; ".join(diff))


# ---------------------------------------------------------------------------
# Weight averaging
# ---------------------------------------------------------------------------
def effective_ema_decay(cfg: Config) -> float:
    """EMA_DECAY, lowered for short runs so the EMA horizon (1/(1-decay) steps)
    stays at most a tenth of the run: 0.997 at the seed's 20,000 iterations,
    0.967 at 300."""
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
        """The seed's rule: SWA when it has more than one snapshot, else EMA."""
        return "swa" if self.swa is not None and self.swa_count > 1 else "ema"

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
        device = self.ema[0].device
        self.ema = [ema[n].to(device, torch.float32) for n in self.names]
        if swa is None:
            self.swa, self.swa_count = None, 0
        else:
            self.swa = [swa["sum"][n].to(device, torch.float32) for n in self.names]
            self.swa_count = int(swa["count"])


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------
class InterruptFlag:
    """The first SIGINT asks the loop to checkpoint and stop after the current
    step; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: writing a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------
def make_logits_fn(model: torch.nn.Module, compile_model: bool):
    if compile_model:
        return torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
    return model.forward_logits


def evaluate(ctx: Context, model, logits_fn, cfg: Config, val_tokens, tables, accum: int) -> tuple[float, float]:
    """Standard (non-overlapping) evaluation; the batch follows the seed's VAL_BATCH_SIZE split."""
    batch_seqs = max(1, cfg.val_batch_size // (ctx.world_size * accum * cfg.eval_seq_len))
    was_training = model.training
    model.eval()
    try:
        return evaluate_standard(logits_fn, val_tokens, tables, cfg.eval_seq_len, batch_seqs, ctx.device,
                                 ctx.rank, ctx.world_size)
    finally:
        model.train(was_training)


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_losses(ctx: Context, records: list[dict], path: Path) -> str | None:
    """The loss curve as a PNG (rank 0); None with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        ctx.log("plot: matplotlib is not installed; no loss-curve PNG (pip install matplotlib)")
        return None
    train = [(r["step"], r["train_loss"]) for r in records if "event" not in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss (live weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(path.stem)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def train(cfg: Config, *, checkpoint_dir=None, resume=None, log_dir="logs") -> dict:
    """Train cfg's model; `resume` is a checkpoint path (or one already loaded).
    -> final metrics (val_bpb figures, steps, ms/step, paths); {"interrupted": True, ...}
    after a Ctrl-C, which writes a checkpoint first."""
    ctx = process_context()
    accum, sp = check_inputs(cfg, ctx.world_size)
    val_tokens = load_validation_tokens(cfg.data_path, cfg.eval_seq_len, cfg.val_max_tokens)
    ckpt = None
    if resume is not None:
        ckpt = resume if isinstance(resume, dict) else load_checkpoint(resume)
        check_model_config(cfg, ckpt, resume if not isinstance(resume, dict) else "to resume")
    ctx.start()
    try:
        results = _train(ctx, cfg, accum, sp, val_tokens, ckpt, Path(checkpoint_dir or "checkpoints"), Path(log_dir))
        ctx.barrier()  # no rank tears the group down while another still uses it (gloo can abort)
        return results
    finally:
        ctx.stop()


def _run_id(ctx: Context, cfg: Config, ckpt: dict | None) -> str:
    run_id = cfg.run_id or (ckpt["config"].get("run_id") if ckpt else "") or \
        time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    if ctx.distributed:  # every rank must name the same files
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


def _train(ctx: Context, cfg: Config, accum: int, sp, val_tokens: Tensor, ckpt: dict | None,
           checkpoint_dir: Path, log_dir: Path) -> dict:
    cfg = cfg.replace(run_id=_run_id(ctx, cfg, ckpt))
    run_dir = checkpoint_dir / cfg.run_id
    if ctx.master:
        log_dir.mkdir(parents=True, exist_ok=True)
        ctx.log_path, ctx.metrics_path = log_dir / f"{cfg.run_id}.txt", log_dir / f"{cfg.run_id}.jsonl"
    device, on_cuda = ctx.device, ctx.device.type == "cuda"
    compile_model = cfg.compile_model and on_cuda  # torch.compile is off on CPU
    ctx.log(f"run {cfg.run_id}: world_size {ctx.world_size} grad_accum {accum} device {device} "
            f"kernels {cfg.kernels} compile {compile_model}")
    ctx.log(f"logs: {ctx.log_path} metrics: {ctx.metrics_path} checkpoints: {run_dir}")
    if ctx.master and ctx.log_path is not None:
        with open(ctx.log_path, "a", encoding="utf-8") as f:
            print("config " + json.dumps(cfg.to_dict()), file=f)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base_model = GPT(cfg).to(device)
    base_model.train()
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if compile_model else base_model
    opt = OptimizerSet(base_model, cfg, device=device)
    loader = DistributedTokenLoader(cfg.data_path, ctx.rank, ctx.world_size, device)
    tables = build_byte_tables(sp, cfg.vocab_size)
    ema_decay = effective_ema_decay(cfg)
    averages = WeightAverages(base_model, ema_decay)
    n_params = sum(p.numel() for p in base_model.parameters())
    ctx.log(f"model: {n_params:,} parameters, {cfg.num_layers} layers (+{len(cfg.recycle_layers) * cfg.recycle_repeats}"
            f" recycled), d={cfg.model_dim}; train {cfg.train_batch_tokens:,} tokens/step x seq {cfg.train_seq_len}; "
            f"val {val_tokens.numel() - 1:,} tokens")
    ctx.log(f"averaging: EMA decay {ema_decay:.4f}" + (f" (EMA_DECAY {cfg.ema_decay} shortened to fit "
                                                        f"{cfg.iterations} iterations)" if ema_decay != cfg.ema_decay else "")
            + (f", SWA every {cfg.swa_every} steps once lr_mult < {cfg.swa_threshold}" if cfg.swa_enabled else ""))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    val_logits_fn = make_logits_fn(base_model, compile_model)

    def forward_backward() -> Tensor:
        total = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, accum)
            with autocast:
                loss = model(x, y)
            total += loss.detach()
            (loss * (1.0 / accum)).backward()
        return total / accum

    step, training_time_ms, qat_on = 0, 0.0, False
    if ckpt is not None:
        base_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizers"])
        averages.load_state_dict(ckpt["ema"], ckpt["swa"])
        loader.load_state_dict(ckpt["data"])
        _set_rng_state(ckpt["rng"])
        step, training_time_ms = int(ckpt["step"]), float(ckpt["training_time_ms"])
        qat_on = bool(ckpt.get("qat", False))
        base_model.set_qat(qat_on)
        ctx.log(f"resumed at step {step} (training time {training_time_ms / 1000:.1f}s)")
    elif cfg.warmup_steps > 0:
        # Compile and autotune on real steps, then put everything back to its start.
        start_model = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        start_opt = copy.deepcopy(opt.state_dict())
        start_data = copy.deepcopy(loader.state_dict())
        t = time.perf_counter()
        for i in range(cfg.warmup_steps):
            # The last warm-up step runs with late QAT on, so its graph is compiled
            # here too rather than inside the timed run.
            base_model.set_qat(cfg.late_qat_threshold > 0 and cfg.warmup_steps > 1 and i == cfg.warmup_steps - 1)
            opt.zero_grad()
            forward_backward()
            opt.step()
            if i + 1 in (1, cfg.warmup_steps):
                ctx.log(f"warmup step {i + 1}/{cfg.warmup_steps} ({time.perf_counter() - t:.1f}s)")
        base_model.set_qat(False)
        base_model.load_state_dict(start_model)
        opt.load_state_dict(start_opt)
        loader.load_state_dict(start_data)
        opt.zero_grad()

    max_wallclock_ms = 1000.0 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else None
    tokens_per_step = cfg.train_batch_tokens
    records: list[dict] = []
    live = {}
    stop = False
    interrupted = False
    checkpoint_path = None
    train_loss = None

    def record(**fields):
        records.append(fields)
        ctx.record(**fields)

    def checkpoint(name: str, **extra) -> Path:
        state = {
            "model": {k: v.detach().cpu() for k, v in base_model.state_dict().items()},
            "optimizers": opt.state_dict(),  # collective: gathers Muon's momentum shards
            "data": loader.state_dict(), "step": step, "rng": _rng_state(), "config": cfg.to_dict(),
            "training_time_ms": training_time_ms, "qat": qat_on,
        }
        state["ema"], state["swa"] = averages.state_dict()
        state.update(extra)
        path = run_dir / name
        if ctx.master:
            save_checkpoint(path, state)
            ctx.log(f"checkpoint: {path}")
        ctx.barrier()
        return path

    with InterruptFlag() as interrupt:
        ctx.sync()
        t0 = time.perf_counter()
        while True:
            last_step = step >= cfg.iterations or stop
            if last_step or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
                ctx.sync()
                training_time_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, val_bpb = evaluate(ctx, base_model, val_logits_fn, cfg, val_tokens, tables, accum)
                ctx.log(f"step {step}/{cfg.iterations} val_loss {val_loss:.4f} val_bpb {val_bpb:.4f} "
                        f"train_time {training_time_ms / 1000:.1f}s step_avg {training_time_ms / max(step, 1):.1f}ms")
                record(event="val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=training_time_ms)
                live = {"val_loss": val_loss, "val_bpb": val_bpb}
                ctx.sync()
                t0 = time.perf_counter()
            if last_step:
                break

            elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
            mult = lr_multiplier(step, elapsed_ms, cfg.iterations, cfg.warmdown_iters, max_wallclock_ms)
            if not qat_on and cfg.late_qat_threshold > 0 and mult < cfg.late_qat_threshold:
                qat_on = True
                base_model.set_qat(True)
                ctx.log(f"late_qat: enabled at step {step} (lr_mult {mult:.4f} < {cfg.late_qat_threshold})")
                record(event="late_qat", step=step, lr_mult=mult)
            opt.zero_grad()
            train_loss = forward_backward()
            opt.set_schedule(mult, muon_momentum_at(step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                                    cfg.muon_momentum_warmup_steps))
            grad_norm = opt.step()
            averages.update_ema(base_model)
            step += 1
            if cfg.swa_enabled and mult < cfg.swa_threshold and step % cfg.swa_every == 0:
                averages.add_swa(base_model)
                if averages.swa_count == 1:
                    ctx.log(f"swa: first snapshot at step {step}")

            elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
            reached_cap = max_wallclock_ms is not None and elapsed_ms >= max_wallclock_ms
            flags = [reached_cap, interrupt.requested]
            if ctx.distributed:  # every rank stops at the same step
                t = torch.tensor([int(f) for f in flags], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                flags = [bool(v) for v in t.tolist()]
            reached_cap, interrupted = flags
            stop = stop or reached_cap or interrupted

            if cfg.train_log_every > 0 and (step <= 10 or step % cfg.train_log_every == 0 or stop
                                            or step == cfg.iterations):
                if ctx.distributed:  # the global batch's loss, not rank 0's share
                    dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
                    train_loss /= ctx.world_size
                loss_value = train_loss.item()
                step_ms = elapsed_ms / step
                left_s = (max(max_wallclock_ms - elapsed_ms, 0.0) if max_wallclock_ms
                          else (cfg.iterations - step) * step_ms) / 1000.0
                ctx.log(f"step {step}/{cfg.iterations} loss {loss_value:.4f} | {step_ms:.1f} ms/step | "
                        f"{tokens_per_step / step_ms * 1000:,.0f} tok/s | lr_mult {mult:.3f} | "
                        f"left {_fmt_time(left_s)}")
                record(step=step, train_loss=loss_value, lr_mult=mult, grad_norm=grad_norm.item(),
                       ms_per_step=step_ms, tokens_per_s=tokens_per_step / step_ms * 1000,
                       train_time_ms=elapsed_ms, time_left_s=left_s)
            if interrupted:
                training_time_ms = elapsed_ms
                checkpoint_path = checkpoint(f"step_{step:06d}.pt")
                ctx.log(f"interrupted at step {step}; resume with --resume {checkpoint_path}")
                return {"interrupted": True, "step": step, "checkpoint": str(checkpoint_path), "run_id": cfg.run_id}
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.iterations and not stop:
                ctx.sync()
                training_time_ms += 1000.0 * (time.perf_counter() - t0)
                checkpoint(f"step_{step:06d}.pt")
                t0 = time.perf_counter()

    if reached_cap and step < cfg.iterations:
        ctx.log(f"stopping early: wall-clock cap {cfg.max_wallclock_seconds:.0f}s reached at step {step}")
    memory = {}
    if on_cuda:
        memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        ctx.log(f"peak memory allocated {memory['peak_allocated_gib']:.2f} GiB, "
                f"reserved {memory['peak_reserved_gib']:.2f} GiB")

    # --- averaging, then the pre-quantisation figure ---
    # final.pt keeps the live weights ("model", to resume from) and the kept
    # averaged ones ("averaged": `recycore export final.pt --state-key averaged`).
    choice = averages.choice()
    averaged = averages.averaged_state(base_model)
    checkpoint_path = checkpoint("final.pt", averaged={k: v.cpu() for k, v in averaged.items()}, averaging=choice)
    base_model.set_qat(False)
    ema_figures = {}
    if choice == "swa":  # the EMA is a candidate too: report it, keep the rule's choice
        base_model.load_state_dict(averages.averaged_state(base_model, "ema"))
        ema_loss, ema_bpb = evaluate(ctx, base_model, val_logits_fn, cfg, val_tokens, tables, accum)
        ema_figures = {"ema_val_loss": ema_loss, "ema_val_bpb": ema_bpb}
        ctx.log(f"averaging: EMA (decay {ema_decay:.4f}) val_loss {ema_loss:.4f} val_bpb {ema_bpb:.4f} (not kept)")
    base_model.load_state_dict(averaged)
    how = (f"SWA over {averages.swa_count} snapshots" if choice == "swa"
           else f"EMA (decay {ema_decay:.4f})")
    val_loss, val_bpb = evaluate(ctx, base_model, val_logits_fn, cfg, val_tokens, tables, accum)
    ctx.log(f"averaging: {how}; val_bpb live {live.get('val_bpb', float('nan')):.4f} -> averaged {val_bpb:.4f} "
            f"(keeping the averaged weights: SWA if > 1 snapshot, else EMA)")
    results = {
        "run_id": cfg.run_id, "steps": step, "training_time_ms": training_time_ms,
        "ms_per_step": training_time_ms / max(step, 1), "train_loss": None if train_loss is None else train_loss.item(),
        "live_val_loss": live.get("val_loss"), "live_val_bpb": live.get("val_bpb"),
        "averaging": choice, "swa_snapshots": averages.swa_count, "ema_decay": ema_decay,
        "prequant_val_loss": val_loss, "prequant_val_bpb": val_bpb, **ema_figures, **memory,
        "checkpoint": str(checkpoint_path), "log": str(ctx.log_path), "metrics": str(ctx.metrics_path),
    }
    record(event="prequant", step=step, averaging=choice, val_loss=val_loss, val_bpb=val_bpb,
           live_val_bpb=live.get("val_bpb"))
    results.update(_artifact_figures(ctx, cfg, base_model, run_dir, val_tokens, tables, compile_model))
    record(event="final", **{k: v for k, v in results.items() if isinstance(v, (int, float, str)) or v is None})
    if ctx.master:
        results["plot"] = plot_losses(ctx, records, log_dir / f"{cfg.run_id}.png")
    ctx.log("final " + json.dumps({k: v for k, v in results.items() if "val_bpb" in k or k.endswith("bytes")}))
    return results


def _artifact_figures(ctx: Context, cfg: Config, model, run_dir: Path, val_tokens, tables,
                      compile_model: bool) -> dict:
    """Export the int5 artifact, load it back, evaluate it (standard and sliding window)."""
    try:
        from recycore.artifact import export_artifact, load_artifact
    except ImportError as exc:
        ctx.log(f"artifact: recycore.artifact is not available ({exc}); no int5 export or int5 figures")
        return {}
    path = run_dir / "final_model.int5.ptz"
    sizes = {}
    if ctx.master:
        sizes = export_artifact(model.state_dict(), cfg, path)
        ctx.log(f"artifact: {path} model {sizes['model_bytes']:,} + code {sizes['code_bytes']:,} = "
                f"{sizes['total_bytes']:,} bytes (budget {sizes['budget_bytes']:,})")
    ctx.barrier()
    state_dict, art_cfg, _ = load_artifact(path, cfg)
    q_model = GPT(art_cfg).to(ctx.device)
    q_model.load_state_dict(state_dict)
    q_model.eval()
    logits_fn = make_logits_fn(q_model, compile_model)
    accum = grad_accum_steps(cfg, ctx.world_size)
    q_loss, q_bpb = evaluate(ctx, q_model, logits_fn, cfg, val_tokens, tables, accum)
    ctx.log(f"int5 round trip (standard): val_loss {q_loss:.4f} val_bpb {q_bpb:.4f}")
    t = time.perf_counter()
    s_loss, s_bpb = evaluate_sliding(logits_fn, val_tokens, tables, cfg.eval_seq_len, cfg.eval_stride,
                                     cfg.eval_batch_seqs, ctx.device, ctx.rank, ctx.world_size,
                                     progress=True)
    ctx.log(f"int5 sliding window (stride {cfg.eval_stride}): val_loss {s_loss:.4f} val_bpb {s_bpb:.4f} "
            f"({time.perf_counter() - t:.1f}s)")
    out = {"int5_val_loss": q_loss, "int5_val_bpb": q_bpb, "int5_sliding_val_loss": s_loss,
           "int5_sliding_val_bpb": s_bpb, "artifact": str(path)}
    out.update({k: sizes[k] for k in ("model_bytes", "code_bytes", "total_bytes") if k in sizes})
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="demo: a small model for a few CPU minutes; ci: seconds. Default: the seed's config")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue the run of this checkpoint (its config, unless env/flags override)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="checkpoints go to DIR/<run_id>/")
    parser.add_argument("--log-dir", default="logs", help="logs/metrics/plot go to DIR/<run_id>.{txt,jsonl,png}")
    Config.add_arguments(parser)


def run(args: argparse.Namespace) -> dict:
    defaults = dict(PRESETS[args.preset]) if args.preset else {}
    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        defaults.update(checkpoint_config(resume))  # the run's own config, under env and flags
    cfg = Config.from_args(args, **defaults)
    if resume is not None:
        check_model_config(cfg, resume, args.resume)
    results = train(cfg, checkpoint_dir=args.checkpoint_dir, resume=resume, log_dir=args.log_dir)
    if results.get("interrupted"):
        sys.exit(130)
    return results
