"""The memory planner behind `dsv32 plan`: per-device bytes of a model on a (data, expert, tensor)
mesh, without allocating anything, and the search for meshes that fit.

`plan(cfg, mesh_shape, context, batch)` -> `Plan`, per device:

- **weights**: every param of `checkpoint.weights.abstract_params(cfg)` at the shard shape the
  rules give it (`rules.shard_shape`: a dim the mesh does not divide is replicated), summed by dtype
  (FP8 e4m3 / bf16 / f32). These are exactly the shards `load_model(..., mesh=)` allocates
  (tests/test_plan.py compares them with the loaded arrays on 8 simulated devices).
- **cache**: every layer group's `KVCache` at (layers, batch, context) laid out by `KVCache.AXES`
  (sequences over "data"; replicated over "expert" and "tensor"), exactly as `init_cache` makes it.
  `context` is the cache length in slots (generate gives a request `bucket(prompt) + bucket(new)`).
- **activations** (live tensors of one forward, per device; B = the global batch, b = the local
  batch (B / data when data divides it, else B), s = the queries per step, H = heads per device):
    - `hidden`: the residual stream h and residual (b, s, D) in the compute dtype + one f32 copy
      (the fused-add RMSNorm);
    - `attention`: q (b,s,H,dn+r), q_c and o_c (b,s,H,C), o (b,s,H,dv) in the compute dtype;
      kv (b,s,C+R); the indexer's q (b,s,n,d) (e4m3 with FP8 simulation) and weights (b,s,n) f32;
      the top-k slots (b,s,k) int32;
    - `ffn`: the larger of the dense FFN and the shared expert: silu(w1 x) and w3 x as f32
      (b,s,I/t) and their product in the compute dtype; plus the router's f32 (b*s, E) logits,
      scores and masked scores (3 copies);
    - `logits`: the f32 head output of the local batch (b, V/t) at the step's last position; a
      decode step adds sampling's five (b, V) f32/int32 arrays (scaled, sort order, sorted,
      probs, cumsum), over the whole vocabulary.
- **workspace** (the bounded working buffers the code builds, per device):
    - `indexer`: one key tile's (B, s, n, tile) f32 dots (tile = `attention.key_tile_size`, sized
      to `attention.BUDGET` over the global batch, so a device holds BUDGET / data), the tile's
      scores, masked scores and slots (b, s, tile), and the top-k merge: candidates (b, s, k+tile)
      and the running top-k (b, s, k), values f32 + slots int32;
    - `sparse_attention`: one query chunk (`attention.query_chunk_size`) of gathered latent rows
      (b, chunk, k, C+R) in f32 (dequantized) and its scores and softmax (b, chunk, H, k) f32;
    - `matmul`: the largest FP8 linear's `quant.blockwise_matmul` buffers: (M, g, N) f32 partials
      (g chosen under `quant.PARTIALS_BYTES` for the global M = B*s rows) cut to this device's
      rows and output columns, plus the (M, N) f32 accumulator and group sum; plus wkv_b
      dequantized for the absorbed attention (H, dn+dv, C) in the compute dtype with its two f32
      temporaries (without FP8 activations: the largest linear's weight dequantized the same way);
    - `head`: f32_matmul's widened head rows (WIDEN_ROWS, D) f32;
    - `gathered_table` (vocab split over "tensor"): one whole (V, D) table in the compute dtype.
      Measured on XLA:GPU (`benchmarks/deviceless.py`, the full model on 1,1,8 for an H100): the
      partitioner all-gathers the embedding for the token lookup and the head for f32_matmul's
      row-chunk loop (1.85 GB each, one live at a time) — the bulk of the step's 1.73 GiB temp;
    - `expert_parallel` (a mesh of P > 1 devices): each device's 1/P of the B*s token rows
      (`rows`), send buffers of Q x C rows (Q: the devices the experts are split over,
      `rules.expert_axes`; C = `expert_parallel.capacity`; exact by default: no pick dropped) of
      D values in the compute dtype: send, receive, the experts' output and the returned rows (4
      buffers), the received rows sorted and the windowed output (2 more), the ids (2 x Q*C
      int32), and the returned picks (rows*k, D) plus the f32 sum (rows, D). On one
      device: the sorted rows and windowed output (2 x (B*s*k, D)) and the scattered output;
    - `expert_window`: one expert window (`moe.expert_window` rows): its rows and output (w, D),
      the f32 SwiGLU halves (w, I) and its projections' blockwise partials (w, g, N) f32.
  Two phases are planned: a prefill chunk (s = min(PREFILL_CHUNK, context) queries per sequence,
  the logits at one position) and a decode step (s = 1, with sampling); the larger total counts.

XLA adds its own temporaries (fusion outputs, layout copies, collective buffers); the estimate
counts the buffers the code names, which is what grows with batch and context. The planner keeps a
**headroom** of the device memory free for the runtime (CUDA context, NCCL, allocator slack):
10% by default. JAX preallocates 75% of a GPU's memory by default; to use the planned memory set
`XLA_PYTHON_CLIENT_MEM_FRACTION` to 1 - headroom (0.90).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import numpy as np

from dsv32_jax.checkpoint.weights import abstract_params, flatten
from dsv32_jax.engine.generate import PREFILL_CHUNK
from dsv32_jax.model import attention, layers, moe, quant
from dsv32_jax.model.cache import KVCache
from dsv32_jax.model.config import BLOCK, cdiv
from dsv32_jax.model.transformer import layer_counts
from sharding import expert_parallel
from sharding.rules import axis_size, expert_axes, expert_layout, shard_shape

HEADROOM = 0.10  # the share of device memory the plan leaves to the runtime
H100, H200 = 80e9, 141e9  # bytes (as marketed: nvidia-smi shows 81559 MiB / 143771 MiB)
SEARCH_COUNTS = tuple(2**i for i in range(9))  # 1 .. 256 devices


# ---- sizes ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'141GB' (1e9), '80GiB' (2**30), '141e9', '512MiB', '1.5TB' -> bytes (an int > 0)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with an optional unit, e.g. "
                         "141GB, 80GiB, 141e9 (units: B, KB, MB, GB, TB = powers of 1000; KiB, MiB, "
                         "GiB, TiB = powers of 1024)")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"memory size {text!r} must be at least 1 byte")
    return int(value)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


# ---- the plan ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[int, int, int]  # (data, expert, tensor)
    context: int
    batch: int
    weights: dict  # {"fp8", "bf16", "f32", "total"} bytes per device
    cache: int  # bytes per device
    activations: dict  # {term: bytes} of the peak phase
    workspace: dict  # {term: bytes} of the peak phase
    phase: str  # "prefill" or "decode": the phase with the larger activations + workspace
    phases: dict  # {phase: {"activations": {...}, "workspace": {...}, "total": bytes}}
    device_memory: int | None = None
    headroom: float = HEADROOM
    problems: tuple[str, ...] = ()  # reasons this mesh cannot run the model at all
    experts: str = ""  # how the routed experts lie on the mesh (`rules.expert_layout`)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh)

    @property
    def total(self) -> int:
        return (self.weights["total"] + self.cache + sum(self.activations.values())
                + sum(self.workspace.values()))

    @property
    def usable(self) -> int | None:
        return None if self.device_memory is None else int(self.device_memory * (1 - self.headroom))

    @property
    def free(self) -> int | None:
        return None if self.usable is None else self.usable - self.total

    @property
    def fits(self) -> bool | None:
        if self.problems:
            return False
        return None if self.usable is None else self.total <= self.usable

    def to_json(self) -> dict:
        return {"mesh": {"data": self.mesh[0], "expert": self.mesh[1], "tensor": self.mesh[2]},
                "devices": self.devices, "context": self.context, "batch": self.batch,
                "weights": dict(self.weights), "cache": self.cache,
                "activations": dict(self.activations), "workspace": dict(self.workspace),
                "activations_total": sum(self.activations.values()),
                "workspace_total": sum(self.workspace.values()), "peak_phase": self.phase,
                "phases": self.phases, "total": self.total, "device_memory": self.device_memory,
                "headroom": self.headroom, "usable": self.usable, "free": self.free,
                "fits": self.fits, "problems": list(self.problems), "experts": self.experts}


def _mesh_dict(mesh_shape) -> dict:
    if isinstance(mesh_shape, dict):
        return dict(mesh_shape)
    d, e, t = mesh_shape
    return {"data": d, "expert": e, "tensor": t}


@functools.lru_cache(maxsize=16)
def _cache_specs(cfg, batch: int, context: int):
    """{(group, field): (shape, dtype)} of init_cache(cfg, batch, context), without allocating."""
    out = {}
    for group, n in layer_counts(cfg).items():
        if n:
            c = jax.eval_shape(lambda n=n: KVCache.zeros(cfg, n, batch, context))
            for k in KVCache.AXES:
                a = getattr(c, k)
                out[(group, k)] = (tuple(a.shape), np.dtype(a.dtype))
    return out


_DTYPE_KEY = {"float8_e4m3fn": "fp8", "bfloat16": "bf16", "float32": "f32"}


def weight_bytes(cfg, mesh_shape) -> dict:
    """Per-device param bytes by dtype: {"fp8", "bf16", "f32", "total"} (+ any other dtype's name)."""
    ms = _mesh_dict(mesh_shape)
    out = {"fp8": 0, "bf16": 0, "f32": 0}
    for spec in flatten(abstract_params(cfg)).values():
        n = math.prod(shard_shape(spec.names, spec.shape, ms)) * np.dtype(spec.dtype).itemsize
        key = _DTYPE_KEY.get(np.dtype(spec.dtype).name, np.dtype(spec.dtype).name)
        out[key] = out.get(key, 0) + n
    out["total"] = sum(out.values())
    return out


def cache_bytes(cfg, mesh_shape, context: int, batch: int) -> int:
    """Per-device bytes of every layer group's KVCache (batch, context) laid out by KVCache.AXES."""
    ms = _mesh_dict(mesh_shape)
    return sum(math.prod(shard_shape(KVCache.AXES[k], shape, ms)) * dtype.itemsize
               for (_, k), (shape, dtype) in _cache_specs(cfg, batch, context).items())


def _split(names, sizes, ms) -> tuple[int, ...]:
    """Per-device sizes of activation dims with these logical names (fit: replicated if undivided)."""
    return shard_shape(tuple(names), tuple(sizes), ms)


def _phase(cfg, ms: dict, context: int, batch: int, s: int, decode: bool) -> tuple[dict, dict]:
    """(activations, workspace) per device for a step of s queries per sequence."""
    f32, i32 = 4, 4
    dt = np.dtype(cfg.dtype).itemsize
    fp8 = 1 if cfg.fp8_activations else dt
    devices = math.prod(ms.values())
    b = _split(("batch",), (batch,), ms)[0]  # local sequences
    d_eff = batch // b  # how many ways the batch is split
    D, V, H = cfg.dim, cfg.vocab_size, cfg.n_heads
    h = _split(("heads",), (H,), ms)[0]
    C, R, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    n_idx, d_idx = cfg.index_n_heads, cfg.index_head_dim
    kk = min(cfg.index_topk, context)
    tok = b * s  # local tokens

    act = {}
    act["hidden"] = tok * D * (2 * dt + f32)
    act["attention"] = (tok * h * ((dn + R) + 2 * C + dv) * dt + tok * (C + R) * dt
                        + tok * n_idx * (d_idx * fp8 + f32) + tok * kk * i32)
    ffn_widths = []
    if cfg.n_dense_layers:
        ffn_widths.append(_split(("mlp",), (cfg.inter_dim,), ms)[0])
    if cfg.n_moe_layers:
        ffn_widths.append(_split(("mlp",), (cfg.n_shared_experts * cfg.moe_inter_dim,), ms)[0])
    router = 3 * tok * cfg.n_routed_experts * f32 if cfg.n_moe_layers else 0
    act["ffn"] = max(ffn_widths) * tok * (2 * f32 + dt) + router
    v_local = _split(("vocab",), (V,), ms)[0]
    act["logits"] = b * v_local * f32 + (5 * b * V * f32 if decode else 0)

    ws = {}
    tile = attention.key_tile_size(batch, s, n_idx, context)
    ws["indexer"] = (batch * s * n_idx * tile * f32 // d_eff + 3 * tok * tile * f32
                     + tok * (kk + tile) * (f32 + i32) + tok * kk * (f32 + i32))
    q_chunk = attention.query_chunk_size(batch, kk, C + R, H)
    chunk = s if s <= q_chunk else q_chunk
    ws["sparse_attention"] = b * chunk * kk * (C + R) * f32 + 2 * b * chunk * h * kk * f32

    # FP8 linears: blockwise_matmul over the global M = B*s rows, cut to this device
    mm = 0
    dequant = 0
    m_global = batch * s
    for path, spec in flatten(abstract_params(cfg)).items():
        if path[-1] != "weight" or len(spec.shape) < 2 or "experts" in spec.names:
            continue
        n, k = spec.shape[-2:]
        n_loc, k_loc = shard_shape(spec.names, spec.shape, ms)[-2:]
        if cfg.quantized and np.dtype(spec.dtype).itemsize == 1:
            if cfg.fp8_activations:
                nb = k // BLOCK
                g = max([x for x in range(1, nb + 1)
                         if nb % x == 0 and m_global * x * n * 4 <= quant.PARTIALS_BYTES] or [1])
                rows = m_global // d_eff
                mm = max(mm, rows * g * n_loc * f32 + (2 * rows * n_loc * f32 if g < nb else 0))
            else:
                dequant = max(dequant, n_loc * k_loc * (dt + 2 * f32))
            if path[-2] == "wkv_b":
                dequant = max(dequant, n_loc * k_loc * (dt + 2 * f32))
    ws["matmul"] = mm + dequant
    ws["head"] = min(layers.WIDEN_ROWS, V) * D * f32 if V > layers.WIDEN_ROWS else 0
    # XLA:GPU (compiled for an H100, benchmarks/deviceless.py) all-gathers a vocab-split table
    # whole: the embedding for the token lookup, the head for its row-chunk loop; one at a time
    ws["gathered_table"] = V * D * dt if _split(("vocab",), (V,), ms)[0] < V else 0

    k_exp, E = cfg.n_activated_experts, cfg.n_routed_experts
    I_moe = cfg.moe_inter_dim
    if cfg.n_moe_layers:
        n_tok = batch * s  # the MoE layer sees x.reshape(-1, D) of the global batch
        if devices > 1:
            rows = cdiv(n_tok, devices)
            groups = axis_size(expert_axes(E, ms), ms)  # the send buffers' destinations
            local = E // groups
            cap = expert_parallel.capacity(rows, k_exp, local, groups, cfg.ep_capacity_factor)
            window = moe.expert_window(groups * cap, rows * k_exp, local)
            ws["expert_parallel"] = (6 * groups * cap * D * dt + 2 * window * D * dt
                                     + 2 * groups * cap * i32 + rows * k_exp * D * dt
                                     + rows * D * f32)
        else:
            r = n_tok * k_exp
            window = moe.expert_window(n_tok, r, E)
            ws["expert_parallel"] = 3 * r * D * dt + 2 * window * D * dt + n_tok * D * f32
        partials = 0
        if cfg.quantized and cfg.fp8_activations:  # the window's blockwise_matmul (w1/w3, w2)
            for n, k in ((I_moe, D), (D, I_moe)):
                nb = k // BLOCK
                g = max([x for x in range(1, nb + 1)
                         if nb % x == 0 and window * x * n * 4 <= quant.PARTIALS_BYTES] or [1])
                partials = max(partials, window * g * n * f32)
        ws["expert_window"] = window * (2 * D * dt + 2 * I_moe * f32) + partials
    return act, ws


def plan(cfg, mesh_shape, context: int, batch: int, device_memory: int | None = None,
         headroom: float = HEADROOM) -> Plan:
    """Per-device memory of `cfg` on a mesh (data, expert, tensor) for `batch` sequences of
    `context` cache slots. See the module docstring for every term."""
    ms = _mesh_dict(mesh_shape)
    shape = (ms["data"], ms["expert"], ms["tensor"])
    for name, v in (("context", context), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for name, v in ms.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"mesh {name}={v!r}: expected an integer >= 1")
    problems = []
    if context > cfg.max_seq_len:
        problems.append(f"context {context} exceeds the model's {cfg.max_seq_len} positions")
    phases = {}
    for name, s, decode in (("prefill", min(PREFILL_CHUNK, context), False), ("decode", 1, True)):
        act, ws = _phase(cfg, ms, context, batch, s, decode)
        phases[name] = {"activations": act, "workspace": ws,
                        "total": sum(act.values()) + sum(ws.values())}
    peak = max(phases, key=lambda p: phases[p]["total"])
    return Plan(mesh=shape, context=context, batch=batch, weights=weight_bytes(cfg, ms),
                cache=cache_bytes(cfg, ms, context, batch),
                activations=phases[peak]["activations"], workspace=phases[peak]["workspace"],
                phase=peak, phases=phases, device_memory=device_memory, headroom=headroom,
                problems=tuple(problems),
                experts=expert_layout(cfg.n_routed_experts, ms) if cfg.n_moe_layers else "")


# ---- search --------------------------------------------------------------------------------------


def meshes(devices: int) -> list[tuple[int, int, int]]:
    """Every (data, expert, tensor) with data * expert * tensor = devices."""
    out = []
    for d in range(1, devices + 1):
        if devices % d:
            continue
        for e in range(1, devices // d + 1):
            if (devices // d) % e == 0:
                out.append((d, e, devices // d // e))
    return out


def _rank(p: Plan):
    """Best first: fits, then the most free memory; ties go to fewer data groups (less duplicated
    attention compute), then to more tensor. Memory only: link speeds are not modelled."""
    return (not p.fits, -(p.free if p.free is not None else -p.total), p.mesh[0], -p.mesh[2])


def search(cfg, devices: int, context: int, batch: int, device_memory: int,
           headroom: float = HEADROOM) -> list[Plan]:
    """Plans of every mesh of `devices` devices, best first (the rule: among the meshes that fit,
    the one that leaves the most memory free; ties go to fewer data groups, then more tensor)."""
    return sorted((plan(cfg, m, context, batch, device_memory, headroom) for m in meshes(devices)),
                  key=_rank)


def smallest(cfg, context: int, batch: int, device_memory: int, headroom: float = HEADROOM,
             counts=SEARCH_COUNTS) -> dict:
    """The fewest devices (of `counts`) with a mesh that fits -> {"devices", "best" (Plan),
    "fitting" (meshes)}; devices None when no count fits."""
    for n in counts:
        found = [p for p in search(cfg, n, context, batch, device_memory, headroom) if p.fits]
        if found:
            return {"devices": n, "best": found[0], "fitting": [p.mesh for p in found]}
    return {"devices": None, "best": None, "fitting": []}


# ---- report --------------------------------------------------------------------------------------


def table(p: Plan) -> str:
    """A human-readable breakdown of one plan (GB = 1e9 bytes)."""
    d, e, t = p.mesh
    rows = [("weights FP8", p.weights.get("fp8", 0)), ("weights bf16", p.weights.get("bf16", 0)),
            ("weights f32", p.weights.get("f32", 0)), ("weights", p.weights["total"]),
            ("cache", p.cache)]
    rows += [(f"  act {k}", v) for k, v in p.activations.items()]
    rows.append((f"activations ({p.phase})", sum(p.activations.values())))
    rows += [(f"  ws {k}", v) for k, v in p.workspace.items()]
    rows.append((f"workspace ({p.phase})", sum(p.workspace.values())))
    rows.append(("total", p.total))
    if p.usable is not None:
        rows.append((f"usable ({p.device_memory / 1e9:.1f} GB - {p.headroom:.0%} headroom)",
                     p.usable))
        rows.append(("free" if p.free >= 0 else "short by", abs(p.free)))
    width = max(len(r[0]) for r in rows)
    lines = [f"mesh data={d} expert={e} tensor={t} ({p.devices} devices), context {p.context}, "
             f"batch {p.batch}: per device, GB"]
    lines += [f"  {name:<{width}}  {gb(v):>9}" for name, v in rows]
    if p.experts:
        lines.append(f"  {p.experts}")
    if p.problems:
        lines += [f"  cannot run: {x}" for x in p.problems]
    elif p.fits is not None:
        lines.append(f"  {'FITS' if p.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)


__all__ = ["HEADROOM", "H100", "H200", "Plan", "cache_bytes", "meshes", "parse_bytes", "plan",
           "search", "smallest", "table", "weight_bytes"]
