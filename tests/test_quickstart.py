"""The quickstart end to end through tools/train_net.py: evaluation does not depend on the test
batch size or the number of processes, and a run stopped mid-way by SIGTERM and resumed ends
exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
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
    # 300 iterations learn something (an untrained model scores about 0.01), so the comparison
    # means something
    assert batch_1[0] > 0.5, batch_1
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


def test_run_stopped_by_sigterm_resumes_to_the_uninterrupted_weights_and_ap(tmp_path, datasets_dir):
    """SIGTERM somewhere after the iteration-99 checkpoint: exit code 75 with a checkpoint; the
    resumed run ends with the uninterrupted run's weights, bit for bit, and so with its AP."""
    full = tmp_path / "full"
    uninterrupted = bbox_ap(run(datasets_dir, f"train.output_dir={full}", *RESUME_RUN))

    out = tmp_path / "stopped"
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
            assert process.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, f"no {KILL_AFTER} after 600 s"
            time.sleep(0.2)
        time.sleep(random.uniform(0.0, 5.0))  # somewhere after iteration 99
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=600) == 75  # stopped with a checkpoint (preemption)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "model_final.pth").exists()

    resumed_output = run(datasets_dir, f"train.output_dir={out}", *RESUME_RUN, flags=("--resume",))
    assert "Starting training from iteration" in (out / "log.txt").read_text()
    # the checkpoint holds the data position and random generators: the resumed run trains on
    # what the uninterrupted one did and ends with the same weights, hence the same AP
    assert bbox_ap(resumed_output) == pytest.approx(uninterrupted, abs=0, nan_ok=True)
    full_weights = torch.load(full / "model_final.pth", weights_only=True)["model"]
    resumed = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert full_weights.keys() == resumed.keys()
    assert all(torch.equal(full_weights[key], resumed[key]) for key in full_weights)
