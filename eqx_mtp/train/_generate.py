"""`eqx-mtp generate`: text from a trained run, with self-speculative decoding."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np

from .._decode import Generation, generate
from ._checkpoint import CheckpointError, load_checkpoint
from ._config import UserError
from ._framing import Framed
from ._run_directory import newest_run_with_a_checkpoint, run_tokenizer
from ._text_tokenizer import TextTokenizer, TokenizerError


@dataclasses.dataclass
class GenerateConfig:
    """What `eqx-mtp generate` takes: the run directory (`None`: the newest run
    under `runs/` that holds a checkpoint), the prompts (`--prompt`, in order, then
    those of the `--prompts` file), the tokenizer (`None`: the run's own), whether a
    prompt too long for the model is cut from the left, and how to decode them (see
    [`eqx_mtp.generate`][])."""

    run: str | None
    prompts: list[str] | None = None
    prompts_file: str | None = None
    tokenizer: str | None = None
    truncate_prompt: bool = False
    max_new_tokens: int = 200
    speculative: bool = True
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    step: int | None = None


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    """What `eqx-mtp generate` prints: each prompt's continuation (`texts`, in the
    prompts' order), the batch's statistics (one line each), and `notes` on what was
    done to the input (a prompt cut to fit), for standard error."""

    texts: list[str]
    statistics: list[str]
    notes: list[str]


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """A prompt's text and how an error names it (`--prompt 2`, or the file and
    line it came from)."""

    label: str
    text: str


def generate_text(config: GenerateConfig) -> GeneratedText:
    """Continue every prompt, as one batch: each encoded with the run's tokenizer
    (or `config.tokenizer`), decoded until one of the tokenizer's stop ids (which
    ends the row) or `max_new_tokens`, and the tokens decoded to text.

    **Arguments:**

    - `config`: a `GenerateConfig`.

    **Returns:**

    A `GeneratedText`; its statistics count each row's tokens up to and including
    its stop id.

    **Raises:**

    `UserError` for bad input: no prompt, an empty prompt, a prompts file that does
    not read or holds none, no checkpoint in the run, no tokenizer for a run on
    token ids, a negative count, a prompt too long for the model's `max_seq_len`
    without `truncate_prompt`.
    """
    _check_options(config)
    prompts = _collect_prompts(config)
    run = config.run
    if run is None:
        run = newest_run_with_a_checkpoint("--run")
    run = pathlib.Path(run)
    if not run.exists():
        raise UserError(f"--run: no such directory: {run}")
    try:
        model, stored = load_checkpoint(run, step=config.step)
    except CheckpointError as error:
        raise UserError(f"--run: {error}") from None
    tokenizer = _tokenizer(config, run, model.config.vocab_size, stored)
    rows, notes = _encode(prompts, tokenizer, config, model.config)
    # A stop id beyond the model's vocabulary (a --tokenizer larger than the run's)
    # is one the model never generates.
    stops = [i for i in tokenizer.framing.stop_ids if i < model.config.vocab_size]
    out = generate(
        model,
        rows,
        max_new_tokens=config.max_new_tokens,
        speculative=config.speculative,
        temperature=config.temperature,
        top_k=config.top_k,
        stop_tokens=stops,
        key=jax.random.key(config.seed),
    )
    texts, ended = [], []
    for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
        tokens = row[:length]
        stop = int(tokens[-1]) if length and int(tokens[-1]) in stops else None
        texts.append(tokenizer.decode(tokens if stop is None else tokens[:-1]))
        ended.append(stop)
    return GeneratedText(texts, _statistics(out, ended, tokenizer), notes)


def _check_options(config: GenerateConfig) -> None:
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


def _collect_prompts(config: GenerateConfig) -> list[_Prompt]:
    """The `--prompt`s in order, then the `--prompts` file's, each non-empty."""
    given = list(config.prompts or [])
    prompts = [
        _Prompt("--prompt" if len(given) == 1 else f"--prompt {i}", text)
        for i, text in enumerate(given, 1)
    ]
    if config.prompts_file is not None:
        prompts += _read_prompts_file(pathlib.Path(config.prompts_file))
    if not prompts:
        raise UserError(
            "--prompt: no prompt given; pass --prompt TEXT (repeatable) or "
            "--prompts FILE"
        )
    for prompt in prompts:
        if not prompt.text:
            raise UserError(f"{prompt.label}: must not be empty")
    return prompts


def _read_prompts_file(path: pathlib.Path) -> list[_Prompt]:
    """A `.jsonl` file's `prompt` fields, or any other file's lines; blank lines
    are skipped."""
    if not path.is_file():
        raise UserError(f"--prompts: no such file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--prompts: cannot read {path}: {error}") from None
    jsonl = path.suffix == ".jsonl"
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label = f"--prompts {path} line {number}"
        if not jsonl:
            prompts.append(_Prompt(label, line))
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(f"{label}: not JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f"{label}: expected an object with a 'prompt' string")
        prompts.append(_Prompt(label, record["prompt"]))
    if not prompts:
        raise UserError(
            f"--prompts: {path} holds no prompt (blank lines are skipped); expected "
            "one prompt per line, or a .jsonl file of objects with a 'prompt' string"
        )
    return prompts


def _tokenizer(
    config: GenerateConfig, run: pathlib.Path, vocab_size: int, stored: dict
) -> Framed:
    """`--tokenizer` if given, else the tokenizer the run trained with."""
    if config.tokenizer is not None:
        try:
            return TextTokenizer.load(config.tokenizer)
        except TokenizerError as error:
            raise UserError(f"--tokenizer: {error}") from None
    try:
        tokenizer = run_tokenizer(run, vocab_size)
    except TokenizerError as error:
        raise UserError(f"--run: the run's tokenizer does not read: {error}") from None
    if tokenizer is None:
        init_from = ((stored or {}).get("train") or {}).get("init_from")
        example = f", e.g. its --init-from checkpoint {init_from}" if init_from else ""
        raise UserError(
            f"--run: {run} was trained on token ids and keeps no tokenizer to encode "
            "the prompt and decode the text; pass --tokenizer PATH (a tokenizer.json "
            f"or a directory holding one{example})"
        )
    return tokenizer


def _encode(
    prompts: list[_Prompt], tokenizer: Framed, config: GenerateConfig, model_config
) -> tuple[list[np.ndarray], list[str]]:
    """Each prompt's ids, each leaving room for `max_new_tokens` in the model's
    `max_seq_len` (cut from the left, BOS kept, with `truncate_prompt`); and a note
    per prompt cut."""
    longest, new = model_config.max_seq_len, config.max_new_tokens
    head = int(tokenizer.framing.bos_id is not None)
    with_bos = " with BOS" if head else ""
    encoded = []
    for prompt in prompts:
        ids = np.asarray(tokenizer.encode_prompt(prompt.text), np.int32)
        if ids.size <= head:
            raise UserError(f"{prompt.label}: the tokenizer encodes it to no tokens")
        outside = ids[(ids < 0) | (ids >= model_config.vocab_size)]
        if outside.size:
            raise UserError(
                f"{prompt.label}: encodes to id {int(outside[0])}, outside the "
                f"model's vocabulary of {model_config.vocab_size}; is the tokenizer "
                "the run's?"
            )
        if ids.size >= longest and not config.truncate_prompt:
            raise UserError(
                f"{prompt.label}: {ids.size} tokens{with_bos} leave no room for a "
                f"new token in the model's max_seq_len {longest}; shorten it or "
                "pass --truncate-prompt to cut it from the left"
            )
        encoded.append(ids)
    if head + new >= longest:
        raise UserError(
            f"--max-new-tokens: {new} new tokens leave no room for a prompt in the "
            f"model's max_seq_len {longest}"
        )
    rows, notes = [], []
    for prompt, ids in zip(prompts, encoded):
        if ids.size + new > longest and not config.truncate_prompt:
            raise UserError(
                f"{prompt.label}: {ids.size} tokens{with_bos} plus --max-new-tokens "
                f"{new} exceeds the model's max_seq_len {longest}; shorten it, lower "
                "--max-new-tokens or pass --truncate-prompt to cut it from the left"
            )
        if ids.size + new > longest:
            keep = longest - new
            notes.append(
                f"{prompt.label}: cut from {ids.size} to {keep} tokens{with_bos} "
                f"(the oldest {ids.size - keep} dropped) to leave room for "
                f"--max-new-tokens {new} in the model's max_seq_len {longest}"
            )
            # The newest text tokens stay; BOS, when the tokenizer adds one, stays
            # first, as every document the model trained on began with it.
            ids = np.concatenate([ids[:head], ids[ids.size - (keep - head) :]])
        rows.append(ids)
    return rows, notes


def _statistics(out: Generation, ended: list[int | None], tokenizer: Framed):
    """The lines that describe the batch's decoding."""
    mode = "speculative" if out.accepted.shape[1] else "plain"
    lengths = [int(n) for n in np.asarray(out.lengths)]
    if len(lengths) == 1:
        (stop,) = ended
        head = f"decoding: {mode}, {lengths[0]} new tokens"
        if stop == tokenizer.framing.eos_id:
            head += " (stopped at the end of the document)"
        elif stop is not None:
            head += f" (stopped at stop token {stop})"
    else:
        stopped = sum(stop is not None for stop in ended)
        head = f"decoding: {mode}, {len(lengths)} prompts, {sum(lengths)} new tokens"
        if stopped:
            head += f" ({stopped} of the rows stopped at a stop token)"
    lines = [
        head,
        f"tokens per trunk forward: {out.tokens_per_forward:.2f}",
        f"tokens/s: {out.tokens_per_second:,.1f} (compile {out.compile_seconds:.1f} s "
        "apart)",
    ]
    if out.accepted.shape[1]:
        rates = " ".join(f"{rate:.2f}" for rate in out.acceptance)
        lines.insert(2, f"acceptance per depth: {rates}")
    return lines
