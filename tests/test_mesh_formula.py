"""`benchmarks/_mesh_formula.py`, the collective bytes of a sharded step by formula,
against numbers worked out by hand for two small models and meshes.

The model: vocabulary 64, width 8, one trunk layer and one depth, 2 heads and 1 key/
value head of 4, MLP 16; float32. Its matrices in bytes: q 8×8 = 256, k and v 4×8 =
128 each, o 8×8 = 256, gate and up 16×8 = 512 each, down 8×16 = 512 (a block:
2304); `eh_proj` 8×16 = 512; the embedding 64×8 = 2048; norms 8 × 4 = 32 each, 7 of
them (2 per block, 4 per depth, the final norm)."""

import pytest

from benchmarks._mesh_formula import (
    Setup,
    collective_terms,
    parameter_bytes_per_device,
    pod_costs,
    total_by,
)

SHAPE = dict(
    vocab=64,
    dim=8,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    mlp_dim=16,
    num_depths=1,
    rows=4,
    seq=8,
)


def test_fsdp_only():
    terms = collective_terms(Setup(**SHAPE, data=2))
    by_name = {t["name"]: t["bytes"] for t in terms}
    assert by_name == {
        # gathered forward and backward, every matrix split by data = 2
        "FSDP: trunk block weights, forward + backward": 2 * 2304,
        "FSDP: depth block and eh_proj weights, forward + backward": 2 * (2304 + 512),
        "FSDP: embedding (and an untied unembedding), once a step": 2048,
        # two blocks and one eh_proj, whole, and the 7 norms
        "gradients: block and eh_proj matrices, norms": 2 * 2304 + 512 + 7 * 32,
        # two lookups and two heads, one reduction of the whole table
        "gradients: embedding copies, every lookup and head, reduced once": 2048,
    }
    assert total_by(terms, "group") == {
        "blocks": 4608 + 5632 + 5344,
        "embedding": 2048 + 2048,
    }
    assert total_by(terms, "kind") == {"all-gather": 12288, "all-reduce": 7392}
    assert {t["axis"] for t in terms} == {"data"}


def test_model_and_context():
    terms = collective_terms(Setup(**SHAPE, model=2, context=2))
    by_name = {t["name"]: t["bytes"] for t in terms}
    # T = 4 · 8 / 2 = 16 tokens per device; an activation 16 × 8 × 4 = 512 bytes;
    # 2 heads × 16 tokens = 32 rows of the loss; the table split by model: 1024.
    # Keys and values of the device's rows: 2 × (4 × 8) × 4 / 2 × 4 = 512 per block.
    assert by_name == {
        # context stage: blocks halved by model (eh_proj is not split by it)
        "gradients: block and eh_proj matrices, norms": 2 * 1152 + 512 + 7 * 32,
        # the copies [64 / 2, 8] of the two lookups and two heads, reduced once
        "gradients: embedding copies, every lookup and head, reduced once": 1024,
        "TP: o and down outputs (forward)": 2 * 2 * 512,
        "TP: o and down outputs, again in the rematerialised forward": 2 * 2 * 512,
        "TP: q, k, v, gate, up input gradients (backward)": 2 * 5 * 512,
        "TP: lookups of the vocabulary-sharded embedding": 32 * 8 * 4,
        "loss: max, sum of exps, target logit per token": 32 * 3 * 4,
        "loss: hidden-state gradient psum": 32 * 8 * 4,
        "context: keys and values, gathered in the forward": 2 * 512,
        "context: keys and values, gathered again in the rematerialised forward": (
            2 * 512
        ),
        "context: key and value gradients": 2 * 512,
    }
    assert total_by(terms, "kind") == {"all-reduce": 16736, "all-gather": 2048}
    assert total_by(terms, "group")["embedding"] == 1024
    assert total_by(terms, "axis") == {
        "context": 3040 + 1024 + 3072,
        "model": 2 * 2048 + 5120 + 1024 + 384 + 1024,
    }
    # Without remat neither the keys and values are gathered again nor the o and
    # down outputs all-reduced again.
    kept = collective_terms(Setup(**SHAPE, model=2, context=2, remat="none"))
    assert sum(t["bytes"] for t in kept) == 18784 - 1024 - 2048


def test_untied_unembedding_and_a_padded_vocabulary():
    """An untied unembedding is gathered and its copies reduced once besides the
    embedding's; a vocabulary `model` does not divide is padded in the copies."""
    by_name = {
        t["name"]: t["bytes"]
        for t in collective_terms(Setup(**SHAPE, data=2, tie_embeddings=False))
    }
    assert by_name["FSDP: embedding (and an untied unembedding), once a step"] == (
        2 * 2048
    )
    assert (
        by_name["gradients: embedding copies, every lookup and head, reduced once"]
        == by_name["gradients: untied unembedding copies, every head, reduced once"]
        == 2048
    )
    # vocabulary 63 on model = 2: copies of 32 rows of 8 floats, over data+context
    odd = dict(SHAPE, vocab=63)
    terms = collective_terms(Setup(**odd, data=2, model=2, context=2))
    copies = [t for t in terms if t["name"].startswith("gradients: embedding")]
    assert [(t["axis"], t["kind"], t["bytes"]) for t in copies] == [
        ("data+context", "all-reduce", 32 * 8 * 4)
    ]
    # both [63, 8] matrices, split by data over their width
    assert parameter_bytes_per_device(Setup(**odd, data=2, tie_embeddings=False)) == (
        2 * 63 * 8 * 4 // 2 + 32 + (1152 + 64) + (1152 + 256 + 128)
    )


def test_micro_batches_and_a_single_layer_scan():
    """Per micro-batch terms scale with M; the gathers of a one-layer scan (unrolled,
    hoisted out of the micro-batch loop) do not."""
    one = {t["name"]: t["bytes"] for t in collective_terms(Setup(**SHAPE, data=2))}
    two = collective_terms(Setup(**SHAPE, data=2, micro_batches=2))
    for term in two:
        factor = 1 if term["name"].startswith("FSDP") else 2
        assert term["bytes"] == factor * one[term["name"]], term["name"]


def test_parameter_bytes_per_device():
    # data = 2 splits every matrix but the replicated norms: embedding 1024 + final
    # norm 32, block 1152 + 2 norms, depth 1152 + eh_proj 256 + 4 norms.
    assert parameter_bytes_per_device(Setup(**SHAPE, data=2)) == (
        1024 + 32 + (1152 + 64) + (1152 + 256 + 128)
    )
    assert parameter_bytes_per_device(Setup(**SHAPE)) == 2048 + 32 + 2368 + 2944


def test_bad_setups_name_the_argument():
    with pytest.raises(ValueError, match="remat"):
        Setup(**SHAPE, remat="save_dots")
    with pytest.raises(ValueError, match="gradient_collective"):
        Setup(**SHAPE, gradient_collective="psum")
    with pytest.raises(ValueError, match="rows=4 must be divisible by data=3"):
        Setup(**SHAPE, data=3)


def test_pod_costs_cover_every_mesh_and_model():
    costs = pod_costs()
    assert len(costs) == 3 * 5  # 3 models × (3 meshes + 2 attentions on the last)
    for cost in costs:
        assert cost["total_bytes"] == sum(cost["bytes_by_axis"].values()) > 0
