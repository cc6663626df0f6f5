"""Folded weights of hot tasks: a byte-bounded cache with frequency-based admission and eviction.

Speed does not depend on this cache (a segmented batch folds each layer just in time); it only
saves hot tasks that fold, and lets a batch of one cached task run as one plain timm forward.
Used on the engine thread; `pop` may come from the event loop (a retired task), hence the lock.
"""

from __future__ import annotations

import collections
import threading

import torch

from app.metrics import Metrics

Weights = dict[str, torch.Tensor]  # `fold_adapter` output


class MergedCache:
    """Folded task weights, bounded by bytes, admitting only tasks that come back.

    A task is *hot* when it was counted (`seen`: the engine counts a task that holds at least half
    of a batch) in `admit_after` or more of the recent batches (a decayed count, ~`1 / (1 - decay)`
    batches long). An entry is a whole backbone's worth of memory and a
    fold, so a task seen once (most tasks under uniform traffic over 1,000) is never folded into
    it, and when the cache is full a newcomer only displaces the coldest entry if it is clearly
    hotter (`admits`).

    Args:
        max_bytes: Budget; an entry larger than it is never cached.
        metrics: Where hits, misses, evictions and bytes go.
        admit_after: Recent batches a task must appear in before it is folded into the cache.
        decay: Per-batch decay of the counts.
    """

    def __init__(self, max_bytes: int, metrics: Metrics, admit_after: float = 2.0, decay: float = 0.9) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.entry_bytes = 0  # size of one entry, once one was folded
        self.admit_after, self.decay = admit_after, decay
        self._metrics = metrics
        self._entries: collections.OrderedDict[str, tuple[Weights, int]] = collections.OrderedDict()
        self._heat: dict[str, float] = {}
        self._scale = 1.0  # counts are stored divided by decay^batches, so a batch decays all in O(1)
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Weights | None:
        """The cached weights (now most recent), or None; counts a hit or a miss.

        Args:
            key: The task version's key.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._metrics.cache_misses.inc()
                return None
            self._entries.move_to_end(key)
        self._metrics.cache_hits.inc()
        return entry[0]

    def peek(self, key: str) -> Weights | None:
        """The cached weights or None, counting nothing (the batch's lookup already counted).

        Args:
            key: The task version's key.
        """
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def seen(self, keys: list[str]) -> None:
        """Count one batch's tasks (each once) and age every count by one batch.

        Args:
            keys: The task keys present in the batch.
        """
        with self._lock:
            self._scale /= self.decay
            if self._scale > 1e12:  # renormalise before the stored counts lose precision
                self._heat = {k: v / self._scale for k, v in self._heat.items() if v / self._scale > 1e-3}
                self._scale = 1.0
            for key in keys:
                self._heat[key] = self._heat.get(key, 0.0) + self._scale

    def heat(self, key: str) -> float:
        """Decayed count of recent batches the task appeared in."""
        return self._heat.get(key, 0.0) / self._scale

    def admits(self, key: str) -> bool:
        """Whether folding this (uncached) task into the cache now is worth it.

        A fold costs about ten just-in-time passes of that task (a whole backbone written, and a
        fresh backbone-sized allocation), so an entry must be reused many times before it is
        evicted to pay for itself. With room left, any task seen in `admit_after` recent batches
        is admitted; a full cache only takes a task at least twice as hot as the entry it would
        displace. Traffic spread evenly over more tasks than fit (uniform-50 in 1 GiB) then keeps
        its first entries instead of folding one task per batch to evict another.

        Args:
            key: The task version's key.
        """
        if self.max_bytes == 0 or self.entry_bytes > self.max_bytes or self.heat(key) < self.admit_after:
            return False
        if not self._entries or self.nbytes + self.entry_bytes <= self.max_bytes:
            return True
        return self.heat(key) >= 2 * self.heat(self._coldest())  # displaces the coldest entry

    def put(self, key: str, weights: Weights) -> None:
        """Insert, evicting the coldest entries until it fits.

        Args:
            key: The task version's key.
            weights: Output of `fold_adapter`.
        """
        size = sum(t.numel() * t.element_size() for t in weights.values())
        self.entry_bytes = size
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)  # a re-put replaces the entry; the task keeps its heat
            if old is not None:
                self.nbytes -= old[1]
            while self.nbytes + size > self.max_bytes:
                self._evict(self._coldest())
            self._entries[key] = (weights, size)
            self.nbytes += size
        self._metrics.cache_bytes.set(self.nbytes)

    def pop(self, key: str) -> None:
        """Drop an entry (a replaced or deleted task), if present, and forget its count.

        Args:
            key: The task version's key.
        """
        with self._lock:
            self._heat.pop(key, None)
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry[1]
        if entry is not None:
            self._metrics.cache_bytes.set(self.nbytes)

    def _coldest(self) -> str:
        # The entry with the lowest recent count (the least recently used among equals): under skewed
        # traffic the cache converges to the hottest tasks instead of cycling through the tail.
        return min(self._entries, key=self.heat)

    def _evict(self, key: str) -> None:
        # Under the lock. Dropping the only reference frees the tensors (CUDA memory returns to torch).
        entry = self._entries.pop(key)
        self.nbytes -= entry[1]
        self._metrics.cache_evictions.inc()
