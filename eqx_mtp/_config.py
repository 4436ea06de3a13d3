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
    - `rope_theta`: base of the rotary position embedding.
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
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # Plain `str` so a wrong choice reaches the validator, which lists the choices.
    mtp_kind: str = "sequential"
    mtp_block: str = "transformer"
    shared_depth_layer: bool = False
    depth_final_norm: bool = False
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
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must divide dim={self.dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                "rotary embeddings need an even head dimension; "
                f"dim / num_heads = {self.head_dim}"
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
        if not isinstance(self.train_depths_only, bool):
            raise ValueError(
                "ModelConfig.train_depths_only must be a bool, "
                f"got {self.train_depths_only!r}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        """The configuration as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Rebuild a configuration from [`eqx_mtp.ModelConfig.to_dict`][]'s output;
        unknown keys are an error that names them."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"ModelConfig.{name} must be one of {', '.join(map(repr, choices))}, "
            f"got {value!r}"
        )
