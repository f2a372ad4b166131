"""Registries of datasets (name -> function returning records) and their metadata.

A dataset is registered once under a name and loaded lazily: `DatasetCatalog.get(name)` calls the
registered function, which returns a list of records
`{file_name, height, width, image_id, annotations: [{bbox, bbox_mode, category_id, iscrowd}]}`.
`MetadataCatalog.get(name)` returns a `Metadata` object holding what the rest of the pipeline
needs to know about the dataset: `thing_classes` (the class names, index = contiguous id),
`thing_dataset_id_to_contiguous_id`, `json_file`, `image_root` and `evaluator_type`.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_CATEGORY_IDS",
    "COCO_THING_CLASSES",
    "DatasetCatalog",
    "Metadata",
    "MetadataCatalog",
    "datasets_root",
    "register_all_coco",
    "register_coco_instances",
]


def _unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(sorted(known)) if known else "(none)"
    return f"{kind} {name!r} is not registered.{hint} Registered: {listing}"


class _DatasetCatalog(dict):
    """name -> zero-argument function returning the dataset's list of records."""

    def register(self, name: str, func: Callable[[], list[dict]]) -> None:
        if not callable(func):
            raise TypeError(
                f"DatasetCatalog.register({name!r}, ...): expected a function returning a list "
                f"of dicts, got {type(func).__name__}"
            )
        if name in self:
            raise KeyError(
                f"Dataset {name!r} is already registered; call DatasetCatalog.remove({name!r}) "
                "first to replace it"
            )
        self[name] = func

    def get(self, name: str) -> list[dict]:  # type: ignore[override]
        try:
            func = self[name]
        except KeyError:
            raise KeyError(_unknown_name_message("Dataset", name, list(self))) from None
        records = func()
        if not isinstance(records, list):
            raise TypeError(
                f"The function registered for dataset {name!r} returned {type(records).__name__};"
                " it must return a list of dicts"
            )
        return records

    def list(self) -> list[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)

    def __str__(self) -> str:
        return f"DatasetCatalog(registered datasets: {', '.join(self.keys())})"

    __repr__ = __str__


DatasetCatalog = _DatasetCatalog()


class Metadata:
    """Attribute-style bag of facts about one dataset.

    `Metadata(name=...).set(thing_classes=[...])`; reading a missing attribute raises an
    AttributeError that lists what is set. Setting an attribute that is already set to a different
    value is an error, so two parts of the code cannot silently disagree about a dataset.
    """

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_fields", {})
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if key in fields:
            return fields[key]
        raise AttributeError(
            f"Metadata of dataset {self.__dict__.get('name', '')!r} has no attribute {key!r}; "
            f"it has: {sorted(fields)}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name":
            raise AttributeError("Metadata.name is fixed when the metadata is created")
        old = self._fields.get(key, _MISSING)
        if old is not _MISSING and old != value:
            raise ValueError(
                f"Metadata of dataset {self.name!r}: {key!r} is already {old!r}; refusing to "
                f"change it to {value!r}. Call MetadataCatalog.remove({self.name!r}) to start over."
            )
        self._fields[key] = value

    def set(self, **kwargs: Any) -> Metadata:
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self._fields}

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def __repr__(self) -> str:
        return f"Metadata({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


_MISSING = object()


class _MetadataCatalog(dict):
    """name -> Metadata; `get` creates an empty Metadata on first use (like detectron2)."""

    def get(self, name: str) -> Metadata:  # type: ignore[override]
        if not isinstance(name, str) or not name:
            raise KeyError(
                f"MetadataCatalog.get: a dataset name must be a non-empty str, got {name!r}"
            )
        meta = super().get(name)
        if meta is None:
            meta = self[name] = Metadata(name=name)
        return meta

    def list(self) -> list[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name, None)


MetadataCatalog = _MetadataCatalog()


def register_coco_instances(
    name: str, metadata: dict[str, Any] | None, json_file: str, image_root: str
) -> None:
    """Register a dataset in COCO's json format (detection boxes only).

    `metadata` may preset e.g. `thing_classes`; the rest (`thing_dataset_id_to_contiguous_id`,
    class names) is filled in from the json when the dataset is first loaded. Registering the
    same name again with the same files does nothing, so a config file that registers its
    datasets can be loaded more than once in a process (tools/train_net.py does).
    """
    from .coco import load_coco_json  # imported here: coco.py itself imports this module

    if not isinstance(name, str) or not name:
        raise ValueError(f"register_coco_instances: name must be a non-empty str, got {name!r}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if name in DatasetCatalog:
        known = MetadataCatalog.get(name)
        if (known.get("json_file", None), known.get("image_root", None)) == (json_file, image_root):
            return
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {})
    )


# ---------------------------------------------------------------------------------------------
# builtin datasets

COCO_THING_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
# COCO's 80 detection categories use ids 1..90 with gaps
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
]  # fmt: skip

_COCO_SPLITS = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}


def datasets_root() -> str:
    """Where builtin datasets live: `$DETRKIT_DATASETS`, default `./datasets`."""
    return os.path.expanduser(os.environ.get("DETRKIT_DATASETS", "datasets"))


def _load_builtin_coco(name: str, json_file: str, image_root: str) -> list[dict]:
    from .coco import load_coco_json

    for path, what in ((json_file, "annotation file"), (image_root, "image folder")):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Builtin dataset {name!r}: {what} {path} does not exist. Builtin datasets are "
                f"looked up under $DETRKIT_DATASETS (now {datasets_root()!r}; default "
                "'./datasets'), as coco/{train2017,val2017} and "
                "coco/annotations/instances_{train,val}2017.json."
            )
    return load_coco_json(json_file, image_root, name)


def register_all_coco(root: str | None = None) -> None:
    """Register `coco_2017_train` and `coco_2017_val` under `root` (default `datasets_root()`)."""
    root = datasets_root() if root is None else os.fspath(root)
    for name, (image_dir, json_rel) in _COCO_SPLITS.items():
        json_file, image_root = os.path.join(root, json_rel), os.path.join(root, image_dir)
        DatasetCatalog.pop(name, None)
        MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda n=name, j=json_file, i=image_root: _load_builtin_coco(n, j, i)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(COCO_THING_CLASSES),
            thing_dataset_id_to_contiguous_id={cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)},
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
