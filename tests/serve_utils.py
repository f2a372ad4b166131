"""Helpers of the server tests: a real `tools/serve.py` process on 127.0.0.1 with an ephemeral
port, raw-socket uploads (to control how and when a body is sent), and crafted images."""

from __future__ import annotations

import io
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE = REPO_ROOT / "tools" / "serve.py"
SHAPES_TINY = REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py"
HOST = "127.0.0.1"

# the tiny model, on the CPU, with few output boxes so that answers are small
TINY_OVERRIDES = ["train.device=cpu", "model.select_box_nums_for_evaluation=20"]


class ServerProcess:
    """`tools/serve.py ARGS` in a child process; `start` waits until /readyz answers 200."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 180.0, wait_ready: bool = True) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "DETRKIT_API_KEYS"}
        env.update(
            {
                "PYTHONPATH": str(REPO_ROOT),
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVE), "--host", HOST, "--port", "0", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.log_path.parent),
            )
        deadline = time.monotonic() + timeout
        marker = f"listening on http://{HOST}:"
        while self.port is None:
            text = self.log()
            if marker in text:
                self.port = int(text.split(marker, 1)[1].split()[0])
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start in {timeout} s:\n{text}")
            time.sleep(0.1)
        if wait_ready:
            self.wait_ready(deadline)
        return self

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server never became ready:\n{self.log()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metrics(self, headers: dict[str, str] | None = None) -> dict[tuple, float]:
        """{(sample name, sorted label items): value} of /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        response = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10)
        response.raise_for_status()
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (SIGKILL and an error after `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def metric(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """Sum of the samples `name` whose labels include `labels`."""
    total = 0.0
    for (sample, items), value in samples.items():
        if sample == name and all(dict(items).get(k) == v for k, v in labels.items()):
            total += value
    return total


# ----------------------------------------------------------------------------- images
def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 picture: noise plus a few flat rectangles."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)
    return image


def png_bytes(array: np.ndarray, exif: Image.Exif | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **({"exif": exif} if exif else {}))
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG prefix whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- raw HTTP
def multipart_head(port: int, length: int | None, boundary: str, key: str | None) -> bytes:
    lines = [
        "POST /v1/detections HTTP/1.1",
        f"Host: {HOST}:{port}",
        f"Content-Type: multipart/form-data; boundary={boundary}",
    ]
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def multipart_prefix(boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 answer (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full answer: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def send_until_answered(
    port: int, head: bytes, chunks: Iterable[bytes], timeout: float = 60.0
) -> tuple[int, bytes, int]:
    """Send `head`, then `chunks` for as long as the server has not answered; returns
    (status, body, body bytes sent). Never blocks on a send the server does not read."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(head)
        sent = 0
        pending = b""
        chunks = iter(chunks)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if not writable:
                continue
            if not pending:
                pending = next(chunks, b"")
                if not pending:
                    break
            try:
                n = sock.send(pending)
            except OSError:
                break
            sent += n
            pending = pending[n:]
        status, _, body = read_response(sock, timeout)
        return status, body, sent
