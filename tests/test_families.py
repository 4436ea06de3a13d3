"""Hugging Face checkpoints of today's dense families, in the `config.json` layouts in
use (published transformers-4 files, what transformers 4.57 writes, transformers 5),
and their MTP depths, against the independent NumPy reference of `tests/hf_reference.py`
(written from transformers' published modeling code, never from ours).

Each family case turns on what makes that family itself (a RoPE scaling, a window,
biases, q/k norms, post-norms, fused projections, NoPE layers) with a θ other than
10000, and names the plausible loader bugs it catches; `test_each_case_can_fail`
shows on the reference that each of those bugs moves the logits far past the
tolerance, so a loader with the bug fails `test_logits_match_reference`.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from family_cases import (
    ATOL,
    CASES,
    LLAMA3,
    RTOL,
    TOKENS,
    YARN,
    config_and_tensors,
    mutated,
)
from hf_reference import (
    FAMILIES,
    LAYOUTS,
    deepseek_depth,
    family_config,
    family_hidden,
    family_logits,
    final_norm,
    mimo_depth,
    random_family_tensors,
    write_checkpoint,
)
from llama_reference import read_llama_checkpoint

import eqx_mtp


def _ours(model, tokens=TOKENS):
    row = jnp.asarray(tokens)
    hidden = model.trunk(
        row, positions=jnp.arange(row.shape[0]), segment_ids=jnp.ones_like(row)
    )
    return np.asarray(hidden), np.asarray(model.trunk.logits(hidden))


def _arrays(model):
    return eqx.filter(model, eqx.is_array)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """`loaded(family, layout)` -> `(directory, config, tensors, model)`, each
    checkpoint written and loaded once per module."""
    cache = {}

    def get(family, layout):
        if (family, layout) not in cache:
            config, tensors = config_and_tensors(family, layout)
            directory = tmp_path_factory.mktemp(f"{family}-{layout}")
            write_checkpoint(directory, config, tensors)
            model = eqx_mtp.interop.load_hf_checkpoint(directory)
            cache[family, layout] = directory, config, tensors, model
        return cache[family, layout]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(loaded, family, layout):
    # Catches each bug its case in `CASES` names (`test_each_case_can_fail`), and q/k
    # norms applied after RoPE instead of before: norm weights are random, so
    # `rope(q̂) · w` and `rope(q̂ · w)` differ.
    _, config, tensors, model = loaded(family, layout)
    # No depths stored, none loaded, and no key needed for them.
    assert model.config.num_depths == config.get("num_nextn_predict_layers", 0)
    hidden, logits = _ours(model)
    np.testing.assert_allclose(
        hidden, family_hidden(tensors, config, TOKENS), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        logits, family_logits(tensors, config, TOKENS), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_windows_in_each_attention_impl(loaded, family, impl):
    # The windowed families through both attention paths, blockwise with tiles of 4
    # so that whole tiles fall outside the window of 5 (Mistral) or 4 (Qwen2's layer
    # 1): catches a window off by one in either mask, and tiles skipped that hold
    # keys in the window.
    directory, config, tensors, _ = loaded(family, "v5")
    model = eqx_mtp.interop.load_hf_checkpoint(
        directory, attention_impl=impl, attention_block_size=4
    )
    _, logits = _ours(model)
    np.testing.assert_allclose(
        logits, family_logits(tensors, config, TOKENS), rtol=RTOL, atol=ATOL
    )


ROPE_VARIANTS = {
    # YaRN with every optional field: custom ramp, no truncation, and the attention
    # factor from mscale / mscale_all_dim (catches fields read but not applied, or
    # their defaults applied instead).
    "yarn-all-fields": (
        "v5",
        dict(
            rope_scaling=YARN
            | dict(beta_fast=8, beta_slow=2, truncate=False, mscale=2.0)
            | dict(mscale_all_dim=0.5),
        ),
    ),
    # An older transformers-4 file: `type` for `rope_type`, linear scaling.
    "linear-type-key": (
        "v4",
        dict(rope_scaling=dict(rope_type="linear", factor=3.0), legacy_type_key=True),
    ),
    # llama3 without original_max_position_embeddings: transformers 5 uses
    # max_position_embeddings (catches the loader keeping some other default).
    "llama3-original-from-max-position": (
        "v5",
        dict(
            rope_scaling={k: v for k, v in LLAMA3.items() if "original" not in k},
            max_position_embeddings=512,
        ),
    ),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_variants(tmp_path, variant):
    layout, options = ROPE_VARIANTS[variant]
    config = family_config("llama", layout=layout, rope_theta=200.0, **options)
    tensors = random_family_tensors(config, seed=5)
    model = eqx_mtp.interop.load_hf_checkpoint(
        write_checkpoint(tmp_path, config, tensors)
    )
    _, logits = _ours(model)
    reference = family_logits(tensors, config, TOKENS)
    np.testing.assert_allclose(logits, reference, rtol=RTOL, atol=ATOL)
    # The scaling changes the logits (the test can fail).
    unscaled = family_config("llama", layout=layout, rope_theta=200.0)
    plain = family_logits(tensors, unscaled, TOKENS)
    assert np.max(np.abs(plain - reference)) > 100 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_each_case_can_fail(family):
    """Every bug `CASES` names moves the reference logits by more than 100 times the
    tolerance: a loader with that bug cannot pass `test_logits_match_reference`."""
    _, bugs = CASES[family]
    for layout in LAYOUTS:
        config, tensors = config_and_tensors(family, layout)
        right = family_logits(tensors, config, TOKENS)
        for bug, mutation in bugs.items():
            wrong = family_logits(*mutated(config, tensors, mutation), TOKENS)
            gap = np.max(np.abs(wrong - right) / (ATOL + RTOL * np.abs(right)))
            assert gap > 100, f"{family} {layout}: {bug!r} moves logits by {gap:.1f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(loaded, tmp_path, family):
    # Catches a writer that drops or renames what the reader reads (θ to the wrong
    # key, the scaling or the window not written, fused halves concatenated in the
    # wrong order, the NoPE flags inverted): both our reader and the reference read
    # the written files.
    _, _, _, model = loaded(family, "v5")
    eqx_mtp.interop.save_hf_checkpoint(model, tmp_path, family=family)
    again = eqx_mtp.interop.load_hf_checkpoint(tmp_path)
    assert again.config == model.config
    assert eqx.tree_equal(_arrays(again), _arrays(model))
    tensors, config = read_llama_checkpoint(tmp_path)
    assert config["model_type"] == family
    _, logits = _ours(model)
    np.testing.assert_allclose(
        logits, family_logits(tensors, config, TOKENS), rtol=RTOL, atol=ATOL
    )


REFUSED_KEYS = [
    # A forward-changing key of another family (Gemma-2's soft-capping).
    ("llama", "v5", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    # A key nobody knows yet, top level and inside rope_parameters.
    ("qwen2", "v4", {"rope_foo": 1.0}, "rope_foo"),
    (
        "mistral",
        "v5",
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "rope_foo": 2.0,
            }
        },
        "rope_foo",
    ),
    # RoPE kinds the trunk does not compute.
    (
        "llama",
        "v4",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        "dynamic",
    ),
    (
        "phi3",
        "v4",
        {
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 4,
            }
        },
        "longrope",
    ),
    ("llama", "v4", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act"),
    # Partial rotary (Phi-3 allows it; the trunk rotates whole heads).
    ("phi3", "v4", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
]


@pytest.mark.parametrize(
    ("family", "layout", "extra", "named"),
    REFUSED_KEYS,
    ids=[f"{f}-{named}" for f, _, _, named in REFUSED_KEYS],
)
def test_unknown_forward_keys_are_refused_by_name(family, layout, extra, named):
    hf = family_config(family, layout=layout, extra=extra)
    with pytest.raises(eqx_mtp.interop.WeightsError, match=named):
        eqx_mtp.interop.model_config_from_hf(hf)


def test_rope_settings_are_read_from_either_layout():
    # θ read from the top level only loads a transformers-5 file with 10000.
    for theta in (1e6, 500.0):
        v5 = family_config("llama", layout="v5", rope_theta=theta)
        assert "rope_theta" not in v5
        assert eqx_mtp.interop.model_config_from_hf(v5).rope_theta == theta
    # Older transformers-4 files say `type`, not `rope_type`.
    v4 = family_config(
        "llama",
        layout="v4",
        rope_scaling=LLAMA3,
        max_position_embeddings=1024,
        legacy_type_key=True,
    )
    scaling = eqx_mtp.interop.model_config_from_hf(v4).rope_scaling
    assert scaling is not None and scaling.kind == "llama3"
    assert scaling.original_max_position == 256 and scaling.factor == 8.0


def test_absent_keys_take_the_family_defaults():
    # A loader that fills absent keys with Llama's defaults reads these wrong.
    def read(family, absent, layout="v4", **options):
        hf = family_config(family, layout=layout, **options)
        del hf[absent]
        return eqx_mtp.interop.model_config_from_hf(hf)

    # SmolLM3's θ is 2e6, not 10000.
    assert read("smollm3", "rope_theta").rope_theta == 2_000_000.0
    # Qwen3's head_dim is 128, not hidden_size / heads.
    assert read("qwen3", "head_dim").head_dim == 128
    # SmolLM3 ties its embeddings (transformers 4.57 leaves the key out).
    assert read("smollm3", "tie_word_embeddings").tie_embeddings
    assert not read("llama", "tie_word_embeddings").tie_embeddings
    # Mistral's window is 4096 (Mistral-7B-v0.1's files spell it out).
    mistral = read("mistral", "sliding_window", max_position_embeddings=8192)
    assert mistral.window(0) == 4096


def test_phi3_fused_projections_split_like_separate_ones(tmp_path):
    # The same weights stored fused (Phi-3: qkv_proj = [q; k; v] rows, gate_up_proj =
    # [gate; up] rows) and separate (Llama names) load into the same model: catches
    # swapped halves and a q/k/v split at the wrong rows.
    config, fused = config_and_tensors("phi3", "v5", sliding_window=None)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    separate = {}
    for name, value in fused.items():
        if name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            separate[stem + "q_proj.weight"] = value[:q_rows]
            separate[stem + "k_proj.weight"] = value[q_rows : q_rows + kv_rows]
            separate[stem + "v_proj.weight"] = value[q_rows + kv_rows :]
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            gate, up = np.split(value, 2)
            separate[stem + "gate_proj.weight"], separate[stem + "up_proj.weight"] = (
                gate,
                up,
            )
        else:
            separate[name] = value
    llama = family_config(
        "llama", layout="v5", rope_theta=300.0, rms_norm_eps=config["rms_norm_eps"]
    )
    phi3_model = eqx_mtp.interop.load_hf_checkpoint(
        write_checkpoint(tmp_path / "phi3", config, fused)
    )
    llama_model = eqx_mtp.interop.load_hf_checkpoint(
        write_checkpoint(tmp_path / "llama", llama, separate)
    )
    assert eqx.tree_equal(_arrays(phi3_model), _arrays(llama_model))


@pytest.mark.parametrize("model_type", ["gemma3", "gemma3_text", "gemma2"])
def test_gemma_is_refused_by_name(model_type):
    hf = family_config("llama", layout="v5", extra={"model_type": model_type})
    with pytest.raises(eqx_mtp.interop.WeightsError, match=model_type):
        eqx_mtp.interop.model_config_from_hf(hf)


# ------------------------------------------------------------------------ MTP depths

# Which state each layout's reference implementation feeds (the docs' conventions
# table): DeepSeek-V3 names as transformers' `MtpModel` / SGLang read them, MiMo's
# as vLLM / SGLang do: the trunk after its final norm, the previous depth after its
# own norm.
LAYOUT_INPUTS = {
    "deepseek_v3": ("after_norm", "after_norm"),
    "mimo": ("after_norm", "after_norm"),
}
DEPTH_CASES = [
    ("mimo", "mimo", {}),
    ("qwen2", "deepseek_v3", {}),
    ("llama", "deepseek_v3", {}),
    # Our own convention (MaxText's), asked for explicitly on a foreign layout.
    (
        "llama",
        "deepseek_v3",
        dict(depth_trunk_input="before_norm", depth_previous_input="before_norm"),
    ),
]


def _depth_reference(layout, tensors, config, inputs, num_depths):
    """Each depth's logits from the layout's reference, fed per `inputs`."""
    depth = mimo_depth if layout == "mimo" else deepseek_depth
    trunk = family_hidden(tensors, config, TOKENS)
    state = final_norm(tensors, config, trunk) if inputs[0] == "after_norm" else trunk
    logits = []
    for k in range(1, num_depths + 1):
        block, normed, out = depth(tensors, config, TOKENS, state, k)
        state = normed if inputs[1] == "after_norm" else block
        logits.append(out)
    return logits


@pytest.mark.parametrize(
    ("family", "layout", "overrides"),
    DEPTH_CASES,
    ids=["mimo", "qwen2-deepseek", "llama-deepseek", "llama-deepseek-before-norm"],
)
def test_stored_depths_match_their_layouts_reference(
    tmp_path, family, layout, overrides
):
    # Catches the MiMo concatenation order swapped ([embedding; hidden]), depth k read
    # from the wrong `mtp_layers` index (0- vs 1-based), the convention of the layout
    # not applied (the trunk state before instead of after the final norm; the
    # previous depth raw instead of normed), and the depth block missing the
    # family's biases.
    num_depths = 2
    config, tensors = config_and_tensors(
        family, "v5", depth_layout=layout, num_nextn_predict_layers=num_depths
    )
    write_checkpoint(tmp_path, config, tensors)
    model = eqx_mtp.interop.load_hf_checkpoint(tmp_path, **overrides)
    inputs = LAYOUT_INPUTS[layout]
    if overrides:
        inputs = (overrides["depth_trunk_input"], overrides["depth_previous_input"])
    assert model.config.num_depths == num_depths and model.config.depth_final_norm
    assert (model.config.depth_trunk_input, model.config.depth_previous_input) == inputs

    hidden, _ = _ours(model)
    head = model.trunk.unembedding_matrix
    ours = eqx_mtp.scan_depths(
        model.depths,
        jnp.asarray(hidden)[None],
        jnp.asarray(TOKENS)[None],
        embedding=model.trunk.embedding,
        final_norm=model.trunk.final_norm,
        readout=lambda k, normed: normed @ head.T,
    )
    references = _depth_reference(layout, tensors, config, inputs, num_depths)
    for k, reference in enumerate(references, start=1):
        valid = len(TOKENS) - k
        np.testing.assert_allclose(
            np.asarray(ours[k - 1, 0, :valid]), reference, rtol=RTOL, atol=ATOL
        )

    # Written back under the same layout's names, the depths give the layout's
    # reference the same logits (catches the writer swapping the concatenation
    # halves or numbering `mtp_layers` from 1).
    if overrides:
        # Depths that read other states than the layout's readers feed: written
        # with a warning (our loader reads the convention back from config.json).
        with pytest.warns(UserWarning, match="depth_trunk_input"):
            eqx_mtp.interop.save_hf_checkpoint(model, tmp_path / "again", family=family)
    else:
        eqx_mtp.interop.save_hf_checkpoint(model, tmp_path / "again", family=family)
    again = eqx_mtp.interop.load_hf_checkpoint(tmp_path / "again")
    assert eqx.tree_equal(_arrays(again), _arrays(model))
    written, written_config = read_llama_checkpoint(tmp_path / "again")
    assert written_config.get("num_nextn_predict_layers") == num_depths
    rewritten = _depth_reference(layout, written, written_config, inputs, num_depths)
    for reference, before in zip(rewritten, references):
        np.testing.assert_allclose(reference, before, rtol=RTOL, atol=ATOL)


def test_depth_conventions_and_mimo_order_can_fail():
    """On the reference: the MiMo order swapped, and each convention flipped, move the
    depths' logits far past the tolerance."""
    num_depths = 2
    config, tensors = config_and_tensors("mimo", "v5", num_nextn_predict_layers=2)
    right = _depth_reference("mimo", tensors, config, LAYOUT_INPUTS["mimo"], 2)
    flips = [("before_norm", "after_norm"), ("after_norm", "before_norm")]
    for inputs in flips:
        wrong = _depth_reference("mimo", tensors, config, inputs, num_depths)
        depth = 0 if inputs[0] == "before_norm" else 1
        assert np.max(np.abs(wrong[depth] - right[depth])) > 100 * ATOL
    # The MiMo concatenation order swapped = the same weights read in DeepSeek's
    # [embedding; hidden] order.
    swapped = dict(tensors)
    for name, value in tensors.items():
        if name.endswith("input_proj.weight"):
            swapped[name] = np.concatenate(np.split(value, 2, axis=1)[::-1], axis=1)
    wrong = _depth_reference("mimo", swapped, config, LAYOUT_INPUTS["mimo"], 1)
    assert np.max(np.abs(wrong[0] - right[0])) > 100 * ATOL


def test_announced_depths_that_are_absent_load_the_trunk(tmp_path):
    # A file re-saved by transformers keeps `num_nextn_predict_layers` but drops the
    # depths: the trunk loads, with a warning naming the key, and no depths.
    config, tensors = config_and_tensors(
        "qwen2", "v5", depths=0, num_nextn_predict_layers=1
    )
    write_checkpoint(tmp_path, config, tensors)
    with pytest.warns(UserWarning, match="num_nextn_predict_layers"):
        model = eqx_mtp.interop.load_hf_checkpoint(tmp_path)
    assert model.config.num_depths == 0
    _, logits = _ours(model)
    np.testing.assert_allclose(
        logits, family_logits(tensors, config, TOKENS), rtol=RTOL, atol=ATOL
    )
