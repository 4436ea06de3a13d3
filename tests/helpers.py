"""Helpers shared by the tests."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_mtp

TINY_JOB = dict(
    seq_len=16,
    dim=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    mlp_dim=24,
    num_depths=2,
    warmup_steps=2,
    eval_every=0,
    eval_batches=1,
    log_every=1,
    eval_fraction=0.2,
)
"""`TrainConfig` fields of a job small enough to compile in seconds: byte rows of 16
tokens, one layer of width 16, 2 depths, a metrics line every step, no periodic eval."""


def tiny_config(**overrides) -> eqx_mtp.ModelConfig:
    """A model small enough to compile in seconds: vocabulary 19, dim 16, one layer,
    2 heads sharing 1 KV head, 2 depths, rows of at most 16 tokens."""
    values = dict(
        vocab_size=19,
        dim=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        mlp_dim=24,
        max_seq_len=16,
        num_depths=2,
    )
    values.update(overrides)
    return eqx_mtp.ModelConfig(**values)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    """Same structure and every array leaf close."""
    return bool(eqx.tree_equal(x, y, rtol=rtol, atol=atol))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def job_flags(values: dict) -> list[str]:
    """`eqx-mtp train` flags for a dict of `TrainConfig` fields."""
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()] + [
        "--no-progress"
    ]


def logged_losses(run) -> list[tuple[int, list[float]]]:
    """`(step, [loss, main, depth 1, ...])` of every training line of a run's
    `metrics.jsonl`, in the order written (a restarted run repeats steps)."""
    records = []
    for line in (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by SIGKILL
    return [
        (r["step"], [r["loss"], *r["depth_losses"]]) for r in records if "eval" not in r
    ]


def start_process(command, *, env=None, log=None) -> subprocess.Popen:
    """Start `command` in a process group of its own (so that it and its children
    can be killed together), its output to `log`."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Send `sig` to `process`'s group if it is still running, and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        process.wait()


def wait_all(processes, timeout: float) -> list[int]:
    """Exit codes of `processes`, waiting at most `timeout` seconds for them all."""
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]


# -- Packed rows shared by the loss tests ---------------------------------------------

VOCAB = 19
"""The vocabulary of `tiny_config` and of the packed rows below."""

SEGMENT_IDS = np.array(
    [
        [1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2],
    ],
    np.int32,
)
"""Two packed rows: three documents and two, padding between and after them."""


def packed_arrays(seed: int = 0, *, positions: str = "scrambled", masked=True):
    """`(tokens, loss_mask, positions)` NumPy arrays for `SEGMENT_IDS`.

    `positions="scrambled"`: random positions, which (unlike a per-document shift)
    show which positions a function uses, since rotary attention only sees their
    differences inside a document; `"documents"`: positions restarting at 0 in each
    document. `masked`: also leave out one target inside a document of each row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, SEGMENT_IDS.shape).astype(np.int32)
    loss_mask = rng.random(SEGMENT_IDS.shape) < 0.8
    if masked:
        loss_mask[0, 3] = loss_mask[1, 9] = False
    if positions == "scrambled":
        positions = rng.integers(0, 16, SEGMENT_IDS.shape).astype(np.int32)
    else:
        positions = np.asarray(eqx_mtp.segment_positions(jnp.asarray(SEGMENT_IDS)))
    return tokens, loss_mask, positions


class ToyTrunk(eqx.Module):
    """Not our transformer: an embedding, one `Linear` applied at every position, an
    Equinox RMSNorm and an untied unembedding."""

    embedding: jax.Array
    proj: eqx.nn.Linear
    norm: eqx.nn.RMSNorm
    unembedding: jax.Array

    def __init__(self, vocab, dim, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embedding = jax.random.normal(k1, (vocab, dim)) / dim**0.5
        self.proj = eqx.nn.Linear(dim, dim, key=k2)
        self.norm = eqx.nn.RMSNorm(dim)
        self.unembedding = jax.random.normal(k3, (vocab, dim)) / dim**0.5

    def __call__(self, tokens):
        x = self.embedding[tokens]
        return x + jax.vmap(self.proj)(x)


class ToyLayer(eqx.Module):
    """A user's depth block: a per-position MLP with the block call signature of the
    old contract (no `key` parameter)."""

    mlp: eqx.nn.MLP

    def __init__(self, dim, *, key):
        self.mlp = eqx.nn.MLP(dim, dim, width_size=8, depth=1, key=key)

    def __call__(self, x, *, positions, segment_ids):
        return x + jax.vmap(self.mlp)(x)


class DropoutLayer(eqx.Module):
    """A user's block with dropout: `x + dropout(W x)`; deterministic without a
    key."""

    proj: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, dim, *, key):
        self.proj = eqx.nn.Linear(dim, dim, use_bias=False, key=key)
        self.dropout = eqx.nn.Dropout(p=0.5)

    def __call__(self, x, *, positions, segment_ids, key=None):
        y = jax.vmap(self.proj)(x)
        return x + self.dropout(y, key=key, inference=key is None)
