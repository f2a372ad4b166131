"""The training loop: `TrainerBase` (iterations + hooks) and `Trainer` (one optimizer step).

`Trainer.run_step` is detrex's step: read a batch, run the model (it returns a dict of losses in
training mode), sum the losses, backpropagate (optionally under torch.amp autocast with a
GradScaler for float16), call the hooks' `after_backward`, record the losses (every
`gather_metric_period` steps), clip gradients, step the optimizer. Everything periodic
(learning-rate schedule, checkpoints, evaluation, logging) lives in hooks (`detrkit.engine.hooks`,
whose docstring gives the order `tools/train_net.py` registers them in).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detrkit.config import ConfigError
from detrkit.layers.onednn import cpu_bf16_supported
from detrkit.utils import comm

from .events import EventStorage

__all__ = ["HookBase", "Trainer", "TrainerBase", "create_ddp_model"]

logger = logging.getLogger(__name__)


class HookBase:
    """Something run at fixed points of training. Subclasses override any of::

        before_train()    once, before the first iteration
        before_step()     before every iteration
        after_backward()  after the backward pass, before the optimizer step
        after_step()      after every iteration
        after_train()     once at the end, also when training stopped with an error

    `self.trainer` is set by `TrainerBase.register_hooks` (a weak reference). A hook with state
    to resume (e.g. a learning-rate scheduler) returns it from `state_dict()`; it is saved in
    the checkpoint under `trainer.hooks.<class name>`.
    """

    trainer: TrainerBase

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class TrainerBase:
    """Runs `run_step()` for iterations [start_iter, max_iter) and calls the hooks around it.

    Attributes: `iter` (the current iteration; `max_iter` after a complete run), `start_iter`,
    `max_iter`, `storage` (the `EventStorage` of the run).
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage

    def register_hooks(self, hooks: Sequence[HookBase | None]) -> None:
        """Append hooks (None entries are skipped); they run in the order registered."""
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"register_hooks: expected HookBase instances, got {type(h)}")
            # a proxy avoids a reference cycle trainer -> hook -> trainer
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter

        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                # on success `iter` ends one past the last iteration (== max_iter); hooks use
                # that in after_train to tell a complete run from a failed one
                self.iter += 1
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                raise
            finally:
                self.after_train()

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.after_train()

    def before_step(self) -> None:
        self.storage.iter = self.iter
        for h in self._hooks:
            h.before_step()

    def after_backward(self) -> None:
        for h in self._hooks:
            h.after_backward()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()

    def run_step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        hooks_state = {}
        for h in self._hooks:
            state = h.state_dict()
            if state:
                name = type(h).__qualname__
                if name in hooks_state:
                    # two hooks of one class cannot both be told apart on resume
                    logger.warning("Two hooks of class %s have state; saving only the first", name)
                    continue
                hooks_state[name] = state
        return {"iteration": self.iter, "hooks": hooks_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.iter = int(state_dict["iteration"])
        for name, value in state_dict.get("hooks", {}).items():
            for h in self._hooks:
                if type(h).__qualname__ == name:
                    h.load_state_dict(value)
                    break
            else:
                logger.warning("Checkpoint has state for hook %s, which is not registered", name)


_AMP_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_amp_dtype(amp_dtype: str | torch.dtype | None, device_type: str) -> torch.dtype:
    """The autocast dtype for `device_type`; None means float16 on CUDA and bfloat16 on CPU.

    float16 on the CPU falls back to bfloat16 with a warning: CPU autocast in float16 needs a
    gradient scaler and is slower than bfloat16, so it is never what a CPU user wants.
    """
    if amp_dtype is None or amp_dtype == "":
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    elif isinstance(amp_dtype, torch.dtype):
        dtype = amp_dtype
    elif isinstance(amp_dtype, str) and amp_dtype.replace("torch.", "") in _AMP_DTYPES:
        dtype = _AMP_DTYPES[amp_dtype.replace("torch.", "")]
    else:
        raise ConfigError(
            f"train.amp.dtype={amp_dtype!r} is not supported; accepted: 'float16' or 'bfloat16'"
        )
    if dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(
            f"train.amp.dtype={amp_dtype!r} is not supported; accepted: 'float16' or 'bfloat16'"
        )
    if device_type != "cuda" and dtype == torch.float16:
        logger.warning(
            "train.amp.dtype=float16 is not supported on %s; using bfloat16 autocast instead",
            device_type,
        )
        dtype = torch.bfloat16
    if device_type == "cpu" and dtype == torch.bfloat16 and not cpu_bf16_supported():
        logger.warning(
            "train.amp: this CPU has no oneDNN bfloat16 kernels (they need AVX-512 BF16, "
            "AVX-NE-CONVERT or AMX), so bfloat16 autocast runs several times slower than "
            "float32; train.amp.enabled=False is faster here"
        )
    return dtype


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class Trainer(TrainerBase):
    """detrex's trainer: one optimizer step per iteration over a model returning a loss dict.

    Args:
        model: in training mode `model(batch)` returns a dict of scalar loss tensors (or a single
            tensor); their sum is minimized.
        data_loader: an iterable of batches (infinite; iterated lazily on the first step).
        optimizer: a torch optimizer over the model's parameters.
        amp: run the forward pass under `torch.autocast`.
        amp_dtype: "float16" (CUDA: with a GradScaler), "bfloat16", or None for float16 on CUDA
            and bfloat16 on the CPU. float16 on the CPU falls back to bfloat16 with a warning.
        clip_grad_params: e.g. `{"max_norm": 0.1, "norm_type": 2}` to clip the gradient norm
            (after unscaling under float16 AMP); None for no clipping.
        gather_metric_period: reduce, check and record the losses every this many steps (each
            time is a host sync). A non-finite loss is caught at those steps only.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        amp: bool = False,
        amp_dtype: str | torch.dtype | None = None,
        clip_grad_params: Mapping[str, Any] | None = None,
        gather_metric_period: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(gather_metric_period, bool) or not isinstance(gather_metric_period, int):
            raise ConfigError(
                f"train.gather_metric_period={gather_metric_period!r} is not valid; accepted: an "
                "integer >= 1"
            )
        if gather_metric_period < 1:
            raise ConfigError(
                f"train.gather_metric_period={gather_metric_period} is not valid; accepted: >= 1"
            )
        self.gather_metric_period = gather_metric_period
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter_obj = None
        self.optimizer = optimizer

        self.device = _model_device(model)
        self.amp = bool(amp)
        self.amp_dtype = _resolve_amp_dtype(amp_dtype, self.device.type) if self.amp else None
        self.grad_scaler: torch.amp.GradScaler | None = None
        if self.amp and self.amp_dtype == torch.float16:
            self.grad_scaler = torch.amp.GradScaler(self.device.type)

        self.clip_grad_params = dict(clip_grad_params) if clip_grad_params else None
        if self.clip_grad_params is not None:
            unknown = set(self.clip_grad_params) - {"max_norm", "norm_type", "error_if_nonfinite"}
            if unknown or "max_norm" not in self.clip_grad_params:
                raise ConfigError(
                    f"train.clip_grad.params={self.clip_grad_params} is not valid; accepted keys: "
                    "max_norm (required), norm_type, error_if_nonfinite"
                )
            max_norm = self.clip_grad_params["max_norm"]
            if (
                isinstance(max_norm, bool)
                or not isinstance(max_norm, (int, float))
                or max_norm <= 0
            ):
                # 0 would scale every gradient to zero: training that silently learns nothing
                raise ConfigError(
                    f"train.clip_grad.params.max_norm={max_norm!r} is not valid; accepted: a "
                    "positive number (to train without clipping set train.clip_grad.enabled=False)"
                )

    @property
    def _data_loader_iter(self):
        # created on first use, so that data-loader workers start only when training does
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def run_step(self) -> None:
        assert self.model.training, "Trainer: the model was left in eval mode"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()

        # As detectron2: the metrics are reduced after the backward pass (the device has its
        # work queued when the host waits for the values) and only every gather_metric_period
        # steps. Before the update: at those steps every rank stops together on a non-finite
        # loss, before it reaches the weights.
        self._write_metrics(loss_dict, data_time)

        if self.grad_scaler is not None:
            if self.clip_grad_params is not None:
                self.grad_scaler.unscale_(self.optimizer)
                self._clip_grads()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            if self.clip_grad_params is not None:
                self._clip_grads()
            self.optimizer.step()

    def _clip_grads(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, **self.clip_grad_params)

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float) -> None:
        """Every `gather_metric_period` steps: average the losses over ranks (max of the data
        time), check they are finite and record them in the event storage."""
        if (self.iter + 1) % self.gather_metric_period != 0:
            return
        names = sorted(loss_dict)
        values = [loss_dict[k].detach().float().reshape(()) for k in names]
        metrics = torch.stack(values) if values else torch.zeros(0, device=self.device)
        data_time_t = torch.tensor(data_time, dtype=torch.float64, device=metrics.device)
        if comm.get_world_size() > 1:
            dist.all_reduce(metrics)
            metrics /= comm.get_world_size()
            dist.all_reduce(data_time_t, op=dist.ReduceOp.MAX)
        reduced = dict(zip(names, metrics.cpu().tolist()))
        total = sum(reduced.values())

        if not math.isfinite(total):
            values_text = ", ".join(f"{k}={v}" for k, v in reduced.items())
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration {self.iter}: total_loss={total}, "
                f"{values_text}"
            )

        storage = self.storage
        storage.put_scalar("data_time", float(data_time_t.item()))
        if len(reduced) > 1 or "total_loss" not in reduced:
            storage.put_scalar("total_loss", total)
        storage.put_scalars(**reduced)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "optimizer" in state_dict:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def create_ddp_model(
    model: nn.Module, *, fp16_compression: bool = False, **ddp_kwargs: Any
) -> nn.Module:
    """Wrap `model` in DistributedDataParallel when more than one process trains; else return it.

    On CUDA the wrapped module lives on this process's GPU (`device_ids=[local rank]` unless
    given); on the CPU no device ids are passed. `fp16_compression` registers DDP's hook that
    all-reduces gradients in float16 (halves the traffic on slow interconnects).
    """
    if comm.get_world_size() == 1:
        return model
    if isinstance(model, DistributedDataParallel):
        return model
    device = _model_device(model)
    if device.type == "cuda" and "device_ids" not in ddp_kwargs:
        index = device.index if device.index is not None else comm.get_local_rank()
        ddp_kwargs["device_ids"] = [index]
        ddp_kwargs.setdefault("output_device", index)
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
    return ddp
