"""Mesh axes and the table mapping the model's logical param axes onto them."""

from sharding.rules import MESH_AXES, RULES, logical_specs

__all__ = ["MESH_AXES", "RULES", "logical_specs"]
