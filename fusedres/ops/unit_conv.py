"""The training unit's conv ops, declared once each: torch.library custom op + fake kernel + autograd (and
``eager.entry``'s entry point, which the package calls), and the per-call choice between the Triton conv
kernels and cuDNN's that runs them.

Notation as in ``registry.py`` (whose BatchNorm ops these build on): "act" is ReLU or identity,
bn(y) = (y - mean) * invstd * weight + bias, per-channel vectors broadcast over (N, H, W).

``bn_act_conv2d(y, mean?, invstd?, weight?, bias?, conv_weight, conv_bias?, stride, padding,
dilation, groups, batch_stats, relu, backend, sync_group="", count=0)``
    out = conv2d(act(bn(y)), conv_weight, conv_bias): the next unit's conv with the
    previous unit's BatchNorm + act as its prologue (no prologue, out = conv2d(y), when ``mean``
    is None). Saves y and per-channel vectors; the activation is recomputed in backward for the
    weight gradient, never kept. The conv is either the Triton implicit-GEMM conv
    (``triton/conv.py``: one launch, applying the prologue as it loads y) or torch's (cuDNN's)
    after one BN-apply pass: the triton backend takes the Triton conv wherever it supports the
    call, cuda and torch take cuDNN's, and "auto" on CUDA times both per call signature and keeps
    the faster, where its results agree with cuDNN's (``_conv_implementation``). The backward
    chooses the same way (``_CONV_BACKWARD_DISPATCH``) between torch's convolution_backward on the
    recomputed activation plus the BN backward stages, and the Triton kernels: the weight gradient
    recomputing the prologue as it loads y (``triton/conv_wgrad.py``) and the input gradient with
    the ReLU mask and the BN backward's sums in its epilogue (``conv2d_input_grad``; a strided
    conv's in one launch per phase of the stride), then bn_act_backward_apply. A backward traced by
    torch.compile, or recorded for a second backward (``create_graph=True``), takes torch's (only
    ops: the graph would hold the Triton kernels' results as constants).

``conv2d_stats(<bn_act_conv2d's arguments>)``
    -> (out, out_mean, out_var): bn_act_conv2d's out and the per-channel mean and biased
    variance of out (as channel_stats gives them, not differentiable), the start of the next
    BatchNorm. With the Triton conv (chosen as for bn_act_conv2d) one launch: it reduces its output
    tiles to per-channel moments as it stores them, and one more launch merges them; with cuDNN's,
    the conv and then channel_stats. Same backward as bn_act_conv2d.

Inputs reach these ops already validated and in kernel layout (see ``functional.py``).
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from . import backends, dispatch, eager
from .registry import bn_act, bn_act_backward_reduce, bn_act_grads, compute_dtype


def _bn_act_conv2d(
    y: Tensor,
    mean: Optional[Tensor],
    invstd: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    batch_stats: bool,
    relu: bool,
    backend: str,
    sync_group: str = "",
    count: int = 0,
) -> Tensor:
    return _prologue_conv2d(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding,
                            dilation, groups, relu, backend, compute_stats=False)[0]


def _conv2d_stats(
    y: Tensor,
    mean: Optional[Tensor],
    invstd: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    batch_stats: bool,
    relu: bool,
    backend: str,
    sync_group: str = "",
    count: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    return _prologue_conv2d(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding,
                            dilation, groups, relu, backend, compute_stats=True)


bn_act_conv2d_op = custom_op("fusedres::bn_act_conv2d", mutates_args=())(_bn_act_conv2d)
conv2d_stats_op = custom_op("fusedres::conv2d_stats", mutates_args=())(_conv2d_stats)


def _prologue_conv2d(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation,
                     groups, relu, backend, *, compute_stats):
    """(out, out_mean, out_var) of bn_act_conv2d / conv2d_stats; the statistics are None unless
    ``compute_stats``. No prologue when ``mean`` is None."""
    kernels = backends.select(backend, y)
    prologue = None if mean is None else kernels.affine(mean, invstd, weight, bias)
    conv_args = (stride, padding, dilation, groups)

    def run(implementation: str):
        if implementation == "triton":  # one launch: the prologue as it loads y, the statistics as it stores out
            in_scale, in_shift = prologue if prologue is not None else (None, None)
            return backends.triton_conv()[0].conv2d_fused(
                y, conv_weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
                in_scale=in_scale, in_shift=in_shift, in_relu=relu,
                out_shift=None if conv_bias is None else conv_bias.float(), compute_stats=compute_stats)
        act = y if prologue is None else kernels.act_forward(y, *prologue, None, None, None, relu)
        out = F.conv2d(act.to(conv_weight.dtype), conv_weight, conv_bias, *conv_args)
        if not compute_stats:
            return out, None, None
        return (out, *backends.select(backend, out).channel_stats(out))

    return run(_conv_implementation(backend, y, conv_weight, conv_bias, conv_args, prologue is not None,
                                    relu, compute_stats, run))


def _unit_forward_mismatch(conv_bias: Optional[Tensor], reference: tuple, result: tuple) -> Optional[str]:
    """Why an implementation's (out, out_mean, out_var) of a bn_act_conv2d / conv2d_stats call is not the
    reference's (``dispatch.mismatch``), or None: out on its own scale plus the conv bias's, the mean on out's
    (it is off by at most what out is), the variance on its own, all with out's dtype's tolerance."""
    out, mean, var = reference
    scale = dispatch.magnitude(out) + dispatch.magnitude(conv_bias)
    why = dispatch.mismatch("the output", out, result[0], scale)
    if why is None and mean is not None:
        why = (dispatch.mismatch("the batch mean", mean, result[1], scale, out.dtype)
               or dispatch.mismatch("the batch variance", var, result[2], dtype=out.dtype))
    return why


@torch.no_grad()
def _unit_backward_mismatch(y: Tensor, mean: Optional[Tensor], reference: tuple, result: tuple) -> Optional[str]:
    """Why an implementation's (d_input, sums, d_conv_weight, masked) of a unit's conv backward is not the
    reference's (cuDNN's: d_input is d act, unmasked), or None. The input gradients are compared where both are
    masked alike. BatchNorm's sums over each channel's N*H*W terms dz and dz * (y - mean) (|dz| <= |d act|) may
    be off by the terms' rounding, which takes either sign: an ulp of every term, added as a random walk, is
    about an ulp of their root-sum-square. Their scales: the largest of each channel's |d act|_2, and of that
    times the channel's largest |y - mean| (no smaller than the second sum's root-sum-square; neither needs a
    copy of d act or y)."""
    d_act, sums, d_weight, masked = reference
    why = None
    if d_weight is not None:
        why = dispatch.mismatch("the weight gradient", d_weight, result[2])
    if why is None and d_act is not None and masked == result[3]:
        why = dispatch.mismatch("the input gradient", d_act, result[0])
    if why is None and sums is not None:
        norms = torch.linalg.vector_norm(d_act, dim=(0, 2, 3)).float()
        why = dispatch.mismatch("BatchNorm's backward sum of dz", sums[0], result[1][0], float(norms.max()),
                                d_act.dtype)
        if why is None:
            mean = mean.float()
            deviation = torch.maximum(y.amax((0, 2, 3)).float() - mean, mean - y.amin((0, 2, 3)).float())
            why = dispatch.mismatch("BatchNorm's backward sum of dz * (y - mean)", sums[1], result[1][1],
                                    float((norms * deviation).max()), d_act.dtype)
    return why


def _triton_conv_unavailable(y, conv_weight, conv_args) -> Optional[str]:
    """None when ``fusedres.triton.conv`` can run this bn_act_conv2d / conv2d_stats call, else why not."""
    module, reason = backends.triton_conv()
    if module is None:
        return reason
    if y.dtype != conv_weight.dtype:
        return f"the conv input ({y.dtype}) is not in the weight's dtype ({conv_weight.dtype})"
    return module.unsupported_reason(y, conv_weight, *conv_args)


def _conv_signature(y, conv_weight, conv_args, **flags: bool) -> tuple:
    """A measured-dispatch signature of a unit's conv on ``y``: everything the choice (and whether the
    Triton kernels can run it) depends on: dtypes, layout, shapes, conv arguments, torch's conv flags and
    the call's own ``flags``."""
    stride, padding, dilation, groups = conv_args
    return (y.dtype, conv_weight.dtype, backends.channels_last(y), tuple(y.shape), tuple(conv_weight.shape),
            tuple(stride), tuple(padding), tuple(dilation), groups, backends.conv_flags(y.dtype), tuple(flags.items()))


def _describe_conv_signature(signature: tuple) -> str:
    (dtype, weight_dtype, channels_last, y_shape, w_shape, stride, padding, dilation, groups, conv_flags,
     flags) = signature
    dtypes = str(dtype)[6:] + ("" if weight_dtype == dtype else f"->{str(weight_dtype)[6:]}")
    return (f"{dtypes}|{'cl' if channels_last else 'nchw'}|x{list(y_shape)}|w{list(w_shape)}|"
            f"s{list(stride)}p{list(padding)}d{list(dilation)}g{groups}|"
            + "|".join(f"{name}{int(value)}" for name, value in flags) + f"|{backends.describe_conv_flags(conv_flags)}")


_CONV_DISPATCH = dispatch.MeasuredDispatch("unit_conv2d", ("cudnn", "triton"), _describe_conv_signature,
                                           references=("cudnn",))
_CONV_BACKWARD_DISPATCH = dispatch.MeasuredDispatch("unit_conv2d_backward", ("cudnn", "triton"),
                                                    _describe_conv_signature, references=("cudnn",))


def _choose_conv(conv_dispatch, backend, y, triton_unavailable, signature, run, compare) -> str:
    """"triton" or "cudnn" for a unit's conv (forward or backward) on ``y``: the triton backend takes the
    Triton kernels wherever ``triton_unavailable()`` is None, cuda and torch take torch's (cuDNN's), and
    "auto" on a CUDA tensor times both on the first call per ``signature()`` and keeps the faster, of those
    whose results ``compare`` finds in agreement with cuDNN's (``dispatch.py``: a known signature is answered
    without checking the call again)."""
    name = backends.requested_backend(backend)
    if name == "triton":
        return "cudnn" if triton_unavailable() else "triton"
    if name != "auto" or not backends.measured(y):
        return "cudnn"
    return conv_dispatch.choose(
        y.device, signature(), lambda implementation: triton_unavailable() if implementation == "triton" else None,
        run, compare)


def _conv_implementation(backend, y, conv_weight, conv_bias, conv_args, prologue, relu, compute_stats,
                         run) -> str:
    """Which conv runs a bn_act_conv2d / conv2d_stats call: "triton" (``fusedres.triton.conv``, the
    prologue and the statistics inside its one launch) or "cudnn" (torch's conv, after a BN-apply
    pass for a prologue and before a statistics pass); see ``_choose_conv``."""
    return _choose_conv(
        _CONV_DISPATCH, backend, y, lambda: _triton_conv_unavailable(y, conv_weight, conv_args),
        lambda: _conv_signature(y, conv_weight, conv_args, prologue=prologue, relu=relu, stats=compute_stats,
                                bias=conv_bias is not None), run,
        lambda reference, result: _unit_forward_mismatch(conv_bias, reference, result))


def _conv_out_fake(y, conv_weight, conv_bias, stride, padding, dilation, groups):
    act = torch.empty_like(y, dtype=conv_weight.dtype)
    return F.conv2d(act, conv_weight, conv_bias, stride, padding, dilation, groups)


@bn_act_conv2d_op.register_fake
def _(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
      batch_stats, relu, backend, sync_group="", count=0):
    return _conv_out_fake(y, conv_weight, conv_bias, stride, padding, dilation, groups)


@conv2d_stats_op.register_fake
def _(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
      batch_stats, relu, backend, sync_group="", count=0):
    out = _conv_out_fake(y, conv_weight, conv_bias, stride, padding, dilation, groups)
    stat = out.new_empty((out.shape[1],), dtype=compute_dtype(out))
    return out, stat, torch.empty_like(stat)


def _prologue_conv2d_setup_context(ctx, inputs, output):
    (y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
     batch_stats, relu, backend, sync_group, count) = inputs[:16]
    ctx.save_for_backward(y, mean, invstd, weight, bias, conv_weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.flags = (batch_stats, relu, backend, sync_group, count)
    ctx.conv_bias_dtype = None if conv_bias is None else conv_bias.dtype
    if isinstance(output, tuple):  # conv2d_stats: BatchNorm's consumer op owns its backward
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the statistics' gradients stay None, not zeros filled each backward


def _triton_backward_parts(grad_out, y, conv_weight, conv_args, has_prologue, want_input, want_weight):
    """(input side, weight gradient, why neither): which parts of a unit's conv backward the Triton kernels
    can run. The input side only with a prologue (``conv2d_input_grad``: ReLU mask and BatchNorm's sums in
    its epilogue); the weight gradient recomputing the prologue as it loads y (``conv2d_weight_grad``)."""
    reasons = []
    input_side = weight_side = False
    if want_input and has_prologue:
        module, reason = backends.triton_conv("conv_dgrad")
        reason = reason or module.input_grad_unsupported_reason(grad_out, conv_weight, y, *conv_args)
        input_side = reason is None
        reasons.append(f"input gradient: {reason}")
    if want_weight:
        module, reason = backends.triton_conv("conv_wgrad")
        reason = reason or module.unsupported_reason(y, grad_out, tuple(conv_weight.shape), *conv_args)
        weight_side = reason is None
        reasons.append(f"weight gradient: {reason}")
    return input_side, weight_side, "; ".join(reasons) or "no gradient the Triton kernels compute is needed"


def _conv_backward_local(implementation, grad_out, bn_tensors, conv_weight, conv_args, batch_stats, relu, backend,
                         want, triton_parts):
    """This rank's part of a unit's conv backward: (d_input, sums, d_conv_weight, masked).

    d_input is d act (masked False) or, from the Triton input side, dz = d act * ReLU'(z) (masked True);
    sums are BatchNorm backward's [sum dz, sum dz * (y - mean)] when there is a prologue (``bn_tensors``
    are bn_act's first 11 arguments, mean None without one), else None. "cudnn": torch's
    convolution_backward (on the recomputed activation for the weight gradient) and
    bn_act_backward_reduce, all ops (traceable by torch.compile); "triton": the Triton kernels, called
    directly, for the parts ``triton_parts()`` allows.
    """
    want_input, want_weight = want
    triton_input, triton_weight, _ = triton_parts() if implementation == "triton" else (False, False, "")
    y, mean = bn_tensors[:2]
    has_prologue = mean is not None
    stride, padding, dilation, groups = conv_args
    d_input = sums = d_conv_weight = None
    in_scale = in_shift = None
    if has_prologue and (triton_input or triton_weight):  # only the Triton kernels take the prologue's affine
        in_scale, in_shift = backends.select(backend, y).affine(*bn_tensors[1:5])
    if triton_input:
        d_input, sums = backends.triton_conv("conv_dgrad")[0].conv2d_input_grad(
            grad_out, conv_weight, y, stride=stride, padding=padding, dilation=dilation, groups=groups,
            in_scale=in_scale, in_shift=in_shift, in_relu=relu, mean=mean.float())
        sums = list(sums.unbind(0))
    if triton_weight:
        d_conv_weight = backends.triton_conv("conv_wgrad")[0].conv2d_weight_grad(
            y, grad_out, tuple(conv_weight.shape), stride=stride, padding=padding, dilation=dilation,
            groups=groups, in_scale=in_scale, in_shift=in_shift, in_relu=relu)
    torch_input, torch_weight = want_input and not triton_input, want_weight and not triton_weight
    if torch_input or torch_weight:
        act = y  # only its shape matters unless the weight gradient is taken here
        if torch_weight and has_prologue:  # recompute the prologue's activation: it was never saved
            act = bn_act(*bn_tensors, batch_stats, relu, backend)
        d_act, d_weight = torch.ops.aten.convolution_backward(
            grad_out, act.to(conv_weight.dtype), conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
            [torch_input, torch_weight, False])[:2]
        if torch_input:
            d_input = d_act
            if has_prologue:
                sums = bn_act_backward_reduce(d_act, *bn_tensors, relu, backend)
        if torch_weight:
            d_conv_weight = d_weight
    return d_input, sums, d_conv_weight, triton_input


def _prologue_conv2d_backward(ctx, grad_out, *unused_stats_grads):
    if grad_out is None:  # conv2d_stats' output reached with no gradient (its gradients are not materialised)
        return (None,) * len(ctx.needs_input_grad)
    y, mean, invstd, weight, bias, conv_weight = ctx.saved_tensors
    conv_args = ctx.conv_args
    batch_stats, relu, backend, sync_group, count = ctx.flags
    need = ctx.needs_input_grad
    has_prologue = mean is not None
    bn_tensors = (y, mean, invstd, weight, bias) + (None,) * 6
    want = (need[0] or need[3] or need[4], need[5])
    triton_parts = functools.cache(lambda: _triton_backward_parts(grad_out, y, conv_weight, conv_args, has_prologue,
                                                                  *want))

    def local(implementation: str):
        return _conv_backward_local(implementation, grad_out, bn_tensors, conv_weight, conv_args, batch_stats, relu,
                                    backend, want, triton_parts)

    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        # traced into the graph, or recorded for a double backward (create_graph=True): torch's ops only. The
        # Triton kernels are called directly: the graph would hold their results as constants
        implementation = "cudnn"
    else:
        implementation = _choose_conv(
            _CONV_BACKWARD_DISPATCH, backend, y, lambda: None if any(triton_parts()[:2]) else triton_parts()[2],
            lambda: _conv_signature(y, conv_weight, conv_args, prologue=has_prologue, relu=relu,
                                    grad_cl=backends.channels_last(grad_out), input=want[0], weight=want[1]), local,
            lambda reference, result: _unit_backward_mismatch(y, mean, reference, result))
    d_input, sums, d_conv_weight, masked = local(implementation)
    dy, dweight, dbias = d_input, None, None
    if want[0] and has_prologue:  # BatchNorm's backward: the sums (all-reduced when synchronised), then apply
        dy, dweight, dbias = bn_act_grads(d_input, bn_tensors, batch_stats, relu and not masked, False, backend,
                                           sync_group, count, sums)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
    d_conv_bias = None
    if ctx.conv_bias_dtype is not None and need[6]:
        d_conv_bias = grad_out.sum((0, 2, 3), dtype=compute_dtype(grad_out)).to(ctx.conv_bias_dtype)
    grads = (dy, None, None, dweight, dbias, d_conv_weight, d_conv_bias)
    return grads + (None,) * (len(need) - len(grads))


# What the package calls (eager.entry: the op's body without the dispatcher where nothing needs it)
bn_act_conv2d = eager.entry(bn_act_conv2d_op, _bn_act_conv2d, _prologue_conv2d_setup_context,
                            _prologue_conv2d_backward)
conv2d_stats = eager.entry(conv2d_stats_op, _conv2d_stats, _prologue_conv2d_setup_context, _prologue_conv2d_backward)
