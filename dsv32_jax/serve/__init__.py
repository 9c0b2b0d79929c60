"""Serving: continuous batching over a paged FP8 cache (`Engine`), behind an OpenAI-compatible HTTP
server (`dsv32 serve`)."""

from dsv32_jax.serve.engine import Engine, EngineStopped, QueueFull
from dsv32_jax.serve.scheduler import Sampling

__all__ = ["Engine", "EngineStopped", "QueueFull", "Sampling"]
