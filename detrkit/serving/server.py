"""Running a detection server: the model from a config, the keys, the listening socket, and
uvicorn with one process or several (`--workers N`) sharing that socket.

`serve(options)` is what `tools/serve.py` runs. With one worker the model is loaded before the
port starts listening (a broken config or checkpoint fails at once, with a one-line error); with
several, each worker process loads its own copy (`app_from_environment`, which reads the options
from `$DETRKIT_SERVE_OPTIONS`; keys are re-read from their file or variable, never passed on).

SIGTERM (and Ctrl-C) stop the server gracefully: it stops accepting connections, answers the
requests it holds, and the process exits with status 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .auth import check_bind_address, load_api_keys
from .settings import ServeSettings

__all__ = ["ServeError", "ServerOptions", "app_from_environment", "load_backend", "serve"]

logger = logging.getLogger("detrkit.serve")
OPTIONS_ENV = "DETRKIT_SERVE_OPTIONS"


class ServeError(RuntimeError):
    """The server cannot start as asked; the message says why and what to change."""


@dataclass
class ServerOptions:
    """Everything `serve` needs: where to listen, the model's config, keys and limits."""

    config_file: str
    overrides: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: str | None = None
    allow_anonymous: bool = False
    insecure_bind: bool = False
    workers: int = 1
    log_level: str = "info"
    settings: ServeSettings = field(default_factory=ServeSettings)

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str) -> ServerOptions:
        values = json.loads(text)
        values["settings"] = ServeSettings.from_dict(values["settings"])
        return cls(**values)


def configure_logging(level: str) -> None:
    """One line per record on stderr for detrkit's loggers (uvicorn configures its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("detrkit")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    projects = logging.getLogger("projects")
    projects.handlers[:] = [handler]
    projects.setLevel(level.upper())


def load_backend(config_file: str, overrides: list[str]) -> Any:
    """`PredictorBackend` for a config file with `KEY=VALUE` overrides applied."""
    from detrkit.config import LazyConfig

    from .backend import PredictorBackend

    if not os.path.isfile(config_file):
        raise ServeError(f"--config-file {config_file}: no such file")
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    return PredictorBackend.from_config(cfg, config_file)


def _build_app(options: ServerOptions, keys: list[str]) -> Any:
    from .app import create_app

    backend = load_backend(options.config_file, options.overrides)
    return create_app(backend, options.settings, keys or None)


def app_from_environment() -> Any:
    """The app of one worker process of `--workers N` (a uvicorn factory)."""
    options = ServerOptions.from_json(os.environ[OPTIONS_ENV])
    configure_logging(options.log_level)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # the workers share the machine's cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.workers))
    try:
        keys = load_api_keys(options.api_key_file)
        return _build_app(options, keys)
    except Exception as e:
        from uvicorn.config import STARTUP_FAILURE

        # this exit status makes the supervisor stop instead of restarting the worker forever
        logger.error("worker %d cannot start: %s", os.getpid(), e)
        sys.exit(STARTUP_FAILURE)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ServeError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
            "choose another --port, or stop what uses it"
        ) from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, options: ServerOptions, **kwargs: Any) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        # in-flight requests get their own timeout (and a little more) to finish on SIGTERM
        timeout_graceful_shutdown=int(options.settings.request_timeout) + 5,
        server_header=False,
        proxy_headers=False,
        **kwargs,
    )


def serve(options: ServerOptions) -> int:
    """Start the server and block until it is stopped; the exit status (0 after a graceful
    stop)."""
    configure_logging(options.log_level)
    if not os.path.isfile(options.config_file):
        raise ServeError(f"--config-file {options.config_file}: no such file")
    keys = load_api_keys(options.api_key_file)
    check_bind_address(options.host, bool(keys), options.allow_anonymous, options.insecure_bind)
    if keys:
        logger.info("authentication: %d API key(s)", len(keys))
    else:
        logger.warning(
            "authentication: none (--allow-anonymous); anyone reaching %s is served", options.host
        )
    sock = _bind(options.host, options.port)
    try:
        if options.workers == 1:
            return _serve_one(options, keys, sock)
        return _serve_many(options, sock)
    finally:
        sock.close()


def _announce(options: ServerOptions, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    # one parseable line: scripts and tests read the port from it when --port 0
    print(f"detrkit serve: listening on http://{shown}:{port}", file=sys.stderr, flush=True)


def _serve_one(options: ServerOptions, keys: list[str], sock: socket.socket) -> int:
    import uvicorn

    app = _build_app(options, keys)
    server = uvicorn.Server(_uvicorn_config(app, options))
    sock.listen(2048)
    _announce(options, sock)
    # uvicorn re-raises the stop signal after its graceful shutdown, with the handler it found;
    # a handler that ignores it lets the process end with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _serve_many(options: ServerOptions, sock: socket.socket) -> int:
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from detrkit.config import LazyConfig

    # the overrides are checked here, once; each worker loads the model itself
    LazyConfig.apply_overrides(LazyConfig.load(options.config_file), options.overrides)
    os.environ[OPTIONS_ENV] = options.to_json()
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics adds up the workers' values, kept in files there
        metrics_dir = tempfile.mkdtemp(prefix="detrkit-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = _uvicorn_config(
        "detrkit.serving.server:app_from_environment",
        options,
        factory=True,
        workers=options.workers,
    )
    sock.listen(2048)
    _announce(options, sock)
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    if failed:
        logger.error("a worker process failed to start (see its error above)")
    return 1 if failed else 0
