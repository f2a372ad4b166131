"""Helpers over torch.distributed that also work when it is not initialized (world size 1).

Objects are exchanged through a gloo group so that Python objects (lists of predictions,
metrics) can be gathered the same way on CPU-only and NCCL jobs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Set by `detrkit.engine.launch` to the group of processes on this machine.
_LOCAL_PROCESS_GROUP = None


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def get_local_rank() -> int:
    """Rank of this process among the processes of its machine."""
    if not is_dist_initialized():
        return 0
    if _LOCAL_PROCESS_GROUP is not None:
        return dist.get_rank(group=_LOCAL_PROCESS_GROUP)
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_size() -> int:
    """Number of processes on this machine."""
    if not is_dist_initialized():
        return 1
    if _LOCAL_PROCESS_GROUP is not None:
        return dist.get_world_size(group=_LOCAL_PROCESS_GROUP)
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op for world size 1."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@functools.lru_cache
def _object_group():
    """A gloo group for exchanging Python objects (NCCL can only move CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(data: Any, group=None) -> list[Any]:
    """Gather any picklable object from every process; returns one entry per rank."""
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _object_group()
    if dist.get_world_size(group) == 1:
        return [data]
    output: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(output, data, group=group)
    return output


def gather(data: Any, dst: int = 0, group=None) -> list[Any]:
    """Gather picklable objects on rank `dst`; other ranks receive an empty list."""
    if get_world_size() == 1:
        return [data]
    group = group if group is not None else _object_group()
    if dist.get_world_size(group) == 1:
        return [data]
    if dist.get_rank(group=group) == dst:
        output: list[Any] = [None] * dist.get_world_size(group)
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def shared_random_seed() -> int:
    """A random integer drawn on rank 0 and shared by all processes (e.g. to seed a sampler)."""
    seed = int(np.random.randint(2**31))
    return all_gather(seed)[0]


def reduce_dict(
    input_dict: dict[str, torch.Tensor], average: bool = True
) -> dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors, in a fixed key order, so every rank gets the result."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k] for k in names], dim=0)
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))
