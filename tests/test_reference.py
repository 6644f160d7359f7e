"""``fusedres.reference`` (the oracle) against torch.nn and torchvision's blocks.

Every case runs two training (or eval) steps on the reference and on a deep copy of the same
torch.nn module, with the same seeded inputs and output gradients, and compares the output, the
input gradient (and the residual's / prologue's), every parameter gradient, and every buffer
(running_mean, running_var, num_batches_tracked) after each step.

The matrix is lean on purpose: each BatchNorm variant, dtype, layout, stride and shortcut kind
appears in some row, not in every combination.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fusedres import reference
from op_helpers import assert_close, compare_modules, to_format

# BatchNorm variants: constructor kwargs and whether the module runs in eval mode.
BN_VARIANTS = {
    "momentum": (dict(momentum=0.1), False),
    "cumulative": (dict(momentum=None), False),
    "untracked": (dict(track_running_stats=False), False),
    "no_affine": (dict(affine=False), False),
    "eval": (dict(momentum=0.1), True),
    "eval_untracked": (dict(track_running_stats=False), True),  # eval, yet batch statistics
}


def randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics (never zeros or ones)."""
    c = bn.num_features
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.3)
            bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
            bn.num_batches_tracked.fill_(3)  # matters for momentum=None (cumulative average)


def prepare(module: nn.Module, dtype, eval_mode: bool, gen: torch.Generator) -> nn.Module:
    module = module.to(dtype)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, gen)
    return module.train(not eval_mode)


def leaf(shape, dtype, channels_last, gen):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return to_format(t, channels_last).requires_grad_()


def run_steps(module, torch_forward, ref_forward, in_shapes, dtype, channels_last, seed,
              steps=2):
    """Runs ``steps`` forward + backward steps of the reference and of torch.nn, comparing.

    ``torch_forward(module, *inputs)`` and ``ref_forward(module, *inputs)`` get the same
    values in fresh leaf tensors of ``in_shapes``.
    """
    ref_mod = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        inputs = [leaf(s, dtype, channels_last, gen) for s in in_shapes]
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out = torch_forward(module, *inputs)
        out_ref = ref_forward(ref_mod, *ref_inputs)
        assert out_ref.dtype == dtype
        assert out_ref.shape == out.shape
        assert_close(out_ref, out, dtype, f"step {step}: output")
        grad = to_format(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype),
                         channels_last)
        out.backward(grad)
        out_ref.backward(grad)
        for i, (t, r) in enumerate(zip(inputs, ref_inputs)):
            assert_close(r.grad, t.grad, dtype, f"step {step}: grad of input {i}")
        compare_modules(ref_mod, module, dtype, step)


# --------------------------------------------------------------------------- conv_bn_act
def unit_modules(cin, cout, dtype, bn, gen, stride=1, kernel=3, padding=1, dilation=1,
                 groups=1, conv_bias=False):
    kwargs, eval_mode = BN_VARIANTS[bn]
    torch.manual_seed(gen.initial_seed())
    mod = nn.ModuleDict(dict(
        conv=nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=conv_bias),
        bn=nn.BatchNorm2d(cout, **kwargs),
    ))
    return prepare(mod, dtype, eval_mode, gen)


def torch_unit(mod, x, residual=None, relu=True):
    z = mod["bn"](mod["conv"](x))
    if residual is not None:
        z = z + residual
    return F.relu(z) if relu else z


def ref_unit(mod, x, residual=None, relu=True):
    return reference.conv_bn_act(x, mod["conv"], mod["bn"], residual=residual, relu=relu)


UNIT_CASES = [
    # id, dtype, channels_last, bn variant, stride, residual, relu, extra conv kwargs
    ("f64-nchw-momentum", torch.float64, False, "momentum", 1, False, True, {}),
    ("f32-cl-momentum-s2", torch.float32, True, "momentum", 2, False, True, {}),
    ("f64-cl-cumulative-res", torch.float64, True, "cumulative", 1, True, True, {}),
    ("f32-nchw-untracked-res-norelu-s2", torch.float32, False, "untracked", 2, True, False, {}),
    ("f64-nchw-noaffine-convbias", torch.float64, False, "no_affine", 1, False, True,
     dict(conv_bias=True)),
    ("f32-cl-eval-res", torch.float32, True, "eval", 1, True, True, {}),
    ("f64-cl-eval-untracked-s2", torch.float64, True, "eval_untracked", 2, False, False, {}),
    ("f64-nchw-grouped-dilated", torch.float64, False, "momentum", 1, True, True,
     dict(groups=4, dilation=2, padding=2)),
    ("f32-nchw-1x1", torch.float32, False, "cumulative", 1, False, True,
     dict(kernel=1, padding=0)),
]


@pytest.mark.parametrize("dtype,channels_last,bn,stride,residual,relu,conv_kwargs",
                         [c[1:] for c in UNIT_CASES], ids=[c[0] for c in UNIT_CASES])
def test_conv_bn_act_matches_torch_nn(dtype, channels_last, bn, stride, residual, relu,
                                      conv_kwargs):
    gen = torch.Generator().manual_seed(1234)
    cin, cout, n, h, w = 12, 20, 3, 7, 9
    mod = unit_modules(cin, cout, dtype, bn, gen, stride=stride, **conv_kwargs)
    shapes = [(n, cin, h, w)]
    if residual:
        with torch.no_grad():
            out_shape = mod["conv"](torch.zeros(n, cin, h, w, dtype=dtype)).shape
        shapes.append(tuple(out_shape))

    def torch_fwd(m, x, res=None):
        return torch_unit(m, x, res, relu)

    def ref_fwd(m, x, res=None):
        return ref_unit(m, x, res, relu)

    run_steps(mod, torch_fwd, ref_fwd, shapes, dtype, channels_last, seed=7)


@pytest.mark.parametrize("dtype,channels_last,bn", [
    (torch.float64, False, "momentum"),
    (torch.float32, True, "eval"),
    (torch.float64, True, "untracked"),
], ids=["f64-nchw-train", "f32-cl-eval", "f64-cl-untracked"])
def test_conv_bn_act_prologue(dtype, channels_last, bn):
    """in_scale/in_shift: relu(x * s + b) per input channel, then the unit."""
    gen = torch.Generator().manual_seed(99)
    cin, cout = 12, 20
    mod = unit_modules(cin, cout, dtype, bn, gen, stride=2)
    scale = (torch.rand(cin, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    shift = (torch.rand(cin, generator=gen, dtype=torch.float64) - 0.5).to(dtype)

    def torch_fwd(m, x, s, b):
        x = torch.relu(x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
        return torch_unit(m, x, None, True)

    def ref_fwd(m, x, s, b):
        return reference.conv_bn_act(x, m["conv"], m["bn"], in_scale=s, in_shift=b)

    # scale and shift are leaves too, so their gradients are compared as inputs 1 and 2.
    ref_mod = copy.deepcopy(mod)
    for step in range(2):
        x = leaf((3, cin, 7, 9), dtype, channels_last, gen)
        s = scale.clone().requires_grad_()
        b = shift.clone().requires_grad_()
        xr, sr, br = (t.detach().clone().requires_grad_() for t in (x, s, b))
        out = torch_fwd(mod, x, s, b)
        out_ref = ref_fwd(ref_mod, xr, sr, br)
        assert_close(out_ref, out, dtype, f"step {step}: output")
        g = to_format(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype),
                      channels_last)
        out.backward(g)
        out_ref.backward(g)
        for name, t, r in (("x", x, xr), ("in_scale", s, sr), ("in_shift", b, br)):
            assert_close(r.grad, t.grad, dtype, f"step {step}: grad of {name}")
        compare_modules(ref_mod, mod, dtype, step)


def test_batch_norm_momentum_bookkeeping():
    """num_batches_tracked and the averaging factor exactly as nn.BatchNorm2d.forward."""
    bn = nn.BatchNorm2d(4, momentum=None)
    bn.num_batches_tracked.fill_(3)
    assert reference.batch_norm_momentum(bn) == (True, 0.25)
    assert int(bn.num_batches_tracked) == 4
    bn = nn.BatchNorm2d(4, momentum=0.3)
    assert reference.batch_norm_momentum(bn) == (True, 0.3)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    assert reference.batch_norm_momentum(bn) == (False, 0.3)
    assert int(bn.num_batches_tracked) == 1
    bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    assert reference.batch_norm_momentum(bn)[0] is True


# --------------------------------------------------------------------------- blocks
def make_block(kind, inplanes, planes, stride, downsample, dtype, bn, gen, groups=1,
               base_width=64, dilation=1):
    kwargs, eval_mode = BN_VARIANTS[bn]
    norm_layer = functools.partial(nn.BatchNorm2d, **kwargs)
    cls = BasicBlock if kind == "basic" else Bottleneck
    torch.manual_seed(gen.initial_seed())
    ds = None
    if downsample:
        ds = nn.Sequential(
            nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False),
            norm_layer(planes * cls.expansion),
        )
    block = cls(inplanes, planes, stride, ds, groups=groups, base_width=base_width,
                dilation=dilation, norm_layer=norm_layer)
    return prepare(block, dtype, eval_mode, gen)


BLOCK_CASES = [
    # id, kind, dtype, channels_last, bn, inplanes, planes, stride, downsample, extra
    ("basic-f64-nchw-identity", "basic", torch.float64, False, "momentum", 12, 12, 1, False, {}),
    ("basic-f32-cl-down-s2-cumulative", "basic", torch.float32, True, "cumulative", 12, 20, 2,
     True, {}),
    ("basic-f64-cl-down-s1-noaffine", "basic", torch.float64, True, "no_affine", 12, 20, 1,
     True, {}),
    ("basic-f32-nchw-identity-eval", "basic", torch.float32, False, "eval", 20, 20, 1, False, {}),
    ("basic-f64-nchw-down-s2-untracked", "basic", torch.float64, False, "untracked", 12, 20, 2,
     True, {}),
    ("bottleneck-f64-cl-down-s2", "bottleneck", torch.float64, True, "momentum", 12, 5, 2, True,
     {}),
    ("bottleneck-f32-nchw-identity-untracked", "bottleneck", torch.float32, False, "untracked",
     20, 5, 1, False, {}),
    ("bottleneck-f64-nchw-down-eval", "bottleneck", torch.float64, False, "eval", 12, 5, 2, True,
     {}),
    ("bottleneck-f32-cl-identity-cumulative-grouped", "bottleneck", torch.float32, True,
     "cumulative", 20, 5, 1, False, dict(groups=2, base_width=48, dilation=2)),
    ("bottleneck-f64-cl-down-s1-noaffine", "bottleneck", torch.float64, True, "no_affine", 12, 5,
     1, True, {}),
    ("bottleneck-f32-cl-identity-eval-untracked", "bottleneck", torch.float32, True,
     "eval_untracked", 20, 5, 1, False, {}),
]


@pytest.mark.parametrize("kind,dtype,channels_last,bn,inplanes,planes,stride,downsample,extra",
                         [c[1:] for c in BLOCK_CASES], ids=[c[0] for c in BLOCK_CASES])
def test_block_matches_torchvision(kind, dtype, channels_last, bn, inplanes, planes, stride,
                                   downsample, extra):
    gen = torch.Generator().manual_seed(2024)
    block = make_block(kind, inplanes, planes, stride, downsample, dtype, bn, gen, **extra)
    ref_fn = reference.basic_block if kind == "basic" else reference.bottleneck

    def torch_fwd(m, x):
        return m(x)

    def ref_fwd(m, x):
        return ref_fn(x, m)

    run_steps(block, torch_fwd, ref_fwd, [(3, inplanes, 7, 9)], dtype, channels_last, seed=11)


def test_shortcut_identity_and_downsample():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 12, 7, 9, generator=gen, dtype=torch.float64)
    assert reference.shortcut(x, None) is x
    ds = nn.Sequential(nn.Conv2d(12, 20, 1, 2, bias=False), nn.BatchNorm2d(20)).double()
    ds = prepare(ds, torch.float64, False, gen)
    ds_ref = copy.deepcopy(ds)
    assert_close(reference.shortcut(x, ds_ref), ds(x), torch.float64, "downsample")
    compare_modules(ds_ref, ds, torch.float64, 0)
