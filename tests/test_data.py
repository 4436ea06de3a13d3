import collections
import json
import pathlib
import random
import sysconfig

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import eqx_mtp
from eqx_mtp.train import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DataError,
    TrainBatches,
    decode_bytes,
    encode_document,
    eval_batches,
    load_documents,
    pack_documents,
    split_documents,
)

documents_strategy = st.lists(st.binary(max_size=12), max_size=8)


def reference_pack(documents, seq_len):
    """Row-by-row packing in plain Python: (tokens, segment_ids, positions) rows."""
    rows = []
    row = []
    for document in documents:
        position = None
        for token in document:
            if len(row) == seq_len:
                rows.append(row)
                row = []
                position = None
            if position is None:
                segment = (row[-1][1] if row else 0) + 1
                position = 0
            row.append((token, segment, position))
            position += 1
    if row:
        rows.append(row + [(PAD_ID, 0, 0)] * (seq_len - len(row)))
    return {
        name: np.array([[entry[i] for entry in r] for r in rows], np.int32).reshape(
            len(rows), seq_len
        )
        for i, name in enumerate(["tokens", "segment_ids", "positions"])
    }


def reconstruct_documents(rows):
    """Byte documents read back from packed rows through segments and positions.

    A segment whose first token is BOS begins a document; any other segment must sit
    at the start of a row and continues the previous document.
    """
    documents = []
    for tokens, segments, positions in zip(
        rows["tokens"], rows["segment_ids"], rows["positions"]
    ):
        column = 0
        expected_segment = 1
        while column < len(tokens) and segments[column] != 0:
            assert segments[column] == expected_segment
            end = column
            while end < len(tokens) and segments[end] == segments[column]:
                end += 1
            assert list(positions[column:end]) == list(range(end - column))
            piece = [int(t) for t in tokens[column:end]]
            if piece[0] == BOS_ID:
                documents.append(piece)
            else:
                assert column == 0, "a continued document must start its row"
                documents[-1].extend(piece)
            column = end
            expected_segment += 1
        assert all(segments[column:] == 0)
        assert all(tokens[column:] == PAD_ID)
        assert all(positions[column:] == 0)
    for document in documents:
        assert document[0] == BOS_ID and document[-1] == EOS_ID
    return [bytes(document[1:-1]) for document in documents]


def rows_as_tuples(rows):
    return [
        tuple(map(tuple, entry))
        for entry in zip(rows["tokens"], rows["segment_ids"], rows["positions"])
    ]


# Tokenizer


@given(st.text(max_size=20))
def test_encode_decode_round_trip(text):
    ids = encode_document(text)
    raw = text.encode("utf-8")
    assert ids.dtype == np.int32
    assert ids.tolist() == [BOS_ID, *raw, EOS_ID]
    assert decode_bytes(ids) == text


def test_decode_drops_specials_and_replaces_invalid_utf8():
    ids = [BOS_ID, ord("a"), PAD_ID, 0xFF, EOS_ID, ord("b"), 300]
    assert decode_bytes(np.array(ids)) == "a\ufffdb"
    assert eqx_mtp.train.BYTE_VOCAB_SIZE == 259


# Packing


@given(documents_strategy, st.integers(1, 10))
def test_pack_documents_matches_reference(documents, seq_len):
    rows = pack_documents([encode_document(d) for d in documents], seq_len)
    expected = reference_pack([[BOS_ID, *d, EOS_ID] for d in documents], seq_len)
    num_tokens = sum(len(d) + 2 for d in documents)
    assert rows["tokens"].shape == (-(-num_tokens // seq_len), seq_len)
    for name in ("tokens", "segment_ids", "positions"):
        assert rows[name].dtype == np.int32
        np.testing.assert_array_equal(rows[name], expected[name])
    assert reconstruct_documents(rows) == documents
    # Padding only at the end of the stream: every row but the last is full.
    assert (rows["segment_ids"][:-1] != 0).all()


def test_pack_documents_skips_empty_arrays():
    arrays = [np.array([1, 2, 3]), np.array([], np.int32), np.array([4])]
    rows = pack_documents(arrays, 3)
    assert rows["tokens"].tolist() == [[1, 2, 3], [4, PAD_ID, PAD_ID]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(DataError, match="seq_len"):
        pack_documents(arrays, 0)


# Held-out split


@given(st.sets(st.binary(max_size=6), min_size=2, max_size=30), st.integers(0, 3))
def test_split_documents(document_set, seed):
    documents = sorted(document_set)
    train, held_out = split_documents(documents, eval_fraction=0.2, seed=seed)
    assert train and held_out
    assert set(train).isdisjoint(held_out)
    assert sorted(train + held_out) == documents
    assert len(held_out) == min(max(round(0.2 * len(documents)), 1), len(documents) - 1)
    shuffled = random.Random(seed).sample(documents, len(documents))
    train_again, held_out_again = split_documents(
        shuffled, eval_fraction=0.2, seed=seed
    )
    assert set(train_again) == set(train) and set(held_out_again) == set(held_out)
    # Each side keeps the input order.
    assert held_out_again == [d for d in shuffled if d in set(held_out)]


def test_split_documents_seed_and_duplicates():
    documents = [bytes([i]) for i in range(50)]
    splits = {
        frozenset(split_documents(documents, eval_fraction=0.2, seed=s)[1])
        for s in range(4)
    }
    assert len(splits) > 1
    doubled = documents + documents
    train, held_out = split_documents(doubled, eval_fraction=0.2)
    assert len(held_out) == 20 and set(train).isdisjoint(held_out)


@pytest.mark.parametrize(
    "documents, fraction, message",
    [
        ([b"a"], 0.5, "at least 2 distinct"),
        ([b"a", b"a"], 0.5, "at least 2 distinct"),
        ([b"a", b"b"], 0.0, "eval_fraction"),
        ([b"a", b"b"], 1.0, "eval_fraction"),
    ],
)
def test_split_documents_errors(documents, fraction, message):
    with pytest.raises(DataError, match=message):
        split_documents(documents, eval_fraction=fraction)


# Training batches

TRAIN_DOCUMENTS = [bytes(range(i, i + 3 + i % 7)) for i in range(20)]


def epoch_rows_of(batches, num_batches):
    stacked = [next(batches) for _ in range(num_batches)]
    for batch in stacked:
        assert set(batch) == {"tokens", "segment_ids", "positions"}
        for value in batch.values():
            assert value.shape == (batches.batch_size, batches.seq_len)
            assert value.dtype == np.int32
    return {k: np.concatenate([b[k] for b in stacked]) for k in stacked[0]}


def test_train_batches_epoch_covers_every_row_once():
    batches = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=4, seed=0)
    num_tokens = sum(len(d) + 2 for d in TRAIN_DOCUMENTS)
    assert batches.epoch_rows == -(-num_tokens // 8) == 20
    assert batches.batches_per_epoch == 5
    # The packed rows hold every document exactly once.
    reconstructed = reconstruct_documents(batches.rows)
    assert collections.Counter(reconstructed) == collections.Counter(TRAIN_DOCUMENTS)
    expected = sorted(rows_as_tuples(batches.rows))
    assert len(set(expected)) == 20
    first = rows_as_tuples(epoch_rows_of(batches, 5))
    second = rows_as_tuples(epoch_rows_of(batches, 5))
    assert sorted(first) == expected
    assert sorted(second) == expected
    assert first != second


def test_train_batches_drops_remainder_per_epoch():
    batches = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=6, seed=0)
    assert batches.batches_per_epoch == 3
    expected = set(rows_as_tuples(batches.rows))
    for _ in range(2):
        rows = rows_as_tuples(epoch_rows_of(batches, 3))
        assert len(set(rows)) == 18 and set(rows) <= expected


def test_train_batches_seeds():
    def row_order(seed):
        """Indices into the packed rows of the first two epochs' rows."""
        batches = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=4, seed=seed)
        index = {row: i for i, row in enumerate(rows_as_tuples(batches.rows))}
        rows = rows_as_tuples(epoch_rows_of(batches, 10))
        return [index[row] for row in rows], rows

    assert row_order(0) == row_order(0)
    assert row_order(0)[1] != row_order(1)[1]
    # grain shuffles epoch e with seed + e; seed 1's first epoch must not be seed 0's
    # second.
    assert row_order(0)[0][20:] != row_order(1)[0][:20]


@pytest.mark.parametrize("consumed", [0, 4, 5, 9])
def test_train_batches_state_round_trip(consumed):
    batches = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=4, seed=3)
    for _ in range(consumed):
        next(batches)
    state = json.loads(json.dumps(batches.get_state()))
    expected = [next(batches) for _ in range(8)]  # crosses an epoch boundary
    restored = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=4, seed=3)
    next(restored)
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(8)], strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_train_batches_errors():
    with pytest.raises(DataError, match=r"batch_size=21 .* 20 rows"):
        TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=21)
    state = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=4).get_state()
    other = TrainBatches(TRAIN_DOCUMENTS, seq_len=8, batch_size=4, seed=1)
    with pytest.raises(DataError, match="state saved for"):
        other.set_state(state)


# Evaluation batches


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_eval_batches(batch_size):
    documents = [b"held", b"out documents", b"", b"x" * 11]
    batches = eval_batches(documents, seq_len=6, batch_size=batch_size)
    expected = reference_pack([[BOS_ID, *d, EOS_ID] for d in documents], 6)
    num_rows = len(expected["tokens"])
    assert len(batches) == -(-num_rows // batch_size)
    for batch in batches:
        for value in batch.values():
            assert value.shape == (batch_size, 6) and value.dtype == np.int32
    for name in expected:
        stacked = np.concatenate([b[name] for b in batches])
        np.testing.assert_array_equal(stacked[:num_rows], expected[name])
        padding = PAD_ID if name == "tokens" else 0
        assert (stacked[num_rows:] == padding).all()
    with pytest.raises(DataError, match="at least one document"):
        eval_batches([], seq_len=6, batch_size=2)


# Corpus loading


@pytest.fixture(scope="module")
def default_documents():
    return load_documents(None)


def test_default_corpus(default_documents):
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        str(p)
        for p in stdlib.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    )
    expected = [d for d in (pathlib.Path(p).read_bytes() for p in paths) if d]
    assert len(default_documents) == len(expected) > 100
    assert default_documents == expected
    assert (stdlib / "json" / "__init__.py").read_bytes() in default_documents
    site_packages = stdlib / "site-packages" / "six.py"
    if site_packages.exists():
        assert site_packages.read_bytes() not in default_documents


def test_load_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_bytes(b"second")
    (tmp_path / "a.md").write_bytes("first \u00e9".encode())
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "third, whole"}\n')
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\xff\xfe")
    (tmp_path / ".hidden").write_bytes(b"hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref")
    assert load_documents(tmp_path) == [
        "first \u00e9".encode(),
        b"second",
        b'{"text": "third, whole"}\n',
    ]


def test_load_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\n\none\ntwo\n\n  \t\nthree\r\n\r\nfour\n\n")
    assert load_documents(str(path)) == [b"one\ntwo", b"three\r", b"four"]


def test_load_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [{"text": "caf\u00e9", "id": 1}, {"text": "second"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_documents(path) == ["caf\u00e9".encode(), b"second"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "no such file or directory"),
        ("empty_dir", "dir", "empty corpus"),
        ("empty.txt", "\n \n", "empty corpus"),
        ("empty.jsonl", "", "empty corpus"),
        ("bad.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n', "line 3: .*string 'text'"),
        ("bad_type.jsonl", '{"text": 5}\n', "line 1: .*string 'text'"),
        ("list.jsonl", "[1, 2]\n", "line 1: .*string 'text'"),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', "line 2: expected a JSON"),
        ("corpus.csv", "a,b\n", "unsupported corpus file"),
    ],
)
def test_load_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_documents(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
