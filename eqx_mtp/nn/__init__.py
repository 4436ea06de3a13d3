"""Building blocks: the Llama-style trunk and its parts, attention kernels, and the
blocks an MTP depth may run."""

from .._blockwise import blockwise_attention as blockwise_attention
from .._kv_cache import KVCache as KVCache
from .._mtp import LinearBlock as LinearBlock, MLPBlock as MLPBlock
from .._transformer import (
    Attention as Attention,
    RMSNorm as RMSNorm,
    SwiGLU as SwiGLU,
    Transformer as Transformer,
    TransformerBlock as TransformerBlock,
)
