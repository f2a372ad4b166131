"""Stopping training cleanly on SIGTERM, SIGINT or SIGUSR1 (what a cluster sends before it
preempts or ends a job; SLURM's `--signal`).

`PreemptionHook` (registered last, on every rank) turns the signal into a flag. After every
iteration (or every `check_period` iterations) the ranks agree on the flag with one all-reduce,
so that all of them stop after the same iteration; the trainer then saves a checkpoint of that
iteration (gathering every rank's resume state first) and raises `TrainingPreempted`, which the
launcher and `tools/train_net.py` turn into exit code `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL:
"try again"), optionally after `scontrol requeue $SLURM_JOB_ID`.

A second signal while stopping is noted and ignored: the save is not interrupted. Data-loader
workers ignore these signals (the main process stops them).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import torch
import torch.distributed as dist

from detrkit.utils import comm

from .trainer import HookBase

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "STOP_SIGNALS",
    "PreemptionHook",
    "TrainingPreempted",
    "requeue_slurm_job",
]

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: stopped early, rerun with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingPreempted(BaseException):
    """Training stopped on a signal after saving a checkpoint.

    A BaseException (like KeyboardInterrupt) so that handlers for errors do not report it as
    one. `message` is the one line for the user.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PreemptionHook(HookBase):
    """Stop after the current iteration, with a checkpoint, when a stop signal arrives.

    Args:
        periodic_checkpointer: the run's `PeriodicCheckpointer` on the main process (None on
            the others); it writes `model_{iter:07d}.pth` so the file counts for pruning.
        resume_hook: the run's `ResumeStateHook`, whose state is gathered before the save.
        check_period: agree on the flag every this many iterations (one all-reduce of a single
            number each time; 1 stops right after the signal's iteration).
    """

    def __init__(
        self, periodic_checkpointer: Any = None, resume_hook: Any = None, check_period: int = 1
    ) -> None:
        if int(check_period) <= 0:
            raise ValueError(f"preemption check_period={check_period} is not valid; accepted: >= 1")
        self._periodic = periodic_checkpointer
        self._resume_hook = resume_hook
        self._check_period = int(check_period)
        self._received: list[str] = []  # names of the signals received, in order
        self._previous_handlers: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        # keep the handler minimal (it interrupts arbitrary code): note the signal, log later
        self._received.append(signal.Signals(signum).name)

    def before_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training outside the main thread: stop signals are not handled")
            return
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        logger.info(
            "Rank %d (pid %d) stops after the current iteration with a checkpoint on %s",
            comm.get_rank(),
            os.getpid(),
            ", ".join(s.name for s in STOP_SIGNALS),
        )

    def after_train(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _agree(self) -> bool:
        """Whether any rank received a stop signal (the same answer on every rank)."""
        local = 1 if self._received else 0
        if comm.get_world_size() == 1:
            return bool(local)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([local], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def after_step(self) -> None:
        iteration = self.trainer.iter
        last = iteration == self.trainer.max_iter - 1
        done = iteration + 1 - self.trainer.start_iter
        if not (done % self._check_period == 0 or last):
            return
        if not self._agree():
            return
        why = self._received[0] if self._received else "a stop signal sent to another rank"
        if last:
            logger.info("Received %s during the last iteration: training completes", why)
            return
        logger.warning(
            "Received %s: saving a checkpoint of iteration %d and stopping", why, iteration
        )
        if self._resume_hook is not None:
            self._resume_hook.collect()
        path = ""
        if self._periodic is not None:
            self._periodic.save_periodic(iteration)
            path = self._periodic.checkpointer.get_checkpoint_file()
        comm.synchronize()  # no rank leaves before the checkpoint is complete
        if len(self._received) > 1:
            logger.warning(
                "Also received %s while stopping: ignored", ", ".join(self._received[1:])
            )
        where = f"; checkpoint {path}" if path else ""
        raise TrainingPreempted(f"stopped by {why} after iteration {iteration}{where}")


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` from the job's first task; whether it was requeued."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        logger.warning("train.requeue_on_preempt=True but this is not a SLURM job: not requeued")
        return False
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return False  # one task requeues the job
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.error("Could not requeue SLURM job %s: %s", job_id, e)
        return False
    if result.returncode != 0:
        logger.error(
            "scontrol requeue %s failed (exit code %d): %s",
            job_id,
            result.returncode,
            (result.stderr or result.stdout).strip(),
        )
        return False
    logger.info("Requeued SLURM job %s", job_id)
    return True
