"""Shared test set-up: Triton runs in its interpreter on machines without CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (fusedres imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
