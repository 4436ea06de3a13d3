"""`eqx-mtp export`: a run written back as a Hugging Face checkpoint of the family it
came from, tokenizer files beside it, and one-line errors for bad input.

The source checkpoints are written by `tests/hf_reference.py`, so "the trunk is
unchanged" is checked against the tensors written to disk, not against our writer.
"""

import json
import pathlib
import shutil
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_JOB
from hf_reference import family_config, random_family_tensors, write_checkpoint
from safetensors.numpy import load_file

import eqx_mtp
from eqx_mtp.train._cli import main
from eqx_mtp.train._job import TrainConfig, train

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOKENIZER_JSON = '{"version": "1.0", "model": {"type": "BPE"}}\n'


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """A tiny Qwen2-style checkpoint with a `tokenizer.json`, and a 2-step run on
    token ids that trained depths on it with the trunk frozen."""
    root = tmp_path_factory.mktemp("export")
    config = family_config("qwen2", layout="v5")
    tensors = random_family_tensors(config, seed=3)
    write_checkpoint(root / "qwen", config, tensors)
    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"tokens": rng.integers(3, 48, rng.integers(5, 30)).tolist()})
        for _ in range(20)
    ]
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
    # Written after training, which would read it: the run keeps no tokenizer, so
    # the export takes the --init-from checkpoint's files as they are.
    (root / "qwen" / "tokenizer.json").write_text(TOKENIZER_JSON)
    return root, tensors


def _assert_same_arrays(a, b):
    """Every array of `a` equals `b`'s at the same path, bit for bit (their static
    options, such as `train_depths_only`, may differ)."""
    left = jax.tree_util.tree_leaves_with_path(eqx.filter(a, eqx.is_array))
    right = dict(jax.tree_util.tree_leaves_with_path(eqx.filter(b, eqx.is_array)))
    assert [path for path, _ in left] == list(right)
    for path, value in left:
        np.testing.assert_array_equal(value, right[path], err_msg=str(path))


def _error(capsys, args) -> str:
    """The one line a bad `eqx-mtp export` prints, after checking it exits 2."""
    code = main(["export", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("eqx-mtp export: error:"), err
    return err[0]


def test_a_depths_only_run_exports_its_family_trunk_and_tokenizer(
    qwen_run, tmp_path, capsys
):
    """Catches: the trunk written through a lossy path (a cast, or the depths' update
    leaking into it); the family inferred as Llama (biases dropped); depths left out
    or misplaced; the tokenizer or the checkpoint's token ids not carried along."""
    root, original = qwen_run
    out = tmp_path / "out"
    assert main(["export", "--run", str(root / "run"), "--to", str(out)]) == 0
    printed = capsys.readouterr()
    assert "family qwen2" in printed.out and "tokenizer.json" in printed.out
    assert "Traceback" not in printed.err

    exported = load_file(out / "model.safetensors")
    for name, value in original.items():
        assert exported[name].dtype == np.float32, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    model, _ = eqx_mtp.train.load_checkpoint(root / "run")
    depths = model.depths.depths
    for k in range(2):  # DeepSeek-V3's names: depth k+1 after the 2 trunk layers
        np.testing.assert_array_equal(
            exported[f"model.layers.{2 + k}.eh_proj.weight"], depths.eh_proj.weight[k]
        )
        np.testing.assert_array_equal(
            exported[f"model.layers.{2 + k}.enorm.weight"], depths.enorm.weight[k]
        )
    again = eqx_mtp.interop.load_hf_checkpoint(out)
    assert again.config.num_depths == 2
    _assert_same_arrays(again, model)

    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen2"
    assert (written["bos_token_id"], written["eos_token_id"]) == (1, 2)
    assert (out / "tokenizer.json").read_text() == TOKENIZER_JSON
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]

    # A family that would compute the trunk differently is refused by name.
    message = _error(
        capsys,
        ["--run", str(root / "run"), "--to", str(tmp_path / "l2"), "--family", "llama"],
    )
    assert "--family" in message and "qkv_bias" in message


def test_the_family_comes_from_the_init_from_checkpoint(tmp_path, capsys):
    """A run of a Mistral checkpoint without a window, whose trunk alone would be
    written as Llama. Catches: the run's stored `init_from` ignored. When that
    checkpoint is gone, the export names `--family`, which then decides."""
    config = family_config("mistral", layout="v4")
    tensors = random_family_tensors(config, seed=1, depths=1)
    write_checkpoint(tmp_path / "mistral", config, tensors)
    model = eqx_mtp.interop.load_hf_checkpoint(tmp_path / "mistral")
    stored = {
        "model": model.config.to_dict(),
        "train": {"init_from": str(tmp_path / "mistral")},
    }
    checkpoints = tmp_path / "run" / "checkpoints"
    with eqx_mtp.train.Checkpointer(checkpoints, async_save=False) as checkpointer:
        checkpointer.save(1, model=model, config=stored)
    run = str(tmp_path / "run")
    assert main(["export", "--run", run, "--to", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written["model_type"] == "mistral"

    shutil.move(tmp_path / "mistral", tmp_path / "moved")
    message = _error(capsys, ["--run", run, "--to", str(tmp_path / "b")])
    assert "--family" in message and "mistral" in message
    assert not (tmp_path / "b").exists()
    args = ["--run", run, "--to", str(tmp_path / "b"), "--family", "mistral"]
    assert main(["export", *args]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert written["model_type"] == "mistral"


def _safetensors_dtypes(path) -> set[str]:
    """The dtypes a safetensors file's header lists, read by hand."""
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def test_a_byte_level_run_exports_as_llama(tmp_path, monkeypatch, capsys):
    """The newest run (found as `--resume` finds it), written by eqx_mtp 0.1.0, into
    an empty `--to`. Catches: a byte-level run given no family or the wrong token
    ids; the stored arrays not those of the checkpoint; `--dtype` not applied; the
    depths' warning printed as a traceback or several lines."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "run_v0_1_0", tmp_path / "runs" / "20200101-000000")
    (tmp_path / "out").mkdir()
    assert main(["export", "--to", "out"]) == 0
    printed = capsys.readouterr()
    assert "runs/20200101-000000" in printed.out
    warned = [line for line in printed.err.splitlines() if "eqx-mtp" in line]
    assert len(warned) == 1 and warned[0].startswith("eqx-mtp export: warning: ")
    assert "depth_trunk_input" in warned[0] and "Traceback" not in printed.err

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "llama"
    assert written["architectures"] == ["LlamaForCausalLM"]
    ids = (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"])
    assert ids == (257, 258, 256)
    expected = np.load(FIXTURES / "run_v0_1_0_model.npz")
    again = eqx_mtp.interop.load_hf_checkpoint(tmp_path / "out")
    leaves = jax.tree_util.tree_leaves_with_path(again)
    arrays = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
    assert set(arrays) == set(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)

    assert main(["export", "--to", "half", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert _safetensors_dtypes(tmp_path / "half" / "model.safetensors") == {"BF16"}
    half = eqx_mtp.interop.load_hf_checkpoint(tmp_path / "half")
    leaves = jax.tree_util.tree_leaves_with_path(half)
    for path, value in leaves:
        rounded = expected[jax.tree_util.keystr(path)].astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(value), rounded.astype(np.float32))


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--to", "taken"], "--to"),
        (["--to", "new", "--dtype", "float16"], "--dtype"),
        (["--to", "new", "--step", "7"], "--step"),
        (["--to", "new", "--family", "gemma"], "--family"),
        (["--to", "new", "--run", "nowhere"], "--run"),
    ],
)
def test_bad_export_input_is_one_line(tmp_path, monkeypatch, capsys, extra, flag):
    """Catches: an existing export overwritten, a bad flag reported as a traceback or
    blamed on another flag; a missing step replaced by the newest."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "run_v0_1_0", tmp_path / "runs" / "20200101-000000")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    message = _error(capsys, extra)
    assert message.startswith(f"eqx-mtp export: error: {flag}"), message
    assert (tmp_path / "taken" / "config.json").read_text() == "{}"
    assert not (tmp_path / "new").exists()
