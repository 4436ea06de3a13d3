"""The Python blocks of the docs run as written: every page under `docs/` and the
README, each page's blocks in order, in one namespace, in a temporary working
directory.

A page's blocks are its examples; a renamed function or a changed default breaks the
page, and this test says so. What a page takes for granted (a trained run under the
name it uses, a checkpoint, a model or a batch its text describes) is set up by the
page's entry in `SETUP`: tiny stand-ins, so every page runs in seconds. A block that
cannot run here by nature (it needs a GPU, a pod, or hours) carries
`<!-- no-test: why -->` on the line before its fence; `test_skipped_block` lists each
such block, with its reason, as a skipped test.
"""

import dataclasses
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import pytest
from helpers import TINY_JOB, tiny_config
from hf_reference import family_config, random_family_tensors, write_checkpoint
from llama_reference import tiny_llama, write_llama_checkpoint

import eqx_mtp
from eqx_mtp.train import TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["README.md"] + sorted(
    p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")
)
# Rows of bytes need a vocabulary over 259 and positions up to 128.
TINY_LLAMA = tiny_llama(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_position_embeddings=128,
)

# Pages whose ```text blocks show what the Python blocks before them print: the test
# runs the page and finds each shown block in the printed output.
PRINTS_SHOWN = ("docs/maths.md", "docs/packed_rows.md")

_FENCE = re.compile(r"^```\s*(\S*)(.*)$")
_NO_TEST = re.compile(r"^<!--\s*no-test:\s*(.+?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced ```python block: `line` is the 1-based line of its first code line;
    `skip` is the reason given by a `<!-- no-test: ... -->` line, the last non-blank
    line before the fence."""

    page: str
    line: int
    code: str
    skip: str | None


def page_blocks(page: str) -> list[Block]:
    """The ```python blocks of a page (a path relative to the repository), in order."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "python":
            if fence.group(2).strip():
                raise ValueError(
                    f"{page}:{i + 1}: write ```python alone; a block that cannot run "
                    "here takes <!-- no-test: why --> on the line before its fence"
                )
            before = [line for line in lines[:i] if line.strip()][-1:]
            marker = _NO_TEST.match(before[0]) if before else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(page, i + 2, code, marker and marker.group(1)))
        i = end + 1
    return blocks


def run_page(page: str, namespace: dict) -> int:
    """Run a page's blocks in order in `namespace`; the number run. Tracebacks name
    the page and the line of the Markdown file."""
    blocks = [b for b in page_blocks(page) if b.skip is None]
    promotion = "standard" if page in USER_PROMOTION else "strict"
    with jax.numpy_dtype_promotion(promotion):
        for block in blocks:
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, page, "exec"), namespace)
    return len(blocks)


# Stand-ins, by page. Each is called in the page's working directory and returns the
# names the page's text takes as given.


@pytest.fixture(scope="session")
def trained_run(corpus, tmp_path_factory):
    """A run directory of the tiny job: 2 steps, a checkpoint, metrics; rows of 16
    tokens but positions up to 128, so the decoding examples have room."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = dict(
        TINY_JOB,
        data=corpus,
        run=str(run),
        steps=2,
        batch_size=4,
        num_devices=1,
        max_seq_len=128,
    )
    train(TrainConfig.from_dict(config), progress=False)
    return run


def _readme(request) -> dict:
    write_llama_checkpoint("path/to/checkpoint", **TINY_LLAMA)
    return {}


def _distributed(request) -> dict:
    # The model, batch and optimizer the page's text describes, tiny: 8 rows of 16
    # tokens (the mesh's data axis of 4 divides them), 2 micro-batches for the step.
    model = eqx_mtp.MTPModel(tiny_config(), key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8, 16), 0, 19)
    segment_ids = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32) // 8 + 1, (2, 8, 16))
    return dict(
        model=model,
        tokens=tokens[0],
        segment_ids=segment_ids[0],
        batch=dict(tokens=tokens, segment_ids=segment_ids),
        optimizer=eqx_mtp.train.make_optimizer(
            model, learning_rate=1e-3, total_steps=10, warmup_steps=2
        ),
        mtp_weight=eqx_mtp.resolve_mtp_weight(0.3),
    )


def _run_named(name: str):
    def setup(request) -> dict:
        shutil.copytree(request.getfixturevalue("trained_run"), name)
        return {}

    return setup


# The families' stand-ins of docs/weights.md: (family, config.json options, layout).
WEIGHTS_STAND_INS = {
    "Llama-3.2-1B": (
        "llama",
        dict(
            rope_theta=500_000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        "v5",
    ),
    "Mistral-7B-v0.3": ("mistral", dict(rope_theta=1e6, sliding_window=8), "v4"),
    "Qwen2.5-0.5B": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "v5",
    ),
    "Qwen3-0.6B": ("qwen3", dict(head_dim=16), "v5"),
    "Phi-3-mini-4k-instruct": ("phi3", dict(sliding_window=8), "v4"),
    "OLMo-2-0425-1B": ("olmo2", {}, "v5"),
    "SmolLM3-3B": ("smollm3", dict(no_rope_layers=[1, 0]), "v5"),
    "MiMo-7B-RL": ("mimo", dict(num_nextn_predict_layers=1), "v4"),
    "Llama-with-o_proj-bias": ("llama", dict(attention_bias=True), "v4"),
}


def _weights(request) -> dict:
    write_llama_checkpoint("SmolLM2-135M", **TINY_LLAMA, tie_word_embeddings=True)
    for name, (family, options, layout) in WEIGHTS_STAND_INS.items():
        config = family_config(family, layout=layout, **options)
        depths = config.get("num_nextn_predict_layers", 0)
        tensors = random_family_tensors(
            config, seed=0, depths=depths, depth_layout="mimo"
        )
        write_checkpoint(name, config, tensors)
    gemma = pathlib.Path("gemma-3-1b-pt")
    gemma.mkdir()
    (gemma / "config.json").write_text('{"model_type": "gemma3_text"}')
    return {}


SETUP = {
    "README.md": _readme,
    "docs/distributed.md": _distributed,
    "docs/decoding.md": _run_named("runs/a"),
    "docs/training.md": _run_named("runs/20261123-120000"),
    "docs/weights.md": _weights,
}
# Pages with a test of their own below, which runs them and checks what they print.
# (docs/preemption.md: tests/test_own_loop.py)
OWN_TEST = {
    "docs/weights.md",
    "docs/own_trunk.md",
    "docs/preemption.md",
} | set(PRINTS_SHOWN)
# Pages written as a user's script with optax, whose AdamW mixes its int32 step count
# with Python floats: they run under JAX's default dtype promotion, as a user's script
# does, not the suite's strict one.
USER_PROMOTION = {"docs/getting_started.md", "docs/own_trunk.md"}


@pytest.fixture
def page_namespace(request, tmp_path, monkeypatch):
    """`(page) -> namespace`: into a fresh directory, with the page's stand-ins."""
    monkeypatch.chdir(tmp_path)

    def make(page: str) -> dict:
        setup = SETUP.get(page)
        return {} if setup is None else setup(request)

    return make


@pytest.mark.parametrize(
    "page", [p for p in PAGES if page_blocks(p) and p not in OWN_TEST]
)
def test_page_runs(page, page_namespace):
    run_page(page, page_namespace(page))


@pytest.mark.parametrize(
    "block",
    [b for page in PAGES for b in page_blocks(page) if b.skip is not None],
    ids=lambda b: f"{b.page}:{b.line}",
)
def test_skipped_block(block):
    pytest.skip(f"{block.page}:{block.line}: {block.skip}")


def test_every_python_fence_is_read():
    # Counted apart from the extractor: a fence it misread would silently run nothing.
    for page in PAGES:
        fences = re.findall(r"^```python", (ROOT / page).read_text(), re.MULTILINE)
        assert len(page_blocks(page)) == len(fences), page
    assert {"README.md", "docs/index.md", "docs/weights.md"} <= set(PAGES)


def test_weights_page_runs(page_namespace, capsys):
    assert run_page("docs/weights.md", page_namespace("docs/weights.md")) >= 5
    printed = capsys.readouterr().out
    assert "2 2 True" in printed  # layers, depths, tied
    assert "Gemma-3" in printed and "attention_bias" in printed  # refused by name
    assert (
        "Qwen3-0.6B {'rope': None, 'window': None, 'bias': False, 'qk_norm': 'per_head'"
        in printed
    )
    assert "1 after_norm" in printed  # MiMo's depth, with its readers' inputs
    assert "None 128" in printed  # layer 0 attends fully, layer 1 in its window
    assert "[[False  True  True  True  True  True]]" in printed


@pytest.mark.parametrize("page", PRINTS_SHOWN)
def test_page_prints_what_it_shows(page, page_namespace, capsys):
    """A page that shows printed values (the validity rule, the neighbour-pair leak)
    prints exactly those: a changed rule changes the output, and the page says so."""
    shown = re.findall(r"^```text\n(.*?)^```", (ROOT / page).read_text(), re.M | re.S)
    assert shown, page
    assert run_page(page, page_namespace(page)) >= 2
    printed = capsys.readouterr().out
    for block in shown:
        assert block in printed, f"{page} shows\n{block}but printed\n{printed}"


def test_own_trunk_page_runs(capsys):
    """The page's user transformer, two depths of its own block, the one call,
    `reduce_losses` and an optax step: run as written, they train."""
    namespace: dict = {}
    assert run_page("docs/own_trunk.md", namespace) >= 4
    losses = namespace["losses"]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    first, last = namespace["depth_losses"][0], namespace["depth_losses"][-1]
    assert first.shape == last.shape == (3,)  # the main objective and two depths
    # The rows count upwards, so every depth's target is learnable: a step that did
    # not update the depths, or a depth scan that read the wrong embedding, hidden
    # state or target, would leave its loss near log(vocab), not at a quarter of it.
    for k in range(3):
        assert last[k] < 0.25 * first[k], (k, first, last)
    assert "per-depth losses:" in capsys.readouterr().out
