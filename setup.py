"""Build script for detrkit: the Python package plus the `detrkit._C` extension.

`detrkit._C` holds the multi-scale deformable attention kernels (detrkit/csrc). The C++ CPU
kernel is built on every install; the CUDA kernel is added when torch sees a GPU or when
FORCE_CUDA=1 (for building on a machine without one). Install with
`pip install --no-build-isolation -e .` so the extension compiles against the installed torch.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - a message for users, not a code path under test
    raise SystemExit(
        "detrkit's setup.py needs torch installed first (it compiles the extension against it).\n"
        "Run `make install`, or `pip install torch==2.13.0` and then "
        "`pip install --no-build-isolation -e .`"
    ) from e

CSRC = os.path.join("detrkit", "csrc")


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def get_extensions() -> list:
    # *.cpp and *.cu only: the CPU emulation of the CUDA kernels used by the tests
    # (csrc/ms_deform_attn/cuda/emulation/*.cc) is not part of the extension.
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    if not cpp_sources:
        return []

    # -fopenmp: at::parallel_for expands to an OpenMP region in the headers; without the flag the
    # CPU kernel would silently run on one thread.
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++20 for 2.13).
    # -g0 overrides the -g of Python's own build flags: debug info for the kernel's many template
    # instances was about a third of the install's compile time.
    extra_compile_args = {"cxx": ["-O3", "-g0", "-fopenmp"]}
    extra_link_args = ["-fopenmp"]
    define_macros = []
    sources = list(cpp_sources)
    extension = CppExtension
    if _want_cuda() and cuda_sources:
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = [
            # No --use_fast_math: it flushes denormals to zero and approximates division, so
            # results could drift from the CPU kernel and the reference; nvcc's default
            # contraction into fused multiply-adds stays (exact where the tests put samples
            # on map borders, as loc * size is exact there).
            "-O3",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
    return [
        extension(
            "detrkit._C",
            sources,
            include_dirs=[os.path.abspath(CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
