"""Mixed precision (`ModelConfig.compute_dtype`, a bfloat16 trunk output with float32
depths) and randomness in depth blocks (the optional `key` of the block contract)."""

import collections
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    SEGMENT_IDS,
    VOCAB,
    DropoutLayer,
    ToyLayer,
    ToyTrunk,
    packed_arrays,
    tiny_config,
)
from reference import (
    jit_once,
    loop_depth_loss_sums,
    loop_mtp_loss_sums,
    random_like,
    random_model,
)

import eqx_mtp
from eqx_mtp._precision import in_compute_dtype
from eqx_mtp.train._cli import _parser
from eqx_mtp.train._job import (
    RESUMABLE_FIELDS,
    RESUMABLE_MODEL_FIELDS,
    TrainConfig,
    UserError,
)

# bfloat16 against float32 (the independent loop reference). Measured on these
# models (CPU): loss sums within 2.0e-3 relative (our model; 7e-4 on a foreign trunk),
# the cosine similarity of every parameter's gradient above 0.9997 (0.99996); the
# bounds leave room for other platforms' rounding.
LOSS_RTOL = 1e-2
MIN_GRAD_COSINE = 0.999


def _config(**overrides):
    return tiny_config(
        **{"vocab_size": VOCAB, "num_heads": 4, "num_kv_heads": 2, **overrides}
    )


def _arrays(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _cosines(grads, ref_grads):
    """Cosine similarity of each pair of gradient leaves (flattened)."""
    out = []
    for g, r in zip(_arrays(grads), _arrays(ref_grads), strict=True):
        g, r = np.asarray(g, np.float64).ravel(), np.asarray(r, np.float64).ravel()
        out.append(g @ r / (np.linalg.norm(g) * np.linalg.norm(r)))
    return np.array(out)


# -- mixed precision ------------------------------------------------------------------


def test_compute_dtype_config():
    assert eqx_mtp.ModelConfig(vocab_size=5).compute_dtype == "float32"
    config = _config(compute_dtype="bfloat16")
    assert eqx_mtp.ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="compute_dtype must be one of.*float16"):
        _config(compute_dtype="float16")
    # Configs saved before the field existed load as float32.
    values = config.to_dict()
    del values["compute_dtype"]
    assert eqx_mtp.ModelConfig.from_dict(values).compute_dtype == "float32"


def test_parameters_cast_to_the_compute_dtype_except_norms():
    model = random_model(_config(depth_final_norm=True, tie_embeddings=False))
    cast = in_compute_dtype(model, "bfloat16")
    # Norms as leaves, everything else down to its arrays.
    leaves = jax.tree.leaves(cast, is_leaf=lambda x: isinstance(x, eqx_mtp.nn.RMSNorm))
    norms = [x for x in leaves if isinstance(x, eqx_mtp.nn.RMSNorm)]
    other = [x for x in leaves if eqx.is_array(x)]
    # The trunk block's 2 and final norm; each depth's enorm, hnorm, final norm and
    # its block's 2.
    assert len(norms) == 8
    assert {n.weight.dtype for n in norms} == {jnp.dtype(jnp.float32)}
    assert other and {x.dtype for x in other} == {jnp.dtype(jnp.bfloat16)}
    # The float32 originals are untouched, and float32 is a no-op.
    assert {x.dtype for x in _arrays(model)} == {jnp.dtype(jnp.float32)}
    assert eqx.tree_equal(in_compute_dtype(model, "float32"), model)


def test_rms_norm_computes_in_float32_whatever_its_scale_dtype():
    """A norm cast whole to bfloat16 by its user still computes in float32 (and under
    strict promotion does not fail on bfloat16 scale times float32 activations)."""
    x = jnp.linspace(-3.0, 5.0, 8, dtype=jnp.float32).reshape(2, 4)
    scale = jnp.array([1.5, 0.5, 2.0, 1.0], jnp.bfloat16)
    norm = eqx.tree_at(lambda n: n.weight, eqx_mtp.nn.RMSNorm(4, eps=1e-6), scale)
    x64 = np.asarray(x, np.float64)
    expected = (
        x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-6) * [1.5, 0.5, 2, 1]
    )
    np.testing.assert_allclose(norm(x), expected, rtol=1e-6)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def _dot_operand_dtypes(fn, *args):
    """`{(lhs dtype, rhs dtype): count}` over every `dot_general` of `fn`'s jaxpr,
    sub-jaxprs (scan, remat, custom VJPs) included."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                counts[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(eqx.filter_make_jaxpr(fn)(*args)[0].jaxpr)
    return dict(counts)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_every_matmul_runs_in_the_compute_dtype(compute_dtype):
    """Forward and backward, trunk, depths, attention and the fused head: every
    matmul's operands are in the compute dtype (accumulation and logits are float32,
    as `preferred_element_type` asks); the loss and the gradients are float32."""
    model = random_model(_config(compute_dtype=compute_dtype, shared_depth_layer=True))
    tokens, _, _ = packed_arrays()

    @eqx.filter_value_and_grad(has_aux=True)
    def loss_and_grad(model):
        sums, counts = eqx_mtp.mtp_loss_sums(
            model, jnp.asarray(tokens), segment_ids=jnp.asarray(SEGMENT_IDS)
        )
        return jnp.sum(sums), sums

    dtypes = _dot_operand_dtypes(loss_and_grad, model)
    assert list(dtypes) == [(compute_dtype, compute_dtype)], dtypes
    (_, sums), grads = eqx.filter_eval_shape(loss_and_grad, model)
    assert sums.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("impl", ["fused", "chunked", "naive"])
def test_head_loss_of_bfloat16_operands_is_float32(impl):
    """bfloat16 hidden states and unembedding (as under `compute_dtype="bfloat16"`):
    logits, log-sum-exp and sum in float32, so the loss equals a float64 computation
    on the same bfloat16 values to float32 rounding, not to bfloat16's."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(3 * rng.standard_normal((40, 16)), jnp.bfloat16)
    unembedding = jnp.asarray(rng.standard_normal((19, 16)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 19, 40), jnp.int32)
    where = jnp.asarray(rng.random(40) < 0.9)
    total, _ = eqx_mtp.head_loss_sum(
        hidden, unembedding, targets, where, chunk_size=16, impl=impl
    )
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64).T
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    losses = lse - logits[np.arange(40), np.asarray(targets)]
    assert total.dtype == jnp.float32
    np.testing.assert_allclose(total, np.sum(losses * np.asarray(where)), rtol=1e-6)


def test_model_call_returns_the_compute_dtype():
    model = random_model(_config(compute_dtype="bfloat16"))
    tokens = jnp.arange(8, dtype=jnp.int32)
    hidden = model(
        tokens, positions=jnp.arange(8, dtype=jnp.int32), segment_ids=tokens * 0 + 1
    )
    assert hidden.dtype == jnp.bfloat16


BF16_VARIANTS = [
    dict(),  # sequential transformer depths, remat "full", fused loss
    dict(
        mtp_kind="parallel",
        mtp_block="mlp",
        remat="save_dots",
        loss_impl="chunked",
        depth_final_norm=True,
        tie_embeddings=False,
    ),
]


@pytest.mark.parametrize(
    "overrides", BF16_VARIANTS, ids=lambda o: "-".join(map(str, o.values())) or "base"
)
def test_bfloat16_model_matches_float32(overrides):
    """`compute_dtype="bfloat16"` against the float32 loop reference: per-depth loss
    sums within `LOSS_RTOL`, every gradient leaf within `MIN_GRAD_COSINE`."""
    config = _config(num_depths=2, **overrides)
    model = random_model(config)
    # The same parameters (compute_dtype does not change them), another config.
    bf16_model = random_model(dataclasses.replace(config, compute_dtype="bfloat16"))
    assert eqx.tree_equal(_arrays(bf16_model), _arrays(model))
    tokens, loss_mask, positions = packed_arrays()
    weights = jnp.array([1.0, 0.7, 0.4], jnp.float32)
    batch = dict(
        segment_ids=jnp.asarray(SEGMENT_IDS),
        positions=jnp.asarray(positions),
        loss_mask=jnp.asarray(loss_mask),
    )

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def bf16(model):
        sums, _ = eqx_mtp.mtp_loss_sums(model, jnp.asarray(tokens), **batch)
        return jnp.sum(weights * sums), sums

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def reference(model):
        sums, _ = loop_mtp_loss_sums(model, tokens, SEGMENT_IDS, positions, loss_mask)
        return jnp.sum(weights * sums), sums

    (_, sums), grads = bf16(bf16_model)
    (_, ref_sums), ref_grads = reference(model)
    assert sums.dtype == jnp.float32
    np.testing.assert_allclose(sums, ref_sums, rtol=LOSS_RTOL)
    # Not the float32 result by accident: bfloat16 rounding shows.
    assert not np.array_equal(sums, ref_sums)
    cosines = _cosines(grads, ref_grads)
    assert cosines.min() > MIN_GRAD_COSINE, cosines
    assert {x.dtype for x in _arrays(grads)} == {jnp.dtype(jnp.float32)}


class Float32Layer(ToyLayer):
    """A user's block that computes in float32 whatever it is given and returns
    float32."""

    def __call__(self, x, *, positions, segment_ids):
        x = x.astype(jnp.float32)
        mlp = in_compute_dtype(self.mlp, jnp.float32)
        return x + jax.vmap(mlp)(x)


def _toy(kind, layer=ToyLayer, num_depths=3, dim=8):
    def make(key):
        trunk_key, depths_key = jax.random.split(key)
        trunk = ToyTrunk(VOCAB, dim, key=trunk_key)
        depths = eqx_mtp.MTPDepths(
            num_depths,
            dim,
            make_layer=lambda k: layer(dim, key=k),
            kind=kind,
            key=depths_key,
        )
        return trunk, depths

    return random_like(eqx.filter_eval_shape(make, jax.random.key(0)))


@pytest.mark.parametrize(
    "kind, layer",
    [("sequential", ToyLayer), ("parallel", ToyLayer), ("sequential", Float32Layer)],
)
def test_bfloat16_trunk_output_with_float32_depths(kind, layer):
    """A foreign trunk's bfloat16 output fed to float32 depths (the issue's "scan body
    function carry input and carry output must have equal types" crash): the depths
    compute in bfloat16, even a layer that returns float32, and the sums and
    gradients match the float32 reference within the stated tolerances."""
    trunk, depths = _toy(kind, layer)
    tokens, loss_mask, positions = packed_arrays(seed=1)
    weights = jnp.array([1.0, 0.7, 0.4], jnp.float32)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def bf16(params):
        trunk, depths = params
        hidden = jax.vmap(trunk)(jnp.asarray(tokens)).astype(jnp.bfloat16)
        sums, _ = eqx_mtp.mtp_depth_losses(
            depths,
            hidden,
            jnp.asarray(tokens),
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=jax.vmap(jax.vmap(trunk.norm)),
            segment_ids=jnp.asarray(SEGMENT_IDS),
            positions=jnp.asarray(positions),
            loss_mask=jnp.asarray(loss_mask),
        )
        return jnp.sum(weights * sums), sums

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def reference(params):
        trunk, depths = params
        sums, _ = loop_depth_loss_sums(
            depths,
            jax.vmap(trunk)(jnp.asarray(tokens)),
            tokens,
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=jax.vmap(trunk.norm),
            segment_ids=SEGMENT_IDS,
            positions=positions,
            loss_mask=loss_mask,
        )
        return jnp.sum(weights * sums), sums

    (_, sums), grads = bf16((trunk, depths))
    (_, ref_sums), ref_grads = reference((trunk, depths))
    assert sums.dtype == jnp.float32
    np.testing.assert_allclose(sums, ref_sums, rtol=LOSS_RTOL)
    assert not np.array_equal(sums, ref_sums)
    cosines = _cosines(grads, ref_grads)
    assert cosines.min() > MIN_GRAD_COSINE, cosines
    assert {x.dtype for x in _arrays(grads)} == {jnp.dtype(jnp.float32)}


def test_train_config_compute_dtype():
    args = _parser().parse_args(["train", "--compute-dtype", "bfloat16"])
    assert args.compute_dtype == "bfloat16"
    config = TrainConfig.from_dict(dict(compute_dtype="bfloat16", seq_len=16))
    assert config.model.compute_dtype == "bfloat16"
    with pytest.raises(UserError, match="--compute-dtype must be one of"):
        TrainConfig.from_dict(dict(compute_dtype="float16", seq_len=16))
    # Rounding only, like remat: a run may continue under another compute dtype.
    assert "compute_dtype" in RESUMABLE_FIELDS
    assert "model.compute_dtype" in RESUMABLE_MODEL_FIELDS


# -- the block key ---------------------------------------------------------------------


class DrawLayer(eqx.Module):
    """Records its key: returns one uniform draw of it at every position."""

    def __init__(self, dim, *, key):
        pass

    def __call__(self, x, *, positions, segment_ids, key=None):
        return jnp.zeros_like(x) + jax.random.uniform(key, dtype=x.dtype)


def _with_depths(model, layer, **depth_options):
    config = model.config
    depths = eqx_mtp.MTPDepths(
        config.num_depths,
        config.dim,
        make_layer=lambda k: layer(config.dim, key=k),
        kind=config.mtp_kind,
        remat=config.remat,
        key=jax.random.key(1),
        **depth_options,
    )
    return eqx.tree_at(lambda m: m.depths, model, random_like(depths, seed=3))


@eqx.filter_jit
def _losses(model, key):
    """`mtp_loss_sums`' sums and `mtp_loss`'s loss of one batch, both given `key`."""
    tokens, loss_mask, positions = packed_arrays()
    batch = dict(
        segment_ids=jnp.asarray(SEGMENT_IDS),
        positions=jnp.asarray(positions),
        loss_mask=jnp.asarray(loss_mask),
        key=key,
    )
    sums, _ = eqx_mtp.mtp_loss_sums(model, jnp.asarray(tokens), **batch)
    loss, _ = eqx_mtp.mtp_loss(model, jnp.asarray(tokens), **batch)
    return sums, loss


@eqx.filter_jit
def _reference_sums(model):
    tokens, loss_mask, positions = packed_arrays()
    sums, _ = loop_mtp_loss_sums(model, tokens, SEGMENT_IDS, positions, loss_mask)
    return sums


def test_no_key_is_deterministic_and_our_blocks_ignore_keys(getkey):
    """`key=None` twice gives identical sums, equal to the loop reference (today's
    result); our own blocks take no randomness, so a key changes nothing."""
    model = random_model(_config(num_depths=3))
    first, second = _losses(model, None), _losses(model, None)
    assert eqx.tree_equal(first, second)
    np.testing.assert_allclose(first[0], _reference_sums(model), rtol=1e-5)
    assert eqx.tree_equal(_losses(model, getkey()), first)


def test_dropout_in_a_depth_block_is_keyed_and_reproducible(getkey):
    """A user's `eqx.nn.Dropout(p=0.5)` block in an `MTPModel`'s depths, through
    `mtp_loss_sums` and `mtp_loss`: the same key gives the same losses, another key
    another loss at every depth, no key the deterministic (dropout-free) reference."""
    model = _with_depths(random_model(_config(num_depths=3)), DropoutLayer)
    key, other = getkey(), getkey()
    sums, loss = _losses(model, key)
    again_sums, again_loss = _losses(model, key)
    np.testing.assert_array_equal(again_sums, sums)
    assert again_loss == loss
    other_sums, other_loss = _losses(model, other)
    np.testing.assert_array_equal(other_sums[0], sums[0])  # the trunk has no dropout
    assert np.all(other_sums[1:] != sums[1:]), (sums, other_sums)
    assert other_loss != loss
    deterministic, deterministic_loss = _losses(model, None)
    assert np.all(deterministic[1:] != sums[1:]) and deterministic_loss != loss
    np.testing.assert_allclose(deterministic, _reference_sums(model), rtol=1e-5)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
@pytest.mark.parametrize("shared_layer", [False, True])
def test_every_depth_and_row_gets_its_own_key(kind, shared_layer, getkey):
    """The key is split into one per depth, and each depth's into one per row: the
    draws of a recording block are exactly those keys' draws, all distinct."""
    num_depths, dim, rows = 3, 8, 4
    depths = eqx_mtp.MTPDepths(
        num_depths,
        dim,
        make_layer=lambda k: DrawLayer(dim, key=k),
        kind=kind,
        shared_layer=shared_layer,
        key=getkey(),
    )
    tokens = jnp.zeros((rows, 6), jnp.int32)
    key = getkey()
    draws = eqx_mtp.scan_depths(
        depths,
        jnp.ones((rows, 6, dim), jnp.float32),
        tokens,
        embedding=jnp.ones((VOCAB, dim), jnp.float32),
        final_norm=lambda h: h,
        readout=lambda k, normed: normed[:, :, 0],
        key=key,
    )
    expected = np.array(
        [
            [
                jax.random.uniform(row_key)
                for row_key in jax.random.split(depth_key, rows)
            ]
            for depth_key in jax.random.split(key, num_depths)
        ]
    )
    # Every position of a row holds its row's draw.
    np.testing.assert_array_equal(draws, np.repeat(expected[:, :, None], 6, axis=2))
    assert len(np.unique(expected)) == num_depths * rows


def test_dropout_under_remat_recomputes_the_same_mask(getkey):
    """Under `jax.checkpoint` the backward pass recomputes each depth with the same
    key: loss and gradients equal those of `remat="none"`."""
    key = getkey()
    tokens, loss_mask, positions = packed_arrays()

    def value_and_grad(remat_policy):
        config = _config(num_depths=3, mtp_block="mlp", remat=remat_policy)
        model = _with_depths(random_model(config), DropoutLayer)

        @jit_once
        @eqx.filter_value_and_grad
        def fn(model):
            loss, _ = eqx_mtp.mtp_loss(
                model,
                jnp.asarray(tokens),
                segment_ids=jnp.asarray(SEGMENT_IDS),
                positions=jnp.asarray(positions),
                loss_mask=jnp.asarray(loss_mask),
                mtp_weight=1.0,
                key=key,
            )
            return loss

        return fn(model)

    ref_loss, ref_grads = value_and_grad("none")
    proj = ref_grads.depths.depths.layer.proj.weight
    assert np.all(np.any(np.asarray(proj).reshape(3, -1) != 0, axis=1))
    for remat in ("full", "save_dots"):
        loss, grads = value_and_grad(remat)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for g, r in zip(_arrays(grads), _arrays(ref_grads), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_a_block_without_a_key_parameter(getkey):
    """A block written to the old contract runs wherever no key is given (the key is
    passed only when there is one); given a key, calling it is the `TypeError` of
    any unexpected keyword argument."""
    trunk, depths = _toy("sequential", ToyLayer)
    tokens, loss_mask, positions = packed_arrays(seed=1)
    arguments = dict(
        embedding=trunk.embedding,
        unembedding=trunk.unembedding,
        segment_ids=SEGMENT_IDS,
        positions=positions,
        loss_mask=loss_mask,
    )
    hidden = jax.vmap(trunk)(jnp.asarray(tokens))
    sums, _ = eqx_mtp.mtp_depth_losses(
        depths,
        hidden,
        jnp.asarray(tokens),
        final_norm=jax.vmap(jax.vmap(trunk.norm)),
        key=None,
        **{k: jnp.asarray(v) for k, v in arguments.items()},
    )
    ref_sums, _ = loop_depth_loss_sums(
        depths, hidden, tokens, final_norm=jax.vmap(trunk.norm), **arguments
    )
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5)
    with pytest.raises(TypeError, match="key"):
        eqx_mtp.mtp_depth_losses(
            depths,
            hidden,
            jnp.asarray(tokens),
            final_norm=jax.vmap(jax.vmap(trunk.norm)),
            key=getkey(),
            **{k: jnp.asarray(v) for k, v in arguments.items()},
        )
