"""Per-depth loss weights, λ schedules and `train_depths_only`, against formulas
written here."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from hypothesis import given

import eqx_mtp


def _expected_loss(sums, counts, weight, depth_weights, reduction):
    """The reductions of `docs/maths.md` with the weighted means documented in
    `reduce_losses`, in numpy
    float64."""
    sums = np.asarray(sums, np.float64)
    counts = np.asarray(counts, np.float64)
    num_depths = len(sums) - 1
    main = sums[0] / max(counts[0], 1)
    if num_depths == 0:
        return main
    w = np.ones(num_depths) if depth_weights is None else np.asarray(depth_weights)
    if reduction == "mean":
        per_depth = [sums[k] / max(counts[k], 1) for k in range(1, num_depths + 1)]
        extra = sum(w[k] * per_depth[k] for k in range(num_depths)) / sum(w)
    else:
        numerator = sum(w[k - 1] * sums[k] for k in range(1, num_depths + 1))
        denominator = sum(w[k - 1] * counts[k] for k in range(1, num_depths + 1))
        extra = numerator / (denominator if denominator > 0 else 1.0)
    return main + weight * extra


@st.composite
def sums_and_counts(draw):
    num_depths = draw(st.integers(0, 4))
    counts = draw(
        st.lists(st.integers(0, 50), min_size=num_depths + 1, max_size=num_depths + 1)
    )
    sums = [
        0.0 if n == 0 else draw(st.floats(0.0, 5.0)) * n for n in counts
    ]  # a depth without tokens has a zero sum
    weights = draw(
        st.one_of(
            st.none(),
            st.lists(
                st.floats(0.0, 2.0), min_size=num_depths, max_size=num_depths
            ).filter(lambda w: sum(w) > 0.01),
        )
    )
    return num_depths, sums, counts, weights


@given(
    case=sums_and_counts(),
    weight=st.floats(0.0, 1.0),
    reduction=st.sampled_from(["mean", "pooled"]),
)
def test_depth_weights_follow_the_documented_formulas(case, weight, reduction):
    num_depths, sums, counts, depth_weights = case
    if num_depths == 0:
        depth_weights = None
    loss, aux = eqx_mtp.reduce_losses(
        jnp.asarray(sums, jnp.float32),
        jnp.asarray(counts, jnp.int32),
        mtp_weight=weight,
        reduction=reduction,
        depth_weights=depth_weights,
    )
    expected = _expected_loss(sums, counts, weight, depth_weights, reduction)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-5)


def test_geometric_depth_weights_and_their_gradient():
    sums = jnp.array([12.0, 30.0, 18.0, 9.0], jnp.float32)
    counts = jnp.array([6, 10, 9, 3], jnp.int32)
    decay = [1.0, 0.5, 0.25]

    def loss(s, reduction):
        return eqx_mtp.reduce_losses(
            s, counts, mtp_weight=0.3, reduction=reduction, depth_weights=decay
        )[0]

    for reduction in ("mean", "pooled"):
        grad = jax.grad(loss)(sums, reduction)
        if reduction == "mean":
            # ∂L/∂S_k = λ w_k / (N_k Σ w)
            expected = [1 / 6] + [0.3 * w / n / 1.75 for w, n in zip(decay, [10, 9, 3])]
        else:
            # ∂L/∂S_k = λ w_k / Σ_j w_j N_j
            pooled = 1.0 * 10 + 0.5 * 9 + 0.25 * 3
            expected = [1 / 6] + [0.3 * w / pooled for w in decay]
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_equal_depth_weights_are_the_unweighted_reduction():
    sums = jnp.array([3.0, 4.0, 5.0], jnp.float32)
    counts = jnp.array([2, 3, 0], jnp.int32)
    for reduction in ("mean", "pooled"):
        plain, _ = eqx_mtp.reduce_losses(sums, counts, reduction=reduction)
        weighted, _ = eqx_mtp.reduce_losses(
            sums, counts, reduction=reduction, depth_weights=jnp.array([2.0, 2.0])
        )
        np.testing.assert_allclose(float(weighted), float(plain), rtol=1e-6)


@pytest.mark.parametrize(
    "depth_weights,match",
    [([1.0], r"shape \(2,\)"), ([1.0, -0.5], "non-negative"), ([0.0, 0.0], "sum")],
)
def test_bad_depth_weights_are_named(depth_weights, match):
    sums = jnp.array([3.0, 4.0, 5.0], jnp.float32)
    counts = jnp.array([2, 3, 4], jnp.int32)
    with pytest.raises(ValueError, match="depth_weights") as info:
        eqx_mtp.reduce_losses(sums, counts, depth_weights=depth_weights)
    assert info.match(match)


def test_mtp_weight_as_float_array_and_schedules():
    sums = jnp.array([3.0, 4.0, 5.0], jnp.float32)
    counts = jnp.array([2, 4, 5], jnp.int32)
    main, extra = 1.5, (1.0 + 1.0) / 2

    def loss(**kwargs):
        return float(eqx_mtp.reduce_losses(sums, counts, **kwargs)[0])

    assert loss(mtp_weight=0.3) == pytest.approx(main + 0.3 * extra)
    assert loss(mtp_weight=jnp.float32(0.3)) == pytest.approx(main + 0.3 * extra)
    # an optax schedule, and a plain function of the step
    linear = optax.linear_schedule(0.5, 0.0, transition_steps=100)
    for step in (0, 40, 100, 250):
        expected = main + max(0.5 * (1 - step / 100), 0.0) * extra
        assert loss(mtp_weight=linear, step=step) == pytest.approx(expected)
        assert loss(mtp_weight=lambda s: 0.01 * s, step=step) == pytest.approx(
            main + 0.01 * step * extra, rel=1e-5
        )
    # traced step under jit
    jitted = jax.jit(
        lambda step: eqx_mtp.reduce_losses(sums, counts, mtp_weight=linear, step=step)
    )
    assert float(jitted(jnp.int32(40))[0]) == pytest.approx(main + 0.3 * extra)
    with pytest.raises(ValueError, match="step"):
        loss(mtp_weight=linear)
    # (a TypeError where the jaxtyping hook checks the annotation first)
    with pytest.raises((ValueError, TypeError), match="mtp_weight"):
        loss(mtp_weight=jnp.ones(2, jnp.float32))


@pytest.mark.parametrize(
    "spec,step,expected",
    [
        ("0.3", None, 0.3),
        (0.25, None, 0.25),
        (" 0.1 ", None, 0.1),
        ("0.3@0,0.1@800", 0, 0.3),
        ("0.3@0,0.1@800", 799, 0.3),
        ("0.3@0,0.1@800", 800, 0.1),
        ("0.3@0,0.1@800", 10_000, 0.1),
        ("1@0,0.5@10,0.25@20", 15, 0.5),
        ("1@0,0.5@10,0.25@20", 20, 0.25),
        ("0.7@0", 123, 0.7),
    ],
)
def test_parse_mtp_weight(spec, step, expected):
    parsed = eqx_mtp.parse_mtp_weight(spec)
    if step is None:
        assert isinstance(parsed, float) and parsed == pytest.approx(expected)
        return
    value = parsed(step) if callable(parsed) else parsed
    assert float(value) == pytest.approx(expected)
    # the parsed schedule drives reduce_losses and accepts a traced step
    sums = jnp.array([2.0, 4.0], jnp.float32)
    counts = jnp.array([1, 2], jnp.int32)
    loss = jax.jit(
        lambda s: eqx_mtp.reduce_losses(sums, counts, mtp_weight=parsed, step=s)[0]
    )(jnp.int32(step))
    assert float(loss) == pytest.approx(2.0 + expected * 2.0)


@pytest.mark.parametrize(
    "spec",
    ["", "abc", "0.3@", "@5", "0.3@0,", "0.3@0.5", "0.3@5", "0.3@0,0.1@0", "0.3@0;1@8"],
)
def test_parse_mtp_weight_rejects_bad_strings(spec):
    with pytest.raises(ValueError, match="mtp_weight"):
        eqx_mtp.parse_mtp_weight(spec)


def _is_trunk_path(path) -> bool:
    return getattr(path[0], "name", None) == "trunk"


def test_train_depths_only_freezes_the_trunk(getkey):
    key = getkey()
    tokens = jax.random.randint(getkey(), (2, 10), 0, 19)
    # depth weights and a schedule ride along, to check the whole mtp_loss call
    schedule = eqx_mtp.parse_mtp_weight("0.3@0,0.1@5")

    @eqx.filter_jit
    def loss_and_grads(model):
        def loss(m):
            return eqx_mtp.mtp_loss(
                m, tokens, mtp_weight=schedule, step=7, depth_weights=[1.0, 0.5]
            )

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    def model(train_depths_only):
        config = tiny_config(
            tie_embeddings=False,  # the embedding and unembedding both stop
            mtp_block="mlp",
            train_depths_only=train_depths_only,
        )
        return eqx_mtp.MTPModel(config, key=key)

    (loss, aux), grads = loss_and_grads(model(True))
    (full_loss, full_aux), full_grads = loss_and_grads(model(False))

    # the flag changes gradients, not values
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
    main, depth_losses = aux["main_loss"], aux["depth_losses"]
    expected = main + 0.1 * (depth_losses[1] + 0.5 * depth_losses[2]) / 1.5
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)

    flat = jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array))
    full_flat = jax.tree_util.tree_leaves(eqx.filter(full_grads, eqx.is_array))
    trunk_leaves = depth_leaves = 0
    for (path, grad), full_grad in zip(flat, full_flat, strict=True):
        if _is_trunk_path(path):
            trunk_leaves += 1
            assert bool(jnp.all(grad == 0)), jax.tree_util.keystr(path)
            assert bool(jnp.any(full_grad != 0)), jax.tree_util.keystr(path)
        else:
            depth_leaves += 1
            assert bool(jnp.any(grad != 0)), jax.tree_util.keystr(path)
            # a depth's gradient does not depend on whether the trunk learns
            np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-7)
    assert trunk_leaves > 0 and depth_leaves > 0


@pytest.mark.parametrize(
    "field,value",
    [("loss_chunk_size", 0), ("loss_impl", "flash"), ("train_depths_only", "yes")],
)
def test_invalid_loss_options_name_the_field(field, value):
    # (a TypeError where the jaxtyping hook checks the annotation first)
    with pytest.raises((ValueError, TypeError), match=field):
        tiny_config(**{field: value})


def _perturb_depth(depths: eqx_mtp.MTPDepths, index: int) -> eqx_mtp.MTPDepths:
    """`depths` with every array of depth `index + 1` changed, the others untouched."""

    def change(leaf):
        return leaf.at[index].add(0.5) if eqx.is_array(leaf) else leaf

    return eqx.tree_at(lambda d: d.depths, depths, jax.tree.map(change, depths.depths))


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_parallel_heads_read_the_trunk_output_and_nothing_else(kind, getkey):
    dim, vocab, num_depths = 8, 19, 3
    depths = eqx_mtp.MTPDepths(
        num_depths,
        dim,
        make_layer=lambda k: eqx_mtp.nn.MLPBlock(dim, 16, key=k),
        kind=kind,
        key=getkey(),
    )
    hidden = jax.random.normal(getkey(), (2, 10, dim))
    tokens = jax.random.randint(getkey(), (2, 10), 0, vocab)
    embedding = jax.random.normal(getkey(), (vocab, dim))
    norm = eqx_mtp.nn.RMSNorm(dim)

    def outputs(depths, embedding):
        """Every depth's normed hidden state, `[num_depths, batch, seq, dim]`."""
        return eqx_mtp.scan_depths(
            depths,
            hidden,
            tokens,
            embedding=embedding,
            final_norm=norm,
            readout=lambda k, normed: normed,
        )

    base = outputs(depths, embedding)
    other_embedding = outputs(depths, embedding + 1.0)
    first_depth_changed = outputs(_perturb_depth(depths, 0), embedding)
    if kind == "sequential":
        # The check can fail: a sequential depth reads the embeddings and depth 1.
        assert not np.allclose(base, other_embedding)
        assert not np.allclose(base[1:], first_depth_changed[1:])
        return

    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    segment_ids = jnp.ones((2, 10), jnp.int32)
    for index in range(num_depths):
        layer = depths.depth(index).layer
        expected = norm(
            jax.vmap(lambda h, p, s: layer(h, positions=p, segment_ids=s))(
                hidden, positions, segment_ids
            )
        )
        np.testing.assert_allclose(base[index], expected, rtol=1e-5, atol=1e-6)
    # Nothing but h⁰ and the depth's own weights: not the embeddings, not depth 1.
    np.testing.assert_array_equal(base, other_embedding)
    np.testing.assert_array_equal(base[1:], first_depth_changed[1:])
    assert not np.allclose(base[0], first_depth_changed[0])
