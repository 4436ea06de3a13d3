"""`eqx-mtp generate`: text from a trained run, with self-speculative decoding."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import numpy as np

from .._decode import generate
from ._checkpoint import CheckpointError, load_checkpoint
from ._config import UserError
from ._data import BYTE_VOCAB_SIZE, EOS_ID, decode_bytes, encode_document
from ._run_directory import newest_run_with_a_checkpoint


@dataclasses.dataclass
class GenerateConfig:
    """What `eqx-mtp generate` takes: the run directory (`None`: the newest run
    under `runs/` that holds a checkpoint), the prompt text and how to decode it (see
    [`eqx_mtp.generate`][])."""

    run: str | None
    prompt: str
    max_new_tokens: int = 200
    speculative: bool = True
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    step: int | None = None


def generate_text(config: GenerateConfig) -> tuple[str, list[str]]:
    """`(text, statistics lines)`: the prompt's continuation, decoded until the
    end-of-document token (which ends the row) or `max_new_tokens`, and one line per
    statistic, counting the tokens up to and including the end.

    **Raises:**

    `UserError` for bad input: no checkpoint in the run, an empty prompt, a negative
    count, a prompt that fills the model's `max_seq_len`, a prompt and count beyond
    it.
    """
    if not config.prompt:
        raise UserError("--prompt: must not be empty")
    if config.max_new_tokens < 1:
        raise UserError(
            f"--max-new-tokens: must be a positive integer, got {config.max_new_tokens}"
        )
    if not math.isfinite(config.temperature) or config.temperature < 0:
        raise UserError(
            f"--temperature: must be a finite number >= 0, got {config.temperature}"
        )
    if config.top_k is not None and config.top_k < 1:
        raise UserError(f"--top-k: must be a positive integer, got {config.top_k}")
    run = config.run
    if run is None:
        run = newest_run_with_a_checkpoint("--run")
    if not pathlib.Path(run).exists():
        raise UserError(f"--run: no such directory: {run}")
    try:
        model, _ = load_checkpoint(run, step=config.step)
    except CheckpointError as error:
        raise UserError(f"--run: {error}") from None
    if model.config.vocab_size != BYTE_VOCAB_SIZE:
        raise UserError(
            f"--run: the model reads a tokenizer of {model.config.vocab_size} ids "
            "(a run from --init-from), not bytes; call eqx_mtp.generate with that "
            "tokenizer's ids"
        )
    prompt = encode_document(config.prompt)[:-1]  # BOS and the bytes, no EOS
    longest = model.config.max_seq_len
    if prompt.shape[0] >= longest:
        raise UserError(
            f"--prompt: {prompt.shape[0]} tokens with BOS leave no room for a new "
            f"token in the model's max_seq_len {longest}"
        )
    if prompt.shape[0] + config.max_new_tokens > longest:
        raise UserError(
            f"--max-new-tokens: the prompt ({prompt.shape[0]} tokens with BOS) plus "
            f"{config.max_new_tokens} new tokens exceeds the model's max_seq_len "
            f"{longest}"
        )
    out = generate(
        model,
        prompt[None, :],
        max_new_tokens=config.max_new_tokens,
        speculative=config.speculative,
        temperature=config.temperature,
        top_k=config.top_k,
        stop_tokens=[EOS_ID],
        key=jax.random.key(config.seed),
    )
    length = int(out.lengths[0])
    tokens = np.asarray(out.tokens[0])[:length]
    ended = bool(length) and tokens[-1] == EOS_ID
    text = decode_bytes(tokens[:-1] if ended else tokens)
    mode = "speculative" if out.accepted.shape[1] else "plain"
    lines = [
        f"decoding: {mode}, {length} new tokens"
        + (" (stopped at the end of the document)" if ended else ""),
        f"tokens per trunk forward: {out.tokens_per_forward:.2f}",
        f"tokens/s: {out.tokens_per_second:,.1f} (compile {out.compile_seconds:.1f} s "
        "apart)",
    ]
    if out.accepted.shape[1]:
        rates = " ".join(f"{rate:.2f}" for rate in out.acceptance)
        lines.insert(2, f"acceptance per depth: {rates}")
    return text, lines
