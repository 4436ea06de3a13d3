"""The training application built on `eqx_mtp`: data pipeline, job, train step,
checkpoints, evaluation, plots and the `eqx-mtp` command line."""

from ._checkpoint import (
    Checkpointer as Checkpointer,
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
)
from ._config import (
    DataConfig as DataConfig,
    MeshConfig as MeshConfig,
    ObjectiveConfig as ObjectiveConfig,
    OptimizerConfig as OptimizerConfig,
    RunConfig as RunConfig,
    TrainConfig as TrainConfig,
)
from ._data import (
    BOS_ID as BOS_ID,
    BYTE_VOCAB_SIZE as BYTE_VOCAB_SIZE,
    EOS_ID as EOS_ID,
    PAD_ID as PAD_ID,
    ByteTokenizer as ByteTokenizer,
    DataError as DataError,
    PromptCompletion as PromptCompletion,
    TokenIds as TokenIds,
    TrainBatches as TrainBatches,
    decode_bytes as decode_bytes,
    encode_document as encode_document,
    eval_batches as eval_batches,
    load_documents as load_documents,
    pack_documents as pack_documents,
    split_documents as split_documents,
)
from ._eval import evaluate as evaluate
from ._framing import Framing as Framing
from ._job import train as train
from ._preemption import EXIT_PREEMPTED as EXIT_PREEMPTED, Preempted as Preempted
from ._text_tokenizer import (
    TextTokenizer as TextTokenizer,
    TokenizerError as TokenizerError,
)
from ._train_step import (
    accumulated_loss_and_grad as accumulated_loss_and_grad,
    make_optimizer as make_optimizer,
    train_step as train_step,
    weight_decay_mask as weight_decay_mask,
)
