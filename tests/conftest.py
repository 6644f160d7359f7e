"""Shared test set-up: Triton runs in its interpreter on machines without CUDA; the measured
dispatch starts empty where a test asks (``fresh_dispatch``)."""

import os

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
