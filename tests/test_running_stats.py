"""BatchNorm's running statistics as each backend updates them (``functional.batch_norm_stats``, which finishes
the batch statistics with the backend's ``finish_batch_stats``), against eager ``F.batch_norm(training=True)``:
r = momentum * stat + (1 - momentum) * r, in fp32 (fp64 for fp64 buffers), rounded once to r's dtype.

Backends: "torch", "triton" (Triton's interpreter without a GPU) and "cuda" (without a GPU, the CUDA kernels
built for the CPU: tests/host_emulation.py). The inputs hold two values a +- d per channel, a and d of few bits,
d a power of two, so every backend's batch mean (a) and unbiased variance (2 d^2) are exact, and so is momentum
times the variance (eager's CPU kernel takes that product in fp64): the running statistics then differ from
eager's only by their update's formula, and on the CPU (no fused multiply-add on either side) they must be
eager's to the bit. A lerp, r + momentum * (stat - r), rounds differently, and turns an infinite running
statistic into NaN where eager keeps it infinite.
"""

import pytest
import torch
import torch.nn.functional as F

import host_emulation
from fusedres.ops import backends, functional
from op_helpers import EPS, seeded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHANNELS = 2000  # more than one block of the CUDA kernels' 256 threads, of Triton's 1024 channels
GPU_EXT, _GPU_WHY_NOT = host_emulation.gpu_extension()

# (input dtype, running statistics' dtype)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16-fp32": (torch.bfloat16, torch.float32),
          "fp16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp64": (torch.float64, torch.float64)}


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend(request):
    """The backend's name; "cuda" served by the host emulation on a machine without a GPU."""
    if request.param == "cuda":
        if DEVICE == "cpu":
            request.getfixturevalue("cuda_backend_on_cpu")
        elif GPU_EXT is None:
            pytest.skip(_GPU_WHY_NOT)
    return request.param


def _input(gen, dtype):
    """(2, C, 1, 1): a + d and a - d per channel, a in [-4, 4) in steps of 1/16, d in 2^[-4, 2]; exact in every
    float dtype, as are the batch mean a and the biased variance d^2."""
    a = torch.randint(-64, 64, (CHANNELS,), generator=gen).double() / 16
    d = 2.0 ** torch.randint(-4, 3, (CHANNELS,), generator=gen).double()
    return torch.stack([a + d, a - d]).view(2, CHANNELS, 1, 1).to(DEVICE, dtype)


def _eager(y, running_mean, running_var, momentum):
    """Eager's running statistics after one training step on y, in the compute dtype (fp32, fp64 for fp64 y), before
    they are rounded to the buffers' dtype: torch's CUDA batch_norm updates low-precision buffers in fp32 and rounds
    once (its CPU one computes in the buffer's dtype, bf16 rounding each step), so fp32 copies of them here."""
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    stats = [running_mean.to(compute, copy=True), running_var.to(compute, copy=True)]
    F.batch_norm(y.to(compute), *stats, training=True, momentum=momentum, eps=EPS)
    return stats


def _truncated_to_bf16(x):
    """fp32 x rounded toward zero to bf16, as Triton's interpreter converts fp32 to bf16 (GPUs round to nearest)."""
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _assert_eager(name, got, want, terms, backend):
    """got is eager's ``want`` rounded to got's dtype, to the bit on the CPU (Triton's interpreter: or truncated to
    bf16); on a GPU, where either side may fuse a multiply-add, within one unit in the last place of ``terms``
    (the larger of |momentum * stat| and |(1 - momentum) * r|)."""
    rounded = want.to(got.dtype)
    if got.device.type == "cpu":
        if backend == "triton" and got.dtype == torch.bfloat16 and backends.triton_interpreted():
            rounded = torch.where(got == _truncated_to_bf16(want), got, rounded)
        torch.testing.assert_close(got, rounded, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    else:
        err = torch.where(got == rounded, 0.0, (got.double() - rounded.double()).abs())  # inf - inf: NaN
        bound = torch.finfo(got.dtype).eps * terms.double()
        assert bool((err <= bound).all()), f"{name}: error {float(err.max()):.3g}"


@pytest.mark.parametrize("momentum", [0.1, 0.7])  # 0.7: above 0.5, where a lerp switches to its other formula
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_running_statistics_are_eagers(backend, dtypes, momentum, request):
    dtype, stat_dtype = DTYPES[dtypes]
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("the kernel backends leave fp64 to the torch backend")
    gen = seeded(request, "cpu")
    y = _input(gen, dtype)
    running = [torch.randn(CHANNELS, generator=gen).to(DEVICE, stat_dtype),
               (torch.rand(CHANNELS, generator=gen) + 0.5).to(DEVICE, stat_dtype)]
    want = _eager(y, *running, momentum)
    before = [r.clone() for r in running]
    functional.batch_norm_stats(y, None, None, *running, batch_stats=True, momentum=momentum, eps=EPS,
                                backend=backend)
    mean = y.double().mean((0, 2, 3))
    unbiased = y.double().var((0, 2, 3), unbiased=True)
    for name, got, exp, stat, old in zip(("running_mean", "running_var"), running, want, (mean, unbiased), before):
        terms = torch.maximum((momentum * stat).abs(), ((1 - momentum) * old.double()).abs())
        _assert_eager(name, got, exp, terms, backend)


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which,value", [("running_mean", float("inf")), ("running_mean", float("-inf")),
                                         ("running_var", float("inf"))])
def test_an_infinite_running_statistic_stays_infinite_as_in_eager(backend, which, value, stat_dtype, request):
    """A model whose statistics overflowed: eager's (1 - momentum) * inf + momentum * stat is inf; a lerp's
    r + momentum * (stat - r) is inf - inf, NaN."""
    y = _input(seeded(request, "cpu"), stat_dtype)
    running = {"running_mean": torch.zeros(CHANNELS, device=DEVICE, dtype=stat_dtype),
               "running_var": torch.ones(CHANNELS, device=DEVICE, dtype=stat_dtype)}
    running[which].fill_(value)
    want = _eager(y, running["running_mean"], running["running_var"], 0.1)
    assert bool((want[which == "running_var"] == value).all()), "eager keeps it"
    functional.batch_norm_stats(y, None, None, running["running_mean"], running["running_var"], batch_stats=True,
                                momentum=0.1, eps=EPS, backend=backend)
    assert not bool(running[which].isnan().any()), f"{which} became NaN"
    for (name, got), exp in zip(running.items(), want):
        _assert_eager(name, got, exp, exp.abs(), backend)
