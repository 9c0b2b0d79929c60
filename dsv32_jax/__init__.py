"""DeepSeek-V3.2 (MLA + DeepSeek Sparse Attention, MoE) in JAX/Flax."""

from dsv32_jax.model.config import Config, ConfigError, preset
from dsv32_jax.engine.runner import Model, load_model

__all__ = ["Config", "ConfigError", "Model", "load_model", "preset"]
__version__ = "0.1.0"
