"""Pallas GPU kernels for DeepSeek Sparse Attention (Triton lowering; interpreted off GPU).

  index_logits  the lightning indexer's scores, head sum in the kernel, causal tile skipping
  topk          radix-select top-k per score row (ties to the lower slot, -1: no visible key)
  sparse_mla    absorbed MLA over gathered FP8 latent rows, split-k with log-sum-exp combine
Each has a jnp `*_reference` and its block sizes in a frozen dataclass.
"""

from pallas_kernels.indexer import IndexerBlocks, index_logits, index_logits_reference
from pallas_kernels.sparse_mla import SparseMLABlocks, sparse_mla, sparse_mla_reference
from pallas_kernels.topk import TopkBlocks, topk, topk_reference

__all__ = ["IndexerBlocks", "index_logits", "index_logits_reference", "SparseMLABlocks",
           "sparse_mla", "sparse_mla_reference", "TopkBlocks", "topk", "topk_reference"]
