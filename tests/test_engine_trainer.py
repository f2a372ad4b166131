"""Trainer and hooks, in-process on the toy model: loss dict, NaN stop, AMP, gradient clipping,
state dicts, LR schedule on resume, checkpoint files, evaluation, EMA."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler
from helpers import capture_logs
from toy import ToyEvaluator, ToyLoader, ToyModel, ToyTestLoader

from detrkit.checkpoint import DetectionCheckpointer
from detrkit.engine import (
    EMAHook,
    EvalHook,
    HookBase,
    IterationTimer,
    JSONWriter,
    LRScheduler,
    ModelEMA,
    PeriodicCheckpointer,
    PeriodicWriter,
    Trainer,
    create_ddp_model,
)
from detrkit.engine.optimizer import WarmupParamScheduler
from detrkit.evaluation import inference_on_dataset


def make_trainer(seed: int = 0, optimizer: str = "sgd", lr: float = 0.05, **trainer_kwargs):
    torch.manual_seed(seed)
    model = ToyModel(**trainer_kwargs.pop("model_kwargs", {}))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return Trainer(model, ToyLoader(batch_size=8, seed=0), opt, **trainer_kwargs)


class Recorder(HookBase):
    """Records what a test needs after every step."""

    def __init__(self, fn):
        self.fn = fn
        self.records = []

    def after_step(self):
        self.records.append(self.fn(self.trainer))


def test_losses_are_summed_and_recorded():
    trainer = make_trainer()
    seen = Recorder(lambda t: {k: v[0] for k, v in t.storage.latest().items()})
    trainer.register_hooks([seen])
    trainer.train(0, 5)
    assert trainer.iter == 5  # one past the last iteration after a complete run
    for rec in seen.records:
        assert rec["total_loss"] == pytest.approx(rec["loss_mse"] + rec["loss_l1"])
        assert rec["data_time"] >= 0
    # the loss goes down on this easy problem
    assert seen.records[-1]["total_loss"] < seen.records[0]["total_loss"]


def test_non_finite_loss_stops_with_the_iteration_and_every_loss():
    trainer = make_trainer(model_kwargs={"nan_at_iter": 3})
    with pytest.raises(FloatingPointError) as info:
        trainer.train(0, 10)
    message = str(info.value)
    assert "iteration 3" in message
    assert "loss_mse=nan" in message
    assert re.search(r"loss_l1=\d+\.\d+", message), message
    assert "total_loss=nan" in message
    # the NaN loss never reached the weights
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class _BackwardProbe(HookBase):
    """Records, at `after_backward`, whether gradients exist and whether the weights still are
    those the step started from."""

    def __init__(self):
        self.calls = []
        self._start = None

    def before_step(self):
        self._start = [p.detach().clone() for p in self.trainer.model.parameters()]

    def after_backward(self):
        params = list(self.trainer.model.parameters())
        has_grads = all(p.grad is not None for p in params)
        unchanged = all(torch.equal(p, s) for p, s in zip(params, self._start))
        self.calls.append((self.trainer.iter, has_grads, unchanged))


def test_after_backward_runs_once_per_step_between_backward_and_update():
    trainer = make_trainer()
    probe = _BackwardProbe()
    trainer.register_hooks([probe])
    trainer.train(0, 4)
    assert probe.calls == [(i, True, True) for i in range(4)]


def test_gather_metric_period_records_every_nth_step_and_checks_there():
    trainer = make_trainer(gather_metric_period=3)
    trainer.train(0, 8)
    assert [i for _, i in trainer.storage.history("total_loss").values()] == [2, 5]
    assert [i for _, i in trainer.storage.history("data_time").values()] == [2, 5]
    # a NaN loss is seen at the next gathered step (its gradients reached the weights)
    trainer = make_trainer(model_kwargs={"nan_at_iter": 3}, gather_metric_period=3)
    with pytest.raises(FloatingPointError, match="iteration 5"):
        trainer.train(0, 10)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"train.gather_metric_period=.*accepted"):
            make_trainer(gather_metric_period=bad)


class _DtypeProbe(ToyModel):
    def forward(self, batch):
        self.seen_dtype = self.net(torch.zeros(1, 8)).dtype
        return super().forward(batch)


def test_bf16_autocast_trains_on_cpu():
    torch.manual_seed(0)
    model = _DtypeProbe()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, ToyLoader(), opt, amp=True, amp_dtype="bfloat16")
    losses = Recorder(lambda t: t.storage.latest()["total_loss"][0])
    trainer.register_hooks([losses])
    trainer.train(0, 30)
    assert model.seen_dtype == torch.bfloat16  # the forward ran under autocast
    assert trainer.grad_scaler is None  # bf16 needs no scaler
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert losses.records[-1] < 0.7 * losses.records[0]
    assert "grad_scaler" not in trainer.state_dict()


@pytest.mark.parametrize("kernels", [True, False])
def test_bf16_on_a_cpu_without_bf16_kernels_warns_that_it_is_slow(kernels, monkeypatch):
    import detrkit.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_bf16_supported", lambda: kernels)
    with capture_logs("detrkit.engine.trainer") as records:
        trainer = make_trainer(amp=True, amp_dtype="bfloat16")
    assert trainer.amp_dtype == torch.bfloat16
    slow = [r.getMessage() for r in records if "no oneDNN bfloat16 kernels" in r.getMessage()]
    assert len(slow) == (0 if kernels else 1)
    if slow:
        assert "train.amp.enabled=False" in slow[0]  # what to do instead


def test_fp16_on_cpu_falls_back_to_bf16_with_a_warning():
    with capture_logs("detrkit.engine.trainer") as records:
        trainer = make_trainer(amp=True, amp_dtype="float16")
    assert trainer.amp_dtype == torch.bfloat16
    assert any("bfloat16" in r.getMessage() for r in records)
    with pytest.raises(ValueError, match=r"train.amp.dtype='int8'.*float16"):
        make_trainer(amp=True, amp_dtype="int8")


@pytest.mark.parametrize("clip", [None, {"max_norm": 1e-3, "norm_type": 2}])
def test_gradient_clipping(clip):
    trainer = make_trainer(clip_grad_params=clip)
    norms = []
    original_step = trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step_and_record
    trainer.train(0, 5)
    if clip is None:
        assert min(norms) > 1e-2  # the toy gradients are far above the clip threshold
    else:
        assert max(norms) == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        make_trainer(clip_grad_params={"norm_type": 2})
    # 0 would zero every gradient; None would fail inside torch at the first step
    for bad in (0, 0.0, -1.0, None, "0.1"):
        with pytest.raises(ValueError, match=r"train.clip_grad.params.max_norm=.*positive number"):
            make_trainer(clip_grad_params={"max_norm": bad})


def test_logged_lr_is_the_main_groups_not_the_backbones():
    # like Deformable DETR: a 0.1x backbone of few large tensors, a 1x rest of many small ones
    backbone = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(2)]
    rest = [torch.nn.Parameter(torch.zeros(10)) for _ in range(5)]
    optimizer = torch.optim.SGD([{"params": backbone, "lr": 1e-5}, {"params": rest, "lr": 1e-4}])
    assert LRScheduler._pick_param_group(optimizer) == 1
    # one tensor per group (e.g. per-parameter groups): the most common lr
    singles = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 3, 3)]
    lrs = [1e-5, 1e-4, 1e-4]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(singles, lrs)])
    assert LRScheduler._pick_param_group(optimizer) == 1


def test_state_dict_layout_and_round_trip():
    trainer = make_trainer(optimizer="adamw")
    trainer.register_hooks([LRScheduler(scheduler=CosineParamScheduler(1.0, 0.1))])
    trainer.train(0, 4)
    state = trainer.state_dict()
    assert set(state) == {"iteration", "optimizer", "hooks"}
    assert set(state["hooks"]) == {"LRScheduler"}
    assert state["hooks"]["LRScheduler"]["last_epoch"] == 4

    other = make_trainer(seed=1, optimizer="adamw")
    other.register_hooks([LRScheduler(scheduler=CosineParamScheduler(1.0, 0.1))])
    other.load_state_dict(copy.deepcopy(state))
    assert other.iter == state["iteration"]
    loaded = other.optimizer.state_dict()["state"]
    for key, value in state["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded[key][name], value[name])


def test_lr_schedule_continues_after_resume():
    """The lr of every iteration after a resume equals the uninterrupted run's."""

    def schedule():
        return WarmupParamScheduler(
            MultiStepParamScheduler([1.0, 0.1], milestones=[6], num_updates=10),
            warmup_factor=0.01,
            warmup_length=0.3,
        )

    full = make_trainer(optimizer="adamw", lr=1e-2)
    snapshots = {}
    # the hook records the lr an iteration used before it steps the schedule
    full_lrs = Recorder(lambda t: t.storage.latest()["lr"][0])
    snap = Recorder(lambda t: snapshots.setdefault(t.iter, copy.deepcopy(t.state_dict())))
    full.register_hooks([LRScheduler(scheduler=schedule()), full_lrs, snap])
    full.train(0, 10)
    # oracle: base lr x the fvcore schedule at i / max_iter
    for i, lr in enumerate(full_lrs.records):
        assert lr == pytest.approx(1e-2 * schedule()(i / 10)), i

    resumed = make_trainer(seed=5, optimizer="adamw", lr=1e-2)
    resumed_lrs = Recorder(lambda t: t.storage.latest()["lr"][0])
    resumed.register_hooks([LRScheduler(scheduler=schedule()), resumed_lrs])
    resumed.load_state_dict(snapshots[4])
    resumed.train(resumed.iter + 1, 10)
    assert resumed_lrs.records == pytest.approx(full_lrs.records[5:])


def test_iteration_timer_logs_overall_speed():
    trainer = make_trainer()
    trainer.register_hooks([IterationTimer(warmup_iter=2)])
    with capture_logs("detrkit.engine.hooks") as records:
        trainer.train(0, 7)
    lines = [r.getMessage() for r in records if "Overall training speed" in r.getMessage()]
    assert len(lines) == 1
    match = re.fullmatch(
        r"Overall training speed: (\d+) iterations in \d+:\d\d:\d\d \((\d+\.\d+) s / it\)",
        lines[0],
    )
    assert match, lines[0]
    assert int(match.group(1)) == 5  # 7 iterations minus 2 of warm-up
    times = trainer.storage.history("time").values()
    assert len(times) == 7
    assert float(match.group(2)) == pytest.approx(sum(t for t, _ in times[2:]) / 5, abs=1e-4)


def test_periodic_checkpointer_files_and_layout(tmp_path):
    trainer = make_trainer(optimizer="adamw")
    checkpointer = DetectionCheckpointer(trainer.model, str(tmp_path), trainer=trainer)
    trainer.register_hooks(
        [
            LRScheduler(scheduler=CosineParamScheduler(1.0, 0.1)),
            PeriodicCheckpointer(checkpointer, period=3, max_to_keep=2),
        ]
    )
    trainer.train(0, 10)
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".sha256"))
    # saved after iterations 2, 5, 8 (+ final); the oldest periodic one was removed (with its
    # checksum file)
    assert files == ["last_checkpoint", "model_0000005.pth", "model_0000008.pth", "model_final.pth"]
    assert not (tmp_path / "model_0000002.pth.sha256").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    ckpt = torch.load(tmp_path / "model_0000008.pth", weights_only=True)
    assert set(ckpt) == {"model", "trainer", "iteration"}
    assert ckpt["iteration"] == 8
    assert set(ckpt["trainer"]) == {"iteration", "optimizer", "hooks"}
    assert ckpt["trainer"]["iteration"] == 8
    assert ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 9
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(final["model"][name], value)


def test_eval_hook_periods_and_metrics(tmp_path):
    trainer = make_trainer()
    calls = []

    def evaluate():
        calls.append(trainer.iter)
        assert not trainer.model.training
        return {"toy": {"mse": 1.0 + trainer.iter, "AP-cat": 2.0}}

    def eval_function():
        trainer.model.eval()  # left in eval mode on purpose: the hook restores training mode
        return evaluate()

    metrics = tmp_path / "metrics.json"
    trainer.register_hooks(
        [EvalHook(4, eval_function), PeriodicWriter([JSONWriter(str(metrics))], period=5)]
    )
    trainer.train(0, 10)
    # every 4th iteration (3, 7) and once after the last one (iter == max_iter then)
    assert calls == [3, 7, 10]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = {line["iteration"]: line["toy/mse"] for line in lines if "toy/mse" in line}
    assert evals == {3: 4.0, 7: 8.0, 9: 11.0}
    assert all(line.get("toy/AP-cat", 2.0) == 2.0 for line in lines)


def test_eval_hook_skips_the_final_eval_after_a_failure():
    trainer = make_trainer(model_kwargs={"nan_at_iter": 9})
    calls = []
    trainer.register_hooks([EvalHook(0, lambda: calls.append(trainer.iter) or {})])
    with pytest.raises(FloatingPointError):
        trainer.train(0, 10)
    assert calls == []


def test_ema_follows_the_recurrence_and_swaps_weights():
    decay = 0.8
    trainer = make_trainer()
    ema = ModelEMA(trainer.model, decay=decay)
    weights = Recorder(lambda t: {k: v.clone() for k, v in t.model.state_dict().items()})
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.register_hooks([EMAHook(ema), weights])
    trainer.train(0, 6)

    # oracle: ema_0 = initial weights, ema_t = decay * ema_{t-1} + (1 - decay) * w_t
    expected = {k: v.double() for k, v in initial.items()}
    for w in weights.records:
        for k in expected:
            if w[k].is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * w[k].double()
            else:
                expected[k] = w[k].double()
    for k, v in ema.state.items():
        assert torch.allclose(v.double(), expected[k], atol=1e-6), k
    assert int(ema.state["num_steps"]) == 6

    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    test_loader = ToyTestLoader()
    with ema.apply_to():
        for k, v in trainer.model.state_dict().items():
            assert torch.equal(v, ema.state[k])
        ema_results = inference_on_dataset(trainer.model, test_loader, ToyEvaluator())
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, trained[k])  # restored
    raw_results = inference_on_dataset(trainer.model, test_loader, ToyEvaluator())
    assert ema_results["toy"]["mse"] != raw_results["toy"]["mse"]


def _ema_run(tmp_path, max_iter, resume_from=None, seed=0):
    trainer = make_trainer(seed=seed, optimizer="adamw", lr=1e-2)
    ema = ModelEMA(trainer.model, decay=0.7)
    checkpointer = DetectionCheckpointer(
        trainer.model, str(tmp_path), trainer=trainer, ema_state=ema
    )
    trainer.register_hooks(
        [
            EMAHook(ema),
            LRScheduler(scheduler=CosineParamScheduler(1.0, 0.1)),
            PeriodicCheckpointer(checkpointer, period=4),
        ]
    )
    start = 0
    if resume_from is not None:
        checkpointer.load(str(resume_from))
        start = trainer.iter + 1
    return trainer, ema, start


def test_ema_state_survives_resume(tmp_path):
    full, full_ema, _ = _ema_run(tmp_path / "full", 10)
    full.train(0, 10)
    saved = torch.load(tmp_path / "full" / "model_0000003.pth", weights_only=True)
    assert set(saved) == {"model", "trainer", "iteration", "ema_state"}

    resumed, resumed_ema, start = _ema_run(
        tmp_path / "resumed", 10, resume_from=tmp_path / "full" / "model_0000003.pth", seed=3
    )
    assert start == 4
    # the EMA after loading equals the saved one, tensor for tensor
    assert set(resumed_ema.state) == set(saved["ema_state"])
    for k, v in saved["ema_state"].items():
        assert torch.equal(resumed_ema.state[k], v), k
    resumed.train(start, 10)
    # continuing from the saved average gives the uninterrupted run's average (full-batch
    # toy data: the steps after the resume see the same batches)
    for k, v in full_ema.state.items():
        assert torch.allclose(resumed_ema.state[k].double(), v.double(), atol=1e-6), k
    for k, v in full.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[k].double(), v.double(), atol=1e-6), k


def test_create_ddp_model_is_identity_for_one_process():
    model = ToyModel()
    assert create_ddp_model(model, fp16_compression=True, broadcast_buffers=False) is model


def test_hooks_must_be_hooks():
    trainer = make_trainer()
    with pytest.raises(TypeError, match="HookBase"):
        trainer.register_hooks([object()])
    trainer.register_hooks([None])  # None entries (hooks of other ranks) are skipped
    assert trainer._hooks == []


def test_grad_scaler_path_unscales_before_clipping_and_is_checkpointed():
    """The float16 (CUDA) path, run on the CPU with a CPU GradScaler: gradients are unscaled
    before clipping, and the scaler's state goes into the trainer's state dict."""
    trainer = make_trainer(clip_grad_params={"max_norm": 1e-3})
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    norms = []
    original_step = trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step_and_record
    trainer.train(0, 5)
    # clipped in true (unscaled) units: a clip before unscaling would leave norm / scale
    assert norms and max(norms) == pytest.approx(1e-3, rel=1e-4)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**12  # grew twice (every 2 good steps)

    other = make_trainer(clip_grad_params={"max_norm": 1e-3})
    other.grad_scaler = torch.amp.GradScaler("cpu")
    other.load_state_dict(copy.deepcopy(state))
    assert other.grad_scaler.get_scale() == 2.0**12
