"""Text <-> token ids: the checkpoint's ``tokenizer.json`` (read with the `tokenizers` library), the V3.2
control tokens by name, streaming detokenization, and a small byte-level BPE of our own for synthetic
checkpoints.

``Tokenizer.encode`` never adds BOS/EOS: ``chat.encode_messages`` writes the BOS text itself, and every
control-token string inside the text (BOS, ``<｜User｜>``, ``<think>``, ...) becomes its single id.

``build_synthetic_tokenizer`` trains a byte-level BPE at call time (milliseconds, no download) on the text
embedded below plus prompts rendered by ``dsv32_jax.text.chat``. Layout: ids 0..5 are BOS, EOS, ``<｜User｜>``,
``<｜Assistant｜>``, ``<think>``, ``</think>``; then the 256 byte symbols and the learned merges; then unused
placeholder tokens up to exactly ``vocab_size``. The DSML markup (``<｜DSML｜function_calls>`` ...) and
``<function_results>`` are ordinary text, as ``chat.py`` treats them (not in ``SPECIAL_TOKENS``); BPE learns
them from the rendered prompts, so they still cost only a few tokens each.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
from collections.abc import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from dsv32_jax.text import chat

MIN_SYNTHETIC_VOCAB = 300
DEFAULT_MODEL_MAX_LENGTH = 163840  # V3.2 max_position_embeddings
# Control tokens decoded even with skip_special_tokens=True (the reasoning delimiters are text to a reader).
_NOT_SKIPPED = (chat.THINK_START, chat.THINK_END)
_PLACEHOLDER = "<｜place▁holder▁no▁{}｜>"


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used, or a token that is not in the vocabulary."""


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> dict[str, int]:
    """The byte-level alphabet: the printable symbol that stands for each byte -> that byte.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (controls, space, DEL,
    NBSP, soft hyphen, ...) are given the code points 256, 257, ... in byte order.
    """
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, spare = {}, 256
    for byte in range(256):
        if byte in visible:
            table[chr(byte)] = byte
        else:
            table[chr(spare)] = byte
            spare += 1
    return table


def _symbol_bytes(token: str) -> bytes:
    """The bytes a byte-level decoder writes for one vocabulary entry: each symbol's byte, or the entry's
    own UTF-8 when any character is outside the alphabet (added tokens such as BOS)."""
    table = _byte_symbols()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _check_ids(ids: Iterable) -> list[int]:
    out = []
    for i in ids:
        try:
            value = int(i)
        except (TypeError, ValueError):
            raise TokenizerError(f"token ids must be integers, got {i!r}") from None
        if value != i or value < 0:
            raise TokenizerError(f"token ids must be non-negative integers, got {i!r}")
        out.append(value)
    return out


class Tokenizer:
    """A loaded ``tokenizer.json``. ``vocab_size`` is one past the largest id (added/special tokens included).

    ``decode`` writes nothing for an id that has no token (like the `tokenizers` library), so ids the model's
    larger embedding table can produce beyond the tokenizer's last entry print as "".
    """

    def __init__(self, hf: _HFTokenizer, path: str, config: dict | None = None) -> None:
        self._hf, self.path, self.config = hf, path, dict(config or {})
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self.bos_id = self._required(chat.BOS, "BOS")
        self.eos_id = self._required(chat.EOS, "EOS")
        added = hf.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)
        limit = self.config.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) and 0 < limit < 1 << 40 else None
        self._byte_level = isinstance(hf.decoder, decoders.ByteLevel)

    def _required(self, token: str, what: str) -> int:
        i = self._hf.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path}: the {what} token {token!r} is not in the vocabulary")
        return i

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read ``<directory>/tokenizer.json`` (and ``tokenizer_config.json`` when present)."""
        path = os.path.join(os.fspath(directory), "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: not found (a checkpoint directory needs tokenizer.json)")
        try:
            hf = _HFTokenizer.from_file(path)
        except Exception as err:  # the library raises a bare Exception for bad JSON or an unknown layout
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from None
        config_path = os.path.join(os.fspath(directory), "tokenizer_config.json")
        config = None
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise TokenizerError(f"{config_path}: cannot read ({err})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
        return cls(hf, path, config)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def token_id(self, token: str) -> int:
        """The id of a vocabulary entry by its exact text, e.g. ``token_id(chat.USER)``."""
        i = self._hf.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path}: token {token!r} is not a single token of the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS; control-token strings in the text become their ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self._hf.decode(_check_ids(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder: the pushes and the final flush add up to ``decode(ids)``."""
        return StreamDecoder(self, skip_special_tokens)

    @functools.cached_property
    def _token_bytes(self) -> list[bytes]:
        """id -> the bytes a byte-level decoder writes for it ("" for ids without a token)."""
        table = [b""] * self.vocab_size
        for token, i in self._hf.get_vocab(with_added_tokens=True).items():
            table[i] = _symbol_bytes(token)
        return table


class StreamDecoder:
    """Incremental detokenization for streaming output.

    ``push`` returns the text that became printable with this id; a multi-byte character split across tokens
    is held back until its last byte arrives (so no U+FFFD appears for a valid character). ``flush`` ends the
    stream: it returns what is left (U+FFFD for a character that never completed) and starts a new one.

    Byte-level tokenizers (DeepSeek's, and the synthetic one) decode through a per-id byte table and an
    incremental UTF-8 decoder, O(1) per token; invalid bytes become U+FFFD exactly as ``decode`` writes them.
    Other decoders (e.g. SentencePiece-style) re-decode a short window of recent ids with the library and emit
    the difference; that matches ``decode`` wherever the library's own decoding never rewrites text it already
    produced (its ByteFallback does, when a run of byte pieces turns out to be invalid UTF-8).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._ids: list[int] = []  # window of the generic path: context ids, then ids not yet emitted
        self._n_context = 0
        self._context_text = ""

    def push(self, token_id: int) -> str:
        (i,) = _check_ids([token_id])
        tok = self._tok
        if tok._byte_level:
            if i >= tok.vocab_size or (self._skip and i in tok.special_ids):
                return ""
            return self._utf8.decode(tok._token_bytes[i])
        self._ids.append(i)
        text = tok.decode(self._ids, self._skip)
        if text.endswith("\ufffd") or not text.startswith(self._context_text):
            return ""  # maybe an incomplete character: wait for more ids (or flush)
        new = text[len(self._context_text):]
        if new:  # the ids just emitted become the context of the next window
            self._ids = self._ids[self._n_context:]
            self._n_context = len(self._ids)
            self._context_text = tok.decode(self._ids, self._skip)
        return new

    def flush(self) -> str:
        if self._tok._byte_level:
            out = self._utf8.decode(b"", final=True)
        else:
            text = self._tok.decode(self._ids, self._skip)
            out = text[len(self._context_text):] if text.startswith(self._context_text) else text
        self._reset()
        return out


# ------------------------------------------------------------------------------------------------------------
# Synthetic tokenizer
# ------------------------------------------------------------------------------------------------------------

# Training text, written for this project: prose, code and data formats, and a handful of languages, so the
# merges are plausible and the byte alphabet is exercised. Rendered chat prompts are appended at train time.
_CORPUS = r"""
The model reads a prompt one token at a time and writes its answer the same way. Every token is a small
piece of text: a whole common word, part of a rarer one, a run of spaces, or a single byte when nothing
longer fits. Because the pieces are bytes underneath, any string can be written down, even one full of
symbols the tokenizer has never seen before.

Attention lets each position look back at the positions before it. In a sparse design, a cheap indexer
first scores all earlier tokens, and only the best few thousand of them are attended to in full. Long
documents then cost much less, while short conversations behave exactly as they did with dense attention.
Experts are small feed-forward networks; a router sends each token to a few of them, so most of the
parameters stay idle for any given token, and the model can be large without being slow.

Weights are stored in eight-bit floating point with one scale per block of 128 by 128 values. When the
checkpoint is loaded, the scales are applied again, and the numbers come back close to their originals.
Tests compare the results against reference outputs, token by token, and report the largest difference.

She opened the window, and the morning air came in with the smell of rain. "Are you coming?" he asked.
"In a minute," she said. "I want to finish this chapter first." It was 7:45 on Tuesday, 14 March 2023;
the train left at 8:10, and the station was twenty minutes away on foot, or five by bicycle.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 3.14159 2.71828 -1e-6 1,000,000 50% $19.99

def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


class Cache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: dict[str, list[int]] = {}

    def get(self, key: str, default=None):
        if key not in self.items:
            return default
        return self.items[key]

for step, batch in enumerate(loader):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    params = optax.apply_updates(params, updates)
    if step % 100 == 0:
        print(f"step {step}: loss {loss:.4f}")

function add(a, b) {
  return a + b;
}
const items = [1, 2, 3].map((x) => x * 2).filter((x) => x > 2);
console.log(`total: ${items.length}`);

fn main() {
    let words: Vec<&str> = "a b c".split(' ').collect();
    println!("{} words", words.len());
}

#include <stdio.h>
int main(void) { printf("hello, world\n"); return 0; }

SELECT name, COUNT(*) AS n FROM users WHERE age >= 18 GROUP BY name ORDER BY n DESC LIMIT 10;
$ git log --oneline | head -n 5 && ls -la /tmp && echo "done" > out.txt
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": [1, 2, 3]}, "ok": true}
<html><body><p class="note">Hello &amp; welcome</p></body></html>
- [x] write the tests
- [ ] update the README

Le matin, la ville est calme ; les cafés ouvrent et l'on entend déjà les voitures au loin. Où est la gare ?
Am Morgen ist die Stadt ruhig. Die Straßen sind nass, und über dem Fluss hängt noch ein wenig Nebel.
Por la mañana la ciudad está tranquila. ¿Dónde está la estación? Está a cinco minutos de aquí, señor.
Утром город тихий. Улицы мокрые после дождя, и над рекой ещё висит лёгкий туман. Где вокзал?
早上城市很安静。街道在雨后还是湿的，河面上还有一点雾。请问火车站在哪里？大约走十分钟就到了。
模型一次读取一个词元，然后用同样的方式写出回答。稀疏注意力让长文档的计算更快。
朝の街は静かです。雨の後で道はまだ濡れていて、川の上には少し霧が残っています。駅はどこですか。
아침의 도시는 조용합니다. 비가 온 뒤라 길은 아직 젖어 있고, 강 위에는 안개가 조금 남아 있습니다.
المدينة هادئة في الصباح، والشوارع ما زالت مبللة بعد المطر. أين محطة القطار؟
सुबह शहर शांत है। बारिश के बाद सड़कें अभी भी गीली हैं। रेलवे स्टेशन कहाँ है?
Το πρωί η πόλη είναι ήσυχη. Πού είναι ο σταθμός; Ναι, ευχαριστώ πολύ.
Math: ∀x ∈ ℝ, x² ≥ 0; ∑ᵢ aᵢ = 1; α + β → γ; ½ ≈ 0.5; 10 °C ≠ 50 °F; a ≤ b ≥ c
Symbols and emoji: © ® ™ € £ ¥ • … — “quoted” ‘single’ 👍 😀 🎉 🚀 ❤️ ✅ 🇫🇷 👩‍💻
"""


def _chat_samples() -> list[str]:
    """Prompts in the V3.2 format, so merges cover its markup (DSML blocks, results, thinking tags)."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    with_tools = [
        {"role": "system", "content": "You are a helpful assistant.", "tools": tools},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the weather tool.",
         "tool_calls": [call]},
        {"role": "tool", "content": '{"temperature": 18, "sky": "cloudy"}'},
        {"role": "assistant", "content": "It is 18 °C and cloudy in Paris.",
         "reasoning_content": "The tool answered; now reply."},
    ]
    plain = [
        {"role": "user", "content": "Hello! Who are you?"},
        {"role": "assistant", "content": "I am an AI assistant. How can I help you today?"},
        {"role": "user", "content": "Write a haiku about the sea."},
    ]
    return [chat.encode_messages(with_tools, thinking_mode=mode) for mode in chat.THINKING_MODES] + [
        chat.encode_messages(plain, thinking_mode=mode) for mode in chat.THINKING_MODES]


def _training_text() -> list[str]:
    return [*(p.strip() for p in _CORPUS.split("\n\n") if p.strip()), *_chat_samples()]


def _train(vocab_size: int) -> dict:
    """Train the BPE and return its tokenizer.json as a dict (before the placeholders are added)."""
    hf = _HFTokenizer(models.BPE())
    # Digits in groups of at most three, then GPT-2-style word splitting on the byte-level symbols.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(chat.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=24, show_progress=False)
    hf.train_from_iterator(_training_text(), trainer=trainer)
    return json.loads(hf.to_str())


def build_synthetic_tokenizer(vocab_size: int, directory: str | os.PathLike,
                              model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Tokenizer:
    """Train a byte-level BPE with exactly ``vocab_size`` entries and the V3.2 control tokens (BOS 0, EOS 1),
    write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if needed), and load it.

    Deterministic: the same ``vocab_size`` (and chat format) gives byte-identical files.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_SYNTHETIC_VOCAB:
        raise TokenizerError(f"vocab_size must be an int >= {MIN_SYNTHETIC_VOCAB} for a byte-level tokenizer "
                             f"(256 byte symbols + {len(chat.SPECIAL_TOKENS)} control tokens + merges), "
                             f"got {vocab_size!r}")
    spec = _train(vocab_size)
    n_model = len(spec["model"]["vocab"])
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] not in _NOT_SKIPPED
    spec["added_tokens"] += [
        {"id": i, "content": _PLACEHOLDER.format(i - n_model), "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i in range(n_model, vocab_size)]
    out = os.fspath(directory)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(spec, ensure_ascii=False, indent=2) + "\n")
    config = {
        "add_bos_token": False, "add_eos_token": False,
        "bos_token": chat.BOS, "eos_token": chat.EOS, "pad_token": chat.EOS, "unk_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    tok = Tokenizer.load(out)
    got = [tok.token_id(t) for t in chat.SPECIAL_TOKENS]
    if tok.vocab_size != vocab_size or got != list(range(len(chat.SPECIAL_TOKENS))):
        raise TokenizerError(f"{tok.path}: synthetic tokenizer came out with {tok.vocab_size} entries and "
                             f"control-token ids {got}")
    return tok
