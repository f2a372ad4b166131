"""Reading (and writing) datasets in COCO's json format.

`load_coco_json` turns an instances json into the records the mapper consumes, with the category
ids remapped to contiguous ids 0..C-1 (sorted by the original id). Bad data is handled at the door:
a json that does not parse or an annotation whose category is unknown is an error naming the file
(and the annotation); boxes that cannot be a box (zero/negative size, NaN, inf, not 4 numbers) are
dropped with one summarised warning. Images without annotations are kept (they are valid
negatives at evaluation time; training drops them in `get_detection_dataset_dicts`).
`register_coco_instances` registers such a json under a dataset name.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from iopath.common.file_io import PathManager

from detrkit.structures import BoxMode
from detrkit.utils.file_io import atomic_write

from .catalog import DatasetCatalog, MetadataCatalog

if TYPE_CHECKING:
    from pycocotools.coco import COCO

logger = logging.getLogger(__name__)
_path_manager = PathManager()

__all__ = [
    "convert_to_coco_dict",
    "convert_to_coco_json",
    "load_coco_api",
    "load_coco_json",
    "read_json",
    "register_coco_instances",
]

# how many offending annotations a warning quotes before summarising the rest as a count
_MAX_QUOTED = 5


def read_json(json_file: str) -> Any:
    """Parse a json file; a missing or malformed file is an error naming it (and line/column)."""
    json_file = os.fspath(json_file)
    if not _path_manager.exists(json_file):
        raise FileNotFoundError(f"Annotation file {json_file} does not exist")
    with _path_manager.open(json_file, "r") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the file ends early: it looks truncated)" if e.pos >= len(text.rstrip()) else ""
        raise ValueError(
            f"Annotation file {json_file} is not valid JSON: {e.msg} at line {e.lineno} column "
            f"{e.colno}{hint}. Expected a COCO instances json "
            '({"images": [...], "annotations": [...], "categories": [...]}).'
        ) from None


def _check_coco_layout(dataset: Any, json_file: str) -> None:
    if not isinstance(dataset, dict):
        raise ValueError(
            f"Annotation file {json_file}: expected a JSON object with keys 'images', "
            f"'annotations' and 'categories', got a JSON {type(dataset).__name__}"
        )
    for key in ("images", "categories"):
        if key not in dataset:
            raise ValueError(
                f"Annotation file {json_file}: missing the {key!r} list; a COCO instances json "
                f"has 'images', 'annotations' and 'categories' (found: {sorted(dataset)})"
            )
    for key in ("images", "annotations", "categories"):
        if key in dataset and not isinstance(dataset[key], list):
            raise ValueError(
                f"Annotation file {json_file}: {key!r} must be a list, got "
                f"{type(dataset[key]).__name__}"
            )
    for img in dataset["images"]:
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            raise ValueError(
                f"Annotation file {json_file}: image entry {img.get('id', img)!r} lacks {missing}; "
                "every image needs 'id', 'file_name', 'height' and 'width'"
            )
    for cat in dataset["categories"]:
        if "id" not in cat or "name" not in cat:
            raise ValueError(
                f"Annotation file {json_file}: category entry {cat!r} needs an 'id' and a 'name'"
            )


def _coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO object over an in-memory dict (without its console chatter)."""
    # imported on use, so that `import detrkit.data` (which weight conversion does, for the
    # COCO category ids of builtin_meta) does not load pycocotools
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_api(json_file: str, check_boxes: bool = False) -> COCO:
    """Load a COCO json with pycocotools, with readable errors for malformed files.

    Ground-truth annotations lacking `area` or `iscrowd` (hand-written files) get
    `area = w * h` (0 for an empty box) and `iscrowd = 0`, which is what COCOeval needs.
    With `check_boxes` (ground truth for evaluation), a bbox that is not 4 finite numbers is an
    error naming the file and annotation, and boxes of zero or negative size get one warning:
    COCOeval counts them as objects that no detection can match.
    """
    json_file = os.fspath(json_file)
    dataset = read_json(json_file)
    _check_coco_layout(dataset, json_file)
    dataset.setdefault("annotations", [])
    empty_boxes = []
    for ann in dataset["annotations"]:
        box = _box_numbers(ann.get("bbox"))
        if box is None and check_boxes:
            raise ValueError(
                f"Annotation file {json_file}: annotation id {ann.get('id')!r} (image_id "
                f"{ann.get('image_id')!r}): {_box_problem(ann.get('bbox'))}; evaluation needs "
                "a bbox [x, y, width, height] of 4 finite numbers for every annotation"
            )
        if box is not None and (box[2] <= 0 or box[3] <= 0):
            empty_boxes.append(ann)
        if "area" not in ann and box is not None:
            ann["area"] = max(box[2], 0.0) * max(box[3], 0.0)
        ann.setdefault("iscrowd", 0)
    if check_boxes and empty_boxes:
        example = empty_boxes[0]
        logger.warning(
            "Annotation file %s: %d ground-truth boxes have zero or negative width/height (e.g. "
            "annotation id %r, bbox %r); COCOeval counts them as objects no detection can match",
            json_file,
            len(empty_boxes),
            example.get("id"),
            example.get("bbox"),
        )
    return _coco_from_dict(dataset)


def _box_numbers(bbox: Any) -> list[float] | None:
    """`bbox` as 4 finite floats, or None when it is not that."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _box_problem(bbox: Any) -> str | None:
    """Why `bbox` (COCO XYWH) is not a usable box, or None when it is fine."""
    values = _box_numbers(bbox)
    if values is None:
        return f"bbox {bbox!r} is not 4 finite numbers"
    if values[2] <= 0 or values[3] <= 0:
        return f"bbox {bbox!r} has zero or negative width/height"
    return None


def load_coco_json(
    json_file: str,
    image_root: str,
    dataset_name: str | None = None,
    extra_annotation_keys: Iterable[str] | None = None,
) -> list[dict]:
    """Load a COCO instances json into a list of records (one per image).

    Each record is `{file_name, height, width, image_id, annotations}`; each annotation is
    `{bbox (XYWH_ABS), bbox_mode, category_id (contiguous 0..C-1), iscrowd}` plus any of
    `extra_annotation_keys` present in the json. When `dataset_name` is given, its metadata gets
    `thing_classes` and `thing_dataset_id_to_contiguous_id` (original id -> contiguous id).
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    start = datetime.datetime.now()
    coco_api = load_coco_api(json_file)
    elapsed = (datetime.datetime.now() - start).total_seconds()
    if elapsed > 1:
        logger.info("Loading %s takes %.2f seconds.", json_file, elapsed)

    categories = sorted(coco_api.dataset["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in categories]
    if len(set(cat_ids)) != len(cat_ids):
        raise ValueError(f"Annotation file {json_file}: category ids are not unique: {cat_ids}")
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    thing_classes = [c["name"] for c in categories]
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(
            thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map
        )

    extra_keys = list(extra_annotation_keys or [])
    image_ids = [img["id"] for img in coco_api.dataset["images"]]
    known_images = set(image_ids)
    if len(known_images) != len(image_ids):
        raise ValueError(f"Annotation file {json_file}: image ids are not unique")

    orphans = [a for a in coco_api.dataset["annotations"] if a.get("image_id") not in known_images]
    if orphans:
        logger.warning(
            "%s: %d annotations refer to image ids that are not in 'images' and are ignored "
            "(e.g. annotation id %s -> image_id %r).",
            json_file,
            len(orphans),
            orphans[0].get("id"),
            orphans[0].get("image_id"),
        )

    records: list[dict] = []
    dropped: list[str] = []
    for img in coco_api.dataset["images"]:
        image_id = img["id"]
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": image_id,
        }
        annotations = []
        for ann in coco_api.imgToAnns.get(image_id, []):
            category = ann.get("category_id")
            if category not in id_map:
                raise ValueError(
                    f"Annotation file {json_file}: annotation id {ann.get('id')!r} (image_id "
                    f"{image_id!r}) has category_id {category!r}, which is not among the "
                    f"categories of the file; known category ids: {cat_ids}"
                )
            problem = _box_problem(ann.get("bbox"))
            if problem is not None:
                dropped.append(
                    f"annotation id {ann.get('id')!r} (image_id {image_id!r}): {problem}"
                )
                continue
            obj = {
                "bbox": [float(v) for v in ann["bbox"]],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": id_map[category],
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
            for key in extra_keys:
                if key in ann:
                    obj[key] = ann[key]
            annotations.append(obj)
        record["annotations"] = annotations
        records.append(record)

    if dropped:
        quoted = "; ".join(dropped[:_MAX_QUOTED])
        more = f"; and {len(dropped) - _MAX_QUOTED} more" if len(dropped) > _MAX_QUOTED else ""
        logger.warning(
            "%s: dropped %d annotations with unusable boxes: %s%s",
            json_file,
            len(dropped),
            quoted,
            more,
        )
    num_instances = sum(len(r["annotations"]) for r in records)
    logger.info(
        "Loaded %d images (%d instances, %d categories) in COCO format from %s",
        len(records),
        num_instances,
        len(cat_ids),
        json_file,
    )
    return records


def register_coco_instances(
    name: str, metadata: dict[str, Any] | None, json_file: str, image_root: str
) -> None:
    """Register a dataset in COCO's json format (detection boxes only).

    `metadata` may preset e.g. `thing_classes`; the rest (`thing_dataset_id_to_contiguous_id`,
    class names) is filled in from the json when the dataset is first loaded. Registering the
    same name again with the same files does nothing, so a config file that registers its
    datasets can be loaded more than once in a process (tools/train_net.py does).
    """
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


def convert_to_coco_dict(dataset_name: str) -> dict:
    """Build a COCO-format dict (ground truth for COCOeval) from a registered dataset's records.

    Category ids are mapped back to the dataset's original ids when its metadata has
    `thing_dataset_id_to_contiguous_id`; otherwise the contiguous ids are used as they are.
    """
    records = DatasetCatalog.get(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    classes = metadata.get("thing_classes")
    if classes is None:
        num = 1 + max(
            (a["category_id"] for r in records for a in r.get("annotations", [])), default=-1
        )
        classes = [str(i) for i in range(num)]
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")
    if id_map:
        to_original = {contiguous: original for original, contiguous in id_map.items()}
    else:
        to_original = {i: i for i in range(len(classes))}
    categories = [{"id": to_original[i], "name": name} for i, name in enumerate(classes)]

    images, annotations = [], []
    for index, record in enumerate(records):
        image_id = record.get("image_id", index)
        images.append(
            {
                "id": image_id,
                "width": int(record["width"]),
                "height": int(record["height"]),
                "file_name": str(record["file_name"]),
            }
        )
        for ann in record.get("annotations", []):
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYWH_ABS)
            box = [float(v) for v in box]
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO ids start at 1 (0 means "none" to COCOeval)
                    "image_id": image_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "category_id": to_original[ann["category_id"]],
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
    logger.info(
        "Converted dataset %r to COCO format: %d images, %d annotations",
        dataset_name,
        len(images),
        len(annotations),
    )
    return {
        "info": {"description": f"detrkit conversion of dataset {dataset_name!r}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "licenses": [],
    }


def convert_to_coco_json(dataset_name: str, output_file: str, allow_cached: bool = True) -> None:
    """Write `convert_to_coco_dict(dataset_name)` to `output_file` (atomically).

    With `allow_cached`, an existing `output_file` is reused as it is.
    """
    output_file = os.fspath(output_file)
    if allow_cached and _path_manager.exists(output_file):
        logger.info("Reusing the cached COCO-format annotations at %s", output_file)
        return
    coco_dict = convert_to_coco_dict(dataset_name)
    directory = os.path.dirname(output_file)
    if directory:
        _path_manager.mkdirs(directory)
    # atomic: a run killed here leaves no partial file for the next run to reuse
    atomic_write(output_file, lambda f: f.write(json.dumps(coco_dict).encode("utf-8")))
    logger.info("Wrote COCO-format annotations of %r to %s", dataset_name, output_file)
