"""Encoded images -> top-k classes of one task: decode in the pool, run through the batcher.

The one path every classification route takes (/classify, the Open Inference Protocol's infer),
so limits, batching, errors and metrics are the same whatever the wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from app.batcher import Batcher
from app.preprocess import Preprocessor, scale_size
from app.tasks import BatchItem, LoadedTask, TopK


async def classify_images(
    task: LoadedTask,
    images: Sequence[bytes],
    k: int,
    preprocessor: Preprocessor,
    batcher: Batcher[BatchItem, TopK],
) -> list[TopK]:
    """The best `k` (class index, probability) pairs of each image, in request order.

    Args:
        task: The task version to run.
        images: Encoded images (already counted and size-checked by the caller).
        k: Classes per image.
        preprocessor: Decodes and transforms the images off the event loop.
        batcher: Queues the images for the engine.
    """
    batcher.check_room(len(images))  # a full queue answers 503 before any decoding work
    tensors = await preprocessor.decode_many(images, task.transform, scale_size(task.data_config))
    futures = batcher.submit_many([BatchItem(task, t, k) for t in tensors])
    return list(await asyncio.gather(*futures))
