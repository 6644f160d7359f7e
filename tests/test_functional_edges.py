"""The functional API on the edges of its input, on CPU, against eager torch: float64 under autocast, running
statistics that torch's BatchNorm would refuse (rejected before anything runs or changes), conv arguments out
of range, 0 channels and empty batches."""

import pytest
import torch
import torch.nn.functional as F

from fusedres.ops import functional, torch_backend
from op_helpers import EPS, F32, F64, positive, randn

MOMENTUM = 0.1


def stats(y, running_mean, running_var, weight=None, bias=None):
    return functional.batch_norm_stats(y, weight, bias, running_mean, running_var, batch_stats=True,
                                       momentum=MOMENTUM, eps=EPS)


def conv_stats(x, conv_weight, running_mean, running_var, weight=None, bias=None, batch_stats=True, **conv):
    conv = {"stride": 1, "padding": 1, "dilation": 1, **conv}
    return functional.conv_batch_norm_stats(x, conv_weight, None, conv["stride"], conv["padding"],
                                            conv["dilation"], 1, weight, bias, running_mean, running_var,
                                            batch_stats=batch_stats, momentum=MOMENTUM, eps=EPS)


def torch_message(fn) -> str:
    with pytest.raises(Exception) as raised:
        fn()
    return str(raised.value)


# --------------------------------------------------------------------------- float64 under autocast
def test_float64_unit_under_autocast_runs_in_float64_as_eager():
    """Autocast leaves float64 operands alone: two training units and their BatchNorms in float64, as eager."""
    gen = torch.Generator().manual_seed(1)
    x = randn(gen, 2, 3, 5, 5, requires_grad=True)
    w1, w2 = randn(gen, 4, 3, 3, 3, requires_grad=True), randn(gen, 4, 4, 3, 3, requires_grad=True)
    gamma, beta = positive(gen, 4, requires_grad=True), randn(gen, 4, requires_grad=True)
    ours_stats = [(torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)) for _ in range(2)]
    eager_stats = [(rm.clone(), rv.clone()) for rm, rv in ours_stats]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p1 = conv_stats(x, w1, *ours_stats[0], gamma, beta)
        p2 = conv_stats(p1, w2, *ours_stats[1], gamma, beta)
        ours = functional.bn_act(p2)
        a1 = F.relu(F.batch_norm(F.conv2d(x, w1, padding=1), *eager_stats[0], gamma, beta, True, MOMENTUM, EPS))
        eager = F.relu(F.batch_norm(F.conv2d(a1, w2, padding=1), *eager_stats[1], gamma, beta, True, MOMENTUM, EPS))
    assert p1.y.dtype == p2.y.dtype == ours.dtype == eager.dtype == F64
    torch.testing.assert_close(ours, eager, rtol=1e-12, atol=1e-12)
    for (rm, rv), (erm, erv) in zip(ours_stats, eager_stats):
        torch.testing.assert_close(rm, erm, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rv, erv, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(ours.square().sum(), (x, w1, w2, gamma, beta))
    expected = torch.autograd.grad(eager.square().sum(), (x, w1, w2, gamma, beta))
    for got, want in zip(grads, expected):
        assert got.dtype == F64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float64_input_with_a_float32_weight_under_autocast_raises_as_eager():
    """Autocast casts the float32 weight and leaves the float64 input: eager's conv refuses the pair."""
    gen = torch.Generator().manual_seed(2)
    x, w = randn(gen, 2, 3, 5, 5), randn(gen, 4, 3, 3, 3, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            F.conv2d(x, w, padding=1)
        with pytest.raises(RuntimeError, match=r"input type \(torch.float64\) and weight type "
                                               r"\(torch.bfloat16\) should be the same"):
            conv_stats(x, w, None, None)


# --------------------------------------------------------------------------- running statistics
@pytest.fixture
def no_kernels(monkeypatch):
    """Any kernel that reads or updates statistics running fails the test: errors must come before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for name in ("channel_stats", "finish_batch_stats"):
        monkeypatch.setattr(torch_backend, name, forbidden)
    monkeypatch.setattr(functional.unit_conv, "conv2d_stats", forbidden)


BAD_RUNNING_STATS = {
    # name: (which buffer, how it is made from a good one, the error's text, whether torch refuses it too)
    "long": ("running_var", lambda t: t.long(), r"input type \(torch.float32\) and running_var type "
             r"\(torch.int64\) should be the same$", True),
    "float64": ("running_mean", lambda t: t.double(), r"input type \(torch.float32\) and running_mean type "
                r"\(torch.float64\) should be the same$", True),
    "float16": ("running_var", lambda t: t.half(), r"input type \(torch.float32\) and running_var type "
                r"\(torch.float16\) should be the same$", True),
    "2d": ("running_mean", lambda t: t[None], r"expected running_mean to be a 1D tensor of size \(3,\), got size "
           r"\(1, 3\)", True),
    "requires_grad": ("running_var", lambda t: t.requires_grad_(), "not differentiable with respect to "
                      "running_var; it cannot have requires_grad=True", True),
    # torch writes every channel's update into the one element; rejected here, before anything is updated.
    "expanded": ("running_var", lambda t: t[:1].expand(3), "running_var is updated in place, but more than one "
                 "of its elements refers to a single memory location", False),
}


@pytest.mark.parametrize("call", ["batch_norm_stats", "conv_batch_norm_stats"])
@pytest.mark.parametrize("bad", list(BAD_RUNNING_STATS))
def test_a_running_statistic_torch_cannot_update_raises_before_either_changes(call, bad, no_kernels):
    gen = torch.Generator().manual_seed(3)
    name, make, message, torch_refuses = BAD_RUNNING_STATS[bad]
    y = randn(gen, 2, 3, 4, 4, dtype=F32)
    buffers = {"running_mean": randn(gen, 3, dtype=F32), "running_var": positive(gen, 3, dtype=F32)}
    buffers[name] = make(buffers[name])
    before = {key: t.detach().clone() for key, t in buffers.items()}
    if torch_refuses:
        with pytest.raises(RuntimeError):
            F.batch_norm(y, buffers["running_mean"], buffers["running_var"], training=True)
    with pytest.raises(RuntimeError, match=message):
        if call == "batch_norm_stats":
            stats(y, buffers["running_mean"], buffers["running_var"])
        else:
            conv_stats(y, randn(gen, 3, 3, 1, 1, dtype=F32), buffers["running_mean"], buffers["running_var"],
                       padding=0)
    for key, t in buffers.items():
        assert torch.equal(t, before[key]), f"{key} changed"


def test_a_weight_torch_refuses_raises():
    gen = torch.Generator().manual_seed(4)
    y = randn(gen, 2, 3, 4, 4, dtype=F32)
    with pytest.raises(RuntimeError):
        F.batch_norm(y, None, None, torch.ones(3, dtype=torch.long), training=True)
    with pytest.raises(RuntimeError, match=r"input type \(torch.float32\) and weight type \(torch.int64\) "
                                           "should be the same$"):
        stats(y, None, None, torch.ones(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"input type \(torch.float16\) and bias type \(torch.float64\) "
                                           r"should be the same \(or bias type torch.float32\)$"):
        stats(y.half(), None, None, None, torch.zeros(3, dtype=F64))


# (rtol, atol) of a running statistic stored in each dtype: a few units in its last place (torch's CPU kernel
# updates bf16 buffers in bf16, rounding at each step), measured at most a quarter of these (fp16, bf16) or a
# fortieth. At momentum 0.9 the variance's unbiasing (M / (M - 1), M = 32 values per channel) moves the running
# variance by 2.7% or more, far outside every one but bf16's, so a biased variance fails the fp64, fp32 and fp16
# cases.
RUNNING_STAT_TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), F32: (1e-5, 1e-6),
                    F64: (1e-12, 1e-12)}


@pytest.mark.parametrize("dtype, stat_dtype", [(torch.float16, torch.float16), (torch.float16, F32),
                                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, F32), (F64, F64)])
def test_running_statistics_in_every_dtype_torch_takes_are_updated_as_torch_does(dtype, stat_dtype):
    gen = torch.Generator().manual_seed(5)
    y = randn(gen, 2, 3, 4, 4, dtype=dtype)
    ours = (randn(gen, 3, dtype=stat_dtype), positive(gen, 3, dtype=stat_dtype))
    eager = tuple(t.clone() for t in ours)
    functional.batch_norm_stats(y, None, None, *ours, batch_stats=True, momentum=0.9, eps=EPS)
    F.batch_norm(y, *eager, training=True, momentum=0.9, eps=EPS)
    rtol, atol = RUNNING_STAT_TOL[stat_dtype]
    for name, got, want in zip(("running_mean", "running_var"), ours, eager):
        assert got.dtype == stat_dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- conv arguments
@pytest.mark.parametrize("conv", [{"stride": 0}, {"stride": (1, -1)}, {"dilation": 0}, {"padding": (0, -1)}])
@pytest.mark.parametrize("call", ["batch statistics", "running statistics", "bn_act_conv2d"])
def test_conv_arguments_out_of_range_raise_as_f_conv2d(conv, call):
    gen = torch.Generator().manual_seed(6)
    x, w = randn(gen, 2, 3, 5, 5, dtype=F32), randn(gen, 4, 3, 3, 3, dtype=F32)
    expected = torch_message(lambda: F.conv2d(x, w, None, **{"stride": 1, "padding": 1, **conv}))
    assert expected.endswith("is not supported")
    with pytest.raises(RuntimeError, match=expected):
        if call == "bn_act_conv2d":
            pending = functional.batch_norm_stats(x, None, None, None, None, batch_stats=True, momentum=MOMENTUM,
                                                  eps=EPS)
            functional.bn_act_conv2d(pending, w, **{"padding": 1, **conv})
        else:
            conv_stats(x, w, torch.zeros(4), torch.ones(4), batch_stats=call == "batch statistics", **conv)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_conv_bias_of_another_dtype_raises_as_f_conv2d(backend):
    """The triton backend cast a float64 bias to the float32 unit's dtype where F.conv2d (and the torch backend)
    refuses it."""
    gen = torch.Generator().manual_seed(7)
    x, w, b = randn(gen, 2, 3, 5, 5, dtype=F32), randn(gen, 4, 3, 3, 3, dtype=F32), randn(gen, 4)
    expected = torch_message(lambda: F.conv2d(x, w, b, padding=1))
    assert "bias type" in expected
    with pytest.raises(RuntimeError, match=r"input type \(torch.float32\) and bias type \(torch.float64\)"):
        functional.conv_batch_norm_stats(x, w, b, 1, 1, 1, 1, None, None, None, None, batch_stats=True,
                                         momentum=MOMENTUM, eps=EPS, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_float64_residual_of_a_float32_unit_is_added_alike_on_every_backend(backend):
    """bn_act's result has y's dtype; a float64 residual (which no kernel reads: the triton backend raised
    TypeError) is added in fp32, as eager's sum rounded to float32, its gradient float64."""
    gen = torch.Generator().manual_seed(8)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # interpreted only without CUDA
    y = randn(gen, 2, 3, 5, 5, dtype=F32).to(device)
    residual = randn(gen, 2, 3, 5, 5).to(device).requires_grad_()
    pending = functional.batch_norm_stats(y, None, None, None, None, batch_stats=True, momentum=MOMENTUM, eps=EPS,
                                          backend=backend)
    out = functional.bn_act(pending, residual, backend=backend)
    expected = (F.batch_norm(y.double(), None, None, training=True, eps=EPS) + residual).relu()
    assert out.dtype == F32
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(out, residual, torch.ones_like(out))
    assert grad.dtype == F64
    torch.testing.assert_close(grad, (expected > 0).double())


# --------------------------------------------------------------------------- 0 channels, empty batches
@pytest.mark.parametrize("batch_stats", [False, True])
def test_zero_channels_forward_and_backward_as_torch(batch_stats):
    """Without weight and bias: torch's empty-input path indexes them, and raises for 0 channels."""
    y = torch.randn(2, 0, 4, 4, dtype=F64, requires_grad=True)
    running = (torch.zeros(0, dtype=F64), torch.ones(0, dtype=F64))
    out = functional.bn_act(functional.batch_norm_stats(y, None, None, *running, batch_stats=batch_stats,
                                                        momentum=MOMENTUM, eps=EPS))
    eager = F.relu(F.batch_norm(y, *running, training=batch_stats))
    assert out.shape == eager.shape and out.dtype == eager.dtype
    (grad,), (expected,) = torch.autograd.grad(out.sum(), y), torch.autograd.grad(eager.sum(), y)
    assert grad.shape == expected.shape == y.shape and grad.dtype == expected.dtype


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_an_empty_batch_with_batch_statistics_is_what_f_batch_norm_makes_of_it(shape):
    """F.batch_norm returns an empty output, leaves the running statistics alone and gives weight and bias zero
    gradients; so do the fused ops, also for a conv's empty output and the unit that consumes it."""
    gen = torch.Generator().manual_seed(7)
    y = randn(gen, *shape, requires_grad=True)
    weight, bias = positive(gen, 3, requires_grad=True), randn(gen, 3, requires_grad=True)
    running = (randn(gen, 3), positive(gen, 3))
    before = tuple(t.clone() for t in running)
    eager = F.relu(F.batch_norm(y, *(t.clone() for t in running), weight, bias, True, MOMENTUM, EPS))
    out = functional.bn_act(stats(y, *running, weight, bias))
    assert out.shape == eager.shape == y.shape and out.dtype == eager.dtype
    assert all(torch.equal(t, b) for t, b in zip(running, before))
    grads = torch.autograd.grad(out.sum(), (y, weight, bias))
    expected = torch.autograd.grad(eager.sum(), (y, weight, bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    w1, w2 = randn(gen, 3, 3, 3, 3, requires_grad=True), randn(gen, 3, 3, 1, 1, requires_grad=True)
    if shape[2] == 0:
        return  # a conv with padding 1 would give the empty rows an output; the 1x1 conv keeps none
    pending = conv_stats(y, w1, *running, weight, bias)
    unit = functional.bn_act(conv_stats(pending, w2, *running, weight, bias, padding=0))
    eager_running = tuple(t.clone() for t in running)
    a1 = F.relu(F.batch_norm(F.conv2d(y, w1, padding=1), *eager_running, weight, bias, True, MOMENTUM, EPS))
    eager_unit = F.relu(F.batch_norm(F.conv2d(a1, w2), *eager_running, weight, bias, True, MOMENTUM, EPS))
    assert unit.shape == eager_unit.shape and unit.dtype == eager_unit.dtype
    assert all(torch.equal(t, b) for t, b in zip(running, before))
    grads = torch.autograd.grad(unit.sum(), (y, w1, w2, weight, bias))
    expected = torch.autograd.grad(eager_unit.sum(), (y, w1, w2, weight, bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- arguments of the wrong type
def _bad_type_calls(gen):
    """{what: (call, the message it must raise)} for arguments of a wrong type: each a TypeError naming it."""
    from fusedres.ops import inference

    y, w = randn(gen, 2, 4, 6, 6), randn(gen, 4, 4, 3, 3)
    pending = stats(y, None, None)
    return {
        "momentum None": (lambda: functional.batch_norm_stats(
            y, None, None, None, None, batch_stats=True, momentum=None, eps=EPS),
         "batch_norm_stats: expected momentum to be a float, got None"),
        "eps a string": (lambda: functional.conv_batch_norm_stats(
            y, w, None, 1, 1, 1, 1, None, None, None, None, batch_stats=True, momentum=0.1, eps="1e-5"),
         "conv_batch_norm_stats: expected eps to be a float, got '1e-5'"),
        "a float stride": (lambda: conv_stats(y, w, None, None, stride=1.5),
         r"expected stride to be an int or a pair of ints, got 1.5"),
        "a float in padding": (lambda: conv_stats(y, w, None, None, padding=(1, 1.0)),
         r"expected padding to be an int or a pair of ints, got \(1, 1.0\)"),
        "a float groups": (lambda: functional.bn_act_conv2d(pending, w, groups=1.0),
         "bn_act_conv2d: expected groups to be an int, got 1.0"),
        "a float groups (inference)": (lambda: inference.conv_bias_act(y, w[:, :2], groups=2.0),
         "conv_bias_act: expected groups to be an int, got 2.0"),
        "no conv weight": (lambda: functional.bn_act_conv2d(pending, None),
         "bn_act_conv2d: expected conv_weight to be a Tensor, got NoneType"),
        "no pending BatchNorm": (lambda: functional.bn_act(y),
         r"bn_act: expected a PendingBN \(from batch_norm_stats or conv_batch_norm_stats\), got Tensor"),
        "no pending BatchNorm before a conv": (lambda: functional.bn_act_conv2d(None, w),
         "bn_act_conv2d: expected a PendingBN"),
        "an integer weight to fold": (lambda: inference.fold_batch_norm(
            w.long(), None, y[0, :, 0, 0], y[1, :, 0, 0].abs(), None, None, EPS),
         "fold_batch_norm: expected conv_weight to be of a floating dtype, got torch.int64"),
        "an integer fold": (lambda: inference.fold_batch_norm(
            w, None, y[0, :, 0, 0], y[1, :, 0, 0].abs(), None, None, EPS, dtype=torch.int32),
         "fold_batch_norm: expected dtype to be of a floating dtype, got torch.int32"),
    }


_BAD_TYPES = ("momentum None", "eps a string", "a float stride", "a float in padding", "a float groups",
              "a float groups (inference)", "no conv weight", "no pending BatchNorm",
              "no pending BatchNorm before a conv", "an integer weight to fold", "an integer fold")


@pytest.mark.parametrize("case", _BAD_TYPES)
def test_an_argument_of_a_wrong_type_raises_a_type_error_naming_it(case):
    """Where these raised an error naming something else (struct.error for momentum=None, "'float' object is not
    iterable", "groups=2.0 must divide ...", AttributeError on None) or, folding an integer weight, returned a
    truncated fold."""
    calls = _bad_type_calls(torch.Generator().manual_seed(5))
    assert set(calls) == set(_BAD_TYPES)
    call, message = calls[case]
    with pytest.raises(TypeError, match=message):
        call()


def test_integer_conv_arguments_of_other_integer_types_are_taken():
    """numpy integers are integers, as F.conv2d takes them."""
    import numpy as np

    gen = torch.Generator().manual_seed(6)
    y, w = randn(gen, 2, 4, 6, 6), randn(gen, 4, 4, 3, 3)
    pending = stats(y, None, None)
    out = functional.bn_act_conv2d(pending, w, None, np.int64(1), (np.int32(1), 1), 1, np.int64(1))
    torch.testing.assert_close(out, F.conv2d(functional.bn_act(pending), w, padding=1))


@pytest.mark.parametrize("momentum", [torch.tensor(0.25), True, 1], ids=["0-dim tensor", "bool", "int"])
def test_a_momentum_f_batch_norm_takes_is_taken(momentum):
    """A 0-dim tensor, a bool or an int momentum (nn.BatchNorm2d.momentum set to a tensor, say) as F.batch_norm
    takes it: the running statistics as eager's."""
    gen = torch.Generator().manual_seed(7)
    y = randn(gen, 3, 4, 5, 5)
    ours, eager = ([torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)] for _ in range(2))
    functional.batch_norm_stats(y, None, None, *ours, batch_stats=True, momentum=momentum, eps=EPS)
    F.batch_norm(y, *eager, training=True, momentum=momentum, eps=EPS)
    for got, want in zip(ours, eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_stats, eps", [(True, 0.0), (True, -1e-5), (False, -1e-5)])
def test_an_eps_f_batch_norm_refuses_raises_its_error_before_anything_changes(batch_stats, eps):
    """eps <= 0 with batch statistics, < 0 with running ones: F.batch_norm's ValueError (torch 2.14's; torch 2.11
    refuses these too, in other words, and eps 0 with running statistics as well), from both statistics ops and from
    fold_batch_norm, with the running statistics left as they were."""
    from fusedres.ops.inference import fold_batch_norm
    gen = torch.Generator().manual_seed(5)
    y = randn(gen, 2, 3, 4, 4, dtype=F32)
    mean, var = randn(gen, 3, dtype=F32), positive(gen, 3, dtype=F32)
    before = (mean.clone(), var.clone())
    assert "eps must be" in torch_message(lambda: F.batch_norm(y, mean, var, training=batch_stats, eps=eps))
    message = (f"batch_norm eps must be {'positive during training' if batch_stats else 'non-negative'}, "
               f"but got {eps}")
    calls = [lambda: functional.batch_norm_stats(y, None, None, mean, var, batch_stats=batch_stats,
                                                 momentum=MOMENTUM, eps=eps),
             lambda: functional.conv_batch_norm_stats(y, randn(gen, 3, 3, 1, 1, dtype=F32), None, 1, 0, 1, 1, None,
                                                      None, mean, var, batch_stats=batch_stats, momentum=MOMENTUM,
                                                      eps=eps)]
    if not batch_stats:
        calls.append(lambda: fold_batch_norm(randn(gen, 3, 3, 1, 1, dtype=F32), None, mean, var, None, None, eps))
    for call in calls:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
