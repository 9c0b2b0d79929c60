"""Device meshes and the param shardings derived from the logical-axis rules."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import MESH_AXES, logical_specs


def make_mesh(expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (expert, tensor) mesh over `devices` (default: all); expert * tensor must equal their count."""
    devices = list(jax.devices() if devices is None else devices)
    if expert * tensor != len(devices):
        raise ValueError(f"mesh expert={expert} x tensor={tensor} needs {expert * tensor} devices, "
                         f"{len(devices)} available")
    return Mesh(np.array(devices).reshape(expert, tensor), MESH_AXES)


def param_shardings(specs_tree, mesh: Mesh):
    """Tree of ParamSpec -> tree of NamedSharding. A dim whose size the mesh axis does not divide
    (e.g. a block-scale dim of ceil(out/128)) is replicated instead of split."""
    from dsv32_jax.checkpoint.weights import ParamSpec

    def fit(spec: ParamSpec, pspec: PartitionSpec) -> NamedSharding:
        axes = []
        for size, axis in zip(spec.shape, tuple(pspec) + (None,) * (len(spec.shape) - len(pspec))):
            n = 1 if axis is None else mesh.shape[axis]
            axes.append(axis if size % n == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*axes))

    pspecs = logical_specs(specs_tree)
    return jax.tree.map(fit, specs_tree, pspecs, is_leaf=lambda x: isinstance(x, ParamSpec))
