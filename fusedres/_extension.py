"""Loading (or JIT-building) the compiled CUDA extension ``fusedres._C``.

``setup.py`` builds it when CUDA torch and nvcc are present. When it is missing, importing
fusedres still works: the CUDA backend is reported unavailable (with the reason) and the
Triton or PyTorch backends run instead. ``build_extension()`` compiles it on demand with
``torch.utils.cpp_extension.load`` (ninja), for installs made without a compiler.
"""

import functools
import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

_JIT_NAME = "fusedres_C_jit"
_jit_module: ModuleType | None = None


def cuda_toolkit_root() -> str | None:
    """CUDA_HOME, else the first CUDA toolkit found that holds both bin/nvcc and lib64/libcudart.

    Candidates after CUDA_HOME: the directory above the real path of the nvcc on PATH, then
    /usr/local/cuda. torch's own guess takes /usr/local when nvcc is linked or wrapped into
    /usr/local/bin, and then fails to link cudart. Standard library only: setup.py loads this.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and any((root / "lib64").glob("libcudart.so*")):
            return str(root)
    return None


def _source_dir() -> Path | None:
    """csrc/ of a source checkout (editable install), or the copy shipped inside the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "bn_act.cu").is_file():
            return candidate
    return None


# What the CUDA backend calls (ops/backends.py): a build from older sources may lack some.
_FUNCTIONS = ("channel_stats", "act_forward", "backward_reduce", "backward_apply", "affine",
              "finish_batch_stats", "backward_coefficients")
_REBUILD = "rebuild it (pip install --no-build-isolation -e .) or call fusedres.build_extension()"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a torch version such as "2.11.0+cu130" or "2.14.0a0+git1234"."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])


def _unusable_reason(module: ModuleType, torch_version: str) -> str | None:
    """Why a compiled fusedres._C cannot serve this torch, or None. torch's C++ ABI changes between
    releases: a build for another one can import and then misread every tensor (or crash)."""
    built = getattr(module, "torch_version", None)
    if built is None:  # a build from sources older than the attribute: for which torch, nothing says
        return f"fusedres._C does not record the torch it was built for (it predates that check); {_REBUILD}"
    if _release(built) != _release(torch_version):
        return f"fusedres._C was built for torch {built}, but torch {torch_version} is running; {_REBUILD}"
    missing = [name for name in _FUNCTIONS if not hasattr(module, name)]
    if missing:
        return f"fusedres._C is out of date (it has no {', '.join(missing)}); {_REBUILD}"
    return None


@functools.lru_cache(maxsize=None)
def _import_built() -> tuple[ModuleType | None, str]:
    if os.environ.get("FUSEDRES_DISABLE_CUDA_EXT", "0") == "1":
        return None, "disabled by FUSEDRES_DISABLE_CUDA_EXT=1"
    try:
        import torch  # (the extension links against torch's libraries)

        module = importlib.import_module("fusedres._C")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fusedres._C":
            return None, (
                f"fusedres._C is not built ({exc}); install with CUDA torch and nvcc present, "
                "or call fusedres.build_extension()"
            )
        # built, but it does not load: an undefined symbol of another torch, say
        return None, f"fusedres._C is built but cannot be imported ({exc}); {_REBUILD}"
    reason = _unusable_reason(module, torch.__version__)
    if reason is not None:
        return None, reason
    return module, "compiled extension fusedres._C"


def extension_status() -> tuple[ModuleType | None, str]:
    """(extension module or None, a sentence saying what was loaded or why not)."""
    if _jit_module is not None:
        return _jit_module, f"JIT-built extension {_JIT_NAME}"
    module, reason = _import_built()
    if module is not None:
        import torch

        if not torch.cuda.is_available():
            return None, "fusedres._C is built, but torch sees no CUDA device"
    return module, reason


def build_extension(verbose: bool = True) -> ModuleType:
    """Compile csrc/ now with torch.utils.cpp_extension.load and use it for the CUDA backend.

    Honours CUDA_HOME, TORCH_CUDA_ARCH_LIST and MAX_JOBS like ``pip install`` does. The
    build is cached by torch (TORCH_EXTENSIONS_DIR), so a second call is quick.
    """
    global _jit_module
    import torch

    toolkit = cuda_toolkit_root()
    if toolkit is not None:
        os.environ.setdefault("CUDA_HOME", toolkit)  # read when cpp_extension is first imported
    from torch.utils.cpp_extension import load

    sources = _source_dir()
    problems = []
    if sources is None:
        problems.append("the CUDA sources (csrc/bn_act.cu) are not shipped with this install")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if toolkit is None or not (Path(toolkit) / "bin" / "nvcc").exists():
        problems.append("no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)")
    if problems:
        raise RuntimeError("fusedres.build_extension: cannot build: " + "; ".join(problems))
    if verbose:
        print(f"fusedres: JIT-building the CUDA extension from {sources} (about a minute)...",
              file=sys.stderr)
    _jit_module = load(
        name=_JIT_NAME,
        sources=[str(sources / "bn_act.cu")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_ldflags=[f"-L{Path(toolkit) / 'lib64'}"],  # even if torch guessed another CUDA_HOME
        verbose=verbose,
    )
    from .ops import backends

    backends.refresh()
    return _jit_module
