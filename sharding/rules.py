"""One table: logical axis name -> mesh axes (None: replicated), for params, caches and activations.

Mesh axes (`make_mesh(data=, expert=, tensor=)`):
- "data": the batch. Each data group holds its own sequences and their caches.
- "expert": devices of one data group that share its sequences; attention is replicated over it.
- "tensor": attention heads, FFN hidden units and the vocabulary are split over it.
The routed experts are split over every device (all three axes: 256 experts on 8 devices = 32
each); tokens travel to their experts by all-to-all (`sharding.expert_parallel`).

The lightning indexer stays replicated over "tensor" (`index_heads: None`): its keys are shared by
all 64 index heads, so splitting the heads would save no key reads (the decode traffic), and the
top-k needs the full head sum — splitting would add an all-reduce of the (B, S, T) f32 scores per
layer. Its head sum happens on the device, inside the tile loop; the cost is prefill indexer FLOPs
repeated on each tensor device.
"""

from __future__ import annotations

MESH_AXES = ("data", "expert", "tensor")
EVERY_DEVICE = MESH_AXES  # the routed experts, and the token rows while they are dispatched

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # params
    ("layers", None),  # the scanned layer axis
    ("vocab", "tensor"),  # embedding rows and head outputs (vocab-parallel)
    ("embed", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_lora_rope", None),
    ("q_heads", "tensor"),  # wq_b output: heads x (nope + rope)
    ("kv_heads", "tensor"),  # wkv_b output: heads x (nope + v)
    ("o_heads", "tensor"),  # wo input: heads x v
    ("index_heads", None),  # indexer heads x 128: replicated (see above)
    ("index_n", None),
    ("index_dim", None),
    ("mlp", "tensor"),  # dense / shared-expert hidden units
    ("experts", EVERY_DEVICE),  # the routed-expert stack (L, E, out, in)
    ("router", None),  # the gate's (E, D) weight and (E,) bias: every device routes its tokens
    ("moe_mlp", None),
    # activations and caches
    ("batch", "data"),
    ("seq", None),  # query positions / cache slots
    ("heads", "tensor"),  # per-head activations (B, S, H, ...)
)

AXIS_OF = dict(RULES)


def mesh_axes(names: tuple[str | None, ...]) -> tuple:
    """Logical names (None: replicated) -> one mesh-axes entry per dim (a name, a tuple, None)."""
    unknown = [n for n in names if n is not None and n not in AXIS_OF]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no entry in sharding.rules.RULES")
    return tuple(None if n is None else AXIS_OF[n] for n in names)


def axis_size(axes, mesh_shape) -> int:
    """The number of shards a mesh-axes entry (name, tuple or None) makes on a mesh of this shape."""
    if axes is None:
        return 1
    size = 1
    for a in (axes if isinstance(axes, tuple) else (axes,)):
        size *= mesh_shape[a]
    return size


def fit(names: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape) -> tuple:
    """Mesh-axes entries for an array of `shape` with these logical names: a dim the mesh axes do
    not divide (a block-scale dim of ceil(out/128), a batch of 1 over 2 data groups, a vocab that
    the tensor axis does not divide) is replicated instead of split."""
    axes = mesh_axes(names)
    return tuple(a if size % axis_size(a, mesh_shape) == 0 else None for a, size in zip(axes, shape))


def shard_shape(names, shape, mesh_shape) -> tuple[int, ...]:
    """The per-device shape of an array laid out by `fit`."""
    return tuple(size // axis_size(a, mesh_shape) for a, size in zip(fit(names, shape, mesh_shape), shape))
