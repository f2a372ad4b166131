"""Exponential moving average (EMA) of a model's weights.

`ModelEMA` keeps `ema = decay * ema + (1 - decay) * current` for every floating-point tensor of
the model's state dict (parameters and buffers) and a plain copy of the others (integer
counters). It is a checkpointable: the checkpointer saves it as `ema_state` and loads it back
on `--resume`. `apply_to(model)` swaps the averaged weights in for evaluation and restores the
trained weights afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from detrkit.config import ConfigError

__all__ = ["ModelEMA", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or `model` itself."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class ModelEMA:
    """The moving average of `model`'s state dict.

    Args:
        model: the model whose weights are averaged (DDP wrappers are looked through).
        decay: weight of the old average at each update, in [0, 1).
        device: where the averaged tensors live; "" keeps them beside the model's tensors
            ("cpu" saves GPU memory at the cost of a copy per step).

    The average starts empty and is initialized from the model when training starts
    (`EMAHook.before_train`) unless a checkpoint filled it first.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, device: str = "") -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(
                f"train.model_ema.decay={decay} is not valid; accepted: 0 <= decay < 1"
            )
        self.model = unwrap_model(model)
        self.decay = float(decay)
        self.device = device or None
        self.state: dict[str, torch.Tensor] = {}

    @property
    def has_state(self) -> bool:
        return bool(self.state)

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict(keep_vars=False)

    @torch.no_grad()
    def init_from_model(self) -> None:
        """Start the average at the model's current weights."""
        self.state = {
            name: tensor.detach().clone().to(self.device or tensor.device)
            for name, tensor in self._model_state().items()
        }

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        if not self.state:
            self.init_from_model()
            return
        for name, tensor in self._model_state().items():
            average = self.state[name]
            current = tensor.detach().to(average.device)
            if average.is_floating_point():
                # average <- decay * average + (1 - decay) * current
                average.lerp_(current.to(average.dtype), 1.0 - self.decay)
            else:
                average.copy_(current)

    # --- checkpointable -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        model_state = self._model_state()
        missing = sorted(set(model_state) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(model_state))
        if missing or unexpected:
            raise KeyError(
                "ema_state in the checkpoint does not match the model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        self.state = {
            name: state_dict[name].detach().clone().to(self.device or model_state[name].device)
            for name in model_state
        }
        logger.info("Loaded the model EMA (%d tensors)", len(self.state))

    # --- evaluation with the averaged weights -------------------------------------------------
    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's weights with the average (for evaluation-only runs)."""
        if not self.state:
            raise RuntimeError("ModelEMA.copy_to_model: the EMA has no state yet")
        self.model.load_state_dict(self.state)

    @contextmanager
    def apply_to(self) -> Iterator[None]:
        """Evaluate with the averaged weights inside the block; the model's own weights are
        restored afterwards (also when the block raises)."""
        if not self.state:
            raise RuntimeError("ModelEMA.apply_to: the EMA has no state yet")
        with torch.no_grad():
            backup = {k: v.detach().clone() for k, v in self._model_state().items()}
            self.model.load_state_dict(self.state)
        try:
            yield
        finally:
            with torch.no_grad():
                self.model.load_state_dict(backup)
