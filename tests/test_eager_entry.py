"""The ops' eager entry points (``fusedres.ops.eager``): the package runs each op's body without the dispatcher,
differentiated by an autograd.Function of the op's own setup_context and backward, with the op's results; and
calls the op itself wherever the dispatcher must see it (a dispatch mode, a functorch transform, meta tensors,
torch.compile, which test_ops.py and test_convert.py run)."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch._library import custom_ops, utils
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.ops import registry, unit_conv

from op_helpers import positive, randn


def _block() -> nn.Module:
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(12, 24, 1, 2, bias=False), nn.BatchNorm2d(24))
    return torchvision.models.resnet.Bottleneck(12, 6, stride=2, downsample=downsample)


@pytest.fixture
def op_calls(monkeypatch):
    """Names of the custom ops called through torch's custom-op machinery, and of the ops whose autograd
    forward (torch._library.autograd, which calls fill_defaults) ran."""
    calls = []
    call, fill_defaults = custom_ops.CustomOpDef.__call__, utils.fill_defaults
    monkeypatch.setattr(custom_ops.CustomOpDef, "__call__",
                        lambda self, *a, **k: calls.append(self._qualname) or call(self, *a, **k))
    monkeypatch.setattr(utils, "fill_defaults", lambda schema, *a: calls.append(f"autograd {schema.name}")
                        or fill_defaults(schema, *a))
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_step_and_inference_forward_bypass_the_dispatcher(backend, op_calls):
    """A converted block's training step (forward + backward) and eval forward call no custom op."""
    fused = fusedres.convert(_block(), backend=backend).model
    x = torch.randn(2, 12, 6, 6, requires_grad=True)
    fused(x).square().sum().backward()
    with torch.no_grad():
        fused.eval()(x)
    assert op_calls == []
    assert x.grad is not None and all(p.grad is not None for p in fused.parameters())


def _unit_args(gen, relu=True):
    """bn_act_conv2d's arguments up to ``backend`` (fp64, channels_last y, BatchNorm prologue), gradients wanted
    of y, the BatchNorm's weight and bias, and the conv's weight and bias."""
    y = randn(gen, 2, 6, 7, 5, channels_last=True, requires_grad=True)
    mean, invstd = randn(gen, 6), positive(gen, 6)
    weight, bias = positive(gen, 6, requires_grad=True), randn(gen, 6, requires_grad=True)
    conv_weight, conv_bias = randn(gen, 8, 6, 3, 3, requires_grad=True), randn(gen, 8, requires_grad=True)
    return (y, mean, invstd, weight, bias, conv_weight, conv_bias, [2, 2], [1, 1], [1, 1], 1, True, relu)


def _bn_act_args(gen):
    """bn_act's arguments up to ``backend``: a BatchNorm + a downsample's BatchNorm + ReLU, with gradients."""
    y, sc_y = (randn(gen, 2, 6, 5, 4, requires_grad=True) for _ in range(2))
    bn = [randn(gen, 6), positive(gen, 6), positive(gen, 6, requires_grad=True), randn(gen, 6, requires_grad=True)]
    sc = [randn(gen, 6), positive(gen, 6), positive(gen, 6, requires_grad=True), randn(gen, 6, requires_grad=True)]
    return (y, *bn, None, sc_y, *sc, True, True)


def _results_and_grads(fn, args):
    """fn(*args)'s outputs and the gradients of a fixed random weighting of its first output."""
    out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    weighting = torch.randn(first.shape, generator=torch.Generator().manual_seed(5), dtype=first.dtype)
    grads = torch.autograd.grad((first * weighting).sum(), leaves)
    return [t.detach() for t in (out if isinstance(out, tuple) else (out,))] + list(grads)


@pytest.mark.parametrize("case", [
    ("bn_act", registry.bn_act, _bn_act_args, ("", 0)),
    ("bn_act_conv2d", unit_conv.bn_act_conv2d, _unit_args, ("", 0)),
    ("conv2d_stats", unit_conv.conv2d_stats, _unit_args, ("", 0)),
], ids=lambda case: case[0])
def test_entry_gives_the_op_results_and_gradients(case):
    """The entry (body + autograd.Function) and the op (dispatcher + its registered autograd) agree bit for
    bit, outputs and gradients, whether the defaulted trailing arguments are given or not."""
    name, entry, make_args, defaults = case
    op = getattr(torch.ops.fusedres, name)
    args = make_args(torch.Generator().manual_seed(3)) + ("torch",)
    expected = _results_and_grads(op, args + defaults)
    for given in (args, args + defaults):
        for actual, wanted in zip(_results_and_grads(entry, given), expected, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


def test_backward_stages_keep_refusing_a_double_backward():
    """A second backward through a fused BatchNorm's backward still raises (the stages take the op when
    autograd is on)."""
    y, mean, invstd, weight, bias, *_ = _unit_args(torch.Generator().manual_seed(4))
    out = registry.bn_act(y, mean, invstd, weight, bias, None, None, None, None, None, None, True, True, "torch")
    grad, = torch.autograd.grad(out.square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        grad.sum().backward()


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _NoGradient(torch.autograd.Function):
    """Identity whose backward gives its input no gradient (None), as some consumers of a tensor do."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("through", ["entry", "op"])
def test_conv2d_stats_backward_fills_no_statistics_gradients(through):
    """conv2d_stats' statistics are not differentiable: its backward gets None for them, not two tensors of
    zeros filled at every backward (two launches per unit on a GPU), and runs on its output's gradient. An
    output reached with no gradient at all leaves the inputs' gradients None, as torch's conv would."""
    args = _unit_args(torch.Generator().manual_seed(6)) + ("torch", "", 0)
    call = unit_conv.conv2d_stats if through == "entry" else torch.ops.fusedres.conv2d_stats
    out, mean, var = call(*args)
    with _OpNames() as mode:
        out.backward(torch.randn(out.shape, dtype=out.dtype))
    assert not [name for name in mode.names if "zero" in name or "fill" in name], mode.names
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert all(t.grad is not None for t in leaves)

    for t in leaves:
        t.grad = None
    out, mean, var = call(*args)
    y = args[0]
    (_NoGradient.apply(out).sum() + (y * 0).sum()).backward()  # the op's node reached with no gradient
    assert [t.grad is None for t in leaves] == [False] + [True] * (len(leaves) - 1)


def test_dispatch_modes_see_the_ops():
    """Under a dispatch mode (selective activation checkpointing, FlopCounterMode, ...) the ops themselves
    run, as the mode sees them."""
    fused = fusedres.convert(_block(), backend="torch").model
    x = torch.randn(2, 12, 6, 6, requires_grad=True)
    with _OpNames() as mode:
        fused(x).sum().backward()
    assert {"fusedres.conv2d_stats.default", "fusedres.bn_act.default"} <= set(mode.names), set(mode.names)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's fallback (torch 2.14 warns in Python)
def test_functorch_transforms_take_the_op():
    """Under functorch transforms the ops run: vmap of an eval model without autograd batches them through
    functorch's fallback (a loop over the batch; the body would meet vmap's tensors, whose layout cannot be
    queried), and torch.func.grad meets the op's autograd, which refuses it as the README says."""
    fused = fusedres.convert(_block(), backend="torch").model.eval()  # running statistics: nothing updated in place
    x = torch.randn(3, 2, 12, 6, 6)
    with torch.no_grad():
        batched = torch.func.vmap(fused)(x)
        torch.testing.assert_close(batched, torch.stack([fused(images) for images in x]), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda t: fused(t).sum())(x[0])


def test_profiler_names_the_ops():
    """Under torch's profiler the bodies run inside a record_function named after the op."""
    fused = fusedres.convert(_block(), backend="torch").model
    x = torch.randn(2, 12, 6, 6, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fused(x).sum().backward()
    names = {event.name for event in profile.events()}
    assert {"fusedres::conv2d_stats", "fusedres::bn_act"} <= names


def test_the_same_training_through_the_op(monkeypatch):
    """A converted block trained through the entries and through the ops (every call forced through the
    dispatcher) ends with identical gradients and buffers."""
    from fusedres.ops import eager

    eager_block = fusedres.convert(_block().double(), backend="torch").model
    op_block = copy.deepcopy(eager_block)
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    eager_block(x).square().sum().backward()
    monkeypatch.setattr(eager, "_body_call", lambda args: None)
    op_block(x).square().sum().backward()
    for (name, a), b in zip(eager_block.named_parameters(), op_block.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    for (name, a), b in zip(eager_block.named_buffers(), op_block.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
