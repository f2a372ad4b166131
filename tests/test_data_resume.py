"""The training loader's position and per-sample augmentation seeds: a loader restarted from
`state_dict()` after any number of batches continues with exactly the batches an uninterrupted
loader gives, with and without workers and aspect-ratio grouping."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detrkit.data import TrainingSampler, build_detection_train_loader


def _records(n: int) -> list[dict]:
    return [{"image_id": i, "height": 10, "width": 10} for i in range(n)]


def random_augmentation(record: dict) -> dict:
    """Draws from python's, numpy's and torch's global generators, as augmentations do; the
    image's aspect ratio depends on a draw (so grouping depends on the augmentation)."""
    py, npy, th = random.random(), float(np.random.rand()), float(torch.rand(()))
    width = 12 if npy > 0.5 else 8
    return {
        "image_id": record["image_id"],
        "image": torch.zeros(3, 10, width, dtype=torch.uint8),
        "draws": (py, npy, th),
    }


def _loader(num_workers: int, grouping: bool, seed: int = 5):
    return build_detection_train_loader(
        _records(7),
        mapper=random_augmentation,
        total_batch_size=3,
        aspect_ratio_grouping=grouping,
        num_workers=num_workers,
        seed=seed,
    )


def _take(iterator, n: int) -> list[list[tuple]]:
    return [[(x["image_id"], x["draws"]) for x in next(iterator)] for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("grouping", [True, False])
def test_restarted_loader_continues_the_stream_exactly(num_workers, grouping):
    total = 10
    expected = _take(iter(_loader(num_workers, grouping)), total)
    for cut in sorted(random.sample(range(1, total), 3)):
        first = _loader(num_workers, grouping)
        head = _take(iter(first), cut)
        state = first.state_dict()
        second = _loader(num_workers, grouping, seed=99)  # the state brings the seed back
        second.load_state_dict(state)
        assert head + _take(iter(second), total - cut) == expected, cut


def test_each_sample_is_augmented_under_a_seed_of_seed_epoch_and_index():
    seed, size = 5, 7
    batches = _take(iter(_loader(0, grouping=False)), 6)  # 18 samples: 2 epochs and a bit
    # oracle: the sampler's order, and the mapper run directly under SeedSequence seeds
    order = iter(TrainingSampler(size, seed=seed))
    for position, (image_id, draws) in enumerate(s for b in batches for s in b):
        assert image_id == next(order)
        sample_seed = int(
            np.random.SeedSequence([seed, position // size, image_id]).generate_state(1)[0]
        )
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        assert random_augmentation({"image_id": image_id})["draws"] == draws


def test_mapping_in_the_training_process_leaves_its_generators_alone():
    loader = iter(_loader(0, grouping=True))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    _take(loader, 3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_other_worker_count_restarts_the_stream_with_a_warning(caplog):
    first = _loader(2, grouping=False)
    _take(iter(first), 3)
    second = _loader(0, grouping=False)
    second.load_state_dict(first.state_dict())
    assert "had 2 workers, this one has 0" in caplog.text
    assert _take(iter(second), 2) == _take(iter(_loader(0, grouping=False)), 2)
