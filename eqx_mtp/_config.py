"""The model's configuration: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from typing import Literal

MTPKind = Literal["sequential", "parallel"]
MTPBlock = Literal["transformer", "mlp", "linear"]
RematPolicy = Literal["none", "full", "save_dots"]
LossImpl = Literal["fused", "chunked", "naive"]
AttentionImpl = Literal["reference", "blockwise", "auto", "pallas_gpu", "splash_tpu"]
ComputeDtype = Literal["float32", "bfloat16"]

_MTP_KINDS = ("sequential", "parallel")
_MTP_BLOCKS = ("transformer", "mlp", "linear")
_REMAT_POLICIES = ("none", "full", "save_dots")
LOSS_IMPLS = ("fused", "chunked", "naive")
ATTENTION_IMPLS = ("reference", "blockwise", "auto", "pallas_gpu", "splash_tpu")
COMPUTE_DTYPES = ("float32", "bfloat16")
QK_NORMS = ("none", "per_head", "projection")
NORM_POSITIONS = ("pre", "post")
DEPTH_INPUTS = ("before_norm", "after_norm")
ROPE_SCALINGS = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are rescaled to reach past the context a model was
    first trained on, as in Hugging Face's `rope_scaling` / `rope_parameters`.

    **Arguments:**

    - `kind`: `"linear"` (every frequency divided by `factor`), `"llama3"` (Llama
        3.1: low frequencies divided by `factor`, high ones kept, a smooth band
        between) or `"yarn"` (YaRN: interpolation and extrapolation blended over a
        ramp of rotation counts, and the attention logits scaled).
    - `factor`: the scaling factor, `>= 1`.
    - `original_max_position`: the context length before scaling (`llama3`,
        `yarn`; required by both).
    - `low_freq_factor`, `high_freq_factor`: `llama3`'s band edges, as wavelengths
        `original_max_position / factor`.
    - `beta_fast`, `beta_slow`: `yarn`'s ramp, in rotations.
    - `attention_factor`: `yarn`'s scale of the rotated queries and keys' cosines
        and sines; `None`: `0.1 · ln(factor) + 1`.
    - `truncate`: `yarn` rounds the ramp's ends to whole dimensions.
    """

    kind: str
    factor: float
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _check_choice("rope_scaling.kind", self.kind, ROPE_SCALINGS)
        if not _is_number(self.factor) or self.factor < 1:
            raise ValueError(
                f"ModelConfig.rope_scaling.factor must be a number >= 1, "
                f"got {self.factor!r}"
            )
        if self.kind != "linear":
            original = self.original_max_position
            if (
                not isinstance(original, int)
                or isinstance(original, bool)
                or (original < 1)
            ):
                raise ValueError(
                    "ModelConfig.rope_scaling.original_max_position must be a "
                    f"positive integer for kind={self.kind!r}, got {original!r}"
                )
        if self.kind == "llama3" and not (
            _is_number(self.low_freq_factor)
            and _is_number(self.high_freq_factor)
            and 0 < self.low_freq_factor < self.high_freq_factor
        ):
            raise ValueError(
                "ModelConfig.rope_scaling needs 0 < low_freq_factor < "
                f"high_freq_factor, got {self.low_freq_factor!r} and "
                f"{self.high_freq_factor!r}"
            )
        if self.attention_factor is not None and not (
            _is_number(self.attention_factor) and self.attention_factor > 0
        ):
            raise ValueError(
                "ModelConfig.rope_scaling.attention_factor must be a positive number "
                f"or None, got {self.attention_factor!r}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> RopeScaling:
        """Rebuild from `dataclasses.asdict`'s output; unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig.rope_scaling fields: {', '.join(unknown)}"
            )
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of an [`eqx_mtp.MTPModel`][]: a Llama-style trunk plus
    `num_depths` multi-token-prediction depths.

    **Arguments:**

    - `vocab_size`: number of token ids; tokens must lie in `[0, vocab_size)`.
    - `dim`: width of the residual stream.
    - `num_layers`: number of trunk blocks.
    - `num_heads`: number of query heads; must divide `dim`.
    - `num_kv_heads`: number of key/value heads (grouped-query attention); must divide
        `num_heads`.
    - `mlp_dim`: hidden width of the SwiGLU MLP.
    - `max_seq_len`: longest row the model accepts.
    - `num_depths`: number of MTP depths `D`; `0` is plain next-token training.
    - `head_dim`: width of one attention head; `None`: `dim / num_heads`. Queries
        are `num_heads · head_dim` wide, keys and values `num_kv_heads · head_dim`.
    - `rope_theta`: base of the rotary position embedding.
    - `rope_scaling`: a [`eqx_mtp.RopeScaling`][] of the rotary frequencies, or
        `None`.
    - `no_rope_layers`: trunk layers (0-based) that apply no rotary embedding.
    - `qkv_bias`: the query, key and value projections have biases.
    - `qk_norm`: an RMSNorm on queries and keys before the rotary embedding:
        `"none"`, `"per_head"` (over each head's `head_dim`, one scale shared by the
        heads) or `"projection"` (over the whole query, and the whole key,
        projection).
    - `sliding_window`: with a window `W`, a query sees only the keys fewer than `W`
        places back (itself and the `W - 1` before it); `None`: every earlier key.
    - `full_attention_layers`: trunk layers that ignore `sliding_window`.
    - `norm_position`: `"pre"` (`x + f(norm(x))`, Llama) or `"post"`
        (`x + norm(f(x))`, OLMo-2), for both sublayers of every block.
    - `norm_eps`: epsilon of every RMSNorm.
    - `tie_embeddings`: whether the unembedding is the token embedding matrix.
    - `mtp_kind`: `"sequential"` (DeepSeek-V3: depth `k` reads depth `k-1` and the
        embedding of `t_{i+k}`) or `"parallel"` (Gloeckle et al. 2024: every depth reads
        the trunk output).
    - `mtp_block`: what each depth's `layer` is: `"transformer"` (a trunk block),
        `"mlp"` (a residual SwiGLU block) or `"linear"` (a residual linear map).
    - `shared_depth_layer`: one `layer` reused by every depth.
    - `depth_final_norm`: each depth has its own final norm before the shared
        unembedding (DeepSeek-V3's `shared_head.norm`).
    - `depth_trunk_input`: what depth 1 reads (every depth, parallel): the trunk's
        last hidden state `"before_norm"` (MaxText) or `"after_norm"` (the trunk's
        final norm applied, as Hugging Face's DeepSeek-V3 MTP module does).
    - `depth_previous_input`: what depth `k > 1` reads (sequential): depth `k - 1`'s
        output `"before_norm"` or `"after_norm"` (the norm before its logits
        applied).
    - `remat`: rematerialisation policy of the trunk and depth scans: `"full"`
        (the default: keep only each block's and each depth's input, recompute the
        rest in the backward pass), `"save_dots"` (keep matmul outputs too) or
        `"none"` (keep every activation). A depth's loss is never recomputed: it
        keeps its own residuals, so the vocabulary matmuls run once. Chosen by
        `benchmarks/step_memory.py`: the leanest policy whose step time is within
        1.2× of the fastest.
    - `loss_chunk_size`: tokens per chunk of logits in the cross-entropy of the main
        objective and of every depth.
    - `loss_impl`: the cross-entropy implementation, see [`eqx_mtp.head_loss_sum`][]:
        `"fused"` (gradients accumulated in the forward pass), `"chunked"` (logits
        recomputed in the backward pass) or `"naive"` (full logits).
    - `attention_impl`: `"reference"` (the materialised `[heads, seq, seq]`
        softmax), `"blockwise"` ([`eqx_mtp.nn.blockwise_attention`][]: tiles of
        `attention_block_size`, memory linear in the row length, the same values),
        a fused kernel shipped with JAX — `"pallas_gpu"` (Pallas GPU attention) or
        `"splash_tpu"` (splash attention), both with segment ids, on one device of
        their backend — or `"auto"`: the backend's kernel where it has one and the
        block runs on one device, `"blockwise"` elsewhere. A kernel asked for on
        another backend, or on a multi-device mesh, is an error that says so.
    - `attention_block_size`: query and key tile size of the blockwise attention.
    - `train_depths_only`: stop gradients at the trunk: the trunk's parameters,
        including the shared embedding, unembedding and final norm, get exactly zero
        gradient, and only the depths learn.
    - `compute_dtype`: dtype of the trunk's and the depths' matmuls and activations,
        `"float32"` (the default) or `"bfloat16"`. Parameters stay float32 and are cast
        once per call ([`eqx_mtp.mtp_loss`][], [`eqx_mtp.mtp_loss_sums`][],
        calling the model); norms keep float32 scales and compute in float32
        internally; attention softmax, logits, losses and their reductions are
        float32; gradients come back float32. Decoding
        ([`eqx_mtp.generate`][]) runs in the parameters' dtype.
    """

    vocab_size: int
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 704
    max_seq_len: int = 1024
    num_depths: int = 1
    head_dim: int | None = None
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    no_rope_layers: tuple[int, ...] = ()
    qkv_bias: bool = False
    qk_norm: str = "none"
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()
    norm_position: str = "pre"
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # Plain `str` so a wrong choice reaches the validator, which lists the choices.
    mtp_kind: str = "sequential"
    mtp_block: str = "transformer"
    shared_depth_layer: bool = False
    depth_final_norm: bool = False
    depth_trunk_input: str = "before_norm"
    depth_previous_input: str = "before_norm"
    remat: str = "full"
    loss_chunk_size: int = 256
    loss_impl: str = "fused"
    train_depths_only: bool = False
    attention_impl: str = "auto"
    attention_block_size: int = 128
    compute_dtype: str = "float32"

    def __post_init__(self):
        positive = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads")
        for name in positive + (
            "mlp_dim",
            "max_seq_len",
            "loss_chunk_size",
            "attention_block_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"ModelConfig.{name} must be a positive integer, got {value!r}"
                )
        if (
            not isinstance(self.num_depths, int)
            or isinstance(self.num_depths, bool)
            or self.num_depths < 0
        ):
            raise ValueError(
                "ModelConfig.num_depths must be a non-negative integer, "
                f"got {self.num_depths!r}"
            )
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"ModelConfig.num_heads={self.num_heads} must divide "
                    f"dim={self.dim} (or give head_dim)"
                )
            # Frozen: the derived width is stored once, so that to_dict() carries it.
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        elif not _is_count(self.head_dim):
            raise ValueError(
                "ModelConfig.head_dim must be a positive integer or None, "
                f"got {self.head_dim!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                "rotary embeddings need an even head dimension; "
                f"ModelConfig.head_dim = {self.head_dim}"
            )
        if self.num_depths + 2 > self.max_seq_len:
            raise ValueError(
                f"ModelConfig.num_depths={self.num_depths} is too large for "
                f"max_seq_len={self.max_seq_len}: depth D predicts the token D + 1 "
                "places ahead, so max_seq_len must be at least num_depths + 2"
            )
        if not self.rope_theta > 0:
            raise ValueError(
                f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(
                f"ModelConfig.norm_eps must be positive, got {self.norm_eps!r}"
            )
        _check_choice("mtp_kind", self.mtp_kind, _MTP_KINDS)
        _check_choice("mtp_block", self.mtp_block, _MTP_BLOCKS)
        _check_choice("remat", self.remat, _REMAT_POLICIES)
        _check_choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("depth_trunk_input", self.depth_trunk_input, DEPTH_INPUTS)
        _check_choice("depth_previous_input", self.depth_previous_input, DEPTH_INPUTS)
        for name in ("qkv_bias", "tie_embeddings", "shared_depth_layer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )
        if self.rope_scaling is not None and not isinstance(
            self.rope_scaling, RopeScaling
        ):
            raise ValueError(
                "ModelConfig.rope_scaling must be an eqx_mtp.RopeScaling or None, "
                f"got {self.rope_scaling!r}"
            )
        if self.sliding_window is not None and not _is_count(self.sliding_window):
            raise ValueError(
                "ModelConfig.sliding_window must be a positive integer or None, "
                f"got {self.sliding_window!r}"
            )
        for name in ("no_rope_layers", "full_attention_layers"):
            self._check_layers(name)
        if self.full_attention_layers and self.sliding_window is None:
            raise ValueError(
                "ModelConfig.full_attention_layers is set but sliding_window is None: "
                "every layer attends fully already"
            )
        if not isinstance(self.train_depths_only, bool):
            raise ValueError(
                "ModelConfig.train_depths_only must be a bool, "
                f"got {self.train_depths_only!r}"
            )

    def _check_layers(self, name: str) -> None:
        layers = getattr(self, name)
        if isinstance(layers, list):
            layers = tuple(layers)  # from JSON
            object.__setattr__(self, name, layers)
        if not isinstance(layers, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers
            for i in layers
        ):
            raise ValueError(
                f"ModelConfig.{name} must be a tuple of layer indices in "
                f"[0, num_layers={self.num_layers}), got {layers!r}"
            )
        if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
            raise ValueError(
                f"ModelConfig.{name} must list each layer once, in increasing order, "
                f"got {layers!r}"
            )

    def uses_rope(self, layer: int) -> bool:
        """Whether trunk layer `layer` applies the rotary embedding."""
        return layer not in self.no_rope_layers

    def window(self, layer: int) -> int | None:
        """The sliding window of trunk layer `layer`; `None`: full attention."""
        if layer in self.full_attention_layers:
            return None
        return self.sliding_window

    def to_dict(self) -> dict:
        """The configuration as a JSON-serialisable dict, in the types JSON reads
        back (lists for tuples), so that a stored copy compares equal."""
        values = dataclasses.asdict(self)
        for name in ("no_rope_layers", "full_attention_layers"):
            values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Rebuild a configuration from [`eqx_mtp.ModelConfig.to_dict`][]'s output;
        unknown keys are an error that names them."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        scaling = values.get("rope_scaling")
        if isinstance(scaling, dict):
            values = values | dict(rope_scaling=RopeScaling.from_dict(scaling))
        for name in ("no_rope_layers", "full_attention_layers"):
            if isinstance(values.get(name), list):  # read back from JSON
                values = values | {name: tuple(values[name])}
        return cls(**values)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"ModelConfig.{name} must be one of {', '.join(map(repr, choices))}, "
            f"got {value!r}"
        )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
