"""Deformable DETR inference: per stage and end to end, fast path against the plain computation
and against the pure-PyTorch deformable attention, side by side in one run.

For each R-50 variant (random weights, 80 classes, 800 x 1066 images), dtype (fp32; bf16 =
autocast), batch size and mode (eager, or torch.compile with dynamic shapes) it times three paths
of the same model:

    fast       the default eval model (FrozenBN folded, pyramid layout cached, ...)
    plain      `model.set_fast_inference(False)`: the computation without those rewrites
    reference  the fast path with the deformable attention forced to the pure-PyTorch
               `ms_deform_attn_reference` (grid_sample): the in-project baseline

and prints the median seconds per batch of each stage (backbone, neck, encoder, decoder,
post-processing = the model's `inference`, other = pre-processing, layout, heads) and of the
whole forward, with ratios (reference / fast, plain / fast: higher means the fast path is
faster). `--check` also compares the detections of fast and plain (fp32: score difference;
bf16: the fast bf16 path against the plain fp32 one): top-100 detections matched by class and
box (within 1 px), the largest box and score differences.

`--limit` also prints the machine's limit for each row group: the model's multiply-adds per stage
(fvcore, as tools/analyze_model.py counts them) divided by the rate of a large matrix product
(2048 x 2048 x 2048) measured on the same device, dtype and threads. It is the time the stage
would take if every multiply-add ran at that rate; deformable attention, norms and element-wise
work are memory-bound and not in it, so the real floor sits a little above it.

    python benchmarks/inference.py                                   # everything (long)
    python benchmarks/inference.py --variants multi_scale --batch 1 --repeat 3
    python benchmarks/inference.py --variants multi_scale --dtypes bf16 --paths fast plain
    python benchmarks/inference.py --device cuda --batch 1 4 --dtypes fp32 bf16
    python benchmarks/inference.py --variants multi_scale --dtypes fp32 --batch 1 --limit
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from detrkit.config import LazyConfig, instantiate
from detrkit.layers import MultiScaleDeformableAttention, ms_deform_attn_reference
from detrkit.utils.analysis import FlopCountAnalysis, InferenceWrapper

CONFIGS = "projects/deformable_detr/configs"
VARIANTS = {
    "single_scale": f"{CONFIGS}/deformable_detr_r50_single_scale_50ep.py",
    "single_scale_dc5": f"{CONFIGS}/deformable_detr_r50_single_scale_dc5_50ep.py",
    "multi_scale": f"{CONFIGS}/deformable_detr_r50_50ep.py",
    "box_refine": f"{CONFIGS}/deformable_detr_r50_with_box_refinement_50ep.py",
    "two_stage": f"{CONFIGS}/deformable_detr_r50_two_stage_50ep.py",
}
STAGES = ("backbone", "neck", "encoder", "decoder", "postprocess")
PATHS = ("fast", "plain", "reference")


class StageClock:
    """Wall time spent inside named stages of one forward (synchronizing CUDA at the edges)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Timed(torch.nn.Module):
    """Wraps a stage module so that its calls are timed by `clock` under `name`."""

    def __init__(self, module: torch.nn.Module, name: str, clock: StageClock) -> None:
        super().__init__()
        self.inner = module
        self.name = name
        self.clock = clock

    def forward(self, *args, **kwargs):
        with self.clock.stage(self.name):
            return self.inner(*args, **kwargs)


def build_model(variant: str, device: torch.device, seed: int) -> torch.nn.Module:
    """The variant's R-50 model with random weights, in eval, FrozenBN statistics randomized
    so that folding has something to fold."""
    torch.manual_seed(seed)
    model = instantiate(LazyConfig.load(VARIANTS[variant]).model)
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            buffer.normal_(0.0, 0.1)
    return model.to(device).eval()


def instrument(model: torch.nn.Module, clock: StageClock, compile_stages: bool) -> None:
    """Wrap backbone, neck, encoder, decoder (compiled with dynamic shapes if asked) and the
    post-processing method in timers."""
    transformer = model.transformer

    def prepare(module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module, dynamic=True) if compile_stages else module

    model.backbone = Timed(prepare(model.backbone), "backbone", clock)
    model.neck = Timed(prepare(model.neck), "neck", clock)
    transformer.encoder = Timed(prepare(transformer.encoder), "encoder", clock)
    decoder = transformer.decoder
    transformer.decoder = Timed(prepare(decoder), "decoder", clock)
    transformer.decoder.num_layers = decoder.num_layers  # read by the two-stage proposal head
    transformer.decoder.class_embed = decoder.class_embed
    transformer.decoder.bbox_embed = decoder.bbox_embed
    inference = model.inference

    def timed_inference(*args, **kwargs):
        with clock.stage("postprocess"):
            return inference(*args, **kwargs)

    model.inference = timed_inference


@contextlib.contextmanager
def reference_attention(enabled: bool):
    """Force MultiScaleDeformableAttention onto the pure-PyTorch reference while active."""
    if not enabled:
        yield
        return
    namespace = MultiScaleDeformableAttention.forward.__globals__
    kernel = namespace["ms_deform_attn"]
    namespace["ms_deform_attn"] = ms_deform_attn_reference
    try:
        yield
    finally:
        namespace["ms_deform_attn"] = kernel


def make_inputs(batch: int, height: int, width: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)}
        for _ in range(batch)
    ]


def run_once(model, inputs, clock: StageClock, dtype: str, device: torch.device) -> list[dict]:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.inference_mode(), autocast, clock.stage("total"):
        return model(inputs)


def time_path(model, inputs, args, dtype: str, device: torch.device, path: str) -> tuple:
    """Median seconds per stage over `args.repeat` forwards after `args.warmup` ones; and the
    last detections."""
    clock = model._bench_clock
    samples: dict[str, list[float]] = {}
    with reference_attention(path == "reference"):
        for _ in range(args.warmup):
            run_once(model, inputs, clock, dtype, device)
        for _ in range(args.repeat):
            clock.seconds = {}
            outputs = run_once(model, inputs, clock, dtype, device)
            timed = dict(clock.seconds)
            timed["other"] = timed["total"] - sum(timed.get(s, 0.0) for s in STAGES)
            for name, value in timed.items():
                samples.setdefault(name, []).append(value)
    return {name: statistics.median(values) for name, values in samples.items()}, outputs


def matmul_rate(dtype: str, device: torch.device, size: int = 2048, repeat: int = 5) -> float:
    """Multiply-adds per second of the best of `repeat` (size x size) @ (size x size) products
    in `dtype` (bf16: under autocast, as the model runs) on `device`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    clock = StageClock(device)
    best = float("inf")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.inference_mode(), autocast:
        for i in range(repeat + 1):  # the first one warms up
            clock.seconds = {}
            with clock.stage("mm"):
                torch.mm(a, b)
            if i > 0:
                best = min(best, clock.seconds["mm"])
    return size**3 / best


def count_multiply_adds(variant: str, inputs: list[dict], seed: int) -> dict[str, float]:
    """Multiply-adds of one forward over `inputs`, per stage and in total (fvcore's trace of a
    CPU copy of the model: the counts depend on shapes only)."""
    model = build_model(variant, torch.device("cpu"), seed)
    model.set_fast_inference(False)  # the fused oneDNN ops do not trace; same multiply-adds
    images = tuple(record["image"].float() for record in inputs)
    analysis = FlopCountAnalysis(InferenceWrapper(model), images)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        by_module = analysis.by_module()
    counts = {
        "backbone": by_module["model.backbone"],
        "neck": by_module["model.neck"],
        "encoder": by_module["model.transformer.encoder"],
        "decoder": by_module["model.transformer.decoder"],
        "total": analysis.total(),
    }
    counts["other"] = counts["total"] - sum(
        counts[s] for s in ("backbone", "neck", "encoder", "decoder")
    )
    return counts


def match_detections(a, b, top: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of the top-`top` detections of Instances `a`: whether b's top-`top` holds one of
    the same class with every box coordinate within 1 px, the index of the nearest such one,
    and its largest coordinate difference (inf where the class has none)."""
    boxes_a, boxes_b = a.pred_boxes.tensor[:top].float(), b.pred_boxes.tensor[:top].float()
    distance = (boxes_a[:, None] - boxes_b[None]).abs().amax(-1)  # (top, top) pixels
    distance[a.pred_classes[:top, None] != b.pred_classes[None, :top]] = float("inf")
    nearest, index = distance.min(1)
    return nearest <= 1.0, index, nearest


def compare_detections(fast: list[dict], plain: list[dict], top: int = 100) -> str:
    """Per image: how many of the fast path's top-`top` detections have a plain-path detection
    of the same class in its top-`top` with every box coordinate within 1 px, the largest box
    difference of those, and the largest score difference between matched detections."""
    lines = []
    for i, (a, b) in enumerate(zip(fast, plain)):
        a, b = a["instances"], b["instances"]
        matched, index, nearest = match_detections(a, b, top)
        score_diff = (a.scores[:top].float() - b.scores[:top].float()[index]).abs()[matched]
        worst_box = nearest[matched].max().item() if matched.any() else float("nan")
        worst_score = score_diff.max().item() if matched.any() else float("nan")
        lines.append(
            f"image {i}: {int(matched.sum())}/{len(matched)} matched (same class, box within "
            f"1 px), max box diff {worst_box:.3f} px, max score diff {worst_score:.1e}"
        )
    return "; ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
        help="compiled: torch.compile(dynamic=True) of backbone, neck, encoder and decoder",
    )  # fmt: skip
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="compare fast and plain detections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", action="store_true",
        help="print the machine's limit: the model's multiply-adds at the rate of a large matmul",
    )  # fmt: skip
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = args.size
    print(
        f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"image {height}x{width}, repeat {args.repeat} (median), warmup {args.warmup}"
    )
    header = f"{'variant':<17}{'dtype':<6}{'batch':>5} {'mode':<9}{'path':<10}"
    header += "".join(f"{s:>12}" for s in (*STAGES, "other", "total")) + f"{'img/s':>8}  ratio"
    print(header)
    for variant in args.variants:
        for mode in args.modes:
            model = build_model(variant, device, args.seed)
            model._bench_clock = StageClock(device)
            instrument(model, model._bench_clock, mode == "compiled")
            for dtype in args.dtypes:
                for batch in args.batch:
                    inputs = make_inputs(batch, height, width, args.seed + batch)
                    results, outputs = {}, {}
                    for path in args.paths:
                        model.set_fast_inference(path != "plain")
                        results[path], outputs[path] = time_path(
                            model, inputs, args, dtype, device, path
                        )
                    model.set_fast_inference(True)
                    for path, timed in results.items():
                        row = f"{variant:<17}{dtype:<6}{batch:>5} {mode:<9}{path:<10}"
                        row += "".join(
                            f"{timed.get(s, 0.0):>12.3f}" for s in (*STAGES, "other", "total")
                        )
                        row += f"{batch / timed['total']:>8.2f}"
                        if path != "fast" and "fast" in results:
                            row += f"  {timed['total'] / results['fast']['total']:.2f}x fast"
                        print(row, flush=True)
                    if args.limit:
                        rate = matmul_rate(dtype, device)
                        macs = count_multiply_adds(variant, inputs, args.seed)
                        row = f"{variant:<17}{dtype:<6}{batch:>5} {mode:<9}{'limit':<10}"
                        row += "".join(
                            f"{macs.get(s, 0.0) / rate:>12.3f}" for s in (*STAGES, "other", "total")
                        )
                        row += f"{batch * rate / macs['total']:>8.2f}"
                        if "fast" in results:
                            row += (
                                f"  fast = {results['fast']['total'] * rate / macs['total']:.2f}x"
                            )
                        print(row, flush=True)
                        print(
                            f"  limit: {macs['total'] / 1e9:.1f} G multiply-adds at "
                            f"{rate / 1e9:.1f} G/s ({dtype} 2048^3 matmul, same threads)"
                        )
                    if args.check and "fast" in outputs:
                        if dtype == "bf16":  # the bf16 fast path against the plain fp32 model
                            model.set_fast_inference(False)
                            _, plain = time_path(
                                model, inputs, _once(args), "fp32", device, "plain"
                            )
                            model.set_fast_inference(True)
                        else:
                            plain = outputs.get("plain")
                        if plain is not None:
                            print(f"  check: {compare_detections(outputs['fast'], plain)}")


def _once(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "repeat": 1, "warmup": 0})


if __name__ == "__main__":
    main()
