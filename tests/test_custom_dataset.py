"""A user's own COCO-format dataset through tools/train_net.py: registered in the config file,
one class count (`model.num_classes`) reaching the head, the criterion and the evaluator, and the
dataset's own category ids in the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detrkit.data import generate_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
CATEGORY_IDS = {1: 3, 2: 7, 3: 11, 4: 20}  # the generator's ids -> the "user's" ids

CONFIG = """
from detrkit.config import LazyConfig
from detrkit.data import register_coco_instances

_base = LazyConfig.load({base!r})
model = _base.model
dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train

register_coco_instances("my_train", {{}}, {train_json!r}, {train_images!r})
register_coco_instances("my_val", {{}}, {val_json!r}, {val_images!r})
dataloader.train.dataset.names = "my_train"
dataloader.test.dataset.names = "my_val"
model.num_classes = 4
"""


@pytest.fixture(scope="module")
def custom_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my_dataset")
    paths = {}
    for split, count in (("train", 12), ("val", 6)):
        json_file = generate_shapes_dataset(str(root), split, count, seed=3)
        with open(json_file) as f:
            data = json.load(f)
        for category in data["categories"]:
            category["id"] = CATEGORY_IDS[category["id"]]
        for annotation in data["annotations"]:
            annotation["category_id"] = CATEGORY_IDS[annotation["category_id"]]
        with open(json_file, "w") as f:
            json.dump(data, f)
        paths[f"{split}_json"] = json_file
        paths[f"{split}_images"] = str(root / split)
    config = root / "my_config.py"
    base = str(REPO_ROOT / "projects" / "deformable_detr" / "configs" / "shapes_tiny.py")
    config.write_text(CONFIG.format(base=base, **paths))
    return config


def train_net(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, str(TRAIN_NET), "--config-file", str(config), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_custom_dataset_trains_and_evaluates_with_its_own_ids(custom_config, tmp_path):
    result = train_net(
        custom_config,
        f"train.output_dir={tmp_path}",
        "train.max_iter=4",
        "train.eval_period=4",
        "dataloader.train.total_batch_size=2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in result.stdout

    predictions = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= set(CATEGORY_IDS.values())
    saved = (tmp_path / "config.yaml").read_text()
    assert "num_classes: ${..num_classes}" in saved  # the criterion follows model.num_classes


@pytest.mark.parametrize("num_classes", [3, 5])
def test_a_class_count_other_than_the_datasets_is_one_clear_error(
    custom_config, tmp_path, num_classes
):
    # too few outputs cannot express the dataset; too many would yield labels the evaluator
    # cannot map to a category at the first evaluation: both stop before training starts
    result = train_net(
        custom_config,
        f"train.output_dir={tmp_path}",
        "train.max_iter=2",
        f"model.num_classes={num_classes}",
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert f"dataset 'my_train' has 4 classes but model.num_classes={num_classes}" in message
    assert "set model.num_classes=4" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model_final.pth").exists()


def test_eval_only_with_a_wrong_class_count_is_one_clear_error(custom_config, tmp_path):
    result = train_net(
        custom_config, "--eval-only", f"train.output_dir={tmp_path}", "model.num_classes=6"
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "dataset 'my_val' has 4 classes but model.num_classes=6" in message
    assert "Traceback" not in result.stderr
