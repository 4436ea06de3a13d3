"""`eqx-mtp train` tried as a new user would: one-line errors that name the flag and
create nothing, `--resume` and reruns of finished runs, the effective config and
`--help`; and a run written by eqx_mtp 0.1.0, loaded and continued."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from helpers import TINY_JOB, tiny_config

import eqx_mtp
from eqx_mtp.train._cli import _parser, main
from eqx_mtp.train._config import TrainConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _error(capsys, args) -> str:
    """The one line a bad `eqx-mtp train` prints, after checking it exits 2 without
    a traceback."""
    code = main(["train", "--no-progress", "--num-devices", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("eqx-mtp train: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "values, field",
    [
        ({"steps": "two"}, "steps"),
        ({"learning_rate": "3e-4"}, "learning_rate"),
        ({"optimizer": {"learning_rate": "3e-4"}}, "learning_rate"),
        ({"depth_final_norm": 1}, "depth_final_norm"),
        ({"seq_len": 1.5}, "seq_len"),
    ],
)
def test_a_config_file_of_the_wrong_type_is_one_line(
    corpus, tmp_path, monkeypatch, capsys, values, field
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(values))
    message = _error(capsys, ["--config", "c.json", "--data", corpus])
    assert f"c.json: {field} must be" in message
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_creates_no_run_and_resume_picks_a_run_with_a_checkpoint(
    corpus, tmp_path, monkeypatch, capsys
):
    """`--data nope` creates nothing, so a later `--resume` still finds the older run
    that holds a checkpoint; `eqx-mtp generate` without `--run` reads the same run."""
    monkeypatch.chdir(tmp_path)
    older = tmp_path / "runs" / "20200101-000000"
    shutil.copytree(FIXTURES / "run_v0_1_0", older)
    (tmp_path / "runs" / "20200101-000001").mkdir()  # a run that never saved
    assert "nope" in _error(capsys, ["--data", "nope"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "20200101-000000",
        "20200101-000001",
    ]
    # The newest run holding a checkpoint is the one continued: its stored config
    # is compared (and refused here), not "no checkpoint to continue".
    message = _error(capsys, ["--resume", "--data", corpus])
    assert str(older.relative_to(tmp_path)) in message and "--dim" in message
    code = main(["generate", "--prompt", "d", "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


def test_generate_without_runs_names_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run" in err[0] and "runs/" in err[0], err


def test_bad_data_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = _error(capsys, ["--data", ""])
    assert "--data" in message and "empty" in message
    (tmp_path / "one.txt").write_text("a single document\nof two lines\n")
    message = _error(capsys, ["--data", "one.txt"])
    assert "--data one.txt" in message and "blank line" in message
    assert "split_documents" not in message
    assert not (tmp_path / "runs").exists()


def test_help_has_a_line_for_every_flag(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    for action in _parser()._subparsers._group_actions[0].choices["train"]._actions:
        assert action.help, action.dest
        assert action.help.count("default") <= 1, action.help
    assert "one of reference, blockwise, auto" in " ".join(text.split())


def test_flat_and_nested_layouts_compose_the_same_config(corpus):
    flat = dict(TINY_JOB, data=corpus, learning_rate=0.01, mesh="data=1")
    config = TrainConfig.from_dict(flat)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.model == tiny_config(vocab_size=eqx_mtp.train.BYTE_VOCAB_SIZE)
    assert config.optimizer.learning_rate == 0.01
    assert config.data.path == corpus and config.mesh.axes == "data=1"


def test_a_run_of_version_0_1_0_loads(tmp_path):
    """Every model array as 0.1.0 loaded it, and its stored config."""
    model, stored = eqx_mtp.train.load_checkpoint(FIXTURES / "run_v0_1_0")
    expected = np.load(FIXTURES / "run_v0_1_0_model.npz")

    leaves = jax.tree_util.tree_leaves_with_path(model)
    arrays = {jax.tree_util.keystr(path): leaf for path, leaf in leaves}
    arrays = {k: v for k, v in arrays.items() if hasattr(v, "shape")}
    assert sorted(arrays) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(np.asarray(arrays[name]), expected[name], name)
    assert stored["model"]["dim"] == 16 and stored["train"]["data"] == "tiny.txt"


def test_a_run_of_version_0_1_0_continues(tmp_path, monkeypatch, capsys):
    """Continued for one more step from its own config.json (the layout before the
    sections) and its corpus."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_v0_1_0", run)
    shutil.copy(FIXTURES / "run_v0_1_0_corpus.txt", tmp_path / "tiny.txt")
    args = ["train", "--no-progress", "--config", str(run / "config.json")]
    assert main(args + ["--run", str(run), "--steps", "3", "--num-devices", "1"]) == 0
    assert "continuing from the checkpoint of step 2" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3]
    assert np.isfinite(records[-1]["eval"]["depth_losses"]).all()
    assert eqx_mtp.train.Checkpointer(run / "checkpoints").steps()[-1] == 3
    effective = json.loads((run / "config.json").read_text())
    assert effective["run"]["steps"] == 3 and effective["data"]["path"] == "tiny.txt"
