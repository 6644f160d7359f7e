"""The measured dispatch's result checks on real results, on CPU.

On a GPU, "auto" times every implementation of a conv call once and keeps the fastest whose result agrees
with the reference's (``dispatch.py``). Here the dispatch is intercepted where it would measure: each conv op
hands over the very ``run`` and ``compare`` it gives the dispatch, and the test runs the reference path (torch's
conv with the BN kernels: cuDNN's on a GPU) and the Triton kernels (on a GPU, else under TRITON_INTERPRET=1) on
random inputs in every dtype and layout. A check that refused a correct kernel for its rounding fails here;
so does one that let the same results through made wrong in one element, channel or sum. The interpreter
rounds float32 to bfloat16 toward zero (triton 3.6 and 3.8; a GPU rounds to nearest, ``cvt.rn.bf16.f32``), so
the bfloat16 cases here differ from the reference more than they do on a GPU (up to 0.42 of the allowance, the
batch variance; under 0.01 in float16 and float32).
"""

import pytest
import torch

from conftest import requires_cuda
from fusedres.ops import backends, dispatch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def handed_over(monkeypatch):
    """Make "auto" measure CPU calls, and each dispatch hand its call to the test instead: a list of
    (op, its reference, unavailable_reason, run, compare) per call; the reference then runs the call."""
    calls = []

    def choose(self, device, signature, unavailable_reason, run, compare=None):
        calls.append((self.op, self.references[0], unavailable_reason, run, compare))
        return self.references[0]

    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    monkeypatch.setattr(backends, "measured", lambda t: True)
    monkeypatch.setattr(dispatch.MeasuredDispatch, "choose", choose)
    return calls


def randn(gen, *shape, dtype=F32, channels_last=False):
    t = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def reference_and_triton(calls, op):
    """The one call ``op`` handed over: (compare, the reference's result, the Triton kernels' result)."""
    (_, reference, unavailable_reason, run, compare), = [call for call in calls if call[0] == op]
    assert unavailable_reason("triton") is None
    return compare, run(reference), run("triton")


def replaced(result: tuple, index: int, value) -> tuple:
    return tuple(value if i == index else part for i, part in enumerate(result))


def bumped(t: torch.Tensor, where: tuple, by: float) -> torch.Tensor:
    """``t`` with the element ``where`` raised by ``by`` times the largest magnitude in ``t``."""
    t = t.clone()
    t[where] += by * t.abs().max()
    return t


CASES = {  # (dtype, channels_last, kernel, stride): 24 input channels (a tail of 8 past 16), 20 output ones
    "bf16-cl-3x3": (BF16, True, 3, 1),
    "bf16-nchw-3x3-s2": (BF16, False, 3, 2),
    "fp16-cl-1x1": (F16, True, 1, 1),
    "fp16-nchw-3x3": (F16, False, 3, 1),
    "fp32-cl-3x3-s2": (F32, True, 3, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unit_conv_results_agree_with_the_reference_and_wrong_ones_do_not(handed_over, case):
    """conv2d_stats with the BN + ReLU prologue (the training unit's conv), forward and backward: the Triton
    kernels' out, batch mean and variance, input gradient's BatchNorm sums and weight gradient agree with
    the reference's; each of them made wrong by a few tolerances in one place does not."""
    dtype, channels_last, kernel, stride = CASES[case]
    gen = torch.Generator().manual_seed(11)
    y = randn(gen, 2, 24, 9, 9, dtype=dtype, channels_last=channels_last).requires_grad_()
    mean, invstd = randn(gen, 24) * 0.1, randn(gen, 24).abs() + 0.5
    weight, bias = randn(gen, 24).abs() + 0.5, randn(gen, 24) * 0.3
    conv_weight = randn(gen, 20, 24, kernel, kernel, dtype=dtype).mul_(0.2).requires_grad_()
    out = torch.ops.fusedres.conv2d_stats(
        y, mean, invstd, weight.to(dtype), bias.to(dtype), conv_weight, None, [stride] * 2, [kernel // 2] * 2,
        [1, 1], 1, True, True, "auto", "", 0)[0]
    compare, reference, result = reference_and_triton(handed_over, "unit_conv2d")
    assert compare(reference, result) is None
    assert compare(reference, replaced(result, 0, bumped(result[0], (1, 7, 2, 3), 0.2))).startswith(
        "the output differs by up to")
    assert compare(reference, replaced(result, 1, result[1] + 0.1 * result[0].abs().max())).startswith(
        "the batch mean differs")
    assert compare(reference, replaced(result, 2, result[2] * 1.15)).startswith("the batch variance differs")

    out.float().mul(randn(gen, *out.shape)).sum().backward()
    compare, reference, result = reference_and_triton(handed_over, "unit_conv2d_backward")
    assert result[3] and not reference[3]  # the Triton input gradient is masked by the ReLU, cuDNN's is not
    assert compare(reference, result) is None
    d_act, sums, d_weight, masked = reference
    assert compare(reference, replaced(result, 2, bumped(result[2], (3, 4, 0, 0), 0.2))).startswith(
        "the weight gradient differs")
    terms = [d_act.float(), d_act.float() * (y.detach().float() - mean.view(1, -1, 1, 1))]
    for i, what in enumerate(["sum of dz differs", "sum of dz * (y - mean) differs"]):
        wrong = [s.clone() for s in result[1]]
        wrong[i][6] += 0.5 * terms[i].square().sum().sqrt()  # a few times any channel's allowance
        assert what in compare(reference, replaced(result, 1, wrong))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
def test_inference_conv_results_agree_with_torch_and_wrong_ones_do_not(handed_over, case, residual):
    """conv_bias_act (the inference unit: folded conv, bias, residual, ReLU): the Triton kernel's output agrees
    with torch's; with one output channel's bias lost, or one element off, it does not."""
    dtype, channels_last, kernel, stride = CASES[case]
    gen = torch.Generator().manual_seed(12)
    x = randn(gen, 2, 24, 9, 9, dtype=dtype, channels_last=channels_last).relu_()
    weight = randn(gen, 20, 24, kernel, kernel, dtype=dtype).mul_(0.2)
    bias = randn(gen, 20, dtype=dtype)
    size = (9 + 2 * (kernel // 2) - kernel) // stride + 1
    res = randn(gen, 2, 20, size, size, dtype=dtype, channels_last=channels_last) if residual else None
    torch.ops.fusedres.conv_bias_act(x, weight, bias, res, [stride] * 2, [kernel // 2] * 2, [1, 1], 1, True, "auto")
    compare, reference, result = reference_and_triton(handed_over, "conv_bias_act")
    assert compare(reference, result) is None
    lost_bias = result.clone()
    k = int(bias.abs().argmax())
    lost_bias[:, k] = (lost_bias[:, k].float() - bias[k].float()).to(dtype)
    assert compare(reference, lost_bias).startswith("the output differs")
    assert compare(reference, bumped(result, (0, 11, 1, 1), 0.3)).startswith("the output differs")


@requires_cuda
@pytest.mark.parametrize("op", ["conv_bias_act", "conv2d_stats"])
def test_on_a_gpu_a_wrong_triton_conv_is_refused_and_the_reference_runs(fresh_dispatch, monkeypatch, op):
    """End to end on CUDA with "auto": the Triton conv made wrong (its output scaled by 1.5) is refused before it
    is timed, with a warning, and never chosen; the call's result is the reference's."""
    module, reason = backends.triton_conv()
    if module is None:
        pytest.skip(reason)
    fused = module.conv2d_fused
    monkeypatch.setattr(module, "conv2d_fused", lambda *args, **kwargs: (
        lambda out, mean, var: (out.mul_(1.5), mean, var))(*fused(*args, **kwargs)))
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(13)
    x = randn(gen, 4, 64, 14, 14, dtype=BF16, channels_last=True)
    weight = randn(gen, 64, 64, 3, 3, dtype=BF16).mul_(0.1)
    reference = torch.nn.functional.conv2d(x, weight, padding=1)
    reference_name = "torch" if op == "conv_bias_act" else "cudnn"
    with pytest.warns(RuntimeWarning, match=f"'triton' disagrees with '{reference_name}'"):
        if op == "conv_bias_act":
            out = torch.ops.fusedres.conv_bias_act(x, weight, None, None, [1, 1], [1, 1], [1, 1], 1, True, "auto")
            reference = reference.relu()
        else:
            out = torch.ops.fusedres.conv2d_stats(x, None, None, None, None, weight, None, [1, 1], [1, 1], [1, 1], 1,
                                                  True, True, "auto")[0]
    (entry,) = fresh_dispatch.dispatch_table().values()
    assert entry["choice"] == reference_name
    assert entry["ms"]["triton"].startswith(f"failed: disagrees with {reference_name}: the output differs")
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
