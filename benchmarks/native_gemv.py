"""The native CPU kernels (`dsv32_jax.native.gemv`) against the XLA:CPU products they replace, one
process, side by side: the float32 storage's product (`checkpoint.storage` "f32": the weight
dequantized once, read as float32) and the narrow storage's (the e4m3 / bf16 weight widened in
the step, `quant.dequant_matmul` / `layers.f32_matmul`), per weight shape and rows of x.

Shapes: the 127M step-cost model's (`benchmarks.step_cost`: hidden 1024) and the release's
(hidden 7168). Times are the median of --repeats calls after a warm-up; GB/s counts the weight's
bytes as each product reads them (1 a value e4m3, 2 bf16, 4 float32). CPU only.

    python -m benchmarks.native_gemv [--rows 1 4 32] [--repeats 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import median_time
from dsv32_jax import native
from dsv32_jax.model.layers import f32_matmul
from dsv32_jax.model.quant import dequant, dequant_matmul, einsum

# (name, N, K, kind): kind e4m3 = an FP8 linear (block scales), bf16 = the head
SHAPES = [
    ("127M head", 32768, 1024, "bf16"),
    ("127M wq_a", 384, 1024, "e4m3"),
    ("127M expert w1", 256, 1024, "e4m3"),
    ("127M dense w1", 2048, 1024, "e4m3"),
    ("671B wq_a", 1536, 7168, "e4m3"),
    ("671B expert w1", 2048, 7168, "e4m3"),
    ("671B expert w2", 7168, 2048, "e4m3"),
]


def case(n: int, k: int, kind: str, m: int, repeats: int, rng) -> dict[str, float]:
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    if kind == "bf16":
        w = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32)).astype(jnp.bfloat16)
        s = None
        wide = w.astype(jnp.float32)
        runs = {"native": (jax.jit(native.gemv), (x, w), w.nbytes),
                "xla f32": (jax.jit(lambda x, w: f32_matmul(x, w)), (x, wide), wide.nbytes),
                "xla narrow": (jax.jit(lambda x, w: f32_matmul(x, w)), (x, w), w.nbytes)}
    else:
        w = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32)).astype(jnp.float8_e4m3fn)
        s = jnp.asarray(2.0 ** rng.integers(-8, 0, (-(-n // 128), -(-k // 128))), jnp.float32)
        bits = jax.lax.bitcast_convert_type(w, jnp.uint8)
        wide = dequant(w, s, jnp.float32)
        xs = jnp.ones((m, k // 128), jnp.float32)
        xq = x.astype(jnp.float8_e4m3fn)
        runs = {"native": (jax.jit(native.gemv), (x, bits, s), bits.nbytes),
                "xla f32": (jax.jit(lambda x, w: einsum("mk,nk->mn", x, w, jnp.float32)),
                            (x, wide), wide.nbytes),
                "xla narrow": (jax.jit(dequant_matmul), (xq, xs, w, s), w.nbytes)}
    out = {}
    for name, (fn, args, nbytes) in runs.items():
        ms = 1e3 * median_time(lambda: fn(*args), repeats)
        out[name] = ms
        out[name + " GB/s"] = nbytes / ms / 1e6
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    native.require()
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| weight | N x K | rows | native ms (GB/s) | XLA f32 ms (GB/s) | XLA narrow ms (GB/s) "
          "| f32 / native | narrow / native |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, n, k, kind in SHAPES:
        for m in args.rows:
            r = case(n, k, kind, m, args.repeats, rng)
            rows.append({"weight": name, "n": n, "k": k, "kind": kind, "rows": m, **r})
            cells = " | ".join(f"{r[c]:.3f} ({r[c + ' GB/s']:.1f})"
                               for c in ("native", "xla f32", "xla narrow"))
            print(f"| {name} ({kind}) | {n} x {k} | {m} | {cells} | "
                  f"{r['xla f32'] / r['native']:.2f}x | {r['xla narrow'] / r['native']:.2f}x |",
                  flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
