"""COCOEvaluator: box AP of a detector with pycocotools, the numbers COCO papers report.

`process` turns the model's per-image `Instances(pred_boxes XYXY in original pixels, scores,
pred_classes contiguous)` into COCO result entries (XYWH boxes, the dataset's original category
ids). `evaluate` gathers them from all processes, writes `instances_predictions.pth` and
`coco_instances_results.json`, runs COCOeval against the dataset's json and returns
`{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>"...}}` in percent.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from iopath.common.file_io import PathManager
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

from detrkit.data.catalog import DatasetCatalog, MetadataCatalog
from detrkit.data.coco import convert_to_coco_json, load_coco_api
from detrkit.data.detection_utils import ImageLoadError, read_image
from detrkit.structures import BoxMode
from detrkit.utils.comm import gather, get_world_size, is_main_process, synchronize
from detrkit.utils.file_io import atomic_write
from detrkit.utils.visualizer import draw_predictions_and_ground_truth

from .inference import DatasetEvaluator

logger = logging.getLogger(__name__)
_path_manager = PathManager()

__all__ = [
    "BOX_METRICS",
    "EVAL_BACKENDS",
    "COCOEvaluator",
    "evaluate_box_predictions",
    "instances_to_coco_json",
    "run_cocoeval",
    "summary_stats",
]

BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# pycocotools is the reference; faster-coco-eval (optional) is a C++ drop-in with the same
# matching rules, several times faster on COCO-sized sets (benchmarks/coco_eval.py).
EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")


def _cocoeval_class(backend: str) -> type:
    """The COCOeval implementation of `backend`; both take pycocotools' COCO objects."""
    if backend == "pycocotools":
        return COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCOeval_faster
        except ImportError as e:
            raise ImportError(
                "dataloader.evaluator.backend='faster_coco_eval' needs the faster-coco-eval "
                "package (pip install faster-coco-eval, or pip install -e .[fast-eval]); or use "
                "backend='pycocotools'"
            ) from e
        return COCOeval_faster
    raise ValueError(
        f"COCOEvaluator: backend {backend!r} is not known; accepted: {', '.join(EVAL_BACKENDS)}"
    )


def instances_to_coco_json(instances: Any, image_id: int) -> list[dict]:
    """One image's predicted Instances -> COCO result dicts (XYWH boxes, contiguous class ids)."""
    num = len(instances) if instances.get_fields() else 0
    if num == 0:
        return []
    boxes = instances.pred_boxes.tensor.detach().to("cpu", torch.float64)
    boxes = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist()
    scores = instances.scores.detach().to("cpu", torch.float64).tolist()
    classes = instances.pred_classes.detach().to("cpu").tolist()
    return [
        {"image_id": image_id, "category_id": int(label), "bbox": box, "score": score}
        for box, score, label in zip(boxes, scores, classes)
    ]


def _coco_results_object(coco_gt: COCO, results: list[dict]) -> COCO:
    """pycocotools' loadRes, also for an empty result list (which loadRes cannot take)."""
    if results:
        # loadRes sets keys (area, id, iscrowd, segmentation) on each dict and mutates nothing
        # below them: a copy of each dict keeps the caller's list intact (a deep copy of COCO
        # val's 1.5 million dicts took longer than the faster backend's whole evaluation)
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes([dict(r) for r in results])
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


_SUMMARY_LINES = [
    # (is AP, IoU threshold or None, area, index into maxDets)
    (True, None, "all", 2),
    (True, 0.5, "all", 2),
    (True, 0.75, "all", 2),
    (True, None, "small", 2),
    (True, None, "medium", 2),
    (True, None, "large", 2),
    (False, None, "all", 0),
    (False, None, "all", 1),
    (False, None, "all", 2),
    (False, None, "small", 2),
    (False, None, "medium", 2),
    (False, None, "large", 2),
]


def _summarize(coco_eval: COCOeval) -> tuple[np.ndarray, str]:
    """COCOeval's 12 summary numbers (AP/AR at the largest maxDets) and pycocotools' text.

    Unlike COCOeval.summarize, the AP lines use the last maxDets entry whatever it is (e.g. 300),
    so raising `max_dets_per_image` does not turn AP into -1.
    """
    params = coco_eval.params
    stats, lines = np.zeros(len(_SUMMARY_LINES)), []
    for i, (is_ap, iou, area, det_index) in enumerate(_SUMMARY_LINES):
        max_dets = params.maxDets[det_index]
        a = params.areaRngLbl.index(area)
        m = det_index
        values = coco_eval.eval["precision" if is_ap else "recall"]
        if iou is not None:
            values = values[np.where(np.isclose(params.iouThrs, iou))[0]]
        values = values[:, :, :, a, m] if is_ap else values[:, :, a, m]
        valid = values[values > -1]
        stats[i] = float(np.mean(valid)) if valid.size else -1.0
        title = "Average Precision  (AP)" if is_ap else "Average Recall     (AR)"
        iou_text = (
            f"{params.iouThrs[0]:0.2f}:{params.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        )
        lines.append(
            f" {title} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
            f"{stats[i]:0.3f}"
        )
    return stats, "\n".join(lines)


def run_cocoeval(
    coco_gt: COCO,
    results: list[dict],
    max_dets_per_image: int | None = None,
    img_ids: Sequence[int] | None = None,
    backend: str = "pycocotools",
) -> COCOeval:
    """Evaluate and accumulate COCO result dicts (bbox) with `backend`'s COCOeval; the returned
    object's `eval["precision"]` / `eval["recall"]` hold the full tables."""
    evaluator_class = _cocoeval_class(backend)
    coco_dt = _coco_results_object(coco_gt, results)
    coco_eval = evaluator_class(coco_gt, coco_dt, "bbox")
    max_dets = 100 if max_dets_per_image is None else int(max_dets_per_image)
    coco_eval.params.maxDets = [1, 10, max_dets]
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def summary_stats(coco_eval: COCOeval) -> np.ndarray:
    """The 12 numbers of pycocotools' summary (AP, AP50, AP75, APs/m/l, AR1, AR10, AR, ARs/m/l)."""
    return _summarize(coco_eval)[0]


def evaluate_box_predictions(
    coco_gt: COCO,
    results: list[dict],
    class_names: Sequence[str] | None = None,
    max_dets_per_image: int | None = None,
    img_ids: Sequence[int] | None = None,
    backend: str = "pycocotools",
) -> tuple[dict[str, float], str]:
    """Run COCOeval (bbox) on COCO result dicts; returns (metrics in percent, report text).

    `backend` is "pycocotools" (the reference) or "faster_coco_eval" (same numbers, faster).

    Metrics: AP, AP50, AP75, APs, APm, APl (NaN where COCO has nothing to measure, e.g. no
    large objects) and `AP-<class>` per category. `class_names` are listed in the order of the
    ground truth's sorted category ids (default: the json's names).
    """
    coco_eval = run_cocoeval(coco_gt, results, max_dets_per_image, img_ids, backend)
    stats, summary = _summarize(coco_eval)

    metrics: dict[str, float] = OrderedDict(
        (name, float(stats[i] * 100) if stats[i] >= 0 else float("nan"))
        for i, name in enumerate(BOX_METRICS)
    )
    cat_ids = list(coco_eval.params.catIds)
    if class_names is None or len(class_names) != len(cat_ids):
        if class_names is not None:
            logger.warning(
                "%d class names given for %d ground-truth categories; using the json's names",
                len(class_names),
                len(cat_ids),
            )
        class_names = [coco_gt.cats[c]["name"] for c in cat_ids]
    # precision: [IoU thresholds, recall thresholds, categories, areas, maxDets]
    precision = coco_eval.eval["precision"]
    per_category = []
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        ap = float(np.mean(p) * 100) if p.size else float("nan")
        per_category.append((str(name), ap))
        metrics[f"AP-{name}"] = ap
    table = tabulate(
        [[metrics[m] for m in BOX_METRICS]],
        headers=list(BOX_METRICS),
        tablefmt="pipe",
        floatfmt=".3f",
        numalign="left",
    )
    columns = 3  # (category, AP) pairs per row
    flat = list(itertools.chain(*per_category))
    rows = [flat[i : i + 2 * columns] for i in range(0, len(flat), 2 * columns)]
    category_table = tabulate(
        rows,
        headers=["category", "AP"] * min(columns, max(len(per_category), 1)),
        tablefmt="pipe",
        floatfmt=".3f",
        numalign="left",
    )
    report = (
        f"{summary}\nEvaluation results for bbox:\n{table}\nPer-category bbox AP:\n{category_table}"
    )
    return metrics, report


class COCOEvaluator(DatasetEvaluator):
    """Box AP on a registered dataset with pycocotools.

    Args:
        dataset_name: a registered dataset; its metadata `json_file` is the ground truth. Without
            one, the dataset's records are converted to a COCO json (in `output_dir`).
        tasks: only ("bbox",) is supported.
        distributed: gather predictions from all processes and evaluate on the main one.
        output_dir: where `instances_predictions.pth` / `coco_instances_results.json` go (None:
            not written).
        max_dets_per_image: COCOeval's largest maxDets (default 100, COCO's standard). Every
            prediction the model returns is kept; COCOeval uses the top ones per image.
        allow_cached_coco: reuse an earlier conversion of a json-less dataset.
        backend: "pycocotools" (default, the reference) or "faster_coco_eval" (the optional
            faster-coco-eval package: the same 12 numbers, several times faster).
        kpt_oks_sigmas: accepted for detectron2 compatibility; keypoints are not supported.
        visualize_n: write pictures of the first K images (predictions scoring >=
            `visualize_threshold` beside the ground truth) to `output_dir/visualize/`.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] | None = ("bbox",),
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        max_dets_per_image: int | None = None,
        allow_cached_coco: bool = True,
        backend: str = "pycocotools",
        kpt_oks_sigmas: Sequence[float] = (),
        visualize_n: int = 0,
        visualize_threshold: float = 0.5,
    ) -> None:
        if not isinstance(dataset_name, str) and hasattr(dataset_name, "__len__"):
            # e.g. names=["shapes_val"] interpolated from the test loader's dataset
            names = list(dataset_name)
            if len(names) != 1:
                raise ValueError(
                    f"COCOEvaluator evaluates one dataset, got {names}; build one evaluator per "
                    "dataset (DatasetEvaluators)"
                )
            dataset_name = names[0]
        dataset_name = str(dataset_name)
        if dataset_name not in DatasetCatalog:
            raise KeyError(
                f"COCOEvaluator: dataset {dataset_name!r} is not registered; registered: "
                f"{', '.join(sorted(DatasetCatalog.list()))}"
            )
        tasks = tuple(tasks) if tasks is not None else ("bbox",)
        unsupported = [t for t in tasks if t != "bbox"]
        if unsupported:
            raise ValueError(
                f"COCOEvaluator: tasks {unsupported} are not supported; detrkit evaluates "
                "tasks=('bbox',)"
            )
        if kpt_oks_sigmas:
            logger.warning("COCOEvaluator: kpt_oks_sigmas is ignored (no keypoint evaluation)")
        if max_dets_per_image is not None and int(max_dets_per_image) <= 10:
            raise ValueError(
                f"COCOEvaluator: max_dets_per_image must be > 10 (COCOeval also scores maxDets "
                f"1 and 10), got {max_dets_per_image}"
            )
        _cocoeval_class(backend)  # an unknown or missing backend fails here, not after inference
        self._backend = backend
        if isinstance(visualize_n, bool) or not isinstance(visualize_n, int) or visualize_n < 0:
            raise ValueError(
                f"COCOEvaluator: visualize_n must be an integer >= 0 (images to draw), got "
                f"{visualize_n!r}"
            )
        self._visualize_n = visualize_n
        self._visualize_threshold = float(visualize_threshold)
        self._visualized: list[dict] = []
        self._dataset_name = dataset_name
        self._tasks = tasks
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets_per_image = max_dets_per_image
        self._allow_cached_coco = allow_cached_coco
        self._metadata = MetadataCatalog.get(dataset_name)
        self._coco_api: COCO | None = None
        self._predictions: list[dict] = []

    # -- ground truth --------------------------------------------------------------------

    def _ground_truth(self) -> COCO:
        if self._coco_api is not None:
            return self._coco_api
        json_file = self._metadata.get("json_file")
        if json_file is not None and not _path_manager.exists(json_file):
            # e.g. a generated dataset: loading it once creates its files
            DatasetCatalog.get(self._dataset_name)
        if json_file is None or not _path_manager.exists(json_file):
            if json_file is not None:
                logger.warning(
                    "The json_file %s of dataset %r does not exist; converting the dataset's "
                    "records to COCO format instead",
                    json_file,
                    self._dataset_name,
                )
            cache_dir = self._output_dir or os.path.join("output", "coco_cache")
            json_file = os.path.join(cache_dir, f"{self._dataset_name}_coco_format.json")
            convert_to_coco_json(
                self._dataset_name, json_file, allow_cached=self._allow_cached_coco
            )
        self._coco_api = load_coco_api(json_file, check_boxes=True)
        return self._coco_api

    # -- DatasetEvaluator ----------------------------------------------------------------

    def reset(self) -> None:
        self._predictions = []
        self._visualized = []

    def _contiguous_to_dataset_id(self, coco_gt: COCO) -> dict[int, int]:
        """contiguous class index -> the ground truth's category id."""
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if id_map:
            return {int(contiguous): int(original) for original, contiguous in id_map.items()}
        # not loaded through load_coco_json yet: contiguous ids follow the sorted json ids
        return dict(enumerate(sorted(coco_gt.getCatIds())))

    def _class_names(self, coco_gt: COCO, to_dataset_id: dict[int, int]) -> list[str] | None:
        """`thing_classes` in COCOeval's order (sorted category ids), through the id map: a
        dataset may map its ids to contiguous labels in any order."""
        classes = self._metadata.get("thing_classes")
        if classes is None:
            return None
        by_dataset_id = {to_dataset_id.get(i): name for i, name in enumerate(classes)}
        cat_ids = sorted(coco_gt.getCatIds())
        if all(c in by_dataset_id for c in cat_ids):
            return [by_dataset_id[c] for c in cat_ids]
        return list(classes)  # evaluate_box_predictions reports the mismatch

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "image_id" not in inp:
                raise KeyError(
                    "COCOEvaluator.process: each input dict needs the record's 'image_id' (got "
                    f"keys {sorted(inp)})"
                )
            prediction: dict[str, Any] = {"image_id": inp["image_id"]}
            if "instances" in out:
                # category ids stay contiguous here; evaluate() maps them to the dataset's ids
                instances = out["instances"].to("cpu")
                prediction["instances"] = instances_to_coco_json(instances, inp["image_id"])
                if len(self._visualized) < self._visualize_n and "file_name" in inp:
                    keep = {"file_name": inp["file_name"], "image_id": inp["image_id"]}
                    self._visualized.append({**keep, "instances": instances})
            self._predictions.append(prediction)

    def evaluate(self, img_ids: Sequence[int] | None = None) -> dict | None:
        if self._distributed and get_world_size() > 1:
            synchronize()
            gathered = gather(self._predictions, dst=0)
            if not is_main_process():
                return {}
            predictions = list(itertools.chain(*gathered))
        else:
            predictions = list(self._predictions)

        # an image seen by two processes (a sampler that pads shards) is counted once
        unique: OrderedDict = OrderedDict()
        for p in predictions:
            unique.setdefault(p["image_id"], p)
        if len(unique) != len(predictions):
            logger.warning(
                "COCOEvaluator: %d duplicate image predictions were ignored",
                len(predictions) - len(unique),
            )
        predictions = list(unique.values())

        if self._output_dir:
            _path_manager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "instances_predictions.pth")
            # atomic: an evaluation killed here leaves the previous file, never a partial one
            atomic_write(path, lambda f: torch.save(predictions, f))

        if not predictions:
            logger.warning(
                "COCOEvaluator did not receive any image of %r; nothing to evaluate",
                self._dataset_name,
            )
        results = self._eval_predictions(predictions, img_ids)
        if self._visualized and self._output_dir:
            self._write_visualizations()
        return copy.deepcopy(results)

    def _write_visualizations(self) -> None:
        """Predictions beside the ground truth for the first `visualize_n` images."""
        coco_gt = self._ground_truth()
        to_contiguous = {v: k for k, v in self._contiguous_to_dataset_id(coco_gt).items()}
        folder = os.path.join(self._output_dir, "visualize")
        _path_manager.mkdirs(folder)
        for item in self._visualized:
            annotations = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[item["image_id"]]))
            boxes = [
                BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in annotations
            ]
            classes = [to_contiguous.get(a["category_id"], -1) for a in annotations]
            try:
                image = read_image(item["file_name"], "RGB")
            except ImageLoadError as e:
                logger.warning("Not drawing image %s: %s", item["image_id"], e)
                continue
            picture = draw_predictions_and_ground_truth(
                image,
                item["instances"],
                np.asarray(boxes, dtype=np.float64),
                classes,
                self._metadata,
                self._visualize_threshold,
            )
            name = os.path.splitext(os.path.basename(item["file_name"]))[0]
            Image.fromarray(picture).save(os.path.join(folder, f"{name}.png"))
        logger.info("Predictions vs ground truth of %d images in %s", len(self._visualized), folder)

    def _eval_predictions(self, predictions: list[dict], img_ids: Sequence[int] | None) -> dict:
        coco_gt = self._ground_truth()
        to_dataset_id = self._contiguous_to_dataset_id(coco_gt)
        coco_results = []
        for p in predictions:
            for result in p.get("instances", []):
                label = result["category_id"]
                if label not in to_dataset_id:
                    raise ValueError(
                        f"Image {result['image_id']}: predicted class {label} is not a class of "
                        f"dataset {self._dataset_name!r} (contiguous ids 0.."
                        f"{len(to_dataset_id) - 1}); the model's num_classes must match the "
                        "dataset's thing_classes"
                    )
                coco_results.append({**result, "category_id": to_dataset_id[label]})
        if not coco_results:
            logger.warning(
                "COCOEvaluator: the model made no predictions on %d images of %r; every AP is 0",
                len(predictions),
                self._dataset_name,
            )
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            logger.info("Saving results to %s", path)
            atomic_write(path, lambda f: f.write(json.dumps(coco_results).encode("utf-8")))

        known_images = set(coco_gt.getImgIds())
        unknown = {r["image_id"] for r in coco_results} - known_images
        if unknown:
            raise ValueError(
                f"COCOEvaluator: predictions for image ids {sorted(unknown)[:5]} that are not in "
                f"the ground truth of {self._dataset_name!r} ({self._metadata.get('json_file')})"
            )
        evaluated = known_images if img_ids is None else set(img_ids)
        unseen = sorted(evaluated - {p["image_id"] for p in predictions})
        if unseen and predictions:
            logger.warning(
                "COCOEvaluator: %d of %d images of %r never reached the evaluator (left out as "
                "bad images, or a test loader over part of the dataset); COCOeval counts their "
                "objects as misses. Image ids: %s",
                len(unseen),
                len(evaluated),
                self._dataset_name,
                unseen[:5] + (["..."] if len(unseen) > 5 else []),
            )
        class_names = self._class_names(coco_gt, to_dataset_id)
        logger.info("Evaluating predictions with %s COCOeval (bbox) ...", self._backend)
        metrics, report = evaluate_box_predictions(
            coco_gt,
            coco_results,
            class_names,
            self._max_dets_per_image,
            img_ids,
            backend=self._backend,
        )
        logger.info("\n%s", report)
        return {"bbox": metrics}
