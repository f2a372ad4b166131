"""Check a CUDA build of detrkit._C without a GPU (the last step of `make cuda-check`).

    python tools/check_cuda_build.py --arch-list --nvcc /usr/local/cuda/bin/nvcc
    TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0;10.0;11.0;12.0+PTX" \
        python tools/check_cuda_build.py build-cuda/lib --nvcc /usr/local/cuda/bin/nvcc

`--arch-list` prints the TORCH_CUDA_ARCH_LIST to build with: one cubin per architecture family
(major version) that nvcc knows from sm_75 on, for the family's first member (a cubin runs on
every later minor version of its major: sm_80 on sm_86/87/88/89, sm_100 on sm_103, sm_120 on
sm_121), plus the PTX of the newest family, which the driver compiles for GPUs newer than the
toolkit. Only the standard library is needed for it.

Otherwise, run with the CUDA build of torch that compiled the extension. It
1. loads the built .so into torch (this links it against torch's CUDA libraries and runs its
   operator registrations),
2. checks that both operators have CPU and CUDA kernels registered with the dispatcher and the
   schema the Python side expects,
3. reads the embedded fatbinary: it must hold a cubin for every architecture of
   TORCH_CUDA_ARCH_LIST and PTX for every `+PTX` one, and, given `--nvcc`, every architecture
   that nvcc knows from sm_75 on must run one of the cubins,
4. runs the CPU kernel of this build once against a small grid_sample computation, as a smoke
   test that the CUDA-enabled build still computes (the real tests run in the main venv).
Exits non-zero with a message on the first failure.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import struct
import subprocess
import sys

OPS = {
    "ms_deform_attn_forward": (
        "value",
        "spatial_shapes",
        "level_start_index",
        "sampling_locations",
        "attention_weights",
    ),
    "ms_deform_attn_backward": (
        "grad_output",
        "value",
        "spatial_shapes",
        "level_start_index",
        "sampling_locations",
        "attention_weights",
    ),
}


def fail(message: str) -> None:
    print(f"check_cuda_build: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def find_library(build_lib: str) -> str:
    found = sorted(glob.glob(os.path.join(build_lib, "detrkit", "_C*.so")))
    if not found:
        fail(f"no detrkit/_C*.so under {build_lib!r}; did the build step run?")
    return found[0]


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """Contents of the named section of a little-endian ELF64 file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        fail("the extension is not an ELF64 shared object")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for header in headers:
        start = names_offset + header[0]
        name = data[start : data.index(b"\0", start)].decode()
        if name == wanted:
            return data[header[4] : header[4] + header[5]]
    return None


def fatbin_archs(fatbin: bytes) -> tuple[set[int], set[int]]:
    """SM versions of the cubins (entry kind 2) and of the PTX (kind 1) in the fatbinary
    containers of an .nv_fatbin section."""
    cubins: set[int] = set()
    ptx: set[int] = set()
    offset = 0
    while offset + 16 <= len(fatbin):
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", fatbin, offset)
        if magic != 0xBA55ED50:
            break
        entry = offset + header_size
        end = entry + body_size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, entry)
            sm = struct.unpack_from("<I", fatbin, entry + 28)[0]
            {1: ptx, 2: cubins}.get(kind, set()).add(sm)
            entry += entry_header + payload
        offset = end
        while offset < len(fatbin) and offset % 8:  # containers are 8-byte aligned
            offset += 1
    return cubins, ptx


MIN_ARCH = 75  # sm_75 (Turing) is the oldest architecture built


def nvcc_architectures(nvcc: str) -> list[int]:
    """The real architectures nvcc can compile for, from sm_75 on: [75, 80, 86, ...]."""
    try:
        listing = subprocess.run(
            [nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"cannot list the architectures of {nvcc!r}: {e}")
    archs = sorted({int(m) for m in re.findall(r"\bsm_(\d+)\b", listing)})
    archs = [sm for sm in archs if sm >= MIN_ARCH]
    if not archs:
        fail(f"{nvcc} --list-gpu-code names no architecture from sm_{MIN_ARCH} on:\n{listing}")
    return archs


def arch_list_for(archs: list[int]) -> str:
    """The first member of each family (major version), PTX for the newest: "7.5;...;12.0+PTX"."""
    families: dict[int, int] = {}
    for sm in sorted(archs):
        families.setdefault(sm // 10, sm)
    items = [f"{sm // 10}.{sm % 10}" for sm in sorted(families.values())]
    items[-1] += "+PTX"
    return ";".join(items)


def arch_list_to_sm(arch_list: str) -> tuple[set[int], set[int]]:
    """ "8.0;9.0+PTX" or "8.0 9.0+PTX" -> ({80, 90}, {90}): cubin and PTX architectures."""
    cubins, ptx = set(), set()
    for item in arch_list.replace(";", " ").split():
        major, _, minor = item.removesuffix("+PTX").partition(".")
        if not (major.isdigit() and minor[:1].isdigit()):
            fail(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r} (expected e.g. 8.0 or 9.0+PTX)")
        sm = int(major) * 10 + int(minor[:1])
        cubins.add(sm)
        if item.endswith("+PTX"):
            ptx.add(sm)
    return cubins, ptx


def check_device_code(library: str, arch_list: str, nvcc: str | None) -> None:
    with open(library, "rb") as f:
        data = f.read()
    fatbin = elf_section(data, ".nv_fatbin")
    if fatbin is None:
        fail("the extension has no .nv_fatbin section: no device code was linked in")
    cubins, ptx = fatbin_archs(fatbin)
    wanted_cubins, wanted_ptx = arch_list_to_sm(arch_list)
    if not wanted_cubins <= cubins:
        fail(f"cubins for sm_{sorted(wanted_cubins - cubins)} missing; found sm_{sorted(cubins)}")
    if not wanted_ptx <= ptx:
        fail(f"PTX for compute_{sorted(wanted_ptx - ptx)} missing; found compute_{sorted(ptx)}")
    found = ", ".join(f"sm_{a}" for a in sorted(cubins))
    found += "".join(f", PTX compute_{a}" for a in sorted(ptx))
    print(f"device code: {found}")
    if nvcc is None:
        return
    known = nvcc_architectures(nvcc)
    uncovered = [sm for sm in known if not any(c // 10 == sm // 10 and c <= sm for c in cubins)]
    if uncovered:
        fail(f"no cubin runs on sm_{uncovered} (nvcc knows {known}); add their families")
    print(
        f"every architecture {nvcc} knows from sm_{MIN_ARCH} on runs one of them: "
        + ", ".join(f"sm_{a}" for a in known)
    )


def reference(value, shapes, locations, weights):
    """Tiny grid_sample version of the operator (independent of detrkit's Python module)."""
    import torch
    import torch.nn.functional as F

    N, _, M, D = value.shape
    _, Lq, _, _, P, _ = locations.shape
    out = torch.zeros(N * M, D, Lq, dtype=value.dtype)
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        grid = 2 * locations[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2) - 1
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        aw = weights[:, :, :, level].transpose(1, 2).reshape(N * M, 1, Lq, P)
        out += (sampled * aw).sum(-1)
        start += h * w
    return out.view(N, M * D, Lq).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "build_lib", nargs="?", help="the --build-lib folder of `setup.py build_ext`"
    )
    parser.add_argument("--nvcc", help="the nvcc that built it (or that --arch-list is for)")
    parser.add_argument(
        "--arch-list", action="store_true", help="print the TORCH_CUDA_ARCH_LIST for --nvcc"
    )
    args = parser.parse_args()
    if args.arch_list:
        if not args.nvcc:
            fail("--arch-list needs --nvcc")
        print(arch_list_for(nvcc_architectures(args.nvcc)))
        return
    if not args.build_lib:
        fail("give the build folder (or --arch-list)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        fail("set TORCH_CUDA_ARCH_LIST to the list the extension was built with")

    import torch

    if torch.version.cuda is None:
        fail(f"run this with torch's CUDA build; this torch is {torch.__version__}")
    library = find_library(args.build_lib)
    torch.ops.load_library(library)
    print(f"loaded {library} into torch {torch.__version__} (CUDA {torch.version.cuda})")

    for op, arguments in OPS.items():
        qualified = f"detrkit::{op}"
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
                fail(f"{qualified} has no {key} kernel registered (was it built with WITH_CUDA?)")
        schema = getattr(torch.ops.detrkit, op).default._schema
        names = tuple(a.name for a in schema.arguments)
        if names != arguments:
            fail(f"{qualified} takes {names}, the Python side expects {arguments}")
    print("dispatcher: forward and backward have CPU and CUDA kernels, schemas as expected")

    check_device_code(library, arch_list, args.nvcc)

    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    shapes = [(5, 7), (3, 2)]
    sizes = [h * w for h, w in shapes]
    value = torch.randn(2, sum(sizes), 3, 4, dtype=torch.float64, generator=gen)
    locations = torch.rand(2, 6, 3, 2, 2, 2, dtype=torch.float64, generator=gen) * 1.2 - 0.1
    weights = torch.rand(2, 6, 3, 2, 2, dtype=torch.float64, generator=gen)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    level_start_index = torch.tensor([0, sizes[0]], dtype=torch.int64)
    out = torch.ops.detrkit.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, locations, weights
    )
    expected = reference(value, shapes, locations, weights)
    if not torch.allclose(out, expected, rtol=1e-10, atol=1e-10):
        error = (out - expected).abs().max().item()
        fail(f"CPU kernel of the CUDA build disagrees with grid_sample by {error}")
    print("CPU kernel of this build matches grid_sample")
    print("check_cuda_build: OK")


if __name__ == "__main__":
    main()
