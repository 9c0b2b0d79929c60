"""One table: logical axis name (as declared on every param) -> mesh axis (or None: replicated).

Mesh axes: "expert" (expert parallelism: routed experts split across devices) and "tensor"
(tensor parallelism: attention heads, FFN hidden units and the vocabulary split across devices).
"""

from __future__ import annotations

import jax
from flax import linen as nn

MESH_AXES = ("expert", "tensor")

RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),  # the scanned layer axis
    ("vocab", "tensor"),
    ("embed", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_lora_rope", None),
    ("q_heads", "tensor"),  # wq_b output: heads x (nope + rope)
    ("kv_heads", "tensor"),  # wkv_b output: heads x (nope + v)
    ("o_heads", "tensor"),  # wo input: heads x v
    ("index_heads", None),  # indexer heads x 128: replicated (top-k needs all heads' sums)
    ("index_n", None),
    ("index_dim", None),
    ("mlp", "tensor"),  # dense / shared-expert hidden units
    ("experts", "expert"),
    ("moe_mlp", None),
)


def logical_specs(specs_tree):
    """Tree of ParamSpec (dsv32_jax.checkpoint.weights.abstract_params) -> tree of mesh PartitionSpec."""
    from dsv32_jax.checkpoint.weights import ParamSpec

    known = {name for name, _ in RULES}

    def one(spec: ParamSpec) -> jax.sharding.PartitionSpec:
        unknown = [n for n in spec.names if n not in known]
        if unknown:
            raise KeyError(f"logical axes {unknown} have no entry in sharding.rules.RULES")
        return nn.logical_to_mesh_axes(spec.names, RULES)

    return jax.tree.map(one, specs_tree, is_leaf=lambda x: isinstance(x, ParamSpec))
