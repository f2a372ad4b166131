"""Multi-scale deformable attention: every available implementation side by side.

For each shape and device it times the pure-PyTorch reference (grid_sample) and the kernel that
serves the device (C++ CPU kernel, CUDA kernel), forward alone, backward alone and forward +
backward, and measures the peak memory of forward + backward beyond the inputs. Ratios are
relative to the reference: speed as reference time / time (higher is faster), memory as peak /
reference peak.

Shapes (Deformable DETR at an 800 x 1333 input, 8 heads x 32 channels, 4 levels, 4 points):
    encoder  batch 2, queries = all 22223 tokens of the 100x167, 50x84, 25x42, 13x21 pyramid
    decoder  batch 2, 300 queries over the same values
Sampling locations are what a trained model produces, roughly: each query's reference point
(its pixel centre in the encoder, a random box centre in the decoder) plus the initial offset
pattern of MultiScaleDeformableAttention and a few pixels of noise. (Uniformly random locations
would measure cache misses instead of the kernels.)

Peak memory: on the GPU, torch.cuda.max_memory_allocated; on the CPU, the peak resident set
(VmHWM, reset through /proc/self/clear_refs) above the size before the call, measured in a fresh
process per implementation (memory freed by earlier calls would hide new allocations) with glibc
told to return blocks of 1 MiB and more to the system on free.

    python benchmarks/ms_deform_attn.py                 # CPU, and CUDA when there is a GPU
    python benchmarks/ms_deform_attn.py --device cuda --dtype bfloat16
    python benchmarks/ms_deform_attn.py --thread-scaling   # CPU kernel with 1 vs all threads
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from detrkit.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_reference,
)

PYRAMID = ((100, 167), (50, 84), (25, 42), (13, 21))
HEADS, CHANNELS, POINTS = 8, 32, 4
BATCH = 2
DECODER_QUERIES = 300


def make_inputs(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(PYRAMID, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    S, L = int(sizes.sum()), len(PYRAMID)
    if shape == "encoder":
        centres = []
        for h, w in PYRAMID:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            centres.append(torch.stack((xs.flatten(), ys.flatten()), -1))
        ref = torch.cat(centres)[None].expand(BATCH, S, 2)
    else:
        ref = torch.rand(BATCH, DECODER_QUERIES, 2, generator=gen) * 0.9 + 0.05
    Lq = ref.shape[1]
    # initial offset pattern (pixels) of the module, plus noise, normalized per level
    init = MultiScaleDeformableAttention(HEADS * CHANNELS, HEADS, L, POINTS)
    pattern = init.sampling_offsets.bias.detach().view(1, 1, HEADS, L, POINTS, 2)
    offsets = pattern + 2.0 * torch.randn(BATCH, Lq, HEADS, L, POINTS, 2, generator=gen)
    normalizer = spatial_shapes.flip(-1).float()[None, None, None, :, None, :]
    locations = ref[:, :, None, None, None, :] + offsets / normalizer
    logits = torch.randn(BATCH, Lq, HEADS, L * POINTS, generator=gen)
    weights = logits.softmax(-1).view(BATCH, Lq, HEADS, L, POINTS)
    value = torch.randn(BATCH, S, HEADS, CHANNELS, generator=gen)
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, loc_dtype).contiguous(),
        weights.to(device, loc_dtype).contiguous(),
    )


class PeakMemory:
    """Peak bytes allocated during a call, above what was held before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            # M_MMAP_THRESHOLD = 1 MiB, fixed: big blocks go back to the system when freed
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def measure(self, fn: Callable[[], object]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(self.device) - before
            del result
            return peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = self._status("VmRSS")
        result = fn()
        peak = self._status("VmHWM") - before
        del result
        return peak


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_backward(forward: Callable[[], torch.Tensor], device: torch.device, repeat: int) -> float:
    """Median seconds of the backward call alone (a fresh forward before each, untimed)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeat + 1):
        out = forward()
        grad = torch.ones_like(out)
        sync()
        start = time.perf_counter()
        out.backward(grad)
        sync()
        if i > 0:  # the first one is a warm-up
            times.append(time.perf_counter() - start)
        del out, grad
    return statistics.median(times)


def _closures(impl: Callable, inputs: tuple) -> tuple[Callable, Callable, Callable]:
    value, spatial_shapes, level_start_index, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]

    def forward_no_grad() -> torch.Tensor:
        with torch.no_grad():
            return impl(value, spatial_shapes, level_start_index, locations, weights)

    def forward_grad() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        return impl(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])

    def forward_backward() -> list[torch.Tensor]:
        out = forward_grad()
        out.backward(torch.ones_like(out))
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        return grads  # kept alive until the measurement ends

    return forward_no_grad, forward_grad, forward_backward


def run_timing(impl: Callable, inputs: tuple, device: torch.device, repeat: int) -> dict:
    forward_no_grad, forward_grad, forward_backward = _closures(impl, inputs)
    return {
        "fwd": timed(forward_no_grad, device, repeat),
        "bwd": timed_backward(forward_grad, device, repeat),
        "fwd+bwd": timed(forward_backward, device, repeat),
    }


IMPLEMENTATIONS = {"reference": ms_deform_attn_reference, "kernel": ms_deform_attn}


def run_memory(impl: str, inputs: tuple, device: torch.device) -> dict:
    forward_no_grad, _, forward_backward = _closures(IMPLEMENTATIONS[impl], inputs)
    memory = PeakMemory(device)
    forward_backward()  # warm-up: one-time allocations (thread pools, caches) are not the op's
    return {"peak_fwd": memory.measure(forward_no_grad), "peak": memory.measure(forward_backward)}


def run_memory_in_subprocess(impl: str, shape: str, dtype_name: str) -> dict:
    """CPU peak memory of one implementation, measured in a fresh process."""
    probe = f"{impl}:{shape}:{dtype_name}:{torch.get_num_threads()}"
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-probe", probe],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"memory probe {probe} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_probe(spec: str) -> None:
    impl, shape, dtype_name, threads = spec.split(":")
    torch.set_num_threads(int(threads))
    device = torch.device("cpu")
    inputs = make_inputs(shape, device, getattr(torch, dtype_name))
    print(json.dumps(run_memory(impl, inputs, device)))


def print_table(title: str, rows: list[tuple[str, dict]]) -> None:
    ref = rows[0][1]
    print(f"\n{title}")
    header = (
        f"{'implementation':<22}{'fwd ms':>10}{'x ref':>8}{'bwd ms':>10}{'x ref':>8}"
        f"{'fwd+bwd ms':>12}{'x ref':>8}{'peak fwd MB':>13}{'peak fwd+bwd MB':>17}{'/ ref':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows:
        print(
            f"{name:<22}{r['fwd'] * 1e3:>10.3f}{ref['fwd'] / r['fwd']:>8.1f}"
            f"{r['bwd'] * 1e3:>10.3f}{ref['bwd'] / r['bwd']:>8.1f}"
            f"{r['fwd+bwd'] * 1e3:>12.3f}{ref['fwd+bwd'] / r['fwd+bwd']:>8.1f}"
            f"{r['peak_fwd'] / 2**20:>13.1f}{r['peak'] / 2**20:>17.1f}"
            f"{r['peak'] / max(ref['peak'], 1):>8.3f}"
        )


def thread_scaling(shape: str, repeat: int) -> None:
    inputs = make_inputs(shape, torch.device("cpu"), torch.float32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    threads = torch.get_num_threads()
    print(f"\nCPU kernel thread scaling, {shape} shape, float32")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        fwd = timed(
            lambda: ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights),
            torch.device("cpu"),
            repeat,
        )
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        grad = torch.ones_like(out)
        bwd = timed(
            lambda grad=grad: torch.ops.detrkit.ms_deform_attn_backward(
                grad, value, spatial_shapes, level_start_index, locations, weights
            ),
            torch.device("cpu"),
            repeat,
        )
        print(f"  {n} thread(s): forward {fwd * 1e3:8.2f} ms   backward {bwd * 1e3:8.2f} ms")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--shapes", default="encoder,decoder", help="comma list: encoder,decoder")
    parser.add_argument(
        "--dtype",
        default=None,
        help="value dtype(s), comma list (default: float32 on CPU; float32,bfloat16 on CUDA); "
        "half types use float32 locations and weights",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed calls (default 3 CPU, 20 GPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--thread-scaling", action="store_true", help="CPU kernel, 1 vs all threads"
    )
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = parser.parse_args()

    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            sys.exit("--device cuda: torch sees no CUDA device")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in ("encoder", "decoder"):
            sys.exit(f"--shapes: unknown shape {s!r}; accepted: encoder, decoder")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    cases = []  # (title, device, inputs, [(name, impl key)], shape, dtype name)
    for device in devices:
        backend = ms_deform_attn_backend(device)
        dtypes = args.dtype or ("float32" if device.type == "cpu" else "float32,bfloat16")
        for dtype_name in dtypes.split(","):
            dtype = getattr(torch, dtype_name.strip(), None)
            if not isinstance(dtype, torch.dtype):
                sys.exit(f"--dtype: unknown dtype {dtype_name!r}")
            for shape in shapes:
                inputs = make_inputs(shape, device, dtype)
                impls = [("reference", "reference")]
                if backend != "reference":
                    impls.append((backend, "kernel"))
                title = (
                    f"{shape} shape on {device.type}: value {dtype_name} {tuple(inputs[0].shape)}, "
                    f"{inputs[3].shape[1]} queries, locations/weights {inputs[3].dtype}"
                )
                cases.append((title, device, inputs, impls, shape, dtype_name.strip()))
    results = []
    for title, device, inputs, impls, shape, dtype_name in cases:
        repeat = args.repeat or (3 if device.type == "cpu" else 20)
        rows = []
        for name, impl in impls:
            row = run_timing(IMPLEMENTATIONS[impl], inputs, device, repeat)
            if device.type == "cpu":
                row.update(run_memory_in_subprocess(impl, shape, dtype_name))
            else:
                row.update(run_memory(impl, inputs, device))
            rows.append((name, row))
        results.append((f"{title}, median of {repeat}", rows))
    for title, rows in results:
        print_table(title, rows)
    if args.thread_scaling:
        thread_scaling(shapes[0], args.repeat or 3)


if __name__ == "__main__":
    main()
