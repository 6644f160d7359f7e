"""The compiled CUDA backend (``fusedres._C``) against its contract, ``torch_backend``.

Each of the four functions runs on seeded random non-zero inputs (fresh per case) for
fp32/fp16/bf16, NCHW and channels_last, shapes that reach both the vectorised and the scalar
paths (odd C, H*W = 1, C = 1, more than 256 channel vectors, many rows per thread), every
residual kind, relu on and off. Results are compared with ``torch_backend`` run on fp64 copies:
the error must fit the storage dtype, and be at most twice the error of ``torch_backend`` itself
run in that dtype, plus a small term scaled by the magnitude of the terms behind each value.
Outputs are allocated over NaN-poisoned memory and checked finite, of the right dtype and
memory format.

Every test runs on two backends: "cuda", the built extension on the GPU (skipped without a CUDA
device or the extension), and "host", the same source built for the CPU with its kernels run by
csrc/host_emulation.h (tests/host_emulation.py): the kernels' logic is checked on every machine.
"""

import itertools
from typing import NamedTuple

import pytest
import torch

import host_emulation
from fusedres.ops import torch_backend as ref
from op_helpers import nonzero, seeded

GPU_EXT, _GPU_WHY_NOT = host_emulation.gpu_extension()
_HOST_WHY_NOT = host_emulation.unavailable_reason()


class Backend(NamedTuple):
    ext: object  # the module with channel_stats, act_forward, backward_reduce, backward_apply
    device: str  # where its tensors live


@pytest.fixture(scope="module", params=[
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(GPU_EXT is None, reason=_GPU_WHY_NOT)]),
    pytest.param("host", marks=[pytest.mark.host_emulation,
                                pytest.mark.skipif(_HOST_WHY_NOT is not None, reason=str(_HOST_WHY_NOT))])])
def backend(request) -> Backend:
    if request.param == "cuda":
        return Backend(GPU_EXT, "cuda")
    return Backend(host_emulation.load(), "cpu")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
SHAPES = [
    (3, 5, 7, 9),  # nothing divides: scalar paths
    (2, 64, 1, 1),  # H*W = 1: both formats hold
    (4, 24, 14, 14),  # H*W = 196: vectorised NCHW for fp32 only
    (2, 256, 28, 28),
    (1, 3, 1, 2),
    (2, 1, 4, 6),  # C = 1
    (2, 2056, 3, 2),  # channels_last: more channel vectors than threads in a block
    (16, 32, 56, 56),  # many vectors per thread
]
RESIDUALS = ["none", "identity", "bn"]

# Relative tolerance of a value stored in each dtype (about one unit in the last place) ...
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# ... plus this fraction of the magnitude of the terms behind it (fp32 arithmetic, sums).
ATOL = 1e-5


def _f64(t):
    return None if t is None else t.double()


def _abs64(t):
    return None if t is None else t.double().abs()


def _neg_abs64(t):
    """-|t|: with it, (|x| - t) bounds |x - t| (a centring term's magnitude)."""
    return None if t is None else -t.double().abs()


def _abs_coef64(c):
    """|coef| with row 3 (the centre) as -|c3|, for magnitudes of dz*c0 + (x - c3)*c1 + c2."""
    return None if c is None else torch.cat([c[:3].double().abs(), _neg_abs64(c[3:])])


def _poison(*likes):
    """Free NaN-filled blocks of the outputs' sizes: outputs allocated next reuse them."""
    junk = [torch.full_like(t, float("nan")) for t in likes if t is not None]
    del junk


class Case:
    """Inputs of one call; y is resampled where z is near 0, so the ReLU mask is unambiguous."""

    def __init__(self, shape, dtype, fmt, residual, gen, res_dtype=None):
        c = shape[1]
        self.fmt = fmt

        def act(dt):
            return nonzero(shape, gen).to(dt).contiguous(memory_format=fmt)

        def chan(*s):
            return nonzero(s, gen, 0.7).float()

        bn = residual == "bn"
        self.y, self.grad = act(dtype), act(dtype)
        self.residual = None if residual == "none" else act(res_dtype or dtype)
        self.scale, self.shift, self.mean, self.coef = chan(c), chan(c), chan(c), chan(4, c)
        self.res_scale, self.res_shift, self.res_mean, self.res_coef = (
            (chan(c), chan(c), chan(c), chan(4, c)) if bn else (None,) * 4)
        for _ in range(100):
            near = ref.act_forward(*self.fwd(_f64), relu=False).abs() < 0.02
            if not near.any():
                return
            fresh = nonzero(shape, gen).to(dtype)
            self.y = torch.where(near, fresh, self.y).contiguous(memory_format=fmt)
        raise AssertionError("could not move z away from the ReLU kink")

    def fwd(self, f=lambda t: t):
        """(y, scale, shift, residual, res_scale, res_shift)."""
        return [f(t) for t in (self.y, self.scale, self.shift, self.residual, self.res_scale,
                               self.res_shift)]

    def reduce_args(self, relu, f=lambda t: t):
        return [f(self.grad), *self.fwd(f), relu, f(self.mean), f(self.res_mean)]

    def reduce_magnitude(self):
        """Sums of |terms|: |dz|, |dz| (|y| + |mean|), |dz| (|res| + |res_mean|)."""
        return ref.backward_reduce(_abs64(self.grad), *self.fwd(_abs64), False,
                                   _neg_abs64(self.mean), _neg_abs64(self.res_mean))

    def apply_args(self, relu, want_res, f=lambda t: t):
        return [f(self.grad), *self.fwd(f), relu, f(self.coef), f(self.res_coef), want_res]

    def apply_magnitude(self, want_res):
        """|dz| |c0| + (|x| + |c3|) |c1| + |c2| for dy and d_residual."""
        return ref.backward_apply(_abs64(self.grad), *self.fwd(_abs64), False,
                                  _abs_coef64(self.coef), _abs_coef64(self.res_coef), want_res)


def check(what, got, want, low, magnitude, dtype, fmt=None):
    """got: kernel result; want: fp64 reference; low: torch_backend in the storage dtype (or
    None); magnitude: size of the terms behind each value (fp64, broadcastable)."""
    assert got is not None, f"{what}: got None"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape and got.device == want.device, f"{what}: shape/device"
    if fmt is not None:
        assert got.is_contiguous(memory_format=fmt), f"{what}: not contiguous in {fmt}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    err = (got.double() - want).abs()
    bound = RTOL[dtype] * want.abs() + ATOL * magnitude
    bad = err > bound
    worst = int(err.argmax())
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} values out of tolerance; worst error "
        f"{err.flatten()[worst]:.3g} at flat index {worst} "
        f"(bound {bound.expand_as(err).flatten()[worst]:.3g})")
    if low is not None:
        low_err = (low.double() - want).abs().max()
        slack = ATOL * torch.as_tensor(magnitude).max()
        assert err.max() <= 2 * low_err + slack, (
            f"{what}: max error {err.max():.3g} vs torch_backend's {low_err:.3g} in {dtype}")


def _ids(params):
    return [
        "-".join(str(p).replace("torch.", "").replace(" ", "") for p in ps) for ps in params]


def _grid(*axes):
    params = list(itertools.product(*axes))
    return params, _ids(params)


_LAYOUT = (DTYPES, list(FORMATS), SHAPES)
_STATS, _STATS_IDS = _grid(*_LAYOUT)
_ACT, _ACT_IDS = _grid(*_LAYOUT, RESIDUALS, [False, True])
_APPLY, _APPLY_IDS = [], []
for _p, _i in zip(*_grid(*_LAYOUT, RESIDUALS, [False, True], [False, True])):
    if _p[3] != "none" or not _p[5]:  # a residual gradient needs a residual
        _APPLY.append(_p)
        _APPLY_IDS.append(_i)


@pytest.mark.parametrize("dtype,layout,shape", _STATS, ids=_STATS_IDS)
def test_channel_stats(dtype, layout, shape, backend, request):
    _check_channel_stats(backend.ext, Case(shape, dtype, FORMATS[layout], "none", seeded(request, backend.device)))


def _check_channel_stats(ext, c):
    _poison(c.scale, c.scale)
    mean, var = ext.channel_stats(c.y)
    want_mean, want_var = ref.channel_stats(c.y.double())
    low_mean, low_var = ref.channel_stats(c.y)
    check("mean", mean, want_mean, low_mean, ref.channel_stats(c.y.double().abs())[0],
          torch.float32)
    check("var", var, want_var, low_var, want_var, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(FORMATS))
def test_channel_stats_far_from_zero(dtype, layout, backend, request):
    """Mean 1000, spread 4: a single-pass sum / sum-of-squares in fp32 would lose the variance."""
    gen = seeded(request, backend.device)
    y = (nonzero((8, 16, 32, 32), gen, 4.0) + 1000).to(dtype).contiguous(
        memory_format=FORMATS[layout])
    mean, var = backend.ext.channel_stats(y)
    want_mean, want_var = ref.channel_stats(y.double())
    check("mean", mean, want_mean, None, want_mean.abs(), torch.float32)
    rel = ((var.double() - want_var).abs() / want_var).max()
    assert rel < 1e-3, f"variance relative error {rel:.3g}"


@pytest.mark.parametrize("dtype,layout,shape,residual,relu", _ACT, ids=_ACT_IDS)
def test_act_forward(dtype, layout, shape, residual, relu, backend, request):
    fmt = FORMATS[layout]
    c = Case(shape, dtype, fmt, residual, seeded(request, backend.device))
    _poison(c.y)
    out = backend.ext.act_forward(*c.fwd(), relu)
    want = ref.act_forward(*c.fwd(_f64), relu)
    low = ref.act_forward(*c.fwd(), relu)
    check("out", out, want, low, ref.act_forward(*c.fwd(_abs64), False), dtype, fmt)


@pytest.mark.parametrize("dtype,layout,shape,residual,relu", _ACT, ids=_ACT_IDS)
def test_backward_reduce(dtype, layout, shape, residual, relu, backend, request):
    _check_backward_reduce(backend.ext, Case(shape, dtype, FORMATS[layout], residual, seeded(request, backend.device)),
                           relu)


def _check_backward_reduce(ext, c, relu):
    _poison(c.scale, c.scale, c.scale)
    got = ext.backward_reduce(*c.reduce_args(relu))
    want = ref.backward_reduce(*c.reduce_args(relu, _f64))
    low = ref.backward_reduce(*c.reduce_args(relu))
    magnitude = c.reduce_magnitude()
    assert isinstance(got, tuple) and len(got) == 3
    for name, g, w, lo, m in zip(("sum_dz", "sum_dz_yc", "sum_dz_rc"), got, want, low, magnitude):
        if w is None:
            assert g is None, f"{name}: expected None"
        else:
            check(name, g, w, lo, m, torch.float32)


@pytest.mark.parametrize("dtype,layout,shape,residual,relu,want_res", _APPLY, ids=_APPLY_IDS)
def test_backward_apply(dtype, layout, shape, residual, relu, want_res, backend, request):
    fmt = FORMATS[layout]
    c = Case(shape, dtype, fmt, residual, seeded(request, backend.device))
    _poison(c.y, c.residual)
    dy, d_res = backend.ext.backward_apply(*c.apply_args(relu, want_res))
    want_dy, want_res_grad = ref.backward_apply(*c.apply_args(relu, want_res, _f64))
    low_dy, low_res = ref.backward_apply(*c.apply_args(relu, want_res))
    mag_dy, mag_res = c.apply_magnitude(want_res)
    check("dy", dy, want_dy, low_dy, mag_dy, dtype, fmt)
    if want_res:
        check("d_residual", d_res, want_res_grad, low_res, mag_res, c.residual.dtype, fmt)
    else:
        assert d_res is None


@pytest.mark.parametrize("layout", list(FORMATS))
@pytest.mark.parametrize("residual", ["identity", "bn"])
@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_residual_of_another_dtype(dtype, res_dtype, residual, layout, backend, request):
    fmt = FORMATS[layout]
    c = Case((4, 24, 14, 14), dtype, fmt, residual, seeded(request, backend.device), res_dtype=res_dtype)
    out = backend.ext.act_forward(*c.fwd(), True)
    check("out", out, ref.act_forward(*c.fwd(_f64), True), ref.act_forward(*c.fwd(), True),
          ref.act_forward(*c.fwd(_abs64), False), dtype, fmt)
    got = backend.ext.backward_reduce(*c.reduce_args(True))
    want = ref.backward_reduce(*c.reduce_args(True, _f64))
    low = ref.backward_reduce(*c.reduce_args(True))
    for name, g, w, lo, m in zip(("sum_dz", "sum_dz_yc", "sum_dz_rc"), got, want, low,
                                 c.reduce_magnitude()):
        assert (g is None) == (w is None), name
        if w is not None:
            check(name, g, w, lo, m, torch.float32)
    dy, d_res = backend.ext.backward_apply(*c.apply_args(True, True))
    want_dy, want_res = ref.backward_apply(*c.apply_args(True, True, _f64))
    low_dy, low_res = ref.backward_apply(*c.apply_args(True, True))
    mag_dy, mag_res = c.apply_magnitude(True)
    check("dy", dy, want_dy, low_dy, mag_dy, dtype, fmt)
    check("d_residual", d_res, want_res, low_res, mag_res, res_dtype, fmt)


def test_reductions_are_deterministic(backend, request):
    c = Case((16, 32, 56, 56), torch.bfloat16, torch.channels_last, "bn", seeded(request, backend.device))
    for first, second in [(backend.ext.channel_stats(c.y), backend.ext.channel_stats(c.y)),
                          (backend.ext.backward_reduce(*c.reduce_args(True)),
                           backend.ext.backward_reduce(*c.reduce_args(True)))]:
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.host_emulation
@pytest.mark.skipif(_HOST_WHY_NOT is not None, reason=str(_HOST_WHY_NOT))
@pytest.mark.parametrize("layout", list(FORMATS))
def test_host_results_do_not_depend_on_thread_order(layout, monkeypatch, request):
    """A block's threads run between barriers in the order FUSEDRES_EMULATION_ORDER names: results that
    changed with it would come from a thread reading shared memory another writes in the same phase."""
    ext = host_emulation.load()
    c = Case((6, 16, 10, 13), torch.float32, FORMATS[layout], "bn", seeded(request, "cpu"))

    def run_all():
        return [*ext.channel_stats(c.y), ext.act_forward(*c.fwd(), True),
                *ext.backward_reduce(*c.reduce_args(True)), *ext.backward_apply(*c.apply_args(True, True))]

    expected = run_all()
    for order in ("reverse", "1", "2"):
        monkeypatch.setenv("FUSEDRES_EMULATION_ORDER", order)
        for name, got, want in zip(("mean", "var", "out", "sum_dz", "sum_dz_yc", "sum_dz_rc", "dy", "d_residual"),
                                   run_all(), expected):
            assert torch.equal(got, want), f"{name} differs with thread order {order}"
    monkeypatch.setenv("FUSEDRES_EMULATION_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="FUSEDRES_EMULATION_ORDER must be forward, reverse or a seed"):
        ext.channel_stats(c.y)


@pytest.mark.host_emulation
@pytest.mark.skipif(_HOST_WHY_NOT is not None, reason=str(_HOST_WHY_NOT))
@pytest.mark.parametrize("layout,shape", [("nhwc", (16, 32, 56, 56)), ("nchw", (64, 1, 96, 96))])  # 264 slices
def test_host_reductions_with_an_h100_launch_plan(layout, shape, monkeypatch, request):
    """The plan a 132-SM GPU gets: hundreds of row slices per channel, merged by finalize threads that each
    take several partials (the imaginary 3-SM GPU of the other host cases never needs that)."""
    monkeypatch.setenv("FUSEDRES_EMULATION_SMS", "132")
    c = Case(shape, torch.bfloat16, FORMATS[layout], "bn", seeded(request, "cpu"))
    _check_channel_stats(host_emulation.load(), c)
    _check_backward_reduce(host_emulation.load(), c, True)
    monkeypatch.setenv("FUSEDRES_EMULATION_SMS", "none")
    with pytest.raises(RuntimeError, match="FUSEDRES_EMULATION_SMS must be a positive number of SMs, got none"):
        host_emulation.load().channel_stats(c.y)


# ------------------------------------------------------------------ more than 2**31 elements
def _free_gib():
    return torch.cuda.mem_get_info()[0] / 2**30 if GPU_EXT is not None else 0.0


_CHUNK = 1024  # images per reference chunk


@pytest.mark.gpu
@pytest.mark.skipif(GPU_EXT is None, reason=_GPU_WHY_NOT)
@pytest.mark.skipif(_free_gib() < 20, reason="needs >= 20 GiB of free GPU memory")
@pytest.mark.parametrize("layout", list(FORMATS))
def test_large_64bit_indexing(layout, request):
    """bf16 (32769, 64, 32, 32): 2**31 + 2**16 elements (4.3 GB per tensor), checked in chunks.

    Per-channel scales are powers of two and the shift 2**-5, so z = y * scale + shift is exact
    and at least 0.018 from 0: the ReLU mask is the same in every precision.
    """
    fmt = FORMATS[layout]
    gen = seeded(request, "cuda")
    shape = (2**31 // (64 * 32 * 32) + 1, 64, 32, 32)
    y = torch.empty(shape, dtype=torch.bfloat16, device="cuda", memory_format=fmt)
    grad = torch.empty_like(y)
    for t in (y, grad):
        for part in t.split(_CHUNK):
            part.copy_(nonzero(part.shape, gen))
    c = shape[1]
    pick = torch.randint(0, 6, (c,), generator=gen, device="cuda")
    scale = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], device="cuda")[pick]
    shift = torch.full((c,), 2.0**-5, device="cuda")
    mean, coef = nonzero((c,), gen).float(), nonzero((4, c), gen).float()
    fwd = (scale, shift, None, None, None)
    fwd64 = [_f64(t) for t in fwd]
    fwd_abs64 = [_abs64(t) for t in fwd]  # for magnitudes: the scales here can be negative

    got_mean, got_var = GPU_EXT.channel_stats(y)
    count = y.numel() // c
    s1 = sum(p.double().sum((0, 2, 3)) for p in y.split(_CHUNK))
    want_mean = s1 / count
    m = want_mean.view(1, -1, 1, 1)
    want_var = sum(((p.double() - m) ** 2).sum((0, 2, 3)) for p in y.split(_CHUNK)) / count
    abs_mean = sum(p.double().abs().sum((0, 2, 3)) for p in y.split(_CHUNK)) / count
    check("mean", got_mean, want_mean, None, abs_mean, torch.float32)
    check("var", got_var, want_var, None, want_var, torch.float32)

    out = GPU_EXT.act_forward(y, *fwd, True)
    for yp, op in zip(y.split(_CHUNK), out.split(_CHUNK)):
        check("out", op, ref.act_forward(yp.double(), *fwd64, True),
              ref.act_forward(yp, *fwd, True), ref.act_forward(yp.double().abs(), *fwd_abs64, False),
              torch.bfloat16, fmt)
    del out

    got = GPU_EXT.backward_reduce(grad, y, *fwd, True, mean, None)
    want = [0.0, 0.0]
    magnitude = [0.0, 0.0]
    for gp, yp in zip(grad.split(_CHUNK), y.split(_CHUNK)):
        w = ref.backward_reduce(gp.double(), yp.double(), *fwd64, True, mean.double(), None)
        a = ref.backward_reduce(gp.double().abs(), yp.double().abs(), *fwd_abs64, False,
                                _neg_abs64(mean), None)
        want = [want[i] + w[i] for i in range(2)]
        magnitude = [magnitude[i] + a[i] for i in range(2)]
    assert got[2] is None
    check("sum_dz", got[0], want[0], None, magnitude[0], torch.float32)
    check("sum_dz_yc", got[1], want[1], None, magnitude[1], torch.float32)

    dy, d_res = GPU_EXT.backward_apply(grad, y, *fwd, True, coef, None, False)
    assert d_res is None
    for gp, yp, dp in zip(grad.split(_CHUNK), y.split(_CHUNK), dy.split(_CHUNK)):
        want_dy, _ = ref.backward_apply(gp.double(), yp.double(), *fwd64, True, coef.double(),
                                        None, False)
        mag_dy, _ = ref.backward_apply(gp.double().abs(), yp.double().abs(), *fwd_abs64, False,
                                       _abs_coef64(coef), None, False)
        check("dy", dp, want_dy, None, mag_dy, torch.bfloat16, fmt)
    del y, grad, dy
    torch.cuda.empty_cache()  # hand the ~13 GB back for the tests that follow


# ------------------------------------------------------------------ argument errors

def _small(device, dtype=torch.float32):
    y = (torch.rand(2, 3, 4, 5) + 0.5).to(dtype).to(device)
    s = (torch.rand(3) + 0.5).to(device)
    return y, s


def test_rejects_tensors_on_another_device(backend):
    """The GPU build takes CUDA tensors only (CPU ones are refused), the host build CPU ones only."""
    ext = backend.ext
    kind, other = ("CUDA", "cpu") if backend.device == "cuda" else ("CPU", "meta")
    y, s = _small(backend.device)
    y_other, s_other = _small(other)
    with pytest.raises(RuntimeError, match=rf"channel_stats: expected y to be a {kind} tensor, got {other}"):
        ext.channel_stats(y_other)
    with pytest.raises(RuntimeError, match=rf"act_forward: expected y to be a {kind} tensor"):
        ext.act_forward(y_other, s, s, None, None, None, True)
    with pytest.raises(RuntimeError, match=rf"act_forward: expected scale to be a {kind} tensor"):
        ext.act_forward(y, s_other, s, None, None, None, True)
    with pytest.raises(RuntimeError, match=rf"expected residual to be a {kind} tensor"):
        ext.act_forward(y, s, s, y_other, None, None, True)
    with pytest.raises(RuntimeError, match=rf"backward_reduce: expected grad_out to be a {kind}"):
        ext.backward_reduce(y_other, y, s, s, None, None, None, True, s, None)
    with pytest.raises(RuntimeError, match=rf"backward_apply: expected coef to be a {kind} tensor"):
        ext.backward_apply(y, y, s, s, None, None, None, True, torch.stack([s_other] * 4), None,
                           False)


@pytest.mark.parametrize("bad", [torch.int32, torch.float64])
def test_rejects_wrong_dtypes(bad, backend):
    ext = backend.ext
    y, s = _small(backend.device)
    y_bad = (y * 10).to(bad)
    s_bad = (s * 10).to(bad)
    with pytest.raises(RuntimeError, match=r"channel_stats: y must be float32, float16 or bf"):
        ext.channel_stats(y_bad)
    with pytest.raises(RuntimeError, match=r"act_forward: y must be float32, float16 or bfloat16"):
        ext.act_forward(y_bad, s, s, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"act_forward: residual must be float32"):
        ext.act_forward(y, s, s, y_bad, None, None, False)
    with pytest.raises(RuntimeError, match=r"act_forward: shift must be float32, got"):
        ext.act_forward(y, s, s_bad, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"backward_reduce: mean must be float32, got"):
        ext.backward_reduce(y, y, s, s, None, None, None, True, s_bad, None)
    with pytest.raises(RuntimeError, match=r"backward_apply: grad_out must be float32, float16"):
        ext.backward_apply(y_bad, y, s, s, None, None, None, True, torch.stack([s] * 4), None,
                           False)


def test_rejects_per_channel_vectors_of_the_wrong_shape(backend):
    """A mean that is not (C,) named as such (a 0-D one raised torch's IndexError about a dimension 1, a
    (C, 1) one was compared with C = 1); per-channel vectors of y's functions against y's C."""
    ext = backend.ext
    y, s = _small(backend.device)
    for mean in (s[0], s.view(3, 1), s.view(1, 3)):
        with pytest.raises(RuntimeError, match=r"fusedres.affine: expected mean to be a \(C,\) vector, got shape"):
            ext.affine(mean, mean, None, None)
        with pytest.raises(RuntimeError, match=r"fusedres.finish_batch_stats: expected mean to be a \(C,\) vector"):
            ext.finish_batch_stats(mean, mean, None, None, 0.1, 1e-5, 4)
        with pytest.raises(RuntimeError, match=r"fusedres.backward_coefficients: expected mean to be a \(C,\)"):
            ext.backward_coefficients(s, s, s, s, mean, s, None, None, 4, True)
    with pytest.raises(RuntimeError, match=r"act_forward: scale has shape \[3, 1\], expected \(C,\) with C = 3"):
        ext.act_forward(y, s.view(3, 1), s, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"backward_apply: coef has shape \[3, 3\], expected \(4, C\) with C = 3"):
        ext.backward_apply(y, y, s, s, None, None, None, True, torch.stack([s] * 3), None, False)
    with pytest.raises(RuntimeError, match=r"affine: weight has 4 elements, expected one per channel \(3\)"):
        ext.affine(s, s, torch.ones(4, device=backend.device), None)
