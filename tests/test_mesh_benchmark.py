"""`benchmarks/mesh.py` on one mesh of the suite's 8 CPU devices: the formula of
`benchmarks/_mesh_formula.py` against the collectives XLA compiles for the product's
sharded step. This catches the formula drifting from what the library does (a new
collective, a collective that moved) as well as a broken benchmark."""

import argparse
import pathlib
import sys

import jax
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def mesh_benchmark():
    # The scripts import their siblings by name, as `python benchmarks/mesh.py` does.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import mesh

        yield mesh
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_formula_within_10_percent_of_the_hlo_on_a_context_mesh(mesh_benchmark):
    """(1, 1, 8): the mesh whose keys and values `remat="full"` gathers again in the
    backward pass; the tied embedding's collectives read from the HLO by shape
    equal the formula's embedding terms: its gradient, summed over both lookups
    and both heads, reduced once."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    args = argparse.Namespace(
        dim=64, mlp_dim=128, layers=1, vocab=1024, heads=4, kv_heads=4, depths=1,
        micro_batches=1, batch=8, seq=32,
    )  # fmt: skip
    config = mesh_benchmark._config(args)
    assert config.remat == "full"  # the default policy
    record = mesh_benchmark.measure(args, config, (1, 1, 8), jax.devices())
    hlo, formula = record["hlo"]["total"], record["formula"]["total"]
    assert 0.9 <= formula / hlo <= 1.1, (formula, hlo)
    embedding = record["hlo_embedding"]
    # No data axis, so no gather: one all-reduce of the [1024, 64] float32 copy
    # over the 8 context devices, not one per lookup and per head.
    assert embedding["total"] == embedding["by_kind"]["all-reduce"] == 1024 * 64 * 4
    assert embedding["total"] == record["formula"]["by_group"]["embedding"]
    assert record["param_bytes_per_device"] == record["formula_param_bytes_per_device"]
