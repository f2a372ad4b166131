"""Samplers, datasets and data loaders for training and inference.

Training: an infinite `TrainingSampler` (one seeded permutation stream shared by all processes,
each rank takes an interleaved slice) feeds a `MapDataset` (record -> model input through the
mapper; a record the mapper rejects is replaced by another one), optionally grouped into batches
of similar aspect ratio. Each sample is augmented under a seed of (seed, epoch, index) and the
loader can save and restore its position (`ResumableTrainLoader`), so a resumed run sees the
data an uninterrupted one would have. Inference: `InferenceSampler` splits the dataset into
contiguous shards, one per process, without duplicates, and batches are plain lists of dicts.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import multiprocessing.util
import operator
import pickle
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data as torchdata

from detrkit.utils.comm import get_rank, get_world_size, shared_random_seed

from .catalog import DatasetCatalog, MetadataCatalog
from .detection_utils import ImageLoadError, is_class_index, read_image_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "AspectRatioGroupedDataset",
    "DatasetFromList",
    "InferenceSampler",
    "MapDataset",
    "ResumableTrainLoader",
    "TrainingSampler",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "cache_image_bytes",
    "get_detection_dataset_dicts",
    "sample_seed",
    "trivial_batch_collator",
    "worker_init_reset_seed",
]


# ---------------------------------------------------------------------------------------------
# datasets


def get_detection_dataset_dicts(
    names: str | Sequence[str], filter_empty: bool = True
) -> list[dict]:
    """Load and concatenate the records of one or several registered datasets.

    With `filter_empty` (training), images without any non-crowd annotation are dropped, with a
    warning giving the counts.
    """
    if isinstance(names, str):
        names = [names]
    names = [str(n) for n in names]
    if not names:
        raise ValueError("get_detection_dataset_dicts: no dataset names given")
    records: list[dict] = []
    for name in names:
        dataset = DatasetCatalog.get(name)
        if len(dataset) == 0:
            raise ValueError(f"Dataset {name!r} is empty: its loader returned no records")
        records.extend(dataset)

    classes = [MetadataCatalog.get(n).get("thing_classes") for n in names]
    known = [c for c in classes if c is not None]
    if any(list(c) != list(known[0]) for c in known[1:]):
        raise ValueError(
            f"get_detection_dataset_dicts: datasets {names} have different thing_classes "
            f"({[len(c) if c is not None else None for c in classes]} classes); they cannot be "
            "trained or evaluated together"
        )

    if known:
        _check_category_ids(records, len(known[0]), names)

    if filter_empty:
        before = len(records)
        records = [
            r for r in records if any(a.get("iscrowd", 0) == 0 for a in r.get("annotations", []))
        ]
        removed = before - len(records)
        if removed:
            logger.warning(
                "Removed %d of %d images of %s that have no (non-crowd) annotations; %d images "
                "left for training.",
                removed,
                before,
                "+".join(names),
                len(records),
            )
        if not records:
            raise ValueError(
                f"No image of {'+'.join(names)} has an annotation: nothing to train on "
                "(filter_empty=True drops images without annotations)"
            )
    return records


def _check_category_ids(records: list[dict], num_classes: int, names: Sequence[str]) -> None:
    """Every annotation's category_id is a class index of the datasets' thing_classes: checked
    once, when the records are loaded, so that no step of training has to."""
    for record in records:
        for annotation in record.get("annotations", []):
            category_id = annotation.get("category_id")
            if not is_class_index(category_id) or category_id >= num_classes:
                raise ValueError(
                    f"dataset {'+'.join(names)}: {record.get('file_name')} (image_id "
                    f"{record.get('image_id')!r}) has an annotation with category_id="
                    f"{category_id!r}; accepted: 0..{num_classes - 1} (an index into the "
                    f"dataset's {num_classes} thing_classes)"
                )


class DatasetFromList(torchdata.Dataset):
    """A list of records as a map-style dataset.

    With `serialize` (default), records are pickled into one numpy buffer, so data-loader workers
    share it without the copy-on-read that Python lists of dicts cause after fork. With `copy`
    (only used when not serialized), each item is deep-copied before it is returned.
    """

    def __init__(self, lst: Sequence[Any], copy: bool = True, serialize: bool = True) -> None:
        self._copy = copy
        self._serialize = serialize
        if serialize:
            blobs = [np.frombuffer(pickle.dumps(x, protocol=-1), dtype=np.uint8) for x in lst]
            self._addr = np.cumsum(np.asarray([len(b) for b in blobs], dtype=np.int64))
            self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)
            self._len = len(blobs)
            logger.info(
                "Serialized %d records into %.2f MiB", self._len, self._buffer.nbytes / 1024**2
            )
        else:
            self._list = list(lst)
            self._len = len(self._list)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int) -> Any:
        if self._serialize:
            start = 0 if idx == 0 else int(self._addr[idx - 1])
            end = int(self._addr[idx])
            return pickle.loads(self._buffer[start:end].tobytes())
        if self._copy:
            return copy.deepcopy(self._list[idx])
        return self._list[idx]


class MapDataset(torchdata.Dataset):
    """Apply `map_func` to the items of a map-style dataset.

    When `map_func` returns None (the mapper rejected the record, e.g. a bad image with
    `skip_bad_images=True`) and `retry` is set, another randomly chosen index is tried, skipping
    indices already known to be bad. After `max_retries` consecutive failures, or once every
    index has failed, a RuntimeError names the files. Without `retry`, None is returned.
    """

    def __init__(
        self, dataset: Any, map_func: Callable, retry: bool = True, max_retries: int = 20
    ) -> None:
        self._dataset = dataset
        self._map_func = map_func
        self._retry = retry
        self._max_retries = max_retries
        self._bad_indices: set[int] = set()
        self._rng = random.Random(42)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, idx: int) -> Any:
        failures: list[str] = []
        current = int(idx)
        while True:
            record = self._dataset[current]
            data = self._map_func(record)
            if data is not None:
                return data
            if not self._retry:
                return None
            file_name = (
                record.get("file_name", f"index {current}") if isinstance(record, dict) else current
            )
            failures.append(str(file_name))
            self._bad_indices.add(current)
            if len(self._bad_indices) >= len(self):
                raise RuntimeError(
                    f"Every one of the {len(self)} records was rejected by the mapper (e.g. "
                    f"{failures[-3:]}); the dataset has no usable image"
                )
            if len(failures) >= self._max_retries:
                raise RuntimeError(
                    f"The mapper rejected {len(failures)} records in a row (last: "
                    f"{failures[-3:]}); {len(self._bad_indices)} of {len(self)} records are "
                    "known bad. Check the dataset's image files."
                )
            current = self._rng.randrange(len(self))
            while current in self._bad_indices:
                current = self._rng.randrange(len(self))
            logger.warning(
                "Record %s (%s) could not be used; trying record %d instead",
                idx,
                file_name,
                current,
            )


def cache_image_bytes(records: list[dict]) -> list[dict]:
    """Cache mode: read every image file once and keep its encoded bytes in the record.

    The mapper then decodes from memory (`record["image_bytes"]`). Each process holds the whole
    dataset's encoded images, so this is for datasets that fit in memory. A file that cannot be
    read is left uncached; the mapper reports it when the record is used.
    """
    total = 0
    cached = []
    for record in records:
        record = dict(record)
        try:
            record["image_bytes"] = read_image_bytes(record["file_name"])
            total += len(record["image_bytes"])
        except ImageLoadError:
            pass
        cached.append(record)
    logger.info(
        "Cache mode: holding %.1f MiB of encoded images for %d records in memory",
        total / 1024**2,
        len(cached),
    )
    return cached


# ---------------------------------------------------------------------------------------------
# samplers


def _as_size(size: Any) -> int:
    try:
        return operator.index(size)
    except TypeError:
        raise TypeError(f"A sampler size must be an int, got {size!r}") from None


class TrainingSampler(torchdata.Sampler):
    """An infinite stream of dataset indices for training.

    All processes generate the same sequence of (shuffled) epochs from one seed (drawn on rank 0
    and shared when `seed` is None); rank r takes elements r, r + world_size, ... so that the
    processes together see every index once per epoch.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int | None = None) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(
                f"TrainingSampler: the dataset size must be a positive int, got {size!r}"
            )
        self._size = size
        self._shuffle = shuffle
        self._seed = int(shared_random_seed() if seed is None else seed)
        self._rank = get_rank()
        self._world_size = get_world_size()

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=generator).tolist()
            else:
                yield from range(self._size)


class InferenceSampler(torchdata.Sampler):
    """Split `size` indices into contiguous shards, one per process (sizes differ by <= 1)."""

    def __init__(self, size: int) -> None:
        size = _as_size(size)
        if size < 0:
            raise ValueError(f"InferenceSampler: size must be a non-negative int, got {size!r}")
        self._size = size
        self._local_indices = self._get_local_indices(size, get_world_size(), get_rank())

    @staticmethod
    def _get_local_indices(total_size: int, world_size: int, rank: int) -> range:
        base, extra = divmod(total_size, world_size)
        shard_sizes = [base + int(r < extra) for r in range(world_size)]
        begin = sum(shard_sizes[:rank])
        return range(begin, begin + shard_sizes[rank])

    def __iter__(self) -> Iterator[int]:
        yield from self._local_indices

    def __len__(self) -> int:
        return len(self._local_indices)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (seed, epoch, dataset index) only,
    so the same sample is augmented alike whichever worker maps it, and when."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded_global_rngs(seed: int, restore: bool) -> Iterator[None]:
    """Seed python's `random`, numpy's global generator and torch's CPU generator (what
    augmentations draw from) for one sample; with `restore`, put the previous states back (a
    mapper running in the training process must not shift the training's random streams)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def _is_portrait(sample: Any) -> int:
    h, w = AspectRatioGroupedDataset._size_of(sample)
    return 0 if w > h else 1


class _ResumableTrainStream(torchdata.IterableDataset):
    """This rank's sampler stream, mapped and batched, as `(position, batch)` items.

    Worker w of W (or the loading process itself: W = 1) maps the stream positions w, w + W, ...
    and fills its buckets (landscape / portrait when grouping by aspect ratio, else one); a full
    bucket is a batch. With each batch comes the worker's position: the next stream position it
    reads and the positions waiting in its buckets, so a loader can restart any worker where it
    was. The DataLoader takes batches from its workers in turn, so batch k always comes from
    worker k mod W. Each sample is mapped under `sample_seed(seed, epoch, dataset index)`.
    """

    def __init__(
        self, dataset: Any, sampler: torchdata.Sampler, batch_size: int, group: bool, seed: int
    ) -> None:
        self._dataset = dataset
        self._sampler = sampler
        self._batch_size = batch_size
        self._group = group
        self.seed = seed
        # where to start: {"batches": k, "workers": [worker state or None, ...]}, or None
        self.start: dict | None = None

    def _map(self, epoch: int, index: int, in_worker: bool) -> Any:
        with _seeded_global_rngs(sample_seed(self.seed, epoch, index), restore=not in_worker):
            return self._dataset[index]

    def __iter__(self) -> Iterator[tuple[dict, list]]:
        worker = torchdata.get_worker_info()
        num_workers = worker.num_workers if worker is not None else 1
        worker_id = worker.id if worker is not None else 0
        start = self.start or {"batches": 0, "workers": [None] * num_workers}
        # the worker whose turn comes after `batches` batches plays this worker's part
        role = (worker_id + start["batches"]) % num_workers
        state = start["workers"][role] or {"next": role, "buckets": [[], []]}

        size = len(self._dataset)
        stride = get_world_size()
        rank = get_rank()
        stream = enumerate(iter(self._sampler))  # (position in this rank's stream, index)
        # the samples waiting in the buckets are mapped again, then the stream continues
        pending = sorted(p for bucket in state["buckets"] for p in bucket)
        first = pending[0] if pending else state["next"]
        wanted = itertools.chain(pending, itertools.count(state["next"], num_workers))
        buckets: list[list[tuple[int, Any]]] = [[], []]
        target = next(wanted)
        for position, index in itertools.islice(stream, first, None):
            if position != target:
                continue
            target = next(wanted)
            epoch = (position * stride + rank) // size
            sample = self._map(epoch, int(index), worker is not None)
            if sample is None:
                continue
            bucket = buckets[_is_portrait(sample) if self._group else 0]
            bucket.append((position, sample))
            if len(bucket) == self._batch_size:  # never while refilling the pending samples
                batch = [x for _, x in bucket]
                del bucket[:]
                after = {"next": target, "buckets": [[p for p, _ in b] for b in buckets]}
                yield after, batch


class ResumableTrainLoader(torchdata.DataLoader):
    """The training DataLoader of `build_detection_train_loader`, which can save and restore its
    position in the data stream (`state_dict` / `load_state_dict`, before iterating).

    The position is taken from the batches handed out, not from what workers prefetched.
    """

    def __init__(self, stream: _ResumableTrainStream, collate_fn: Callable | None, **kwargs):
        self._collate = collate_fn
        super().__init__(
            stream,
            batch_size=None,
            collate_fn=_identity,
            # worker seeds come from here, not from the global generator the training uses
            generator=torch.Generator().manual_seed(stream.seed),
            **kwargs,
        )
        self._stream = stream
        self._batches = 0
        self._workers: list[dict | None] = [None] * max(self.num_workers, 1)

    def __iter__(self) -> Iterator[Any]:
        self._stream.start = {"batches": self._batches, "workers": list(self._workers)}
        batches = super().__iter__()
        if self.num_workers > 0:
            # workers ignore SIGTERM (see worker_init_reset_seed): stop them the peaceful way
            # when the process exits, before multiprocessing terminates and joins its children
            multiprocessing.util.Finalize(self, _shutdown_workers, args=(batches,), exitpriority=10)
        for state, batch in batches:
            self._workers[self._batches % len(self._workers)] = state
            self._batches += 1
            if self._collate is not None:
                yield self._collate(batch)
            else:
                yield [x for x in batch if x is not None]

    def state_dict(self) -> dict[str, Any]:
        sampler = self._stream._sampler
        return {
            "seed": self._stream.seed,
            "sampler_seed": getattr(sampler, "_seed", None),
            "batches": self._batches,
            "num_workers": self.num_workers,
            "workers": list(self._workers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            logger.warning(
                "The checkpoint's data loader had %d workers, this one has %d: the data stream "
                "restarts from the beginning (set dataloader.train.num_workers=%d to continue it)",
                state["num_workers"],
                self.num_workers,
                state["num_workers"],
            )
            return
        self._stream.seed = int(state["seed"])
        sampler = self._stream._sampler
        if state.get("sampler_seed") is not None and hasattr(sampler, "_seed"):
            sampler._seed = int(state["sampler_seed"])
        self._batches = int(state["batches"])
        self._workers = list(state["workers"])


def _identity(item: Any) -> Any:
    return item


def _shutdown_workers(iterator: Any) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class AspectRatioGroupedDataset(torchdata.IterableDataset):
    """Batch samples so that a batch holds only landscape (w > h) or only portrait/square images.

    This keeps the padding of a batch small. Each bucket is emitted when it holds `batch_size`
    samples.
    """

    def __init__(self, dataset: Any, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self._buckets: list[list] = [[], []]

    @staticmethod
    def _size_of(sample: dict) -> tuple[int, int]:
        image = sample.get("image")
        if isinstance(image, torch.Tensor) and image.dim() == 3:
            return int(image.shape[-2]), int(image.shape[-1])
        return int(sample["height"]), int(sample["width"])

    def __iter__(self) -> Iterator[list]:
        for sample in self.dataset:
            h, w = self._size_of(sample)
            bucket = self._buckets[0 if w > h else 1]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                yield batch


def trivial_batch_collator(batch: list) -> list:
    """Batches are lists of dicts; entries the mapper rejected (None) are left out."""
    return [x for x in batch if x is not None]


def worker_init_reset_seed(worker_id: int) -> None:
    """Give each data-loader worker its own numpy/python seed (torch's is already distinct).

    Workers ignore the signals that ask training to stop (SIGTERM, SIGINT, SIGUSR1, which a
    cluster sends to every process of a job): the training process finishes its iteration,
    saves and then shuts them down itself.
    """
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)
    random.seed(seed)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class _ListBatches:
    """Identity collate for already-formed batches (applies the user's collate_fn if any)."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch: list) -> Any:
        return self.collate_fn(batch) if self.collate_fn is not None else batch


def _as_dataset(dataset: Any, cache_mode: bool) -> Any:
    if isinstance(dataset, (str, bytes)):
        raise TypeError(
            f"The loader's dataset is the string {dataset!r}; pass the records instead, e.g. "
            f"dataset=L(get_detection_dataset_dicts)(names={dataset!r})"
        )
    if isinstance(dataset, (list, tuple)):
        records = list(dataset)
        if cache_mode:
            records = cache_image_bytes(records)
        return DatasetFromList(records, copy=False)
    if cache_mode:
        raise ValueError("cache_mode=True needs the dataset as a list of records")
    if hasattr(dataset, "__getitem__") or isinstance(dataset, torchdata.IterableDataset):
        return dataset
    raise TypeError(
        "The loader's dataset must be a list of records (e.g. L(get_detection_dataset_dicts)"
        f"(names=...)) or a torch Dataset, got {type(dataset).__name__}"
    )


def build_detection_train_loader(
    dataset: Any,
    *,
    mapper: Callable | None,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    sampler: torchdata.Sampler | None = None,
    collate_fn: Callable | None = None,
    cache_mode: bool = False,
    seed: int | None = None,
) -> torchdata.DataLoader:
    """An infinite training loader yielding lists of `total_batch_size / world_size` dicts.

    `dataset` is a list of records or a map-style dataset; `mapper` turns a record into the model
    input (records it rejects are replaced by other ones). `sampler` defaults to a
    `TrainingSampler(len(dataset), seed=seed)`. With `cache_mode` the encoded image files are
    read once and kept in memory.
    """
    world_size = get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size != 0:
        raise ValueError(
            f"total_batch_size={total_batch_size} must be a positive multiple of the number of "
            f"processes ({world_size}); e.g. dataloader.train.total_batch_size="
            f"{max(world_size, total_batch_size - total_batch_size % world_size)}"
        )
    batch_size = total_batch_size // world_size
    dataset = _as_dataset(dataset, cache_mode)
    if isinstance(dataset, torchdata.IterableDataset):
        if sampler is not None:
            raise ValueError("A sampler cannot be used with an iterable dataset")
        if mapper is not None:
            raise ValueError("build_detection_train_loader: give the mapper a map-style dataset")
        stream = dataset
    else:
        if mapper is not None:
            dataset = MapDataset(dataset, mapper)
        if sampler is None:
            sampler = TrainingSampler(len(dataset), seed=seed)
        seed = getattr(sampler, "_seed", None) if seed is None else seed
        seed = int(shared_random_seed() if seed is None else seed)
        stream = _ResumableTrainStream(dataset, sampler, batch_size, aspect_ratio_grouping, seed)
        return ResumableTrainLoader(
            stream, collate_fn, num_workers=num_workers, worker_init_fn=worker_init_reset_seed
        )

    common = {"num_workers": num_workers, "worker_init_fn": worker_init_reset_seed}
    if aspect_ratio_grouping:
        grouped = AspectRatioGroupedDataset(stream, batch_size)
        return torchdata.DataLoader(
            grouped, batch_size=None, collate_fn=_ListBatches(collate_fn), **common
        )
    return torchdata.DataLoader(
        stream,
        batch_size=batch_size,
        drop_last=True,
        collate_fn=collate_fn if collate_fn is not None else trivial_batch_collator,
        **common,
    )


def build_detection_test_loader(
    dataset: Any,
    *,
    mapper: Callable | None,
    batch_size: int = 1,
    num_workers: int = 0,
    sampler: torchdata.Sampler | None = None,
    collate_fn: Callable | None = None,
    cache_mode: bool = False,
) -> torchdata.DataLoader:
    """A finite loader over this process's shard of the dataset; batches are lists of dicts.

    Each process sees a contiguous shard (`InferenceSampler`), so that gathering the results of
    all processes covers the dataset exactly once.
    """
    if batch_size <= 0:
        raise ValueError(f"build_detection_test_loader: batch_size must be >= 1, got {batch_size}")
    dataset = _as_dataset(dataset, cache_mode)
    if mapper is not None:
        dataset = MapDataset(dataset, mapper, retry=False)
    if sampler is None and not isinstance(dataset, torchdata.IterableDataset):
        sampler = InferenceSampler(len(dataset))
    return torchdata.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_fn if collate_fn is not None else trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )
