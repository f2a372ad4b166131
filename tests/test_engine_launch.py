"""Command line and process launching: argument parsing, launch checks, torchrun/SLURM
environments, spawned gloo processes and a failing rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from detrkit.engine import default_argument_parser, launch
from detrkit.engine.cli import default_dist_url
from detrkit.engine.launch import check_launch_args, first_slurm_host, resolve_backend

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = REPO_ROOT / "tests" / "toy" / "dist_probe.py"


# --- command line ----------------------------------------------------------------------------


def test_parser_defaults_and_overrides():
    parser = default_argument_parser()
    args = parser.parse_args(
        ["--config-file", "cfg.py", "--num-gpus", "2", "train.max_iter=7", "optimizer.lr=1e-4"]
    )
    assert args.config_file == "cfg.py"
    assert args.num_gpus == 2 and args.num_machines == 1 and args.machine_rank == 0
    assert not args.resume and not args.eval_only
    assert args.opts == ["train.max_iter=7", "optimizer.lr=1e-4"]
    # the default rendezvous: a local TCP port
    host, port = args.dist_url.removeprefix("tcp://").split(":")
    assert args.dist_url.startswith("tcp://") and host == "127.0.0.1" and 1024 < int(port) < 65536
    assert parser.parse_args([]).opts == []
    assert "--machine-rank 0 --num-machines 2" in parser.epilog


def test_default_dist_url_depends_on_the_user(monkeypatch):
    """Two users of one machine get different ports by default; one user always the same."""
    ports = {}
    for uid in range(1000, 1100):
        monkeypatch.setattr(os, "getuid", lambda uid=uid: uid)
        url = default_dist_url()
        host, port = url.removeprefix("tcp://").split(":")
        assert url.startswith("tcp://") and host == "127.0.0.1"
        assert 1024 < int(port) < 65536
        assert default_dist_url() == url  # stable for a user
        ports[uid] = int(port)
    assert len(set(ports.values())) == len(ports)  # no two of these users collide
    # the parser's default is the current user's (uid 1099 here)
    assert default_argument_parser().parse_args([]).dist_url.endswith(f":{ports[1099]}")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--num-gpus", "0"], "--num-gpus: expected a positive integer, got '0'"),
        (["--num-gpus", "two"], "--num-gpus: expected a positive integer, got 'two'"),
        (["--num-machines", "2", "--machine-rank", "2"], "--machine-rank: 2 is not below"),
        (["--machine-rank", "-1"], "--machine-rank: expected an integer >= 0"),
        (["train.max_iter=1", "--resume"], "'--resume' comes after the config overrides"),
    ],
)
def test_parser_errors_are_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        default_argument_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


# --- launch checks ---------------------------------------------------------------------------


def test_check_launch_args_messages(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"--dist-url auto works on one machine only"):
        check_launch_args(2, num_machines=2, machine_rank=0, dist_url="auto")
    with pytest.raises(ValueError, match=r"--machine-rank 3 is not valid for --num-machines 2"):
        check_launch_args(1, num_machines=2, machine_rank=3, dist_url="tcp://1.2.3.4:5")
    with pytest.raises(ValueError, match=r"--dist-url 'http://x:1' is not valid"):
        check_launch_args(2, dist_url="http://x:1")
    with pytest.raises(ValueError, match=r"has no port"):
        check_launch_args(2, dist_url="tcp://127.0.0.1")
    check_launch_args(2, dist_url="auto")  # fine on one machine
    check_launch_args(1, num_machines=1, dist_url="auto")

    # more processes than visible GPUs on a CUDA machine
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--num-gpus 2 asks for more processes than the 1"):
        check_launch_args(2, dist_url="auto")
    with pytest.raises(ValueError, match=r"--num-gpus 2"):
        launch(lambda: None, 2, dist_url="auto")


def test_backend_choice(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_backend() == "gloo" and resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match=r"backend 'nccl' needs CUDA"):
        resolve_backend("nccl")
    with pytest.raises(ValueError, match=r"backend 'mpi' is not valid; accepted: 'nccl'"):
        resolve_backend("mpi")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert resolve_backend() == "nccl" and resolve_backend("gloo") == "gloo"


def test_gloo_processes_on_a_gpu_machine(monkeypatch):
    # CPU processes asked for on a machine with one GPU: more of them than GPUs is fine, and the
    # workers are started with gloo rather than NCCL
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    check_launch_args(3, dist_url="auto", backend="gloo")
    started = {}

    def fake_start_processes(fn, args, nprocs, **kwargs):
        started.update(nprocs=nprocs, backend=args[4])
        # a context whose processes have all ended
        return types.SimpleNamespace(processes=[], join=lambda: True)

    monkeypatch.setattr("torch.multiprocessing.start_processes", fake_start_processes)
    launch(lambda: None, 3, dist_url="auto", backend="gloo")
    assert started == {"nprocs": 3, "backend": "gloo"}
    with pytest.raises(ValueError, match=r"--num-gpus 2 asks for more processes"):
        launch(lambda: None, 2, dist_url="auto")  # the default on a GPU machine: NCCL
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    launch(lambda: None, 2, dist_url="auto")
    assert started == {"nprocs": 2, "backend": "nccl"}


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node01", "node01"),
        ("gpu[03-05,9],cpu1", "gpu03"),
        ("gpu[7,9-10]", "gpu7"),
        ("a-b[001-002]", "a-b001"),
        ("host1,host2", "host1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_environment_world_size_one_runs_in_process(monkeypatch):
    """Under torchrun with one process (or a one-task SLURM step), nothing is spawned."""
    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    launch(lambda x: calls.append((x, os.getpid())), 4, args=("torchrun",))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    # a SLURM allocation of one task spawns like a workstation; one process -> in-process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    launch(lambda x: calls.append((x, os.getpid())), 1, args=("slurm",))
    assert calls == [("torchrun", os.getpid()), ("slurm", os.getpid())]


# --- real processes ----------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "LOCAL_", "GROUP_"))
        and k not in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
    }
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_ranks(out: Path) -> dict[int, dict]:
    return {
        info["rank"]: info for info in (json.loads(p.read_text()) for p in out.glob("rank*.json"))
    }


@pytest.mark.slow
def test_spawn_two_gloo_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path), "2"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    ranks = _read_ranks(tmp_path)
    assert sorted(ranks) == [0, 1]
    for rank, info in ranks.items():
        assert info["world_size"] == 2
        assert info["local_rank"] == rank and info["local_size"] == 2
        assert info["backend"] == "gloo"
        assert info["all_reduce_sum"] == 1.0 + 2.0
        # CPU processes share the cores instead of each taking all of them
        assert info["num_threads"] >= 1 and 2 * info["num_threads"] <= max(2, os.cpu_count())
    assert ranks[0]["pid"] != ranks[1]["pid"]


@pytest.mark.slow
def test_failing_rank_stops_the_job(tmp_path):
    result = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path), "2", "--fail-rank", "1"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=180,  # the surviving rank waits in an all-reduce: it must be stopped, not hang
    )
    assert result.returncode != 0
    # the parent names the failing rank and its error in one line
    assert "rank 1 failed: ValueError: probe failure requested on rank 1" in result.stderr
    # and the failing process printed its traceback with its rank
    assert "[rank 1]" in result.stderr and "Traceback" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))  # rank 0 never got past the all-reduce


def _run_env_job(tmp_path: Path, envs: list[dict[str, str]], extra_args=()) -> dict[int, dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROBE), str(tmp_path), "4", *extra_args],
            env=_clean_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    return _read_ranks(tmp_path)


@pytest.mark.slow
def test_torchrun_environment_wins(tmp_path):
    """RANK/WORLD_SIZE/LOCAL_RANK set (as torchrun does): one process per rank, `--num-gpus 4`
    on the command line is ignored and nothing is spawned."""
    port = str(_free_port())
    envs = [
        {
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        for r in range(2)
    ]
    ranks = _run_env_job(tmp_path, envs)
    assert sorted(ranks) == [0, 1]
    for rank, info in ranks.items():
        assert (info["world_size"], info["local_rank"], info["local_size"]) == (2, rank, 2)
        assert info["all_reduce_sum"] == 3.0


@pytest.mark.slow
def test_slurm_environment_wins(tmp_path):
    """A SLURM step of two tasks: ranks from SLURM_PROCID/SLURM_LOCALID, the master address from
    the node list, the port from --dist-url."""
    port = _free_port()
    envs = [
        {
            "SLURM_PROCID": str(r),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(r),
            "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost",
            "SLURM_JOB_ID": "12345",
        }
        for r in range(2)
    ]
    ranks = _run_env_job(tmp_path, envs, extra_args=("--dist-url", f"tcp://127.0.0.1:{port}"))
    assert sorted(ranks) == [0, 1]
    for rank, info in ranks.items():
        assert (info["world_size"], info["local_rank"], info["local_size"]) == (2, rank, 2)
        assert info["all_reduce_sum"] == 3.0
