"""`eqx-mtp generate` and `eqx-mtp export` on a run that kept a Hugging Face
tokenizer: text in, text out, against a plain greedy loop on the tokenizer's ids; and
one-line errors for bad input.

The run is a tiny Qwen2-style checkpoint whose depths trained for two steps on token
ids; its `tokenizer/` folder is written by hand, as the training job keeps it, from
a byte-level BPE tokenizer trained in the test.
"""

import json
import re
import shutil

import numpy as np
import pytest
from helpers import TINY_JOB
from hf_reference import family_config, random_family_tensors, write_checkpoint
from test_stop_tokens import greedy_until_stop
from text_fixtures import write_bpe_tokenizer

import eqx_mtp
from eqx_mtp.train import TextTokenizer
from eqx_mtp.train._cli import main
from eqx_mtp.train._job import TrainConfig, train

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
PROMPTS = ["the cat sat on", "a dog ran far away and the cat sat on a"]
NOT_A_TOKENIZER = '{"version": "1.0", "model": {"type": "BPE"}}\n'


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`root` holding `run` (trained on token ids, no tokenizer kept), `text_run`
    (the same checkpoint with the tokenizer kept in `tokenizer/`), `bpe` (that
    tokenizer) and `bpe_bos` (the same one adding BOS `<s>`)."""
    root = tmp_path_factory.mktemp("generate_text")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) for _ in range(40)]
    write_bpe_tokenizer(root / "bpe", texts, vocab_size=300)
    write_bpe_tokenizer(root / "bpe_bos", texts, vocab_size=300, bos=True)
    tokenizer = TextTokenizer.load(root / "bpe")
    config = family_config(
        "qwen2", layout="v5", vocab_size=tokenizer.vocab_size, eos_token_id=0
    )
    write_checkpoint(root / "qwen", config, random_family_tensors(config, seed=3))
    documents = tokenizer.encode_documents([text.encode() for text in texts])
    lines = [json.dumps({"tokens": d["tokens"].tolist()}) for d in documents]
    (root / "tokens.jsonl").write_text("\n".join(lines) + "\n")
    values = dict(TINY_JOB, steps=2, batch_size=2, save_every=2, num_devices=1)
    for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
        values.pop(name)  # the checkpoint sets the trunk's shape
    values.update(
        data=str(root / "tokens.jsonl"),
        init_from=str(root / "qwen"),
        train_depths_only=True,
        learning_rate=0.05,
        run=str(root / "run"),
    )
    train(TrainConfig.from_dict(values), progress=False)
    shutil.copytree(root / "run", root / "text_run")
    tokenizer.save(root / "text_run" / "tokenizer")
    # The checkpoint the run started from now holds another tokenizer.json: an
    # export must carry the run's own.
    (root / "qwen" / "tokenizer.json").write_text(NOT_A_TOKENIZER)
    return root


def _greedy_text(model, tokenizer, ids, max_new):
    """`(text, length, stopped)`: what a plain greedy loop (the whole row's forward
    for every token) generates after `ids`, up to the tokenizer's first stop id
    (left out of the text)."""
    stops = list(tokenizer.framing.stop_ids)
    tokens, length = greedy_until_stop(model, list(ids), max_new, stops)
    new = tokens[:length]
    stopped = new[-1] in stops
    return tokenizer.decode(new[:-1] if stopped else new), length, stopped


def _generate(capsys, args):
    """`(stdout, stderr)` of an `eqx-mtp generate` that succeeds."""
    code = main(["generate", *args])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out, printed.err


def _texts(out, statistics):
    """The continuations an output prints under `--- prompt N ---` lines, before its
    `statistics` lines."""
    body = out.rstrip("\n").rsplit("\n", statistics)[0]
    parts = re.split(r"^--- prompt (\d+) ---\n", body + "\n", flags=re.MULTILINE)
    assert parts[0] == "" and parts[1::2] == [
        str(i + 1) for i in range(len(parts) // 2)
    ]
    return [part[:-1] for part in parts[2::2]]


def test_a_text_run_prints_the_greedy_text(runs, capsys):
    """One prompt, encoded with the kept tokenizer (no BOS: Qwen's framing): the
    printed text is the decoded greedy continuation, speculative or not, with
    today's layout (text, then the statistics). Catches: bytes instead of the
    tokenizer, a prompt framed with EOS, decoding past the stop id."""
    tokenizer = TextTokenizer.load(runs / "text_run" / "tokenizer")
    model, _ = eqx_mtp.train.load_checkpoint(runs / "text_run")
    prompt = PROMPTS[0]
    ids = tokenizer.encode_documents([prompt.encode()])[0]["tokens"][:-1]
    text, length, stopped = _greedy_text(model, tokenizer, ids, 6)
    args = ["--run", str(runs / "text_run"), "--prompt", prompt, "--max-new-tokens"]
    speculative, _ = _generate(capsys, [*args, "6"])
    plain, _ = _generate(capsys, [*args, "6", "--no-speculative"])
    speculative_lines = speculative.rstrip("\n").rsplit("\n", 4)
    plain_lines = plain.rstrip("\n").rsplit("\n", 3)
    assert speculative_lines[0] == text and plain_lines[0] == text
    count = f"{length} new tokens" + (
        " (stopped at the end of the document)" if stopped else ""
    )
    assert speculative_lines[1] == f"decoding: speculative, {count}"
    assert plain_lines[1] == f"decoding: plain, {count}"


def test_prompts_decode_as_one_batch(runs, tmp_path, capsys):
    """A `--prompt` and a `.jsonl` file's prompt of another length decode as one
    batch: each text is the plain greedy loop's, which a call of its own prints
    (for the first prompt, the previous test's). Catches: rows of a batch misaligned
    (a shorter prompt read with the longer one's padding), texts printed out of
    order, the statistics repeated."""
    tokenizer = TextTokenizer.load(runs / "text_run" / "tokenizer")
    model, _ = eqx_mtp.train.load_checkpoint(runs / "text_run")
    prompts = PROMPTS
    file = tmp_path / "prompts.jsonl"
    file.write_text(f"\n{json.dumps({'prompt': prompts[1]})}\n\n")
    args = ["--run", str(runs / "text_run"), "--max-new-tokens", "6"]
    out, _ = _generate(capsys, [*args, "--prompt", prompts[0], "--prompts", str(file)])
    assert len(re.findall("^decoding: ", out, flags=re.MULTILINE)) == 1
    assert "decoding: speculative, 2 prompts, " in out
    reference = [
        _greedy_text(model, tokenizer, tokenizer.encode_prompt(p), 6)[0]
        for p in prompts
    ]
    assert _texts(out, 4) == reference
    # A call of its own prints the same text (for the first prompt, see
    # test_a_text_run_prints_the_greedy_text).
    alone, _ = _generate(capsys, [*args, "--prompt", prompts[1]])
    assert alone.rstrip("\n").rsplit("\n", 4)[0] == reference[1]


def test_truncate_prompt_keeps_bos_and_the_newest_tokens(
    runs, tmp_path, monkeypatch, capsys
):
    """`--tokenizer` (a BOS-adding tokenizer whose `generation_config.json` adds a
    stop id) on a prompt too long for `max_seq_len` 64: with `--truncate-prompt` the
    model reads BOS and the prompt's last tokens, and the row ends at the added stop
    id, as the greedy loop's does. Catches: the cut taken from the right, BOS cut
    away, a stop id of generation_config.json ignored, the cut made silently."""
    tokenizer_dir = shutil.copytree(runs / "bpe_bos", tmp_path / "tokenizer")
    tokenizer = TextTokenizer.load(tokenizer_dir)
    model, _ = eqx_mtp.train.load_checkpoint(runs / "text_run")
    long_prompt = " ".join((WORDS * 6)[:60])
    ids = tokenizer.encode_prompt(long_prompt)
    assert ids[0] == 1  # BOS, <s>
    keep = 64 - 8
    assert keep < ids.size < 64  # too long with the new tokens, not alone
    kept = [int(ids[0]), *ids[ids.size - keep + 1 :].tolist()]
    # Stop at the first greedy token that is new in the row (a repeated one would
    # have stopped the row earlier).
    new, _ = greedy_until_stop(model, kept, 8, [])
    index = next((i for i in range(1, 8) if new[i] not in new[:i]), 0)
    stop = new[index]
    (tokenizer_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [0, stop]})
    )
    tokenizer = TextTokenizer.load(tokenizer_dir)
    assert tokenizer.framing.stop_ids == (0, stop)
    text, length, stopped = _greedy_text(model, tokenizer, kept, 8)
    assert stopped and length == index + 1

    seen = []

    def spy(model, rows, **options):
        seen.extend(np.asarray(row).tolist() for row in rows)
        return generate(model, rows, **options)

    generate = eqx_mtp.train._generate.generate
    monkeypatch.setattr(eqx_mtp.train._generate, "generate", spy)
    args = ["--run", str(runs / "text_run"), "--tokenizer", str(tokenizer_dir)]
    args += ["--prompt", long_prompt, "--max-new-tokens", "8"]
    message = _error(capsys, args)
    assert f"--prompt: {ids.size} tokens with BOS plus --max-new-tokens 8" in message
    assert "--truncate-prompt" in message
    out, err = _generate(capsys, [*args, "--truncate-prompt", "--no-speculative"])
    assert seen == [kept]
    lines = out.rstrip("\n").rsplit("\n", 3)
    assert lines[0] == text
    assert (
        lines[1]
        == f"decoding: plain, {length} new tokens (stopped at stop token {stop})"
    )
    notes = err.strip().splitlines()
    assert len(notes) == 1
    assert notes[0].startswith(
        f"eqx-mtp generate: note: --prompt: cut from {ids.size} to {keep} tokens"
    )


def _error(capsys, args) -> str:
    """The one line a bad `eqx-mtp generate` prints, after checking it exits 2."""
    code = main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("eqx-mtp generate: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda r, f: ["--run", f"{r}/run", "--prompt", "a"], "--run: "),
        (lambda r, f: ["--tokenizer", f"{r}/none", "--prompt", "a"], "--tokenizer: "),
        (lambda r, f: ["--tokenizer", f"{r}/qwen", "--prompt", "a"], "--tokenizer: "),
        (lambda r, f: [], "--prompt: no prompt given"),
        (lambda r, f: ["--prompt", "a", "--prompt", ""], "--prompt 2: must not be"),
        (lambda r, f: ["--prompts", f"{f}/none.txt"], "--prompts: no such file"),
        (lambda r, f: ["--prompts", f"{f}/blank.txt"], "holds no prompt"),
        (lambda r, f: ["--prompts", f"{f}/p.jsonl"], "p.jsonl line 2: must not be"),
        (lambda r, f: ["--prompts", f"{f}/bad.jsonl"], "bad.jsonl line 1: expected"),
        (
            lambda r, f: ["--prompt", "a", "--prompt", "a " * 70],
            r"--prompt 2: \d+ tokens leave no room for a new token",
        ),
    ],
    ids=[
        "token-ids-run",
        "missing-tokenizer",
        "not-a-tokenizer",
        "no-prompt",
        "empty-prompt",
        "missing-file",
        "blank-file",
        "empty-in-file",
        "bad-jsonl",
        "too-long",
    ],
)
def test_bad_text_input_is_one_line(runs, tmp_path, capsys, make_args, message):
    """Catches: a run on token ids decoded as bytes; a bad flag reported as a
    traceback, blamed on another flag or on the wrong prompt."""
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    args = make_args(runs, tmp_path)
    if "--run" not in args:
        args = ["--run", str(runs / "text_run"), *args]
    error = _error(capsys, args)
    assert re.search(message, error), error
    if "token-ids-run" in error:
        assert "--tokenizer PATH" in error


def test_export_carries_the_tokenizer_the_run_kept(runs, tmp_path, capsys):
    """The run's `tokenizer/` files go along, not those of the checkpoint it started
    from; a run without `--init-from` takes its token ids from its tokenizer's
    framing. Catches: the `--init-from` checkpoint's tokenizer copied, the
    tokenizer's configuration left behind, no token ids for a fresh model."""
    out = tmp_path / "out"
    assert main(["export", "--run", str(runs / "text_run"), "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tokenizer files from {runs / 'text_run' / 'tokenizer'}" in printed
    kept = runs / "text_run" / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (kept / name).read_bytes(), name
    written = json.loads((out / "config.json").read_text())
    ids = (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"])
    assert ids == (1, 0, 0)  # the --init-from checkpoint's config.json

    # A fresh model (no --init-from) with a BOS-adding tokenizer kept.
    model, _ = eqx_mtp.train.load_checkpoint(runs / "text_run")
    fresh = tmp_path / "fresh"
    stored = {"model": model.config.to_dict(), "train": {}}
    with eqx_mtp.train.Checkpointer(
        fresh / "checkpoints", async_save=False
    ) as checkpointer:
        checkpointer.save(1, model=model, config=stored)
    TextTokenizer.load(runs / "bpe_bos").save(fresh / "tokenizer")
    assert main(["export", "--run", str(fresh), "--to", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    ids = (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"])
    assert ids == (1, 0, None)
    again = TextTokenizer.load(tmp_path / "b")
    assert again.framing == TextTokenizer.load(runs / "bpe_bos").framing
