"""The command line a user meets (#19): `recycore eval ARTIFACT` with no flags reproduces the training
run's int5 figures, refuses another tokenizer, every flag's --help shows its default, runs end on one
readable summary, and errors name what the file is and the field the user set."""
import io
import json
import shutil

import pytest
import torch

from test_train import TINY, tiny_data  # noqa: F401 (a fixture: the tokenizer and shards trained there)

from recycore import cli
from recycore.artifact import read_artifact
from recycore.config import PRESETS, Config
from recycore.console import Progress
from recycore.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):  # noqa: F811
    """A tiny training run: its results and its folder (final.pt, final_model.int5.ptz)."""
    root = tmp_path_factory.mktemp("run")
    cfg = Config(**{**TINY, **tiny_data, "run_id": "tiny", "iterations": 4, "val_max_tokens": 512})
    results = train(cfg, checkpoint_dir=root / "checkpoints", log_dir=root / "logs")
    return results, root


def run_cli(argv, capsys) -> tuple[str, str]:
    cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def cli_error(argv, capsys) -> str:
    """The one-line error of a failing command (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------
# eval reproduces the run
# ---------------------------------------------------------------------------
def test_export_then_eval_reproduces_the_runs_int5_figures(trained_run, tmp_path, monkeypatch, capsys):
    results, root = trained_run
    artifact = tmp_path / "exported.int5.ptz"
    out, _ = run_cli(["export", root / "checkpoints" / "tiny" / "final.pt", "-o", artifact], capsys)
    assert "eval settings, data and tokenizer are recorded" in out
    record = read_artifact(artifact)["evaluation"]
    assert record["eval_seq_len"] == TINY["eval_seq_len"] and record["val_max_tokens"] == 512
    assert len(record["tokenizer_sha256"]) == 64 and record["tokenizer_vocab_size"] == 320

    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded paths are absolute
    # the same figures; on a GPU eval runs the packed matrices through K3 (training evaluates the dequantised
    # model with cuBLAS), the same sums in another order, bf16 activations rounded apart: within the bound
    # test_artifact.py holds --int5-direct to against the dequantised eval of a model this small
    same = (lambda x: pytest.approx(x, abs=1e-3)) if torch.cuda.is_available() else (lambda x: x)
    for path in (artifact, root / "checkpoints" / "tiny" / "final_model.int5.ptz"):
        out, _ = run_cli(["eval", path, "--json", tmp_path / "eval.json"], capsys)
        got = json.loads((tmp_path / "eval.json").read_text())
        assert got["standard"]["val_bpb"] == same(results["int5_val_bpb"]), path
        assert got["sliding"]["val_bpb"] == same(results["int5_sliding_val_bpb"]), path
        assert got["eval_stride"] == TINY["eval_stride"] and got["val_tokens"] == 512
        assert "as the artifact records" in out and "(sha256 as recorded)" in out
        lines = out.strip().splitlines()
        headline = next(line for line in lines if line.startswith("val_bpb "))
        assert f"{got['sliding']['val_bpb']:.6f}" in headline and "of 16,000,000 bytes" in headline
        assert "{" not in out  # the JSON goes to the file, not the terminal

    # flags still override what the artifact records
    run_cli(["eval", artifact, "--mode", "standard", "--val-max-tokens", "256", "--json", tmp_path / "e.json"], capsys)
    assert json.loads((tmp_path / "e.json").read_text())["val_tokens"] == 256


def test_eval_with_another_tokenizer_is_refused(trained_run, tiny_data, tmp_path, capsys):  # noqa: F811
    _, root = trained_run
    artifact = root / "checkpoints" / "tiny" / "final_model.int5.ptz"
    other = tmp_path / "other.model"
    shutil.copy(tiny_data["tokenizer_path"], other)
    with open(other, "ab") as f:
        f.write(b"\n")  # another file: another sha256
    recorded = read_artifact(artifact)["evaluation"]["tokenizer_sha256"]
    from recycore.artifact import file_sha256

    err = cli_error(["eval", artifact, "--tokenizer-path", other, "--mode", "standard"], capsys)
    assert f"sha256 {file_sha256(other)[:16]}" in err and f"sha256 {recorded[:16]}" in err
    assert "--allow-other-tokenizer" in err and len(err.strip().splitlines()) == 1


def test_eval_names_a_recorded_path_that_is_gone(trained_run, tmp_path, capsys):
    _, root = trained_run
    obj = read_artifact(root / "checkpoints" / "tiny" / "final_model.int5.ptz")
    obj["evaluation"]["data_path"] = str(tmp_path / "moved")
    from helpers import write_raw_artifact

    moved = write_raw_artifact(tmp_path / "moved.ptz", obj)
    err = cli_error(["eval", moved], capsys)
    assert f"read its data from {tmp_path / 'moved'}, which is not here; pass --data-path" in err


# ---------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_describes_every_flag_with_its_default(command, capsys):
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert options or command == "data"
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), (command, action.dest)
        if action.option_strings:
            assert "default" in action.help, (command, action.option_strings, action.help)
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: recycore {command}") and sub.description in " ".join(text.split())


def test_each_command_lists_only_its_flags():
    def flags(command):
        sub = next(a for a in cli.build_parser([command])._actions if a.dest == "command").choices[command]
        return {s for a in sub._actions for s in a.option_strings}

    assert "--num-layers" in flags("export") and "--eval-stride" not in flags("export")
    assert "--matrix-lr" not in flags("eval") and "--allow-other-tokenizer" in flags("eval")
    assert "--data-path" not in flags("demo") and "--iterations" in flags("demo")
    assert "--iterations" not in flags("bench") and "--kernels" in flags("bench")
    assert {"--iterations", "--data-path", "--eval-stride", "--kernels"} <= flags("train")


def test_bad_values_name_the_flag_and_the_type(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["train", "--num-layers", "x"])
    assert "argument --num-layers: expected an integer, got 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", "ckpt.pt", "--mlp-mult", "wide"])
    assert "argument --mlp-mult: expected a number, got 'wide'" in capsys.readouterr().err
    monkeypatch.setenv("NUM_LAYERS", "twelve")
    err = cli_error(["train", "--preset", "ci"], capsys)
    assert "environment variable NUM_LAYERS='twelve': expected an integer" in err


# ---------------------------------------------------------------------------
# Errors that blame the right thing
# ---------------------------------------------------------------------------
def test_a_training_checkpoint_given_to_eval(trained_run, capsys):
    _, root = trained_run
    path = root / "checkpoints" / "tiny" / "final.pt"
    err = cli_error(["eval", path], capsys)
    assert f"{path} is a training checkpoint (run tiny, step 4), not an artifact; export it first with " \
           f"`recycore export {path} -o final.int5.ptz`" in err


def test_config_errors_blame_the_field_the_user_set(monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIM", "7")
    err = cli_error(["train", "--preset", "ci"], capsys)
    assert "invalid config: model_dim=7 (with num_heads=4)" in err
    monkeypatch.delenv("MODEL_DIM")
    err = cli_error(["train", "--preset", "ci", "--num-heads", "3"], capsys)
    assert "invalid config: num_heads=3 (with model_dim=64)" in err
    err = cli_error(["train", "--num-layers", "2"], capsys)  # the seed's recycle_layers (3, 4) need more
    assert "invalid config: num_layers=2 (with recycle_layers=(3, 4))" in err
    with pytest.raises(ValueError, match="invalid config: num_heads=8 .with model_dim=7.: model_dim must be"):
        Config(model_dim=7)  # nobody said which: the old blame


def test_a_truncated_checkpoint_is_one_short_line(trained_run, tmp_path, capsys, monkeypatch):
    _, root = trained_run
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((root / "checkpoints" / "tiny" / "final.pt").read_bytes()[:20_000])
    for argv in (["export", truncated], ["eval", truncated], ["train", "--resume", truncated]):
        err = cli_error(argv, capsys)
        assert len(err.strip().splitlines()) == 1 and len(err) < 240 and "Traceback" not in err, err
        assert "truncated" in err
    monkeypatch.setenv("RECYCORE_DEBUG", "1")
    with pytest.raises(ValueError) as info:
        cli.main(["export", str(truncated)])
    assert info.value.__cause__ is not None  # torch's own words, for whoever asks


# ---------------------------------------------------------------------------
# Summaries and progress
# ---------------------------------------------------------------------------
def test_training_and_demo_end_on_the_headline(trained_run, tiny_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    results, root = trained_run
    log = (root / "logs" / "tiny.txt").read_text().strip().splitlines()
    start = max(i for i, line in enumerate(log) if line.startswith("val_bpb "))
    summary = log[start:]
    assert len(summary) <= 9  # the headline, then a short table
    assert summary[0].startswith(f"val_bpb {results['int5_sliding_val_bpb']:.6f}  int5 artifact, sliding window")
    assert any("int5 artifact, standard" in line for line in summary)
    assert any("ms/step" in line and "peak memory" in line for line in summary)
    assert not any(line.startswith("final {") for line in log)
    final = [json.loads(line) for line in open(root / "logs" / "tiny.jsonl") if '"final"' in line]
    assert final and final[-1]["int5_sliding_val_bpb"] == results["int5_sliding_val_bpb"]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(PRESETS, "demo", {**TINY, "iterations": 2, "val_max_tokens": 256,
                                          "vocab_size": tiny_data["vocab_size"]})
    monkeypatch.setattr("recycore.demo.ensure_demo_data",
                        lambda root: (tiny_data["data_path"], tiny_data["tokenizer_path"]))
    out, err = run_cli(["demo"], capsys)
    last = out.strip().splitlines()
    assert last[-1].startswith("val_bpb ") and "of 16,000,000 bytes" in last[-1]
    assert not any(line.lstrip().startswith(("{", '"')) for line in last[-15:])
    assert "{" not in err


def test_progress_lines_are_sparse_off_a_terminal():
    stream = io.StringIO()
    with Progress(1000, "work", "windows", interval=0.0, stream=stream) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 11 and "work: 1000/1000 windows (100%)" in lines[-1] and "left" in lines[-1]
    quiet = io.StringIO()
    with Progress(1000, "work", interval=60.0, stream=quiet) as bar:
        bar.update(1000)
    assert quiet.getvalue() == ""  # a loop shorter than the interval prints nothing
