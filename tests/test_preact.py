"""Pre-activation ResNets (timm resnetv2_*) and timm's BatchNormAct2d, fused and converted (CPU).

The converted model must be a drop-in for the untouched one: same state_dict keys, and the same
outputs, loss, every gradient and running statistics after a few SGD steps (fp64: 1e-10).
"""

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, GroupNormAct, SyncBatchNormAct, convert_sync_batchnorm
from timm.models.resnetv2 import PreActBasic, PreActBottleneck
from torch import nn

import fusedres
from fusedres.nn.preact import FusedPreActBasic, FusedPreActBottleneck
from fusedres.nn.timm_norm import FusedTimmBatchNormAct2d
from model_helpers import assert_converted_trains_like_eager, assert_same_training, randomise_bn
from test_op_contracts import same_tensor, saved_tensors_of

F64 = torch.float64

TRAINING_CASES = {
    # name: (model name, extra kwargs, converted modules (blocks + standalone norms), dtype, channels_last, steps)
    "resnetv2_18-fp64": ("resnetv2_18", {}, 9, F64, False, 3),
    "resnetv2_18d-fp64-cl": ("resnetv2_18d", {}, 11, F64, True, 2),
    "resnetv2_50-fp64": ("resnetv2_50", {}, 17, F64, False, 2),
    "resnetv2_50d-drop-path-fp64": ("resnetv2_50d", {"drop_path_rate": 0.3}, 19, F64, False, 2),
    "resnetv2_50t-fp64-cl": ("resnetv2_50t", {}, 19, F64, True, 1),
    "resnetv2_50-fp32-cl": ("resnetv2_50", {}, 17, torch.float32, True, 1),
}


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_converted_resnetv2_trains_like_timm(case):
    name, kwargs, expected, dtype, channels_last, steps = TRAINING_CASES[case]
    torch.manual_seed(len(case))
    assert_converted_trains_like_eager(timm.create_model(name, num_classes=10, **kwargs).to(dtype),
                                       len(case), expected, dtype, channels_last, steps)


def test_resnetv2_101_converts_and_matches_in_eval_and_reverts():
    torch.manual_seed(0)
    eager = timm.create_model("resnetv2_101", num_classes=10).eval()
    randomise_bn(eager, seed=2)
    report = fusedres.convert(eager, inplace=False)
    fused = report.model
    assert sum(isinstance(m, FusedPreActBottleneck) for m in fused.modules()) == 33
    assert isinstance(fused.norm, FusedTimmBatchNormAct2d) and not fused.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-4)
    reverted = fusedres.revert(fused)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in eager.modules()]
    assert not any(m.training for m in reverted.modules())


@pytest.mark.parametrize("name,reason", [
    ("resnetv2_50x1_bit", "norm1 is GroupNormAct"),
    ("resnetv2_50d_gn", "norm1 is GroupNormAct"),
    ("resnetv2_50d_evos", "norm1 is EvoNorm2dS0"),
    ("resnetv2_50d_frn", "norm1 is FilterResponseNormTlu2d"),
])
def test_non_batchnorm_variants_are_left_untouched_and_reported(name, reason):
    model = timm.create_model(name, num_classes=10)
    before = [(n, type(m)) for n, m in model.named_modules()]
    report = fusedres.convert(model)
    assert report.converted == []
    blocks = [why for n, why in report.skipped if n.startswith("stages.")]
    assert len(blocks) == 16 and all(why.startswith(reason) for why in blocks), str(report)
    deep_stem = ["stem.norm1", "stem.norm2"] if "50d" in name else []
    assert [n for n, _ in report.skipped if not n.startswith("stages.")] == deep_stem + ["norm"]
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def _block(kind, inplanes, planes, stride, seed, drop_path_rate=0.0, avg_down=False):
    """A timm pre-activation block with BatchNormAct2d norms and random BN state, in fp64."""
    from timm.models.resnetv2 import DownsampleAvg, DownsampleConv

    torch.manual_seed(seed)
    cls = PreActBasic if kind == "basic" else PreActBottleneck
    proj = None
    if stride != 1 or inplanes != planes:
        proj = DownsampleAvg if avg_down else DownsampleConv
    block = cls(inplanes, planes, stride=stride, conv_layer=timm.layers.create_conv2d,
                norm_layer=BatchNormAct2d, proj_layer=proj, drop_path_rate=drop_path_rate,
                bottle_ratio=1.0 if kind == "basic" else 0.25)
    randomise_bn(block, seed)
    return block.double()


def test_fused_preact_block_keeps_only_pre_bn_tensors_for_backward():
    """The memory rule: autograd keeps x and each conv's output before its BatchNorm (here
    conv1's and conv2's), never a normalised or activated tensor; the shortcut conv reads
    norm1's pending output like conv1 does, so x is not kept twice."""
    block = _block("bottleneck", 8, 16, 2, seed=3)
    fused = fusedres.convert(copy.deepcopy(block)).model
    assert isinstance(fused, FusedPreActBottleneck)
    x = torch.randn(2, 8, 9, 7, dtype=F64, requires_grad=True)
    out, saved = saved_tensors_of(lambda: fused(x))
    params = list(fused.parameters())
    activations = [t for t in saved if t.dim() == 4 and not any(same_tensor(t, p) for p in params)]
    kept = {(t.data_ptr(), tuple(t.shape)) for t in activations}
    mid = fused.conv1.out_channels
    # x, conv1's output (at 9x7) and conv2's (stride 2: 5x4), once each
    assert sorted(shape for _, shape in kept) == [(2, mid, 5, 4), (2, mid, 9, 7), (2, 8, 9, 7)], kept
    assert (x.data_ptr(), tuple(x.shape)) in kept
    torch.testing.assert_close(out, block(x))


@pytest.mark.parametrize("kind,inplanes,planes,stride,avg_down", [
    ("basic", 6, 6, 1, False),
    ("basic", 6, 10, 2, False),
    ("bottleneck", 8, 16, 2, True),
    ("bottleneck", 16, 16, 1, False),
])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_fused_preact_block_matches_timm_forward_backward_and_buffers(
        kind, inplanes, planes, stride, avg_down, memory_efficient):
    block = _block(kind, inplanes, planes, stride, seed=5, drop_path_rate=0.5, avg_down=avg_down)
    fused_cls = FusedPreActBasic if kind == "basic" else FusedPreActBottleneck
    fused = fused_cls.from_module(copy.deepcopy(block), memory_efficient=memory_efficient)
    x = torch.randn(4, inplanes, 7, 9, dtype=F64)
    x_fused = x.clone().requires_grad_()
    x.requires_grad_()
    outputs = []
    for module, inp in ((block, x), (fused, x_fused)):
        torch.manual_seed(11)  # the same drop-path draws
        out = module(inp)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out))
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_fused.grad, x.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(block.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(block.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)
    assert type(fused.to_module()) is type(block)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_drop_path_left_in_training_mode_in_an_eval_block_drops_as_timms(grad):
    """block.eval() then block.drop_path.train(): timm's block drops paths in its eval forward. The fused block
    does the same draws, with autograd and without (where its folded inference forward had left drop_path out)."""
    block = _block("basic", 8, 8, 1, seed=12, drop_path_rate=0.5).eval()
    fused = FusedPreActBasic.from_module(copy.deepcopy(block)).eval()
    for module in (block, fused):
        module.drop_path.train()
    x = torch.randn(4, 8, 6, 6, dtype=F64)
    with torch.set_grad_enabled(grad):
        outputs = []
        for module in (block, fused):
            torch.manual_seed(13)  # the same drop-path draws
            outputs.append(module(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # what was dropped: a draw differs from the forward without drop-path
        block.drop_path.eval()
        assert not torch.allclose(outputs[0], block(x))


def test_norm_replaced_after_conversion_runs_as_a_module():
    """A norm swapped for one the block cannot fuse (here GroupNormAct) is called as it is."""
    block = _block("basic", 8, 8, 1, seed=7)
    fused = FusedPreActBasic.from_module(copy.deepcopy(block))
    for module in (block, fused):
        torch.manual_seed(1)
        module.norm2 = GroupNormAct(8, num_groups=2).double()
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    torch.testing.assert_close(fused(x), block(x))


def test_unsupported_preact_blocks_are_reported():
    block = _block("basic", 8, 8, 1, seed=8)
    block.norm1.act = nn.SiLU()
    reason = FusedPreActBasic.unsupported_reason(block)
    assert reason.startswith("norm1 is BatchNormAct2d(act=SiLU)")
    report = fusedres.convert(nn.Sequential(block))
    assert report.converted == [] and report.skipped[0][1] == reason
    with pytest.raises(ValueError, match="cannot convert: norm1 is BatchNormAct2d"):
        FusedPreActBasic.from_module(block)
    assert "is a basic block, not a bottleneck" in FusedPreActBottleneck.unsupported_reason(
        _block("basic", 8, 8, 1, seed=8))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_fused_timm_batchnormact_with_and_without_residual(relu, training):
    torch.manual_seed(0)
    bn = BatchNormAct2d(6, apply_act=relu).double().train(training)
    randomise_bn(bn, seed=9)
    fused = FusedTimmBatchNormAct2d.from_module(copy.deepcopy(bn))
    assert fused.relu is relu and list(fused.state_dict()) == list(bn.state_dict())
    x = torch.randn(3, 6, 5, 4, dtype=F64, requires_grad=True)
    residual = torch.randn(3, 6, 5, 4, dtype=F64, requires_grad=True)
    out = fused(x, residual)
    reference = copy.deepcopy(bn)
    reference.act = nn.Identity()  # apply the act after the residual add, by hand
    expected = reference(x) + residual
    expected = expected.relu() if relu else expected
    torch.testing.assert_close(out, expected)
    # the input's, the residual's, and the BatchNorm's weight and bias gradients
    grads = torch.autograd.grad(out.square().sum(), (x, residual, fused.weight, fused.bias))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, residual, reference.weight, reference.bias))
    for name, g, e in zip(("x", "residual", "weight", "bias"), grads, expected_grads):
        torch.testing.assert_close(g, e, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # updated as timm's, in training
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), rtol=1e-12, atol=1e-12,
                                   msg=name)
    torch.testing.assert_close(fused(x), copy.deepcopy(bn)(x) if not training else bn(x))


def test_timm_batchnormact_with_other_activation_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU))
    report = fusedres.convert(model)
    assert report.converted == [] and report.skipped == [("1", "act SiLU is not fused (ReLU or none only)")]
    assert type(model[1]) is BatchNormAct2d


def test_timm_sync_batchnorm_conversion_keeps_fusion_and_activations():
    torch.manual_seed(0)
    eager = timm.create_model("resnetv2_18d", num_classes=10).double()
    randomise_bn(eager, seed=10)
    fused = convert_sync_batchnorm(fusedres.convert(copy.deepcopy(eager)).model)
    assert isinstance(fused.stages[1].blocks[0], FusedPreActBasic)
    assert type(fused.stages[1].blocks[0].norm1) is SyncBatchNormAct
    assert type(fused.norm) is SyncBatchNormAct and type(fused.norm.act) is nn.ReLU
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    target = torch.randint(0, 10, (2,))
    # Without torch.distributed initialised SyncBatchNorm normalises like BatchNorm2d.
    assert_same_training(eager, fused, x, target, steps=2, tol=1e-10)


def test_torch_sync_batchnorm_conversion_keeps_the_block_activations():
    """torch's converter turns each BatchNormAct2d into a plain SyncBatchNorm that keeps the
    ``act`` child but never calls it; the fused blocks still apply it."""
    block = _block("bottleneck", 8, 8, 1, seed=12).eval()
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(FusedPreActBottleneck.from_module(copy.deepcopy(block)))
    assert type(fused.norm2) is nn.SyncBatchNorm and type(fused.norm2.act) is nn.ReLU
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x))


def test_torch_compile_has_no_graph_breaks_on_fused_preact_block():
    block = FusedPreActBottleneck.from_module(_block("bottleneck", 8, 16, 2, seed=13))
    x = torch.randn(2, 8, 8, 8, dtype=F64)
    assert torch._dynamo.explain(block)(x).graph_break_count == 0
    compiled = torch.compile(copy.deepcopy(block), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), copy.deepcopy(block)(x))
