"""Limits on what a client may send: a body read with a byte limit, and images decoded only
after their header's pixel count is checked (decompression bombs).

Every way an upload can be malformed ends in an `APIError` (400 undecodable, 413 too large),
never in an unhandled exception.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from PIL import Image, ImageOps

from .errors import APIError

__all__ = ["LimitedReceive", "decode_image", "set_pillow_pixel_limit"]

logger = logging.getLogger(__name__)

Message = dict[str, Any]


class LimitedReceive:
    """An ASGI `receive` that counts the body bytes it passes on and raises 413 as soon as they
    exceed `limit`, so that an oversized upload is never buffered whole."""

    def __init__(self, receive: Callable[[], Awaitable[Message]], limit: int, what: str) -> None:
        self._receive = receive
        self.limit = limit
        self.what = what
        self.received = 0

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise APIError(
                    413,
                    f"request body exceeds {self.limit} bytes ({self.what})",
                    "body_too_large",
                )
        return message


def set_pillow_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb guard agree with the server's limit (it warns above
    `Image.MAX_IMAGE_PIXELS` and raises above twice that)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def _too_many_pixels(width: int, height: int, max_pixels: int) -> APIError:
    return APIError(
        413,
        f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
        "pixels (server flag --max-pixels)",
        "image_too_large",
    )


def decode_image(
    data: bytes, *, max_pixels: int, max_bytes: int, formats: Sequence[str]
) -> Image.Image:
    """Encoded bytes -> a fully decoded PIL image with its EXIF orientation applied.

    The file size and the pixel count in the header are checked before anything is decoded;
    only `formats` (Pillow format names) are tried. Raises APIError 400 for empty, unknown,
    truncated or corrupt files and 413 for too many bytes or pixels.
    """
    if len(data) > max_bytes:
        raise APIError(
            413,
            f"image is {len(data)} bytes; the limit is {max_bytes} bytes (server flag "
            "--max-image-bytes)",
            "image_too_large",
        )
    if not data:
        raise APIError(400, "the image is empty (0 bytes)", "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(formats))
            width, height = image.size  # from the header; nothing decoded yet
            if width * height > max_pixels:
                raise _too_many_pixels(width, height, max_pixels)
            if width < 1 or height < 1:
                raise APIError(400, f"image is {width}x{height} pixels", "invalid_image")
            image.load()  # decode now: truncated or corrupt data fails here
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(
            413, f"image exceeds the limit of {max_pixels} pixels", "image_too_large"
        ) from None
    except Image.UnidentifiedImageError:
        raise APIError(
            400,
            f"the upload is not an image in an accepted format ({', '.join(formats)})",
            "invalid_image",
        ) from None
    except Exception as e:  # truncated, corrupt: Pillow raises OSError, SyntaxError, ValueError...
        logger.debug("image decoding failed: %r", e)
        raise APIError(
            400, "the image could not be decoded (truncated or corrupt)", "invalid_image"
        ) from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # an unreadable EXIF block leaves a readable image as it is
        logger.debug("ignoring unreadable EXIF data: %r", e)
        return image
