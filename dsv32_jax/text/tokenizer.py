"""Text <-> token ids: the checkpoint's ``tokenizer.json`` (read with the `tokenizers` library), the V3.2
control tokens by name, streaming detokenization, and a small byte-level BPE of our own for synthetic
checkpoints.

Three encoders, none adding BOS/EOS by itself:

- ``encode_chat(messages)``: a message list as the chat template writes it (``chat.render_messages``). Only the
  template's own markup gives control tokens; what came from the messages is read by ``encode_text``, so a user
  who types ``<｜end▁of▁sentence｜><｜User｜>`` cannot forge a turn. Every prompt made of messages goes through
  it (generate, chat, the demo).
- ``encode_text(text)``: text as text; a control-token string in it is spelled out in ordinary ids.
- ``encode(text)``: every control-token string inside the text (BOS, ``<｜User｜>``, ``<think>``, ...) becomes its
  single id: for text whose markup is meant, e.g. ``generate --raw`` or a training corpus of rendered chats.

``build_synthetic_tokenizer`` trains a byte-level BPE at call time (milliseconds, no download) on the text
embedded below plus prompts rendered by ``dsv32_jax.text.chat``. Layout: ids 0..5 are BOS, EOS, ``<｜User｜>``,
``<｜Assistant｜>``, ``<think>``, ``</think>``; then the 256 byte symbols and the learned merges; then unused
placeholder tokens up to exactly ``vocab_size``. The DSML markup (``<｜DSML｜function_calls>`` ...) and
``<function_results>`` are ordinary text, as ``chat.py`` treats them (not in ``SPECIAL_TOKENS``); BPE learns
them from the rendered prompts, so they still cost only a few tokens each.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from collections.abc import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from dsv32_jax.text import chat

MIN_SYNTHETIC_VOCAB = 300
DEFAULT_MODEL_MAX_LENGTH = 163840  # V3.2 max_position_embeddings
# Control tokens decoded even with skip_special_tokens=True (the reasoning delimiters are text to a reader).
_NOT_SKIPPED = (chat.THINK_START, chat.THINK_END)
_PLACEHOLDER = "<｜place▁holder▁no▁{}｜>"
# The control tokens the chat template writes in its markup (``encode_chat`` splits the markup at them).
_MARKUP_CONTROL = re.compile("(" + "|".join(map(re.escape, chat.SPECIAL_TOKENS)) + ")")
_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used, or a token that is not in the vocabulary."""


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
        self._plain: _HFTokenizer | None = None  # encode_text's copy of the tokenizer, made on first use

    def _required(self, token: str, what: str) -> int:
        i = self._hf.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path}: the {what} token {token!r} is not in the vocabulary")
        return i

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a ``tokenizer.json``: the file itself, or a directory holding one (a checkpoint directory);
        ``tokenizer_config.json`` next to it is read too when present."""
        path = os.fspath(path)
        if os.path.isdir(path):
            directory, path = path, os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise TokenizerError(f"{path}: not found (a checkpoint directory needs tokenizer.json)")
        elif os.path.isfile(path):
            directory = os.path.dirname(path)
        else:
            raise TokenizerError(f"{path}: not found (expected a tokenizer.json or a directory holding one)")
        try:
            hf = _HFTokenizer.from_file(path)
        except Exception as err:  # the library raises a bare Exception for bad JSON or an unknown layout
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from None
        config_path = os.path.join(directory, "tokenizer_config.json")
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
        """Token ids of ``text``, without BOS/EOS; control-token strings in the text become their ids (for text
        whose markup is meant; text from a user goes through ``encode_text`` or ``encode_chat``)."""
        return _ids(self._hf, text, "encode")

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` read as text: no added token of the vocabulary (control tokens, placeholders) is
        matched, so ``<｜User｜>`` inside ``text`` becomes the ids of its characters, never the control id."""
        if self._plain is None:
            spec = json.loads(self._hf.to_str())
            for entry in spec.get("added_tokens", []):
                entry["special"] = True  # so that encode_special_tokens reads every added token as text
            self._plain = _HFTokenizer.from_str(json.dumps(spec))
            self._plain.encode_special_tokens = True
        return _ids(self._plain, text, "encode_text")

    def encode_chat(self, messages: list[dict], thinking_mode: str = "thinking", context: list[dict] | None = None,
                    drop_thinking: bool = True, add_default_bos_token: bool = True) -> list[int]:
        """The ids of ``chat.encode_messages(...)`` (same arguments): the template's control tokens become their
        ids, everything that came from the messages is read by ``encode_text``. For messages that hold no
        control-token string these are exactly the ids of ``encode(chat.encode_messages(...))``."""
        ids: list[int] = []
        text = ""  # text since the last control token: content and markup are read together, as encode would
        for piece in chat.render_messages(messages, thinking_mode, context, drop_thinking, add_default_bos_token):
            parts = [piece] if isinstance(piece, chat.Content) else _MARKUP_CONTROL.split(piece)
            for k, part in enumerate(parts):
                if k % 2 == 0:
                    text += part
                else:
                    ids += self.encode_text(text) + [self.token_id(part)]
                    text = ""
        return ids + self.encode_text(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self._hf.decode(_check_ids(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder: the pushes and the final flush add up to ``decode(ids)``."""
        return StreamDecoder(self, skip_special_tokens)


def replace_invalid(text: str) -> tuple[str, int]:
    """``text`` with every lone surrogate as U+FFFD -> (text, how many). Python keeps a byte that is not valid
    UTF-8 as a lone surrogate in ``sys.argv`` (and in stdin under the C locale, or with errors="surrogateescape"):
    this is decoding such input with errors="replace"."""
    return _SURROGATE.subn("\ufffd", text)


def _ids(hf: _HFTokenizer, text: str, what: str) -> list[int]:
    if not isinstance(text, str):
        raise TokenizerError(f"{what} takes a str, got {type(text).__name__}")
    if not text:
        return []
    try:
        return hf.encode(text, add_special_tokens=False).ids
    except TypeError:  # the library refuses a str that is not valid Unicode
        bad = _SURROGATE.search(text)
        if bad is None:
            raise
        raise TokenizerError(f"{what}: the text holds a lone surrogate U+{ord(bad.group()):04X} at character "
                             f"{bad.start()} (not valid Unicode; decode bytes with errors='replace')") from None


class StreamDecoder:
    """Incremental detokenization for streaming output, on the `tokenizers` library's ``DecodeStream``.

    ``push`` returns the text that became printable with this id ("" while it has to wait): a multi-byte
    character split across tokens is held back until its last byte arrives, so no U+FFFD appears for a valid
    character; bytes that turn out invalid come out as U+FFFD with the next printable text. ``flush`` ends the
    stream: it returns what is still held back (U+FFFD for a character that never completed) and starts a new
    one. The pushes and the flush add up to ``decode(ids)`` of the ids pushed since the last flush.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._stream = decoders.DecodeStream(skip_special_tokens=self._skip)
        self._ids: list[int] = []  # since the last flush, for the text held back at the end
        self._emitted = 0  # characters returned since the last flush
        self._held = False

    def push(self, token_id: int) -> str:
        (i,) = _check_ids([token_id])
        self._ids.append(i)
        if i >= self._tok.vocab_size:  # no token: nothing to write (as decode does)
            return ""
        text = self._stream.step(self._tok._hf, i)
        self._held = text is None
        if text is None:
            return ""
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        out = self._tok.decode(self._ids, self._skip)[self._emitted:] if self._held else ""
        self._reset()
        return out


# ------------------------------------------------------------------------------------------------------------
# Synthetic tokenizer
# ------------------------------------------------------------------------------------------------------------

# Training text, written for this project (in bpe_corpus.txt next to this module): prose, code and data
# formats, and a handful of languages, so the merges are plausible and the byte alphabet is exercised. Rendered
# chat prompts are appended at train time. Paragraphs are separated by blank lines.
_CORPUS_FILE = "bpe_corpus.txt"


def _corpus() -> str:
    return resources.files("dsv32_jax.text").joinpath(_CORPUS_FILE).read_text(encoding="utf-8")


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
    return [*(p.strip() for p in _corpus().split("\n\n") if p.strip()), *_chat_samples()]


def _train(vocab_size: int, texts: list[str] | None = None) -> dict:
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
    hf.train_from_iterator(_training_text() if texts is None else [*texts, *_chat_samples()],
                           trainer=trainer)
    return json.loads(hf.to_str())


def build_synthetic_tokenizer(vocab_size: int, directory: str | os.PathLike,
                              model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                              texts: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE with exactly ``vocab_size`` entries and the V3.2 control tokens (BOS 0, EOS 1),
    write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (created if needed), and load it.

    Deterministic: the same ``vocab_size`` (and chat format) gives byte-identical files. ``texts``: train on
    these paragraphs (plus the rendered chat prompts) instead of the embedded text (the demo model's corpus).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_SYNTHETIC_VOCAB:
        raise TokenizerError(f"vocab_size must be an int >= {MIN_SYNTHETIC_VOCAB} for a byte-level tokenizer "
                             f"(256 byte symbols + {len(chat.SPECIAL_TOKENS)} control tokens + merges), "
                             f"got {vocab_size!r}")
    spec = _train(vocab_size, texts)
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
