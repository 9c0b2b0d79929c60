"""Speculative sampling: k drafted tokens checked against the target model's logits, so that the
tokens that come out have exactly the target's distribution, whatever the drafts were.

The rule (Leviathan et al. 2023; Chen et al. 2023): draft j, drawn from q_j, is accepted with
probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the next token is drawn from
max(p_j - q_j, 0), normalized; when all k are accepted, one more comes from p_k. p and q are the
distributions `generate.sample` draws from (temperature, then the top-p nucleus), so a draft must
report the distribution it was really drawn from: a draft picked greedily has a one-hot q, not the
softmax (claiming the softmax biases the output towards the draft's favourites; the tests run that
bug). At temperature 0 both are one-hot: a draft is accepted when it is the target's argmax, and
the correction is that argmax, so greedy output equals plain greedy decoding token for token.

Both functions are for one sequence; `jax.vmap` them over a batch (each row accepts its own number).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv32_jax.engine.generate import NONFINITE, nucleus_logits


def probs(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits (V,) -> (V,) float32: the distribution `sample` draws a token from (one-hot on the
    argmax at temperature <= 0)."""
    logits = logits.astype(jnp.float32)
    order, nucleus = nucleus_logits(logits[None], temperature, top_p)
    p = jnp.zeros_like(logits).at[order[0]].set(jax.nn.softmax(nucleus[0]))
    greedy = jax.nn.one_hot(jnp.argmax(logits), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(temperature <= 0, greedy, p)


def draft(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array):
    """A draft token from the draft model's logits (V,) -> (token () int32, q (V,): the
    distribution it was drawn from, for `verify`)."""
    q = probs(logits, temperature, top_p)
    token = jnp.where(temperature <= 0, jnp.argmax(q),
                      jax.random.categorical(key, jnp.log(q))).astype(jnp.int32)
    return token, q


def verify(logits: jax.Array, drafts: jax.Array, q: jax.Array, key: jax.Array,
           temperature: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One sequence: the target's logits (k+1, V) after the context and after each of the drafts
    (k,) int32, drawn from q (k, V). -> (n () int32: drafts accepted, tokens (k+1,) int32):
    tokens[:n] = drafts[:n], tokens[n] is the next token (the correction, or the bonus when n = k),
    -1 past it. Where the target's logits at a position are not finite, nothing is accepted from
    there and tokens[n] is NONFINITE."""
    k, vocab = q.shape
    p = jax.vmap(probs, (0, None, None))(logits, temperature, top_p)  # (k+1, V)
    finite = jnp.isfinite(logits).all(axis=-1)  # (k+1,)
    ku, kr = jax.random.split(key)
    u = jax.random.uniform(ku, (k,))
    at = jnp.arange(k)
    ok = (u * q[at, drafts] < p[at, drafts]) & finite[:k]  # probability min(1, p/q)
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    pn = p[n]
    residual = jnp.maximum(pn - jnp.concatenate([q, jnp.zeros((1, vocab), q.dtype)])[n], 0.0)
    residual = jnp.where(residual.sum() > 0, residual, pn)  # p == q: a rejection had probability 0
    sampled = jax.random.categorical(kr, jnp.log(residual))
    nxt = jnp.where(temperature <= 0, jnp.argmax(pn), sampled).astype(jnp.int32)
    nxt = jnp.where(finite[n], nxt, NONFINITE)
    i = jnp.arange(k + 1)
    padded = jnp.concatenate([drafts.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
    return n.astype(jnp.int32), jnp.where(i < n, padded, jnp.where(i == n, nxt, -1))
