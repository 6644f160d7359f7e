"""The fused ops (``torch.ops.fusedres.*``) and their functional API, on CPU.

- the functional ops composed into BasicBlock / Bottleneck match ``fusedres.reference``
  (outputs, input and parameter gradients, running statistics);
- ``torch.library.opcheck`` on every op (schema, autograd registration, fake kernel,
  AOT dispatch);
- ``gradcheck`` in fp64 through batch_norm_stats -> bn_act / bn_act_conv2d;
- ``torch.compile(fullgraph=True)`` of compositions, forward and backward;
- input validation (clear errors before any kernel runs) and backend selection;
- the memory contract: autograd never keeps a normalised / activated tensor.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fusedres import reference
from fusedres.ops import backends, functional, registry, torch_backend
from fusedres.reference import batch_norm_momentum

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
F64 = torch.float64
F32 = torch.float32
EPS = 1e-5


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def to_format(t, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def randn(gen, *shape, dtype=F64, channels_last=False, requires_grad=False):
    t = torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
    if len(shape) == 4:
        t = to_format(t, channels_last)
    return t.requires_grad_(requires_grad)


def positive(gen, *shape, dtype=F64, requires_grad=False):
    t = (torch.rand(*shape, generator=gen, dtype=F64) + 0.5).to(dtype)
    return t.requires_grad_(requires_grad)


# --------------------------------------------------------------------------- composition
def unit_stats(y, bn):
    """A BatchNorm module's statistics for conv output ``y``, with nn.BatchNorm2d's bookkeeping."""
    batch_stats, factor = batch_norm_momentum(bn)
    track = not bn.training or bn.track_running_stats
    return functional.batch_norm_stats(
        y, bn.weight, bn.bias, bn.running_mean if track else None,
        bn.running_var if track else None, batch_stats=batch_stats, momentum=factor, eps=bn.eps)


def conv(x, c):
    return F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def next_conv(pending, c, memory_efficient):
    """conv(relu(bn(pending))): fused into the conv's prologue, or materialised first."""
    if memory_efficient:
        return functional.bn_act_conv2d(pending, c.weight, c.bias, c.stride, c.padding,
                                        c.dilation, c.groups)
    return conv(functional.bn_act(pending), c)


def shortcut(x, b):
    if b.downsample is None:
        return x
    return unit_stats(conv(x, b.downsample[0]), b.downsample[1])


def fused_basic_block(x, b, memory_efficient=True, record=None):
    p1 = unit_stats(conv(x, b.conv1), b.bn1)
    p2 = unit_stats(next_conv(p1, b.conv2, memory_efficient), b.bn2)
    res = shortcut(x, b)
    if record is not None:
        record += [p1, p2, res]
    return functional.bn_act(p2, res)


def fused_bottleneck(x, b, memory_efficient=True, record=None):
    p1 = unit_stats(conv(x, b.conv1), b.bn1)
    p2 = unit_stats(next_conv(p1, b.conv2, memory_efficient), b.bn2)
    p3 = unit_stats(next_conv(p2, b.conv3, memory_efficient), b.bn3)
    res = shortcut(x, b)
    if record is not None:
        record += [p1, p2, p3, res]
    return functional.bn_act(p3, res)


BN_VARIANTS = {
    "momentum": dict(momentum=0.1),
    "cumulative": dict(momentum=None),
    "untracked": dict(track_running_stats=False),
    "no_affine": dict(affine=False),
}


def make_block(kind, inplanes, planes, stride, downsample, dtype, bn="momentum", eval_mode=False,
               seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    norm_layer = functools.partial(nn.BatchNorm2d, **BN_VARIANTS[bn])
    cls = BasicBlock if kind == "basic" else Bottleneck
    ds = None
    if downsample:
        ds = nn.Sequential(nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False),
                           norm_layer(planes * cls.expansion))
    block = cls(inplanes, planes, stride, ds, norm_layer=norm_layer, **extra).to(dtype)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(positive(gen, c))
                    m.bias.copy_(torch.rand(c, generator=gen, dtype=F64) - 0.5)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.3)
                    m.running_var.copy_(positive(gen, c))
                    m.num_batches_tracked.fill_(3)
    return block.train(not eval_mode)


def compare_modules(mod, ref_mod, dtype, step):
    for (name, p), (_, q) in zip(mod.named_parameters(), ref_mod.named_parameters()):
        assert (p.grad is None) == (q.grad is None), f"step {step}: grad of {name}"
        if q.grad is not None:
            assert_close(p.grad, q.grad, dtype, f"step {step}: grad of {name}")
    for (name, b), (_, c) in zip(mod.named_buffers(), ref_mod.named_buffers()):
        if c.dtype == torch.long:
            assert torch.equal(b, c), f"step {step}: {name} {b} != {c}"
        else:
            assert_close(b, c, dtype, f"step {step}: {name}")


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
def stats_of(y, batch_stats=True, gen=None):
    """(mean, invstd) as the ops expect them (compute dtype), batch or 'running' statistics."""
    cdt = F64 if y.dtype == F64 else F32
    yd = y.detach().to(cdt)
    if batch_stats:
        mean = yd.mean((0, 2, 3))
        var = yd.var((0, 2, 3), unbiased=False)
    else:
        mean = torch.randn(y.shape[1], generator=gen, dtype=F64).to(cdt) * 0.3
        var = positive(gen, y.shape[1], dtype=cdt)
    return mean, torch.rsqrt(var + EPS)


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
        y2 = functional.bn_act_conv2d(p1, cw, None, 1, 1)
        p2 = functional.batch_norm_stats(y2, w2, b2, None, None, batch_stats=True, momentum=0.1,
                                         eps=EPS)
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


# --------------------------------------------------------------------------- errors
@pytest.fixture
def no_kernels(monkeypatch):
    """Any stage kernel running fails the test: errors must come before kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for name in ("channel_stats", "act_forward", "backward_reduce", "backward_apply"):
        monkeypatch.setattr(torch_backend, name, forbidden)


def pending(gen, shape=(2, 3, 4, 5), dtype=F32, requires_grad=False):
    y = randn(gen, *shape, dtype=dtype, requires_grad=requires_grad)
    c = shape[1]
    return functional.PendingBN(y, *stats_of(y), positive(gen, c, dtype=dtype),
                                randn(gen, c, dtype=dtype), True)


def stats_call(y, weight=None, bias=None, running_mean=None, running_var=None, batch_stats=True,
               backend="auto"):
    return functional.batch_norm_stats(y, weight, bias, running_mean, running_var,
                                       batch_stats=batch_stats, momentum=0.1, eps=EPS,
                                       backend=backend)


def test_error_3d_input(no_kernels):
    with pytest.raises(ValueError, match=r"4D \(N, C, H, W\).*got 3D"):
        stats_call(torch.randn(2, 3, 4))


def test_error_int_dtype(no_kernels):
    with pytest.raises(TypeError, match="floating dtype.*torch.int64"):
        stats_call(torch.ones(2, 3, 4, 5, dtype=torch.long))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_error_channel_vector_size(name, no_kernels):
    gen = torch.Generator().manual_seed(1)
    y = randn(gen, 2, 3, 4, 5, dtype=F32)
    kwargs = dict(weight=torch.ones(3), bias=torch.ones(3) * 0.1, running_mean=torch.ones(3) * 0.2,
                  running_var=torch.ones(3) * 1.5)
    kwargs[name] = torch.ones(4)
    with pytest.raises(ValueError, match=f"{name} should contain 3 elements.*not 4"):
        stats_call(y, **kwargs)


def test_error_running_mean_without_running_var(no_kernels):
    gen = torch.Generator().manual_seed(2)
    y = randn(gen, 2, 3, 4, 5, dtype=F32)
    running_mean = torch.full((3,), 0.25)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        stats_call(y, running_mean=running_mean)
    assert torch.equal(running_mean, torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="running statistics are required"):
        stats_call(y, batch_stats=False)


def test_error_one_value_per_channel_when_training(no_kernels):
    gen = torch.Generator().manual_seed(3)
    y = randn(gen, 1, 3, 1, 1, dtype=F32)
    with pytest.raises(ValueError) as torch_err:
        F.batch_norm(y, None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"
                       ) as ours:
        stats_call(y)
    assert str(ours.value) == str(torch_err.value)


def test_error_residual_shape(no_kernels):
    gen = torch.Generator().manual_seed(4)
    p = pending(gen)
    with pytest.raises(ValueError, match=r"residual of size \(2, 3, 4, 4\) does not match"):
        functional.bn_act(p, randn(gen, 2, 3, 4, 4, dtype=F32))
    with pytest.raises(ValueError, match=r"shortcut of size \(2, 3, 4, 4\) does not match"):
        functional.bn_act(p, pending(gen, (2, 3, 4, 4)))


def test_error_residual_device(no_kernels):
    gen = torch.Generator().manual_seed(5)
    p = pending(gen)
    with pytest.raises(RuntimeError, match="expected residual to be on cpu.*got meta"):
        functional.bn_act(p, torch.empty(2, 3, 4, 5, device="meta"))
    with pytest.raises(RuntimeError, match="expected weight to be on cpu.*got meta"):
        stats_call(p.y, weight=torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="expected conv_weight to be on cpu.*got meta"):
        functional.bn_act_conv2d(p, torch.empty(4, 3, 3, 3, device="meta"))


def test_error_shortcut_batch_stats_mismatch(no_kernels):
    gen = torch.Generator().manual_seed(6)
    p = pending(gen)
    sc = pending(gen)._replace(batch_stats=False)
    with pytest.raises(ValueError, match="both BatchNorms must use batch statistics"):
        functional.bn_act(p, sc)


def test_error_conv_weight_channels(no_kernels):
    gen = torch.Generator().manual_seed(7)
    p = pending(gen)
    with pytest.raises(RuntimeError, match=r"expects 4 input channels, got 3"):
        functional.bn_act_conv2d(p, randn(gen, 8, 4, 3, 3, dtype=F32))
    with pytest.raises(ValueError, match="4D conv weight"):
        functional.bn_act_conv2d(p, randn(gen, 8, 3, 3, dtype=F32))
    with pytest.raises(ValueError, match=r"conv_bias should have size \(8,\)"):
        functional.bn_act_conv2d(p, randn(gen, 8, 3, 3, 3, dtype=F32), randn(gen, 7, dtype=F32))


def test_error_groups_not_dividing(no_kernels):
    gen = torch.Generator().manual_seed(8)
    p = pending(gen)
    with pytest.raises(ValueError, match="groups=2 must divide the 3 input"):
        functional.bn_act_conv2d(p, randn(gen, 4, 1, 3, 3, dtype=F32), groups=2)


def test_error_padding_same(no_kernels):
    gen = torch.Generator().manual_seed(9)
    p = pending(gen)
    with pytest.raises(ValueError, match="padding='same' is not supported"):
        functional.bn_act_conv2d(p, randn(gen, 4, 3, 3, 3, dtype=F32), padding="same")


def test_error_conv_dtype_mismatch(no_kernels):
    gen = torch.Generator().manual_seed(10)
    p = pending(gen)
    with pytest.raises(RuntimeError, match=r"input type \(torch.float32\) and weight type "
                                           r"\(torch.float64\) should be the same"):
        functional.bn_act_conv2d(p, randn(gen, 4, 3, 3, 3, dtype=F64))


def test_conv_dtype_follows_autocast():
    """Inside autocast the weight is cast like conv2d would be; no dtype error."""
    gen = torch.Generator().manual_seed(11)
    p = pending(gen)
    cw = randn(gen, 4, 3, 3, 3, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = functional.bn_act_conv2d(p, cw, padding=1)
        expected = F.conv2d(functional.bn_act(p), cw, padding=1)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("where", ["batch_norm_stats", "bn_act", "bn_act_conv2d"])
def test_error_unknown_backend(where, no_kernels):
    gen = torch.Generator().manual_seed(12)
    p = pending(gen)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        if where == "batch_norm_stats":
            stats_call(p.y, backend="nope")
        elif where == "bn_act":
            functional.bn_act(p, backend="nope")
        else:
            functional.bn_act_conv2d(p, randn(gen, 4, 3, 3, 3, dtype=F32), backend="nope")


def test_error_cuda_backend_on_cpu(no_kernels):
    gen = torch.Generator().manual_seed(13)
    p = pending(gen)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        stats_call(p.y, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        functional.bn_act(p, backend="cuda")


# --------------------------------------------------------------------------- backend selection
def test_select_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    for dtype in (F32, F64, torch.bfloat16):
        assert backends.select("auto", torch.ones(2, dtype=dtype)) is torch_backend
    assert backends.select("torch", torch.ones(2)) is torch_backend


def test_select_honours_env_var(monkeypatch):
    x = torch.ones(2)
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    assert backends.select("auto", x) is torch_backend
    monkeypatch.setenv("FUSEDRES_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        backends.select("auto", x)
    # an explicit name wins over the variable
    assert backends.select("torch", x) is torch_backend
    monkeypatch.setenv("FUSEDRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.select("auto", x)


def test_env_var_reaches_the_ops(monkeypatch):
    gen = torch.Generator().manual_seed(14)
    y = randn(gen, 2, 3, 4, 5, dtype=F32)
    monkeypatch.setenv("FUSEDRES_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        stats_call(y)
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    stats_call(y)


def test_select_fp64_falls_back_to_torch(monkeypatch):
    """A kernel backend that can run on the device still hands fp64 to the torch backend."""
    fake_kernels = object()
    real_load = backends._load

    def fake_load(name):
        return (fake_kernels, "fake") if name == "triton" else real_load(name)

    monkeypatch.setattr(backends, "_load", fake_load)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    assert backends.select("triton", torch.ones(2, dtype=F32)) is fake_kernels
    assert backends.select("triton", torch.ones(2, dtype=F64)) is torch_backend
    # the interpreter is never an automatic choice
    assert backends.select("auto", torch.ones(2, dtype=F32)) is torch_backend
    monkeypatch.setenv("FUSEDRES_BACKEND", "triton")
    assert backends.select("auto", torch.ones(2, dtype=F64)) is torch_backend


# --------------------------------------------------------------------------- memory contract
def saved_tensors_of(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@pytest.mark.parametrize("downsample,channels_last", [(True, False), (False, True)],
                         ids=["down-nchw", "identity-cl"])
def test_memory_efficient_bottleneck_saves_no_normalised_activation(downsample, channels_last):
    inplanes, planes = (12, 5) if downsample else (20, 5)
    block = make_block("bottleneck", inplanes, planes, 2 if downsample else 1, downsample, F32,
                       seed=21)
    gen = torch.Generator().manual_seed(22)
    x = randn(gen, 3, inplanes, 7, 9, dtype=F32, channels_last=channels_last, requires_grad=True)
    record = []
    out, saved = saved_tensors_of(lambda: fused_bottleneck(x, block, True, record))
    p1, p2, p3, res = record
    allowed = [x, p1.y, p2.y, p3.y] + ([res.y] if downsample else [])
    params = list(block.parameters())
    activations = [t for t in saved
                   if t.dim() == 4 and not any(same_tensor(t, p) for p in params)]
    assert activations, "the hooks saw no saved activation"
    for t in activations:
        assert any(same_tensor(t, a) for a in allowed), (
            f"autograd saved an activation-sized tensor of size {tuple(t.shape)} that is not "
            "the block input or a conv output")
    # every conv output is needed (and kept) for the backward; nothing else of that size
    for name, a in (("y1", p1.y), ("y2", p2.y), ("y3", p3.y)):
        assert any(same_tensor(t, a) for t in activations), f"{name} was not saved"
    # and, by value, neither bn1's nor bn2's normalised / activated output is kept
    with torch.no_grad():
        for p in (p1, p2):
            scale = p.invstd * p.weight
            z = ((p.y - p.mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
                 + p.bias.view(1, -1, 1, 1))
            for normalised in (z, z.relu()):
                for t in saved:
                    assert not (t.shape == normalised.shape
                                and torch.allclose(t.float(), normalised, atol=1e-5)), (
                        "a normalised activation was saved for backward")
    out.backward(torch.ones_like(out))  # the saved set suffices for the backward


def test_identity_residual_not_saved_without_relu():
    gen = torch.Generator().manual_seed(23)
    p = pending(gen, requires_grad=True)
    residual = randn(gen, 2, 3, 4, 5, dtype=F32, requires_grad=True)
    out, saved = saved_tensors_of(lambda: functional.bn_act(p, residual, relu=False))
    assert any(same_tensor(t, p.y) for t in saved)
    assert not any(same_tensor(t, residual) for t in saved)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))


# --------------------------------------------------------------------------- kernel contract
def check_layout_contract(fn_name, y, *activations, vectors=()):
    """torch_backend's documented contract, which every backend may rely on: y contiguous
    NCHW or channels_last; residual / grad_out of y's shape and memory format; per-channel
    vectors contiguous in the compute dtype."""
    fmt = torch.contiguous_format if y.is_contiguous() else torch.channels_last
    y_ok = y.is_contiguous(memory_format=fmt)
    assert y_ok, f"{fn_name}: y of stride {y.stride()}"
    for name, t in activations:
        if t is not None:
            ok = t.shape == y.shape and t.is_contiguous(memory_format=fmt)
            assert ok, (f"{fn_name}: {name} of stride {t.stride()} does not have the memory "
                        f"format of y (stride {y.stride()})")
    cdt = F64 if y.dtype == F64 else F32
    for name, v in vectors:
        if v is not None:
            ok = v.is_contiguous() and v.dtype == cdt
            assert ok, f"{fn_name}: {name} {v.dtype} {v.stride()}"


@pytest.fixture
def contract_checked_kernels(monkeypatch):
    real = {name: getattr(torch_backend, name)
            for name in ("channel_stats", "act_forward", "backward_reduce", "backward_apply")}

    def channel_stats(y):
        check_layout_contract("channel_stats", y)
        return real["channel_stats"](y)

    def act_forward(y, scale, shift, residual, res_scale, res_shift, relu):
        check_layout_contract("act_forward", y, ("residual", residual), vectors=(
            ("scale", scale), ("shift", shift), ("res_scale", res_scale), ("res_shift", res_shift)))
        return real["act_forward"](y, scale, shift, residual, res_scale, res_shift, relu)

    def backward_reduce(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, mean,
                        res_mean):
        check_layout_contract("backward_reduce", y, ("grad_out", grad_out), ("residual", residual),
                              vectors=(("scale", scale), ("shift", shift), ("mean", mean)))
        return real["backward_reduce"](grad_out, y, scale, shift, residual, res_scale, res_shift,
                                       relu, mean, res_mean)

    def backward_apply(grad_out, y, *rest):
        check_layout_contract("backward_apply", y, ("grad_out", grad_out), ("residual", rest[2]))
        return real["backward_apply"](grad_out, y, *rest)

    for name, fn in (("channel_stats", channel_stats), ("act_forward", act_forward),
                     ("backward_reduce", backward_reduce), ("backward_apply", backward_apply)):
        monkeypatch.setattr(torch_backend, name, fn)


@pytest.mark.parametrize("channels_last,grad_kind", [
    (False, "same-layout"), (True, "same-layout"), (True, "other-layout"), (False, "sum-loss"),
], ids=["nchw-same-layout", "cl-same-layout", "cl-nchw-grad", "nchw-sum-loss"])
def test_kernels_receive_documented_layout(contract_checked_kernels, channels_last, grad_kind):
    """Whatever gradient autograd hands the ops, the stage kernels get it in y's layout.

    The Triton and CUDA kernels index grad_out with y's strides (the Triton backend rejects
    anything else), so e.g. ``out.sum().backward()`` (a stride-0 gradient) must be made
    contiguous in y's memory format before the kernels run.
    """
    block = make_block("bottleneck", 12, 5, 2, True, F32, seed=31)
    gen = torch.Generator().manual_seed(32)
    x = randn(gen, 3, 12, 7, 9, dtype=F32, channels_last=channels_last, requires_grad=True)
    out = fused_bottleneck(x, block)
    if grad_kind == "sum-loss":
        out.sum().backward()
    else:
        other = channels_last if grad_kind == "same-layout" else not channels_last
        out.backward(randn(gen, *out.shape, dtype=F32, channels_last=other))
    assert x.grad is not None


def test_mixed_layouts_reach_kernels_in_y_layout(contract_checked_kernels):
    """A residual / shortcut in another memory format than y, and a non-contiguous y, are
    brought to kernel layout by the functional API, with unchanged values."""
    gen = torch.Generator().manual_seed(33)
    base = randn(gen, 2, 3, 6, 5, dtype=F64)
    y_strided = base[:, :, ::2]  # neither NCHW- nor channels_last-contiguous
    w, b = positive(gen, 3), randn(gen, 3)
    p = functional.batch_norm_stats(y_strided, w, b, None, None, batch_stats=True, momentum=0.1,
                                    eps=EPS)
    assert p.y.is_contiguous()
    torch.testing.assert_close(p.y, y_strided, rtol=0, atol=0)
    y_cl = randn(gen, 2, 3, 3, 5, dtype=F64, channels_last=True)
    p_cl = functional.batch_norm_stats(y_cl, w, b, None, None, batch_stats=True, momentum=0.1,
                                       eps=EPS)
    residual = randn(gen, 2, 3, 3, 5, dtype=F64, channels_last=False)
    sc = functional.batch_norm_stats(randn(gen, 2, 3, 3, 5, dtype=F64), positive(gen, 3),
                                     randn(gen, 3), None, None, batch_stats=True, momentum=0.1,
                                     eps=EPS)
    for res in (residual, sc):
        out = functional.bn_act(p_cl, res)
        assert out.is_contiguous(memory_format=torch.channels_last)
        z = F.batch_norm(y_cl, None, None, w, b, True, 0.1, EPS)
        r = res if isinstance(res, torch.Tensor) else F.batch_norm(
            res.y, None, None, res.weight, res.bias, True, 0.1, EPS)
        assert_close(out, (z + r).relu(), F64, "output")


def test_relu_gradient_at_exact_zero_matches_torch():
    """Where bn(y) + residual is exactly 0, ReLU passes no gradient (as torch's relu)."""
    gen = torch.Generator().manual_seed(34)
    y = randn(gen, 2, 3, 4, 5, requires_grad=True)
    mask = torch.rand(2, 3, 4, 5, generator=gen) < 0.5
    residual = torch.where(mask, -y.detach(), randn(gen, 2, 3, 4, 5)).requires_grad_()
    mean, invstd = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)  # bn(y) = y exactly
    out = functional.bn_act(functional.PendingBN(y, mean, invstd, None, None, False), residual)
    y_ref, res_ref = y.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    out_ref = torch.relu(y_ref + res_ref)
    assert (out_ref[mask] == 0).all()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    g = randn(gen, 2, 3, 4, 5)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(residual.grad, res_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_apply_is_centred_so_large_means_do_not_cancel(backend):
    """dy = dz*c0 + (y - mean)*c1 + c2 in fp32 stays near fp64 with mean 1000, std 0.1.

    Measured: 2.0e-5 relative error centred (bounded by the fp32-rounded mean itself), 6.4e-5
    for the uncentred y*c1 + (c2 - mean*c1).
    """
    from fusedres.ops.backends import select

    kernels = select(backend, torch.empty(0))
    gen = torch.Generator().manual_seed(11)
    y = 1000 + 0.1 * torch.randn(3, 5, 4, 6, generator=gen)
    dz = torch.randn(3, 5, 4, 6, generator=gen)
    y64 = y.double()
    mean = y64.mean((0, 2, 3))
    invstd = (y64.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    sum_dz, sum_dz_yc = dz.double().sum((0, 2, 3)), (dz.double() * (y64 - mean.view(1, -1, 1, 1))).sum((0, 2, 3))
    coef = registry._input_grad_coef(sum_dz, sum_dz_yc, mean, invstd, None, True, y.numel() // 5)
    ones, zeros = torch.ones(5), torch.zeros(5)
    exact, _ = torch_backend.backward_apply(dz.double(), y64, ones.double(), zeros.double(), None,
                                            None, None, False, coef, None, False)
    dy, _ = kernels.backward_apply(dz, y, ones, zeros, None, None, None, False, coef.float(), None, False)
    error = (dy.double() - exact).norm() / exact.norm()
    assert error < 4e-5, error
