"""A tiny regression "detector" to exercise the engine end to end (test-only, not a product).

- `ToyModel`: an MLP; in training mode `model(batch)` returns a dict of losses, in eval mode a
  list of `{"pred": tensor}`. Knobs for engine tests: a NaN loss at a given iteration, an
  exception on a given rank, a sleep per iteration (so a run can be killed mid-way), and
  dumping its parameters at evaluation (to compare ranks).
- `ToyLoader`: an infinite, deterministic loader of random batches (lists of dicts), drawn
  from `seed + 1000 * rank` so that ranks see different data; it saves and restores its position
  like the detection train loader (`state_dict` / `load_state_dict`).
- `ToyTestLoader`: a finite test set, split between ranks.
- `ToyEvaluator`: reset/process/evaluate, returning `{"toy": {"mse": ..., "mae": ...}}`.
"""

from __future__ import annotations

import itertools
import os
import random
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from detrkit.utils import comm

__all__ = ["ToyEvaluator", "ToyLoader", "ToyModel", "ToyTestLoader"]


def _true_weight(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """The linear map every toy data set is drawn from (the same on all ranks)."""
    return torch.randn(in_dim, out_dim, generator=torch.Generator().manual_seed(seed))


def _make_batch(generator: torch.Generator, weight: torch.Tensor, batch_size: int) -> list[dict]:
    x = torch.randn(batch_size, weight.shape[0], generator=generator)
    noise = 0.01 * torch.randn(batch_size, weight.shape[1], generator=generator)
    y = x @ weight + noise
    return [{"x": x[i], "y": y[i]} for i in range(batch_size)]


class ToyModel(nn.Module):
    def __init__(
        self,
        in_dim: int = 8,
        out_dim: int = 4,
        hidden_dim: int = 16,
        nan_at_iter: int = -1,
        raise_at_iter: int = -1,
        raise_on_rank: int = -1,
        sleep_per_iter: float = 0.0,
        dump_params_dir: str = "",
        rng_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )
        # training forward passes run so far (an integer buffer: checkpointed, EMA-copied)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.nan_at_iter = nan_at_iter
        self.raise_at_iter = raise_at_iter
        self.raise_on_rank = raise_on_rank
        self.sleep_per_iter = sleep_per_iter
        self.dump_params_dir = dump_params_dir
        # input noise drawn from torch's, numpy's and python's global generators in training
        self.rng_noise = rng_noise

    @property
    def device(self) -> torch.device:
        return self.num_steps.device

    def forward(self, batch: list[dict]):
        x = torch.stack([d["x"] for d in batch]).to(self.device)
        if self.training and self.rng_noise:
            shift = float(np.random.randn()) + random.random()
            x = x + self.rng_noise * (torch.randn_like(x) + shift)
        pred = self.net(x)
        if not self.training:
            if self.dump_params_dir:
                os.makedirs(self.dump_params_dir, exist_ok=True)
                path = os.path.join(self.dump_params_dir, f"params_rank{comm.get_rank()}.pt")
                torch.save({k: v.detach().cpu() for k, v in self.named_parameters()}, path)
            return [{"pred": p} for p in pred]

        iteration = int(self.num_steps.item())
        self.num_steps += 1
        if self.sleep_per_iter > 0:
            time.sleep(self.sleep_per_iter)
        if iteration == self.raise_at_iter and comm.get_rank() == self.raise_on_rank:
            raise RuntimeError(f"toy failure at iteration {iteration} on rank {comm.get_rank()}")

        y = torch.stack([d["y"] for d in batch]).to(self.device)
        loss_mse = F.mse_loss(pred.float(), y)
        if iteration == self.nan_at_iter:
            loss_mse = loss_mse * float("nan")
        loss_l1 = 0.5 * F.l1_loss(pred.float(), y)
        return {"loss_mse": loss_mse, "loss_l1": loss_l1}


class ToyLoader:
    """Infinite loader cycling over `num_batches` fixed random batches (one batch by default,
    so the data of an iteration does not depend on where the loader started).

    Rank r draws from `seed + 1 + 1000 * r`. `simulate_world_size=n` makes one process yield
    what n ranks would see together (their batches concatenated): the single-process twin of
    an n-process data-parallel run.
    """

    def __init__(
        self,
        batch_size: int = 8,
        in_dim: int = 8,
        out_dim: int = 4,
        num_batches: int = 1,
        seed: int = 0,
        simulate_world_size: int = 1,
    ) -> None:
        self.batch_size = batch_size
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_batches = num_batches
        self.seed = seed
        self.simulate_world_size = simulate_world_size
        self._position = 0  # batches handed out

    def state_dict(self) -> dict:
        return {"position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._position = int(state["position"])

    def _batches_of_rank(self, rank: int) -> list[list[dict]]:
        weight = _true_weight(self.in_dim, self.out_dim, self.seed)
        generator = torch.Generator().manual_seed(self.seed + 1 + 1000 * rank)
        return [_make_batch(generator, weight, self.batch_size) for _ in range(self.num_batches)]

    def __iter__(self):
        if self.simulate_world_size > 1:
            per_rank = [self._batches_of_rank(r) for r in range(self.simulate_world_size)]
            batches = [
                list(itertools.chain.from_iterable(b[i] for b in per_rank))
                for i in range(self.num_batches)
            ]
        else:
            batches = self._batches_of_rank(comm.get_rank())
        return self._stream(batches)

    def _stream(self, batches: list[list[dict]]):
        while True:
            batch = batches[self._position % len(batches)]
            self._position += 1
            yield batch


class ToyTestLoader:
    """`num_batches` fixed batches in total, split between ranks (rank r takes r, r + n, ...)."""

    def __init__(
        self, batch_size: int = 4, in_dim: int = 8, out_dim: int = 4, num_batches: int = 4, seed=0
    ) -> None:
        weight = _true_weight(in_dim, out_dim, seed)
        generator = torch.Generator().manual_seed(seed + 999_999)
        self._batches = [_make_batch(generator, weight, batch_size) for _ in range(num_batches)]

    def _mine(self) -> list[list[dict]]:
        return self._batches[comm.get_rank() :: comm.get_world_size()]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self):
        return iter(self._mine())


class ToyEvaluator:
    """Mean squared and absolute error of the predictions, over all ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sq_err = 0.0
        self._abs_err = 0.0
        self._count = 0

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            diff = output["pred"].detach().float().cpu() - sample["y"]
            self._sq_err += float((diff**2).sum())
            self._abs_err += float(diff.abs().sum())
            self._count += diff.numel()

    def evaluate(self) -> dict:
        parts = comm.all_gather((self._sq_err, self._abs_err, self._count))
        if not comm.is_main_process():
            return {}
        sq = sum(p[0] for p in parts)
        ab = sum(p[1] for p in parts)
        count = max(sum(p[2] for p in parts), 1)
        return {"toy": {"mse": sq / count, "mae": ab / count}}
