"""fusedres.precompile: compile the Triton kernels of a model's step before the step, all at once.

    fusedres.convert(model)
    report = fusedres.precompile(model, x)   # x: a batch of the step's shape, on the GPU
    print(report)                            # kernels compiled, seconds

A converted model's first step on a GPU with the "auto" backend meets each conv shape for the first time:
the measured dispatch (``ops/dispatch.py``) times cuDNN against the Triton kernels, and the autotuner
(``triton/autotuning.py``) compiles and times the configs of each new Triton kernel key, one key after
another, each waiting for its slowest compile. ``precompile`` runs the model once on ``inputs`` with the
dispatch preparing instead of measuring (``dispatch.preparing``): each Triton implementation runs with its
autotuned kernels only submitting their compiles (``autotuning.compile_ahead``), all of them to one pool of
a thread per core (FUSEDRES_COMPILE_THREADS sets how many), while cuDNN computes the pass. The first real
step then finds every kernel compiled and only times. Without a GPU, or where the Triton kernels are not
available, nothing compiles (the pass still runs). This is the "auto" backend's (the default): calls that
ask for the Triton kernels themselves (``backend="triton"``, FUSEDRES_BACKEND=triton) skip the dispatch, so
the pass runs them for real and they compile key after key, as a first step would.

The pass leaves the model as it found it: buffers (BatchNorm's running statistics and batch count),
gradients (the very ``.grad`` tensors, untouched: the pass's backward accumulates into none of them) and
the random number generators' state are restored, and the inputs get no ``.grad``. In training mode (and
when a parameter requires grad) the pass runs the backward too, of the sum of the outputs, so the
backward's kernels are compiled as well; otherwise it runs the forward without autograd, as inference does
(an eval-mode block folds its BatchNorms into its convs only then). Run it before wrapping the model in
DistributedDataParallel (its hooks would all-reduce the pass's gradients) or on every rank.
"""

import dataclasses
import time
from typing import Optional

import torch
from torch import nn

from .ops import backends, dispatch


@dataclasses.dataclass
class PrecompileReport:
    """What ``precompile`` did: the kernel compiles it started, how many of them failed (the autotuner skips
    those configs), and the pass's wall-clock seconds, compiles included."""

    compiles: int
    failed: int
    seconds: float

    def __str__(self) -> str:
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"fusedres.precompile: {self.compiles} Triton kernels compiled{failed} in {self.seconds:.1f} s"


def _floating_tensors(value) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _floating_tensors(item)]
    return []


def _detached(value):
    """The model's inputs (tensors, or tuples, lists and dicts of them) with each tensor detached from the graph
    that made it, still requiring grad where it did: the pass's backward computes their gradients, as a step's
    would, but leaves no ``.grad`` on them and runs no backward through what made them."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_detached(item) for item in value]
        return value._make(items) if hasattr(value, "_make") else type(value)(items)  # a namedtuple, or not
    return value


def precompile(model: nn.Module, *inputs, backward: Optional[bool] = None) -> PrecompileReport:
    """Compile every Triton kernel that ``model(*inputs)`` (and, with ``backward``, its backward) may run, all at
    once, leaving the model's state unchanged; see the module docstring. ``backward`` defaults to whether the
    model is in training mode with a parameter that requires grad."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.precompile: expected an nn.Module, got {type(model).__name__}")
    parameters = list(model.parameters())
    if backward is None:
        backward = model.training and any(p.requires_grad for p in parameters)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in parameters]  # the very tensors, put back untouched: the pass makes its own
    devices = sorted({t.device.index or 0 for t in _floating_tensors(list(inputs)) if t.is_cuda})
    triton_conv, _ = backends.triton_conv()
    start = time.perf_counter()
    compiles = failed = 0
    inputs = _detached(inputs)
    try:
        for parameter in parameters:
            parameter.grad = None
        with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(backward):
            if triton_conv is None:
                _step(model, inputs, backward)
            else:
                from .triton import autotuning

                with autotuning.compile_ahead() as ahead:
                    with dispatch.preparing(ahead.compile_only):
                        _step(model, inputs, backward)
                compiles, failed = len(ahead.futures), ahead.failed()
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, grad in grads:
            parameter.grad = grad
    return PrecompileReport(compiles, failed, time.perf_counter() - start)


def _step(model: nn.Module, inputs: tuple, backward: bool) -> None:
    """The pass: the forward, and the backward of the sum of the outputs that require grad."""
    outputs = [t for t in _floating_tensors(model(*inputs)) if t.requires_grad]
    if backward and outputs:
        torch.stack([t.float().sum() for t in outputs]).sum().backward()
