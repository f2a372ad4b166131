#!/usr/bin/env python
"""Serve a detector over HTTP: an authenticated, bounded, batching inference server.

    python tools/serve.py --config-file CFG.py --api-key-file keys.txt \
        [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] [--max-wait-ms 10] \
        [--max-queue 64] [--max-image-bytes 20MB] [--max-pixels 40M] [key=value ...]

The model is loaded as `DefaultPredictor` loads it (`model`, `train.init_checkpoint`,
`train.device`, the test-time resize of `dataloader.test.mapper`). The API is described in
detrkit/serving/app.py and at /openapi.json. Needs the serve extra: pip install '.[serve]'.
"""

from __future__ import annotations

import argparse
import os
import sys

# `projects.*` (model code referenced by the configs) lives beside tools/ in the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPILOG = """
Examples:

Serve with keys from a file (one a line) on all interfaces, behind a load balancer:
    $ tools/serve.py --config-file cfg.py --api-key-file /etc/detrkit/keys --host 0.0.0.0 \\
        train.init_checkpoint=model_final.pth train.device=cuda

Try it on this machine without keys:
    $ tools/serve.py --config-file cfg.py --allow-anonymous train.init_checkpoint=model.pth

    $ curl -H "Authorization: Bearer $KEY" -F image=@photo.jpg http://127.0.0.1:8000/v1/detections

Keys can also come from $DETRKIT_API_KEYS (comma separated). Without any key the server refuses
to start unless --allow-anonymous is given, and then only on a loopback host unless
--insecure-bind is also given.
"""


def _number(kind: type, low: float, strict: bool = False, unit: str = ""):
    """An argparse type: a `kind` (int or float) >= `low` (> `low` when `strict`)."""
    bound = f"{'>' if strict else '>='} {low:g}"
    accepted = f"expected {'an integer' if kind is int else 'a number'}{unit} {bound}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"{accepted}, got {text!r}")
        return value

    return parse


def _size(parser):
    def parse(text: str) -> int:
        try:
            return parser(text, "value")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value: ")) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    from detrkit.serving.settings import parse_byte_size, parse_count

    parser = argparse.ArgumentParser(
        description="Serve a detector over HTTP (OpenAI-style API, API keys, batching, metrics).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a model config")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=_number(int, 0), default=8000, help="port (default 8000; 0 = any free)"
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="accepted API keys, one a line (also: $DETRKIT_API_KEYS, comma separated)",
    )
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve without API keys (only on a loopback --host unless --insecure-bind)",
    )
    parser.add_argument(
        "--insecure-bind",
        action="store_true",
        help="with --allow-anonymous: listen on a non-loopback host anyway",
    )
    parser.add_argument(
        "--max-batch-size",
        type=_number(int, 1),
        default=8,
        help="most requests run as one batch (default 8; 1 turns batching off)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=_number(float, 0),
        default=10.0,
        help="longest wait for a batch to fill (default 10)",
    )
    parser.add_argument(
        "--max-queue",
        type=_number(int, 1),
        default=64,
        help="most requests waiting (uploading, decoding or queued); more are answered 503 at "
        "once (default 64)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=_size(parse_byte_size),
        default="20MB",
        help="largest image file accepted, e.g. 20MB, 512KiB (default 20MB)",
    )
    parser.add_argument(
        "--max-pixels",
        type=_size(parse_count),
        default="40M",
        help="largest width x height accepted, read from the header before decoding (default 40M)",
    )
    parser.add_argument(
        "--request-timeout",
        type=_number(float, 0, strict=True, unit=" of seconds"),
        default=30.0,
        help="seconds a detection request may take in all: upload, queue, inference (default 30)",
    )
    parser.add_argument(
        "--max-inflight-per-key",
        type=_number(int, 0),
        default=0,
        help="most requests one API key may have in flight; more are answered 429 "
        "(default 0 = no per-key limit)",
    )
    parser.add_argument(
        "--workers",
        type=_number(int, 1),
        default=1,
        help="server processes sharing the port, each with its own model (default 1)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default info",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.init_checkpoint=model.pth train.device=cuda",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for item in args.opts:
        if item.startswith("-"):
            parser.error(f"argument {item!r} comes after the config overrides; put flags first")
    try:
        from detrkit.serving.auth import AuthConfigError
        from detrkit.serving.server import ServeError, ServerOptions, serve
        from detrkit.serving.settings import ServeSettings, SettingsError
    except ImportError as e:
        print(f"serve.py: {e}", file=sys.stderr)
        return 2

    try:
        options = ServerOptions(
            config_file=args.config_file,
            overrides=list(args.opts),
            host=args.host,
            port=args.port,
            api_key_file=args.api_key_file,
            allow_anonymous=args.allow_anonymous,
            insecure_bind=args.insecure_bind,
            workers=args.workers,
            log_level=args.log_level,
            settings=ServeSettings(
                max_batch_size=args.max_batch_size,
                max_wait_ms=args.max_wait_ms,
                max_queue=args.max_queue,
                max_image_bytes=args.max_image_bytes,
                max_pixels=args.max_pixels,
                request_timeout=args.request_timeout,
                max_inflight_per_key=args.max_inflight_per_key,
            ),
        )
        return serve(options)
    except (AuthConfigError, ServeError, SettingsError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # config and checkpoint errors name the key or file at fault (torch is imported by
        # then; the checks above run without it, so a refusal to start is quick)
        from detrkit.checkpoint import CheckpointError
        from detrkit.config import ConfigError

        if isinstance(e, ConfigError | CheckpointError | FileNotFoundError):
            print(f"serve.py: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
