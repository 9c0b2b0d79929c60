"""Tokenizers: the checkpoint's `tokenizer.json` (via the `tokenizers` library) with the V3.2
special tokens by name, streaming detokenization, and a small byte-level BPE of our own for
synthetic checkpoints (trained at write time on an embedded text; no download)."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv32_jax.chat import BOS, EOS, SPECIAL_TOKENS


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Token ids <-> text. `encode` adds no BOS/EOS (the chat template writes them as text)."""

    def __init__(self, tk: HFTokenizer, where: str):
        self._tk, self.where = tk, where
        self.bos_id, self.eos_id = self.token_id(BOS), self.token_id(EOS)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        path = os.path.join(os.fspath(directory), "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no tokenizer.json in the checkpoint directory")
        try:
            tk = HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a plain Exception on bad JSON
            raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from None
        return cls(tk, path)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self._tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.where}: token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization: push ids, get the newly completed text. Text that ends in an
    incomplete UTF-8 sequence (U+FFFD) is held back until it completes or `flush`."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False):
        self._tok, self._skip, self._ids, self._emitted = tok, skip_special_tokens, [], 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids, self._skip)
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self._tok.decode(self._ids, self._skip)
        new, self._emitted = text[self._emitted:], len(text)
        return new


_CORPUS = """\
DeepSeek-V3.2 is a mixture-of-experts language model with multi-head latent attention. Its sparse
attention uses a lightning indexer that scores every earlier token and keeps the top k of them.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
def forward(params, tokens):
    logits = model.apply({"params": params}, tokens)
    return jax.nn.softmax(logits, axis=-1)
for i in range(10): print(i, i * i)  # squares
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt.
El zorro marrón rápido salta sobre el perro perezoso. Быстрая коричневая лиса прыгает.
深度求索发布了新的模型。稀疏注意力让长上下文更快。今天天气很好。
"""


def build_synthetic_tokenizer(vocab_size: int, directory: str | os.PathLike) -> Tokenizer:
    """A deterministic byte-level BPE with exactly `vocab_size` tokens and the V3.2 special tokens
    (BOS id 0, EOS id 1, then the chat tokens); written to `directory`/tokenizer.json."""
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special + 16:
        raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer "
                             f"(needs >= {256 + n_special + 16})")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    from dsv32_jax.chat import encode_messages

    chat = encode_messages([{"role": "user", "content": "Hello!"},
                            {"role": "assistant", "content": "Hi, how can I help?"}],
                           thinking_mode="chat")
    tk.train_from_iterator(_CORPUS.splitlines() * 4 + [chat], trainer=trainer)
    missing = vocab_size - tk.get_vocab_size(with_added_tokens=True)
    if missing > 0:  # pad with unused placeholders, like the release's reserved tokens
        tk.add_special_tokens([f"<｜place▁holder▁no▁{i}｜>" for i in range(missing)])
    path = os.path.join(os.fspath(directory), "tokenizer.json")
    tk.save(path)
    with open(os.path.join(os.fspath(directory), "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
                   "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}, f,
                  indent=2)
    tok = Tokenizer.load(directory)
    if tok.vocab_size != vocab_size or tok.bos_id != 0 or tok.eos_id != 1:
        raise TokenizerError(f"synthetic tokenizer came out with {tok.vocab_size} tokens, "
                             f"BOS {tok.bos_id}, EOS {tok.eos_id}")
    return tok
