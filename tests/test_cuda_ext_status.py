"""Whether the compiled extension ``fusedres._C`` may serve this torch, and what the status says when not.

torch's C++ ABI changes between releases: an extension built for another torch (an editable install after
``pip install -U torch``, or a build made in pip's isolated environment) can import and then misread every
tensor. It must be reported unavailable, with the reason, never called.
"""

import importlib
import re
import types

import pytest
import torch

import host_emulation
from fusedres import _extension

_HOST_WHY_NOT = host_emulation.unavailable_reason()


@pytest.fixture
def fake_import(monkeypatch):
    """fake_import(result): ``import fusedres._C`` gives ``result`` (a module) or raises it (an exception)."""
    real = importlib.import_module

    def install(result):
        def import_module(name, *args):
            if name != "fusedres._C":
                return real(name, *args)
            if isinstance(result, BaseException):
                raise result
            return result

        monkeypatch.setattr(importlib, "import_module", import_module)
        monkeypatch.delenv("FUSEDRES_DISABLE_CUDA_EXT", raising=False)
        _extension._import_built.cache_clear()

    yield install
    _extension._import_built.cache_clear()


def _module(torch_version=None, functions=_extension._FUNCTIONS):
    module = types.ModuleType("fusedres._C")
    for name in functions:
        setattr(module, name, lambda *args: None)
    if torch_version is not None:
        module.torch_version = torch_version
    return module


def _this_release(patch="0"):
    major, minor = torch.__version__.split(".")[:2]
    return f"{major}.{minor}.{patch}"


def test_a_build_for_another_torch_is_refused(fake_import):
    fake_import(_module("2.3.1"))
    module, why = _extension._import_built()
    assert module is None
    assert f"built for torch 2.3.1, but torch {torch.__version__} is running" in why
    assert "build_extension" in why


def test_a_build_that_records_no_torch_is_refused(fake_import):
    """A build from sources older than the torch_version attribute: it may be for any torch."""
    fake_import(_module(None))
    module, why = _extension._import_built()
    assert module is None
    assert "does not record the torch it was built for" in why and "build_extension" in why


@pytest.mark.parametrize("built", ["this release", "this release, another patch"])
def test_a_build_for_this_torch_release_is_used(built, fake_import):
    """Patch releases keep the ABI."""
    version = {"this release": _this_release(), "this release, another patch": _this_release("9")}
    module = _module(version[built])
    fake_import(module)
    assert _extension._import_built() == (module, "compiled extension fusedres._C")


def test_an_out_of_date_build_is_refused(fake_import):
    fake_import(_module(_this_release(), functions=("channel_stats", "act_forward", "backward_reduce",
                                                    "backward_apply")))
    module, why = _extension._import_built()
    assert module is None
    assert "out of date (it has no affine, finish_batch_stats, backward_coefficients)" in why


def test_a_build_that_does_not_load_is_not_called_missing(fake_import):
    fake_import(ImportError("fusedres/_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv"))
    module, why = _extension._import_built()
    assert module is None
    assert why.startswith("fusedres._C is built but cannot be imported (fusedres/_C.so: undefined symbol")


def test_a_missing_build_is_reported_as_not_built(fake_import):
    fake_import(ModuleNotFoundError("No module named 'fusedres._C'", name="fusedres._C"))
    module, why = _extension._import_built()
    assert module is None
    assert why.startswith("fusedres._C is not built")


@pytest.mark.host_emulation
@pytest.mark.skipif(_HOST_WHY_NOT is not None, reason=str(_HOST_WHY_NOT))
def test_the_bindings_record_the_torch_they_were_built_for():
    """csrc/bn_act.cu's bindings (here built for the CPU: the same PYBIND11_MODULE) carry the torch
    version of the headers they were compiled with, which the check above reads."""
    built = host_emulation.load().torch_version
    assert re.fullmatch(r"\d+\.\d+\.\d+", built), built
    assert _extension._release(built) == _extension._release(torch.__version__)
    assert torch.__version__.startswith(built)
