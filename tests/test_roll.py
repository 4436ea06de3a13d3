"""`roll_and_mask` against a Python loop, shifts of both signs and packed rows."""

import inspect

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from reference import roll_and_mask_reference, segment_rows

import eqx_mtp


@st.composite
def roll_cases(draw):
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 12))
    trailing = draw(st.sampled_from([(), (2,)]))
    dtype = draw(st.sampled_from([np.int32, np.float32, np.bool_]))
    shift = draw(st.integers(-seq_len - 2, seq_len + 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype is np.bool_:
        x = rng.random((batch, seq_len) + trailing) < 0.7
    else:
        # Non-zero values, so a kept entry is never mistaken for the zero fill.
        x = rng.integers(1, 100, (batch, seq_len) + trailing).astype(dtype)
    segment_ids = draw(st.none() | segment_rows(batch, seq_len))
    return x, shift, segment_ids


@given(roll_cases())
def test_roll_and_mask_matches_loop(case):
    x, shift, segment_ids = case
    out = eqx_mtp.roll_and_mask(
        jnp.asarray(x),
        shift,
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
    )
    expected = roll_and_mask_reference(x, shift, segment_ids)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, expected)


def test_default_shift_is_next_token():
    x = jnp.array([[5, 6, 7, 8]], jnp.int32)
    segment_ids = jnp.array([[1, 1, 2, 2]], jnp.int32)
    np.testing.assert_array_equal(
        eqx_mtp.roll_and_mask(x), roll_and_mask_reference(np.asarray(x), -1)
    )
    np.testing.assert_array_equal(
        eqx_mtp.roll_and_mask(x, segment_ids=segment_ids),
        roll_and_mask_reference(np.asarray(x), -1, np.asarray(segment_ids)),
    )


def test_traced_shift_under_jit():
    rng = np.random.default_rng(0)
    seq_len = 9
    x = rng.integers(1, 100, (2, seq_len, 3)).astype(np.int32)
    segment_ids = np.array(
        [[1, 1, 1, 2, 2, 0, 0, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 0]], np.int32
    )
    traces = []

    @jax.jit
    def roll(x, shift, seg):
        traces.append(shift)
        return eqx_mtp.roll_and_mask(x, shift, segment_ids=seg)

    for shift in range(-seq_len - 1, seq_len + 2):
        out = roll(jnp.asarray(x), jnp.asarray(shift, jnp.int32), segment_ids)
        np.testing.assert_array_equal(
            out, roll_and_mask_reference(x, shift, segment_ids)
        )
    # One trace served every shift: the shift really was traced.
    assert len(traces) == 1


def test_bad_inputs_name_the_argument():
    # The package's own checks, without the test suite's runtime type checker.
    roll = inspect.unwrap(eqx_mtp.roll_and_mask)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, \.\.\.\]"):
        roll(jnp.arange(4), -1)
    with pytest.raises(ValueError, match=r"segment_ids must have shape"):
        roll(jnp.zeros((2, 4)), -1, segment_ids=jnp.ones((2, 5), jnp.int32))
