"""Reliability (#15): no code runs from a file, no run is lost, no artifact is clobbered.

* every command that reads a file refuses a pickle that would run code (and never runs it);
* writes are atomic: a failing writer or export leaves the destination as it was;
* a time-based checkpoint interval (training seconds), a non-finite loss that stops the run after
  checkpointing the last finite step, data that cannot feed training refused before it starts,
  a finished run never overwritten (SIGINT/SIGTERM: tests/test_train.py);
* fault injection and fuzzing: a checkpoint writer SIGKILLed mid-write, and a few hundred mutated
  artifacts and checkpoints, each refused with the package's own one-line error or loaded
  identically, never another exception, never a hang.
CPU only, tiny models; `pytest -s` prints the fuzz counts."""
import argparse
import ast
import collections
import copy
import faulthandler
import io
import lzma
import multiprocessing
import os
import random
import re
import signal
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_raw_artifact
from test_train import tiny_cfg, tiny_data  # noqa: F401  (tiny_data is a fixture)

from recycore import artifact, int5_model, training
from recycore.checkpoint import (CHECKPOINT_KEYS, WeightAverages, check_model_config, load_checkpoint, load_weights,
                                 save_checkpoint)
from recycore.cli import add_train_arguments, run_train
from recycore.cli import main as cli_main
from recycore.config import Config
from recycore.data import DistributedTokenLoader, ShardError, write_shard
from recycore.errors import ArtifactError, CheckpointError, DataError, RecycoreError
from recycore.files import atomic_write
from recycore.model import GPT
from recycore.optim import OptimizerSet
from recycore.training import NonFiniteLossError, train

pytestmark = pytest.mark.usefixtures("one_thread")
PACKAGE = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# 1. No code runs from a file
# ---------------------------------------------------------------------------
class Payload:
    """Unpickling this calls exec(): it writes the marker file. (weights_only=True never gets that far.)"""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture
def hostile_files(tmp_path):
    """A checkpoint and an artifact whose unpickling would run code, and the marker it would write."""
    marker = tmp_path / "MARKER"
    checkpoint = tmp_path / "evil.pt"
    torch.save({key: Payload(marker) for key in CHECKPOINT_KEYS}, checkpoint)
    packed = write_raw_artifact(tmp_path / "evil.ptz", {"w": {"x": Payload(marker)}, "m": {"x": "passthrough"}})
    return marker, checkpoint, packed


def test_the_hostile_files_do_run_code_when_loaded_unsafely(hostile_files):
    marker, checkpoint, packed = hostile_files
    torch.load(checkpoint, weights_only=False)  # what every command must never do
    assert marker.read_text() == "code ran"
    marker.unlink()
    torch.load(io.BytesIO(lzma.decompress(packed.read_bytes())), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["export", "eval", "eval --int5-direct", "train --resume"])
def test_every_command_refuses_a_file_that_would_run_code(hostile_files, command, tmp_path, monkeypatch, capsys):
    marker, checkpoint, packed = hostile_files
    monkeypatch.chdir(tmp_path)
    argv = {"export": ["export", str(checkpoint), "-o", str(tmp_path / "out.ptz")],
            "eval": ["eval", str(packed)],
            "eval --int5-direct": ["eval", str(packed), "--int5-direct"],
            "train --resume": ["train", "--resume", str(checkpoint)]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    name = command.split()[0]
    assert lines[0].startswith(f"recycore {name}: error: ") and "Traceback" not in captured.err
    assert "holds objects other than tensors and plain data; refused" in lines[0], lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out.ptz").exists() and not (tmp_path / "checkpoints").exists()


def test_recycore_debug_shows_the_torch_error_behind_the_line(hostile_files, monkeypatch):
    _, checkpoint, packed = hostile_files
    monkeypatch.setenv("RECYCORE_DEBUG", "1")
    import pickle

    with pytest.raises(CheckpointError) as info:
        cli_main(["export", str(checkpoint)])
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(ArtifactError) as info:
        cli_main(["eval", str(packed)])
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def _package_sources() -> list[Path]:
    return sorted((PACKAGE / "recycore").rglob("*.py")) + sorted((PACKAGE / "kernels").rglob("*.py"))


def _calls(tree, module: str, name: str):
    """The calls module.name(...) in a parsed file, each with the lambdas it is nested in."""
    def walk(node, lambdas):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node, lambdas
        for child in ast.iter_child_nodes(node):
            yield from walk(child, lambdas + [node] if isinstance(node, ast.Lambda) else lambdas)
    yield from walk(tree, [])


def test_every_load_in_the_package_is_data_only():
    """Every torch.load passes weights_only=True; nothing else deserialises code (pickle, numpy's
    allow_pickle, torch.jit, marshal, eval/exec)."""
    loads = 0
    for path in _package_sources():
        text = path.read_text()
        assert "weights_only=False" not in text, path
        for call, _ in _calls(ast.parse(text), "torch", "load"):
            keywords = {k.arg: k.value for k in call.keywords}
            assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, \
                f"{path.name}:{call.lineno}"
            loads += 1
        for module, name in (("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("jit", "load")):
            assert not list(_calls(ast.parse(text), module, name)), f"{path.name}: {module}.{name}"
        for unsafe in (r"allow_pickle\s*=\s*True", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            assert not re.search(unsafe, text), f"{path.name}: {unsafe}"
    assert loads >= 2  # the walk sees the real loads (checkpoint.read_checkpoint, artifact.read_artifact, ...)


# ---------------------------------------------------------------------------
# 2. Atomic writes
# ---------------------------------------------------------------------------
def test_a_writer_that_fails_midway_leaves_the_destination_untouched(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"the previous file")

    def half_then_fail(f):
        f.write(b"half of the new")
        f.flush()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, half_then_fail)
    assert dest.read_bytes() == b"the previous file"

    def interrupted(f):
        f.write(b"x" * 10_000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", interrupted)
    with pytest.raises(Exception):  # torch cannot pickle a lambda: it fails after writing part of the zip
        save_checkpoint(dest, {"model": {"w": torch.zeros(1000)}, "hook": lambda: None})
    assert dest.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary file, no new.bin
    atomic_write(dest, lambda f: f.write(b"new"))
    assert dest.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_the_package_writes_files_only_atomically():
    """Outputs go through recycore.files (the logs, append-only, are the exception): no other file
    is opened for writing, and torch.save writes into a buffer or an atomic_write callback's file."""
    saves = 0
    for path in sorted((PACKAGE / "recycore").rglob("*.py")):
        if path.name == "files.py":
            continue
        text = path.read_text()
        for pattern in (r"\.write_bytes\(", r"\.write_text\(", r"(?<![.\w])open\([^)]*[\"'][wx]b?\+?[\"']", r"np\.save",
                        r"\.savefig\((?!f,)", r"\.to_csv\(", r"json\.dump\("):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"
        for call, lambdas in _calls(ast.parse(text), "torch", "save"):
            target = call.args[1] if len(call.args) > 1 else None
            assert isinstance(target, ast.Name) and (target.id == "buf" or lambdas), f"{path.name}:{call.lineno}"
            saves += 1
    assert saves == 2  # checkpoint.save_checkpoint, artifact.serialize_artifact


# The failing export (a state dict that does not fit the config) is in tests/test_artifact.py, next to
# the over-budget one.


# ---------------------------------------------------------------------------
# 3. Checkpoints on training time (signals: tests/test_train.py)
# ---------------------------------------------------------------------------
def test_checkpoint_seconds_counts_training_time_only(tiny_data, tmp_path, monkeypatch):
    """A fake clock: each step takes 1 s, each validation 100 s. CHECKPOINT_SECONDS=2.5 of training
    time checkpoints after steps 3 and 6 of 7 (validation time never counts)."""
    now = [1000.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: now[0], strftime=time.strftime))
    next_batch, evaluate = DistributedTokenLoader.next_batch, training.evaluate_standard

    def one_second_step(self, *args):
        now[0] += 1.0
        return next_batch(self, *args)

    def slow_validation(*args, **kwargs):
        now[0] += 100.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(DistributedTokenLoader, "next_batch", one_second_step)
    monkeypatch.setattr(training, "evaluate_standard", slow_validation)
    cfg = tiny_cfg(tiny_data, run_id="timed", iterations=7, checkpoint_every=0, checkpoint_seconds=2.5,
                   val_loss_every=1, val_max_tokens=64)
    out = train(cfg, checkpoint_dir=tmp_path, log_dir=tmp_path)
    written = sorted(p.name for p in (tmp_path / "timed").glob("step_*.pt"))
    assert written == ["step_000003.pt", "step_000006.pt"], written
    assert load_checkpoint(tmp_path / "timed" / "step_000006.pt")["training_time_ms"] == 6000.0
    assert out["training_time_ms"] == 7000.0
    monkeypatch.undo()
    train(cfg.replace(run_id="never", checkpoint_seconds=0, val_loss_every=0, iterations=3), checkpoint_dir=tmp_path,
          log_dir=tmp_path)
    assert not list((tmp_path / "never").glob("step_*.pt"))


# ---------------------------------------------------------------------------
# 4. A non-finite loss
# ---------------------------------------------------------------------------
def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _same(a, b) -> bool:
    """Deep equality of checkpoint contents: tensors equal in dtype, shape and every value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(
                    torch.nan_to_num(a, nan=12345.0), torch.nan_to_num(b, nan=12345.0)))))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_loss_stops_after_checkpointing_the_last_finite_step(tiny_data, tmp_path, monkeypatch, poison):
    bad_step = 3
    saved = []  # (file name, the state saved), each checkpoint in order
    save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda path, obj: (saved.append((Path(path).name, _clone(obj))),
                                                                         save(path, obj))[1])
    forward, calls, weights_then = GPT.forward, [0], {}

    def blows_up_at_step_3(self, ids, targets):
        loss = forward(self, ids, targets)
        calls[0] += 1
        if calls[0] == bad_step:  # one micro-batch per step: this is step 3's forward
            weights_then.update((k, v.detach().clone()) for k, v in self.state_dict().items())
            return loss * poison
        return loss

    monkeypatch.setattr(GPT, "forward", blows_up_at_step_3)
    cfg = tiny_cfg(tiny_data, run_id="blowup", iterations=10, checkpoint_every=1, val_max_tokens=64)
    with pytest.raises(NonFiniteLossError) as info:  # on the CPU: a replayed graph would not call forward
        train(cfg, checkpoint_dir=tmp_path, log_dir=tmp_path, device="cpu")
    message = str(info.value)
    path = tmp_path / "blowup" / f"step_{bad_step - 1:06d}.pt"
    assert isinstance(info.value, RecycoreError) and "\n" not in message
    assert f"loss is {poison} at step {bad_step};" in message and str(path) in message, message
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == bad_step - 1
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights_then.items()) and weights_then
    # ... and everything a resume needs is the state after step 2, as the periodic checkpoint of step 2 has it
    periodic, stopped = [obj for name, obj in saved if name == path.name]
    assert [name for name, _ in saved] == ["step_000001.pt", path.name, path.name]
    for key in ("model", "optimizers", "ema", "swa", "data", "step", "qat"):
        assert _same(periodic[key], stopped[key]), key
    assert not (tmp_path / "blowup" / "final.pt").exists()


class _NonFiniteGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (as a bf16 overflow in backward gives)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_gradient_stops_before_it_reaches_the_weights(tiny_data, tmp_path, monkeypatch):
    forward, calls, weights_then = GPT.forward, [0], {}

    def bad_gradient_at_step_3(self, ids, targets):
        loss = forward(self, ids, targets)
        calls[0] += 1
        if calls[0] == 3:
            weights_then.update((k, v.detach().clone()) for k, v in self.state_dict().items())
            return _NonFiniteGradient.apply(loss)  # the loss stays finite
        return loss

    monkeypatch.setattr(GPT, "forward", bad_gradient_at_step_3)
    cfg = tiny_cfg(tiny_data, run_id="badgrad", iterations=10, val_max_tokens=64)
    with pytest.raises(RecycoreError) as info:  # on the CPU, as above
        train(cfg, checkpoint_dir=tmp_path, log_dir=tmp_path, device="cpu")
    path = tmp_path / "badgrad" / "step_000002.pt"
    assert str(path) in str(info.value), str(info.value)
    ckpt = load_checkpoint(path)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights_then.items())


# ---------------------------------------------------------------------------
# 5. Data that cannot feed training; finished runs
# ---------------------------------------------------------------------------
def test_data_that_cannot_feed_training_is_refused_before_it_starts(tiny_data, tmp_path):
    source = Path(tiny_data["data_path"])
    val, train_shards = source / "tiny_val_000000.bin", sorted(source.glob("*_train_*.bin"))
    outputs = dict(checkpoint_dir=tmp_path / "ckpt", log_dir=tmp_path / "logs")

    empty = tmp_path / "empty"
    for name in ("tiny_train_000000.bin", "tiny_train_000001.bin"):
        write_shard(empty / name, [])
    (empty / val.name).write_bytes(val.read_bytes())
    with pytest.raises(DataError, match=r"train shards in .*empty hold no tokens \(tiny_train_000000.bin, "
                                        r"tiny_train_000001.bin\)"):
        train(tiny_cfg(tiny_data, data_path=str(empty)), **outputs)

    short = tmp_path / "short"
    for shard in train_shards:
        (short / shard.name).parent.mkdir(exist_ok=True)
        (short / shard.name).write_bytes(shard.read_bytes())
    write_shard(short / "tiny_val_000000.bin", list(range(20)))
    with pytest.raises(DataError, match=r"validation split .*short \(tiny_val_000000.bin: 20 tokens\) is shorter "
                                        r"than one sequence of 32 tokens"):
        train(tiny_cfg(tiny_data, data_path=str(short)), **outputs)

    (short / val.name).write_bytes(val.read_bytes())
    damaged = short / train_shards[1].name
    damaged.write_bytes(damaged.read_bytes()[:-7])
    with pytest.raises(ShardError, match=f"{damaged.name}: file is .* truncated or corrupt"):
        train(tiny_cfg(tiny_data, data_path=str(short)), **outputs)
    assert not outputs["checkpoint_dir"].exists() and not outputs["log_dir"].exists()  # refused before any output


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 3-step run (SWA from step 2) with a mid-run checkpoint at step 2."""
    root = tmp_path_factory.mktemp("finished")
    cfg = tiny_cfg(tiny_data, run_id="done", iterations=3, warmdown_iters=3, swa_threshold=0.7, swa_every=1,
                   checkpoint_every=2, val_max_tokens=64)
    train(cfg, checkpoint_dir=root / "ckpt", log_dir=root / "logs")
    return cfg, root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_overwritten(finished_run, tmp_path):
    cfg, root = finished_run
    final = root / "ckpt" / "done" / "final.pt"
    before = _files(root)
    assert {"ckpt/done/final.pt", "ckpt/done/final_model.int5.ptz", "logs/done.txt", "logs/done.jsonl"} <= set(before)
    outputs = dict(checkpoint_dir=root / "ckpt", log_dir=root / "logs")
    with pytest.raises(CheckpointError, match="run done already finished .*final.pt.*--overwrite"):
        train(cfg, **outputs)  # a new run under the finished run's id
    with pytest.raises(CheckpointError, match="finished at step 3 of 3: nothing to resume.*--iterations"):
        train(cfg.replace(run_id=""), resume=final, **outputs)
    assert _files(root) == before
    extended = train(cfg.replace(run_id="", iterations=4), resume=final, **outputs)
    assert extended["run_id"] == "done-from3" and extended["steps"] == 4
    after = _files(root)
    assert {k: v for k, v in after.items() if k in before} == before  # not one byte of the finished run changed
    assert "ckpt/done-from3/final.pt" in after and "logs/done-from3.txt" in after


def test_cli_extends_a_finished_run_under_a_new_run_id(finished_run, tmp_path):
    cfg, root = finished_run
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    (ckpt_dir / "done").mkdir(parents=True)
    (ckpt_dir / "done" / "final.pt").write_bytes((root / "ckpt" / "done" / "final.pt").read_bytes())
    results = run_train(parser.parse_args(["--resume", str(ckpt_dir / "done" / "final.pt"), "--iterations", "4",
                                           "--checkpoint-dir", str(ckpt_dir), "--log-dir", str(log_dir)]))
    assert results["run_id"] == "done-from3" and results["steps"] == 4


# ---------------------------------------------------------------------------
# 6a. A checkpoint writer killed mid-write
# ---------------------------------------------------------------------------
def _keep_saving(path: str, template: dict, first: int, conn) -> None:
    """Save checkpoints step first, first+1, ... to `path` until killed; report each completed one."""
    step = first
    while True:
        template["step"] = step
        template["payload"].fill_(float(step))
        save_checkpoint(path, template)
        conn.send(step)
        step += 1


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(finished_run, tmp_path):
    _, root = finished_run
    base = load_checkpoint(root / "ckpt" / "done" / "step_000002.pt")
    template = {**base, "payload": torch.zeros(1 << 20)}  # 4 MB: most of the loop is spent writing
    path = tmp_path / "step.pt"
    template["step"], template["payload"] = 0, torch.zeros(1 << 20)
    save_checkpoint(path, template)
    rng, context, kills, mid_write = random.Random(15), multiprocessing.get_context("fork"), 6, 0
    for _ in range(kills):
        committed = load_checkpoint(path)["step"]
        receiver, sender = context.Pipe(duplex=False)
        writer = context.Process(target=_keep_saving, args=(str(path), template, committed + 1, sender), daemon=True)
        writer.start()
        reported = [receiver.recv() for _ in range(2)]  # two complete saves, then a random moment
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        while receiver.poll():
            reported.append(receiver.recv())
        strays = list(tmp_path.glob(".step.pt.*.tmp"))
        mid_write += bool(strays)
        for stray in strays:  # what a SIGKILL cannot clean up (the destination itself is intact)
            stray.unlink()
        ckpt = load_checkpoint(path)  # loadable, and exactly the last complete save
        assert ckpt["step"] in (reported[-1], reported[-1] + 1), (ckpt["step"], reported)
        assert torch.equal(ckpt["payload"], torch.full((1 << 20,), float(ckpt["step"])))
        assert all(_same(ckpt[k], base[k]) for k in base if k != "step")
    print(f"\nkilled writer {kills}x: {mid_write} mid-write (a temporary file left), the checkpoint intact each time")
    assert mid_write >= 1


# ---------------------------------------------------------------------------
# 6b. Fuzzing: mutated artifacts and checkpoints
# ---------------------------------------------------------------------------
FUZZ_CASES = 300  # of each file kind
CASE_LIMIT_S = 30.0  # the watchdog ends the test process (with a traceback) past this

# Tiny, but the MLP matrices (576 x 128) go int5 and the embedding (640 x 128) int8.
ART_CFG = Config(num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1, mlp_mult=4.5, ve_layers=(1,),
                 recycle_layers=(0,), xsa_last_n=1, rope_dims=8, bigram_vocab_size=64, bigram_dim=16, ve_dim=16,
                 vocab_size=640, compile_model=False)


def mutate_bytes(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(("truncate", "bit flips", "insert"))
    data = bytearray(blob)
    if kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "bit flips":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 32))
    return kind, bytes(data)


def _tensor_leaves(obj, path=()):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensor_leaves(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensor_leaves(v, (*path, i))


def _set(obj, path, value):
    """A copy of `obj` with the leaf at `path` replaced (containers on the way copied)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: _set(obj[head], rest, value)}
    items = list(obj)
    items[head] = _set(items[head], rest, value)
    return type(obj)(items)


def _reshaped(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat[:-1] if flat.numel() > 1 else torch.cat((flat, flat))


def _retyped(t: torch.Tensor) -> torch.Tensor:
    """The same shape, a dtype of the other kind (float <-> integer)."""
    return t.to(torch.int32) if t.is_floating_point() else t.to(torch.float32)


def mutate_object(obj: dict, rng: random.Random, extra_kinds) -> tuple[str, dict]:
    """A structural change: two same-shape tensors exchanged (a well-formed file with other numbers),
    a tensor of another shape or dtype, an entry dropped, or a kind of `extra_kinds`."""
    kind = rng.choice(("swap", "reshape", "retype", "drop", *extra_kinds))
    leaves = list(_tensor_leaves(obj))
    if kind == "swap":
        by_shape = collections.defaultdict(list)
        for path, t in leaves:
            by_shape[(tuple(t.shape), t.dtype)].append(path)
        groups = [paths for paths in by_shape.values() if len(paths) > 1]
        a, b = rng.sample(rng.choice(groups), 2)
        ta, tb = dict(leaves)[a], dict(leaves)[b]
        return kind, _set(_set(obj, a, tb), b, ta)
    if kind in ("reshape", "retype"):
        path, t = rng.choice(leaves)
        return kind, _set(obj, path, (_reshaped if kind == "reshape" else _retyped)(t))
    if kind == "drop":
        path = rng.choice([p for p, _ in leaves] + [(k,) for k in obj])
        container = obj
        for key in path[:-1]:
            container = container[key]
        if isinstance(container, dict):
            pruned = {k: v for k, v in container.items() if k != path[-1]}
        else:
            pruned = type(container)(v for i, v in enumerate(container) if i != path[-1])
        return kind, _set(obj, path[:-1], pruned)
    return kind, extra_kinds[kind](obj, rng)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Fuzz:
    """Runs cases under a watchdog and counts the outcomes: refused (by error type), identical, or a
    well-formed file with other numbers (only a swap of two same-shape tensors may give that)."""

    def __init__(self, what: str):
        self.what, self.outcomes, self.errors, self.kinds = what, collections.Counter(), collections.Counter(), {}
        self.slowest, self.problems, self.examples = 0.0, [], {}

    def run(self, case: int, kind: str, load, compare) -> None:
        start = time.perf_counter()
        faulthandler.dump_traceback_later(CASE_LIMIT_S, exit=True)
        try:
            loaded = load()
        except RecycoreError as exc:
            message = str(exc)
            outcome = "refused"
            self.errors[type(exc).__name__] += 1
            self.examples.setdefault(kind, f"{type(exc).__name__}: {message}")
            if "\n" in message or len(message) > 400:
                self.problems.append(f"case {case} ({kind}): not one short line: {message!r:.600}")
        except Exception as exc:  # noqa: BLE001 (the point: no other type may escape)
            outcome = "OTHER"
            self.problems.append(f"case {case} ({kind}): {type(exc).__name__}: {str(exc)[:300]}")
        else:
            outcome = "identical" if compare(loaded) else "other numbers"
            if outcome == "other numbers" and kind != "swap":
                self.problems.append(f"case {case} ({kind}): loaded with other numbers")
        finally:
            faulthandler.cancel_dump_traceback_later()
        self.slowest = max(self.slowest, time.perf_counter() - start)
        self.outcomes[outcome] += 1
        self.kinds.setdefault(kind, collections.Counter())[outcome] += 1

    def summary(self) -> str:
        kinds = "; ".join(f"{k}: {dict(v)}" for k, v in sorted(self.kinds.items()))
        return (f"{self.what}: {sum(self.outcomes.values())} mutations -> {dict(self.outcomes)}; errors by type "
                f"{dict(self.errors)}; by mutation: {kinds}; slowest case {self.slowest:.2f}s")

    def check(self) -> None:
        print("\n" + self.summary() + "".join(f"\n  e.g. {kind}: {example}" for kind, example in
                                              sorted(self.examples.items())))
        assert not self.problems, self.summary() + "\n" + "\n".join(self.problems[:20])
        assert self.outcomes["refused"] > 0 and self.slowest < CASE_LIMIT_S, self.summary()


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ART_CFG)
    with torch.no_grad():
        for p in model.parameters():  # no all-zero projections: every int5 row carries values
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("artifact") / "good.ptz"
    path.write_bytes(artifact.serialize_artifact(model.state_dict(), ART_CFG))
    return path


def _load_artifact_fully(path):
    """What `recycore eval` does with the file: load_artifact (+ the dequantised model) and
    load_int5_model, on the CPU."""
    state_dict, cfg, _ = artifact.load_artifact(path)
    artifact.build_eval_model(state_dict, cfg, "cpu")
    packed, _, _ = int5_model.load_int5_model(path, device="cpu")
    return state_dict, packed.state_dict()


def test_fuzzed_artifacts_are_refused_or_load_identically(small_artifact, tmp_path):
    blob = small_artifact.read_bytes()
    raw = lzma.decompress(blob)
    obj = torch.load(io.BytesIO(raw), weights_only=True)
    reference = _load_artifact_fully(small_artifact)

    def identical(loaded):
        return all(_same(dict(a), dict(b)) for a, b in zip(loaded, reference))

    def reformat(o, rng):  # a tensor's format entry changed
        name = rng.choice(sorted(o["m"]))
        other = rng.choice(["passthrough", {"type": "int8"}, {"type": "int5_packed"}, "bogus", None])
        return {**o, "m": {**o["m"], name: other}}

    def reconfigure(o, rng):  # the recorded model config changed
        field, value = rng.choice([("model_dim", 160), ("num_layers", 3), ("mlp_mult", 4.0), ("vocab_size", 512),
                                   ("num_heads", "two"), ("rope_dims", -8)])
        return {**o, "config": {**o["config"], field: value}}

    rng, fuzz = random.Random(1515), Fuzz("artifacts")
    bad = tmp_path / "mutated.ptz"
    for case in range(FUZZ_CASES):
        level = rng.choice(("file", "file", "inner zip", "object"))
        if level == "file":  # the LZMA stream itself
            kind, data = mutate_bytes(blob, rng)
        elif level == "inner zip":  # the torch.save container inside a valid LZMA stream
            kind, inner = mutate_bytes(raw, rng)
            kind, data = f"inner {kind}", lzma.compress(inner, preset=0)
        else:  # a well-formed container with other contents
            kind, mutated = mutate_object({"w": obj["w"], "m": obj["m"], "config": obj["config"], "scheme": "seed"},
                                          rng, {"format": reformat, "config": reconfigure})
            data = lzma.compress(_torch_bytes(mutated), preset=0)
        bad.write_bytes(data)
        fuzz.run(case, kind, lambda: _load_artifact_fully(bad), identical)
    fuzz.check()


def _restore_target(cfg: Config):
    """A run's objects for training._restore (what `recycore train --resume` fills)."""
    model = GPT(cfg)
    return types.SimpleNamespace(model=model, optimizers=OptimizerSet(model, cfg, device="cpu"),
                                 averages=WeightAverages(model, 0.9), loader=DistributedTokenLoader(cfg.data_path),
                                 clock=types.SimpleNamespace(total_ms=0.0), step=0, last_checkpoint_ms=0.0,
                                 qat_on=False, ctx=types.SimpleNamespace(log=lambda *a, **k: None))


def test_fuzzed_checkpoints_are_refused_or_load_identically(finished_run, tmp_path, monkeypatch):
    cfg, root = finished_run
    good = root / "ckpt" / "done" / "step_000002.pt"
    blob, reference = good.read_bytes(), load_checkpoint(good)
    assert reference["swa"] is not None and reference["optimizers"]["adam"]["state"]  # every part is there
    target = _restore_target(cfg)
    rng_states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    monkeypatch.setattr(artifact, "code_sizes", lambda: {"raw": 0, "lzma": 0, "files": 0})  # speed only
    monkeypatch.setattr(artifact, "LZMA_PRESET", 0)

    def resume(path):
        """What `recycore train --resume` does with the file, up to the first step."""
        ckpt = load_checkpoint(path)
        check_model_config(cfg, ckpt, path)
        training._restore(target, ckpt)
        return ckpt

    def export(path):
        """What `recycore export` does with the file."""
        state_dict, export_cfg, _ = load_weights(path, "auto", Config())
        artifact.export_artifact(state_dict, export_cfg, tmp_path / "exported.ptz")
        return state_dict

    exported = export(good)

    def rescalar(o, rng):  # a scalar or a position made impossible
        key, value = rng.choice([("step", -1), ("step", "2"), ("step", 2.5), ("training_time_ms", float("nan")),
                                 ("data", {**o["data"], "pos": -5}), ("data", {**o["data"], "file_idx": 7}),
                                 ("data", {**o["data"], "files": "x"}), ("swa", {**o["swa"], "count": "1"}),
                                 ("rng", {**o["rng"], "python": (3, (1, 2), None)}), ("optimizers", {}),
                                 ("qat", "yes"), ("config", {**o["config"], "model_dim": 64})])
        return {**o, key: value}

    rng, fuzz, fuzz_export = random.Random(1516), Fuzz("checkpoints (train --resume)"), Fuzz("checkpoints (export)")
    bad = tmp_path / "mutated.pt"
    try:
        for case in range(FUZZ_CASES):
            if rng.random() < 0.6:
                kind, data = mutate_bytes(blob, rng)
            else:
                kind, mutated = mutate_object(reference, rng, {"scalar": rescalar})
                data = _torch_bytes(mutated)
            bad.write_bytes(data)
            fuzz.run(case, kind, lambda: resume(bad), lambda loaded: _same({"qat": False, **loaded}, reference))
            fuzz_export.run(case, kind, lambda: export(bad), lambda loaded: _same(loaded, exported))
    finally:
        torch.set_rng_state(rng_states[0])
        np.random.set_state(rng_states[1])
        random.setstate(rng_states[2])
    fuzz.check()
    fuzz_export.check()


@pytest.mark.parametrize("part", ["model", "ema", "optimizers"])
def test_resuming_a_checkpoint_whose_tensors_do_not_fit_is_one_clear_error(finished_run, tmp_path, part):
    """Before check_checkpoint, a wrong-shaped tensor got through load_checkpoint and failed inside
    _restore with torch's multi-line RuntimeError from load_state_dict (or an optimiser's step later)."""
    cfg, root = finished_run
    ckpt = torch.load(root / "ckpt" / "done" / "step_000002.pt", weights_only=True)
    if part == "model":
        ckpt["model"]["tok_emb.weight"] = ckpt["model"]["tok_emb.weight"][:-1]
    elif part == "ema":
        del ckpt["ema"]["skip_weights"]
    else:
        state = ckpt["optimizers"]["adam"]["state"]
        state[0]["exp_avg"] = state[0]["exp_avg"][:, :-1]
    path = tmp_path / "misfit.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: .*") as info:
        train(cfg.replace(run_id="misfit"), resume=path, checkpoint_dir=tmp_path, log_dir=tmp_path)
    assert "\n" not in str(info.value)
