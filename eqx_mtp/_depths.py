"""The MTP depths as modules: one depth, and the depths stacked for one `jax.lax.scan`
(run by `scan_depths`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._config import MTPKind, RematPolicy
from ._kv_cache import KVCache
from ._transformer import (
    RMSNorm,
    SwiGLU,
    dense,
    stack_modules,
    unstack_module,
)

LayerFactory = Callable[[PRNGKeyArray], eqx.Module]


class MLPBlock(eqx.Module):
    """`x + SwiGLU(norm(x))`: the trunk block without attention, with its call
    signature (positions, segment ids and `key` are accepted and unused)."""

    norm: RMSNorm
    mlp: SwiGLU

    def __init__(self, dim: int, hidden_dim: int, *, eps: float = 1e-6, key):
        self.norm = RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, hidden_dim, key=key)

    def __call__(self, x, *, positions=None, segment_ids=None, key=None):
        del key  # deterministic
        return x + self.mlp(self.norm(x))


class LinearBlock(eqx.Module):
    """`x + W x`: the smallest layer with the trunk block's call signature (`key` is
    accepted and unused)."""

    proj: eqx.nn.Linear

    def __init__(self, dim: int, *, key):
        self.proj = eqx.nn.Linear(dim, dim, use_bias=False, key=key)

    def __call__(self, x, *, positions=None, segment_ids=None, key=None):
        del key  # deterministic
        return x + dense(self.proj, x)


def call_block(block, x, *, positions, segment_ids, key=None):
    """`block(x, *, positions, segment_ids, key)`, with `key` left out when it is
    `None`, so that a block written without a `key` parameter runs deterministically
    wherever no key is given."""
    if key is None:
        return block(x, positions=positions, segment_ids=segment_ids)
    return block(x, positions=positions, segment_ids=segment_ids, key=key)


class MTPDepth(eqx.Module):
    """One MTP depth, with the field names of DeepSeek-V3's released MTP weights.

    Sequential: `layer(eh_proj([enorm(E[t_{i+k}]) ; hnorm(h^{k-1}_i)]))`.
    Parallel: `layer(h⁰_i)` (`enorm`, `hnorm` and `eh_proj` are `None`).
    `layer` is `None` when the depths share one layer; `norm` is the depth's own final
    norm (`shared_head.norm`), or `None` to use the trunk's.
    """

    enorm: RMSNorm | None
    hnorm: RMSNorm | None
    eh_proj: eqx.nn.Linear | None
    layer: eqx.Module | None
    norm: RMSNorm | None

    def __init__(
        self,
        dim: int,
        *,
        make_layer: LayerFactory | None,
        kind: MTPKind = "sequential",
        depth_final_norm: bool = False,
        norm_eps: float = 1e-6,
        key: PRNGKeyArray,
    ):
        proj_key, layer_key = jax.random.split(key)
        if kind == "sequential":
            self.enorm = RMSNorm(dim, eps=norm_eps)
            self.hnorm = RMSNorm(dim, eps=norm_eps)
            # [out, in] = [dim, 2·dim], the layout of DeepSeek-V3's eh_proj.weight.
            self.eh_proj = eqx.nn.Linear(2 * dim, dim, use_bias=False, key=proj_key)
        else:
            self.enorm = self.hnorm = self.eh_proj = None
        self.layer = None if make_layer is None else make_layer(layer_key)
        self.norm = RMSNorm(dim, eps=norm_eps) if depth_final_norm else None

    def __call__(
        self,
        hidden: Float[Array, "seq dim"],
        next_embeddings: Float[Array, "seq dim"] | None,
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"] | None,
        layer: eqx.Module | None = None,
        key: PRNGKeyArray | None = None,
        cache: KVCache | None = None,
    ) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
        """This depth's hidden state from the previous depth's (or, parallel, the
        trunk's) and the embeddings of the tokens `k` places ahead. `key` goes to the
        layer, and only when it is not `None` (see [`eqx_mtp.MTPDepths`][]).

        `cache`: for a layer that attends (a [`eqx_mtp.nn.TransformerBlock`][]), a
        one-layer [`eqx_mtp.nn.KVCache`][] of this depth's earlier positions, to
        decode: `(hidden, cache)` is returned (see [`eqx_mtp.nn.Attention`][])."""
        layer = self.layer if layer is None else layer
        x = self.layer_input(hidden, next_embeddings)
        if cache is not None:
            return layer(x, positions=positions, segment_ids=segment_ids, cache=cache)
        return call_block(
            layer, x, positions=positions, segment_ids=segment_ids, key=key
        )

    def layer_input(
        self,
        hidden: Float[Array, "seq dim"],
        next_embeddings: Float[Array, "seq dim"] | None,
    ) -> Float[Array, "seq dim"]:
        """What the depth's layer reads: `eh_proj([enorm(e) ; hnorm(h)])`
        (sequential), or `hidden` itself (parallel)."""
        if self.eh_proj is None:
            return hidden
        assert self.enorm is not None and self.hnorm is not None
        assert next_embeddings is not None
        combined = jnp.concatenate(
            [self.enorm(next_embeddings), self.hnorm(hidden)], axis=-1
        )
        return dense(self.eh_proj, combined)


class MTPDepths(eqx.Module):
    """`num_depths` MTP depths stored as one [`eqx_mtp.MTPDepth`][] whose array leaves
    have a leading depth axis, run by one `jax.lax.scan`.

    **Arguments:**

    - `num_depths`: number of depths `D >= 1`.
    - `dim`: width of the hidden states.
    - `make_layer`: `key -> module`, the block each depth runs; any Equinox module
        with the call signature `block(x [seq, dim], *, positions, segment_ids,
        key=None)` on one example (see [`eqx_mtp.nn.TransformerBlock`][]). The `key` is
        optional: a block without that parameter runs wherever no key is given.
    - `kind`: `"sequential"` (DeepSeek-V3) or `"parallel"` (Gloeckle et al.).
    - `shared_layer`: one layer, built once, reused at every depth.
    - `depth_final_norm`: give each depth its own final norm.
    - `norm_eps`: epsilon of the depth norms.
    - `trunk_input`: what depth 1 (every depth, parallel) reads of the trunk's last
        hidden state: `"before_norm"` (MaxText) or `"after_norm"` (the trunk's final
        norm applied: Hugging Face's DeepSeek-V3 MTP module, Megatron-Core, vLLM,
        SGLang).
    - `previous_input`: what depth `k > 1` reads of depth `k - 1`'s output:
        `"before_norm"` (MaxText, vLLM's DeepSeek drafter) or `"after_norm"` (the
        norm before its logits applied: Hugging Face, Megatron-Core, SGLang, MiMo).
    - `remat`: rematerialisation policy of the depth scan: each depth is recomputed
        in the backward pass as the policy says; its readout (the loss) never is.
    - `key`: PRNG key.

    **Randomness.** [`eqx_mtp.scan_depths`][], [`eqx_mtp.mtp_depth_losses`][] and
    [`eqx_mtp.mtp_loss`][] take an optional `key`. Given one, it is split into one key
    per depth (carried through the scan, so it works under every `remat` policy: the
    backward pass recomputes a depth with the same key) and each depth's key into one
    per row of the batch; the layer receives `key=` for its row. `key=None` (the
    default) calls the layer without a `key` argument: deterministic, and the
    contract of blocks written without one.

    **Dtypes.** The depths compute in the dtype of the trunk output `hidden` they are
    given: their floating-point parameters (norm scales excepted) and the looked-up
    embeddings are cast to it once per call, and each depth's output is kept in it, so
    a bfloat16 trunk works with float32 depths (gradients come back float32).
    """

    depths: MTPDepth
    shared_layer: eqx.Module | None
    num_depths: int = eqx.field(static=True)
    kind: MTPKind = eqx.field(static=True)
    remat_policy: RematPolicy = eqx.field(static=True)
    trunk_input: str = eqx.field(static=True)
    previous_input: str = eqx.field(static=True)

    def __init__(
        self,
        num_depths: int,
        dim: int,
        *,
        make_layer: LayerFactory,
        kind: MTPKind = "sequential",
        shared_layer: bool = False,
        depth_final_norm: bool = False,
        norm_eps: float = 1e-6,
        trunk_input: str = "before_norm",
        previous_input: str = "before_norm",
        remat: RematPolicy = "none",
        key: PRNGKeyArray,
    ):
        for name, value in (
            ("trunk_input", trunk_input),
            ("previous_input", previous_input),
        ):
            if value not in ("before_norm", "after_norm"):
                raise ValueError(
                    f"MTPDepths: {name} must be 'before_norm' or 'after_norm', "
                    f"got {value!r}"
                )
        if not isinstance(num_depths, int) or num_depths < 1:
            raise ValueError(f"MTPDepths: num_depths must be >= 1, got {num_depths!r}")
        if kind not in ("sequential", "parallel"):
            raise ValueError(
                f"MTPDepths: kind must be 'sequential' or 'parallel', got {kind!r}"
            )
        depths_key, layer_key = jax.random.split(key)
        self.depths = stack_modules(
            lambda k: MTPDepth(
                dim,
                make_layer=None if shared_layer else make_layer,
                kind=kind,
                depth_final_norm=depth_final_norm,
                norm_eps=norm_eps,
                key=k,
            ),
            num_depths,
            key=depths_key,
        )
        self.shared_layer = make_layer(layer_key) if shared_layer else None
        self.num_depths = num_depths
        self.kind = kind
        self.remat_policy = remat
        self.trunk_input = trunk_input
        self.previous_input = previous_input

    def first(self, count: int) -> MTPDepths:
        """The first `count` depths (`1 <= count <= num_depths`), sharing these
        depths' arrays (sliced along the depth axis) and options. Differentiated
        through, the depths left out get a zero gradient."""
        if not isinstance(count, int) or not 1 <= count <= self.num_depths:
            raise ValueError(
                f"MTPDepths.first: count must lie in [1, {self.num_depths}], got "
                f"{count!r}"
            )
        if count == self.num_depths:
            return self
        sliced = jax.tree_util.tree_map(
            lambda leaf: leaf[:count] if eqx.is_array(leaf) else leaf, self.depths
        )
        return replaced(self, depths=sliced, num_depths=count)

    def depth(self, index: int) -> MTPDepth:
        """Depth `index + 1` as an ordinary (unstacked) module; its `layer` is the
        shared layer when the depths share one."""
        depth = unstack_module(self.depths, index)
        if self.shared_layer is not None:
            depth = eqx.tree_at(
                lambda d: d.layer, depth, self.shared_layer, is_leaf=lambda x: x is None
            )
        return depth


def replaced(module: eqx.Module, **fields) -> eqx.Module:
    """`module` with some fields, static ones included, replaced, built as Equinox
    rebuilds a module from its leaves: without running `__init__` (which makes fresh
    parameters)."""
    new = object.__new__(type(module))
    for field in dataclasses.fields(module):
        value = fields.get(field.name, getattr(module, field.name))
        object.__setattr__(new, field.name, value)
    return new


def depths_dim(depths: MTPDepths) -> int | None:
    """The width of the depths' hidden states, read from a norm's scale; `None` when
    they have no norm (parallel depths without their own final norm)."""
    for norm in (depths.depths.hnorm, depths.depths.enorm, depths.depths.norm):
        if norm is not None:
            return norm.weight.shape[-1]
    return None
