"""What a checkpoint needs, beyond weights and optimizer, for a resumed run to continue exactly
as the uninterrupted one would have: every rank's random-number generators and the position of
its training data stream.

`ResumeStateHook` (registered on every rank, before the `PeriodicCheckpointer`) gathers that
state from all ranks whenever a checkpoint is about to be written; it is saved with the trainer's
hook states (`trainer.hooks.ResumeStateHook`) and, on resume, each rank takes its own entry back:
the data loader's position at once, the generators (and the recent values of the smoothed
metrics, so logged medians continue unchanged) at the start of training.

The data loader takes part when it has `state_dict()`/`load_state_dict()` (the loaders of
`build_detection_train_loader` do); otherwise only the generators are restored.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from detrkit.utils import comm

from .trainer import HookBase

__all__ = ["ResumeStateHook", "capture_rng_state", "preserve_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)

_METRIC_WINDOW = 100  # values kept per smoothed scalar (the writers' windows are 20)


def capture_rng_state() -> dict[str, Any]:
    """The states of python's `random`, numpy's global generator, torch (CPU and, once used,
    CUDA), in types a `weights_only` checkpoint load accepts."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators to a state from `capture_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Whatever the block draws, the generators leave it as they entered (evaluation inside
    training must not shift the training's random streams)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


class ResumeStateHook(HookBase):
    """Gathers every rank's generators and data position before each checkpoint; restores this
    rank's share on resume.

    Args:
        period: the checkpoint period (`train.checkpointer.period`): the state is gathered after
            the iterations a `PeriodicCheckpointer` saves (and the last one). All ranks must
            use the same period: gathering is a collective operation.
    """

    def __init__(self, period: int) -> None:
        self._period = int(period)
        self._states: list[dict[str, Any]] = []
        self._collected_at: int | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._pending_metrics: dict[str, list[list[float]]] = {}
        self._loaded = False  # whether a checkpoint's state was loaded

    def before_train(self) -> None:
        if self.trainer.iter > 0 and not self._loaded:
            logger.warning(
                "Resuming at iteration %d from a checkpoint without the data position and "
                "random generators (written without ResumeStateHook): the data order and "
                "random streams restart, so the run will not match an uninterrupted one",
                self.trainer.iter,
            )
        histories = self.trainer.storage.histories()
        for name, values in self._pending_metrics.items():
            for value, iteration in values:
                histories[name].update(value, iteration)
        self._pending_metrics = {}
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
            logger.info("Restored the random generators of the checkpoint")

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if (iteration + 1) % self._period == 0 or iteration == self.trainer.max_iter - 1:
            self.collect()

    def collect(self) -> None:
        """Gather the state of every rank (collective: call on all ranks at one iteration)."""
        iteration = self.trainer.iter
        if self._collected_at == iteration:
            return
        local: dict[str, Any] = {"rng": capture_rng_state(), "metrics": self._metric_windows()}
        loader = getattr(self.trainer, "data_loader", None)
        if hasattr(loader, "state_dict"):
            local["data"] = loader.state_dict()
        self._states = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
        self._collected_at = iteration

    def _metric_windows(self) -> dict[str, list[list[float]]]:
        """The latest values of the smoothed scalars (losses, times), so that the medians the
        writers log right after a resume are those the uninterrupted run logged."""
        storage = self.trainer.storage
        hints = storage.smoothing_hints()
        return {
            name: [[float(v), int(i)] for v, i in history.values()[-_METRIC_WINDOW:]]
            for name, history in storage.histories().items()
            if hints.get(name, False)
        }

    def state_dict(self) -> dict:
        if not self._states:
            return {}
        return {"world_size": len(self._states), "ranks": self._states}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict.get("ranks", [])
        if not ranks:
            return
        if len(ranks) != comm.get_world_size():
            logger.warning(
                "The checkpoint was written by %d processes, this run has %d: the data order "
                "and random streams restart (training continues, but not exactly as it would "
                "have)",
                len(ranks),
                comm.get_world_size(),
            )
            self._loaded = True  # said so already
            return
        mine = ranks[comm.get_rank()]
        loader = getattr(self.trainer, "data_loader", None)
        if "data" in mine:
            if hasattr(loader, "load_state_dict"):
                loader.load_state_dict(mine["data"])
            else:
                logger.warning(
                    "The checkpoint has a data-loader position but this run's loader (%s) "
                    "cannot resume one: the data order restarts",
                    type(loader).__name__,
                )
        self._loaded = True
        self._pending_rng = mine["rng"]
        self._pending_metrics = mine.get("metrics", {})
