"""fusedres.convert / revert and the fused blocks on whole torchvision and timm ResNets (CPU).

The converted model must be a drop-in: same state_dict keys, same outputs, loss, every
parameter gradient and running statistics after a few SGD steps as the unconverted model.
"""

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.resnetv2 import PreActBasic
from torch import nn

import fusedres
from fusedres.nn import FusedBasicBlock, FusedBatchNormAct2d, FusedBottleneck
from fusedres.nn import stem
from fusedres.nn.norm import ReLUFusedIntoNorm
from fusedres.ops.backends import unavailable_reason
from conftest import requires_cuda
from model_helpers import assert_converted_trains_like_eager, assert_same_training, randomise_bn, rel_error


TRAINING_CASES = {
    # name: (constructor, converted modules (blocks, stem BN+ReLU pairs, the folded stem), dtype, channels_last,
    # SGD steps)
    # 64x64 inputs: at 32x32 the last stage is 1x1 and its BNs see 3 values per channel, which
    # amplifies fp64 rounding (1e-12 after one step) to 1e-7 over three SGD steps.
    "tv-resnet18-fp64": (lambda: torchvision.models.resnet18(num_classes=10), 10, torch.float64, False, 3),
    "tv-resnet18-fp64-cl": (lambda: torchvision.models.resnet18(num_classes=10), 10, torch.float64, True, 2),
    "tv-resnet50-fp64": (lambda: torchvision.models.resnet50(num_classes=10), 18, torch.float64, False, 2),
    "tv-resnet50-fp32-cl": (lambda: torchvision.models.resnet50(num_classes=10), 18, torch.float32, True, 1),
    "tv-resnext50-fp32": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), 18, torch.float32, False, 1),
    "timm-resnet18-fp64-cl": (lambda: timm.create_model("resnet18", num_classes=10), 10, torch.float64, True, 2),
    "timm-resnet26d-fp64": (lambda: timm.create_model("resnet26d", num_classes=10), 12, torch.float64, False, 2),
}


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_converted_model_trains_like_eager(case):
    build, expected_blocks, dtype, channels_last, steps = TRAINING_CASES[case]
    torch.manual_seed(len(case))
    assert_converted_trains_like_eager(build().to(dtype), len(case), expected_blocks, dtype,
                                       channels_last, steps)


@pytest.mark.parametrize("name,blocks,fused_cls", [
    ("resnet34", 18, FusedBasicBlock),
    ("resnet101", 35, FusedBottleneck),
    ("resnet152", 52, FusedBottleneck),
    ("wide_resnet50_2", 18, FusedBottleneck),
])
def test_torchvision_families_convert_and_match_in_eval(name, blocks, fused_cls):
    """Converted in eval mode (BatchNorm folded into the convs), each family computes its output as closely to
    an fp64 run of the eager model as the fp32 eager model does (at most 2x its error, plus 1e-6). Not element
    by element against fp32 eager: with random BatchNorm statistics the deeper nets' outputs spread over
    several orders of magnitude (resnet101's up to 1.5e4, resnet152's 3e7), and the last bits of the small
    ones depend on the CPU's conv kernels (one of resnet101's differed by 1.2e-4 relative on an AMD EPYC with
    AVX-512, both runs ~1e-6 off fp64)."""
    torch.manual_seed(0)
    eager = getattr(torchvision.models, name)(num_classes=10).eval()
    randomise_bn(eager, seed=1)
    report = fusedres.convert(eager, inplace=False)
    fused = report.model
    assert fused is not eager
    assert len(report.converted) == blocks
    assert all(isinstance(m, (fused_cls, FusedBatchNormAct2d, ReLUFusedIntoNorm, stem._FusedStemModel))
               for m in fused.modules()
               if "Fused" in type(m).__name__)
    assert not fused.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        exact = copy.deepcopy(eager).double()(x.double())
        eager_error, fused_error = rel_error(eager(x), exact), rel_error(fused(x), exact)
    assert fused_error <= 2 * eager_error + 1e-6, (fused_error, eager_error)


def test_unsupported_timm_blocks_are_left_alone_with_a_reason():
    model = timm.create_model("seresnet18", num_classes=10)
    before = {n: type(m) for n, m in model.named_modules()}
    report = fusedres.convert(model, filter_fn=lambda module, name: name not in ("bn1", "conv1"))
    assert report.converted == []
    assert len(report.skipped) == 10
    assert all("se" in why for name, why in report.skipped if name not in ("bn1", "conv1")), str(report)
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("tie", ["conv2 is conv1", "downsample holds conv1", "preact conv2 is conv1"])
def test_a_block_whose_parts_share_a_conv_or_batchnorm_is_left_alone(tie):
    """One conv or BatchNorm at two places of a block: the block is left as it is (its own forward runs each use in
    its order), its state_dict keys and outputs unchanged, where it had converted into a block missing conv2's keys
    and failing its forward, or one whose eval forward added the shared BatchNorm's bias twice."""
    torch.manual_seed(3)
    if tie == "preact conv2 is conv1":
        block = PreActBasic(8, 8, stride=1, conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
        block.conv2, expected = block.conv1, "conv2 is conv1 too"
    else:
        block = torchvision.models.resnet.BasicBlock(8, 8, stride=2 if tie == "downsample holds conv1" else 1)
        if tie == "conv2 is conv1":
            block.conv2, block.bn2, expected = block.conv1, block.bn1, "conv2 is conv1 too"
        else:
            block.downsample, expected = nn.Sequential(block.conv1, block.bn1), "downsample.0 is conv1 too"
    randomise_bn(block, 3)
    model = nn.Sequential(block).eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        before, keys = model(x), set(model.state_dict())
        report = fusedres.convert(model)
        assert report.converted == [] and expected in report.skipped[0][1], str(report)
        assert model[0] is block and set(model.state_dict()) == keys
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_an_activation_shared_by_two_parts_of_a_block_keeps_both_names():
    """timm's BasicBlock with act2 set to act1: the fused block holds it under both names (it had lost act2, so a
    forward that ran the original computation, here for a hook, and the reverted block raised AttributeError)."""
    torch.manual_seed(4)
    block = timm.models.resnet.BasicBlock(8, 8).eval()
    block.act2 = block.act1
    randomise_bn(block, 4)
    eager = copy.deepcopy(block)
    model = nn.Sequential(block)
    assert len(fusedres.convert(model).converted) == 1
    fused = model[0]
    assert fused.act2 is fused.act1 and set(model.state_dict()) == {f"0.{key}" for key in eager.state_dict()}
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))
        fused.act1.register_forward_hook(lambda module, args, out: None)  # the original computation, by the hook
        torch.testing.assert_close(model(x), eager(x))
        fusedres.revert(model)
        assert type(model[0]) is type(eager) and model[0].act2 is model[0].act1
        torch.testing.assert_close(model(x), eager(x))


def test_unknown_module_with_block_like_children_is_never_touched():
    class LookAlike(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.downsample = None

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x)))) - x

    model = nn.Sequential(LookAlike())
    report = fusedres.convert(model)
    assert report.converted == [] and type(model[0]) is LookAlike
    assert "not a known torchvision/timm ResNet block" in report.skipped[0][1]


def test_revert_restores_original_classes_and_state():
    """The original classes again, holding the converted model's current state: its parameters and BatchNorm
    buffers as a training step after the conversion left them (not fresh ones, nor those of the conversion)."""
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10)
    randomise_bn(eager, seed=2)
    model = copy.deepcopy(eager)
    fusedres.convert(model)
    x = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    reverted = fusedres.revert(model)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in eager.modules()]
    assert not any(m.training for m in reverted.modules())
    after = reverted.state_dict()
    assert list(after) == list(state)
    for name, value in state.items():
        assert torch.equal(after[name], value), name
    assert not torch.equal(state["bn1.running_var"], eager.bn1.running_var)  # the step moved it
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), expected, rtol=1e-4, atol=1e-4)


def test_filter_fn_and_root_block_conversion():
    model = torchvision.models.resnet18(num_classes=10)
    report = fusedres.convert(model, filter_fn=lambda module, name: name.startswith("layer1"))
    assert [name for name, _ in report.converted] == ["layer1.0", "layer1.1"]
    assert len([why for _, why in report.skipped if why == "rejected by filter_fn"]) == 7
    block = torchvision.models.resnet.BasicBlock(8, 8)
    fused = fusedres.convert(block).model
    assert isinstance(fused, FusedBasicBlock)
    assert fusedres.revert(fused).__class__ is torchvision.models.resnet.BasicBlock


def test_state_dict_loads_both_ways():
    eager = torchvision.models.resnet18(num_classes=10)
    randomise_bn(eager, seed=3)
    fused = fusedres.convert(torchvision.models.resnet18(num_classes=10)).model
    fused.load_state_dict(eager.state_dict())
    back = torchvision.models.resnet18(num_classes=10)
    back.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), eager.eval()(x))
        torch.testing.assert_close(fused.eval()(x), eager(x), rtol=1e-4, atol=1e-4)


def test_fused_blocks_pickle_deepcopy_and_no_grad():
    fused = fusedres.convert(torchvision.models.resnet18(num_classes=10)).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fused(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(pickle.loads(pickle.dumps(fused))(x), expected)
        torch.testing.assert_close(copy.deepcopy(fused)(x), expected)
    assert isinstance(fusedres.revert(loaded).layer1[0], torchvision.models.resnet.BasicBlock)


@pytest.mark.parametrize("name", ["resnet50", "resnetv2_50"])
def test_converted_models_run_on_the_meta_device(name):
    """Shape inference without memory, as on an unconverted model: training forward + backward, and the
    eval forward (the folded path) with and without autocast, whose state meta tensors cannot report."""
    model = timm.create_model(name) if name.startswith("resnetv2") else getattr(torchvision.models, name)()
    fused = fusedres.convert(model).model.to("meta")
    x = torch.empty(2, 3, 64, 64, device="meta", requires_grad=True)
    fused.train()(x).sum().backward()
    assert x.grad.shape == x.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.eval()(x).shape == (2, 1000)
    with torch.no_grad():
        assert fused(x).shape == (2, 1000)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnetv2_50"])
def test_empty_batch_behaves_as_in_eager(name):
    """A batch of 0 images, as eager runs it: an empty output, zero gradients, BatchNorm buffers as eager
    leaves them (running statistics kept, the batch counted), in training and in eval."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10) if name.startswith("resnetv2") else (
        getattr(torchvision.models, name)(num_classes=10))
    randomise_bn(model, seed=1)
    fused = fusedres.convert(copy.deepcopy(model)).model
    for train in (True, False):
        outs = []
        for m in (model, fused):
            x = torch.randn(0, 3, 32, 32, requires_grad=True)
            out = m.train(train)(x)
            out.sum().backward()
            outs.append(out)
        assert outs[1].shape == outs[0].shape == (0, 10)
        torch.testing.assert_close(dict(fused.named_buffers()), dict(model.named_buffers()), rtol=0, atol=0)
        for (n, p), (_, q) in zip(fused.named_parameters(), model.named_parameters()):
            assert p.grad is not None and not p.grad.any(), n
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_requires_grad_false_on_parts_and_memory_efficient_off():
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).double()
    fused = fusedres.convert(copy.deepcopy(eager), memory_efficient=False).model
    for model in (eager, fused):
        model.layer1.requires_grad_(False)
        model.layer2[0].bn1.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 10, (2,))
    assert_same_training(eager, fused, x, target, steps=1, tol=1e-10)
    assert fused.layer1[0].conv1.weight.grad is None


def test_torch_compile_has_no_graph_breaks_on_fused_block():
    torch.manual_seed(0)
    block = fusedres.convert(torchvision.models.resnet.Bottleneck(
        16, 4, downsample=nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)))).model
    x = torch.randn(2, 16, 8, 8)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(copy.deepcopy(block), backend="aot_eager", fullgraph=True)
    eager_block = copy.deepcopy(block)
    torch.testing.assert_close(compiled(x), eager_block(x))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet18(num_classes=10),
                                  lambda: timm.create_model("resnet26d", num_classes=10),
                                  lambda: timm.create_model("resnetv2_50", num_classes=10)],
                         ids=["torchvision-resnet18", "timm-resnet26d", "timm-resnetv2_50"])
def test_torch_jit_trace_of_an_eval_model_passes_its_check(make, grad):
    """torch.jit.trace (TorchScript serving) of a converted eval model: trace's own check, which traces again
    under no_grad, passes with autograd on or off (traced, the units record the running-statistics path, never
    the cached folds), and the traced module computes eager's output from the modules' own weights and
    buffers: changed in place, they change its output as they change eager's."""
    torch.manual_seed(0)
    eager = make().double().eval()
    randomise_bn(eager, seed=7)
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, x)  # check_trace: raises where the check's trace differs
    with torch.no_grad():
        torch.testing.assert_close(traced(x), eager(x), rtol=1e-10, atol=1e-10)
        for m in (eager, model):  # every conv weight and running variance
            for tensor in [p for p in m.parameters() if p.dim() == 4] + [
                    b for name, b in m.named_buffers() if name.endswith("running_var")]:
                tensor.mul_(1.25)
        torch.testing.assert_close(traced(x), eager(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [torchvision.models.resnet50, lambda: timm.create_model("resnetv2_50"),
                                  lambda: timm.create_model("resnet26d")],
                         ids=["torchvision-resnet50", "timm-resnetv2_50", "timm-resnet26d"])
def test_converting_twice_changes_nothing_and_says_so(make):
    """convert on a converted model leaves every module as it is (the norms inside fused pre-activation blocks
    included) and reports the modules already fused in its first line."""
    model = make()
    first = fusedres.convert(model)
    modules = [(name, type(module)) for name, module in model.named_modules()]
    second = fusedres.convert(model)
    assert second.converted == [] and second.skipped == first.skipped
    assert second.already_fused == len(first.converted)
    assert f"left as they are, {len(first.converted)} already fused;" in str(second).splitlines()[0]
    assert [(name, type(module)) for name, module in model.named_modules()] == modules


def test_stem_batchnorm_relu_is_fused_and_reverted():
    torch.manual_seed(0)
    eager = timm.create_model("resnet26d", num_classes=10)
    randomise_bn(eager, seed=4)
    model = copy.deepcopy(eager)
    report = fusedres.convert(model)
    stems = [name for name, what in report.converted if "FusedBatchNormAct2d" in what]
    assert stems == ["bn1", "conv1.1", "conv1.4"]  # timm's deep stem has two inner BN+ReLU
    assert isinstance(model.bn1, FusedBatchNormAct2d) and isinstance(model.act1, ReLUFusedIntoNorm)
    assert model.bn1.weight is eager.bn1.weight or list(model.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)  # training mode
    torch.testing.assert_close(model.bn1.running_mean, eager.bn1.running_mean)
    fusedres.revert(model)
    assert type(model.bn1) is nn.BatchNorm2d and type(model.act1) is nn.ReLU
    assert type(model.conv1[1]) is nn.BatchNorm2d and type(model.conv1[2]) is nn.ReLU
    assert [type(m) for m in model.modules()] == [type(m) for m in eager.modules()]


def test_a_fused_norm_or_its_placeholder_copied_out_of_the_model_copies_that_module_alone():
    """copy.deepcopy or pickling of a fused stem norm alone (deepcopy of the ReLU placeholder too) copies that
    module, not the model its placeholder refers to (once a hidden copy of every parameter): the norm's copy
    applies the ReLU itself, the placeholder's is the ReLU it stands for. Copied or pickled with the model, both
    come back fused."""
    torch.manual_seed(0)
    eager = timm.create_model("resnet26d", num_classes=10).eval()
    randomise_bn(eager, seed=6)
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = torch.randn(2, 64, 8, 8)
    memo = {}
    norm = copy.deepcopy(model.bn1, memo)
    assert [m for m in memo.values() if isinstance(m, nn.Module)] == [norm]
    assert [type(m) for m in (norm, copy.deepcopy(model.act1))] == [FusedBatchNormAct2d, type(eager.act1)]
    pickled = io.BytesIO()
    torch.save(model.bn1, pickled)
    assert pickled.tell() < 8192, pickled.tell()  # the norm's 5 small tensors
    pickled.seek(0)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for alone in (norm, torch.load(pickled, weights_only=False)):
            torch.testing.assert_close(alone(x), eager.act1(eager.bn1(x)), rtol=1e-5, atol=1e-5)
        pickled = io.BytesIO()
        torch.save(model, pickled)
        pickled.seek(0)
        for clone in (copy.deepcopy(model), torch.load(pickled, weights_only=False)):
            assert isinstance(clone.act1, ReLUFusedIntoNorm) and clone.act1.passes_through()
            assert clone.act1._fused_norm is clone.bn1 and clone.act1._parent is clone
            assert clone.bn1.applies_relu(x)
            torch.testing.assert_close(clone(image), model(image), rtol=0, atol=0)
        model.act1 = nn.LeakyReLU(0.1)  # the placeholder replaced: the norm applies no ReLU, nor may its copies
        pickled = io.BytesIO()
        torch.save(model, pickled)
        pickled.seek(0)
        clones = (copy.deepcopy(model), torch.load(pickled, weights_only=False))
        assert model.bn1(x).min() < 0  # (copies applied a ReLU here and the LeakyReLU after it)
        for norm in (clones[0].bn1, clones[1].bn1, copy.deepcopy(model.bn1)):
            torch.testing.assert_close(norm(x), model.bn1(x), rtol=0, atol=0)
        for clone in clones:
            torch.testing.assert_close(clone(image), model(image), rtol=0, atol=0)


def test_a_block_shared_by_two_places_is_converted_and_reverted_as_one_module():
    """A block registered at two places (one module, named_modules names it once) is replaced at both by one fused
    block, and reverted to one block again: it was fused at its first place only, and revert made the two places
    two different modules."""
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).eval()
    eager.layer1[1] = eager.layer1[0]
    model = fusedres.convert(copy.deepcopy(eager)).model
    assert model.layer1[1] is model.layer1[0] and isinstance(model.layer1[0], FusedBasicBlock)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)
    fusedres.revert(model)
    assert model.layer1[1] is model.layer1[0] and type(model.layer1[0]) is torchvision.models.resnet.BasicBlock


def test_report_says_which_backend_runs_and_why():
    report = fusedres.convert(torchvision.models.resnet18(num_classes=10).double())
    assert "the 'torch' backend runs" in report.backend_note
    assert "cuda:" in report.backend_note and "triton:" in report.backend_note
    assert report.backend_note in str(report)


def test_report_names_the_backend_fusedres_backend_or_the_call_asks_for(monkeypatch):
    """FUSEDRES_BACKEND stands in for "auto", so the report names it (it said "auto" would run the torch backend
    where every call then asked for triton); a backend that cannot run on the model's device is said to, and an
    unknown FUSEDRES_BACKEND is refused before the model changes (it raised only at the first forward)."""
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    note = fusedres.convert(torchvision.models.resnet18(num_classes=10)).backend_note
    assert note == "backend 'torch' requested (FUSEDRES_BACKEND)"
    note = fusedres.convert(torchvision.models.resnet18(num_classes=10), backend="cuda").backend_note  # on CPU
    assert note.startswith("backend 'cuda' requested, which cannot run on the model's device now, cpu (")
    assert note.endswith("): a forward there raises (but in eval mode without autograd where every module it runs "
                         "folds its BatchNorms into convs, as post-activation blocks and ResNet stems do)")
    monkeypatch.setenv("FUSEDRES_BACKEND", "bogus")
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="FUSEDRES_BACKEND='bogus' is no backend; expected 'auto' or one of"):
        fusedres.convert(model)
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock


def test_sync_batchnorm_conversion_after_convert_never_loses_the_stem_relu():
    """convert_sync_batchnorm replaces our fused stem norm by a plain SyncBatchNorm: the ReLU
    placeholder must turn back into a ReLU (timm's converter once lost such activations)."""
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).eval()
    randomise_bn(eager, seed=5)
    model = fusedres.convert(copy.deepcopy(eager)).model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model.bn1) is nn.SyncBatchNorm
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # eval: SyncBatchNorm runs as a plain BatchNorm on CPU
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)
        relu_input = -torch.ones(1, 64, 2, 2)
        assert model.relu(relu_input).eq(0).all()
    assert type(fusedres.revert(model).relu) is nn.ReLU


def test_hooks_inside_a_block_keep_it_unconverted_and_hooks_on_it_keep_running():
    """A fused block runs its children's work without calling them: a block with a hook on a child stays
    eager (and says why), so the hook runs; a hook on the block itself runs on the fused block, is removed
    by its original handle, and is the reverted block's again."""
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).eval()
    randomise_bn(eager, seed=5)
    model = copy.deepcopy(eager)
    seen = []
    model.layer1[0].conv2.register_forward_hook(lambda m, i, o: seen.append(("conv2", o.shape)))
    handle = model.layer2[0].register_forward_hook(lambda m, i, o: seen.append(("block", o.shape)))
    model.layer3[0].register_forward_pre_hook(lambda m, i: seen.append(("pre", i[0].shape)))
    model.bn1.register_forward_hook(lambda m, i, o: seen.append(("bn1", o.shape)))
    report = fusedres.convert(model)
    skipped = dict(report.skipped)
    assert "conv2 has forward or backward hooks" in skipped["layer1.0"]
    assert "bn1 has forward or backward hooks" in skipped["bn1"]
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock and type(model.bn1) is nn.BatchNorm2d
    assert isinstance(model.layer2[0], FusedBasicBlock) and isinstance(model.layer3[0], FusedBasicBlock)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)
    assert [name for name, _ in seen] == ["bn1", "conv2", "block", "pre"]
    assert seen[2][1] == (2, 128, 4, 4) and seen[3][1] == (2, 128, 4, 4)
    handle.remove()
    seen.clear()
    with torch.no_grad():
        model(x)
    assert [name for name, _ in seen] == ["bn1", "conv2", "pre"]
    fusedres.revert(model)
    seen.clear()
    with torch.no_grad():
        model(x)
    assert [name for name, _ in seen] == ["bn1", "conv2", "pre"]  # the pre-hook is the reverted block's


FUSED_STEM_MODELS = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "timm-resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm-resnet26d": lambda: timm.create_model("resnet26d", num_classes=10),  # deep stem: its last conv's unit
}


@pytest.fixture
def stem_units(monkeypatch):
    """("folded" or "stats", conv, bn) of every stem run as a unit by ``fusedres.nn.stem``: folded into one
    launch (inference), or the conv and the BatchNorm's statistics as one op (training or autograd)."""
    calls = []
    folded, stats = stem.folded_conv_bias_act, stem.conv_pending_bn

    def folded_spy(owner, x, conv, bn, *args):
        calls.append(("folded", conv, bn))
        return folded(owner, x, conv, bn, *args)

    def stats_spy(x, conv, bn, *args):
        calls.append(("stats", conv, bn))
        return stats(x, conv, bn, *args)

    monkeypatch.setattr(stem, "folded_conv_bias_act", folded_spy)
    monkeypatch.setattr(stem, "conv_pending_bn", stats_spy)
    return calls


@pytest.mark.parametrize("name", FUSED_STEM_MODELS)
def test_stem_runs_as_a_unit_folded_in_inference(name, stem_units):
    """The converted model's stem: folded in eval mode without autograd (and folded again once bn1 changes),
    else the conv with bn1's statistics: outputs, conv1's gradient and bn1's running statistics as eager's."""
    torch.manual_seed(0)
    eager = FUSED_STEM_MODELS[name]().double().eval()
    randomise_bn(eager, seed=6)
    model = fusedres.convert(copy.deepcopy(eager)).model
    assert isinstance(model, type(eager)) and type(model) is not type(eager)
    assert list(model.state_dict()) == list(eager.state_dict())
    stem_conv = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[-1]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-10, atol=1e-10)
        assert stem_units == [("folded", stem_conv, model.bn1)]
        model.bn1.running_mean.add_(0.5)  # changed in place: folded again
        eager.bn1.running_mean.add_(0.5)
        torch.testing.assert_close(model(x), eager(x), rtol=1e-10, atol=1e-10)
    stem_units.clear()
    for m in (model, eager):  # eval mode with autograd (fine-tuning a frozen model), then training
        m(x).square().sum().backward()
        m.train()(x).square().sum().backward()
    assert stem_units == [("stats", stem_conv, model.bn1)] * 2
    eager_conv = eager.conv1 if isinstance(eager.conv1, nn.Conv2d) else eager.conv1[-1]
    torch.testing.assert_close(stem_conv.weight.grad, eager_conv.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.bn1.running_var, eager.bn1.running_var, rtol=1e-10, atol=1e-10)
    fusedres.revert(model)
    assert type(model) is type(eager) and "fusedres_stem_backend" not in vars(model)
    assert "_folded" not in vars(model)


def test_fused_stem_model_pickles_into_a_fresh_process(tmp_path):
    """Pickle names the fused-stem class; a process that never made it finds it on loading."""
    torch.manual_seed(0)
    model = fusedres.convert(torchvision.models.resnet18(num_classes=10)).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), expected)
    torch.save((model, x, expected), tmp_path / "model.pt")
    code = ("import sys, torch; model, x, expected = torch.load(sys.argv[1], weights_only=False); "
            "torch.set_grad_enabled(False); torch.testing.assert_close(model(x), expected); "
            "print(type(model).__qualname__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(fusedres.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FusedStemTorchvisionResNet"


def test_hooks_on_the_stem_keep_the_original_forward(stem_units):
    """A hook on a stem module before conversion: the stem is not folded, and the report says why; one added
    afterwards: the forward runs the stem's modules, so the hook sees conv1's own output."""
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).eval()
    hooked = copy.deepcopy(eager)
    hooked.bn1.register_forward_hook(lambda module, args, out: None)
    report = fusedres.convert(hooked)
    assert type(hooked) is type(eager)
    assert ("conv1", "the stem is not run as a unit: bn1 has forward or backward hooks") in report.skipped
    model = fusedres.convert(copy.deepcopy(eager)).model
    seen = []
    model.conv1.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seen[0], eager.conv1(x))
    assert stem_units == []


def test_a_resnet_inside_another_module_folds_and_a_subclass_does_not():
    class MyResNet(torchvision.models.ResNet):  # its forward may differ from torchvision's: not ours to replace
        pass

    wrapped = nn.Sequential(nn.Identity(), torchvision.models.resnet18(num_classes=10))
    report = fusedres.convert(wrapped)
    assert ("1.conv1" in [name for name, _ in report.converted]) and type(wrapped[1]).__name__.startswith("FusedStem")
    fusedres.revert(wrapped)
    assert type(wrapped[1]) is torchvision.models.ResNet
    mine = MyResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    report = fusedres.convert(mine)
    assert type(mine) is MyResNet and "conv1" not in [name for name, _ in report.converted]
    assert ("conv1", "the stem is not run as a unit: MyResNet subclasses ResNet, whose forward it may change") \
        in report.skipped  # (it was not reported)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gpu_stem_unit_matches_eager(backend, training):
    """ResNet-50's stem on the GPU (bf16 autocast, channels_last, 4 images of 64 px) as the converted model
    runs it (folded in eval mode without autograd; the conv with bn1's statistics in training): its error
    against fp64 at most twice eager's in bf16 plus 1e-2 of the output's scale."""
    reason = None if backend == "auto" else unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    torch.manual_seed(7)
    eager = torchvision.models.resnet50().cuda().train(training)
    randomise_bn(eager, seed=7)
    model = fusedres.convert(copy.deepcopy(eager), backend=backend).model
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)

    def eager_stem(m, x):
        return m.relu(m.bn1(m.conv1(x)))

    with torch.no_grad():
        expected = eager_stem(copy.deepcopy(eager).double(), x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager_out = eager_stem(copy.deepcopy(eager), x)
            ours = model._fused_stem(x)
    assert ours.shape == expected.shape and ours.is_contiguous(memory_format=torch.channels_last)
    err_ours = (ours.double() - expected).abs().max().item()
    err_eager = (eager_out.double() - expected).abs().max().item()
    assert err_ours <= 2 * err_eager + 1e-2 * expected.abs().max().item(), (err_ours, err_eager)


def test_timm_gradient_checkpointing_keeps_working_with_the_stem_unit(stem_units, monkeypatch):
    """timm's forward_features checkpoints the stages when asked; the fused stem's forward does too."""
    checkpointed = []
    checkpoint_seq = timm.models.resnet.checkpoint_seq
    monkeypatch.setattr(timm.models.resnet, "checkpoint_seq",
                        lambda *args, **kwargs: checkpointed.append(1) or checkpoint_seq(*args, **kwargs))
    torch.manual_seed(0)
    eager = timm.create_model("resnet18", num_classes=10).double()
    randomise_bn(eager, seed=8)
    model = fusedres.convert(copy.deepcopy(eager)).model
    for m in (eager, model):
        m.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for m in (eager, model):
        m(x).square().sum().backward()
    assert [kind for kind, _, _ in stem_units] == ["stats"] and len(checkpointed) == 2
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet18(num_classes=10),
                                  lambda: timm.create_model("resnetv2_50", num_classes=10)],
                         ids=["torchvision-resnet18", "timm-resnetv2_50"])
def test_refold_after_writes_through_data_gives_eager_again(make):
    """Writes through ``.data`` (an EMA update written the old way) move no version counter, so the eval folds
    cached before them stay; ``fusedres.refold`` drops them, and the next forward is eager's again (the stem
    and the blocks, post- and pre-activation)."""
    torch.manual_seed(0)
    eager = make().double().eval()
    randomise_bn(eager, seed=3)
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-10, atol=1e-10)
        for m in (eager, model):
            for tensor in [p for p in m.parameters() if p.dim() == 4] + [
                    b for name, b in m.named_buffers() if name.endswith("running_var")]:
                tensor.data.mul_(1.25)
        assert not torch.allclose(model(x), eager(x), rtol=1e-6, atol=1e-6)  # the folds made before the writes
        assert fusedres.refold(model) is model
        torch.testing.assert_close(model(x), eager(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_profile_model_script_reports_host_time_per_module(mode, tmp_path):
    """scripts/profile_model.py (GPU_CHECK_PROFILE in scripts/gpu_check.sh) runs a converted model's inference
    forward or training step on CPU too: it reports the host time of each, per top-level module, the calls that
    can make the host wait, torch.profiler's table and a Chrome trace, so a GPU session does not find it broken."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "profile_model.py"), "--device", "cpu",
                           "--mode", mode, "--model", "resnet18", "--batch", "2", "--size", "32", "--repeats", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "profile.txt").read_text()
    unit = "forward" if mode == "infer" else "training step"
    assert f"host ms a {unit}" in report and "calls that can make the host wait" in report, report
    for module in ("layer1", "layer4", "fc"):
        assert f"\n  {module} " in report, report
    op = "fusedres::conv_bias_act" if mode == "infer" else "fusedres::conv2d_stats"  # the converted units' op
    assert op in report, report
    assert (tmp_path / "trace.json").stat().st_size > 0
