"""YaRN rotary embedding. MLA rotates interleaved pairs; the indexer rotates halves."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.config import Config


def yarn_inv_freq(cfg: Config) -> np.ndarray:
    """Per-pair angular frequencies (R/2,) float32, YaRN-corrected when max_seq_len > original."""
    r, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r)))
    freqs = freqs.astype(np.float32)
    if cfg.yarn_active:
        def corr(n_rot):
            return r * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(cfg.beta_fast)), 0)
        high = min(math.ceil(corr(cfg.beta_slow)), r - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(r // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        freqs = freqs / np.float32(cfg.rope_factor) * ramp + freqs * (1 - ramp)
    return freqs.astype(np.float32)


def rope_tables(cfg: Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions (B, S) int -> (cos, sin) each (B, S, R/2) float32."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(yarn_inv_freq(cfg))
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate x (B, S, [H,] R) by position. cos/sin: (B, S, R/2). Computed in float32.

    interleaved=True pairs (x[2j], x[2j+1]) (MLA); False pairs (x[j], x[j+R/2]) (indexer).
    """
    xf = x.astype(jnp.float32)
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
    else:
        a, b = jnp.split(xf, 2, axis=-1)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        out = jnp.stack([ra, rb], axis=-1).reshape(x.shape)
    else:
        out = jnp.concatenate([ra, rb], axis=-1)
    return out.astype(x.dtype)
