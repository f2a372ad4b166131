"""Training-time metrics: a per-iteration store of scalars and the writers that report them.

The trainer and its hooks put scalars (losses, `lr`, `time`, `data_time`, evaluation results) into
the current `EventStorage`; writers run every `log_period` iterations and turn the stored values
into a console line (`CommonMetricPrinter`), `metrics.json` lines (`JSONWriter`) and TensorBoard
events (`TensorboardXWriter`, only when tensorboard is installed).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch
from fvcore.common.history_buffer import HistoryBuffer
from iopath.common.file_io import PathManager

__all__ = [
    "CommonMetricPrinter",
    "EventStorage",
    "EventWriter",
    "JSONWriter",
    "TensorboardXWriter",
    "get_event_storage",
]

_path_manager = PathManager()
_CURRENT_STORAGE_STACK: list[EventStorage] = []


def get_event_storage() -> EventStorage:
    """The innermost `EventStorage` entered with `with EventStorage(...)`.

    Raises AssertionError outside such a block (e.g. when a hook runs without a trainer).
    """
    assert _CURRENT_STORAGE_STACK, (
        "get_event_storage() has to be called inside a 'with EventStorage(...)' block"
    )
    return _CURRENT_STORAGE_STACK[-1]


class EventStorage:
    """Scalars recorded during training, keyed by name, each with the iteration it belongs to.

    Every name has an fvcore `HistoryBuffer` (for medians/averages over a window) and a latest
    value. A name's *smoothing hint* tells writers whether to report a windowed median (losses,
    times) or the latest value as is (learning rate, evaluation results).
    """

    def __init__(self, start_iter: int = 0) -> None:
        self._history: dict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[float, int]] = {}  # name -> (value, iteration)
        self._iter = start_iter
        self._current_prefix = ""

    # --- recording ----------------------------------------------------------------------------
    def put_scalar(
        self,
        name: str,
        value: float | torch.Tensor,
        smoothing_hint: bool = True,
        cur_iter: int | None = None,
    ) -> None:
        """Record `value` for `name` at `cur_iter` (default: the current iteration)."""
        name = self._current_prefix + name
        cur_iter = self._iter if cur_iter is None else int(cur_iter)
        value = float(value.detach().item()) if isinstance(value, torch.Tensor) else float(value)
        self._history[name].update(value, cur_iter)
        self._latest_scalars[name] = (value, cur_iter)

        existing_hint = self._smoothing_hints.get(name)
        if existing_hint is not None and existing_hint != smoothing_hint:
            raise ValueError(
                f"EventStorage: scalar {name!r} was put with smoothing_hint={existing_hint} "
                f"before and now with smoothing_hint={smoothing_hint}; use one value per name"
            )
        self._smoothing_hints[name] = smoothing_hint

    def put_scalars(
        self, *, smoothing_hint: bool = True, cur_iter: int | None = None, **kwargs: Any
    ) -> None:
        """Record several scalars at once: `storage.put_scalars(loss=1.2, accuracy=0.5)`."""
        for name, value in kwargs.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    # --- reading ------------------------------------------------------------------------------
    def history(self, name: str) -> HistoryBuffer:
        if name not in self._history:
            raise KeyError(f"EventStorage: no scalar named {name!r} has been recorded")
        return self._history[name]

    def histories(self) -> dict[str, HistoryBuffer]:
        return self._history

    def latest(self) -> dict[str, tuple[float, int]]:
        """name -> (latest value, iteration at which it was put)."""
        return self._latest_scalars

    def latest_with_smoothing_hint(self, window_size: int = 20) -> dict[str, tuple[float, int]]:
        """Like `latest`, but scalars put with smoothing_hint=True give their median over the
        last `window_size` values instead of the latest one."""
        result = {}
        for name, (value, itr) in self._latest_scalars.items():
            if self._smoothing_hints[name]:
                value = float(self._history[name].median(window_size))
            result[name] = (value, itr)
        return result

    def smoothing_hints(self) -> dict[str, bool]:
        return self._smoothing_hints

    # --- iteration counter --------------------------------------------------------------------
    def step(self) -> None:
        """Advance to the next iteration (the trainer sets `iter` directly instead)."""
        self._iter += 1

    @property
    def iter(self) -> int:
        return self._iter

    @iter.setter
    def iter(self, value: int) -> None:
        self._iter = int(value)

    # --- scoping ------------------------------------------------------------------------------
    @contextmanager
    def name_scope(self, name: str):
        """Prefix every scalar put inside the block with `name/`."""
        old_prefix = self._current_prefix
        self._current_prefix = old_prefix + name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._current_prefix = old_prefix

    def __enter__(self) -> EventStorage:
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        assert _CURRENT_STORAGE_STACK[-1] is self, "EventStorage blocks must nest"
        _CURRENT_STORAGE_STACK.pop()


class EventWriter:
    """Something that reports the current `EventStorage` when `write()` is called."""

    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JSONWriter(EventWriter):
    """Appends one JSON object per iteration to `json_file` (`metrics.json`).

    Each object has `iteration` and every scalar recorded at that iteration since the previous
    write (smoothed over `window_size` where the scalar asks for it). Read it back with::

        [json.loads(line) for line in open("metrics.json")]
    """

    def __init__(self, json_file: str, window_size: int = 20) -> None:
        self._file_handle = _path_manager.open(json_file, "a")
        self._window_size = window_size
        self._last_written: dict[str, int] = {}  # name -> last iteration written

    def write(self) -> None:
        storage = get_event_storage()
        by_iter: dict[int, dict[str, float]] = defaultdict(dict)
        for name, (value, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr <= self._last_written.get(name, -1):
                continue  # already written
            by_iter[itr][name] = value
            self._last_written[name] = itr
        if not by_iter:
            return
        for itr in sorted(by_iter):
            self._file_handle.write(json.dumps({"iteration": itr, **by_iter[itr]}) + "\n")
        self._file_handle.flush()

    def close(self) -> None:
        self._file_handle.close()


class TensorboardXWriter(EventWriter):
    """Writes every new scalar to TensorBoard event files in `log_dir`.

    Needs the optional `tensorboard` package; constructing one without it raises ImportError
    (`default_writers` checks first and skips this writer).
    """

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self._window_size = window_size
        self._writer = SummaryWriter(log_dir, **kwargs)
        self._last_written: dict[str, int] = {}

    def write(self) -> None:
        storage = get_event_storage()
        for name, (value, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_written.get(name, -1):
                self._writer.add_scalar(name, value, itr)
                self._last_written[name] = itr

    def close(self) -> None:
        self._writer.close()


class CommonMetricPrinter(EventWriter):
    """Prints the training progress line on the console (logger `detrkit.engine`)::

        eta: 1:02:03  iter: 79  total_loss: 21.3  loss_class: 1.2  time: 0.45  data_time: 0.01  \
lr: 0.0001  max_mem: 10240M

    Losses (every scalar whose name contains "loss", `total_loss` first) are medians over the
    last `window_size` iterations; `time`/`data_time` are averages; `max_mem` is the peak CUDA
    memory of this process and only appears when CUDA is available.
    """

    def __init__(self, max_iter: int | None = None, window_size: int = 20) -> None:
        self.logger = logging.getLogger("detrkit.engine")
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write: tuple[int, float] | None = None  # (iteration, wall time) for the ETA

    def _eta_seconds(self, storage: EventStorage) -> float | None:
        if self._max_iter is None:
            return None
        iteration = storage.iter
        remaining = self._max_iter - iteration - 1
        try:
            seconds_per_iter = float(storage.history("time").median(1000))
        except KeyError:
            seconds_per_iter = None
        if seconds_per_iter is None:
            # no per-iteration timer: estimate from the wall time between two writes
            now = time.perf_counter()
            if self._last_write is not None and iteration > self._last_write[0]:
                seconds_per_iter = (now - self._last_write[1]) / (iteration - self._last_write[0])
            self._last_write = (iteration, now)
            if seconds_per_iter is None:
                return None
        return max(0.0, seconds_per_iter * remaining)

    def write(self) -> None:
        storage = get_event_storage()
        iteration = storage.iter
        if self._max_iter is not None and iteration >= self._max_iter:
            # the final write after training: the last iteration was already printed
            return

        eta_seconds = self._eta_seconds(storage)
        eta_string = ""
        if eta_seconds is not None:
            storage.put_scalar("eta_seconds", eta_seconds, smoothing_hint=False)
            eta_string = f"eta: {datetime.timedelta(seconds=int(eta_seconds))}  "

        histories = storage.histories()

        def _avg(name: str) -> str:
            if name not in histories:
                return ""
            return f"{name}: {histories[name].avg(self._window_size):.4g}  "

        loss_names = [n for n in histories if "loss" in n and n != "total_loss"]
        if "total_loss" in histories:
            loss_names.insert(0, "total_loss")
        losses = "  ".join(
            f"{name}: {histories[name].median(self._window_size):.4g}" for name in loss_names
        )
        lr = f"lr: {histories['lr'].latest():.5g}  " if "lr" in histories else ""
        memory = ""
        if torch.cuda.is_initialized():  # not for a CPU run on a machine that has a GPU
            max_mem_mb = torch.cuda.max_memory_allocated() / 1024.0 / 1024.0
            memory = f"max_mem: {max_mem_mb:.0f}M"

        line = (
            f"{eta_string}iter: {iteration}  "
            + (f"{losses}  " if losses else "")
            + _avg("time")
            + _avg("data_time")
            + lr
            + memory
        )
        self.logger.info(line.rstrip())
