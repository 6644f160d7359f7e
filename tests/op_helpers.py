"""Shared helpers of the op tests: tolerances, seeded random tensors, layouts, and blocks
composed from the functional ops."""

import functools
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fusedres.ops import functional
from fusedres.reference import batch_norm_momentum

# Relative tolerance per dtype; the absolute term is the same fraction of the reference's
# largest magnitude (gradients of a sum over a batch grow with its size).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
F64 = torch.float64
F32 = torch.float32
EPS = 1e-5


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def within(context, fn):
    """fn() inside ``with context`` (a step of a table of calls)."""
    with context:
        return fn()


def to_format(t, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def seeded(request, device) -> torch.Generator:
    """A generator on ``device`` seeded by the test's id: each test (and parametrisation) its own inputs."""
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return gen


def nonzero(shape, gen, scale=1.0):
    """fp64 N(0, 1) pushed 0.1 away from zero (never zero, also after rounding), times ``scale``, on gen's device."""
    x = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float64)
    return torch.where(x >= 0, x + 0.1, x - 0.1) * scale


def randn(gen, *shape, dtype=F64, channels_last=False, requires_grad=False):
    t = torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
    if len(shape) == 4:
        t = to_format(t, channels_last)
    return t.requires_grad_(requires_grad)


def positive(gen, *shape, dtype=F64, requires_grad=False):
    t = (torch.rand(*shape, generator=gen, dtype=F64) + 0.5).to(dtype)
    return t.requires_grad_(requires_grad)


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
