"""The server's parts in-process: size parsing, API keys and where a keyless server may
listen, image decoding limits, and the batching queue's admission, batching and dropping."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from detrkit.serving import (
    APIError,
    ApiKeyChecker,
    AuthConfigError,
    BatchingQueue,
    KeyBusy,
    QueueFull,
    ServeSettings,
    SettingsError,
    check_bind_address,
    load_api_keys,
    parse_byte_size,
    parse_count,
)
from detrkit.serving.limits import decode_image
from tests.serve_utils import REPO_ROOT, SERVE, SHAPES_TINY, png_bytes, png_claiming

FORMATS = ServeSettings().allowed_formats


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "text,value",
    [("20MB", 20_000_000), ("512KiB", 524_288), ("1.5MiB", 1_572_864), ("300", 300), (7, 7)],
)
def test_parse_byte_size(text, value):
    assert parse_byte_size(text) == value


@pytest.mark.parametrize("text,value", [("40M", 40_000_000), ("1.5k", 1500), ("12", 12)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["20XB", "", "-5MB", "0", "MB", "1e9"])
def test_parse_byte_size_rejects(text):
    with pytest.raises(SettingsError, match="max-image-bytes"):
        parse_byte_size(text, "max-image-bytes")


def test_settings_validate():
    with pytest.raises(SettingsError, match="max_queue=0"):
        ServeSettings(max_queue=0)
    with pytest.raises(SettingsError, match="request_timeout"):
        ServeSettings(request_timeout=0)
    settings = ServeSettings(max_batch_size=3)
    assert ServeSettings.from_dict(settings.to_dict()) == settings


# ----------------------------------------------------------------------------- keys
def test_load_api_keys_from_file_and_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\n  alpha-key  \nbeta-key\nalpha-key\n")
    path.chmod(0o600)
    keys = load_api_keys(str(path), {"DETRKIT_API_KEYS": "gamma, delta beta-key"})
    assert keys == ["alpha-key", "beta-key", "gamma", "delta"]
    assert load_api_keys(None, {}) == []
    with pytest.raises(AuthConfigError, match="cannot be read"):
        load_api_keys(str(tmp_path / "missing"), {})
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(AuthConfigError, match="holds no key"):
        load_api_keys(str(empty), {})
    with pytest.raises(AuthConfigError, match="unprintable"):
        load_api_keys(None, {"DETRKIT_API_KEYS": "ok,bad\x07key"})


def test_key_checker():
    keys = [os.urandom(12).hex() for _ in range(3)]
    checker = ApiKeyChecker(keys)
    ids = {checker.check(k) for k in keys}
    assert None not in ids and len(ids) == 3
    for wrong in ["", None, keys[0][:-1], keys[0] + "x", keys[1].upper(), " " + keys[2]]:
        assert checker.check(wrong) is None
    for key, key_id in zip(keys, [checker.check(k) for k in keys]):
        assert key not in key_id and len(key_id) == 8


@pytest.mark.parametrize(
    "host,have_keys,anonymous,insecure,error",
    [
        ("0.0.0.0", True, False, False, None),
        ("127.0.0.1", False, False, False, "no API key"),
        ("127.0.0.1", False, True, False, None),
        ("::1", False, True, False, None),
        ("localhost", False, True, False, None),
        ("0.0.0.0", False, True, False, "--insecure-bind"),
        ("192.168.1.5", False, True, False, "--insecure-bind"),
        ("0.0.0.0", False, True, True, None),
        ("127.0.0.1", True, True, False, "use one"),
    ],
)
def test_check_bind_address(host, have_keys, anonymous, insecure, error):
    if error is None:
        check_bind_address(host, have_keys, anonymous, insecure)
    else:
        with pytest.raises(AuthConfigError, match=error):
            check_bind_address(host, have_keys, anonymous, insecure)


def _serve_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "DETRKIT_API_KEYS"}
    environ.update({"PYTHONPATH": str(REPO_ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, str(SERVE), "--config-file", str(SHAPES_TINY), "--port", "0", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )


def test_cli_refuses_to_start_without_keys():
    result = _serve_cli()
    assert result.returncode == 2
    assert "no API key" in result.stderr and "listening" not in result.stderr
    result = _serve_cli("--allow-anonymous", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "--insecure-bind" in result.stderr and "listening" not in result.stderr
    result = _serve_cli("--api-key-file", "/nonexistent/keys")
    assert result.returncode == 2 and "/nonexistent/keys" in result.stderr


# ----------------------------------------------------------------------------- decoding
def _decode(data: bytes, max_pixels: int = 10**6, max_bytes: int = 10**6) -> Image.Image:
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=FORMATS)


def test_decode_applies_exif_orientation():
    rng = np.random.default_rng()
    upright = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    for orientation, stored in [
        (1, upright),
        (3, np.rot90(upright, 2)),
        (6, np.rot90(upright, 1)),
        (8, np.rot90(upright, -1)),
        (2, upright[:, ::-1]),
    ]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = _decode(png_bytes(np.ascontiguousarray(stored), exif))
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), upright)


def test_decode_limits_and_bad_files():
    ok = png_bytes(np.zeros((20, 30, 3), np.uint8))
    assert _decode(ok).size == (30, 20)
    cases = [
        (b"", 400),
        (b"not an image" + os.urandom(100), 400),
        (ok[: len(ok) // 2], 400),
        (png_claiming(50000, 50000), 413),
        (png_claiming(1001, 1000), 413),  # one row over max_pixels=10**6
        (png_claiming(1000, 1000), 400),  # within the limit, but its data is cut short
    ]
    for data, status in cases:
        with pytest.raises(APIError) as info:
            _decode(data)
        assert info.value.status == status, (data[:16], info.value.message)
    with pytest.raises(APIError) as info:
        _decode(ok, max_bytes=len(ok) - 1)
    assert info.value.status == 413


def test_decode_only_accepted_formats():
    """A format Pillow reads but the server does not accept (TGA here) is refused."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="TGA")
    with pytest.raises(APIError) as info:
        _decode(buffer.getvalue())
    assert info.value.status == 400 and "accepted format" in info.value.message


# ----------------------------------------------------------------------------- batching
def test_queue_admission_limits():
    queue = BatchingQueue(lambda xs: xs, max_batch_size=2, max_wait_s=0, max_queue=3, max_per_key=2)
    a1, a2 = queue.admit("a"), queue.admit("a")
    with pytest.raises(KeyBusy):
        queue.admit("a")
    b1 = queue.admit("b")
    with pytest.raises(QueueFull):
        queue.admit("c")
    assert queue.depth == 3
    a1.leave_queue()  # running: no longer queued, still in flight for its key
    assert queue.depth == 2
    with pytest.raises(KeyBusy):
        queue.admit("a")
    a1.release()
    a1.release()  # idempotent
    queue.admit("a")
    for admission in (a2, b1):
        admission.release()
    assert queue.depth == 1


def test_queue_batches_resolves_and_drops_cancelled():
    """While the worker is busy, requests pile up; they then run in batches of at most
    max_batch_size, each gets its own result, and one cancelled before its batch is never
    run."""
    gate = threading.Event()
    batches: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        if items[0] == 0:
            gate.wait(10)
        batches.append(list(items))
        return [x * 10 for x in items]

    dropped = []

    async def main():
        queue = BatchingQueue(
            run_batch, max_batch_size=3, max_wait_s=0.05, max_queue=16, on_drop=dropped.append
        )
        await queue.start()
        try:
            first = queue.submit(queue.admit(), 0)
            await asyncio.sleep(0.2)  # the worker now runs [0] and blocks
            futures = {i: queue.submit(queue.admit(), i) for i in range(1, 8)}
            futures[4].cancel()
            gate.set()
            assert await first == 0
            results = {i: await f for i, f in futures.items() if i != 4}
        finally:
            await queue.stop()
        return results

    results = asyncio.run(main())
    assert results == {i: i * 10 for i in (1, 2, 3, 5, 6, 7)}
    assert batches[0] == [0]
    assert all(1 <= len(b) <= 3 for b in batches)
    assert sorted(x for b in batches[1:] for x in b) == [1, 2, 3, 5, 6, 7]
    assert sum(dropped) == 1


def test_queue_failure_reaches_every_request_and_worker_survives():
    calls = []

    def run_batch(items):
        calls.append(items)
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def main():
        queue = BatchingQueue(run_batch, max_batch_size=4, max_wait_s=0.05, max_queue=8)
        await queue.start()
        try:
            futures = [queue.submit(queue.admit(), x) for x in ("bad", "x")]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            after = await queue.submit(queue.admit(), "y")
        finally:
            await queue.stop()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert after == "y"
