"""The page pool's bookkeeping on the host: which pages are free, who holds each page (reference
counts), and the prefix cache: full pages keyed by a hash of every token up to their end, so that a
request whose prompt starts like an earlier one reuses those pages instead of prefilling them again.

On a mesh with data > 1 the pool is split over data (`model.cache.PagedKVCache`): shard d holds
pages [d * per, (d + 1) * per) (`per` = n_pages / shards) and the sequences of its batch rows, so a
sequence takes all its pages from one shard, and a prefix is shared within a shard. Page ids here are
global; the device's page tables hold them as local ids, p % per (`local_ids`). The first page of
each shard is never handed out (that shard's scratch page). A page whose last holder lets go stays
cached (and evictable, least recently released first) while it has a key; otherwise it is free at
once.
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
    """n_pages pages in `shards` equal shards (each one's first page: scratch) with reference counts
    and a prefix cache per shard."""

    def __init__(self, n_pages: int, prefix_cache: bool = True, shards: int = 1):
        if shards < 1 or n_pages % shards:
            raise ValueError(f"{n_pages} pages do not split into {shards} equal shards")
        self.per = n_pages // shards
        if self.per < 2:
            raise ValueError(f"a page pool needs >= 2 pages per shard (one is scratch), got {self.per}")
        self.n_pages, self.shards = n_pages, shards
        self.prefix_cache = prefix_cache
        # pop() hands out low pages first
        self._free = [list(range((d + 1) * self.per - 1, d * self.per, -1)) for d in range(shards)]
        self._refs = np.zeros(n_pages, np.int32)
        self._by_key: list[dict[bytes, int]] = [{} for _ in range(shards)]
        self._key_of: dict[int, bytes] = {}
        # cached pages nobody holds (LRU first)
        self._idle: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(shards)]

    @property
    def usable(self) -> int:
        """Pages a sequence may hold (every shard's but its scratch page)."""
        return self.n_pages - self.shards

    @property
    def available(self) -> int:
        """Pages an `allocate` can hand out now, over every shard."""
        return sum(map(self.free_in, range(self.shards)))

    def free_in(self, shard: int) -> int:
        """Pages an `allocate` in `shard` can hand out now (free, or cached and evictable)."""
        return len(self._free[shard]) + len(self._idle[shard])

    @property
    def used(self) -> int:
        """Pages held by a sequence."""
        return int((self._refs > 0).sum())

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def shard_of(self, page: int) -> int:
        return page // self.per

    def local_ids(self, pages) -> np.ndarray:
        """Page ids as the device's page tables hold them: within their shard."""
        return np.asarray(pages, np.int32) % self.per

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        """n fresh pages of `shard` (evicting cached ones nobody holds when no free page is left)."""
        if n > self.free_in(shard):
            raise MemoryError(f"{n} pages wanted, {self.free_in(shard)} available")
        out = []
        for _ in range(n):
            if self._free[shard]:
                p = self._free[shard].pop()
            else:
                p, _ = self._idle[shard].popitem(last=False)
                del self._by_key[shard][self._key_of.pop(p)]
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
                    self._idle[self.shard_of(p)][p] = None
                else:
                    self._free[self.shard_of(p)].append(p)

    def hits(self, keys: list[bytes], shard: int = 0) -> tuple[int, int]:
        """How many of `keys`, from the first, `shard` has cached (a `lookup` would lend them), and
        how many of those pages nobody holds (they then leave `free_in`)."""
        out = []
        if self.prefix_cache:
            for key in keys:
                if key not in self._by_key[shard]:
                    break
                out.append(self._by_key[shard][key])
        return len(out), sum(p in self._idle[shard] for p in out)

    def lookup(self, keys: list[bytes], shard: int = 0) -> list[int]:
        """The cached pages of `shard` of the longest run of `keys` from the first, each now held
        once more."""
        out = [self._by_key[shard][key] for key in keys[:self.hits(keys, shard)[0]]]
        for p in out:
            self._idle[shard].pop(p, None)
            self._refs[p] += 1
        return out

    def register(self, page: int, key: bytes) -> None:
        """Page `page` (held) is full and holds the prefix named by `key`: later lookups in its
        shard may share it. A key already cached there keeps its first page."""
        by_key = self._by_key[self.shard_of(page)]
        if self.prefix_cache and key not in by_key and page not in self._key_of:
            by_key[key] = page
            self._key_of[page] = key
