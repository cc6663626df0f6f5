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
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from app.errors import AppError, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from app.runtime import trim_heap

Transform = Callable[[Image.Image], torch.Tensor]
T = TypeVar("T")
# MPO: the multi-picture JPEG phones write (its first picture is a plain JPEG, decoded as one).
FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16/32-bit grey: scaled to 8 bits, not clipped


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
    resized = resized_pixels(width, height, min_side)
    if resized > max_pixels:
        raise PayloadTooLarge(
            f"image of {width}x{height} pixels (aspect ratio {max(width, height) / max(min(width, height), 1):.0f}:1) "
            f"would be resized to {resized} pixels before the center crop (shorter side to {min_side}); "
            f"the limit is {max_pixels}: crop it nearer to the shape the model sees")
    if image.format in ("JPEG", "MPO") and min_side > 0:
        try:
            image.draft("RGB", (min_side, min_side))
        except Exception as exc:
            raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc
    return image


def resized_pixels(width: int, height: int, min_side: int) -> int:
    """Pixels of the image the transform's resize makes (shorter side to `min_side`, aspect kept):
    the work a decode commits to, known from the header. An extreme aspect ratio makes it far more
    than the decoded pixels (1 x 250,000 -> 248 x 62,000,000).

    Args:
        width: Image width.
        height: Image height.
        min_side: The transform's resize side (see `scale_size`); 0: no resize.
    """
    short, long = min(width, height), max(width, height)
    if min_side <= 0 or short <= 0:
        return width * height
    return min_side * math.ceil(long * min_side / short)


def request_pixels(image: Image.Image, min_side: int) -> int:
    """What one opened image costs a request's pixel budget: its decoded or its resized pixels, the larger.

    Args:
        image: An image from `open_image` (its size is the decoded size).
        min_side: The transform's resize side.
    """
    width, height = image.size
    return max(width * height, resized_pixels(width, height, min_side))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow decodes (palette, 1-bit, 16-bit grey, CMYK, with alpha...) as 8-bit RGB.

    Args:
        image: A loaded image.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:  # `convert` would clip 0..65535 to 0..255: keep the high byte instead
        grey = np.asarray(image)
        if grey.max(initial=0) > 255:
            grey = np.clip(grey, 0, 65535).astype(np.uint16) >> 8
        info, image = image.info, Image.fromarray(grey.astype(np.uint8))
        image.info = dict(info)  # EXIF orientation still applies
    return image.convert("RGB")


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
            rgb = to_rgb(image)  # before `reduce`, which knows only a few modes (not P, 1 or I;16)
            factor = min(rgb.size) // (2 * min_side) if min_side > 0 else 1
            if factor >= 2:
                rgb = rgb.reduce(factor)
            rgb = ImageOps.exif_transpose(rgb)
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


def _nth(index: int, count: int, fn: Callable[..., T], *args: Any) -> T:
    # A request of several images: a refusal says which one (counting from 0, the order sent).
    try:
        return fn(*args)
    except AppError as exc:
        if count > 1:
            exc.detail = f"image {index} (of {count}, counting from 0): {exc.detail}"
            exc.args = (exc.detail,)
        raise


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
        pixels = sum(request_pixels(image, min_side) for image in opened)
        try:
            jobs = [loop.run_in_executor(self._pool, _nth, i, len(opened), decode_opened, image, transform, min_side)
                    for i, image in enumerate(opened)]
            return list(await asyncio.gather(*jobs))
        finally:
            opened.clear()  # the opened images hold the decoded pixels
            if pixels > TRIM_ABOVE_PIXELS:  # a large decode frees hundreds of MiB that glibc keeps resident
                await loop.run_in_executor(self._pool, trim_heap)

    def _open_all(self, images: Sequence[bytes], min_side: int) -> list[Image.Image]:
        opened = [_nth(i, len(images), open_image, data, self.max_pixels, min_side) for i, data in enumerate(images)]
        total = sum(request_pixels(image, min_side) for image in opened)
        if total > self.max_request_pixels:
            raise PayloadTooLarge(f"the request's {len(opened)} image(s) decode to {total} pixels (each counted "
                                  f"at its decoded or resized size, the larger); the limit per request is "
                                  f"{self.max_request_pixels} (RLRR_MAX_REQUEST_PIXELS)")
        return opened

    def close(self) -> None:
        """Stop the pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
