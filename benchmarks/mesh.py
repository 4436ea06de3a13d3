"""Collective bytes and per-device memory of one sharded `train_step`: XLA's program
against a formula.

`python benchmarks/mesh.py [--quick] [--pod] [--meshes D,M,C ...] [--real-devices]`.
The script gives itself 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`, set before JAX is imported, unless
`XLA_FLAGS` sets a count already); with `--real-devices` it leaves the platform to JAX
and lays each mesh over every device JAX sees, every process's in a multi-process run
(what `python -m benchmarks --mesh ...` asks for). For every mesh `(data, model,
context)` of `--meshes`, and for `(1, 1, 1)` on one device as the baseline, it places
a model and its AdamW state by `eqx_mtp.DEFAULT_RULES`, lowers and compiles one
`eqx_mtp.train.train_step` (nothing runs), and reads from the optimised HLO the
bytes every collective moves per device per training step, next to
[`collective_terms`][]'s formula from the model's shape and the mesh. `--pod` prints
only the formula at pod
scale (a Llama-2-7B trunk on 256 chips, one DeepSeek-V3-sized MTP depth); nothing is
compiled. `--quick`: one layer of width 64, vocabulary 1024, 8 rows of 32 tokens, on
the mesh (2, 2, 2) (or those of `--meshes`).

**Counting.** Each collective of the optimised module counts once (an async `-start`,
never its `-done`), times the trip counts of the `while` loops around it
(`backend_config={"known_trip_count":{"n":...}}`; nested loops multiply): the scans
over layers, depths, micro-batches and loss chunks run their collectives once per
iteration. Collectives whose replica groups hold one device move nothing and are left
out.

**Bytes, per device, by kind** (the payload, not the wire traffic of an algorithm):

- `all-gather`: the bytes of its per-device *result* (the gathered array);
- `reduce-scatter`: the bytes of its per-device *operand* (the array before the
    scatter);
- `all-reduce`: the bytes of its operand (= its result);
- `collective-permute`: the bytes of its operand (what one device sends);
- `all-to-all`: the bytes of its operand (= its result).

So a gradient reduced by an all-reduce of the full array, or by a reduce-scatter of it,
counts the same bytes; only the kind differs. (XLA's CPU backend, measured here, emits
an all-reduce and a slice; the GPU and TPU pipelines normally rewrite that pair into a
reduce-scatter, which this script cannot check with simulated devices.) A ring moves
about `(g-1)/g` of these bytes per device for an all-gather, reduce-scatter or
all-to-all over `g` devices and `2(g-1)/g` for an all-reduce.

The formula ([`collective_terms`][]) uses the same conventions, so the two agree term
by term where XLA does what the formula says. Token ids, flags and other integer
collectives are counted in the HLO totals (and reported apart) but not in the formula:
they are a few bytes per token.
"""

from __future__ import annotations

import os
import sys

# Before JAX is imported (by `_common` too): 8 simulated CPU devices, unless the real
# ones are asked for (read from the command line here, before argparse runs).
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if "--real-devices" not in sys.argv[1:]:
    if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_FLAG}=8"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import _common  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import eqx_mtp  # noqa: E402
from eqx_mtp.train._train_step import _donating_train_step  # noqa: E402

KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
    "all-to-all",
)
MESHES = ((8, 1, 1), (4, 2, 1), (2, 2, 2), (2, 1, 4), (1, 1, 8))
MiB = 2**20
# What the library computes in float32 whatever the model's dtype: the loss's
# per-token floats, its hidden-state and unembedding gradients (accumulated and
# psum-ed in float32), the attention logits and their gradients.
_FLOAT32 = 4


# -- the formula -----------------------------------------------------------------------


def _shards(size: int, axis_size: int) -> int:
    """How many ways `DEFAULT_RULES` split a dimension: by its mesh axis when the axis
    divides it, else not at all."""
    return axis_size if size % axis_size == 0 else 1


def _matrices(vocab, dim, num_heads, num_kv_heads, head_dim, mlp_dim):
    """`(block, eh_proj, embedding)`: lists of `([out, in], (axis of out, axis of in))`
    as `DEFAULT_RULES` lay them out."""
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    block = [
        ((q_width, dim), ("model", "data")),
        ((kv_width, dim), ("model", "data")),
        ((kv_width, dim), ("model", "data")),
        ((dim, q_width), ("data", "model")),
        ((mlp_dim, dim), ("model", "data")),
        ((mlp_dim, dim), ("model", "data")),
        ((dim, mlp_dim), ("data", "model")),
    ]
    eh_proj = [((dim, 2 * dim), ("data", None))]
    embedding = [((vocab, dim), ("model", "data"))]
    return block, eh_proj, embedding


def collective_terms(
    vocab: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    num_depths: int,
    rows: int,
    seq: int,
    data: int,
    model: int,
    context: int,
    *,
    micro_batches: int = 1,
    bytes_per_param: int = 4,
    bytes_per_activation: int = 4,
    gradient_collective: str = "all-reduce",
    context_attention: str = "kv_gather",
) -> list[dict]:
    """The collectives of one `eqx_mtp.train.train_step` of a Llama-style trunk with
    `num_depths` sequential transformer MTP depths (tied embeddings, `loss_impl=
    "fused"`), laid out by `eqx_mtp.DEFAULT_RULES` on a `(data, model, context)` mesh:
    bytes per device per step, term by term, in the conventions of this module's
    docstring.

    Notation: `V, H, F` vocabulary, width, MLP width; `q = heads·head_dim`,
    `kv = kv_heads·head_dim`; `L` trunk layers, `D` depths, so `L + D` transformer
    blocks and `1 + D` output heads and embedding lookups; `M` micro-batches of `rows`
    rows (each micro-batch is `rows × seq`); `T = rows·seq / (data·context)` tokens per
    device per micro-batch; `R = rows / data` rows per device; `b_p`, `b_a` bytes of a
    parameter and of an activation. A matrix `W` (its bytes `|W|`) is split `m_W` ways
    over `model` and `d_W` ways over `data` (1 where the rule does not name the axis or
    the axis does not divide the dimension); a block holds `q, k, v, gate, up`
    (`[out, in]` over `(model, data)`), `o, down` (`(data, model)`) and two norms; a
    depth adds `eh_proj` `[H, 2H]` (`(data, None)`) and two norms; the trunk has the
    embedding `[V, H]` (`(model, data)`) and a final norm.

    **FSDP over `data`** (`data > 1`), `all-gather`:

    - every block matrix is gathered before its forward matmul and gathered *again*
        for the backward (XLA does not keep the gathered copy across the pass):
        `2 · |W| / m_W` per matrix per block, `eh_proj` likewise per depth. A scan
        runs its gathers once per iteration; a scan of one iteration (one layer, one
        depth) is unrolled by XLA, and its gathers, invariant in the micro-batch loop,
        are hoisted out of it: `× M` only where the scan has ≥ 2 iterations.
    - the embedding, once per step: `mtp_loss_sums` gathers it over `data` before the
        lookups, and the same `[V/model, H]` copy feeds every lookup and every output
        head's shard_map (whose `in_specs` are `(model, None)`): `V·H·b_p / m_E`.

    **Gradient reduction over `data` and `context`** (`gradient_collective`, the
    all-reduce of XLA's CPU backend or a reduce-scatter; same bytes): every parameter
    gradient is a partial sum over the tokens of `data` and `context`. XLA reduces it
    in two stages: over `data` the full (model-sharded) gradient, `|W| / m_W`, after
    which each device keeps its `data` shard; then over `context` that shard,
    `|W| / (m_W·d_W)`. Once per micro-batch (the reduction sits inside the
    micro-batch loop). Norms (replicated) likewise, `H·b_p` per stage. The tied
    embedding gets `2(1 + D)` gradients that are reduced apart, `V·H·b_p / m_E` each
    time: each lookup's scatter-add into the gathered `[V/model, H]` table, over
    `data` and again over `context`, both stages of the whole table (XLA slices it
    only after the sum); and each output head's unembedding gradient, `psum`-ed over
    `(data, context)` at once inside the loss's shard_map, in float32 (`V·H·4 /
    m_E`).

    **Tensor parallelism over `model`** (`model > 1`), `all-reduce`, per block per
    micro-batch: forward, the row-parallel `o` and `down` outputs, `2 · T·H·b_a`;
    backward, the input gradient of each column-parallel matmul (`q, k, v, gate, up`),
    which XLA all-reduces one by one rather than after summing them: `5 · T·H·b_a`.
    (Only the parts whose width `model` divides.) Each lookup of the vocabulary-sharded
    embedding (rows outside a device's shard read as zero) is `psum`-ed over `model`:
    `T·H·b_p` per lookup, forward only (the backward scatter-add is local).

    **Vocabulary-parallel loss** (`model > 1`), `all-reduce`, per head per micro-batch:
    per token the `pmax` of the max logit, the `psum` of the sum of exponentials and of
    the target logit (`3 · T · 4` bytes, float32), and the `psum` over `model` of the
    hidden-state gradient, `T·H·4` (float32; `loss_impl="fused"` computes it in the
    forward pass and the backward only scales it). The loss sum's `psum` over every
    axis, 4 bytes, is left out.

    **Context parallelism** (`context > 1`), per block per micro-batch, on the
    `[R, S]` query rows of a device. `context_attention="kv_gather"`, what the library
    does (its attention constrains keys, values and key segment ids to be whole along
    the sequence): all-gather the keys and values once in the forward pass
    (`2 · R·S·kv/m_kv · b_a`; XLA keeps the gathered copies for the backward), and
    reduce their gradients over `context` once (`2 · R·S·kv/m_kv · b_a`, by
    `gradient_collective`). The key segment ids are integers (not modelled).

    `context_attention="xla"`, what XLA's partitioner did with the attention left
    unconstrained (the library before it gathered keys and values; kept for the
    comparison in `docs/scaling.md`), heads split `m_q` ways: the logits stay sharded
    by *keys*, so the queries are gathered and everything contracted over keys is a
    partial sum:

    - forward: all-gather the queries (`R·S·q/m_q · b_a`), all-reduce the softmax's
        max and sum (`2 · R·h/m_q·S · 4`, float32 logits) and all-gather the
        normalisers (`R·h/m_q·S · 4`), all-reduce the attention output, a partial sum
        over the key shards (`R·S·q/m_q · b_a`);
    - backward: all-gather the queries again and the output's cotangent twice (in
        the two layouts of the value and the probability gradients), `3 ·
        R·S·q/m_q · b_a`; all-reduce the query gradient (`R·S·q/m_q · b_a`); and
        move the probabilities' gradient `[R, h/m_q, S, S/context]` between key- and
        query-sharded layouts with two all-to-alls, `2 · R·h/m_q·S·(S/context) · 4`
        (float32, as the logits): quadratic in the sequence, the largest term at
        long context.

    **Not modelled:** integer collectives (token and segment ids, flags: reported
    apart by the benchmark) and XLA's resharding of `eh_proj` by collective-permutes
    on the `(2, 2, 2)` mesh (its halves forward and backward, and one stage of its
    gradient, instead of an all-reduce).

    Where the library computes in float32 whatever the model's dtype (`_FLOAT32`
    above), the bytes are float32's; the benchmark measures float32 models only, so
    for `b_p = b_a = 2` the formula is a projection.

    **Arguments:** the model's shape (`head_dim` given apart from `dim / heads`: they
    differ for DeepSeek), `rows × seq` per micro-batch, the mesh's axis sizes, and:

    - `micro_batches`: the `M` above.
    - `bytes_per_param`, `bytes_per_activation`: `b_p`, `b_a`.
    - `gradient_collective`: `"all-reduce"` (XLA CPU) or `"reduce-scatter"`.
    - `context_attention`: `"xla"` or `"kv_gather"`.

    **Returns:**

    A list of `dict(name, axis, kind, bytes)`, one per term; `axis` is the mesh axis
    (or axes, joined by `+`) the collective runs over.
    """
    if gradient_collective not in ("all-reduce", "reduce-scatter"):
        raise ValueError(
            "gradient_collective must be 'all-reduce' or 'reduce-scatter', got "
            f"{gradient_collective!r}"
        )
    if context_attention not in ("xla", "kv_gather"):
        raise ValueError(
            f"context_attention must be 'xla' or 'kv_gather', got {context_attention!r}"
        )
    if rows % data or seq % context:
        raise ValueError(
            f"rows={rows} must be divisible by data={data} and seq={seq} by "
            f"context={context}"
        )
    sizes = dict(data=data, model=model, context=context)
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    block, eh_proj, embedding = _matrices(
        vocab, dim, num_heads, num_kv_heads, head_dim, mlp_dim
    )

    def ways(shape, axes, axis):
        return math.prod(
            _shards(size, sizes[name])
            for size, name in zip(shape, axes)
            if name == axis
        )

    def model_sharded(matrices):
        """Σ |W| / m_W: a matrix gathered over `data`, or its gradient before the
        `data` stage."""
        return sum(
            math.prod(shape) * bytes_per_param // ways(shape, axes, "model")
            for shape, axes in matrices
        )

    def gathered(matrices):
        """Σ |W| / m_W over the matrices that `data` splits."""
        return model_sharded(
            [(shape, axes) for shape, axes in matrices if ways(shape, axes, "data") > 1]
        )

    def device_shard(matrices):
        """Σ |W| / (m_W·d_W): a gradient's `context` stage after its `data` stage."""
        return sum(
            math.prod(shape)
            * bytes_per_param
            // (ways(shape, axes, "model") * ways(shape, axes, "data"))
            for shape, axes in matrices
        )

    def per_step(iterations):
        """How often one iteration's collective of a scan runs in a step: a scan of
        one iteration is unrolled and its loop-invariant collectives are hoisted out
        of the micro-batch loop."""
        return iterations * (micro_batches if iterations > 1 else 1)

    terms: list[dict] = []

    def add(name, axis, kind, nbytes):
        if nbytes:
            terms.append(dict(name=name, axis=axis, kind=kind, bytes=int(nbytes)))

    M = micro_batches
    blocks, outputs = num_layers + num_depths, 1 + num_depths
    tokens = rows * seq // (data * context)
    act, par = bytes_per_activation, bytes_per_param
    table = model_sharded(embedding)  # the gathered [V/model, H] table
    vocab_split = ways(*embedding[0], "model") > 1
    norm_bytes = (2 * num_layers + 1 + 4 * num_depths) * dim * par

    # FSDP.
    if data > 1:
        add(
            "FSDP: trunk block weights, forward + backward",
            "data",
            "all-gather",
            2 * gathered(block) * per_step(num_layers),
        )
        add(
            "FSDP: depth block and eh_proj weights, forward + backward",
            "data",
            "all-gather",
            2 * gathered(block + eh_proj) * per_step(num_depths),
        )
        add("FSDP: embedding, once a step", "data", "all-gather", gathered(embedding))

    # Gradients: over `data` the model-sharded gradient, then over `context` its
    # `data` shard (the embedding's lookup gradients whole, both stages).
    matrices = blocks * model_sharded(block) + num_depths * model_sharded(eh_proj)
    shards = blocks * device_shard(block) + num_depths * device_shard(eh_proj)
    for axis, kind, nbytes in (
        ("data", gradient_collective, matrices),
        ("context", "all-reduce", shards),
    ):
        if sizes[axis] > 1:
            add(
                "gradients: block and eh_proj matrices, norms",
                axis,
                kind,
                M * (nbytes + norm_bytes),
            )
            add(
                "gradients: embedding lookups (scatter-add into the table)",
                axis,
                kind,
                M * outputs * table,
            )
    if data * context > 1:
        add(
            "gradients: unembedding, psum in each head's shard_map",
            "data+context",
            "all-reduce",
            M * outputs * table // par * _FLOAT32,
        )

    # Tensor parallelism and the vocabulary-parallel loss.
    if model > 1:
        attention_split = _shards(q_width, model) > 1
        mlp_split = _shards(mlp_dim, model) > 1
        activation = M * tokens * dim * act
        add(
            "TP: o and down outputs (forward)",
            "model",
            "all-reduce",
            blocks * (attention_split + mlp_split) * activation,
        )
        add(
            "TP: q, k, v, gate, up input gradients (backward)",
            "model",
            "all-reduce",
            blocks * (3 * attention_split + 2 * mlp_split) * activation,
        )
        if vocab_split:
            add(
                "TP: lookups of the vocabulary-sharded embedding",
                "model",
                "all-reduce",
                M * outputs * tokens * dim * par,
            )
            add(
                "loss: max, sum of exps, target logit per token",
                "model",
                "all-reduce",
                M * outputs * 3 * tokens * _FLOAT32,
            )
            add(
                "loss: hidden-state gradient psum",
                "model",
                "all-reduce",
                M * outputs * tokens * dim * _FLOAT32,
            )

    # Context parallelism: the device's rows, every query position of them.
    if context > 1:
        query_rows = rows // data * seq
        head_ways = _shards(q_width, model)
        queries = M * query_rows * q_width // head_ways * act
        stats = M * query_rows * num_heads // head_ways * _FLOAT32
        probabilities = (
            M * query_rows * num_heads // head_ways * seq // context * _FLOAT32
        )
        if context_attention == "xla":
            add(
                "context: queries (forward, backward), output cotangent (backward, "
                "twice), softmax normalisers",
                "context",
                "all-gather",
                blocks * (4 * queries + stats),
            )
            add(
                "context: softmax max and sum, attention output, query gradient",
                "context",
                "all-reduce",
                blocks * (2 * queries + 2 * stats),
            )
            add(
                "context: probability gradients, key- <-> query-sharded (backward)",
                "context",
                "all-to-all",
                blocks * 2 * probabilities,
            )
        else:
            keys_values = (
                2 * M * query_rows * kv_width // _shards(kv_width, model) * act
            )
            add(
                "context: keys and values, gathered once (kept for the backward)",
                "context",
                "all-gather",
                blocks * keys_values,
            )
            add(
                "context: key and value gradients",
                "context",
                gradient_collective,
                blocks * keys_values,
            )
    return terms


def collective_bytes_formula(*args, **kwargs) -> dict[str, int]:
    """[`collective_terms`][] (same arguments) summed by collective kind: bytes per
    device per step, every kind of `KINDS` present."""
    totals = dict.fromkeys(KINDS, 0)
    for term in collective_terms(*args, **kwargs):
        totals[term["kind"]] += term["bytes"]
    return totals


def bytes_by_axis(terms: list[dict]) -> dict[str, int]:
    """Bytes per device per step of [`collective_terms`][]'s terms, by mesh axis."""
    totals: dict[str, int] = collections.defaultdict(int)
    for term in terms:
        totals[term["axis"]] += term["bytes"]
    return dict(totals)


def parameter_bytes_per_device(
    vocab: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mlp_dim: int,
    num_depths: int,
    data: int,
    model: int,
    *,
    bytes_per_param: int = 4,
) -> int:
    """Bytes of one device's shard of the parameters under `DEFAULT_RULES` (the shape
    arguments as for [`collective_terms`][]): every matrix split by the axes that
    divide it, the norms whole."""
    block, eh_proj, embedding = _matrices(
        vocab, dim, num_heads, num_kv_heads, head_dim, mlp_dim
    )
    sizes = dict(data=data, model=model)

    def local(matrices):
        total = 0
        for shape, axes in matrices:
            ways = math.prod(
                _shards(size, sizes[axis])
                for size, axis in zip(shape, axes)
                if axis is not None
            )
            total += math.prod(shape) * bytes_per_param // ways
        return total

    norm = dim * bytes_per_param
    return (
        local(embedding)
        + norm
        + num_layers * (local(block) + 2 * norm)
        + num_depths * (local(block + eh_proj) + 4 * norm)
    )


# -- the HLO ---------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")


def _array_bytes(type_text: str, *, floats_only=False) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _DTYPE_BYTES or (floats_only and dtype[0] not in "fbc"):
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group opening at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({"
        depth -= text[i] in ")}"
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced HLO: {text[start : start + 80]!r}")


def _split_instruction(rest: str) -> tuple[str, str, str, str]:
    """`type opcode(operands), attributes` -> its four parts."""
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_text, tail = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, tail = rest.partition(" ")
    opcode, _, after = tail.partition("(")
    end = _balanced("(" + after, 0) - 1
    return type_text, opcode, after[: end - 1], after[end:]


def _group_size(attributes: str, num_devices: int) -> int:
    """Devices per replica group, in any of the forms XLA prints."""
    if match := re.search(r"replica_groups=\{(\{[^}]*\})", attributes):
        return len(match.group(1).strip("{}").split(","))
    if re.search(r"replica_groups=\{\}", attributes):
        return num_devices
    if match := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes):
        return int(match.group(1))
    # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the named axes make a group.
    if match := re.search(
        r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes
    ):
        axes = {name: int(n) for name, n in re.findall(r"'(\w+)'=(\d+)", match[1])}
        return math.prod(axes[name] for name in re.findall(r"'(\w+)'", match[2]))
    if match := re.search(r"source_target_pairs=\{(.*?)\}\}", attributes):
        pairs = re.findall(r"\{(\d+),(\d+)", match.group(1) + "}")
        return 2 if any(a != b for a, b in pairs) else 1
    raise ValueError(f"no replica groups in {attributes[:200]!r}")


def hlo_collectives(text: str) -> list[dict]:
    """Every collective of an optimised HLO module: its kind, bytes (this module's
    conventions), float bytes, group size, how many times one execution runs it, and
    its `op_name`."""
    computations: dict[str, list] = {}
    types: dict[str, str] = {}
    entry = current = None
    num_devices = 1
    if match := re.search(r"num_partitions=(\d+)", text):
        num_devices = int(match.group(1))
    for line in text.splitlines():
        if header := _HEADER.match(line):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None or not (instruction := _INSTRUCTION.match(line)):
            continue
        name, rest = instruction.groups()
        type_text, opcode, operands, attributes = _split_instruction(rest)
        types[name] = type_text
        computations[current].append((name, type_text, opcode, operands, attributes))

    # How many times each computation runs per execution of the entry.
    callers = collections.defaultdict(list)
    for caller, instructions in computations.items():
        for _, _, opcode, _, attributes in instructions:
            trips = 1
            if opcode == "while":
                found = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                # None: a loop whose trip count depends on data (the blockwise
                # attention's causal tile loops); it may hold no collective.
                trips = None if found is None else int(found.group(1))
            for callee in _CALLEE.findall(attributes):
                callers[callee].append((caller, trips))
            if branches := re.search(r"branch_computations=\{([^}]*)\}", attributes):
                for callee in re.findall(r"%([\w.\-]+)", branches.group(1)):
                    callers[callee].append((caller, 1))
            for key in ("true_computation", "false_computation"):
                if found := re.search(rf"{key}=%([\w.\-]+)", attributes):
                    callers[found.group(1)].append((caller, 1))
    runs: dict[str, int | None] = {}

    def times(computation):
        if computation == entry:
            return 1
        if computation not in runs:
            runs[computation] = 0  # a cycle would be a malformed module
            counts = [
                None if trips is None else times(caller)
                for caller, trips in callers[computation]
            ]
            runs[computation] = (
                None
                if None in counts
                else sum(
                    count * trips
                    for count, (_, trips) in zip(counts, callers[computation])
                )
            )
        return runs[computation]

    records = []
    for computation, instructions in computations.items():
        for name, type_text, opcode, operands, attributes in instructions:
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            if times(computation) is None:
                raise ValueError(
                    f"collective {name} runs in a loop of unknown trip count"
                )
            group = _group_size(attributes, num_devices)
            names = re.findall(r"%([\w.\-]+)", operands)
            operand_types = [types.get(name, "") for name in names]
            if kind == "collective-permute":
                operand_types = operand_types[:1]
            nbytes = sum(_array_bytes(t) for t in operand_types)
            float_bytes = sum(_array_bytes(t, floats_only=True) for t in operand_types)
            if kind == "all-gather":
                nbytes, float_bytes = nbytes * group, float_bytes * group
            op_name = re.search(r'op_name="([^"]*)"', attributes)
            records.append(
                dict(
                    kind=kind,
                    name=name,
                    bytes=nbytes,
                    float_bytes=float_bytes,
                    group=group,
                    times=times(computation),
                    type=type_text,
                    op_name=op_name.group(1) if op_name else "",
                )
            )
    return records


def hlo_bytes(records: list[dict]) -> dict:
    """Bytes per device per execution by kind (`by_kind`), their `total`, and the part
    of them that is not floating point (`integer_by_kind`, `integer`: token ids,
    segment ids, flags)."""
    by_kind = dict.fromkeys(KINDS, 0)
    integer_by_kind = dict.fromkeys(KINDS, 0)
    for record in records:
        if record["group"] < 2:
            continue
        by_kind[record["kind"]] += record["bytes"] * record["times"]
        integer_by_kind[record["kind"]] += (
            record["bytes"] - record["float_bytes"]
        ) * record["times"]
    return dict(
        by_kind=by_kind,
        total=sum(by_kind.values()),
        integer_by_kind=integer_by_kind,
        integer=sum(integer_by_kind.values()),
    )


# -- the measurement -------------------------------------------------------------------


def _config(args) -> eqx_mtp.ModelConfig:
    return _common.model_config(
        args,
        vocab=args.vocab,
        num_depths=args.depths,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        # The formula is the materialised attention's. The blockwise kernel's causal
        # tile loops have data-dependent trip counts on a context axis, and hold
        # collectives there, so the HLO cannot say how often those run.
        attention_impl="reference",
    )


def _shape_args(args, config) -> dict:
    return dict(
        vocab=config.vocab_size,
        dim=config.dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        mlp_dim=config.mlp_dim,
        num_depths=config.num_depths,
    )


def _shard_bytes(tree) -> int:
    """Bytes of device 0's shard of every array of `tree`."""
    return sum(
        leaf.addressable_shards[0].data.nbytes
        for leaf in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    )


def measure(args, config, mesh_shape, devices) -> dict:
    data, model, context = mesh_shape
    devices = devices[: data * model * context]
    mesh = eqx_mtp.make_mesh(data, model, context, devices=devices)
    start = time.perf_counter()
    host_model = eqx_mtp.MTPModel(config, key=jax.random.key(0))
    placed = eqx_mtp.shard_tree(host_model, mesh)
    optimizer = eqx_mtp.train.make_optimizer(
        placed, learning_rate=1e-3, total_steps=100, warmup_steps=10
    )
    params = eqx.filter(placed, eqx.is_array)
    state_shapes = jax.eval_shape(optimizer.init, params)
    opt_state = jax.jit(
        optimizer.init, out_shardings=eqx_mtp.named_shardings(state_shapes, mesh)
    )(params)
    shape = (args.micro_batches, args.batch, args.seq)
    layout = eqx_mtp.batch_sharding(mesh, 3)
    rng = np.random.default_rng(0)
    batch = dict(
        tokens=jax.device_put(
            rng.integers(0, config.vocab_size, shape, dtype=np.int32), layout
        ),
        segment_ids=jax.device_put(np.ones(shape, np.int32), layout),
        positions=jax.device_put(
            np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape), layout
        ),
    )
    with warnings.catch_warnings():
        # Nothing runs, so the donated buffers' reuse does not matter here.
        warnings.filterwarnings("ignore", message="Some donated buffers")
        # `train_step` is a plain function around its jitted, donating body.
        kept = (optimizer, batch, np.float32(0.3), "mean", mesh, eqx_mtp.DEFAULT_RULES)
        lowered = _donating_train_step.lower(kept, placed, opt_state)
        traced = time.perf_counter()
        compiled = lowered.compile().compiled
    compiled_at = time.perf_counter()
    records = hlo_collectives(compiled.as_text())
    hlo = hlo_bytes(records)
    shape_args = _shape_args(args, config)
    common = dict(
        rows=args.batch,
        seq=args.seq,
        data=data,
        model=model,
        context=context,
        micro_batches=args.micro_batches,
    )
    terms = collective_terms(**shape_args, **common)
    formula = collective_bytes_formula(**shape_args, **common)
    memory = compiled.memory_analysis()
    top = sorted(
        (r for r in records if r["group"] > 1),
        key=lambda r: -r["bytes"] * r["times"],
    )[:12]
    return dict(
        mesh=dict(data=data, model=model, context=context),
        seconds=dict(
            place_and_lower=traced - start,
            compile=compiled_at - traced,
        ),
        hlo=hlo,
        formula=dict(by_kind=formula, total=sum(formula.values()), terms=terms),
        memory=dict(
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            alias_bytes=memory.alias_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
        ),
        param_bytes_per_device=_shard_bytes(placed),
        opt_state_bytes_per_device=_shard_bytes(opt_state),
        formula_param_bytes_per_device=parameter_bytes_per_device(
            **shape_args, data=data, model=model
        ),
        largest_hlo_collectives=[
            dict(
                kind=r["kind"],
                group=r["group"],
                times=r["times"],
                bytes=r["bytes"],
                type=r["type"][:200],
                op_name=r["op_name"][-160:],
            )
            for r in top
        ],
    )


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.3f}" if denominator else "—"


def _mib(nbytes) -> str:
    return f"{nbytes / MiB:.2f}"


def _mesh_name(record) -> str:
    mesh = record["mesh"]
    return f"({mesh['data']}, {mesh['model']}, {mesh['context']})"


def mesh_tables(record) -> str:
    """Formula against HLO by collective kind, then the formula's terms."""
    hlo, formula = record["hlo"], record["formula"]
    rows = [
        [
            kind,
            f"{hlo['by_kind'][kind]:,}",
            f"{hlo['integer_by_kind'][kind]:,}",
            f"{formula['by_kind'][kind]:,}",
            _ratio(formula["by_kind"][kind], hlo["by_kind"][kind]),
        ]
        for kind in KINDS
        if hlo["by_kind"][kind] or formula["by_kind"][kind]
    ]
    rows.append(
        [
            "**total**",
            f"{hlo['total']:,}",
            f"{hlo['integer']:,}",
            f"{formula['total']:,}",
            _ratio(formula["total"], hlo["total"]),
        ]
    )
    terms = [
        [term["name"], term["axis"], term["kind"], f"{term['bytes']:,}"]
        for term in formula["terms"]
    ]
    return "\n".join(
        [
            f"**Mesh (data, model, context) = {_mesh_name(record)}**: bytes per device "
            "per step",
            "",
            _common.markdown_table(
                [
                    "collective",
                    "HLO bytes",
                    "of which integer",
                    "formula bytes",
                    "formula / HLO",
                ],
                rows,
            ),
            "",
            _common.markdown_table(["formula term", "axis", "kind", "bytes"], terms),
        ]
    )


def summary_table(records) -> str:
    """One row per mesh: collective totals, parameter and optimizer state per device
    against one device, XLA's memory analysis."""

    def state_bytes(record):
        return record["param_bytes_per_device"] + record["opt_state_bytes_per_device"]

    baseline = next(r for r in records if set(r["mesh"].values()) == {1})
    rows = []
    for record in records:
        memory = record["memory"]
        rows.append(
            [
                _mesh_name(record),
                _mib(record["hlo"]["total"]),
                _mib(record["formula"]["total"]),
                _ratio(record["formula"]["total"], record["hlo"]["total"]),
                _mib(state_bytes(record)),
                f"{state_bytes(record) / state_bytes(baseline):.3f}",
                _mib(memory["argument_bytes"]),
                _mib(memory["output_bytes"]),
                _mib(memory["temp_bytes"]),
                f"{record['seconds']['compile']:.1f}",
            ]
        )
    return _common.markdown_table(
        [
            "mesh (d, m, c)",
            "HLO MiB",
            "formula MiB",
            "formula / HLO",
            "param + opt MiB/device",
            "ratio to 1 device",
            "argument MiB",
            "output MiB",
            "temp MiB",
            "compile s",
        ],
        rows,
    )


# -- pod scale -------------------------------------------------------------------------

LLAMA2_7B = dict(
    vocab=32000,
    dim=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    mlp_dim=11008,
)
# One MTP depth of DeepSeek-V3's width and vocabulary, its block treated as a dense
# transformer block: MLA attention as plain multi-head attention of 128 heads of 128
# (q, k, v, o each 7168 × 16384) and the MoE layer as one dense SwiGLU of 18432 (V3's
# dense-layer width). Only the depth's increment is reported: D = 1 against D = 0 on
# no trunk layers, so the shared embedding's gather (once a step) is not in it, and
# its lookup, output head and loss are.
DEEPSEEK_V3_DEPTH = dict(
    vocab=129280,
    dim=7168,
    num_layers=0,
    num_heads=128,
    num_kv_heads=128,
    head_dim=128,
    mlp_dim=18432,
)
POD_MESHES = ((256, 1, 1), (64, 4, 1), (32, 8, 1), (32, 4, 2))
POD_AXES = ("data", "model", "context", "data+context")


def pod_costs(rows: int = 1024, seq: int = 4096) -> list[dict]:
    """The formula's bytes per device per step by mesh axis at pod scale (256
    devices): bf16 parameters and activations, gradients reduce-scattered, the whole
    `rows × seq` batch as one micro-batch. For a Llama-2-7B trunk with one transformer
    depth (tied embeddings, as the library builds them; Llama-2 unties them, which
    adds one more `[V/model, H]` gather over `data`), what that depth adds to it, and
    what one DeepSeek-V3-sized depth adds.

    **Returns:**

    One `dict(model, mesh, context_attention, bytes_by_axis, total_bytes,
    param_bytes_per_device)` per (model, mesh, attention variant).
    """

    def by_axis(shape, mesh, attention):
        terms = collective_terms(
            **shape,
            rows=rows,
            seq=seq,
            data=mesh[0],
            model=mesh[1],
            context=mesh[2],
            bytes_per_param=2,
            bytes_per_activation=2,
            gradient_collective="reduce-scatter",
            context_attention=attention,
        )
        return bytes_by_axis(terms)

    def params(shape, mesh, num_depths):
        return parameter_bytes_per_device(
            **shape,
            num_depths=num_depths,
            data=mesh[0],
            model=mesh[1],
            bytes_per_param=2,
        )

    results = []
    for name, shape, increment in (
        ("Llama-2-7B trunk + D = 1", LLAMA2_7B, False),
        ("Llama-2-7B: its depth's increment", LLAMA2_7B, True),
        ("DeepSeek-V3-sized depth: its increment", DEEPSEEK_V3_DEPTH, True),
    ):
        for mesh in POD_MESHES:
            for attention in ("xla", "kv_gather") if mesh[2] > 1 else ("xla",):
                axes = by_axis(dict(shape, num_depths=1), mesh, attention)
                param_bytes = params(shape, mesh, 1)
                if increment:
                    without = by_axis(dict(shape, num_depths=0), mesh, attention)
                    axes = {k: v - without.get(k, 0) for k, v in axes.items()}
                    param_bytes -= params(shape, mesh, 0)
                axes = {axis: axes.get(axis, 0) for axis in POD_AXES}
                results.append(
                    dict(
                        model=name,
                        mesh=dict(zip(("data", "model", "context"), mesh)),
                        context_attention=attention,
                        bytes_by_axis=axes,
                        total_bytes=sum(axes.values()),
                        param_bytes_per_device=param_bytes,
                    )
                )
    return results


def pod_report(costs: list[dict], rows: int = 1024, seq: int = 4096) -> str:
    """[`pod_costs`][]'s results as Markdown tables, GiB per device per step."""
    GiB = 2**30
    header = ["mesh (d, m, c)", "attention", *POD_AXES, "total", "params GiB/device"]
    titles = {
        "Llama-2-7B trunk + D = 1": "**Llama-2-7B trunk (32 layers, 32 heads, 32 kv "
        "heads, mlp 11008, vocab 32000, tied) + D = 1 transformer depth**",
        "Llama-2-7B: its depth's increment": "Of which its depth adds (D = 1 minus "
        "D = 0):",
        "DeepSeek-V3-sized depth: its increment": "**One DeepSeek-V3-sized MTP "
        "depth** (dim 7168, vocab 129280; its block as a dense transformer block: 128 "
        "heads of 128, SwiGLU 18432 in place of the MoE layer; D = 1 minus D = 0 on "
        "no trunk layers)",
    }
    lines = [
        f"## The formula at pod scale: {rows} rows × {seq} tokens per step, bf16, "
        "gradients reduce-scattered",
        "",
        "GiB per device per step, by the mesh axis each collective runs over.",
        "",
    ]
    for name, title in titles.items():
        table = [
            [
                "({data}, {model}, {context})".format(**cost["mesh"]),
                cost["context_attention"],
                *(f"{cost['bytes_by_axis'][axis] / GiB:.2f}" for axis in POD_AXES),
                f"{cost['total_bytes'] / GiB:.2f}",
                f"{cost['param_bytes_per_device'] / GiB:.3f}",
            ]
            for cost in costs
            if cost["model"] == name
        ]
        lines += [title, "", _common.markdown_table(header, table), ""]
    lines.append(
        "`kv_gather`: what the library does (keys, values and key segment ids "
        "gathered over `context`; what the benchmark measures); `xla`: attention "
        "left unconstrained to XLA's partitioner, which splits the logits by key "
        "(the library before it gathered keys and values)."
    )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def main():
    started = time.perf_counter()
    parser = _common.model_parser(
        __doc__.split("\n")[0], batch=8, seq=256, dim=256, mlp_dim=768, layers=2
    )
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--depths", type=int, default=1, help="num_depths D")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument(
        "--meshes",
        default=None,
        help="space-separated data,model,context triples (default: "
        + " ".join(",".join(map(str, mesh)) for mesh in MESHES)
        + "; with --quick 2,2,2; with --real-devices those of every device, or "
        "N,1,1)",
    )
    parser.add_argument(
        "--real-devices",
        action="store_true",
        help="JAX's own platform and every device it sees (every process's), not "
        "simulated CPU devices",
    )
    parser.add_argument(
        "--pod", action="store_true", help="only print the formula at pod scale"
    )
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    if args.pod:
        print(pod_report(pod_costs()))
        return
    _common.start(args)
    # Simulated devices are this process's own; real ones are the whole run's.
    devices = jax.devices() if args.real_devices else jax.local_devices()
    if args.meshes is not None:
        meshes = [tuple(int(n) for n in m.split(",")) for m in args.meshes.split()]
    elif args.quick:
        meshes = [(2, 2, 2)]
    elif args.real_devices:
        meshes = [m for m in MESHES if math.prod(m) == len(devices)]
        meshes = meshes or [(len(devices), 1, 1)]
    else:
        meshes = list(MESHES)
    if args.quick:
        args.dim, args.mlp_dim, args.layers, args.vocab = 64, 128, 1, 1024
        # Rows and their length divisible by any mesh's data and context axes.
        args.batch = math.lcm(8, *(m[0] for m in meshes if m))
        args.seq = math.lcm(32, *(m[-1] for m in meshes if m))
    for mesh in meshes:
        if len(mesh) != 3 or min(mesh) < 1:
            parser.error(f"--meshes: {mesh} is not three positive sizes")
        if args.real_devices and math.prod(mesh) != len(devices):
            parser.error(
                f"--meshes: {mesh} is not a mesh of all {len(devices)} devices "
                f"({devices[0].device_kind})"
            )
        if math.prod(mesh) > len(devices):
            sys.exit(
                f"mesh {mesh} needs {math.prod(mesh)} devices, got {len(devices)}: "
                f"set XLA_FLAGS={_DEVICE_FLAG}=N"
            )
        if args.batch % mesh[0] or args.seq % mesh[2]:
            parser.error(
                f"--meshes: {mesh}: data must divide --batch {args.batch} and "
                f"context --seq {args.seq}"
            )
    config = _config(args)
    name = "mesh" + (f"_{args.tag}" if args.tag else "")

    records = []
    for mesh in [(1, 1, 1), *meshes]:
        # The one-device baseline on a device of this process, so every process
        # can compile it.
        record = measure(
            args, config, mesh, jax.local_devices() if mesh == (1, 1, 1) else devices
        )
        records.append(record)
        print(
            f"mesh {_mesh_name(record)}: HLO {_mib(record['hlo']['total'])} MiB, "
            f"formula {_mib(record['formula']['total'])} MiB, lower "
            f"{record['seconds']['place_and_lower']:.1f}s, compile "
            f"{record['seconds']['compile']:.1f}s",
            flush=True,
        )
    seconds = time.perf_counter() - started
    payload = dict(
        benchmark="mesh",
        quick=args.quick,
        environment=_common.environment(),
        settings=_common.model_settings(
            args,
            meshes=[dict(zip(("data", "model", "context"), m)) for m in meshes],
            real_devices=args.real_devices,
            vocab=args.vocab,
            heads=args.heads,
            kv_heads=args.kv_heads,
            num_depths=args.depths,
            micro_batches=args.micro_batches,
            loss_impl=config.loss_impl,
            loss_chunk_size=config.loss_chunk_size,
        ),
        seconds=seconds,
        records=records,
        pod=pod_costs(),
    )
    _common.write_results(name, payload, args)

    print()
    print(
        f"`python benchmarks/mesh.py{' ' if sys.argv[1:] else ''}"
        f"{' '.join(sys.argv[1:])}`: vocab {args.vocab}, dim {args.dim}, "
        f"{args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, mlp "
        f"{args.mlp_dim}, D = {args.depths}, {args.micro_batches} micro-batch(es) of "
        f"{args.batch} × {args.seq} tokens, float32, loss_impl {config.loss_impl}; "
        f"{len(records)} compilations in {seconds:.0f} s."
    )
    print()
    for record in records[1:]:
        print(mesh_tables(record))
        print()
    print(summary_table(records))
    print()
    mismatched = [
        _mesh_name(r)
        for r in records
        if r["param_bytes_per_device"] != r["formula_param_bytes_per_device"]
    ]
    print(
        "Parameter bytes per device of `parameter_bytes_per_device` against the "
        "placed arrays' `addressable_shards[0]`: "
        + (
            f"differ on {', '.join(mismatched)}."
            if mismatched
            else "equal on every mesh."
        )
    )


if __name__ == "__main__":
    main()
