"""Feed-forward blocks: the dense SwiGLU FFN and the routed MoE (sigmoid gate, group-limited top-k,
routed + shared experts). Routed experts run expert by expert over the tokens routed to them, so
the work is O(tokens * top_k) and only routed experts' weights are read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.config import BLOCK, Config, cdiv
from dsv32_jax.model.layers import (FP8, Linear, const_init, fp8_linear, matmul, normal_init,
                                    param, pick_sum, fp8_init)
from dsv32_jax.model.quant import FP32_BY_SPEC, act_quant, dequant, einsum
from pallas_kernels.grouped_fp8 import grouped_fp8_matmul
from sharding import expert_parallel
from sharding.mesh import context_mesh


class FFN(nn.Module):
    """w2( silu(w1 x) * w3 x ), silu and product in float32."""

    cfg: Config
    inter_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, q8 = self.cfg, self.cfg.quantized
        w1 = Linear(cfg, cfg.dim, self.inter_dim, ("mlp", "embed"), q8, name="w1")
        w3 = Linear(cfg, cfg.dim, self.inter_dim, ("mlp", "embed"), q8, name="w3")
        w2 = Linear(cfg, self.inter_dim, cfg.dim, ("embed", "mlp"), q8, name="w2")
        h = jax.nn.silu(w1(x).astype(jnp.float32)) * w3(x).astype(jnp.float32)
        return w2(h.astype(x.dtype))


def route(logits: jax.Array, bias: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Sigmoid routing with group limiting. logits (N,E) f32, bias (E,) -> weights (N,k) f32,
    experts (N,k) int32. The bias steers selection only; weights use the unbiased scores."""
    scores = jax.nn.sigmoid(logits)
    biased = scores + bias.astype(jnp.float32)
    n, e = biased.shape
    g = cfg.n_expert_groups
    if g > 1:
        grouped = biased.reshape(n, g, e // g)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # (N, G): sum of the top-2 per group
        _, keep = jax.lax.top_k(group_score, cfg.n_limited_groups)  # (N, topk_group)
        kept = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], keep].set(True)
        biased = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, experts = jax.lax.top_k(biased, cfg.n_activated_experts)
    w = jnp.take_along_axis(scores, experts, axis=-1)
    w = w / w.sum(-1, keepdims=True) * cfg.route_scale
    return w, experts


EXPERTS = "experts"  # the variable collection of the stacked routed-expert weights


class Experts(nn.Module):
    """E stacked experts, weights (E, out, in) (+ (E, out/128, in/128) scales when FP8, unless
    stored dequantized in float32: `checkpoint.storage`).

    Only routed experts are touched. The picks are sorted by expert and cut into windows of at
    most `window` rows of one expert; a loop over windows reads that expert's weights (one expert
    live, dequantized if need be) and runs its SwiGLU on the window's rows. Decode (one token):
    one window per routed expert, 8 experts read. Prefill: every used expert read about once.

    The weights of all MoE layers are one stacked array (L_moe, E, out, in) in the collection
    `EXPERTS`, which the layer scan broadcasts instead of slicing: each window reads its expert
    at [layer, e] straight from the stack (a scanned param would be sliced to the whole layer's
    256 experts, 3.5 GiB, on every step). `transformer.variables` / `merge_experts` move them
    between that collection and the one params tree users see (same paths, same shapes).
    """

    cfg: Config
    stack: int | None = None  # MoE layers in the stack: cfg.n_moe_layers, or the MTP layers'

    def setup(self):
        cfg = self.cfg
        lay = cfg.n_moe_layers if self.stack is None else self.stack
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        shapes = {"w1": (i, d), "w3": (i, d), "w2": (d, i)}
        axes = {"w1": ("layers", "experts", "moe_mlp", "embed"),
                "w3": ("layers", "experts", "moe_mlp", "embed"),
                "w2": ("layers", "experts", "embed", "moe_mlp")}
        w, s = {}, {}
        for name, (n, k) in shapes.items():
            if cfg.quantized and self.has_variable(EXPERTS, f"{name}_weight") and not \
                    self.has_variable(EXPERTS, f"{name}_scale"):  # the host's float32 W * scale
                w[name] = self._stacked(f"{name}_weight", (lay, e, n, k), jnp.float32, axes[name],
                                        fp8_init)
            elif cfg.quantized:
                w[name] = self._stacked(f"{name}_weight", (lay, e, n, k), FP8, axes[name], fp8_init)
                s[name] = self._stacked(f"{name}_scale", (lay, e, cdiv(n, BLOCK), cdiv(k, BLOCK)),
                                        jnp.float32, axes[name], const_init(k**-0.5))
            else:
                w[name] = self._stacked(f"{name}_weight", (lay, e, n, k), jnp.bfloat16, axes[name],
                                        normal_init(k**-0.5))
        self.w, self.s = w, s  # (L, E, out, in) e4m3 | f32 | bf16;  (L, E, out/128, in/128) f32

    def _stacked(self, name, shape, dtype, axes, init):
        # a broadcast variable's init must not depend on the scan step, so not on the split
        # "params" rngs: random weights come from the EXPERTS rng stream, which the layer scan
        # does not split (`weights.init_params` seeds it); drawn only when initializing
        boxed = nn.with_logical_partitioning(init, axes)
        box = self.variable(EXPERTS, name, lambda: boxed(self.make_rng(EXPERTS), shape, dtype))
        return nn.unbox(box.value)

    def __call__(self, x: jax.Array, experts: jax.Array, weights: jax.Array,
                 layer: jax.Array) -> jax.Array:
        """x (N,D), experts (N,k) of MoE layer `layer`, routing weights (N,k) f32 -> (N,D) f32:
        sum over picks of weight * Expert_e(x). With a mesh of several devices in context the
        experts are the devices' own (`sharding.expert_parallel`): token rows travel to them."""
        cfg = self.cfg
        params = {"w": self.w, "s": self.s}

        def compute(params, rows, ids, expected):
            return routed_rows(cfg, params["w"], params["s"], layer, rows, jnp.arange(rows.shape[0]),
                               ids, expected)

        mesh = context_mesh()
        if mesh is not None:
            y, dropped = expert_parallel.dispatch(compute, pick_sum, params, x, experts, weights,
                                                  cfg.n_routed_experts, mesh.shape,
                                                  cfg.ep_capacity_factor)
            self.sow("intermediates", "moe_dropped", dropped)
            return y
        n, k = experts.shape
        picks = experts.reshape(-1)
        out = routed_rows(cfg, self.w, self.s, layer, x, jnp.arange(n * k) // k, picks, n * k)
        return pick_sum(out.reshape(n, k, -1), weights)


def routed_rows(cfg: Config, w: dict, s: dict, layer: jax.Array, x: jax.Array, src: jax.Array,
                ids: jax.Array, expected: int) -> jax.Array:
    """Rows x[src] (R,) through their experts `ids` (R,) (an id >= E, the stack's expert count:
    no expert, the row's output is 0) of MoE layer `layer` -> (R, D) in the compute dtype.

    w / s: the stacked weights (L, E, out, in) / block scales by projection name (s empty: bf16
    weights, or FP8 ones stored dequantized in float32, `checkpoint.storage`). The rows are
    sorted by expert and cut into windows of one expert (`expert_window`, sized for `expected`
    rows with an expert); a loop over windows reads that expert at [layer, e] and runs its
    SwiGLU on the window's rows. An expert gets at most len(x) rows (each token picks it once).
    """
    if cfg.matmul_impl == "pallas" and s:
        return routed_rows_pallas(cfg, w, s, layer, x, src, ids, expected)
    r = ids.shape[0]
    order, window, plan = sorted_windows(ids, x.shape[0], expected, w["w1"].shape[1])
    xs = jnp.pad(x[src[order]], ((0, window), (0, 0)))  # (R + window, D), pad rows unused

    def linear(name, e, rows):
        return expert_linear(cfg, w[name], s[name] if s else None, rows, (layer, e))

    def run(i, y):
        e, start, rows = plan[0][i], plan[1][i], plan[2][i]

        def swiglu(y):
            xw = jax.lax.dynamic_slice_in_dim(xs, start, window, 0)
            h = (jax.nn.silu(linear("w1", e, xw).astype(jnp.float32))
                 * linear("w3", e, xw).astype(jnp.float32))
            out = linear("w2", e, h.astype(x.dtype))
            out = jnp.where((jnp.arange(window) < rows)[:, None], out, 0).astype(y.dtype)
            cur = jax.lax.dynamic_slice_in_dim(y, start, window, 0)
            return jax.lax.dynamic_update_slice_in_dim(y, cur + out, start, 0)

        return jax.lax.cond(rows > 0, swiglu, lambda y: y, y)

    y = jax.lax.fori_loop(0, plan[0].shape[0], run,
                          jnp.zeros((r + window, x.shape[-1]), cfg.dtype))
    return jnp.zeros((r, x.shape[-1]), y.dtype).at[order].set(y[:r])


def routed_rows_pallas(cfg: Config, w: dict, s: dict, layer: jax.Array, x: jax.Array,
                       src: jax.Array, ids: jax.Array, expected: int) -> jax.Array:
    """`routed_rows` with FP8 weights and activations through the grouped Pallas kernel
    (`pallas_kernels.grouped_fp8`), same arguments, same result to float rounding.

    The same sorted-window layout, windows of `window` >= 16 rows (Triton's smallest dot): each
    projection is one kernel call over every window, reading each window's expert at [layer, e]
    from the stack. The w1 / w3 outputs come back per window, (W, window, I), and are the w2
    call's input rows as they are (window w's rows at w * window); the w2 output rows scatter
    back to the picks' order once."""
    r, dtype = ids.shape[0], jnp.dtype(cfg.dtype)
    order, window, (expert, start, rows) = sorted_windows(ids, x.shape[0], expected,
                                                          w["w1"].shape[1], min_window=16)
    n_win = expert.shape[0]

    def proj(name, xin, st):
        xq, xsc = act_quant(xin, cfg.scale_fmt)
        out = grouped_fp8_matmul(xq, xsc, w[name], s[name], expert, st, rows, layer,
                                 block_rows=window)  # (W, window, N) f32
        return out.astype(dtype)

    xin = x[src[order]]  # (R, D) sorted by expert
    h = (jax.nn.silu(proj("w1", xin, start).astype(jnp.float32))
         * proj("w3", xin, start).astype(jnp.float32))
    h = h.astype(x.dtype).reshape(n_win * window, -1)  # window w's rows at w * window
    out = proj("w2", h, jnp.arange(n_win, dtype=jnp.int32) * window)  # (W, window, D)
    valid = jnp.arange(window)[None, :] < rows[:, None]  # (W, window)
    pos = jnp.clip(start[:, None] + jnp.arange(window)[None, :], 0, r - 1)
    dest = jnp.where(valid, order[pos], r)  # the pick each output row belongs to; r: none
    y = jnp.zeros((r + 1, x.shape[-1]), dtype).at[dest.reshape(-1)].set(
        out.reshape(-1, x.shape[-1]), mode="drop")
    return y[:r]


def expert_linear(cfg: Config, w: jax.Array, s: jax.Array | None, x: jax.Array,
                  index: tuple) -> jax.Array:
    """One expert's projection: rows x (C, K), weight w[index] (N, K) of the stack w (+ block
    scales s[index] when FP8; none when stored dequantized, `checkpoint.storage`) -> (C, N) in the
    compute dtype. The native kernels read w[index] in place; the rest slice it out."""
    dtype = jnp.dtype(cfg.dtype)
    if cfg.quantized and cfg.fp8_activations and s is not None:
        return fp8_linear(x, w, s, cfg.scale_fmt, dtype,
                          "native" if cfg.matmul_impl == "native" else "xla", index)
    w, s = w[index], None if s is None else s[index]
    if not cfg.quantized:
        return matmul(x, w, dtype)
    if cfg.fp8_activations:
        return fp8_linear(x, w, s, cfg.scale_fmt, dtype)
    return matmul(x, w.astype(dtype) if s is None else dequant(w, s, dtype), dtype)


WINDOW_ROWS = 64  # the most rows one expert window multiplies at once


def expert_window(tokens: int, picks: int, n_experts: int) -> int:
    """Rows per expert window: about the expected rows per expert (picks / experts), a power of
    two in [1, min(tokens, WINDOW_ROWS)] (an expert gets at most `tokens` rows)."""
    want = 1 << max(0, (cdiv(picks, n_experts) - 1).bit_length())
    return max(1, min(want, tokens, WINDOW_ROWS))


def sorted_windows(ids: jax.Array, tokens: int, expected: int, n_exp: int, min_window: int = 1):
    """The layout both expert paths run: (order, window, table). order (R,): the rows sorted by
    expert, the expert-less (ids >= n_exp) last; window: rows per expert window (`expert_window`,
    at least min_window); table: `_windows`' (expert, first row, rows), one entry per window."""
    r = ids.shape[0]
    order = jnp.argsort(ids, stable=True)
    counts = jnp.bincount(ids, length=n_exp)  # ids >= n_exp are not counted
    window = max(min_window, expert_window(tokens, expected, n_exp))
    n_win = min(n_exp, r) + (cdiv(r, window) if window < tokens else 0)
    return order, window, _windows(counts, window, n_win)


def _windows(counts: jax.Array, window: int, n_windows: int):
    """The window table for picks sorted by expert: (expert, first row, rows) per window, each
    (n_windows,) int32; unused windows have 0 rows. counts (E,): rows per expert; n_windows: a
    static bound on sum(ceil(counts / window)) (every expert has at most `tokens` rows, so a
    window as large as that gives one window per used expert)."""
    per = (counts + window - 1) // window  # windows per expert
    end = jnp.cumsum(per)
    w = jnp.arange(n_windows)
    e = jnp.minimum(jnp.searchsorted(end, w, side="right"), counts.shape[0] - 1)
    j = w - (end[e] - per[e])  # window j of expert e
    first = jnp.cumsum(counts) - counts
    rows = jnp.clip(counts[e] - j * window, 0, window)
    rows = jnp.where(w < end[-1], rows, 0)
    return e.astype(jnp.int32), (first[e] + j * window).astype(jnp.int32), rows.astype(jnp.int32)


class MoE(nn.Module):
    """y = sum_picks weight * Expert_e(x) (float32 accumulate) + SharedExperts(x)."""

    cfg: Config
    stack: int | None = None  # the routed-expert stack's layer count (`Experts.stack`)

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array) -> jax.Array:
        """x (..., D) in MoE layer `layer` (its index among the MoE layers) -> (..., D)."""
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, cfg.dim)
        with jax.named_scope("gate"):
            wg = param(self, "gate_weight", (cfg.n_routed_experts, cfg.dim), jnp.bfloat16,
                       ("router", "embed"), normal_init(cfg.dim**-0.5))
            bias = param(self, "gate_bias", (cfg.n_routed_experts,), jnp.float32, ("router",),
                         const_init(0.0))
            with jax.named_scope(FP32_BY_SPEC):
                logits = einsum("nd,ed->ne", x, wg, jnp.float32)
            weights, experts = route(logits, bias, cfg)
            self.sow("intermediates", "gate_experts", jnp.sort(experts, axis=-1))
        with jax.named_scope("experts"):
            y = Experts(cfg, self.stack, name="experts")(x, experts, weights, layer)  # (N,D) f32
        with jax.named_scope("shared_experts"):
            y = y + FFN(cfg, cfg.n_shared_experts * cfg.moe_inter_dim, name="shared")(x)
        return y.astype(x.dtype).reshape(shape)
