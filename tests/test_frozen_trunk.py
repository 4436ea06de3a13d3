"""`train_depths_only` freezes the trunk in the optimizer too, and `depth_grad_clip`
clips the depths' gradients as a group of their own: against a hand-written AdamW."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config

import eqx_mtp
from eqx_mtp.train import Checkpointer, TrainConfig, make_optimizer, train_step
from eqx_mtp.train._job import UserError

LEARNING_RATE = 0.05
WEIGHT_DECAY = 0.5
B1, B2, EPS = 0.9, 0.95, 1e-8  # make_optimizer's b1, b2 and optax.adamw's eps


def _name(path) -> str:
    return ".".join(str(getattr(key, "name", getattr(key, "key", key))) for key in path)


def _named_arrays(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(tree, eqx.is_array))
    return {_name(path): np.asarray(leaf) for path, leaf in leaves}


def _is_depth(name: str) -> bool:
    return name.startswith("depths.")


def _decays(name: str) -> bool:
    # Written from the docs of `weight_decay_mask`: every matrix but the token
    # embedding and unembedding, nothing inside a norm.
    parts = name.split(".")
    excluded = ("embedding", "unembedding")
    return not any(p in excluded or p.endswith("norm") for p in parts)


def _optimizer(model, **kwargs):
    # A constant learning rate (no warm-up, a cosine from lr to lr), so that the
    # hand-written AdamW needs no schedule.
    return make_optimizer(
        model,
        learning_rate=LEARNING_RATE,
        total_steps=100,
        warmup_steps=0,
        min_learning_rate_ratio=1.0,
        weight_decay=WEIGHT_DECAY,
        **kwargs,
    )


def _batch(key):
    return dict(tokens=jax.random.randint(key, (2, 2, 16), 0, 19))


def _model(key, **overrides):
    return eqx_mtp.MTPModel(tiny_config(**overrides), key=key)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=False, mtp_kind="parallel", mtp_block="mlp")],
)
def test_frozen_trunk_does_not_move(getkey, overrides):
    """After several steps with weight decay on and a big learning rate, every trunk
    array is bit for bit its initial value and every depth array has moved; without
    `train_depths_only` the same steps move the trunk."""
    key, batch = getkey(), _batch(getkey())
    for frozen in (True, False):
        model = _model(key, train_depths_only=frozen, **overrides)
        before = _named_arrays(model)
        optimizer = _optimizer(model)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        for _ in range(3):
            model, opt_state, metrics = train_step(
                optimizer, model, opt_state, batch, jnp.float32(0.3)
            )
            assert np.isfinite(float(metrics["loss"]))
        after = _named_arrays(model)
        assert before.keys() == after.keys()
        trunk = [name for name in before if not _is_depth(name)]
        depths = [name for name in before if _is_depth(name)]
        assert depths
        expected_trunk = {
            "trunk.embedding",
            "trunk.blocks.attention.q_proj.weight",
            "trunk.final_norm.weight",
        }
        if not overrides.get("tie_embeddings", True):
            expected_trunk.add("trunk.unembedding")
        assert expected_trunk <= set(trunk)
        for name in depths:
            assert not np.array_equal(before[name], after[name]), name
        if frozen:
            for name in trunk:
                # Equal bits, not only equal values.
                assert before[name].tobytes() == after[name].tobytes(), name
        else:
            for name in trunk:
                assert not np.array_equal(before[name], after[name]), name


def _parameter_count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


@pytest.mark.parametrize("depth_grad_clip", [None, 0.5])
def test_frozen_trunk_has_no_optimizer_state(getkey, depth_grad_clip):
    """With `train_depths_only` the state holds Adam's two moments for the depths'
    parameters and nothing for the trunk's; without it, for every parameter."""
    key = getkey()
    for frozen in (True, False):
        model = _model(key, train_depths_only=frozen)
        optimizer = _optimizer(model, depth_grad_clip=depth_grad_clip)
        state = optimizer.init(eqx.filter(model, eqx.is_array))
        leaves = jax.tree_util.tree_leaves_with_path(state)
        scalars = [leaf for _, leaf in leaves if leaf.size == 1]
        # Adam's step count and the schedule's.
        assert len(scalars) == 2
        total = sum(leaf.size for _, leaf in leaves)
        learning = model.depths if frozen else model
        assert total == 2 * _parameter_count(learning) + len(scalars)
        moment_names = [_name(path) for path, leaf in leaves if leaf.size > 1]
        assert any(".depths." in name for name in moment_names)
        assert any(".trunk." in name for name in moment_names) == (not frozen)


def test_default_state_structure_is_unchanged(getkey):
    """Without `train_depths_only` and `depth_grad_clip`, the state is what it always
    was, `(clip_by_global_norm, adamw)`: checkpoints saved before still restore."""
    model = _model(getkey())
    optimizer = _optimizer(model)
    state = optimizer.init(eqx.filter(model, eqx.is_array))
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.constant_schedule(1e-3),
            weight_decay=0.1,
            mask=eqx_mtp.train.weight_decay_mask(model),
        ),
    ).init(eqx.filter(model, eqx.is_array))
    assert jax.tree.structure(state) == jax.tree.structure(reference)


def _random_like(key, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = jax.random.split(key, len(named))
    return {
        name: np.asarray(jax.random.normal(k, value.shape, jnp.float32))
        for k, (name, value) in zip(keys, named.items())
    }


def _as_tree(template, named: dict[str, np.ndarray]):
    params = eqx.filter(template, eqx.is_array)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    values = [jnp.asarray(named[_name(path)]) for path, _ in leaves]
    return jax.tree.unflatten(jax.tree.structure(params), values)


def _global_norm(arrays) -> float:
    return float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays)))


def _hand_adamw(params, gradient_steps, *, frozen, grad_clip, depth_grad_clip):
    """AdamW in float64 NumPy: each step's gradients clipped by global norm (in one
    group, or trunk and depths apart), bias-corrected moments, decoupled decay on the
    matrices; a frozen trunk gets nothing."""
    params = {name: value.astype(np.float64) for name, value in params.items()}
    mu = {name: np.zeros_like(value) for name, value in params.items()}
    nu = {name: np.zeros_like(value) for name, value in params.items()}
    for t, grads in enumerate(gradient_steps, start=1):
        grads = {name: g.astype(np.float64) for name, g in grads.items()}
        if depth_grad_clip is None:
            groups = [(list(grads), grad_clip)]
        else:
            groups = [
                ([n for n in grads if not _is_depth(n)], grad_clip),
                ([n for n in grads if _is_depth(n)], depth_grad_clip),
            ]
        if frozen:
            # The trunk's gradients never reach a clip: the depths' are clipped alone.
            clip = grad_clip if depth_grad_clip is None else depth_grad_clip
            groups = [([n for n in grads if _is_depth(n)], clip)]
        clipped = {}
        for names, clip in groups:
            norm = _global_norm([grads[n] for n in names])
            scale = min(1.0, clip / norm)
            clipped.update({n: grads[n] * scale for n in names})
        for name, g in clipped.items():
            mu[name] = B1 * mu[name] + (1 - B1) * g
            nu[name] = B2 * nu[name] + (1 - B2) * g**2
            mu_hat = mu[name] / (1 - B1**t)
            nu_hat = nu[name] / (1 - B2**t)
            update = mu_hat / (np.sqrt(nu_hat) + EPS)
            if _decays(name):
                update = update + WEIGHT_DECAY * params[name]
            params[name] = params[name] - LEARNING_RATE * update
    return params


@pytest.mark.parametrize(
    "frozen,grad_clip,depth_grad_clip",
    [
        (False, 1e6, 1e-5),  # a tiny depth clip under a huge trunk clip
        (False, 0.5, 1e-5),  # both groups clipped, each by its own norm
        (False, 0.5, None),  # one global norm over every gradient
        (True, 1e6, 1e-5),
        (True, 1e-5, None),
    ],
)
def test_clipping_and_adamw_match_a_hand_computation(
    getkey, frozen, grad_clip, depth_grad_clip
):
    """Two steps of the optimizer on random gradients equal a hand-written clip and
    AdamW. The trunk's gradients grow tenfold on the second step and the depths' do
    not, so a joint clip and a clip per group give different second steps; with a
    clip of 1e-5 the entries are near AdamW's epsilon, so the first step also depends
    on the clipped norm."""
    model = _model(getkey(), train_depths_only=frozen)
    params = _named_arrays(model)
    first = _random_like(getkey(), params)
    second = _random_like(getkey(), params)
    second = {n: g if _is_depth(n) else 10 * g for n, g in second.items()}
    if frozen:
        # What the loss gives a frozen trunk; nonzero trunk gradients would be
        # zeroed all the same.
        first = {n: g if _is_depth(n) else 0 * g for n, g in first.items()}

    optimizer = _optimizer(model, grad_clip=grad_clip, depth_grad_clip=depth_grad_clip)
    tree = eqx.filter(model, eqx.is_array)
    state = optimizer.init(tree)
    with jax.numpy_dtype_promotion("standard"):
        for grads in (first, second):
            updates, state = optimizer.update(_as_tree(model, grads), state, tree)
            tree = eqx.apply_updates(tree, updates)
    result = _named_arrays(tree)
    expected = _hand_adamw(
        params,
        [first, second],
        frozen=frozen,
        grad_clip=grad_clip,
        depth_grad_clip=depth_grad_clip,
    )
    for name, value in result.items():
        if frozen and not _is_depth(name):
            assert params[name].tobytes() == value.tobytes(), name
        else:
            np.testing.assert_allclose(
                value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name
            )


def test_frozen_optimizer_state_checkpoints(getkey, tmp_path):
    """The frozen trunk's optimizer state (with its empty masked nodes) saves and
    restores through the job's `Checkpointer`."""
    config = tiny_config(train_depths_only=True)
    model = eqx_mtp.MTPModel(config, key=getkey())
    optimizer = _optimizer(model, depth_grad_clip=0.5)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    model, opt_state, _ = train_step(
        optimizer, model, opt_state, _batch(getkey()), jnp.float32(0.3)
    )
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(
        1,
        model=model,
        opt_state=opt_state,
        data_state={},
        rng=jax.random.key(0),
        config={},
    )
    restored = checkpointer.restore(
        model_config=config, opt_state_template=jax.eval_shape(lambda: opt_state)
    )
    checkpointer.close()
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)
    assert eqx.tree_equal(restored.opt_state, opt_state)
    assert eqx.tree_equal(restored.model, model)


def test_depth_grad_clip_config():
    """`depth_grad_clip` is off by default and must be > 0 when given; the job's
    error names the flag."""
    assert TrainConfig().optimizer.depth_grad_clip is None
    clipped = TrainConfig.from_dict(dict(depth_grad_clip=0.25))
    assert clipped.optimizer.depth_grad_clip == 0.25
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--depth-grad-clip"):
            TrainConfig.from_dict(dict(depth_grad_clip=bad))
    with pytest.raises(ValueError, match="depth_grad_clip"):
        make_optimizer(
            _model(jax.random.key(0)),
            learning_rate=1e-3,
            total_steps=10,
            warmup_steps=1,
            depth_grad_clip=0.0,
        )
