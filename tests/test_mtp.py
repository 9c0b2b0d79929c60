"""The multi-token-prediction layer (`dsv32_jax.model.mtp`) against a NumPy re-statement of its
formula, written here from MODEL_SPEC.md and issue 18 and sharing no code with the model: its own
safetensors reader, FP8 dequantization, YaRN, RMSNorm / LayerNorm, MLA with the lightning
indexer's top-k, group-limited MoE routing, in float64. The official code has no MTP forward, so
there is no golden; the main model's hidden state it reads comes from the golden fixture.

    x      = eh_proj([enorm(embed_mtp(t_{i+1})); hnorm(h_i)]),  h_i = norm(golden hidden after the
             last layer) (the main head's input)
    y      = the MoE decoder block of layer num_hidden_layers on x (its own keys, positions 0..S-2)
    logits = shared_head.head(shared_head.norm(y))
"""

from __future__ import annotations

import functools
import json
import math

import ml_dtypes
import numpy as np
import pytest

from conftest import fixture_dir, fixture_model, golden

CASE = "tiny-fp8"
_DT = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F32": np.float32,
       "F16": np.float16}


# ---- the checkpoint, read by hand ------------------------------------------------------------
def _tensors(hf) -> dict[str, np.ndarray]:
    """Every tensor of the HF dir's shards as float64 (FP8 weights dequantized by their 128x128
    weight_scale_inv)."""
    raw = {}
    for shard in sorted(hf.glob("*.safetensors")):
        data = shard.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        for name, t in header.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            buf = data[8 + n + a:8 + n + b]
            raw[name] = np.frombuffer(buf, _DT[t["dtype"]]).reshape(t["shape"])
    out = {}
    for name, t in raw.items():
        if name.endswith(".weight_scale_inv"):
            continue
        w = t.astype(np.float64)
        scale = raw.get(name + "_scale_inv")
        if scale is not None:  # weight[i, j] * scale[i // 128, j // 128]
            full = np.repeat(np.repeat(scale.astype(np.float64), 128, 0), 128, 1)
            w = w * full[:w.shape[0], :w.shape[1]]
        out[name] = w
    return out


# ---- the math, from the spec -----------------------------------------------------------------
def rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def yarn(c, r):
    """(rotary frequencies (r/2,), MLA softmax scale factor m^2)."""
    theta, rs = c["rope_theta"], c["rope_scaling"]
    freqs = theta ** (-np.arange(0, r, 2) / r)
    if c["max_position_embeddings"] <= rs["original_max_position_embeddings"]:
        return freqs, 1.0
    orig, factor = rs["original_max_position_embeddings"], rs["factor"]

    def corr(n):
        return r * math.log(orig / (2 * math.pi * n)) / (2 * math.log(theta))

    low = max(math.floor(corr(rs["beta_fast"])), 0)
    high = min(math.ceil(corr(rs["beta_slow"])), r - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)
    m = 0.1 * rs["mscale"] * math.log(factor) + 1
    return freqs / factor * ramp + freqs * (1 - ramp), m * m


def rotate(x, pos, freqs, interleaved):
    """x (..., S, [n,] r) at positions pos (S,): pairs (2j, 2j+1) or halves (j, j + r/2)."""
    ang = pos[:, None] * freqs[None, :]  # (S, r/2)
    if x.ndim == 3:
        ang = ang[:, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    h = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :h], x[..., h:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = ra, rb
        return out
    return np.concatenate([ra, rb], -1)


def hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def mla(x, w, p, c):
    """One sequence x (S, D) at positions 0..S-1: MLA over the indexer's causal top-k."""
    s = x.shape[0]
    pos = np.arange(s, dtype=np.float64)
    H, dn, r, dv = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                    c["v_head_dim"])
    C, eps = c["kv_lora_rank"], c["rms_norm_eps"]
    freqs, m2 = yarn(c, r)
    qr = rms(x @ w[p + "self_attn.q_a_proj.weight"].T, w[p + "self_attn.q_a_layernorm.weight"], eps)
    q = (qr @ w[p + "self_attn.q_b_proj.weight"].T).reshape(s, H, dn + r)
    q_nope, q_pe = q[..., :dn], rotate(q[..., dn:], pos, freqs, True)
    kv = x @ w[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    lat = rms(kv[:, :C], w[p + "self_attn.kv_a_layernorm.weight"], eps)
    k_pe = rotate(kv[:, C:], pos, freqs, True)
    kvb = (lat @ w[p + "self_attn.kv_b_proj.weight"].T).reshape(s, H, dn + dv)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    # the lightning indexer: rope part first, non-interleaved halves, Hadamard-rotated
    n, d = c["index_n_heads"], c["index_head_dim"]
    iq = (qr @ w[p + "self_attn.indexer.wq_b.weight"].T).reshape(s, n, d)
    iq = np.concatenate([rotate(iq[..., :r], pos, freqs, False), iq[..., r:]], -1) @ hadamard(d)
    ik = layer_norm(x @ w[p + "self_attn.indexer.wk.weight"].T,
                    w[p + "self_attn.indexer.k_norm.weight"],
                    w[p + "self_attn.indexer.k_norm.bias"])
    ik = np.concatenate([rotate(ik[..., :r], pos, freqs, False), ik[..., r:]], -1) @ hadamard(d)
    iw = (x @ w[p + "self_attn.indexer.weights_proj.weight"].T) * n**-0.5 * d**-0.5  # (S, n)
    score = np.einsum("sh,sht->st", iw, np.maximum(np.einsum("shd,td->sht", iq, ik), 0))
    scale = (dn + r) ** -0.5 * m2
    out = np.zeros((s, H, dv))
    for i in range(s):
        sel = np.argsort(-score[i, :i + 1], kind="stable")[:c["index_topk"]]  # causal top-k
        logit = (np.einsum("hd,thd->ht", q_nope[i], k_nope[sel])
                 + np.einsum("hr,tr->ht", q_pe[i], k_pe[sel])) * scale
        prob = np.exp(logit - logit.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        out[i] = np.einsum("ht,thd->hd", prob, v[sel])
    return out.reshape(s, H * dv) @ w[p + "self_attn.o_proj.weight"].T


def swiglu(x, w, p):
    g, u = x @ w[p + "gate_proj.weight"].T, x @ w[p + "up_proj.weight"].T
    return (g / (1 + np.exp(-g)) * u) @ w[p + "down_proj.weight"].T


def moe(x, w, p, c):
    """x (N, D): sigmoid scores, group-limited top-k by the biased scores, unbiased weights."""
    e, k, g = c["n_routed_experts"], c["num_experts_per_tok"], c["n_group"]
    scores = 1 / (1 + np.exp(-(x @ w[p + "mlp.gate.weight"].T)))
    biased = scores + w[p + "mlp.gate.e_score_correction_bias"]
    y = swiglu(x, w, p + "mlp.shared_experts.")
    for t in range(x.shape[0]):
        groups = biased[t].reshape(g, e // g)
        best = np.sort(groups, -1)[:, -2:].sum(-1)
        keep = np.argsort(-best, kind="stable")[:c["topk_group"]]
        allowed = np.full(e, -np.inf)
        for gi in keep:
            group = slice(gi * (e // g), (gi + 1) * (e // g))
            allowed[group] = biased[t, group]
        picks = np.argsort(-allowed, kind="stable")[:k]
        wt = scores[t, picks] / scores[t, picks].sum() * c["routed_scaling_factor"]
        for j, ex in zip(wt, picks):
            y[t] += j * swiglu(x[t], w, f"{p}mlp.experts.{ex}.")
    return y


def mtp_reference(w, c, h_main, next_tokens):
    """h_main (B, S, D) the main model's final hidden before its norm, next_tokens (B, S) ->
    (logits (B, S, V), the hidden state the MTP head reads (B, S, D))."""
    eps, p = c["rms_norm_eps"], f"model.layers.{c['num_hidden_layers']}."
    h = rms(h_main, w["model.norm.weight"], eps)  # what the main head reads
    e = rms(w[p + "embed_tokens.weight"][next_tokens], w[p + "enorm.weight"], eps)
    x = np.concatenate([e, rms(h, w[p + "hnorm.weight"], eps)], -1) @ w[p + "eh_proj.weight"].T
    logits, hidden = [], []
    for xb in x:
        a = xb + mla(rms(xb, w[p + "input_layernorm.weight"], eps), w, p, c)
        y = a + moe(rms(a, w[p + "post_attention_layernorm.weight"], eps), w, p, c)
        hn = rms(y, w[p + "shared_head.norm.weight"], eps)
        hidden.append(hn)
        logits.append(hn @ w[p + "shared_head.head.weight"].T)
    return np.stack(logits), np.stack(hidden)


# ---- the tests --------------------------------------------------------------------------------
def _ours(model, mtp_params, tokens):
    """The main forward's hidden output fed to `mtp_forward`, positions 0..S-2."""
    import jax.numpy as jnp

    from dsv32_jax.model.mtp import init_mtp_cache, mtp_forward
    from dsv32_jax.model.transformer import Transformer, variables

    cfg = model.config
    logits, _, h = Transformer(cfg).apply(variables(model.params), jnp.asarray(tokens), hidden=True)
    b, s = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(s - 1), (b, s - 1))
    out = mtp_forward(mtp_params, cfg, h[:, :-1], jnp.asarray(tokens[:, 1:]), pos,
                      init_mtp_cache(cfg, b, s - 1))
    return logits, out


def test_mtp_forward_matches_the_restated_formula():
    from dsv32_jax.engine.runner import load_mtp

    hf = fixture_dir(CASE) / "hf"
    c = json.loads((hf / "config.json").read_text())
    z, model = golden(CASE, "exact"), fixture_model(CASE, "exact")
    tokens = z["tokens"]
    assert tokens.shape[1] - 1 > c["index_topk"]  # the indexer's top-k selects (not every key)
    main_logits, (logits, hidden, cache) = _ours(model, load_mtp(hf, model.config), tokens)
    g = z["prefill_logits"]  # the hidden output comes from the forward that made these logits
    np.testing.assert_allclose(np.asarray(main_logits), g, rtol=0, atol=1e-4 * g.std())
    h_main = z["prefill_hidden"][-1, :, :-1].astype(np.float64)
    want_logits, want_hidden = mtp_reference(_tensors(hf), c, h_main, tokens[:, 1:])
    for got, want in ((logits, want_logits), (hidden, want_hidden)):
        got = np.asarray(got)
        assert got.shape == want.shape
        err = np.abs(got - want).max() / want.std()
        assert err < 1e-5, err
    assert not np.allclose(np.asarray(logits), g[:, :-1], atol=0.1 * g.std())  # not the main head
    assert np.abs(np.asarray(cache.c)).max() > 0  # the layer's own keys were written


def test_checkpoint_without_mtp_loads_and_asking_for_it_says_so(tmp_path):
    import dsv32_jax
    from dsv32_jax.checkpoint.hf import CheckpointError
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.engine.runner import has_mtp, load_mtp

    cfg = _train_cfg()
    path = write_checkpoint(cfg, tmp_path / "ckpt", include_mtp=False, include_tokenizer=False)
    model = dsv32_jax.load_model(path, dtype="float32", fp8_activations=False)
    assert model.config.n_mtp_layers == 1 and not has_mtp(path, model.config)
    with pytest.raises(CheckpointError) as e:
        load_mtp(path, model.config)
    msg = str(e.value)
    assert "\n" not in msg and "no multi-token-prediction layer" in msg
    assert "model.layers.2.*" in msg


def test_mtp_params_in_the_one_description():
    """init, sharding specs, HF names and the loader's shapes all come from abstract_params."""
    from dsv32_jax.checkpoint.weights import abstract_params, flatten, mtp_tensor_specs
    from dsv32_jax.shardings import param_shardings
    from sharding.mesh import make_mesh

    cfg = _train_cfg()
    assert "mtp" not in abstract_params(cfg)
    specs = flatten(abstract_params(cfg, mtp=True)["mtp"])
    params = flatten(_train_params()["mtp"])
    assert sorted(specs) == sorted(params)
    for p, s in specs.items():
        assert params[p].shape == s.shape and params[p].dtype == s.dtype, p
        assert len(s.names) == len(s.shape) and s.names[0] == "layers", p
    assert specs[("eh_proj", "weight")].shape == (1, cfg.dim, 2 * cfg.dim)
    shardings = flatten(param_shardings(abstract_params(cfg, mtp=True), make_mesh(1, 1, 1))["mtp"])
    assert sorted(shardings) == sorted(specs)
    names = mtp_tensor_specs(cfg)
    assert names["model.layers.2.eh_proj.weight"][0] == (cfg.dim, 2 * cfg.dim)
    assert names["model.layers.2.mlp.experts.7.down_proj.weight"][0] == (cfg.dim, cfg.moe_inter_dim)
    assert len(names) == sum(int(np.prod(hf_shape(cfg, p))) for p in specs)


def hf_shape(cfg, path):
    from dsv32_jax.checkpoint.weights import hf_names

    return hf_names(cfg, ("mtp", *path)).shape


# ---- training: the MTP loss -------------------------------------------------------------------
TRAIN_KW = dict(vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2,
                n_dense_layers=1, n_heads=2, q_lora_rank=32, kv_lora_rank=128, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_activated_experts=2,
                n_expert_groups=4, n_limited_groups=2, index_n_heads=2, index_head_dim=32,
                index_topk=8, rope_factor=1.0, original_seq_len=64, max_seq_len=64, n_mtp_layers=1,
                weight_dtype="bf16", fp8_activations=False)


def _train_cfg():
    import dsv32_jax
    from dsv32_jax.train import step as S

    return S.train_config(dsv32_jax.preset("tiny", **TRAIN_KW), "float32")


@functools.lru_cache(maxsize=None)
def _train_params() -> dict:
    from dsv32_jax.checkpoint.weights import init_params

    return init_params(_train_cfg(), 0, mtp=True)


def _tokens(b=4, s=24, seed=0):
    return np.random.default_rng(seed).integers(2, TRAIN_KW["vocab_size"], (b, s)).astype(np.int32)


def test_mtp_loss_weight_zero_is_the_old_loss_and_adds_lambda_times_mtp():
    import jax
    import jax.numpy as jnp

    from dsv32_jax.model.transformer import variables
    from dsv32_jax.train import step as S
    from dsv32_jax.train.model import TrainTransformer

    cfg, tokens = _train_cfg(), jnp.asarray(_tokens())
    params = _train_params()
    main = {k: v for k, v in params.items() if k != "mtp"}

    @jax.jit
    def run(params, main):
        logits, _ = TrainTransformer(cfg, "dense").apply(variables(main), tokens)
        return (S.lm_loss(logits, tokens),  # the loss before MTP existed
                S.losses(main, tokens, cfg, "dense"),  # no MTP params needed
                S.losses(params, tokens, cfg, "dense", mtp_weight=0.0)[0],
                S.losses(params, tokens, cfg, "dense", mtp_weight=0.3),
                S.losses(main, tokens, cfg, "sparse")[0],  # lm + the indexer's KL
                S.losses(params, tokens, cfg, "sparse", mtp_weight=0.0)[0])

    old, (zero, m0), zero_with, (loss, m), sparse, sparse_with = jax.device_get(run(params, main))
    assert zero == old and zero_with == old and "mtp" not in m0 and sparse_with == sparse
    assert np.isfinite(m["mtp"]) and m["lm"] == old
    assert abs(loss - (old + 0.3 * m["mtp"])) < 1e-5
    assert abs(m["mtp"] - math.log(cfg.vocab_size)) < 1.0  # random init: about uniform


def test_training_mtp_is_the_inference_layer():
    import jax
    import jax.numpy as jnp

    from dsv32_jax.model.mtp import init_mtp_cache, mtp_forward
    from dsv32_jax.model.transformer import Transformer, variables
    from dsv32_jax.train.model import TrainTransformer, train_mtp

    cfg = _train_cfg()
    tokens = jnp.asarray(_tokens())
    b, s = tokens.shape
    params = _train_params()
    main = {k: v for k, v in params.items() if k != "mtp"}

    @jax.jit
    def both(params, main):  # the same MTP layer in the training and the inference forward
        _, _, h = TrainTransformer(cfg, "sparse").apply(variables(main), tokens, hidden=True)
        train_logits, _ = train_mtp(params["mtp"], cfg, "sparse", h, tokens)
        _, _, h_inf = Transformer(cfg).apply(variables(main), tokens, hidden=True)
        pos = jnp.broadcast_to(jnp.arange(s - 1), (b, s - 1))
        logits, _, _ = mtp_forward(params["mtp"], cfg, h_inf[:, :-1], tokens[:, 1:], pos,
                                   init_mtp_cache(cfg, b, s - 1))
        return train_logits[0, :, :-1], logits

    want, got = map(np.asarray, both(params, main))  # sparse: top-8 of up to 23 keys
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * want.std())


def test_mtp_loss_decreases():
    """A few steps on one batch: the MTP loss falls; the metrics give it apart from the LM loss."""
    import jax.numpy as jnp

    from dsv32_jax.train import step as S

    cfg, tokens, params = _train_cfg(), jnp.asarray(_tokens()), _train_params()
    hp = S.Hparams(lr=1e-2, warmup_steps=1, mtp_weight=0.3)
    tx, step = S.trainer(cfg, "dense", hp, 6)
    state = S.init_state(params, tx)
    seen = []
    for _ in range(6):
        state, m = step(state, tokens)
        seen.append((float(m["lm"]), float(m["mtp"])))
    assert np.isfinite(seen).all()
    assert seen[-1][1] < seen[0][1] - 0.5, seen


def test_demo_model_has_a_trained_mtp_layer():
    """The shipped demo model's MTP layer (`train.demo`'s mtp stage) drafts the model's own greedy
    next-next token on held-out demo chats (`benchmarks.mtp_acceptance`, the issue's >= 0.8 at
    T=0; 0.97 measured on 200 chats; a layer of 3 training steps: 0.20)."""
    import dsv32_jax
    from benchmarks.mtp_acceptance import held_out, measure
    from dsv32_jax.engine.runner import load_mtp
    from dsv32_jax.text.tokenizer import Tokenizer
    from dsv32_jax.train.demo import DEMO_DIR

    tok = Tokenizer.load(DEMO_DIR)
    model = dsv32_jax.load_model(DEMO_DIR)  # as `dsv32 demo` runs it: bf16, FP8 simulation
    prompts = [tok.encode(c) for c in held_out(8)]
    r = measure(model, load_mtp(DEMO_DIR, model.config), prompts, 24, tok.eos_id, batch=8)
    assert r["drafted"]["positions"] > 50 and r["drafted"]["t0"] >= 0.8, r
