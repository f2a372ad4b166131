"""`--num-machines 2` for real: two "machines" are two network namespaces joined by a veth pair
(addresses 10.213.0.1 and 10.213.0.2 exist only inside them), one gloo process each. Training
stays in sync, and killing one machine's processes ends the other with an error naming the lost
peer instead of a hang. Needs root and iproute2; skipped otherwise."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toy import ToyModel

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
TOY_CFG = REPO_ROOT / "tests" / "configs" / "toy_train.py"
ADDRESSES = ("10.213.0.1", "10.213.0.2")

pytestmark = pytest.mark.slow


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def machines():
    """Two namespaces `(name, veth)` joined by a veth pair; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    tag = f"dk{os.getpid()}"
    names = (f"{tag}m0", f"{tag}m1")
    links = (f"{tag}v0", f"{tag}v1")
    try:
        for name in names:
            made = _ip("netns", "add", name)
            if made.returncode != 0:
                pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
        steps = [("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for name, link, address in zip(names, links, ADDRESSES):
            steps += [
                ("link", "set", link, "netns", name),
                ("-n", name, "addr", "add", f"{address}/24", "dev", link),
                ("-n", name, "link", "set", link, "up"),
                ("-n", name, "link", "set", "lo", "up"),
            ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (ip {' '.join(step)}): {done.stderr}")
        yield tuple(zip(names, links))
    finally:
        for name in names:  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "delete", name)


def _start(machine, rank: int, port: int, out: Path, *overrides: str) -> subprocess.Popen:
    name, link = machine
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), GLOO_SOCKET_IFNAME=link)
    command = [
        *("ip", "netns", "exec", name, sys.executable, str(TRAIN_NET)),
        *("--config-file", str(TOY_CFG), "--num-machines", "2", "--machine-rank", str(rank)),
        *("--dist-url", f"tcp://{ADDRESSES[0]}:{port}"),
        f"train.output_dir={out / f'machine{rank}'}",
        "train.eval_period=0",
        *overrides,
    ]
    return subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group per machine: killed together
    )


def _stop_all(processes) -> None:
    for proc in processes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_machines_stay_in_sync(machines, tmp_path):
    port = random.randint(20000, 40000)
    dump = tmp_path / "params"
    procs = [
        _start(m, rank, port, tmp_path, "train.max_iter=12", f"model.dump_params_dir={dump}")
        for rank, m in enumerate(machines)
    ]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        _stop_all(procs)
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    rank0 = torch.load(dump / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "params_rank1.pt", weights_only=True)
    torch.manual_seed(0)  # train.seed of the toy config gives both the same initial weights
    initial = ToyModel().state_dict()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert not torch.equal(rank0["net.0.weight"], initial["net.0.weight"])


def test_a_killed_machine_ends_the_other_with_the_lost_peer_named(machines, tmp_path):
    port = random.randint(20000, 40000)
    args = ("train.max_iter=100000", "model.sleep_per_iter=0.05", "train.log_period=1")
    procs = [_start(m, rank, port, tmp_path, *args) for rank, m in enumerate(machines)]
    metrics = tmp_path / "machine0" / "metrics.json"
    try:
        deadline = time.monotonic() + 180
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 10:
            assert all(p.poll() is None for p in procs), "a machine ended before the kill"
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)  # machine 1 is gone, all its processes at once
        _, err = procs[0].communicate(timeout=120)  # a hang fails here
    finally:
        _stop_all(procs)
    assert procs[0].returncode not in (0, None)
    last_line = err.strip().splitlines()[-1]
    assert f"lost the connection to the process at {ADDRESSES[1]}" in last_line, err[-3000:]
