"""Reuse instead of recompute: the keys and values of token sequences seen before, for prompts that start alike.

Requests to one server often share a beginning (a system prompt, a chat template, few-shot examples, the earlier
turns of a conversation). `PrefixCache` keeps one-row KV snapshots (`KVCache.extract`) of sequences the engine has
run, each with its token ids, and answers a new prompt with the snapshot that shares the longest common prefix
with it: the engine copies that much into the request's row (`KVCache.load_prefix`) and prefills only the rest.
Keys depend only on the tokens before them, so the result is the full prefill's, computed in two pieces (as the
chunked prefill is; tested equal token for token).

The snapshots are contiguous per sequence (there is no paged block table to share blocks between them), so two
prompts that share a long prefix are stored twice; a snapshot whose tokens begin another's is dropped for the
longer one when it serves every prefix the shorter did, and the least recently used go first once `max_bytes`
is reached. A lookup compares the prompt with
every snapshot's tokens, O(snapshots x prompt) integer comparisons in numpy, negligible next to a prefill.
Prompts with images are never stored or matched: their `<|patch|>` ids say nothing of the pixels behind them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from behemoth.inference.cache import KVCache


def reusable_prefix(cache: KVCache, held, ids) -> int:
    """How many of `ids`' first tokens row 0 of `cache`, which holds the tokens `held` at positions 0.., can give a
    continuation: their common beginning, at most len(ids) - 1 (the last prompt token is always run, for its
    logits), cut to what the row's keys allow (`KVCache.reusable`)."""
    m = min(len(held), len(ids) - 1)
    diff = np.flatnonzero(np.asarray(held[:m], dtype=np.int64) != np.asarray(ids[:m], dtype=np.int64))
    return cache.reusable(0, int(diff[0]) if diff.size else m)


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to a hit
    prompt_tokens: int = 0  # prompt tokens looked up
    stored: int = 0
    evicted: int = 0


@dataclass
class _Entry:
    ids: np.ndarray  # [n] the tokens the snapshot holds, positions 0..n-1
    cache: KVCache  # one row, max_len n
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = self.cache.nbytes()


class PrefixCache:
    """Snapshots of token sequences' keys and values within `max_bytes` (least recently used evicted first)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"prefix cache: max_bytes={max_bytes} must be >= 1")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # key: a counter, in order of last use
        self.nbytes = 0
        self.stats = PrefixStats()
        self._next = 0

    def lookup(self, ids: list[int]) -> tuple[int, KVCache | None]:
        """(n, snapshot): the most of `ids`' first tokens a snapshot holds, at most len(ids) - 1 (the last prompt
        token is always run, for its logits), cut to what a continuation can reuse (`KVCache.reusable`); (0, None)
        when nothing is shared."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(ids)
        best, best_key = 0, None
        query = np.asarray(ids, dtype=np.int64)
        for key, e in self.entries.items():
            if min(len(query) - 1, len(e.ids)) <= best:  # it cannot beat the best so far
                continue
            n = reusable_prefix(e.cache, e.ids, query)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        self.stats.hits += 1
        self.stats.reused_tokens += best
        return best, self.entries[best_key].cache

    def store(self, ids: list[int], cache: KVCache, row: int) -> None:
        """Keep a snapshot of `cache`'s row `row`, which holds the keys of `ids` at positions 0..len(ids)-1, unless a
        snapshot already serves them; snapshots of a beginning of `ids` that the new one serves as well are dropped
        (one whose last chunk the new one no longer holds stays)."""
        query = np.asarray(ids, dtype=np.int64)
        for key, e in self.entries.items():
            if len(e.ids) >= len(query) and np.array_equal(e.ids[:len(query)], query) \
                    and e.cache.reusable(0, len(query)) == len(query):
                self.entries.move_to_end(key)
                return  # already held
        entry = _Entry(query, cache.extract(row, len(ids)))
        if entry.nbytes > self.max_bytes:
            return
        for key, e in list(self.entries.items()):
            n = len(e.ids)
            if n < len(query) and np.array_equal(e.ids, query[:n]) and entry.cache.reusable(0, n) == n:
                self._drop(key)
        while self.nbytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.stats.evicted += 1
        self.entries[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes
        self.stats.stored += 1

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
