"""Data: held-out split, packing and grain batches of encoded documents (reading a
corpus is `_corpus.py`'s, encoding a tokenizer's)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from jaxtyping import Int

from ._byte_tokenizer import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    ByteTokenizer,
    decode_bytes,
    encode_document,
)
from ._corpus import DataError, PromptCompletion, TokenIds, load_documents
from ._framing import Framed

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "PAD_ID",
    "ByteTokenizer",
    "DataError",
    "PromptCompletion",
    "TokenIds",
    "decode_bytes",
    "encode_document",
    "load_documents",
]

_PACKED_KEYS = ("tokens", "segment_ids", "positions")
# What a tokenizer may give besides the ids, laid out like them; their filler.
_PARALLEL_KEYS = {"loss_mask": False, "token_bytes": 0}


def is_token_corpus(documents: Sequence[bytes]) -> bool:
    """Whether `documents` are token ids (`TokenIds`) rather than text."""
    return bool(documents) and isinstance(documents[0], TokenIds)


def max_token_id(documents: Sequence[bytes]) -> int:
    """The largest id in a corpus: a token id, or `EOS_ID` for text."""
    if not is_token_corpus(documents):
        return EOS_ID
    return max(int(d.ids().max()) for d in documents)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise DataError(f"seed must be an integer in [0, 2**64), got {seed}")


def _seeded_digest(seed: int, purpose: bytes, data: bytes) -> bytes:
    """A stable hash of `data`, keyed by `seed` and `purpose`."""
    hasher = hashlib.blake2b(digest_size=16, person=purpose)
    hasher.update(seed.to_bytes(8, "little"))
    hasher.update(data)
    return hasher.digest()


def split_documents(
    documents: Sequence[bytes], *, eval_fraction: float = 0.01, seed: int = 0
) -> tuple[list[bytes], list[bytes]]:
    """Split documents into a training set and a held-out set.

    Distinct documents are ranked by a hash of their bytes keyed by `seed`; the first
    `round(eval_fraction * num_distinct)` of them (clipped to at least one, and to
    leave at least one for training) are held out. The split is deterministic, does
    not depend on the order of `documents`, and copies of the same document always
    land on the same side, so nothing held out is also trained on.

    **Arguments:**

    - `documents`: raw documents, e.g. from `load_documents`.
    - `eval_fraction`: the fraction of distinct documents held out, in `(0, 1)`.
    - `seed`: a non-negative integer choosing the split.

    **Returns:**

    `(train, held_out)`: two non-empty lists of documents, each in input order.

    **Raises:**

    `DataError` when there are fewer than two distinct documents or `eval_fraction`
    is not in `(0, 1)`.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    _check_seed(seed)
    distinct = set(documents)
    if len(distinct) < 2:
        raise DataError(
            "split_documents needs at least 2 distinct documents to hold some out, "
            f"got {len(distinct)} distinct among {len(documents)}"
        )
    ranked = sorted(distinct, key=lambda d: (_seeded_digest(seed, b"split", d), d))
    num_held_out = min(max(round(eval_fraction * len(ranked)), 1), len(ranked) - 1)
    held_out_set = set(ranked[:num_held_out])
    train = [d for d in documents if d not in held_out_set]
    held_out = [d for d in documents if d in held_out_set]
    return train, held_out


def pack_documents(
    token_arrays: Sequence[Int[np.ndarray, " _"]],
    seq_len: int,
    *,
    pad_id: int = PAD_ID,
) -> dict[str, Int[np.ndarray, "rows seq"]]:
    """Pack token sequences into rows of a fixed length.

    The sequences are concatenated as one stream, in the given order, and cut into
    rows of `seq_len`. A sequence that crosses a row boundary continues at the start
    of the next row as a new segment. Every token appears exactly once.

    **Arguments:**

    - `token_arrays`: one-dimensional token id arrays, e.g. from `encode_document`.
    - `seq_len`: the row length, positive.
    - `pad_id`: the token id of padding.

    **Returns:**

    A dict of int32 `[rows, seq_len]` arrays, `rows = ceil(num_tokens / seq_len)`:

    - `tokens`: the token ids, `pad_id` after the end of the stream.
    - `segment_ids`: `1, 2, 3, ...` for the pieces of sequences within each row, `0`
        for padding.
    - `positions`: the offset of each token from the start of its segment (restarting
        at `0` in every row), `0` for padding.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    arrays = [np.asarray(a, np.int32).reshape(-1) for a in token_arrays]
    arrays = [a for a in arrays if a.size]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    num_tokens = int(lengths.sum())
    num_rows = -(-num_tokens // seq_len)
    packed = {k: np.zeros(num_rows * seq_len, np.int32) for k in _PACKED_KEYS}
    packed["tokens"][:] = pad_id
    if num_tokens:
        # Token g of the stream belongs to document d(g) and row g // seq_len; its
        # segment starts at the later of the document's start and the row's start,
        # and its segment id counts the documents begun in the row up to it.
        index_dtype = np.int32 if num_tokens < 2**31 else np.int64
        document = np.repeat(np.arange(len(arrays), dtype=index_dtype), lengths)
        stream_index = np.arange(num_tokens, dtype=index_dtype)
        document_start = (np.cumsum(lengths) - lengths).astype(index_dtype)[document]
        row_start = stream_index - stream_index % seq_len
        first_document_of_row = document[row_start]
        packed["tokens"][:num_tokens] = np.concatenate(arrays)
        packed["segment_ids"][:num_tokens] = document - first_document_of_row + 1
        packed["positions"][:num_tokens] = stream_index - np.maximum(
            document_start, row_start
        )
    return {k: v.reshape(num_rows, seq_len) for k, v in packed.items()}


def _pad_id(documents: Sequence[bytes], tokenizer: Framed) -> int:
    return 0 if is_token_corpus(documents) else tokenizer.pad_id


def _pack(
    documents: Sequence[bytes],
    seq_len: int,
    tokenizer: Framed | None,
    *,
    with_bytes: bool = False,
) -> dict[str, np.ndarray]:
    """Documents encoded and framed by `tokenizer` (default: bytes), token documents
    as they are, packed; a pair's `loss_mask` and, `with_bytes`, each token's
    `token_bytes` laid out like the tokens."""
    tokenizer = tokenizer or ByteTokenizer()
    encoded = tokenizer.encode_documents(documents, with_bytes=with_bytes)
    packed = pack_documents(
        [e["tokens"] for e in encoded], seq_len, pad_id=_pad_id(documents, tokenizer)
    )
    shape = packed["tokens"].shape
    for key, fill in _PARALLEL_KEYS.items():
        if encoded and key in encoded[0]:
            stream = np.concatenate([e[key] for e in encoded])
            laid_out = np.full(shape[0] * shape[1], fill, stream.dtype)
            laid_out[: stream.size] = stream
            packed[key] = laid_out.reshape(shape)
    return packed


class TrainBatches(Iterator[dict[str, np.ndarray]]):
    """An endless, checkpointable stream of shuffled training batches.

    The documents are put in an order chosen by `seed`, packed with `pack_documents`,
    and the rows served by a `grain.MapDataset` that shuffles them afresh every epoch
    (deterministically from `seed`). Each epoch yields `epoch_rows // batch_size`
    batches of distinct rows; the `epoch_rows % batch_size` rows left over change from
    epoch to epoch.

    Iterate it (`next(batches)`) for dicts of int32 `[batch_size, seq_len]` arrays
    `tokens`, `segment_ids` and `positions` (see `pack_documents`), and for
    prompt/completion pairs the boolean `loss_mask` (which tokens may be targets).
    `get_state()` and `set_state(state)` save and restore the position in the
    stream.
    """

    seq_len: int
    batch_size: int
    seed: int
    rows: dict[str, np.ndarray]
    epoch_rows: int
    batches_per_epoch: int

    def __init__(
        self,
        documents: Sequence[bytes],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rows: Sequence[int] | None = None,
        columns: slice | None = None,
        tokenizer: Framed | None = None,
    ):
        """**Arguments:**

        - `documents`: the raw training documents.
        - `seq_len`: the row length, positive.
        - `batch_size`: rows per batch, positive and at most the number of packed rows.
        - `seed`: a non-negative integer choosing the document order and the shuffles.
        - `rows`: which rows of every batch to materialise, as indices into
            `range(batch_size)`; default all. A process of a multi-process run reads
            only its share of each global batch this way; the stream, and so
            `get_state()`, is the same in every process.
        - `columns`: which part of the sequence axis to materialise; default all.
        - `tokenizer`: what encodes and frames text documents: an
            [`eqx_mtp.train.TextTokenizer`][], or `None` for bytes
            ([`eqx_mtp.train.encode_document`][]).

        **Raises:**

        `DataError` when there are fewer packed rows than `batch_size`.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        _check_seed(seed)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        order = sorted(
            range(len(documents)),
            key=lambda i: _seeded_digest(seed, b"order", documents[i]),
        )
        self.rows = _pack([documents[i] for i in order], seq_len, tokenizer)
        self.epoch_rows = len(self.rows["tokens"])
        if self.epoch_rows < batch_size:
            raise DataError(
                f"batch_size={batch_size} is more than the {self.epoch_rows} rows of "
                f"seq_len={seq_len} that the training documents pack into"
            )
        self.batches_per_epoch = self.epoch_rows // batch_size
        # grain seeds epoch e's shuffle with `seed + e`, so seeds s and s + 1 would
        # share shuffles one epoch apart; hashing the seed decorrelates them.
        shuffle_seed = int.from_bytes(
            _seeded_digest(seed, b"shuffle", b"")[:4], "little"
        )
        packed = self.rows
        selected = np.arange(batch_size) if rows is None else np.asarray(rows)
        if selected.ndim != 1 or np.any((selected < 0) | (selected >= batch_size)):
            raise DataError(
                f"rows must be indices into range(batch_size={batch_size}), got "
                f"{selected.tolist()}"
            )
        columns = slice(None) if columns is None else columns

        def materialise(index):
            index = index[selected]
            return {k: v[index, columns] for k, v in packed.items()}

        dataset = (
            grain.MapDataset.range(self.epoch_rows)
            .shuffle(seed=shuffle_seed)
            # Batching before `repeat` keeps batches inside an epoch.
            .batch(batch_size, drop_remainder=True)
            .map(materialise)
            .repeat()
        )
        # The rows are in memory: reading threads would only contend for the GIL.
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = iter(dataset.to_iter_dataset(read_options))

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def _config(self) -> dict[str, int]:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch_rows": self.epoch_rows,
        }

    def get_state(self) -> dict[str, Any]:
        """The position in the stream, as a JSON-serialisable dict.

        **Returns:**

        A dict for `set_state` of an instance built with the same arguments.
        """
        return {"config": self._config(), "iterator": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `get_state`.

        **Arguments:**

        - `state`: a dict from `get_state`, possibly through a JSON round trip.

        **Raises:**

        `DataError` when the state was saved by an instance built differently.
        """
        if state.get("config") != self._config():
            raise DataError(
                f"state saved for {state.get('config')} cannot restore batches for "
                f"{self._config()}"
            )
        self._iterator.set_state(state["iterator"])


def eval_batches(
    documents: Sequence[bytes],
    *,
    seq_len: int,
    batch_size: int,
    tokenizer: Framed | None = None,
) -> list[dict[str, Int[np.ndarray, "batch seq"]]]:
    """Every held-out document, packed in order and cut into full batches.

    **Arguments:**

    - `documents`: the raw held-out documents, at least one.
    - `seq_len`: the row length, positive.
    - `batch_size`: rows per batch, positive.
    - `tokenizer`: as for [`eqx_mtp.train.TrainBatches`][].

    **Returns:**

    A list of dicts of int32 `[batch_size, seq_len]` arrays `tokens`, `segment_ids`
    and `positions` (see `pack_documents`); for text, `token_bytes` (the UTF-8 bytes
    each token covers, for bits per byte); for prompt/completion pairs, the boolean
    `loss_mask`. The last batch is completed with padding rows (the tokenizer's pad
    id, or 0 for token documents; segment `0`, position `0`), which carry no loss.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if not documents:
        raise DataError("eval_batches needs at least one document, got none")
    rows = _pack(documents, seq_len, tokenizer, with_bytes=True)
    num_rows = len(rows["tokens"])
    num_padding_rows = -num_rows % batch_size
    pad_id = _pad_id(documents, tokenizer or ByteTokenizer())
    fillers = {"tokens": pad_id, "segment_ids": 0, "positions": 0} | _PARALLEL_KEYS
    padded = {
        k: np.concatenate(
            [v, np.full((num_padding_rows, seq_len), fillers[k], v.dtype)]
        )
        for k, v in rows.items()
    }
    return [
        {k: v[start : start + batch_size] for k, v in padded.items()}
        for start in range(0, num_rows + num_padding_rows, batch_size)
    ]
