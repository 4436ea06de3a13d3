"""Text through a Hugging Face tokenizer: framing read from the configuration files,
the bytes each token covers, prompt/completion pairs, and the packing of what they
give. The references call the `tokenizers` package directly and count in plain
Python loops."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from text_fixtures import BOS, EOS, write_bpe_tokenizer
from tokenizers import Tokenizer

import eqx_mtp
from eqx_mtp.train import (
    BOS_ID,
    EOS_ID,
    ByteTokenizer,
    PromptCompletion,
    TextTokenizer,
    TokenizerError,
    TrainBatches,
    eval_batches,
)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, 日本語 text — with ümlauts",
    "def f(x):\n    return x * 2  # code",
] * 4
DOCUMENTS = [t.encode() for t in TEXTS[:3]]


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory):
    """Qwen2.5's framing: no BOS, EOS `<|endoftext|>`; generation also stops at
    `<|im_end|>`."""
    root = tmp_path_factory.mktemp("qwen_tok")
    generation = {"eos_token_id": [0, 2]}
    return write_bpe_tokenizer(root, TEXTS, generation=generation)


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """Llama's framing: the post-processor adds `<s>` before every text."""
    return write_bpe_tokenizer(tmp_path_factory.mktemp("llama_tok"), TEXTS, bos=True)


def _plain_ids(directory, text):
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_documents_are_framed_as_the_configuration_says(qwen_style, llama_style):
    """Catches: a BOS added where the tokenizer adds none (Qwen) or left out where
    it adds one (Llama); EOS missing or taken from the wrong file; special tokens
    added twice (encoding with the post-processor and framing again)."""
    qwen = TextTokenizer.load(qwen_style)
    assert (qwen.framing.bos_id, qwen.framing.eos_id) == (None, 0)
    assert qwen.framing.stop_ids == (0, 2)
    for text, arrays in zip(TEXTS, qwen.encode_documents(DOCUMENTS)):
        assert arrays["tokens"].tolist() == _plain_ids(qwen_style, text) + [0]

    llama = TextTokenizer.load(llama_style / "tokenizer.json")
    assert (llama.framing.bos_id, llama.framing.eos_id) == (1, 0)
    assert llama.framing.stop_ids == (0,)
    for text, arrays in zip(TEXTS, llama.encode_documents(DOCUMENTS)):
        assert arrays["tokens"].tolist() == [1] + _plain_ids(llama_style, text) + [0]
    assert llama.encode_prompt(TEXTS[0]).tolist() == [1] + _plain_ids(
        llama_style, TEXTS[0]
    )
    assert llama.decode(llama.encode_documents(DOCUMENTS)[1]["tokens"]) == TEXTS[1]
    assert llama.vocab_size == len(
        json.loads((llama_style / "tokenizer.json").read_text())["model"]["vocab"]
    )


def test_the_tokenizer_config_overrides_the_post_processor(tmp_path):
    """Catches: `add_bos_token: false` ignored when the post-processor adds BOS;
    `eos_token` of the tokenizer config not preferred to config.json's id."""
    directory = write_bpe_tokenizer(
        tmp_path / "t",
        TEXTS,
        bos=True,
        config={"bos_token": BOS, "add_bos_token": False, "eos_token": "<|im_end|>"},
    )
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    framing = TextTokenizer.load(directory).framing
    assert (framing.bos_id, framing.eos_id, framing.stop_ids) == (None, 2, (2, 0))


def test_each_token_covers_the_bytes_of_its_text(qwen_style):
    """Catches: characters split over several byte-level tokens counted once per
    token (the sum then exceeds the text's bytes), or bytes read off character
    offsets (the sum falls short for non-ASCII text); BOS/EOS counted as bytes."""
    qwen = TextTokenizer.load(qwen_style)
    tokenizer = Tokenizer.from_file(str(qwen_style / "tokenizer.json"))
    for text, arrays in zip(TEXTS, qwen.encode_documents(DOCUMENTS, with_bytes=True)):
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        expected, reached = [], 0
        for _, end in offsets:
            covered = len(text[:end].encode())
            expected.append(max(covered - reached, 0))
            reached = max(reached, covered)
        assert arrays["token_bytes"].tolist() == expected + [0]
        assert arrays["token_bytes"].sum() == len(text.encode())


def test_pairs_train_on_the_completion_only(llama_style):
    """Catches: the mask shifted by one (the last prompt token, or BOS, made a
    target; EOS left out); the pair tokenized as one text (ids at the seam merged);
    a depth counting a prompt token as its target."""
    llama = TextTokenizer.load(llama_style)
    pairs = [PromptCompletion.of(TEXTS[i][:11], TEXTS[i][11:]) for i in range(3)] + [
        PromptCompletion.of("", "only a completion")
    ]
    encoded = llama.encode_documents(pairs)
    for pair, arrays in zip(pairs, encoded):
        prompt, completion = pair.parts()
        prompt_ids = _plain_ids(llama_style, prompt)
        completion_ids = _plain_ids(llama_style, completion)
        assert arrays["tokens"].tolist() == [1, *prompt_ids, *completion_ids, 0]
        expected = [False] * (1 + len(prompt_ids)) + [True] * (len(completion_ids) + 1)
        assert arrays["loss_mask"].tolist() == expected

    # Per-depth target counts of the packed rows against a loop over the documents
    # (one row long enough that no document is cut).
    total = sum(a["tokens"].size for a in encoded)
    (batch,) = eval_batches(pairs, seq_len=total, batch_size=1, tokenizer=llama)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    counts = eqx_mtp.valid_token_counts(
        batch["tokens"],
        3,
        segment_ids=batch["segment_ids"],
        loss_mask=batch["loss_mask"],
    )
    for k in range(4):
        expected = sum(
            sum(1 for j in range(k + 1, a["tokens"].size) if a["loss_mask"][j])
            for a in encoded
        )
        assert int(counts[k]) == expected, k

    # Training batches carry the mask too: an epoch of rows holds every completion
    # token once, and no prompt token.
    batches = TrainBatches(pairs, seq_len=5, batch_size=1, tokenizer=llama)
    rows = [next(batches) for _ in range(batches.batches_per_epoch)]
    masked = sorted(int(t) for r in rows for t in r["tokens"][r["loss_mask"]])
    assert masked == sorted(
        int(t) for a in encoded for t in a["tokens"][a["loss_mask"]]
    )


def test_packed_tokenized_documents_never_target_the_next_one(qwen_style):
    """Catches: a tokenized document packed without its segment boundary, so that
    its last tokens predict the next document's first ones."""
    qwen = TextTokenizer.load(qwen_style)
    documents = [t.encode() for t in TEXTS]
    encoded = qwen.encode_documents(documents)
    owner = np.concatenate(
        [np.full(a["tokens"].size, i) for i, a in enumerate(encoded)]
    )
    seq_len = 7
    batches = eval_batches(documents, seq_len=seq_len, batch_size=2, tokenizer=qwen)
    stream = 0
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        for row in range(2):
            for k in range(3):
                _, valid = eqx_mtp.depth_targets(
                    batch["tokens"][row : row + 1],
                    k,
                    segment_ids=batch["segment_ids"][row : row + 1],
                )
                for i in range(seq_len):
                    g = stream + i
                    j = g + k + 1
                    same = (
                        j < owner.size and i + k + 1 < seq_len and owner[g] == owner[j]
                    )
                    assert bool(valid[0, i]) == bool(same), (stream, i, k)
            stream += seq_len


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file or directory"),
        ("empty directory", "holds no tokenizer.json"),
        ("not a tokenizer", "is not a Hugging Face tokenizer.json"),
        ("bos not named", "add_bos_token is true but no bos_token"),
        ("unknown eos", "is not a token of the tokenizer"),
        ("no eos", "no end-of-sequence token"),
        ("eos id outside", "is not an id of the tokenizer's vocabulary"),
    ],
)
def test_a_bad_tokenizer_is_refused_by_name(tmp_path, case, message):
    """Catches: a tokenizer read without its framing (no EOS: generation would
    never stop, documents would run together), or a library exception escaping."""
    directory = tmp_path / "t"
    if case == "empty directory":
        directory.mkdir()
    elif case == "not a tokenizer":
        directory.mkdir()
        (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    elif case != "missing":
        configs = {
            "bos not named": {"add_bos_token": True, "eos_token": EOS},
            "unknown eos": {"eos_token": "</nope>"},
            "no eos": {},
            "eos id outside": {},
        }
        write_bpe_tokenizer(directory, TEXTS, config=configs[case])
        if case == "eos id outside":
            (directory / "config.json").write_text('{"eos_token_id": 99999}')
    with pytest.raises(TokenizerError, match=message):
        TextTokenizer.load(directory)


def test_held_out_bits_per_byte_divide_by_the_targets_bytes(qwen_style):
    """Catches: bits per byte computed with the bytes of the token at the position
    instead of the target's (one place ahead), with padding's or BOS/EOS bytes, or
    labelled on bits per token; evaluation ignoring a pair's loss mask."""
    from helpers import tiny_config

    qwen = TextTokenizer.load(qwen_style)
    model = eqx_mtp.MTPModel(
        tiny_config(vocab_size=qwen.vocab_size, num_depths=1), key=jax.random.key(0)
    )
    pairs = [PromptCompletion.of(t[:9], t[9:]) for t in TEXTS[:3]]
    for documents in ([t.encode() for t in TEXTS[:3]], pairs):
        batches = eval_batches(documents, seq_len=16, batch_size=2, tokenizer=qwen)
        result = eqx_mtp.train.evaluate(model, batches)
        loss, count, covered = 0.0, 0, 0
        for batch in batches:
            for row in range(2):
                tokens, segments = batch["tokens"][row], batch["segment_ids"][row]
                hidden = model.trunk(
                    jnp.asarray(tokens),
                    positions=jnp.asarray(batch["positions"][row]),
                    segment_ids=jnp.asarray(segments),
                )
                logits = np.asarray(model.trunk.logits(hidden), np.float64)
                for i in range(15):
                    target = i + 1
                    if segments[i] == 0 or segments[target] != segments[i]:
                        continue
                    if "loss_mask" in batch and not batch["loss_mask"][row, target]:
                        continue
                    row_logits = logits[i] - logits[i].max()
                    log_z = np.log(np.exp(row_logits).sum())
                    loss += log_z - row_logits[tokens[target]]
                    count += 1
                    covered += int(batch["token_bytes"][row, target])
        assert result["tokens"] == count and result["bytes"] == covered
        np.testing.assert_allclose(
            result["main_bits_per_byte"], loss / covered / np.log(2), rtol=1e-5
        )
        np.testing.assert_allclose(
            result["main_bits_per_token"], loss / count / np.log(2), rtol=1e-5
        )


def test_the_byte_tokenizer_keeps_every_byte_as_it_is():
    """Catches: text decoded as UTF-8 (invalid bytes replaced by U+FFFD) before the
    byte-level tokenizer reads it, which changes the default corpus's documents."""
    document = b"caf\xe9 \xff\xfe ok"
    (arrays,) = ByteTokenizer().encode_documents([document], with_bytes=True)
    assert arrays["tokens"].tolist() == [BOS_ID, *document, EOS_ID]
    assert arrays["token_bytes"].tolist() == [1] * (len(document) + 2)
    assert ByteTokenizer().encode_prompt("é").tolist() == [BOS_ID, 0xC3, 0xA9]
