"""The install-time and run-time build paths of the CUDA extension (compile only: no GPU needed)."""

import shutil

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


@pytest.mark.parametrize("value,interpreted", [("1", True), ("true", True), ("On", True), ("0", False), ("", False)])
def test_the_triton_backend_reads_triton_interpret_as_triton_does(value, interpreted, monkeypatch):
    """TRITON_INTERPRET=true runs triton's interpreter as =1 does: the Triton backend is then available on CPU
    tensors, for the BatchNorm kernels as for the convs (it read only "1", and reported itself unavailable)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.triton_interpreted() == interpreted
    reason = backends.unavailable_reason("triton", torch.device("cpu"))
    assert (reason is None) == interpreted, reason
