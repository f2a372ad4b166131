"""Optimizer parameter groups and learning-rate schedules for lazy configs.

- `get_default_optimizer_params`: one hyper-parameter set per parameter (norm layers, biases,
  embeddings, per-name lr factors, per-name overrides), then grouped so that parameters sharing
  the same hyper-parameters share one optimizer group.
- Named lr-factor functions (`backbone_lr_factor`, `LRFactorByName`; a project adds its own, e.g.
  `projects.deformable_detr.optim`) so configs never need a lambda and still save to YAML.
- `WarmupParamScheduler`: warmup over the first fraction of training, then any fvcore
  `ParamScheduler`. `LRMultiplier`: a torch LR scheduler that multiplies each group's initial lr
  by such a schedule evaluated at `iteration / max_iter`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)
from torch import nn

from detrkit.config.lazy import ConfigError, locate

__all__ = [
    "LRFactorByName",
    "LRMultiplier",
    "WarmupParamScheduler",
    "backbone_lr_factor",
    "get_default_optimizer_params",
    "lr_factor_by_keys",
    "reduce_param_groups",
]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# Norm layers from other code (FrozenBatchNorm2d, LayerNorm2d, ...) are recognised by class name.
_NORM_NAME = re.compile(r"(BatchNorm|GroupNorm|LayerNorm|InstanceNorm|RMSNorm)")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


# ---------------------------------------------------------------------------------------------
# lr factor functions: `lr_factor_func(param_name) -> float`, usable by name in configs


def lr_factor_by_keys(name: str, keys: Sequence[str] = ("backbone",), factor: float = 0.1) -> float:
    """`factor` when any of `keys` is a substring of the parameter name, else 1.0."""
    return factor if any(key in name for key in keys) else 1.0


def backbone_lr_factor(
    name: str, factor: float = 0.1, keys: Sequence[str] = ("backbone",)
) -> float:
    """0.1x lr for backbone parameters (detrex's recipe). Put it in a config by name:
    `optimizer.params.lr_factor_func = backbone_lr_factor`."""
    return lr_factor_by_keys(name, keys, factor)


class LRFactorByName:
    """A configurable lr-factor function for other key sets or factors, e.g. in a config
    `optimizer.params.lr_factor_func = L(LRFactorByName)(keys=["backbone", "neck"], factor=0.5)`.
    """

    def __init__(self, keys: Sequence[str] = ("backbone",), factor: float = 0.1) -> None:
        if isinstance(keys, str):
            keys = (keys,)
        self.keys = tuple(keys)
        self.factor = float(factor)

    def __call__(self, name: str) -> float:
        return lr_factor_by_keys(name, self.keys, self.factor)

    def __repr__(self) -> str:
        return f"LRFactorByName(keys={self.keys}, factor={self.factor})"


# ---------------------------------------------------------------------------------------------
# parameter groups


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: float | None = None,
    weight_decay: float | None = None,
    weight_decay_norm: float | None = None,
    weight_decay_embed: float | None = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float | None = None,
    lr_factor_func: Callable[[str], float] | None = None,
    overrides: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for `model`.

    Args:
        base_lr, weight_decay: defaults for every parameter (None: leave to the optimizer).
        weight_decay_norm: weight decay of norm-layer parameters (BatchNorm, GroupNorm,
            LayerNorm, FrozenBatchNorm-like, ...).
        weight_decay_embed: weight decay of `nn.Embedding` weights (e.g. DETR query embeddings).
        bias_lr_factor, weight_decay_bias: lr multiplier / weight decay for parameters named
            "bias".
        lr_factor_func: `f(full_param_name) -> float` multiplying the lr (needs `base_lr`), e.g.
            `backbone_lr_factor`, or its dotted import path (as a command-line override gives).
        overrides: `{param_name: {"lr": ..., "weight_decay": ...}}` by the parameter's own name
            within its module ("bias", "pos_embed", ...); applied last.

    Parameters shared between modules appear once; frozen ones (requires_grad=False) are left
    out. Groups with identical hyper-parameters are merged, in first-seen order.
    """
    if model is None or not isinstance(model, nn.Module):
        raise TypeError(
            "get_default_optimizer_params needs the model (an nn.Module); in a lazy config set "
            f"`optimizer.params.model = model` before instantiating, got {type(model).__name__}"
        )
    overrides = dict(overrides or {})
    defaults: dict[str, float] = {}
    if base_lr is not None:
        defaults["lr"] = float(base_lr)
    if weight_decay is not None:
        defaults["weight_decay"] = float(weight_decay)

    bias_hparams: dict[str, float] = {}
    if bias_lr_factor != 1.0:
        if base_lr is None:
            raise ValueError("get_default_optimizer_params: bias_lr_factor needs base_lr to be set")
        bias_hparams["lr"] = float(base_lr) * bias_lr_factor
    if weight_decay_bias is not None:
        bias_hparams["weight_decay"] = float(weight_decay_bias)
    if bias_hparams:
        if "bias" in overrides:
            raise ValueError(
                "get_default_optimizer_params: give the bias settings either through "
                "bias_lr_factor/weight_decay_bias or through overrides['bias'], not both"
            )
        overrides["bias"] = bias_hparams
    if lr_factor_func is not None and base_lr is None:
        raise ValueError("get_default_optimizer_params: lr_factor_func needs base_lr to be set")
    if isinstance(lr_factor_func, str):
        # a command-line override gives the function by name
        # (optimizer.params.lr_factor_func=package.module.function)
        name = lr_factor_func
        try:
            lr_factor_func = locate(name)
        except ImportError as e:
            raise ConfigError(f"optimizer.params.lr_factor_func={name!r}: {e}") from None
    if lr_factor_func is not None and not callable(lr_factor_func):
        raise ConfigError(
            f"optimizer.params.lr_factor_func must be a function name -> lr factor (or its "
            f"dotted import path); got {lr_factor_func!r}"
        )

    seen: set[nn.Parameter] = set()
    groups: list[dict[str, Any]] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            hparams = dict(defaults)
            if _is_norm(module) and weight_decay_norm is not None:
                hparams["weight_decay"] = float(weight_decay_norm)
            if isinstance(module, nn.Embedding) and weight_decay_embed is not None:
                hparams["weight_decay"] = float(weight_decay_embed)
            if lr_factor_func is not None:
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                hparams["lr"] = hparams["lr"] * float(lr_factor_func(full_name))
            hparams.update(overrides.get(param_name, {}))
            groups.append({"params": [param], **hparams})
    return reduce_param_groups(groups)


def reduce_param_groups(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge parameter groups whose hyper-parameters (every key but "params") are equal."""
    merged: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        hparams = {k: v for k, v in group.items() if k != "params"}
        key = tuple(sorted(hparams.items()))
        if key not in merged:
            merged[key] = {"params": [], **hparams}
        merged[key]["params"].extend(group["params"])
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
# schedules


class WarmupParamScheduler(CompositeParamScheduler):
    """Warmup for the first `warmup_length` fraction of training, then `scheduler`.

    Warmup starts at `warmup_factor * scheduler(0)` and either stays there ("constant") or rises
    linearly ("linear") to `scheduler(warmup_length)`. After warmup the wrapped scheduler keeps
    its own time axis (the value at 60% of training is `scheduler(0.6)`), unless
    `rescale_interval` squeezes its whole schedule into the remaining fraction.
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
        rescale_interval: bool = False,
    ) -> None:
        if not 0.0 <= warmup_length < 1.0:
            raise ValueError(
                f"WarmupParamScheduler: warmup_length is a fraction of training in [0, 1), "
                f"got {warmup_length}"
            )
        start = warmup_factor * scheduler(0.0)
        end = scheduler(warmup_length)
        if warmup_method == "linear":
            warmup: ParamScheduler = LinearParamScheduler(start, end)
        elif warmup_method == "constant":
            warmup = ConstantParamScheduler(start)
        else:
            raise ValueError(
                f"WarmupParamScheduler: unknown warmup_method {warmup_method!r}; "
                "expected 'linear' or 'constant'"
            )
        super().__init__(
            [warmup, scheduler],
            lengths=[warmup_length, 1.0 - warmup_length],
            interval_scaling=["rescaled", "rescaled" if rescale_interval else "fixed"],
        )


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """lr of group i at iteration t = initial_lr_i * multiplier(t / max_iter).

    `multiplier` is an fvcore `ParamScheduler` (e.g. a `WarmupParamScheduler`). Step it once per
    iteration, after `optimizer.step()`. Its state (`base_lrs`, `last_epoch`) is saved with the
    trainer, so a resumed run continues the schedule where it stopped.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        multiplier: ParamScheduler,
        max_iter: int,
        last_iter: int = -1,
    ) -> None:
        if not callable(multiplier):
            raise TypeError(
                f"LRMultiplier: multiplier must be an fvcore ParamScheduler, got {multiplier!r}"
            )
        if int(max_iter) <= 0:
            raise ValueError(f"LRMultiplier: max_iter must be positive, got {max_iter}")
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> dict[str, Any]:
        # The multiplier is rebuilt from the config; only the position in it is state.
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
        # Put the lr of the restored position back into the optimizer.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        where = min(max(self.last_epoch, 0) / self._max_iter, 1.0)
        factor = self._multiplier(where)
        return [base_lr * factor for base_lr in self.base_lrs]
