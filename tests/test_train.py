"""recycore/train.py on CPU with a tiny model on tiny shards: the loss falls,
outputs are written, resume is exact, the warm-up restores its start, late QAT
and SWA/EMA follow their thresholds, Ctrl-C and SIGTERM checkpoint, 2 gloo ranks match one
process, and bad input fails early with a clear message."""
import argparse
import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from recycore.config import Config
from recycore.data import DistributedTokenLoader, write_shard
from recycore.model import GPT
from recycore.checkpoint import WeightAverages, effective_ema_decay, load_checkpoint
from recycore.cli import add_train_arguments, run_train
from recycore.config import PRESETS
from recycore.training import train
from helpers import requires_cuda

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees near "
         "quiet water and children read long stories about brave knights distant mountains bright stars").split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A SentencePiece model trained here on generated text, and train/val shards."""
    import random

    import sentencepiece as spm

    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    # Sentences from a small grammar: learnable structure, so the loss can fall.
    lines = [" ".join(rng.choice(WORDS[i % 8::8]) for i in range(rng.randint(6, 14))) + "." for _ in range(3000)]
    text_path = root / "corpus.txt"
    text_path.write_text("\n".join(lines[:400]))
    spm.SentencePieceTrainer.train(input=str(text_path), model_prefix=str(root / "tok"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    ids = [t for line in lines for t in sp.encode(line) + [sp.eos_id()]]
    data = root / "shards"
    data.mkdir()
    cut = len(ids) * 9 // 10
    write_shard(data / "tiny_train_000000.bin", ids[:cut // 2])
    write_shard(data / "tiny_train_000001.bin", ids[cut // 2:cut])
    write_shard(data / "tiny_val_000000.bin", ids[cut:])
    return dict(data_path=str(data), tokenizer_path=str(root / "tok.model"), vocab_size=sp.vocab_size())


TINY = dict(PRESETS["ci"], num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
            recycle_layers=(0,), ve_layers=(1,), xsa_last_n=1, bigram_vocab_size=64, bigram_dim=16, ve_dim=16,
            train_seq_len=32, train_batch_tokens=256, eval_seq_len=32, eval_stride=16, eval_batch_seqs=16,
            val_batch_size=1024, val_max_tokens=1024)


def tiny_cfg(data, **overrides):
    return Config(**{**TINY, **data, **overrides})


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def train_losses(metrics_path):
    return {r["step"]: r["train_loss"] for r in read_jsonl(metrics_path) if "event" not in r}


# ---------------------------------------------------------------------------
def test_cli_run_loss_falls_and_writes_outputs(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = ["--preset", "ci", "--run-id", "cli", "--iterations", "40", "--warmdown-iters", "10",
             "--val-loss-every", "20", "--checkpoint-every", "20"]
    for key, value in {**TINY, **tiny_data}.items():
        if key not in PRESETS["ci"] or PRESETS["ci"][key] != value:
            flags += ["--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    results = run_train(parser.parse_args(flags))
    assert results["steps"] == 40 and results["run_id"] == "cli"
    losses = train_losses("logs/cli.jsonl")
    assert losses[1] > 5.0  # ~ln(320) at the start
    assert losses[40] < losses[1] - 1.5, losses
    events = read_jsonl("logs/cli.jsonl")
    vals = [r for r in events if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [0, 20, 40] and vals[-1]["val_loss"] < vals[0]["val_loss"] - 1.0
    assert any(r.get("event") == "late_qat" and r["step"] == 39 for r in events)  # (40-39)/10 < 0.15
    for key in ("live_val_bpb", "prequant_val_bpb", "int5_val_bpb", "int5_sliding_val_bpb"):
        assert 0 < results[key] < 10, (key, results[key])
    # mult < 0.2 only at step 39: one SWA snapshot, so the EMA is used
    assert results["averaging"] == "ema" and results["swa_snapshots"] == 1
    assert os.path.getsize("logs/cli.png") > 1000 and "step 40/40" in open("logs/cli.txt").read()
    assert os.path.exists("checkpoints/cli/step_000020.pt")
    final = load_checkpoint("checkpoints/cli/final.pt")
    assert final["step"] == 40 and final["averaging"] == "ema" and final["averaged"].keys() == final["model"].keys()
    ema_skip = final["ema"]["skip_weights"]
    assert torch.equal(final["averaged"]["skip_weights"], ema_skip)
    assert not torch.equal(final["model"]["skip_weights"], ema_skip)  # live weights, to resume from
    assert results["total_bytes"] == results["model_bytes"] + results["code_bytes"]


def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    # Warm-down over all 8 steps: SWA (threshold 0.6) from step 5, late QAT at step 7.
    cfg = tiny_cfg(tiny_data, run_id="full", iterations=8, warmdown_iters=8, swa_threshold=0.6, swa_every=1,
                   checkpoint_every=5, train_log_every=1)
    full = train(cfg, checkpoint_dir=tmp_path / "ckpt", log_dir=tmp_path / "logs")
    resumed = train(cfg.replace(checkpoint_every=0), checkpoint_dir=tmp_path / "ckpt2", log_dir=tmp_path / "logs2",
                    resume=tmp_path / "ckpt" / "full" / "step_000005.pt")
    a, b = train_losses(tmp_path / "logs" / "full.jsonl"), train_losses(tmp_path / "logs2" / "full.jsonl")
    assert [b[s] for s in (6, 7, 8)] == [a[s] for s in (6, 7, 8)]
    assert resumed["prequant_val_bpb"] == full["prequant_val_bpb"]
    assert full["averaging"] == "swa" and 0 < full["ema_val_bpb"] < 10  # the EMA reported beside the kept SWA
    end_a, end_b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for key in ("model", "ema"):
        for name, tensor in end_a[key].items():
            assert torch.equal(tensor, end_b[key][name]), (key, name)
    assert end_a["swa"]["count"] == end_b["swa"]["count"] == 4 and end_a["qat"] and end_b["qat"]


def test_warmup_steps_restore_the_start(tiny_data, tmp_path):
    base = tiny_cfg(tiny_data, iterations=3, train_log_every=1, val_max_tokens=64)
    train(base.replace(run_id="cold"), checkpoint_dir=tmp_path, log_dir=tmp_path)
    train(base.replace(run_id="warm", warmup_steps=2), checkpoint_dir=tmp_path, log_dir=tmp_path)
    assert train_losses(tmp_path / "cold.jsonl") == train_losses(tmp_path / "warm.jsonl")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_writes_a_checkpoint_that_resumes(tiny_data, tmp_path, monkeypatch, sig):
    """SIGTERM (torchrun, schedulers) is handled like Ctrl-C: a checkpoint at the next step boundary,
    both previous handlers restored, and the run resumes from it."""
    calls = {"n": 0}
    original = DistributedTokenLoader.next_batch

    def next_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3
            os.kill(os.getpid(), sig)
        return original(self, *args)

    monkeypatch.setattr(DistributedTokenLoader, "next_batch", next_batch)
    # Python's default, or SIG_IGN in a background job
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cfg = tiny_cfg(tiny_data, run_id=sig.name.lower(), iterations=1000)
    out = train(cfg, checkpoint_dir=tmp_path, log_dir=tmp_path)
    assert out["interrupted"] and out["step"] == 3 and out["signal"] == sig.name
    assert load_checkpoint(out["checkpoint"])["step"] == 3
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    monkeypatch.setattr(DistributedTokenLoader, "next_batch", original)
    resumed = train(cfg.replace(iterations=5, val_max_tokens=64), checkpoint_dir=tmp_path, log_dir=tmp_path,
                    resume=out["checkpoint"])
    assert resumed["steps"] == 5


# ---------------------------------------------------------------------------
def test_weight_average_selection():
    assert effective_ema_decay(Config()) == 0.997  # the seed's 20,000 iterations keep 0.997
    assert effective_ema_decay(Config(iterations=300)) == pytest.approx(1 - 10 / 300)
    torch.manual_seed(0)
    model = GPT(tiny_cfg({}, vocab_size=64))
    avg = WeightAverages(model, decay=0.5)
    start = {k: v.float().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.skip_weights.add_(1.0)
    avg.update_ema(model)
    assert avg.choice() == "ema"
    assert torch.allclose(avg.averaged_state(model)["skip_weights"], start["skip_weights"] + 0.5)
    avg.add_swa(model)
    assert avg.choice() == "ema"  # one snapshot is not an average
    with torch.no_grad():
        model.skip_weights.add_(1.0)
    avg.add_swa(model)
    assert avg.choice() == "swa"
    state = avg.averaged_state(model)
    assert torch.allclose(state["skip_weights"], start["skip_weights"] + 1.5)
    assert state["tok_emb.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------
def _rank_worker(rank, port, cfg_dict, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(Config(**cfg_dict), checkpoint_dir=out_dir, log_dir=out_dir, device="cpu")


def test_two_gloo_ranks_match_one_process(tiny_data, tmp_path):
    """2 ranks x 1 micro-batch == 1 process x 2 micro-batches (the same tokens), on the CPU wherever this
    runs (on a CUDA machine the ranks would want a GPU each)."""
    cfg = tiny_cfg(tiny_data, iterations=3, train_log_every=1, val_max_tokens=256)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist_cfg = cfg.replace(run_id="ranks", grad_accum_steps=1)
    args = (port, {k: v for k, v in dist_cfg.__dict__.items()}, str(tmp_path))
    mp.spawn(_rank_worker, args=args, nprocs=2)
    single = train(cfg.replace(run_id="single", grad_accum_steps=2), checkpoint_dir=tmp_path, log_dir=tmp_path,
                   device="cpu")
    got = load_checkpoint(tmp_path / "ranks" / "final.pt")
    ref = load_checkpoint(single["checkpoint"])
    a, b = train_losses(tmp_path / "ranks.jsonl"), train_losses(tmp_path / "single.jsonl")
    assert a[1] == pytest.approx(b[1], rel=1e-6)  # the same first step's loss
    torch.manual_seed(cfg.seed)
    init = GPT(cfg).state_dict()
    for name, want in ref["model"].items():
        moved = (want.float() - init[name].float()).norm().clamp_min(1e-12)
        assert (got["model"][name].float() - want.float()).norm() / moved < 5e-2, name
    assert got["data"] == ref["data"] and got["step"] == ref["step"] == 3


# ---------------------------------------------------------------------------
def test_a_device_that_is_not_there_is_one_clear_error():
    from recycore.errors import RecycoreError
    from recycore.runtime import process_context

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any on a CPU machine
    with pytest.raises(RecycoreError, match=f"^device {missing}: this machine has \\d+ CUDA GPU"):
        process_context(missing)


@requires_cuda
def test_the_context_puts_the_tf32_switches_back():
    """Training turns TF32 on (as the seed does); a caller's later fp32 matmuls get their own setting back."""
    from recycore.runtime import process_context

    backends = torch.backends
    before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    try:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = False, True
        ctx = process_context("cuda:0")
        ctx.start()
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
        ctx.stop()
        assert (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32) == (False, True)
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = before


def test_bad_input_fails_early(tiny_data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="divisible"):
        train(tiny_cfg(tiny_data, train_batch_tokens=250), checkpoint_dir=tmp_path, log_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        train(tiny_cfg(tiny_data, data_path=str(tmp_path / "nowhere")), checkpoint_dir=tmp_path, log_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        train(tiny_cfg(tiny_data, tokenizer_path=str(tmp_path / "no.model")), checkpoint_dir=tmp_path,
              log_dir=tmp_path)
    with monkeypatch.context() as env:
        env.setenv("RANK", "0")
        env.setenv("WORLD_SIZE", "3")
        with pytest.raises(ValueError, match="must divide 8"):
            train(tiny_cfg(tiny_data, grad_accum_steps=0), checkpoint_dir=tmp_path, log_dir=tmp_path)
    assert not torch.distributed.is_initialized()


def test_bad_checkpoints_are_refused(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, run_id="ck", iterations=1, val_max_tokens=64)
    path = train(cfg, checkpoint_dir=tmp_path, log_dir=tmp_path)["checkpoint"]
    with pytest.raises(ValueError, match="different model config: model_dim"):
        train(cfg.replace(model_dim=64), checkpoint_dir=tmp_path, log_dir=tmp_path, resume=path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a recycore training checkpoint"):
        train(cfg, checkpoint_dir=tmp_path, log_dir=tmp_path, resume=foreign)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
