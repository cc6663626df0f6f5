"""Image bytes -> model input tensor, in a thread pool, with byte and pixel limits.

The transform comes from the adapter's data config resolved against the backbone
(`timm.data.resolve_data_config` + `create_transform`), the same as the trainer's eval transform.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from app.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from app.runtime import trim_heap

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


def scale_size(config: dict[str, Any]) -> int:
    """The side an image is resized to before the center crop: the least a decoder must produce.

    Args:
        config: Output of `resolve_config`.
    """
    return math.ceil(max(config["input_size"][1:]) / float(config.get("crop_pct") or 1.0))


def open_image(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Read an image's header (no pixels yet), check it, and plan a reduced decode.

    JPEGs are set to decode at the smallest DCT scale (1/2 .. 1/8) that still covers `min_side`,
    which cuts their decode time and memory by up to 64x; `image.size` is then the decoded size.

    Args:
        data: The encoded image.
        max_pixels: Largest width * height accepted (of the full image).
        min_side: The decoded image must keep at least this many pixels a side (when it has them).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns on huge images (and raises beyond twice its limit); our own limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType("body is not an image in a supported format (jpeg, png, webp)") from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image has more than {max_pixels} pixels, the limit (width * height)") from exc
    except Exception as exc:
        raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc
    if image.format not in FORMATS:
        raise UnsupportedMediaType(f"image format {image.format} not accepted; use jpeg, png or webp")
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image has {width}x{height} = {width * height} pixels, limit is {max_pixels}")
    if image.format == "JPEG" and min_side > 0:
        try:
            image.draft("RGB", (min_side, min_side))
        except Exception as exc:
            raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc
    return image


def decode_opened(image: Image.Image, transform: Transform, min_side: int) -> torch.Tensor:
    """Decode an image from `open_image`, turn it upright (EXIF orientation) and transform it.

    Args:
        image: The opened image.
        transform: The task's eval transform.
        min_side: Images more than twice this size a side are box-reduced first (cheap, and the
            transform's resize from there loses nothing visible).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            factor = min(image.size) // (2 * min_side) if min_side > 0 else 1
            if factor >= 2:
                image = image.reduce(factor)
            image = ImageOps.exif_transpose(image)
            rgb = image.convert("RGB")
    except Exception as exc:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError...
        raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc
    return transform(rgb)


def decode(data: bytes, transform: Transform, max_pixels: int, min_side: int = 0) -> torch.Tensor:
    """Decode, check and transform one image.

    Args:
        data: The encoded image.
        transform: The task's eval transform.
        max_pixels: Largest width * height accepted (checked from the header, before decoding).
        min_side: Least side the decoder must keep (see `scale_size`); 0 decodes at full size.
    """
    return decode_opened(open_image(data, max_pixels, min_side), transform, min_side)


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


TRIM_ABOVE_PIXELS = 4_000_000  # decoded pixels of a request beyond which memory is handed back


class Preprocessor:
    """Decodes the images of a request in a thread pool, off the event loop, within pixel limits.

    Args:
        workers: Threads in the pool.
        max_pixels: Largest width * height of one image.
        max_request_pixels: Most decoded pixels (summed over the images) of one request.
    """

    def __init__(self, workers: int, max_pixels: int, max_request_pixels: int | None = None) -> None:
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels or max_pixels
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")

    async def decode_many(self, images: Sequence[bytes], transform: Transform, min_side: int = 0) -> list[torch.Tensor]:
        """Check every header and the request's pixel budget, then decode all in parallel; the first failure is raised.

        Args:
            images: Encoded images.
            transform: The task's eval transform.
            min_side: Least side the decoder must keep (see `scale_size`).
        """
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(self._pool, self._open_all, images, min_side)
        pixels = sum(w * h for w, h in (image.size for image in opened))
        try:
            jobs = [loop.run_in_executor(self._pool, decode_opened, image, transform, min_side) for image in opened]
            return list(await asyncio.gather(*jobs))
        finally:
            opened.clear()  # the opened images hold the decoded pixels
            if pixels > TRIM_ABOVE_PIXELS:  # a large decode frees hundreds of MiB that glibc keeps resident
                await loop.run_in_executor(self._pool, trim_heap)

    def _open_all(self, images: Sequence[bytes], min_side: int) -> list[Image.Image]:
        opened = [open_image(data, self.max_pixels, min_side) for data in images]
        total = sum(w * h for w, h in (image.size for image in opened))
        if total > self.max_request_pixels:
            raise PayloadTooLarge(f"the request's {len(opened)} image(s) decode to {total} pixels; the limit per "
                                  f"request is {self.max_request_pixels} (RLRR_MAX_REQUEST_PIXELS)")
        return opened

    def close(self) -> None:
        """Stop the pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
