"""Prometheus metrics of a detection server, and the ASGI middleware that counts every answer.

Each app owns a registry (several apps in one process do not mix). When the environment names
`PROMETHEUS_MULTIPROC_DIR` (the server sets it for `--workers N`), the values live in files
there and `/metrics` adds up every worker process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["MetricsMiddleware", "ServeMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServeMetrics:
    """The server's metrics (names prefixed `detrkit_`):

    - `detrkit_http_requests_total{endpoint,method,status}`: answers by status.
    - `detrkit_http_request_duration_seconds{endpoint}`: latency histogram.
    - `detrkit_batch_size`: requests per inference batch (histogram).
    - `detrkit_batch_inference_seconds`: time per inference batch (histogram).
    - `detrkit_queue_depth`: requests admitted and not yet running.
    - `detrkit_images_total`: images answered with detections.
    - `detrkit_dropped_requests_total`: dropped before inference (client gone or timed out).
    - `detrkit_ready`: 1 once the model is loaded and warmed up.
    """

    def __init__(self, max_batch_size: int = 8) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        multiprocess = _multiprocess_dir() is not None
        reg = self.registry
        self.requests = Counter(
            "detrkit_http_requests",
            "HTTP requests answered, by endpoint, method and status code",
            ["endpoint", "method", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "detrkit_http_request_duration_seconds",
            "time from the request's arrival to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size})
        self.batch_size = Histogram(
            "detrkit_batch_size",
            "requests per inference batch",
            buckets=[s for s in sizes if s <= max_batch_size],
            registry=reg,
        )
        self.batch_seconds = Histogram(
            "detrkit_batch_inference_seconds",
            "time per inference batch",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        gauge_mode = {"multiprocess_mode": "livesum"} if multiprocess else {}
        self.queue_depth = Gauge(
            "detrkit_queue_depth",
            "detection requests admitted and not yet in a running batch",
            registry=reg,
            **gauge_mode,
        )
        self.ready = Gauge(
            "detrkit_ready",
            "1 when the model is loaded and warmed up",
            registry=reg,
            **({"multiprocess_mode": "livemin"} if multiprocess else {}),
        )
        self.images = Counter("detrkit_images", "images answered with detections", registry=reg)
        self.dropped = Counter(
            "detrkit_dropped_requests",
            "detection requests dropped before inference (client gone or timed out)",
            registry=reg,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type; across worker processes in multiprocess
        mode."""
        path = _multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST


Scope = dict[str, Any]


class MetricsMiddleware:
    """Counts every HTTP answer by endpoint and status and times it. The endpoint label is the
    route's path for known routes and "other" for the rest (bounded label values). A request
    that ends without an answer (the client went away) counts as status 499."""

    def __init__(
        self, app: Callable, metrics: ServeMetrics, endpoint_of: Callable[[str], str]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoint_of = endpoint_of

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 499}

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            status["code"] = 500
            raise
        finally:
            endpoint = self.endpoint_of(scope.get("path", ""))
            self.metrics.requests.labels(endpoint, scope.get("method", ""), status["code"]).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def endpoint_labeller(paths: Iterable[str]) -> Callable[[str], str]:
    """path -> itself when it is one of `paths`, "/v1/models/{model}" for model paths, else
    "other"."""
    known = set(paths)

    def endpoint_of(path: str) -> str:
        if path in known:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return "other"

    return endpoint_of
