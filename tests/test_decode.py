"""Decoding against references written here: a naive greedy loop that recomputes the
full forward for every token, a loop over unstacked depths for the drafts, and the
trunk's exact joint distribution (by enumeration) for sampling."""

import itertools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from helpers import tiny_config
from hypothesis import given, settings
from reference import random_model

import eqx_mtp
from eqx_mtp._transformer import unstack_module
from eqx_mtp.nn import KVCache


def _model(seed=0, **overrides):
    values = dict(max_seq_len=32, attention_impl="reference", remat="none")
    return random_model(tiny_config(**{**values, **overrides}), seed)


@eqx.filter_jit
def _full_hidden(model, tokens):
    """The trunk's `h⁰` of one row of tokens, the whole row at once (one document)."""
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    return model.trunk(tokens, positions=positions, segment_ids=jnp.ones_like(tokens))


def naive_greedy(model, prompt, count):
    """`count` greedy tokens, the full forward recomputed for every one. Rows are
    padded to `max_seq_len`, which causal attention makes harmless: the logits at
    position `i` read tokens `≤ i` only."""
    width = model.config.max_seq_len
    seq = list(prompt)
    for _ in range(count):
        padded = jnp.asarray(seq + [0] * (width - len(seq)), jnp.int32)
        hidden = _full_hidden(model, padded)[len(seq) - 1]
        seq.append(int(jnp.argmax(model.trunk.logits(hidden))))
    return seq[len(prompt) :]


def _prompts(rng, lengths, vocab):
    return [list(rng.integers(0, vocab, size=n)) for n in lengths]


def _empty_cache(config, layers, length=16):
    return KVCache.empty(
        layers=layers,
        length=length,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )


def test_cached_trunk_equals_full_forward():
    """A prefill, then one token at a time: every position's `h⁰` is the full
    forward's. Catches a cache written at the wrong offset, a mask that lets a query
    see a later key (or not its own), rotary positions restarting per chunk, and a
    layer reading another layer's cache."""
    model = _model()
    config = model.config
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 19, size=11), jnp.int32)
    expected = _full_hidden(model, tokens)
    cache = _empty_cache(config, config.num_layers)
    rows = []
    for start, stop in [(0, 4), *((i, i + 1) for i in range(4, 11))]:
        positions = jnp.arange(start, stop, dtype=jnp.int32)
        hidden, cache = model.trunk(
            tokens[start:stop], positions=positions, segment_ids=None, cache=cache
        )
        rows.append(hidden)
    np.testing.assert_allclose(jnp.concatenate(rows), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_a_block_with_a_cache_computes_what_it_computes_without(layer_index):
    """One trunk block and one depth, called on the same positions in chunks with a
    cache and on the whole row without: equal outputs, so that the decoding forward
    and the training forward are one computation. The cache has three layers and the
    block uses layer `layer_index`; the other layers stay zero. Catches a cached
    path that drifts from the training one (a norm, a projection or a rotary
    embedding applied differently) and a write into the wrong layer."""
    model = _model(1, num_depths=2, num_layers=2)
    config = model.config
    block = unstack_module(model.trunk.blocks, 1)
    depth = model.depths.depth(0)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(9, config.dim)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(9, config.dim)), jnp.float32)
    positions = jnp.arange(9, dtype=jnp.int32)
    one_document = jnp.ones((9,), jnp.int32)
    expected_block = block(x, positions=positions, segment_ids=one_document)
    expected_depth = depth(x, e, positions=positions, segment_ids=one_document)
    block_cache = _empty_cache(config, 3).at_layer(layer_index)
    depth_cache = _empty_cache(config, 3).at_layer(layer_index)
    block_rows, depth_rows = [], []
    for start, stop in [(0, 3), (3, 4), (4, 9)]:
        at = positions[start:stop]
        out, block_cache = block(
            x[start:stop], positions=at, segment_ids=None, cache=block_cache
        )
        block_rows.append(out)
        out, depth_cache = depth(
            x[start:stop], e[start:stop], positions=at, segment_ids=None,
            cache=depth_cache,
        )  # fmt: skip
        depth_rows.append(out)
    np.testing.assert_allclose(
        jnp.concatenate(block_rows), expected_block, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        jnp.concatenate(depth_rows), expected_depth, rtol=1e-5, atol=1e-6
    )
    others = [i for i in range(3) if i != layer_index]
    assert not np.any(np.asarray(block_cache.keys)[others])
    assert np.any(np.asarray(block_cache.keys)[layer_index])


@settings(max_examples=6)
@given(
    mtp_kind=st.sampled_from(["sequential", "parallel"]),
    num_depths=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    max_new=st.integers(1, 9),
    seed=st.integers(0, 3),
)
def test_greedy_speculative_equals_plain_equals_naive(
    mtp_kind, num_depths, lengths, max_new, seed
):
    """Over both MTP kinds, D in 1..3 and batches of prompts of different lengths:
    speculative greedy tokens == plain cached greedy == the naive loop. Catches a
    kept prefix counted past a disagreement, a correction token taken from the wrong
    position, a row's cache rolled back wrongly, and rows that finish at different
    rounds corrupting each other."""
    model = _model(seed, mtp_kind=mtp_kind, num_depths=num_depths)
    prompts = _prompts(np.random.default_rng(seed), lengths, 19)
    expected = [naive_greedy(model, p, max_new) for p in prompts]
    for speculative in (False, True):
        out = eqx_mtp.generate(
            model, prompts, max_new_tokens=max_new, speculative=speculative
        )
        assert np.asarray(out.tokens).tolist() == expected, speculative


def test_models_of_one_shape_each_decode_with_their_own_weights():
    """Two models of one shape, one after the other, then the first again: each
    output is its own model's greedy output. On a CPU the weights are compiled into
    the decoding program; catches a program kept by shape alone, which would
    decode the second model with the first one's weights."""
    prompts = [[1, 2, 3]]
    models = [_model(seed) for seed in (5, 6, 5)]
    for model in models:
        expected = [naive_greedy(model, p, 6) for p in prompts]
        out = eqx_mtp.generate(model, prompts, max_new_tokens=6)
        assert np.asarray(out.tokens).tolist() == expected
    assert naive_greedy(models[0], prompts[0], 6) != naive_greedy(
        models[1], prompts[0], 6
    )


def test_weights_passed_as_arguments_decode_the_same(monkeypatch):
    """A model too large to compile its weights in (the threshold set to zero here;
    on an accelerator always) decodes with them as arguments: the same greedy
    output. Catches a program that only works with its weights as constants."""
    monkeypatch.setattr(eqx_mtp._decode, "CONSTANT_WEIGHTS_BYTES", 0)
    model = _model(7, num_depths=2)
    prompts = [[4, 1, 2], [3]]
    expected = [naive_greedy(model, p, 5) for p in prompts]
    for speculative in (False, True):
        out = eqx_mtp.generate(
            model, prompts, max_new_tokens=5, speculative=speculative
        )
        assert np.asarray(out.tokens).tolist() == expected, speculative


# Right or wrong at random: rounds that keep a wrong draft before a right one.
MIXED = np.random.default_rng(3).random(200) < 0.6


def _forced(prompts, continuations, pattern, vocab):
    """Per row, the token to force at each position: the true continuation
    (`"all"`), a wrong token (`"none"`), or right where `MIXED` is true
    (`"mixed"`)."""
    rows = []
    for prompt, continuation in zip(prompts, continuations):
        truth = np.asarray(prompt + continuation)
        right = {"all": True, "none": False, "mixed": MIXED[: len(truth)]}[pattern]
        rows.append(np.where(right, truth, (truth + 1) % vocab))
    return rows


_prefill = eqx.filter_jit(eqx_mtp.Decoder.prefill)
_draft = eqx.filter_jit(eqx_mtp.Decoder.draft)
_verify = eqx.filter_jit(eqx_mtp.Decoder.verify)


def _drive(model, prompts, max_new, forced):
    """Each row decoded greedily round by round from Python with the decoder's
    pieces, every draft replaced by `forced[row][position]`: per row the new
    tokens, the rounds, the acceptance counts and every round's `(count, drafts)`
    as the depths proposed them."""
    num_depths = model.config.num_depths
    width = max(map(len, prompts))
    decoder = eqx_mtp.Decoder(
        model,
        max_new_tokens=max_new,
        num_drafts=num_depths,
        length=eqx_mtp.Decoder.cache_length(width, max_new, num_depths),
        temperature=0.0,
        top_k=None,
    )
    results = []
    for row, prompt in enumerate(prompts):
        padded = jnp.asarray(prompt + [0] * (width - len(prompt)), jnp.int32)
        state = _prefill(decoder, padded, jnp.int32(len(prompt)), jax.random.key(0))
        log = []
        while not decoder.finished(state):
            drafts, state = _draft(decoder, state)
            count = int(state.count)
            log.append((count, np.asarray(drafts.tokens).tolist()))
            at = count + np.arange(num_depths)
            forced_drafts = jnp.asarray(forced[row][at], jnp.int32)
            drafts = eqx.tree_at(lambda d: d.tokens, drafts, forced_drafts)
            state = _verify(decoder, state, drafts)
        results.append(
            (
                np.asarray(decoder.new_tokens(state)).tolist(),
                int(state.rounds),
                np.asarray(state.accepted).tolist(),
                log,
            )
        )
    return results


@pytest.mark.parametrize("pattern", ["all", "none", "mixed"])
def test_forced_acceptance_patterns(pattern):
    """Drafts replaced by known-right or known-wrong tokens: the output stays the
    greedy one, and the counts say what was kept: every draft (rounds of D + 1
    tokens), none (one token a round), or exactly the right prefixes."""
    num_depths, max_new = 3, 11
    model = _model(2, num_depths=num_depths)
    prompts = _prompts(np.random.default_rng(5), [3, 6], 19)
    # The truth past max_new too: the last round's drafts may run beyond it.
    truth = [naive_greedy(model, p, max_new + num_depths + 1) for p in prompts]
    results = _drive(model, prompts, max_new, _forced(prompts, truth, pattern, 19))
    assert [tokens for tokens, *_ in results] == [t[:max_new] for t in truth]
    rounds = np.asarray([r for _, r, _, _ in results])
    accepted = np.asarray([a for _, _, a, _ in results])
    if pattern == "all":
        # The prompt's pass gives one token; every round then D + 1.
        assert rounds.tolist() == [-(-(max_new - 1) // (num_depths + 1))] * 2
        assert (accepted == rounds[:, None]).all()
    elif pattern == "none":
        assert rounds.tolist() == [max_new - 1] * 2
        assert (accepted == 0).all()
    else:
        # Simulate: a round at n (tokens so far) drafts positions n .. n + D - 1.
        for row, prompt in enumerate(prompts):
            n, kept_counts = len(prompt) + 1, []
            while n - len(prompt) < max_new:
                kept = 0
                while kept < num_depths and MIXED[n + kept]:
                    kept += 1
                kept_counts.append(kept)
                n += kept + 1
            assert rounds[row] == len(kept_counts)
            for k in range(num_depths):
                assert accepted[row, k] == sum(c > k for c in kept_counts)


@eqx.filter_jit
def _loop_drafts(model, tokens, query):
    """Drafts at position `query` by a loop over unstacked depths on the full
    sequence `tokens` (which holds the drafts of earlier depths at `query + k`; what
    follows them cannot reach position `query`, so rows may be padded)."""
    config = model.config
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    segments = jnp.ones_like(tokens)
    h = _full_hidden(model, tokens)
    if config.depth_trunk_input == "after_norm":
        h = model.trunk.final_norm(h)
    trunk_hidden, drafts = h, []
    for k in range(1, config.num_depths + 1):
        depth = unstack_module(model.depths.depths, k - 1)
        ahead = jnp.concatenate([tokens[k:], jnp.zeros((k,), jnp.int32)])
        source = h if config.mtp_kind == "sequential" else trunk_hidden
        embeddings = model.trunk.embedding[ahead]
        h = depth(
            source,
            embeddings,
            positions=positions,
            segment_ids=segments,
            layer=model.depths.shared_layer,
        )
        norm = model.trunk.final_norm if depth.norm is None else depth.norm
        logits = norm(h[query]) @ model.trunk.unembedding_matrix.T
        drafts.append(jnp.argmax(logits))
        if config.depth_previous_input == "after_norm":
            h = norm(h)
    return jnp.stack(drafts)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mtp_kind="sequential", num_depths=3),
        dict(mtp_kind="sequential", num_depths=2, shared_depth_layer=True),
        dict(mtp_kind="parallel", num_depths=2, depth_final_norm=True),
        dict(mtp_kind="sequential", num_depths=2, mtp_block="mlp"),
        dict(
            mtp_kind="sequential",
            num_depths=2,
            depth_final_norm=True,
            depth_trunk_input="after_norm",
            depth_previous_input="after_norm",
        ),
    ],
    ids=["sequential", "shared", "parallel", "mlp", "after-norm"],
)
def test_drafts_equal_the_depths_full_forward(overrides):
    """Every round's drafts, from the depths' windowed caches, are those of the
    depths run on the whole sequence as in training (the committed tokens, then the
    earlier depths' drafts). The drafts the trunk checks are forced right or wrong
    at random, so rounds keep anything from none to all of them. Catches a depth
    cache left with a rejected draft's state, a window that misses a position, and
    a token read one place off."""
    model = _model(3, **overrides)
    num_depths, max_new = model.config.num_depths, 16
    prompts = _prompts(np.random.default_rng(7), [4, 2], 19)
    truth = [naive_greedy(model, p, max_new + num_depths + 1) for p in prompts]
    results = _drive(model, prompts, max_new, _forced(prompts, truth, "mixed", 19))
    kept_all = 0
    for row, prompt in enumerate(prompts):
        sequence = prompt + truth[row]
        tokens, rounds, _, log = results[row]
        assert tokens == truth[row][:max_new]
        ns = [n for n, _ in log]
        kept_all += sum(b - a == num_depths + 1 for a, b in zip(ns, ns[1:]))
        for n, drafts in log:
            tokens = sequence[:n] + drafts[:-1]
            padded = jnp.asarray(tokens + [0] * (32 - len(tokens)), jnp.int32)
            expected = _loop_drafts(model, padded, jnp.int32(n - 2)).tolist()
            assert expected == drafts, (row, n)
    assert kept_all > 0  # some rounds kept every draft


def _exact_joint(model, prompt, count, temperature, top_k):
    """The trunk's probability of every continuation of `count` tokens, by
    enumeration: `{tokens: probability}`."""
    vocab = model.config.vocab_size
    joint = {}
    for continuation in itertools.product(range(vocab), repeat=count):
        tokens = jnp.asarray(list(prompt) + list(continuation), jnp.int32)
        hidden = _full_hidden(model, tokens)
        logits = model.trunk.logits(hidden[len(prompt) - 1 : -1]) / temperature
        if top_k is not None:
            kth = jnp.sort(logits, axis=-1)[:, -top_k][:, None]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        picked = log_p[jnp.arange(count), jnp.asarray(continuation)]
        joint[continuation] = float(jnp.exp(jnp.sum(picked)))
    return joint


@pytest.mark.parametrize(
    "num_depths,temperature,top_k,speculative",
    [(1, 0.5, None, True), (2, 1.0, 3, True), (2, 0.7, None, False)],
    ids=["D1-t0.5", "D2-t1-top3", "plain-t0.7"],
)
def test_sampling_follows_the_trunk(num_depths, temperature, top_k, speculative):
    """Three sampled tokens after a prompt, 40,000 times: their joint frequencies
    match the trunk's exact joint distribution (chi-square). With one depth the
    third token is the bonus drawn after a fully kept round. Accepting every draft,
    resampling from p instead of (p - q)⁺ after a rejection, or drawing the bonus
    from q fails it."""
    model = _model(4, vocab_size=5, num_depths=num_depths)
    prompt, count, samples = [1, 3], 3, 40_000
    exact = _exact_joint(model, prompt, count, temperature, top_k)
    out = eqx_mtp.generate(
        model,
        jnp.asarray([prompt] * samples, jnp.int32),
        max_new_tokens=count,
        speculative=speculative,
        temperature=temperature,
        top_k=top_k,
        key=jax.random.key(11),
    )
    if speculative:  # the drafts are not the trunk's (q ≠ p), but often kept
        assert 0.05 < out.acceptance[0] < 0.95
    cells = list(exact)
    observed = np.zeros(len(cells))
    index = {cell: i for i, cell in enumerate(cells)}
    for row in np.asarray(out.tokens):
        observed[index[tuple(int(t) for t in row)]] += 1
    expected = np.array([exact[c] for c in cells]) * samples
    assert observed[expected == 0].sum() == 0  # nothing outside top-k
    big = expected >= 5
    observed_big = np.append(observed[big], observed[~big].sum())
    expected_big = np.append(expected[big], expected[~big].sum())
    keep = expected_big > 0
    observed_big, expected_big = observed_big[keep], expected_big[keep]
    statistic = ((observed_big - expected_big) ** 2 / expected_big).sum()
    p_value = scipy.stats.chi2.sf(statistic, keep.sum() - 1)
    assert p_value > 1e-4, (statistic, p_value)


def test_bad_generate_input():
    model = _model()
    good = [[1, 2, 3]]
    cases = [
        (dict(prompt_tokens=[[]]), "at least one token"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=40), "beyond the model's max_seq_len 32"),
        (dict(prompt_tokens=[[1, 99]]), r"must lie in \[0, 19\)"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=0.7), "needs a key"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (
            dict(prompt_tokens=jnp.ones((2, 3), jnp.int32), prompt_lengths=[3, 4]),
            "at most the prompt width",
        ),
        (dict(prompt_tokens=jnp.ones((3,), jnp.int32)), r"\[batch, prompt\]"),
        (dict(prompt_tokens=[[1.5, 2.0]]), "integer token ids"),
        (
            dict(prompt_tokens=np.ones((1, 3), np.int32), prompt_lengths=[2.5]),
            "prompt_lengths must be",
        ),
        (dict(temperature=float("nan"), key=jax.random.key(0)), "finite number"),
    ]
    for overrides, message in cases:
        arguments = dict(prompt_tokens=good, max_new_tokens=4) | overrides
        prompt = arguments.pop("prompt_tokens")
        with pytest.raises(ValueError, match=message):
            eqx_mtp.generate(model, prompt, **arguments)
    # Beartype (on in this suite) or generate's own check; both name `model`.
    with pytest.raises(TypeError, match="model"):
        eqx_mtp.generate(model.trunk, good, max_new_tokens=2)
