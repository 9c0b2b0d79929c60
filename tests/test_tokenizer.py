"""Tokenizer: our synthetic byte-level BPE, special tokens by name, streaming detokenization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv32_jax.chat import ASSISTANT, BOS, EOS, SPECIAL_TOKENS, USER, encode_messages
from dsv32_jax.tokenizer import Tokenizer, TokenizerError, build_synthetic_tokenizer

TEXTS = ["plain ASCII text.", "def f(x):\n    return x ** 2  # code\n", "深度求索 稀疏注意力",
         "emoji 😀🚀 and e\u0301 combining", "  runs   of\t\twhitespace \n\n", ""]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_synthetic_tokenizer(2048, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("size", [2048, 4096])
def test_exact_vocab_size_and_special_ids(tmp_path, size):
    t = build_synthetic_tokenizer(size, tmp_path)
    assert t.vocab_size == size and (t.bos_id, t.eos_id) == (0, 1)
    for s in SPECIAL_TOKENS:
        assert t.encode(s) == [t.token_id(s)]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_inside_text_and_chat_prompt(tok):
    ids = tok.encode(f"{BOS}{USER}hi{ASSISTANT}")
    assert ids[0] == 0 and tok.token_id(USER) in ids and ids[-1] == tok.token_id(ASSISTANT)
    prompt = encode_messages([{"role": "user", "content": "Hello 世界"},
                              {"role": "assistant", "content": "Hi!"},
                              {"role": "user", "content": "Bye"}], thinking_mode="chat")
    assert tok.decode(tok.encode(prompt)) == prompt
    assert tok.decode(tok.encode(prompt), skip_special_tokens=True).startswith("Hello 世界")


def test_stream_decoder_matches_decode_and_holds_partial_chars(tok):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, 30)]
        sd = tok.stream()
        assert "".join(sd.push(i) for i in ids) + sd.flush() == tok.decode(ids)
    text = "😀深"  # multi-byte characters split over byte-level tokens
    ids = tok.encode(text)
    assert len(ids) > 2
    sd = tok.stream()
    pieces = [sd.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + sd.flush() == text


def test_deterministic(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = build_synthetic_tokenizer(2048, tmp_path / "a")
    b = build_synthetic_tokenizer(2048, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.encode(TEXTS[1]) == b.encode(TEXTS[1])


def test_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="too small"):
        build_synthetic_tokenizer(100, tmp_path)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.token_id("<no such token>")
    d = tmp_path / "nobos"
    d.mkdir()
    build_synthetic_tokenizer(512, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != EOS]
    del spec["model"]["vocab"][EOS]
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="end▁of▁sentence"):
        Tokenizer.load(d)
