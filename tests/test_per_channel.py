"""The kernel backends' per-channel functions (``affine``, ``finish_batch_stats``, ``backward_coefficients``)
against their contract, ``torch_backend`` run in fp64.

Each backend runs on seeded random non-zero vectors: "triton" (``fusedres.triton.bn_act``: on the GPU, else in
Triton's interpreter), "host" (csrc/ built for the CPU, its kernels run by csrc/host_emulation.h) and "cuda"
(the built extension on a GPU). Channel counts reach one and several programs (Triton's 1024-channel blocks,
the CUDA kernels' 256 threads); weight, bias and running statistics come absent, in fp32/fp16/bf16 and strided,
as the kernels' hosts take any; the running statistics are updated with momenta 0.1, 0.7 and 1.
"""

import pytest
import torch

import host_emulation
from fusedres.ops import torch_backend as ref
from op_helpers import nonzero, seeded

CHANNELS = [1, 7, 64, 1030]
FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A result rounded to fp32 after a few fp32 operations: within this fraction of the magnitude of its terms
FP32_ARITHMETIC = 4e-7
# A running statistic stored in each dtype: within about one unit in its last place (bf16: two, as Triton's
# interpreter rounds fp32 -> bf16 by truncation where GPUs round to nearest)
STORED = {torch.float32: 4e-7, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


GPU_EXT, _GPU_WHY_NOT = host_emulation.gpu_extension()
_HOST_WHY_NOT = host_emulation.unavailable_reason()


@pytest.fixture(scope="module", params=[
    "triton",
    pytest.param("host", marks=[pytest.mark.host_emulation,
                                pytest.mark.skipif(_HOST_WHY_NOT is not None, reason=str(_HOST_WHY_NOT))]),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(GPU_EXT is None, reason=_GPU_WHY_NOT)])])
def backend(request):
    """(the backend's module, the device of its tensors)."""
    if request.param == "triton":
        from fusedres.triton import bn_act

        return bn_act, "cuda" if torch.cuda.is_available() else "cpu"
    if request.param == "host":
        return host_emulation.load(), "cpu"
    return GPU_EXT, "cuda"


def _vectors(request, device, count, channels, scale=1.0):
    """``count`` fp32 (C,) vectors on ``device``, never zero (``op_helpers.nonzero``), seeded by the test's id."""
    return list(nonzero((count, channels), seeded(request, device), scale).float())


def _as_given(v, kind: str):
    """v as a caller may hand it over: None ("none"), in another dtype, or strided (every other element)."""
    if kind == "none":
        return None
    if kind == "strided":
        return torch.stack([v, torch.full_like(v, float("nan"))], 1)[:, 0]
    return v.to(FLOATS[kind])


def _f64(v):
    return None if v is None else v.double()


def _assert_within(what, got, want, magnitude, rtol=FP32_ARITHMETIC):
    """got (the kernel's) is fp32 and within rtol * (magnitude + |want|) of the fp64 reference ``want``."""
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    err = (got.double().cpu() - want.cpu()).abs()
    bound = rtol * (magnitude.cpu() + want.cpu().abs())
    assert bool((err <= bound).all()), f"{what}: error {float(err.max()):.3g}, bound {float(bound.min()):.3g}"


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("weight_kind,bias_kind", [("fp32", "fp32"), ("none", "none"), ("bf16", "none"),
                                                   ("none", "fp16"), ("strided", "strided")])
def test_affine(backend, channels, weight_kind, bias_kind, request):
    kernels, device = backend
    mean, weight, bias = _vectors(request, device, 3, channels)
    invstd = _vectors(request, device, 1, channels)[0].abs() + 0.5
    weight, bias = _as_given(weight, weight_kind), _as_given(bias, bias_kind)
    scale, shift = kernels.affine(mean, invstd, weight, bias)
    want_scale, want_shift = ref.affine(*map(_f64, (mean, invstd, weight, bias)))
    _assert_within("scale", scale, want_scale, want_scale.abs())
    _assert_within("shift", shift, want_shift, (_f64(mean) * want_scale).abs())


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("running_kind", ["none", "fp32", "fp16", "bf16", "strided"])
@pytest.mark.parametrize("momentum", [0.1, 0.7, 1.0])
def test_finish_batch_stats(backend, channels, running_kind, momentum, request):
    kernels, device = backend
    mean, running_mean = _vectors(request, device, 2, channels)
    var, running_var = (v.abs() for v in _vectors(request, device, 2, channels, scale=3.0))
    count, eps = 37, 1e-5
    given = [_as_given(r, running_kind) for r in (running_mean, running_var)]
    expected = [None if r is None else r.clone() for r in given]  # the reference's, in the same dtype
    invstd = kernels.finish_batch_stats(mean, var, *given, momentum, eps, count)
    want = ref.finish_batch_stats(_f64(mean), _f64(var), *expected, momentum, eps, count)
    _assert_within("invstd", invstd, want, want.abs())
    for name, got, exp in zip(("running_mean", "running_var"), given, expected):
        if got is None:
            continue
        assert got.dtype == exp.dtype, name
        # both sides round to the stored dtype once: one of its units apart at most, and fp32's arithmetic
        tol = STORED.get(got.dtype, STORED[torch.float32])
        err = (got.double() - exp.double()).abs()
        bound = tol * (exp.double().abs() + 1.0)
        assert bool((err <= bound).all()), f"{name}: error {float(err.max()):.3g}"


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("affine_kind", ["fp32", "none", "fp16"])
def test_backward_coefficients(backend, channels, batch_stats, affine_kind, request):
    kernels, device = backend
    sum_dz, sum_dz_yc, group_sum_dz, group_sum_dz_yc, mean, weight, bias = _vectors(
        request, device, 7, channels, scale=5.0)
    invstd = _vectors(request, device, 1, channels)[0].abs() + 0.5
    weight, bias = _as_given(weight, affine_kind), _as_given(bias, affine_kind)
    count = 96
    got = kernels.backward_coefficients(sum_dz, sum_dz_yc, group_sum_dz, group_sum_dz_yc, mean, invstd, weight, bias,
                                        count, batch_stats)
    want = ref.backward_coefficients(*map(_f64, (sum_dz, sum_dz_yc, group_sum_dz, group_sum_dz_yc, mean, invstd,
                                                 weight, bias)), count, batch_stats)
    coef, shift, dweight, dbias = got
    assert coef.shape == (4, channels) and coef.is_contiguous()
    _assert_within("coef", coef, want[0], want[0].abs())
    _assert_within("shift", shift, want[1], (_f64(mean) * want[0][0]).abs())
    _assert_within("dweight", dweight, want[2], want[2].abs())
    _assert_within("dbias", dbias, want[3], want[3].abs(), rtol=0)
    assert len({t.data_ptr() for t in got}) == 4, "each result its own tensor"
    assert dbias.data_ptr() != sum_dz.data_ptr(), "dbias must not alias the sums"


def test_per_channel_functions_name_a_misfit_vector(backend, request):
    kernels, device = backend
    mean, invstd, weight = _vectors(request, device, 3, 8)
    with pytest.raises((ValueError, RuntimeError), match="weight"):
        kernels.affine(mean, invstd, weight[:5], None)
    with pytest.raises((TypeError, RuntimeError), match="invstd"):
        kernels.affine(mean, invstd.double(), None, None)
    with pytest.raises((ValueError, RuntimeError), match="running_mean and running_var"):
        kernels.finish_batch_stats(mean, invstd.abs(), weight, None, 0.1, 1e-5, 4)
    with pytest.raises((ValueError, RuntimeError), match="needs count > 1"):
        kernels.finish_batch_stats(mean, invstd.abs(), weight, weight.clone(), 0.1, 1e-5, 1)
    with pytest.raises((ValueError, RuntimeError), match="sum_dz_yc"):
        kernels.backward_coefficients(mean, mean[:4], mean, mean, mean, invstd, None, None, 4, True)
