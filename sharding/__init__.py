"""Meshes (data, expert, tensor), the one rules table from logical axes to mesh axes, the hooks the
model runs under (`sharding.mesh`), expert parallelism by all-to-all, multi-process runs, and the
memory planner (`sharding.plan`). Only the modules below the model are re-exported here: the planner,
which reads the model, is imported by its own name."""

from sharding.mesh import constrain, make_mesh, on_mesh, params_mesh, parse_mesh
from sharding.rules import MESH_AXES, RULES, fit, shard_shape

__all__ = ["MESH_AXES", "RULES", "constrain", "fit", "make_mesh", "on_mesh", "params_mesh", "parse_mesh",
           "shard_shape"]
