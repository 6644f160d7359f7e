"""fusedres.triton.bn_act against the torch backend evaluated in fp64.

Without CUDA the kernels run under the Triton interpreter on CPU tensors, so TRITON_INTERPRET must
be set before triton is imported; with CUDA the same tests run on the GPU.
"""

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fusedres.ops.backends import conv_allows_tf32  # noqa: E402
from fusedres.ops import torch_backend as ref  # noqa: E402
from fusedres.triton import bn_act, partials  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# rtol of results stored in each dtype: about one rounding step of that dtype. The interpreter
# rounds fp32 -> bf16 by truncation (GPUs round to nearest), hence two bf16 ulps.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATOL = 1e-5  # fp32 arithmetic on O(1) terms
SUM_TOL = dict(rtol=1e-5, atol=1e-4)  # fp32 per-channel sums of <= 200 O(1) terms
SHAPES = [(3, 5, 7, 9), (2, 16, 1, 1), (2, 19, 6, 5), (1, 1, 3, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _conv_rtol(dtype):
    """RTOL[dtype] for results through a conv, but 2**-8 for fp32 on a GPU whose torch flags allow TF32: the
    Triton conv's dot runs as TF32 there (products off by up to ~2**-9 of their size), where torch's cuDNN conv
    may pick an exact fp32 algorithm."""
    return 2.0**-8 if dtype == torch.float32 and DEVICE == "cuda" and conv_allows_tf32() else RTOL[dtype]


@dataclass(frozen=True)
class Case:
    shape: tuple
    dtype: torch.dtype
    res_dtype: torch.dtype
    channels_last: bool
    residual: str  # "none", "identity" or "bn"
    relu: bool
    want_residual_grad: bool

    def __str__(self):
        return (f"{'x'.join(map(str, self.shape))}-{str(self.dtype)[6:]}-{'cl' if self.channels_last else 'nchw'}"
                f"-res_{self.residual}{'' if self.residual == 'none' else '_' + str(self.res_dtype)[6:]}"
                f"-{'relu' if self.relu else 'linear'}{'-dres' if self.want_residual_grad else ''}")


def _cases():
    """Every (layout, residual kind, relu) once; dtypes, shapes and residual dtypes rotate through
    them, so each layout sees every dtype, shape, and residual kind with and without d_residual."""
    cases = []
    for channels_last in (False, True):
        for residual in ("none", "identity", "bn"):
            for relu in (False, True):
                i = len(cases)
                cases.append(Case(SHAPES[i % 4], DTYPES[i % 3], DTYPES[(i // 3) % 3], channels_last, residual, relu,
                                  want_residual_grad=residual != "none" and relu != channels_last))
    return cases


CASES = _cases()


@dataclass
class Inputs:
    y: torch.Tensor
    grad_out: torch.Tensor
    residual: torch.Tensor | None
    scale: torch.Tensor
    shift: torch.Tensor
    res_scale: torch.Tensor | None
    res_shift: torch.Tensor | None
    mean: torch.Tensor
    res_mean: torch.Tensor | None
    coef: torch.Tensor
    res_coef: torch.Tensor | None


def _make_inputs(case: Case) -> Inputs:
    """Random non-zero inputs, seeded by the case id."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    c = case.shape[1]

    def act(dtype):
        return torch.randn(case.shape, generator=gen).to(DEVICE, dtype).contiguous(memory_format=fmt)

    def vec(*lead):
        return torch.randn(*lead, c, generator=gen).to(DEVICE)

    bn = case.residual == "bn"
    return Inputs(
        y=act(case.dtype), grad_out=act(case.dtype),
        residual=None if case.residual == "none" else act(case.res_dtype),
        scale=vec(), shift=vec(), res_scale=vec() if bn else None, res_shift=vec() if bn else None,
        mean=vec(), res_mean=vec() if bn else None, coef=vec(4), res_coef=vec(4) if bn else None)


def _f64(t):
    return None if t is None else t.double()


def _check_activation(got, expected, like):
    """got: a kernel output that should match `like`'s dtype and layout and fp64 `expected`."""
    assert got.dtype == like.dtype
    assert got.shape == like.shape and got.stride() == like.stride()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=RTOL[like.dtype], atol=ATOL)


def _check_channel_vector(got, expected, **tol):
    assert got.dtype == torch.float32 and got.shape == expected.shape and got.device.type == DEVICE
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, **tol)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_channel_stats(case):
    x = _make_inputs(case)
    for got, expected in zip(bn_act.channel_stats(x.y), ref.channel_stats(_f64(x.y))):
        _check_channel_vector(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_act_forward(case):
    x = _make_inputs(case)
    args = (x.y, x.scale, x.shift, x.residual, x.res_scale, x.res_shift)
    out = bn_act.act_forward(*args, case.relu)
    _check_activation(out, ref.act_forward(*map(_f64, args), case.relu), x.y)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_reduce(case):
    x = _make_inputs(case)
    args = (x.grad_out, x.y, x.scale, x.shift, x.residual, x.res_scale, x.res_shift)
    got = bn_act.backward_reduce(*args, case.relu, x.mean, x.res_mean)
    expected = ref.backward_reduce(*map(_f64, args), case.relu, _f64(x.mean), _f64(x.res_mean))
    assert (got[2] is None) == (case.residual != "bn")
    for g, e in zip(got, expected):
        if e is not None:
            _check_channel_vector(g, e, **SUM_TOL)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_apply(case):
    x = _make_inputs(case)
    args = (x.grad_out, x.y, x.scale, x.shift, x.residual, x.res_scale, x.res_shift)
    dy, dres = bn_act.backward_apply(*args, case.relu, x.coef, x.res_coef, case.want_residual_grad)
    exp_dy, exp_dres = ref.backward_apply(*map(_f64, args), case.relu, _f64(x.coef), _f64(x.res_coef),
                                          case.want_residual_grad)
    _check_activation(dy, exp_dy, x.y)
    if case.want_residual_grad:
        _check_activation(dres, exp_dres, x.residual)
    else:
        assert dres is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_small_tiles_many_programs(monkeypatch, channels_last):
    """Tiny tiles: several hw tiles per image with tails, several row tiles per reduction program,
    masked tiles past the last image, and many partials for the host-side merge."""
    monkeypatch.setattr(bn_act, "_TILE_ELEMS", 64)
    monkeypatch.setattr(bn_act, "_MIN_REDUCE_PROGRAMS", 1)
    case = Case((3, 3, 9, 11), torch.float32, torch.float16, channels_last, "bn", True, True)
    x = _make_inputs(case)
    args = (x.grad_out, x.y, x.scale, x.shift, x.residual, x.res_scale, x.res_shift)
    f64_args = tuple(map(_f64, args))
    for got, expected in zip(bn_act.channel_stats(x.y), ref.channel_stats(_f64(x.y))):
        _check_channel_vector(got, expected, rtol=1e-5, atol=1e-6)
    _check_activation(bn_act.act_forward(*args[1:], True), ref.act_forward(*f64_args[1:], True), x.y)
    got = bn_act.backward_reduce(*args, True, x.mean, x.res_mean)
    for g, e in zip(got, ref.backward_reduce(*f64_args, True, _f64(x.mean), _f64(x.res_mean))):
        _check_channel_vector(g, e, **SUM_TOL)
    dy, dres = bn_act.backward_apply(*args, True, x.coef, x.res_coef, True)
    exp_dy, exp_dres = ref.backward_apply(*f64_args, True, _f64(x.coef), _f64(x.res_coef), True)
    _check_activation(dy, exp_dy, x.y)
    _check_activation(dres, exp_dres, x.residual)


@pytest.mark.parametrize("tile_elems", [None, 64], ids=["default_tiles", "tiny_tiles"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_channel_stats_large_mean(monkeypatch, channels_last, tile_elems):
    """|mean| >> std in fp32 (mean/std = 1e3 and 3e5): naive sum / sum-of-squares loses 2% of the
    first variance and all of the second; the kernel's shifted Chan merge keeps ~1e-6."""
    if tile_elems is not None:
        monkeypatch.setattr(bn_act, "_TILE_ELEMS", tile_elems)
        monkeypatch.setattr(bn_act, "_MIN_REDUCE_PROGRAMS", 1)
    gen = torch.Generator().manual_seed(1234)
    y = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    y[:, 0] += 1000.0
    y[:, 1] = y[:, 1] * 1e-2 - 3000.0
    y = y.float().to(DEVICE)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    mean, var = bn_act.channel_stats(y)
    exp_mean, exp_var = ref.channel_stats(y.double())
    torch.testing.assert_close(mean.double(), exp_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), exp_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode,planes", [(partials.SUMS, 2), (partials.SUMS, 3), (partials.CHAN_MOMENTS, 3)],
                         ids=["sums2", "sums3", "chan"])
def test_finish_partials(mode, planes):
    """partials.finish over 37 written rows of a 40-row workspace (several row blocks; the rows past those
    written hold NaN, never read) and 20 channels (a partial channel block), as fp64 has it: the sums of each
    plane; the moments of Chan's partials (count, mean, M2) about a centre read from a strided bf16
    tensor, as channel_stats reads y's first pixel."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"finish-{mode}-{planes}".encode()))
    ws = torch.randn(planes, 40, 20, generator=gen, dtype=torch.float64)
    m = 37 * 32  # elements per channel
    if mode == partials.CHAN_MOMENTS:  # per row: (count, mean, M2 >= 0), m the counts' sum
        count = torch.randint(1, 64, (37, 1), generator=gen).double()
        ws[0, :37], ws[2], m = count, ws[2].abs(), int(count.sum())
    ws[:, 37:] = float("nan")
    centres = torch.randn(20, 3, generator=gen).to(torch.bfloat16)
    centre = centres[:, 1]  # stride 3, sliced on the device too: .to() would copy the view contiguous
    got = partials.finished(ws.float().to(DEVICE), 37, mode, count=m, centre=centres.to(DEVICE)[:, 1])
    rows, centre = ws[:, :37], centre.double()
    if mode == partials.SUMS:
        expected = rows.sum(1).unbind(0)
    else:
        count, mean_i, m2 = rows
        mean = (count * mean_i).sum(0) / m
        expected = centre + mean, (m2 + count * (mean_i - mean).square()).sum(0) / m
    assert len(got) == len(expected) and len({t.data_ptr() for t in got}) == len(got)
    for g, e in zip(got, expected):
        _check_channel_vector(g, e.to(DEVICE), rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_inputs():
    y = torch.randn(2, 3, 4, 5, device=DEVICE)
    v = torch.randn(3, device=DEVICE)
    with pytest.raises(TypeError, match="y has dtype torch.float64"):
        bn_act.channel_stats(y.double())
    with pytest.raises(TypeError, match="residual has dtype torch.float64"):
        bn_act.act_forward(y, v, v, y.double(), None, None, True)
    with pytest.raises(TypeError, match="scale must be a float32 tensor"):
        bn_act.act_forward(y, v.double(), v, None, None, None, True)
    with pytest.raises(ValueError, match="y must be contiguous NCHW or channels_last"):
        bn_act.channel_stats(y.transpose(2, 3))
    with pytest.raises(ValueError, match="residual must have y's shape"):
        bn_act.act_forward(y, v, v, y.contiguous(memory_format=torch.channels_last), None, None, True)
    with pytest.raises(ValueError, match="grad_out must have y's shape"):
        bn_act.backward_reduce(y[:1], y, v, v, None, None, None, True, v, None)
    with pytest.raises(ValueError, match="coef must be a contiguous"):
        bn_act.backward_apply(y, y, v, v, None, None, None, True, v, None, False)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with > 9 GiB free; the interpreter would take minutes")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_int64_offsets(channels_last):
    """More than 2**31 elements: the last elements of channel 1 lie past int32 offsets."""
    shape = (1, 2, 2**15, 2**15 + 8)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.ones(shape, device=DEVICE, dtype=torch.float16).contiguous(memory_format=fmt)
    y[0, 1] = 2.0
    y[0, 1, -1, -1] = 6.0
    scale = torch.tensor([1.0, 3.0], device=DEVICE)
    shift = torch.tensor([0.5, -0.5], device=DEVICE)
    out = bn_act.act_forward(y, scale, shift, None, None, None, False)
    assert out[0, 1, -1, -2].item() == 5.5 and out[0, 1, -1, -1].item() == 17.5 and out[0, 0, -1, -1].item() == 1.5
    del out
    mean, var = bn_act.channel_stats(y)
    count = shape[2] * shape[3]
    torch.testing.assert_close(mean.cpu(), torch.tensor([1.0, 2.0 + 4.0 / count]), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.cpu(), torch.tensor([0.0, 16.0 / count - 16.0 / count**2]), rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bn_act_conv2d_on_triton_runs_the_prologue_conv_and_matches_the_torch_backend(
        dtype, channels_last, monkeypatch):
    """The op's triton backend: one Triton conv applying relu(bn(y)) while loading y (forward); in
    backward (stride 2) torch's input gradient, the Triton weight gradient recomputing the prologue and
    the Triton BN stages."""
    from fusedres.ops import functional
    from fusedres.triton import conv

    calls = []
    original = conv.conv2d_fused
    monkeypatch.setattr(conv, "conv2d_fused", lambda *a, **k: calls.append(k) or original(*a, **k))
    gen = torch.Generator().manual_seed(31)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = (torch.randn(2, 6, 7, 5, generator=gen) + 0.3).to(DEVICE, dtype).contiguous(memory_format=fmt)
    weight, bias = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    conv_weight = (torch.randn(5, 6, 3, 3, generator=gen) / 6).to(DEVICE, dtype)
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (y, weight, bias, conv_weight)]
        pending = functional.batch_norm_stats(leaves[0], leaves[1], leaves[2], None, None,
                                              batch_stats=True, momentum=0.1, eps=1e-5)
        out = functional.bn_act_conv2d(pending, leaves[3], None, 2, 1, backend=backend)
        out.float().square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    assert len(calls) == 1 and calls[0]["in_scale"] is not None  # the triton run's forward
    assert results[0][0].is_contiguous(memory_format=fmt)
    for name, actual, expected in zip(["out", "dy", "dweight", "dbias", "dconv_weight"], *results):
        # whole-tensor relative error: the sums behind the gradients round in bf16 storage
        actual, expected = actual.detach().double(), expected.detach().double()
        error = float((actual - expected).norm() / expected.norm())
        assert error <= _conv_rtol(dtype), f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_conv_batch_statistics_do_not_depend_on_the_running_mean(channels_last, monkeypatch):
    """The Triton conv's batch statistics are y's alone, whatever the running mean: one ~3000 of the batch's
    standard deviations away (the conv's sums about it made the mean only as exact as ulp(|y - running_mean|),
    so a constant channel, variance 0 and invstd 1/sqrt(eps), came out of the BatchNorm ~0.04 off, where eager
    gives 0), inf or NaN, or none. The mean to y's precision, the constant channel's output ~0."""
    from fusedres.ops import functional
    from fusedres.triton import conv

    stats_calls = []  # the Triton conv computing the statistics, at each of the three calls
    conv_fused = conv.conv2d_fused
    monkeypatch.setattr(conv, "conv2d_fused", lambda *a, **k: stats_calls.append(k["compute_stats"])
                        or conv_fused(*a, **k))
    gen = torch.Generator().manual_seed(41)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 7, 5, generator=gen).to(DEVICE).contiguous(memory_format=fmt)
    conv_weight = torch.randn(6, 8, 3, 3, generator=gen) / 8
    conv_weight[2] = 0  # channel 2 of y is its conv bias alone
    conv_weight, conv_bias = conv_weight.to(DEVICE), (torch.randn(6, generator=gen) + 0.5).to(DEVICE)
    far = torch.full((6,), 3000.0)
    non_finite = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 1.0, 2.0])
    results = []
    for running_mean in (None, far, non_finite):
        running = (None, None) if running_mean is None else (running_mean.to(DEVICE), torch.ones(6, device=DEVICE))
        pending = functional.conv_batch_norm_stats(
            x, conv_weight, conv_bias, 1, 1, 1, 1, None, None, *running, batch_stats=True, momentum=0.1,
            eps=1e-5, backend="triton")
        results.append((pending.mean, pending.invstd, functional.bn_act(pending, relu=False, backend="triton")))
    assert stats_calls == [True] * 3
    mean, invstd, out = results[0]
    for other in results[1:]:  # the statistics do not read the running mean
        assert torch.equal(other[0], mean) and torch.equal(other[1], invstd) and torch.equal(other[2], out)
    y = pending.y.double()
    want = y.mean((0, 2, 3))
    assert ((mean.double() - want).abs() <= 1e-6 * want.abs() + 1e-7 * y.std((0, 2, 3))).all(), (mean, want)
    assert out[:, 2].abs().max() <= 1e-3, out[:, 2].abs().max()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("source", ["tensor", "pending"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["f32-nchw", "bf16-cl"])
def test_conv_batch_norm_stats_on_triton_is_one_launch_and_matches_the_torch_backend(
        source, dtype, channels_last, stride, monkeypatch):
    """A training unit on the triton backend: the Triton conv (with the pending BatchNorm's
    prologue) computes the next BatchNorm's statistics as it stores its output, and no statistics
    pass reads the conv output. In backward the Triton weight gradient
    recomputes the prologue, and with a prologue the Triton input gradient (stride 2: one launch per phase)
    applies the ReLU mask and takes BatchNorm's sums (no reduction pass for the source BatchNorm). Outputs, gradients
    and running statistics are as close to the fp64 computation as the torch backend's in the same dtype."""
    from fusedres.ops import functional
    from fusedres.triton import conv, conv_dgrad, conv_wgrad

    conv_calls, stats_calls, backward_calls = [], [], []
    conv_fused, channel_stats = conv.conv2d_fused, bn_act.channel_stats
    monkeypatch.setattr(conv, "conv2d_fused", lambda *a, **k: conv_calls.append(k) or conv_fused(*a, **k))
    monkeypatch.setattr(bn_act, "channel_stats", lambda y: stats_calls.append(y.shape) or channel_stats(y))
    for module, name in ((conv_dgrad, "conv2d_input_grad"), (conv_wgrad, "conv2d_weight_grad"),
                         (bn_act, "backward_reduce")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, original=original, name=name, **k: (
            backward_calls.append((name, k.get("in_scale") is not None)) or original(*a, **k)))
    gen = torch.Generator().manual_seed(32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, 6, 7, 5, generator=gen) + 0.3).to(DEVICE, dtype).contiguous(memory_format=fmt)
    params = [torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen),  # source BN
              (torch.randn(5, 6, 3, 3, generator=gen) / 6).to(dtype),  # conv
              torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)]  # the conv's BN
    running = (torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5)
    results = []
    for backend, run_dtype in (("triton", dtype), ("torch", dtype), ("torch", torch.float64)):
        fp64 = run_dtype == torch.float64  # everything in fp64, as torch takes a fp64 BatchNorm
        leaves = [t.detach().clone().to(DEVICE, run_dtype if t.dtype == dtype or fp64 else None).requires_grad_()
                  for t in [x] + params]
        stats = [t.clone().to(DEVICE, torch.float64 if fp64 else None) for t in running]
        first = leaves[0]
        if source == "pending":
            first = functional.batch_norm_stats(leaves[0], leaves[1], leaves[2], None, None,
                                                batch_stats=True, momentum=0.1, eps=1e-5, backend=backend)
        pending = functional.conv_batch_norm_stats(
            first, leaves[3], None, stride, 1, 1, 1, leaves[4], leaves[5], *stats, batch_stats=True,
            momentum=0.1, eps=1e-5, backend=backend)
        out = functional.bn_act(pending, relu=True, backend=backend)
        out.float().square().sum().backward()
        grads = [t.grad for t in leaves if t.grad is not None]
        results.append([out, pending.mean, pending.invstd, *stats, *grads])
    (call,) = conv_calls  # the triton run's forward
    assert call["compute_stats"] and (call["in_scale"] is not None) == (source == "pending")
    assert stats_calls == ([(2, 6, 7, 5)] if source == "pending" else [])  # x's statistics only
    assert sorted(backward_calls) == sorted(
        [("backward_reduce", False), ("conv2d_weight_grad", source == "pending")]  # the output bn_act's reduce
        + [("conv2d_input_grad", True)] * (source == "pending"))
    assert results[0][0].is_contiguous(memory_format=fmt)
    names = ["out", "mean", "invstd", "running_mean", "running_var", "dx", "d_params..."]
    # The interpreter rounds fp32 -> bf16 by truncation: the prologue's result and the stored output each
    # move towards 0 by up to one ulp (2**-8 relative), a bias round-to-nearest does not have, which the
    # statistics inherit.
    bias = RTOL[torch.float32]
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        bias = 2.0**-7
    elif dtype == torch.float32:
        bias = _conv_rtol(dtype)  # on a GPU, fp32 may run as TF32
    for i, (actual, same_dtype, exact) in enumerate(zip(*results)):
        exact = exact.detach()
        errors = [float((t.detach().double() - exact).norm() / exact.norm()) for t in (actual, same_dtype)]
        assert errors[0] <= 2 * errors[1] + bias, (
            f"{names[min(i, 6)]} ({i}): relative error {errors[0]:.3g}, the torch backend's {errors[1]:.3g}")


def test_which_conv_runs_a_unit(monkeypatch):
    """The triton backend takes the Triton conv wherever it runs the call; cuda and torch take
    cuDNN's; "auto" measures only on CUDA tensors (never the interpreter); FUSEDRES_BACKEND stands
    in for "auto"."""
    from fusedres.ops import unit_conv

    def choice(backend, *, bias=False, stats=True, dtype=torch.float32):
        y = torch.randn(2, 16, 5, 5, device=DEVICE)
        weight = torch.randn(8, 16, 3, 3, device=DEVICE, dtype=dtype)
        conv_bias = torch.randn(8, device=DEVICE) if bias else None
        return unit_conv._conv_implementation(backend, y, weight, conv_bias, ([1, 1], [1, 1], [1, 1], 1),
                                              True, True, stats, run=None)

    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    assert choice("triton") == "triton"
    assert choice("triton", bias=True, stats=False) == "triton"
    assert choice("triton", bias=True) == "triton"  # a conv bias before the statistics
    assert choice("triton", dtype=torch.float16) == "cudnn"  # input and weight dtypes differ
    assert choice("cuda") == choice("torch") == "cudnn"
    if DEVICE == "cpu":
        assert choice("auto") == "cudnn"
        monkeypatch.setenv("FUSEDRES_BACKEND", "triton")
        assert choice("auto") == "triton"
