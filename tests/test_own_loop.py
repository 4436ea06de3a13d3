"""The research path from your own loop: checkpoints of our model or of a model with a
foreign trunk, saved with only what the loop has, and `train_step` called as a
researcher calls it. Each test names the bug it catches."""

import functools
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config

import eqx_mtp
from eqx_mtp.train import Checkpointer, CheckpointError, load_checkpoint, train_step

TESTS = pathlib.Path(__file__).parent


def _arrays(tree):
    return eqx.filter(tree, eqx.is_array)


def _assert_bit_exact(restored, expected):
    """Same structure, same dtypes and the same bits in every array."""
    assert jax.tree.structure(_arrays(restored)) == jax.tree.structure(
        _arrays(expected)
    )
    assert bool(eqx.tree_equal(_arrays(restored), _arrays(expected)))
    for a, b in zip(jax.tree.leaves(_arrays(restored)), jax.tree.leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _copy(tree):
    copy = lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x  # noqa: E731
    return jax.tree.map(copy, tree)


class _Block(eqx.Module):
    """A researcher's own block: a residual MLP, called as depths call blocks."""

    up: eqx.nn.Linear
    down: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(self, dim, *, key):
        up_key, down_key = jax.random.split(key)
        self.up = eqx.nn.Linear(dim, 2 * dim, use_bias=False, key=up_key)
        self.down = eqx.nn.Linear(2 * dim, dim, use_bias=False, key=down_key)
        self.activation = jax.nn.gelu

    def __call__(self, x, *, positions=None, segment_ids=None, key=None):
        return x + jax.vmap(lambda v: self.down(self.activation(self.up(v))))(x)


class _ForeignModel(eqx.Module):
    """A model whose trunk is not ours: its static part (the activation, `dim`, the
    depth kind) cannot be rebuilt from a `ModelConfig`."""

    embedding: eqx.nn.Embedding
    blocks: list
    final_norm: eqx.nn.RMSNorm
    depths: eqx_mtp.MTPDepths
    dim: int = eqx.field(static=True)

    def __init__(self, *, vocab_size=19, dim=8, key):
        keys = jax.random.split(key, 4)
        self.embedding = eqx.nn.Embedding(vocab_size, dim, key=keys[0])
        self.blocks = [_Block(dim, key=k) for k in jax.random.split(keys[1], 2)]
        self.final_norm = eqx.nn.RMSNorm(dim)
        self.depths = eqx_mtp.MTPDepths(
            2,
            dim,
            make_layer=lambda k: _Block(dim, key=k),
            kind="parallel",
            key=keys[2],
        )
        self.dim = dim


@functools.cache
def _our_model(seed=0, **overrides):
    # Cached: building one compiles its initialisation. Models are immutable, and
    # the one test that donates a model passes copies.
    return eqx_mtp.MTPModel(tiny_config(**overrides), key=jax.random.key(seed))


def test_our_model_round_trip_with_only_the_model(tmp_path):
    """Bug caught: `save` required `opt_state`, `data_state`, `rng` and `config`
    (`rng=None` failed on its key type), and a checkpoint without them could not be
    read back. With only the model given, the default config makes `load_checkpoint`
    rebuild it, and the absent pieces restore as `None`."""
    model = _our_model()
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, model=model)
    loaded, config = load_checkpoint(tmp_path)
    _assert_bit_exact(loaded, model)
    assert bool(eqx.tree_equal(loaded, model))  # the static part too
    assert config == dict(model=model.config.to_dict())
    with Checkpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore()
    _assert_bit_exact(restored.model, model)
    assert restored.step == 1
    assert (restored.opt_state, restored.data_state, restored.rng) == (None,) * 3


@pytest.mark.parametrize("key_kind", ["typed", "raw"])
def test_our_model_round_trip_with_everything(tmp_path, key_kind):
    """Bug caught: the RNG key came back as a default-implementation typed key
    whatever was saved (a raw `PRNGKey` or another implementation broke), or any of
    the optimizer state, data state or config was altered on the way."""
    config = tiny_config()
    model = eqx_mtp.MTPModel(config, key=jax.random.key(3))
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(_arrays(model))
    # A state with moments that are not zeros, so a wrong restore cannot pass.
    opt_state = jax.tree.map(
        lambda x: x + 0.5 if eqx.is_inexact_array(x) else x, opt_state
    )
    if key_kind == "typed":
        rng = jax.random.key(7, impl="rbg")
    else:
        rng = jax.random.PRNGKey(7)
    data_state = dict(epoch=2, position=[5, 6])
    stored = dict(model=config.to_dict(), train=dict(learning_rate=1e-3))
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(
            4,
            model=model,
            opt_state=opt_state,
            data_state=data_state,
            rng=rng,
            config=stored,
        )
        restored = checkpointer.restore(
            opt_state_template=jax.eval_shape(lambda: opt_state)
        )
    _assert_bit_exact(restored.model, model)
    _assert_bit_exact(restored.opt_state, opt_state)
    assert restored.data_state == data_state
    assert restored.config == stored
    assert restored.rng.dtype == rng.dtype
    if key_kind == "typed":
        assert str(jax.random.key_impl(restored.rng)) == "rbg"
        assert np.array_equal(
            jax.random.key_data(restored.rng), jax.random.key_data(rng)
        )
    else:
        assert np.array_equal(restored.rng, rng)


def test_foreign_trunk_round_trip(tmp_path):
    """Bug caught: a model that is not an `MTPModel` could not be saved (`model` was
    typed `MTPModel`) nor restored (the static part was always rebuilt from a
    `ModelConfig`). Restored from a `like=` template, with the data state and key
    left out, arrays bit-exact and static part (activation, `dim`, depth kind) the
    template's."""
    model = _ForeignModel(key=jax.random.key(0))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(_arrays(model))
    grads = jax.tree.map(jnp.ones_like, _arrays(model))
    with jax.numpy_dtype_promotion("standard"):  # optax mixes floats and ints
        updates, opt_state = optimizer.update(grads, opt_state)
    model = eqx.apply_updates(model, updates)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(
            10, model=model, opt_state=opt_state, config=dict(note="my own trunk")
        )

    template = eqx.filter_eval_shape(_ForeignModel, key=jax.random.key(1))
    with Checkpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore(
            like=template, opt_state_template=jax.eval_shape(lambda: opt_state)
        )
    _assert_bit_exact(restored.model, model)
    assert bool(eqx.tree_equal(restored.model, model))
    assert isinstance(restored.model, _ForeignModel)
    assert restored.model.blocks[0].activation is jax.nn.gelu
    _assert_bit_exact(restored.opt_state, opt_state)
    assert restored.data_state is None and restored.rng is None

    loaded, config = load_checkpoint(tmp_path, like=model)
    _assert_bit_exact(loaded, model)
    assert config == dict(note="my own trunk")
    with pytest.raises(CheckpointError, match=r"stores no ModelConfig.*like="):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("make_optimizer", [optax.identity, lambda: optax.sgd(0.1)])
def test_leafless_optimizer_state(tmp_path, make_optimizer):
    """Bug caught: an optimizer state with no arrays (`optax.identity()`'s
    `EmptyState()`) made Orbax fail with "Found empty item" half-way through a save;
    plain SGD's `(EmptyState(), EmptyState())` happens to pass."""
    model = _ForeignModel(key=jax.random.key(0))
    opt_state = make_optimizer().init(_arrays(model))
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, model=model, opt_state=opt_state)
        restored = checkpointer.restore(
            like=model, opt_state_template=jax.eval_shape(lambda: opt_state)
        )
    assert restored.opt_state == opt_state
    _assert_bit_exact(restored.model, model)


@pytest.mark.parametrize("layout", ["bare", "nested"])
def test_config_layouts(tmp_path, layout):
    """Bug caught: a checkpoint saved with `config=model_config.to_dict()` loaded
    with `Checkpointer.restore` but `load_checkpoint` said "has no readable config":
    only `{"model": ...}` was understood. Both layouts rebuild the model."""
    model = _our_model(depth_final_norm=True)
    bare = model.config.to_dict()
    stored = bare if layout == "bare" else dict(model=bare, mine=dict(lr=0.1))
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(2, model=model, config=stored)
    loaded, config = load_checkpoint(tmp_path)
    assert config == stored
    assert loaded.config == model.config
    assert bool(eqx.tree_equal(loaded, model))


def test_missing_step_lists_the_steps_found(tmp_path):
    """Bug caught: asking for a step that does not exist said "has no readable
    config", not which steps there are."""
    with Checkpointer(tmp_path) as checkpointer:
        for step in (1, 3):
            checkpointer.save(step, model=_our_model(step))
    # The one error, not a fall-back warning that calls the step damaged.
    message = r"^no checkpoint of step 2 in .*; steps found: \[1, 3\]$"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path, step=2)
        with Checkpointer(tmp_path) as checkpointer:
            with pytest.raises(CheckpointError, match=message):
                checkpointer.restore(step=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(empty)


def test_step_directory_is_accepted(tmp_path):
    """Bug caught: a step's own directory was refused ("no checkpoint found"), and a
    `Checkpointer` opened on one would have saved checkpoints inside a checkpoint."""
    models = {step: _our_model(step) for step in (1, 3)}
    with Checkpointer(tmp_path) as checkpointer:
        for step, model in models.items():
            checkpointer.save(step, model=model)
    loaded, _ = load_checkpoint(tmp_path / "1")
    _assert_bit_exact(loaded, models[1])  # that step, not the newest
    loaded, _ = load_checkpoint(tmp_path / "3", step=3)
    _assert_bit_exact(loaded, models[3])
    with pytest.raises(CheckpointError, match="not of step 1"):
        load_checkpoint(tmp_path / "3", step=1)
    with pytest.raises(CheckpointError, match="directory of one checkpoint"):
        Checkpointer(tmp_path / "3")


def test_existing_checkpoints_are_never_overwritten(tmp_path):
    """Bug caught: Orbax skips a save of a step that is not after the newest one
    without a word (the caller believes it saved); neither that nor loading may change
    what is on disk."""
    original = _our_model(0)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(5, model=original)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Checkpointer(tmp_path) as checkpointer:
        for step in (5, 4):
            with pytest.raises(CheckpointError, match=r"never overwritten.*\[5\]"):
                checkpointer.save(step, model=_our_model(1))
    load_checkpoint(tmp_path)
    load_checkpoint(tmp_path / "5")
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before
    loaded, _ = load_checkpoint(tmp_path)
    _assert_bit_exact(loaded, original)


def test_context_manager_waits_and_closes(tmp_path):
    """Bug caught: leaving the `with` block returned before the asynchronous save
    was written, or left the Checkpointer usable after it was closed."""
    model = _our_model()
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, model=model)
    # Finished on disk the moment the block is left: no temporary directory left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert (tmp_path / "1" / "commit_success.txt").is_file()
    with pytest.raises(CheckpointError, match="closed"):
        checkpointer.save(2, model=model)
    checkpointer.close()  # a second close does nothing


_SAVE_WITHOUT_CLOSING = """
import sys
import jax
sys.path.insert(0, {tests!r})
from helpers import tiny_config
import eqx_mtp

model = eqx_mtp.MTPModel(tiny_config(), key=jax.random.key(0))
checkpointer = eqx_mtp.train.Checkpointer({directory!r})
checkpointer.save(1, model=model, opt_state=dict(a=jax.numpy.zeros(3)))
"""


def test_unclosed_checkpointer_exits_cleanly(tmp_path):
    """Bug caught: a script that saves and exits without closing printed "Event loop
    is closed" / "cannot schedule new futures after interpreter shutdown" tracebacks,
    and its last checkpoint was never finished: the interpreter shuts the thread
    pools down (and joins Orbax's threads) before `atexit` handlers run."""
    directory = tmp_path / "checkpoints"
    script = _SAVE_WITHOUT_CLOSING.format(tests=str(TESTS), directory=str(directory))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Event loop is closed" not in result.stderr, result.stderr
    loaded, _ = load_checkpoint(directory)
    _assert_bit_exact(loaded, _our_model(0))


def test_train_step_twice_on_one_batch(tmp_path):
    """Bug caught: `train_step` donated the batch and λ, so a second call with the
    same batch failed with "Buffer has been deleted or donated". The second step
    must equal one computed from fresh copies of everything. Also: a checkpoint being
    written in the background is not changed by the next step donating its model."""
    model = _our_model()
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(_arrays(model))
    batch = dict(tokens=jax.random.randint(jax.random.key(1), (2, 2, 16), 0, 19))
    weight = jnp.float32(0.3)
    fresh = (_copy(model), _copy(opt_state), _copy(batch), _copy(weight))

    donated = (_copy(model), _copy(opt_state))
    step1 = train_step(optimizer, *donated, batch, weight)
    assert not batch["tokens"].is_deleted() and not weight.is_deleted()
    # The model and optimizer state are still donated (the memory the job needs).
    assert all(x.is_deleted() for x in jax.tree.leaves(_arrays(donated)))
    model1 = _copy(step1[0])
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model=step1[0])  # asynchronous: returns before the write
    step2 = train_step(optimizer, step1[0], step1[1], batch, weight)
    checkpointer.close()
    _assert_bit_exact(load_checkpoint(tmp_path)[0], model1)

    m, s, b, w = fresh
    reference1 = train_step(optimizer, m, s, b, w)
    reference2 = train_step(optimizer, reference1[0], reference1[1], _copy(b), _copy(w))
    _assert_bit_exact(step2[0], reference2[0])
    _assert_bit_exact(step2[1], reference2[1])
    assert bool(eqx.tree_equal(step2[2], reference2[2]))
    # The second step moved the model again: the batch was really used twice.
    assert not eqx.tree_equal(_arrays(step2[0]), _arrays(model1))


def test_checkpoints_page_runs(tmp_path, monkeypatch):
    """The own-loop example of docs/preemption.md runs as written. Bug caught:
    a page whose example no longer runs (a renamed argument, a config layout or a
    step directory that `load_checkpoint` refuses)."""
    monkeypatch.chdir(tmp_path)
    text = (TESTS.parent / "docs" / "preemption.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.M)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/preemption.md", "exec"), namespace)
    assert namespace["step"] == 3
    assert namespace["stored"] == {"width": 32}
    _assert_bit_exact(namespace["newest"], namespace["model"])
    assert not eqx.tree_equal(_arrays(namespace["second"]), _arrays(namespace["model"]))
    _assert_bit_exact(namespace["mine_again"], namespace["mine"])
    assert sorted(p.name for p in (tmp_path / "my-run" / "checkpoints").iterdir()) == [
        "1",
        "2",
        "3",
    ]
