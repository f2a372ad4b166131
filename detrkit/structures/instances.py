"""Instances: the per-image set of objects (ground truth or predictions), detectron2's interface."""

from __future__ import annotations

import itertools
from typing import Any

import torch


class Instances:
    """A set of N objects of one image: named fields that all have length N.

    Fields are set as attributes (`inst.gt_boxes = Boxes(...)`); `image_size` is (height, width).
    """

    def __init__(self, image_size: tuple[int, int], **kwargs: Any) -> None:
        self._image_size = image_size
        self._fields: dict[str, Any] = {}
        for k, v in kwargs.items():
            self.set(k, v)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def __setattr__(self, name: str, val: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, val)
        else:
            self.set(name, val)

    def __getattr__(self, name: str) -> Any:
        if name == "_fields" or name not in self._fields:
            raise AttributeError(
                f"Instances has no field {name!r}; fields: {list(self.__dict__.get('_fields', {}))}"
            )
        return self._fields[name]

    def set(self, name: str, value: Any) -> None:
        data_len = len(value)
        if len(self._fields) and data_len != len(self):
            raise ValueError(
                f"Instances: field {name!r} has length {data_len}, but the other fields have "
                f"length {len(self)}"
            )
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def remove(self, name: str) -> None:
        del self._fields[name]

    def get(self, name: str) -> Any:
        return self._fields[name]

    def get_fields(self) -> dict[str, Any]:
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> Instances:
        ret = Instances(self._image_size)
        for k, v in self._fields.items():
            if hasattr(v, "to"):
                v = v.to(*args, **kwargs)
            ret.set(k, v)
        return ret

    def __getitem__(self, item) -> Instances:
        if isinstance(item, int):
            if item >= len(self) or item < -len(self):
                raise IndexError("Instances index out of range!")
            item = slice(item, None, len(self))
        ret = Instances(self._image_size)
        for k, v in self._fields.items():
            ret.set(k, v[item])
        return ret

    def __len__(self) -> int:
        for v in self._fields.values():
            return v.__len__()
        raise NotImplementedError("Empty Instances does not support __len__!")

    def __iter__(self):
        raise NotImplementedError("`Instances` object is not iterable!")

    @staticmethod
    def cat(instance_lists: list[Instances]) -> Instances:
        if len(instance_lists) == 0:
            raise ValueError("Instances.cat needs at least one Instances")
        if len(instance_lists) == 1:
            return instance_lists[0]
        image_size = instance_lists[0].image_size
        ret = Instances(image_size)
        for k in instance_lists[0]._fields:
            values = [i.get(k) for i in instance_lists]
            v0 = values[0]
            if isinstance(v0, torch.Tensor):
                values = torch.cat(values, dim=0)
            elif isinstance(v0, list):
                values = list(itertools.chain(*values))
            elif hasattr(type(v0), "cat"):
                values = type(v0).cat(values)
            else:
                raise ValueError(f"Instances.cat: unsupported field type {type(v0)}")
            ret.set(k, values)
        return ret

    def __repr__(self) -> str:
        s = f"{self.__class__.__name__}(num_instances={len(self) if self._fields else 0}, "
        s += f"image_height={self._image_size[0]}, image_width={self._image_size[1]}, fields=["
        s += ", ".join(f"{k}: {v}" for k, v in self._fields.items())
        return s + "])"
