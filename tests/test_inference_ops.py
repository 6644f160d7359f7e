"""The inference path (fusedres.ops.inference): BatchNorm folding, the folded-weight cache and
the one-launch conv + bias (+ residual) (+ ReLU) op, its backends and its dispatch.

On CPU the torch backend runs, the Triton one under the interpreter (when fusedres.triton.conv
exists); cuDNN and the measured dispatch are tested on a GPU (its mechanism, on CPU too, in
test_dispatch.py).
"""

import copy
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import pretend_capturing, requires_cuda
from fusedres.ops import dispatch, folded_units, inference
from fusedres.ops.inference import FoldedWeights, conv_bias_act, fold_batch_norm
from op_helpers import F32, F64, assert_close, positive, randn, to_format, within

BF16 = torch.bfloat16
OP = torch.ops.fusedres.conv_bias_act.default


def make_pair(gen, in_ch=4, out_ch=6, *, bias=True, affine=True, eps=1e-5, dtype=F32, var_scale=1.0):
    """A conv and an eval-mode BatchNorm with random weights and running statistics."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(out_ch, eps=eps, affine=affine)
    with torch.no_grad():
        conv.weight.copy_(randn(gen, *conv.weight.shape) * 0.3)
        if bias:
            conv.bias.copy_(randn(gen, out_ch))
        if affine:
            bn.weight.copy_(positive(gen, out_ch))
            bn.bias.copy_(randn(gen, out_ch))
        bn.running_mean.copy_(randn(gen, out_ch))
        bn.running_var.copy_(positive(gen, out_ch) * var_scale)
    return conv.to(dtype).eval(), bn.to(dtype).eval()


def fold(conv, bn, eps=None, dtype=None):
    return fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                           bn.bias, bn.eps if eps is None else eps, dtype)


# --------------------------------------------------------------------------- fold_batch_norm
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["conv_bias", "no_conv_bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_fold_matches_bn_of_conv(dtype, conv_bias, affine):
    gen = torch.Generator().manual_seed(10 + 2 * conv_bias + affine)
    conv, bn = make_pair(gen, bias=conv_bias, affine=affine, dtype=dtype)
    x = randn(gen, 2, 4, 7, 5, dtype=dtype)
    weight, bias = fold(conv, bn)
    assert weight.dtype == bias.dtype == dtype
    with torch.no_grad():
        assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)), dtype, "folded conv")


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_fold_includes_eps(dtype):
    """eps = 0.1 against running variances of 0.005..0.015: leaving eps out is far off."""
    gen = torch.Generator().manual_seed(11)
    conv, bn = make_pair(gen, eps=1e-1, var_scale=0.01, dtype=dtype)
    x = randn(gen, 2, 4, 6, 6, dtype=dtype)
    with torch.no_grad():
        expected = bn(conv(x))
        assert_close(F.conv2d(x, *fold(conv, bn), padding=1), expected, dtype, "with eps")
        without_eps = F.conv2d(x, *fold(conv, bn, eps=0.0), padding=1)
    assert (without_eps - expected).abs().max() > 1.0


@pytest.mark.parametrize("source_dtype", [BF16, F32], ids=["bf16_weights", "fp32_weights_to_bf16"])
def test_fold_in_fp32_then_cast(source_dtype):
    """bf16 results equal the fp64 fold rounded once to bf16 (up to a double-rounding ulp),
    not a fold computed in bf16 arithmetic."""
    gen = torch.Generator().manual_seed(12)
    conv, bn = make_pair(gen, in_ch=16, out_ch=32, dtype=source_dtype)
    weight, bias = fold(conv, bn, dtype=BF16)
    conv64, bn64 = copy.deepcopy(conv).to(F64), copy.deepcopy(bn).to(F64)
    ref_weight, ref_bias = (t.to(BF16) for t in fold(conv64, bn64))
    for name, ours, ref in (("weight", weight, ref_weight), ("bias", bias, ref_bias)):
        assert ours.dtype == BF16
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2 ** -7, atol=0, msg=name)
        assert (ours == ref).float().mean() > 0.98, name


def test_fold_rejects_wrong_channel_count():
    gen = torch.Generator().manual_seed(13)
    conv, bn = make_pair(gen)
    with pytest.raises(ValueError, match="running_var should contain 6 elements.*not 5"):
        fold_batch_norm(conv.weight, None, bn.running_mean, bn.running_var[:5], None, None, 1e-5)


# --------------------------------------------------------------------------- FoldedWeights
@pytest.fixture
def pair():
    return make_pair(torch.Generator().manual_seed(20))


def assert_fold_of(folded, conv, bn):
    expected = fold(conv, bn)
    for got, want in zip(folded, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cache_returns_same_tensors_when_unchanged(pair):
    conv, bn = pair
    cache = FoldedWeights()
    with torch.no_grad():
        first = cache.get(conv, bn)
        second = cache.get(conv, bn)
    assert first[0] is second[0] and first[1] is second[1]
    assert_fold_of(first, conv, bn)
    assert first[0].grad_fn is None and not first[0].requires_grad


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("implementation", [dict(foreach=False), dict(foreach=True), dict(fused=True)],
                         ids=["for_loop", "foreach", "fused"])
def test_cache_refolds_after_optimizer_step(pair, optimizer_class, implementation):
    """Every optimizer implementation's step is seen, the fused ones' too, which move no version counter (torch
    2.14, CPU): the fold is made again from the new weights."""
    conv, bn = pair
    cache = FoldedWeights()
    with torch.no_grad():
        before = cache.get(conv, bn)
    optimizer = optimizer_class([*conv.parameters(), *bn.parameters()], lr=0.1, **implementation)
    bn(conv(torch.randn(2, 4, 5, 5))).square().sum().backward()  # eval mode: running stats kept
    optimizer.step()
    with torch.no_grad():
        after = cache.get(conv, bn)
    assert after[0] is not before[0] and not torch.equal(after[0], before[0])
    assert_fold_of(after, conv, bn)


def test_cache_refolds_after_running_stats_update(pair):
    conv, bn = pair
    cache = FoldedWeights()
    with torch.no_grad():
        before = cache.get(conv, bn)
        bn.train()(torch.randn(4, 6, 3, 3) * 3 + 1)  # a training step updates the stats in place
        bn.eval()
        after = cache.get(conv, bn)
    assert not torch.equal(after[1], before[1])
    assert_fold_of(after, conv, bn)


def test_cache_refolds_after_load_state_dict(pair):
    conv, bn = pair
    unit = nn.Sequential(conv, bn)
    other = nn.Sequential(*make_pair(torch.Generator().manual_seed(21)))
    cache = FoldedWeights()
    with torch.no_grad():
        cache.get(conv, bn)
        unit.load_state_dict(other.state_dict())
        after = cache.get(conv, bn)
    assert_fold_of(after, other[0], other[1])


def test_cache_refolds_after_dtype_change_and_new_parameter(pair):
    conv, bn = pair
    cache = FoldedWeights()
    with torch.no_grad():
        cache.get(conv, bn)
        conv.to(F64), bn.to(F64)
        after = cache.get(conv, bn)
        assert after[0].dtype == after[1].dtype == F64
        assert_fold_of(after, conv, bn)
        conv.weight = nn.Parameter(conv.weight * 2)
        assert_fold_of(cache.get(conv, bn), conv, bn)
        bn.eps = 0.5
        assert_fold_of(cache.get(conv, bn), conv, bn)
        assert cache.get(conv, bn, BF16)[0].dtype == BF16


def test_cache_refolds_when_a_new_storage_takes_the_old_address(pair):
    """``module.half().float()`` gives every weight a new storage and assigns it through ``.data``,
    which keeps the Parameter and its version counter; a caching allocator may place the new storage
    at the address the old one was freed from. Emulated exactly: two storages over one numpy buffer."""
    conv, bn = pair
    buffer = conv.weight.detach().numpy().copy()
    conv.weight.data = torch.from_numpy(buffer)
    cache = FoldedWeights()
    with torch.no_grad():
        cache.get(conv, bn)
        buffer *= 2  # the new values, written below torch
        address, version = conv.weight.data_ptr(), conv.weight._version
        conv.weight.data = torch.from_numpy(buffer)  # a new storage at the same address
        assert (conv.weight.data_ptr(), conv.weight._version) == (address, version)
        assert_fold_of(cache.get(conv, bn), conv, bn)


def test_cache_keeps_state_dict_and_holds_no_buffers(pair):
    conv, bn = pair

    class Unit(nn.Module):
        def __init__(self, cache):
            super().__init__()
            self.conv, self.bn = conv, bn
            if cache:
                self.folded = FoldedWeights()

    unit = Unit(cache=True)
    with torch.no_grad():
        unit.folded.get(unit.conv, unit.bn)
    assert list(unit.state_dict()) == list(Unit(cache=False).state_dict())
    assert list(unit.buffers()) == list(bn.buffers())


def test_cache_refuses_training(pair):
    conv, bn = pair
    cache = FoldedWeights()
    with pytest.raises(RuntimeError, match="is for inference.*torch.no_grad"):
        cache.get(conv, bn)  # grad mode on and the parameters require grad
    bn.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="training mode"):
        cache.get(conv, bn)
    untracked = nn.BatchNorm2d(6, track_running_stats=False).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="no running statistics"):
        cache.get(conv, untracked)


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no_bias", "bias"])
def test_without_a_batchnorm_the_fold_is_the_convs_own_weight_kept_in_the_dtype_asked_for(pair, conv_bias):
    """bn None: the conv's weight and bias, detached; in their own dtype views of them (the same storage and
    version counter, so the Triton conv keeps the weight's packing), in another (autocast's) a cast made once;
    kept while the sources are unchanged, made again after an in-place update or a new parameter."""
    from fusedres.triton import conv_args

    conv, _ = pair
    if not conv_bias:
        conv.bias = None
    cache = FoldedWeights()
    with torch.no_grad():
        weight, bias = cache.get(conv, None)
        assert weight.data_ptr() == conv.weight.data_ptr() and weight._version == conv.weight._version
        assert not weight.requires_grad and (bias is None) == (not conv_bias)
        assert conv_args._packed_weight(weight, 1) is conv_args._packed_weight(weight, 1)  # its packing kept
        cast = cache.get(conv, None, BF16)
        assert cast[0].dtype == BF16 and cache.get(conv, None, BF16) is cast and cache.kept(conv, None) is cast
        torch.testing.assert_close(cast[0], conv.weight.to(BF16), rtol=0, atol=0)
        conv.weight.mul_(2)
        assert cache.kept(conv, None) is None
        again = cache.get(conv, None, BF16)
        assert again is not cast and torch.equal(again[0], conv.weight.to(BF16))
        conv.weight = nn.Parameter(conv.weight * 3)
        torch.testing.assert_close(cache.get(conv, None)[0], conv.weight, rtol=0, atol=0)


def test_a_fold_made_while_a_graph_is_captured_serves_that_call_alone(pair, monkeypatch):
    """While a CUDA graph is captured a fold's kernels are recorded, not run: its tensors are written only when
    the graph replays. Such a fold (and a summed bias, and a packing of the weight) is returned but not kept; the
    next call outside the capture folds anew and keeps that one. Capture stood in for on CPU."""
    from fusedres.triton import conv_args

    conv, bn = pair
    cache, unit = FoldedWeights(), folded_units.FoldedUnit()
    monkeypatch.setattr(conv_args, "_PACK_CACHE", {})
    for module in (inference.backends, conv_args):
        monkeypatch.setattr(module, "capturing", lambda device: True)
    with torch.no_grad():
        captured = cache.get(conv, bn)
        assert cache.get(conv, bn) is not captured and cache.kept(conv, bn) is None
        bias = unit.summed_bias(captured[1], captured[1])
        assert unit.summed_bias(captured[1], captured[1]) is not bias
        conv_args._packed_weight(captured[0], 1)
        assert conv_args._PACK_CACHE == {}
        for module in (inference.backends, conv_args):
            monkeypatch.setattr(module, "capturing", lambda device: False)
        kept = cache.get(conv, bn)
        assert kept is not captured and cache.get(conv, bn) is kept and cache.kept(conv, bn) is kept
        assert unit.summed_bias(kept[1], kept[1]) is unit.summed_bias(kept[1], kept[1])
        assert conv_args._packed_weight(kept[0], 1) is conv_args._packed_weight(kept[0], 1)
        assert_fold_of(kept, conv, bn)


def test_cache_refolds_inference_tensors_every_call():
    """Tensors made under inference_mode have no version counter: never trusted unchanged."""
    with torch.inference_mode():
        conv, bn = make_pair(torch.Generator().manual_seed(22))
        cache = FoldedWeights()
        first = cache.get(conv, bn)
        bn.running_mean.add_(1.0)
        second = cache.get(conv, bn)
        assert second[1] is not first[1]
        assert_fold_of(second, conv, bn)


def test_a_fold_made_under_inference_mode_keeps_a_version_counter(pair):
    """Parameters made outside inference_mode, a forward under it: the fold is kept across calls as under
    no_grad, and is not an inference tensor, so the Triton conv keeps its packing of the folded weight instead
    of packing it again at every call (an inference tensor has no version counter to check it against)."""
    from fusedres.triton import conv_args

    conv, bn = pair
    cache = FoldedWeights()
    with torch.inference_mode():
        weight, bias = first = cache.get(conv, bn)
        assert cache.get(conv, bn) is first and not weight.is_inference() and not bias.is_inference()
        assert conv.weight.requires_grad and not weight.requires_grad and weight.grad_fn is None
        assert_fold_of(first, conv, bn)
        packed = conv_args._packed_weight(weight, 1)
        assert conv_args._packed_weight(weight, 1) is packed
        bn.running_var.mul_(2)  # a source changed in place under inference_mode: folded again
        assert_fold_of(cache.get(conv, bn), conv, bn)
        # a downsample's bias moved to its block's last unit: kept likewise, with a version counter
        unit, other = folded_units.FoldedUnit(), torch.randn(6)
        summed = unit.summed_bias(bias, other)
        assert unit.summed_bias(bias, other) is summed and not summed.is_inference()
        torch.testing.assert_close(summed, bias + other, rtol=0, atol=0)


def test_the_triton_conv_gets_a_bf16_bias_in_fp32_copied_once_while_unchanged():
    """A fold's bias under autocast is bf16; the Triton conv takes fp32: one copy per bias while it is unchanged,
    not a cast (a launch) per call; a new one after an in-place change; an fp32 bias as it is; an inference
    tensor's copied every call (no version counter to tell)."""
    bias = torch.randn(6, dtype=BF16)
    converted = inference._float_bias(bias)
    assert converted.dtype == F32 and torch.equal(converted, bias.float()) and inference._float_bias(bias) is converted
    bias.mul_(2)
    assert torch.equal(inference._float_bias(bias), bias.float())
    fp32 = bias.float()
    assert inference._float_bias(fp32) is fp32
    with torch.inference_mode():
        frozen = torch.randn(6, dtype=BF16)
        assert torch.equal(inference._float_bias(frozen), frozen.float())
        assert inference._float_bias(frozen) is not inference._float_bias(frozen)


# --------------------------------------------------------------------------- FoldedUnit
@pytest.fixture
def whole_paths(monkeypatch):
    """One entry per call that ran the op's checks (every call but FoldedUnit's like ones)."""
    calls = []
    checked = inference._checked_tensors
    monkeypatch.setattr(inference, "_checked_tensors", lambda *args: calls.append(1) or checked(*args))
    return calls


def run_unit(unit, conv, bn, x, residual=None, relu=True, dtype=F32):
    """``unit``'s output, checked against conv -> eval BatchNorm (-> + residual) (-> ReLU) in fp64."""
    out = unit(x, conv, bn, residual, relu, "auto")
    expected = copy.deepcopy(bn).double()(F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None
                                                   else conv.bias.double(), conv.stride, conv.padding))
    expected = expected if residual is None else expected + residual.double()
    expected = expected.relu() if relu else expected
    if dtype == BF16:  # a conv of bf16 operands, rounded to bf16
        torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=6e-2)
    else:
        assert_close(out.double(), expected, dtype, "FoldedUnit")
    assert_layout(out, x)
    return out


def test_folded_unit_checks_only_calls_unlike_the_last_checked_one(pair, whole_paths, fresh_dispatch):
    conv, bn = pair
    unit = folded_units.FoldedUnit()
    gen = torch.Generator().manual_seed(23)
    x_cl = randn(gen, 2, 4, 7, 5, dtype=F32, channels_last=True)
    x_nchw = randn(gen, 2, 4, 7, 5, dtype=F32)
    residual = randn(gen, 2, 6, 7, 5, dtype=F32)
    with torch.no_grad():
        steps = [  # (what changed, call, whether it runs the checks)
            ("first call", lambda: run_unit(unit, conv, bn, x_cl), True),
            ("new values", lambda: run_unit(unit, conv, bn, x_cl * 2), False),
            ("strides", lambda: run_unit(unit, conv, bn, x_nchw), True),
            ("new values", lambda: run_unit(unit, conv, bn, x_nchw - 1), False),
            ("a residual", lambda: run_unit(unit, conv, bn, x_nchw, residual), True),
            ("new values", lambda: run_unit(unit, conv, bn, x_nchw, residual * 3), False),
            ("no ReLU", lambda: run_unit(unit, conv, bn, x_nchw, residual, relu=False), True),
            ("the running variance, in place", lambda: (bn.running_var.mul_(2), run_unit(unit, conv, bn, x_cl)),
             True),
            ("nothing", lambda: run_unit(unit, conv, bn, x_cl), False),
            ("the conv's padding", lambda: (setattr(conv, "padding", (0, 0)), run_unit(unit, conv, bn, x_cl)), True),
            ("the dispatch reset", lambda: (dispatch.reset(), run_unit(unit, conv, bn, x_cl)), True),
            ("nothing", lambda: run_unit(unit, conv, bn, x_cl), False),
            ("a graph replay's choices", lambda: within(dispatch.for_graph_replay(),
                                                        lambda: run_unit(unit, conv, bn, x_cl)), True),
            ("nothing", lambda: within(dispatch.for_graph_replay(), lambda: run_unit(unit, conv, bn, x_cl)), False),
            ("eager calls' choices", lambda: run_unit(unit, conv, bn, x_cl), True),
            ("cuDNN disabled (torch's conv flags)", lambda: within(torch.backends.cudnn.flags(enabled=False),
                                                                   lambda: run_unit(unit, conv, bn, x_cl)), True),
            ("the autograd profiler on", lambda: within(torch.autograd.profiler.profile(),
                                                        lambda: run_unit(unit, conv, bn, x_cl)), True),
        ]
        for what, step, checked in steps:
            step()
            assert whole_paths == ([1] if checked else []), what
            whole_paths.clear()
        with torch.autocast("cpu", dtype=BF16):
            for what, x, checked in (("autocast on", x_cl.to(BF16), True), ("nothing", x_cl.to(BF16), False),
                                     ("x cast at every call", x_cl, True), ("x cast at every call", x_cl, True)):
                assert run_unit(unit, conv, bn, x, dtype=BF16).dtype == BF16
                assert whole_paths == ([1] if checked else []), what
                whole_paths.clear()
        with pytest.raises(RuntimeError, match=r"expects 4 input channels, got 5"):
            unit(randn(gen, 2, 5, 7, 5, dtype=F32, channels_last=True), conv, bn, None, True, "auto")
        run_unit(unit, conv, bn, x_cl)


def test_folded_unit_keeps_no_choice_the_dispatch_did_not_keep(pair, monkeypatch, whole_paths, fresh_dispatch):
    """A choice made while a graph is captured is not kept by the dispatch (measured after), so not by the unit
    either: every captured call checks and chooses; the first call after measures, the next runs its choice."""
    monkeypatch.setattr(inference.backends, "measured", lambda t: True)  # the measured dispatch, on CPU
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "FakeGPU")
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(inference.backends, "triton_conv", lambda: (None, "no triton here"))
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    conv, bn = pair
    unit = folded_units.FoldedUnit()
    x = randn(torch.Generator().manual_seed(24), 2, 4, 7, 5, dtype=F32, channels_last=True)
    with torch.no_grad():
        for capturing[0], checked in ((True, 1), (True, 1), (False, 1), (False, 0), (True, 0)):
            run_unit(unit, conv, bn, x)
            assert len(whole_paths) == checked, (capturing, whole_paths)
            whole_paths.clear()
    assert [entry["choice"] for entry in inference.dispatch_table().values()] == ["torch"]


def test_folded_unit_never_pairs_a_plan_with_a_launch_bound_to_other_shapes(pair, monkeypatch):
    """Threads sharing a unit, stood in for by a call on batch-1 x made while a batch-2 plan binds its launch:
    the unit's plan and the launch bound to it are one value, so the batch-2 launch is never run for the batch-1
    plan (a Triton launcher is planned for fixed shapes: on a GPU it would read past x). Each bound launch here
    fails a call on other shapes than its own."""
    conv, bn = pair
    unit = folded_units.FoldedUnit()
    gen = torch.Generator().manual_seed(25)
    x1, x2 = randn(gen, 1, 4, 7, 5, dtype=F32), randn(gen, 2, 4, 7, 5, dtype=F32)
    bind = folded_units.bound_implementation
    interleaved = []

    def bound_for_its_shapes(name, x, *args):
        if x is x2 and not interleaved:  # the other thread's calls, while this one binds
            interleaved.append(1)
            run_unit(unit, conv, bn, x1)  # checked: the batch-1 plan
            run_unit(unit, conv, bn, x1)  # replayed: the batch-1 plan's launch bound
        launch, shape = bind(name, x, *args), x.shape

        def checked_launch(x, residual):
            assert x.shape == shape, f"a launch bound to x of {tuple(shape)} ran on x of {tuple(x.shape)}"
            return launch(x, residual)

        return checked_launch

    monkeypatch.setattr(folded_units, "bound_implementation", bound_for_its_shapes)
    with torch.no_grad():
        run_unit(unit, conv, bn, x2)  # checked: the batch-2 plan
        run_unit(unit, conv, bn, x2)  # replayed: binds, interleaved with the batch-1 calls
        for x in (x1, x2, x1):
            run_unit(unit, conv, bn, x)
    assert interleaved


def test_folded_weights_never_return_a_fold_kept_for_another_dtype(pair, monkeypatch):
    """Threads sharing a module's fold, one under autocast and one not, stood in for by a bf16 fold made while an
    fp32 fold records what it was made from: what a fold is checked by and the fold are one value, so a call for
    fp32 never gets the bf16 fold (or the reverse)."""
    conv, bn = pair
    cache = FoldedWeights()
    snapshot, interleaved = inference._snapshot, []

    def snapshot_interleaved(t):
        if not interleaved:
            interleaved.append(1)
            assert cache.get(conv, bn, BF16)[0].dtype == BF16  # the other thread's call
        return snapshot(t)

    monkeypatch.setattr(inference, "_snapshot", snapshot_interleaved)
    with torch.no_grad():
        for dtype in (F32, F32, BF16, F32):
            weight, bias = cache.get(conv, bn, dtype)
            assert weight.dtype == bias.dtype == dtype, (dtype, weight.dtype)
    assert interleaved


# --------------------------------------------------------------------------- conv_bias_act
@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    channels_last: bool
    residual: bool
    relu: bool
    stride: int
    groups: int

    def __str__(self):
        return (f"{str(self.dtype)[6:]}-{'cl' if self.channels_last else 'nchw'}"
                f"-{'res' if self.residual else 'nores'}-{'relu' if self.relu else 'linear'}"
                f"-s{self.stride}-g{self.groups}")


def _cases():
    """Every (layout, residual, relu) once; dtype, stride 1 / 2 and groups 1 / 2 rotate."""
    cases = []
    for channels_last in (False, True):
        for residual in (False, True):
            for relu in (False, True):
                i = len(cases)
                cases.append(Case([F64, F32][i % 2], channels_last, residual, relu,
                                  stride=1 + (i // 2) % 2, groups=1 + (i // 4 + i) % 2))
    return cases


CASES = _cases()


def case_inputs(case, seed=0, shape=(2, 4, 7, 6), out_ch=6, bias=True):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = randn(gen, *shape, dtype=case.dtype, channels_last=case.channels_last)
    weight = randn(gen, out_ch, c // case.groups, 3, 3, dtype=case.dtype,
                   channels_last=case.channels_last)
    b = randn(gen, out_ch, dtype=case.dtype) if bias else None
    out_hw = [(s + 2 - 3) // case.stride + 1 for s in (h, w)]
    residual = (randn(gen, n, out_ch, *out_hw, dtype=case.dtype, channels_last=case.channels_last)
                if case.residual else None)
    return x, weight, b, residual


def reference(x, weight, bias, residual, case):
    """act(conv2d + residual) in fp64."""
    up = (lambda t: None if t is None else t.double())
    out = F.conv2d(up(x), up(weight), up(bias), case.stride, 1, 1, case.groups)
    if residual is not None:
        out = out + up(residual)
    return out.relu() if case.relu else out


def call(case, x, weight, bias, residual, backend="torch"):
    return conv_bias_act(x, weight, bias, residual, stride=case.stride, padding=1,
                         groups=case.groups, relu=case.relu, backend=backend)


def assert_layout(out, x):
    if inference.backends.channels_last(x):
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_bias_act_torch_backend(case):
    x, weight, bias, residual = case_inputs(case)
    out = call(case, x, weight, bias, residual)
    assert out.dtype == case.dtype
    assert_layout(out, x)
    assert_close(out, reference(x, weight, bias, residual, case).to(case.dtype), case.dtype, str(case))


def test_conv_bias_act_auto_on_cpu_is_torch_and_measures_nothing(fresh_dispatch):
    case = CASES[-1]
    x, weight, bias, residual = case_inputs(case)
    out = call(case, x, weight, bias, residual, backend="auto")
    torch.testing.assert_close(out, call(case, x, weight, bias, residual), rtol=0, atol=0)
    assert inference.dispatch_table() == dispatch.dispatch_table() == {}


def test_conv_bias_act_layout_normalised():
    """Residual and weight in another layout than x, and a non-contiguous x: the output is
    dense in x's (normalised) layout."""
    case = Case(F32, True, True, True, 1, 1)
    x, weight, bias, residual = case_inputs(case, seed=1)
    nchw_res, nchw_weight = residual.contiguous(), weight.contiguous()
    out = call(case, x, nchw_weight, bias, nchw_res)
    assert_layout(out, x)
    assert_close(out, reference(x, weight, bias, residual, case).float(), F32, "mixed layouts")
    strided = torch.randn(2, 4, 7, 12)[..., ::2]
    out = call(case, strided, nchw_weight, bias, nchw_res)
    assert out.is_contiguous()


def test_conv_bias_act_autocast_casts_like_conv2d():
    case = Case(F32, True, True, True, 1, 1)
    x, weight, bias, residual = case_inputs(case, seed=2)
    with torch.autocast("cpu", dtype=BF16):
        out = call(case, x, weight, bias, residual)
        expected = (F.conv2d(x, weight, bias, 1, 1) + residual.to(BF16)).relu()
    assert out.dtype == BF16
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)


def test_conv_bias_act_op_computes_in_its_inputs_dtype_under_autocast():
    """Called as the registered op (no casts before it, as under torch.compile), the body turns autocast off
    while it computes, so fp32 inputs give an fp32 result as torch's conv on them would outside autocast, and
    turns it back on after, also where the implementation asked for cannot run (cuDNN on CPU tensors)."""
    case = Case(F32, True, True, True, 1, 1)
    x, weight, bias, residual = case_inputs(case, seed=4)
    with torch.autocast("cpu", dtype=BF16):
        out = torch.ops.fusedres.conv_bias_act(x, weight, bias, residual, [1, 1], [1, 1], [1, 1], 1, True, "torch")
        assert torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError, match="cuDNN"):
            torch.ops.fusedres.conv_bias_act(x, weight, bias, residual, [1, 1], [1, 1], [1, 1], 1, True, "cudnn")
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    assert out.dtype == F32
    torch.testing.assert_close(out, (F.conv2d(x, weight, bias, 1, 1) + residual).relu())


# ambiguous layouts: a single output channel, a 1 x 1 output, a 1 x 1 input (a ResNet's last stage at 32 px)
OPCHECK_SHAPES = [((2, 4, 7, 6), 6, 3, 1), ((2, 4, 5, 5), 1, 3, 1), ((2, 4, 3, 3), 6, 3, 0), ((2, 4, 1, 1), 6, 1, 0)]


@pytest.mark.parametrize("weight_channels_last", [False, True], ids=["w_nchw", "w_cl"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=["6ch", "1ch", "1x1", "x1x1"])
@pytest.mark.parametrize("bias_residual", [(True, True), (False, False)], ids=["bias_res", "plain"])
def test_opcheck(channels_last, weight_channels_last, shape, bias_residual):
    """The op against its fake (output strides included) and autograd's rules; the weight in either layout
    (a channels_last model's weights stay channels_last where x's layout is ambiguous)."""
    (n, c, h, w), out_ch, k, pad = shape
    gen = torch.Generator().manual_seed(3)
    x = randn(gen, n, c, h, w, dtype=F32, channels_last=channels_last)
    weight = randn(gen, out_ch, c, k, k, dtype=F32, channels_last=weight_channels_last)
    out_hw = (h + 2 * pad - k + 1, w + 2 * pad - k + 1)
    bias = randn(gen, out_ch, dtype=F32) if bias_residual[0] else None
    residual = (randn(gen, n, out_ch, *out_hw, dtype=F32, channels_last=channels_last)
                if bias_residual[1] else None)
    torch.library.opcheck(OP, (x, weight, bias, residual, [1, 1], [pad, pad], [1, 1], 1, True, "torch"))


def test_torch_compile_fullgraph_with_folding():
    """A unit folding its BatchNorm through FoldedWeights and calling the op compiles as one
    graph (the fold is traced into it) and matches eager."""

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = make_pair(torch.Generator().manual_seed(4))
            self.folded = FoldedWeights()

        def forward(self, x, residual):
            weight, bias = self.folded.get(self.conv, self.bn)
            return conv_bias_act(x, weight, bias, residual, padding=1)

    unit = Unit().eval()
    gen = torch.Generator().manual_seed(5)
    x = to_format(randn(gen, 2, 4, 6, 5, dtype=F32), True)
    residual = to_format(randn(gen, 2, 6, 6, 5, dtype=F32), True)
    compiled = torch.compile(unit, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, residual)
        expected = (unit.bn(unit.conv(x)) + residual).relu()
    assert_layout(out, x)
    assert_close(out, expected, F32, "compiled")


def test_auto_dispatch_logic_with_fake_timings(monkeypatch, tmp_path, fresh_dispatch):
    """conv_bias_act's measured dispatch without a GPU: CUDA-looking arguments, and implementations
    that return their fake timing, which the patched timer takes from one run."""
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "FakeGPU")
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: fn())
    monkeypatch.setattr(inference, "_output_mismatch", lambda *args: None)  # the fake results are times
    monkeypatch.setattr(inference.backends, "triton_conv", lambda: (None, "no triton here"))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    timings = {"cudnn": 2.0, "torch": 3.0}

    def fake_impl(name):
        def run(*args):
            if isinstance(timings[name], Exception):
                raise timings[name]
            return timings[name]
        return run

    monkeypatch.setattr(inference, "_IMPLS", {name: fake_impl(name) for name in inference.IMPLEMENTATIONS})
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    weight = SimpleNamespace(shape=(64, 64, 3, 3))
    conv_args = ([1, 1], [1, 1], [1, 1], 1)

    def args(height, relu=True):
        x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(8, 64, height, 14))
        return x, weight, None, None, conv_args, relu

    assert inference._choose("auto", True, args(14))[0] == "cudnn"
    (key, entry), = inference.dispatch_table().items()
    assert key == ("conv_bias_act|FakeGPU|float16|cl|x[8, 64, 14, 14]|w[64, 64, 3, 3]|"
                   "s[1, 1]p[1, 1]d[1, 1]g1|bias0|res0|relu1|cudnn1")
    assert entry["ms"] == {"cudnn": 2.0, "triton": "unavailable: no triton here", "torch": 3.0}
    assert json.loads(path.read_text()) == {key: entry}
    timings["cudnn"] = RuntimeError("GET was unable to find an engine to execute this computation\n...")
    assert inference._choose("auto", True, args(14)) == ("cudnn", True)  # known: not timed again, kept
    assert inference._choose("auto", True, args(15))[0] == "torch"  # cuDNN fails there: never chosen
    assert inference.dispatch_table()[key.replace("14, 14", "15, 14")]["ms"]["cudnn"] == (
        "failed: RuntimeError: GET was unable to find an engine to execute this computation")
    assert inference._choose("auto", True, args(14, relu=False))[0] == "torch"
    assert len(json.loads(path.read_text())) == 3

    pretend_capturing(monkeypatch)
    assert inference._choose("auto", True, args(16)) == ("cudnn", False)  # the fixed order; nothing kept
    assert len(inference.dispatch_table()) == 3
    dispatch.reset()  # a new process, capturing at once: the file answers
    assert inference._choose("auto", True, args(15))[0] == "torch"
    assert list(inference.dispatch_table()) == [key.replace("14, 14", "15, 14")]


def test_auto_dispatch_measures_again_when_torch_conv_flags_change(monkeypatch, fresh_dispatch):
    """A known choice is not checked again, so torch's cuDNN and TF32 flags are part of the signature: a
    Triton choice made while TF32 was allowed must not keep running fp32 as TF32 once it is forbidden,
    nor a cuDNN choice once cuDNN is disabled."""
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "FakeGPU")
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: fn())
    monkeypatch.setattr(inference, "_output_mismatch", lambda *args: None)  # the fake results are times
    fake_triton = SimpleNamespace(unsupported_reason=lambda x, w, *conv: (
        None if inference.backends.conv_allows_tf32() else "TF32 is forbidden"))
    monkeypatch.setattr(inference.backends, "triton_conv", lambda: (fake_triton, ""))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    timings = {"triton": 1.0, "cudnn": 2.0, "torch": 3.0}
    monkeypatch.setattr(inference, "_IMPLS", {name: (lambda *args, name=name: timings[name])
                                              for name in inference.IMPLEMENTATIONS})
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, shape=(8, 64, 14, 14))
    args = (x, SimpleNamespace(shape=(64, 64, 3, 3)), None, None, ([1, 1], [1, 1], [1, 1], 1), True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert inference._choose("auto", True, args)[0] == "triton"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert inference._choose("auto", True, args)[0] == "cudnn"
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert inference._choose("auto", True, args)[0] == "torch"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert inference._choose("auto", True, args)[0] == "triton"
    table = inference.dispatch_table()
    assert [key.split("relu1|")[1] for key in table] == ["cudnn1|tf321", "cudnn1|tf320", "cudnn0|tf320",
                                                         "cudnn0|tf321"]
    assert table[next(iter(table)).replace("tf321", "tf320")]["ms"]["triton"] == "unavailable: TF32 is forbidden"


def test_a_module_units_dispatch_times_the_triton_conv_as_its_replays_launch_it(monkeypatch, fresh_dispatch):
    """A module unit's call (``replayed``) is timed as the unit's replays will run it: the Triton conv through its
    launcher, made once per measurement (``conv2d_fused_launcher``: checked and planned once), the others with their
    arguments bound. So at batch 1, where host time decides, a unit may take the Triton conv where the op's own
    call, timed through conv2d_fused's whole path, takes cuDNN. Timings are fakes, one run each."""
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "FakeGPU")
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: fn())
    monkeypatch.setattr(inference, "_output_mismatch", lambda *args: None)  # the fake results are times
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    made = []

    def launcher(x, weight, **kwargs):
        made.append(kwargs)
        return lambda x, residual: 1.0  # the bound launch: the cheapest

    fake_triton = SimpleNamespace(unsupported_reason=lambda *args: None, conv2d_fused_launcher=launcher)
    monkeypatch.setattr(inference.backends, "triton_conv", lambda: (fake_triton, ""))
    timings = {"triton": 5.0, "cudnn": 2.0, "torch": 3.0}  # the whole paths
    monkeypatch.setattr(inference, "_IMPLS", {name: (lambda *args, name=name: timings[name])
                                              for name in inference.IMPLEMENTATIONS})
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(1, 64, 7, 7))
    args = (x, SimpleNamespace(shape=(64, 64, 3, 3)), None, None, ([1, 1], [1, 1], [1, 1], 1), True)
    assert inference._choose("auto", True, args)[0] == "cudnn" and made == []
    dispatch.reset()
    assert inference._choose("auto", True, args, replayed=True)[0] == "triton"
    assert len(made) == 1 and made[0]["stride"] == [1, 1] and made[0]["out_relu"] is True
    (entry,) = inference.dispatch_table().values()
    assert entry["ms"] == {"cudnn": 2.0, "triton": 1.0, "torch": 3.0}


# --------------------------------------------------------------------------- triton backend
def triton_conv_or_skip():
    module, reason = inference.backends.triton_conv()
    if module is None:
        pytest.skip(reason)
    return module


@pytest.mark.parametrize("case", [Case(F32, False, False, True, 1, 1), Case(F32, True, True, False, 2, 1)],
                         ids=str)
def test_conv_bias_act_triton_backend(case):
    triton_conv_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight, bias, residual = (t if t is None else t.to(device)
                                 for t in case_inputs(case, seed=6, shape=(1, 4, 5, 5), out_ch=8))
    reason = inference.unavailable_reason("triton", x, weight, bias, residual,
                                          ([case.stride] * 2, [1, 1], [1, 1], 1), case.relu)
    if reason is not None:
        pytest.skip(reason)
    out = call(case, x, weight, bias, residual, backend="triton")
    assert_layout(out, x)
    expected = reference(x, weight, bias, residual, case)
    if x.is_cuda:  # fp32 runs as TF32 on a GPU (the interpreter's dot is exact fp32)
        torch.testing.assert_close(out.double(), expected, rtol=5e-3, atol=5e-3 * expected.abs().max().item())
    else:
        assert_close(out, expected.float(), F32, str(case))


# --------------------------------------------------------------------------- errors
@pytest.fixture
def no_kernels(monkeypatch):
    """Any implementation running fails the test: errors must come before kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(inference, "_IMPLS", {name: forbidden for name in inference.IMPLEMENTATIONS})


def good_args():
    gen = torch.Generator().manual_seed(7)
    return dict(x=randn(gen, 2, 4, 6, 6, dtype=F32), weight=randn(gen, 6, 4, 3, 3, dtype=F32),
                bias=randn(gen, 6, dtype=F32), residual=randn(gen, 2, 6, 6, 6, dtype=F32),
                padding=1)


ERRORS = {
    "3d_input": (dict(x=torch.randn(4, 6, 6)), ValueError, r"4D \(N, C, H, W\).*got 3D"),
    "int_input": (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.long)), TypeError, "floating dtype"),
    "3d_weight": (dict(weight=torch.randn(6, 4, 3)), ValueError, "expected a 4D weight"),
    "weight_dtype": (dict(weight=torch.randn(6, 4, 3, 3, dtype=F64)), RuntimeError,
                     r"input type \(torch.float32\) and weight type \(torch.float64\) should be the same"),
    "weight_device": (dict(weight=torch.randn(6, 4, 3, 3, device="meta")), RuntimeError,
                      "expected weight to be on cpu like the input, got meta"),
    "in_channels": (dict(weight=torch.randn(6, 3, 3, 3)), RuntimeError,
                    r"weight of size \(6, 3, 3, 3\) expects 3 input channels, got 4"),
    "groups": (dict(groups=3), ValueError, "groups=3 must divide the 4 input and 6 output channels"),
    "bias_size": (dict(bias=torch.randn(5)), RuntimeError, r"bias of size \(6,\).*got size \(5,\)"),
    "bias_dtype": (dict(bias=torch.randn(6, dtype=F64)), RuntimeError, "type torch.float32.*torch.float64"),
    "residual_size": (dict(residual=torch.randn(2, 6, 5, 6)), ValueError,
                      r"residual of size \(2, 6, 5, 6\).*does not match the conv output of size \(2, 6, 6, 6\)"),
    "residual_dtype": (dict(residual=torch.randn(2, 6, 6, 6, dtype=BF16)), ValueError,
                       "type torch.bfloat16 does not match"),
    "residual_3d": (dict(residual=torch.randn(6, 6, 6)), ValueError, "expected residual to be a 4D"),
    "stride_pair": (dict(stride=(1, 1, 1)), ValueError, "expected stride to have 2 elements"),
    "stride_zero": (dict(stride=0), ValueError, "stride and dilation must be positive"),
    "padding_string": (dict(padding="same"), ValueError, "padding='same' is not supported"),
    "too_small": (dict(padding=0, x=torch.randn(2, 4, 2, 6)), ValueError, "is too small for a weight"),
    "requires_grad": (dict(weight=torch.randn(6, 4, 3, 3, requires_grad=True)), RuntimeError,
                      "inference-only"),
    "unknown_backend": (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name, no_kernels):
    changes, error, match = ERRORS[name]
    args = good_args()
    args.update(changes)
    if name == "too_small":
        args["residual"] = None
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(error, match=match):
        conv_bias_act(x, weight, **args)


def test_cudnn_backend_on_cpu_raises_clearly(no_kernels):
    args = good_args()
    with pytest.raises(RuntimeError, match="backend 'cudnn' cannot run this call: cuDNN runs on "
                                           "CUDA tensors, got a tensor on cpu"):
        conv_bias_act(args.pop("x"), args.pop("weight"), **args, backend="cudnn")


def test_float64_with_an_unknown_backend_raises(no_kernels):
    args = {name: t.double() if isinstance(t, torch.Tensor) else t for name, t in good_args().items()}
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        conv_bias_act(args.pop("x"), args.pop("weight"), **args, backend="bogus")


def test_the_triton_convs_fp32_bias_sees_a_fused_optimizer_step(monkeypatch):
    """A bias in x's dtype is handed to the Triton conv as a kept fp32 copy; a fused optimizer's step on it, which
    moves no version counter, gives a new copy, as an in-place write does."""
    from fusedres.ops import inference
    monkeypatch.setattr(inference, "_FLOAT_BIASES", inference.WeakIdKeyDictionary())
    bias = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    first = inference._float_bias(bias)
    assert inference._float_bias(bias) is first
    bias.grad = -torch.ones_like(bias)
    torch.optim.SGD([bias], lr=1.0, fused=True).step()
    torch.testing.assert_close(inference._float_bias(bias), torch.ones(4))


@pytest.mark.parametrize("backend", ["cudnn", "triton", "torch"])
def test_float64_runs_on_torch_whatever_backend_is_named(backend):
    """As every op's backend does (README: fp64 always runs on torch), where a named kernel backend raised."""
    args = {name: t.double() if isinstance(t, torch.Tensor) else t for name, t in good_args().items()}
    expected = torch.relu(F.conv2d(args["x"], args["weight"], args["bias"], padding=1) + args["residual"])
    torch.testing.assert_close(conv_bias_act(args.pop("x"), args.pop("weight"), **args, backend=backend), expected)


# --------------------------------------------------------------------------- GPU
RTOL = {torch.float16: 1e-3, BF16: 8e-3}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_cudnn_matches_torch_channels_last(dtype, residual):
    """cuDNN's error against fp64 is at most about twice eager torch's in the same dtype."""
    case = Case(dtype, True, residual, True, 1, 1)
    inputs = [t if t is None else t.cuda() for t in case_inputs(case, seed=8, shape=(4, 32, 14, 14), out_ch=64)]
    expected = reference(*inputs, case)
    ours, eager = call(case, *inputs, backend="cudnn"), call(case, *inputs, backend="torch")
    assert_layout(ours, inputs[0])
    scale = expected.abs().max().item()
    err_ours = (ours.double() - expected).abs().max().item()
    err_eager = (eager.double() - expected).abs().max().item()
    assert err_ours <= 2 * err_eager + RTOL[dtype] * scale, (err_ours, err_eager)


@requires_cuda
def test_measured_dispatch_picks_and_caches(monkeypatch, tmp_path, fresh_dispatch):
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    case = Case(torch.float16, True, True, True, 1, 1)
    inputs = [t.cuda() for t in case_inputs(case, seed=9, shape=(8, 64, 14, 14), out_ch=64)]
    out = call(case, *inputs, backend="auto")
    table = inference.dispatch_table()
    assert len(table) == 1
    (key, entry), = table.items()
    assert entry["choice"] in inference.IMPLEMENTATIONS
    assert isinstance(entry["ms"][entry["choice"]], float)
    assert isinstance(entry["ms"]["torch"], float)
    assert json.loads(path.read_text())[key] == entry
    expected = reference(*inputs, case)
    torch.testing.assert_close(out.double(), expected, rtol=RTOL[torch.float16], atol=1e-2)

    def no_measuring(*args):
        raise AssertionError("measured twice")

    monkeypatch.setattr(inference._DISPATCH, "_measure", no_measuring)
    call(case, *inputs, backend="auto")
    dispatch.reset()  # a new process: the file answers
    call(case, *inputs, backend="auto")
    assert inference.dispatch_table()[key]["choice"] == entry["choice"]


@requires_cuda
@pytest.mark.parametrize("measured_first", [False, True], ids=["cold", "warmed_up"])
def test_cuda_graph_capture(monkeypatch, measured_first, fresh_dispatch):
    case = Case(BF16, True, True, True, 1, 1)
    inputs = [t.cuda() for t in case_inputs(case, seed=10, shape=(4, 32, 8, 8), out_ch=32)]
    conv_args = ([1, 1], [1, 1], [1, 1], 1)
    fixed = next(name for name in inference.IMPLEMENTATIONS
                 if inference.unavailable_reason(name, *inputs, conv_args, True) is None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: measures, or only runs what capture will pick
        call(case, *inputs, backend="auto" if measured_first else fixed)
    torch.cuda.current_stream().wait_stream(stream)
    measured = inference.dispatch_table()

    def no_measuring(*args):
        raise AssertionError("measured while capturing")

    monkeypatch.setattr(inference._DISPATCH, "_measure", no_measuring)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(case, *inputs, backend="auto")
    assert inference.dispatch_table() == measured  # capturing records nothing
    with torch.no_grad():
        inputs[0].mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = reference(*inputs, case)
    torch.testing.assert_close(out.double(), expected, rtol=RTOL[BF16], atol=5e-2)
