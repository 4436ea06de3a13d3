"""The fused attention kernels shipped with JAX (Pallas GPU attention, TPU splash
attention), run here in Pallas's interpreter, against the naive attention; and the
`attention_impl` switch: which implementation runs where, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tree_allclose
from reference import naive_attention, random_model, visible_reference

import eqx_mtp
from eqx_mtp._attention import resolve_attention_impl
from eqx_mtp._kernels import pallas_gpu_attention, splash_tpu_attention
from eqx_mtp._mesh import tracing_on

KERNELS = {"pallas_gpu": pallas_gpu_attention, "splash_tpu": splash_tpu_attention}


def _row(seq_len, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, cotangent = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((seq_len, 4, 16), (seq_len, 2, 16), (seq_len, 2, 16))
        + ((seq_len, 4, 16),)
    )
    # Two documents and trailing padding (segment 0), a length that is not a
    # multiple of the tiles.
    segments = np.ones(seq_len, np.int32)
    segments[seq_len // 3 :] = 2
    segments[-5:] = 0
    return q, k, v, cotangent, segments


@pytest.mark.parametrize(
    "name,seq_len,block", [("pallas_gpu", 40, 16), ("splash_tpu", 200, 128)]
)
def test_kernel_equals_naive_attention(name, seq_len, block):
    """Values and the gradients w.r.t. queries, keys and values (grouped heads, packed
    documents, padding, a ragged last tile). Catches a wrong layout, scale, head
    grouping or segment padding in our wrapper of the kernel."""
    q, k, v, cotangent, segments = _row(seq_len)
    index = np.arange(seq_len)
    visible = visible_reference(segments, segments, index, index)

    def kernel(q, k, v):
        return KERNELS[name](
            q,
            k,
            v,
            segment_ids=jnp.asarray(segments),
            block_size=block,
            interpret=True,
        )

    out, pullback = jax.vjp(kernel, q, k, v)
    expected, expected_pullback = jax.vjp(
        lambda q, k, v: naive_attention(q, k, v, visible), q, k, v
    )
    assert tree_allclose(out, expected, rtol=1e-5, atol=2e-5)
    assert tree_allclose(
        pullback(cotangent), expected_pullback(cotangent), rtol=1e-4, atol=1e-4
    )


def test_auto_picks_the_backends_kernel_on_one_device(monkeypatch):
    assert resolve_attention_impl("auto") == "blockwise"  # this CPU has no kernel
    for backend, kernel in (("gpu", "pallas_gpu"), ("tpu", "splash_tpu")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert resolve_attention_impl("auto") == kernel
        assert resolve_attention_impl(kernel) == kernel
        # On a multi-device mesh the kernels (not shard-mapped) give way.
        with tracing_on(eqx_mtp.make_mesh(2, 1, 4)):
            assert resolve_attention_impl("auto") == "blockwise"
            with pytest.raises(ValueError, match=f"attention_impl='{kernel}'.*mesh"):
                resolve_attention_impl(kernel)


@pytest.mark.parametrize("kernel", ["pallas_gpu", "splash_tpu"])
def test_a_kernel_on_another_backend_is_a_clear_error(kernel):
    model = random_model(tiny_config(num_depths=0, attention_impl=kernel))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=f"attention_impl='{kernel}'.*'cpu'"):
        eqx_mtp.mtp_loss(model, tokens)


def test_auto_model_equals_reference_on_cpu():
    """`"auto"` on this CPU runs the blockwise kernel: the reference's loss."""
    auto = random_model(tiny_config(attention_impl="auto", attention_block_size=4))
    reference = random_model(tiny_config())
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 19, (2, 16)), jnp.int32)
    loss_auto = eqx_mtp.mtp_loss(auto, tokens)[0]
    loss_reference = eqx_mtp.mtp_loss(reference, tokens)[0]
    assert np.isclose(float(loss_auto), float(loss_reference), rtol=1e-5)
