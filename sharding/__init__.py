"""Meshes (data, expert, tensor), the one rules table from logical axes to mesh axes, the shardings
it gives params / caches / activations, expert parallelism by all-to-all, multi-process runs, and
the memory planner (`sharding.plan`)."""

from sharding.mesh import (cache_shardings, constrain, make_mesh, on_mesh, param_shardings,
                           params_mesh, parse_mesh)
from sharding.rules import MESH_AXES, RULES, fit, shard_shape
from sharding import plan as plan_module  # the memory planner (`dsv32 plan`)
from sharding.plan import Plan, parse_bytes
from sharding.plan import plan as memory_plan, search as search_meshes, smallest as smallest_mesh

__all__ = ["MESH_AXES", "Plan", "RULES", "cache_shardings", "constrain", "fit", "make_mesh",
           "memory_plan", "on_mesh", "param_shardings", "params_mesh", "parse_bytes", "parse_mesh",
           "plan_module", "search_meshes", "shard_shape", "smallest_mesh"]
