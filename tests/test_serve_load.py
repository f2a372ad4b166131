"""The server under load and on SIGTERM, as a real process: with a queue smaller than the
number of concurrent clients every request is answered 200 or 503 (none lost, none 500),
memory stays bounded and the metrics add up; SIGTERM lets every request in flight finish and
the process exits 0."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from detrkit.serving.schemas import DetectionResponse
from tests.serve_utils import (
    HOST,
    SHAPES_TINY,
    TINY_OVERRIDES,
    ServerProcess,
    metric,
    multipart_head,
    multipart_prefix,
    png_bytes,
    random_image,
    read_response,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def start_server(tmp_path, key: str, *flags: str) -> ServerProcess:
    return ServerProcess(
        [
            "--config-file",
            str(SHAPES_TINY),
            *flags,
            *TINY_OVERRIDES,
            "train.init_checkpoint=",
        ],
        tmp_path / "server.log",
        env={"DETRKIT_API_KEYS": key},
    ).start()


async def _load(url: str, key: str, images: list[bytes], total: int, concurrency: int):
    """`total` requests from `concurrency` clients in a closed loop; the status of each, or
    the exception it ended with."""
    outcomes: list = []
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            try:
                response = await http.post(
                    f"{url}/v1/detections",
                    files={"image": ("x.png", images[i % len(images)], "image/png")},
                )
                if response.status_code == 200:
                    DetectionResponse.model_validate(response.json())
                outcomes.append(response.status_code)
            except Exception as e:  # a lost request: counted, and the test fails
                outcomes.append(e)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return outcomes


@pytest.mark.slow
def test_bounded_load(tmp_path):
    key = secrets.token_urlsafe(16)
    max_queue, max_batch, concurrency, total = 8, 4, 32, 200
    server = start_server(
        tmp_path,
        key,
        "--max-queue",
        str(max_queue),
        "--max-batch-size",
        str(max_batch),
        "--max-wait-ms",
        "10",
    )
    try:
        rng = np.random.default_rng()
        images = [png_bytes(random_image(rng, 96 + 8 * i, 128)) for i in range(8)]
        headers = {"Authorization": f"Bearer {key}"}
        for data in images:  # allocator and caches settle before the baseline
            files = {"image": ("x.png", data, "image/png")}
            httpx.post(f"{server.url}/v1/detections", headers=headers, files=files, timeout=60)
        rss_before = server.rss_bytes()
        before = server.metrics(headers)

        peak = [rss_before]
        done = threading.Event()

        def sample_rss() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], server.rss_bytes())

        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        try:
            outcomes = asyncio.run(_load(server.url, key, images, total, concurrency))
        finally:
            done.set()
            sampler.join()
        after = server.metrics(headers)
        rss_after = server.rss_bytes()
    finally:
        code = server.terminate()
    assert code == 0, server.log()

    lost = [o for o in outcomes if not isinstance(o, int)]
    assert not lost, lost[:3]
    assert len(outcomes) == total
    ok, busy = outcomes.count(200), outcomes.count(503)
    assert ok + busy == total, sorted(set(outcomes))
    assert ok > 0 and busy > 0, (ok, busy)  # the queue was smaller than the concurrency

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    endpoint = "/v1/detections"
    assert delta("detrkit_http_requests_total", endpoint=endpoint) == total
    assert delta("detrkit_http_requests_total", endpoint=endpoint, status="200") == ok
    assert delta("detrkit_http_requests_total", endpoint=endpoint, status="503") == busy
    assert delta("detrkit_http_request_duration_seconds_count", endpoint=endpoint) == total
    assert delta("detrkit_images_total") == ok
    assert delta("detrkit_batch_size_sum") == ok  # every answered image ran in one batch
    batches = delta("detrkit_batch_size_count")
    assert batches < ok  # batching happened under load
    assert delta("detrkit_batch_size_bucket", le=f"{float(max_batch)}") == batches
    assert metric(after, "detrkit_queue_depth") == 0
    growth = max(peak[0], rss_after) - rss_before
    print(
        f"\nload: {ok} x 200, {busy} x 503, {batches:.0f} batches; RSS {rss_before / 2**20:.0f}"
        f" MiB before, peak {peak[0] / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB"
    )
    assert growth < 100 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"


def test_sigterm_finishes_requests_in_flight(tmp_path):
    """Six uploads are in flight (their bodies half sent) when SIGTERM arrives: the server
    stops accepting connections, then answers all six once their bodies arrive, and exits 0."""
    key = secrets.token_urlsafe(16)
    server = start_server(tmp_path, key, "--max-batch-size", "4", "--request-timeout", "60")
    rng = np.random.default_rng()
    boundary = "sigterm"
    bodies = []
    for i in range(6):
        data = png_bytes(random_image(rng, 90 + 10 * i, 120))
        bodies.append(multipart_prefix(boundary) + data + f"\r\n--{boundary}--\r\n".encode())
    socks = []
    try:
        for body in bodies:
            sock = socket.create_connection((HOST, server.port), timeout=60)
            sock.sendall(multipart_head(server.port, len(body), boundary, key))
            sock.sendall(body[: len(body) // 2])
            socks.append(sock)
        deadline = time.monotonic() + 30
        headers = {"Authorization": f"Bearer {key}"}
        while metric(server.metrics(headers), "detrkit_queue_depth") != len(bodies):
            assert time.monotonic() < deadline, "the uploads were never admitted"
            time.sleep(0.05)

        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the listening socket closes while the six are still open
            try:
                httpx.get(f"{server.url}/healthz", timeout=2)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        assert server.proc.poll() is None

        for sock, body in zip(socks, bodies):
            sock.sendall(body[len(body) // 2 :])
        for sock in socks:
            status, _, answer = read_response(sock)
            assert status == 200, answer
            DetectionResponse.model_validate_json(answer)
    finally:
        for sock in socks:
            sock.close()
        code = server.proc.wait(60) if server.proc.poll() is None else server.proc.returncode
        server.kill()
    assert code == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_workers_share_the_port_and_metrics(tmp_path):
    """--workers 2: two processes answer on one port, /metrics adds up both, SIGTERM stops
    all of them with status 0."""
    key = secrets.token_urlsafe(16)
    server = start_server(tmp_path, key, "--workers", "2")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        data = png_bytes(random_image(np.random.default_rng(), 80, 100))
        total = 12
        for _ in range(total):  # a new connection each: the kernel spreads them over workers
            files = {"image": ("x.png", data, "image/png")}
            response = httpx.post(
                f"{server.url}/v1/detections", headers=headers, files=files, timeout=60
            )
            assert response.status_code == 200, response.text
        samples = server.metrics(headers)
    finally:
        code = server.terminate()
    assert code == 0, server.log()
    assert metric(samples, "detrkit_images_total") == total
    assert server.log().count("warm-up inference done") == 2


@pytest.mark.slow
def test_slow_upload_is_answered_408_and_its_place_freed(tmp_path):
    """An upload whose body does not arrive within --request-timeout is answered 408 and
    gives its queue place back."""
    key = secrets.token_urlsafe(16)
    server = start_server(tmp_path, key, "--request-timeout", "2", "--max-queue", "1")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with socket.create_connection((HOST, server.port), timeout=60) as sock:
            sock.sendall(multipart_head(server.port, 10_000, "slow", key))
            sock.sendall(multipart_prefix("slow"))
            status, _, body = read_response(sock)  # nothing more is sent
        assert status == 408, body
        assert b'"request_timeout"' in body
        assert metric(server.metrics(headers), "detrkit_queue_depth") == 0
        data = png_bytes(random_image(np.random.default_rng(), 64, 64))
        files = {"image": ("x.png", data, "image/png")}
        response = httpx.post(
            f"{server.url}/v1/detections", headers=headers, files=files, timeout=60
        )
        assert response.status_code == 200, response.text
    finally:
        code = server.terminate()
    assert code == 0, server.log()
