"""`eqx-mtp train --init-from DIR`: MTP training from a pretrained Llama-family trunk.

The checkpoint and its tensors come from `tests/llama_reference.py`, so "the trunk is
unchanged" is checked against the bytes written to disk, not against our loader.
"""

import json

import jax
import numpy as np
import pytest
from helpers import TINY_JOB
from llama_reference import tiny_llama, write_llama_checkpoint

import eqx_mtp
from eqx_mtp.train._cli import _parser, main
from eqx_mtp.train._job import TrainConfig, train

SIZES = tiny_llama()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama checkpoint and a `.jsonl` corpus of its token ids."""
    root = tmp_path_factory.mktemp("pretrained")
    tensors = write_llama_checkpoint(root / "llama", **SIZES, seed=5)
    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"tokens": rng.integers(1, 40, rng.integers(5, 30)).tolist()})
        for _ in range(30)
    ]
    (root / "tokens.jsonl").write_text("\n".join(lines) + "\n")
    (root / "text.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    return root, tensors


def _config(root, run, **overrides):
    values = dict(
        TINY_JOB,
        steps=3,
        batch_size=4,
        save_every=3,
        num_devices=1,
        weight_decay=0.5,
        learning_rate=0.05,
        data=str(root / "tokens.jsonl"),
        init_from=str(root / "llama"),
        run=str(run),
    )
    for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
        values.pop(name)  # the checkpoint sets the trunk's shape
    return TrainConfig.from_dict(values | overrides)


def _trunk_as_stored(model):
    """The trunk's arrays under their Hugging Face names, read off the model by hand
    (not through the library's name table)."""
    trunk = model.trunk
    blocks = trunk.blocks
    named = {
        "model.embed_tokens.weight": trunk.embedding,
        "model.norm.weight": trunk.final_norm.weight,
        "lm_head.weight": trunk.unembedding,
        "model.layers.0.input_layernorm.weight": blocks.attention_norm.weight[0],
        "model.layers.0.post_attention_layernorm.weight": blocks.mlp_norm.weight[0],
    }
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        named[f"model.layers.0.self_attn.{name}.weight"] = getattr(
            blocks.attention, name
        ).weight[0]
    for name in ("gate_proj", "up_proj", "down_proj"):
        named[f"model.layers.0.mlp.{name}.weight"] = getattr(blocks.mlp, name).weight[0]
    return {name: np.asarray(value) for name, value in named.items()}


def test_depths_only_run_keeps_the_pretrained_trunk(pretrained, tmp_path, capsys):
    root, tensors = pretrained
    train(_config(root, tmp_path / "frozen", train_depths_only=True), progress=False)
    model, stored = eqx_mtp.train.load_checkpoint(tmp_path / "frozen")
    assert stored["model"]["vocab_size"] == 40 and model.config.train_depths_only
    for name, value in _trunk_as_stored(model).items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)
    start = eqx_mtp.interop.load_llama(
        root / "llama", num_depths=2, key=jax.random.key(0)
    )
    moved = np.abs(
        np.asarray(model.depths.depths.eh_proj.weight)
        - np.asarray(start.depths.depths.eh_proj.weight)
    )
    assert moved.max() > 1e-3

    # `eqx-mtp generate` speaks bytes: a run in another tokenizer is refused.
    code = main(["generate", "--run", str(tmp_path / "frozen"), "--prompt", "hi"])
    assert code == 2 and "tokenizer" in capsys.readouterr().err

    train(_config(root, tmp_path / "full"), progress=False)
    full, _ = eqx_mtp.train.load_checkpoint(tmp_path / "full")
    changed = [
        name
        for name, value in _trunk_as_stored(full).items()
        if not np.array_equal(value, tensors[name])
    ]
    assert len(changed) == len(tensors)


def _cli_error(capsys, args):
    code = main(["train", "--no-progress", "--num-devices", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("eqx-mtp train: error:"), err
    return err[0]


def test_init_from_errors(pretrained, tmp_path, capsys):
    root, _ = pretrained
    llama, tokens, text = root / "llama", root / "tokens.jsonl", root / "text.jsonl"
    base = ["--seq-len", "16", "--run", str(tmp_path / "r")]
    message = _cli_error(
        capsys, [*base, "--init-from", str(llama), "--data", str(text)]
    )
    assert "'tokens'" in message
    message = _cli_error(capsys, [*base, "--data", str(tokens)])
    assert "--init-from" in message
    big = tmp_path / "big.jsonl"
    big.write_text('{"tokens": [1, 2, 40]}\n{"tokens": [3, 4]}\n')
    message = _cli_error(capsys, [*base, "--init-from", str(llama), "--data", str(big)])
    assert "token id 40" in message and "40" in message
    message = _cli_error(
        capsys,
        [*base, "--init-from", str(llama), "--data", str(tokens), "--dim", "32"],
    )
    assert "--dim=32" in message
    message = _cli_error(
        capsys, [*base, "--init-from", str(tmp_path / "none"), "--data", str(tokens)]
    )
    assert "--init-from" in message and "config.json" in message
    biased = tmp_path / "biased"
    write_llama_checkpoint(biased, **SIZES, extra_config={"attention_bias": True})
    message = _cli_error(
        capsys, [*base, "--init-from", str(biased), "--data", str(tokens)]
    )
    assert "attention_bias" in message


def test_cli_types_the_new_flags():
    args = _parser().parse_args(
        ["train", "--depth-grad-clip", "0.5", "--train-depths-only", "--init-from", "d"]
    )
    assert args.depth_grad_clip == 0.5 and isinstance(args.depth_grad_clip, float)
    assert args.train_depths_only is True and args.init_from == "d"
