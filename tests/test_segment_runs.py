"""One meaning of segment ids : `0` is padding, a document is a
maximal run of one non-zero id, and attention, positions and the validity rule all
read them so; an id reused in a later run is another document. A negative id is an
error at every entry point that sees concrete values.

The references here split each row into its runs with a plain Python loop and run
every document alone, as a row of its own: per-document causal attention written out
in NumPy, per-document loss sums from `reference.loop_mtp_loss_sums` (Python loop over
the unstacked depths, naive cross-entropy), per-document counts by counting.
"""

import functools
import inspect
import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from hypothesis import assume, given, settings
from reference import jit_once, loop_mtp_loss_sums, random_model, segment_rows

import eqx_mtp

SEQ = 16
# The issue's row: the third document reuses the first one's id.
REUSED = [1] * 5 + [2] * 5 + [1] * 6
UNIQUE = [1] * 5 + [2] * 5 + [3] * 6
# Reuse across padding and across another id, a one-token document, padding at the end.
GAPPED = [3] * 3 + [0] * 2 + [3] * 4 + [5] + [3] * 4 + [0] * 2


def runs(row):
    """`[(start, stop, id)]`: the maximal runs of equal ids of one row, padding
    included."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            out.append((start, i, int(row[start])))
            start = i
    return out


def documents(row):
    """`[(start, stop)]` of the row's documents: its runs of a non-zero id."""
    return [(start, stop) for start, stop, id_ in runs(row) if id_ != 0]


def unique_ids(rows):
    """The same rows with every document given an id of its own (`7, 10, 13, …`, not
    `1, 2, 3`: the ids need only differ), padding kept."""
    out = np.zeros_like(np.asarray(rows))
    for b, row in enumerate(np.asarray(rows)):
        for n, (start, stop) in enumerate(documents(row)):
            out[b, start:stop] = 7 + 3 * n
    return out


def alone(tokens, rows):
    """Every document of `rows` run alone: `(tokens, segment_ids, spans)` with one row
    per document, holding its tokens from position 0 and padding after them (which a
    causal model never reads from the document), and `spans[d] = (row, start, stop)`
    where document `d` lies in `rows`."""
    spans = [
        (b, start, stop)
        for b, row in enumerate(np.asarray(rows))
        for start, stop in documents(row)
    ]
    alone_tokens = np.zeros((len(spans), SEQ), np.int32)
    alone_ids = np.zeros((len(spans), SEQ), np.int32)
    for d, (b, start, stop) in enumerate(spans):
        alone_tokens[d, : stop - start] = np.asarray(tokens)[b, start:stop]
        alone_ids[d, : stop - start] = 1
    return jnp.asarray(alone_tokens), jnp.asarray(alone_ids), spans


def reuses_an_id(rows):
    """Whether some row holds two documents with one id."""
    for row in np.asarray(rows):
        ids = [row[start] for start, _ in documents(row)]
        if len(set(ids)) < len(ids):
            return True
    return False


@st.composite
def reused_rows(draw, batch):
    """`[batch, SEQ]` int32 segment ids made of runs of 1 to 5 tokens, neighbours
    apart, ids in `0..2` (`0` padding): at least four runs a row, so ids recur after
    another id or after padding; at least one row reuses an id."""
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < SEQ:
            previous = row[-1] if row else None
            id_ = draw(st.sampled_from([i for i in range(3) if i != previous]))
            row += [id_] * draw(st.integers(1, 5))
        rows.append(row[:SEQ])
    rows = np.array(rows, np.int32)
    assume(reuses_an_id(rows))
    return rows


def test_runs_of_the_test_rows():
    """The references' own splitting: the rows above hold the documents they say."""
    assert documents(REUSED) == [(0, 5), (5, 10), (10, 16)]
    assert documents(GAPPED) == [(0, 3), (5, 9), (9, 10), (10, 14)]
    assert reuses_an_id([REUSED]) and reuses_an_id([GAPPED])
    assert not reuses_an_id([UNIQUE]) and not reuses_an_id(unique_ids([GAPPED]))
    np.testing.assert_array_equal(
        unique_ids([REUSED])[0], [7] * 5 + [10] * 5 + [13] * 6
    )


# -- document_ids ----------------------------------------------------------------------


@settings(max_examples=10)
@given(rows=segment_rows(3, SEQ) | reused_rows(3))
def test_document_ids_number_the_runs(rows):
    """`document_ids` equals the runs counted by a loop, is idempotent and int32.
    Catches a numbering of distinct ids (reused ids kept together), padding given a
    number, or a count that restarts."""
    got = eqx_mtp.document_ids(jnp.asarray(rows))
    expected = np.zeros_like(rows)
    for b, row in enumerate(rows):
        for n, (start, stop) in enumerate(documents(row)):
            expected[b, start:stop] = n + 1
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(eqx_mtp.document_ids(got), got)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.int32])
def test_document_ids_are_int32(dtype):
    """Narrow integer ids come back int32, the dtype of every id the trunk reads."""
    got = eqx_mtp.document_ids(jnp.asarray([REUSED, GAPPED], dtype))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got[0], [1] * 5 + [2] * 5 + [3] * 6)


# -- attention -------------------------------------------------------------------------


def _naive_causal_attention(q, k, v):
    """One document alone, in NumPy: `softmax(q k^T / sqrt(d))` over the keys at or
    before each query, query head `h` reading key/value head `h // group`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    seq, heads, head_dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T / math.sqrt(head_dim)
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, h] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[:, h // group]
    return out


@pytest.mark.parametrize("row", [REUSED, GAPPED], ids=["reused", "gapped"])
def test_blockwise_attention_keeps_documents_apart(row):
    """`blockwise_attention` (tiles of 4, so documents share tiles) on a row with a
    reused id: each document's output is that of the document alone. Catches ids
    compared as given (the third document of `REUSED` would read the first)."""
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((SEQ, 4, 8), (SEQ, 2, 8), (SEQ, 2, 8))
    )
    ids = jnp.asarray(row, jnp.int32)
    got = np.asarray(
        eqx_mtp.nn.blockwise_attention(
            q, k, v, query_segment_ids=ids, key_segment_ids=ids, block_q=4, block_k=4
        )
    )
    for start, stop in documents(row):
        expected = _naive_causal_attention(q[start:stop], k[start:stop], v[start:stop])
        np.testing.assert_allclose(got[start:stop], expected, rtol=1e-5, atol=1e-6)


@functools.cache
def _model(attention_impl):
    return random_model(
        tiny_config(attention_impl=attention_impl, attention_block_size=4), seed=3
    )


def _tokens(rows, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 19, (len(rows), SEQ)), jnp.int32)


@eqx.filter_jit
def _trunk_rows(model, tokens, segment_ids, positions):
    return jax.vmap(lambda t, s, p: model(t, positions=p, segment_ids=s))(
        tokens, segment_ids, positions
    )


@pytest.mark.parametrize("attention_impl", ["reference", "blockwise"])
def test_trunk_keeps_documents_apart(attention_impl):
    """The trunk's `h⁰` of rows with reused ids equals that of the same rows with an
    id per document, and on every document that of the document run alone (its
    tokens as a row of their own, positions from 0). Catches attention that matches
    reused ids across documents, in the materialised mask and in the blockwise
    kernel."""
    model = _model(attention_impl)
    rows = np.array([REUSED, GAPPED], np.int32)
    tokens = _tokens(rows)
    positions = eqx_mtp.segment_positions(jnp.asarray(rows))
    got = _trunk_rows(model, tokens, jnp.asarray(rows), positions)
    renumbered = _trunk_rows(model, tokens, jnp.asarray(unique_ids(rows)), positions)
    np.testing.assert_array_equal(got, renumbered)
    alone_tokens, alone_ids, spans = alone(tokens, rows)
    alone_hidden = _trunk_rows(
        model,
        alone_tokens,
        alone_ids,
        jnp.broadcast_to(jnp.arange(SEQ), (len(spans), SEQ)),
    )
    for d, (b, start, stop) in enumerate(spans):
        np.testing.assert_allclose(
            got[b, start:stop], alone_hidden[d, : stop - start], rtol=1e-5, atol=1e-5
        )


# -- the loss --------------------------------------------------------------------------


@eqx.filter_jit
def _loss_sums(model, tokens, segment_ids, loss_mask=None):
    return eqx_mtp.mtp_loss_sums(
        model, tokens, segment_ids=segment_ids, loss_mask=loss_mask
    )


def _per_document_reference(model, tokens, rows):
    """Per-depth sums and counts of every document run alone through the Python-loop
    reference, added up."""
    alone_tokens, alone_ids, _ = alone(tokens, rows)
    sums, counts = jit_once(lambda m: loop_mtp_loss_sums(m, alone_tokens, alone_ids))(
        model
    )
    return np.asarray(sums, np.float64), np.asarray(counts)


@pytest.mark.parametrize("attention_impl", ["reference", "blockwise"])
def test_issue_row_losses_are_those_of_its_documents(attention_impl):
    """The issue's row `1×5 2×5 1×6` (beside a row that reuses an id across padding
    and across another id) gives exactly the per-depth sums and counts of
    `1×5 2×5 3×6`, and those of its documents run alone. Before, its third document
    attended to the first (the issue measured sums `[61.12, 36.08, 25.53]` against
    `[63.39, 37.17, 24.66]`), and depth targets crossed from the third document
    into the first's id."""
    model = _model(attention_impl)
    tokens = _tokens([REUSED, GAPPED], seed=1)
    rows = jnp.asarray([REUSED, GAPPED], jnp.int32)
    sums, counts = _loss_sums(model, tokens, rows)
    renumbered = jnp.asarray([UNIQUE, unique_ids([GAPPED])[0]], jnp.int32)
    unique_sums, unique_counts = _loss_sums(model, tokens, renumbered)
    np.testing.assert_array_equal(sums, unique_sums)
    np.testing.assert_array_equal(counts, unique_counts)
    expected_sums, expected_counts = _per_document_reference(model, tokens, rows)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(sums, expected_sums, rtol=1e-5)


@functools.cache
def _property_functions():
    """Every function of the loss path that takes segment ids, compiled once for
    `[2, 16]` rows."""
    model = _model("reference")

    @jax.jit
    def everything(tokens, segment_ids, loss_mask):
        sums, counts = eqx_mtp.mtp_loss_sums(
            model, tokens, segment_ids=segment_ids, loss_mask=loss_mask
        )
        positions = eqx_mtp.segment_positions(segment_ids)
        hidden = jax.vmap(lambda t, p, s: model(t, positions=p, segment_ids=s))(
            tokens, positions, segment_ids
        )
        depths = eqx_mtp.mtp_depth_losses(
            model.depths,
            hidden,
            tokens,
            embedding=model.trunk.embedding,
            unembedding=model.trunk.unembedding_matrix,
            final_norm=model.trunk.final_norm,
            segment_ids=segment_ids,
            loss_mask=loss_mask,
        )
        return dict(
            sums=sums,
            counts=counts,
            depths=depths,
            valid_counts=eqx_mtp.valid_token_counts(
                tokens, 3, segment_ids=segment_ids, loss_mask=loss_mask
            ),
            targets=[
                eqx_mtp.depth_targets(
                    tokens, k, segment_ids=segment_ids, loss_mask=loss_mask
                )
                for k in range(3)
            ],
            rolled=[
                eqx_mtp.roll_and_mask(tokens, shift, segment_ids=segment_ids)
                for shift in (-1, -2, -3, 2)
            ],
            positions=eqx_mtp.segment_positions(segment_ids),
        )

    return everything


@settings(max_examples=10)
@given(rows=reused_rows(2), mask_seed=st.integers(0, 2**16))
def test_reused_ids_mean_what_unique_ids_mean(rows, mask_seed):
    """For random rows whose ids recur (after padding or another id): the loss sums
    and counts, `mtp_depth_losses`, `valid_token_counts`, `depth_targets`,
    `roll_and_mask` and `segment_positions` equal those of the same rows with an id
    per document; the counts equal the per-document count of targets. Catches any of
    these comparing raw ids."""
    loss_mask = np.random.default_rng(mask_seed).random((2, SEQ)) < 0.8
    tokens = _tokens(rows, seed=mask_seed)
    everything = _property_functions()
    got = everything(tokens, jnp.asarray(rows), jnp.asarray(loss_mask))
    expected = everything(tokens, jnp.asarray(unique_ids(rows)), jnp.asarray(loss_mask))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    counts = np.zeros(4, np.int64)
    for b, row in enumerate(rows):
        for start, stop in documents(row):
            for k in range(4):
                counts[k] += sum(loss_mask[b, start + k + 1 : stop])
    np.testing.assert_array_equal(got["valid_counts"], counts)
    np.testing.assert_array_equal(got["counts"], counts[:3])


def test_context_parallel_rows_number_documents_whole():
    """On a `(2, 1, 4)` mesh (shards of 4 tokens) the issue's row, whose reused id
    and second document straddle shard boundaries, gives the single-device sums and
    counts of its renumbered row. A numbering of runs within each shard would give
    the tail of the second document (positions 8, 9) the first one's number."""
    model = _model("blockwise")
    mesh = eqx_mtp.make_mesh(2, 1, 4)
    rows = np.array([REUSED, GAPPED], np.int32)
    tokens = _tokens(rows, seed=2)
    sharded = eqx_mtp.shard_tree(model, mesh)
    on_mesh = jax.device_put((tokens, jnp.asarray(rows)), eqx_mtp.batch_sharding(mesh))

    @eqx.filter_jit
    def loss_sums(model, tokens, segment_ids):
        return eqx_mtp.mtp_loss_sums(model, tokens, segment_ids=segment_ids, mesh=mesh)

    sums, counts = loss_sums(sharded, *on_mesh)
    expected_sums, expected_counts = _loss_sums(
        model, tokens, jnp.asarray(unique_ids(rows))
    )
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(sums, expected_sums, rtol=1e-5)


# -- negative ids ----------------------------------------------------------------------


ENTRY_POINTS = [
    "document_ids",
    "roll_and_mask",
    "depth_targets",
    "valid_token_counts",
    "segment_positions",
    "scan_depths",
    "mtp_depth_losses",
    "mtp_loss_sums",
    "mtp_loss",
    "blockwise_attention",
    "blockwise_attention(keys)",
    "Transformer",
    "MTPModel",
]


@functools.cache
def _entry_points():
    """`name -> call(segment_ids [2, 16])` for every public entry point that takes
    segment ids."""
    model = _model("reference")
    config = model.config
    tokens = _tokens([REUSED, GAPPED])
    hidden = jnp.zeros((2, SEQ, config.dim), jnp.float32)
    trunk = model.trunk
    depth_args = dict(embedding=trunk.embedding, final_norm=trunk.final_norm)
    q = jnp.zeros((SEQ, 2, 8), jnp.float32)
    kv = jnp.zeros((SEQ, 1, 8), jnp.float32)
    good = jnp.asarray(UNIQUE, jnp.int32)
    arange = jnp.arange(SEQ, dtype=jnp.int32)
    return {
        "document_ids": lambda s: eqx_mtp.document_ids(s),
        "roll_and_mask": lambda s: eqx_mtp.roll_and_mask(tokens, -1, segment_ids=s),
        "depth_targets": lambda s: eqx_mtp.depth_targets(tokens, 1, segment_ids=s),
        "valid_token_counts": lambda s: eqx_mtp.valid_token_counts(
            tokens, 2, segment_ids=s
        ),
        "segment_positions": lambda s: eqx_mtp.segment_positions(s),
        "scan_depths": lambda s: eqx_mtp.scan_depths(
            model.depths,
            hidden,
            tokens,
            readout=lambda k, normed: jnp.sum(normed),
            segment_ids=s,
            **depth_args,
        ),
        "mtp_depth_losses": lambda s: eqx_mtp.mtp_depth_losses(
            model.depths,
            hidden,
            tokens,
            unembedding=trunk.unembedding_matrix,
            segment_ids=s,
            **depth_args,
        ),
        "mtp_loss_sums": lambda s: eqx_mtp.mtp_loss_sums(model, tokens, segment_ids=s),
        "mtp_loss": lambda s: eqx_mtp.mtp_loss(model, tokens, segment_ids=s),
        "blockwise_attention": lambda s: eqx_mtp.nn.blockwise_attention(
            q, kv, kv, query_segment_ids=s[0], key_segment_ids=good
        ),
        "blockwise_attention(keys)": lambda s: eqx_mtp.nn.blockwise_attention(
            q,
            kv,
            kv,
            query_segment_ids=good,
            key_segment_ids=s[0],
            query_index=arange,
            key_index=arange,
        ),
        "Transformer": lambda s: trunk(tokens[0], positions=arange, segment_ids=s[0]),
        "MTPModel": lambda s: model(tokens[0], positions=arange, segment_ids=s[0]),
    }


_MESSAGES = {
    # `mtp_loss_sums` and `mtp_loss` share `check_batch`, whose messages name no
    # function; `MTPModel` calls its trunk.
    "mtp_loss_sums": "segment_ids",
    "mtp_loss": "segment_ids",
    "blockwise_attention": "blockwise_attention: query_segment_ids",
    "blockwise_attention(keys)": "blockwise_attention: key_segment_ids",
    "MTPModel": "Transformer: segment_ids",
}


def test_every_entry_point_is_tried():
    assert list(_entry_points()) == ENTRY_POINTS


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_negative_segment_ids_are_an_error(name):
    """A negative id (here `-1` used as a padding marker) is refused, naming the
    argument, where it used to be taken as one more document; the same call with
    non-negative ids goes through (a check that refused everything would pass)."""
    call = _entry_points()[name]
    good = jnp.asarray([REUSED, GAPPED], jnp.int32)
    prefix = _MESSAGES.get(name, f"{name}: segment_ids")
    with pytest.raises(ValueError, match=rf"^{prefix} must hold ids >= 0.*got -1"):
        call(good.at[:, -2:].set(-1))
    jax.block_until_ready(call(good))


def test_under_jit_ids_are_numbered_and_not_read():
    """Under tracing nothing reads the values (no callback joins the program), and
    the numbering is still there."""
    jaxpr = str(
        jax.make_jaxpr(inspect.unwrap(eqx_mtp.document_ids))(jnp.asarray([REUSED]))
    )
    assert "callback" not in jaxpr
    assert "cumsum" in jaxpr
