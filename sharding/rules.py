"""One table: logical axis name -> mesh axes (None: replicated), for params, caches and activations.

Mesh axes (`make_mesh(data=, expert=, tensor=)`):
- "data": the batch. Each data group holds its own sequences and their caches.
- "expert": devices of one data group that share its sequences; attention is replicated over it.
- "tensor": attention heads, FFN hidden units and the vocabulary are split over it.
The routed experts are split over every device (all three axes: 256 experts on 8 devices = 32
each); tokens travel to their experts by all-to-all (`sharding.expert_parallel`). When the device
count does not divide the experts (12 experts on 8 devices), they are split over the sub-product
of the mesh axes with the largest size that does (12 on (2,2,2): expert x tensor, 3 per device)
and replicated over the other axes (`fit`, `expert_axes`).

The lightning indexer stays replicated over "tensor" (`index_heads: None`): its keys are shared by
all 64 index heads, so splitting the heads would save no key reads (the decode traffic), and the
top-k needs the full head sum — splitting would add an all-reduce of the (B, S, T) f32 scores per
layer. Its head sum happens on the device, inside the tile loop; the cost is prefill indexer FLOPs
repeated on each tensor device.
"""

from __future__ import annotations

import itertools

MESH_AXES = ("data", "expert", "tensor")
EVERY_DEVICE = MESH_AXES  # the routed experts, and the token rows while they are dispatched

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # params
    ("layers", None),  # the scanned layer axis
    ("vocab", "tensor"),  # embedding rows and head outputs (vocab-parallel)
    ("embed", None),
    ("eh_in", None),  # the MTP layer's eh_proj input: [embedding; hidden] (2 x embed)
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
    ("pool", "data"),  # the paged pool's rows: each data group holds its own sequences' pages
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


def split_axes(axes, size: int, mesh_shape) -> tuple | str | None:
    """The mesh axes a dim of `size` is split over, given its rule's entry `axes` (a name, a tuple
    or None): the entry itself when its shard count divides `size`; else, for a tuple, its
    sub-tuple (in mesh order) with the largest shard count > 1 that divides `size` (ties: fewer
    axes, then the innermost ones: a tensor group shares a host's fastest links), the dim
    replicated over the other axes; None (replicated) when no such part exists."""
    if axes is None or size % axis_size(axes, mesh_shape) == 0:
        return axes
    if not isinstance(axes, tuple):
        return None
    subs = [sub for r in range(1, len(axes)) for sub in itertools.combinations(axes, r)
            if axis_size(sub, mesh_shape) > 1 and size % axis_size(sub, mesh_shape) == 0]
    if not subs:
        return None
    return max(subs, key=lambda sub: (axis_size(sub, mesh_shape), -len(sub),
                                      sum(map(MESH_AXES.index, sub))))


def fit(names: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape) -> tuple:
    """Mesh-axes entries for an array of `shape` with these logical names: a dim the mesh axes do
    not divide (a block-scale dim of ceil(out/128), a batch of 1 over 2 data groups, a vocab or
    heads that the tensor axis does not divide) is replicated instead of split, or for a rule
    of several axes (the routed experts) split over the largest part of them that divides it
    (`split_axes`)."""
    return tuple(split_axes(a, size, mesh_shape) for a, size in zip(mesh_axes(names), shape))


def shard_shape(names, shape, mesh_shape) -> tuple[int, ...]:
    """The per-device shape of an array laid out by `fit`."""
    return tuple(size // axis_size(a, mesh_shape) for a, size in zip(fit(names, shape, mesh_shape), shape))


def expert_axes(n_experts: int, mesh_shape) -> tuple[str, ...]:
    """The mesh axes the routed-expert stack of `n_experts` is split over (() : every device holds
    every expert); the experts are replicated over the mesh's other axes."""
    axes = split_axes(AXIS_OF["experts"], n_experts, mesh_shape)
    return () if axes is None else axes


def expert_layout(n_experts: int, mesh_shape) -> str:
    """One line saying how the routed experts lie on a mesh, e.g. '12 routed experts over 8
    devices: split 4 ways over expert x tensor (3 per device), replicated over data (2 copies)'."""
    axes = expert_axes(n_experts, mesh_shape)
    groups = axis_size(axes, mesh_shape)
    devices = axis_size(MESH_AXES, mesh_shape)
    rest = [a for a in MESH_AXES if a not in axes and mesh_shape[a] > 1]
    used = [a for a in axes if mesh_shape[a] > 1]
    text = f"{n_experts} routed experts over {devices} devices: "
    if groups == 1:
        return text + f"every device holds all {n_experts} (no part of the mesh divides them)"
    text += f"split {groups} ways over {' x '.join(used)} ({n_experts // groups} per device)"
    if rest:
        text += f", replicated over {' x '.join(rest)} ({devices // groups} copies)"
    return text
