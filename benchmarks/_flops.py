"""The FLOP model of an `MTPModel` training step, shared by `mtp_overhead.py` and
`mfu.py`, and XLA's own count of a compiled step to check it against
([`xla_flops`][]).

Matmuls only (2 FLOPs per multiply-add); norms, RoPE, softmax and the optimizer's
elementwise work are left out of the model count (the last is estimated apart). Per
token of a row of `seq` tokens, forward pass:

- trunk layer: q, k, v, o projections `2·dim·(2·dim + 2·kv_dim)`, SwiGLU
    `6·dim·mlp_dim`, and attention: scores and weighted values, `4·dim` per visible
    query-key pair;
- main head: `2·dim·vocab` (logits);
- each depth: `eh_proj` `2·(2·dim)·dim` (sequential depths only), its layer (a trunk
    layer, a SwiGLU block `6·dim·mlp_dim`, or a linear map `2·dim²`) and the head
    `2·dim·vocab`.

**Model FLOPs** (the MFU numerator, as in PaLM's appendix B) are what the model needs:
forward + backward = 3 × forward, attention over the causal half of the row, `T(T+1)/2`
query-key pairs per head (not PaLM's full `T²`: this kernel skips the tiles above the
diagonal, and counting them would credit it with work nobody does). Packed documents
are not subtracted: which pairs a document mask hides depends on the data.

**Hardware FLOPs** are what the compiled step does: model FLOPs plus

- rematerialisation: under `remat="full"` every trunk block and every depth
    (`eh_proj` and layer, not its loss) runs its forward again in the backward pass,
    all but a trunk block's last matmul (the MLP's down projection), whose output the
    backward pass does not need (a depth's final norm, inside its checkpoint, does);
- attention as computed: the blockwise kernel computes the tiles on the diagonal
    whole, `n(n+1)/2` tiles of `block²` pairs for `n = seq / block`, i.e.
    `T(T+block)/2` pairs, and its backward recomputes the scores (five tile matmuls
    instead of four); `"reference"` attention computes all `T²` pairs, no recompute;
- loss: the fused loss does exactly three matmuls (no recompute), the chunked one
    four; chunks are padded to a multiple of `loss_chunk_size` tokens.
"""

from __future__ import annotations

import contextlib
import math

import _hlo
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_mtp
import eqx_mtp._blockwise as blockwise  # its `jnp` is swapped while unrolling

# Elementwise FLOPs per parameter of one optimizer step: global-norm clipping (square,
# sum, scale) and AdamW (two moments, bias correction, the update with weight decay,
# applying it). An estimate: XLA fuses and counts these its own way.
OPTIMIZER_FLOPS_PER_PARAMETER = 18


def _layer_matmuls(config: eqx_mtp.ModelConfig, block: str) -> int:
    """Forward matmul FLOPs per token of one layer, attention left out."""
    dim, kv_dim = config.dim, config.num_kv_heads * config.head_dim
    q_dim = config.num_heads * config.head_dim  # dim, unless head_dim is explicit
    if block == "transformer":
        return 2 * dim * (2 * q_dim + 2 * kv_dim) + 6 * dim * config.mlp_dim
    if block == "mlp":
        return 6 * dim * config.mlp_dim
    return 2 * dim * dim  # "linear"


def attention_pairs(seq: int, *, causal: bool = True) -> int:
    """Query-key pairs of one row and head the model needs: the causal half
    `T(T+1)/2`, or all `T²`."""
    return seq * (seq + 1) // 2 if causal else seq * seq


def computed_attention_pairs(config: eqx_mtp.ModelConfig, seq: int) -> int:
    """Query-key pairs one row and head computes: the blockwise kernel's tiles up to
    and including the diagonal (padded to whole tiles), the reference's `T²`."""
    if config.attention_impl == "reference":
        return seq * seq
    block = min(config.attention_block_size, seq)
    tiles = math.ceil(seq / block)
    return block * block * tiles * (tiles + 1) // 2


def forward_flops_per_token(config: eqx_mtp.ModelConfig, seq: int) -> dict:
    """Model FLOPs of the forward pass per token, by part (see the module docstring);
    `total` is their sum. Training is 3 × this."""
    dim = config.dim
    attention = 4 * config.num_heads * config.head_dim * attention_pairs(seq) / seq
    block = config.mtp_block
    layer = _layer_matmuls(config, "transformer") + attention
    depth_layer = _layer_matmuls(config, block)
    if block == "transformer":
        depth_layer += attention
    eh_proj = 2 * (2 * dim) * dim if config.mtp_kind == "sequential" else 0
    head = 2 * dim * config.vocab_size
    parts = dict(
        trunk=config.num_layers * layer,
        main_head=head,
        depths=config.num_depths * (eh_proj + depth_layer + head),
    )
    return dict(parts, total=sum(parts.values()))


def parameter_count(config: eqx_mtp.ModelConfig) -> int:
    """Parameters of an `MTPModel` with this config (norm scales included)."""
    shapes = eqx.filter_eval_shape(eqx_mtp.MTPModel, config, key=jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(shapes)
    return sum(math.prod(leaf.shape) for leaf in leaves if hasattr(leaf, "shape"))


def step_flops(config: eqx_mtp.ModelConfig, *, batch: int, seq: int) -> dict:
    """FLOPs of one training step on `batch` rows of `seq` tokens, by part.

    **Returns:**

    A dict of `model` and `hardware` dicts (parts `trunk`, `main_head`, `depths`,
    `total`; `hardware` also has `remat_recompute`, `attention_extra` and
    `loss_extra`, what it adds to the model count), `optimizer`, the elementwise
    estimate, in neither total, and `tokens`.
    """
    tokens = batch * seq
    dim = config.dim
    q_dim = config.num_heads * config.head_dim
    block = config.mtp_block
    has_attention = dict(trunk=True, depths=block == "transformer")
    eh_proj = 2 * (2 * dim) * dim if config.mtp_kind == "sequential" else 0
    head = 2 * dim * config.vocab_size
    projections = dict(
        trunk=config.num_layers * _layer_matmuls(config, "transformer"),
        depths=config.num_depths * (eh_proj + _layer_matmuls(config, block)),
    )
    layers = dict(trunk=config.num_layers, depths=config.num_depths)
    # A trunk block's last matmul (the MLP's down projection) is not run again: the
    # backward pass needs its input, not its output, and XLA drops the dead
    # recompute. A depth's is: its final norm, inside the checkpoint, needs it.
    not_recomputed = dict(trunk=config.num_layers * 2 * config.mlp_dim * dim, depths=0)
    model_pairs = attention_pairs(seq)
    hardware_pairs = computed_attention_pairs(config, seq)

    # Backward of attention: four tile matmuls per pair, five where the kernel
    # recomputes the scores from the saved log-sum-exp.
    backward = 2.5 if config.attention_impl != "reference" else 2.0
    # Under "save_dots" the matmul outputs are kept: no matmul runs again.
    recompute = 1 if config.remat == "full" else 0

    model, hardware, remat_extra, attention_extra = {}, {}, 0, 0
    for part in ("trunk", "depths"):
        # One forward pass of every layer's attention: 4·dim FLOPs per pair.
        attention_model = attention_hardware = 0
        if has_attention[part]:
            attention_model = layers[part] * 4 * q_dim * model_pairs * batch
            attention_hardware = layers[part] * 4 * q_dim * hardware_pairs * batch
        model[part] = 3 * (projections[part] * tokens + attention_model)
        recomputed = recompute * (
            (projections[part] - not_recomputed[part]) * tokens + attention_hardware
        )
        hardware[part] = (
            3 * projections[part] * tokens
            + (1 + backward) * attention_hardware
            + recomputed
        )
        remat_extra += recomputed
        attention_extra += (1 + backward) * attention_hardware - 3 * attention_model

    # Every depth's loss and the main one: tokens padded to whole chunks.
    chunk = min(config.loss_chunk_size, tokens)
    padded_tokens = math.ceil(tokens / chunk) * chunk
    loss_matmuls = 4 if config.loss_impl == "chunked" else 3
    heads = 1 + config.num_depths
    model["main_head"] = 3 * head * tokens
    hardware["main_head"] = loss_matmuls * head * padded_tokens
    model["depths"] += config.num_depths * 3 * head * tokens
    hardware["depths"] += config.num_depths * loss_matmuls * head * padded_tokens
    model["total"] = sum(model.values())
    hardware["total"] = sum(hardware.values())
    hardware["remat_recompute"] = remat_extra
    hardware["attention_extra"] = attention_extra
    hardware["loss_extra"] = heads * (loss_matmuls * padded_tokens - 3 * tokens) * head
    optimizer = OPTIMIZER_FLOPS_PER_PARAMETER * parameter_count(config)
    return dict(model=model, hardware=hardware, optimizer=optimizer, tokens=tokens)


# -- XLA's count -----------------------------------------------------------------------


class _NumpyArange:
    """`jax.numpy` for `_blockwise` inside `_unrolled_loops`, except that `arange` is
    NumPy's (and `minimum`, which bounds the key tiles): the tile indices stay Python
    ints, and so do the loop bounds computed from them."""

    def __getattr__(self, name):
        if name in ("arange", "minimum"):
            return getattr(np, name)
        return getattr(jnp, name)


@contextlib.contextmanager
def _unrolled_loops():
    """Trace every `lax.scan`, `lax.map` and `lax.fori_loop` of the step as straight
    code, so that XLA's cost analysis, which counts a loop body once, sees every
    iteration. The blockwise attention's tile loops have bounds computed from the
    tile index: over a NumPy range the index is a Python int, and so are they."""
    scan, map_, fori_loop = jax.lax.scan, jax.lax.map, jax.lax.fori_loop

    def unrolled_scan(f, init, xs=None, length=None, reverse=False, **kwargs):
        if isinstance(xs, np.ndarray) and xs.ndim == 1:
            carry, ys = init, []
            for x in xs[::-1] if reverse else xs:
                carry, y = f(carry, int(x))
                ys.append(y)
            ys = ys[::-1] if reverse else ys
            return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)
        kwargs.pop("unroll", None)
        return scan(f, init, xs, length, reverse=reverse, unroll=True, **kwargs)

    def unrolled_map(f, xs, **kwargs):
        return unrolled_scan(lambda carry, x: (carry, f(x)), None, xs)[1]

    def unrolled_fori_loop(lower, upper, body, init, **kwargs):
        if not all(isinstance(b, int | np.integer) for b in (lower, upper)):
            return fori_loop(lower, upper, body, init, **kwargs)
        for i in range(int(lower), int(upper)):
            init = body(i, init)
        return init

    jax.lax.scan, jax.lax.map, jax.lax.fori_loop = (
        unrolled_scan,
        unrolled_map,
        unrolled_fori_loop,
    )
    blockwise.jnp = _NumpyArange()
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map, jax.lax.fori_loop = scan, map_, fori_loop
        blockwise.jnp = jnp


def xla_flops(jitted, *arguments) -> dict:
    """XLA's counts of a jitted step (an `eqx.filter_jit` function) on `arguments`.

    **Returns:**

    `as_compiled`, `cost_analysis()["flops"]` of the program as compiled (each loop
    body counted once, whatever its trip count); `unrolled`, the same of the program
    traced afresh with every loop unrolled (the same work, laid out flat, which XLA
    counts whole); `unrolled_dots`, the FLOPs of that program's `dot`s alone.
    """
    compiled = jitted.lower(*arguments).compile().compiled
    as_compiled = float(compiled.cost_analysis()["flops"])
    body = jitted.__wrapped__
    with _unrolled_loops():
        lowered = eqx.filter_jit(lambda *a: body(*a)).lower(*arguments)
    unrolled = lowered.compile().compiled
    return dict(
        as_compiled=as_compiled,
        unrolled=float(unrolled.cost_analysis()["flops"]),
        unrolled_dots=_hlo.dot_flops(unrolled.as_text()),
    )
