"""A Hugging Face tokenizer (a `tokenizer.json`, read by the `tokenizers` package)
with the framing its configuration files give."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ._corpus import DataError
from ._framing import Framed, Framing

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
"""A checkpoint directory's tokenizer files: what a run keeps and an export copies."""
_TOKENIZER_CONFIG = "tokenizer_config.json"
_GENERATION_CONFIG = "generation_config.json"
_MODEL_CONFIG = "config.json"
_PROBE = "a"


class TokenizerError(DataError):
    """A tokenizer that cannot be read, or whose configuration does not say how to
    frame a document."""


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer(Framed):
    """A Hugging Face tokenizer and how it frames documents; build it with
    [`eqx_mtp.train.TextTokenizer.load`][].

    **Fields:**

    - `tokenizer`: the `tokenizers.Tokenizer`.
    - `framing`: BOS (when the tokenizer adds one to a text), EOS and the ids that
        end generation.
    - `vocab_size`: one more than the largest id the tokenizer knows.
    - `files`: the files it was read from (`tokenizer.json` and the configuration
        files beside it), which a run keeps and an export copies.
    """

    tokenizer: Any
    framing: Framing
    vocab_size: int
    files: tuple[pathlib.Path, ...]
    pad_id: int = 0
    delimiter_bytes: int = 0

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Read a tokenizer and its framing.

        **Arguments:**

        - `path`: a `tokenizer.json`, or a directory holding one (a Hugging Face
            checkpoint). The configuration files beside it say how a document is
            framed:
            - BOS: `tokenizer_config.json`'s `bos_token` where its `add_bos_token`
                is true; without `add_bos_token`, whatever token the tokenizer
                itself adds before a text (`tokenizer.json`'s post-processor), if
                any.
            - EOS, appended to every document: `tokenizer_config.json`'s
                `eos_token`, else the first `eos_token_id` of `config.json`, else of
                `generation_config.json`.
            - Generation stops at EOS and at every `eos_token_id` of
                `generation_config.json` and `config.json`.

        **Returns:**

        The `TextTokenizer`.

        **Raises:**

        `TokenizerError` naming the file: no such path, not a `tokenizer.json`, a
        configuration that names a token the tokenizer lacks or no EOS at all.
        """
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            what = (
                f"{path} holds no {TOKENIZER_FILE}"
                if path.is_dir()
                else (f"{path}: no such file or directory")
            )
            raise TokenizerError(
                f"{what}; expected a {TOKENIZER_FILE} file or a directory holding one"
            )
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # noqa: BLE001 - the library raises bare Exception
            raise TokenizerError(
                f"{file} is not a Hugging Face {TOKENIZER_FILE}: {error}"
            ) from None
        directory = file.parent
        settings = {
            name: _read_json(directory / name)
            for name in (_TOKENIZER_CONFIG, _GENERATION_CONFIG, _MODEL_CONFIG)
        }
        vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        framing = _framing(tokenizer, settings, directory, vocab_size)
        files = [file] + [
            directory / name
            for name in TOKENIZER_FILES[1:]
            if (directory / name).is_file()
        ]
        return cls(tokenizer, framing, vocab_size, tuple(files))

    def pieces(self, texts, with_bytes):
        texts = [text.decode("utf-8", errors="replace") for text in texts]
        if not with_bytes:
            encodings = self.tokenizer.encode_batch_fast(
                texts, add_special_tokens=False
            )
            return [(np.asarray(e.ids, np.int32), None) for e in encodings]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [
            (np.asarray(e.ids, np.int32), _covered_bytes(text, e.offsets))
            for text, e in zip(texts, encodings)
        ]

    def decode(self, ids: ArrayLike) -> str:
        """The text of `ids`, special tokens (BOS, EOS, padding) left out."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        """The framing and where the tokenizer came from, as a run's `config.json`
        states it."""
        return (
            {"tokenizer": str(self.files[0]), "vocab_size": self.vocab_size}
            | dataclasses.asdict(self.framing)
            | {"stop_ids": list(self.framing.stop_ids)}
        )

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Copy the tokenizer's files into `directory` (made if absent), the
        tokenizer itself as `tokenizer.json`; returns the names written."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = []
        for index, source in enumerate(self.files):
            name = TOKENIZER_FILE if index == 0 else source.name
            shutil.copyfile(source, directory / name)
            names.append(name)
        return names


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path}: cannot read: {error}") from None
    if not isinstance(values, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return values


def _covered_bytes(text: str, offsets) -> np.ndarray:
    """The UTF-8 bytes of `text` each token newly covers: the byte offset of its end
    less the furthest end before it, so that a character split over several tokens
    counts once and the tokens' bytes sum to the text's."""
    code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    widths = (
        1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    )
    byte_end = np.concatenate([[0], np.cumsum(widths)])
    ends = np.asarray([end for _, end in offsets], np.int64).reshape(-1)
    reached = np.maximum.accumulate(byte_end[ends]) if ends.size else ends
    return np.diff(reached, prepend=0).astype(np.int32)


def _token_id(tokenizer, token: Any, where: str) -> int | None:
    """The id of a `bos_token`/`eos_token` entry (a string, or a dict with a
    `content` string), `None` when absent."""
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    index = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if index is None:
        raise TokenizerError(f"{where}: {token!r} is not a token of the tokenizer")
    return index


def _ids(value: Any, where: str, vocab_size: int) -> list[int]:
    """A `bos_token_id`/`eos_token_id` entry (an id, a list of ids or null)."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    for index in values:
        if not (isinstance(index, int) and 0 <= index < vocab_size):
            raise TokenizerError(
                f"{where}: {index!r} is not an id of the tokenizer's vocabulary of "
                f"{vocab_size}"
            )
    return values


def _added_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text."""
    plain = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    framed = tokenizer.encode(_PROBE, add_special_tokens=True).ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def _framing(tokenizer, settings: dict, directory: pathlib.Path, vocab_size: int):
    config, generation, model = (
        settings[_TOKENIZER_CONFIG],
        settings[_GENERATION_CONFIG],
        settings[_MODEL_CONFIG],
    )
    where = {name: str(directory / name) for name in settings}
    before, _ = _added_around(tokenizer)
    named_bos = _token_id(
        tokenizer, config.get("bos_token"), f"{where[_TOKENIZER_CONFIG]}: bos_token"
    )
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        if len(before) > 1:
            raise TokenizerError(
                f"{directory / TOKENIZER_FILE}: its post-processor puts {len(before)} "
                "tokens before a text; expected at most one (BOS)"
            )
        bos_id = before[0] if before else None
    elif add_bos is True:
        if named_bos is None:
            raise TokenizerError(
                f"{where[_TOKENIZER_CONFIG]}: add_bos_token is true but no "
                "bos_token is named"
            )
        bos_id = named_bos
    elif add_bos is False:
        bos_id = None
    else:
        raise TokenizerError(
            f"{where[_TOKENIZER_CONFIG]}: add_bos_token must be true or false, got "
            f"{add_bos!r}"
        )
    model_eos = _ids(
        model.get("eos_token_id"), f"{where[_MODEL_CONFIG]}: eos_token_id", vocab_size
    )
    generation_eos = _ids(
        generation.get("eos_token_id"),
        f"{where[_GENERATION_CONFIG]}: eos_token_id",
        vocab_size,
    )
    named_eos = _token_id(
        tokenizer, config.get("eos_token"), f"{where[_TOKENIZER_CONFIG]}: eos_token"
    )
    candidates = ([named_eos] if named_eos is not None else []) + model_eos
    candidates += generation_eos
    if not candidates:
        raise TokenizerError(
            f"{directory}: no end-of-sequence token; expected an eos_token in "
            f"{_TOKENIZER_CONFIG} or an eos_token_id in {_MODEL_CONFIG} or "
            f"{_GENERATION_CONFIG}"
        )
    eos_id = candidates[0]
    stops = tuple(dict.fromkeys([eos_id, *generation_eos, *model_eos]))
    return Framing(bos_id=bos_id, eos_id=eos_id, stop_ids=stops)
