"""dsv32_jax.text.tokenizer: loading, special tokens, round trips, streaming, and the synthetic BPE."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models
from tokenizers import Tokenizer as HFTokenizer

from dsv32_jax.text import chat
from dsv32_jax.text.tokenizer import (
    MIN_SYNTHETIC_VOCAB,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    build_synthetic_tokenizer,
)

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()_+-=[]{};':\",./<>?`~|\\",
    "code": 'def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint(f"{f(3)=}")\r\n{"a": [1, 2.5, null]}\n',
    "cjk": "深度求索的模型很快。日本語のテキストです。한국어 문장입니다。繁體中文測試",
    "emoji": "👍🏽 👩‍👩‍👧‍👦 🇯🇵🇫🇷 ❤️‍🔥 🧑🏿‍🚀 ☕ 🫠 🏳️‍🌈",
    "combining": "e\u0301 a\u0300\u0316 Z\u0351\u0346\u036b\u0310a\u0337\u0322l\u0338g\u0334o\u0334 "
                 "n\u0303 \u1100\u1161\u11a8",
    "whitespace": "  a\t\tb\n\n\n c   \r\n\r\n\u00a0\u2003\u3000\u200b \x0b\x0c end    ",
    "controls": "\x00\x01\x1b[31mred\x1b[0m\x7f\x85\u2028\u2029",
    "rare": "\U0010ffff\ue000\U0001d11e\U00020000 \ufffd \ufeff\u202eRTL\u202c ﷽ ℵ₀",
    "empty": "",
}


@pytest.fixture(scope="module")
def tok2048(tmp_path_factory) -> Tokenizer:
    return build_synthetic_tokenizer(2048, tmp_path_factory.mktemp("tok2048"))


@pytest.fixture(scope="module")
def tok4096(tmp_path_factory) -> Tokenizer:
    return build_synthetic_tokenizer(4096, tmp_path_factory.mktemp("tok4096"))


@pytest.fixture(params=[2048, 4096])
def tok(request, tok2048, tok4096) -> Tokenizer:
    return {2048: tok2048, 4096: tok4096}[request.param]


def _dir(tok: Tokenizer) -> Path:
    return Path(tok.path).parent


def _byte_symbol(byte: int) -> str:
    """The byte-level alphabet: visible Latin-1 bytes stand for themselves; the other 68 (controls, space,
    DEL, NBSP, soft hyphen, ...) get the code points 256, 257, ... in byte order."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if byte in visible:
        return chr(byte)
    return chr(256 + sum(1 for b in range(byte) if b not in visible))


def _byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte of `data` (splits every multi-byte character)."""
    return [tok.token_id(_byte_symbol(b)) for b in data]


def _stream(tok: Tokenizer, ids, skip_special_tokens=False) -> list[str]:
    dec = tok.stream(skip_special_tokens)
    return [dec.push(i) for i in ids] + [dec.flush()]


# ------------------------------------------------------------------------------------------------------------
# Synthetic tokenizer: size, special tokens, files
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2048, 4096])
def test_exact_vocab_size(n, tok2048, tok4096):
    tok = {2048: tok2048, 4096: tok4096}[n]
    assert tok.vocab_size == n
    with open(tok.path, encoding="utf-8") as f:
        spec = json.load(f)
    ids = sorted([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    assert sorted(set(ids)) == list(range(n))  # every id 0..n-1 has a token, none beyond
    assert all(tok._hf.id_to_token(i) is not None for i in range(n))
    assert tok._hf.id_to_token(n) is None


def test_special_token_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    for i, text in enumerate(chat.SPECIAL_TOKENS):  # BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END
        assert tok.token_id(text) == i
        assert tok.encode(text) == [i]
        assert tok.decode([i]) == text
    assert tok.special_ids >= {tok.bos_id, tok.eos_id, tok.token_id(chat.USER), tok.token_id(chat.ASSISTANT)}
    assert tok.token_id(chat.THINK_START) not in tok.special_ids  # kept by skip_special_tokens


def test_dsml_markup_is_ordinary_text(tok):
    for marker in (chat.FUNCTION_CALLS_START, chat.INVOKE_START, chat.PARAMETER_END, chat.FUNCTION_RESULTS_START):
        ids = tok.encode(marker)
        assert 1 < len(ids) <= 8  # several pieces, learned from the rendered prompts
        assert tok.decode(ids) == marker
        with pytest.raises(TokenizerError, match="not a single token"):
            tok.token_id(marker)


def test_unknown_token_id_names_the_token(tok2048):
    with pytest.raises(TokenizerError, match="nope"):
        tok2048.token_id("<｜nope｜>")


def test_too_small_vocab_is_refused(tmp_path):
    for bad in (MIN_SYNTHETIC_VOCAB - 1, 100, 0, -5, "2048", 2048.0, True):
        with pytest.raises(TokenizerError, match="vocab_size"):
            build_synthetic_tokenizer(bad, tmp_path / "bad")
    tok = build_synthetic_tokenizer(MIN_SYNTHETIC_VOCAB, tmp_path / "min")
    assert tok.vocab_size == MIN_SYNTHETIC_VOCAB
    assert tok.decode(tok.encode(TEXTS["emoji"])) == TEXTS["emoji"]


def test_tokenizer_config(tok2048):
    cfg = tok2048.config
    assert (cfg["bos_token"], cfg["eos_token"]) == (chat.BOS, chat.EOS)
    assert cfg["add_bos_token"] is False
    assert tok2048.model_max_length == cfg["model_max_length"] == 163840


def test_deterministic(tmp_path, tok2048):
    a = build_synthetic_tokenizer(2048, tmp_path / "a")
    names = ("tokenizer.json", "tokenizer_config.json")
    first = {n: (tmp_path / "a" / n).read_bytes() for n in names}
    assert {n: (_dir(tok2048) / n).read_bytes() for n in names} == first
    # a fresh process (new hash seeds in Rust and Python) writes the same bytes
    code = "import sys; from dsv32_jax.text.tokenizer import build_synthetic_tokenizer as b; b(2048, sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, timeout=120)
    assert {n: (tmp_path / "b" / n).read_bytes() for n in names} == first
    assert a.encode(TEXTS["code"]) == tok2048.encode(TEXTS["code"])


# sha256 of tokenizer.json as built before the training text moved from a Python string to bpe_corpus.txt
# (tokenizers 0.23.3): the move changed no byte.
PINNED_TOKENIZER_JSON = {
    300: "b5ebe4caae5f840efb6b9d8422eb1c42678384d626f7a1067e64f0a154c0b69f",
    2048: "2bb0f118998d1f717ddd8d99bd4211aee24dc042682494109f42738543898764",
    4096: "f775a69bc98a82023e4e3fee6a44955b3a198ec120ea8b58a7694eb1686efff2",
}
PINNED_CORPUS = "3c8c5e8526a430ea84c66477339c542aeeec5eb862cbb035a018a5e089519733"


def test_training_text_is_package_data():
    from dsv32_jax.text import tokenizer as module

    text = module._corpus()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == PINNED_CORPUS
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) == 14 and "Утром город тихий" in text and "def softmax(x, axis=-1):" in text
    assert module._training_text()[:14] == [p.strip() for p in paragraphs]


@pytest.mark.parametrize("n", sorted(PINNED_TOKENIZER_JSON))
def test_synthetic_tokenizer_bytes_are_pinned(n, tmp_path, tok2048, tok4096):
    if tokenizers.__version__ != "0.23.3":
        pytest.skip(f"hashes pinned with tokenizers 0.23.3, this is {tokenizers.__version__}")
    tok = {2048: tok2048, 4096: tok4096}.get(n) or build_synthetic_tokenizer(n, tmp_path)
    assert hashlib.sha256(Path(tok.path).read_bytes()).hexdigest() == PINNED_TOKENIZER_JSON[n]


def test_training_is_fast(tmp_path):
    t = time.perf_counter()
    build_synthetic_tokenizer(4096, tmp_path)
    assert time.perf_counter() - t < 2.0


# ------------------------------------------------------------------------------------------------------------
# encode / decode
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert "".join(_stream(tok, ids)) == text


def test_round_trip_random_unicode(tok2048):
    rng = random.Random(0)
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(200):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 30)))
        assert tok2048.decode(tok2048.encode(text)) == text


def test_compresses_text_it_has_seen(tok2048):
    text = "The model reads a prompt one token at a time and writes its answer the same way."
    assert len(tok2048.encode(text)) < len(text.encode()) / 3


def test_no_automatic_bos_eos(tok2048):
    ids = tok2048.encode("hello")
    assert tok2048.bos_id not in ids and tok2048.eos_id not in ids


def test_special_tokens_inside_text(tok):
    u, a, ts, te = (tok.token_id(t) for t in (chat.USER, chat.ASSISTANT, chat.THINK_START, chat.THINK_END))
    text = (f"{chat.BOS}sys{chat.USER}x<｜User{chat.USER}{chat.USER}y{chat.ASSISTANT}"
            f"{chat.THINK_START}r{chat.THINK_END}z{chat.EOS}")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(u) == 3 and ids.count(a) == 1 and ids.count(ts) == 1 and ids.count(te) == 1
    assert u in ids[ids.index(u) + 2:]  # "<｜User" without the closing bar stays text
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "sysx<｜Usery<think>r</think>z"
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == "sysx<｜Usery<think>r</think>z"


def test_decode_accepts_numpy_and_rejects_bad_ids(tok2048):
    ids = tok2048.encode("numpy ids")
    assert tok2048.decode(np.array(ids, dtype=np.int32)) == "numpy ids"
    assert tok2048.decode([np.int64(i) for i in ids]) == "numpy ids"
    for bad in ([-1], [1.5], ["3"]):
        with pytest.raises(TokenizerError, match="token ids"):
            tok2048.decode(bad)
    with pytest.raises(TokenizerError, match="token ids"):
        tok2048.stream().push(-3)
    assert tok2048.decode([tok2048.vocab_size + 7]) == ""  # ids past the vocabulary write nothing
    assert tok2048.stream().push(tok2048.vocab_size + 7) == ""


@pytest.mark.parametrize("thinking_mode", chat.THINKING_MODES)
def test_chat_prompt_round_trip(tok, thinking_mode):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "You are terse.", "tools": tools},
        {"role": "user", "content": "Bonjour ! 天気は？ 🌦️"},
        {"role": "assistant", "content": "", "reasoning_content": "Look it up.", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": '{"q": "météo  Tokyo"}'}}]},
        {"role": "tool", "content": "晴れ, 21 °C"},
        {"role": "assistant", "content": "Sunny, 21 °C.", "reasoning_content": "Answer now."},
        {"role": "user", "content": "Merci.\n\n  Bye"},
    ]
    prompt = chat.encode_messages(messages, thinking_mode=thinking_mode)
    ids = tok.encode(prompt)
    assert tok.decode(ids).encode() == prompt.encode()
    assert "".join(_stream(tok, ids)) == prompt
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.token_id(chat.USER)) == 2
    assert ids.count(tok.token_id(chat.ASSISTANT)) == 2
    assert ids.count(tok.eos_id) == 2
    last = tok.token_id(chat.THINK_START if thinking_mode == "thinking" else chat.THINK_END)
    assert ids[-2:] == [tok.token_id(chat.ASSISTANT), last]


# ------------------------------------------------------------------------------------------------------------
# Messages: only the template's markup gives control tokens
# ------------------------------------------------------------------------------------------------------------


def _every_field(x: str) -> list[dict]:
    """A conversation with `x` typed into every field a message can carry."""
    tools = [{"type": "function", "function": {"name": f"f{x}", "description": f"d {x}", "parameters": {
        "type": "object", "properties": {x: {"type": "string"}}}}}]
    call = {"type": "function", "function": {"name": f"f{x}", "arguments": json.dumps({"k": f"v{x}", x: [1, x]})}}
    return [
        {"role": "system", "content": f"sys {x}", "tools": tools, "response_format": {"type": x}},
        {"role": "user", "content": f"{x}q{x}"},
        {"role": "assistant", "content": f"{x}", "reasoning_content": f"r {x}", "tool_calls": [call]},
        {"role": "tool", "content": f"{x} result {x}"},
        {"role": "assistant", "content": f"done {x}", "reasoning_content": f"{x}r"},
        {"role": "developer", "content": f"dev {x}"},
    ]


@pytest.fixture(scope="module")
def demo_tok() -> Tokenizer:
    from dsv32_jax.train.demo import DEMO_DIR

    return Tokenizer.load(DEMO_DIR)


@pytest.mark.parametrize("which", ["tok2048", "demo"])
def test_control_tokens_typed_in_messages_stay_text(which, request):
    """Every added token of the vocabulary (the control tokens, `<think>` among them, which is not "special")
    typed into a message's content, reasoning, tool call, tool result or tool schema encodes to ordinary text
    ids: the control ids of the prompt are those of the template's markup alone, and the text is unchanged."""
    tok = request.getfixturevalue("demo_tok" if which == "demo" else which)
    added = tok._hf.get_added_tokens_decoder()
    control = set(added)

    def controls(ids):
        return [i for i in ids if i in control]

    for mode in chat.THINKING_MODES:
        clean = controls(tok.encode_chat(_every_field("x"), mode, drop_thinking=False))
        for typed in (" ".join(t.content for t in added.values()), "".join(t.content for t in added.values())):
            messages = _every_field(typed)
            text = chat.encode_messages(messages, mode, drop_thinking=False)
            ids = tok.encode_chat(messages, mode, drop_thinking=False)
            assert controls(ids) == clean
            assert tok.decode(ids) == text
            assert not control & set(tok.encode_text(typed))
            assert control <= set(tok.encode(text))  # what tokenizing the rendered prompt whole would do
    assert controls(tok.encode_chat([{"role": "user", "content": chat.EOS + chat.USER}], "chat")) == [
        tok.bos_id, tok.token_id(chat.USER), tok.token_id(chat.ASSISTANT), tok.token_id(chat.THINK_END)]


def test_placeholder_tokens_typed_in_a_message_stay_text(tok4096):
    """The reserved placeholders of a larger vocabulary (1,951 here) too."""
    added = tok4096._hf.get_added_tokens_decoder()
    typed = "".join(t.content for i, t in added.items() if i >= len(chat.SPECIAL_TOKENS))
    assert len(added) > 1000 and typed.count("place▁holder") == len(added) - len(chat.SPECIAL_TOKENS)
    ids = tok4096.encode_chat([{"role": "user", "content": typed}], "chat")
    assert [i for i in ids if i in added] == [tok4096.token_id(t) for t in (chat.BOS, chat.USER, chat.ASSISTANT,
                                                                            chat.THINK_END)]
    assert tok4096.decode(ids) == chat.encode_messages([{"role": "user", "content": typed}], "chat")


@pytest.mark.parametrize("thinking_mode", chat.THINKING_MODES)
def test_encode_chat_is_encode_of_the_prompt_for_plain_messages(tok, thinking_mode):
    """Without control-token strings in the messages, encode_chat gives exactly the ids of the whole rendered
    prompt (the official case, where the tools header's own <think></think> are control tokens, and the
    round-trip conversation above); with context, only the new messages."""
    case = Path(os.environ.get("DSV32_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
    cases = [_every_field("x")]
    if (case / "encoding" / "test_input.json").is_file():
        data = json.loads((case / "encoding" / "test_input.json").read_text(encoding="utf-8"))
        data["messages"][0]["tools"] = data["tools"]
        cases.append(data["messages"])
        if thinking_mode == "thinking":
            expected = (case / "encoding" / "test_output.txt").read_text(encoding="utf-8")[:-1]
            assert tok.decode(tok.encode_chat(data["messages"], thinking_mode)) == expected
    elif os.environ.get("DSV32_REQUIRE_FIXTURES") == "1":
        pytest.fail(f"official chat-format fixture not found in {case / 'encoding'}")
    for messages in cases:
        for drop in (True, False):
            prompt = chat.encode_messages(messages, thinking_mode, drop_thinking=drop)
            assert tok.encode_chat(messages, thinking_mode, drop_thinking=drop) == tok.encode(prompt)
        tail = chat.encode_messages(messages[3:], thinking_mode, context=messages[:3])
        assert tok.encode_chat(messages[3:], thinking_mode, context=messages[:3]) == tok.encode(tail)


def test_invalid_unicode_is_a_tokenizer_error(tok2048):
    """A str with a lone surrogate (what surrogateescape makes of an invalid UTF-8 byte) is named, not a
    TypeError from the library."""
    for encode in (tok2048.encode, tok2048.encode_text):
        with pytest.raises(TokenizerError, match="lone surrogate U\\+DCFF at character 2"):
            encode("ab\udcff")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok2048.encode_chat([{"role": "user", "content": "\ud800"}])


# ------------------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------------------


def test_stream_random_ids_matches_decode(tok):
    rng = np.random.default_rng(0)
    for n in range(300):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 40))).tolist()
        if n % 3 == 0:  # mostly the byte symbols (ids 6..261): many split and invalid UTF-8 sequences
            ids = rng.integers(6, 262, size=len(ids)).tolist()
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip), ids


def test_stream_split_characters_never_emit_replacement(tok):
    for name in ("cjk", "emoji", "combining", "rare"):
        text = TEXTS[name]
        pieces = _stream(tok, _byte_ids(tok, text.encode()))  # every multi-byte character cut into bytes
        assert "".join(pieces) == text
        assert pieces[-1] == ""  # nothing held back at the end
        assert "".join(pieces).count("\ufffd") == text.count("\ufffd")
        assert "" in pieces[:-1]  # some pushes had to wait for the rest of a character
        assert all(p == text[len("".join(pieces[:k])):][:len(p)] for k, p in enumerate(pieces))


def test_stream_on_encoded_text_with_partial_tokens(tok):
    text = TEXTS["emoji"] + TEXTS["cjk"]
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the BPE really cuts characters here
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_invalid_bytes_and_flush(tok2048):
    dec = tok2048.stream()
    head = _byte_ids(tok2048, "€".encode())  # e2 82 ac
    assert [dec.push(i) for i in head[:2]] == ["", ""]
    assert dec.flush() == "\ufffd"  # the character never completed
    assert dec.push(head[2]) == ""  # a lone continuation byte after the reset: held until it is clearly invalid
    assert dec.push(_byte_ids(tok2048, b"A")[0]) == "\ufffdA"
    assert [dec.push(i) for i in head] == ["", "", "€"]
    assert dec.flush() == ""
    assert isinstance(dec, StreamDecoder)


def test_stream_ids_beyond_the_vocabulary(tok2048):
    """The model's embedding table can be larger than the tokenizer: such ids write nothing, as in decode."""
    euro = _byte_ids(tok2048, "€".encode())
    ids = [*euro[:2], 5000, euro[2], 2048, *tok2048.encode(" ok")]
    pieces = _stream(tok2048, ids)
    assert "".join(pieces) == tok2048.decode(ids) == "€ ok"
    assert pieces[:3] == ["", "", ""] and pieces[3] == "€"


def test_stream_fallback_for_other_decoders(tmp_path):
    """A SentencePiece-style decoder (byte-fallback pieces, "▁" for space, leading space stripped)."""
    pieces = [chat.BOS, chat.EOS, "▁hello", "▁world", "!", "▁", "<0xE2>", "<0x82>", "<0xAC>", "ab"]
    hf = HFTokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="ab"))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([chat.BOS, chat.EOS])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    pushed = _stream(tok, [2, 3, 6, 7, 8, 4])
    assert pushed == ["hello", " world", "", "", "€", "!", ""]  # no U+FFFD for the split "€"
    assert "".join(pushed) == tok.decode([2, 3, 6, 7, 8, 4]) == "hello world€!"
    # Random ids without the byte pieces: the library's ByteFallback turns a whole run of byte pieces into
    # U+FFFDs once it is invalid, re-writing text already streamed, so no stream can match it there.
    rng = np.random.default_rng(1)
    for _ in range(200):
        ids = rng.choice([0, 1, 2, 3, 4, 5, 9], size=int(rng.integers(1, 20))).tolist()
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip), ids


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def test_load_round_trips_synthetic(tok2048):
    again = Tokenizer.load(_dir(tok2048))
    assert again.vocab_size == 2048 and again.encode(TEXTS["code"]) == tok2048.encode(TEXTS["code"])


def test_load_without_tokenizer_config(tmp_path, tok2048):
    (tmp_path / "tokenizer.json").write_bytes(Path(tok2048.path).read_bytes())
    tok = Tokenizer.load(tmp_path)
    assert tok.config == {} and tok.model_max_length is None and tok.bos_id == 0


def test_load_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found") as err:
        Tokenizer.load(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(TokenizerError, match="not found") as err:
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_load_from_the_file_itself(tmp_path, tok2048):
    path = tmp_path / "custom-name.json"
    path.write_bytes(Path(tok2048.path).read_bytes())
    tok = Tokenizer.load(path)
    assert tok.path == str(path) and tok.config == {}
    assert tok.encode(TEXTS["code"]) == tok2048.encode(TEXTS["code"])
    both = Tokenizer.load(tok2048.path)  # tokenizer_config.json next to the file is read too
    assert both.config == tok2048.config


@pytest.mark.parametrize("content", ['{"model": {', "not json at all", '{"model": {}}', ""])
def test_load_corrupt_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json") as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_load_corrupt_tokenizer_config(tmp_path, tok2048):
    (tmp_path / "tokenizer.json").write_bytes(Path(tok2048.path).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(TokenizerError) as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer_config.json") in str(err.value)


@pytest.mark.parametrize("missing", ["BOS", "EOS"])
def test_load_without_bos_or_eos(tmp_path, missing):
    present = chat.EOS if missing == "BOS" else chat.BOS
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, present: 3}, merges=[("a", "b")]))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=missing) as err:
        Tokenizer.load(tmp_path)
    absent = chat.BOS if missing == "BOS" else chat.EOS
    assert repr(absent) in str(err.value) and str(tmp_path / "tokenizer.json") in str(err.value)


def test_post_processor_adds_nothing(tmp_path, tok2048):
    """A release-style tokenizer.json whose post-processor would prepend BOS: encode still adds nothing."""
    spec = json.loads(Path(tok2048.path).read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": chat.BOS, "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {chat.BOS: {"id": chat.BOS, "ids": [0], "tokens": [chat.BOS]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    assert tok._hf.encode("hi").ids[0] == 0  # the library would add it
    assert tok.encode("hi") == tok2048.encode("hi") and 0 not in tok.encode("hi")
