"""The Python blocks of the docs pages run as written, in order, in one namespace.

A page's blocks are its examples; a renamed function or a changed default breaks the
page, and this test says so. The checkpoints they name are tiny random stand-ins
written by `tests/llama_reference.py`.
"""

import math
import pathlib
import re

import jax
from llama_reference import write_llama_checkpoint

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
TINY_LLAMA = dict(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_position_embeddings=128,
)


def python_blocks(page: str) -> list[str]:
    """The fenced ```python blocks of a docs page, in order."""
    text = (DOCS / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_weights_page_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_llama_checkpoint(
        tmp_path / "SmolLM2-135M", **TINY_LLAMA, tie_word_embeddings=True
    )
    write_llama_checkpoint(
        tmp_path / "Qwen2-0.5B", **TINY_LLAMA, extra_config={"attention_bias": True}
    )
    blocks = python_blocks("weights.md")
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/weights.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "2 2 True" in printed  # layers, depths, tied
    assert "attention_bias" in printed  # the refusal names the field
    assert "[[False  True  True  True  True  True]]" in printed


def test_own_trunk_page_runs(capsys):
    """The page's user transformer, two depths of its own block, the one call,
    `reduce_losses` and an optax step: run as written, they train."""
    blocks = python_blocks("own_trunk.md")
    assert len(blocks) >= 4
    namespace: dict = {}
    # JAX's default promotion, as in a user's script: optax's AdamW mixes its int32
    # step count with Python floats, which the suite's strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        for block in blocks:
            exec(compile(block, "docs/own_trunk.md", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 5 and all(map(math.isfinite, losses))
    # Five steps on one batch fit it: a step that did not update the model (or
    # followed a gradient of the wrong sign) would not lower the loss.
    assert losses[-1] < losses[0]
    assert namespace["aux"]["depth_losses"].shape == (3,)
    assert "per-depth losses:" in capsys.readouterr().out
