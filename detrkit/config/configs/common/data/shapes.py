"""The generated shapes dataset (`shapes_train` / `shapes_val`), for CPU-sized runs.

Same recipe as `coco_detr.py` scaled to the 128..192 px images: flip, then with p=0.5 either a
multi-scale resize (short side 128..192 step 16, long side <= 320) or resize to 112/128/144 +
random crop 96..144 + the multi-scale resize. Test: short side 160, long side <= 320.
The files are generated under $DETRKIT_DATASETS/shapes on first use (about a second).
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

_MULTI_SCALE = [128, 144, 160, 176, 192]

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DetrDatasetMapper)(
        augmentation=[
            L(T.RandomFlip)(),
            L(T.ResizeShortestEdge)(
                short_edge_length=_MULTI_SCALE, max_size=320, sample_style="choice"
            ),
        ],
        augmentation_with_crop=[
            L(T.RandomFlip)(),
            L(T.ResizeShortestEdge)(short_edge_length=[112, 128, 144], sample_style="choice"),
            L(T.RandomCrop)(crop_type="absolute_range", crop_size=[96, 144]),
            L(T.ResizeShortestEdge)(
                short_edge_length=_MULTI_SCALE, max_size=320, sample_style="choice"
            ),
        ],
        is_train=True,
        mask_on=False,
        img_format="RGB",
        skip_bad_images=False,
    ),
    total_batch_size=4,
    num_workers=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        augmentation=[L(T.ResizeShortestEdge)(short_edge_length=160, max_size=320)],
        augmentation_with_crop=None,
        is_train=False,
        mask_on=False,
        img_format="RGB",
        skip_bad_images=False,
    ),
    batch_size=1,
    num_workers=0,
)

dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
