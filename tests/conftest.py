"""Shared test set-up: Triton runs in its interpreter on machines without CUDA; the measured
dispatch starts empty where a test asks (``fresh_dispatch``); the "cuda" backend runs on CPU
tensors through the CUDA kernels' host emulation where a test asks (``cuda_backend_on_cpu``)."""

import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (fusedres imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fresh_dispatch():
    """fusedres.ops.dispatch as a new process finds it (no entries, no file read), and again after."""
    from fusedres.ops import dispatch  # on use: conftest itself imports no fusedres module

    dispatch.reset()
    yield dispatch
    dispatch.reset()


def pretend_capturing(monkeypatch):
    """Make the measured dispatch see a CUDA graph capture under way, also on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """The "cuda" backend served, for CPU tensors, by the CUDA kernels built for the CPU
    (tests/host_emulation.py) instead of fusedres._C; returns the list of kernel functions called."""
    import host_emulation
    from fusedres.ops import backends

    reason = host_emulation.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    module = host_emulation.load()
    calls = []

    def recorded(name):
        function = getattr(module, name)
        return lambda *args: calls.append(name) or function(*args)

    emulated = types.SimpleNamespace(**{name: recorded(name) for name in (
        "channel_stats", "act_forward", "backward_reduce", "backward_apply", "affine", "finish_batch_stats",
        "backward_coefficients")})
    load, unavailable_reason = backends._load, backends.unavailable_reason
    monkeypatch.setattr(backends, "_load",
                        lambda name: (emulated, "host emulation") if name == "cuda" else load(name))
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: (
        None if name == "cuda" and device.type == "cpu" else unavailable_reason(name, device)))
    return calls


def pytest_collection_modifyitems(config, items):
    """On a GPU the tests marked gpu (the kernels on ResNet-50's shapes, the measured dispatch) run first, the
    others in their order: a GPU check stopped by its time limit (scripts/gpu_check.sh) has run those."""
    if torch.cuda.is_available():
        items.sort(key=lambda item: item.get_closest_marker("gpu") is None)


def pytest_runtest_logreport(report):
    """With FUSEDRES_FAILURES_LOG set (scripts/gpu_check.sh does), each failure's traceback is appended to that
    file as its report arrives, by the controlling process under pytest-xdist: a run stopped at its time limit
    keeps them, where pytest's own summary comes only at the end."""
    path = os.environ.get("FUSEDRES_FAILURES_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
