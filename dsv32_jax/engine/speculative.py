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

`draft` and `verify` are for one sequence; `iteration` vmaps them over a batch (each row accepts
its own number of drafts) around the models: the release's MTP layer (`model.mtp`) drafts, chained
on its own hidden state for k > 1, and one forward of the main model over the newest token and the
k drafts verifies them. The serving engine runs an iteration per decode step (`engine.step.spec_decode`,
over its paged pools), for the server, `Model.generate` and the chat session alike.

Per sequence, between iterations (`Drafts`): the newest token x at position pos (not yet in the main
cache), the MTP layer's first draft d after it (from the main head's input at pos-1 and x), the
distribution q it was drawn from and the MTP hidden state h it left. The MTP cache holds the keys of
positions 0..pos-1 (at p: the main head's input at p and the token at p+1). An iteration:

  1. chain: d_{j+1} from the MTP layer at position pos+j-1 on (h_j, d_j), j = 1..k-1;
  2. verify: the main model on [x, d_1..d_k] at pos..pos+k (keys written; the slots of rejected
     drafts lie past the sequence's length, invisible until written again) -> n accepted, and the
     next token y (correction or bonus) at pos+n+1;
  3. catch up: the MTP layer at pos..pos+k on the main head's inputs there and the tokens after
     them [d_1..d_n, y, ...]: its keys of pos..pos+n are now the true ones, and row n (h at pos+n,
     token y) is the next iteration's first draft.

Per iteration: one main forward of k+1 tokens, one MTP forward of k+1 tokens, k-1 of one token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv32_jax.engine.checks import check_drafts
from dsv32_jax.engine.generate import NONFINITE, all_greedy_or, by_temperature, nucleus_logits
from dsv32_jax.model.config import Config
from dsv32_jax.model.mtp import mtp_forward
from dsv32_jax.model.transformer import Transformer, variables


def probs(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits (V,) -> (V,) float32: the distribution `sample` draws a token from (one-hot on the
    argmax at temperature <= 0)."""
    def greedy(logits):
        return jax.nn.one_hot(jnp.argmax(logits), logits.shape[-1], dtype=jnp.float32)

    def nucleus(logits):
        order, nucleus = nucleus_logits(logits[None], temperature, top_p)
        return jnp.zeros_like(logits).at[order[0]].set(jax.nn.softmax(nucleus[0]))

    return by_temperature(temperature, greedy, nucleus, logits.astype(jnp.float32))


def draft(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array):
    """A draft token from the draft model's logits (V,) -> (token () int32, q (V,): the
    distribution it was drawn from, for `verify`)."""
    q = probs(logits, temperature, top_p)
    token = by_temperature(temperature, lambda q: jnp.argmax(q).astype(jnp.int32),
                           lambda q: jax.random.categorical(key, jnp.log(q)).astype(jnp.int32), q)
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
    pn, qn = p[n], jnp.concatenate([q, jnp.zeros((1, vocab), q.dtype)])[n]

    def correction(pn, qn):
        residual = jnp.maximum(pn - qn, 0.0)
        residual = jnp.where(residual.sum() > 0, residual, pn)  # p == q: a rejection had probability 0
        return jax.random.categorical(kr, jnp.log(residual)).astype(jnp.int32)

    nxt = by_temperature(temperature, lambda pn, qn: jnp.argmax(pn).astype(jnp.int32), correction,
                         pn, qn)
    nxt = jnp.where(finite[n], nxt, NONFINITE)
    i = jnp.arange(k + 1)
    padded = jnp.concatenate([drafts.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
    return n.astype(jnp.int32), jnp.where(i < n, padded, jnp.where(i == n, nxt, -1))


class Drafts(NamedTuple):
    """Per sequence, between iterations: x (B,) the newest token at pos (B,), not yet in the main
    cache; d (B,) the first draft after it, drawn from q (B,V); h (B,D) the MTP layer's hidden
    state after drafting d (for the chain)."""

    x: jax.Array
    pos: jax.Array
    d: jax.Array
    q: jax.Array
    h: jax.Array


def drafts(logits, keys, temperature, top_p):
    """MTP logits (B,V), a key per row (B,), temperature and top_p per row (B,) or for all () ->
    draft tokens (B,), their distributions (B,V): `draft` per row."""
    return all_greedy_or(draft, logits, keys, temperature, top_p)


def iteration(params, mtp, cache, mtp_cache, s: Drafts, keys, temperature, top_p, *,
              cfg: Config, impl: str, k: int):
    """One speculative iteration (the module docstring's steps 1-3), with a key per row (B,),
    temperature and top_p per row (B,) or for all () -> (n (B,) drafts accepted, tokens (B,k+1) (`verify`'s: the n drafts, then
    the next token, then -1), the main head's input at pos..pos+k (B,k+1,D), Drafts, cache,
    mtp_cache). The caches may be paged (`model.cache.PagedKVCache`, the serving engine's)."""
    rows, ahead = jnp.arange(s.x.shape[0]), jnp.arange(k + 1)
    keys = jax.vmap(lambda key: jax.random.split(key, k + 1), out_axes=1)(keys)  # (k+1, B)
    ds, qs, h = [s.d], [s.q], s.h
    for j in range(1, k):  # chain: the MTP layer on its own output
        logits, h, mtp_cache = mtp_forward(mtp, cfg, h[:, None], ds[-1][:, None],
                                           (s.pos + j - 1)[:, None], mtp_cache, 0, impl)
        h = h[:, 0]
        d, q = drafts(logits[:, 0], keys[j], temperature, top_p)
        ds.append(d)
        qs.append(q)
    chain, q = jnp.stack(ds, 1), jnp.stack(qs, 1)  # (B,k), (B,k,V)
    positions = s.pos[:, None] + ahead[None]  # (B,k+1)
    logits, cache, hidden = Transformer(cfg, impl).apply(
        variables(params), jnp.concatenate([s.x[:, None], chain], 1), positions, cache,
        hidden=True)  # (B,k+1,V), (B,k+1,D)
    n, tokens = all_greedy_or(verify, logits, chain, q, keys[0], temperature, top_p)
    after = jnp.where(tokens >= 0, tokens, 0)  # the token after each verified position
    logits, h, mtp_cache = mtp_forward(mtp, cfg, hidden, after, positions, mtp_cache, 0, impl,
                                       last=n)
    d, q = drafts(logits, keys[k], temperature, top_p)
    nxt = Drafts(jnp.maximum(tokens[rows, n], 0), s.pos + n + 1, d, q, h[rows, n])
    return n, tokens, hidden, nxt, cache, mtp_cache


def check(k, mtp) -> None:
    """ValueError unless k is a number of drafts in [1, MAX_DRAFTS] and the MTP params are there."""
    if not check_drafts(k):
        raise ValueError("speculative drafts k must be at least 1 here (0 = off: plain decoding)")
    if mtp is None:
        raise ValueError("speculative decoding needs the checkpoint's MTP layer (load_model(..., "
                         "mtp=True)); this model was loaded without one")
