"""The training job: exact resume, gradient accumulation, checkpoints, CLI errors."""

import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY_JOB, logged_losses, tiny_config, tree_allclose

import eqx_mtp
from eqx_mtp.train._checkpoint import Checkpointer
from eqx_mtp.train._cli import main
from eqx_mtp.train._job import TrainConfig, UserError, train
from eqx_mtp.train._train_step import accumulated_loss_and_grad

TINY = dict(
    TINY_JOB,
    steps=6,
    batch_size=4,
    save_every=3,
    num_devices=1,
)


def _config(corpus, run, **overrides):
    """The tiny job on one device, unless `overrides` say otherwise."""
    return TrainConfig.from_dict(dict(TINY, data=corpus, run=str(run), **overrides))


def _train_losses(run):
    """`{step: [loss, main, depth 1, ...]}` of a run's training lines."""
    return dict(logged_losses(run))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """One uninterrupted run of the tiny job, shared by the tests that compare with it
    or read its outputs (they never write into it): 6 steps, a checkpoint and an
    eval every 3."""
    run = tmp_path_factory.mktemp("straight") / "run"
    summary = train(_config(corpus, run, eval_every=3), progress=False)
    return run, summary


def _copy_until(run, destination, step):
    """A copy of `run` as it stood after `step`: later checkpoints, metrics lines and
    the summary removed."""
    shutil.copytree(run, destination)
    for checkpoint in (destination / "checkpoints").iterdir():
        if int(checkpoint.name) > step:
            shutil.rmtree(checkpoint)
    (destination / "summary.json").unlink()
    lines = (destination / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    (destination / "metrics.jsonl").write_text("\n".join(kept) + "\n")


class _StopAt:
    """Stands in for the job's `StopRequests`: SIGTERM "arrives" during `step`."""

    def __init__(self, step):
        self.step, self.calls, self.signal_name = step, 0, "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def agreed(self):
        self.calls += 1
        return self.calls == self.step


def test_resume_after_sigterm_reproduces_an_uninterrupted_run(
    corpus, straight, tmp_path, monkeypatch
):
    """SIGTERM during step 3, a step that is logged: the run saves and stops with
    `Preempted`, logs step 3 once, and resuming it gives every loss and the final
    parameters of the uninterrupted run."""
    straight, _ = straight
    resumed = tmp_path / "resumed"
    monkeypatch.setattr("eqx_mtp.train._job.StopRequests", lambda: _StopAt(3))
    with pytest.raises(eqx_mtp.train.Preempted, match="after step 3"):
        train(_config(corpus, resumed, eval_every=3), progress=False)
    monkeypatch.undo()
    train(_config(corpus, resumed, resume=True, eval_every=3), progress=False)

    straight_losses, resumed_losses = _train_losses(straight), _train_losses(resumed)
    assert sorted(straight_losses) == list(range(1, 7))
    assert [step for step, _ in logged_losses(resumed)] == list(range(1, 7))
    for step in range(1, 7):
        assert straight_losses[step] == resumed_losses[step], step
    model_a, _ = eqx_mtp.train.load_checkpoint(straight)
    model_b, _ = eqx_mtp.train.load_checkpoint(resumed)
    assert tree_allclose(model_a, model_b, rtol=0, atol=0)


def test_job_writes_checkpoints_metrics_plot_and_loads_back(corpus, straight):
    run, summary = straight
    assert (run / "losses.png").stat().st_size > 0
    effective = json.loads((run / "config.json").read_text())
    assert effective["run"]["directory"] == str(run)
    assert effective["model"]["dim"] == TINY["dim"]
    assert effective["model"]["max_seq_len"] == TINY["seq_len"]  # follows --seq-len
    evals = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "eval" in line
    ]
    assert [e["step"] for e in evals] == [3, 6]
    final = summary["eval"]
    assert len(final["depth_losses"]) == 3
    assert all(loss > 0 for loss in final["depth_losses"])  # never silently 0
    model, stored = eqx_mtp.train.load_checkpoint(run)
    assert stored["model"]["num_depths"] == 2
    assert model.config == _config(corpus, run).model


def test_gradient_accumulation_equals_one_batch(getkey):
    config = tiny_config()
    model = eqx_mtp.MTPModel(config, key=getkey())
    tokens = jax.random.randint(getkey(), (8, 12), 0, 19)
    # Unequal valid-token counts per micro-batch: padding, several documents.
    segment_ids = np.ones((8, 12), np.int32)
    segment_ids[0, 4:] = 2
    segment_ids[1, 9:] = 0
    segment_ids[2, :] = 0
    segment_ids[3, 2:] = 0
    segment_ids[5, 1::3] = 3
    loss_mask = np.ones((8, 12), bool)
    loss_mask[6, :7] = False
    segment_ids, loss_mask = jnp.asarray(segment_ids), jnp.asarray(loss_mask)

    def full_loss(m):
        return eqx_mtp.mtp_loss(
            m, tokens, segment_ids=segment_ids, loss_mask=loss_mask, mtp_weight=0.3
        )[0]

    expected_loss, expected_grads = eqx.filter_value_and_grad(full_loss)(model)
    batch = dict(
        tokens=tokens.reshape(4, 2, 12),
        segment_ids=segment_ids.reshape(4, 2, 12),
        loss_mask=loss_mask.reshape(4, 2, 12),
    )
    loss, _, grads = accumulated_loss_and_grad(model, batch, mtp_weight=0.3)
    assert jnp.allclose(loss, expected_loss, rtol=1e-6)
    assert tree_allclose(grads, expected_grads, rtol=1e-5, atol=1e-7)


def _recording_optimizer():
    """Leaves the model as it is and keeps the last gradients as its state, so that
    `train_step`'s gradients are read back exactly."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (
            jax.tree.map(jnp.zeros_like, grads),
            grads,
        ),
    )


# (num_depths, mtp_kind, tie_embeddings, reduction)
@pytest.mark.parametrize(
    "num_depths, mtp_kind, tie_embeddings, reduction",
    [
        (0, "sequential", False, "mean"),
        (2, "sequential", True, "pooled"),
        (2, "parallel", False, "mean"),
    ],
)
def test_train_step_gradient_equals_the_naive_and_chunked_losses(
    num_depths, mtp_kind, tie_embeddings, reduction
):
    """`train_step` (fused loss: the unembedding gradient of every micro-batch and
    depth accumulated in the forward pass, from coefficients of the global counts)
    against `mtp_loss` on the whole batch with losses that differentiate the sums."""
    rng = np.random.default_rng(num_depths)
    tokens = jnp.asarray(rng.integers(0, 19, (8, 12)), jnp.int32)
    # Micro-batches with unequal counts: padding, packed documents, a loss mask.
    segment_ids = np.ones((8, 12), np.int32)
    segment_ids[0, 4:] = 2
    segment_ids[1, 9:] = 0
    segment_ids[2, :] = 0
    segment_ids[5, 1::3] = 3
    loss_mask = rng.random((8, 12)) < 0.8
    segment_ids, loss_mask = jnp.asarray(segment_ids), jnp.asarray(loss_mask)

    def model(loss_impl):
        config = tiny_config(
            num_depths=num_depths,
            mtp_kind=mtp_kind,
            tie_embeddings=tie_embeddings,
            loss_impl=loss_impl,
            loss_chunk_size=5,
        )
        return eqx_mtp.MTPModel(config, key=jax.random.key(num_depths))

    fused = model("fused")
    optimizer = _recording_optimizer()
    opt_state = optimizer.init(eqx.filter(fused, eqx.is_array))
    batch = dict(
        tokens=tokens.reshape(4, 2, 12),
        segment_ids=segment_ids.reshape(4, 2, 12),
        loss_mask=loss_mask.reshape(4, 2, 12),
    )
    _, grads, metrics = eqx_mtp.train.train_step(
        optimizer, fused, opt_state, batch, 0.3, reduction=reduction
    )
    for reference in ("chunked", "naive"):

        def whole_batch_loss(m):
            return eqx_mtp.mtp_loss(
                m,
                tokens,
                segment_ids=segment_ids,
                loss_mask=loss_mask,
                mtp_weight=0.3,
                reduction=reduction,
            )[0]

        loss, expected = eqx.filter_jit(eqx.filter_value_and_grad(whole_batch_loss))(
            model(reference)
        )
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        assert tree_allclose(
            jax.tree.leaves(grads), jax.tree.leaves(expected), rtol=1e-5, atol=1e-7
        ), reference


def test_damaged_latest_checkpoint_falls_back(corpus, straight, tmp_path):
    straight, _ = straight
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "summary.json").unlink()  # as if the run had been cut short
    directory = run / "checkpoints"
    assert Checkpointer(directory).steps() == [3, 6]
    for path in (directory / "6" / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    model_config = _config(corpus, run).model
    with pytest.warns(UserWarning, match="step 6"):
        restored = Checkpointer(directory).restore(model_config=model_config)
    assert restored.step == 3

    # The same command continues from step 3: the damaged step 6 is kept aside (not
    # deleted, not in the way of the new step 6), and the run ends as if nothing
    # had happened.
    with pytest.warns(UserWarning, match="step 6"):
        train(_config(corpus, run, eval_every=3), progress=False)
    assert (run / "damaged-checkpoints" / "6" / "model").is_dir()
    assert Checkpointer(directory).steps() == [3, 6]
    logged, expected = logged_losses(run), _train_losses(straight)
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert all(losses == expected[step] for step, losses in logged)
    model, _ = eqx_mtp.train.load_checkpoint(run)
    reference, _ = eqx_mtp.train.load_checkpoint(straight)
    assert tree_allclose(model, reference, rtol=0, atol=0)


def test_checkpoint_from_another_config_is_refused(corpus, straight):
    """Each differing field named once, by its flag, with the way to start fresh;
    nothing is written."""
    run, _ = straight
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(UserError) as refused:
        train(_config(corpus, run, steps=8, dim=32, resume=True), progress=False)
    message = str(refused.value)
    assert "--dim (saved 16, now 32)" in message
    assert message.count("dim") == 1
    assert "--run NEWDIR" in message
    assert sorted(p.name for p in run.rglob("*")) == before


def test_a_run_continues_under_another_remat_and_attention(corpus, straight, tmp_path):
    """Remat and the attention implementation change how a step is computed, not
    what: a run may continue under others, and its losses stay those of the run
    that never changed, up to rounding."""
    straight, _ = straight
    switched = tmp_path / "switched"
    _copy_until(straight, switched, 3)
    after = dict(remat="none", attention_impl="reference", attention_block_size=8)
    train(_config(corpus, switched, resume=True, **after), progress=False)

    expected, losses = _train_losses(straight), _train_losses(switched)
    assert sorted(losses) == list(range(1, 7))
    for step in range(4, 7):
        np.testing.assert_allclose(losses[step], expected[step], rtol=1e-4)
    _, stored = eqx_mtp.train.load_checkpoint(switched)
    assert stored["model"]["attention_impl"] == "reference"
    assert stored["model"]["remat"] == "none"


def test_existing_checkpoints_are_never_overwritten(corpus, straight, capsys):
    """`--run DIR` continues DIR's checkpoints; those of another configuration are
    refused with the differing fields named, and nothing is written."""
    run, _ = straight
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code = main(
        ["train", "--data", corpus, "--run", str(run), "--steps", "2"]
        + ["--num-devices", "1"]
    )
    assert code == 2
    assert "differing fields" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_complete_run_says_so_without_loading(corpus, straight, capsys, monkeypatch):
    """The command of a finished run, launched again: it says the run is complete and
    prints its summary, without reading the data or building a model."""
    run, summary = straight

    def forbidden(*args, **kwargs):
        raise AssertionError("a complete run was loaded")

    monkeypatch.setattr("eqx_mtp.train._inputs.load_documents", forbidden)
    monkeypatch.setattr("eqx_mtp.train._job.init_model", forbidden)
    capsys.readouterr()
    flags = ["train", "--no-progress", "--run", str(run), "--data", corpus]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(flags + ["--eval-every=3"]) == 0
    out, err = capsys.readouterr()
    assert "is complete" in err and "step 6" in err
    assert out.startswith(f"run {run}, step 6")
    assert f"{summary['eval']['depth_losses'][2]:.3f}" in out.splitlines()[-1]


def _cli_error(capsys, args):
    code = main(["train", "--no-progress", "--num-devices", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("eqx-mtp train: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_cli_bad_inputs(corpus, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert str(missing) in _cli_error(capsys, ["--data", str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _cli_error(
        capsys, ["--data", str(empty), "--run", str(tmp_path / "r1")]
    )
    message = _cli_error(
        capsys, ["--data", corpus, "--seq-len", "16", "--max-seq-len", "8"]
    )
    assert "--seq-len" in message and "--max-seq-len" in message
    assert "--num-depths" in _cli_error(
        capsys, ["--data", corpus, "--seq-len", "4", "--num-depths", "4"]
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "--run" in _cli_error(
        capsys, ["--data", corpus, "--run", str(blocker / "run")]
    )
    assert "--resume" in _cli_error(
        capsys, ["--data", corpus, "--run", str(tmp_path / "fresh"), "--resume"]
    )
    bad_config = tmp_path / "c.json"
    bad_config.write_text('{"no_such_field": 1}')
    assert "no_such_field" in _cli_error(capsys, ["--config", str(bad_config)])
    assert "mtp" in _cli_error(capsys, ["--data", corpus, "--mtp-weight", "0.3@x"])
    message = _cli_error(capsys, ["--data", corpus, "--attention-impl", "flash"])
    assert "--attention-impl" in message and "blockwise" in message


def test_cli_mesh_errors(corpus, tmp_path, capsys):
    """A mesh that does not match the devices, and a batch or sequence that its axes
    do not divide: one line naming the flag, before any data is read or written."""
    run = ["--data", corpus, "--run", str(tmp_path / "run")]
    message = _cli_error(capsys, run + ["--num-devices", "8", "--mesh", "data=3"])
    assert "--mesh" in message and "8" in message
    assert "--mesh" in _cli_error(capsys, run + ["--mesh", "data=2,width=4"])
    message = _cli_error(
        capsys, run + ["--num-devices", "8", "--batch-size", "12", "--seq-len", "16"]
    )
    assert "--batch-size" in message and "data axis of size 8" in message
    message = _cli_error(
        capsys,
        run + ["--num-devices", "8", "--mesh", "data=2,context=4", "--seq-len", "18"],
    )
    assert "--seq-len" in message and "context" in message
    assert "--num-devices" in _cli_error(capsys, run + ["--num-devices", "9"])
    message = _cli_error(capsys, run + ["--coordinator", "127.0.0.1:1"])
    assert "--num-processes" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_file_and_flags(corpus, tmp_path):
    config_file = tmp_path / "c.toml"
    config_file.write_text("dim = 32\nnum_depths = 1\n")
    run = tmp_path / "run"
    args = ["train", "--no-progress", "--config", str(config_file), "--data", corpus]
    args += ["--run", str(run), "--num-depths", "2", "--steps", "1", "--seq-len", "16"]
    args += ["--batch-size", "2", "--num-layers", "1", "--eval-batches", "1"]
    args += ["--num-devices", "1"]
    assert main(args) == 0
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["dim"] == 32  # from the file
    assert stored["model"]["num_depths"] == 2  # the flag wins
    shutil.rmtree(run)


def test_a_run_killed_during_its_first_save_starts_fresh(
    corpus, straight, tmp_path, capsys
):
    """Orbax writes a checkpoint under a temporary name and renames it when complete:
    a first save cut short leaves only the temporary directory, which is not a
    checkpoint, so the same command starts afresh (instead of refusing, or loading
    half a checkpoint) and then matches an uninterrupted run."""
    straight, _ = straight
    run = tmp_path / "run"
    _copy_until(straight, run, 3)
    checkpoints = run / "checkpoints"
    (checkpoints / "3").rename(checkpoints / "3.orbax-checkpoint-tmp-1234567")
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    train(_config(corpus, run, eval_every=3), progress=False)
    assert "starting fresh" in capsys.readouterr().err
    assert _train_losses(run) == _train_losses(straight)
