"""A converted model keeps eager's module state and follows changes made to it after conversion: each child's
train/eval mode, BatchNorm subclasses and replaced norms or activations, hooks added later, torch.fx tracing,
the BatchNorm counters of a forward that raised, and the block's own hooks on an empty batch."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import BatchNormAct2d
from timm.models.resnetv2 import PreActBasic
from torch import nn
from torch.autograd import forward_ad
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

import fusedres
from fusedres.nn.timm_norm import FusedTimmBatchNormAct2d
from model_helpers import randomise_bn

F64 = torch.float64


def _resnet18(norm_layer=None) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer).double().eval()
    randomise_bn(model, seed=3)
    return model


def _x(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _plain_conv(i, o, k, stride=1, dilation=1, groups=1, **kwargs):
    """A zero-padded nn.Conv2d for timm's blocks (timm's default conv layer is not one)."""
    return nn.Conv2d(i, o, k, stride, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False)


def _batch_norm_modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_convert_revert_and_an_empty_batch_keep_each_batchnorms_mode():
    """Frozen BatchNorms (model.train(), then bn.eval()) stay frozen through convert, an empty batch and revert:
    the fused block sets its own mode only, and a training step matches eager's, running statistics untouched."""
    eager = _resnet18().train()
    for m in eager.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model = copy.deepcopy(eager)
    fusedres.convert(model)
    assert model.layer1[0].training and not any(_batch_norm_modes(model))
    x = _x(2, 3, 32, 32)
    torch.testing.assert_close(model(x), eager(x))
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, eager.layer1[0].bn1.running_mean)
    model.layer1[0](torch.zeros(0, 64, 8, 8, dtype=F64))
    assert not any(_batch_norm_modes(model))
    fusedres.revert(model)
    assert model.layer1[0].training and not any(_batch_norm_modes(model))


class _ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d whose forward computes something else (an extra output scale)."""

    def forward(self, x):
        return super().forward(x) * 2.0


class _ScaledBNAct(BatchNormAct2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def _put_in_with_the_same_state(models, name: str, norm_class: type) -> None:
    """Replace each model's norm ``name`` by a float64 eval-mode ``norm_class`` holding that norm's state."""
    for model in models:
        norm = norm_class(getattr(model, name).num_features).double().eval()
        norm.load_state_dict(getattr(model, name).state_dict())
        setattr(model, name, norm)


def test_batchnorm_subclasses_with_a_forward_of_their_own_are_not_fused():
    """The stem and the pre-activation blocks fuse exactly nn.BatchNorm2d / SyncBatchNorm (and timm's
    BatchNormAct2d): a subclass, there at conversion or put in afterwards, is called as a module."""
    eager = _resnet18(norm_layer=_ScaledBN)
    model = copy.deepcopy(eager)
    report = fusedres.convert(model)
    assert ("conv1", "the stem is not run as a unit: the stem is conv1 -> _ScaledBN -> ReLU, not conv -> BatchNorm "
            "-> ReLU") in report.skipped
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))
    # put in after conversion: in the stem, and in a converted pre-activation block
    eager, model = _resnet18(), fusedres.convert(_resnet18()).model
    _put_in_with_the_same_state((eager, model), "bn1", _ScaledBN)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))

    torch.manual_seed(0)
    block = PreActBasic(8, 8, norm_layer=_ScaledBNAct, conv_layer=_plain_conv).double().eval()
    randomise_bn(block, seed=4)
    assert type(fusedres.convert(copy.deepcopy(block)).model) is PreActBasic
    eager = PreActBasic(8, 8, norm_layer=BatchNormAct2d, conv_layer=_plain_conv).double().eval()
    randomise_bn(eager, seed=4)
    fused = fusedres.convert(copy.deepcopy(eager)).model
    y = _x(2, 8, 6, 6)
    _put_in_with_the_same_state((eager, fused), "norm2", _ScaledBNAct)
    with torch.no_grad():
        torch.testing.assert_close(fused(y), eager(y))


def _freeze_batch_norms(module: nn.Module) -> None:
    """torchvision's detection fine-tuning swap: every BatchNorm2d -> FrozenBatchNorm2d with its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features).double()
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_norms_replaced_by_frozen_batchnorm_after_conversion(training, grad):
    """A post-activation block whose BatchNorms became FrozenBatchNorm2d runs the original block's forward."""
    eager = _resnet18()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # eval: the blocks' folds and chains are kept, and must not be run again
    for m in (eager, model):
        _freeze_batch_norms(m)
        m.train(training)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(model(x), eager(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("padding", [dict(padding_mode="reflect"), dict(padding="same")], ids=["reflect", "same"])
def test_a_conv_padding_we_do_not_fuse_set_after_a_forward_runs_the_original_forward(padding, training):
    """A block's conv given a padding_mode or a padding string after the block ran fused (which convert would
    have refused): the block runs the original forward, eager's result (it had kept the fused one)."""
    eager = _resnet18()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        for m in (eager, model):
            m.train(training)(x), m(x)  # in eval: the blocks' folds and chains kept
            for name, value in padding.items():
                setattr(m.layer1[1].conv1, name, value)
        torch.testing.assert_close(model(x), eager(x))


def test_hooks_added_after_conversion_run():
    """A forward or backward hook put on a block's child after conversion, or a global one, makes the block
    run the original forward, also in eval mode after a forward that recorded the block's chain."""
    eager = _resnet18()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(1, 3, 32, 32)
    with torch.no_grad():
        model(x), model(x)  # the blocks' chains recorded and replayed
    seen = {}
    for name, m in (("eager", eager), ("fused", model)):
        handle = m.layer4[1].conv2.register_forward_hook(lambda mod, i, out, name=name: seen.update({name: out}))
        with torch.no_grad():
            torch.testing.assert_close(model(x), eager(x))
        handle.remove()
    torch.testing.assert_close(seen["fused"], seen["eager"])

    grads = {}
    for name, m in (("eager", eager), ("fused", model)):
        m.layer2[0].downsample[1].register_full_backward_hook(
            lambda mod, grad_in, grad_out, name=name: grads.update({name: grad_out[0]}))
        m(x).sum().backward()
    torch.testing.assert_close(grads["fused"], grads["eager"])

    calls = {"eager": _modules_called(eager, x), "fused": _modules_called(model, x)}
    assert calls["fused"].count("Conv2d") == calls["eager"].count("Conv2d") == 20


def _modules_called(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The class names of the modules a global forward hook sees called in ``model(x)`` (no grad), in order."""
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, out: calls.append(type(mod).__name__))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return calls


def test_activations_replaced_after_conversion_are_applied():
    """A block's ReLU, or the stem's (now the placeholder of the ReLU fused into bn1), replaced after conversion
    is applied as eager applies it; a hook on the fused bn1 sees the BatchNorm's output, before the ReLU."""
    eager = _resnet18()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 32, 32)
    mins = {}
    for name, m in (("eager", eager), ("fused", model)):
        handle = m.bn1.register_forward_hook(lambda mod, i, out, name=name: mins.update({name: out.min()}))
        with torch.no_grad():
            m(x)
        handle.remove()
    assert mins["eager"] < 0
    torch.testing.assert_close(mins["fused"], mins["eager"])
    for m in (eager, model):
        m.layer1[0].relu = nn.LeakyReLU(0.5)
        m.relu = nn.LeakyReLU(0.25)
    with torch.no_grad():
        torch.testing.assert_close(model.relu(model.bn1(model.conv1(x))), eager.relu(eager.bn1(eager.conv1(x))))
        torch.testing.assert_close(model(x), eager(x))


@pytest.mark.parametrize("name", ["resnet18", "timm resnet18d", "timm resnetv2_18"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_runs_the_original_modules(name, training):
    """Inside torch.autograd.forward_ad.dual_level the converted modules (blocks, the stem, fused norms and timm's
    norms) compute with torch's own modules, which have forward derivatives: the primal and tangent are eager's and
    the buffers end as eager's, where the fused ops raised NotImplementedError (no jvp) having counted a batch."""
    if name == "resnet18":
        eager = _resnet18()
    else:
        torch.manual_seed(0)
        eager = timm.create_model(name.split()[1], num_classes=5).double()
        randomise_bn(eager, seed=3)
    model = fusedres.convert(copy.deepcopy(eager)).model
    x, tangent = _x(2, 3, 32, 32), _x(2, 3, 32, 32, seed=2)
    outputs = []
    for m in (eager, model):
        m.train(training)
        with forward_ad.dual_level():
            out = forward_ad.unpack_dual(m(forward_ad.make_dual(x, tangent)))
        outputs.append((out.primal, out.tangent))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.state_dict(), eager.state_dict(), rtol=0, atol=0)
    with torch.no_grad():  # outside, the fused forward again
        torch.testing.assert_close(model.eval()(x), eager.eval()(x), rtol=1e-10, atol=1e-12)


def test_torch_fx_traces_a_converted_model_as_the_original():
    """symbolic_trace and torchvision's create_feature_extractor trace the original modules' computation: the
    graphs compute eager's outputs, count batches as eager in training mode, and the model keeps its mode."""
    eager = _resnet18()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # eval: folds and chains kept, which a trace must not run
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), eager(x))
        torch.testing.assert_close(torch.fx.symbolic_trace(model.layer2[0])(_x(2, 64, 8, 8)),
                                   eager.layer2[0](_x(2, 64, 8, 8)))
        stem = nn.Sequential(model.conv1, model.bn1, model.relu)
        torch.testing.assert_close(torch.fx.symbolic_trace(stem)(x), eager.relu(eager.bn1(eager.conv1(x))))
    extractors = [create_feature_extractor(m, {"layer3": "f"}) for m in (eager, model)]
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(extractors[1](x)["f"], extractors[0](x)["f"])
    for extractor in extractors:
        extractor.train()(x)
    torch.testing.assert_close(model.state_dict(), eager.state_dict())
    assert model.bn1.num_batches_tracked == 1


def test_a_forward_that_raises_leaves_the_batchnorm_counters_as_eager_does():
    """Eager's conv raises before its BatchNorm counts the batch, and its BatchNorm raises on a 3-D input before
    it counts it, but after counting it on one value per channel; so do the fused blocks."""
    eager = BasicBlock(8, 8).double().train()
    for bn in (eager.bn1, eager.bn2):
        bn.momentum = None  # the cumulative average: a wrong count changes the next step's statistics
    fused = fusedres.convert(copy.deepcopy(eager)).model
    for bad in (_x(2, 4, 6, 6), _x(8, 6, 6), _x(1, 8, 1, 1)):
        for block in (eager, fused):
            with pytest.raises((RuntimeError, ValueError)):
                block(bad)
        torch.testing.assert_close(fused.state_dict(), eager.state_dict())
    assert eager.bn1.num_batches_tracked == 1  # the last bad input was counted
    x = _x(2, 8, 6, 6)
    torch.testing.assert_close(fused(x), eager(x))
    torch.testing.assert_close(fused.state_dict(), eager.state_dict())


@pytest.mark.parametrize("eps", [-1.0, 0.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_batchnorm_eps_that_torch_refuses_raises_its_error(eps, training, grad):
    """A BatchNorm eps <= 0 in training, < 0 in eval, raises F.batch_norm's ValueError (torch 2.14), in a block and in
    the stem, with the buffers left as eager leaves them; where fusedres computed NaN (a negative variance + eps under
    the square root) or, at eps 0 in training, a finite output eager refuses."""
    refuses = eps < 0 or training
    try:
        F.batch_norm(_x(2, 3, 2, 2), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), training=training, eps=eps)
        if refuses:
            pytest.skip("this torch's F.batch_norm takes this eps")
    except ValueError:
        if not refuses:
            pytest.skip("this torch's F.batch_norm refuses this eps (torch < 2.14: eps 0 in eval too)")
    eager = _resnet18().train(training)
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 32, 32)
    for name in ("layer1.0.bn1", "bn1"):
        for m in (eager, model):
            m.get_submodule(name).eps = eps
        errors = []
        for m in (eager, model):
            with torch.set_grad_enabled(grad):
                if refuses:
                    with pytest.raises(ValueError) as error:
                        m(x)
                    errors.append(str(error.value))
                else:
                    errors.append(m(x))
        if refuses:
            assert "eps must be" in errors[0] and errors[1] == (
                f"batch_norm eps must be {'positive during training' if training else 'non-negative'}, but got {eps}")
        else:
            torch.testing.assert_close(errors[1], errors[0])
        torch.testing.assert_close(model.state_dict(), eager.state_dict())
        for m in (eager, model):
            m.get_submodule(name).eps = 1e-5


def test_a_forward_on_a_backend_that_cannot_run_counts_no_batch():
    """A converted model told to run a backend that cannot run on its device (the CUDA kernels, on CPU tensors)
    raises fusedres's error, and its BatchNorms count no batch: eager would not have failed."""
    model = fusedres.convert(_resnet18().train(), backend="cuda").model
    before = copy.deepcopy(model.state_dict())
    for _ in range(2):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            model(_x(2, 3, 32, 32))
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_input_that_is_no_tensor_gets_torchs_error(training):
    """A list for x: the converted stem, blocks and fused norm raise what torch's modules raise (the conv's
    TypeError; BatchNorm's AttributeError), where the stem had raised AttributeError ('list' object has no attribute
    'numel')."""
    eager = _resnet18().train(training)
    model = fusedres.convert(copy.deepcopy(eager)).model
    for name in ("", "layer1.0", "layer2.0", "bn1"):
        raised = []
        for m in (eager, model):
            with pytest.raises(Exception) as error:
                m.get_submodule(name)([[1.0]])
            raised.append(type(error.value))
        assert raised[1] is raised[0] and raised[0] in (TypeError, AttributeError), (name, raised)
    torch.testing.assert_close(model.state_dict(), eager.state_dict(), rtol=0, atol=0)


def test_an_empty_batch_runs_the_blocks_own_hooks_once():
    calls = {}
    for name in ("eager", "fused"):
        block = BasicBlock(8, 8).double()
        forward, backward = [], []
        block.register_forward_hook(lambda *args: forward.append(1))
        block.register_full_backward_hook(lambda *args: backward.append(1))
        if name == "fused":
            block = fusedres.convert(block).model
        x = torch.zeros(0, 8, 4, 4, dtype=F64, requires_grad=True)
        block(x).sum().backward()
        calls[name] = (len(forward), len(backward))
    assert calls["fused"] == calls["eager"] == (1, 1)


def test_converting_a_block_itself_leaves_its_norms_to_it():
    """convert(block) fuses the block and leaves its timm norms as they are (the block runs them): they are
    inside a residual block, as they would be in a model."""
    block = PreActBasic(8, 8, norm_layer=BatchNormAct2d, conv_layer=_plain_conv)
    report = fusedres.convert(block)
    assert report.converted == [("", "PreActBasic -> FusedPreActBasic")]
    assert type(report.model.norm1) is BatchNormAct2d and type(report.model.norm2) is BatchNormAct2d


def test_torch_fx_traces_a_converted_timm_resnet():
    """timm's ResNet (its stem a deep one with BatchNorm + ReLU pairs in a Sequential) traces with torch.fx."""
    torch.manual_seed(0)
    eager = timm.create_model("resnet26d", num_classes=5).double().eval()
    randomise_bn(eager, seed=6)
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), eager(x))


def _tiny_resnetv2() -> nn.Module:
    """A two-stage timm pre-activation ResNet, fp64 with random BN state, whose deep stem's two norms and final
    norm are BatchNormAct2d with a ReLU outside residual blocks (convert makes them FusedTimmBatchNormAct2d)."""
    torch.manual_seed(0)
    model = timm.models.resnetv2.ResNetV2(
        layers=[1, 1], channels=(8, 16), num_classes=5, stem_chs=8, stem_type="deep", basic=True, bottle_ratio=1.0,
        conv_layer=timm.layers.create_conv2d, norm_layer=BatchNormAct2d, avg_down=True).double().eval()
    randomise_bn(model, seed=11)
    return model


def _fused_timm_norms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m).__name__ == "FusedTimmBatchNormAct2d"]


@pytest.mark.parametrize("training", [False, True])
def test_timm_norm_activations_replaced_after_conversion_are_applied(training):
    """A converted timm norm's act replaced after conversion (another activation, or none instead of its ReLU) is
    applied as timm applies it: the outputs, the gradients and the running statistics are eager's."""
    eager = _tiny_resnetv2()
    model = fusedres.convert(copy.deepcopy(eager)).model
    assert _fused_timm_norms(model) == ["stem.norm1", "stem.norm2", "norm"]
    for m in (eager, model):
        m.stem.norm1.act = nn.SiLU()
        m.stem.norm2.act = nn.Identity()
        m.norm.act = nn.LeakyReLU(0.5)
        m.train(training)
    x = _x(2, 3, 16, 16)
    outs = [m(x) for m in (eager, model)]
    torch.testing.assert_close(outs[1], outs[0])
    grads = [torch.autograd.grad(out.square().sum(), m.stem.conv1.weight) for out, m in zip(outs, (eager, model))]
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(model.state_dict(), eager.state_dict())


@pytest.mark.parametrize("apply_act", [True, False])
def test_timm_norm_drop_and_act_replaced_after_conversion_with_and_without_a_residual(apply_act):
    """A converted timm norm follows a drop (a Dropout, in training mode) and an act (a ReLU where it had none, a
    LeakyReLU where it had a ReLU) put in after conversion: act(drop(batch_norm(x))), and with a residual
    act(drop(batch_norm(x)) + residual), with timm's random draws and running statistics."""
    bn = BatchNormAct2d(6, apply_act=apply_act).double().train()
    randomise_bn(bn, seed=12)
    fused = fusedres.convert(nn.Sequential(copy.deepcopy(bn))).model[0]
    assert _fused_timm_norms(nn.Sequential(fused)) == ["0"]
    for m in (bn, fused):
        m.drop = nn.Dropout(0.5)
        m.act = nn.LeakyReLU(0.5) if apply_act else nn.ReLU()
    x, residual = _x(3, 6, 5, 4), _x(3, 6, 5, 4, seed=2)
    outs = []
    for m in (bn, fused):
        torch.manual_seed(5)
        outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0])
    reference = copy.deepcopy(bn)
    reference.act = nn.Identity()  # the act after the residual add, by hand
    torch.manual_seed(6)
    expected = bn.act(reference(x) + residual)
    torch.manual_seed(6)
    torch.testing.assert_close(fused(x, residual), expected)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict())


def test_hooks_added_after_conversion_on_timm_norm_children_run():
    """Forward-pre, forward and backward hooks put on a converted timm norm's act or drop after conversion run
    and see eager's values, and a global hook sees the act and drop calls eager makes."""
    eager = _tiny_resnetv2()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 16, 16)
    seen = {"eager": {}, "fused": {}}
    for name, m in (("eager", eager), ("fused", model)):
        m.norm.act.register_forward_pre_hook(lambda mod, i, name=name: seen[name].update(act_input=i[0].clone()))
        m.stem.norm1.drop.register_forward_hook(lambda mod, i, out, name=name: seen[name].update(drop_output=out))
        m.stem.norm2.act.inplace = False  # a full backward hook takes no in-place module
        m.stem.norm2.act.register_full_backward_hook(
            lambda mod, grad_in, grad_out, name=name: seen[name].update(act_grad=grad_out[0]))
        m(x).square().sum().backward()
    assert set(seen["fused"]) == {"act_input", "drop_output", "act_grad"}
    torch.testing.assert_close(seen["fused"], seen["eager"])

    calls = {"eager": _modules_called(eager, x), "fused": _modules_called(model, x)}
    acts = {name: [n for n in names if n in ("Identity", "ReLU")] for name, names in calls.items()}
    assert acts["fused"] == acts["eager"] and len(acts["eager"]) == 18


def test_torch_fx_traces_converted_timm_norms_as_the_original():
    """symbolic_trace of a model with converted timm norms records timm's forward, as the original's trace does:
    in training mode the graphs compute the same outputs and running statistics (the batch counter is bumped at
    trace time, not by the graph), and an act replaced after conversion is in the graph."""
    eager = _tiny_resnetv2().train()
    model = fusedres.convert(copy.deepcopy(eager)).model
    x = _x(2, 3, 16, 16)
    graphs = [torch.fx.symbolic_trace(m) for m in (eager, model)]
    for _ in range(2):
        torch.testing.assert_close(graphs[1](x), graphs[0](x))
    torch.testing.assert_close(model.state_dict(), eager.state_dict())
    for m in (eager, model):
        m.norm.act = nn.LeakyReLU(0.5)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), eager(x))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_a_timm_norm_constructed_directly_is_timms_with_its_activation(relu):
    """FusedTimmBatchNormAct2d(C, ...) made by its constructor (not from_module) has timm's children for ``relu``
    (a ReLU act where it applies one), its device and dtype where asked, and computes what timm's module does:
    device and dtype were passed by position into timm's apply_act and act_layer (act an Identity, relu True)."""
    torch.manual_seed(0)
    fused = FusedTimmBatchNormAct2d(6, relu=relu, dtype=torch.float64).eval()
    eager = BatchNormAct2d(6, apply_act=relu, dtype=torch.float64).eval()
    assert type(fused.act) is type(eager.act) is (nn.ReLU if relu else nn.Identity)
    assert fused.weight.dtype == torch.float64
    randomise_bn(eager, seed=7)
    fused.load_state_dict(eager.state_dict())
    x = _x(2, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x))
