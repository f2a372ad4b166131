"""Running a model over a test loader and handing its outputs to evaluators.

`inference_on_dataset` is what the trainer's evaluation hook and `--eval-only` call: it puts the
model in eval mode (restoring the previous mode afterwards), feeds every batch through it under
`torch.no_grad`, passes inputs and outputs to the evaluator, logs progress with an ETA and returns
the evaluator's results (a dict of task -> metric -> value).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections import OrderedDict, abc
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from detrkit.utils.comm import get_world_size, is_main_process

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_context",
    "inference_on_dataset",
    "print_csv_format",
    "verify_results",
]


class DatasetEvaluator:
    """Accumulates model outputs over a dataset and computes metrics at the end.

    Subclasses implement `reset` (start over), `process(inputs, outputs)` (one batch: the list of
    dicts given to the model and the list it returned) and `evaluate()` (a dict of results on the
    main process; None or {} elsewhere).
    """

    def reset(self) -> None:
        pass

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        pass

    def evaluate(self) -> dict | None:
        return None


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run side by side; their results are merged into one dict."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]) -> None:
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict:
        results: OrderedDict = OrderedDict()
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if not is_main_process() or result is None:
                continue
            for key, value in result.items():
                if key in results:
                    raise KeyError(
                        f"DatasetEvaluators: two evaluators both returned results for {key!r}; "
                        "each task name may be produced by one evaluator only"
                    )
                results[key] = value
        return results


@contextmanager
def inference_context(model: nn.Module):
    """Switch `model` to eval mode for the duration of the block, then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _seconds_per_iter(total: float, count: int) -> float:
    return total / max(count, 1)


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable,
    evaluator: DatasetEvaluator | Sequence[DatasetEvaluator] | None,
    callbacks: Mapping[str, Any] | None = None,
) -> dict:
    """Run `model` on every batch of `data_loader` and evaluate the outputs with `evaluator`.

    The model runs in eval mode under `torch.no_grad`; its training flag is restored afterwards.
    `evaluator` may be None (only the timing is measured), one evaluator or a list of them.
    `callbacks` may hold callables `on_start()`, `before_inference()`, `after_inference()` and
    `on_end()`. Empty batches (all images skipped as unreadable by the mapper) are passed over.
    Returns `evaluator.evaluate()` ({} where that is None, e.g. on non-main ranks).
    The first few iterations are excluded from the speed figures (warm-up).
    """
    num_devices = get_world_size()
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    logger.info(
        "Start inference on %s batches", total if total is not None else "an unknown number of"
    )

    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif isinstance(evaluator, abc.MutableSequence | tuple):
        evaluator = DatasetEvaluators(evaluator)
    evaluator.reset()

    callbacks = dict(callbacks or {})
    unknown = set(callbacks) - {"on_start", "before_inference", "after_inference", "on_end"}
    if unknown:
        raise KeyError(
            f"inference_on_dataset: unknown callbacks {sorted(unknown)}; accepted: on_start, "
            "before_inference, after_inference, on_end"
        )

    def _call(name: str) -> None:
        fn = callbacks.get(name)
        if fn is not None:
            fn()

    num_warmup = min(5, total - 1) if total else 0
    start_time = time.perf_counter()
    total_data_time = total_compute_time = total_eval_time = 0.0
    idx = -1
    last_log: float | None = None
    log_period = 5.0  # seconds between progress lines
    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())

        _call("on_start")
        data_start = time.perf_counter()
        for idx, inputs in enumerate(data_loader):
            total_data_time += time.perf_counter() - data_start
            if isinstance(inputs, list) and not inputs:
                # every image of this batch was skipped by the mapper (skip_bad_images=True)
                data_start = time.perf_counter()
                continue
            if idx == num_warmup:
                # restart the clocks once the warm-up iterations are over
                start_time = time.perf_counter()
                total_data_time = total_compute_time = total_eval_time = 0.0
            iters_after_start = idx + 1 - num_warmup * int(idx >= num_warmup)

            compute_start = time.perf_counter()
            _call("before_inference")
            outputs = model(inputs)
            _call("after_inference")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            total_compute_time += time.perf_counter() - compute_start

            eval_start = time.perf_counter()
            evaluator.process(inputs, outputs)
            total_eval_time += time.perf_counter() - eval_start

            data_per_iter = _seconds_per_iter(total_data_time, iters_after_start)
            compute_per_iter = _seconds_per_iter(total_compute_time, iters_after_start)
            eval_per_iter = _seconds_per_iter(total_eval_time, iters_after_start)
            total_per_iter = _seconds_per_iter(time.perf_counter() - start_time, iters_after_start)
            # the first batch, then at most one line every `log_period` seconds
            now = time.perf_counter()
            if last_log is None or now - last_log >= log_period:
                last_log = now
                if total is not None:
                    eta = datetime.timedelta(seconds=int(total_per_iter * (total - idx - 1)))
                    progress, eta_text = f"{idx + 1}/{total}", f" ETA={eta}"
                else:
                    progress, eta_text = f"{idx + 1}", ""
                logger.info(
                    f"Inference done {progress}. Dataloading: {data_per_iter:.4f} s/iter. "
                    f"Inference: {compute_per_iter:.4f} s/iter. "
                    f"Eval: {eval_per_iter:.4f} s/iter. "
                    f"Total: {total_per_iter:.4f} s/iter.{eta_text}"
                )
            data_start = time.perf_counter()
        _call("on_end")

    num_done = idx + 1
    measured = max(num_done - num_warmup, 1) if num_done > num_warmup else max(num_done, 1)
    total_time = time.perf_counter() - start_time
    logger.info(
        "Total inference time: %s (%.6f s / iter per device, on %d devices)",
        datetime.timedelta(seconds=int(total_time)),
        total_time / measured,
        num_devices,
    )
    logger.info(
        "Total inference pure compute time: %s (%.6f s / iter per device, on %d devices)",
        datetime.timedelta(seconds=int(total_compute_time)),
        total_compute_time / measured,
        num_devices,
    )

    results = evaluator.evaluate()
    # evaluators return None on non-main processes; callers can index the result either way
    if results is None:
        results = {}
    return results


def print_csv_format(results: Mapping[str, Any]) -> None:
    """Log `copypaste:` lines for each task, for pasting into a spreadsheet.

    `results` maps task -> {metric: value}; per-category metrics (keys containing '-') are left out.
    """
    if not isinstance(results, Mapping):
        raise TypeError(
            f"print_csv_format: expected a dict of task -> {{metric: value}}, got {type(results)}"
        )
    csv_logger = logging.getLogger(__name__)
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            csv_logger.info("copypaste: %s=%s", task, metrics)
            continue
        important = [(k, v) for k, v in metrics.items() if "-" not in k]
        csv_logger.info("copypaste: Task: %s", task)
        csv_logger.info("copypaste: %s", ",".join(k for k, _ in important))
        csv_logger.info("copypaste: %s", ",".join(f"{float(v):.4f}" for _, v in important))


def verify_results(
    results: Mapping[str, Mapping[str, float]],
    expected_results: Iterable[tuple[str, str, float, float]],
) -> bool:
    """Check `results` against a list of (task, metric, expected value, tolerance).

    Logs every mismatch and returns True when all match; a missing task/metric or a NaN result
    counts as a mismatch.
    """
    ok = True
    for task, metric, expected, tolerance in expected_results:
        actual = results.get(task, {}).get(metric, float("nan"))
        if not math.isfinite(actual) or abs(actual - expected) > tolerance:
            ok = False
            logger.error(
                "Result verification failed: %s/%s = %s, expected %s (tolerance %s)",
                task,
                metric,
                actual,
                expected,
                tolerance,
            )
    if ok:
        logger.info("Results verification passed.")
    return ok
