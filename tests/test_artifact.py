"""recycore.artifact: the seed's container, round trips, clear errors, export/eval commands."""
import io
import lzma

import pytest
import torch

from helpers import write_raw_artifact

from recycore import artifact, quant
from recycore.cli import main as cli_main
from recycore.config import Config
from recycore.data import write_shard
from recycore.evaluate import ByteTables, evaluate_standard
from recycore.model import GPT
from recycore.checkpoint import select_weights
from recycore.errors import ArtifactError

# model_dim 256: the MLP matrices (768x256) go int5 and the embedding (1024x256) int8.
CFG = Config(num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=3.0, ve_layers=(2, 3),
             recycle_layers=(1,), xsa_last_n=2, rope_dims=8, bigram_vocab_size=64, vocab_size=1024,
             eval_seq_len=64, eval_stride=32, eval_batch_seqs=4, compile_model=False)


@pytest.fixture(scope="module")
def trained():
    """A tiny model after two AdamW steps (so the zero-initialised projections are no
    longer zero; more steps cost seconds each on a shared CPU)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, CFG.vocab_size, (4, 33))
    for _ in range(2):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "model.int5.ptz"
    result = artifact.export_artifact(trained, CFG, path, scheme="seed")
    return path, result


def direct_round_trip(state_dict, cfg, scheme):
    """quantise -> dequantise without any file, for comparison."""
    flat = quant.unbank_state_dict(state_dict, cfg.num_layers)
    w, m = quant.quantize_state_dict(flat, scheme)
    return w, m, quant.rebank_state_dict(quant.dequantize_state_dict(w, m, flat), cfg.num_layers, state_dict)


# ---------------------------------------------------------------------------
# Container and round trip
# ---------------------------------------------------------------------------
def test_container_is_the_seeds(exported, trained):
    path, result = exported
    blob = path.read_bytes()
    assert result["model_bytes"] == len(blob)
    assert result["total_bytes"] == result["model_bytes"] + result["code_bytes"]
    assert result["code_bytes"] == result["code_bytes_raw"] > result["code_bytes_lzma"] > 0
    assert blob.startswith(b"\xfd7zXZ\x00")  # xz container, as lzma.compress writes it
    obj = torch.load(io.BytesIO(lzma.decompress(blob)), weights_only=True)
    assert list(obj) == ["w", "m", "config", "scheme", "int5_storage"]
    w, m, _ = direct_round_trip(trained, CFG, "seed")
    assert obj["m"] == m and list(obj["w"]) == list(w)
    for name in w:
        assert obj["w"][name].dtype == w[name].dtype and torch.equal(obj["w"][name], w[name]), name
    kinds = [f if isinstance(f, str) else f["type"] for f in m.values()]
    assert kinds.count("int5_packed") == 4 * 2 and kinds.count("int8") == 2  # tok_emb, ve_shared.embed


def test_seed_style_reader_loads_ours(exported, trained):
    """The seed's loader reads only obj["w"] and obj["m"]; the extra keys do not disturb it."""
    path, _ = exported
    obj = torch.load(io.BytesIO(lzma.decompress(path.read_bytes())), map_location="cpu")
    flat_template = quant.unbank_state_dict(trained, CFG.num_layers)
    flat = quant.dequantize_state_dict(obj["w"], obj["m"], flat_template)
    GPT(CFG).load_state_dict(quant.rebank_state_dict(flat, CFG.num_layers, trained))


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_artifact_round_trip_gives_identical_tensors(trained, tmp_path, scheme):
    path = tmp_path / "a.ptz"
    artifact.export_artifact(trained, CFG, path, scheme=scheme)
    sd, cfg, info = artifact.load_artifact(path)
    _, _, expected = direct_round_trip(trained, CFG, scheme)
    assert cfg.to_dict() == CFG.replace(eval_seq_len=2048, eval_stride=64, eval_batch_seqs=32,
                                        compile_model=True).to_dict()  # model fields from the artifact
    assert info["scheme"] == scheme and info["has_config"]
    assert set(sd) == set(trained)
    for name in trained:
        assert sd[name].dtype == trained[name].dtype and torch.equal(sd[name], expected[name]), name


def test_int5_stored_as_int8_loads_to_the_same_tensors(trained, tmp_path):
    packed, as_int8 = tmp_path / "packed.ptz", tmp_path / "int8.ptz"
    artifact.export_artifact(trained, CFG, packed, scheme="rowmse")
    artifact.export_artifact(trained, CFG, as_int8, scheme="rowmse", int5_storage="int8")
    sd_packed, _, _ = artifact.load_artifact(packed)
    sd_int8, _, info = artifact.load_artifact(as_int8)
    assert info["formats"]["blocks.0.mlp.fc.weight"] == {"type": "int8"}
    obj = artifact.read_artifact(as_int8)
    assert obj["w"]["blocks.0.mlp.fc.weight.q"].abs().max() <= 15
    for name in trained:
        assert torch.equal(sd_packed[name], sd_int8[name]), name


def test_seed_artifact_without_config_needs_one(trained, tmp_path):
    w, m, expected = direct_round_trip(trained, CFG, "seed")
    path = write_raw_artifact(tmp_path / "seed.ptz", {"w": w, "m": m})
    with pytest.raises(ArtifactError, match="carries no config"):
        artifact.load_artifact(path)
    sd, cfg, info = artifact.load_artifact(path, CFG)
    assert cfg is CFG and not info["has_config"]
    for name in trained:
        assert torch.equal(sd[name], expected[name]), name


def test_loaded_config_keeps_the_callers_eval_settings(exported):
    path, _ = exported
    _, cfg, _ = artifact.load_artifact(path, Config(eval_stride=16, val_max_tokens=999))
    assert cfg.num_layers == CFG.num_layers and cfg.model_dim == CFG.model_dim
    assert cfg.eval_stride == 16 and cfg.val_max_tokens == 999


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------
def test_truncated_artifact(exported, tmp_path):
    path, _ = exported
    bad = tmp_path / "truncated.ptz"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ArtifactError, match="not a complete LZMA stream.*truncated or corrupted"):
        artifact.load_artifact(bad, CFG)


def test_corrupted_artifact(exported, tmp_path):
    blob = bytearray(exported[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "corrupted.ptz"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        artifact.load_artifact(bad, CFG)


def test_not_a_torch_container(tmp_path):
    bad = tmp_path / "text.ptz"
    bad.write_bytes(lzma.compress(b"hello, not a zip file", preset=9))
    with pytest.raises(ArtifactError, match="not a readable torch.save container"):
        artifact.load_artifact(bad, CFG)
    with pytest.raises(ArtifactError, match="lacks the 'w'"):
        artifact.load_artifact(write_raw_artifact(tmp_path / "list.ptz", [1, 2, 3]), CFG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        artifact.load_artifact(tmp_path / "missing.ptz", CFG)


def test_config_that_does_not_match_the_tensors(trained, tmp_path):
    w, m, _ = direct_round_trip(trained, CFG, "seed")
    path = write_raw_artifact(tmp_path / "seed.ptz", {"w": w, "m": m})
    with pytest.raises(ArtifactError, match=r"blocks.0.mlp.fc.weight has shape \(768, 256\).*expects \(512, 256\)"):
        artifact.load_artifact(path, CFG.replace(mlp_mult=2.0))
    with pytest.raises(ArtifactError, match="holds tensor blocks.3.* that the config's model does not have"):
        artifact.load_artifact(path, CFG.replace(num_layers=3, ve_layers=(1, 2), recycle_layers=(1,)))
    tampered = write_raw_artifact(tmp_path / "tampered.ptz", {"w": w, "m": m,
                                                              "config": {**CFG.model_dict(),
                                                                         "model_dim": 128}})
    with pytest.raises(ArtifactError, match="tampered.ptz: .*shape"):
        artifact.load_artifact(tampered)


def test_missing_tensor(trained, tmp_path):
    w, m, _ = direct_round_trip(trained, CFG, "seed")
    del w["blocks.2.mlp.fc.weight.scale"]
    path = write_raw_artifact(tmp_path / "missing.ptz", {"w": w, "m": m})
    with pytest.raises(ArtifactError, match="lacks tensor blocks.2.mlp.fc.weight.scale"):
        artifact.load_artifact(path, CFG)


def test_export_checks_the_state_dict_against_the_config(trained, tmp_path):
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight|mlp_up_bank has shape"):
        artifact.export_artifact(trained, CFG.replace(mlp_mult=2.0), tmp_path / "x.ptz")
    with pytest.raises(ValueError, match="missing tok_emb.weight"):
        artifact.export_artifact({k: v for k, v in trained.items() if k != "tok_emb.weight"}, CFG, tmp_path / "x")


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------
@pytest.fixture
def eval_data(tmp_path, monkeypatch):
    """A validation shard, and byte tables of one byte per token (a placeholder tokenizer file)."""
    g = torch.Generator().manual_seed(5)
    (tmp_path / "tok.model").write_bytes(b"placeholder: load_tokenizer is replaced below")
    write_shard(tmp_path / "tiny_val_000000.bin", torch.randint(0, CFG.vocab_size, (64 * 5 + 1,), generator=g))
    import recycore.evaluate as evaluate

    tables = ByteTables(torch.ones(CFG.vocab_size, dtype=torch.int16), torch.zeros(CFG.vocab_size, dtype=torch.bool),
                        torch.zeros(CFG.vocab_size, dtype=torch.bool))
    monkeypatch.setattr(evaluate, "load_tokenizer", lambda path, vocab: None)
    monkeypatch.setattr(evaluate, "build_byte_tables", lambda sp, vocab: tables)
    return tmp_path, tables


def test_export_then_eval_matches_the_dequantised_model(trained, tmp_path, eval_data, capsys):
    data_dir, tables = eval_data
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"model": {"_orig_mod." + k: v for k, v in trained.items()}, "config": CFG.to_dict(),
                "step": 2}, checkpoint)
    out = tmp_path / "m.ptz"
    cli_main(["export", str(checkpoint), "-o", str(out), "--scheme", "rowmse"])
    printed = capsys.readouterr().out
    assert "model bytes:" in printed and "code bytes:" in printed and "to spare" in printed

    results_file = tmp_path / "r.json"
    cli_main(["eval", str(out), "--data-path", str(data_dir), "--tokenizer-path", str(data_dir / "tok.model"),
              "--eval-seq-len", "64", "--eval-stride", "32",
              "--eval-batch-seqs", "3", "--num-layers", "12", "--json", str(results_file),
              "--device", "cpu"])  # the reference below is the CPU's fp32 model: the same sums, to 1e-9
    printed = capsys.readouterr().out
    assert "NUM_LAYERS=12 ignored" in printed and "int5 artifact, standard" in printed
    assert "int5 artifact, sliding" in printed
    import json
    results = json.loads(results_file.read_text())

    _, _, expected = direct_round_trip(trained, CFG, "rowmse")
    model = GPT(CFG)
    model.load_state_dict(expected)
    model.eval()
    from recycore.data import load_validation_tokens
    from recycore.evaluate import evaluate_sliding
    val = load_validation_tokens(data_dir, 64)
    ref_std = evaluate_standard(model.forward_logits, val, tables, 64, 3, "cpu")
    ref_sw = evaluate_sliding(model.forward_logits, val, tables, 64, 32, 3, "cpu")
    assert results["standard"]["val_bpb"] == pytest.approx(ref_std[1], rel=1e-9)
    assert results["sliding"]["val_bpb"] == pytest.approx(ref_sw[1], rel=1e-9)
    model.load_state_dict(trained)  # and the round trip costs little with rowmse
    assert results["standard"]["val_bpb"] == pytest.approx(
        evaluate_standard(model.forward_logits, val, tables, 64, 3, "cpu")[1], rel=0.01)


def test_export_over_budget_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    """Over the budget the export refuses, names the file it did not write, and an artifact already
    there stays byte-identical (no temporary file is left either); --allow-over-budget writes it."""
    checkpoint = tmp_path / "plain.pt"
    torch.save(trained, checkpoint)  # a plain state dict: the config comes from the flags
    flags = ["--num-layers", "4", "--model-dim", "256", "--num-heads", "4", "--num-kv-heads", "2",
             "--ve-layers", "2,3", "--recycle-layers", "1", "--xsa-last-n", "2", "--rope-dims", "8",
             "--bigram-vocab-size", "64"]
    out = tmp_path / "o.ptz"
    out.write_bytes(b"the previous artifact")
    monkeypatch.setattr(artifact, "BUDGET_BYTES", 100_000)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(checkpoint), "-o", str(out), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bytes over the 100,000-byte budget; nothing was written to " + str(out) in err
    assert out.read_bytes() == b"the previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.ptz", "plain.pt"]
    cli_main(["export", str(checkpoint), "-o", str(out), "--allow-over-budget", *flags])
    assert "OVER by" in capsys.readouterr().out
    assert artifact.read_artifact(out)["scheme"] == "seed"


def test_failed_export_writes_nothing(trained, tmp_path, capsys):
    """An export that fails (a state dict that does not fit the config) says it wrote nothing, and an
    artifact already there stays byte-identical, with no temporary file beside it."""
    out = tmp_path / "o.ptz"
    out.write_bytes(b"the previous artifact")
    with pytest.raises(ArtifactError, match=r"mlp_up_bank has shape .*; nothing was written to " + str(out)):
        artifact.export_artifact(trained, CFG.replace(mlp_mult=2.0), out)
    checkpoint = tmp_path / "plain.pt"
    torch.save(trained, checkpoint)  # the CLI: flags that do not fit the state dict
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(checkpoint), "-o", str(out), "--num-layers", "4", "--model-dim", "128",
                  "--num-heads", "4", "--num-kv-heads", "2", "--ve-layers", "2,3", "--recycle-layers", "1",
                  "--xsa-last-n", "2", "--rope-dims", "8", "--bigram-vocab-size", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("recycore export: error: ") and f"nothing was written to {out}" in err
    assert out.read_bytes() == b"the previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.ptz", "plain.pt"]


def test_eval_of_a_broken_artifact_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not a complete LZMA stream" in err and "Traceback" not in err


def test_checkpoint_weights_follow_the_seeds_rule():
    live = {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.ones(3)}
    ema = {"a": torch.full((2,), 2.0), "b": torch.full((3,), 2.0)}
    swa = {"sum": {"a": torch.full((2,), 9.0), "b": torch.full((3,), 9.0)}, "count": 3}
    chosen, which = select_weights({"model": live, "ema": ema, "swa": swa}, "auto")
    assert which == "swa" and chosen["a"].dtype == torch.bfloat16 and chosen["b"].tolist() == [3.0] * 3
    chosen, which = select_weights({"model": live, "ema": ema, "swa": {**swa, "count": 1}}, "auto")
    assert which == "ema" and chosen["a"].tolist() == [2.0, 2.0] and chosen["a"].dtype == torch.bfloat16
    assert select_weights({"model": live, "ema": None, "swa": None}, "auto")[1] == "model"
    with pytest.raises(ValueError, match="no SWA average"):
        select_weights({"model": live, "ema": ema, "swa": None}, "swa")


def test_fit_floor_picks_the_smallest_floor_that_fits(trained, monkeypatch):
    code = artifact.code_sizes()["raw"]
    finest = len(artifact.serialize_artifact(trained, CFG, "rowfloor:0.0"))  # the name is stored: spell it as fit_floor does
    coarsest = len(artifact.serialize_artifact(trained, CFG, "rowfloor"))
    assert coarsest < finest
    monkeypatch.setattr(artifact, "BUDGET_BYTES", code + (finest + coarsest) // 2)
    scheme = artifact.fit_floor(trained, CFG, steps=2, log=lambda msg: None)
    floor = quant.scheme_floor(scheme)
    assert 0 < floor < 1 / 15
    assert code + len(artifact.serialize_artifact(trained, CFG, scheme)) <= artifact.BUDGET_BYTES
    monkeypatch.setattr(artifact, "BUDGET_BYTES", code + finest)
    assert artifact.fit_floor(trained, CFG, log=lambda msg: None) == "rowfloor:0.0"


def test_eval_int5_direct_matches_the_dequantised_eval(trained, tmp_path, eval_data, capsys):
    """`recycore eval --int5-direct` (packed weights through K3) gives the dequantised eval's val_bpb."""
    data_dir, _ = eval_data
    out = tmp_path / "m.ptz"
    artifact.export_artifact(trained, CFG, out, scheme="seed")
    results = {}
    for flag in ("--int5-direct", "--no-int5-direct"):
        path = tmp_path / f"{flag}.json"
        cli_main(["eval", str(out), "--data-path", str(data_dir), "--tokenizer-path", str(data_dir / "tok.model"),
                  "--eval-seq-len", "64", "--eval-batch-seqs", "3",
                  "--mode", "standard", "--json", str(path), flag])
        import json
        results[flag] = json.loads(path.read_text())
    printed = capsys.readouterr().out
    assert "int5 matrices packed at 5.00 bits/weight" in printed and "(dequantised)" in printed
    direct, dense = results["--int5-direct"], results["--no-int5-direct"]
    assert direct["int5_direct"] and not dense["int5_direct"]
    assert abs(direct["standard"]["val_bpb"] - dense["standard"]["val_bpb"]) < 1e-3
    assert direct["weight_bytes"]["total"] < dense["weight_bytes"]["total"]
