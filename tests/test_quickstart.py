"""The quickstart end to end through tools/train_net.py, on one shared run of its training
(`quickstart_run`): it reaches its documented AP, evaluation does not depend on the test batch
size or the number of processes, and the whole run stopped by SIGTERM at iteration 500 and
resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.quickstart_runs import REPO_ROOT, bbox_ap, command, environment, run

pytestmark = pytest.mark.slow


def test_eval_same_ap_for_test_batch_size_and_process_count(tmp_path, quickstart_run):
    """--eval-only of the trained quickstart model: the same AP with test batch 1, batch 4 and
    two processes."""
    weights = quickstart_run.output_dir / "model_final.pth"

    def evaluate(*args: str, flags: tuple[str, ...] = ()) -> list[float]:
        name = "_".join(a.replace("=", "").replace(".", "_") for a in (*flags, *args)) or "plain"
        return bbox_ap(
            run(
                quickstart_run.datasets_dir,
                f"train.output_dir={tmp_path / name}",
                f"train.init_checkpoint={weights}",
                *args,
                flags=("--eval-only", *flags),
            )
        )

    batch_1 = evaluate("dataloader.test.batch_size=1")
    batch_4 = evaluate("dataloader.test.batch_size=4")
    two_processes = evaluate("dataloader.test.batch_size=2", flags=("--num-gpus", "2"))
    assert batch_1 == pytest.approx(bbox_ap(quickstart_run.stdout), abs=1e-3, nan_ok=True)
    assert batch_4 == pytest.approx(batch_1, abs=1e-3, nan_ok=True)
    assert two_processes == pytest.approx(batch_1, abs=1e-3, nan_ok=True)


def stop_with_sigterm(out: Path, datasets_dir: Path, after: str, *overrides: str) -> None:
    """Starts a run into `out`, sends SIGTERM within 5 s after it wrote checkpoint `after`, and
    checks that it stopped as preempted (exit code 75) without finishing."""
    process = subprocess.Popen(
        command(f"train.output_dir={out}", *overrides),
        cwd=REPO_ROOT,
        env=environment(datasets_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tag = out / "last_checkpoint"
    try:
        deadline = time.monotonic() + 3600
        while not (tag.exists() and tag.read_text() == after):
            assert process.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, f"no {after} after 3600 s"
            time.sleep(0.2)
        time.sleep(random.uniform(0.0, 5.0))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=600) == 75  # stopped with a checkpoint (preemption)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "model_final.pth").exists()


def assert_same_weights(a: Path, b: Path) -> None:
    weights_a = torch.load(a, weights_only=True)["model"]
    weights_b = torch.load(b, weights_only=True)["model"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


def test_quickstart_reaches_its_documented_ap(quickstart_run):
    """The quickstart as shipped (the shared uninterrupted run) learns the shapes."""
    ap, ap50 = bbox_ap(quickstart_run.stdout)[:2]
    assert ap >= 50 and ap50 >= 80, (ap, ap50)


def test_quickstart_stopped_at_iteration_500_ends_with_the_uninterrupted_ap(
    tmp_path, quickstart_run
):
    """The whole quickstart, stopped by SIGTERM just after its iteration-500 checkpoint and
    resumed, ends with the uninterrupted run's weights bit for bit and exactly its AP."""
    out = tmp_path / "stopped"
    stop_with_sigterm(out, quickstart_run.datasets_dir, "model_0000499.pth")
    stopped_at = int((out / "last_checkpoint").read_text()[len("model_") : -len(".pth")]) + 1
    assert 500 <= stopped_at < 600, stopped_at
    resumed_output = run(
        quickstart_run.datasets_dir, f"train.output_dir={out}", flags=("--resume",), timeout=3600
    )
    assert f"Starting training from iteration {stopped_at}" in (out / "log.txt").read_text()
    assert bbox_ap(resumed_output) == pytest.approx(
        bbox_ap(quickstart_run.stdout), abs=0, nan_ok=True
    )
    assert_same_weights(quickstart_run.output_dir / "model_final.pth", out / "model_final.pth")
