"""Native XLA:CPU kernels: few-row products that read narrow weights (`gemv`).

XLA:CPU has no e4m3 or bf16 dot: it widens such a weight whole, every call, before a float32
product, so a CPU host kept float32 copies of every weight (`checkpoint.storage`, 2-4x the
memory) and still read 4 bytes a weight per decode step. `gemv.cc` reads the stored bytes and
widens them in registers. It is compiled on first use with the host's C++ compiler against the
XLA FFI headers jaxlib ships, into the cache directory (`build.library`), and registered as XLA
FFI targets for the CPU platform; nothing else changes when it is absent (`available()` False, the
reason in `why_not()`): the model then keeps the float32 storage.
"""

from dsv32_jax.native.build import NativeUnavailable, available, require, why_not
from dsv32_jax.native.gemv import GEMV_ROWS, gemv, gemv_reference

__all__ = ["GEMV_ROWS", "NativeUnavailable", "available", "gemv", "gemv_reference", "require",
           "why_not"]
