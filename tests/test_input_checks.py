"""Every public function of the loss path checks its inputs: each bad input is an
error whose message names the argument (masks are boolean).

Each bad input is tried twice: through the package's own checks
(`inspect.unwrap`, as users call the functions), which must name the function and
the argument, and through the test suite's runtime type checker (jaxtyping with
beartype), which rejects what the annotations already rule out and must then blame
the same argument.
"""

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from reference import random_model

import eqx_mtp
from eqx_mtp._fused_ce import fused_loss_sum

VOCAB = 11
DIM = 8
BATCH, SEQ = 2, 6
NUM_DEPTHS = 2

FUNCTIONS = {
    "roll_and_mask": eqx_mtp.roll_and_mask,
    "depth_targets": eqx_mtp.depth_targets,
    "valid_token_counts": eqx_mtp.valid_token_counts,
    "segment_positions": eqx_mtp.segment_positions,
    "head_loss_sum": eqx_mtp.head_loss_sum,
    "fused_cross_entropy": eqx_mtp.fused_cross_entropy,
    "fused_loss_sum": fused_loss_sum,
    "vocab_parallel_loss_sum": eqx_mtp.vocab_parallel_loss_sum,
    "scan_depths": eqx_mtp.scan_depths,
    "mtp_depth_losses": eqx_mtp.mtp_depth_losses,
    "mtp_loss_sums_from_hidden": eqx_mtp.mtp_loss_sums_from_hidden,
    "reduce_losses": eqx_mtp.reduce_losses,
    "mtp_loss_sums": eqx_mtp.mtp_loss_sums,
    "mtp_loss": eqx_mtp.mtp_loss,
}
# The arguments each function takes positionally; the rest go by keyword.
POSITIONAL = {
    "roll_and_mask": ("x", "shift"),
    "depth_targets": ("tokens", "depth"),
    "valid_token_counts": ("tokens", "num_depths"),
    "segment_positions": ("segment_ids",),
    "head_loss_sum": ("hidden", "unembedding", "targets", "where"),
    "fused_cross_entropy": ("hidden", "unembed", "targets"),
    "fused_loss_sum": ("hidden", "unembed", "targets", "where"),
    "vocab_parallel_loss_sum": ("hidden", "unembedding", "targets", "where"),
    "scan_depths": ("depths", "hidden", "tokens"),
    "mtp_depth_losses": ("depths", "hidden", "tokens"),
    "mtp_loss_sums_from_hidden": ("hidden", "tokens"),
    "reduce_losses": ("loss_sums", "token_counts"),
    "mtp_loss_sums": ("model", "tokens"),
    "mtp_loss": ("model", "tokens"),
}
# Whose messages keep their older form, without the function's name (test_loss.py
# matches them from the start): the two share `check_batch`.
UNNAMED = ("mtp_loss_sums", "mtp_loss")


def _depths(dim=DIM):
    return eqx_mtp.MTPDepths(
        NUM_DEPTHS,
        dim,
        make_layer=lambda key: eqx_mtp.nn.LinearBlock(dim, key=key),
        key=jax.random.key(1),
    )


@functools.cache
def _inputs():
    """Good arguments of every function: tiny, and with position 0 always counted,
    so that an id put there is one the checks must read."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    loss_mask = jnp.asarray(rng.random((BATCH, SEQ)) < 0.8).at[:, :2].set(True)
    hidden = jnp.asarray(rng.standard_normal((BATCH, SEQ, DIM)), jnp.float32)
    matrix = jnp.asarray(rng.standard_normal((VOCAB, DIM)), jnp.float32)
    flat = dict(
        hidden=hidden.reshape(-1, DIM),
        targets=tokens.reshape(-1),
        where=loss_mask.reshape(-1),
    )
    rows = dict(hidden=hidden, targets=tokens, where=loss_mask)
    batch = dict(
        tokens=tokens,
        segment_ids=segment_ids,
        positions=eqx_mtp.segment_positions(segment_ids),
        loss_mask=loss_mask,
    )
    depth_args = dict(
        depths=_depths(),
        hidden=hidden,
        tokens=tokens,
        embedding=matrix,
        final_norm=eqx_mtp.nn.RMSNorm(DIM),
        segment_ids=segment_ids,
        positions=batch["positions"],
    )
    config = tiny_config(vocab_size=VOCAB, dim=DIM, num_depths=1, mtp_block="linear")
    mesh = eqx_mtp.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return {
        "roll_and_mask": dict(x=tokens, shift=-1, segment_ids=segment_ids),
        "depth_targets": dict(
            tokens=tokens, depth=1, segment_ids=segment_ids, loss_mask=loss_mask
        ),
        "valid_token_counts": dict(
            tokens=tokens, num_depths=2, segment_ids=segment_ids, loss_mask=loss_mask
        ),
        "segment_positions": dict(segment_ids=segment_ids),
        "head_loss_sum": dict(unembedding=matrix, **flat),
        "fused_cross_entropy": dict(unembed=matrix, **flat),
        "fused_loss_sum": dict(unembed=matrix, **flat),
        "vocab_parallel_loss_sum": dict(unembedding=matrix, mesh=mesh, **rows),
        "scan_depths": dict(readout=lambda k, normed: jnp.sum(normed), **depth_args),
        "mtp_depth_losses": dict(unembedding=matrix, loss_mask=loss_mask, **depth_args),
        "mtp_loss_sums_from_hidden": dict(
            unembedding=matrix, loss_mask=loss_mask, **depth_args
        ),
        "reduce_losses": dict(
            loss_sums=jnp.asarray([1.0, 2.0, 3.0], jnp.float32),
            token_counts=jnp.asarray([4, 5, 6], jnp.int32),
        ),
        "mtp_loss_sums": dict(model=random_model(config), **batch),
        "mtp_loss": dict(model=random_model(config), **batch),
    }


def _call(fn, name, arguments):
    arguments = dict(arguments)
    positional = [arguments.pop(arg) for arg in POSITIONAL[name]]
    return fn(*positional, **arguments)


def _first_set(value, new):
    return value.at[(0,) * value.ndim].set(new)


BAD = {
    "rank": lambda v: v[0] if v.ndim > 1 else v[None],
    # Shorter along the last axis: disagrees with the argument that fixed its size.
    "shape": lambda v: v[..., :-1],
    "float ids": lambda v: v.astype(jnp.float32),
    "int array": lambda v: v.astype(jnp.int32),
    # MaxText's target masks hold segment ids: 0, 1, 2, 3, never to be summed.
    "int mask": lambda v: v.astype(jnp.int32) * 3,
    "float mask": lambda v: v.astype(jnp.float32),
    "id >= vocab": lambda v: _first_set(v, VOCAB),
    "negative id": lambda v: _first_set(v, -1),
    "float scalar": lambda v: 1.0,
    "negative scalar": lambda v: -1,
    # Fits neither a [dim] vector nor a [batch, seq, dim] array.
    "norm of another width": lambda v: eqx.nn.RMSNorm(DIM + 1),
    "norm that drops the last axis": lambda v: lambda x: jnp.mean(x, axis=-1),
    "not callable": lambda v: 3,
    "depths of another width": lambda v: _depths(2 * DIM),
    "not depths": lambda v: v.depths,
}

# Cases whose message blames another argument than the one changed: the sizes are
# fixed by the first argument that has them (as jaxtyping fixes them), so hidden
# states of the wrong width are blamed, "with dim = 16 as in depths".
BLAMED = {"depths of another width": "hidden"}

_MASK = ["rank", "shape", "int mask", "float mask"]
_IDS = ["rank", "shape", "float ids"]
_VOCAB_IDS = [*_IDS, "id >= vocab", "negative id"]
_MATRIX = ["rank", "shape", "int array"]
_HEAD = dict(hidden=["rank", "int array"], targets=_VOCAB_IDS, where=_MASK)
_DEPTHS = dict(
    depths=["depths of another width"],
    hidden=["rank", "int array"],
    tokens=_VOCAB_IDS,
    embedding=_MATRIX,
    final_norm=["norm of another width", "norm that drops the last axis"],
    segment_ids=_IDS,
    positions=_IDS,
)
_BATCH = dict(
    tokens=["rank", "float ids", "id >= vocab", "negative id"],
    segment_ids=_IDS,
    positions=_IDS,
    loss_mask=_MASK,
)
CASES = {
    "roll_and_mask": dict(x=["rank"], shift=["float scalar"], segment_ids=_IDS),
    "depth_targets": dict(
        tokens=["rank", "float ids"],
        depth=["float scalar", "negative scalar"],
        segment_ids=_IDS,
        loss_mask=_MASK,
    ),
    "valid_token_counts": dict(
        tokens=["rank", "float ids"],
        num_depths=["float scalar", "negative scalar"],
        segment_ids=_IDS,
        loss_mask=_MASK,
    ),
    "segment_positions": dict(segment_ids=["rank", "float ids"]),
    "head_loss_sum": dict(unembedding=_MATRIX, **_HEAD),
    "fused_cross_entropy": dict(unembed=_MATRIX, **_HEAD),
    "fused_loss_sum": dict(unembed=_MATRIX, **_HEAD),
    "vocab_parallel_loss_sum": dict(unembedding=_MATRIX, **_HEAD),
    "scan_depths": dict(readout=["not callable"], **_DEPTHS),
    "mtp_depth_losses": dict(unembedding=_MATRIX, loss_mask=_MASK, **_DEPTHS),
    "mtp_loss_sums_from_hidden": dict(
        unembedding=_MATRIX,
        loss_mask=_MASK,
        **{**_DEPTHS, "depths": ["depths of another width", "not depths"]},
    ),
    "reduce_losses": dict(loss_sums=["rank", "int array"], token_counts=_IDS),
    "mtp_loss_sums": _BATCH,
    "mtp_loss": _BATCH,
}
PARAMS = [
    pytest.param(name, arg, case, id=f"{name}-{arg}-{case}")
    for name, args in CASES.items()
    for arg, cases in args.items()
    for case in cases
]


@pytest.mark.parametrize("name,arg,case", PARAMS)
def test_bad_input_is_an_error_naming_the_argument(name, arg, case):
    arguments = dict(_inputs()[name])
    arguments[arg] = BAD[case](arguments[arg])
    errors = (TypeError, ValueError)
    if name in UNNAMED and case in ("id >= vocab", "negative id"):
        # `mtp_loss_sums` checks token ids inside the program (`eqx.error_if`), so
        # that it also does under `jit`.
        errors += (eqx.EquinoxRuntimeError,)
    blamed = BLAMED.get(case, arg)
    if name in UNNAMED:
        # `eqx.error_if`'s message comes after a note on the stack.
        named = rf"(?:^|EquinoxRuntimeError: ){blamed}\b"
    else:
        named = rf"^{name}: {blamed}\b"
    # The package's own checks, as users meet them.
    with pytest.raises(errors, match=named):
        _call(inspect.unwrap(FUNCTIONS[name]), name, arguments)
    # Under the suite's runtime type checker: the package's message, or jaxtyping's
    # where the annotation rules the input out, which must blame the same argument.
    with pytest.raises(errors, match=rf"{named}|parameter '{blamed}'"):
        _call(FUNCTIONS[name], name, arguments)


def test_every_function_and_argument_is_tried():
    """Every public function of the loss path has cases, and every case applies to
    an argument the function takes."""
    assert set(CASES) == set(FUNCTIONS) == set(POSITIONAL)
    for name, args in CASES.items():
        parameters = inspect.signature(FUNCTIONS[name]).parameters
        assert set(args) <= set(parameters), name
        assert set(_inputs()[name]) <= set(parameters), name


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_good_inputs_pass(name):
    """The checks let good inputs through (a check that rejected everything would
    pass the test above)."""
    out = _call(FUNCTIONS[name], name, _inputs()[name])
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_integer_mask_with_segment_ids_says_to_compare_with_zero():
    """MaxText's target mask holds segment ids; summed as weights it counts
    document 3 three times. It is refused with the fix in the message, and the fix
    gives the boolean mask's counts."""
    arguments = dict(_inputs()["mtp_depth_losses"])
    segment_ids = arguments["segment_ids"]
    arguments["loss_mask"] = segment_ids
    with pytest.raises(
        TypeError, match=r"pass loss_mask != 0\), got int32.*maxtext_loss_mask"
    ):
        _call(inspect.unwrap(eqx_mtp.mtp_depth_losses), "mtp_depth_losses", arguments)
    arguments["loss_mask"] = segment_ids != 0
    _, counts = _call(eqx_mtp.mtp_depth_losses, "mtp_depth_losses", arguments)
    expected = eqx_mtp.valid_token_counts(
        arguments["tokens"],
        NUM_DEPTHS,
        segment_ids=segment_ids,
        loss_mask=segment_ids != 0,
    )[1:]
    np.testing.assert_array_equal(counts, expected)


def test_norm_that_fits_neither_layout_says_what_it_got():
    """A final norm is taken per vector or over the last axis of the batch (issue
    17); one that fits neither is refused with what was tried and what happened,
    and a per-vector norm of the right width passes."""
    arguments = dict(_inputs()["mtp_depth_losses"])
    arguments["final_norm"] = lambda x: jnp.mean(x, axis=-1)
    with pytest.raises(
        ValueError,
        match=r"per-vector norm.*on a \[8\] array it returned \(\); on a "
        r"\[2, 3, 8\] array it returned \(2, 3\)",
    ):
        _call(eqx_mtp.mtp_depth_losses, "mtp_depth_losses", arguments)
    arguments["final_norm"] = eqx.nn.RMSNorm(DIM)
    sums, _ = _call(eqx_mtp.mtp_depth_losses, "mtp_depth_losses", arguments)
    assert np.all(np.isfinite(sums))


def test_masked_targets_may_lie_outside_the_vocabulary():
    """Only counted targets are checked: an ignore index such as -100 where `where`
    is false is no error (it adds nothing to the loss)."""
    arguments = dict(_inputs()["head_loss_sum"])
    where = arguments["where"].at[0].set(False)
    targets = arguments["targets"].at[0].set(-100)
    total, count = eqx_mtp.head_loss_sum(
        arguments["hidden"], arguments["unembedding"], targets, where
    )
    expected, _ = eqx_mtp.head_loss_sum(
        arguments["hidden"], arguments["unembedding"], arguments["targets"], where
    )
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert count == int(np.sum(np.asarray(where)))


def test_under_jit_shapes_are_checked_and_values_are_not():
    """Under tracing the static checks still run, while the checks on values (which
    would need the values on the host) are skipped and add nothing to the program."""
    arguments = dict(_inputs()["head_loss_sum"])
    hidden, unembedding = arguments["hidden"], arguments["unembedding"]
    targets, where = arguments["targets"], arguments["where"]
    loss = jax.jit(inspect.unwrap(eqx_mtp.head_loss_sum))
    with pytest.raises(TypeError, match=r"head_loss_sum: where must be a boolean"):
        loss(hidden, unembedding, targets, where.astype(jnp.int32))
    jaxpr = str(jax.make_jaxpr(loss)(hidden, unembedding, targets, where))
    assert "callback" not in jaxpr
    # An out-of-vocabulary id is not seen under tracing (JAX clamps the gather).
    total, _ = loss(hidden, unembedding, _first_set(targets, VOCAB), where)
    assert np.isfinite(total)
