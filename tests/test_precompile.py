"""fusedres.precompile: the pass runs the model (its backward in training), leaves every buffer, gradient and
random number generator as it found them, and on a GPU leaves the first step nothing to compile. The
compile-ahead mechanics it rests on are tested in test_triton_conv.py (the kernels' compile-only launches) and
test_dispatch.py (the dispatch's prepare pass)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fusedres
from conftest import requires_cuda
from model_helpers import randomise_bn
from triton_conv_helpers import RECORD_COMPILES, STAND_IN_LAUNCH, run_behind_stand_in


def _converted_resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    randomise_bn(model, seed)
    fusedres.convert(model)
    return model


def _state(model: torch.nn.Module) -> dict:
    """Everything the pass must leave as it was: state_dict (BatchNorm's running statistics and batch counts
    included), gradients, the CPU generator."""
    state = {f"state {k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"grad {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    state["rng"] = torch.get_rng_state()
    return state


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_precompile_runs_the_step_and_leaves_the_model_as_it_found_it(training):
    model = _converted_resnet18(0).train(training)
    x = torch.randn(2, 3, 32, 32)
    if training:  # some gradients already accumulated, others None
        model(x).sum().backward()
        model.fc.weight.grad = None
    forwards, backwards = [], []
    model.register_forward_hook(lambda *args: forwards.append(1))
    model.conv1.weight.register_hook(lambda grad: backwards.append(1))
    before = _state(model)
    report = fusedres.precompile(model, x)
    _assert_same(before, _state(model))
    assert model.fc.weight.grad is None and model.training == training
    assert len(forwards) == 1 and len(backwards) == int(training)  # the backward only in training
    assert report.compiles == report.failed == 0  # on CPU no call reaches the measured dispatch
    assert str(report).startswith("fusedres.precompile: 0 Triton kernels compiled in ")


def test_precompile_leaves_the_gradient_tensors_untouched_and_no_gradient_on_the_inputs():
    """The very ``.grad`` tensors stay on the parameters with their values (a flat gradient buffer or a gradient
    accumulation may hold them); the inputs' gradients are computed in the pass, as a step's would be, but none is
    left on an input, nor on the tensor an input was made from."""
    model = _converted_resnet18(3).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # mid gradient accumulation
    held = {name: p.grad for name, p in model.named_parameters()}
    values = {name: grad.clone() for name, grad in held.items()}
    inputs_require_grad = []
    model.conv1.register_forward_pre_hook(lambda module, args: inputs_require_grad.append(args[0].requires_grad))
    leaf = torch.randn(2, 3, 32, 32, requires_grad=True)
    for x in (leaf, leaf * 2.0):
        fusedres.precompile(model, x)
        for name, p in model.named_parameters():
            assert p.grad is held[name] and torch.equal(p.grad, values[name]), name
        assert leaf.grad is None
    assert inputs_require_grad == [True, True]


def test_precompile_backward_can_be_asked_for_or_left_out():
    model = _converted_resnet18(1)
    backwards = []
    model.conv1.weight.register_hook(lambda grad: backwards.append(1))
    fusedres.precompile(model, torch.randn(2, 3, 32, 32), backward=False)
    assert backwards == []
    fusedres.precompile(model.eval(), torch.randn(2, 3, 32, 32), backward=True)
    assert backwards == [1] and all(p.grad is None for p in model.parameters())


def test_precompile_restores_the_model_when_the_pass_fails():
    model = _converted_resnet18(2)
    x = torch.randn(2, 5, 32, 32)  # 5 channels where conv1 takes 3
    before = _state(model)
    with pytest.raises(RuntimeError):
        fusedres.precompile(model, x)
    _assert_same(before, _state(model))


def test_precompile_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got function"):
        fusedres.precompile(lambda x: x, torch.randn(2))


_PRECOMPILE_BEHIND_THE_STAND_IN = STAND_IN_LAUNCH + RECORD_COMPILES + """
import torchvision
import fusedres
from fusedres.ops import backends, dispatch
# the CPU tensors taken for the GPU's: the auto backend's calls go through the measured dispatch, whose timer
# runs an implementation once (its Triton kernels compile, never run) and rates every one alike
backends.measured = lambda tensor: True
dispatch._gpu_name = lambda index: "StandInH100"
dispatch._time_ms = lambda fn: fn() and 1.0
torch.manual_seed(0)
block = torchvision.models.resnet.Bottleneck(
    64, 16, stride=2, downsample=torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1, stride=2, bias=False),
                                                     torch.nn.BatchNorm2d(64)))
block = fusedres.convert(block).model.to(torch.bfloat16, memory_format=torch.channels_last).train()
x = torch.randn(4, 64, 16, 16, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
report = fusedres.precompile(block, x)
in_pass = list(compiles)
block(x).float().sum().backward()  # the first step: measures the dispatch and autotunes
print(json.dumps(dict(compiles=report.compiles, failed=report.failed, in_pass=in_pass,
                      after=compiles[len(in_pass):], chosen=sorted(set(dispatch._CHOSEN.values())))))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs precompile for real")
def test_precompile_compiles_a_training_blocks_kernels_at_once_behind_the_stand_in(tmp_path):
    """The whole path on CPU: a converted bottleneck's training step with the auto backend, the CPU tensors
    taken for the GPU's and an H100 stand-in driver (kernels compiled for sm_90, never launched).
    precompile's pass reaches the Triton forward, input-gradient and weight-gradient kernels through the
    measured dispatch, in the forward's thread and autograd's, and compiles all of them on its pool; the
    step after it, which measures the dispatch and autotunes, compiles none of them again."""
    found = run_behind_stand_in(_PRECOMPILE_BEHIND_THE_STAND_IN, tmp_path)
    tuned = [c for c in found["in_pass"] if c["kernel"] != "_finish_partials_kernel"]  # which is not autotuned
    assert found["failed"] == 0 and len(tuned) == found["compiles"] > 0, found
    assert {c["kernel"] for c in tuned} == {"_conv_kernel", "_wgrad_kernel"}, found
    assert {c["thread"][:22] for c in tuned} == {"fusedres-compile-ahead"}, found
    assert [c for c in found["after"] if c["kernel"] != "_finish_partials_kernel"] == [], found
    assert found["chosen"] == ["cudnn"], found  # every implementation rated alike: the first in order


def _compiled_kernels(device: torch.device) -> int:
    """Kernels in the in-process caches of the autotuned Triton conv kernels on ``device``."""
    from fusedres.triton import conv, conv_wgrad

    return sum(len(kernel.fn.device_caches[device.index][0]) for kernel in (conv._conv_kernel,
                                                                          conv_wgrad._wgrad_kernel))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_after_precompile_the_first_step_compiles_nothing(training, fresh_dispatch):
    """On a GPU, a bottleneck with a strided downsample (bf16 autocast, channels_last): the pass compiles the
    Triton kernels the auto backend may run, leaves the block as it was, and the first step, which measures
    the dispatch and autotunes, finds every one of them compiled."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(4)
    block = torchvision.models.resnet.Bottleneck(
        64, 32, stride=2, downsample=torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1, stride=2, bias=False),
                                                         torch.nn.BatchNorm2d(128)))
    randomise_bn(block, 4)
    block = fusedres.convert(block).model.to(device, memory_format=torch.channels_last).train(training)
    x = torch.randn(16, 64, 28, 28, device=device).to(memory_format=torch.channels_last)
    before = _state(block)
    with torch.autocast("cuda", torch.bfloat16):
        report = fusedres.precompile(block, x)
        _assert_same(before, _state(block))
        assert report.compiles > 0 and report.failed == 0, report
        compiled = _compiled_kernels(device)
        with torch.set_grad_enabled(training):  # inference without autograd, as precompile's pass ran it
            out = block(x)
        if training:
            out.float().sum().backward()
    torch.cuda.synchronize()
    assert _compiled_kernels(device) == compiled


def test_the_demo_precompiles_and_the_models_still_train_alike():
    """python -m fusedres demo (the README's first command) precompiles the converted model before its steps;
    the losses of the eager and the converted model stay equal after it; then both models' batch-1 inference with
    eager's weights, the converted model's error against the float64 model within a few times eager's own (fp32
    on CPU)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "fusedres", "demo", "--steps", "2", "--batch", "4", "--size", "64"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"fusedres\.precompile: \d+ Triton kernels compiled", done.stdout), done.stdout
    steps = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s", done.stdout, re.MULTILINE)
    assert [s[0] for s in steps] == ["0", "1"] and all(eager == fused for _, eager, fused in steps), done.stdout
    latency = dict(re.findall(r"^\s+(eager|fused)\s+\S+\s+(\S+)$", done.stdout, re.MULTILINE))
    assert float(latency["fused"]) <= 4 * float(latency["eager"]) + 1e-6, done.stdout  # batch 1, eval mode
