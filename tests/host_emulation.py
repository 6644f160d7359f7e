"""The CUDA backend's kernels on the CPU: csrc/bn_act.cu built by the host C++ compiler with
csrc/host_emulation.h standing in for the CUDA runtime (tests/bn_act_host.cpp), so
tests/test_cuda_backend.py checks the kernels' logic on machines without a GPU too. ``gpu_extension`` is the
same kernels' built extension on a GPU, for the tests that run both.

Built on first use with ninja into build/host_emulation-<python>-torch<version> (about a minute on two
cores; rebuilt only when the sources change). A failed build raises: it is a broken kernel source, not a reason
to skip.

FUSEDRES_EMULATION_SANITIZE=address builds it with AddressSanitizer instead (build/host_emulation_asan-...),
so every out-of-bounds access of a kernel stops the run with a report: scripts/host_memcheck.sh, the
CPU stand-in for compute-sanitizer's memcheck.
"""

import functools
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def gpu_extension():
    """(fusedres._C, "") where the built extension runs (a CUDA device), else (None, why not)."""
    import torch

    if not torch.cuda.is_available():
        return None, "needs a CUDA device"
    from fusedres._extension import extension_status

    ext, why = extension_status()  # refuses a build for another torch, which would misread the tensors
    return (ext, "") if ext is not None else (None, why)


def unavailable_reason():
    """Why the emulated backend cannot be built here, or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build the host emulation of the CUDA kernels"
    return None


@functools.cache
def load():
    """The emulated extension: fusedres._C's functions, on CPU tensors."""
    import torch
    from torch.utils import cpp_extension

    sanitize = os.environ.get("FUSEDRES_EMULATION_SANITIZE", "")
    if sanitize not in ("", "address"):
        raise ValueError(f"FUSEDRES_EMULATION_SANITIZE must be 'address' or unset, got {sanitize!r}")
    flags = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    name = "fusedres_host_emulation" + ("_asan" if sanitize else "")
    # one folder per Python and torch: a build for another (a second venv on the same checkout) would be
    # rebuilt over this one on every switch, each time waiting on torch's lock file in the folder
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    build = ROOT / "build" / f"{name.removeprefix('fusedres_')}-{python}-torch{torch.__version__.replace('+', '-')}"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(ROOT / "tests" / "bn_act_host.cpp")], extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", *flags], extra_ldflags=flags, build_directory=str(build))
