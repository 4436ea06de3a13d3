"""Multi-Token Prediction for Equinox/JAX language models.

The objective, the model and its depths, decoding and the mesh helpers live here;
building blocks in `eqx_mtp.nn`, other projects' checkpoint formats in
`eqx_mtp.interop`, and the training application in `eqx_mtp.train` (imported on
demand: `import eqx_mtp` loads no orbax, grain, tqdm or matplotlib).
"""

import importlib.metadata

from . import interop as interop, nn as nn
from ._batch import PackedBatch as PackedBatch
from ._config import ModelConfig as ModelConfig, RopeScaling as RopeScaling
from ._cross_entropy import head_loss_sum as head_loss_sum
from ._curriculum import (
    DepthSchedule as DepthSchedule,
    parse_depth_schedule as parse_depth_schedule,
)
from ._decode import Generation as Generation, generate as generate
from ._decoder import (
    Decoder as Decoder,
    DecodeState as DecodeState,
    Drafts as Drafts,
)
from ._documents import document_ids as document_ids
from ._fused_ce import fused_cross_entropy as fused_cross_entropy
from ._loss import (
    mtp_loss as mtp_loss,
    mtp_loss_sums as mtp_loss_sums,
    mtp_loss_sums_from_hidden as mtp_loss_sums_from_hidden,
    reduce_losses as reduce_losses,
    resolve_mtp_weight as resolve_mtp_weight,
)
from ._mesh import (
    MESH_AXES as MESH_AXES,
    batch_sharding as batch_sharding,
    batch_spec as batch_spec,
    make_mesh as make_mesh,
)
from ._model import MTPModel as MTPModel
from ._mtp import (
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
from ._vocab_parallel import vocab_parallel_loss_sum as vocab_parallel_loss_sum

try:
    __version__ = importlib.metadata.version("eqx_mtp")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    __version__ = "0+unknown"


def __getattr__(name: str):
    # The training application is a subpackage the library never imports: loaded
    # when first named (`eqx_mtp.train`), so research code does not pay for orbax,
    # grain, tqdm and matplotlib.
    if name == "train":
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module 'eqx_mtp' has no attribute {name!r}")
