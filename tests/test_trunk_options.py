"""The trunk options of today's dense families (rescaled RoPE, no-RoPE layers, q/k/v
biases, q/k norms, an explicit head width, sliding windows, post-norms) against
references written here: the RoPE tables by a loop over the published formulas
(Hugging Face transformers' `modeling_rope_utils`), the whole trunk by a NumPy float64
forward, attention by the naive softmax of `reference.py`, decoding by a greedy loop
that recomputes everything. Beside them: blockwise == reference attention, a mesh ==
one device, bfloat16 close to float32, and the fused kernels refusing a window."""

import dataclasses
import functools
import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose
from hypothesis import given, settings
from reference import (
    documents_reference,
    jit_once,
    naive_attention,
    random_model,
    segment_rows,
    visible_reference,
)

import eqx_mtp
from eqx_mtp import ModelConfig, RopeScaling
from eqx_mtp._attention import resolve_attention_impl
from eqx_mtp._rope import apply_rope, rope_table

# The test programs run once or twice: compile time is what counts.
FAST = {"xla_backend_optimization_level": 0}

# -- RoPE tables -----------------------------------------------------------------------


def rope_table_reference(head_dim, theta, scaling):
    """`(inv_freq, attention_factor)` one frequency at a time, from the published
    formulas (transformers' `_compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
    `_compute_yarn_parameters`)."""
    half = head_dim // 2
    plain = [1.0 / theta ** (2 * i / head_dim) for i in range(half)]
    if scaling is None:
        return np.array(plain), 1.0
    factor = scaling.factor
    if scaling.kind == "linear":
        return np.array([f / factor for f in plain]), 1.0
    original = scaling.original_max_position
    if scaling.kind == "llama3":
        out = []
        for f in plain:
            wavelength = 2 * math.pi / f
            if wavelength < original / scaling.high_freq_factor:
                out.append(f)  # high frequency: kept
            elif wavelength > original / scaling.low_freq_factor:
                out.append(f / factor)  # low frequency: interpolated
            else:
                smooth = (original / wavelength - scaling.low_freq_factor) / (
                    scaling.high_freq_factor - scaling.low_freq_factor
                )
                out.append((1 - smooth) * f / factor + smooth * f)
        return np.array(out), 1.0

    # yarn
    def correction_dim(rotations):
        return (
            head_dim
            * math.log(original / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low = correction_dim(scaling.beta_fast)
    high = correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(plain):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1 - ramp
        out.append(f / factor * (1 - extrapolation) + f * extrapolation)
    attention = scaling.attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0
    return np.array(out), attention


SCALINGS = [
    None,
    RopeScaling("linear", 4.0),
    RopeScaling("llama3", 8.0, original_max_position=8192),
    RopeScaling(
        "llama3",
        32.0,
        original_max_position=512,
        low_freq_factor=2.0,
        high_freq_factor=8.0,
    ),
    RopeScaling("yarn", 4.0, original_max_position=4096),
    RopeScaling(
        "yarn",
        16.0,
        original_max_position=2048,
        beta_fast=16.0,
        beta_slow=2.0,
        attention_factor=1.3,
        truncate=False,
    ),
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s and s.kind)
@pytest.mark.parametrize("head_dim, theta", [(128, 500_000.0), (64, 10_000.0)])
def test_rope_tables_match_published_formulas(scaling, head_dim, theta):
    """Catches: the llama3 band's edges swapped (low/high factor), its blend
    inverted (`smooth` on the wrong side), yarn's ramp reversed, the truncation
    of its ends ignored, the attention factor's default formula."""
    inv_freq, attention = rope_table(head_dim, theta, scaling)
    expected, expected_attention = rope_table_reference(head_dim, theta, scaling)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-12)
    assert attention == pytest.approx(expected_attention, rel=1e-12)


def test_llama3_table_known_values():
    """Llama 3.1's table (θ = 500000, head 128, factor 8, low 1, high 4, original
    8192): wavelengths under 2048 are kept, over 8192 divided by 8, and the band
    between moves monotonically from one to the other."""
    scaling = RopeScaling("llama3", 8.0, original_max_position=8192)
    inv_freq, _ = rope_table(128, 500_000.0, scaling)
    plain, _ = rope_table(128, 500_000.0, None)
    wavelength = 2 * np.pi / plain
    high, low = wavelength < 2048, wavelength > 8192
    assert high.sum() > 10 and low.sum() > 10
    np.testing.assert_array_equal(inv_freq[high], plain[high])
    np.testing.assert_allclose(inv_freq[low], plain[low] / 8, rtol=1e-15)
    assert inv_freq[0] == 1.0 and inv_freq[-1] == pytest.approx(plain[-1] / 8)
    ratio = inv_freq / plain
    band = ~high & ~low
    assert np.all(np.diff(ratio[band]) < 0) and np.all(
        (ratio[band] > 1 / 8) & (ratio[band] < 1)
    )


def test_yarn_attention_factor_scales_queries_and_keys():
    """yarn's rotated vectors are longer by its attention factor (`0.1 ln 4 + 1` by
    default), so the logits by its square."""
    x = jnp.ones((3, 1, 8), jnp.float32)
    positions = jnp.arange(3)
    scaling = RopeScaling("yarn", 4.0, original_max_position=64)
    norms = jnp.linalg.norm(apply_rope(x, positions, 100.0, scaling), axis=-1)
    np.testing.assert_allclose(norms, np.sqrt(8) * (0.1 * np.log(4) + 1), rtol=1e-6)


def test_unscaled_rope_is_bit_identical_to_the_float32_formula():
    """Without scaling the NumPy table gives exactly the angles of the float32 formula
    checkpoints were trained with, `θ^(-i/half)` in float32."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((37, 3, 64)), jnp.float32)
    positions = jnp.arange(37) * 29
    for theta in (10_000.0, 500_000.0, 1e6):
        inv = theta ** (-jnp.arange(32, dtype=jnp.float32) / 32)
        angles = positions.astype(jnp.float32)[:, None] * inv[None, :]
        cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
        x1, x2 = x[..., :32], x[..., 32:]
        expected = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        np.testing.assert_array_equal(apply_rope(x, positions, theta), expected)


# -- the whole trunk against NumPy -----------------------------------------------------


def _rms(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope_np(x, positions, inv_freq, factor):
    """Rotate-half RoPE in float64: `x [seq, heads, d]`."""
    half = x.shape[-1] // 2
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos, sin = np.cos(angles)[:, None] * factor, np.sin(angles)[:, None] * factor
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _layer(params, name, i):
    value = params
    for part in name.split("."):
        value = getattr(value, part)
    return None if value is None else np.asarray(value[i], np.float64)


def numpy_block(params, config, x, docs, positions, *, rope, window):
    """One decoder layer in float64, as Hugging Face's Llama / Qwen2 / Qwen3 / OLMo-2
    / Mistral / SmolLM3 layers compute it: biases in the q/k/v projections, q/k norms
    before RoPE (over each head, or over the whole projection), RoPE skipped on a
    no-RoPE layer, a sliding window `i - W < j <= i` by row index, post-sublayer
    norms. `params(name)`: the layer's array `name` in float64 (`None` if absent)."""
    heads, kv_heads, hd = config.num_heads, config.num_kv_heads, config.head_dim
    eps, seq, p = config.norm_eps, x.shape[0], params
    inv_freq, factor = rope_table_reference(hd, config.rope_theta, config.rope_scaling)
    post = config.norm_position == "post"
    h = x if post else _rms(x, p("attention_norm.weight"), eps)
    q, k, v = (
        h @ p(f"attention.{n}_proj.weight").T
        + (p(f"attention.{n}_proj.bias") if config.qkv_bias else 0.0)
        for n in "qkv"
    )
    if config.qk_norm == "projection":
        q = _rms(q, p("attention.q_norm.weight"), eps)
        k = _rms(k, p("attention.k_norm.weight"), eps)
    q = q.reshape(seq, heads, hd)
    k, v = k.reshape(seq, kv_heads, hd), v.reshape(seq, kv_heads, hd)
    if config.qk_norm == "per_head":
        q = _rms(q, p("attention.q_norm.weight"), eps)
        k = _rms(k, p("attention.k_norm.weight"), eps)
    if rope:
        q = _rope_np(q, np.asarray(positions), inv_freq, factor)
        k = _rope_np(k, np.asarray(positions), inv_freq, factor)
    out = np.zeros((seq, heads, hd))
    for t in range(seq):
        visible = [
            s
            for s in range(seq)
            if docs[s] == docs[t] and s <= t and (window is None or t - s < window)
        ]
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = k[visible, kv] @ q[t, head] / math.sqrt(hd)
            weights = np.exp(scores - scores.max())
            out[t, head] = weights @ v[visible, kv] / weights.sum()
    attended = out.reshape(seq, heads * hd) @ p("attention.o_proj.weight").T

    def mlp(y):
        gate = y @ p("mlp.gate_proj.weight").T
        up = y @ p("mlp.up_proj.weight").T
        return (gate / (1 + np.exp(-gate)) * up) @ p("mlp.down_proj.weight").T

    if post:
        x = x + _rms(attended, p("attention_norm.weight"), eps)
        return x + _rms(mlp(x), p("mlp_norm.weight"), eps)
    x = x + attended
    return x + mlp(_rms(x, p("mlp_norm.weight"), eps))


def numpy_hidden(model, tokens, segment_ids, positions):
    """`h⁰` of one row in float64: the embedding, then `numpy_block` per layer with
    that layer's RoPE switch and window from the config."""
    config = model.config
    docs = documents_reference(np.asarray(segment_ids)[None])[0]
    x = np.asarray(model.trunk.embedding, np.float64)[np.asarray(tokens)]
    for i in range(config.num_layers):
        params = lambda name, i=i: _layer(model.trunk.blocks, name, i)  # noqa: E731
        x = numpy_block(
            params,
            config,
            x,
            docs,
            positions,
            rope=config.uses_rope(i),
            window=config.window(i),
        )
    return x


SEQ = 12
# Two documents and padding: windows cross no document boundary.
SEGMENT_IDS = np.array([1] * 7 + [2] * 3 + [0] * 2, np.int32)
POSITIONS = np.array(list(range(7)) + list(range(3)) + [0, 0], np.int32)


def _config(**options):
    values = dict(
        vocab_size=23,
        dim=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=48,
        max_seq_len=32,
        num_depths=0,
        remat="none",
        attention_block_size=4,
    )
    return ModelConfig(**(values | options))


ALL_OPTIONS = dict(
    head_dim=12,
    rope_theta=500.0,
    rope_scaling=RopeScaling("yarn", 4.0, original_max_position=8),
    no_rope_layers=(1,),
    qkv_bias=True,
    qk_norm="per_head",
    sliding_window=3,
    full_attention_layers=(2,),
    norm_position="post",
)

OPTION_CASES = {
    "head_dim": dict(head_dim=12),
    "rope_linear": dict(rope_scaling=RopeScaling("linear", 3.0)),
    "rope_llama3": dict(
        rope_theta=1000.0,
        rope_scaling=RopeScaling("llama3", 8.0, original_max_position=16),
    ),
    "rope_yarn": dict(
        rope_theta=1000.0,
        rope_scaling=RopeScaling("yarn", 8.0, original_max_position=16),
    ),
    "no_rope_layers": dict(no_rope_layers=(0, 2)),
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm_per_head": dict(qk_norm="per_head", head_dim=16),
    "qk_norm_projection": dict(qk_norm="projection", head_dim=16),
    "sliding_window": dict(sliding_window=2, full_attention_layers=(1,)),
    "norm_post": dict(norm_position="post"),
    "all": ALL_OPTIONS,
}


def _hidden_rows(model):
    """`h⁰` of this file's row, computed by the model's trunk."""
    tokens = jnp.arange(SEQ, dtype=jnp.int32) * 5 % model.config.vocab_size

    def run(m):
        return m.trunk(
            tokens,
            positions=jnp.asarray(POSITIONS),
            segment_ids=jnp.asarray(SEGMENT_IDS),
        )

    return np.asarray(jit_once(run)(model)), np.asarray(tokens)


# Each option alone by the blockwise attention (the harder path); all together by both.
NUMPY_CASES = [(case, "blockwise") for case in OPTION_CASES] + [("all", "reference")]


@pytest.mark.parametrize("case, impl", NUMPY_CASES)
def test_trunk_option_matches_numpy(case, impl):
    """Each option alone, and all together, on a packed row with padding, by the
    blockwise (tiles of 4) and the materialised attention. Catches: a bias dropped,
    a q/k norm after RoPE instead of before (or per head instead of over the
    projection), RoPE applied on a no-RoPE layer, a window off by one (`<=` for
    `<`), a window applied on a full-attention layer, a post-norm applied before
    its sublayer, the head width taken from `dim / heads`."""
    model = random_model(_config(attention_impl=impl, **OPTION_CASES[case]), seed=3)
    hidden, tokens = _hidden_rows(model)
    expected = numpy_hidden(model, tokens, SEGMENT_IDS, POSITIONS)
    np.testing.assert_allclose(hidden, expected, rtol=2e-4, atol=2e-5)


def test_depth_block_uses_rope_and_full_attention():
    """A block called without options (as an MTP depth calls its layer) applies RoPE
    and attends fully, whatever the trunk's no-RoPE layers and window; with a
    layer's options it follows them."""
    config = _config(sliding_window=2, no_rope_layers=(0,), num_depths=1)
    config = dataclasses.replace(config, qkv_bias=True, norm_position="post")
    model = random_model(config, seed=1)
    stacked = model.depths.depths.layer
    block = jax.tree.map(lambda leaf: leaf[0] if eqx.is_array(leaf) else leaf, stacked)
    x = np.random.default_rng(0).standard_normal((SEQ, 32))
    positions = np.arange(SEQ, dtype=np.int32)
    kwargs = dict(
        positions=jnp.asarray(positions), segment_ids=jnp.ones(SEQ, jnp.int32)
    )
    params = lambda name: _layer(stacked, name, 0)  # noqa: E731
    ones = np.ones(SEQ, np.int32)
    call = jax.jit(lambda x, o: block(x, options=o, **kwargs), compiler_options=FAST)
    for options, rope, window in [
        (None, True, None),
        (eqx_mtp._attention.LayerOptions(jnp.bool_(False), jnp.int32(2)), False, 2),
    ]:
        out = call(jnp.asarray(x, jnp.float32), options)
        expected = numpy_block(
            params, config, x, ones, positions, rope=rope, window=window
        )
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)


# -- sliding windows in the blockwise kernel ------------------------------------------


def _windowed_visible(segment_ids, window):
    index = np.arange(len(segment_ids))
    visible = visible_reference(segment_ids, segment_ids, index, index)
    return visible & (index[:, None] - index[None, :] < window)


@settings(max_examples=6)
@given(
    data=st.data(),
    window=st.integers(1, 14),
    block_q=st.sampled_from([2, 3, 4, 8]),
    block_k=st.sampled_from([2, 3, 5, 8]),
)
def test_windowed_blockwise_equals_windowed_reference(data, window, block_q, block_k):
    """Values and gradients of windowed blockwise attention over a packed row equal
    the naive softmax over keys `i - W < j <= i` of the same document. Catches: a
    window off by one, the first visited key tile rounded up instead of down (keys
    at the window's far edge dropped), the backward's last query tile cut short."""
    seg = data.draw(segment_rows(1, SEQ))[0]
    rng = np.random.default_rng(window)
    q, k, v, cotangent = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in [(SEQ, 4, 4), (SEQ, 2, 4), (SEQ, 2, 4), (SEQ, 4, 4)]
    )
    visible = _windowed_visible(seg, window)
    blockwise = _windowed_blockwise(block_q, block_k)
    out, grads = blockwise(q, k, v, cotangent, jnp.asarray(seg), jnp.int32(window))
    expected, expected_pullback = jax.vjp(
        lambda *a: naive_attention(*a, visible), q, k, v
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert tree_allclose(grads, expected_pullback(cotangent), rtol=1e-4)


@functools.cache
def _windowed_blockwise(block_q, block_k):
    """`(out, (d_q, d_k, d_v))` of blockwise attention with a traced window and
    segment ids: one compilation per pair of tile sizes."""

    def run(q, k, v, cotangent, seg, window):
        def attention(q, k, v):
            return eqx_mtp.nn.blockwise_attention(
                q,
                k,
                v,
                query_segment_ids=seg,
                key_segment_ids=seg,
                block_q=block_q,
                block_k=block_k,
                window=window,
            )

        out, pullback = jax.vjp(attention, q, k, v)
        return out, pullback(cotangent)

    return jax.jit(run, compiler_options=FAST)


@pytest.mark.parametrize("block_q, block_k, window", [(4, 4, 3), (2, 4, 5)])
def test_blockwise_skips_tiles_outside_the_window(block_q, block_k, window):
    """A NaN key/value in the first tile reaches, forward and backward, only the
    query tiles whose window can reach it: the tiles outside are never visited
    (their output stays finite, and NaN cotangents of far queries leave the first
    tile's gradients finite)."""
    seq = 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((seq, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((seq, 1, 4)), jnp.float32)
    v = k.at[0].set(jnp.nan)
    seg = jnp.ones(seq, jnp.int32)

    def attention(q, k, v):
        return eqx_mtp.nn.blockwise_attention(
            q,
            k,
            v,
            query_segment_ids=seg,
            key_segment_ids=seg,
            block_q=block_q,
            block_k=block_k,
            window=window,
        )

    out = np.asarray(jax.jit(attention, compiler_options=FAST)(q, k, v))
    # Query tile t starts at t·block_q; its window reaches key 0 iff t·block_q < W.
    far = np.arange(seq) // block_q * block_q >= window + block_k - 1
    assert far.any() and np.isfinite(out[far]).all()
    assert np.isnan(out[0]).all()
    # Backward: NaN cotangents on the far queries, finite keys and values.
    d_out = jnp.where(jnp.asarray(far)[:, None, None], jnp.nan, 1.0)

    def grads(q, k, v, d_out):
        return jax.vjp(attention, q, k, v)[1](d_out)

    grads = jax.jit(grads, compiler_options=FAST)
    _, d_k, d_v = grads(q, k, v.at[0].set(1.0), d_out * jnp.ones((seq, 2, 4)))
    assert np.isfinite(d_k[:block_k]).all() and np.isfinite(d_v[:block_k]).all()


def test_kernels_refuse_a_window_by_name(monkeypatch):
    """A fused kernel asked for explicitly with a window is an error naming
    `sliding_window` and `attention_impl`; `"auto"` picks the blockwise kernel."""
    for impl, backend in (("pallas_gpu", "gpu"), ("splash_tpu", "tpu")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        with pytest.raises(ValueError, match="sliding_window") as error:
            resolve_attention_impl(impl, windowed=True)
        assert "attention_impl" in str(error.value)
        assert resolve_attention_impl(impl) == impl
        assert resolve_attention_impl("auto", windowed=True) == "blockwise"
        assert resolve_attention_impl("auto") == impl
        # The model resolves it when traced, before any kernel runs.
        model = random_model(_config(attention_impl=impl, sliding_window=4))
        with pytest.raises(ValueError, match="sliding_window"):
            jax.eval_shape(
                lambda m: m(
                    jnp.zeros(8, jnp.int32),
                    positions=jnp.arange(8),
                    segment_ids=jnp.ones(8, jnp.int32),
                ),
                model,
            )


# -- decoding, meshes, bfloat16 ------------------------------------------------------


def _decoding_model(**options):
    config = _config(
        attention_impl="reference",
        num_depths=1,
        **(ALL_OPTIONS | dict(sliding_window=2) | options),
    )
    return random_model(config, seed=5)


def _greedy_by_recompute(model, prompt, count):
    """Greedy tokens, the trunk recomputed over the whole row for every one."""
    arrays, static = eqx.partition(model, eqx.is_array)

    @functools.partial(jax.jit, compiler_options=FAST)
    def last_logits(arrays, tokens, length):
        trunk = eqx.combine(arrays, static).trunk
        positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        hidden = trunk(tokens, positions=positions, segment_ids=jnp.ones_like(tokens))
        return trunk.logits(hidden[length - 1])

    width = model.config.max_seq_len
    seq = list(prompt)
    for _ in range(count):
        padded = jnp.asarray(seq + [0] * (width - len(seq)), jnp.int32)
        seq.append(int(jnp.argmax(last_logits(arrays, padded, len(seq)))))
    return seq[len(prompt) :]


def test_cached_decoding_with_options_equals_recompute():
    """Greedy `generate` (KV cache; speculative: the depth drafts, the trunk
    verifies several tokens per pass) with a windowed, partly no-RoPE, biased,
    q/k-normed, post-norm trunk with yarn RoPE equals recomputing the whole row for
    each token. Catches: the cached mask ignoring the window (keys beyond it still
    seen once the cache is longer than the window), the window counted from the
    cache's start instead of by positions, no-RoPE layers rotated in the cache."""
    model = _decoding_model()
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5]]
    expected = [_greedy_by_recompute(model, prompt, 9) for prompt in prompts]
    for speculative in (False, True):
        generation = eqx_mtp.generate(
            model, prompts, max_new_tokens=9, speculative=speculative
        )
        assert [list(np.asarray(row)) for row in generation.tokens] == expected


def _loss_and_grads(model, mesh):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 23, (8, 16)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 9 + [2] * 5 + [0] * 2], 8, 0), jnp.int32)
    arrays, static = eqx.partition(model, eqx.is_array)

    def objective(arrays, tokens, segment_ids):
        def loss(m):
            return eqx_mtp.mtp_loss(
                m, tokens, segment_ids=segment_ids, mtp_weight=0.5, mesh=mesh
            )[0]

        return eqx.filter_value_and_grad(loss)(eqx.combine(arrays, static))

    inputs = (tokens, segment_ids)
    if mesh is not None:
        inputs = jax.device_put(inputs, eqx_mtp.batch_sharding(mesh))
    return jax.jit(objective, compiler_options=FAST)(arrays, *inputs)


@functools.cache
def _trained(impl, compute_dtype="float32", mesh_shape=None):
    """`(loss, grads)` of a model with every option at once, compiled once."""
    config = _config(
        attention_impl=impl,
        num_depths=1,
        compute_dtype=compute_dtype,
        loss_impl="naive",
        **ALL_OPTIONS,
    )
    model, mesh = random_model(config, seed=7), None
    if mesh_shape is not None:
        mesh = eqx_mtp.make_mesh(*mesh_shape)
        model = eqx_mtp.shard_tree(model, mesh)
    return _loss_and_grads(model, mesh)


def test_options_on_a_mesh_equal_one_device():
    """Every option at once, trained on 8 devices (data × model × context: the
    biases and q/k norms sharded or replicated by the rules, windows over keys
    gathered from the context shards) with the blockwise attention equals one
    device, loss and every gradient. (Blockwise == materialised: values in
    `test_trunk_option_matches_numpy`, gradients in
    `test_windowed_blockwise_equals_windowed_reference`.)"""
    loss, grads = _trained("blockwise", mesh_shape=(2, 2, 2))
    expected_loss, expected_grads = _trained("blockwise")
    assert tree_allclose(loss, expected_loss, rtol=1e-5)
    assert tree_allclose(grads, expected_grads, rtol=1e-4, atol=1e-6)
    # Every parameter learns, the biases and q/k norms included.
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(expected_grads))


def test_sharding_rules_cover_biases_and_qk_norms():
    """The q/k/v biases are split over `model` like their matrices' outputs; the q/k
    norms are replicated."""
    config = _config(**ALL_OPTIONS | dict(num_heads=4, num_kv_heads=2, head_dim=16))
    shapes = eqx.filter_eval_shape(eqx_mtp.MTPModel, config, key=jax.random.key(0))
    specs = eqx_mtp.partition_specs(shapes, eqx_mtp.make_mesh(4, 2, 1))
    attention = specs.trunk.blocks.attention
    P = jax.sharding.PartitionSpec
    for name in ("q_proj", "k_proj", "v_proj"):
        assert getattr(attention, name).bias == P(None, "model")
    assert attention.q_norm.weight == P() and attention.k_norm.weight == P()


def test_options_in_bfloat16_close_to_float32():
    """Every option at once with `compute_dtype="bfloat16"`: the loss is finite and
    close to float32's, and so are the gradients of the new parameters."""
    loss, grads = _trained("blockwise")
    half_loss, half_grads = _trained("blockwise", "bfloat16")
    assert np.isfinite(half_loss) and abs(half_loss - loss) < 0.03 * abs(loss)
    for name in ("q_proj.bias", "q_norm.weight", "k_norm.weight"):
        g32 = np.asarray(_get(grads.trunk.blocks.attention, name))
        g16 = np.asarray(_get(half_grads.trunk.blocks.attention, name))
        assert g16.dtype == np.float32 and np.isfinite(g16).all()
        assert np.linalg.norm(g16 - g32) < 0.1 * np.linalg.norm(g32)


def _get(tree, name):
    for part in name.split("."):
        tree = getattr(tree, part)
    return tree


@pytest.mark.parametrize("window", [0, -3, True])
def test_blockwise_attention_rejects_a_bad_window(window):
    """A window that is not a positive integer is an error naming `window`."""
    x = jnp.zeros((4, 1, 2), jnp.float32)
    seg = jnp.ones(4, jnp.int32)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        eqx_mtp.nn.blockwise_attention(
            x, x, x, query_segment_ids=seg, key_segment_ids=seg, window=window
        )
