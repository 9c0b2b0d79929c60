"""Validation of generation requests, shared by the API (`Model.generate`, `generate_stream`, the chat
session) and the command line. Every check raises ValueError with a message that names the argument,
what it must be and what it got, and returns the value normalized to a plain Python number.
"""

from __future__ import annotations

import math
import numbers


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_temperature(temperature) -> float:
    """temperature: a finite number >= 0 (0 = greedy)."""
    t = _real("temperature", temperature)
    if t < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    return t


def check_top_p(top_p) -> float:
    """top_p: the nucleus mass, 0 < top_p <= 1 (1 = sample from the whole distribution)."""
    p = _real("top_p", top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    return p


def check_sampling(temperature, top_p) -> tuple[float, float]:
    """Both sampling parameters -> (temperature, top_p) as floats."""
    return check_temperature(temperature), check_top_p(top_p)


def check_max_new_tokens(max_new_tokens) -> int:
    """max_new_tokens: an integer >= 1 (a bool or a float such as 8.0 is refused)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    n = int(max_new_tokens)
    if n < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {n}")
    return n


def check_ids(values, what: str, vocab: int | None = None) -> list[int]:
    """Token ids (a sequence or numpy array of integers) -> a list of ints, each >= 0 and, given
    ``vocab``, < vocab. A bool, a float or an id out of range is refused, naming ``what``."""
    if hasattr(values, "tolist") and hasattr(values, "reshape"):  # a numpy / jax array
        values = values.reshape(-1).tolist()
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{what} must be integer token ids, got {v!r}")
        out.append(int(v))
    bad = [t for t in out if not 0 <= t < (vocab if vocab is not None else math.inf)]
    if bad:
        where = f"outside [0, {vocab})" if vocab is not None else "negative"
        raise ValueError(f"{what}: token ids {bad[:5]} are {where}")
    return out


def check_seed(seed) -> int:
    """seed: an integer (a bool is refused)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return int(seed)


MAX_DRAFTS = 3  # speculative decoding: drafts an iteration at most (the MTP layer chained)


def check_drafts(k) -> int:
    """k: speculative drafts an iteration, an integer in [0, MAX_DRAFTS] (0 = off)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= MAX_DRAFTS:
        raise ValueError(f"speculative drafts k must be an integer in [0, {MAX_DRAFTS}] (0 = off), got {k!r}")
    return int(k)


def check_budget(prompt_len, max_new_tokens, max_seq_len) -> int:
    """A prompt of `prompt_len` tokens (>= 1) plus `max_new_tokens` new ones must fit in `max_seq_len`
    positions (the model's max_position_embeddings, or a smaller cache). -> max_new_tokens as an int."""
    n = check_max_new_tokens(max_new_tokens)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, numbers.Integral) or prompt_len < 1:
        raise ValueError(f"the prompt must have at least one token, got a length of {prompt_len!r}")
    if prompt_len >= max_seq_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) leaves no room for new tokens in the context of "
                         f"{max_seq_len} positions")
    if prompt_len + n > max_seq_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({n}) = {prompt_len + n} exceeds the "
                         f"context of {max_seq_len} positions; at most {max_seq_len - prompt_len} new tokens fit")
    return n


BYTES_PER_POSITION = 16


def check_text_bytes(text: str, max_len: int, what: str = "this message") -> str:
    """Refuse, before it is tokenized, text of more than BYTES_PER_POSITION UTF-8 bytes per position of a
    context of `max_len` positions: such text cannot fit (text averages 1.6 bytes a token with the demo's
    1,024-entry vocabulary, 3-5 with a large one), and tokenizing it would cost 140-230 bytes of memory per
    byte (7-11 GB for a 50 MB line)."""
    limit = BYTES_PER_POSITION * max_len
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ValueError(f"{what} is {size:,} bytes; a context of {max_len:,} positions takes at most {limit:,} "
                         f"({BYTES_PER_POSITION} bytes a position): shorten it")
    return text
