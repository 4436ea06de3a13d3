"""Where every array of a model and of its optimizer state lives on the mesh: one
rule set, matched against the array's path."""

from __future__ import annotations

import re
from collections.abc import Sequence

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._mesh import DATA, MODEL, check_mesh

ShardingRule = tuple[str, tuple[str | None, ...]]

DEFAULT_RULES: tuple[ShardingRule, ...] = (
    # [vocab, dim]: the vocabulary over `model` (the vocabulary-parallel loss reads
    # it so), the width over `data` (FSDP).
    (r"(^|\.)(embedding|unembedding)$", (MODEL, DATA)),
    # [heads · head_dim, dim] and [mlp_dim, dim]: heads and hidden units over
    # `model` (tensor parallel), the input width over `data`.
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", (MODEL, DATA)),
    # [heads · head_dim]: a q/k/v bias follows its matrix's output rows. (The q/k
    # norms' scales, per head or over the projection, are unmatched: replicated.)
    (r"(^|\.)(q_proj|k_proj|v_proj)\.bias$", (MODEL,)),
    # [dim, heads · head_dim] and [dim, mlp_dim]: the other side of the same split.
    (r"(^|\.)(o_proj|down_proj)\.weight$", (DATA, MODEL)),
    # The MTP projection [dim, 2·dim] and a linear depth block [dim, dim]: FSDP only.
    (r"(^|\.)(eh_proj|proj)\.weight$", (DATA, None)),
)
"""The rules of [`eqx_mtp.partition_specs`][] for an [`eqx_mtp.MTPModel`][]: FSDP over
`data` for the large matrices, the vocabulary, attention heads and MLP hidden axis over
`model`; everything unmatched (norms, step counts) is replicated."""


def tree_path_name(path) -> str:
    """A dotted name for a `jax.tree_util` key path: `trunk.blocks.mlp.up_proj.weight`,
    or `1.0.mu.trunk.embedding` inside an optax state."""
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _check_rules(rules, mesh: Mesh) -> tuple[tuple[re.Pattern, tuple], ...]:
    compiled = []
    for rule in rules:
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise ValueError(
                f"rules: each rule must be a (regex, axes) pair, got {rule!r}"
            )
        pattern, axes = rule
        axes = tuple(axes)
        named = [axis for axis in axes if axis is not None]
        unknown = [axis for axis in named if axis not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"rules: {pattern!r} names {unknown}, which are not axes of the mesh "
                f"{tuple(mesh.axis_names)}"
            )
        if len(set(named)) != len(named):
            raise ValueError(f"rules: {pattern!r} uses a mesh axis twice: {axes}")
        compiled.append((re.compile(pattern), axes))
    return tuple(compiled)


def _spec(shape, axes, mesh: Mesh) -> PartitionSpec:
    """`axes` aligned with the trailing dimensions of `shape`; leading (stacked layer
    or depth) dimensions are never sharded, nor a dimension the axis does not
    divide."""
    if len(shape) < len(axes):
        return PartitionSpec()
    lead = len(shape) - len(axes)
    spec = [None] * lead
    for size, axis in zip(shape[lead:], axes):
        spec.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*spec)


def partition_specs(
    tree: PyTree,
    mesh: Mesh,
    *,
    rules: Sequence[ShardingRule] = DEFAULT_RULES,
) -> PyTree:
    """A `PartitionSpec` for every array of `tree`: a model, its optimizer state, or
    any pytree whose array paths the rules name.

    Each array's dotted path (e.g. `trunk.blocks.attention.q_proj.weight`; inside an
    optax state `1.0.mu.trunk.blocks.attention.q_proj.weight`) is matched against the
    rules' regular expressions with `re.search`, first match wins, so a moment
    estimate of Adam gets the spec of its parameter. A rule's axes name the mesh axes
    of the array's **trailing** dimensions: leading dimensions (the stacked layer axis
    of the trunk, the depth axis of the MTP depths) stay unsharded, and so does any
    dimension that its mesh axis does not divide (a vocabulary of 259 over 2 model
    devices). Unmatched arrays, and arrays of fewer dimensions than the rule names,
    are replicated.

    **Arguments:**

    - `tree`: a pytree of arrays or `jax.ShapeDtypeStruct`s (non-array leaves are
        allowed and get `None`).
    - `mesh`: the mesh from [`eqx_mtp.make_mesh`][].
    - `rules`: `(regex, axes)` pairs; [`eqx_mtp.DEFAULT_RULES`][] fit
        [`eqx_mtp.MTPModel`][]. A researcher's own trunk passes rules for its paths,
        e.g. `(r"\\.wq$", ("model", "data"))`, usually followed by the defaults.

    **Returns:**

    A pytree of the structure of `tree` with `PartitionSpec` leaves (`None` for
    non-arrays).
    """
    check_mesh(mesh)
    compiled = _check_rules(rules, mesh)

    def spec_of(path, leaf):
        if not (eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)):
            return None
        name = tree_path_name(path)
        for pattern, axes in compiled:
            if pattern.search(name):
                return _spec(leaf.shape, axes, mesh)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def named_shardings(
    tree: PyTree,
    mesh: Mesh,
    *,
    rules: Sequence[ShardingRule] = DEFAULT_RULES,
) -> PyTree:
    """[`eqx_mtp.partition_specs`][] as `NamedSharding`s on `mesh`."""
    specs = partition_specs(tree, mesh, rules=rules)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_tree(
    tree: PyTree,
    mesh: Mesh,
    *,
    rules: Sequence[ShardingRule] = DEFAULT_RULES,
) -> PyTree:
    """Place every array of `tree` as the rules say: `jax.device_put` outside `jit`,
    a sharding constraint inside. Non-array leaves are returned unchanged."""
    shardings = named_shardings(tree, mesh, rules=rules)
    arrays, static = eqx.partition(tree, eqx.is_array)
    array_shardings = eqx.filter(shardings, lambda x: isinstance(x, NamedSharding))

    def place(array, sharding):
        if array is None:
            return None
        if isinstance(array, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(array, sharding)
        return jax.device_put(array, sharding)

    placed = jax.tree.map(
        place,
        arrays,
        array_shardings,
        is_leaf=lambda x: x is None,
    )
    return eqx.combine(placed, static)
