"""The detection server under closed-loop load: latency and throughput with batching on and off.

For each model config it starts `tools/serve.py` twice on 127.0.0.1 (batching on:
--max-batch-size 8 --max-wait-ms 10; off: --max-batch-size 1 --max-wait-ms 0) and, at each
concurrency C, runs C clients that each send the next request as soon as the previous one is
answered (a closed loop), multipart uploads of one 640x480 JPEG. It reports p50 / p99 latency
as the clients see it, images/s, the on/off ratio, and the cost of 1000 images at a price per
core-hour (the server's cores, all of them, for the time the images take at the best
throughput measured).

Models (random weights; speed does not depend on them): the tiny shapes config (test resize
160 px short side) and the multi-scale R-50 (800 px short side, max 1333). The R-50 is heavy
on a CPU, so it runs last with few requests (--r50-requests).

    python benchmarks/serve.py                      # tiny, then R-50, concurrency 1 4 16
    python benchmarks/serve.py --models tiny --requests 96
    python benchmarks/serve.py --price-per-core-hour 0.05 --json out.json

The client runs on the same machine as the server and takes some of its CPU; on a shared
machine the numbers move with the other load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": ("projects/deformable_detr/configs/shapes_tiny.py", ["train.device=cpu"]),
    "r50": ("projects/deformable_detr/configs/deformable_detr_r50_50ep.py", ["train.device=cpu"]),
}
MODES = {
    "off": ["--max-batch-size", "1", "--max-wait-ms", "0"],
    "on": ["--max-batch-size", "8", "--max-wait-ms", "10"],
}
# AWS c7i.large on-demand, us-east-1: $0.08925 per hour for 2 vCPUs
DEFAULT_PRICE = 0.08925 / 2
MARKETPLACE_PER_1000 = 0.047


class Server:
    """`tools/serve.py` in a child process on an ephemeral loopback port."""

    def __init__(self, config: str, overrides: list[str], flags: list[str], threads: int):
        self.key = secrets.token_urlsafe(16)
        fd, self.log_path = tempfile.mkstemp(prefix="detrkit-bench-", suffix=".log")
        os.close(fd)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": str(threads),
            "DETRKIT_API_KEYS": self.key,
        }
        command = [sys.executable, str(ROOT / "tools" / "serve.py"), "--config-file", config]
        command += ["--port", "0", "--max-queue", "256", "--request-timeout", "3600"]
        command += ["--log-level", "warning", *flags]
        command += [*overrides, "train.init_checkpoint="]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready(timeout=600)

    def _text(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self._text()}")
            text = self._text()
            if url is None and "listening on " in text:
                url = text.split("listening on ", 1)[1].split()[0]
            if url is not None:
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self._text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log_path)


async def closed_loop(url: str, key: str, image: bytes, clients: int, total: int) -> dict:
    """`clients` clients sharing `total` requests; latencies of the answered ones."""
    latencies: list[float] = []
    failures: list[str] = []
    todo = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for _ in todo:
            start = time.perf_counter()
            response = await http.post(
                f"{url}/v1/detections", files={"image": ("photo.jpg", image, "image/jpeg")}
            )
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures.append(f"{response.status_code}: {response.text[:100]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=3600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    ordered = sorted(latencies)
    p99_index = min(len(ordered) - 1, int(np.ceil(0.99 * len(ordered))) - 1)
    return {
        "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[p99_index],
        "images_per_s": len(latencies) / wall,
    }


def test_image() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run(args) -> list[dict]:
    image = test_image()
    rows = []
    for name in args.models:
        config, overrides = CONFIGS[name]
        for mode, flags in MODES.items():
            server = Server(config, overrides, flags, args.threads)
            try:
                for clients in args.concurrency:
                    if name == "r50":
                        total = max(clients, args.r50_requests)
                    else:
                        total = max(args.requests, 2 * clients)
                        asyncio.run(closed_loop(server.url, server.key, image, clients, clients))
                    result = asyncio.run(closed_loop(server.url, server.key, image, clients, total))
                    rows.append({"model": name, "batching": mode, "concurrency": clients, **result})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                server.stop()
    return rows


def report(rows: list[dict], args) -> str:
    cores = args.threads
    lines = [
        f"server: {cores} torch thread(s) on a {os.cpu_count()}-core CPU; price "
        f"${args.price_per_core_hour:.4f} per core-hour x {cores} core(s)",
        "",
        "| model | concurrency | batching off: p50 / p99 ms, img/s | batching on: p50 / p99 ms,"
        " img/s | on/off img/s | $ per 1000 images (best) |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(r["model"], r["concurrency"], r["batching"]): r for r in rows}
    for model in args.models:
        for clients in args.concurrency:
            off, on = by_key[(model, clients, "off")], by_key[(model, clients, "on")]
            best = max(off["images_per_s"], on["images_per_s"])
            cost = 1000 / best / 3600 * cores * args.price_per_core_hour
            lines.append(
                f"| {model} | {clients} | {off['p50_ms']:.0f} / {off['p99_ms']:.0f}, "
                f"{off['images_per_s']:.2f} | {on['p50_ms']:.0f} / {on['p99_ms']:.0f}, "
                f"{on['images_per_s']:.2f} | {on['images_per_s'] / off['images_per_s']:.2f}x "
                f"| ${cost:.4f} |"
            )
    lines.append("")
    lines.append(f"marketplace estimate: ${MARKETPLACE_PER_1000} per 1000 images")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["tiny", "r50"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="measured requests per tiny level")
    parser.add_argument(
        "--r50-requests",
        type=int,
        default=2,
        help="measured R-50 requests per level (at least the concurrency)",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="server torch threads"
    )
    parser.add_argument(
        "--price-per-core-hour",
        type=float,
        default=DEFAULT_PRICE,
        help=f"$ per core-hour (default {DEFAULT_PRICE:.5f}: AWS c7i.large on-demand, "
        "us-east-1, $0.08925/h for 2 vCPUs)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(report(rows, args))


if __name__ == "__main__":
    main()
