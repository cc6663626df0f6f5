"""Image bytes -> model input tensor, in a thread pool, with byte and pixel limits.

The transform comes from the adapter's data config resolved against the backbone
(`timm.data.resolve_data_config` + `create_transform`), the same as the trainer's eval transform.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from app.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

Transform = Callable[[Image.Image], torch.Tensor]
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def resolve_config(data_config: dict[str, Any] | None, backbone: nn.Module) -> dict[str, Any]:
    """The eval data config: the adapter's values over the backbone's defaults.

    Args:
        data_config: The adapter's saved data config (may be empty).
        backbone: The served backbone, source of the defaults.
    """
    return resolve_data_config(dict(data_config or {}), model=backbone)


def make_transform(config: dict[str, Any]) -> Transform:
    """The eval transform (resize, center crop, normalize) for a resolved data config.

    Args:
        config: Output of `resolve_config`.
    """
    return create_transform(**config, is_training=False)


def decode(data: bytes, transform: Transform, max_pixels: int) -> torch.Tensor:
    """Decode, check and transform one image.

    Args:
        data: The encoded image.
        transform: The task's eval transform.
        max_pixels: Largest width * height accepted (checked from the header, before decoding).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns (then raises) on huge images; our own limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType("body is not an image in a supported format (jpeg, png, webp)") from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image too large: {exc}") from exc
    except Exception as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from exc
    if image.format not in FORMATS:
        raise UnsupportedMediaType(f"image format {image.format} not accepted; use jpeg, png or webp")
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image has {width}x{height} = {width * height} pixels, limit is {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            rgb = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image too large: {exc}") from exc
    except Exception as exc:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError...
        raise InvalidImage(f"cannot decode image: {exc}") from exc
    return transform(rgb)


class Preprocessor:
    """Runs `decode` for many images in a thread pool, off the event loop.

    Args:
        workers: Threads in the pool.
        max_pixels: Largest width * height accepted.
    """

    def __init__(self, workers: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")

    async def decode_many(self, images: Sequence[bytes], transform: Transform) -> list[torch.Tensor]:
        """Decode all images of a request in parallel; the first failure is raised.

        Args:
            images: Encoded images.
            transform: The task's eval transform.
        """
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pool, decode, data, transform, self.max_pixels) for data in images]
        return list(await asyncio.gather(*jobs))

    def close(self) -> None:
        """Stop the pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
