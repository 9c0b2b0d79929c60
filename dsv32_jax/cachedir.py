"""Where the project keeps what it caches (compiled programs, synthetic checkpoints, the native
kernels' library): $DSV32_CACHE, else ~/.cache/dsv32_jax."""

from __future__ import annotations

import os


def cache_dir() -> str:
    return os.environ.get("DSV32_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv32_jax")
