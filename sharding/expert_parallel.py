"""Expert parallelism: token rows travel to the devices holding their experts and back.

The routed experts (L, E, out, in) are split over every device of the mesh (`rules.EVERY_DEVICE`):
device j holds experts [j*E/P, (j+1)*E/P). Inside one `shard_map` over all devices:

1. each device takes its own 1/P of the token rows (x (N, D) is cut along N; rows are padded to a
   multiple of P, pad rows route nowhere);
2. each pick (token, expert) gets a slot in a send buffer (P destinations x C rows): the pick's
   rank among this device's picks for that destination;
3. `all_to_all` delivers every buffer; the device runs its local experts over the rows it
   received (`compute`: the same expert-window loop as one device runs), and a second
   `all_to_all` returns each result to the slot it came from;
4. each token sums its picks' results with the routing weights (float32), as the unsharded path.

Capacity: with `capacity_factor=None` (the default) C = rows x min(top_k, E/P), the most picks one
device's rows can send to one destination, so no pick is ever dropped and the result equals the
unsharded one. With a factor f, C = ceil(f * rows * top_k / P) (at most the exact bound): picks
past a destination's C rows are dropped (they contribute 0) and counted; the count is returned
(and sown as `moe_dropped` by the MoE layer) so that tests and users can read it.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv32_jax.model.layers import pick_sum
from sharding.rules import EVERY_DEVICE


def capacity(rows: int, top_k: int, local_experts: int, devices: int,
             capacity_factor: float | None) -> int:
    """Send-buffer rows per destination device for `rows` token rows on one device."""
    exact = rows * min(top_k, local_experts)
    if capacity_factor is None:
        return exact
    return max(1, min(exact, math.ceil(capacity_factor * rows * top_k / devices)))


def dispatch(compute: Callable, params: dict, x: jax.Array, experts: jax.Array,
             weights: jax.Array, n_experts: int, devices: int,
             capacity_factor: float | None = None) -> tuple[jax.Array, jax.Array]:
    """x (N, D) tokens, experts (N, k) expert ids, weights (N, k) f32 -> (y (N, D) f32, dropped
    picks (int32 scalar)).

    params: a tree of arrays (L, E, ...) split on dim 1 over every device; compute(local params,
    rows (R, D), ids (R,) local expert ids (E/P: no expert), expected_rows) -> (R, D), each row
    through its expert (a row with no expert gives 0).
    """
    n, k = experts.shape
    if n_experts % devices:
        raise ValueError(f"expert parallelism: {n_experts} routed experts do not split over "
                         f"{devices} devices (the mesh's data x expert x tensor)")
    local = n_experts // devices
    pad = -n % devices
    x = jnp.pad(x, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=-1)  # pad rows: no pick
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    rows = (n + pad) // devices
    cap = capacity(rows, k, local, devices, capacity_factor)

    def body(x, experts, weights, params):  # x (rows, D), experts/weights (rows, k)
        picks = experts.reshape(-1)  # (rows*k,)
        valid = picks >= 0
        dest = jnp.where(valid, picks // local, devices)  # `devices`: nowhere
        onehot = dest[:, None] == jnp.arange(devices)[None]  # (rows*k, P)
        rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - 1,
                                   jnp.minimum(dest, devices - 1)[:, None], 1)[:, 0]
        kept = valid & (rank < cap)
        slot = jnp.where(kept, dest * cap + rank, devices * cap)  # out of range: not sent
        src = jnp.arange(rows * k) // k
        send = jnp.zeros((devices * cap, x.shape[1]), x.dtype).at[slot].set(x[src], mode="drop")
        ids = jnp.full((devices * cap,), local, jnp.int32).at[slot].set(
            (picks % local).astype(jnp.int32), mode="drop")
        recv = jax.lax.all_to_all(send, EVERY_DEVICE, 0, 0, tiled=True)  # row block i: from i
        recv_ids = jax.lax.all_to_all(ids, EVERY_DEVICE, 0, 0, tiled=True)
        out = compute(params, recv, recv_ids, rows * k)  # (P*C, D)
        back = jax.lax.all_to_all(out, EVERY_DEVICE, 0, 0, tiled=True)  # block j: from j
        got = jnp.where(kept[:, None], back[jnp.minimum(slot, devices * cap - 1)], 0)
        y = pick_sum(got.reshape(rows, k, -1), weights)
        dropped = jax.lax.psum(jnp.sum(valid & ~kept, dtype=jnp.int32), EVERY_DEVICE)
        return y, dropped

    split = P(EVERY_DEVICE)
    param_specs = jax.tree.map(lambda a: P(None, EVERY_DEVICE), params)
    y, dropped = jax.shard_map(body, in_specs=(split, split, split, param_specs),
                               out_specs=(split, P()), check_vma=False)(x, experts, weights, params)
    return y[:n], dropped
