"""Multi-Token Prediction for Equinox/JAX language models."""

from ._blockwise import blockwise_attention as blockwise_attention
from ._config import ModelConfig as ModelConfig
from ._cross_entropy import head_loss_sum as head_loss_sum
from ._decode import (
    Generation as Generation,
    generate as generate,
    trunk_forward_cached as trunk_forward_cached,
)
from ._documents import document_ids as document_ids
from ._fused_ce import fused_cross_entropy as fused_cross_entropy
from ._llama_weights import (
    WeightsError as WeightsError,
    hf_config as hf_config,
    load_llama as load_llama,
    model_config_from_hf as model_config_from_hf,
    model_tensors as model_tensors,
    save_llama as save_llama,
)
from ._loss import (
    mtp_loss as mtp_loss,
    mtp_loss_sums as mtp_loss_sums,
    mtp_loss_sums_from_hidden as mtp_loss_sums_from_hidden,
    reduce_losses as reduce_losses,
    resolve_mtp_weight as resolve_mtp_weight,
)
from ._maxtext import (
    load_maxtext_mtp as load_maxtext_mtp,
    maxtext_loss_mask as maxtext_loss_mask,
)
from ._mesh import (
    MESH_AXES as MESH_AXES,
    batch_sharding as batch_sharding,
    batch_spec as batch_spec,
    make_mesh as make_mesh,
)
from ._model import MTPModel as MTPModel
from ._mtp import (
    LinearBlock as LinearBlock,
    MLPBlock as MLPBlock,
    MTPDepth as MTPDepth,
    MTPDepths as MTPDepths,
    mtp_depth_losses as mtp_depth_losses,
    scan_depths as scan_depths,
)
from ._roll import roll_and_mask as roll_and_mask
from ._schedule import parse_mtp_weight as parse_mtp_weight
from ._sharding import (
    DEFAULT_RULES as DEFAULT_RULES,
    named_shardings as named_shardings,
    partition_specs as partition_specs,
    shard_tree as shard_tree,
)
from ._targets import (
    depth_targets as depth_targets,
    segment_positions as segment_positions,
    valid_token_counts as valid_token_counts,
)
from ._transformer import (
    Attention as Attention,
    RMSNorm as RMSNorm,
    SwiGLU as SwiGLU,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
)
from ._vocab_parallel import vocab_parallel_loss_sum as vocab_parallel_loss_sum
from .train import TrainConfig as TrainConfig
from .train._checkpoint import (
    Checkpointer as Checkpointer,
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
)
from .train._data import (
    BOS_ID as BOS_ID,
    BYTE_VOCAB_SIZE as BYTE_VOCAB_SIZE,
    EOS_ID as EOS_ID,
    PAD_ID as PAD_ID,
    DataError as DataError,
    TokenIds as TokenIds,
    TrainBatches as TrainBatches,
    decode as decode,
    encode_document as encode_document,
    eval_batches as eval_batches,
    load_documents as load_documents,
    pack_documents as pack_documents,
    split_documents as split_documents,
)
from .train._eval import evaluate as evaluate
from .train._train_step import (
    accumulated_loss_and_grad as accumulated_loss_and_grad,
    make_optimizer as make_optimizer,
    train_step as train_step,
    weight_decay_mask as weight_decay_mask,
)

__version__ = "0.1.0"
