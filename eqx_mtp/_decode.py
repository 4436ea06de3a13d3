"""[`eqx_mtp.generate`][]: decoding with a KV cache, plain or self-speculative (the
MTP depths draft the next tokens and one trunk pass verifies them; see
[`eqx_mtp.Decoder`][] for a round).

Every row of a batch holds one prompt (one document), left-aligned; rows run in step
inside one compiled `jax.lax.while_loop` until each has its new tokens or has ended at
a stop token. Greedy speculative output is the plain greedy output; sampled output
follows the trunk's distribution exactly (Leviathan et al. 2023; Chen et al. 2023).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from ._decoder import Decoder, depth_layer, layer_attends
from ._model import MTPModel


class Generation(eqx.Module):
    """What [`eqx_mtp.generate`][] returns.

    - `tokens`: `[batch, max_new_tokens]` generated token ids; a row that ended at a
        stop token holds that token from there to its end.
    - `lengths`: `[batch]` tokens each row generated: up to and including its stop
        token, else `max_new_tokens`.
    - `rounds`: `[batch]` trunk passes after the prompt's (one per round).
    - `accepted`: `[batch, num_depths]`: in how many rounds the drafts of depths
        `1 … k` were all kept (the sequential acceptance of depth `k` is
        `accepted[:, k-1] / rounds`); zero columns when not speculative.
    - `seconds`: wall time of the decoding, compilation excluded.
    - `compile_seconds`: wall time of compiling it and of its first run, which
        pays once for what the backend prepares lazily (zero when an earlier call
        with the same shapes and options, and on a CPU the same model object, had
        compiled it).
    """

    tokens: Int[Array, "batch new"]
    lengths: Int[Array, " batch"]
    rounds: Int[Array, " batch"]
    accepted: Int[Array, "batch depths"]
    seconds: float = eqx.field(static=True)
    compile_seconds: float = eqx.field(static=True)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per trunk pass of a row, the prompt's pass included (it gives
        the first new token), over the batch: `1.0` for plain decoding. (The batch's
        wall time follows its slowest row.)"""
        passes = int(jnp.sum(self.rounds)) + self.rounds.shape[0]
        return float(self._generated / passes)

    @property
    def _generated(self) -> int:
        return int(jnp.sum(self.lengths))

    @property
    def acceptance(self) -> list[float]:
        """Per depth `k`: the share of rounds whose drafts `1 … k` were all kept."""
        rounds = max(int(jnp.sum(self.rounds)), 1)
        return [float(x) / rounds for x in np.asarray(jnp.sum(self.accepted, axis=0))]

    @property
    def tokens_per_second(self) -> float:
        """New tokens of the whole batch per second of wall time."""
        return self._generated / self.seconds if self.seconds > 0 else float("inf")


def loop_rows(batch: int) -> Callable[[Callable], Callable]:
    """How a function of one row's state maps over the loop's state: `jax.vmap`
    over the rows, except that a single row's state is carried without a batch
    axis (adding and removing one every round would make XLA copy the caches)."""
    return (lambda fn: fn) if batch == 1 else jax.vmap


def loop_inputs(prompts, lengths, keys) -> tuple:
    """The prompts, lengths and keys as `loop_rows` maps over them."""
    if prompts.shape[0] == 1:
        return prompts[0], lengths[0], keys[0]
    return prompts, lengths, keys


def _generate_rows(
    decoder: Decoder,
    prompts: Int[Array, "batch prompt"],
    lengths: Int[Array, " batch"],
    keys: Array,
) -> tuple[Array, Array, Array, Array]:
    """The compiled loop over a batch of rows: `(new tokens, lengths, rounds,
    accepted)`."""
    batch = prompts.shape[0]
    rows = loop_rows(batch)
    state = rows(decoder.prefill)(*loop_inputs(prompts, lengths, keys))
    state = jax.lax.while_loop(
        lambda state: ~jnp.all(rows(decoder.finished)(state)),
        lambda state: rows(decoder.round)(state),
        state,
    )
    out = (
        rows(decoder.new_tokens)(state),
        rows(decoder.new_length)(state),
        state.rounds,
        state.accepted[..., : decoder.num_drafts],
    )
    return out if batch > 1 else jax.tree.map(lambda x: x[None], out)


_generate_jit = eqx.filter_jit(_generate_rows)
_COMPILED: dict = {}
_COMPILED_KEPT = 8
# On a CPU, weights up to this size are compiled into the decoding program (a
# larger model would take long to compile and be held twice).
CONSTANT_WEIGHTS_BYTES = 64 * 2**20


def _leaf_signature(leaf) -> Any:
    if eqx.is_array(leaf):
        return leaf.shape, str(leaf.dtype)
    try:
        hash(leaf)
    except TypeError:
        return id(leaf)
    return leaf


def _weights_as_constants(model: MTPModel) -> bool:
    """Whether to compile the model's weights into the decoding program: on a CPU,
    when they are small. XLA:CPU then lays them out for its matrix kernels once,
    when compiling, instead of in every product of the loop: a verify pass's
    products of `D + 1` rows cost 5x less (a 3 x 192 by 192 x 512 product: ~40 us
    with the weights an argument, ~8 us a constant)."""
    if jax.default_backend() != "cpu":
        return False
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    return sum(leaf.nbytes for leaf in leaves) <= CONSTANT_WEIGHTS_BYTES


def _compiled(decoder: Decoder, inputs: tuple) -> Callable:
    """The decoding loop compiled ahead of time for these shapes and options (the
    decoder's static fields) and run once, as `run(decoder, *inputs)`; kept for the
    next call with the same, so that `generate` times compilation apart. With the
    weights compiled in, the program is kept for this model object (and holds
    it)."""
    constants = _weights_as_constants(decoder.model)
    leaves, structure = jax.tree_util.tree_flatten((decoder, *inputs))
    signature = (
        structure,
        tuple(_leaf_signature(x) for x in leaves),
        id(decoder.model) if constants else None,
    )
    if signature not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_KEPT:
            _COMPILED.pop(next(iter(_COMPILED)))
        if constants:
            # The stop tokens stay an argument: another set of them reuses the program.
            def decode(stop_tokens, *inputs):
                stopping = dataclasses.replace(decoder, stop_tokens=stop_tokens)
                return _generate_rows(stopping, *inputs)

            program = jax.jit(decode).lower(decoder.stop_tokens, *inputs).compile()

            def run(decoder, *inputs, program=program, model=decoder.model):
                return program(decoder.stop_tokens, *inputs)
        else:
            run = _generate_jit.lower(decoder, *inputs).compile()
        # The first run of a program pays once for what XLA:CPU prepares lazily
        # (its kernels' weight layouts, buffers): up to half the time of a short
        # generation. It is part of compiling, not of decoding.
        jax.block_until_ready(run(decoder, *inputs))
        _COMPILED[signature] = run
    return _COMPILED[signature]


def _is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_prompts(prompt_tokens, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """A `[batch, prompt]` int32 array and `[batch]` lengths from an array or from a
    list of token lists of different lengths."""
    if isinstance(prompt_tokens, Sequence) and not isinstance(prompt_tokens, str):
        rows = [np.asarray(row) for row in prompt_tokens]
        if any(row.ndim != 1 for row in rows) or not rows:
            raise ValueError(
                "generate: prompt_tokens must be a [batch, prompt] array or a "
                "non-empty list of 1-D token lists"
            )
        if prompt_lengths is not None:
            raise ValueError(
                "generate: prompt_lengths is taken from the lists; pass it only with "
                "an array"
            )
        for row in rows:
            if row.size and not np.issubdtype(row.dtype, np.integer):
                raise ValueError(
                    "generate: prompt_tokens must be integer token ids, got "
                    f"{row.dtype}"
                )
        lengths = np.array([row.shape[0] for row in rows], np.int64)
        width = int(lengths.max())
        prompts = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            prompts[i, : row.shape[0]] = row
    else:
        prompts = np.asarray(prompt_tokens)
        if prompts.ndim != 2:
            raise ValueError(
                "generate: prompt_tokens must be a [batch, prompt] array, got shape "
                f"{prompts.shape}"
            )
        lengths = (
            np.full((prompts.shape[0],), prompts.shape[1], np.int64)
            if prompt_lengths is None
            else np.asarray(prompt_lengths)
        )
        if lengths.shape != (prompts.shape[0],) or not np.issubdtype(
            lengths.dtype, np.integer
        ):
            raise ValueError(
                f"generate: prompt_lengths must be ({prompts.shape[0]},) integers, got "
                f"shape {lengths.shape} of {lengths.dtype}"
            )
    if not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(
            f"generate: prompt_tokens must be integer token ids, got {prompts.dtype}"
        )
    return prompts, lengths


def _as_stop_tokens(stop_tokens, vocab_size: int) -> np.ndarray | None:
    """The stop tokens as an int32 array padded with `-1` to a multiple of 8 (a
    few more stop tokens compile no new program), or `None` when there are none."""
    if stop_tokens is None:
        return None
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(
        stop_tokens, (Sequence, np.ndarray, jax.Array)
    ):
        raise ValueError(
            "generate: stop_tokens must be a sequence of token ids (e.g. [eos_id]), "
            f"got {stop_tokens!r}"
        )
    values = list(np.asarray(stop_tokens).reshape(-1)) if np.ndim(stop_tokens) else []
    if np.ndim(stop_tokens) != 1 or not all(map(_is_integer, values)):
        raise ValueError(
            "generate: stop_tokens must be a sequence of integer token ids, got "
            f"{stop_tokens!r}"
        )
    if not values:
        return None
    outside = [int(x) for x in values if not 0 <= x < vocab_size]
    if outside:
        raise ValueError(
            f"generate: stop_tokens must lie in [0, {vocab_size}), the model's "
            f"vocabulary; got {outside}"
        )
    padded = np.full((-(-len(values) // 8) * 8,), -1, np.int32)
    padded[: len(values)] = values
    return padded


def generate(
    model: MTPModel,
    prompt_tokens: Any,
    *,
    max_new_tokens: int,
    prompt_lengths: Any = None,
    speculative: bool = True,
    temperature: float | int = 0.0,
    top_k: int | None = None,
    key: PRNGKeyArray | None = None,
    stop_tokens: Any = None,
) -> Generation:
    """Generate `max_new_tokens` tokens after each prompt, with a KV cache, and with
    the model's MTP depths drafting when `speculative`.

    Greedy output (`temperature=0`) is the trunk's greedy output, speculative or not;
    sampled output follows the trunk's distribution (softmax of logits / temperature,
    restricted to the `top_k` most likely tokens) exactly, speculative or not.

    **Arguments:**

    - `model`: an [`eqx_mtp.MTPModel`][] (e.g. from
        [`eqx_mtp.train.load_checkpoint`][]).
    - `prompt_tokens`: `[batch, prompt]` token ids, left-aligned, or a list of token
        lists of different lengths. Each prompt is one document.
    - `max_new_tokens`: tokens to generate per prompt, `>= 1`; with the longest
        prompt at most `model.config.max_seq_len`.
    - `prompt_lengths`: `[batch]` lengths of the prompts in an array (default: all of
        its columns), each `>= 1`.
    - `speculative`: draft with the depths (a model without depths decodes plainly).
    - `temperature`: `0` for greedy decoding, `> 0` to sample.
    - `top_k`: sample among the `top_k` most likely tokens only.
    - `key`: PRNG key, required when sampling.
    - `stop_tokens`: token ids that end a row (e.g. the tokenizer's end of
        sequence): a row that generates one stops there, the stop token included,
        and speculative decoding commits no draft after it. `None` or empty: every
        row generates `max_new_tokens`.

    **Returns:**

    A [`eqx_mtp.Generation`][]: the tokens and the decoding statistics.

    The compiled loop is kept for the next call with the same shapes and options.
    On a CPU, a model of up to 64 MiB of weights is compiled into it (XLA:CPU then
    prepares the weights for its matrix kernels once, not in every round), so the
    program is kept for that model object and holds it.
    """
    if not isinstance(model, MTPModel):
        raise TypeError(
            f"generate: model must be an eqx_mtp.MTPModel, got {type(model)}"
        )
    config = model.config
    prompts, lengths = _as_prompts(prompt_tokens, prompt_lengths)
    if not _is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(
            "generate: max_new_tokens must be a positive integer, got "
            f"{max_new_tokens!r}"
        )
    if prompts.shape[0] == 0 or prompts.shape[1] == 0 or np.any(lengths < 1):
        raise ValueError("generate: every prompt must hold at least one token")
    if np.any(lengths > prompts.shape[1]):
        raise ValueError(
            f"generate: prompt_lengths must be at most the prompt width "
            f"{prompts.shape[1]}, got {lengths.max()}"
        )
    read = np.arange(prompts.shape[1])[None, :] < lengths[:, None]
    if np.any(((prompts < 0) | (prompts >= config.vocab_size)) & read):
        raise ValueError(
            f"generate: prompt_tokens must lie in [0, {config.vocab_size}), the "
            "model's vocabulary"
        )
    longest = int(lengths.max()) + max_new_tokens
    if longest > config.max_seq_len:
        raise ValueError(
            f"generate: the longest prompt ({int(lengths.max())} tokens) plus "
            f"max_new_tokens ({max_new_tokens}) is {longest}, beyond the model's "
            f"max_seq_len {config.max_seq_len}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.floating, np.integer))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(
            f"generate: temperature must be a finite number >= 0, got {temperature!r}"
        )
    if top_k is not None and (not _is_integer(top_k) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive integer, got {top_k!r}")
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a key")
    stops = _as_stop_tokens(stop_tokens, config.vocab_size)
    num_drafts = config.num_depths if speculative and model.depths is not None else 0
    if num_drafts:
        layer_attends(depth_layer(model))
    keys = jax.random.split(
        key if key is not None else jax.random.key(0), prompts.shape[0]
    )
    decoder = Decoder(
        model,
        max_new_tokens=int(max_new_tokens),
        num_drafts=num_drafts,
        length=Decoder.cache_length(prompts.shape[1], int(max_new_tokens), num_drafts),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        stop_tokens=None if stops is None else jnp.asarray(stops),
    )
    inputs = (jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32), keys)
    start = time.perf_counter()
    compiled = _compiled(decoder, inputs)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens, lengths, rounds, accepted = jax.block_until_ready(
        compiled(decoder, *inputs)
    )
    seconds = time.perf_counter() - start
    return Generation(
        tokens=tokens,
        lengths=lengths,
        rounds=rounds,
        accepted=accepted,
        seconds=seconds,
        compile_seconds=compile_seconds,
    )
