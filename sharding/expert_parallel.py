"""Expert parallelism: token rows travel to the devices holding their experts and back.

The routed experts (L, E, out, in) are split over the mesh axes `rules.expert_axes` gives: every
device (`rules.EVERY_DEVICE`) when the device count P divides E, else the part of the mesh with
the most devices Q that divides E (12 experts on (2,2,2): expert x tensor, Q = 4), replicated
over the other axes. Within each expert group (the Q devices that together hold all experts),
device j holds experts [j*E/Q, (j+1)*E/Q). Inside one `shard_map` over all devices:

1. each device takes its own 1/P of the token rows (x (N, D) is cut along N; rows are padded to a
   multiple of P, pad rows route nowhere);
2. each pick (token, expert) gets a slot in a send buffer (Q destinations x C rows): the pick's
   rank among this device's picks for that destination;
3. `all_to_all` over the expert axes delivers every buffer within the group; the device runs its
   local experts (local id = expert id mod E/Q) over the rows it received (`compute`: the same
   expert-window loop as one device runs), and a second `all_to_all` returns each result to the
   slot it came from (Q = 1: every device holds every expert, nothing travels);
4. each token sums its picks' results with the routing weights (`combine`: the model's own float32
   sum, as on the unsharded path).

Capacity: with `capacity_factor=None` (the default) C = rows x min(top_k, E/Q), the most picks one
device's rows can send to one destination, so no pick is ever dropped and the result equals the
unsharded one. With a factor f, C = ceil(f * rows * top_k / Q) (at most the exact bound): picks
past a destination's C rows are dropped (they contribute 0) and counted; the count is returned
(and sown as `moe_dropped` by the MoE layer) so that tests and users can read it.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import EVERY_DEVICE, axis_size, expert_axes


def capacity(rows: int, top_k: int, local_experts: int, groups: int,
             capacity_factor: float | None) -> int:
    """Send-buffer rows per destination device for `rows` token rows on one device, the experts
    split `groups` ways (`local_experts` on each)."""
    exact = rows * min(top_k, local_experts)
    if capacity_factor is None:
        return exact
    return max(1, min(exact, math.ceil(capacity_factor * rows * top_k / groups)))


def dispatch(compute: Callable, combine: Callable, params: dict, x: jax.Array, experts: jax.Array,
             weights: jax.Array, n_experts: int, mesh_shape,
             capacity_factor: float | None = None) -> tuple[jax.Array, jax.Array]:
    """x (N, D) tokens, experts (N, k) expert ids, weights (N, k) f32 -> (y (N, D) f32, dropped
    picks (int32 scalar)), on the mesh in context (of shape `mesh_shape`).

    params: a tree of arrays (L, E, ...) split on dim 1 over `expert_axes(E, mesh_shape)`;
    compute(local params, rows (R, D), ids (R,) local expert ids (E/Q: no expert), expected_rows)
    -> (R, D), each row through its expert (a row with no expert gives 0);
    combine(results (rows, k, D), weights (rows, k)) -> (rows, D) f32, each token's weighted sum.
    """
    n, k = experts.shape
    axes = expert_axes(n_experts, mesh_shape)
    devices, groups = axis_size(EVERY_DEVICE, mesh_shape), axis_size(axes, mesh_shape)
    local = n_experts // groups
    pad = -n % devices
    x = jnp.pad(x, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=-1)  # pad rows: no pick
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    rows = (n + pad) // devices
    cap = capacity(rows, k, local, groups, capacity_factor)

    def exchange(a):  # row block i of the result: from / back to group member i
        return jax.lax.all_to_all(a, axes, 0, 0, tiled=True) if groups > 1 else a

    def body(x, experts, weights, params):  # x (rows, D), experts/weights (rows, k)
        picks = experts.reshape(-1)  # (rows*k,)
        valid = picks >= 0
        dest = jnp.where(valid, picks // local, groups)  # `groups`: nowhere
        onehot = dest[:, None] == jnp.arange(groups)[None]  # (rows*k, Q)
        rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - 1,
                                   jnp.minimum(dest, groups - 1)[:, None], 1)[:, 0]
        kept = valid & (rank < cap)
        slot = jnp.where(kept, dest * cap + rank, groups * cap)  # out of range: not sent
        src = jnp.arange(rows * k) // k
        send = jnp.zeros((groups * cap, x.shape[1]), x.dtype).at[slot].set(x[src], mode="drop")
        ids = jnp.full((groups * cap,), local, jnp.int32).at[slot].set(
            (picks % local).astype(jnp.int32), mode="drop")
        out = compute(params, exchange(send), exchange(ids), rows * k)  # (Q*C, D)
        back = exchange(out)
        got = jnp.where(kept[:, None], back[jnp.minimum(slot, groups * cap - 1)], 0)
        y = combine(got.reshape(rows, k, -1), weights)
        dropped = jax.lax.psum(jnp.sum(valid & ~kept, dtype=jnp.int32), EVERY_DEVICE)
        return y, dropped

    split = P(EVERY_DEVICE)
    param_specs = jax.tree.map(lambda a: P(None, axes or None), params)
    y, dropped = jax.shard_map(body, in_specs=(split, split, split, param_specs),
                               out_specs=(split, P()), check_vma=False)(x, experts, weights, params)
    return y[:n], dropped
