"""Preemption-safe runs, tried as a scheduler would: the same command launched again
and again, killed with SIGKILL at random moments or stopped with SIGTERM, ends with
exactly the losses and parameters of an uninterrupted run. Every child runs in its own
process group, bounded in time, and is killed if the test fails."""

import os
import random
import signal
import sys
import time

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
from eqx_mtp.train._checkpoint import Checkpointer
from eqx_mtp.train._job import TrainConfig, train
from eqx_mtp.train._preemption import EXIT_PREEMPTED

# A checkpoint after every step makes each step slow enough (a save) that a kill
# lands mid-run.
JOB = dict(
    TINY_JOB,
    steps=30,
    batch_size=4,
    save_every=1,
    keep=2,
)
# Without periodic saves a step takes ~16 ms here, so a run signalled at step 6 must
# have many steps left for the signal to land before the end however the machine
# stalls the test between seeing a line and signalling.
SIGTERM_JOB = dict(JOB, steps=200, save_every=0)
CLI = [sys.executable, "-m", "eqx_mtp.train._cli", "train"]


def _reference(job, corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    job = dict(job, data=corpus, run=str(run), num_devices=1, save_every=0)
    train(TrainConfig.from_dict(job), progress=False)
    return run, dict(logged_losses(run))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run of `JOB` on one device: its directory and losses."""
    return _reference(JOB, corpus, tmp_path_factory)


@pytest.fixture(scope="module")
def sigterm_reference(corpus, tmp_path_factory):
    """The uninterrupted run of `SIGTERM_JOB` on one device: its directory and
    losses."""
    return _reference(SIGTERM_JOB, corpus, tmp_path_factory)


def _lines(run) -> int:
    try:
        return len(logged_losses(run))
    except FileNotFoundError:
        return 0


def _wait_for_lines(run, count, process, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while _lines(run) < count:
        assert process.poll() is None, "the run ended before it was signalled"
        assert time.monotonic() < deadline, "the run did not reach its step in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_restart_loop_with_sigkill_at_random_moments(corpus, reference, tmp_path):
    """Killed during start-up and compilation, then mid-step or mid-save (a
    checkpoint is saved after every step), then let finish: every logged loss,
    repeated steps included, and the final parameters equal the uninterrupted run's
    exactly. Catches a restart that starts over instead of continuing, a lost or
    half-written checkpoint that is loaded, and data or RNG state that is not
    restored."""
    job = dict(JOB, data=corpus)
    reference_run, expected = reference
    run = tmp_path / "restarted"
    command = CLI + job_flags(dict(job, run=str(run), num_devices=1))
    rng = random.Random(0)
    kills = []
    with open(tmp_path / "log.txt", "w") as log:
        # Once during start-up or compilation, then mid-run: a checkpoint is saved
        # after every step, so a save is nearly always in flight.
        for moment in ("start-up", "mid-run"):
            process = start_process(command, log=log)
            try:
                if moment == "start-up":
                    time.sleep(rng.uniform(0.5, 4.0))
                else:
                    _wait_for_lines(run, _lines(run) + 2, process)
                    time.sleep(rng.uniform(0.0, 0.05))
            finally:
                kill_group(process)
            kills.append((moment, _lines(run)))
        process = start_process(command, log=log)
        try:
            assert wait_all([process], 300) == [0]
        finally:
            kill_group(process)
    print(
        f"SIGKILLed at (moment, logged lines): {kills}"
    )  # for the record: where they hit
    logged = logged_losses(run)
    assert max(step for step, _ in logged) == JOB["steps"]
    for step, losses in logged:
        assert losses == expected[step], step
    model, _ = eqx_mtp.train.load_checkpoint(run)
    reference_model, _ = eqx_mtp.train.load_checkpoint(reference_run)
    assert tree_allclose(model, reference_model, rtol=0, atol=0)


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_same_command_continues(
    corpus, sigterm_reference, tmp_path
):
    """SIGTERM at a random step: exit code 75 within a bounded time, the newest
    checkpoint is of the last step trained (not of an earlier periodic save), and
    launching the same command again gives the uninterrupted run's losses. Catches a
    handler that dies without saving, saves a stale step, or leaves the restarted
    run a step behind."""
    job = dict(SIGTERM_JOB, data=corpus)
    _, expected = sigterm_reference
    run = tmp_path / "run"
    command = CLI + job_flags(dict(job, run=str(run), num_devices=1))
    target = random.Random(1).randint(2, 6)
    with open(tmp_path / "log.txt", "w") as log:
        process = start_process(command, log=log)
        try:
            _wait_for_lines(run, target, process)
            signalled = time.monotonic()
            os.killpg(process.pid, signal.SIGTERM)
            assert wait_all([process], 90) == [EXIT_PREEMPTED]
            assert time.monotonic() - signalled < 30
        finally:
            kill_group(process)
    output = (tmp_path / "log.txt").read_text()
    last_step = logged_losses(run)[-1][0]
    assert target <= last_step < job["steps"], output
    checkpointer = Checkpointer(run / "checkpoints")
    try:
        assert checkpointer.steps()[-1] == last_step
    finally:
        checkpointer.close()
    assert f"after step {last_step}" in output

    with open(tmp_path / "log.txt", "a") as log:
        process = start_process(command, log=log)
        try:
            assert wait_all([process], 300) == [0]
        finally:
            kill_group(process)
    assert (
        "continuing from the checkpoint of step" in (tmp_path / "log.txt").read_text()
    )
    logged = logged_losses(run)
    assert [step for step, _ in logged] == list(range(1, job["steps"] + 1))
    for step, losses in logged:
        assert losses == expected[step], step


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(corpus, tmp_path):
    """Two processes (4 CPU devices each, gloo, loopback): SIGTERM to process 1 only
    leads both to save and stop after one and the same step. Catches processes that
    stop at different steps (a hang in the next collective, or checkpoints of two
    steps)."""
    job = dict(JOB, data=corpus, steps=200, save_every=0, batch_size=8)
    run = tmp_path / "run"
    flags = job_flags(
        dict(
            job,
            run=str(run),
            mesh="data=4,model=2",
            coordinator=f"127.0.0.1:{free_port()}",
            num_processes=2,
        )
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    logs = [open(tmp_path / f"process{i}.txt", "w") for i in range(2)]
    processes = []
    try:
        for i in range(2):
            command = CLI + flags + [f"--process-id={i}"]
            processes.append(start_process(command, env=env, log=logs[i]))
        _wait_for_lines(run, 3, processes[0], timeout=240)
        os.killpg(processes[1].pid, signal.SIGTERM)
        assert wait_all(processes, 150) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    finally:
        for p in processes:
            kill_group(p)
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"process{i}.txt").read_text() for i in range(2)]
    last_step = logged_losses(run)[-1][0]
    assert last_step < job["steps"]
    for output in outputs:
        assert f"after step {last_step}," in output, output[-2000:]
    checkpointer = Checkpointer(run / "checkpoints")
    try:
        assert checkpointer.steps() == [last_step]
    finally:
        checkpointer.close()
