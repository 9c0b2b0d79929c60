"""Pallas GPU kernels (lightning-indexer scoring, sparse MLA). Not implemented yet: attention_impl="pallas" raises."""
