"""The MTP loss over a device mesh (8 simulated CPU devices, see conftest.py).

- `mtp_loss` under `("data", "model", "context")` meshes equals the single-device
  loss, sums, counts and gradients, and (on one mesh) an independent Python-loop
  reference, with packed documents that straddle context-shard boundaries;
- `vocab_parallel_loss_sum` equals a naive full-logits cross-entropy in value and in
  both gradients, for vocabularies the `model` axis does and does not divide, and a
  device whose tokens are all masked adds exactly nothing;
- the sharding rules (`partition_specs`, `shard_tree`) put parameters and Adam
  moments where `docs/distributed.md` says, and FSDP divides the parameter memory;
- bad meshes and batches that do not fit a mesh fail with one-line errors that name
  the argument.
"""

import functools
import re

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tree_allclose
from hypothesis import given, settings
from jax.sharding import PartitionSpec as P
from reference import (
    jit_once,
    loop_mtp_loss_sums,
    naive_cross_entropy_sum,
    random_model,
)

import eqx_mtp
from eqx_mtp._sharding import tree_path_name

_FAST = {"xla_backend_optimization_level": 0}

# -- mtp_loss over a mesh equals mtp_loss on one device --------------------------------

BATCH, SEQ_LEN = 8, 16
# Documents [0, 5), [5, 11), [11, 16) (or padding from 11 on): the boundaries 5 and 11
# lie inside the shards of 4 tokens (context=4) and of 2 (context=8), and each
# document runs across shard boundaries, so at every depth some targets live on
# another context shard than the position that predicts them.
_ROW_A = [1] * 5 + [2] * 6 + [3] * 5
_ROW_B = [1] * 5 + [2] * 6 + [0] * 5
_ROW_C = [4] * 11 + [0] * 5
SEGMENT_IDS = np.array([_ROW_A, _ROW_B, _ROW_C, _ROW_A] * 2, np.int32)


def _batch(vocab_size):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab_size, (BATCH, SEQ_LEN)).astype(np.int32)
    loss_mask = rng.random((BATCH, SEQ_LEN)) < 0.8
    return tokens, loss_mask


def _valid(segment_ids, loss_mask, k):
    """The validity rule, written out for this test's data."""
    seg = segment_ids
    valid = np.zeros(seg.shape, bool)
    valid[:, : SEQ_LEN - k - 1] = (
        (seg[:, : SEQ_LEN - k - 1] != 0)
        & (seg[:, k + 1 :] == seg[:, : SEQ_LEN - k - 1])
        & loss_mask[:, k + 1 :]
    )
    return valid


def test_documents_straddle_context_shards():
    """The batch of the mesh tests has, for context=4 and 8 and at every depth up to
    3, valid targets on another context shard than their position (else a loss that
    ignored cross-shard targets would pass them), and documents that begin inside a
    shard."""
    _, loss_mask = _batch(19)
    positions = np.arange(SEQ_LEN)
    for context in (4, 8):
        shard = SEQ_LEN // context
        for k in range(4):
            valid = _valid(SEGMENT_IDS, loss_mask, k)
            crosses = positions // shard != (positions + k + 1) // shard
            assert np.any(valid & crosses[None, :]), (context, k)
        starts = SEGMENT_IDS[:, 1:] != SEGMENT_IDS[:, :-1]
        assert np.any(starts[:, (positions[1:] % shard) != 0])


@functools.cache
def _model(num_depths, mtp_kind, loss_impl):
    config = tiny_config(
        num_depths=num_depths,
        mtp_kind=mtp_kind,
        loss_impl=loss_impl,
        # Chunks of 3 tokens divide neither the 128 tokens of one device nor the
        # 2..64 of a shard, so the padded last chunk is exercised everywhere.
        loss_chunk_size=3,
    )
    return random_model(config, seed=num_depths)


def _loss_and_grads(model, mesh):
    """`((loss, aux), grads)` of `mtp_loss` on this file's batch, compiled once."""
    tokens, loss_mask = _batch(model.config.vocab_size)
    arrays, static = eqx.partition(model, eqx.is_array)

    def objective(arrays, tokens, segment_ids, loss_mask):
        def loss(m):
            return eqx_mtp.mtp_loss(
                m,
                tokens,
                segment_ids=segment_ids,
                loss_mask=loss_mask,
                mtp_weight=0.3,
                mesh=mesh,
            )

        return eqx.filter_value_and_grad(loss, has_aux=True)(
            eqx.combine(arrays, static)
        )

    inputs = (jnp.asarray(tokens), jnp.asarray(SEGMENT_IDS), jnp.asarray(loss_mask))
    if mesh is not None:
        inputs = jax.device_put(inputs, eqx_mtp.batch_sharding(mesh))
    return jax.jit(objective, compiler_options=_FAST)(arrays, *inputs)


@functools.cache
def _single_device(num_depths, mtp_kind, loss_impl):
    return _loss_and_grads(_model(num_depths, mtp_kind, loss_impl), None)


@functools.cache
def _on_mesh(shape, num_depths, mtp_kind, loss_impl):
    mesh = eqx_mtp.make_mesh(*shape)
    model = eqx_mtp.shard_tree(_model(num_depths, mtp_kind, loss_impl), mesh)
    return _loss_and_grads(model, mesh)


# (mesh (data, model, context), num_depths, mtp_kind, loss_impl): every mesh, every
# depth count, both kinds and both implementations appear, D=3 with all four pairs.
_MESH_CASES = [
    ((8, 1, 1), 0, "sequential", "chunked"),
    ((4, 2, 1), 3, "sequential", "fused"),
    ((2, 2, 2), 3, "parallel", "chunked"),
    ((2, 1, 4), 3, "sequential", "chunked"),
    ((1, 1, 8), 3, "parallel", "fused"),
    ((2, 2, 2), 1, "sequential", "fused"),
    ((1, 1, 8), 1, "parallel", "chunked"),
]


@pytest.mark.parametrize("shape, num_depths, mtp_kind, loss_impl", _MESH_CASES)
def test_mtp_loss_on_mesh_equals_single_device(shape, num_depths, mtp_kind, loss_impl):
    """Loss, per-depth sums, counts and every gradient equal the single-device run."""
    (loss, aux), grads = _on_mesh(shape, num_depths, mtp_kind, loss_impl)
    (expected_loss, expected_aux), expected_grads = _single_device(
        num_depths, mtp_kind, loss_impl
    )
    # Counts are integers: a target dropped or double-counted at a shard boundary (a
    # validity rule applied per shard, a psum over too few or too many axes) shows.
    np.testing.assert_array_equal(aux["token_counts"], expected_aux["token_counts"])
    assert aux["token_counts"].shape == (num_depths + 1,)
    # A missing or doubled psum, a wrong log-normaliser across vocabulary shards, or
    # the padded vocabulary rows leaking into the softmax changes the sums.
    assert tree_allclose(aux["loss_sums"], expected_aux["loss_sums"], rtol=1e-5)
    assert tree_allclose(loss, expected_loss, rtol=1e-5)
    # Gradients: a wrong transpose of a collective (the hidden-state gradient not
    # summed over `model`, the unembedding's not over `data`/`context`), or a
    # sharded parameter's gradient reduced the wrong way.
    assert tree_allclose(grads, expected_grads, rtol=1e-5)
    # Not a vacuous comparison of zeros: every parameter does get a gradient.
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(expected_grads))


def test_untied_mtp_loss_on_mesh_equals_single_device():
    """An untied unembedding (its own per-token-shard copies, apart from the
    embedding's) on a mesh that pads the vocabulary (19 over model=2): loss, sums
    and every gradient equal the single-device run."""
    config = tiny_config(num_depths=2, tie_embeddings=False, loss_chunk_size=3)
    model = random_model(config, seed=5)
    (loss, aux), grads = _loss_and_grads(model, None)
    mesh = eqx_mtp.make_mesh(2, 2, 2)
    (mesh_loss, mesh_aux), mesh_grads = _loss_and_grads(
        eqx_mtp.shard_tree(model, mesh), mesh
    )
    np.testing.assert_array_equal(mesh_aux["token_counts"], aux["token_counts"])
    assert tree_allclose(mesh_aux["loss_sums"], aux["loss_sums"], rtol=1e-5)
    assert tree_allclose(mesh_loss, loss, rtol=1e-5)
    # A gradient of the unembedding's copies dropped, or reduced into the
    # embedding's, shows here.
    assert tree_allclose(mesh_grads, grads, rtol=1e-5)
    assert np.any(np.asarray(grads.trunk.unembedding) != 0)


def test_context_parallel_attention_gathers_keys_and_values():
    """On a `context` mesh each query shard attends to gathered keys and values. The
    bug this catches: attention left to the partitioner keeps the logits split by key
    and trades `[rows, heads, seq, seq / context]` probability gradients with
    floating-point all-to-alls (quadratic in the row length). Rows of 256 tokens: at
    a few tokens per shard the partitioner gathers whole rows by itself, and the
    test could not fail."""
    config = tiny_config(
        vocab_size=64,
        dim=64,
        num_heads=4,
        num_kv_heads=4,
        mlp_dim=128,
        max_seq_len=256,
        num_layers=2,
        num_depths=1,
    )
    mesh = eqx_mtp.make_mesh(1, 1, 8)
    model = eqx_mtp.shard_tree(random_model(config), mesh)
    tokens = jax.random.randint(jax.random.key(0), (8, 256), 0, 64)
    tokens = jax.device_put(tokens, eqx_mtp.batch_sharding(mesh))

    def loss(m, tokens):
        return jnp.sum(eqx_mtp.mtp_loss_sums(m, tokens, mesh=mesh)[0])

    hlo = (
        eqx.filter_jit(eqx.filter_grad(loss))
        .lower(model, tokens)
        .compile()
        .compiled.as_text()
    )
    lines = hlo.splitlines()
    # An all-to-all's result may be one array or a tuple of them.
    exchanges = [
        line for line in lines if re.search(r"= \(?f32\[.* all-to-all\(", line)
    ]
    assert not exchanges, exchanges[:2]
    # Keys and values of whole rows, [rows, seq, kv_heads, head_dim], gathered.
    whole_rows = r"= f32\[8,256,4,16\][^ ]* all-gather\("
    assert any(re.search(whole_rows, line) for line in lines), "no K/V all-gather"


def test_mesh_loss_sums_equal_loop_reference():
    """On a (4, 2, 1) mesh the per-depth sums and counts equal the Python-loop
    reference (not the code under test on one device)."""
    model = _model(3, "sequential", "fused")
    tokens, loss_mask = _batch(model.config.vocab_size)
    (_, aux), _ = _on_mesh((4, 2, 1), 3, "sequential", "fused")
    expected_sums, expected_counts = jit_once(
        lambda m: loop_mtp_loss_sums(m, tokens, SEGMENT_IDS, loss_mask=loss_mask)
    )(model)
    # Catches an error shared by the sharded and single-device paths (both sides of
    # the test above would agree on it): wrong targets, wrong validity, a wrong
    # depth recurrence.
    np.testing.assert_array_equal(aux["token_counts"], expected_counts)
    assert np.all(expected_counts > 0)
    assert tree_allclose(aux["loss_sums"], expected_sums, rtol=1e-5)


def _group_size(attributes, num_devices):
    """Devices per replica group of a collective's HLO attributes."""
    if found := re.search(r"replica_groups=\{\{([\d,]*)\}", attributes):
        return len(found[1].split(","))
    if found := re.search(r"replica_groups=\[\d+,(\d+)\]", attributes):
        return int(found[1])
    mesh_groups = r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}"
    if found := re.search(mesh_groups, attributes):
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", found[1])}
        return int(np.prod([sizes[a] for a in re.findall(r"'(\w+)'", found[2])]))
    return num_devices


def _reductions_of(hlo, array_type, num_devices):
    """`(computation, instruction)` once per operand of type `array_type` (e.g.
    `"f32[19,16]"`) of every all-reduce or reduce-scatter of the optimised module
    `hlo` over more than one device (combined reductions hold several operands)."""
    instruction = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
    types, found, computation = {}, [], None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split("(")[0].strip()
        if not (match := instruction.match(line)):
            continue
        name, type_text, opcode, rest = match.groups()
        types[name] = type_text
        kind = opcode.removesuffix("-start")
        if kind not in ("all-reduce", "reduce-scatter"):
            continue
        if _group_size(rest, num_devices) < 2:
            continue
        operands = rest.split(")")[0]
        operand_types = " ".join(
            types.get(n, "") for n in re.findall(r"%([\w.\-]+)", operands)
        )
        found += [(computation, name)] * operand_types.count(array_type + "{")
    return found


def test_tied_embedding_gradient_reduced_once():
    """On (8, 1, 1) the tied embedding's gradient is reduced over the devices once
    per step, in the entry computation: the trunk's lookup, the sequential depths'
    lookups and the 1 + D heads' unembedding gradients add up on each device first.
    Reducing per use (once per lookup and per head, the depths' inside their scan)
    moves 2(1 + D) times the bytes."""
    config = tiny_config(num_depths=2, mtp_kind="sequential")
    assert config.tie_embeddings
    mesh = eqx_mtp.make_mesh(8, 1, 1)
    model = eqx_mtp.shard_tree(random_model(config), mesh)
    tokens, loss_mask = _batch(config.vocab_size)
    tokens = jax.device_put(jnp.asarray(tokens), eqx_mtp.batch_sharding(mesh))

    def loss(m, tokens):
        return eqx_mtp.mtp_loss(m, tokens, mesh=mesh)[0]

    hlo = (
        eqx.filter_jit(eqx.filter_grad(loss))
        .lower(model, tokens)
        .compile(compiler_options=_FAST)
        .compiled.as_text()
    )
    # The gradient's per-device operand: the whole [vocab, dim] table (the width is
    # split over data only in the result of a reduce-scatter, the vocabulary over
    # model, of size 1 here).
    shard_type = f"f32[{config.vocab_size},{config.dim}]"
    reductions = _reductions_of(hlo, shard_type, num_devices=8)
    assert len(reductions) == 1, reductions
    ((computation, _),) = reductions
    assert computation.startswith("ENTRY"), computation
    # Not vacuous: the reader does see the block matrices' gradient reductions.
    assert _reductions_of(hlo, f"f32[{config.mlp_dim},{config.dim}]", 8)


def test_shard_tree_shards_parameters():
    """`shard_tree` places the MLP and embedding matrices, not only annotates them."""
    mesh = eqx_mtp.make_mesh(4, 2, 1)
    model = eqx_mtp.shard_tree(random_model(tiny_config(vocab_size=32)), mesh)
    up_proj = model.trunk.blocks.mlp.up_proj.weight
    # A `shard_tree` that returned the tree unchanged (everything on one device).
    assert up_proj.sharding.spec == P(None, "model", "data")
    assert up_proj.addressable_shards[0].data.shape == (1, 24 // 2, 16 // 4)
    assert model.trunk.embedding.sharding.spec == P("model", "data")
    assert model.trunk.final_norm.weight.sharding.is_fully_replicated


# -- vocab_parallel_loss_sum against full logits ---------------------------------------

VP_BATCH, VP_SEQ, VP_DIM = 8, 8, 8
_VP_MESHES = [(4, 2, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1), (8, 1, 1)]


@functools.cache
def _naive_loss_and_grads():
    """Loss sum of full `[B, T, V]` logits and its gradients w.r.t. `hidden` and
    `unembedding`: the reference, one compile per vocabulary size."""

    def loss(hidden, unembedding, targets, where):
        rows = jax.vmap(naive_cross_entropy_sum, in_axes=(0, None, 0, 0))
        return jnp.sum(rows(hidden, unembedding, targets, where))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=_FAST)


@functools.cache
def _vocab_parallel(shape, chunk_size, impl):
    mesh = eqx_mtp.make_mesh(*shape)

    def loss(hidden, unembedding, targets, where):
        total, count = eqx_mtp.vocab_parallel_loss_sum(
            hidden,
            unembedding,
            targets,
            where,
            mesh=mesh,
            chunk_size=chunk_size,
            impl=impl,
        )
        return total, count

    return jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
        compiler_options=_FAST,
    )


def _vp_inputs(vocab_size, seed, mask_probability):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((VP_BATCH, VP_SEQ, VP_DIM)).astype(np.float32)
    unembedding = rng.standard_normal((vocab_size, VP_DIM)).astype(np.float32)
    targets = rng.integers(0, vocab_size, (VP_BATCH, VP_SEQ)).astype(np.int32)
    where = rng.random((VP_BATCH, VP_SEQ)) < mask_probability
    return hidden, unembedding, targets, where


@settings(max_examples=12)
@given(
    shape=st.sampled_from(_VP_MESHES),
    # 8 and 32 divide every model axis here; 5, 13 and 19 divide none (padding);
    # 5 over model=4 leaves one vocabulary shard all padding.
    vocab_size=st.sampled_from([5, 8, 13, 19, 32]),
    # Local token counts are 8, 16 or 32: 4 divides them, 3 and 5 do not, 256 and
    # None make one chunk.
    chunk_size=st.sampled_from([3, 4, 5, 256, None]),
    impl=st.sampled_from(["fused", "chunked"]),
    # All masked, a random mask, nothing masked.
    mask_probability=st.sampled_from([0.0, 0.6, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_vocab_parallel_equals_full_logits(
    shape, vocab_size, chunk_size, impl, mask_probability, seed
):
    """Value and both gradients equal those of a naive full-logits loss."""
    inputs = _vp_inputs(vocab_size, seed, mask_probability)
    (total, count), (grad_hidden, grad_unembedding) = _vocab_parallel(
        shape, chunk_size, impl
    )(*inputs)
    expected, (expected_hidden, expected_unembedding) = _naive_loss_and_grads()(*inputs)
    where = inputs[3]
    # The count is `where`'s, over the whole batch (not one device's share).
    assert int(count) == int(where.sum())
    # A log-sum-exp over the local vocabulary shard only (no psum of the
    # exponentials), a max not shared (pmax) across shards that then differ, a target
    # logit not psum-ed over `model`, padded rows counted in the softmax, or a sum
    # not psum-ed over `data`/`context`.
    assert tree_allclose(total, expected, rtol=1e-5, atol=1e-5)
    # The hidden-state gradient summed over vocabulary shards, the unembedding's over
    # token shards; padding sliced off; the last, partial chunk not double-counted.
    assert grad_hidden.shape == inputs[0].shape
    assert grad_unembedding.shape == inputs[1].shape
    assert tree_allclose(grad_hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    assert tree_allclose(grad_unembedding, expected_unembedding, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_vocab_parallel_masked_device(impl):
    """A device whose tokens are all masked adds nothing: a finite sum and exactly
    zero gradient for its rows; a fully masked batch gives 0 and zero gradients."""
    shape = (2, 4, 1)  # vocabulary 13 over model=4: padded
    hidden, unembedding, targets, where = _vp_inputs(13, 0, 0.7)
    # Rows 0..3 are the first data shard's.
    where[: VP_BATCH // 2] = False
    assert where[VP_BATCH // 2 :].any()
    # Large hidden states on the masked rows: a masked token that leaked into the
    # softmax, or an inf·0 in its gradient, would show.
    hidden[: VP_BATCH // 2] *= 1e3
    run = _vocab_parallel(shape, 3, impl)
    (total, _), (grad_hidden, grad_unembedding) = run(
        hidden, unembedding, targets, where
    )
    expected, (expected_hidden, expected_unembedding) = _naive_loss_and_grads()(
        hidden, unembedding, targets, where
    )
    assert np.isfinite(total)
    assert tree_allclose(total, expected, rtol=1e-5, atol=1e-5)
    # Masked tokens get exactly zero gradient, not a tiny softmax residue.
    assert np.all(np.asarray(grad_hidden[: VP_BATCH // 2]) == 0)
    assert np.any(np.asarray(grad_hidden[VP_BATCH // 2 :]) != 0)
    assert tree_allclose(grad_hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    assert tree_allclose(grad_unembedding, expected_unembedding, rtol=1e-5, atol=1e-5)

    nothing = np.zeros_like(where)
    (total, count), (grad_hidden, grad_unembedding) = run(
        hidden, unembedding, targets, nothing
    )
    assert float(total) == 0.0 and int(count) == 0
    assert np.all(np.asarray(grad_hidden) == 0)
    assert np.all(np.asarray(grad_unembedding) == 0)


# -- sharding rules --------------------------------------------------------------------


def _model_shapes(**overrides):
    config = tiny_config(**overrides)
    return eqx.filter_eval_shape(eqx_mtp.MTPModel, config, key=jax.random.key(0))


def _is_spec(x):
    return isinstance(x, P)


def _named_specs(tree):
    """`{dotted path: spec}` of a tree of PartitionSpecs."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_spec)
    return {tree_path_name(path): spec for path, spec in leaves}


def test_partition_specs_of_model():
    """Embedding over (model, data) when the vocabulary divides, stacked axes never
    sharded, norms replicated."""
    mesh = eqx_mtp.make_mesh(4, 2, 1)
    specs = eqx_mtp.partition_specs(_model_shapes(vocab_size=32, num_depths=2), mesh)
    blocks = specs.trunk.blocks
    assert specs.trunk.embedding == P("model", "data")
    # The leading layer axis is never sharded; heads over `model`, width over `data`.
    assert blocks.attention.q_proj.weight == P(None, "model", "data")
    assert blocks.attention.o_proj.weight == P(None, "data", "model")
    assert blocks.mlp.up_proj.weight == P(None, "model", "data")
    assert blocks.mlp.down_proj.weight == P(None, "data", "model")
    depth = specs.depths.depths
    assert depth.eh_proj.weight == P(None, "data", None)
    assert depth.layer.mlp.gate_proj.weight == P(None, "model", "data")
    named = _named_specs(specs)
    norms = {name: spec for name, spec in named.items() if "norm" in name}
    assert len(norms) == 7  # trunk: 2 + final; depth: enorm, hnorm, 2 in the layer
    assert all(spec == P() for spec in norms.values()), norms
    # Every stacked (trunk layer or depth) array leaves its leading axis unsharded.
    for name, spec in named.items():
        if name.startswith(("trunk.blocks.", "depths.")) and len(spec):
            assert spec[0] is None, (name, spec)

    # Vocabulary 19 is not divisible by model=2: that axis stays unsharded.
    specs = eqx_mtp.partition_specs(_model_shapes(vocab_size=19), mesh)
    assert specs.trunk.embedding == P(None, "data")


def test_partition_specs_of_optimizer_state():
    """Adam's moments get their parameters' specs; step counts are replicated."""
    mesh = eqx_mtp.make_mesh(4, 2, 1)
    model = random_model(tiny_config(vocab_size=32, num_depths=1))
    optimizer = eqx_mtp.train.make_optimizer(
        model, learning_rate=1e-3, total_steps=10, warmup_steps=1
    )
    state = eqx.filter_eval_shape(optimizer.init, eqx.filter(model, eqx.is_array))
    param_specs = eqx_mtp.partition_specs(model, mesh)
    state_specs = eqx_mtp.partition_specs(state, mesh)
    adam = state_specs[1][0]
    for moments in (adam.mu, adam.nu):
        # A rule anchored at the start of the path (`^trunk\.`) would miss the
        # `1.0.mu.` prefix and replicate the moments: twice the model's memory.
        assert eqx.tree_equal(moments, param_specs)
    assert _named_specs(state_specs)["1.0.mu.trunk.embedding"] == P("model", "data")
    counts = {
        name: spec
        for name, spec in _named_specs(state_specs).items()
        if "count" in name
    }
    assert counts and all(spec == P() for spec in counts.values()), counts


def test_fsdp_divides_parameter_memory():
    """With FSDP over 8 devices each holds 1/8 of every matrix and all the norms."""
    mesh = eqx_mtp.make_mesh(8, 1, 1)
    # Every matrix dimension sharded over `data` (dim 16, vocabulary 32) divides 8.
    model = eqx_mtp.shard_tree(random_model(tiny_config(vocab_size=32)), mesh)
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array))
    total = sum(leaf.nbytes for _, leaf in leaves)
    norms = sum(
        leaf.nbytes for path, leaf in leaves if "norm" in jax.tree_util.keystr(path)
    )
    per_device = sum(leaf.addressable_shards[0].data.nbytes for _, leaf in leaves)
    assert 0 < norms < total / 8
    # Exactly the matrices split 8 ways plus the replicated norms; a matrix left
    # replicated (a rule that does not match, or a wrong axis) adds 7/8 of it.
    assert per_device == (total - norms) // 8 + norms
    assert total / 8 <= per_device <= total / 8 + norms


def test_custom_rules():
    """Custom rules are obeyed; an axis the mesh lacks is an error that names it."""
    mesh = eqx_mtp.make_mesh(4, 2, 1)
    shapes = _model_shapes(vocab_size=32)
    with pytest.raises(ValueError, match="tensor"):
        eqx_mtp.partition_specs(shapes, mesh, rules=[(r"embedding$", ("tensor",))])
    rules = [(r"^trunk\.embedding$", ("data", None)), *eqx_mtp.DEFAULT_RULES]
    specs = eqx_mtp.partition_specs(shapes, mesh, rules=rules)
    assert specs.trunk.embedding == P("data", None)
    # The defaults still apply after it.
    assert specs.trunk.blocks.mlp.up_proj.weight == P(None, "model", "data")
    model = eqx_mtp.shard_tree(
        random_model(tiny_config(vocab_size=32)), mesh, rules=rules
    )
    assert model.trunk.embedding.sharding.spec == P("data", None)
    assert model.trunk.embedding.addressable_shards[0].data.shape == (32 // 4, 16)


# -- bad input -------------------------------------------------------------------------


def _one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(data=3), ("data=3", "8")),  # 3 devices of 8
        (dict(data=-1, model=-1), ("data", "model")),
        (dict(data=0), ("data",)),
        (dict(data=-1, model=3), ("3", "8")),  # no size for data
    ],
)
def test_make_mesh_rejects_bad_sizes(kwargs, words):
    """One-line errors that name the axis."""
    with pytest.raises(ValueError) as excinfo:
        eqx_mtp.make_mesh(**kwargs)
    _one_line_error(excinfo, *words)


def test_make_mesh_axes():
    """The axes are named and sized as asked, over every device."""
    mesh = eqx_mtp.make_mesh(2, -1, 2)
    assert dict(mesh.shape) == {"data": 2, "model": 2, "context": 2}
    assert mesh.axis_names == ("data", "model", "context")
    assert mesh.devices.size == len(jax.devices())
    # Rows over `data`, the sequence over `context`, micro-batch axes unsharded.
    assert eqx_mtp.batch_spec() == P("data", "context")
    assert eqx_mtp.batch_spec(3) == P(None, "data", "context")


def test_batch_must_fit_mesh():
    """Rows not divisible by `data`, a sequence not divisible by `context`, or a mesh
    with other axis names are errors that name the argument."""
    model = random_model(tiny_config(num_depths=1))
    tokens = jnp.zeros((6, 16), jnp.int32)
    with pytest.raises(ValueError) as excinfo:
        eqx_mtp.mtp_loss_sums(model, tokens, mesh=eqx_mtp.make_mesh(4, 2, 1))
    _one_line_error(excinfo, "tokens", "data")
    with pytest.raises(ValueError) as excinfo:
        eqx_mtp.mtp_loss_sums(
            model, jnp.zeros((8, 12), jnp.int32), mesh=eqx_mtp.make_mesh(1, 1, 8)
        )
    _one_line_error(excinfo, "tokens", "context")
    other = jax.make_mesh(
        (4, 2),
        ("batch", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    with pytest.raises(ValueError) as excinfo:
        eqx_mtp.mtp_loss_sums(model, jnp.zeros((8, 16), jnp.int32), mesh=other)
    _one_line_error(excinfo, "mesh", "data", "model", "context")
    with pytest.raises(ValueError) as excinfo:
        eqx_mtp.vocab_parallel_loss_sum(
            jnp.zeros((6, 8, 8)),
            jnp.zeros((19, 8)),
            jnp.zeros((6, 8), jnp.int32),
            jnp.ones((6, 8), bool),
            mesh=eqx_mtp.make_mesh(4, 2, 1),
        )
    _one_line_error(excinfo, "hidden", "data")
