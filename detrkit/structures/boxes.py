"""Boxes and box-mode conversion, with detectron2's interface."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class BoxMode(IntEnum):
    """How the four numbers of a box are to be read."""

    XYXY_ABS = 0  # (x0, y0, x1, y1) in pixels
    XYWH_ABS = 1  # (x0, y0, w, h) in pixels; COCO's format
    XYXY_REL = 2  # unsupported (relative coordinates need the image size)
    XYWH_REL = 3  # unsupported
    XYWHA_ABS = 4  # unsupported (rotated boxes)

    @staticmethod
    def convert(box, from_mode: BoxMode, to_mode: BoxMode):
        """Convert one box (list/tuple of 4), an (N, 4) array or an (N, 4) tensor."""
        from_mode, to_mode = BoxMode(from_mode), BoxMode(to_mode)
        if from_mode == to_mode:
            return box
        supported = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
        if from_mode not in supported or to_mode not in supported:
            raise ValueError(
                f"BoxMode.convert: only XYXY_ABS and XYWH_ABS are supported, got {from_mode.name} "
                f"-> {to_mode.name}"
            )
        original_type = type(box)
        is_single = isinstance(box, (list, tuple))
        if is_single:
            if len(box) != 4:
                raise ValueError(f"BoxMode.convert: a single box needs 4 numbers, got {box!r}")
            arr = torch.tensor(box, dtype=torch.float64)[None]
        elif isinstance(box, np.ndarray):
            arr = torch.from_numpy(np.asarray(box)).clone()
        else:
            arr = box.clone()
        if to_mode == BoxMode.XYXY_ABS:  # from XYWH
            arr[:, 2] += arr[:, 0]
            arr[:, 3] += arr[:, 1]
        else:  # XYXY -> XYWH
            arr[:, 2] -= arr[:, 0]
            arr[:, 3] -= arr[:, 1]
        if is_single:
            return original_type(arr.flatten().tolist())
        if isinstance(box, np.ndarray):
            return arr.numpy()
        return arr


class Boxes:
    """A list of N axis-aligned boxes stored as an (N, 4) float tensor in XYXY_ABS."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor, dtype=torch.float32)
        if tensor.numel() == 0:
            tensor = tensor.reshape((-1, 4)).to(dtype=torch.float32)
        if tensor.dim() != 2 or tensor.size(-1) != 4:
            raise ValueError(f"Boxes: expected a tensor of shape (N, 4), got {tuple(tensor.shape)}")
        self.tensor = tensor

    def clone(self) -> Boxes:
        return Boxes(self.tensor.clone())

    def to(self, device) -> Boxes:
        return Boxes(self.tensor.to(device=device))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def area(self) -> torch.Tensor:
        box = self.tensor
        return (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])

    def clip(self, box_size: tuple[int, int]) -> None:
        """Clip in place to an image of (height, width)."""
        h, w = box_size
        x0 = self.tensor[:, 0].clamp(min=0, max=w)
        y0 = self.tensor[:, 1].clamp(min=0, max=h)
        x1 = self.tensor[:, 2].clamp(min=0, max=w)
        y1 = self.tensor[:, 3].clamp(min=0, max=h)
        self.tensor = torch.stack((x0, y0, x1, y1), dim=-1)

    def nonempty(self, threshold: float = 0.0) -> torch.Tensor:
        """Mask of boxes whose width and height both exceed `threshold`."""
        box = self.tensor
        widths = box[:, 2] - box[:, 0]
        heights = box[:, 3] - box[:, 1]
        return (widths > threshold) & (heights > threshold)

    def get_centers(self) -> torch.Tensor:
        return (self.tensor[:, :2] + self.tensor[:, 2:]) / 2

    def scale(self, scale_x: float, scale_y: float) -> None:
        self.tensor[:, 0::2] *= scale_x
        self.tensor[:, 1::2] *= scale_y

    def __getitem__(self, item) -> Boxes:
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        b = self.tensor[item]
        if b.dim() != 2:
            raise IndexError(f"Indexing Boxes with {item!r} did not give a matrix")
        return Boxes(b)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __repr__(self) -> str:
        return f"Boxes({self.tensor})"

    def __iter__(self):
        yield from self.tensor

    @classmethod
    def cat(cls, boxes_list: list[Boxes]) -> Boxes:
        if len(boxes_list) == 0:
            return cls(torch.empty(0, 4))
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))
