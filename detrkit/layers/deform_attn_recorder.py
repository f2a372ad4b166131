"""Record what multi-scale deformable attention looks at, without changing any model.

    with DeformableAttentionRecorder(model) as recorder:
        model(inputs)
    call = recorder.last("transformer.decoder.layers.5.attentions.1")
    call.sampling_locations  # (N, Lq, M, L, P, 2): exactly what the operator received
    call.attention_weights   # (N, Lq, M, L, P)

Forward pre-hooks on every `MultiScaleDeformableAttention` of the model note which module is
running and the `reference_points` / `spatial_shapes` it was given; a dispatch mode active only
inside the block catches each call of the operator `detrkit::ms_deform_attn_forward` and keeps its
sampling locations and attention weights (detached copies, on the CPU by default). Leaving the
block removes the hooks. What the model computes and returns is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from detrkit.layers import MultiScaleDeformableAttention

__all__ = ["DeformableAttentionCall", "DeformableAttentionRecorder"]


@dataclass
class DeformableAttentionCall:
    """One forward call of a MultiScaleDeformableAttention module (N batch, Lq queries, M heads,
    L levels, P points)."""

    name: str  # the module's name in the model
    reference_points: Tensor  # (N, Lq, L or 1, 2 or 4), normalized, as passed to the module
    spatial_shapes: Tensor  # (L, 2) rows (H_l, W_l)
    sampling_locations: Tensor | None = None  # (N, Lq, M, L, P, 2) normalized (x, y)
    attention_weights: Tensor | None = None  # (N, Lq, M, L, P), sum to 1 over (L, P)


class _OperatorCatcher(TorchDispatchMode):
    """Hands every call of the deformable-attention operator to the recorder."""

    def __init__(self, recorder: DeformableAttentionRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.detrkit.ms_deform_attn_forward.default:
            self.recorder._operator_called(args[3], args[4])
        return func(*args, **(kwargs or {}))


class DeformableAttentionRecorder:
    """Context manager recording every MultiScaleDeformableAttention call of `model`.

    Args:
        model: any module containing MultiScaleDeformableAttention instances.
        names: record only these modules (names as in `model.named_modules()`); default all.
        device: where the recorded tensors are kept ("cpu" by default; None keeps them where
            they were computed).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        device: str | torch.device | None = "cpu",
    ) -> None:
        modules = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, MultiScaleDeformableAttention)
        }
        if not modules:
            raise ValueError(
                f"DeformableAttentionRecorder: {type(model).__name__} has no "
                "MultiScaleDeformableAttention module to record"
            )
        if names is not None:
            names = list(names)
            unknown = [n for n in names if n not in modules]
            if unknown:
                raise KeyError(
                    f"DeformableAttentionRecorder: {unknown} are not MultiScaleDeformableAttention "
                    f"modules of the model; its modules: {', '.join(modules)}"
                )
            modules = {n: modules[n] for n in names}
        self.modules = modules
        self.device = device
        self.calls: list[DeformableAttentionCall] = []
        self._running: list[DeformableAttentionCall] = []
        self._handles: list = []
        self._mode: _OperatorCatcher | None = None

    def _keep(self, tensor: Tensor) -> Tensor:
        tensor = tensor.detach()
        return tensor.to(self.device, copy=True) if self.device is not None else tensor.clone()

    def _before(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            reference = kwargs.get("reference_points")
            shapes = kwargs.get("spatial_shapes")
            if reference is None or shapes is None:  # positional call: (query, key, value, ...)
                reference = args[6] if len(args) > 6 else reference
                shapes = args[7] if len(args) > 7 else shapes
            self._running.append(
                DeformableAttentionCall(name, self._keep(reference), self._keep(shapes))
            )

        return hook

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        self.calls.append(self._running.pop())

    def _operator_called(self, sampling_locations: Tensor, attention_weights: Tensor) -> None:
        if self._running and self._running[-1].sampling_locations is None:
            self._running[-1].sampling_locations = self._keep(sampling_locations)
            self._running[-1].attention_weights = self._keep(attention_weights)

    def __enter__(self) -> DeformableAttentionRecorder:
        self.calls = []
        for name, module in self.modules.items():
            self._handles.append(
                module.register_forward_pre_hook(self._before(name), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._after, with_kwargs=True))
        self._mode = _OperatorCatcher(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._running = []

    def last(self, name: str) -> DeformableAttentionCall:
        """The most recent call of module `name`."""
        for call in reversed(self.calls):
            if call.name == name:
                return call
        raise KeyError(
            f"DeformableAttentionRecorder: module {name!r} was not called inside the block; "
            f"recorded: {sorted({c.name for c in self.calls})}"
        )
