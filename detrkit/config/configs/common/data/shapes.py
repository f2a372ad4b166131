"""The generated shapes dataset (`shapes_train` / `shapes_val`), for CPU-sized runs.

`coco_detr.py`'s recipe scaled to the 128..192 px images: flip, then with p=0.5 either a
multi-scale resize (short side 128..192 step 16, long side <= 320) or resize to 112/128/144 +
random crop 96..144 + the multi-scale resize. Test: short side 160, long side <= 320. Data is
loaded in the main process (no workers). The files are generated under $DETRKIT_DATASETS/shapes
on first use (about a second).
"""

from detrkit.config import get_config

dataloader = get_config("common/data/coco_detr.py").dataloader

_MULTI_SCALE = [128, 144, 160, 176, 192]

train = dataloader.train
train.dataset.names = "shapes_train"
# augmentation: [flip, multi-scale resize]; augmentation_with_crop: [flip, resize, crop, resize]
train.mapper.augmentation[1].short_edge_length = _MULTI_SCALE
train.mapper.augmentation[1].max_size = 320
train.mapper.augmentation_with_crop[1].short_edge_length = [112, 128, 144]
train.mapper.augmentation_with_crop[2].crop_size = [96, 144]
train.mapper.augmentation_with_crop[3].short_edge_length = _MULTI_SCALE
train.mapper.augmentation_with_crop[3].max_size = 320
train.total_batch_size = 4
train.num_workers = 0

test = dataloader.test
test.dataset.names = "shapes_val"
test.mapper.augmentation[0].short_edge_length = 160
test.mapper.augmentation[0].max_size = 320
test.num_workers = 0

del train, test  # only `dataloader` is the config
