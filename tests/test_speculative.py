"""Speculative sampling's acceptance rule (`engine.speculative`): the tokens it lets out have the
target's distribution whatever the drafts, and at temperature 0 they are the target's greedy tokens.

A toy language model stands in for both models: a token depends on the previous one only (a V x V
table of logits), the target's table and the draft's differ. Many sequences of two speculative
rounds (k drafts chained from the draft table, verified against the target table) give the first
two output tokens; their frequencies are compared with the exact two-token distribution of the
target by a chi-square test. The bug the test must catch, a draft picked greedily that reports the
softmax it did not sample from, is run too and fails it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv32_jax.engine.generate import NONFINITE
from dsv32_jax.engine.speculative import draft, probs, verify
from dsv32_jax.model.cache import PAGE

V, N = 6, 40_000  # vocabulary, sampled sequences
X0 = 2  # the context: one token


def tables(seed: int = 0):
    rng = np.random.default_rng(seed)
    target = rng.normal(0, 1.5, (V, V)).astype(np.float32)
    drafter = (target + rng.normal(0, 1.0, (V, V))).astype(np.float32)  # close, not equal
    return jnp.asarray(target), jnp.asarray(drafter)


def rounds(target, drafter, key, k, temperature, top_p, greedy_bug=False):
    """Two speculative rounds from X0 -> the first two output tokens."""
    t, tp = jnp.float32(temperature), jnp.float32(top_p)

    def one_round(prev, key):
        keys = jax.random.split(key, k + 1)
        ds, qs, x = [], [], prev
        for j in range(k):  # chained drafts
            d, q = draft(drafter[x], keys[j], t, tp)
            if greedy_bug:  # the bug: the argmax drafted, the softmax claimed as q
                d = jnp.argmax(q).astype(jnp.int32)
            ds.append(d)
            qs.append(q)
            x = d
        drafts = jnp.stack(ds)
        logits = target[jnp.concatenate([prev[None], drafts])]  # after the context, after each draft
        n, tokens = verify(logits, drafts, jnp.stack(qs), keys[k], t, tp)
        return n, tokens

    def seq(key):
        k1, k2 = jax.random.split(key)
        n1, t1 = one_round(jnp.int32(X0), k1)
        n2, t2 = one_round(t1[n1], k2)
        first = t1[0]
        second = jnp.where(n1 >= 1, t1[jnp.minimum(1, k)], t2[0])
        return first, second, n1

    return jax.jit(jax.vmap(seq))(jax.random.split(key, N))


def expected(target, temperature, top_p):
    p = np.asarray(jax.vmap(probs, (0, None, None))(target, jnp.float32(temperature), jnp.float32(top_p)))
    return p[X0][:, None] * p  # P(x1, x2) = p(x1 | X0) p(x2 | x1)


def chi2(first, second, want):
    counts = np.zeros((V, V))
    np.add.at(counts, (np.asarray(first), np.asarray(second)), 1)
    mask = want > 0
    assert counts[~mask].sum() == 0, "a token outside the target's nucleus came out"
    e = want[mask] * N
    return float(((counts[mask] - e) ** 2 / e).sum()), int(mask.sum()) - 1


def critical(df: int, z: float = 3.719) -> float:
    """The chi-square value with tail probability 1e-4 (z of the normal), Wilson-Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature,top_p,k", [(1.0, 1.0, 1), (1.0, 1.0, 3), (0.7, 0.9, 2)])
def test_output_has_the_target_distribution(temperature, top_p, k):
    target, drafter = tables()
    first, second, n1 = rounds(target, drafter, jax.random.key(1), k, temperature, top_p)
    stat, df = chi2(first, second, expected(target, temperature, top_p))
    assert stat < critical(df), (stat, critical(df))
    accepted = float(np.mean(np.asarray(n1) >= 1))
    assert 0.2 < accepted < 1.0  # the drafts are neither always right nor never


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_a_greedy_draft_claiming_its_softmax_fails(temperature, top_p):
    target, drafter = tables()
    first, second, _ = rounds(target, drafter, jax.random.key(1), 2, temperature, top_p, greedy_bug=True)
    stat, df = chi2(first, second, expected(target, temperature, top_p))
    assert stat > 10 * critical(df), stat


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_is_the_targets_argmax_chain(k):
    target, drafter = tables()
    first, second, n1 = rounds(target, drafter, jax.random.key(3), k, 0.0, 1.0)
    x1 = int(jnp.argmax(target[X0]))
    x2 = int(jnp.argmax(target[x1]))
    assert set(np.asarray(first).tolist()) == {x1} and set(np.asarray(second).tolist()) == {x2}
    d1 = int(jnp.argmax(drafter[X0]))
    assert set(np.asarray(n1 >= 1).tolist()) == {d1 == x1}  # accepted exactly when it was the argmax


def test_tokens_layout_and_nonfinite():
    target, drafter = tables()
    drafts = jnp.array([int(jnp.argmax(target[X0])), 0, 0], jnp.int32)
    q = jax.nn.one_hot(drafts, V)
    logits = target[jnp.array([X0, drafts[0], 0, 0])]
    n, tokens = verify(logits, drafts, q, jax.random.key(0), jnp.float32(0), jnp.float32(1))
    want1 = int(jnp.argmax(target[drafts[0]]))
    assert int(n) == (1 if want1 != 0 else 2) and int(tokens[0]) == int(drafts[0])
    assert np.asarray(tokens[int(n) + 1:]).tolist() == [-1] * (3 - int(n))
    bad = logits.at[1, 3].set(jnp.nan)  # the logits after the first (accepted) draft
    n, tokens = verify(bad, drafts, q, jax.random.key(0), jnp.float32(0), jnp.float32(1))
    assert int(n) == 1 and np.asarray(tokens).tolist() == [int(drafts[0]), NONFINITE, -1, -1]


# ---- through the models: the MTP layer drafts, the main model verifies (engine.speculative) ------
@functools.lru_cache(maxsize=1)
def demo():
    """The trained demo model with its MTP layer, its tokenizer."""
    from dsv32_jax.engine.runner import load_model
    from dsv32_jax.text.tokenizer import Tokenizer
    from dsv32_jax.train.demo import DEMO_DIR

    return load_model(DEMO_DIR, mtp=True), Tokenizer.load(DEMO_DIR)


def chats(n: int) -> list[str]:
    from dsv32_jax.text.chat import ASSISTANT, THINK_END
    from dsv32_jax.train import corpus

    turn = ASSISTANT + THINK_END
    return [c[:c.rindex(turn) + len(turn)] for c in corpus.conversations(n, 11)]


def test_greedy_equals_plain_greedy_batched_to_the_end_of_the_context():
    """k = 3, batched, mixed lengths, running 24 tokens past EOS (no stop tokens): the longest
    sequence ends at the last position of max_position_embeddings (512), so verify writes and
    drafts past the cache's end (dropped) while its last tokens are still being accepted."""
    model, tok = demo()
    ids = tok.encode("".join(chats(40)))
    lengths = (model.config.max_seq_len - 24, 40, 97)
    prompts = [ids[:n] for n in lengths]
    stats = {}
    got = model.generate(prompts, 24, temperature=0.0, stop_tokens=[], speculative=3, stats=stats)
    assert got == model.generate(prompts, 24, temperature=0.0, stop_tokens=[])
    # the MTP layer's cache kept right through the iterations: the first draft is accepted as
    # often as benchmarks/mtp_acceptance measures it teacher-forced (0.97)
    assert stats["accepted"][0] / stats["iterations"] > 0.8, stats


def test_greedy_equals_plain_greedy_with_stops_mid_draft():
    """k = 1 on held-out-like chats stopping at EOS (each at its own step)."""
    model, tok = demo()
    prompts = [tok.encode(c) for c in chats(5)]
    want = model.generate(prompts, 32, temperature=0.0, stop_tokens=[tok.eos_id])
    assert len({len(w) for w in want}) > 1 and all(w[-1] == tok.eos_id for w in want)
    stats = {}
    assert model.generate(prompts, 32, temperature=0.0, stop_tokens=[tok.eos_id],
                          speculative=1, stats=stats) == want
    assert stats["accepted"][0] / stats["iterations"] > 0.8, stats


def test_speculative_needs_the_mtp_layer_and_a_valid_k():
    from dsv32_jax.engine.runner import Model

    model, _ = demo()
    plain = Model(model.config, model.params)
    with pytest.raises(ValueError, match="MTP layer"):
        plain.generate([[3, 4]], 4, speculative=1)
    for k in (0.5, 4, True, -1):
        with pytest.raises(ValueError, match=r"k must be an integer in \[0, 3\]"):
            model.generate([[3, 4]], 4, speculative=k)


SMALL_V, ROWS = 8, 8_000


@functools.lru_cache(maxsize=1)
def small_model():
    """A random 2-layer model with an 8-token vocabulary and its MTP layer (float32, widths 32 or
    less but the latent's 128), logits sharpened (head weights x4): its distributions are not
    near uniform."""
    import dsv32_jax
    from dsv32_jax.checkpoint.weights import init_params
    from dsv32_jax.engine.runner import Model

    cfg = dsv32_jax.preset(
        "tiny", vocab_size=SMALL_V, dim=32, inter_dim=32, moe_inter_dim=16, n_heads=2,
        q_lora_rank=32, kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, index_n_heads=2,
        index_head_dim=16, index_topk=4, n_layers=2, dtype="float32", fp8_activations=False,
        weight_dtype="bf16")
    params = init_params(cfg, 3, mtp=True)
    mtp = params.pop("mtp")
    params["head"]["weight"] = params["head"]["weight"] * 4
    return Model(cfg, params, mtp=mtp)


def exact_joint(model, prompt: list[int], temperature, top_p) -> np.ndarray:
    """P(t1, t2, t3) (V,V,V) of the main model after `prompt` under the sampling rule."""
    v = SMALL_V
    grid = np.array([[a, b] for a in range(v) for b in range(v)], np.int32)  # every (t1, t2)
    seqs = np.concatenate([np.tile(prompt, (v * v, 1)), grid], 1)
    logits = model.logits(seqs)  # (V*V, L+2, V)
    p = jax.vmap(probs, (0, None, None))
    t, tp = jnp.float32(temperature), jnp.float32(top_p)
    p1 = np.asarray(p(logits[:1, -3], t, tp))[0]  # after the prompt
    p2 = np.asarray(p(logits[::v, -2], t, tp))  # (V,) rows t1 -> t2
    p3 = np.asarray(p(logits[:, -1], t, tp)).reshape(v, v, v)  # (t1, t2) -> t3
    return p1[:, None, None] * p2[:, :, None] * p3


def joint_chi2(tokens: np.ndarray, want: np.ndarray, axes: tuple[int, int]):
    """chi-square of the sampled pairs (tokens[:, axes]) against want's marginal."""
    other = tuple(i for i in range(3) if i not in axes)
    marginal = want.sum(axis=other)
    counts = np.zeros_like(marginal)
    np.add.at(counts, (tokens[:, axes[0]], tokens[:, axes[1]]), 1)
    mask = marginal * len(tokens) > 5  # cells too rare for the chi-square are pooled
    e = np.append(marginal[mask], marginal[~mask].sum()) * len(tokens)
    c = np.append(counts[mask], counts[~mask].sum())
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def sample_three(model, prompt, temperature, top_p, k, rows: int = ROWS) -> np.ndarray:
    """(rows, 3): three tokens after `prompt` for each of `rows` sequences (seeds 0..rows-1)."""
    return np.array(model.generate([prompt] * rows, 3, temperature=temperature, top_p=top_p,
                                   seed=0, stop_tokens=[], speculative=k))


@pytest.mark.parametrize("temperature,top_p,k", [(1.0, 1.0, 2), (0.7, 0.9, 2)])
def test_model_samples_have_the_main_models_distribution(temperature, top_p, k):
    """t1 is sampled as without speculation; t2 and t3 come out of draft/verify (the first draft,
    then the chained second draft or the bonus token): their joint frequencies over ROWS
    sequences against the main model's exact distribution."""
    model = small_model()
    prompt = [1, 5, 7, 2, 6]
    want = exact_joint(model, prompt, temperature, top_p)
    tokens = sample_three(model, prompt, temperature, top_p, k)
    for axes in ((0, 1), (1, 2)):
        stat, df = joint_chi2(tokens, want, axes)
        assert stat < critical(df), (axes, stat, critical(df))


def test_model_samples_with_greedy_drafts_fail(monkeypatch):
    """The same check catches drafts picked greedily that claim their softmax, on a quarter of the
    sequences (its statistic ~15x the critical value at 2,000, ~40x at ROWS)."""
    from dsv32_jax.engine import speculative as spec

    def greedy_draft(logits, key, temperature, top_p):
        q = spec.probs(logits, jnp.float32(1.0), top_p)
        return jnp.argmax(q).astype(jnp.int32), q

    model = small_model()
    prompt = [1, 5, 7, 2, 6]
    want = exact_joint(model, prompt, 1.0, 1.0)
    jax.clear_caches()
    monkeypatch.setattr(spec, "draft", greedy_draft)
    try:
        tokens = sample_three(model, prompt, 1.0, 1.0, 2, rows=ROWS // 4)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    stat, df = joint_chi2(tokens, want, (0, 1))
    assert stat > 10 * critical(df), (stat, critical(df))


def test_chat_session_speculative_matches_plain_turn_by_turn():
    """Three turns through a speculative session and a plain one: the same greedy replies, each
    turn continuing the conversation's parked sequence (only the tokens after its computed keys
    run). Turn 3 edits turn 2's reply: the sequence keeps its whole pages before the edit (less
    one token: the MTP layer's key at a slot also reads the token after it)."""
    from dsv32_jax.engine.session import ChatSession
    from dsv32_jax.text.chat import ASSISTANT, THINK_END, USER
    from dsv32_jax.train import corpus

    model, tok = demo()
    text = corpus.conversations(1, 12)[0]
    turns = text.split(USER)[1:]  # "question<Assistant></think>reply<eos>"
    asks = [USER + t[:t.index(THINK_END) + len(THINK_END)] for t in turns]
    assert len(asks) >= 3 and asks[0].endswith(ASSISTANT + THINK_END)
    plain, fast = ChatSession(model, 512), model.chat_session(512, speculative=2)
    stats = {"iterations": 0, "accepted": [0, 0]}

    def reply(context, max_new):
        out, runs = [], []
        for s in (plain, fast):
            st = {}
            new = s.prepare(context)
            out.append(list(s.stream(new, max_new, temperature=0.0, stop_tokens=[], stats=st)))
            runs.append(st["prefill_tokens"])
        assert out[0] == out[1]
        stats["iterations"] += st["iterations"]
        stats["accepted"] = [a + b for a, b in zip(stats["accepted"], st["accepted"])]
        return runs

    assert reply(tok.encode(asks[0]), 10) == [len(tok.encode(asks[0]))] * 2
    ask = tok.encode(asks[1])
    # the previous reply's last token (sampled, its keys not written) and the new message
    assert reply(fast.tokens + ask, 12) == [1 + len(ask)] * 2
    before = fast.tokens
    context = before[:-3] + tok.encode(" and" + asks[2])
    same = next(i for i, (a, b) in enumerate(zip(before, context)) if a != b)
    runs = reply(context, 12)
    assert runs == [len(context) - same // PAGE * PAGE, len(context) - (same - 1) // PAGE * PAGE]
    assert plain.tokens == fast.tokens
    assert stats["accepted"][0] / stats["iterations"] > 0.8, stats


def test_cli_speculative_output_and_a_checkpoint_without_mtp(tmp_path, capsys):
    import dsv32_jax
    from dsv32_jax.checkpoint.synthetic import write_checkpoint
    from dsv32_jax.cli import main
    from dsv32_jax.train.demo import DEMO_DIR

    argv = ["generate", "--ckpt", DEMO_DIR, "--prompt", "What is the capital of Peru?",
            "--temperature", "0", "--no-compile-cache"]
    outs = []
    for extra in ([], ["--speculative", "2"]):
        assert main(argv + extra) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out and "Lima" in outs[0].out
    assert "speculative k=2:" in outs[1].err and "speculative" not in outs[0].err
    path = write_checkpoint(dsv32_jax.preset("tiny"), tmp_path / "ckpt", include_mtp=False)
    assert main(["generate", "--ckpt", str(path), "--prompt", "hi", "--speculative", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "no multi-token-prediction layer" in err[-1] and "Traceback" not in "".join(err)
