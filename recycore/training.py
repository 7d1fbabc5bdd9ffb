"""The training loop (docs/SPEC.md §3): `recycore train` on one process, or
`torchrun --nproc_per_node=N -m recycore train` (NCCL on GPU, gloo on CPU).

`train(cfg)` runs named phases: `check_inputs` (every bad input refused before any GPU work),
`set_up` (model, optimisers, data, averages, resume), `warm_up` (compile on real steps, then put
everything back), the loop (`train_loop`: validate, one step, SWA, the stop decision, logging,
checkpoints) and `finish` (weight averaging, the pre-quantisation figure, the int5 artifact and its
figures). Training time excludes validation, checkpointing and the warm-up; every rank stops at the
same step when the wall-clock cap is reached or a SIGINT/SIGTERM asks for it (a resumable checkpoint
is written first).

Outputs: console + logs/<run_id>.txt, one JSON object per logged step or eval in
logs/<run_id>.jsonl, the loss curve logs/<run_id>.png, checkpoints under checkpoints/<run_id>/ (every
CHECKPOINT_EVERY steps and CHECKPOINT_SECONDS of training time, at the end, on a signal, and before a
non-finite loss stops the run), and at the end the int5 artifact with its three figures.

Weight averaging: the seed's rule (recycore.checkpoint.averaging_choice) picks the SWA average or the
EMA; both the live and the averaged weights are evaluated and reported; the averaged ones are kept.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recycore import ops
from recycore.artifact import BUDGET_BYTES, build_eval_model, evaluation_record, export_artifact, load_artifact
from recycore.checkpoint import (WeightAverages, check_model_config, effective_ema_decay, load_checkpoint,
                                 rng_state, save_checkpoint, set_rng_state)
from recycore.config import Config
from recycore.console import training_summary
from recycore.data import DistributedTokenLoader, check_train_shards, load_validation_tokens, local_batch_tokens
from recycore.errors import CheckpointError, RecycoreError
from recycore.evaluate import build_byte_tables, evaluate_sliding, evaluate_standard, load_tokenizer
from recycore.files import atomic_write
from recycore.model import GPT
from recycore.optim import OptimizerSet, lr_multiplier, muon_momentum_at
from recycore.runtime import Context, process_context
from recycore.step import TrainStep


class NonFiniteLossError(RecycoreError):
    """The training loss became NaN or infinite; the weights before that step were checkpointed."""


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
def grad_accum_steps(cfg: Config, world_size: int) -> int:
    if cfg.grad_accum_steps:
        return cfg.grad_accum_steps
    if world_size <= 0 or 8 % world_size:
        raise ValueError(f"WORLD_SIZE={world_size} must divide 8 (grad_accum_steps = 8 // world_size, as the "
                         "seed), or set GRAD_ACCUM_STEPS explicitly")
    return 8 // world_size


@dataclass
class Inputs:
    accum: int
    tokenizer: object
    val_tokens: Tensor
    resume: dict | None


def check_inputs(cfg: Config, world_size: int, resume=None) -> Inputs:
    """Every bad-input error before any GPU work: batch split, data, tokenizer, validation split,
    the checkpoint to resume."""
    accum = grad_accum_steps(cfg, world_size)
    local = local_batch_tokens(cfg.train_batch_tokens, cfg.train_seq_len, world_size, accum)
    check_train_shards(cfg.data_path, (local + 1) * world_size)
    sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    val_tokens = load_validation_tokens(cfg.data_path, cfg.eval_seq_len, cfg.val_max_tokens)
    ckpt = None
    if resume is not None:
        ckpt = resume if isinstance(resume, dict) else load_checkpoint(resume)
        check_model_config(cfg, ckpt, resume if not isinstance(resume, dict) else "to resume")
    return Inputs(accum, sp, val_tokens, ckpt)


# ---------------------------------------------------------------------------
# The run's state
# ---------------------------------------------------------------------------
class TrainingClock:
    """Milliseconds of training: wall time while running, paused for evaluations and checkpoints."""

    def __init__(self, ctx: Context, total_ms: float = 0.0):
        self.ctx, self.total_ms, self._start = ctx, total_ms, None

    def resume(self) -> None:
        self.ctx.sync()
        self._start = time.perf_counter()

    def pause(self) -> None:
        self.ctx.sync()
        self.total_ms, self._start = self.elapsed_ms(), None

    def elapsed_ms(self) -> float:
        running = 0.0 if self._start is None else 1000.0 * (time.perf_counter() - self._start)
        return self.total_ms + running

    @contextlib.contextmanager
    def paused(self):
        self.pause()
        try:
            yield
        finally:
            self.resume()


@dataclass
class Run:
    """Everything one training run holds."""
    ctx: Context
    cfg: Config
    model: GPT
    stepper: TrainStep
    optimizers: OptimizerSet
    loader: DistributedTokenLoader
    averages: WeightAverages
    val_tokens: Tensor
    tables: object
    logits_fn: object
    accum: int
    run_dir: Path
    log_dir: Path
    clock: TrainingClock
    step: int = 0
    qat_on: bool = False
    stop_reason: str | None = None
    last_loss: Tensor | None = None
    last_checkpoint_ms: float = 0.0
    live: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def record(self, **fields) -> None:
        self.records.append(fields)
        self.ctx.record(**fields)

    @property
    def cap_ms(self) -> float | None:
        return 1000.0 * self.cfg.max_wallclock_seconds if self.cfg.max_wallclock_seconds > 0 else None


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------
def train(cfg: Config, *, checkpoint_dir=None, resume=None, log_dir="logs", overwrite: bool = False,
          device=None) -> dict:
    """Train cfg's model on `device` (default: cuda:LOCAL_RANK when CUDA is there, else the CPU); `resume` is
    a checkpoint path (or one already loaded).
    -> final metrics (val_bpb figures, steps, ms/step, paths); {"interrupted": True, ...} after a
    SIGINT/SIGTERM, which writes a checkpoint first."""
    ctx = process_context(device)
    inputs = check_inputs(cfg, ctx.world_size, resume)
    ctx.start()
    try:
        run = set_up(ctx, cfg, inputs, Path(checkpoint_dir or "checkpoints"), Path(log_dir), overwrite)
        warm_up(run)
        interrupted = train_loop(run)
        results = interrupted or finish(run)
        ctx.barrier()  # no rank tears the group down while another still uses it (gloo can abort)
        return results
    finally:
        ctx.stop()


def _run_id(ctx: Context, cfg: Config, ckpt: dict | None, overwrite: bool) -> str:
    """The config's run id, else the checkpoint's, else a new one. Extending a finished run under its
    own id (the command line takes the checkpoint's config, run id included) gets "<id>-from<step>",
    so the finished run's outputs are never overwritten unless `overwrite`."""
    stored = ckpt["config"].get("run_id") if ckpt else ""
    run_id = cfg.run_id or stored
    if ckpt is not None and ckpt.get("finished") and stored and run_id == stored and not overwrite:
        run_id = f"{stored}-from{int(ckpt['step'])}"
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    return ctx.broadcast(run_id)  # every rank must name the same files


def set_up(ctx: Context, cfg: Config, inputs: Inputs, checkpoint_dir: Path, log_dir: Path, overwrite: bool) -> Run:
    ckpt = inputs.resume
    cfg = cfg.replace(run_id=_run_id(ctx, cfg, ckpt, overwrite))
    run_dir = checkpoint_dir / cfg.run_id
    if (run_dir / "final.pt").exists() and not overwrite:
        raise CheckpointError(f"run {cfg.run_id} already finished ({run_dir / 'final.pt'}); choose another "
                              "--run-id, or --overwrite to replace its outputs")
    if ckpt is not None and ckpt.get("finished") and int(ckpt["step"]) >= cfg.iterations:
        raise CheckpointError(f"the checkpoint's run finished at step {int(ckpt['step'])} of {cfg.iterations}: "
                              "nothing to resume (pass --iterations N with N larger to extend it)")
    if ctx.master:
        log_dir.mkdir(parents=True, exist_ok=True)
        ctx.log_path, ctx.metrics_path = log_dir / f"{cfg.run_id}.txt", log_dir / f"{cfg.run_id}.jsonl"
    compile_model = cfg.compile_model and ctx.on_cuda  # torch.compile is off on CPU
    graphs = cfg.cuda_graphs and ctx.on_cuda  # a CUDA feature: the CPU runs the step as it is
    ctx.log(f"run {cfg.run_id}: world_size {ctx.world_size} grad_accum {inputs.accum} device {ctx.device} "
            f"kernels {cfg.kernels} compile {compile_model} cuda graphs {graphs}")
    ctx.log(f"logs: {ctx.log_path} metrics: {ctx.metrics_path} checkpoints: {run_dir}")
    if ctx.master and ctx.log_path is not None:
        with open(ctx.log_path, "a", encoding="utf-8") as f:
            print("config " + json.dumps(cfg.to_dict()), file=f)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(ctx.device)
    model.train()
    model.choose_kernels(local_batch_tokens(cfg.train_batch_tokens, cfg.train_seq_len, ctx.world_size,
                                            inputs.accum) // cfg.train_seq_len, cfg.train_seq_len, training=True)
    runner = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
    # across ranks the optimiser step's collectives stay outside the graphs: only its micro-steps replay
    optimizers = OptimizerSet(model, cfg, device=ctx.device, capturable=graphs and not ctx.distributed)
    averages = WeightAverages(model, effective_ema_decay(cfg))
    stepper = TrainStep(runner, model, optimizers, averages, ctx.device, graphs=graphs, log=ctx.log)
    run = Run(ctx=ctx, cfg=cfg, model=model, stepper=stepper,
              optimizers=optimizers, loader=DistributedTokenLoader(cfg.data_path, ctx.rank, ctx.world_size, ctx.device),
              averages=averages, val_tokens=inputs.val_tokens, tables=build_byte_tables(inputs.tokenizer, cfg.vocab_size),
              logits_fn=make_logits_fn(model, compile_model, eval_shapes(cfg, ctx.world_size, inputs.accum)),
              accum=inputs.accum, run_dir=run_dir, log_dir=log_dir,
              clock=TrainingClock(ctx))
    _log_model(run)
    if ckpt is not None:
        _restore(run, ckpt)
    return run


def _log_model(run: Run) -> None:
    cfg, model = run.cfg, run.model
    for line in ops.kernel_choices():
        run.ctx.log(f"measured: {line}")
    n_params = sum(p.numel() for p in model.parameters())
    run.ctx.log(f"model: {n_params:,} parameters, {cfg.num_layers} layers (+{len(cfg.recycle_layers) * cfg.recycle_repeats}"
                f" recycled), d={cfg.model_dim}; train {cfg.train_batch_tokens:,} tokens/step x seq "
                f"{cfg.train_seq_len}; val {run.val_tokens.numel() - 1:,} tokens")
    decay = run.averages.decay
    run.ctx.log(f"averaging: EMA decay {decay:.4f}" + (f" (EMA_DECAY {cfg.ema_decay} shortened to fit "
                                                       f"{cfg.iterations} iterations)" if decay != cfg.ema_decay else "")
                + (f", SWA every {cfg.swa_every} steps once lr_mult < {cfg.swa_threshold}" if cfg.swa_enabled else ""))


def _restore(run: Run, ckpt: dict) -> None:
    """The state of a checkpoint: weights, optimisers, averages, data position, RNG, step, clock."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizers.load_state_dict(ckpt["optimizers"])
    run.averages.load_state_dict(ckpt["ema"], ckpt["swa"])
    run.loader.load_state_dict(ckpt["data"])
    set_rng_state(ckpt["rng"])
    run.step, run.clock.total_ms = int(ckpt["step"]), float(ckpt["training_time_ms"])
    run.last_checkpoint_ms = run.clock.total_ms
    run.qat_on = bool(ckpt.get("qat", False))
    run.model.set_qat(run.qat_on)
    run.ctx.log(f"resumed at step {run.step} (training time {run.clock.total_ms / 1000:.1f}s)")


def warm_up(run: Run) -> None:
    """Compile, autotune and capture on real steps (a fresh run only), then put model, optimisers,
    averages and data back to their start, in place. The last warm-up steps run with late QAT on, so
    that variant is compiled (and captured: a signature is captured on its second step) here too."""
    cfg = run.cfg
    if cfg.warmup_steps <= 0 or run.step > 0:
        return
    qat_steps = (2 if run.stepper.graphs else 1) if cfg.late_qat_threshold > 0 and cfg.warmup_steps > 1 else 0
    start_model = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    start_opt, start_ema = run.optimizers.snapshot(), run.averages.snapshot()
    start_data = _clone_state(run.loader.state_dict())
    t = time.perf_counter()
    for i in range(cfg.warmup_steps):
        run.model.set_qat(i >= cfg.warmup_steps - min(qat_steps, cfg.warmup_steps - 1))
        run.stepper.forward_backward(_next_batches(run))
        run.stepper.update()
        if i + 1 in (1, cfg.warmup_steps):
            run.ctx.log(f"warmup step {i + 1}/{cfg.warmup_steps} ({time.perf_counter() - t:.1f}s)"
                        + (f", {run.stepper.captured} CUDA graphs" if run.stepper.graphs else ""))
    run.model.set_qat(False)
    run.model.load_state_dict(start_model)
    run.optimizers.restore(start_opt)
    run.averages.restore(start_ema)
    run.loader.load_state_dict(start_data)


def train_loop(run: Run) -> dict | None:
    """Steps until the iterations, the wall-clock cap or a signal; None, or the interrupted result."""
    cfg = run.cfg
    with StopSignals() as signals:
        run.clock.resume()
        while True:
            done = run.step >= cfg.iterations or run.stop_reason is not None
            if done or (cfg.val_loss_every > 0 and run.step % cfg.val_loss_every == 0):
                run.clock.pause()
                validate(run)
                if done:
                    break
                run.clock.resume()
            mult = lr_multiplier(run.step, run.clock.elapsed_ms(), cfg.iterations, cfg.warmdown_iters, run.cap_ms)
            switch_late_qat(run, mult)
            loss, grad_norm = train_step(run, mult)
            add_swa_snapshot(run, mult)
            checkpoint_due = decide_stop(run, signals)
            log_step(run, loss, grad_norm, mult)
            if run.stop_reason == "interrupted":
                run.clock.pause()
                path = checkpoint(run, f"step_{run.step:06d}.pt")
                run.ctx.log(f"interrupted ({signals.received}) at step {run.step}; resume with --resume {path}")
                return {"interrupted": True, "signal": signals.received, "step": run.step,
                        "checkpoint": str(path), "run_id": cfg.run_id}
            if checkpoint_due:
                with run.clock.paused():
                    checkpoint(run, f"step_{run.step:06d}.pt")
    if run.stop_reason == "cap" and run.step < cfg.iterations:
        run.ctx.log(f"stopping early: wall-clock cap {cfg.max_wallclock_seconds:.0f}s reached at step {run.step}")
    return None


def _next_batches(run: Run) -> list[tuple[Tensor, Tensor]]:
    cfg = run.cfg
    return [run.loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, run.accum) for _ in range(run.accum)]


def train_step(run: Run, mult: float) -> tuple[Tensor, Tensor]:
    """One optimiser step at LR multiplier `mult` -> (loss, pre-clip gradient norm). A non-finite loss
    on any rank stops the run before the optimiser touches the weights, after checkpointing them."""
    data_before = run.loader.state_dict()
    loss, grad_sq = run.stepper.forward_backward(_next_batches(run))
    local_bad = not bool(torch.isfinite(torch.stack((loss, grad_sq))).all())
    (bad,) = run.ctx.any_rank(local_bad)
    if bad:
        with run.clock.paused():
            path = checkpoint(run, f"step_{run.step:06d}.pt", data=data_before)
        if not local_bad:
            what = f"rank {run.ctx.rank} is fine but another rank's training loss or gradient is not finite"
        elif not bool(torch.isfinite(loss)):
            what = f"the training loss is {loss.item()}"
        else:
            what = f"the gradient norm is {grad_sq.sqrt().item()} (the loss is {loss.item():.4f})"
        raise NonFiniteLossError(f"{what} at step {run.step + 1}; stopped. The weights before that step are in "
                                 f"{path} (try a lower learning rate)")
    cfg = run.cfg
    run.optimizers.set_schedule(mult, muon_momentum_at(run.step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                                       cfg.muon_momentum_warmup_steps))
    grad_norm = run.stepper.update()
    run.step += 1
    run.last_loss = loss
    return loss, grad_norm


def switch_late_qat(run: Run, mult: float) -> None:
    cfg = run.cfg
    if not run.qat_on and cfg.late_qat_threshold > 0 and mult < cfg.late_qat_threshold:
        run.qat_on = True
        run.model.set_qat(True)
        run.ctx.log(f"late_qat: enabled at step {run.step} (lr_mult {mult:.4f} < {cfg.late_qat_threshold})")
        run.record(event="late_qat", step=run.step, lr_mult=mult)


def add_swa_snapshot(run: Run, mult: float) -> None:
    cfg = run.cfg
    if cfg.swa_enabled and mult < cfg.swa_threshold and run.step % cfg.swa_every == 0:
        run.averages.add_swa(run.model)
        if run.averages.swa_count == 1:
            run.ctx.log(f"swa: first snapshot at step {run.step}")


def decide_stop(run: Run, signals: "StopSignals") -> bool:
    """Set run.stop_reason ("cap" or "interrupted", the same on every rank); whether a periodic
    checkpoint is due."""
    cfg, elapsed = run.cfg, run.clock.elapsed_ms()
    by_steps = cfg.checkpoint_every > 0 and run.step % cfg.checkpoint_every == 0
    by_time = cfg.checkpoint_seconds > 0 and elapsed - run.last_checkpoint_ms >= 1000.0 * cfg.checkpoint_seconds
    reached_cap = run.cap_ms is not None and elapsed >= run.cap_ms
    reached_cap, interrupted, due = run.ctx.any_rank(reached_cap, signals.requested, by_steps or by_time)
    if interrupted:
        run.stop_reason = "interrupted"
    elif reached_cap:
        run.stop_reason = run.stop_reason or "cap"
    return due and run.step < cfg.iterations and run.stop_reason is None


def log_step(run: Run, loss: Tensor, grad_norm: Tensor, mult: float) -> None:
    cfg, step = run.cfg, run.step
    if cfg.train_log_every <= 0 or not (step <= 10 or step % cfg.train_log_every == 0 or run.stop_reason
                                        or step == cfg.iterations):
        return
    if run.ctx.distributed:  # the global batch's loss, not rank 0's share
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)
        loss /= run.ctx.world_size
    elapsed_ms = run.clock.elapsed_ms()
    step_ms = elapsed_ms / step
    cap_ms = run.cap_ms
    left_s = (max(cap_ms - elapsed_ms, 0.0) if cap_ms else (cfg.iterations - step) * step_ms) / 1000.0
    tokens_per_s = cfg.train_batch_tokens / step_ms * 1000
    run.ctx.log(f"step {step}/{cfg.iterations} loss {loss.item():.4f} | {step_ms:.1f} ms/step | "
                f"{tokens_per_s:,.0f} tok/s | lr_mult {mult:.3f} | left {_fmt_time(left_s)}")
    run.record(step=step, train_loss=loss.item(), lr_mult=mult, grad_norm=grad_norm.item(), ms_per_step=step_ms,
               tokens_per_s=tokens_per_s, train_time_ms=elapsed_ms, time_left_s=left_s)


def checkpoint(run: Run, name: str, data: dict | None = None, **extra) -> Path:
    """Write a resumable checkpoint (collective: every rank calls it; rank 0 writes)."""
    state = {
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizers": run.optimizers.state_dict(),  # collective: gathers Muon's momentum shards
        "data": data or run.loader.state_dict(), "step": run.step, "rng": rng_state(), "config": run.cfg.to_dict(),
        "training_time_ms": run.clock.elapsed_ms(), "qat": run.qat_on,
    }
    state["ema"], state["swa"] = run.averages.state_dict()
    state.update(extra)
    path = run.run_dir / name
    if run.ctx.master:
        save_checkpoint(path, state)
        run.ctx.log(f"checkpoint: {path}")
    run.last_checkpoint_ms = run.clock.elapsed_ms()
    run.ctx.barrier()
    return path


def finish(run: Run) -> dict:
    """Peak memory, the averaged weights (final.pt keeps them beside the live ones), the pre-quantisation
    figure, the int5 artifact and its figures, the loss plot."""
    ctx, cfg, model, averages = run.ctx, run.cfg, run.model, run.averages
    memory = _peak_memory(ctx)
    choice = averages.choice()
    averaged = averages.averaged_state(model)
    # final.pt: the live weights ("model", to extend the run from) and the kept averaged ones
    # ("averaged": `recycore export final.pt` takes them)
    checkpoint_path = checkpoint(run, "final.pt", averaged={k: v.cpu() for k, v in averaged.items()},
                                 averaging=choice, finished=True)
    model.set_qat(False)
    ema_figures = {}
    if choice == "swa":  # the EMA is a candidate too: report it, keep the rule's choice
        model.load_state_dict(averages.averaged_state(model, "ema"))
        ema_loss, ema_bpb = validation_figures(run)
        ema_figures = {"ema_val_loss": ema_loss, "ema_val_bpb": ema_bpb}
        ctx.log(f"averaging: EMA (decay {averages.decay:.4f}) val_loss {ema_loss:.4f} val_bpb {ema_bpb:.4f} (not kept)")
    model.load_state_dict(averaged)
    how = f"SWA over {averages.swa_count} snapshots" if choice == "swa" else f"EMA (decay {averages.decay:.4f})"
    val_loss, val_bpb = validation_figures(run)
    ctx.log(f"averaging: {how}; val_bpb live {run.live.get('val_bpb', float('nan')):.4f} -> averaged {val_bpb:.4f} "
            f"(keeping the averaged weights: SWA if > 1 snapshot, else EMA)")
    training_ms = run.clock.total_ms
    results = {
        "run_id": cfg.run_id, "steps": run.step, "training_time_ms": training_ms,
        "ms_per_step": training_ms / max(run.step, 1), "train_loss": None if run.last_loss is None else run.last_loss.item(),
        "live_val_loss": run.live.get("val_loss"), "live_val_bpb": run.live.get("val_bpb"),
        "averaging": choice, "swa_snapshots": averages.swa_count, "ema_decay": averages.decay,
        "prequant_val_loss": val_loss, "prequant_val_bpb": val_bpb, **ema_figures, **memory,
        "checkpoint": str(checkpoint_path), "log": str(ctx.log_path), "metrics": str(ctx.metrics_path),
    }
    run.record(event="prequant", step=run.step, averaging=choice, val_loss=val_loss, val_bpb=val_bpb,
               live_val_bpb=run.live.get("val_bpb"))
    results.update(artifact_figures(run))
    run.record(event="final", **{k: v for k, v in results.items() if isinstance(v, (int, float, str)) or v is None})
    if ctx.master:
        results["plot"] = plot_losses(ctx, run.records, run.log_dir / f"{cfg.run_id}.png")
    # one summary to end on; every figure is in the metrics file's "final" record
    for line in training_summary(results, cfg.eval_stride, BUDGET_BYTES):
        ctx.log(line)
    return results


def _peak_memory(ctx: Context) -> dict:
    """The CUDA allocator's peaks; on the CPU the process's peak resident set."""
    if not ctx.on_cuda:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
        return {"peak_rss_gib": kib * (1 if sys.platform == "darwin" else 1024) / 2**30}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def artifact_figures(run: Run) -> dict:
    """Export the int5 artifact of the kept weights, load it back, evaluate it (standard and sliding)."""
    ctx, cfg = run.ctx, run.cfg
    path = run.run_dir / "final_model.int5.ptz"
    sizes = {}
    if ctx.master:  # the artifact records how it is evaluated here, for `recycore eval` to reproduce
        sizes = export_artifact(run.model.state_dict(), cfg, path, allow_over_budget=True,
                                evaluation=evaluation_record(cfg))
        over = sizes["total_bytes"] - sizes["budget_bytes"]
        ctx.log(f"artifact: {path} model {sizes['model_bytes']:,} + code {sizes['code_bytes']:,} = "
                f"{sizes['total_bytes']:,} bytes (budget {sizes['budget_bytes']:,}"
                + (f"; OVER by {over:,})" if over > 0 else ")"))
    ctx.barrier()
    state_dict, art_cfg, _ = load_artifact(path, cfg)
    q_model = build_eval_model(state_dict, art_cfg, ctx.device)
    logits_fn = make_logits_fn(q_model, cfg.compile_model and ctx.on_cuda, eval_shapes(cfg, ctx.world_size, run.accum))
    graphs = run.stepper.graphs
    q_loss, q_bpb = evaluate_standard(logits_fn, run.val_tokens, run.tables, cfg.eval_seq_len,
                                      val_batch_seqs(cfg, ctx.world_size, run.accum), ctx.device, ctx.rank,
                                      ctx.world_size, progress=True, graphs=graphs)
    ctx.log(f"int5 round trip (standard): val_loss {q_loss:.4f} val_bpb {q_bpb:.4f}")
    t = time.perf_counter()
    s_loss, s_bpb = evaluate_sliding(logits_fn, run.val_tokens, run.tables, cfg.eval_seq_len, cfg.eval_stride,
                                     cfg.eval_batch_seqs, ctx.device, ctx.rank, ctx.world_size, progress=True,
                                     graphs=graphs)
    ctx.log(f"int5 sliding window (stride {cfg.eval_stride}): val_loss {s_loss:.4f} val_bpb {s_bpb:.4f} "
            f"({time.perf_counter() - t:.1f}s)")
    out = {"int5_val_loss": q_loss, "int5_val_bpb": q_bpb, "int5_sliding_val_loss": s_loss,
           "int5_sliding_val_bpb": s_bpb, "artifact": str(path)}
    out.update({k: sizes[k] for k in ("model_bytes", "code_bytes", "total_bytes") if k in sizes})
    return out


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def eval_shapes(cfg: Config, world_size: int, accum: int) -> list[tuple[int, int]]:
    """The (batch, seq) shapes of the standard and the sliding-window evaluation batches."""
    return [(val_batch_seqs(cfg, world_size, accum), cfg.eval_seq_len), (cfg.eval_batch_seqs, cfg.eval_seq_len)]


def make_logits_fn(model: GPT, compile_model: bool, shapes: list[tuple[int, int]]):
    """The model's logits function for evaluation batches of these shapes (compiled on CUDA)."""
    for batch_seqs, seq_len in shapes:
        model.choose_kernels(batch_seqs, seq_len, training=False)
    if compile_model:
        return torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
    return model.forward_logits


def val_batch_seqs(cfg: Config, world_size: int, accum: int) -> int:
    """The seed's VAL_BATCH_SIZE split: sequences per standard-evaluation batch over ranks and micro-steps."""
    return max(1, cfg.val_batch_size // (world_size * accum * cfg.eval_seq_len))


def validation_figures(run: Run) -> tuple[float, float]:
    """Standard (non-overlapping) evaluation of the model's current weights -> (val_loss, val_bpb)."""
    was_training = run.model.training
    run.model.eval()
    try:
        return evaluate_standard(run.logits_fn, run.val_tokens, run.tables, run.cfg.eval_seq_len,
                                 val_batch_seqs(run.cfg, run.ctx.world_size, run.accum), run.ctx.device,
                                 run.ctx.rank, run.ctx.world_size, graphs=run.stepper.graphs)
    finally:
        run.model.train(was_training)


def validate(run: Run) -> None:
    val_loss, val_bpb = validation_figures(run)
    cfg, ms = run.cfg, run.clock.total_ms
    run.ctx.log(f"step {run.step}/{cfg.iterations} val_loss {val_loss:.4f} val_bpb {val_bpb:.4f} "
                f"train_time {ms / 1000:.1f}s step_avg {ms / max(run.step, 1):.1f}ms")
    run.record(event="val", step=run.step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=ms)
    run.live = {"val_loss": val_loss, "val_bpb": val_bpb}


# ---------------------------------------------------------------------------
# Signals, plots, helpers
# ---------------------------------------------------------------------------
class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (torchrun, schedulers) ask the loop to checkpoint and stop after the
    current step; a second signal interrupts at once. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: writing a checkpoint after this step (again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _clone_state(obj):
    """A deep copy of a state dict's tensors, lists and dicts."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return obj


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
    train_points = [(r["step"], r["train_loss"]) for r in records if "event" not in r]
    val_points = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train loss", lw=1)
    if val_points:
        ax.plot(*zip(*val_points), "o-", label="val loss (live weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(path.stem)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return str(path)
