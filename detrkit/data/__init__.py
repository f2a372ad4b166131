"""Data: dataset registry, COCO json loading, augmentation, mapper, samplers and loaders.

Importing this package registers the builtin datasets: `coco_2017_train`, `coco_2017_val`
(under `$DETRKIT_DATASETS/coco`) and the generated `shapes_train`, `shapes_val` (under
`$DETRKIT_DATASETS/shapes`, created on first use).
"""

from . import transforms
from .build import (
    AspectRatioGroupedDataset,
    DatasetFromList,
    InferenceSampler,
    MapDataset,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
    cache_image_bytes,
    get_detection_dataset_dicts,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from .builtin import datasets_root, register_all_coco
from .catalog import DatasetCatalog, Metadata, MetadataCatalog
from .coco import (
    convert_to_coco_dict,
    convert_to_coco_json,
    load_coco_api,
    load_coco_json,
    register_coco_instances,
)
from .detection_utils import ImageLoadError, ImageNotFoundError, read_image
from .mapper import DetrDatasetMapper
from .synthetic import (
    SHAPE_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_shapes,
)

register_all_coco()
register_shapes()

__all__ = [
    "SHAPE_CLASSES",
    "AspectRatioGroupedDataset",
    "DatasetCatalog",
    "DatasetFromList",
    "DetrDatasetMapper",
    "ImageLoadError",
    "ImageNotFoundError",
    "InferenceSampler",
    "MapDataset",
    "Metadata",
    "MetadataCatalog",
    "TrainingSampler",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "cache_image_bytes",
    "convert_to_coco_dict",
    "convert_to_coco_json",
    "datasets_root",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "get_detection_dataset_dicts",
    "load_coco_api",
    "load_coco_json",
    "read_image",
    "register_all_coco",
    "register_coco_instances",
    "register_shapes",
    "transforms",
    "trivial_batch_collator",
    "worker_init_reset_seed",
]
