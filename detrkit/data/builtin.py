"""The builtin COCO 2017 datasets, registered by `import detrkit.data`.

`coco_2017_train` and `coco_2017_val` are looked up under `$DETRKIT_DATASETS/coco` (default
`./datasets/coco`); their files are checked when the dataset is first loaded, not at import.
"""

from __future__ import annotations

import os

from .builtin_meta import COCO_CATEGORY_IDS, COCO_THING_CLASSES
from .catalog import DatasetCatalog, MetadataCatalog
from .coco import load_coco_json

__all__ = ["datasets_root", "register_all_coco"]

_COCO_SPLITS = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}


def datasets_root() -> str:
    """Where builtin datasets live: `$DETRKIT_DATASETS`, default `./datasets`."""
    return os.path.expanduser(os.environ.get("DETRKIT_DATASETS", "datasets"))


def _load_builtin_coco(name: str, json_file: str, image_root: str) -> list[dict]:
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
