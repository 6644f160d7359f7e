"""Build fusedres: the Python package, plus the CUDA extension fusedres._C when possible.

Build switches (environment variables):
  FUSEDRES_BUILD_CUDA   unset/"auto": build the extension when torch has CUDA and nvcc is found;
                        "1": build it or fail; "0": pure-Python/Triton install, no compiler needed.
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
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

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


def _load_extension_helpers():
    """fusedres/_extension.py by path (stdlib-only at import), without importing fusedres."""
    spec = importlib.util.spec_from_file_location("fusedres_extension_helpers",
                                                  ROOT / "fusedres" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_or_reason():
    """(list of extensions, build_ext command class or None, message)."""
    mode = os.environ.get("FUSEDRES_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no"):
        return [], None, "FUSEDRES_BUILD_CUDA=0: skipping the CUDA extension"
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
            problem = None
    if problem is not None:
        if mode in ("1", "true", "yes"):
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
cmdclass = {"build_py": BuildPyWithSources}
if build_ext is not None:
    cmdclass["build_ext"] = build_ext
setup(ext_modules=ext_modules, cmdclass=cmdclass)
