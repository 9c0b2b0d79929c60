"""Pallas GPU kernels (Triton lowering; interpreted off GPU).

DeepSeek Sparse Attention (`attention_impl="pallas"`):
  index_logits        the lightning indexer's scores, head sum in the kernel, causal tile skipping
  topk                radix-select top-k per score row (ties to the lower slot, -1: no visible key)
  sparse_mla          absorbed MLA over gathered FP8 latent rows, split-k with log-sum-exp combine
FP8 matmuls (`matmul_impl="pallas"`):
  fp8_linear          the block-scaled FP8 linear (per-128-K-block scale promotion, f32 accumulation)
  grouped_fp8_matmul  the routed experts over the sorted-window table, each expert read in place
Each has a jnp `*_reference` and its block sizes in a frozen dataclass. index_logits and sparse_mla
read the layer-stacked contiguous cache or, with a page table (`pages=`), the serving engine's pool.
"""

from pallas_kernels.fp8_linear import GemmBlocks, fp8_linear, fp8_linear_reference
from pallas_kernels.grouped_fp8 import GroupedBlocks, grouped_fp8_matmul, grouped_fp8_reference
from pallas_kernels.indexer import IndexerBlocks, index_logits, index_logits_reference
from pallas_kernels.sparse_mla import SparseMLABlocks, sparse_mla, sparse_mla_reference
from pallas_kernels.topk import TopkBlocks, topk, topk_reference

__all__ = ["GemmBlocks", "GroupedBlocks", "IndexerBlocks", "SparseMLABlocks", "TopkBlocks",
           "fp8_linear", "fp8_linear_reference", "grouped_fp8_matmul", "grouped_fp8_reference",
           "index_logits", "index_logits_reference", "sparse_mla", "sparse_mla_reference", "topk",
           "topk_reference"]
