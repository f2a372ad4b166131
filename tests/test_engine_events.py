"""EventStorage and the metric writers (console line, metrics.json)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from helpers import capture_logs

from detrkit.engine import CommonMetricPrinter, EventStorage, JSONWriter, get_event_storage
from detrkit.engine.setup import default_writers


def test_storage_records_and_smooths():
    values = [random.uniform(0, 10) for _ in range(30)]
    with EventStorage(start_iter=0) as storage:
        assert get_event_storage() is storage
        for i, v in enumerate(values):
            storage.iter = i
            storage.put_scalar("loss", torch.tensor(v))
            storage.put_scalar("lr", v / 100, smoothing_hint=False)
        latest = storage.latest_with_smoothing_hint(window_size=20)
        # losses: median over the window; lr: the latest value as is
        assert latest["loss"][0] == pytest.approx(float(np.median(values[-20:])))
        assert latest["loss"][1] == 29
        assert latest["lr"] == (pytest.approx(values[-1] / 100), 29)
        assert storage.history("loss").latest() == pytest.approx(values[-1])
        assert storage.smoothing_hints() == {"loss": True, "lr": False}
        with pytest.raises(KeyError, match="nope"):
            storage.history("nope")
        with pytest.raises(ValueError, match="smoothing_hint"):
            storage.put_scalar("lr", 1.0, smoothing_hint=True)
        with storage.name_scope("val"):
            storage.put_scalars(acc=0.5, smoothing_hint=False)
        assert "val/acc" in storage.latest()


def test_get_event_storage_outside_a_block():
    with pytest.raises(AssertionError, match="EventStorage"):
        get_event_storage()


def test_json_writer_one_object_per_iteration(tmp_path):
    path = tmp_path / "metrics.json"
    writer = JSONWriter(str(path), window_size=1)
    with EventStorage() as storage:
        for i in range(4):
            storage.iter = i
            storage.put_scalars(total_loss=1.0 + i, loss_a=0.5 + i)
            storage.put_scalar("lr", 0.1 * (i + 1), smoothing_hint=False)
            if i % 2 == 1:
                writer.write()
        # evaluation results put later at an already-written iteration still get written
        storage.put_scalars(
            **{"bbox/AP": 40.5, "bbox/AP-cat": 12.0}, smoothing_hint=False, cur_iter=3
        )
        writer.write()
        writer.write()  # nothing new: no new lines
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 3, 3]
    assert lines[0] == {"iteration": 1, "total_loss": 2.0, "loss_a": 1.5, "lr": pytest.approx(0.2)}
    assert lines[2] == {"iteration": 3, "bbox/AP": 40.5, "bbox/AP-cat": 12.0}


def test_console_line_format():
    """`eta: H:MM:SS  iter: N  total_loss: ...  loss_x: ...  time: ...  data_time: ...  lr: ...`

    total_loss first, then the other losses in the order they were first recorded (the trainer
    records them sorted by name)."""
    losses = [random.uniform(1, 2) for _ in range(80)]
    times = [random.uniform(0.1, 0.2) for _ in range(80)]
    printer = CommonMetricPrinter(max_iter=1000, window_size=20)
    with EventStorage() as storage:
        for i in range(80):
            storage.iter = i
            storage.put_scalars(
                total_loss=losses[i] * 3, loss_class=losses[i], loss_bbox=losses[i] * 2
            )
            storage.put_scalars(time=times[i], data_time=times[i] / 10)
            storage.put_scalar("lr", 1e-4, smoothing_hint=False)
        with capture_logs("detrkit.engine") as records:
            printer.write()
        eta = storage.latest()["eta_seconds"][0]
    record = [r for r in records if r.name == "detrkit.engine"][-1]
    line = record.getMessage()
    pattern = (
        r"eta: (\d+):(\d\d):(\d\d)  iter: 79  total_loss: (\S+)  loss_class: (\S+)  "
        r"loss_bbox: (\S+)  time: (\S+)  data_time: (\S+)  lr: 0\.0001"
    )
    match = re.fullmatch(pattern, line)
    assert match, line
    assert "max_mem" not in line  # CPU only
    h, m, s = (int(x) for x in match.groups()[:3])
    # eta = median iteration time x remaining iterations
    expected_eta = np.median(times) * (1000 - 79 - 1)
    assert abs(h * 3600 + m * 60 + s - int(expected_eta)) <= 1
    assert eta == pytest.approx(expected_eta)
    assert float(match.group(4)) == pytest.approx(np.median(np.array(losses[-20:]) * 3), rel=1e-3)
    assert float(match.group(5)) == pytest.approx(np.median(losses[-20:]), rel=1e-3)
    assert float(match.group(6)) == pytest.approx(np.median(np.array(losses[-20:]) * 2), rel=1e-3)
    assert float(match.group(7)) == pytest.approx(np.mean(times[-20:]), rel=1e-3)


@pytest.mark.parametrize("cuda_in_use", [False, True])
def test_console_line_shows_gpu_memory_only_when_cuda_is_used(monkeypatch, cuda_in_use):
    # a CPU run on a GPU machine: CUDA is available but never initialised, no max_mem
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: cuda_in_use)
    monkeypatch.setattr("torch.cuda.max_memory_allocated", lambda *a, **k: 1234 * 1024 * 1024)
    printer = CommonMetricPrinter(max_iter=10)
    with EventStorage() as storage:
        storage.iter = 3
        storage.put_scalars(total_loss=1.0, time=0.1, data_time=0.01)
        with capture_logs("detrkit.engine") as records:
            printer.write()
    line = [r for r in records if r.name == "detrkit.engine"][-1].getMessage()
    assert line.endswith("max_mem: 1234M") == cuda_in_use, line
    assert ("max_mem" in line) == cuda_in_use, line


def test_printer_skips_the_write_after_training():
    printer = CommonMetricPrinter(max_iter=10)
    with EventStorage() as storage, capture_logs("detrkit.engine") as records:
        storage.iter = 10
        storage.put_scalar("total_loss", 1.0)
        printer.write()
    assert not [r for r in records if r.name == "detrkit.engine"]


def _hide_tensorboard(monkeypatch):
    """Make this process look like one without the optional tensorboard package."""
    import importlib.util
    import sys

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: (
            None if name.split(".")[0] == "tensorboard" else find_spec(name, *a, **k)
        ),
    )
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)


def test_default_writers_without_tensorboard(tmp_path, monkeypatch):
    _hide_tensorboard(monkeypatch)
    with pytest.raises(ImportError):
        import tensorboard  # noqa: F401
    with capture_logs("detrkit.engine.setup") as records:
        writers = default_writers(str(tmp_path), max_iter=100)
    assert [type(w) for w in writers] == [
        CommonMetricPrinter,
        JSONWriter,
    ]  # printer first: it puts eta_seconds
    assert any("tensorboard is not installed" in r.getMessage() for r in records)
    for w in writers:
        w.close()


def test_default_writers_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from detrkit.engine import TensorboardXWriter

    writers = default_writers(str(tmp_path), max_iter=100)
    assert [type(w) for w in writers] == [CommonMetricPrinter, JSONWriter, TensorboardXWriter]
    for w in writers:
        w.close()


def test_tensorboard_writer_writes_what_the_storage_holds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from detrkit.engine import TensorboardXWriter

    rng = random.Random()
    losses = [rng.uniform(0.1, 5.0) for _ in range(6)]
    writer = TensorboardXWriter(str(tmp_path), window_size=1)
    with EventStorage() as storage:
        for iteration, loss in enumerate(losses):
            storage.iter = iteration
            storage.put_scalar("total_loss", loss, smoothing_hint=False)
            if iteration % 2 == 1:
                writer.write()  # every other iteration: only the latest value is new
    writer.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    written = [(e.step, e.value) for e in events.Scalars("total_loss")]
    assert [step for step, _ in written] == [1, 3, 5]
    assert [value for _, value in written] == pytest.approx([losses[1], losses[3], losses[5]])
