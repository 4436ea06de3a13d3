"""The default job's tokenizer: one id per UTF-8 byte, and three special ids."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jaxtyping import Int
from numpy.typing import ArrayLike

from ._corpus import DataError
from ._framing import Framed, Framing

PAD_ID = 256
"""The byte tokenizer's padding id: the filler of a packed row's tail (segment id 0,
which carries no loss)."""
BOS_ID = 257
"""The byte tokenizer's beginning-of-document id; a prompt to
[`eqx_mtp.generate`][] starts with it, as the documents it was trained on do."""
EOS_ID = 258
"""The byte tokenizer's end-of-document id; `eqx-mtp generate` cuts its continuation
at the first one."""
BYTE_VOCAB_SIZE = 259
"""The byte tokenizer's vocabulary: the 256 bytes, then `PAD_ID`, `BOS_ID`,
`EOS_ID`."""


def encode_document(text: bytes | str) -> Int[np.ndarray, " length"]:
    """Byte-level token ids of one document, framed by `BOS_ID` and `EOS_ID`.

    **Arguments:**

    - `text`: the document; a `str` is encoded as UTF-8 first.

    **Returns:**

    An int32 array `[BOS_ID, byte_0, ..., byte_{n-1}, EOS_ID]` of length `n + 2`.
    """
    if isinstance(text, str):
        text = text.encode("utf-8")
    return ByteTokenizer().encode_documents([text])[0]["tokens"]


def decode_bytes(ids: ArrayLike) -> str:
    """Text of a sequence of byte-level token ids.

    **Arguments:**

    - `ids`: a one-dimensional sequence of token ids. Ids outside `[0, 256)` (the
        special tokens, or ids of a vocabulary padded beyond `BYTE_VOCAB_SIZE`) are
        dropped.

    **Returns:**

    The remaining bytes decoded as UTF-8, invalid sequences replaced by U+FFFD.
    """
    array = np.asarray(ids)
    if array.ndim != 1:
        raise DataError(
            f"decode_bytes expects a 1-D sequence of ids, got shape {array.shape}"
        )
    array = array.astype(np.int64)
    byte_ids = array[(array >= 0) & (array < 256)].astype(np.uint8)
    return byte_ids.tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class ByteTokenizer(Framed):
    """The default job's tokenizer: one id per UTF-8 byte, documents framed by
    `BOS_ID` and `EOS_ID` (as [`eqx_mtp.train.encode_document`][] frames them); each
    id counts as one byte in bits per byte, the delimiters included."""

    framing: Framing = Framing(BOS_ID, EOS_ID, (EOS_ID,))
    pad_id: int = PAD_ID
    delimiter_bytes: int = 1
    vocab_size: int = BYTE_VOCAB_SIZE

    def pieces(self, texts, with_bytes):
        pieces = []
        for text in texts:
            ids = np.frombuffer(text, np.uint8).astype(np.int32)
            pieces.append((ids, np.ones_like(ids) if with_bytes else None))
        return pieces

    def decode(self, ids: ArrayLike) -> str:
        """The text of byte-level ids (see [`eqx_mtp.train.decode_bytes`][])."""
        return decode_bytes(np.asarray(ids).reshape(-1))

    def describe(self) -> dict[str, Any]:
        """The framing, as a run's `config.json` states it."""
        return {"tokenizer": "bytes", "vocab_size": self.vocab_size} | (
            dataclasses.asdict(self.framing)
        )
