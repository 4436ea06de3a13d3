"""`eqx-mtp generate` on a trained tiny run: text and statistics, and one-line errors
for bad input."""

import numpy as np
import pytest
from helpers import TINY_JOB

import eqx_mtp
from eqx_mtp.train._cli import main
from eqx_mtp.train._job import TrainConfig, train


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("generate") / "run"
    config = dict(TINY_JOB, steps=2, batch_size=4, save_every=2, num_devices=1)
    train(
        TrainConfig.from_dict(dict(config, data=corpus, run=str(run))), progress=False
    )
    return str(run)


def test_generate_prints_the_greedy_text_then_statistics(run, capsys):
    """The printed text is the greedy continuation of BOS + the prompt's bytes (cut
    at EOS), the same with and without speculation."""
    args = ["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", "9"]
    assert main(args) == 0
    # The text may hold any byte, line breaks included: split the statistics off.
    speculative = capsys.readouterr().out.rstrip("\n").rsplit("\n", 4)
    assert main([*args, "--no-speculative"]) == 0
    plain = capsys.readouterr().out.rstrip("\n").rsplit("\n", 3)

    model, _ = eqx_mtp.train.load_checkpoint(run)
    prompt = eqx_mtp.train.encode_document("def ")[:-1]
    out = eqx_mtp.generate(model, prompt[None], max_new_tokens=9, speculative=False)
    tokens = np.asarray(out.tokens)[0]
    ends = np.flatnonzero(tokens == eqx_mtp.train.EOS_ID)
    expected = eqx_mtp.train.decode_bytes(tokens[: ends[0]] if ends.size else tokens)
    # The row ends at EOS: the statistics count the tokens up to and including it.
    count = "9 new tokens"
    if ends.size:
        count = f"{ends[0] + 1} new tokens (stopped at the end of the document)"
    assert speculative[0] == expected
    assert plain[0] == expected
    assert speculative[-4] == f"decoding: speculative, {count}"
    assert speculative[-2].startswith("acceptance per depth: ")
    assert len(speculative[-2].split(": ")[1].split()) == 2
    assert plain[-3] == f"decoding: plain, {count}"
    assert plain[-2] == "tokens per trunk forward: 1.00"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", ""], "--prompt: must not be empty"),
        (["--prompt", "abc", "--prompt", ""], "--prompt 2: must not be empty"),
        (["--max-new-tokens", "-3"], "--max-new-tokens: must be a positive integer"),
        (["--max-new-tokens", "14"], "exceeds the model's max_seq_len 16"),
        (["--prompt", "x" * 15], "--prompt: 16 tokens with BOS leave no room"),
        (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
        (["--temperature", "nan"], "--temperature: must be a finite number >= 0"),
        (["--top-k", "0"], "--top-k: must be a positive integer"),
    ],
)
def test_bad_generate_input_is_one_line(run, capsys, extra, message):
    prompt = [] if "--prompt" in extra else ["--prompt", "abc"]
    args = ["generate", "--run", run, *prompt, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eqx-mtp generate: error:"), err
    assert message in err[0]


def test_generate_from_a_run_without_checkpoints(tmp_path, capsys):
    assert main(["generate", "--run", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0], err
    missing = str(tmp_path / "missing")
    assert main(["generate", "--run", missing, "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
