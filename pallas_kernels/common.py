"""What the kernels share: the backend choice (the Triton lowering of `pl.pallas_call` on CUDA,
jax's interpreter running the same kernel elsewhere, chosen by the platform being lowered for),
argument checks that raise clear `ValueError`s, and the paged pool's addressing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import triton_fp8

triton_fp8.install()  # FP8 dots on wgmma, promoted every 128 of K (see that module)

HIGHEST = jax.lax.Precision.HIGHEST  # f32 operands: IEEE dots under Triton (not TF32)


def pallas_call(kernel, *, interpret: bool | None, **kwargs):
    """`pl.pallas_call` for the platform the program is lowered for: the compiled (Triton) kernel
    on CUDA, jax's generic interpreter running the same kernel on any other platform.

    The choice is `jax.lax.platform_dependent`, made when lowering: a program compiled for an H100
    on a machine without one (see benchmarks/deviceless.py) holds the Triton kernel, whatever
    `jax.default_backend()` says, and only the chosen branch is lowered. `interpret=True/False`
    forces one (tests, benchmarks)."""
    if interpret is not None:
        return pl.pallas_call(kernel, interpret=interpret, **kwargs)
    compiled = pl.pallas_call(kernel, interpret=False, **kwargs)
    interpreted = pl.pallas_call(kernel, interpret=True, **kwargs)
    return lambda *args: jax.lax.platform_dependent(*args, cuda=compiled, default=interpreted)


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params; passing them is also what selects the Triton lowering (without
    them a GPU pallas_call lowers through Mosaic GPU)."""
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_shape(name: str, x, shape: tuple, dtypes=None) -> None:
    """x.shape == shape (None entries: any size) and x.dtype in dtypes."""
    ok = x.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    want = tuple("*" if s is None else s for s in shape)
    check(ok, f"{name} must have shape {want}, got {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(jnp.dtype(d) for d in dtypes)
        check(x.dtype in dtypes, f"{name} must have dtype in {[d.name for d in dtypes]}, "
                                 f"got {x.dtype}")


def check_pow2(name: str, n: int) -> None:
    """Triton tensors (a loaded block, a dot operand) need power-of-two sizes."""
    check(is_pow2(n), f"{name} must be a power of two (Triton block sizes), got {n}")


FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn)


# The cache keeps e4m3 / bf16 values as their bit patterns (uint8 / uint16); kernels take either
# and reinterpret the bits in registers (a bitcast of the whole cache outside could be a copy).
FROM_BITS = {jnp.dtype(jnp.uint8): jnp.dtype(jnp.float8_e4m3fn),
             jnp.dtype(jnp.uint16): jnp.dtype(jnp.bfloat16)}


def value_dtype(x) -> jnp.dtype:
    """The float type of an array given as values or as their bit patterns."""
    return FROM_BITS.get(jnp.dtype(x.dtype), jnp.dtype(x.dtype))


def from_bits(x):
    """In a kernel: a loaded block as its float values."""
    want = FROM_BITS.get(jnp.dtype(x.dtype))
    return x if want is None else jax.lax.bitcast_convert_type(x, want)


def layer_arg(x, layer, ndim: int, name: str):
    """A cache array of one layer (ndim dims) or layer-stacked (ndim + 1, with `layer`): ->
    (shape without the layer axis, the layer as a (1,) int32 array for the kernel)."""
    if x.ndim == ndim + 1:
        check(layer is not None, f"{name} is layer-stacked {tuple(x.shape)}: pass layer=")
        return x.shape[1:], jnp.asarray(layer, jnp.int32).reshape(1)
    check(x.ndim == ndim and layer is None,
          f"{name} must have {ndim} dims (or {ndim + 1} with layer=), got shape {tuple(x.shape)}"
          + (" and a layer" if layer is not None else ""))
    return x.shape, jnp.zeros((1,), jnp.int32)


def lead(ref, ndim: int, layer, *b) -> tuple:
    """The leading index into a cache ref of `ndim` dims a layer: the layer when the ref is
    layer-stacked, then b (sequence b of a contiguous cache; nothing for a paged pool)."""
    return ((layer,) if len(ref.shape) == ndim + 1 else ()) + b


# The paged pool (the serving engine's `PagedKVCache`): one (N, ...) pool of rows per layer,
# N = pages x PAGE, and a page table pages (B, P) int32: logical slot t of sequence b lives in
# pool row pages[b, t // PAGE] * PAGE + t % PAGE. A sequence sees T = P x PAGE logical slots.
PAGE = 64  # slots per page


def page_rows(pages_ref, b, slot):
    """In a kernel: pool rows of sequence b's logical slots `slot` (in [0, P x PAGE)), one
    lookup of its page-table row each."""
    return pages_ref[b, slot // PAGE] * PAGE + slot % PAGE


def unpage(pool, pages):
    """jnp (the references): a pool (N, ...) read through a page table (B, P) -> the contiguous
    layout (B, P x PAGE, ...)."""
    rows = pages[:, :, None] * PAGE + jnp.arange(PAGE, dtype=pages.dtype)
    return pool[rows.reshape(pages.shape[0], -1)]


def cache_arg(x, layer, pages, bsz: int, width: int, name: str, axis: str):
    """A cache array a kernel reads in place: one layer's (B,T,width), or with `pages` a paged
    pool's (N,width); either one layer-stacked, with `layer`. -> (T, the row axes' sizes, the
    stack's, the layer as the kernel's (1,) int32 argument)."""
    if pages is None:
        shape, layer_a = layer_arg(x, layer, 3, name)
        t_len, rows = shape[1], (bsz, shape[1])
        check(tuple(shape) == (bsz, t_len, width), f"{name} must be (B,T,{axis}) = ({bsz}, T, "
              f"{width}) a layer, got {tuple(x.shape)}")
    else:
        name = f"{name} (a paged pool)"
        shape, layer_a = layer_arg(x, layer, 2, name)
        check(tuple(shape) == (shape[0], width), f"{name} must be (N,{axis}) = (N, {width}) a "
              f"layer, got {tuple(x.shape)}")
        t_len, rows = check_pages(pages, bsz, shape[0]), (shape[0],)
    return t_len, rows, tuple(x.shape[:x.ndim - len(rows) - 1]), layer_a


def check_pages(pages, bsz: int, n_rows: int) -> int:
    """A page table (B, P) int32 over a pool of n_rows rows -> T = P x PAGE logical slots."""
    check_shape("pages", pages, (bsz, None), (jnp.int32,))
    check(pages.shape[1] >= 1, "pages must have at least one page per sequence")
    check(n_rows % PAGE == 0 and n_rows >= PAGE,
          f"a paged pool holds whole pages of {PAGE} rows, got {n_rows} rows")
    return pages.shape[1] * PAGE


H100 = "NVIDIA H100 80GB HBM3"


def lower_for_gpu(fn, *avals, device_kind: str = H100, num_cores: int = 132) -> str:
    """Lower jit(fn) for an abstract GPU, no GPU needed: runs the Triton lowering of every kernel
    (unsupported ops, block shapes) but not ptxas. Returns the StableHLO text."""
    dev = jax.sharding.AbstractDevice(device_kind=device_kind, platform="gpu", num_cores=num_cores)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
        return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
