"""Triton launches and the dispatch's timing run on their tensors' GPU, not on whichever is current.

A model moved to "cuda:1" without ``torch.cuda.set_device(1)`` computes on cuda:1 in torch's ops and in the CUDA
extension (a device guard). Triton launches on the current device (compiles for it, loads the kernel into its
context, queues on its stream), and torch's CUDA events and synchronize are the current device's. Checked on CPU
with stand-ins for torch's current device and ``torch.cuda.device``, and for a tensor on a GPU; on one GPU there
is no other device to launch on.
"""

import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

from fusedres.triton import autotuning, relaunch


class OnGPU:
    """A kernel argument that says it lives on GPU ``index`` (-1: the CPU), as a tensor's ``get_device()`` does."""

    def __init__(self, index: int):
        self.index = index

    def get_device(self) -> int:
        return self.index


@pytest.fixture
def devices(monkeypatch):
    """torch's current CUDA device, 0 to start with, as a one-element list; ``torch.cuda.current_device`` and
    ``torch.cuda.device`` (which records each device it makes current in ``devices.entered``) read and set it."""
    current = [0]
    entered = []

    class Device:
        def __init__(self, device):
            self.index = torch.device(device).index if not isinstance(device, int) else device

        def __enter__(self):
            entered.append(self.index)
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)
    return type("Devices", (), dict(current=current, entered=entered))


def _kernel(x_ptr, n):
    pass


def _recording(devices, seen: list):
    """A launch that notes the current device it ran on."""
    return lambda *args, **kwargs: seen.append(devices.current[0])


def test_a_launch_runs_with_its_tensors_gpu_current(devices):
    seen = []
    launch = relaunch.on_tensors_device(_recording(devices, seen))
    for index in (1, 0, -1, 2):
        launch(OnGPU(index), 3)
    launch(torch.float32, 3)  # triton's warmup() passes stand-ins for the tensors: the current device
    assert seen == [1, 0, 0, 2, 0], "each launch on its tensor's GPU (the current one for a CPU tensor)"
    assert devices.entered == [1, 2], "the current device is switched only where it is another"
    assert devices.current == [0], "and restored after the launch"


def test_a_plain_kernels_launches_run_on_their_first_arguments_gpu(devices, monkeypatch):
    """``relaunched`` (the bn_act, statistics-finish and space-to-depth kernels): through the JIT path and, once a
    launch was kept, through the relaunch alike (both are inside the guard)."""
    monkeypatch.setattr(relaunch, "knobs", None)  # every launch through the JIT path (here: the recorder)
    seen = []
    jit_fn = JITFunction(_kernel)
    jit_fn.run = _recording(devices, seen)
    relaunch.relaunched(jit_fn)[(1,)](OnGPU(1), 4)
    assert seen == [1] and devices.entered == [1] and devices.current == [0]


def test_the_autotuners_launches_and_keyed_relaunches_run_on_their_tensors_gpu(devices):
    """The tuned conv kernels: a tuner's launch (its tuning, compiles and timing too) and ``keyed_launch``,
    whose relaunch of a kept launch does not go through the tuner."""
    seen = []
    jit_fn = JITFunction(_kernel)
    jit_fn.run = _recording(devices, seen)
    tuner = autotuning.autotune([triton.Config({})], key=["n"], gemm_sizes=lambda arguments: {})(jit_fn)
    tuner[(1,)](OnGPU(1), 4)  # one config: launched as it is
    assert seen == [1] and devices.entered == [1]

    class Kept:  # what a kept launch's relaunch finds (relaunch.Relaunches.run_keyed), recording where it ran
        def kept_for(self, *owners):
            pass

        def run_keyed(self, key, tensors):
            seen.append(devices.current[0])
            return "kernel", tuner.configs[0]

    tuner.relaunches = Kept()
    assert autotuning.keyed_launch(tuner, (1,), "key", (OnGPU(2),), dict(n=4)) == "kernel"
    assert seen == [1, 2] and devices.entered == [1, 2] and devices.current == [0]


def test_the_dispatch_times_a_call_on_its_gpu(devices, fresh_dispatch, monkeypatch):
    """The measured dispatch's timing (CUDA events, the queued wait, synchronize: the current device's) runs with
    the call's device current."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as it is once a tensor is on a GPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(fresh_dispatch, "_gpu_name", lambda index: f"FakeGPU{index}")
    timed_on = []
    monkeypatch.setattr(fresh_dispatch, "_time_ms", lambda fn: timed_on.append(devices.current[0]) or 1.0)
    op = fresh_dispatch.MeasuredDispatch("launch_device_test", ("a",))
    assert op.choose(torch.device("cuda", 1), "signature", lambda name: None, lambda name: None) == "a"
    assert timed_on == [1] and devices.current == [0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_a_triton_unit_on_the_second_gpu_matches_eager_there():
    """A training unit (BN + ReLU prologue, conv, statistics, BN + ReLU) on the Triton backend, its tensors on
    cuda:1 while cuda:0 is current: forward and backward as eager computes them in float32 on cuda:1."""
    from fusedres.ops import functional

    torch.cuda.set_device(0)
    gen = torch.Generator(device="cuda:1").manual_seed(11)
    device = torch.device("cuda", 1)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    x = rand(3, 16, 9, 11).to(memory_format=torch.channels_last)
    weight, bias, conv_weight, weight2, bias2 = rand(16), rand(16), rand(24, 16, 3, 3) / 12, rand(24), rand(24)
    leaves = [t.requires_grad_() for t in (x, weight, bias, conv_weight, weight2, bias2)]
    grad = rand(3, 24, 5, 6)

    def fused():
        source = functional.batch_norm_stats(x.bfloat16(), weight, bias, None, None, batch_stats=True,
                                             momentum=0.1, eps=1e-5, backend="triton")
        pending = functional.conv_batch_norm_stats(source, conv_weight.bfloat16(), None, 2, 1, 1, 1, weight2,
                                                   bias2, None, None, batch_stats=True, momentum=0.1, eps=1e-5,
                                                   backend="triton")
        return functional.bn_act(pending, backend="triton")

    def eager():
        y = torch.relu(torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5))
        y = torch.nn.functional.conv2d(y, conv_weight, None, 2, 1)
        return torch.relu(torch.nn.functional.batch_norm(y, None, None, weight2, bias2, True, 0.1, 1e-5))

    results = []
    for forward in (fused, eager):
        out = forward()
        results.append((out.detach().float(), *torch.autograd.grad(out.float(), leaves, grad)))
    assert torch.cuda.current_device() == 0
    for got, expected in zip(*results):
        assert got.device == device
        torch.testing.assert_close(got, expected, atol=0.05 * float(expected.abs().max()), rtol=0)
