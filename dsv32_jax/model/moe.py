"""Feed-forward blocks: the dense SwiGLU FFN and the routed MoE (sigmoid gate, group-limited top-k,
routed + shared experts). Routed experts run as a grouped (ragged) matmul over tokens sorted by
expert, so the work is O(tokens * top_k), not O(tokens * experts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsv32_jax.model.config import BLOCK, Config
from dsv32_jax.model.layers import FP8, Linear, cdiv, const_init, fp8_init, normal_init, param, precision
from dsv32_jax.model.quant import act_quant, block_scaled_matmul, dequant


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


def _ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x (M,K) rows sorted by group, w (G,N,K) -> (M,N) f32: row m uses w[group of m]."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(x, w, group_sizes, dims, precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32)


class Experts(nn.Module):
    """E stacked experts, weights (E, out, in) (+ (E, out/128, in/128) scales when FP8)."""

    cfg: Config

    def setup(self):
        cfg = self.cfg
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        shapes = {"w1": (i, d), "w3": (i, d), "w2": (d, i)}
        axes = {"w1": ("experts", "moe_mlp", "embed"), "w3": ("experts", "moe_mlp", "embed"),
                "w2": ("experts", "embed", "moe_mlp")}
        w, s = {}, {}
        for name, (n, k) in shapes.items():
            if cfg.quantized:
                w[name] = param(self, f"{name}_weight", (e, n, k), FP8, axes[name], fp8_init)
                s[name] = param(self, f"{name}_scale", (e, cdiv(n, BLOCK), cdiv(k, BLOCK)),
                                jnp.float32, axes[name], const_init(k**-0.5))
            else:
                w[name] = param(self, f"{name}_weight", (e, n, k), jnp.bfloat16, axes[name],
                                normal_init(k**-0.5))
        self.w, self.s = w, s  # (E, out, in) e4m3 | bf16;  (E, out/128, in/128) f32

    def linear(self, name: str, x: jax.Array, group_sizes: jax.Array, row_expert: jax.Array):
        """x (M,K) sorted by expert -> (M,N) in the compute dtype."""
        cfg, w = self.cfg, self.w[name]
        dtype = jnp.dtype(cfg.dtype)
        if cfg.quantized and cfg.fp8_activations:
            xq, xs = act_quant(x, cfg.scale_fmt)
            ws = self.s[name][row_expert]  # (M, N/128, K/128)

            def dot(a, b):  # a (M,128) e4m3, b (E,N,128) e4m3
                return _ragged_dot(a.astype(jnp.float32), b.astype(jnp.float32), group_sizes)

            return block_scaled_matmul(xq, xs, w, ws, dot).astype(dtype)
        wd = dequant(w, self.s[name], dtype) if cfg.quantized else w.astype(dtype)
        in_dtype = jnp.float32 if jax.default_backend() == "cpu" else dtype  # as layers.einsum
        return _ragged_dot(x.astype(dtype).astype(in_dtype), wd.astype(in_dtype),
                           group_sizes).astype(dtype)

    def __call__(self, x: jax.Array, experts: jax.Array) -> jax.Array:
        """x (N,D), experts (N,k) -> per-pick outputs (N,k,D) in the compute dtype."""
        n, k = experts.shape
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        row_expert = flat[order]
        group_sizes = jnp.bincount(flat, length=self.cfg.n_routed_experts).astype(jnp.int32)
        xs = x[order // k]  # (N*k, D) sorted by expert
        h = (jax.nn.silu(self.linear("w1", xs, group_sizes, row_expert).astype(jnp.float32))
             * self.linear("w3", xs, group_sizes, row_expert).astype(jnp.float32))
        y = self.linear("w2", h.astype(x.dtype), group_sizes, row_expert)
        return jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)


class MoE(nn.Module):
    """y = sum_picks weight * Expert_e(x) (float32 accumulate) + SharedExperts(x)."""

    cfg: Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, cfg.dim)
        with jax.named_scope("gate"):
            wg = param(self, "gate_weight", (cfg.n_routed_experts, cfg.dim), jnp.bfloat16,
                       ("experts", "embed"), normal_init(cfg.dim**-0.5))
            bias = param(self, "gate_bias", (cfg.n_routed_experts,), jnp.float32, ("experts",),
                         const_init(0.0))
            logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), wg.astype(jnp.float32),
                                precision=precision(jnp.float32))
            weights, experts = route(logits, bias, cfg)
            self.sow("intermediates", "gate_experts", jnp.sort(experts, axis=-1))
        with jax.named_scope("experts"):
            y = Experts(cfg, name="experts")(x, experts)  # (N,k,D)
            y = jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights,
                           precision=precision(jnp.float32))
        with jax.named_scope("shared_experts"):
            y = y + FFN(cfg, cfg.n_shared_experts * cfg.moe_inter_dim, name="shared")(x)
        return y.astype(x.dtype).reshape(shape)
