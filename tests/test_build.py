"""The install-time and run-time build paths of the CUDA extension (compile only: no GPU needed)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import fusedres
from fusedres import _extension
from fusedres.ops import backends

needs_toolkit = pytest.mark.skipif(
    torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc", path=f"{CUDA_HOME}/bin") is None,
    reason="needs CUDA torch and nvcc (CUDA_HOME) to compile the extension")


@needs_toolkit
def test_build_extension_jit_compiles_and_exposes_the_stage_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(_extension, "_jit_module", None)
    try:
        module = fusedres.build_extension(verbose=False)
        for name in ("channel_stats", "act_forward", "backward_reduce", "backward_apply"):
            assert callable(getattr(module, name)), name
        assert torch.__version__.startswith(module.torch_version)  # what _extension checks a build with
        assert _extension.extension_status()[0] is module
        reason = backends.unavailable_reason("cuda", torch.device("cpu"))
        assert "CUDA tensors" in reason  # built, but these are CPU tensors
    finally:
        _extension._jit_module = None
        backends.refresh()


def test_build_extension_explains_what_is_missing(monkeypatch):
    monkeypatch.setattr(_extension, "_source_dir", lambda: None)
    with pytest.raises(RuntimeError, match="sources .* are not shipped"):
        fusedres.build_extension(verbose=False)


def test_info_reports_every_backend_with_a_reason():
    facts = fusedres.info(print_out=False)
    assert set(facts["backends"]) == {"cuda", "triton", "torch"}
    assert facts["backends"]["torch"]["available"]
    for status in facts["backends"].values():
        assert status["detail"]


def test_info_says_the_triton_interpreter_is_never_chosen_by_auto(monkeypatch):
    """On a machine without a GPU, TRITON_INTERPRET=1 makes the triton backend available to backend='triton'
    calls only: info said "available" as if "auto" could pick it."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the triton backend runs compiled kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = fusedres.info(print_out=False)["backends"]["triton"]
    assert triton["available"] and "never chosen by 'auto'" in triton["detail"], triton


@pytest.mark.parametrize("value,interpreted", [("1", True), ("true", True), ("On", True), ("0", False), ("", False)])
def test_the_triton_backend_reads_triton_interpret_as_triton_does(value, interpreted, monkeypatch):
    """TRITON_INTERPRET=true runs triton's interpreter as =1 does: the Triton backend is then available on CPU
    tensors, for the BatchNorm kernels as for the convs (it read only "1", and reported itself unavailable)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.triton_interpreted() == interpreted
    reason = backends.unavailable_reason("triton", torch.device("cpu"))
    assert (reason is None) == interpreted, reason


# ------------------------------------------------------------------ setup.py, run as pip runs it
ROOT = Path(__file__).resolve().parents[1]


def _source_tree(tmp_path: Path) -> Path:
    """What an sdist needs of this checkout, copied: setup.py runs there without touching the tree."""
    tree = tmp_path / "src"
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copytree(ROOT / "fusedres", tree / "fusedres", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return tree


def _setup(tree: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("FUSEDRES_BUILD_CUDA", "CUDA_HOME")}
    return subprocess.run([sys.executable, "setup.py", *args], cwd=tree, env={**environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_a_wheel_builds_from_the_sdist(tmp_path):
    """The sdist carries csrc/ (build_py copies it into the package for build_extension()); without it a
    wheel built from the sdist (python -m build, pip install fusedres-*.tar.gz) failed, even with
    FUSEDRES_BUILD_CUDA=0. It carries the license, named in no deprecated form (pyproject's license table, an
    error in setuptools from 2027-02-18)."""
    tree = _source_tree(tmp_path)
    made = _setup(tree, "-q", "sdist", "--dist-dir", str(tmp_path / "dist"), FUSEDRES_BUILD_CUDA="0")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "project.license" not in made.stderr, made.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("fusedres-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    for name in ("bn_act.cu", "bn_act_kernels.cuh"):
        assert (unpacked / "csrc" / name).is_file(), f"csrc/{name} is not in the sdist"
    assert (unpacked / "LICENSE").is_file()
    built = _setup(unpacked, "-q", "build_py", "--build-lib", str(tmp_path / "lib"), FUSEDRES_BUILD_CUDA="0")
    assert built.returncode == 0, built.stderr[-2000:]
    assert (tmp_path / "lib" / "fusedres" / "_csrc" / "bn_act.cu").is_file()


def _fake_toolkit(tmp_path: Path, release: str) -> Path:
    """A CUDA_HOME whose bin/nvcc reports CUDA ``release`` (nothing is compiled: setup.py --version)."""
    root = tmp_path / f"cuda-{release}"
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").touch()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return root


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_setup_skips_an_nvcc_of_another_cuda_major_version_in_auto_mode(tmp_path):
    """torch's BuildExtension refuses such an nvcc: the install failed where FUSEDRES_BUILD_CUDA was unset,
    instead of going on without the extension."""
    tree = _source_tree(tmp_path)
    major = int(torch.version.cuda.split(".")[0])
    other = _fake_toolkit(tmp_path, f"{major - 1}.4")
    run = _setup(tree, "--version", CUDA_HOME=str(other))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (f"not building the CUDA extension: {other}/bin/nvcc is CUDA {major - 1}.4, torch {torch.__version__} "
            f"was built with CUDA {torch.version.cuda}") in run.stdout
    forced = _setup(tree, "--version", CUDA_HOME=str(other), FUSEDRES_BUILD_CUDA="1")
    assert forced.returncode != 0 and f"nvcc is CUDA {major - 1}.4" in forced.stderr
    same = _setup(tree, "--version", CUDA_HOME=str(_fake_toolkit(tmp_path, f"{major}.9")))
    assert same.returncode == 0 and "fusedres setup: building the CUDA extension" in same.stdout, same.stdout


@pytest.mark.parametrize("value,message", [("off", "FUSEDRES_BUILD_CUDA=0: skipping the CUDA extension"),
                                           ("maybe", "FUSEDRES_BUILD_CUDA must be auto, 1 or 0, got 'maybe'")])
def test_setup_reads_fusedres_build_cuda(value, message, tmp_path):
    """"off" skips the build (it built, as "auto"); a value it does not know is an error, not "auto"."""
    run = _setup(_source_tree(tmp_path), "--version", FUSEDRES_BUILD_CUDA=value)
    assert message in run.stdout + run.stderr
    assert (run.returncode == 0) == (value == "off")
