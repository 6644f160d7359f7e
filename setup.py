"""Build fusedres: the Python package, plus the CUDA extension fusedres._C when possible.

Build switches (environment variables):
  FUSEDRES_BUILD_CUDA   unset/"auto": build the extension when torch has CUDA and nvcc of torch's CUDA
                        major version is found; "1": build it or fail; "0": pure-Python/Triton
                        install, no compiler needed (also true/yes/on, false/no/off; else an error).
  CUDA_HOME             the CUDA toolkit (bin/nvcc inside); e.g. /usr/local/cuda. When unset, the
                        toolkit of the nvcc on PATH or /usr/local/cuda (see
                        fusedres/_extension.py: cuda_toolkit_root).
  TORCH_CUDA_ARCH_LIST  GPU architectures, e.g. "9.0" (Hopper, sm_90) or "8.0;9.0". When unset
                        and no GPU is visible, "9.0" is used (torch's own default would compile
                        every architecture the toolkit knows, which is slow).
  MAX_JOBS              parallel compile jobs for ninja.

Users build against the torch they already have: pip install --no-build-isolation .
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = ["csrc/bn_act.cu"]  # one translation unit; it includes the csrc/*.cuh headers
CUDA_HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cuh"))


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (fusedres/_csrc) so fusedres.build_extension() works later."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fusedres" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in CUDA_SOURCES + CUDA_HEADERS:
            shutil.copy2(ROOT / source, target / Path(source).name)


class SdistWithSources(sdist):
    """Put csrc/ in the sdist too (setuptools adds only an extension's sources, and only when it is built):
    a wheel made from the sdist (``python -m build``, ``pip install fusedres-*.tar.gz``) copies them in build_py."""

    def make_distribution(self):
        self.filelist.extend(sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.is_file()))
        self.filelist.remove_duplicates()
        super().make_distribution()


def _load_extension_helpers():
    """fusedres/_extension.py by path (stdlib-only at import), without importing fusedres."""
    spec = importlib.util.spec_from_file_location("fusedres_extension_helpers",
                                                  ROOT / "fusedres" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_release(nvcc: Path):
    """The CUDA release nvcc reports, as (major, minor), or None where it cannot be read."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def cuda_extension_or_reason():
    """(list of extensions, build_ext command class or None, message)."""
    value = os.environ.get("FUSEDRES_BUILD_CUDA", "auto")
    mode = value.strip().lower() or "auto"
    if mode in ("0", "false", "no", "off"):
        return [], None, "FUSEDRES_BUILD_CUDA=0: skipping the CUDA extension"
    if mode not in ("auto", "1", "true", "yes", "on"):  # a typo must not build (or skip) by surprise
        raise ValueError(f"FUSEDRES_BUILD_CUDA must be auto, 1 or 0, got {value!r}")
    toolkit = _load_extension_helpers().cuda_toolkit_root()
    if toolkit is not None:
        os.environ.setdefault("CUDA_HOME", toolkit)  # before cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        problem = f"torch is not importable at build time ({exc}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            problem = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            problem = "nvcc not found (set CUDA_HOME)"
        else:
            # torch's BuildExtension refuses an nvcc of another CUDA major version: say so here, and in
            # auto mode install without the extension rather than fail
            release = nvcc_release(Path(CUDA_HOME) / "bin" / "nvcc")
            problem = None
            if release is not None and str(release[0]) != torch.version.cuda.split(".")[0]:
                problem = (f"{CUDA_HOME}/bin/nvcc is CUDA {release[0]}.{release[1]}, torch {torch.__version__} "
                           f"was built with CUDA {torch.version.cuda} (set CUDA_HOME to a CUDA "
                           f"{torch.version.cuda.split('.')[0]} toolkit)")
    if problem is not None:
        if mode != "auto":
            raise RuntimeError(f"FUSEDRES_BUILD_CUDA=1 but the CUDA extension cannot be built: {problem}")
        return [], None, f"not building the CUDA extension: {problem}"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    extension = CUDAExtension(
        name="fusedres._C",
        sources=CUDA_SOURCES,
        depends=CUDA_HEADERS,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    message = (f"building the CUDA extension with {CUDA_HOME}/bin/nvcc for "
               f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}")
    return [extension], BuildExtension.with_options(use_ninja=True), message


ext_modules, build_ext, message = cuda_extension_or_reason()
print(f"fusedres setup: {message}")
cmdclass = {"build_py": BuildPyWithSources, "sdist": SdistWithSources}
if build_ext is not None:
    cmdclass["build_ext"] = build_ext
setup(ext_modules=ext_modules, cmdclass=cmdclass)
