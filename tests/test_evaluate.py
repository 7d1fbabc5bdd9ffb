import math

import pytest
import torch

from recycore.data import read_shard
from recycore.evaluate import (build_byte_tables, evaluate_sliding, evaluate_standard, load_tokenizer,
                               sliding_windows)


@pytest.fixture(scope="module")
def demo(demo_data):
    data_path, tokenizer_path = demo_data
    sp = load_tokenizer(tokenizer_path, 1024)
    return sp, build_byte_tables(sp, 1024), read_shard(next(data_path.glob("demo_val_*.bin"))).long()


def test_byte_tables_count_the_utf8_bytes_of_decoded_text(demo):
    sp, tables, val = demo
    bos = (val == sp.bos_id()).nonzero().flatten().tolist()
    for start, end in zip(bos[:5], bos[1:6]):  # whole documents: [BOS] + pieces
        doc = val[start:end]
        counted = tables.count(doc[:-1], doc[1:]).sum().item()
        assert counted == len(sp.decode(doc[1:].tolist()).encode("utf-8"))
    text = "naïve café — 東京 ✓ \x07"  # multi-byte characters and byte-fallback pieces
    ids = torch.tensor([sp.bos_id()] + sp.encode(text))
    assert tables.count(ids[:-1], ids[1:]).sum().item() == len(sp.decode(ids[1:].tolist()).encode("utf-8"))


def test_tokenizer_errors(tmp_path, demo_data):
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        load_tokenizer(tmp_path / "missing.model", 1024)
    with pytest.raises(ValueError, match="VOCAB_SIZE=512 does not match"):
        load_tokenizer(demo_data[1], 512)


@pytest.mark.parametrize("total, seq_len, stride", [(5000, 2048, 64), (100, 2048, 64), (2049, 2048, 64),
                                                     (1000, 128, 32), (777, 64, 64)])
def test_sliding_windows_score_every_target_once(total, seq_len, stride):
    counts = torch.zeros(total, dtype=torch.long)
    for i, (start, length, first) in enumerate(sliding_windows(total, seq_len, stride)):
        assert 0 < length <= seq_len and start + length <= total
        counts[start + first:start + length] += 1
        if i > 0 and start > 0:  # every later window scores only its tail, with full context before it
            assert length == seq_len and length - first <= stride
    assert torch.all(counts == 1)


class BigramCounts(torch.nn.Module):
    """A stand-in language model whose logits depend on the previous token only."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.randn(vocab, vocab)

    def forward(self, ids):
        return self.table[ids]


def test_sliding_equals_standard_when_stride_is_seq_len(demo):
    _, tables, val = demo
    val = val[:64 * 20 + 1]
    model = BigramCounts(1024)
    standard = evaluate_standard(model, val, tables, seq_len=64, batch_seqs=7, device="cpu")
    sliding = evaluate_sliding(model, val, tables, seq_len=64, stride=64, batch_seqs=5, device="cpu")
    assert sliding == pytest.approx(standard, rel=1e-9)
    # A previous-token model sees the same context at any stride, except at window starts.
    strided = evaluate_sliding(model, val, tables, seq_len=64, stride=16, batch_seqs=5, device="cpu")
    assert strided[0] == pytest.approx(standard[0], rel=0.05)


def test_uniform_model_bpb(demo):
    _, tables, val = demo
    val = val[:32 * 10 + 1]
    loss, bpb = evaluate_standard(lambda ids: torch.zeros(*ids.shape, 1024), val, tables, 32, 4, "cpu")
    assert loss == pytest.approx(math.log(1024))
    tokens_per_byte = 320 / tables.count(val[:-1], val[1:]).sum().item()
    assert bpb == pytest.approx(10 * tokens_per_byte)


@pytest.mark.parametrize("n_tokens, seq_len, stride, batch_seqs, world_size", [
    (1000, 64, 16, 7, 1), (1000, 64, 16, 7, 3), (65, 64, 16, 4, 1), (640, 64, 64, 10, 1), (300, 64, 50, 3, 2)])
def test_batch_shapes_are_the_shapes_the_evaluations_run(n_tokens, seq_len, stride, batch_seqs, world_size):
    """warm_up compiles what batch_shapes lists: exactly the input shapes each evaluation runs."""
    from recycore.evaluate import ByteTables, batch_shapes

    val = torch.randint(0, 16, (n_tokens,))
    tables = ByteTables(torch.ones(16, dtype=torch.int16), torch.zeros(16, dtype=torch.bool),
                        torch.zeros(16, dtype=torch.bool))
    for mode, evaluate in (("standard", lambda f, r: evaluate_standard(f, val, tables, seq_len, batch_seqs, "cpu", r,
                                                                       world_size)),
                           ("sliding", lambda f, r: evaluate_sliding(f, val, tables, seq_len, stride, batch_seqs,
                                                                     "cpu", r, world_size))):
        for rank in range(world_size):
            seen = set()

            def logits_fn(x):
                seen.add(tuple(x.shape))
                return torch.zeros(*x.shape, 16)

            evaluate(logits_fn, rank)
            assert seen == batch_shapes(n_tokens, seq_len, stride, batch_seqs, (mode,), rank, world_size)


def test_eval_command_compiles_every_batch_shape_before_timing(demo_data, monkeypatch):
    """`recycore eval` on CUDA (here faked on the CPU): every batch shape the timed evaluations run was
    already run by the warm-up, whose time is reported apart."""
    import types

    import recycore.evaluate as evaluate_module
    from recycore import cli
    from recycore.config import Config

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    cfg = Config(data_path=str(demo_data[0]), tokenizer_path=str(demo_data[1]), eval_seq_len=64, eval_stride=48,
                 eval_batch_seqs=5, val_max_tokens=1500)
    ctx = types.SimpleNamespace(on_cuda=True, device=torch.device("cpu"), rank=0, world_size=1)
    shapes = {"warm-up": set(), "timed": set()}
    phase = ["timed"]
    real_warm_up = evaluate_module.warm_up

    def warm_up(*args):
        phase[0] = "warm-up"
        real_warm_up(*args)
        phase[0] = "timed"

    def logits_fn(x):
        shapes[phase[0]].add(tuple(x.shape))
        return torch.zeros(*x.shape, cfg.vocab_size)

    monkeypatch.setattr(evaluate_module, "warm_up", warm_up)
    results = cli._evaluate_modes("both", logits_fn, cfg, ctx)
    assert results["warmup_seconds"] >= 0 and results["sliding"]["eval_seconds"] >= 0
    assert len(shapes["timed"]) >= 2 and shapes["timed"] == shapes["warm-up"]
