"""The fused ops (``torch.ops.fusedres.*``) and their functional API, on CPU.

- the functional ops composed into BasicBlock / Bottleneck match ``fusedres.reference``
  (outputs, input and parameter gradients, running statistics);
- ``torch.library.opcheck`` on every op (schema, autograd registration, fake kernel,
  AOT dispatch);
- ``gradcheck`` in fp64 through batch_norm_stats -> bn_act / bn_act_conv2d, and
  conv_batch_norm_stats -> bn_act;
- ``torch.compile(fullgraph=True)`` of compositions, forward and backward;

Input validation, backend selection and the memory and kernel contracts are in
test_op_contracts.py.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from fusedres import reference
from fusedres.ops import functional
from op_helpers import (EPS, F32, F64, assert_close, compare_modules, fused_basic_block,
                        fused_bottleneck, make_block, positive, randn, stats_of)


COMPOSE_CASES = [
    # id, kind, dtype, channels_last, eval, inplanes, planes, stride, downsample, bn, mem_eff
    ("basic-f64-nchw-train-down-s2", "basic", F64, False, False, 12, 20, 2, True, "momentum", True),
    ("basic-f32-cl-train-identity-materialised", "basic", F32, True, False, 12, 12, 1, False,
     "momentum", False),
    ("basic-f64-cl-eval-identity", "basic", F64, True, True, 12, 12, 1, False, "momentum", True),
    ("basic-f32-nchw-eval-down-s2", "basic", F32, False, True, 12, 20, 2, True, "momentum", True),
    ("basic-f64-nchw-train-down-cumulative", "basic", F64, False, False, 12, 20, 1, True,
     "cumulative", True),
    ("bottleneck-f64-cl-train-down-s2", "bottleneck", F64, True, False, 12, 5, 2, True, "momentum",
     True),
    ("bottleneck-f32-nchw-train-identity", "bottleneck", F32, False, False, 20, 5, 1, False,
     "momentum", True),
    ("bottleneck-f64-nchw-eval-down-materialised", "bottleneck", F64, False, True, 12, 5, 1, True,
     "momentum", False),
    ("bottleneck-f32-cl-eval-identity", "bottleneck", F32, True, True, 20, 5, 1, False, "momentum",
     True),
    ("bottleneck-f64-cl-train-down-noaffine", "bottleneck", F64, True, False, 12, 5, 2, True,
     "no_affine", True),
    ("bottleneck-f64-nchw-train-identity-untracked", "bottleneck", F64, False, False, 20, 5, 1,
     False, "untracked", True),
    ("bottleneck-f64-cl-eval-identity-untracked", "bottleneck", F64, True, True, 20, 5, 1,
     False, "untracked", True),
]


@pytest.mark.parametrize(
    "kind,dtype,channels_last,eval_mode,inplanes,planes,stride,downsample,bn,memory_efficient",
    [c[1:] for c in COMPOSE_CASES], ids=[c[0] for c in COMPOSE_CASES])
def test_functional_blocks_match_reference(kind, dtype, channels_last, eval_mode, inplanes, planes,
                                           stride, downsample, bn, memory_efficient):
    block = make_block(kind, inplanes, planes, stride, downsample, dtype, bn, eval_mode, seed=3)
    ref_block = copy.deepcopy(block)
    fused = fused_basic_block if kind == "basic" else fused_bottleneck
    ref_fn = reference.basic_block if kind == "basic" else reference.bottleneck
    gen = torch.Generator().manual_seed(17)
    for step in range(2):
        x = randn(gen, 3, inplanes, 7, 9, dtype=dtype, channels_last=channels_last,
                  requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out = fused(x, block, memory_efficient)
        out_ref = ref_fn(x_ref, ref_block)
        assert out.dtype == dtype and out.shape == out_ref.shape
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
        else:
            assert out.is_contiguous()
        assert_close(out, out_ref, dtype, f"step {step}: output")
        g = randn(gen, *out.shape, dtype=dtype, channels_last=channels_last)
        out.backward(g)
        out_ref.backward(g)
        assert_close(x.grad, x_ref.grad, dtype, f"step {step}: input grad")
        compare_modules(block, ref_block, dtype, step)


# --------------------------------------------------------------------------- op arguments
def bn_act_args(gen, *, residual=None, relu=True, affine=True, batch_stats=True, dtype=F64,
                channels_last=False, grad=True, sc_affine=True):
    """Positional args of torch.ops.fusedres.bn_act; residual is None, 'identity' or 'bn'."""
    shape = (2, 3, 4, 5)
    y = randn(gen, *shape, dtype=dtype, channels_last=channels_last, requires_grad=grad)
    mean, invstd = stats_of(y, batch_stats, gen)
    w = positive(gen, 3, dtype=dtype, requires_grad=grad) if affine else None
    b = randn(gen, 3, dtype=dtype, requires_grad=grad) if affine else None
    identity = None
    if residual == "identity":
        identity = randn(gen, *shape, dtype=dtype, channels_last=channels_last, requires_grad=grad)
    sc_args = [None] * 5
    if residual == "bn":
        sc_y = randn(gen, *shape, dtype=dtype, channels_last=channels_last, requires_grad=grad)
        sc_mean, sc_invstd = stats_of(sc_y, batch_stats, gen)
        sc_w = positive(gen, 3, dtype=dtype, requires_grad=grad) if sc_affine else None
        sc_b = randn(gen, 3, dtype=dtype, requires_grad=grad) if sc_affine else None
        sc_args = [sc_y, sc_mean, sc_invstd, sc_w, sc_b]
    return (y, mean, invstd, w, b, identity, *sc_args, batch_stats, relu, "auto")


BN_ACT_CASES = {
    "identity-relu": dict(residual="identity"),
    "identity-norelu": dict(residual="identity", relu=False),
    "shortcut-relu": dict(residual="bn"),
    "shortcut-norelu-noaffine": dict(residual="bn", relu=False, affine=False, sc_affine=False),
    "noresidual-relu-noaffine": dict(affine=False),
    "noresidual-norelu": dict(relu=False),
    "eval-identity-relu": dict(residual="identity", batch_stats=False),
    "eval-shortcut-relu": dict(residual="bn", batch_stats=False),
    "f32-cl-shortcut-relu": dict(residual="bn", dtype=F32, channels_last=True),
}


@pytest.mark.parametrize("case", list(BN_ACT_CASES), ids=list(BN_ACT_CASES))
def test_opcheck_bn_act(case):
    gen = torch.Generator().manual_seed(101)
    args = bn_act_args(gen, **BN_ACT_CASES[case])
    torch.library.opcheck(torch.ops.fusedres.bn_act.default, args)


BN_ACT_BACKWARD_CASES = {
    "identity-relu-want-res": (dict(residual="identity"), True),
    "identity-relu-no-res-grad": (dict(residual="identity"), False),
    "identity-norelu-want-res": (dict(residual="identity", relu=False), True),
    "shortcut-relu": (dict(residual="bn"), False),
    "shortcut-norelu-noaffine": (dict(residual="bn", relu=False, affine=False, sc_affine=False),
                                 False),
    "noresidual-relu-noaffine": (dict(affine=False), False),
    "eval-identity-relu": (dict(residual="identity", batch_stats=False), True),
    "f32-cl-shortcut-relu": (dict(residual="bn", dtype=F32, channels_last=True), False),
    # autograd hands the op whatever gradient layout the caller used
    "cl-y-nchw-grad-identity-relu": (dict(residual="identity", channels_last=True), True),
}


def bn_act_backward_args(case):
    """(grad_out, bn_act's 11 tensors, batch_stats, relu, backend, want_residual_grad)."""
    kwargs, want_residual_grad = BN_ACT_BACKWARD_CASES[case]
    gen = torch.Generator().manual_seed(202)
    args = bn_act_args(gen, grad=False, **kwargs)
    y = args[0]
    grad_layout = kwargs.get("channels_last", False) and "nchw-grad" not in case
    grad_out = randn(gen, *y.shape, dtype=y.dtype, channels_last=grad_layout)
    return grad_out, args[:11], *args[11:], want_residual_grad


@pytest.mark.parametrize("case", list(BN_ACT_BACKWARD_CASES), ids=list(BN_ACT_BACKWARD_CASES))
def test_opcheck_bn_act_backward_reduce(case):
    grad_out, tensors, batch_stats, relu, backend, _ = bn_act_backward_args(case)
    torch.library.opcheck(torch.ops.fusedres.bn_act_backward_reduce.default,
                          (grad_out, *tensors, relu, backend))


@pytest.mark.parametrize("case", list(BN_ACT_BACKWARD_CASES), ids=list(BN_ACT_BACKWARD_CASES))
def test_opcheck_bn_act_backward_apply(case):
    grad_out, tensors, batch_stats, relu, backend, want_residual_grad = bn_act_backward_args(case)
    sums = torch.ops.fusedres.bn_act_backward_reduce(grad_out, *tensors, relu, backend)
    # as if a second rank of a sync group held the same batch: twice the sums and the count
    y = tensors[0]
    group_sums, count = [2 * s for s in sums], 2 * (y.numel() // y.shape[1])
    torch.library.opcheck(torch.ops.fusedres.bn_act_backward_apply.default,
                          (grad_out, *tensors, sums, group_sums, count, batch_stats, relu,
                           want_residual_grad, backend))


def bn_act_conv2d_args(gen, *, relu=True, affine=True, batch_stats=True, stride=1, padding=1,
                       dilation=1, groups=1, conv_bias=False, dtype=F64, channels_last=False,
                       cout=4, grad=True, shape=(2, 3, 4, 5)):
    y = randn(gen, *shape, dtype=dtype, channels_last=channels_last, requires_grad=grad)
    mean, invstd = stats_of(y, batch_stats, gen)
    w = positive(gen, 3, dtype=dtype, requires_grad=grad) if affine else None
    b = randn(gen, 3, dtype=dtype, requires_grad=grad) if affine else None
    cw = randn(gen, cout, 3 // groups, 3, 3, dtype=dtype, requires_grad=grad)
    cb = randn(gen, cout, dtype=dtype, requires_grad=grad) if conv_bias else None
    return (y, mean, invstd, w, b, cw, cb, [stride] * 2, [padding] * 2, [dilation] * 2, groups,
            batch_stats, relu, "auto")


BN_ACT_CONV2D_CASES = {
    "relu-3x3": dict(),
    "norelu-s2-convbias": dict(relu=False, stride=2, conv_bias=True),
    "noaffine-depthwise-dilated": dict(affine=False, groups=3, cout=6, dilation=2, padding=2),
    "eval-relu-convbias": dict(batch_stats=False, conv_bias=True),
    "f32-cl-relu-s2": dict(dtype=F32, channels_last=True, stride=2),
}


@pytest.mark.parametrize("case", list(BN_ACT_CONV2D_CASES), ids=list(BN_ACT_CONV2D_CASES))
def test_opcheck_bn_act_conv2d(case):
    gen = torch.Generator().manual_seed(303)
    args = bn_act_conv2d_args(gen, **BN_ACT_CONV2D_CASES[case])
    torch.library.opcheck(torch.ops.fusedres.bn_act_conv2d.default, args)


CONV2D_STATS_CASES = {
    "prologue-relu-3x3": dict(),
    "prologue-norelu-s2-convbias": dict(relu=False, stride=2, conv_bias=True),
    "eval-prologue": dict(batch_stats=False),
    "no-prologue-cl": dict(dtype=F32, channels_last=True, prologue=False),
    "no-prologue-grouped": dict(prologue=False, groups=3, cout=6),
}


def conv2d_stats_args(gen, *, prologue=True, **kwargs):
    args = bn_act_conv2d_args(gen, **kwargs)
    if not prologue:
        args = args[:1] + (None,) * 4 + args[5:]
    return args + ("", 0)


@pytest.mark.parametrize("case", list(CONV2D_STATS_CASES), ids=list(CONV2D_STATS_CASES))
def test_opcheck_conv2d_stats(case):
    gen = torch.Generator().manual_seed(304)
    args = conv2d_stats_args(gen, **CONV2D_STATS_CASES[case])
    torch.library.opcheck(torch.ops.fusedres.conv2d_stats.default, args)
    out, mean, var = torch.ops.fusedres.conv2d_stats(*args)
    assert not (mean.requires_grad or var.requires_grad)
    expected = out.detach()
    assert_close(mean, expected.mean((0, 2, 3)), args[0].dtype, "mean")
    assert_close(var, expected.var((0, 2, 3), unbiased=False), args[0].dtype, "var")


@pytest.mark.parametrize("dtype,channels_last", [(F64, False), (F32, True)],
                         ids=["f64-nchw", "f32-cl"])
def test_opcheck_channel_stats(dtype, channels_last):
    gen = torch.Generator().manual_seed(404)
    y = randn(gen, 3, 4, 5, 6, dtype=dtype, channels_last=channels_last)
    torch.library.opcheck(torch.ops.fusedres.channel_stats.default, (y, "auto"))


def test_batch_norm_stats_values():
    """The statistics and running-stat update against F.batch_norm's."""
    gen = torch.Generator().manual_seed(405)
    y = randn(gen, 3, 4, 5, 6)
    rm, rv = randn(gen, 4) * 0.3, positive(gen, 4)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    p = functional.batch_norm_stats(y, None, None, rm, rv, batch_stats=True, momentum=0.3, eps=EPS)
    F.batch_norm(y, rm_ref, rv_ref, None, None, True, 0.3, EPS)
    assert_close(p.mean, y.mean((0, 2, 3)), F64, "mean")
    assert_close(p.invstd, torch.rsqrt(y.var((0, 2, 3), unbiased=False) + EPS), F64, "invstd")
    assert_close(rm, rm_ref, F64, "running_mean")
    assert_close(rv, rv_ref, F64, "running_var")
    p = functional.batch_norm_stats(y, None, None, rm, rv, batch_stats=False, momentum=0.3, eps=EPS)
    assert_close(p.mean, rm, F64, "eval mean")
    assert_close(p.invstd, torch.rsqrt(rv + EPS), F64, "eval invstd")
    assert p.mean.data_ptr() != rm.data_ptr()


# --------------------------------------------------------------------------- gradcheck
def composed_bn_act(y, weight, bias, residual, sc_y, sc_weight, sc_bias, *, batch_stats, relu,
                    running=(None, None), sc_running=(None, None)):
    p = functional.batch_norm_stats(y, weight, bias, *running, batch_stats=batch_stats,
                                    momentum=0.1, eps=EPS)
    res = residual
    if sc_y is not None:
        res = functional.batch_norm_stats(sc_y, sc_weight, sc_bias, *sc_running,
                                          batch_stats=batch_stats, momentum=0.1, eps=EPS)
    return functional.bn_act(p, res, relu=relu)


def running_stats(gen, c=3):
    return torch.randn(c, generator=gen, dtype=F64) * 0.3, positive(gen, c)


GRADCHECK_BN_ACT = {
    "identity-relu": dict(residual="identity"),
    "identity-norelu": dict(residual="identity", relu=False),
    "shortcut-relu": dict(residual="bn"),
    "shortcut-norelu-noaffine": dict(residual="bn", relu=False, affine=False, sc_affine=False),
    "noresidual-relu-noaffine": dict(affine=False),
    "eval-identity-relu": dict(residual="identity", batch_stats=False),
    "eval-shortcut-relu": dict(residual="bn", batch_stats=False),
    "cl-shortcut-relu": dict(residual="bn", channels_last=True),
}


@pytest.mark.parametrize("case", list(GRADCHECK_BN_ACT), ids=list(GRADCHECK_BN_ACT))
def test_gradcheck_bn_act(case):
    kwargs = GRADCHECK_BN_ACT[case]
    gen = torch.Generator().manual_seed(505)
    (y, _, _, w, b, identity, sc_y, _, _, sc_w, sc_b, batch_stats, relu, _) = bn_act_args(
        gen, **kwargs)
    extra = {}
    if not batch_stats:
        extra = dict(running=running_stats(gen), sc_running=running_stats(gen))
    fn = functools.partial(composed_bn_act, batch_stats=batch_stats, relu=relu, **extra)
    inputs = (y, w, b, identity, sc_y, sc_w, sc_b)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def composed_bn_act_conv2d(y, weight, bias, conv_weight, conv_bias, *, batch_stats, relu, stride,
                           padding, dilation, groups, running=(None, None)):
    p = functional.batch_norm_stats(y, weight, bias, *running, batch_stats=batch_stats,
                                    momentum=0.1, eps=EPS)
    return functional.bn_act_conv2d(p, conv_weight, conv_bias, stride, padding, dilation, groups,
                                    relu=relu)


GRADCHECK_BN_ACT_CONV2D = {
    "relu-3x3": dict(cout=2),
    "norelu-s2-convbias": dict(relu=False, stride=2, conv_bias=True, cout=2),
    "noaffine-dilated": dict(affine=False, cout=2, dilation=2, padding=2),
    # grouped fp64 convolutions are slow on CPU (~10 ms): gradcheck's fast mode for this one
    "depthwise-fast": dict(groups=3, cout=3, fast_mode=True),
    "eval-relu-convbias": dict(batch_stats=False, conv_bias=True, cout=2),
    "cl-relu-s2": dict(channels_last=True, stride=2, cout=2),
}


@pytest.mark.parametrize("case", list(GRADCHECK_BN_ACT_CONV2D), ids=list(GRADCHECK_BN_ACT_CONV2D))
def test_gradcheck_bn_act_conv2d(case):
    kwargs = dict(GRADCHECK_BN_ACT_CONV2D[case])
    fast_mode = kwargs.pop("fast_mode", False)
    gen = torch.Generator().manual_seed(606)
    (y, _, _, w, b, cw, cb, stride, padding, dilation, groups, batch_stats, relu,
     _) = bn_act_conv2d_args(gen, shape=(2, 3, 3, 4), **kwargs)
    extra = {} if batch_stats else dict(running=running_stats(gen))
    fn = functools.partial(composed_bn_act_conv2d, batch_stats=batch_stats, relu=relu,
                           stride=stride, padding=padding, dilation=dilation, groups=groups,
                           **extra)
    assert torch.autograd.gradcheck(fn, (y, w, b, cw, cb), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=fast_mode)


def composed_conv_bn_act(x, weight, bias, conv_weight, conv_bias, weight2, bias2, *, prologue,
                         relu, running):
    """conv_batch_norm_stats on x (or on a pending BatchNorm of x) -> bn_act."""
    source = x
    if prologue:
        source = functional.batch_norm_stats(x, weight, bias, None, None, batch_stats=True,
                                             momentum=0.1, eps=EPS)
    p = functional.conv_batch_norm_stats(source, conv_weight, conv_bias, 2, 1, 1, 1, weight2, bias2,
                                         *running, batch_stats=True, momentum=0.1, eps=EPS, relu=relu)
    return functional.bn_act(p, relu=True)


@pytest.mark.parametrize("prologue,relu", [(False, True), (True, True), (True, False)],
                         ids=["tensor", "pending-relu", "pending-linear"])
def test_gradcheck_conv_batch_norm_stats(prologue, relu):
    gen = torch.Generator().manual_seed(607)
    (y, _, _, w, b, cw, cb, *_) = bn_act_conv2d_args(gen, shape=(2, 3, 3, 4), cout=2,
                                                       conv_bias=True)
    w2, b2 = positive(gen, 2, dtype=F64, requires_grad=True), randn(gen, 2, requires_grad=True)
    running = running_stats(gen, 2)
    fn = functools.partial(composed_conv_bn_act, prologue=prologue, relu=relu, running=running)
    assert torch.autograd.gradcheck(fn, (y, w, b, cw, cb, w2, b2), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_conv_batch_norm_stats_matches_conv_then_batch_norm_stats():
    """Same PendingBN and running statistics as the two-step composition, source tensor or pending."""
    gen = torch.Generator().manual_seed(608)
    x = randn(gen, 3, 4, 6, 5, channels_last=True)
    cw, w, b = randn(gen, 6, 4, 3, 3), positive(gen, 6), randn(gen, 6)
    first = functional.batch_norm_stats(x, positive(gen, 4), randn(gen, 4), None, None,
                                        batch_stats=True, momentum=0.1, eps=EPS)
    for source in (x, first):
        running = running_stats(gen, 6)
        running_ref = tuple(t.clone() for t in running)
        p = functional.conv_batch_norm_stats(source, cw, None, 1, 1, 1, 1, w, b, *running,
                                             batch_stats=True, momentum=0.2, eps=EPS)
        y = (F.conv2d(x, cw, None, 1, 1) if source is x
             else functional.bn_act_conv2d(first, cw, None, 1, 1))
        p_ref = functional.batch_norm_stats(y, w, b, *running_ref, batch_stats=True, momentum=0.2,
                                            eps=EPS)
        for name in ("y", "mean", "invstd"):
            assert_close(getattr(p, name), getattr(p_ref, name), F64, name)
        assert p.batch_stats and p.y.is_contiguous(memory_format=torch.channels_last)
        for got, want in zip(running, running_ref):
            assert_close(got, want, F64, "running stats")


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kind,downsample,eval_mode,channels_last", [
    ("bottleneck", True, False, True),
    ("basic", False, True, False),
], ids=["bottleneck-down-train-cl", "basic-identity-eval"])
def test_compile_fullgraph_aot_eager(kind, downsample, eval_mode, channels_last):
    torch._dynamo.reset()
    inplanes, planes = (12, 5) if kind == "bottleneck" else (12, 12)
    stride = 2 if downsample else 1
    block = make_block(kind, inplanes, planes, stride, downsample, F32, "momentum", eval_mode,
                       seed=8)
    eager_block = copy.deepcopy(block)
    fused = fused_bottleneck if kind == "bottleneck" else fused_basic_block
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(9)
    for step in range(2):
        x = randn(gen, 3, inplanes, 7, 9, dtype=F32, channels_last=channels_last,
                  requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        out = compiled(x, block)
        out_eager = fused(x_eager, eager_block)
        assert_close(out, out_eager, F32, f"step {step}: output")
        g = randn(gen, *out.shape, dtype=F32, channels_last=channels_last)
        out.backward(g)
        out_eager.backward(g)
        assert_close(x.grad, x_eager.grad, F32, f"step {step}: input grad")
        compare_modules(block, eager_block, F32, step)


def test_compile_fullgraph_inductor():
    """Small graph (about 3 s cold on 2 CPU cores): every op, channels_last, fwd + bwd."""
    torch._dynamo.reset()

    def f(y, w1, b1, cw, w2, b2, res, rm, rv):
        p1 = functional.batch_norm_stats(y, w1, b1, rm, rv, batch_stats=True, momentum=0.1,
                                         eps=EPS)
        p2 = functional.conv_batch_norm_stats(p1, cw, None, 1, 1, 1, 1, w2, b2, None, None,
                                              batch_stats=True, momentum=0.1, eps=EPS)
        return functional.bn_act(p2, res)

    gen = torch.Generator().manual_seed(10)
    leaves = [randn(gen, 2, 3, 4, 5, dtype=F32, channels_last=True, requires_grad=True),
              positive(gen, 3, dtype=F32, requires_grad=True),
              randn(gen, 3, dtype=F32, requires_grad=True),
              randn(gen, 4, 3, 3, 3, dtype=F32, channels_last=True, requires_grad=True),
              positive(gen, 4, dtype=F32, requires_grad=True),
              randn(gen, 4, dtype=F32, requires_grad=True),
              randn(gen, 2, 4, 4, 5, dtype=F32, channels_last=True, requires_grad=True)]
    running = [randn(gen, 3, dtype=F32), positive(gen, 3, dtype=F32)]
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    eager_running = [t.clone() for t in running]
    out = torch.compile(f, fullgraph=True, backend="inductor")(*leaves, *running)
    out_eager = f(*eager_leaves, *eager_running)
    assert_close(out, out_eager, F32, "output")
    g = randn(gen, *out.shape, dtype=F32, channels_last=True)
    out.backward(g)
    out_eager.backward(g)
    for i, (t, e) in enumerate(zip(leaves, eager_leaves)):
        assert_close(t.grad, e.grad, F32, f"grad of input {i}")
    for t, e in zip(running, eager_running):
        assert_close(t, e, F32, "running stats")


def test_double_backward_through_a_fused_batchnorm_names_what_is_not_supported():
    """A gradient penalty on a converted model: the first backward (create_graph=True) runs, the second raises
    a fusedres error saying what cannot be done and what can (not torch's "no autograd formula" about an op)."""
    import torchvision

    import fusedres

    model = torchvision.models.resnet18(num_classes=4).double()
    fusedres.convert(model)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()), create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=r"fusedres: the backward of a fused BatchNorm cannot be differentiated "
                                           r"again .* fusedres.revert\(model\)"):
        penalty.backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_conv_without_prologue_can_be_differentiated_twice(backend):
    """conv2d_stats without a BatchNorm before it (a block's first conv): with create_graph=True its backward
    is torch's ops whatever the backend, so a gradient penalty on its weight gradient is eager's (the Triton
    kernels' results would enter the graph as constants and drop the penalty's own term)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 6, 6, generator=gen)
    weight = (torch.randn(8, 16, 3, 3, generator=gen) * 0.2).requires_grad_()

    def penalty_gradient(conv):
        out = conv(weight)
        g, = torch.autograd.grad(out.square().sum(), weight, create_graph=True)
        return torch.autograd.grad(g.square().sum() + weight.square().sum(), weight)[0]

    ours = penalty_gradient(lambda w: torch.ops.fusedres.conv2d_stats(
        x, None, None, None, None, w, None, [1, 1], [1, 1], [1, 1], 1, True, True, backend)[0])
    eager = penalty_gradient(lambda w: F.conv2d(x, w, padding=1))
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-4)
