"""The network: config, FP8 numerics, layers, rotary, MLA + DSA, MoE, the scanned decoder."""

from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import Config, ConfigError, preset
from dsv32_jax.model.transformer import Transformer, init_cache

__all__ = ["Config", "ConfigError", "KVCache", "Transformer", "init_cache", "preset"]
