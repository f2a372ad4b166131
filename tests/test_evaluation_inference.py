"""inference_on_dataset: mode handling, no_grad, evaluator plumbing, logging; print_csv_format."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from torch import nn

from detrkit.evaluation import (
    DatasetEvaluator,
    DatasetEvaluators,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)


class _Recorder(nn.Module):
    """Returns one dict per input and records the mode and grad state it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, inputs):
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return [{"value": self.weight * x["x"]} for x in inputs]


class _SumEvaluator(DatasetEvaluator):
    def __init__(self, task: str) -> None:
        self.task = task

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def process(self, inputs, outputs) -> None:
        for out in outputs:
            assert out["value"].requires_grad is False
            self.total += float(out["value"])
            self.count += 1

    def evaluate(self):
        return {self.task: {"sum": self.total, "count": self.count}}


@pytest.mark.parametrize("training", [True, False])
def test_inference_restores_mode_and_uses_no_grad(training):
    model = _Recorder()
    model.train(training)
    values = [random.uniform(-5, 5) for _ in range(random.randint(3, 9))]
    loader = [[{"x": torch.tensor(v)}] for v in values]
    results = inference_on_dataset(model, loader, _SumEvaluator("t"))
    assert model.training is training
    assert model.seen_training == [False] * len(values)
    assert model.seen_grad == [False] * len(values)
    assert results["t"]["count"] == len(values)
    assert results["t"]["sum"] == pytest.approx(sum(values), rel=1e-5)


def test_inference_restores_mode_on_error():
    class Boom(nn.Module):
        def forward(self, inputs):
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        inference_on_dataset(model, [[{}]], None)
    assert model.training


def test_inference_without_evaluator_and_with_a_list(caplog):
    model = _Recorder()
    loader = [[{"x": torch.tensor(1.0)}, {"x": torch.tensor(2.0)}] for _ in range(4)]
    with caplog.at_level(logging.INFO, logger="detrkit"):
        assert inference_on_dataset(model, loader, None) == {}
    text = caplog.text
    assert "Inference done" in text and "ETA=" in text and "/4." in text
    assert "Total inference time" in text

    results = inference_on_dataset(model, loader, [_SumEvaluator("a"), _SumEvaluator("b")])
    assert results["a"] == {"sum": 12.0, "count": 8} == results["b"]


def test_evaluators_reject_duplicate_tasks():
    with pytest.raises(KeyError, match="'a'"):
        inference_on_dataset(_Recorder(), [], DatasetEvaluators([_SumEvaluator("a")] * 2))


def test_callbacks_are_called_and_unknown_ones_rejected():
    calls = []
    cbs = {k: (lambda k=k: calls.append(k)) for k in ("on_start", "before_inference", "on_end")}
    inference_on_dataset(_Recorder(), [[{"x": torch.tensor(1.0)}]] * 2, None, callbacks=cbs)
    assert calls == ["on_start", "before_inference", "before_inference", "on_end"]
    with pytest.raises(KeyError, match="on_begin"):
        inference_on_dataset(_Recorder(), [], None, callbacks={"on_begin": print})


def test_print_csv_format(caplog):
    results = {"bbox": {"AP": 44.9, "AP50": 63.9, "AP75": 48.8, "AP-person": 50.0}}
    with caplog.at_level(logging.INFO, logger="detrkit"):
        print_csv_format(results)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("copypaste:")]
    assert lines == [
        "copypaste: Task: bbox",
        "copypaste: AP,AP50,AP75",
        "copypaste: 44.9000,63.9000,48.8000",
    ]


def test_verify_results():
    results = {"bbox": {"AP": 40.0, "AP50": float("nan")}}
    assert verify_results(results, [("bbox", "AP", 40.05, 0.1)])
    assert not verify_results(results, [("bbox", "AP", 41.0, 0.1)])
    assert not verify_results(results, [("bbox", "AP50", 1.0, 100)])
    assert not verify_results(results, [("segm", "AP", 1.0, 100)])
