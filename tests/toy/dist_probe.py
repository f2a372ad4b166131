"""Launch a tiny distributed job and report what each process saw (for the launch tests).

    python tests/toy/dist_probe.py OUT_DIR NUM_PROCS [--fail-rank R] [--dist-url URL]

Each process writes OUT_DIR/rank<R>.json with its rank, world size, local rank/size, backend,
the sum of an all-reduce over ranks and its thread count. With `--fail-rank R`, rank R raises
after the process group is up while the others wait in a collective (they must be stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from detrkit.engine import launch
from detrkit.utils import comm


def probe(out_dir: str, fail_rank: int) -> None:
    rank = comm.get_rank()
    if rank == fail_rank:
        raise ValueError(f"probe failure requested on rank {rank}")
    value = torch.tensor([float(rank + 1)])
    if comm.get_world_size() > 1:
        dist.all_reduce(value)  # ranks != fail_rank wait here when one fails
    info = {
        "rank": rank,
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "backend": dist.get_backend() if comm.is_dist_initialized() else None,
        "all_reduce_sum": float(value.item()),
        "num_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("num_procs", type=int)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--dist-url", default="auto")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    launch(probe, args.num_procs, dist_url=args.dist_url, args=(args.out_dir, args.fail_rank))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report like a CLI would: one line, non-zero exit
        print(f"dist_probe: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
