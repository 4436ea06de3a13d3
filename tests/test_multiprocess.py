"""The training job on a mesh and as several JAX processes gives the one-device
numbers: one process of 8 devices, and two local CPU processes (gloo collectives,
loopback only, 4 devices each), train like one device, with gradient accumulation,
and the two processes' checkpoint restores in one process."""

import os
import sys

import numpy as np
import pytest
from helpers import (
    TINY_JOB,
    free_port,
    job_flags,
    kill_group,
    logged_losses,
    start_process,
    tree_allclose,
    wait_all,
)

import eqx_mtp
from eqx_mtp.train._job import TrainConfig, train

TIMEOUT_S = 300

# Two micro-batches of 4 rows: the data axes of both meshes below divide them.
TINY_MESH_JOB = dict(
    TINY_JOB,
    steps=3,
    batch_size=8,
    micro_batches=2,
    save_every=0,
)


def _losses(run) -> dict[int, list[float]]:
    return dict(logged_losses(run))


def _run_processes(commands, env, logs, timeout):
    """Start every command; wait for all, bounded in time; kill whatever is left on
    any failure. Returns the exit codes."""
    processes = []
    try:
        for command, log in zip(commands, logs):
            processes.append(start_process(command, env=env, log=log))
        return wait_all(processes, timeout)
    finally:
        for p in processes:
            kill_group(p)


@pytest.fixture(scope="module")
def one_device(corpus, tmp_path_factory):
    """The run of `TINY_MESH_JOB` on one device, which both tests compare with."""
    run = tmp_path_factory.mktemp("one_device") / "run"
    job = dict(TINY_MESH_JOB, data=corpus, run=str(run), num_devices=1)
    train(TrainConfig.from_dict(job), progress=False)
    return run


@pytest.mark.slow
def test_two_processes_train_like_one_device(corpus, one_device, tmp_path):
    """Catches data that the processes read or place wrongly, collectives that do
    not span both processes, both processes writing metrics, and a checkpoint saved
    from several processes that does not restore onto one device."""
    job = dict(TINY_MESH_JOB, data=corpus, mesh="data=4,model=2,context=1")
    two = tmp_path / "two"
    port = free_port()
    common = job_flags(dict(job, run=str(two), coordinator=f"127.0.0.1:{port}"))
    commands = [
        [sys.executable, "-m", "eqx_mtp.train._cli", "train", *common]
        + ["--num-processes=2", f"--process-id={i}"]
        for i in range(2)
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    log_paths = [tmp_path / f"process{i}.log" for i in range(2)]
    logs = [open(path, "w") for path in log_paths]
    try:
        codes = _run_processes(commands, env, logs, TIMEOUT_S)
    finally:
        for log in logs:
            log.close()
    output = "\n".join(path.read_text()[-3000:] for path in log_paths)
    assert codes == [0, 0], output
    # Only process 0 writes metrics, so one line per step, not two.
    single_losses, two_losses = _losses(one_device), _losses(two)
    assert sorted(two_losses) == list(range(1, 4)), output
    for step in range(1, 4):
        np.testing.assert_allclose(
            two_losses[step], single_losses[step], rtol=1e-5, err_msg=f"step {step}"
        )
    assert (two / "losses.png").is_file() and (two / "summary.json").is_file()

    # Saved from 8 devices in 2 processes, restored in this one onto one device.
    restored, _ = eqx_mtp.train.load_checkpoint(two)
    reference, _ = eqx_mtp.train.load_checkpoint(one_device)
    assert tree_allclose(restored, reference, rtol=1e-5, atol=1e-7)
    assert len(restored.trunk.embedding.sharding.device_set) == 1


def test_mesh_job_equals_one_device_job(corpus, one_device, tmp_path):
    """Every device on a (2, 2, 2) mesh (documents straddle the context shards, the
    vocabulary of 259 is padded over `model`), with gradient accumulation: the
    losses and final parameters of the one-device run."""
    meshed = tmp_path / "meshed"
    job = dict(TINY_MESH_JOB, data=corpus, run=str(meshed))
    train(
        TrainConfig.from_dict(dict(job, mesh="data=2,model=2,context=2")),
        progress=False,
    )
    meshed_losses, plain_losses = _losses(meshed), _losses(one_device)
    assert sorted(meshed_losses) == [1, 2, 3]
    for step in meshed_losses:
        np.testing.assert_allclose(
            meshed_losses[step], plain_losses[step], rtol=1e-5, err_msg=f"step {step}"
        )
    model_a, _ = eqx_mtp.train.load_checkpoint(meshed)
    model_b, _ = eqx_mtp.train.load_checkpoint(one_device)
    assert tree_allclose(model_a, model_b, rtol=1e-5, atol=1e-7)
