"""The naive MTP loss of `benchmarks/naive_baseline.py` against `eqx_mtp.mtp_loss`.

`benchmarks/_naive.py` writes the model from the published architectures in plain
`jax.numpy` (a Python loop over layers and depths, full logits, materialised
attention) and calls none of `eqx_mtp`'s modules or functions: it reads the model's
arrays only. Equal losses and gradients therefore make the benchmark compare two
programs that compute the same thing, and also make the naive model an independent
reference for our loss: for the trunk, the depth stack scanned over depth, the fused
cross-entropy, the blockwise attention, remat, the validity rule on packed rows and
the reduction, at once and through the gradient. (`tests/reference.py`'s loops reuse
our blocks; `tests/llama_reference.py` is NumPy, forward only.)

Plausible bugs this catches, each checked by mutating `eqx_mtp` locally and seeing
this test fail:

- a depth reading the embedding of `t_{i+k-1}` instead of `t_{i+k}`
    (`_mtp.py`, `shift_within_documents(tokens, -k, ...)`);
- a dropped segment condition in the validity rule (`_targets.py`), which lets a
    position train on a target in the next document;
- `eh_proj`'s input in the paper's order, hidden first, instead of the released
    weights' embedding first;
- a depth reading the trunk's output instead of the previous depth's (sequential
    MTP turned into parallel);
- a reduction that pools the depths instead of averaging their means.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tree_allclose
from reference import jit_once, random_model

import eqx_mtp
from benchmarks._naive import naive_mtp_loss

MTP_WEIGHT = 0.3
# Packed rows: documents of 1 to 9 tokens, an id reused after another document (a new
# document), padding at the end of a row, and a two-token document (nothing counts in
# it at depth 1 or beyond).
SEGMENT_IDS = jnp.array(
    [
        [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0],
        [4, 4, 4, 4, 4, 4, 4, 4, 4, 7, 7, 3, 3, 3, 3, 5],
    ],
    jnp.int32,
)


@pytest.mark.parametrize("num_depths", [1, 2])
def test_naive_loss_and_gradients_equal_mtp_loss(num_depths):
    # The product's defaults (fused loss, blockwise attention, remat "full"), with
    # tiles smaller than a row so that several tiles and chunks run.
    config = tiny_config(
        vocab_size=31,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_depths=num_depths,
        attention_block_size=8,
        loss_chunk_size=8,
    )
    model = random_model(config, seed=num_depths)
    tokens = jnp.asarray(
        np.random.default_rng(num_depths).integers(
            0, config.vocab_size, SEGMENT_IDS.shape, dtype=np.int32
        )
    )

    def ours(m):
        return eqx.filter_value_and_grad(
            lambda m: eqx_mtp.mtp_loss(
                m, tokens, segment_ids=SEGMENT_IDS, mtp_weight=MTP_WEIGHT
            ),
            has_aux=True,
        )(m)

    def naive(m):
        return eqx.filter_value_and_grad(
            lambda m: naive_mtp_loss(m, tokens, SEGMENT_IDS, mtp_weight=MTP_WEIGHT),
            has_aux=True,
        )(m)

    (loss, aux), grads = jit_once(ours)(model)
    (naive_loss, naive_depth_losses), naive_grads = jit_once(naive)(model)
    np.testing.assert_allclose(
        np.asarray(naive_depth_losses), np.asarray(aux["depth_losses"]), rtol=1e-5
    )
    np.testing.assert_allclose(float(naive_loss), float(loss), rtol=1e-5)
    assert tree_allclose(naive_grads, grads, rtol=1e-5, atol=1e-6)
