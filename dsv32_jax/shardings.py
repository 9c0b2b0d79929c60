"""Where params and caches lie on a mesh: the NamedShardings their logical axes give (`sharding.rules`
through `sharding.mesh.sharding_for`). Built above the model and the checkpoint's param description,
which the hooks of `sharding.mesh` sit below."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from dsv32_jax.checkpoint.weights import ParamSpec
from dsv32_jax.model.cache import KVCache
from sharding.mesh import sharding_for


def param_shardings(specs_tree, mesh: Mesh):
    """Tree of ParamSpec (checkpoint.weights.abstract_params) -> tree of NamedSharding."""
    return jax.tree.map(lambda s: sharding_for(mesh, s.names, s.shape), specs_tree,
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def cache_shardings(caches, mesh: Mesh):
    """{group: KVCache} (arrays or ShapeDtypeStructs) -> the same tree of NamedSharding (the
    cache's logical axes: `KVCache.AXES`)."""
    return {g: KVCache(**{k: sharding_for(mesh, KVCache.AXES[k], getattr(c, k).shape)
                          for k in KVCache.AXES})
            for g, c in caches.items()}
