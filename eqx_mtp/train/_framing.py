"""How a tokenizer frames what it encodes: documents, prompt/completion pairs and
prompts, the same for every tokenizer on top of its plain encoding of texts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ._corpus import PromptCompletion, TokenIds


@dataclasses.dataclass(frozen=True)
class Framing:
    """How a tokenizer frames a document: `bos_id` before it (`None`: nothing),
    `eos_id` after it; `stop_ids` end a generated row (`eos_id` first)."""

    bos_id: int | None
    eos_id: int
    stop_ids: tuple[int, ...]


def _arrays(ids, mask=None, token_bytes=None) -> dict[str, np.ndarray]:
    arrays = {"tokens": np.asarray(ids, np.int32)}
    if mask is not None:
        arrays["loss_mask"] = np.asarray(mask, bool)
    if token_bytes is not None:
        arrays["token_bytes"] = np.asarray(token_bytes, np.int32)
    return arrays


class Framed:
    """Framing shared by every tokenizer, on top of `pieces` (the unframed ids of
    texts and, when asked, the UTF-8 bytes each id covers).

    A subclass sets `framing`, `pad_id` (the filler of a packed row's tail) and
    `delimiter_bytes` (what BOS and EOS count in bits per byte).
    """

    framing: Framing
    pad_id: int
    delimiter_bytes: int

    def pieces(
        self, texts: list[bytes], with_bytes: bool
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """`(ids, token_bytes or None)` of each text (UTF-8 bytes, kept as they are
        where the tokenizer reads bytes), without framing."""
        raise NotImplementedError

    def _frame(self, body: np.ndarray, marker: int | None = None) -> np.ndarray:
        """`body` between the framing's BOS (if any) and EOS, or between two
        `marker`s in their places."""
        bos, eos = self.framing.bos_id, self.framing.eos_id
        if marker is not None:
            bos, eos = (None if bos is None else marker), marker
        head = np.asarray([] if bos is None else [bos], np.int32)
        return np.concatenate([head, np.asarray(body, np.int32), [np.int32(eos)]])

    def _framed_bytes(self, token_bytes: np.ndarray | None) -> np.ndarray | None:
        if token_bytes is None:
            return None
        return self._frame(token_bytes, self.delimiter_bytes)

    def encode_documents(
        self, documents: Sequence[bytes], *, with_bytes: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """Each document's token ids, framed: BOS (when the tokenizer adds one), the
        text's ids, EOS.

        **Arguments:**

        - `documents`: from [`eqx_mtp.train.load_documents`][], of one kind: text
            (UTF-8 bytes), [`eqx_mtp.train.PromptCompletion`][] pairs (the prompt's
            ids, then the completion's, each encoded alone) or
            [`eqx_mtp.train.TokenIds`][] (kept as they are, unframed).
        - `with_bytes`: also give each token's `token_bytes`, the UTF-8 bytes of the
            text it covers, for bits per byte (not for token ids).

        **Returns:**

        One dict per document of equally long arrays: int32 `tokens`; for pairs, a
        boolean `loss_mask` that holds on the completion's ids and EOS only (no
        prompt token is a target); with `with_bytes`, int32 `token_bytes`.
        """
        if documents and isinstance(documents[0], TokenIds):
            return [_arrays(d.ids()) for d in documents]
        if documents and isinstance(documents[0], PromptCompletion):
            return self._encode_pairs(documents, with_bytes)
        texts = [bytes(d) for d in documents]
        return [
            _arrays(self._frame(ids), None, self._framed_bytes(token_bytes))
            for ids, token_bytes in self.pieces(texts, with_bytes)
        ]

    def _encode_pairs(self, pairs, with_bytes: bool) -> list[dict[str, np.ndarray]]:
        texts = [text.encode("utf-8") for pair in pairs for text in pair.parts()]
        pieces = self.pieces(texts, with_bytes)
        framed = []
        for (prompt, prompt_bytes), (completion, completion_bytes) in zip(
            pieces[0::2], pieces[1::2]
        ):
            ids = self._frame(np.concatenate([prompt, completion]))
            mask = np.zeros(ids.shape, bool)
            mask[ids.size - completion.size - 1 :] = True  # the completion and EOS
            token_bytes = None
            if with_bytes:
                token_bytes = self._framed_bytes(
                    np.concatenate([prompt_bytes, completion_bytes])
                )
            framed.append(_arrays(ids, mask, token_bytes))
        return framed

    def encode_prompt(self, text: str) -> np.ndarray:
        """The int32 ids of a prompt to continue: BOS (when the tokenizer adds one)
        and the text's ids, no EOS."""
        ((ids, _),) = self.pieces([text.encode("utf-8")], False)
        return self._frame(ids)[:-1]
