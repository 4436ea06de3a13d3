"""Fused attention kernels of accelerator backends, behind one calling convention:
`kernel(queries [seq, heads, head_dim], keys, values [seq, kv_heads, head_dim], *,
segment_ids [seq], block_size, interpret=False) -> [seq, heads, head_dim]`, causal
self-attention over one packed row (a query sees the earlier keys of its segment).
Segment ids are compared by equality: the trunk passes them numbered by
`eqx_mtp.document_ids`, so a reused id in a later run is another document."""

from ._pallas_gpu import pallas_gpu_attention as pallas_gpu_attention
from ._splash_tpu import splash_tpu_attention as splash_tpu_attention
