"""The page pool's bookkeeping on the host: which pages are free, who holds each page (reference
counts), and the prefix cache: full pages keyed by a hash of every token up to their end, so that a
request whose prompt starts like an earlier one reuses those pages instead of prefilling them again.

Page 0 is never handed out (the pool's scratch page, `model.cache.PagedKVCache`). A page whose last
holder lets go stays cached (and evictable, least recently released first) while it has a key;
otherwise it is free at once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from dsv32_jax.model.cache import PAGE


def page_keys(tokens, n: int, parent: bytes = b"", overlap: int = 0) -> list[bytes]:
    """The keys of the first n full pages of `tokens`: key k hashes key k-1 and page k's tokens, so
    it names the whole prefix up to the page's end, and `overlap` tokens past it (a page whose
    content depends on them: the MTP layer's keys, `scheduler`)."""
    keys = []
    for k in range(n):
        page = np.asarray(tokens[k * PAGE:(k + 1) * PAGE + overlap], np.int32)
        if page.size != PAGE + overlap:
            raise ValueError(f"page {k} is not full ({page.size} of {PAGE} + {overlap} tokens)")
        parent = hashlib.blake2b(parent + page.tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class Pages:
    """n_pages pages (1..n_pages-1 usable) with reference counts and the prefix cache."""

    def __init__(self, n_pages: int, prefix_cache: bool = True):
        if n_pages < 2:
            raise ValueError(f"a page pool needs >= 2 pages (one is scratch), got {n_pages}")
        self.n_pages = n_pages
        self.prefix_cache = prefix_cache
        self._free = list(range(n_pages - 1, 0, -1))  # pop() hands out low pages first
        self._refs = np.zeros(n_pages, np.int32)
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody holds (LRU first)

    @property
    def available(self) -> int:
        """Pages an `allocate` can hand out now (free, or cached and evictable)."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Pages held by a sequence."""
        return int((self._refs > 0).sum())

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (evicting cached ones nobody holds when no free page is left)."""
        if n > self.available:
            raise MemoryError(f"{n} pages wanted, {self.available} available")
        out = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._idle.popitem(last=False)
                del self._by_key[self._key_of.pop(p)]
            self._refs[p] = 1
            out.append(p)
        return out

    def release(self, pages) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} released more often than held")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._key_of:
                    self._idle[p] = None
                else:
                    self._free.append(p)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest run of `keys` from the first, each now held once more."""
        out = []
        if not self.prefix_cache:
            return out
        for key in keys:
            p = self._by_key.get(key)
            if p is None:
                break
            self._idle.pop(p, None)
            self._refs[p] += 1
            out.append(p)
        return out

    def register(self, page: int, key: bytes) -> None:
        """Page `page` (held) is full and holds the prefix named by `key`: later lookups may share it.
        A key already cached keeps its first page."""
        if self.prefix_cache and key not in self._by_key and page not in self._key_of:
            self._by_key[key] = page
            self._key_of[page] = key
