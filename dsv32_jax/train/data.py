"""Tokenized text and deterministic batches by position.

A text file is split into paragraphs (blank-line separated), each tokenized (control-token strings
such as the chat template's become their ids), given BOS/EOS when it lacks them, and concatenated
into one token stream. The stream is cut into windows of `seq_len` tokens; batch `step` holds the
samples step*B .. step*B+B-1 of an endless sequence of epochs, each epoch a seeded permutation of
the windows (at a seeded offset). So a batch is a pure function of (seed, step): the data position
saved with a checkpoint is just the step, and a resumed run reads exactly the batches it would have.
"""

from __future__ import annotations

import os

import numpy as np


class DataError(ValueError):
    """Training text that cannot be used."""


def tokenize_file(path: str | os.PathLike, tok) -> np.ndarray:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    ids: list[int] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        t = tok.encode(para)
        if not t or t[0] != tok.bos_id:
            t = [tok.bos_id] + t
        if t[-1] != tok.eos_id:
            t = t + [tok.eos_id]
        ids += t
    return np.asarray(ids, np.int32)


class Batches:
    """Deterministic (B, S) int32 batches over a token stream; `batch(step)`."""

    def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int = 0):
        self.tokens, self.b, self.s, self.seed = np.asarray(tokens, np.int32), batch, seq_len, seed
        self.windows = (len(self.tokens) - seq_len) // seq_len  # leaves room for the epoch offset
        if self.windows < 1:
            raise DataError(f"{len(self.tokens)} tokens: too little text for one sequence of "
                            f"{seq_len} tokens (need at least {2 * seq_len})")

    def _epoch(self, e: int) -> tuple[np.ndarray, int]:
        r = np.random.default_rng([self.seed, e])
        return r.permutation(self.windows), int(r.integers(self.s))

    def batch(self, step: int) -> np.ndarray:
        rows = []
        for g in range(step * self.b, (step + 1) * self.b):
            order, offset = self._epoch(g // self.windows)
            start = offset + int(order[g % self.windows]) * self.s
            rows.append(self.tokens[start:start + self.s])
        return np.stack(rows)
