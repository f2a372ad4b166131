"""What a detection server is configured with, and the parsers of its human-sized values
("20MB", "40M")."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

__all__ = ["ServeSettings", "SettingsError", "parse_byte_size", "parse_count"]


class SettingsError(ValueError):
    """A server setting is out of range or unreadable; the message names it."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_BYTE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def _parse(text: str | int, units: dict[str, int], what: str, accepted: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in units:
            raise SettingsError(f"{what}: cannot read {text!r}; accepted: {accepted}")
        value = int(float(match.group(1)) * units[unit])
    if value < 1:
        raise SettingsError(f"{what}: {text!r} must be at least 1")
    return value


def parse_byte_size(text: str | int, what: str = "size") -> int:
    """'20MB' -> 20_000_000 (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024; a bare number is
    bytes)."""
    return _parse(text, _BYTE_UNITS, what, "a number of bytes with B, KB, MB, GB, KiB, MiB or GiB")


def parse_count(text: str | int, what: str = "count") -> int:
    """'40M' -> 40_000_000 (K, M, G are powers of 1000)."""
    return _parse(text, _COUNT_UNITS, what, "a number, optionally with K, M or G (x1000)")


@dataclass
class ServeSettings:
    """Everything the app and its batching worker are configured with (not the model).

    Attributes:
        max_batch_size: most requests run together in one forward pass (1 = no batching).
        max_wait_ms: how long the worker waits for a batch to fill once it holds one request.
        max_queue: most detection requests admitted and not yet in a running batch (receiving,
            decoding or waiting); one more is answered 503 at once. Bounds the memory.
        max_image_bytes: largest image file accepted (the request body may carry it base64
            encoded, 4/3 larger); counted while the body is read.
        max_pixels: largest width x height accepted, read from the image header before decoding.
        request_timeout: seconds a detection request may take in all (upload, queue, inference).
        max_inflight_per_key: most detection requests one API key may have admitted at once
            (429 beyond it); 0 = no per-key limit.
        decode_threads: threads decoding and resizing images beside the inference worker.
        default_score_threshold / default_max_detections: used when a request does not say.
    """

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_image_bytes: int = 20 * 10**6
    max_pixels: int = 40 * 10**6
    request_timeout: float = 30.0
    max_inflight_per_key: int = 0
    decode_threads: int = 2
    default_score_threshold: float = 0.5
    default_max_detections: int = 100
    allowed_formats: tuple[str, ...] = field(
        default=("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes MPO
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """One-line SettingsError naming the first setting out of range."""
        positive_ints = ("max_batch_size", "max_queue", "max_image_bytes", "max_pixels")
        for name in (*positive_ints, "decode_threads", "default_max_detections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}={value!r}: expected an integer >= 1")
        if self.max_inflight_per_key < 0:
            raise SettingsError(
                f"max_inflight_per_key={self.max_inflight_per_key!r}: expected an integer >= 0 "
                "(0 = no per-key limit)"
            )
        if not self.max_wait_ms >= 0:
            raise SettingsError(f"max_wait_ms={self.max_wait_ms!r}: expected a number >= 0")
        if not self.request_timeout > 0:
            raise SettingsError(
                f"request_timeout={self.request_timeout!r}: expected a number of seconds > 0"
            )
        from PIL import Image

        Image.init()
        unknown = [f for f in self.allowed_formats if f not in Image.OPEN]
        if unknown or not self.allowed_formats:
            raise SettingsError(
                f"allowed_formats: {unknown or '(none)'} are not formats Pillow opens here; "
                f"accepted: {', '.join(sorted(Image.OPEN))}"
            )
        if not 0.0 <= self.default_score_threshold <= 1.0:
            raise SettingsError(
                f"default_score_threshold={self.default_score_threshold!r}: expected 0..1"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ServeSettings:
        values = dict(values)
        if "allowed_formats" in values:
            values["allowed_formats"] = tuple(values["allowed_formats"])
        return cls(**values)
