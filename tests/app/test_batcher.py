"""The batcher alone: batch limits, order, one result per item, bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from app.batcher import Batcher, BatcherClosed, QueueFull


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(coro)


def test_batches_hold_at_most_max_size_and_keep_order() -> None:
    seen: list[list[int]] = []

    async def process(items: list[int]) -> list[int]:
        seen.append(items)
        return [x * 10 for x in items]

    async def main() -> list[int]:
        batcher = Batcher(process, max_batch_size=4, max_wait_s=0.05, max_queue=100)
        batcher.start()
        futures = batcher.submit_many(list(range(10)))
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results

    assert _run(main()) == [x * 10 for x in range(10)]
    assert [x for batch in seen for x in batch] == list(range(10))
    assert max(len(b) for b in seen) == 4


def test_a_lone_item_runs_after_max_wait() -> None:
    async def process(items: list[str]) -> list[str]:
        return [s.upper() for s in items]

    async def main() -> str:
        batcher = Batcher(process, max_batch_size=64, max_wait_s=0.01, max_queue=10)
        batcher.start()
        result = await batcher.submit("a")
        await batcher.close()
        return result

    assert _run(main()) == "A"


def test_queue_full_is_all_or_nothing() -> None:
    async def main() -> None:
        batcher = Batcher(lambda items: asyncio.sleep(0, items), max_batch_size=2, max_wait_s=0.0, max_queue=3)
        batcher.submit_many([1, 2])
        with pytest.raises(QueueFull) as info:
            batcher.submit_many([3, 4])
        assert info.value.headers == {"Retry-After": "1"}
        assert batcher.depth == 2
        await batcher.close()

    _run(main())


def test_a_failing_batch_fails_only_its_items() -> None:
    async def process(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("boom")
        return items

    async def main() -> None:
        batcher = Batcher(process, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        batcher.start()
        bad, good = batcher.submit_many([0, 5])
        with pytest.raises(ValueError, match="boom"):
            await bad
        assert await good == 5
        await batcher.close()

    _run(main())


def test_close_fails_waiting_items_and_refuses_new_ones() -> None:
    async def main() -> None:
        batcher = Batcher(lambda items: asyncio.sleep(0, items), max_batch_size=2, max_wait_s=0.0, max_queue=10)
        (future,) = batcher.submit_many([1])  # never started: stays queued
        await batcher.close()
        with pytest.raises(BatcherClosed):
            await future
        with pytest.raises(BatcherClosed):
            batcher.submit_many([2])

    _run(main())


def test_metrics_callbacks() -> None:
    sizes: list[int] = []
    depths: list[int] = []

    async def main() -> None:
        batcher = Batcher(lambda items: asyncio.sleep(0, items), max_batch_size=3, max_wait_s=0.01, max_queue=10,
                          on_batch=lambda size, waits: sizes.append(size), on_depth=depths.append)
        batcher.start()
        await asyncio.gather(*batcher.submit_many([1, 2, 3, 4]))
        await batcher.close()

    _run(main())
    assert sum(sizes) == 4 and max(sizes) <= 3
    assert depths[0] == 4 and depths[-1] == 0
