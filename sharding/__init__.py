"""Meshes (data, expert, tensor), the one rules table from logical axes to mesh axes, the shardings
it gives params / caches / activations, expert parallelism by all-to-all, multi-process runs."""

from sharding.mesh import (cache_shardings, constrain, make_mesh, on_mesh, param_shardings,
                           params_mesh, parse_mesh)
from sharding.rules import MESH_AXES, RULES, fit, shard_shape

__all__ = ["MESH_AXES", "RULES", "cache_shardings", "constrain", "fit", "make_mesh", "on_mesh",
           "param_shardings", "params_mesh", "parse_mesh", "shard_shape"]
