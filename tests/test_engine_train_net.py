"""tools/train_net.py end to end on the toy config (tests/configs/toy_train.py): outputs, console
and metrics, --eval-only, command-line errors, SIGKILL + --resume (also during a checkpoint
write), two gloo processes, a failing rank."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toy import ToyModel, ToyTestLoader

from detrkit.config import LazyConfig, instantiate
from detrkit.engine import (
    check_config,
    default_argument_parser,
    launch_backend,
    load_config,
    one_line_errors,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
PAUSED_SAVE = REPO_ROOT / "tests" / "toy" / "paused_save.py"
TOY_CFG = REPO_ROOT / "tests" / "configs" / "toy_train.py"

METRIC_KEYS = {"iteration", "loss_mse", "loss_l1", "total_loss", "lr", "time", "data_time"}
CONSOLE_LINE = re.compile(
    r"\[\d\d/\d\d \d\d:\d\d:\d\d detrkit\.engine\]: eta: \d+:\d\d:\d\d  iter: (\d+)  "
    r"total_loss: \S+  loss_l1: \S+  loss_mse: \S+  time: \S+  data_time: \S+  lr: \S+"
)


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "LOCAL_", "GROUP_"))
        and k not in ("RANK", "WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"  # same arithmetic in every run (and gentle on shared cores)
    return env


def _command(*args: str, script: Path = TRAIN_NET) -> list[str]:
    return [sys.executable, str(script), "--config-file", str(TOY_CFG), *args]


def run_train_net(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(*args),
        env={**_env(), **kwargs.pop("env", {})},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def toy_errors(model_state: dict) -> tuple[float, float]:
    """Oracle for the toy evaluator: MSE and MAE of a model with `model_state` on the toy test
    set, computed here directly."""
    model = ToyModel()
    model.load_state_dict(model_state)
    model.eval()
    sq = ab = count = 0.0
    with torch.no_grad():
        for batch in ToyTestLoader(batch_size=4, num_batches=4, seed=0):
            x = torch.stack([d["x"] for d in batch])
            y = torch.stack([d["y"] for d in batch])
            diff = model.net(x) - y
            sq += float((diff**2).sum())
            ab += float(diff.abs().sum())
            count += diff.numel()
    return sq / count, ab / count


def copypaste_values(stdout: str, task: str) -> list[float]:
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.endswith(f"copypaste: Task: {task}"):
            return [float(v) for v in lines[i + 2].split("copypaste: ")[1].split(",")]
    raise AssertionError(f"no copypaste lines for task {task}:\n{stdout[-3000:]}")


# --- one short training run, shared by the fast tests ------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_run")
    result = run_train_net(
        f"train.output_dir={out}",
        "train.max_iter=7",
        "train.log_period=2",
        "train.eval_period=5",
        "train.checkpointer.period=3",
        "train.model_ema.enabled=True",
        "train.model_ema.decay=0.5",
        "train.device=cuda",  # falls back to the CPU where there is no CUDA
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_training_outputs_and_metrics(toy_run):
    out, _ = toy_run
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "log.txt", "metrics.json", "last_checkpoint"} <= files
    # checkpoints after iterations 2 and 5 (period 3) and at the end: max_iter=7 took effect
    assert {"model_0000002.pth", "model_0000005.pth", "model_final.pth"} <= files
    assert "model_0000008.pth" not in files
    assert (out / "last_checkpoint").read_text() == "model_final.pth"

    final = load_checkpoint(out / "model_final.pth")
    assert set(final) == {"model", "trainer", "iteration", "ema_state"}
    assert set(final["trainer"]) == {"iteration", "optimizer", "hooks"}
    assert final["iteration"] == final["trainer"]["iteration"] == 6
    assert int(final["model"]["num_steps"]) == 7  # exactly 7 training steps ran

    # the saved config loads back and carries the override
    saved = LazyConfig.load(str(out / "config.yaml"))
    assert saved.train.max_iter == 7
    assert saved.train.output_dir == str(out)

    metrics = read_metrics(out)
    train_lines = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in train_lines] == [1, 3, 5, 6]
    for m in train_lines:
        assert METRIC_KEYS | {"eta_seconds"} <= set(m), m
    # the learning rate follows the configured schedule (oracle: the fvcore schedule itself)
    cfg = LazyConfig.load(str(TOY_CFG))
    schedule = instantiate(cfg.lr_multiplier)
    for m in train_lines:
        assert m["lr"] == pytest.approx(1e-2 * schedule(m["iteration"] / 7)), m
    # evaluation after iteration 4 (eval_period 5) and after the last one, plain and EMA
    evals = {m["iteration"]: m for m in metrics if "toy/mse" in m}
    assert sorted(evals) == [4, 6]
    assert {"toy/mse", "toy/mae", "toy_ema/mse", "toy_ema/mae"} <= set(evals[6])
    mse, mae = toy_errors(final["model"])
    assert evals[6]["toy/mse"] == pytest.approx(mse, rel=1e-5)
    assert evals[6]["toy/mae"] == pytest.approx(mae, rel=1e-5)
    ema_mse, _ = toy_errors(final["ema_state"])
    assert evals[6]["toy_ema/mse"] == pytest.approx(ema_mse, rel=1e-5)


def test_console_and_log(toy_run):
    out, result = toy_run
    console = [m for m in map(CONSOLE_LINE.search, result.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in console] == [1, 3, 5, 6]
    if torch.cuda.is_available():
        assert re.search(r"lr: \S+  max_mem: \d+M", result.stdout)
    else:
        assert "max_mem" not in result.stdout
        assert "train.device=cuda but CUDA is not available: using the CPU" in result.stdout
    assert "Starting training from iteration 0" in result.stdout
    speed = re.search(
        r"Overall training speed: (\d+) iterations in \d+:\d\d:\d\d \(\d+\.\d+ s / it\)",
        result.stdout,
    )
    assert speed and int(speed.group(1)) == 7 - 3  # minus the warm-up iterations
    assert re.search(r"copypaste: Task: toy\n.*copypaste: mse,mae", result.stdout)

    log = (out / "log.txt").read_text()
    for expected in ("Environment info", "PyTorch", "detrkit._C", "Command line arguments"):
        assert expected in log
    assert "Contents of args.config_file=" in log and "ToyModel" in log
    assert "Seed of rank 0: 0" in log  # train.seed = 0 in the toy config
    assert "Overall training speed" in log


def test_eval_only_loads_init_checkpoint(toy_run, tmp_path):
    out, _ = toy_run
    final = load_checkpoint(out / "model_final.pth")
    result = run_train_net(
        "--eval-only",
        f"train.init_checkpoint={out / 'model_final.pth'}",
        f"train.output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mse, mae = copypaste_values(result.stdout, "toy")
    expected_mse, expected_mae = toy_errors(final["model"])
    assert mse == pytest.approx(expected_mse, abs=1e-4)
    assert mae == pytest.approx(expected_mae, abs=1e-4)
    # nothing was trained or saved
    assert not list(tmp_path.glob("*.pth")) and not (tmp_path / "metrics.json").exists()

    # the same checkpoint's EMA weights, when asked for
    result = run_train_net(
        "--eval-only",
        f"train.init_checkpoint={out / 'model_final.pth'}",
        f"train.output_dir={tmp_path}",
        "train.model_ema.enabled=True",
        "train.model_ema.use_ema_weights_for_eval_only=True",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ema_mse, _ = copypaste_values(result.stdout, "toy")
    assert ema_mse == pytest.approx(toy_errors(final["ema_state"])[0], abs=1e-4)
    assert abs(ema_mse - mse) > 1e-3  # really other weights


# --- command-line errors ------------------------------------------------------------------------


def check_args(args):
    """What train_net.py does before it launches any process."""
    with one_line_errors():
        cfg = load_config(args)
        check_config(cfg, args)
    return cfg


def _check_error(capsys, argv: list[str]) -> str:
    args = default_argument_parser().parse_args(argv)
    with pytest.raises(SystemExit) as info:
        check_args(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_cli_errors_name_what_is_wrong(capsys, tmp_path):
    err = _check_error(capsys, [])
    assert "--config-file" in err
    err = _check_error(capsys, ["--config-file", str(tmp_path / "nope.py")])
    assert "nope.py" in err and "does not exist" in err
    cfg = str(TOY_CFG)
    err = _check_error(capsys, ["--config-file", cfg, "train.max_iters=1"])
    assert "train.max_iters" in err and "max_iter" in err
    err = _check_error(capsys, ["--config-file", cfg, "--num-machines", "2", "--dist-url", "auto"])
    assert "--dist-url auto" in err
    # a config without the keys training needs
    partial = tmp_path / "partial.py"
    partial.write_text(TOY_CFG.read_text().replace("lr_multiplier = ", "_lr_multiplier = "))
    err = _check_error(capsys, ["--config-file", str(partial)])
    assert "partial.py" in err and "'lr_multiplier'" in err
    partial.write_text(TOY_CFG.read_text() + "\ndel train['checkpointer']\n")
    err = _check_error(capsys, ["--config-file", str(partial)])
    assert "partial.py" in err and "'train.checkpointer'" in err
    # --eval-only needs no optimizer
    partial.write_text(TOY_CFG.read_text() + "\ndel optimizer, lr_multiplier\n")
    check_args(default_argument_parser().parse_args(["--config-file", str(partial), "--eval-only"]))
    # a good command line passes
    check_args(default_args(cfg))


def test_cpu_device_launches_gloo_processes_on_a_gpu_machine(capsys, monkeypatch):
    # a machine with one GPU: --num-gpus 2 is too many NCCL processes, but with train.device=cpu
    # they are gloo CPU processes and need no GPU each
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    cfg = str(TOY_CFG)
    argv = ["--config-file", cfg, "--num-gpus", "2", "train.device=cuda"]
    err = _check_error(capsys, argv)
    assert "--num-gpus 2 asks for more processes than the 1" in err
    args = default_args(cfg)
    args.num_gpus, args.opts = 2, ["train.device=cpu"]
    loaded = check_args(args)
    assert launch_backend(loaded) == "gloo"
    loaded.train.device = "cuda"
    assert launch_backend(loaded) is None  # launch picks NCCL


def default_args(cfg: str):
    return default_argument_parser().parse_args(["--config-file", cfg])


def test_cli_error_is_one_line_without_traceback():
    result = run_train_net("train.max_itr=5", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_itr" in lines[0], result.stderr


def test_user_error_during_the_run_is_one_line_with_the_traceback_in_log(tmp_path):
    missing = tmp_path / "no_such_weights.pth"
    result = run_train_net(
        f"train.output_dir={tmp_path}", f"train.init_checkpoint={missing}", timeout=120
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert str(missing) in lines[-1] and f"(traceback in {tmp_path / 'log.txt'})" in lines[-1]
    assert "Traceback" not in result.stderr
    assert "Traceback" in (tmp_path / "log.txt").read_text()


# --- SIGKILL and --resume --------------------------------------------------------------------

RESUME_ARGS = (
    "train.max_iter=30",
    "train.checkpointer.period=5",
    "train.log_period=5",
    "train.eval_period=0",
    "train.model_ema.enabled=True",
    "train.model_ema.decay=0.8",
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_train_net(f"train.output_dir={out}", *RESUME_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _assert_same_training_state(a: dict, b: dict) -> None:
    """Model, optimizer state, scheduler state and EMA of two checkpoints agree."""
    assert a["iteration"] == b["iteration"]
    for name in ("model", "ema_state"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.allclose(a[name][key].double(), b[name][key].double(), atol=1e-6), key
    opt_a, opt_b = a["trainer"]["optimizer"], b["trainer"]["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.allclose(value.double(), opt_b["state"][index][key].double(), atol=1e-6)
    hooks_a, hooks_b = a["trainer"]["hooks"], b["trainer"]["hooks"]
    assert hooks_a.keys() == hooks_b.keys()
    assert hooks_a["LRScheduler"] == hooks_b["LRScheduler"]
    # the resume state: the same data position and generators (timings naturally differ)
    for rank_a, rank_b in zip(
        hooks_a["ResumeStateHook"]["ranks"], hooks_b["ResumeStateHook"]["ranks"]
    ):
        assert rank_a["data"] == rank_b["data"]
        assert torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"])
        assert torch.equal(rank_a["rng"]["numpy"][1], rank_b["rng"]["numpy"][1])
        assert rank_a["rng"]["python"] == rank_b["rng"]["python"]
        assert rank_a["metrics"]["loss_mse"] == rank_b["metrics"]["loss_mse"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before the kill")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill")
        time.sleep(0.02)


def _resume_and_compare(out: Path, uninterrupted: Path, expected_start: int) -> None:
    result = run_train_net("--resume", f"train.output_dir={out}", *RESUME_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Starting training from iteration {expected_start}" in result.stdout
    # console lines of the resumed run start after the checkpoint's iteration
    iters = [int(m.group(1)) for m in map(CONSOLE_LINE.search, result.stdout.splitlines()) if m]
    assert iters and min(iters) >= expected_start
    # and the run ends exactly where the uninterrupted one did
    _assert_same_training_state(
        load_checkpoint(out / "model_final.pth"), load_checkpoint(uninterrupted / "model_final.pth")
    )


@pytest.mark.slow
def test_sigkill_mid_training_then_resume(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(f"train.output_dir={out}", *RESUME_ARGS, "model.sleep_per_iter=0.05"),
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tag = out / "last_checkpoint"
    _wait_for(lambda: tag.exists() and tag.read_text() == "model_0000014.pth", proc)
    time.sleep(random.uniform(0.0, 0.2))  # somewhere in the next iterations
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    name = tag.read_text()
    assert name in ("model_0000014.pth", "model_0000019.pth")
    saved = load_checkpoint(out / name)  # complete and readable
    last = saved["iteration"]
    assert saved["trainer"]["iteration"] == last == int(name[6:13])
    # the state on disk is what the uninterrupted run had at that iteration
    _assert_same_training_state(saved, load_checkpoint(uninterrupted / name))
    _resume_and_compare(out, uninterrupted, expected_start=last + 1)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(tmp_path, uninterrupted):
    out = tmp_path / "killed_in_save"
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        _command(f"train.output_dir={out}", *RESUME_ARGS, script=PAUSED_SAVE),
        env={**_env(), "TOY_PAUSE_AT_SAVE": "3", "TOY_PAUSE_MARKER": str(marker)},
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # the third checkpoint (after iteration 14) stalls half-written
    _wait_for(marker.exists, proc)
    partial = [p for p in out.iterdir() if p.name.startswith(".model_0000014.pth")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert (out / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (out / "model_0000014.pth").exists()
    with pytest.raises(Exception):  # noqa: B017 (any unpickling error): it really is truncated
        torch.load(partial[0], weights_only=True)
    saved = load_checkpoint(out / "model_0000009.pth")
    assert saved["iteration"] == 9
    _assert_same_training_state(saved, load_checkpoint(uninterrupted / "model_0000009.pth"))
    _resume_and_compare(out, uninterrupted, expected_start=10)


# --- several processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_on_both_batches(tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    common = ("train.max_iter=10", "train.eval_period=0", "train.log_period=5")
    result = run_train_net(
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        f"train.output_dir={ddp_out}",
        f"model.dump_params_dir={ddp_out / 'params'}",
        *common,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (ddp_out / "log.txt.rank1").exists()
    assert "World size: 2" in (ddp_out / "log.txt.rank1").read_text()
    rank0 = torch.load(ddp_out / "params" / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_out / "params" / "params_rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # the replicas never drift apart

    # oracle: one process on the two ranks' batches together (all losses are means, so the
    # averaged gradients of the two ranks are the gradient on the concatenated batch)
    result = run_train_net(
        f"train.output_dir={single_out}",
        f"model.dump_params_dir={single_out / 'params'}",
        "dataloader.train.simulate_world_size=2",
        *common,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(single_out / "params" / "params_rank0.pt", weights_only=True)
    torch.manual_seed(0)  # train.seed of the toy config: the initial weights of both runs
    initial = ToyModel()
    for key in rank0:
        assert torch.allclose(rank0[key], single[key], atol=1e-5), key
    assert not torch.allclose(rank0["net.0.weight"], initial.net[0].weight)


@pytest.mark.slow
def test_failing_rank_ends_the_job(tmp_path):
    result = run_train_net(
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        f"train.output_dir={tmp_path}",
        "model.raise_on_rank=1",
        "model.raise_at_iter=3",
        timeout=240,  # rank 0 waits in a collective: it has to be stopped, not hang
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert "rank 1 failed: RuntimeError: toy failure at iteration 3 on rank 1" in last_line
    rank1_log = (tmp_path / "log.txt.rank1").read_text()
    assert "Rank 1 failed with an exception" in rank1_log
    assert "toy failure at iteration 3 on rank 1" in rank1_log
    assert not (tmp_path / "model_final.pth").exists()
