"""Stopping on SIGTERM/SIGINT/SIGUSR1 with a checkpoint, requeueing under SLURM, and resuming
bit-exactly (weights, optimizer, losses) on the toy config: in-process hooks (fast) and
tools/train_net.py killed at random iterations (slow)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import capture_logs
from toy import ToyLoader, ToyModel

from detrkit.checkpoint import DetectionCheckpointer
from detrkit.engine import PeriodicCheckpointer, Trainer
from detrkit.engine.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionHook,
    TrainingPreempted,
    requeue_slurm_job,
)
from detrkit.engine.resume import (
    ResumeStateHook,
    capture_rng_state,
    preserve_rng_state,
    restore_rng_state,
)
from detrkit.engine.setup import seed_all_rng
from detrkit.engine.trainer import HookBase

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
TOY_CFG = REPO_ROOT / "tests" / "configs" / "toy_train.py"


def _draws() -> tuple:
    return (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    state = capture_rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pth")
    _draws()
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert _draws() == expected
    with preserve_rng_state():
        _draws()
    after = capture_rng_state()
    again = _draws()
    restore_rng_state(after)
    assert _draws() == again


class _SignalAt(HookBase):
    """Sends this process `signals` during iteration `at` (as a cluster would, at any time)."""

    def __init__(self, at: int, signals: list[int]) -> None:
        self.at = at
        self.signals = signals

    def before_step(self) -> None:
        if self.trainer.iter == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


def _toy_trainer(folder: Path, signal_at: int | None = None, signals=(signal.SIGTERM,)):
    seed_all_rng(0)
    model = ToyModel(rng_noise=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(model, ToyLoader(num_batches=3), optimizer)
    checkpointer = DetectionCheckpointer(model, str(folder), trainer=trainer)
    periodic = PeriodicCheckpointer(checkpointer, period=5, max_to_keep=2)
    resume = ResumeStateHook(period=5)
    hooks = [resume, periodic, PreemptionHook(periodic, resume)]
    if signal_at is not None:
        hooks.insert(0, _SignalAt(signal_at, list(signals)))
    trainer.register_hooks(hooks)
    return trainer, checkpointer


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_stops_after_the_iteration_with_a_checkpoint_and_resume_is_exact(tmp_path, signum):
    reference, _ = _toy_trainer(tmp_path / "reference")
    reference.train(0, 20)

    stop_at = random.randint(1, 17)
    trainer, _ = _toy_trainer(tmp_path / "run", signal_at=stop_at, signals=[signum, signum])
    handler_before = signal.getsignal(signum)
    with pytest.raises(TrainingPreempted) as info:
        trainer.train(0, 20)
    name = signal.Signals(signum).name
    assert f"stopped by {name} after iteration {stop_at}" in info.value.message
    assert signal.getsignal(signum) == handler_before  # handlers are put back
    saved = torch.load(tmp_path / "run" / f"model_{stop_at:07d}.pth", weights_only=True)
    assert saved["iteration"] == stop_at
    assert (tmp_path / "run" / "last_checkpoint").read_text() == f"model_{stop_at:07d}.pth"

    # a fresh process state: other global random draws in between do not matter
    _draws()
    resumed, checkpointer = _toy_trainer(tmp_path / "run")
    checkpointer.resume_or_load("", resume=True)
    resumed.train(resumed.iter + 1, 20)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    for a, b in zip(
        reference.optimizer.state_dict()["state"].values(),
        resumed.optimizer.state_dict()["state"].values(),
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_the_resume_state_the_run_would_differ(tmp_path):
    """The oracle for the test above: the toy run does depend on the restored data position and
    generators (a resume that restored only weights and optimizer would not match)."""
    reference, _ = _toy_trainer(tmp_path / "reference")
    reference.train(0, 20)
    trainer, _ = _toy_trainer(tmp_path / "run", signal_at=7)
    with pytest.raises(TrainingPreempted):
        trainer.train(0, 20)
    resumed, checkpointer = _toy_trainer(tmp_path / "run")
    resumed._hooks = [h for h in resumed._hooks if not isinstance(h, ResumeStateHook)]
    checkpointer.resume_or_load("", resume=True)
    resumed.train(resumed.iter + 1, 20)
    weight = reference.model.net[0].weight
    assert not torch.equal(resumed.model.net[0].weight, weight)


def test_resuming_a_checkpoint_without_resume_state_says_the_streams_restart(tmp_path):
    trainer, _ = _toy_trainer(tmp_path, signal_at=7)
    trainer._hooks = [h for h in trainer._hooks if not isinstance(h, ResumeStateHook)]
    with pytest.raises(TrainingPreempted):
        trainer.train(0, 20)
    resumed, checkpointer = _toy_trainer(tmp_path)
    checkpointer.resume_or_load("", resume=True)
    with capture_logs("detrkit.engine.resume", logging.WARNING) as records:
        resumed.train(resumed.iter + 1, 9)
    assert len(records) == 1
    assert "the data order and random streams restart" in records[0].getMessage()


def _fake_scontrol(folder: Path) -> Path:
    """A `scontrol` on PATH that records its arguments."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls.txt"}\n')
    script.chmod(0o755)
    return folder / "calls.txt"


def test_requeue_calls_scontrol_for_the_job(tmp_path, monkeypatch):
    calls = _fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert not requeue_slurm_job()  # only the first task requeues
    assert not calls.exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert requeue_slurm_job()
    assert calls.read_text() == "requeue 4242\n"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not requeue_slurm_job()


# --- tools/train_net.py, killed at random iterations -------------------------------------------

TOY_ARGS = (
    "train.max_iter=30",
    "train.checkpointer.period=7",
    "train.checkpointer.max_to_keep=2",
    "train.log_period=1",
    "train.eval_period=10",
    "train.model_ema.enabled=True",
    "train.model_ema.decay=0.8",
    "model.rng_noise=0.1",
    "dataloader.train.num_batches=3",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def _train_net(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_NET), "--config-file", str(TOY_CFG), *args],
        env=_env(**extra_env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _slow_toy_command(out: Path, *args: str, flags: tuple[str, ...] = ()) -> list[str]:
    """train_net.py on the toy config, slowed down so a signal can land at any iteration."""
    command = [sys.executable, str(TRAIN_NET), "--config-file", str(TOY_CFG), *flags]
    return [*command, f"train.output_dir={out}", *args, "model.sleep_per_iter=0.05"]


def _losses(folder: Path) -> dict[int, dict[str, float]]:
    """iteration -> the losses logged for it (metrics.json; window medians as written)."""
    rows = [json.loads(line) for line in (folder / "metrics.json").read_text().splitlines()]
    losses = {}
    for row in rows:
        values = {k: v for k, v in row.items() if "loss" in k}
        if values:
            losses[row["iteration"]] = values
    return losses


def _logged_iterations(folder: Path) -> int:
    path = folder / "metrics.json"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _assert_same_final_state(a: Path, b: Path) -> None:
    first = torch.load(a / "model_final.pth", weights_only=True)
    second = torch.load(b / "model_final.pth", weights_only=True)
    assert first.keys() == second.keys()
    for part in [p for p in ("model", "ema_state") if p in first]:
        for key, value in first[part].items():
            assert torch.equal(second[part][key], value), (part, key)
    opt_a, opt_b = first["trainer"]["optimizer"], second["trainer"]["optimizer"]
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(opt_b["state"][index][key], value), (index, key)


def kill_at_random_iteration(
    command: list[str], out: Path, env: dict, signum: int, low: int, high: int
) -> tuple[subprocess.CompletedProcess, int]:
    """Start `command`, send `signum` once between iterations `low` and `high` have been logged;
    return the finished process and the iteration it was logged at."""
    target = random.randint(low, high)
    with open(out.parent / f"{out.name}.stderr", "w+") as stderr:
        proc = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True
        )
        deadline = time.monotonic() + 240
        while _logged_iterations(out) < target:
            assert proc.poll() is None, f"ended (code {proc.returncode}) before the signal"
            assert time.monotonic() < deadline, "timed out waiting for the iteration"
            time.sleep(0.01)
        proc.send_signal(signum)
        proc.wait(timeout=240)
        stderr.seek(0)
        err = stderr.read()
    return subprocess.CompletedProcess(command, proc.returncode, "", err), target


@pytest.fixture(scope="module")
def toy_uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_uninterrupted")
    result = _train_net(f"train.output_dir={out}", *TOY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigterm_at_a_random_iteration_then_resume_is_bit_exact(tmp_path, toy_uninterrupted, trial):
    out = tmp_path / "run"
    calls = _fake_scontrol(tmp_path / "bin")
    env = _env(SLURM_JOB_ID="777", PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    command = _slow_toy_command(out, *TOY_ARGS, "train.requeue_on_preempt=True")
    result, logged = kill_at_random_iteration(command, out, env, signal.SIGTERM, 2, 24)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    stop = int(last_line.split("after iteration ")[1].split(";")[0])
    assert stop >= logged - 1  # the iteration running when the signal came
    assert f"checkpoint {out / f'model_{stop:07d}.pth'}" in last_line
    assert last_line.endswith("the job is requeued")
    assert calls.read_text() == "requeue 777\n"
    assert (out / "last_checkpoint").read_text() == f"model_{stop:07d}.pth"
    saved = torch.load(out / f"model_{stop:07d}.pth", weights_only=True)
    assert saved["iteration"] == saved["trainer"]["iteration"] == stop
    assert not list(out.glob(".*.tmp"))

    result = _train_net("--resume", f"train.output_dir={out}", *TOY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Starting training from iteration {stop + 1}" in result.stdout
    _assert_same_final_state(out, toy_uninterrupted)
    # every iteration logged after the resume has the uninterrupted run's losses
    expected, resumed = _losses(toy_uninterrupted), _losses(out)
    assert all(resumed[i] == expected[i] for i in range(stop + 1, 30))


# --- two gloo processes ----------------------------------------------------------------------

TWO_PROCESSES = ("--num-gpus", "2", "--dist-url", "auto")


def _rank_pid(log: Path) -> int:
    """The pid a rank logs when it starts handling stop signals."""
    for line in log.read_text().splitlines() if log.exists() else []:
        if " (pid " in line and "stops after the current iteration" in line:
            return int(line.split(" (pid ")[1].split(")")[0])
    return 0


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_at_one_iteration_and_resume_is_exact(tmp_path):
    reference = tmp_path / "uninterrupted"
    result = _train_net(*TWO_PROCESSES, f"train.output_dir={reference}", *TOY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "run"
    command = _slow_toy_command(out, *TOY_ARGS, flags=TWO_PROCESSES)
    proc = subprocess.Popen(
        command, env=_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        target = random.randint(3, 20)
        deadline = time.monotonic() + 240
        while _logged_iterations(out) < target or not _rank_pid(out / "log.txt.rank1"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(_rank_pid(out / "log.txt.rank1"), signal.SIGTERM)  # rank 1 only
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr.decode()[-3000:]
    last_line = stderr.decode().strip().splitlines()[-1]
    assert "stopped by a stop signal sent to another rank after iteration" in last_line
    stop = int(last_line.split("after iteration ")[1].split(";")[0])
    assert (out / "last_checkpoint").read_text() == f"model_{stop:07d}.pth"
    saved = torch.load(out / f"model_{stop:07d}.pth", weights_only=True)
    assert saved["iteration"] == stop
    # both ranks' positions are in it, taken at that iteration: each rank's loader handed out
    # stop + 1 batches
    ranks = saved["trainer"]["hooks"]["ResumeStateHook"]["ranks"]
    assert [r["data"]["position"] for r in ranks] == [stop + 1, stop + 1]
    assert "Received SIGTERM: saving a checkpoint of iteration" in (
        (out / "log.txt.rank1").read_text()
    )

    result = _train_net("--resume", *TWO_PROCESSES, f"train.output_dir={out}", *TOY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_final_state(out, reference)
    expected, resumed = _losses(reference), _losses(out)
    assert all(resumed[i] == expected[i] for i in range(stop + 1, 30))
