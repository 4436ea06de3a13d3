"""Bring your own weights: Hugging Face Llama checkpoints (trunk + DeepSeek-V3 depths)
in and out, and MaxText's MTP parameters and loss mask.

The oracles are independent: `tests/llama_reference.py` writes checkpoints and runs a
float64 NumPy forward written from the published architectures, and the MaxText
checks below are written from the convention table of `docs/weights.md`. Bugs each test
catches:
a transposed kernel, swapped concat halves, rope in the wrong layout, kv heads tiled
instead of interleaved, a norm epsilon left at ours, the mask not shifted by one.
"""

import json
import os
import stat

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import tiny_config
from llama_reference import (
    _rms_norm as rms_norm_reference,
    add_random_mtp_depths,
    deepseek_mtp_depth_logits,
    llama_config,
    llama_hidden,
    llama_logits,
    random_llama_tensors,
    tiny_llama,
    write_llama_checkpoint,
)

import eqx_mtp

# Two layers, 4 heads over 2 KV heads, and a rope theta and norm epsilon other than
# the defaults, so that a loader keeping either default is caught.
SIZES = tiny_llama(
    vocab_size=23,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)
TOKENS = np.array([3, 17, 0, 22, 5, 5, 9, 1, 14, 2, 8, 20], np.int32)


def _arrays(model):
    return eqx.filter(model, eqx.is_array)


def _trunk_hidden_and_logits(model, tokens):
    row = jnp.asarray(tokens)
    positions = jnp.arange(row.shape[0])
    segment_ids = jnp.ones_like(row)
    hidden = model.trunk(row, positions=positions, segment_ids=segment_ids)
    return np.asarray(hidden), np.asarray(model.trunk.logits(hidden))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=False, mtp_kind="parallel"),
        dict(tie_embeddings=False, depth_final_norm=True),
        dict(mtp_kind="parallel", shared_depth_layer=True),
        dict(mtp_block="mlp", depth_final_norm=True),
    ],
    ids=["tied-seq", "untied-par", "untied-seq-norm", "shared-par", "mlp"],
)
def test_round_trip_is_bit_exact(tmp_path, getkey, overrides):
    config = tiny_config(num_layers=2, **overrides)
    model = eqx_mtp.MTPModel(config, key=getkey())
    # Move every norm off 1 so a norm loaded into the wrong slot shows.
    model = jax.tree_util.tree_map(
        lambda x: x + jax.random.normal(getkey(), x.shape) * 0.1, model
    )
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    eqx_mtp.interop.save_llama(model, single)
    eqx_mtp.interop.save_llama(model, sharded, max_shard_bytes=2_000)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    for directory in (single, sharded):
        loaded = eqx_mtp.interop.load_llama(directory)
        assert loaded.config == config
        assert eqx.tree_equal(_arrays(loaded), _arrays(model))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        eqx_mtp.interop.save_llama(model, single)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shards", [1, 3])
def test_loaded_trunk_matches_an_independent_llama_forward(tmp_path, tied, shards):
    tensors = write_llama_checkpoint(
        tmp_path, **SIZES, tie_word_embeddings=tied, shards=shards, seed=3
    )
    config = llama_config(**SIZES, tie_word_embeddings=tied)
    model = eqx_mtp.interop.load_llama(tmp_path, key=jax.random.key(0), num_depths=1)
    assert model.config.num_kv_heads == 2 and model.config.norm_eps == 1e-5
    hidden, logits = _trunk_hidden_and_logits(model, TOKENS)
    np.testing.assert_allclose(
        hidden, llama_hidden(tensors, config, TOKENS), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        logits, llama_logits(tensors, config, TOKENS), rtol=1e-5, atol=1e-5
    )


def test_bfloat16_checkpoint_loads_into_float32(tmp_path):
    tensors = write_llama_checkpoint(tmp_path, **SIZES, dtype=ml_dtypes.bfloat16)
    model = eqx_mtp.interop.load_llama(tmp_path, key=jax.random.key(0))
    assert model.trunk.embedding.dtype == jnp.float32
    _, logits = _trunk_hidden_and_logits(model, TOKENS)
    reference = llama_logits(tensors, llama_config(**SIZES), TOKENS)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("copies", [False, True], ids=["plain", "with-head-copies"])
def test_stored_depths_match_deepseek_mtp(tmp_path, copies):
    num_depths = 2
    extra = {"num_nextn_predict_layers": num_depths}
    config = llama_config(**SIZES, extra_config=extra)
    tensors = add_random_mtp_depths(
        random_llama_tensors(config, seed=0),
        config,
        num_depths,
        seed=1,
        with_shared_head=copies,
    )
    write_llama_checkpoint(
        tmp_path, **SIZES, extra_config=extra, extra_tensors=tensors, shards=2
    )
    model = eqx_mtp.interop.load_llama(tmp_path)
    assert model.config.num_depths == num_depths and model.config.depth_final_norm

    hidden, _ = _trunk_hidden_and_logits(model, TOKENS)
    head = model.trunk.unembedding_matrix
    ours = eqx_mtp.scan_depths(
        model.depths,
        jnp.asarray(hidden)[None],
        jnp.asarray(TOKENS)[None],
        embedding=model.trunk.embedding,
        final_norm=model.trunk.final_norm,
        readout=lambda k, normed: normed @ head.T,
    )
    # Transformers' MtpModel, which reads these names: depth 1 reads the trunk's
    # state after `model.norm`, depth k > 1 depth k - 1's after its
    # `shared_head.norm` (the raw states here would be MaxText's convention).
    eps = config["rms_norm_eps"]
    hidden_ref = llama_hidden(tensors, config, TOKENS)
    previous = rms_norm_reference(hidden_ref, tensors["model.norm.weight"], eps)
    for k in range(1, num_depths + 1):
        h_k, reference = deepseek_mtp_depth_logits(
            tensors, config, TOKENS, previous, k, num_layers=SIZES["num_layers"]
        )
        depth_layer = f"model.layers.{SIZES['num_layers'] + k - 1}"
        own_norm = tensors[f"{depth_layer}.shared_head.norm.weight"]
        previous = rms_norm_reference(h_k, own_norm, eps)
        valid = len(TOKENS) - k
        np.testing.assert_allclose(
            np.asarray(ours[k - 1, 0, :valid]), reference, rtol=1e-5, atol=1e-5
        )

    # Fewer depths than stored: the later ones are left out; more: new ones added.
    assert eqx_mtp.interop.load_llama(tmp_path, num_depths=1).config.num_depths == 1
    with pytest.raises(ValueError, match="need a key"):
        eqx_mtp.interop.load_llama(tmp_path, num_depths=3)
    grown = eqx_mtp.interop.load_llama(tmp_path, num_depths=3, key=jax.random.key(0))
    np.testing.assert_array_equal(
        grown.depths.depths.eh_proj.weight[:2], model.depths.depths.eh_proj.weight
    )


def test_new_depths_are_initialised_like_a_fresh_model(tmp_path, getkey):
    config = tiny_config(num_layers=2, num_depths=2)
    key = getkey()
    fresh = eqx_mtp.MTPModel(config, key=key)
    # The same key gives the same trunk whatever the number of depths.
    trunk_only = eqx_mtp.MTPModel(tiny_config(num_layers=2, num_depths=0), key=key)
    eqx_mtp.interop.save_llama(trunk_only, tmp_path)
    loaded = eqx_mtp.interop.load_llama(tmp_path, num_depths=2, key=key)
    assert eqx.tree_equal(_arrays(loaded), _arrays(fresh))


UNSUPPORTED = [
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("sliding_window", 4096),
    ("num_local_experts", 8),
    ("n_routed_experts", 256),
    ("hidden_act", "gelu"),
    ("partial_rotary_factor", 0.5),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}),
]


@pytest.mark.parametrize(
    ("field", "value"), UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED]
)
def test_unrepresentable_configs_are_refused(tmp_path, field, value):
    write_llama_checkpoint(tmp_path, **SIZES, extra_config={field: value})
    with pytest.raises(eqx_mtp.interop.WeightsError, match=field):
        eqx_mtp.interop.load_llama(tmp_path, key=jax.random.key(0))


def test_checkpoints_the_model_cannot_hold_are_refused(tmp_path):
    config = llama_config(**SIZES)
    tensors = random_llama_tensors(config, seed=0)

    def attempt(name, stored):
        directory = tmp_path / name
        write_llama_checkpoint(directory, **SIZES, extra_tensors=stored)
        return directory

    biased = tensors | {
        "model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)
    }
    with pytest.raises(eqx_mtp.interop.WeightsError, match=r"q_proj\.bias"):
        eqx_mtp.interop.load_llama(attempt("bias", biased), key=jax.random.key(0))

    wrong = tensors | {"model.layers.1.mlp.up_proj.weight": np.zeros((25, 16))}
    with pytest.raises(eqx_mtp.interop.WeightsError, match=r"up_proj\.weight.*shape"):
        eqx_mtp.interop.load_llama(attempt("shape", wrong), key=jax.random.key(0))

    with pytest.raises(eqx_mtp.interop.WeightsError, match="config.json"):
        eqx_mtp.interop.load_llama(tmp_path / "missing", key=jax.random.key(0))
    with pytest.raises(TypeError, match="directory"):
        eqx_mtp.interop.load_llama(3, key=jax.random.key(0))


def test_missing_tensors_are_named(tmp_path):
    write_llama_checkpoint(tmp_path, **SIZES)
    from safetensors.numpy import load_file, save_file

    stored = load_file(tmp_path / "model.safetensors")
    del stored["model.layers.1.input_layernorm.weight"]
    del stored["lm_head.weight"]
    save_file(stored, tmp_path / "model.safetensors")
    with pytest.raises(eqx_mtp.interop.WeightsError, match="no lm_head.weight"):
        eqx_mtp.interop.load_llama(tmp_path, key=jax.random.key(0))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        eqx_mtp.interop.WeightsError, match=r"layers\.1\.input_layernorm"
    ):
        eqx_mtp.interop.load_llama(tmp_path, key=jax.random.key(0))


def test_a_depth_head_copy_that_differs_is_refused(tmp_path):
    extra = {"num_nextn_predict_layers": 1}
    config = llama_config(**SIZES, extra_config=extra)
    tensors = add_random_mtp_depths(
        random_llama_tensors(config), config, 1, with_shared_head=True
    )
    name = f"model.layers.{SIZES['num_layers']}.shared_head.head.weight"
    tensors[name] = tensors[name] * 2
    write_llama_checkpoint(tmp_path, **SIZES, extra_config=extra, extra_tensors=tensors)
    with pytest.raises(eqx_mtp.interop.WeightsError, match="shared_head.head.weight"):
        eqx_mtp.interop.load_llama(tmp_path)


# ----------------------------------------------------------------------- MaxText


def _maxtext_rms(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _maxtext_tree(rng, dim, vocab, num_depths, *, tied, old_names):
    """A MaxText-style parameter tree with random arrays, laid out as MaxText's code
    does.
    `old_names` uses `mtp_{k}_…` keys, else the NNX attribute names."""

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    block = {}
    for k in range(1, num_depths + 1):
        names = (
            (
                f"mtp_{k}_embedding_norm",
                f"mtp_{k}_hidden_state_norm",
                f"mtp_{k}_projection",
            )
            if old_names
            else ("embedding_norm", "hidden_state_norm", "projection_layer")
        )
        block[f"mtp_layer_{k}"] = {
            names[0]: {"scale": 1 + normal(dim)},
            names[1]: {"scale": 1 + normal(dim)},
            names[2]: {"kernel": normal(2 * dim, dim)},
        }
    decoder = {"decoder_norm": {"scale": 1 + normal(dim)}}
    if not tied:
        decoder["logits_dense"] = {"kernel": normal(dim, vocab)}
    return {
        "params": {
            "token_embedder": {"embedding": normal(vocab, dim)},
            "decoder": decoder,
            "mtp_block": block,
        }
    }


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("old_names", [True, False], ids=["mtp_k_names", "nnx_names"])
def test_maxtext_conventions(getkey, tied, old_names):
    rng = np.random.default_rng(0)
    config = tiny_config(tie_embeddings=tied)
    dim, vocab = config.dim, config.vocab_size
    tree = _maxtext_tree(
        rng, dim, vocab, config.num_depths, tied=tied, old_names=old_names
    )
    params = tree["params"]
    model = eqx_mtp.interop.load_maxtext_mtp(
        eqx_mtp.MTPModel(config, key=getkey()), tree
    )
    eps = 1e-5

    # Small activations, so that an epsilon left at ours (1e-6) shows.
    hidden = (0.01 * rng.standard_normal((6, dim))).astype(np.float32)
    embedded = (0.01 * rng.standard_normal((6, dim))).astype(np.float32)
    for k in range(1, config.num_depths + 1):
        layer = params["mtp_block"][f"mtp_layer_{k}"]
        scales = [value for name, value in layer.items() if "norm" in name]
        kernel = next(v["kernel"] for n, v in layer.items() if "proj" in n)
        # MaxText: concat([embedding_norm(e) ; hidden_state_norm(h)]) @ kernel.
        expected = (
            np.concatenate(
                [
                    _maxtext_rms(embedded, scales[0]["scale"], eps),
                    _maxtext_rms(hidden, scales[1]["scale"], eps),
                ],
                axis=-1,
            )
            @ kernel
        )
        ours = model.depths.depth(k - 1).layer_input(
            jnp.asarray(hidden), jnp.asarray(embedded)
        )
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)

    head = (
        params["token_embedder"]["embedding"].T
        if tied
        else params["decoder"]["logits_dense"]["kernel"]
    )
    expected_logits = (
        _maxtext_rms(hidden, params["decoder"]["decoder_norm"]["scale"], eps) @ head
    )
    np.testing.assert_allclose(
        np.asarray(model.trunk.logits(jnp.asarray(hidden))),
        expected_logits,
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        np.asarray(model.trunk.embedding), params["token_embedder"]["embedding"]
    )


def test_maxtext_refusals(getkey):
    rng = np.random.default_rng(1)
    config = tiny_config()
    model = eqx_mtp.MTPModel(config, key=getkey())
    tree = _maxtext_tree(
        rng, config.dim, config.vocab_size, 2, tied=True, old_names=True
    )
    with_layer = {
        **tree["params"],
        "mtp_block": {
            **tree["params"]["mtp_block"],
            "mtp_layer_1": {
                **tree["params"]["mtp_block"]["mtp_layer_1"],
                "mtp_1_transformer_layer": {"mlp": {"wo": {"kernel": np.zeros(3)}}},
            },
        },
    }
    with pytest.raises(ValueError, match="keep_depth_blocks=True"):
        eqx_mtp.interop.load_maxtext_mtp(model, with_layer)
    kept = eqx_mtp.interop.load_maxtext_mtp(model, with_layer, keep_depth_blocks=True)
    kept_leaves = jax.tree_util.tree_leaves(_arrays(kept.depths.depths.layer))
    own_leaves = jax.tree_util.tree_leaves(_arrays(model.depths.depths.layer))
    assert all(map(np.array_equal, kept_leaves, own_leaves))
    assert kept.config.norm_eps == 1e-5

    three = _maxtext_tree(
        rng, config.dim, config.vocab_size, 3, tied=True, old_names=True
    )
    with pytest.raises(ValueError, match="mtp_layer_3 beyond num_depths=2"):
        eqx_mtp.interop.load_maxtext_mtp(model, three)
    untied = _maxtext_tree(
        rng, config.dim, config.vocab_size, 2, tied=False, old_names=True
    )
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        eqx_mtp.interop.load_maxtext_mtp(model, untied)
    narrow = _maxtext_tree(rng, 8, config.vocab_size, 2, tied=True, old_names=True)
    with pytest.raises(ValueError, match="shape"):
        eqx_mtp.interop.load_maxtext_mtp(model, narrow)
    parallel = eqx_mtp.MTPModel(tiny_config(mtp_kind="parallel"), key=getkey())
    with pytest.raises(ValueError, match="sequential"):
        eqx_mtp.interop.load_maxtext_mtp(parallel, tree)


def _maxtext_depth_sums(logits_per_depth, targets, target_mask, segment_ids):
    """MaxText's per-depth sums and counts, from its code:
    at depth k the targets and the target-indexed mask are rolled left k times
    (zero-filled) and the cross-entropy of every position is weighted by the mask."""
    sums, counts = [], []
    rolled_targets, rolled_mask = targets.copy(), target_mask.copy()
    for logits in logits_per_depth:
        rolled_targets = np.concatenate(
            [rolled_targets[:, 1:], 0 * rolled_targets[:, :1]], 1
        )
        rolled_mask = np.concatenate([rolled_mask[:, 1:], 0 * rolled_mask[:, :1]], 1)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        chosen = np.take_along_axis(log_probs, rolled_targets[..., None], -1)[..., 0]
        weight = (rolled_mask != 0).astype(np.float64)
        sums.append(float(-(chosen * weight).sum()))
        counts.append(float(weight.sum()))
    return np.array(sums), np.array(counts)


def test_maxtext_mask_gives_maxtexts_sums(getkey):
    """One document per row: MaxText's target-indexed mask, turned into our loss_mask,
    gives the per-depth sums and counts MaxText computes from the same logits."""
    config = tiny_config(num_depths=2, tie_embeddings=False)
    model = eqx_mtp.MTPModel(config, key=getkey())
    batch, seq = 2, 12
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], 1)
    # MaxText's mask: segment id 1 where position i's target exists and counts.
    target_mask = np.ones((batch, seq), np.int32)
    target_mask[:, -1] = 0
    target_mask[0, 4] = 0  # token 5 of row 0 is not a target
    target_mask[1, 7:] = 0  # row 1's tokens from 8 on are padding
    segment_ids = np.ones((batch, seq), np.int32)

    hidden = jax.vmap(
        lambda row: model(
            row, positions=jnp.arange(seq), segment_ids=jnp.ones_like(row)
        )
    )(jnp.asarray(tokens))
    head = model.trunk.unembedding_matrix
    loss_mask = eqx_mtp.interop.maxtext_loss_mask(target_mask)
    assert loss_mask.dtype == jnp.bool_
    sums, counts = eqx_mtp.mtp_depth_losses(
        model.depths,
        hidden,
        jnp.asarray(tokens),
        embedding=model.trunk.embedding,
        unembedding=head,
        final_norm=model.trunk.final_norm,
        loss_mask=loss_mask,
    )
    # The depths' logits, without the validity rule (one document per row), are
    # the same arrays for both conventions; MaxText's code path is the reference.
    logits = eqx_mtp.scan_depths(
        model.depths,
        hidden,
        jnp.asarray(tokens),
        embedding=model.trunk.embedding,
        final_norm=model.trunk.final_norm,
        readout=lambda k, normed: normed @ head.T,
    )
    expected_sums, expected_counts = _maxtext_depth_sums(
        np.asarray(logits, np.float64), targets, target_mask, segment_ids
    )
    np.testing.assert_allclose(np.asarray(counts), expected_counts)
    np.testing.assert_allclose(np.asarray(sums), expected_sums, rtol=1e-5)
    with pytest.raises((ValueError, TypeError), match="decoder_target_mask"):
        eqx_mtp.interop.maxtext_loss_mask(target_mask[0])


def test_saved_files_have_the_modes_of_the_users_other_files(tmp_path, getkey):
    """safetensors creates its files readable by their owner only; a checkpoint
    meant for other readers (a serving engine, a colleague) gets the mode every file
    the user writes gets from the umask, as config.json does."""
    model = eqx_mtp.MTPModel(tiny_config(), key=getkey())
    old = os.umask(0o022)
    try:
        eqx_mtp.interop.save_hf_checkpoint(model, tmp_path / "one")
        eqx_mtp.interop.save_hf_checkpoint(
            model, tmp_path / "shards", max_shard_bytes=1
        )
    finally:
        os.umask(old)
    for directory in ("one", "shards"):
        files = sorted((tmp_path / directory).iterdir())
        assert len(files) >= 2
        for file in files:
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
