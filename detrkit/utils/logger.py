"""Logging set-up shared by every entry point.

Console lines look like `[11/21 14:28:51 detrkit.engine]: message` (rank 0 only, unless a warning);
every rank writes a file: `log.txt` for rank 0 and `log.txt.rankN` for the others.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections import Counter

from iopath.common.file_io import PathManager

_CONSOLE_FORMAT = "[%(asctime)s %(name)s]: %(message)s"
_FILE_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"


class _ConsoleFormatter(logging.Formatter):
    """Prefixes warnings and errors so they stand out in a stream of progress lines."""

    def __init__(self, *args, color: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._color = color

    def formatMessage(self, record: logging.LogRecord) -> str:
        log = super().formatMessage(record)
        if record.levelno >= logging.ERROR:
            prefix = "\033[31mERROR\033[0m" if self._color else "ERROR"
        elif record.levelno >= logging.WARNING:
            prefix = "\033[33mWARNING\033[0m" if self._color else "WARNING"
        else:
            return log
        return prefix + " " + log


@functools.lru_cache  # one set of handlers per (output, rank, name)
def setup_logger(
    output: str | None = None,
    distributed_rank: int = 0,
    *,
    color: bool = True,
    name: str = "detrkit",
    level: int = logging.DEBUG,
) -> logging.Logger:
    """Configure the `name` logger: console on rank 0 and a log file per rank under `output`.

    `output` is a directory (the file is `output/log.txt`) or a path ending in .txt/.log.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False

    if distributed_rank == 0:
        handler = logging.StreamHandler(stream=sys.stdout)
        handler.setLevel(logging.DEBUG)
        use_color = color and sys.stdout.isatty()
        handler.setFormatter(_ConsoleFormatter(_CONSOLE_FORMAT, _DATE_FORMAT, color=use_color))
        logger.addHandler(handler)
    else:
        # other ranks stay quiet on the console unless something is wrong
        handler = logging.StreamHandler(stream=sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(
            _ConsoleFormatter(f"[rank {distributed_rank}] " + _CONSOLE_FORMAT, _DATE_FORMAT)
        )
        logger.addHandler(handler)

    if output is not None:
        filename = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        stream = PathManager().open(filename, "a")
        file_handler = logging.StreamHandler(stream)
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT, _DATE_FORMAT))
        logger.addHandler(file_handler)
    return logger


_LOG_COUNTER: Counter = Counter()
_LOG_TIMER: dict = {}


def log_first_n(
    level: int, msg: str, n: int = 1, *, name: str = "detrkit", key: str = "msg"
) -> None:
    """Log `msg` only the first `n` times this call site (or message, with key="msg") is reached."""
    caller_key = msg if key == "msg" else key
    _LOG_COUNTER[caller_key] += 1
    if _LOG_COUNTER[caller_key] <= n:
        logging.getLogger(name).log(level, msg)


def log_every_n_seconds(level: int, msg: str, n: float = 1.0, *, name: str = "detrkit") -> None:
    """Log `msg` at most once every `n` seconds per distinct call site."""
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    last = _LOG_TIMER.get(key)
    now = time.time()
    if last is None or now - last >= n:
        logging.getLogger(name).log(level, msg)
        _LOG_TIMER[key] = now
