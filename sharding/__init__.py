"""Mesh axes, the table mapping the model's logical param axes onto them, and param shardings."""

from sharding.mesh import make_mesh, param_shardings
from sharding.rules import MESH_AXES, RULES, logical_specs

__all__ = ["MESH_AXES", "RULES", "logical_specs", "make_mesh", "param_shardings"]
