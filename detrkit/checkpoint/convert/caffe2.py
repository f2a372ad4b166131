"""detectron2's MSRA ResNets in Caffe2 names (`conv1_w`, `res_conv1_bn_s`, ...): recognized and
refused, by the checkpointer and by every `--source`.

They expect BGR input in 0..255 and `stride_in_1x1=True`, which detrkit's ResNet does not use;
the message names the weights to use instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any

from ..io import CheckpointError
from .registry import register_layout

__all__ = ["CAFFE2_MESSAGE", "is_caffe2_resnet"]

CAFFE2_MESSAGE = (
    "detectron2's MSRA ResNet in Caffe2 names (conv1_w, res_conv1_bn_s, res2_0_branch2a_w, ...), "
    "which detrkit does not convert: those weights expect BGR input in 0..255 and "
    "stride_in_1x1=True; use torchvision's ImageNet ResNet-50 (resnet50-*.pth) or detectron2's "
    "torchvision-converted R-50.pkl instead"
)


def is_caffe2_resnet(keys: Iterable[str]) -> bool:
    """True for a state dict in Caffe2's ResNet names."""
    return {"conv1_w", "res_conv1_bn_s"} <= set(keys)


def _refuse_on_load(checkpoint: dict[str, Any], path: str, model_keys: Set[str]) -> None:
    if "conv1_w" not in model_keys:  # unless the model itself uses these names
        raise CheckpointError(f"checkpoint {path} is {CAFFE2_MESSAGE}")


register_layout(
    "caffe2", is_caffe2_resnet, hint="{path} is " + CAFFE2_MESSAGE, on_load=_refuse_on_load
)
