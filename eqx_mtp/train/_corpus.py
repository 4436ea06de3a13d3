"""Reading a corpus: a directory, a `.txt` or a `.jsonl` file, or the standard
library's `.py` files, as a list of documents."""

from __future__ import annotations

import json
import os
import sysconfig
from typing import Any

import numpy as np
from jaxtyping import Int
from numpy.typing import ArrayLike

# Directories of the default corpus that hold installed packages, not the stdlib.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages"})


class DataError(ValueError):
    """A corpus, split or batching request that cannot be served."""


class TokenIds(bytes):
    """A document given as token ids of a foreign tokenizer (a `.jsonl` line's
    `tokens` field), held as little-endian int32 bytes so that it hashes, splits and
    orders like a text document. It is packed as it is: no `BOS_ID`/`EOS_ID` framing,
    and padding takes id 0 (masked by segment id 0).

    `TokenIds.of(ids)` builds one; `.ids()` gives the int32 array back.
    """

    @classmethod
    def of(cls, ids: ArrayLike) -> TokenIds:
        return cls(np.asarray(ids, "<i4").tobytes())

    def ids(self) -> Int[np.ndarray, " length"]:
        return np.frombuffer(self, "<i4").astype(np.int32)


class PromptCompletion(bytes):
    """A document given as a prompt and its completion (a `.jsonl` line's `prompt`
    and `completion` fields, as TRL's SFT datasets hold them): it trains on the
    completion only. Held as the UTF-8 JSON of `[prompt, completion]`, so that it
    hashes, splits and orders like a text document, and two pairs that join to the same
    text but split it elsewhere differ.

    `PromptCompletion.of(prompt, completion)` builds one; `.parts()` gives the two
    strings back.
    """

    @classmethod
    def of(cls, prompt: str, completion: str) -> PromptCompletion:
        return cls(json.dumps([prompt, completion], ensure_ascii=False).encode("utf-8"))

    def parts(self) -> tuple[str, str]:
        prompt, completion = json.loads(self.decode("utf-8"))
        return prompt, completion


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _walk_files(root: str, *, skip_dirs: frozenset[str], skip_hidden: bool):
    """Sorted paths of the regular files below `root`, symlinked dirs not followed."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in skip_dirs and not (skip_hidden and d.startswith("."))
        ]
        for name in filenames:
            if skip_hidden and name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                paths.append(path)
    return sorted(paths)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _default_documents() -> list[bytes]:
    root = sysconfig.get_paths()["stdlib"]
    paths = _walk_files(root, skip_dirs=_NOT_STDLIB, skip_hidden=False)
    documents = [_read_bytes(p) for p in paths if p.endswith(".py")]
    return [d for d in documents if d]


def _directory_documents(root: str) -> list[bytes]:
    paths = _walk_files(root, skip_dirs=frozenset(), skip_hidden=True)
    documents = (_read_bytes(p) for p in paths)
    return [d for d in documents if d and _is_utf8(d)]


def _txt_documents(path: str) -> list[bytes]:
    documents = []
    lines: list[bytes] = []
    for line in _read_bytes(path).split(b"\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            documents.append(b"\n".join(lines))
            lines = []
    if lines:
        documents.append(b"\n".join(lines))
    return documents


def _jsonl_documents(path: str) -> list[bytes]:
    documents = []
    kinds = set()
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: expected a JSON object ({e})") from None
            kind, document = _jsonl_document(record, where)
            kinds.add(kind)
            if len(kinds) > 1:
                raise DataError(
                    f"{where}: mixes {' and '.join(sorted(kinds))} documents; a "
                    "corpus is of one kind"
                )
            documents.append(document)
    return [d for d in documents if d]


def _jsonl_document(record: Any, where: str) -> tuple[str, bytes]:
    """`(kind, document)` of one `.jsonl` line: `'tokens'`, `'prompt/completion'` or
    `'text'`."""
    if isinstance(record, dict) and "tokens" in record:
        return "tokens", _token_document(record["tokens"], where)
    if isinstance(record, dict) and ("prompt" in record or "completion" in record):
        prompt, completion = record.get("prompt"), record.get("completion")
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise DataError(
                f"{where}: expected string 'prompt' and 'completion' fields (TRL's "
                "prompt-completion format; conversational messages are not read)"
            )
        if not completion:
            return "prompt/completion", b""  # nothing to train on
        return "prompt/completion", PromptCompletion.of(prompt, completion)
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(
            f"{where}: expected a JSON object with a string 'text' field, string "
            "'prompt' and 'completion' fields, or a 'tokens' list of token ids"
        )
    return "text", text.encode("utf-8", errors="replace")


def _token_document(tokens: Any, where: str) -> TokenIds:
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
        for t in tokens
    ):
        raise DataError(
            f"{where}: 'tokens' must be a list of non-negative integer token ids"
        )
    return TokenIds.of(tokens)


def load_documents(path: str | os.PathLike | None = None) -> list[bytes]:
    """Raw documents of a corpus, in a deterministic order.

    **Arguments:**

    - `path`: where the corpus lives.
        - `None`: the default corpus, every `.py` file of the running Python's
            standard library (`sysconfig.get_paths()["stdlib"]`, recursively, without
            `site-packages`/`dist-packages`), one document per file.
        - a directory: one document per regular file below it, recursively. Hidden
            files and directories (names starting with `.`) are skipped, and so are
            files that are not valid UTF-8: they are binaries, not text, whatever
            their name says.
        - a `.txt` file: documents separated by blank lines (lines holding only
            whitespace). Each document is its run of non-blank lines joined by `\\n`,
            without the final newline.
        - a `.jsonl` file: one document per line, the line's string `text` field
            encoded as UTF-8; or its string `prompt` and `completion` fields, which
            train on the completion only (each such document a
            [`eqx_mtp.train.PromptCompletion`][]; a line with an empty completion
            is dropped); or its `tokens` field, a list of token ids of the model's
            tokenizer (each such document a [`eqx_mtp.train.TokenIds`][]). A file
            holds one kind. Blank lines are skipped.

    Files are read as bytes and kept byte for byte (apart from the `.txt` separators);
    empty documents are dropped. Directory walks follow sorted paths.

    **Returns:**

    The documents as a list of `bytes`, never empty.

    **Raises:**

    `DataError` when the path is missing or of an unsupported kind, a `.jsonl` line is
    not an object of one of the kinds above (or the file mixes kinds), or no
    non-empty document is found.
    """
    if path is None:
        where = f"the standard library at {sysconfig.get_paths()['stdlib']}"
        documents = _default_documents()
    else:
        path = os.fspath(path)
        where = path
        if os.path.isdir(path):
            documents = _directory_documents(path)
        elif not os.path.exists(path):
            raise DataError(
                f"{path}: no such file or directory; expected a directory, a .txt "
                "file or a .jsonl file"
            )
        elif path.endswith(".txt"):
            documents = _txt_documents(path)
        elif path.endswith(".jsonl"):
            documents = _jsonl_documents(path)
        else:
            raise DataError(
                f"{path}: unsupported corpus file; expected a directory, a .txt file "
                "or a .jsonl file"
            )
    if not documents:
        raise DataError(
            f"{where}: empty corpus; expected at least one non-empty document"
        )
    return documents
