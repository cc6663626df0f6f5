"""The merged-weights LRU: bounded by bytes, and admitting only tasks that come back."""

from __future__ import annotations

import pytest
import torch

from app.cache import MergedCache
from app.metrics import Metrics

ENTRY = {"w": torch.zeros(256)}  # 1 KiB of float32: the cache below holds three


def _cache(entries: int = 3) -> MergedCache:
    return MergedCache(entries * 1024, Metrics())


def test_a_task_is_admitted_once_it_comes_back() -> None:
    cache = _cache()
    cache.seen(["a"])
    assert cache.heat("a") == pytest.approx(1.0) and not cache.admits("a")  # seen once: never folded
    cache.seen(["a"])
    assert cache.heat("a") == pytest.approx(1.9) and not cache.admits("a")  # 0.9 decay per batch
    cache.seen(["a"])
    assert cache.admits("a")
    for _ in range(30):  # forgotten after ~10 quiet batches
        cache.seen(["b"])
    assert cache.heat("a") < 0.2 and not cache.admits("a")


def test_a_full_cache_only_takes_a_clearly_hotter_task() -> None:
    # Uniform traffic over more tasks than fit must not fold one task per batch to evict another.
    cache = _cache()
    for _ in range(3):
        cache.seen(["a", "b", "c", "d"])
    for key in "abc":
        assert cache.admits(key)
        cache.put(key, dict(ENTRY))
    assert len(cache) == 3 and not cache.admits("d")  # as hot as the LRU entry: stays out
    for _ in range(5):
        cache.seen(["d"])
    assert cache.heat("d") >= 2 * cache.heat("a") and cache.admits("d")
    cache.put("d", dict(ENTRY))
    assert "a" not in cache and len(cache) == 3 and cache.nbytes == 3 * 1024
    assert cache.heat("a") > 0  # an evicted task keeps its count; a retired one (pop) loses it
    cache.pop("b")
    assert cache.heat("b") == 0 and "b" not in cache


def test_no_budget_admits_nothing() -> None:
    cache = _cache(entries=0)
    for _ in range(5):
        cache.seen(["a"])
    assert not cache.admits("a")
    cache.put("a", dict(ENTRY))
    assert len(cache) == 0 and cache.nbytes == 0


def test_eviction_takes_the_coldest_entry_not_the_least_recent() -> None:
    # Skewed traffic: the cache must converge to the hottest tasks, not cycle through the tail.
    cache = _cache(entries=2)
    for _ in range(6):
        cache.seen(["hot"])
    for _ in range(3):
        cache.seen(["warm", "hotter"])
    cache.put("hot", dict(ENTRY))  # least recently used from here on, but the hottest
    cache.put("warm", dict(ENTRY))
    assert cache.heat("hot") > cache.heat("warm")
    cache.put("hotter", dict(ENTRY))
    assert "hot" in cache and "hotter" in cache and "warm" not in cache
