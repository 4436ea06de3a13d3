"""The collectives of one sharded `eqx_mtp.train.train_step`, by formula: bytes per
device per step, term by term, from the model's shape and the mesh. `mesh.py` holds
it against the compiled program's HLO.

The step is that of a Llama-style trunk with `D` sequential transformer MTP depths
(tied embeddings unless `tie_embeddings=False`, `loss_impl="fused"`,
`remat="full"`), laid out by `eqx_mtp.DEFAULT_RULES` on a `(data, model, context)`
mesh. Bytes follow the HLO reader's conventions (`_hlo.py`): an all-gather counts its
per-device result, every other collective its operand, so a gradient reduced by an
all-reduce of the full array or by a reduce-scatter of it counts the same bytes. (A
ring moves about `(g-1)/g` of these bytes per device for an all-gather,
reduce-scatter or all-to-all over `g` devices and `2(g-1)/g` for an all-reduce.)

Notation: `V, H, F` vocabulary, width, MLP width; `q = heads·head_dim`,
`kv = kv_heads·head_dim`; `L` trunk layers, `D` depths, so `L + D` transformer blocks
and `1 + D` output heads and embedding lookups; `M` micro-batches of `rows` rows;
`T = rows·seq / (data·context)` tokens per device per micro-batch; `R = rows / data`
rows per device; `b_p`, `b_a` bytes of a parameter and of an activation. A matrix `W`
(its bytes `|W|`) is split `m_W` ways over `model` and `d_W` ways over `data` (1 where
the rule does not name the axis or the axis does not divide the dimension); a block
holds `q, k, v, gate, up` (`[out, in]` over `(model, data)`), `o, down`
(`(data, model)`) and two norms; a depth adds `eh_proj` `[H, 2H]` (`(data, None)`)
and two norms; the trunk has the embedding `[V, H]` (`(model, data)`) and a final
norm, and an untied unembedding `[V, H]` as the embedding. Every term belongs to a
`group`: `embedding` (the embedding, an untied unembedding, and their gradients),
`blocks` (block and `eh_proj` weights, norms) or `activations`.

**FSDP over `data`** (`data > 1`), all-gather. Every block matrix is gathered before
its forward matmul and gathered *again* for the backward (XLA does not keep the
gathered copy across the pass): `2 · |W| / m_W` per matrix per block, `eh_proj`
likewise per depth. A scan runs its gathers once per iteration; a scan of one
iteration is unrolled by XLA and its gathers, invariant in the micro-batch loop, are
hoisted out of it: `× M` only where the scan has ≥ 2 iterations. The embedding is
gathered once a step, `V·H·b_p / m_E`, hoisted out of the micro-batch loop: the same
`[V/model, H]` table feeds every micro-batch's copies (below); an untied unembedding
`[V, H]` (laid out as the embedding) is gathered once a step besides.

**Gradient reduction over `data` and `context`** (`gradient_collective`): every
gradient is a partial sum over the tokens of `data` and `context`, reduced in two
stages, over `data` the full (model-sharded) gradient, `|W| / m_W`, then over
`context` the device's `data` shard, `|W| / (m_W·d_W)`; once per micro-batch; norms
`H·b_p` per stage. The embedding is not reduced per use: every lookup and every output
head reads one per-token-shard copy of the vocabulary-padded table (`[data·context,
V_pad, H]`, split `((data, context), model, None)`, `V_pad` the multiple of `model`
at or above `V`) and leaves its gradient there unreduced, so the copies' broadcast's
transpose reduces the sum of all `2(1 + D)` uses' gradients in one collective over
the `data·context` devices together (an all-reduce where `data = 1`),
`V_pad·H·b_p / model` per micro-batch (in the parameters' dtype). An untied
unembedding has copies of its own and one reduction more, of the same bytes. The
broadcast into the copies is the embedding's FSDP gather above and moves nothing
more: each device's copy is the gathered `[V/model, H]` table it holds.

**Tensor parallelism over `model`** (`model > 1`), all-reduce, per block per
micro-batch: forward, the row-parallel `o` and `down` outputs, `2 · T·H·b_a`, and
under `remat="full"` the same again in the backward's rematerialised forward;
backward, the input gradient of each column-parallel matmul (`q, k, v, gate, up`),
`5 · T·H·b_a` (only the parts whose width `model` divides). Each lookup of the
vocabulary-sharded copies is `psum`-ed over `model`: `T·H·b_p`, forward only (the
lookups are outside the rematerialised blocks).

**Vocabulary-parallel loss** (`model > 1`), all-reduce, per head per micro-batch: the
max logit, the sum of exponentials and the target logit per token (`3 · T · 4`), and
the hidden-state gradient, `T·H·4` (float32). The loss sum's 4 bytes are left out.

**Context parallelism** (`context > 1`), per block per micro-batch, on the `[R, S]`
query rows of a device. `context_attention="kv_gather"`, what the library does: keys
and values all-gathered in the forward pass (`2 · R·S·kv/m_kv · b_a`) and, under
`remat="full"`, again in the backward's rematerialised forward; their gradients
reduced over `context` once (`2 · R·S·kv/m_kv · b_a`, by `gradient_collective`).
`context_attention="xla"`, XLA's partitioner with the attention unconstrained (the
library before it gathered keys and values; for `docs/scaling.md`), heads split `m_q`
ways: queries gathered forward and backward and the output's cotangent twice
(`4 · R·S·q/m_q · b_a`), the softmax's max and sum all-reduced and its normalisers
gathered (`3 · R·h/m_q·S · 4`), the attention output and the query gradient
all-reduced (`2 · R·S·q/m_q · b_a`), and the probabilities' gradient moved between
key- and query-sharded layouts by two all-to-alls, `2 · R·h/m_q·S·(S/context) · 4`.

**Not modelled:** integer collectives (token and segment ids, flags), and on the
`(2, 2, 2)` mesh XLA's resharding of `eh_proj` by collective-permutes and block
weights it gathers over `data` more often than twice (the formula reads 0.91 of that
mesh's HLO at `mesh.py --quick`'s sizes). Where the library computes in float32
whatever the model's dtype (`FLOAT32`), the bytes are float32's; the benchmark
measures float32 models, so `b_p = b_a = 2` is a projection.
"""

from __future__ import annotations

import collections
import dataclasses
import math

# What the library computes in float32 whatever the model's dtype: the loss's
# per-token floats, its hidden-state and unembedding gradients, the attention logits.
FLOAT32 = 4


def _shards(size: int, axis_size: int) -> int:
    """How many ways `DEFAULT_RULES` split a dimension: by its mesh axis when the axis
    divides it, else not at all."""
    return axis_size if size % axis_size == 0 else 1


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model's shape, its batch and the mesh, as the formula reads them.

    **Arguments:** the model's shape (`head_dim` apart from `dim / heads`: they differ
    for DeepSeek), `rows × seq` per micro-batch, the mesh's axis sizes, and:

    - `micro_batches`: the `M` of the module docstring.
    - `bytes_per_param`, `bytes_per_activation`: `b_p`, `b_a`.
    - `gradient_collective`: `"all-reduce"` (XLA's CPU backend) or
        `"reduce-scatter"` (what GPU and TPU pipelines normally make of it).
    - `context_attention`: `"kv_gather"` (the library) or `"xla"`.
    - `remat`: the model's policy, `"full"` (the default, what `mesh.py` measures)
        or `"none"` (keys and values gathered once; not measured).
    - `tie_embeddings`: whether the unembedding is the embedding (the default).
    """

    vocab: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    num_depths: int
    rows: int
    seq: int
    data: int = 1
    model: int = 1
    context: int = 1
    micro_batches: int = 1
    bytes_per_param: int = 4
    bytes_per_activation: int = 4
    gradient_collective: str = "all-reduce"
    context_attention: str = "kv_gather"
    remat: str = "full"
    tie_embeddings: bool = True

    def __post_init__(self):
        choices = dict(
            gradient_collective=("all-reduce", "reduce-scatter"),
            context_attention=("xla", "kv_gather"),
            remat=("full", "none"),
        )
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.rows % self.data or self.seq % self.context:
            raise ValueError(
                f"rows={self.rows} must be divisible by data={self.data} and "
                f"seq={self.seq} by context={self.context}"
            )

    def matrices(self) -> dict[str, list]:
        """`block`, `eh_proj`, `embedding`: lists of `([out, in], (axis of out, axis
        of in))` as `DEFAULT_RULES` lay them out; `embedding` holds an untied
        unembedding too."""
        q, kv, dim = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.dim,
        )
        column, row = ("model", "data"), ("data", "model")
        return dict(
            block=[
                ((q, dim), column),
                ((kv, dim), column),
                ((kv, dim), column),
                ((dim, q), row),
                ((self.mlp_dim, dim), column),
                ((self.mlp_dim, dim), column),
                ((dim, self.mlp_dim), row),
            ],
            eh_proj=[((dim, 2 * dim), ("data", None))],
            embedding=[((self.vocab, dim), column)] * (2 - self.tie_embeddings),
        )

    def ways(self, shape, axes, axis: str) -> int:
        """How many ways `axis` splits a matrix of this `shape` and `axes`."""
        size = getattr(self, axis)
        return math.prod(
            _shards(n, size) for n, name in zip(shape, axes) if name == axis
        )

    def model_sharded(self, matrices) -> int:
        """`Σ |W| / m_W`: gathered over `data`, or a gradient's `data` stage."""
        return sum(
            math.prod(shape) * self.bytes_per_param // self.ways(shape, axes, "model")
            for shape, axes in matrices
        )

    def gathered(self, matrices) -> int:
        """`Σ |W| / m_W` over the matrices that `data` splits."""
        return self.model_sharded(
            [(s, a) for s, a in matrices if self.ways(s, a, "data") > 1]
        )

    def device_shard(self, matrices) -> int:
        """`Σ |W| / (m_W·d_W)`: a gradient's `context` stage."""
        return sum(
            math.prod(shape)
            * self.bytes_per_param
            // (self.ways(shape, axes, "model") * self.ways(shape, axes, "data"))
            for shape, axes in matrices
        )

    def per_step(self, iterations: int) -> int:
        """How often one iteration's collective of a scan runs in a step: a scan of
        one iteration is unrolled and its loop-invariant collectives are hoisted out
        of the micro-batch loop."""
        return iterations * (self.micro_batches if iterations > 1 else 1)

    @property
    def tokens(self) -> int:
        """`T`: tokens per device per micro-batch."""
        return self.rows * self.seq // (self.data * self.context)

    @property
    def copy(self) -> int:
        """Bytes of a device's per-token-shard copy of the embedding (or of an untied
        unembedding), `[V_pad/model, H]`."""
        padded = -(-self.vocab // self.model) * self.model
        return padded * self.dim * self.bytes_per_param // self.model


def _fsdp(s: Setup, add) -> None:
    if s.data == 1:
        return
    m = s.matrices()
    name = "FSDP: trunk block weights, forward + backward"
    add(
        name,
        "blocks",
        "data",
        "all-gather",
        2 * s.gathered(m["block"]) * s.per_step(s.num_layers),
    )
    name = "FSDP: depth block and eh_proj weights, forward + backward"
    depth = m["block"] + m["eh_proj"]
    add(
        name,
        "blocks",
        "data",
        "all-gather",
        2 * s.gathered(depth) * s.per_step(s.num_depths),
    )
    add(
        "FSDP: embedding (and an untied unembedding), once a step",
        "embedding",
        "data",
        "all-gather",
        s.gathered(m["embedding"]),
    )


def _gradients(s: Setup, add) -> None:
    m, M = s.matrices(), s.micro_batches
    blocks = s.num_layers + s.num_depths
    norms = (2 * s.num_layers + 1 + 4 * s.num_depths) * s.dim * s.bytes_per_param
    matrices = blocks * s.model_sharded(m["block"]) + s.num_depths * s.model_sharded(
        m["eh_proj"]
    )
    shards = blocks * s.device_shard(m["block"]) + s.num_depths * s.device_shard(
        m["eh_proj"]
    )
    for axis, kind, nbytes in (
        ("data", s.gradient_collective, matrices),
        ("context", "all-reduce", shards),
    ):
        if getattr(s, axis) > 1:
            name = "gradients: block and eh_proj matrices, norms"
            add(name, "blocks", axis, kind, M * (nbytes + norms))
    if s.data * s.context > 1:
        # One reduction of the token-shard copies for all lookups and heads.
        axis = "+".join(a for a in ("data", "context") if getattr(s, a) > 1)
        kind = s.gradient_collective if s.data > 1 else "all-reduce"
        name = "gradients: embedding copies, every lookup and head, reduced once"
        add(name, "embedding", axis, kind, M * s.copy)
        if not s.tie_embeddings:
            name = "gradients: untied unembedding copies, every head, reduced once"
            add(name, "embedding", axis, kind, M * s.copy)


def _tensor_parallel(s: Setup, add) -> None:
    if s.model == 1:
        return
    blocks, outputs = s.num_layers + s.num_depths, 1 + s.num_depths
    attention_split = _shards(s.num_heads * s.head_dim, s.model) > 1
    mlp_split = _shards(s.mlp_dim, s.model) > 1
    activation = s.micro_batches * s.tokens * s.dim * s.bytes_per_activation
    add(
        "TP: o and down outputs (forward)",
        "activations", "model", "all-reduce",
        blocks * (attention_split + mlp_split) * activation,
    )  # fmt: skip
    if s.remat == "full":
        add(
            "TP: o and down outputs, again in the rematerialised forward",
            "activations", "model", "all-reduce",
            blocks * (attention_split + mlp_split) * activation,
        )  # fmt: skip
    add(
        "TP: q, k, v, gate, up input gradients (backward)",
        "activations", "model", "all-reduce",
        blocks * (3 * attention_split + 2 * mlp_split) * activation,
    )  # fmt: skip
    heads = s.micro_batches * outputs * s.tokens
    add(
        "TP: lookups of the vocabulary-sharded embedding",
        "activations", "model", "all-reduce", heads * s.dim * s.bytes_per_param,
    )  # fmt: skip
    add(
        "loss: max, sum of exps, target logit per token",
        "activations", "model", "all-reduce", heads * 3 * FLOAT32,
    )  # fmt: skip
    add(
        "loss: hidden-state gradient psum",
        "activations", "model", "all-reduce", heads * s.dim * FLOAT32,
    )  # fmt: skip


def _context(s: Setup, add) -> None:
    if s.context == 1:
        return
    blocks = s.num_layers + s.num_depths
    query_rows = s.micro_batches * s.rows // s.data * s.seq
    q_width = s.num_heads * s.head_dim
    head_ways = _shards(q_width, s.model)
    if s.context_attention == "xla":
        queries = query_rows * q_width // head_ways * s.bytes_per_activation
        stats = query_rows * s.num_heads // head_ways * FLOAT32
        probabilities = stats * s.seq // s.context
        add(
            "context: queries (forward, backward), output cotangent (backward, "
            "twice), softmax normalisers",
            "activations", "context", "all-gather", blocks * (4 * queries + stats),
        )  # fmt: skip
        add(
            "context: softmax max and sum, attention output, query gradient",
            "activations", "context", "all-reduce", blocks * (2 * queries + 2 * stats),
        )  # fmt: skip
        add(
            "context: probability gradients, key- <-> query-sharded (backward)",
            "activations", "context", "all-to-all", blocks * 2 * probabilities,
        )  # fmt: skip
        return
    kv_width = s.num_kv_heads * s.head_dim
    keys_values = 2 * query_rows * kv_width // _shards(kv_width, s.model)
    keys_values *= s.bytes_per_activation
    add(
        "context: keys and values, gathered in the forward",
        "activations", "context", "all-gather", blocks * keys_values,
    )  # fmt: skip
    if s.remat == "full":
        add(
            "context: keys and values, gathered again in the rematerialised forward",
            "activations", "context", "all-gather", blocks * keys_values,
        )  # fmt: skip
    add(
        "context: key and value gradients",
        "activations", "context", s.gradient_collective, blocks * keys_values,
    )  # fmt: skip


def collective_terms(setup: Setup) -> list[dict]:
    """The collectives of one training step, term by term (the module docstring
    derives each).

    **Arguments:**

    - `setup`: a [`Setup`][]: the model's shape, batch, mesh and conventions.

    **Returns:**

    A list of `dict(name, group, axis, kind, bytes)`, one per term, bytes per device
    per step; `group` is `embedding`, `blocks` or `activations`, `axis` the mesh axis
    (or axes, joined by `+`) the collective runs over.
    """
    terms: list[dict] = []

    def add(name, group, axis, kind, nbytes):
        if nbytes:
            terms.append(
                dict(name=name, group=group, axis=axis, kind=kind, bytes=int(nbytes))
            )

    for family in (_fsdp, _gradients, _tensor_parallel, _context):
        family(setup, add)
    return terms


def total_by(terms: list[dict], field: str) -> dict[str, int]:
    """Bytes of [`collective_terms`][]'s terms summed by `field` (`kind`, `axis` or
    `group`); only the values that occur."""
    totals: dict[str, int] = collections.defaultdict(int)
    for term in terms:
        totals[term[field]] += term["bytes"]
    return dict(totals)


def parameter_bytes_per_device(setup: Setup) -> int:
    """Bytes of one device's shard of the parameters under `DEFAULT_RULES`: every
    matrix split by the `data` and `model` axes that divide it, the norms whole."""
    m = setup.matrices()

    def local(matrices):
        return sum(
            math.prod(shape)
            * setup.bytes_per_param
            // (setup.ways(shape, axes, "model") * setup.ways(shape, axes, "data"))
            for shape, axes in matrices
        )

    norm = setup.dim * setup.bytes_per_param
    return (
        local(m["embedding"])
        + norm
        + setup.num_layers * (local(m["block"]) + 2 * norm)
        + setup.num_depths * (local(m["block"] + m["eh_proj"]) + 4 * norm)
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
# and the MoE layer as one dense SwiGLU of 18432 (V3's dense-layer width). Only the
# depth's increment is reported: D = 1 against D = 0 on no trunk layers, so the
# shared embedding's gather (once a step) and its gradient's reduction (once per
# micro-batch, whatever D) are not in it, and its lookup's and output head's
# activations and loss are.
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
POD_MODELS = (
    ("Llama-2-7B trunk + D = 1", LLAMA2_7B, False),
    ("Llama-2-7B: its depth's increment", LLAMA2_7B, True),
    ("DeepSeek-V3-sized depth: its increment", DEEPSEEK_V3_DEPTH, True),
)


def pod_costs(rows: int = 1024, seq: int = 4096) -> list[dict]:
    """The formula's bytes per device per step by mesh axis at pod scale (256
    devices): bf16 parameters and activations, gradients reduce-scattered, the whole
    `rows × seq` batch as one micro-batch, `remat="full"`. For a Llama-2-7B trunk
    with one transformer depth (tied embeddings, as the library builds them), what
    that depth adds to it, and what one DeepSeek-V3-sized depth adds.

    **Returns:**

    One `dict(model, mesh, context_attention, bytes_by_axis, total_bytes,
    param_bytes_per_device)` per (model, mesh, attention variant).
    """
    results = []
    for name, shape, increment in POD_MODELS:
        for mesh in POD_MESHES:
            for attention in ("xla", "kv_gather") if mesh[2] > 1 else ("xla",):

                def setup(num_depths, shape=shape, mesh=mesh, attention=attention):
                    return Setup(
                        **shape,
                        num_depths=num_depths,
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

                axes = total_by(collective_terms(setup(1)), "axis")
                param_bytes = parameter_bytes_per_device(setup(1))
                if increment:
                    without = total_by(collective_terms(setup(0)), "axis")
                    axes = {k: v - without.get(k, 0) for k, v in axes.items()}
                    param_bytes -= parameter_bytes_per_device(setup(0))
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
