"""Hooks run by the trainer around each iteration.

A hook overrides any of `before_train`, `before_step`, `after_backward` (between the backward
pass and the optimizer step), `after_step`, `after_train` (`HookBase`, in `trainer.py`); hooks
run in the order registered. This is the one place that order is written down.

`tools/train_net.py` registers, in this order (the order matters: a hook's `after_step` sees what
the earlier ones recorded)::

    IterationTimer        puts `time`; logs `Overall training speed: ...` at the end
    EMAHook               (train.model_ema.enabled) updates the weight average
    LRScheduler           puts `lr`, then steps the schedule
    ResumeStateHook       (all ranks; resume.py) gathers RNG states and data positions to save
    PeriodicCheckpointer  (rank 0) model_{iter:07d}.pth every period, model_final.pth at the end
    EvalHook              every eval_period and after the last iteration (all ranks)
    PeriodicWriter        (rank 0) console line, metrics.json, TensorBoard every log_period
    PreemptionHook        (all ranks; preemption.py) on SIGTERM/SIGINT/SIGUSR1: save and stop
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from fvcore.common.param_scheduler import ParamScheduler

from detrkit.config import ConfigError
from detrkit.utils import comm

from .ema import ModelEMA
from .events import EventWriter
from .resume import preserve_rng_state
from .trainer import HookBase

__all__ = [
    "EMAHook",
    "EvalHook",
    "HookBase",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "flatten_results_dict",
]

logger = logging.getLogger(__name__)


class IterationTimer(HookBase):
    """Records each iteration's duration as `time` and logs the overall speed at the end.

    The first `warmup_iter` iterations (slow: allocator, cudnn autotuning) are left out of the
    summary unless the run is too short to have anything else. The timed span is
    this hook's `before_step` to its `after_step`; register it first, so that it covers the
    other hooks' `before_step` and the step itself but not their (checkpoint, evaluation,
    logging) work in `after_step`.
    """

    def __init__(self, warmup_iter: int = 3) -> None:
        self._warmup_iter = warmup_iter
        self._step_start: float | None = None
        self._step_times: list[float] = []
        self._train_start = 0.0

    def before_train(self) -> None:
        self._train_start = time.perf_counter()
        self._step_times = []

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        elapsed = time.perf_counter() - self._step_start
        self._step_times.append(elapsed)
        self.trainer.storage.put_scalars(time=elapsed)

    def after_train(self) -> None:
        total_time = time.perf_counter() - self._train_start
        times = self._step_times
        if not times:
            return
        measured = times[self._warmup_iter :] if len(times) > self._warmup_iter else times
        step_time = sum(measured)
        logger.info(
            "Overall training speed: %d iterations in %s (%.4f s / it)",
            len(measured),
            datetime.timedelta(seconds=int(step_time)),
            step_time / len(measured),
        )
        logger.info(
            "Total training time: %s (%s on hooks)",
            datetime.timedelta(seconds=int(total_time)),
            datetime.timedelta(seconds=int(max(total_time - sum(times), 0.0))),
        )


class LRScheduler(HookBase):
    """Records the learning rate as `lr` and steps the schedule after every iteration.

    `scheduler` is a torch LR scheduler over the trainer's optimizer, or an fvcore
    `ParamScheduler` (what `cfg.lr_multiplier` instantiates to), which is wrapped at the start
    of training in an `LRMultiplier` over [0, max_iter) positioned at the start iteration. The
    schedule's state is saved with the trainer's hooks and restored on resume.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
    ) -> None:
        if scheduler is None:
            raise ValueError("LRScheduler hook: scheduler must be given (cfg.lr_multiplier)")
        self._optimizer = optimizer
        self._param_scheduler = scheduler if isinstance(scheduler, ParamScheduler) else None
        self._scheduler = None if self._param_scheduler is not None else scheduler
        self._pending_state: dict | None = None
        self._best_group = 0

    @property
    def scheduler(self):
        return self._scheduler

    def before_train(self) -> None:
        self._optimizer = self._optimizer or self.trainer.optimizer
        if self._param_scheduler is not None and self._scheduler is None:
            from .optimizer import LRMultiplier

            self._scheduler = LRMultiplier(
                self._optimizer,
                multiplier=self._param_scheduler,
                max_iter=self.trainer.max_iter,
                last_iter=self.trainer.iter - 1,
            )
        if self._pending_state is not None:
            self._scheduler.load_state_dict(self._pending_state)
            self._pending_state = None
        self._best_group = self._pick_param_group(self._optimizer)

    @staticmethod
    def _pick_param_group(optimizer: torch.optim.Optimizer) -> int:
        """The group whose lr is logged: the one with the most parameter tensors (the others are
        usually groups with a multiplier, e.g. a 0.1x backbone, which has fewer but larger
        tensors); with one tensor per group, the first group of the most common lr."""
        groups = optimizer.param_groups
        counts = [len(g["params"]) for g in groups]
        if max(counts) > 1:
            return counts.index(max(counts))
        lrs = [g["lr"] for g in groups]
        most_common = max(lrs, key=lrs.count)
        return lrs.index(most_common)

    def after_step(self) -> None:
        lr = self._optimizer.param_groups[self._best_group]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self._scheduler.step()

    def state_dict(self) -> dict:
        if self._scheduler is not None and hasattr(self._scheduler, "state_dict"):
            return self._scheduler.state_dict()
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._scheduler is None:
            # built in before_train (it needs max_iter); apply the state then
            self._pending_state = state_dict
        else:
            self._scheduler.load_state_dict(state_dict)


class PeriodicCheckpointer(HookBase):
    """Saves `model_{iter:07d}.pth` after every `period`-th iteration (iter = period - 1,
    2 * period - 1, ...) and `model_final.pth` after the last, keeping the newest
    `max_to_keep` periodic files.

    Files of an earlier run in the same directory count towards `max_to_keep` on resume, but
    pruning never deletes the checkpoint the run resumed from, nor the newest periodic file
    (the one just written, verified by its checksum when it was saved). Register it on the main
    process only.
    """

    def __init__(
        self,
        checkpointer,
        period: int,
        max_to_keep: int | None = None,
        file_prefix: str = "model",
        max_iter: int | None = None,
    ) -> None:
        if int(period) <= 0:
            raise ConfigError(f"train.checkpointer.period={period} is not valid; accepted: >= 1")
        if max_to_keep is not None and int(max_to_keep) <= 0:
            raise ConfigError(
                f"train.checkpointer.max_to_keep={max_to_keep} is not valid; accepted: >= 1"
            )
        self.checkpointer = checkpointer
        self.period = int(period)
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self.max_iter = max_iter
        self.recent_checkpoints: list[str] = []
        self._file_prefix = file_prefix

    def before_train(self) -> None:
        self.max_iter = self.trainer.max_iter
        # older periodic checkpoints of this directory (a resumed run) count towards the limit
        save_dir = self.checkpointer.save_dir
        pattern = re.compile(re.escape(self._file_prefix) + r"_(\d{7})\.pth$")
        if save_dir and os.path.isdir(save_dir):
            existing = sorted(
                (int(m.group(1)), name)
                for name in os.listdir(save_dir)
                if (m := pattern.fullmatch(name)) and int(m.group(1)) < self.trainer.iter
            )
            self.recent_checkpoints = [os.path.join(save_dir, n) for _, n in existing]

    def after_step(self) -> None:
        iteration = int(self.trainer.iter)
        if (iteration + 1) % self.period == 0:
            self.save_periodic(iteration)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self._file_prefix}_final", iteration=iteration)

    def save_periodic(self, iteration: int) -> None:
        """Save `model_{iteration:07d}.pth` (unless it is already the newest) and prune."""
        name = f"{self._file_prefix}_{iteration:07d}"
        path = os.path.join(self.checkpointer.save_dir, name + ".pth")
        if self.recent_checkpoints and self.recent_checkpoints[-1] == path:
            return
        self.checkpointer.save(name, iteration=iteration)
        if path in self.recent_checkpoints:
            self.recent_checkpoints.remove(path)
        self.recent_checkpoints.append(path)
        self._prune()

    def _prune(self) -> None:
        if self.max_to_keep is None:
            return
        keep = {self.recent_checkpoints[-1], getattr(self.checkpointer, "resumed_from", "")}
        removable = [p for p in self.recent_checkpoints if p not in keep]
        while len(self.recent_checkpoints) > self.max_to_keep and removable:
            oldest = removable.pop(0)
            self.recent_checkpoints.remove(oldest)
            logger.info("Removing old checkpoint %s (train.checkpointer.max_to_keep)", oldest)
            self.checkpointer.delete_checkpoint(oldest)

    def save(self, name: str, **kwargs: Any) -> None:
        """Save a checkpoint outside the schedule."""
        self.checkpointer.save(name, **kwargs)


def flatten_results_dict(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"bbox": {"AP": 40.1, "AP-cat": 3.0}} -> {"bbox/AP": 40.1, "bbox/AP-cat": 3.0}."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_results_dict(value, name))
        else:
            flat[name] = value
    return flat


class EvalHook(HookBase):
    """Calls `eval_function()` after every `eval_period`-th iteration and once after the last
    iteration (a period of 0 evaluates only at the end).

    `eval_function` returns a nested dict of numbers ({"bbox": {"AP": ...}}) on the main
    process ({} elsewhere); it is flattened into the event storage as `bbox/AP` etc., at the
    iteration just completed. Every rank must run this hook: evaluation gathers predictions
    from all of them.
    """

    def __init__(
        self,
        eval_period: int,
        eval_function: Callable[[], Mapping | None],
        eval_after_train: bool = True,
    ) -> None:
        self._period = int(eval_period)
        self._func = eval_function
        self._eval_after_train = eval_after_train

    def _do_eval(self, iteration: int) -> None:
        model = getattr(self.trainer, "model", None)
        was_training = model.training if model is not None else None
        with preserve_rng_state():  # training's random streams do not see the evaluation
            results = self._func()
        if model is not None:
            model.train(was_training)

        if results:
            if not isinstance(results, Mapping):
                raise TypeError(
                    f"EvalHook: eval_function must return a dict of results, got {type(results)}"
                )
            flattened = flatten_results_dict(results)
            scalars = {}
            for name, value in flattened.items():
                try:
                    scalars[name] = float(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"EvalHook: eval_function returned {name}={value!r}; results must be "
                        "a nested dict of numbers"
                    ) from e
            self.trainer.storage.put_scalars(**scalars, smoothing_hint=False, cur_iter=iteration)

        # evaluation can take different times on different ranks; line them up again
        comm.synchronize()

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if (
            self._period > 0
            and next_iter % self._period == 0
            and next_iter != self.trainer.max_iter
        ):
            # the last iteration is evaluated in after_train
            self._do_eval(self.trainer.iter)

    def after_train(self) -> None:
        # `iter` reaches max_iter only when training completed (not after an exception)
        if self._eval_after_train and self.trainer.iter >= self.trainer.max_iter:
            self._do_eval(self.trainer.max_iter - 1)
        # the closure may hold the model and data: let them go
        del self._func


class PeriodicWriter(HookBase):
    """Runs the writers (console line, metrics.json, TensorBoard) every `period` iterations,
    after the last iteration, and once more when training ends (to flush evaluation results)."""

    def __init__(self, writers: Sequence[EventWriter], period: int = 20) -> None:
        for w in writers:
            if not isinstance(w, EventWriter):
                raise TypeError(f"PeriodicWriter: {w!r} is not an EventWriter")
        if int(period) <= 0:
            raise ConfigError(f"train.log_period={period} is not valid; accepted: >= 1")
        self._writers = list(writers)
        self._period = int(period)

    def after_step(self) -> None:
        if (
            self.trainer.iter + 1
        ) % self._period == 0 or self.trainer.iter == self.trainer.max_iter - 1:
            for writer in self._writers:
                writer.write()

    def after_train(self) -> None:
        for writer in self._writers:
            writer.write()
            writer.close()


class EMAHook(HookBase):
    """Updates a `ModelEMA` after every iteration.

    At the start of training the average is initialized from the model, unless a resumed
    checkpoint already filled it (then it continues from the saved average). Register it
    before the checkpointer so that a checkpoint holds the average of the same iteration as
    the weights.
    """

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema

    def before_train(self) -> None:
        if self.ema.has_state:
            logger.info("Continuing the model EMA from the loaded checkpoint")
        else:
            logger.info("Initializing the model EMA (decay=%s) from the model", self.ema.decay)
            self.ema.init_from_model()

    def after_step(self) -> None:
        self.ema.update()
