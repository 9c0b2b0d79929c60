"""Device meshes, an array's NamedSharding from its logical axes (`sharding_for`), and the hooks the
model runs under: the mesh in context, a constraint on an activation (`constrain`), a computation on
each device's own block (`local`). This module sits below the model and imports none of it; the
param and cache shardings are built above it (`dsv32_jax.shardings`)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding.rules import MESH_AXES, fit


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: every device of every process);
    data * expert * tensor must equal their count. Devices are laid out in `jax.devices()` order,
    so a tensor group is the innermost (on one host: its fastest links)."""
    for name, n in (("data", data), ("expert", expert), ("tensor", tensor)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"mesh {name}={n!r}: expected an integer >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if data * expert * tensor != len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x tensor={tensor} needs "
                         f"{data * expert * tensor} devices, {len(devices)} available")
    return Mesh(np.array(devices).reshape(data, expert, tensor), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """'d,e,t' (e.g. '1,8,1') -> (data, expert, tensor)."""
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"mesh {text!r}: expected three integers >= 1 as data,expert,tensor "
                         "(e.g. 1,8,1)")
    return parts


def sharding_for(mesh: Mesh, names, shape) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*fit(tuple(names), tuple(shape), mesh.shape)))


def context_mesh():
    """The mesh set by `jax.set_mesh` (tracing under it), or None when there is none, it has a
    single device, or every axis is manual (inside `local`): the model then runs unpartitioned
    code (on the device's own block)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
        return None
    return mesh


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """A sharding constraint from logical names on an activation (a no-op without a mesh)."""
    mesh = context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*fit(names, x.shape, mesh.shape)))


def params_mesh(params) -> Mesh | None:
    """The mesh the params are laid out on (None: one device)."""
    for leaf in jax.tree.leaves(params):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
        return None
    return None


def on_mesh(params):
    """Context for tracing or running the model over these params: their mesh set (constraints,
    expert parallelism), or nothing for params on one device."""
    return use_mesh(params_mesh(params))


def use_mesh(mesh: Mesh | None):
    """Context with `mesh` set (None: nothing), as `on_mesh` for params laid out on it."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def local(fn, in_names: tuple, out_names):
    """fn run on each device's own block of its arguments, laid out by logical names (one tuple
    per argument, () for a scalar, a pytree of tuples for a pytree such as a cache; out_names: a
    tuple, or a tuple of them for several results),
    with no communication: for ops whose every output element depends only on the same block of
    its inputs (the per-sequence cache writes and row gathers, batch over "data"). Without a mesh,
    fn itself. This keeps such ops local where XLA's partitioner might otherwise re-split them
    (it has split the layer dim of a cache scatter and all-gathered it back)."""
    def run(*args):
        mesh = context_mesh()
        if mesh is None:
            return fn(*args)

        def spec(names, shape):
            return PartitionSpec(*fit(tuple(names), tuple(shape), mesh.shape))

        def specs(names, arg):  # a tuple of names per array of `arg`
            return jax.tree.map(lambda n, a: spec(n, a.shape), names, arg,
                                is_leaf=lambda n: isinstance(n, tuple))

        out_shapes = jax.eval_shape(fn, *args)
        specs_in = tuple(specs(n, a) for n, a in zip(in_names, args))
        if isinstance(out_shapes, tuple):
            specs_out = tuple(spec(n, o.shape) for n, o in zip(out_names, out_shapes))
        else:
            specs_out = spec(out_names, out_shapes.shape)
        return jax.shard_map(fn, in_specs=specs_in, out_specs=specs_out, check_vma=False)(*args)

    return run
