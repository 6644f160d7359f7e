"""fusedres.cuda_graphed: the checks of its arguments; on CPU, the wrapper around the capture (inputs copied into
the graph's buffers, the same output tensors returned, a model changed since the capture refused) with a stand-in
capture that records the forward and reruns it; on a GPU, a converted ResNet's forward captured and replayed
against eager."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import fusedres
from conftest import requires_cuda
from fusedres.graphs import CudaGraphedForward
from fusedres.ops import dispatch
from model_helpers import randomise_bn


def _converted_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    randomise_bn(model, seed)
    fusedres.convert(model)
    return model.eval()


def _rerun_capture(forward):
    """A CUDA graph's replay rewrites the captured outputs from the captured inputs' buffers: here by running
    the forward again and copying its result into the tensors the capture returned."""
    outputs = forward()

    def replay():
        outputs.copy_(forward())
    return replay, outputs


def _graphed_on_cpu(model, *inputs, warmup=1):
    return CudaGraphedForward(model, inputs, warmup, _rerun_capture)


def test_replays_return_the_forward_of_each_new_input_in_the_same_tensor():
    model = _converted_resnet18(seed=1)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    forward = _graphed_on_cpu(model, x)
    x.normal_()  # the example's values are not kept: the graph has buffers of its own
    outputs = []
    for seed in (2, 3):
        new_x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        outputs.append(forward(new_x))
        with torch.no_grad():
            torch.testing.assert_close(outputs[-1], reference(new_x), rtol=1e-4, atol=1e-4)
    assert outputs[0] is outputs[1]  # the graph's own output, overwritten by the next call
    channels_last = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():  # another layout of the same size: copied into the graph's buffer
        torch.testing.assert_close(forward(channels_last), reference(channels_last), rtol=1e-4, atol=1e-4)


def test_warm_up_runs_the_forward_before_the_capture_without_autograd_choosing_for_a_replay():
    """The warm-up and the capture run without autograd, and with the dispatch choosing for a graph replay (by
    GPU time alone); the replays (here the stand-in's reruns of the forward) run outside."""
    model = _converted_resnet18(seed=4)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append((torch.is_grad_enabled(),
                                                                        dispatch.graph_replay())))
    captured = []

    def capture(forward):
        captured.append(len(calls))
        return _rerun_capture(forward)

    forward = CudaGraphedForward(model, (torch.randn(1, 3, 32, 32),), 3, capture)
    assert captured == [3] and calls == [(False, True)] * 4  # 3 warm-up forwards, then the captured one
    assert not dispatch.graph_replay()
    forward(torch.randn(1, 3, 32, 32))
    assert calls[4:] == [(False, False)]


@pytest.mark.parametrize("change, message", [
    ("weight in place", "layer2.0.conv1.weight was changed in place or given new data"),
    ("running statistics in place", "layer2.0.bn1.running_var was changed in place or given new data"),
    ("parameter replaced", "layer2.0.conv1.weight was replaced"),
    ("parameter's data swapped", "layer2.0.conv1.weight was changed in place or given new data"),
    ("dtype changed", "bn1.running_mean was replaced"),  # a buffer replaced, a parameter given new data
    ("buffer deleted", "layer2.0.bn1.running_mean was removed"),
    ("load_state_dict", "conv1.weight was changed in place or given new data"),
    ("fused optimizer step", "an optimizer with fused=True took a step, which moves no version counter"),
])
def test_a_weight_changed_since_the_capture_is_refused(change, message):
    model = _converted_resnet18(seed=5)
    x = torch.randn(1, 3, 32, 32)
    forward = _graphed_on_cpu(model, x)
    forward(x)
    bn, conv = model.layer2[0].bn1, model.layer2[0].conv1
    with torch.no_grad():
        if change == "weight in place":
            conv.weight.mul_(1.5)
        elif change == "running statistics in place":
            bn.running_var.add_(1.0)
        elif change == "parameter replaced":
            conv.weight = nn.Parameter(conv.weight.detach().clone())
        elif change == "parameter's data swapped":  # as nn.Module.to does
            conv.weight.data = conv.weight.detach().clone()
        elif change == "dtype changed":
            model.double()
        elif change == "buffer deleted":
            del bn.running_mean
            bn.register_buffer("running_mean", None)
        elif change == "fused optimizer step":  # torch 2.14's fused step leaves the weight's version as it was
            conv.weight.grad = torch.ones_like(conv.weight)
            torch.optim.SGD([conv.weight], lr=0.1, fused=True).step()
        else:
            model.load_state_dict(_converted_resnet18(seed=6).state_dict())
    with pytest.raises(RuntimeError, match=f"the model changed since the graph was captured \\({message}\\)"):
        forward(x)


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m, "fc", nn.Linear(512, 10)), "fc was replaced"),
    (lambda m: setattr(m.layer2[0], "bn1", nn.BatchNorm2d(128).eval()), "layer2.0.bn1 was replaced"),
    (lambda m: setattr(m, "fc", None), "fc was removed"),
    (lambda m: setattr(m.layer1[0], "downsample", nn.Identity()), "layer1.0.downsample was added"),
    (lambda m: setattr(m.layer2[0].conv1, "bias", nn.Parameter(torch.zeros(128))), "layer2.0.conv1.bias was added"),
    (lambda m: setattr(m.layer2[0].bn1, "eps", 0.5), "layer2.0.bn1.eps was changed from 1e-05 to 0.5"),
    (lambda m: setattr(m.layer2[0].bn1, "momentum", None), "layer2.0.bn1.momentum was changed from 0.1 to None"),
    (lambda m: setattr(m.bn1, "track_running_stats", False), "bn1.track_running_stats was changed from True to False"),
    (lambda m: m.train(), "the model was switched to training mode"),
    (lambda m: m.layer3[1].bn2.train(), "layer3.1.bn2 was switched to training mode"),
])
def test_a_module_or_setting_changed_since_the_capture_is_refused(change, message):
    """The graph replays the modules, training flags and BatchNorm settings it was captured with (an eps is folded
    into the conv weights): a call after any of them changed would return what the old model computed. Setting
    the same ones again is no change."""
    model = _converted_resnet18(seed=13)
    x = torch.randn(1, 3, 32, 32)
    forward = _graphed_on_cpu(model, x)
    model.eval().fc = model.fc
    model.layer2[0].bn1.eps = model.layer2[0].bn1.eps
    forward(x)
    change(model)
    with pytest.raises(RuntimeError, match=f"the model changed since the graph was captured \\({message}\\)"):
        forward(x)


@pytest.mark.parametrize("bad, message", [
    (lambda x: (x[:1],), r"input 0 has size \(1, 3, 32, 32\), but the graph was captured for \(2, 3, 32, 32\)"),
    (lambda x: (x.double(),), "input 0 has dtype torch.float64, but the graph was captured for torch.float32"),
    (lambda x: (x, x), r"expected 1 input tensor\(s\), as captured, got 2"),
    (lambda x: (x.numpy(),), "expected input 0 to be a Tensor, got ndarray"),
])
def test_a_call_unlike_the_capture_is_refused(bad, message):
    x = torch.randn(2, 3, 32, 32)
    forward = _graphed_on_cpu(_converted_resnet18(seed=7), x)
    with pytest.raises((TypeError, ValueError), match=message):
        forward(*bad(x))


def test_inference_mode_parameters_are_refused():
    with torch.inference_mode():
        model = _converted_resnet18(seed=8)
    with pytest.raises(ValueError, match="inference_mode, which keep no version counter"):
        _graphed_on_cpu(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("args, error, message", [
    (lambda m, x: (object(), x), TypeError, "expected an nn.Module, got object"),
    (lambda m, x: (m.train(), x), RuntimeError, r"the model is in training mode \(call model.eval\(\) first\)"),
    (lambda m, x: (m.layer3[1].bn2.train() and m, x), RuntimeError, "layer3.1.bn2 is in training mode"),
    (lambda m, x: (m,), TypeError, "expected at least one example input tensor"),
    (lambda m, x: (m, [x]), TypeError, "expected input 0 to be a Tensor, got list"),
    (lambda m, x: (m, x), RuntimeError, r"CUDA graphs need the inputs on one CUDA device, got \['cpu'\]"),
])
def test_cuda_graphed_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        fusedres.cuda_graphed(*args(_converted_resnet18(seed=9), torch.randn(1, 3, 32, 32)))


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be a positive int"):
        fusedres.cuda_graphed(_converted_resnet18(seed=9), torch.randn(1, 3, 32, 32), warmup=0)


@requires_cuda
def test_gpu_a_converted_resnet_replays_its_forward_from_a_cuda_graph(fresh_dispatch):
    """Batch 1, bf16 autocast and channels_last (the latency target's setting; one dtype: the "auto" dispatch's
    warm-up compiles the Triton kernels of every conv shape), checked against eager (the unconverted model, under
    the same autocast) on two new inputs, within eager's own distance from fp64."""
    torch.manual_seed(10)
    eager = torchvision.models.resnet18(num_classes=10)
    randomise_bn(eager, 10)
    eager = eager.eval().cuda().to(memory_format=torch.channels_last)
    model = fusedres.convert(copy.deepcopy(eager)).model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with autocast:
        forward = fusedres.cuda_graphed(model, x)
    measured = fresh_dispatch.dispatch_table()
    for seed in (11, 12):
        new_x = torch.randn(1, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        got = forward(new_x).float()
        with torch.no_grad():
            exact = copy.deepcopy(eager).double()(new_x.double())
            with autocast:
                expected = eager(new_x).float()
        eager_error = (expected.double() - exact).norm() / exact.norm()
        assert (got.double() - exact).norm() / exact.norm() <= 2 * eager_error + 1e-3
    assert fresh_dispatch.dispatch_table() == measured  # the replays measure nothing
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="capture the graph again"):
        forward(x)
