"""Export an `ExportableDetector` as a torch.export program, an ONNX file or an AOTInductor
package, and run each artifact back.

File names inside an output folder: `model.pt2` (torch.export ExportedProgram),
`model.onnx` (ONNX, weights inside, opset `ONNX_OPSET`), `model_aoti.pt2` (AOTInductor package).
onnx / onnxruntime / onnxscript are imported only by the ONNX functions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .onnx_ms_deform_attn import (
    DEFAULT_ONNX_ATTENTION,
    ONNX_ATTENTION_FORMS,
    ONNX_OPSET,
    onnx_translation_table,
)
from .wrapper import ExportableDetector

__all__ = [
    "ARTIFACT_FILES",
    "EXPORT_FORMATS",
    "artifact_path",
    "check_onnx",
    "compile_aoti",
    "dynamic_ranges",
    "dynamic_shapes",
    "export_onnx",
    "export_program",
    "load_runner",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torch_export", "aoti")
ARTIFACT_FILES = {"onnx": "model.onnx", "torch_export": "model.pt2", "aoti": "model_aoti.pt2"}

# A (N, 3, H, W) -> detections function; numpy in, numpy out, whatever runs it.
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def dynamic_shapes(dynamic: bool) -> dict | None:
    """torch.export's dynamic_shapes for the `images` input: batch, height and width, or none.

    Height and width are Dim.DYNAMIC: torch.export narrows their range where the model needs
    it (`dynamic_ranges` reads the result) and fails where the model fixes a size. The batch
    may be 1 although it is traced with 2 (a traced size of 1 would be fixed)."""
    if not dynamic:
        return None
    dim = torch.export.Dim.DYNAMIC
    return {"images": {0: torch.export.Dim("batch", min=1), 2: dim, 3: dim}}


def export_program(
    detector: ExportableDetector, sample: Tensor, dynamic: bool = False
) -> torch.export.ExportedProgram:
    """torch.export of `detector` traced on `sample` ((N, 3, H, W) uint8), the `detrkit::`
    deformable attention op staying one node of the graph.

    With `dynamic`, a batch of one is traced as two copies: torch.export fixes any size that
    is 1 in the sample."""
    if dynamic and sample.shape[0] == 1:
        sample = sample.expand(2, -1, -1, -1).contiguous()
    detector.eval()
    with torch.no_grad():
        return torch.export.export(detector, (sample,), dynamic_shapes=dynamic_shapes(dynamic))


def dynamic_ranges(program: torch.export.ExportedProgram) -> str:
    """'batch: [1, inf], height: [65, inf], ...' from the program's range constraints."""
    images = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "images")
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    parts = []
    for name, size in zip(("batch", "channels", "height", "width"), images.meta["val"].shape):
        if str(size) in ranges:
            low, high = ranges[str(size)].lower, ranges[str(size)].upper
            parts.append(f"{name}: [{low}, {'inf' if high > 2**62 else high}]")
    return ", ".join(parts)


def export_onnx(
    program: torch.export.ExportedProgram, path: str, attention: str = DEFAULT_ONNX_ATTENTION
) -> str:
    """Translate a program from `export_program` to ONNX at `path` (weights inside the file),
    the deformable attention written in standard ONNX ops in the `attention` form."""
    if attention not in ONNX_ATTENTION_FORMS:
        raise ValueError(
            f"ONNX attention form {attention!r} is not one of {list(ONNX_ATTENTION_FORMS)}"
        )
    # the exporter prints its progress; keep it for the debug log
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=list(ExportableDetector.input_names),
            output_names=list(ExportableDetector.output_names),
            custom_translation_table=onnx_translation_table(attention),
            # onnxscript 0.7's graph optimizer (common-subexpression elimination) leaves a
            # dangling input in the two-stage graph; onnxruntime optimizes at load time anyway
            optimize=False,
        )
        onnx_program.save(path, external_data=False)
    logger.debug("torch.onnx.export:\n%s", log.getvalue())
    return path


def check_onnx(path: str) -> None:
    """onnx.checker on the file (full check, with shape inference)."""
    import onnx

    onnx.checker.check_model(path, full_check=True)


def compile_aoti(program: torch.export.ExportedProgram, path: str) -> str:
    """AOTInductor package of `program` for the program's device at `path`.

    The generated library computes everything but `detrkit::ms_deform_attn_forward`, which it
    calls through the PyTorch dispatcher: the loading process must have the op registered
    (`import detrkit.layers` in Python; in C++, load detrkit's `_C` library, see docs/deploy.md)."""
    return torch._inductor.aoti_compile_and_package(program, package_path=path)


def load_runner(fmt: str, path: str, num_threads: int | None = None, device: str = "cpu") -> Runner:
    """A function running the artifact `path` of format `fmt` on a uint8 (N, 3, H, W) array.
    onnx runs on onnxruntime's CPU provider with `num_threads` (default: its own choice); the
    torch artifacts run on `device`, the one they were exported for."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not its notes on nodes left unfolded
        if num_threads:
            options.intra_op_num_threads = num_threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda images: tuple(session.run(None, {"images": images}))
    if fmt == "torch_export":
        module = torch.export.load(path).module()
    elif fmt == "aoti":
        module = torch._inductor.aoti_load_package(path)
    else:
        raise ValueError(f"export format {fmt!r} is not one of {list(EXPORT_FORMATS)}")

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            outputs = module(torch.from_numpy(images).to(device))
        return tuple(t.cpu().numpy() for t in outputs)

    return run


def artifact_path(output_dir: str, fmt: str) -> str:
    """Where `fmt`'s artifact goes in `output_dir`."""
    return os.path.join(output_dir, ARTIFACT_FILES[fmt])
