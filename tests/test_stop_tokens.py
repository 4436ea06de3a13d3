"""Stop tokens in decoding, against a plain Python loop that decodes greedily token by
token (the full forward recomputed for every token, no cache) and stops at the first
stop token."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import _full_hidden, _model, _prompts, naive_greedy

import eqx_mtp


def greedy_until_stop(model, prompt, max_new, stops):
    """Greedy tokens one at a time, the full forward for each, until a stop token
    (kept) or `max_new` tokens: `(tokens padded to max_new with the stop, length)`."""
    width = model.config.max_seq_len
    seq = list(prompt)
    new = []
    while len(new) < max_new:
        padded = jnp.asarray(seq + [0] * (width - len(seq)), jnp.int32)
        hidden = _full_hidden(model, padded)[len(seq) - 1]
        token = int(jnp.argmax(model.trunk.logits(hidden)))
        seq.append(token)
        new.append(token)
        if token in stops:
            break
    return new + [new[-1]] * (max_new - len(new)), len(new)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mtp_kind="sequential", num_depths=3),
        dict(mtp_kind="parallel", num_depths=1, mtp_block="mlp"),
    ],
    ids=["sequential-D3", "parallel-mlp-D1"],
)
def test_greedy_stops_where_a_plain_loop_stops(overrides):
    """A batch of three prompts whose rows stop at different rounds (one runs to
    max_new_tokens), plain and speculative: the tokens, padded after the stop with
    the stop token, and the lengths are the plain loop's. The statistics count the
    tokens up to and including the stop: a plain row runs one round per token after
    the prefill's, so its tokens per forward is exactly 1, and the throughput counts
    `sum(lengths)` tokens. Catches tokens after the stop committed in the same round
    (a speculative round keeps drafts past it), a stopped row that goes on running
    rounds, rows of a batch stopping together, and a stopped row's count including
    the padding past its stop."""
    model = _model(8, **overrides)
    max_new = 12
    prompts = _prompts(np.random.default_rng(9), [3, 5, 2], 19)
    truth = [naive_greedy(model, p, max_new) for p in prompts]
    # Stop at the third token of row 0 and the eighth of row 1: what that does to
    # every row is the reference loop's to say.
    stops = [truth[0][2], truth[1][7]]
    expected = [greedy_until_stop(model, p, max_new, stops) for p in prompts]
    lengths = [n for _, n in expected]
    assert len(set(lengths)) == 3 and max(lengths) == max_new, lengths
    for speculative in (False, True):
        out = eqx_mtp.generate(
            model, prompts, max_new_tokens=max_new, speculative=speculative,
            stop_tokens=stops,
        )  # fmt: skip
        assert np.asarray(out.tokens).tolist() == [t for t, _ in expected]
        assert np.asarray(out.lengths).tolist() == lengths
        passes = int(np.sum(out.rounds)) + len(prompts)
        assert out.tokens_per_forward == sum(lengths) / passes
        assert out.tokens_per_second * out.seconds == pytest.approx(sum(lengths))
        if not speculative:
            assert np.asarray(out.rounds).tolist() == [n - 1 for n in lengths]
            assert out.tokens_per_forward == 1.0


_prefill = eqx.filter_jit(eqx_mtp.Decoder.prefill)
_draft = eqx.filter_jit(eqx_mtp.Decoder.draft)
_verify = eqx.filter_jit(eqx_mtp.Decoder.verify)


# Per place of a round, a model whose greedy continuation of `[9, 5, 11, 0]` holds a
# token first seen there (the tiny models repeat themselves).
PLACES = {"draft 1": (1, 7), "draft 2": (2, 4), "draft 3": (3, 7), "trunk": (4, 4)}


@pytest.mark.parametrize("where", list(PLACES))
def test_an_accepted_draft_that_is_a_stop_ends_the_row(where):
    """Drafts forced to the true greedy continuation, so that every round keeps all
    `D = 3` drafts and adds the trunk's token (new tokens `4r-3 … 4r` in round `r`);
    the stop token is the one at the chosen place of a round. The trunk keeps every
    draft after the stop too, yet the row ends at the stop: its tokens and count stop
    there, and the stopping round counts as accepted only the drafts up to the stop.
    Catches a stop looked for only in the trunk's own token (not in the accepted
    drafts) and drafts after the stop committed in the same round."""
    num_depths, max_new = 3, 12
    place, seed = PLACES[where]
    model = _model(seed, num_depths=num_depths)
    prompt = [9, 5, 11, 0]
    truth = naive_greedy(model, prompt, max_new + num_depths + 1)
    # The first new token at this place of a round that is not among those before.
    index = next(
        i for i in range(1, max_new) if (i - 1) % 4 + 1 == place
        and truth[i] not in truth[:i]
    )  # fmt: skip
    stop = truth[index]
    decoder = eqx_mtp.Decoder(
        model,
        max_new_tokens=max_new,
        num_drafts=num_depths,
        length=eqx_mtp.Decoder.cache_length(len(prompt), max_new, num_depths),
        temperature=0.0,
        top_k=None,
        stop_tokens=jnp.asarray([stop, -1], jnp.int32),
    )
    forced = np.asarray(prompt + truth)
    state = _prefill(decoder, jnp.asarray(prompt), jnp.int32(4), jax.random.key(0))
    rounds = 0
    while not decoder.finished(state):
        drafts, state = _draft(decoder, state)
        at = int(state.count) + np.arange(num_depths)
        drafts = eqx.tree_at(lambda d: d.tokens, drafts, jnp.asarray(forced[at]))
        state = _verify(decoder, state, drafts)
        rounds += 1
    length = index + 1
    assert int(state.count) == len(prompt) + length
    new = np.asarray(decoder.new_tokens(state)).tolist()
    assert new == truth[:length] + [stop] * (max_new - length)
    assert int(decoder.new_length(state)) == length
    assert rounds == int(state.rounds) == -(-index // 4)
    last_kept = min(place, num_depths)
    expected = [rounds - 1 + (k <= last_kept) for k in range(1, num_depths + 1)]
    assert np.asarray(state.accepted).tolist() == expected


def test_sampled_rows_are_the_unstopped_rows_cut_at_their_first_stop():
    """Sampling with one key, with and without stop tokens, on 16 rows that stop at
    different rounds: each row with stops is the row without them up to its first
    stop token, then that token repeated (a round's randomness does not depend on the
    stops, so the rows agree before it). Catches, when sampling, tokens committed
    past an accepted stop draft."""
    # MLP depths: the cheapest sampling loop to compile, and often kept.
    model = _model(4, vocab_size=5, num_depths=2, mtp_block="mlp")
    prompts = jnp.asarray([[1, 3]] * 16, jnp.int32)
    arguments = dict(max_new_tokens=8, temperature=1.0, key=jax.random.key(2))
    free = np.asarray(eqx_mtp.generate(model, prompts, **arguments).tokens)
    out = eqx_mtp.generate(model, prompts, **arguments, stop_tokens=[4])
    expected, lengths = [], []
    for row in free.tolist():
        length = row.index(4) + 1 if 4 in row else len(row)
        expected.append(row[:length] + [row[length - 1]] * (len(row) - length))
        lengths.append(length)
    assert len(set(lengths)) > 3
    assert np.asarray(out.tokens).tolist() == expected
    assert np.asarray(out.lengths).tolist() == lengths


def test_another_stop_set_reuses_the_program_with_its_own_stops(monkeypatch):
    """Two sets of stop tokens (of up to 8 ids) after one another: one compiled
    program, each call stopping at its own tokens, with the weights compiled in (small
    models on a CPU; as arguments, the stop tokens are arguments with the decoder,
    as the weights are); no stop tokens (`None`, or an empty
    list) decode as before, to max_new_tokens. Catches stop tokens baked into the
    kept program, which would stop the second call at the first call's tokens."""
    monkeypatch.setattr(eqx_mtp._decode, "_COMPILED", {})
    model = _model(7, num_depths=2)
    prompt = [5, 2, 7]
    truth = naive_greedy(model, prompt, 10)
    stop_sets = ([truth[2]], [truth[7], 18])
    expected_lengths = [greedy_until_stop(model, prompt, 10, s)[1] for s in stop_sets]
    assert expected_lengths[0] != expected_lengths[1]
    for stops in stop_sets:
        expected = greedy_until_stop(model, prompt, 10, stops)
        out = eqx_mtp.generate(model, [prompt], max_new_tokens=10, stop_tokens=stops)
        assert np.asarray(out.tokens[0]).tolist() == expected[0]
        assert int(out.lengths[0]) == expected[1]
    assert len(eqx_mtp._decode._COMPILED) == 1
    for stops in ([], None):
        out = eqx_mtp.generate(model, [prompt], max_new_tokens=10, stop_tokens=stops)
        assert np.asarray(out.tokens[0]).tolist() == truth
        assert int(out.lengths[0]) == 10


def test_bad_stop_tokens():
    model = _model()
    cases = [
        (7, "stop_tokens must be a sequence of token ids"),
        ("2", "stop_tokens must be a sequence of token ids"),
        ([1.5], "stop_tokens must be a sequence of integer token ids"),
        ([True], "stop_tokens must be a sequence of integer token ids"),
        ([[1, 2]], "stop_tokens must be a sequence of integer token ids"),
        ([3, 19], r"stop_tokens must lie in \[0, 19\).*\[19\]"),
        ([-1], r"stop_tokens must lie in \[0, 19\)"),
    ]
    for stops, message in cases:
        with pytest.raises(ValueError, match=message):
            eqx_mtp.generate(model, [[1, 2]], max_new_tokens=3, stop_tokens=stops)
