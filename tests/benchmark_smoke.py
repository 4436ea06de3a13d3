"""`python -m benchmarks --quick` on 8 simulated CPU devices, as a smoke test: every
benchmark of the suite finishes and writes valid JSON that says where it ran, and the
real results and the docs page are left alone. No timing is asserted.

The suite runs in two halves, `python -m benchmarks --quick --only ...`, one per test
file (`test_benchmarks_quick_a.py`, `test_benchmarks_quick_b.py`), so that the two
xdist workers run them side by side: `FIRST_HALF` names the first, the second is every
other benchmark `--list` names, so a new benchmark is never left out (but those
`RUN_ELSEWHERE` names, whose own tests run their quick mode)."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

from helpers import kill_group, start_process, wait_all

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Each half takes about 1.5 minutes of CPU (3 to 4 minutes of wall clock on 2 cores
# shared with other jobs); the bound catches a hang, e.g. a process waiting for peers.
TIMEOUT_S = 900
# About half the suite's CPU time (`python -m benchmarks --quick` prints each
# benchmark's): decode, compile_time, naive_baseline, mtp_overhead, ce_speed.
FIRST_HALF = ("compile_time", "mtp_overhead", "naive_baseline", "ce_speed", "decode")
# Benchmarks whose quick run a test of their own runs end to end, checking more than
# the smoke run does: running them here too only doubles their time.
RUN_ELSEWHERE = {"learning": "tests/test_learning_benchmark.py"}
ENVIRONMENT_KEYS = {
    "date",
    "jax",
    "jaxlib",
    "cpu",
    "cpu_count",
    "backend",
    "device",
    "device_count",
    "process_count",
}


def _digests() -> dict[str, str]:
    """What a quick run must not touch: the docs page and the committed results."""
    paths = [ROOT / "docs" / "benchmarks.md"]
    paths += sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _suite(*flags, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed_benchmarks() -> list[str]:
    """Every benchmark of the suite, in its order, as `--list` names them."""
    listed = _suite("--list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"ce_speed", "mesh", "decode"} <= set(names)
    assert set(FIRST_HALF) <= set(names), (FIRST_HALF, names)
    assert set(RUN_ELSEWHERE) <= set(names), (RUN_ELSEWHERE, names)
    return names


def run_quick_suite(names: list[str], tmp_path) -> None:
    """`python -m benchmarks --quick --only NAMES`: every one of them runs and writes
    valid JSON saying where it ran; the docs and the committed results are left
    alone."""
    before = _digests()
    results = tmp_path / "results"
    # `-m benchmarks` from the repository root, whatever pytest's directory.
    path = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, path)),
    )
    log_path = tmp_path / "suite.log"
    with open(log_path, "w") as log:
        process = start_process(
            [sys.executable, "-m", "benchmarks", "--quick", "--only", *names]
            + ["--results-dir", str(results)],
            env=env,
            log=log,
        )
        try:
            codes = wait_all([process], TIMEOUT_S)
        except subprocess.TimeoutExpired:
            codes = ["timed out"]
        finally:
            kill_group(process)
    output = log_path.read_text()[-4000:]
    assert codes == [0], output

    suite = json.loads((results / "suite.json").read_text())
    assert suite["quick"] is True
    assert [b["name"] for b in suite["benchmarks"]] == names
    for record in suite["benchmarks"]:
        assert record["status"] == "ok", (record, output)
        path = results / f"{record['name']}.json"
        assert record["results"] == [str(path)], record
        payload = json.loads(path.read_text())
        assert payload["quick"] is True, record["name"]
        environment = payload["environment"]
        assert ENVIRONMENT_KEYS <= set(environment), (record["name"], environment)
        assert environment["backend"] == "cpu"
        assert environment["device_count"] == 8
        assert environment["process_count"] == 1
    assert _digests() == before, "a quick run changed the docs or the real results"
