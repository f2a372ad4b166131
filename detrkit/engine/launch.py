"""Starting one or many training processes.

`launch(main_func, num_gpus_per_machine, ...)` runs `main_func(*args)`:

- in this process, without a process group, when the world size is 1;
- in `num_gpus_per_machine` spawned processes per machine otherwise, joined into one process
  group: NCCL with one GPU per process when CUDA is available, gloo CPU processes when it is not
  or when `backend="gloo"` asks for them (a CPU run on a GPU machine);
- under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) or a SLURM job step of several tasks
  (SLURM_PROCID, SLURM_NTASKS > 1, SLURM_LOCALID), in this process with the rank and world size
  the environment gives: the environment wins over the command-line counts, nothing is spawned.

When a spawned process fails, the others are terminated and `launch` raises `LaunchError`
naming the rank; the failing rank's traceback is in its log file (`log.txt.rankN`) and on stderr.
When the ranks stop together on a signal (`preemption.py`), `launch` raises `TrainingPreempted`;
a stop signal sent to the parent of spawned processes is passed on to them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detrkit.utils import comm

from .preemption import STOP_SIGNALS, TrainingPreempted

__all__ = ["DEFAULT_TIMEOUT", "LaunchError", "check_launch_args", "launch", "resolve_backend"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class LaunchError(RuntimeError):
    """A spawned process failed; `rank` is its global rank (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _torchrun_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _slurm_env() -> bool:
    if not all(k in os.environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        return False
    # one task (e.g. `sbatch` running python directly) spawns its processes like a workstation
    return int(os.environ["SLURM_NTASKS"]) > 1


def resolve_backend(backend: str | None = None) -> str:
    """The process-group backend: `backend` if given ("nccl" or "gloo"), else NCCL when CUDA is
    available and gloo when it is not."""
    if backend is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(
            f"launch: backend {backend!r} is not valid; accepted: 'nccl' (one GPU per process), "
            "'gloo' (CPU processes) or None (nccl when CUDA is available, else gloo)"
        )
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("launch: backend 'nccl' needs CUDA, which is not available; use 'gloo'")
    return backend


def check_launch_args(
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    backend: str | None = None,
) -> None:
    """Raise ValueError with a one-line message for process counts, URLs or a backend that
    cannot work."""
    if int(num_gpus_per_machine) < 1:
        raise ValueError(f"--num-gpus {num_gpus_per_machine} is not valid; accepted: >= 1")
    if int(num_machines) < 1:
        raise ValueError(f"--num-machines {num_machines} is not valid; accepted: >= 1")
    if not 0 <= int(machine_rank) < int(num_machines):
        raise ValueError(
            f"--machine-rank {machine_rank} is not valid for --num-machines {num_machines}; "
            f"accepted: 0 .. {int(num_machines) - 1}"
        )
    if _torchrun_env() or _slurm_env():
        return  # the environment decides
    if num_gpus_per_machine * num_machines == 1:
        return
    if resolve_backend(backend) == "nccl" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} asks for more processes than the "
            f"{torch.cuda.device_count()} visible CUDA device(s); accepted: 1 .. "
            f"{torch.cuda.device_count()} (or set CUDA_VISIBLE_DEVICES)"
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError(
                f"--dist-url auto works on one machine only (--num-machines {num_machines}); "
                "pass tcp://<ip of machine 0>:<port> to every machine"
            )
    elif dist_url:
        parsed = urlparse(dist_url)
        if parsed.scheme not in ("tcp", "file", "env"):
            raise ValueError(
                f"--dist-url {dist_url!r} is not valid; accepted: tcp://<host>:<port>, "
                "file:///<shared path>, env:// or auto"
            )
        if parsed.scheme == "tcp" and parsed.port is None:
            raise ValueError(f"--dist-url {dist_url!r} has no port; accepted: tcp://<host>:<port>")


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    backend: str | None = None,
) -> None:
    """Run `main_func(*args)` on every process of the job (see the module docstring).

    Args:
        num_gpus_per_machine: processes per machine (GPUs, or CPU processes with gloo).
        num_machines, machine_rank: for jobs over several machines.
        dist_url: the process group's init URL; "auto" picks a free port (one machine only);
            None uses `tcp://127.0.0.1:<free port>` on one machine.
        timeout: for collective operations.
        backend: "nccl", "gloo" or None (nccl when CUDA is available, else gloo).
    """
    if _torchrun_env() or _slurm_env():
        source = "torchrun" if _torchrun_env() else "slurm"
        env_world = int(os.environ["WORLD_SIZE" if source == "torchrun" else "SLURM_NTASKS"])
        asked = num_gpus_per_machine * num_machines
        if asked not in (1, env_world):
            logger.warning(
                "--num-gpus %d x --num-machines %d asks for %d processes, but the %s "
                "environment has %d: the environment wins",
                num_gpus_per_machine,
                num_machines,
                asked,
                source,
                env_world,
            )
        _run_from_env(main_func, args, timeout, source, dist_url, resolve_backend(backend))
        return

    check_launch_args(num_gpus_per_machine, num_machines, machine_rank, dist_url, backend)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        main_func(*args)
        return

    if dist_url in (None, "auto"):
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and not dist_url.startswith("file://"):
        host = urlparse(dist_url).hostname
        if host in ("127.0.0.1", "localhost"):
            logger.warning(
                "--dist-url %s points at this machine while using several machines", dist_url
            )

    backend = resolve_backend(backend)
    # failing workers leave a note here (time, error), so that the rank that failed first (the
    # cause) can be told from the ranks that then lost their peer
    with tempfile.TemporaryDirectory(prefix="detrkit-launch-") as failure_dir:
        try:
            context = mp.start_processes(
                _spawned_worker,
                nprocs=num_gpus_per_machine,
                args=(
                    main_func,
                    world_size,
                    num_gpus_per_machine,
                    machine_rank,
                    backend,
                    dist_url,
                    args,
                    timeout,
                    failure_dir,
                ),
                daemon=False,
                start_method="spawn",
                join=False,
            )
            with _forwarding_stop_signals(context.processes):
                while not context.join():
                    pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            rank = machine_rank * num_gpus_per_machine + e.error_index
            if isinstance(e, mp.ProcessExitedException):
                how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
                what = f"died with {how}"
            else:
                what = f"failed: {_last_error_line(e.msg)}"
            first = _first_failure(failure_dir)
            if first is not None and first[0] != rank:
                rank, what = first[0], f"failed: {first[1]}"
            message = f"rank {rank} {what}; the other processes were stopped"
            raise LaunchError(message, rank=rank) from None
        preempted = _preemption_note(failure_dir)
        if preempted is not None:
            raise TrainingPreempted(preempted)


@contextlib.contextmanager
def _forwarding_stop_signals(processes: list) -> Any:
    """While the ranks run, a stop signal sent to this (parent) process is passed on to them,
    so that they save and stop together instead of being orphaned."""

    def forward(signum: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _preemption_note(failure_dir: str) -> str | None:
    """The message a rank left when it stopped on a signal (all ranks stop together)."""
    path = os.path.join(failure_dir, "preempted")
    with contextlib.suppress(OSError), open(path) as f:
        return f.read()
    return None


def _first_failure(failure_dir: str) -> tuple[int, str] | None:
    """(rank, error line) of the earliest note left by a failing worker, if any."""
    notes = []
    for name in os.listdir(failure_dir):
        if name.endswith(".tmp") or not name.startswith("rank"):
            continue
        with contextlib.suppress(OSError, ValueError), open(os.path.join(failure_dir, name)) as f:
            when, rank, error = f.read().split("\n", 2)
            notes.append((float(when), int(rank), error.strip()))
    if not notes:
        return None
    _, rank, error = min(notes)
    return rank, error


# gloo's words for a peer whose process died (its sockets were closed or reset)
_LOST_PEER = re.compile(
    r"(?:Read error|Write error|Connection closed by peer|Connection reset by peer)"
    r".*?\[([^\]]+)\]:\d+(?:: (Connection reset by peer|[^.]*))?"
)


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    lost = _LOST_PEER.search(lines[-1])
    if lost is not None:
        cause = lost.group(2) or "connection closed"
        return (
            f"lost the connection to the process at {lost.group(1)} ({cause}): a process of the "
            "job (on that machine) died or became unreachable; see its log"
        )
    return lines[-1]


def _spawned_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    backend: str,
    dist_url: str,
    args: tuple,
    timeout: datetime.timedelta,
    failure_dir: str | None = None,
) -> None:
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        _init_process_group(backend, dist_url, world_size, global_rank, local_rank, timeout)
        # ranks of one machine are consecutive: machine m holds [m * n, (m + 1) * n)
        num_machines = world_size // num_gpus_per_machine
        for m in range(num_machines):
            ranks = list(range(m * num_gpus_per_machine, (m + 1) * num_gpus_per_machine))
            group = dist.new_group(ranks)  # every rank must create every group
            if m == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        _limit_cpu_threads(backend, num_gpus_per_machine)
        comm.synchronize()
        main_func(*args)
    except TrainingPreempted as e:
        # every rank stopped after the same iteration; the parent reports it
        _shutdown()
        if failure_dir is not None and global_rank == 0:
            note = os.path.join(failure_dir, "preempted")
            with open(note + ".tmp", "w") as f:
                f.write(e.message)
            os.replace(note + ".tmp", note)
        return
    except Exception:
        _report_failure(global_rank, failure_dir)
        raise
    _shutdown()


def _run_from_env(
    main_func: Callable[..., Any],
    args: tuple,
    timeout: datetime.timedelta,
    source: str,
    dist_url: str | None,
    backend: str,
) -> None:
    """One process of a job started by torchrun or SLURM: ranks come from the environment."""
    if source == "torchrun":
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        machine_key = os.environ.get("GROUP_RANK") or socket.gethostname()
        init_method = "env://"
    else:
        rank = int(os.environ["SLURM_PROCID"])
        world_size = int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ["SLURM_LOCALID"])
        machine_key = os.environ.get("SLURM_NODEID") or socket.gethostname()
        if "MASTER_ADDR" not in os.environ:
            nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("SLURM job without SLURM_NODELIST: set MASTER_ADDR to node 0")
            os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
        if "MASTER_PORT" not in os.environ:
            port = urlparse(dist_url).port if dist_url and dist_url.startswith("tcp://") else None
            # the default: a port every task derives alike from the job id
            job_id = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
            os.environ["MASTER_PORT"] = str(port or 20000 + job_id % 20000)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        init_method = "env://"
    logger.info(
        "Using the %s environment: rank %d of %d (local rank %d)",
        source,
        rank,
        world_size,
        local_rank,
    )

    if world_size == 1:
        main_func(*args)
        return
    try:
        _init_process_group(backend, init_method, world_size, rank, local_rank, timeout)
        # machines are told apart by the key each rank reports (node rank or host name)
        keys = [None] * world_size
        dist.all_gather_object(keys, str(machine_key))
        local_group = None
        for key in sorted(set(keys), key=keys.index):
            group = dist.new_group([r for r, k in enumerate(keys) if k == key])
            if key == str(machine_key):
                local_group = group
        comm._LOCAL_PROCESS_GROUP = local_group
        _limit_cpu_threads(backend, keys.count(str(machine_key)))
        comm.synchronize()
        main_func(*args)
    except TrainingPreempted:
        _shutdown()
        raise
    except Exception:
        _report_failure(rank)
        raise
    _shutdown()


def _init_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    local_rank: int,
    timeout: datetime.timedelta,
) -> None:
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=world_size,
            rank=rank,
            timeout=timeout,
            **kwargs,
        )
    except Exception as e:
        raise RuntimeError(
            f"rank {rank}: could not join the process group at {init_method} ({e}); is the "
            "port free and reachable? --dist-url auto picks a free port on one machine"
        ) from e


def _limit_cpu_threads(backend: str, processes_per_machine: int) -> None:
    """CPU processes share the cores instead of each starting one thread per core."""
    if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_per_machine))


def _report_failure(rank: int, failure_dir: str | None = None) -> None:
    """Log the exception with the rank in the process's log (detrkit logger: the rank's log
    file once default_setup has run) and on stderr; leave a note for the parent."""
    when = time.time()
    text = traceback.format_exc()
    if failure_dir is not None:
        with contextlib.suppress(OSError):
            note = os.path.join(failure_dir, f"rank{rank}")
            with open(note + ".tmp", "w") as f:
                f.write(f"{when}\n{rank}\n{_last_error_line(text)}")
            os.replace(note + ".tmp", note)
    detrkit_logger = logging.getLogger("detrkit")
    if detrkit_logger.handlers:
        # console (stderr on ranks > 0) and the rank's log file
        detrkit_logger.error("Rank %d failed with an exception:\n%s", rank, text)
    else:  # failed before logging was set up
        print(f"[rank {rank}] failed with an exception:\n{text}", file=sys.stderr, flush=True)


def _shutdown() -> None:
    if dist.is_initialized():
        try:
            comm.synchronize()
        finally:
            comm._LOCAL_PROCESS_GROUP = None
            dist.destroy_process_group()


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if not first:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, _, ranges, suffix = first.groups()
    if not ranges:
        return prefix + (suffix or "")
    start = ranges.split(",")[0].split("-")[0]
    return prefix + start + (suffix or "")
