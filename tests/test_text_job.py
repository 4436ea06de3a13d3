"""Text in, text out from the command line: a tiny Qwen2.5-style checkpoint (biases on
q/k/v) with a byte-level BPE tokenizer trained here, its depths trained on a `.txt`
corpus, decoded on text, exported; and the job's tokenizer flags.

The checkpoint's tensors come from `tests/hf_reference.py` and the tokenizer's ids
from the `tokenizers` package itself, so "unchanged" and "framed" are checked
against what was written, not against our readers."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import TINY_JOB
from hf_reference import (
    family_config,
    family_logits,
    random_family_tensors,
    write_checkpoint,
)
from safetensors.numpy import load_file
from text_fixtures import write_bpe_tokenizer
from tokenizers import Tokenizer

import eqx_mtp
from eqx_mtp.train._cli import main

WORDS = "the quick brown fox jumps over a lazy dog; héllo wörld 日本".split()
PROMPT = "the quick brown"


def _documents(seed, count):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(4, 30))) for _ in range(count)]


def _job_flags(**values):
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


TINY_TEXT_JOB = {
    k: v
    for k, v in TINY_JOB.items()
    if k not in ("dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim")
} | dict(seq_len=32, batch_size=4, steps=3, num_devices=1)


@pytest.fixture(scope="module")
def qwen_text(tmp_path_factory):
    """A Qwen2-style checkpoint of vocabulary 320 holding a BPE tokenizer, and a
    `.txt` corpus."""
    root = tmp_path_factory.mktemp("text")
    config = family_config("qwen2", layout="v5", vocab_size=320)
    tensors = random_family_tensors(config, seed=13)
    write_checkpoint(root / "qwen", config, tensors)
    write_bpe_tokenizer(root / "qwen", _documents(0, 200), vocab_size=300)
    (root / "corpus.txt").write_text("\n\n".join(_documents(1, 40)) + "\n")
    return root, tensors


def _error(capsys, command, args) -> str:
    code = main([command, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"eqx-mtp {command}: error:"), err
    return err[0]


def test_a_fresh_model_trains_on_a_tokenizers_vocabulary(qwen_text, tmp_path, capsys):
    """Catches: `--tokenizer` ignored without `--init-from` (a byte-level model
    trained on bytes); the model's vocabulary not the tokenizer's; the run not
    keeping its tokenizer or not stating its framing; bits per token reported as
    bits per byte."""
    root, _ = qwen_text
    run = tmp_path / "run"
    job = TINY_JOB | dict(steps=2, batch_size=4, seq_len=32, num_devices=1)
    flags = _job_flags(**job, run=run)
    args = ["train", "--no-progress", *flags, "--data", str(root / "corpus.txt")]
    assert main([*args, "--tokenizer", str(root / "qwen")]) == 0
    printed = capsys.readouterr()
    assert "bits/byte" in printed.out and "bits/token" in printed.out
    model, config = eqx_mtp.train.load_checkpoint(run)
    assert model.config.vocab_size == 300
    stated = json.loads((run / "config.json").read_text())
    assert stated["data"]["tokenizer"] == str(root / "qwen")
    assert stated["framing"]["bos_id"] is None and stated["framing"]["eos_id"] == 0
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (
        root / "qwen" / "tokenizer.json"
    ).read_bytes()
    summary = json.loads((run / "summary.json").read_text())["eval"]
    assert summary["main_bits_per_byte"] < summary["main_bits_per_token"]


def test_bad_text_input_is_one_line(qwen_text, tmp_path, capsys):
    """Catches: a library exception escaping as a traceback; a tokenizer whose ids
    the model cannot embed accepted (an index error, or silent clipping, mid-run);
    text fed to a pretrained model without its tokenizer."""
    root, _ = qwen_text
    base = ["--no-progress", "--num-devices", "1", "--seq-len", "16"]
    base += ["--run", str(tmp_path / "r"), "--data", str(root / "corpus.txt")]
    message = _error(capsys, "train", [*base, "--tokenizer", str(tmp_path / "none")])
    assert "--tokenizer" in message and "no such file" in message
    (tmp_path / "junk.json").write_text("[1, 2]")
    message = _error(
        capsys, "train", [*base, "--tokenizer", str(tmp_path / "junk.json")]
    )
    assert "--tokenizer" in message and "not a Hugging Face tokenizer.json" in message
    small = family_config("qwen2", layout="v5", vocab_size=200)
    write_checkpoint(tmp_path / "small", small, random_family_tensors(small, seed=1))
    init = ["--init-from", str(tmp_path / "small")]
    message = _error(capsys, "train", [*base, *init])
    assert "--tokenizer" in message and "holds no tokenizer.json" in message
    message = _error(capsys, "train", [*base, *init, "--tokenizer", str(root / "qwen")])
    assert "--tokenizer" in message and "300 ids" in message and "200" in message


def _greedy_reference(tensors, config, prompt, stops, count):
    """Greedy continuation by the NumPy transcription of the family's forward pass,
    the whole sequence recomputed each step, ended by the first stop id."""
    ids = list(prompt)
    for _ in range(count):
        ids.append(int(np.argmax(family_logits(tensors, config, np.asarray(ids))[-1])))
        if ids[-1] in stops:
            break
    return ids[len(prompt) :]


def test_the_loop_on_text(qwen_text, tmp_path, capsys):
    """The README's four commands on the tiny checkpoint. Catches: the corpus not
    tokenized by the checkpoint's tokenizer; the frozen trunk moved by training or
    by the export; generate encoding or decoding with another tokenizer, running
    past a stop id, or drafting differently from plain decoding; the tokenizer or
    the depths lost on the way out."""
    root, tensors = qwen_text
    checkpoint = root / "qwen"
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False).ids  # Qwen: no BOS
    # The random trunk (seed 13) reaches EOS: generation must stop there.
    expected = _greedy_reference(tensors, config, prompt, (0, 2), 12)
    assert expected[-1] == 0 and len(expected) > 2

    run = tmp_path / "run"
    flags = _job_flags(**TINY_TEXT_JOB, run=run, init_from=checkpoint)
    flags += ["--train-depths-only", "--data", str(root / "corpus.txt")]
    flags += [
        "--depth-trunk-input",
        "after_norm",
        "--depth-previous-input",
        "after_norm",
    ]
    assert main(["train", "--no-progress", *flags]) == 0
    assert "bits/byte" in capsys.readouterr().out

    texts = []
    for extra in ([], ["--no-speculative"]):
        args = ["--run", str(run), "--prompt", PROMPT, "--max-new-tokens", "12"]
        assert main(["generate", *args, *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0].split("\ndecoding:")[0] == texts[1].split("\ndecoding:")[0]
    printed = texts[0].split("\ndecoding:")[0]
    assert printed in (
        tokenizer.decode(expected, skip_special_tokens=True),
        tokenizer.decode(expected[:-1], skip_special_tokens=True),
    )
    assert f"{len(expected)} new tokens" in texts[0]

    out = tmp_path / "out"
    assert main(["export", "--run", str(run), "--to", str(out)]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    exported = load_file(out / "model.safetensors")
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), name
    trained, _ = eqx_mtp.train.load_checkpoint(run)
    again = eqx_mtp.interop.load_hf_checkpoint(out)
    left = jax.tree_util.tree_leaves_with_path(eqx.filter(again, eqx.is_array))
    right = dict(jax.tree_util.tree_leaves_with_path(eqx.filter(trained, eqx.is_array)))
    assert [path for path, _ in left] == list(right)
    for path, value in left:
        np.testing.assert_array_equal(value, right[path], err_msg=str(path))
