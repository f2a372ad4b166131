"""The quickstart end to end through tools/train_net.py: evaluation does not depend on the test
batch size or the number of processes, and a run killed after a checkpoint resumes from exactly
the state the uninterrupted run had there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
SHAPES_TINY = REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets")


def command(*overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(SHAPES_TINY), *flags, *overrides]


def environment(datasets_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["DETRKIT_DATASETS"] = str(datasets_dir)
    return env


def run(datasets_dir: Path, *overrides: str, flags: tuple[str, ...] = (), timeout: float = 900):
    result = subprocess.run(
        command(*overrides, flags=flags),
        cwd=REPO_ROOT,
        env=environment(datasets_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def bbox_ap(stdout: str) -> list[float]:
    """The last `copypaste:` values of the bbox task: AP, AP50, AP75, APs, APm, APl."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith("copypaste: Task: bbox")]
    assert starts, f"no evaluation in the output:\n{stdout[-3000:]}"
    values = lines[starts[-1] + 2].split("copypaste: ")[1].split(",")
    return [float(v) for v in values]


def test_eval_same_ap_for_test_batch_size_and_process_count(tmp_path, datasets_dir):
    out = tmp_path / "train"
    run(
        datasets_dir,
        f"train.output_dir={out}",
        "train.max_iter=300",
        "train.eval_period=100000",  # evaluated below, not here
        "train.checkpointer.period=100000",
        "lr_multiplier.scheduler.milestones=[250,300]",
    )
    weights = out / "model_final.pth"
    assert weights.is_file()

    def evaluate(*args: str, flags: tuple[str, ...] = ()) -> list[float]:
        name = "_".join(a.replace("=", "").replace(".", "_") for a in (*flags, *args)) or "plain"
        return bbox_ap(
            run(
                datasets_dir,
                f"train.output_dir={tmp_path / name}",
                f"train.init_checkpoint={weights}",
                *args,
                flags=("--eval-only", *flags),
            )
        )

    batch_1 = evaluate("dataloader.test.batch_size=1")
    batch_4 = evaluate("dataloader.test.batch_size=4")
    two_processes = evaluate("dataloader.test.batch_size=2", flags=("--num-gpus", "2"))
    assert batch_1[0] > 1.0, (
        batch_1
    )  # 300 iterations learn something: the comparison means something
    assert batch_4 == pytest.approx(batch_1, abs=1e-3, nan_ok=True)
    assert two_processes == pytest.approx(batch_1, abs=1e-3, nan_ok=True)


RESUME_RUN = (
    "train.max_iter=200",
    "train.eval_period=0",  # only the evaluation after the last iteration
    "train.checkpointer.period=100",
    "lr_multiplier.scheduler.milestones=[150,200]",
    "train.seed=7",
)
KILL_AFTER = "model_0000099.pth"


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # files this test wrote


def adam_steps(checkpoint: dict) -> dict:
    """The optimizer's step count of every parameter it holds state for."""
    state = checkpoint["trainer"]["optimizer"]["state"]
    return {index: int(entry["step"]) for index, entry in state.items()}


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Two checkpoints hold the same values, bit for bit (every tensor, number and string)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def test_run_killed_after_a_checkpoint_resumes_from_the_uninterrupted_runs_state(
    tmp_path, datasets_dir
):
    """The checkpoint a resume starts from is bit-identical to the uninterrupted run's at that
    iteration, and the resumed run continues from the next iteration to the end."""
    full = tmp_path / "full"
    run(datasets_dir, f"train.output_dir={full}", *RESUME_RUN)

    out = tmp_path / "killed"
    process = subprocess.Popen(
        command(f"train.output_dir={out}", *RESUME_RUN),
        cwd=REPO_ROOT,
        env=environment(datasets_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tag = out / "last_checkpoint"
    try:
        deadline = time.monotonic() + 600
        while not (tag.exists() and tag.read_text() == KILL_AFTER):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no {KILL_AFTER} after 600 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "model_final.pth").exists() and not (out / "model_0000199.pth").exists()

    # model, optimizer moments, LR-scheduler state and iteration at the kill point
    saved = load_checkpoint(out / KILL_AFTER)
    assert saved["iteration"] == 99
    assert_identical(saved, load_checkpoint(full / KILL_AFTER))

    run(datasets_dir, f"train.output_dir={out}", *RESUME_RUN, flags=("--resume",))
    assert "Starting training from iteration 100" in (out / "log.txt").read_text()
    resumed, uninterrupted = (
        load_checkpoint(out / "model_final.pth"),
        load_checkpoint(full / "model_final.pth"),
    )
    # the schedule and the optimizer continued rather than restarted: same iteration, scheduler
    # state, lr and Adam step counts. The weights are not compared: the data order restarts at
    # a resume (as in detectron2), so the last 100 iterations see other batches.
    assert resumed["iteration"] == uninterrupted["iteration"] == 199
    assert_identical(resumed["trainer"]["hooks"], uninterrupted["trainer"]["hooks"], "hooks")
    assert_identical(
        resumed["trainer"]["optimizer"]["param_groups"],
        uninterrupted["trainer"]["optimizer"]["param_groups"],
        "param_groups",
    )
    steps = [adam_steps(c) for c in (resumed, uninterrupted)]
    assert steps[0] == steps[1] and max(steps[0].values()) == 200
