"""COCO 2017 data for DETR-family models (detrex's `common/data/coco_detr.py`).

Training: random flip, then with p=0.5 either a multi-scale resize (short side 480..800 step 32,
long side <= 1333) or resize to 400/500/600 + random crop 384..600 + the same multi-scale resize.
Test: short side 800, long side <= 1333. Images are looked up under $DETRKIT_DATASETS/coco.
The evaluator's `output_dir` is left for the project config to interpolate from `train`.
"""

from omegaconf import OmegaConf

from detrkit.config import LazyCall as L
from detrkit.data import (
    DetrDatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detrkit.data import transforms as T
from detrkit.evaluation import COCOEvaluator

_MULTI_SCALE = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DetrDatasetMapper)(
        augmentation=[
            L(T.RandomFlip)(),
            L(T.ResizeShortestEdge)(
                short_edge_length=_MULTI_SCALE, max_size=1333, sample_style="choice"
            ),
        ],
        augmentation_with_crop=[
            L(T.RandomFlip)(),
            L(T.ResizeShortestEdge)(short_edge_length=[400, 500, 600], sample_style="choice"),
            L(T.RandomCrop)(crop_type="absolute_range", crop_size=[384, 600]),
            L(T.ResizeShortestEdge)(
                short_edge_length=_MULTI_SCALE, max_size=1333, sample_style="choice"
            ),
        ],
        is_train=True,
        mask_on=False,
        img_format="RGB",
        skip_bad_images=False,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        augmentation=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        augmentation_with_crop=None,
        is_train=False,
        mask_on=False,
        img_format="RGB",
        skip_bad_images=False,
    ),
    batch_size=1,
    num_workers=4,
)

# visualize_n=K: pictures of the first K test images (predictions beside the ground truth)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    backend="pycocotools",  # or "faster_coco_eval": the same numbers, several times faster
    visualize_n=0,
)
