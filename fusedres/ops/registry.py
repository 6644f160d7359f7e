"""Every fusedres op, declared once: torch.library custom op + fake kernel + autograd.

The ops (all in the ``fusedres`` namespace, so ``torch.compile`` sees them without graph
breaks) and their maths; "act" is ReLU or identity, per-channel vectors broadcast over (N, H, W):

``channel_stats(y, backend)``
    -> (mean, var): the per-channel mean and biased variance of ``y`` over (N, H, W), in the
    compute dtype. Combining them across ranks, the running-stat update and invstd are plain
    torch ops in ``functional.batch_norm_stats``, so synchronised BatchNorm is an all-gather
    between stages (the staging of In-Place ABN, mapillary/inplace_abn).

``bn_act(y, mean, invstd, weight?, bias?, residual?, sc_y?, sc_mean?, sc_invstd?, sc_weight?,
sc_bias?, batch_stats, relu, backend, sync_group="", count=0)``
    out = act(bn(y) + r), bn(y) = (y - mean) * invstd * weight + bias, and r = 0, the
    identity ``residual``, or a second BatchNorm bn_sc(sc_y) (the downsample shortcut).
    Saves for backward: y, sc_y, per-channel vectors, and the identity residual only when
    relu needs it for its mask. Never the normalised or activated tensor.
    ``sync_group`` names the process group (``ProcessGroup.group_name``) over whose ranks the
    batch statistics were taken, and ``count`` is the number of values per channel on all
    those ranks together; "" (and ``count`` unused) when the statistics are this rank's own,
    whose count is N * H * W. Only the backward uses them.

``bn_act_conv2d(y, mean?, invstd?, weight?, bias?, conv_weight, conv_bias?, stride, padding,
dilation, groups, batch_stats, relu, backend, sync_group="", count=0)``
    out = conv2d(act(bn(y)), conv_weight, conv_bias): the next unit's conv with the
    previous unit's BatchNorm + act as its prologue (no prologue, out = conv2d(y), when ``mean``
    is None). Saves y and per-channel vectors; the activation is recomputed in backward for the
    weight gradient, never kept. The conv is either the Triton implicit-GEMM conv
    (``triton/conv.py``: one launch, applying the prologue as it loads y) or torch's (cuDNN's)
    after one BN-apply pass: the triton backend takes the Triton conv wherever it supports the
    call, cuda and torch take cuDNN's, and "auto" on CUDA times both per call signature and keeps
    the faster, where its results agree with cuDNN's (``_conv_implementation``). The backward chooses the
    same way (``_CONV_BACKWARD_DISPATCH``)
    between torch's convolution_backward on the recomputed activation plus the BN backward stages, and
    the Triton kernels: the weight gradient recomputing the prologue as it loads y
    (``triton/conv_wgrad.py``) and the input gradient with the ReLU mask and the BN backward's sums
    in its epilogue (``conv2d_input_grad``; a strided conv's in one launch per phase of the stride),
    then bn_act_backward_apply. Under
    torch.compile the backward is traced, so it takes torch's (only ops).

``conv2d_stats(<bn_act_conv2d's arguments>, stats_shift?)``
    -> (out, out_mean, out_var): bn_act_conv2d's out and the per-channel mean and biased
    variance of out (as channel_stats gives them, not differentiable), the start of the next
    BatchNorm. With the Triton conv (chosen as for bn_act_conv2d) one launch: it reduces its output
    tiles to per-channel sums about ``stats_shift`` (the BatchNorm's running mean: any value is
    exact up to rounding, one near the mean avoids cancellation) as it stores them; with cuDNN's,
    the conv and then channel_stats. Same backward as bn_act_conv2d.

The backward of bn_act (and of bn_act_conv2d's prologue), with dz = d out * act'(z)
(the ReLU mask recomputed from y) and sums over (N, H, W):

``bn_act_backward_reduce(grad_out, y, <bn_act's tensors>, relu, backend)``
    -> [sum dz, sum dz * (y - mean)] + [sum dz * (sc_y - sc_mean) with a shortcut BatchNorm]:
    one reduction pass, this rank's sums.

``bn_act_backward_apply(grad_out, y, <bn_act's tensors>, sums, group_sums, count,
batch_stats, relu, want_residual_grad, backend)``
    -> [dy, dweight, dbias] + [d_residual if want_residual_grad] + [dsc_y, dsc_weight,
    dsc_bias with a shortcut BatchNorm]: one elementwise pass. With M = ``count`` values per
    channel and S = ``group_sums`` (the reduce's sums added over the ranks of the sync group,
    or ``sums`` itself unsynchronised),
        dy = weight * invstd * (dz - S[0] / M - (y - mean) * invstd^2 * S[1] / M)
    (batch statistics; weight * invstd * dz with running statistics), and alike for dsc_y with
    S[2]. dweight = invstd * sums[1] and dbias = sums[0] are this rank's own, as torch's
    SyncBatchNorm returns them: DistributedDataParallel adds them up across ranks.
    Between the two ops the autograd formula all-reduces the sums over ``sync_group``.

One more op lives beside its dispatch in ``inference.py``: ``conv_bias_act(x, weight, bias?,
residual?, stride, padding, dilation, groups, relu, backend)`` = act(conv2d(x, weight, bias) +
residual), the eval-mode unit with BatchNorm folded into the conv, inference only (no autograd).

Inputs reach these ops already validated and in kernel layout (see ``functional.py``).
"""

import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from . import backends, dispatch

_LIB = "fusedres"


def compute_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` contiguous in ``like``'s memory format (NCHW or channels_last); no copy if it is."""
    if like.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def _affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """(scale, shift) with bn(y) = y * scale + shift, in two small ops (each a launch on the GPU, next to
    the kernel the pair feeds)."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = (mean * scale).neg_() if bias is None else torch.addcmul(bias.to(invstd.dtype), mean, scale, value=-1.0)
    return scale.contiguous(), shift.contiguous()


def _input_grad_coef(sum_dz, sum_dz_yc, mean, invstd, weight, batch_stats: bool, count: int):
    """(4, C) coefficients with dy = dz * c0 + (y - c3) * c1 + c2 (BatchNorm's input gradient).

    Batch statistics: dy = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), so
    c0 = w * invstd, c1 = -c0 * invstd^2 * mean(dz * (y - mean)), c2 = -c0 * mean(dz), c3 = mean.
    Running statistics: dy = w * invstd * dz. Kept centred on the mean: folding c3 into c2
    cancels catastrophically when |mean| >> std.
    """
    c0 = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if not batch_stats:
        zero = torch.zeros_like(c0)
        return torch.stack([c0, zero, zero, zero])
    c1 = -c0 * invstd * invstd * sum_dz_yc / count
    c2 = -c0 * sum_dz / count
    return torch.stack([c0, c1, c2, mean])


# --------------------------------------------------------------------------- channel_stats
@custom_op(f"{_LIB}::channel_stats", mutates_args=())
def channel_stats(y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return backends.select(backend, y).channel_stats(y)


@channel_stats.register_fake
def _(y, backend):
    stat = y.new_empty((y.shape[1],), dtype=compute_dtype(y))
    return stat, torch.empty_like(stat)


# --------------------------------------------------------------------------- bn_act
def _residual_args(residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias):
    """Stage-kernel residual arguments: (tensor, res_scale, res_shift, res_mean)."""
    if sc_y is not None:
        sc_scale, sc_shift = _affine(sc_mean, sc_invstd, sc_weight, sc_bias)
        return sc_y, sc_scale, sc_shift, sc_mean
    return residual, None, None, None


@custom_op(f"{_LIB}::bn_act", mutates_args=())
def bn_act(
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    sc_y: Optional[Tensor],
    sc_mean: Optional[Tensor],
    sc_invstd: Optional[Tensor],
    sc_weight: Optional[Tensor],
    sc_bias: Optional[Tensor],
    batch_stats: bool,
    relu: bool,
    backend: str,
    sync_group: str = "",
    count: int = 0,
) -> Tensor:
    scale, shift = _affine(mean, invstd, weight, bias)
    res, res_scale, res_shift, _ = _residual_args(residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias)
    return backends.select(backend, y).act_forward(y, scale, shift, res, res_scale, res_shift, relu)


@bn_act.register_fake
def _(y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias,
      batch_stats, relu, backend, sync_group="", count=0):
    return torch.empty_like(y)


def _backward_stage_args(grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean,
                         sc_invstd, sc_weight, sc_bias, backend):
    """(kernels, grad_out in y's layout, scale, shift, res, res_scale, res_shift, res_mean)."""
    grad_out = same_layout(grad_out.to(y.dtype), y)  # autograd's gradient may have any strides
    scale, shift = _affine(mean, invstd, weight, bias)
    return (backends.select(backend, y), grad_out, scale, shift,
            *_residual_args(residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias))


@custom_op(f"{_LIB}::bn_act_backward_reduce", mutates_args=())
def bn_act_backward_reduce(
    grad_out: Tensor,
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    sc_y: Optional[Tensor],
    sc_mean: Optional[Tensor],
    sc_invstd: Optional[Tensor],
    sc_weight: Optional[Tensor],
    sc_bias: Optional[Tensor],
    relu: bool,
    backend: str,
) -> list[Tensor]:
    kernels, grad_out, scale, shift, res, res_scale, res_shift, res_mean = _backward_stage_args(
        grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
        sc_bias, backend)
    sums = kernels.backward_reduce(grad_out, y, scale, shift, res, res_scale, res_shift, relu,
                                   mean, res_mean)
    return [s for s in sums if s is not None]


@bn_act_backward_reduce.register_fake
def _(grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
      sc_bias, relu, backend):
    return [torch.empty_like(mean) for _ in range(2 if sc_y is None else 3)]


@custom_op(f"{_LIB}::bn_act_backward_apply", mutates_args=())
def bn_act_backward_apply(
    grad_out: Tensor,
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    sc_y: Optional[Tensor],
    sc_mean: Optional[Tensor],
    sc_invstd: Optional[Tensor],
    sc_weight: Optional[Tensor],
    sc_bias: Optional[Tensor],
    sums: list[Tensor],
    group_sums: list[Tensor],
    count: int,
    batch_stats: bool,
    relu: bool,
    want_residual_grad: bool,
    backend: str,
) -> list[Tensor]:
    kernels, grad_out, scale, shift, res, res_scale, res_shift, _ = _backward_stage_args(
        grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
        sc_bias, backend)
    coef = _input_grad_coef(group_sums[0], group_sums[1], mean, invstd, weight, batch_stats, count)
    res_coef = None
    if sc_y is not None:
        res_coef = _input_grad_coef(group_sums[0], group_sums[2], sc_mean, sc_invstd, sc_weight,
                                    batch_stats, count)
    want_res = want_residual_grad or sc_y is not None
    dy, d_res = kernels.backward_apply(
        grad_out, y, scale, shift, res, res_scale, res_shift, relu, coef, res_coef, want_res)
    grads = [dy, sums[1] * invstd, sums[0].clone()]
    if want_residual_grad and sc_y is None:
        grads.append(d_res)
    if sc_y is not None:
        grads += [d_res, sums[2] * sc_invstd, sums[0].clone()]
    return grads


@bn_act_backward_apply.register_fake
def _(grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
      sc_bias, sums, group_sums, count, batch_stats, relu, want_residual_grad, backend):
    grads = [torch.empty_like(y), torch.empty_like(mean), torch.empty_like(mean)]
    if want_residual_grad and sc_y is None:
        grads.append(torch.empty_like(residual))
    if sc_y is not None:
        grads += [torch.empty_like(sc_y), torch.empty_like(mean), torch.empty_like(mean)]
    return grads


def _all_reduce_sums(sums: list[Tensor], sync_group: str) -> list[Tensor]:
    """``sums`` added up over the ranks of the process group named ``sync_group``."""
    # Imported here: it exists only where torch.distributed.is_available().
    from torch.distributed.distributed_c10d import _resolve_process_group

    total = torch.cat(sums)
    dist.all_reduce(total, group=_resolve_process_group(sync_group))
    return list(total.chunk(len(sums)))


def _bn_act_grads(grad_out, bn_tensors, batch_stats, relu, want_residual_grad, backend,
                  sync_group, count, sums=None) -> list[Tensor]:
    """bn_act_backward_apply's gradients; ``bn_tensors`` are bn_act's first 11 arguments, ``sums`` this
    rank's bn_act_backward_reduce of them when already taken."""
    if sums is None:
        sums = torch.ops.fusedres.bn_act_backward_reduce(grad_out, *bn_tensors, relu, backend)
    if sync_group:
        group_sums = _all_reduce_sums(sums, sync_group)
    else:
        y = bn_tensors[0]
        group_sums, count = sums, y.numel() // y.shape[1]
    return torch.ops.fusedres.bn_act_backward_apply(
        grad_out, *bn_tensors, sums, group_sums, count, batch_stats, relu, want_residual_grad,
        backend)


def _bn_act_setup_context(ctx, inputs, output):
    (y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias,
     batch_stats, relu, backend, sync_group, count) = inputs
    # The identity residual is only needed to recompute the ReLU mask.
    ctx.save_for_backward(y, mean, invstd, weight, bias, residual if relu else None,
                          sc_y, sc_mean, sc_invstd, sc_weight, sc_bias)
    ctx.flags = (batch_stats, relu, backend, sync_group, count)
    ctx.residual_dtype = None if residual is None else residual.dtype


def _bn_act_backward(ctx, grad_out):
    bn_tensors = ctx.saved_tensors
    (y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
     sc_bias) = bn_tensors
    batch_stats, relu, backend, sync_group, count = ctx.flags
    residual_given = ctx.residual_dtype is not None
    want_res_kernel = residual_given and relu and ctx.needs_input_grad[5]
    grads = _bn_act_grads(grad_out, bn_tensors, batch_stats, relu, want_res_kernel, backend,
                          sync_group, count)
    dy, dweight, dbias = grads[:3]
    d_res = None
    if want_res_kernel:
        d_res = grads[3]
    elif residual_given and ctx.needs_input_grad[5]:
        d_res = grad_out.to(ctx.residual_dtype)  # no ReLU: the add passes the gradient through
    dsc_y = dsc_weight = dsc_bias = None
    if sc_y is not None:
        dsc_y, dsc_weight, dsc_bias = grads[-3:]
    return (dy, None, None,
            None if weight is None else dweight.to(weight.dtype),
            None if bias is None else dbias.to(bias.dtype),
            d_res, dsc_y, None, None,
            None if sc_weight is None else dsc_weight.to(sc_weight.dtype),
            None if sc_bias is None else dsc_bias.to(sc_bias.dtype),
            None, None, None, None, None)


bn_act.register_autograd(_bn_act_backward, setup_context=_bn_act_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedres: the backward of a fused BatchNorm cannot be differentiated again (double backward: "
                       "a gradient taken with create_graph=True, then differentiated, as a gradient penalty does); "
                       "fusedres.revert(model) gives the model back in torch's modules, which can")


for _op in (bn_act_backward_reduce, bn_act_backward_apply):  # reached by a second backward only
    _op.register_autograd(_no_double_backward)


# --------------------------------------------------------------------------- bn_act_conv2d, conv2d_stats
@custom_op(f"{_LIB}::bn_act_conv2d", mutates_args=())
def bn_act_conv2d(
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


@custom_op(f"{_LIB}::conv2d_stats", mutates_args=())
def conv2d_stats(
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
    stats_shift: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _prologue_conv2d(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding,
                            dilation, groups, relu, backend, compute_stats=True, stats_shift=stats_shift)


def _prologue_conv2d(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation,
                     groups, relu, backend, *, compute_stats, stats_shift=None):
    """(out, out_mean, out_var) of bn_act_conv2d / conv2d_stats; the statistics are None unless
    ``compute_stats``. No prologue when ``mean`` is None."""
    kernels = backends.select(backend, y)
    prologue = None if mean is None else _affine(mean, invstd, weight, bias)
    conv_args = (stride, padding, dilation, groups)

    def run(implementation: str):
        if implementation == "triton":  # one launch: the prologue as it loads y, the statistics as it stores out
            in_scale, in_shift = prologue if prologue is not None else (None, None)
            return backends.triton_conv()[0].conv2d_fused(
                y, conv_weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
                in_scale=in_scale, in_shift=in_shift, in_relu=relu,
                out_shift=None if conv_bias is None else conv_bias.float(), compute_stats=compute_stats,
                stats_shift=None if stats_shift is None else stats_shift.float())
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


@bn_act_conv2d.register_fake
def _(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
      batch_stats, relu, backend, sync_group="", count=0):
    return _conv_out_fake(y, conv_weight, conv_bias, stride, padding, dilation, groups)


@conv2d_stats.register_fake
def _(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
      batch_stats, relu, backend, sync_group="", count=0, stats_shift=None):
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


def _conv_backward_local(implementation, grad_out, bn_tensors, prologue, conv_weight, conv_args, batch_stats, relu,
                         backend, want, triton_parts):
    """This rank's part of a unit's conv backward: (d_input, sums, d_conv_weight, masked).

    d_input is d act (masked False) or, from the Triton input side, dz = d act * ReLU'(z) (masked True);
    sums are BatchNorm backward's [sum dz, sum dz * (y - mean)] when there is a prologue (``bn_tensors``
    are bn_act's first 11 arguments, ``prologue`` its (scale, shift)), else None. "cudnn": torch's
    convolution_backward (on the recomputed activation for the weight gradient) and
    bn_act_backward_reduce, all ops (traceable by torch.compile); "triton": the Triton kernels, called
    directly, for the parts ``triton_parts()`` allows.
    """
    want_input, want_weight = want
    triton_input, triton_weight, _ = triton_parts() if implementation == "triton" else (False, False, "")
    y, mean = bn_tensors[:2]
    stride, padding, dilation, groups = conv_args
    d_input = sums = d_conv_weight = None
    if triton_input:
        d_input, sums = backends.triton_conv("conv_dgrad")[0].conv2d_input_grad(
            grad_out, conv_weight, y, stride=stride, padding=padding, dilation=dilation, groups=groups,
            in_scale=prologue[0], in_shift=prologue[1], in_relu=relu, mean=mean.float())
        sums = list(sums.unbind(0))
    if triton_weight:
        in_scale, in_shift = prologue if prologue is not None else (None, None)
        d_conv_weight = backends.triton_conv("conv_wgrad")[0].conv2d_weight_grad(
            y, grad_out, tuple(conv_weight.shape), stride=stride, padding=padding, dilation=dilation,
            groups=groups, in_scale=in_scale, in_shift=in_shift, in_relu=relu)
    torch_input, torch_weight = want_input and not triton_input, want_weight and not triton_weight
    if torch_input or torch_weight:
        act = y  # only its shape matters unless the weight gradient is taken here
        if torch_weight and prologue is not None:  # recompute the prologue's activation: it was never saved
            act = torch.ops.fusedres.bn_act(*bn_tensors, batch_stats, relu, backend)
        d_act, d_weight = torch.ops.aten.convolution_backward(
            grad_out, act.to(conv_weight.dtype), conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
            [torch_input, torch_weight, False])[:2]
        if torch_input:
            d_input = d_act
            if prologue is not None:
                sums = torch.ops.fusedres.bn_act_backward_reduce(d_act, *bn_tensors, relu, backend)
        if torch_weight:
            d_conv_weight = d_weight
    return d_input, sums, d_conv_weight, triton_input


def _prologue_conv2d_backward(ctx, grad_out, *unused_stats_grads):
    y, mean, invstd, weight, bias, conv_weight = ctx.saved_tensors
    conv_args = ctx.conv_args
    batch_stats, relu, backend, sync_group, count = ctx.flags
    need = ctx.needs_input_grad
    has_prologue = mean is not None
    bn_tensors = (y, mean, invstd, weight, bias) + (None,) * 6
    prologue = _affine(mean, invstd, weight, bias) if has_prologue else None
    want = (need[0] or need[3] or need[4], need[5])
    triton_parts = functools.cache(lambda: _triton_backward_parts(grad_out, y, conv_weight, conv_args, has_prologue,
                                                                  *want))

    def local(implementation: str):
        return _conv_backward_local(implementation, grad_out, bn_tensors, prologue, conv_weight, conv_args,
                                    batch_stats, relu, backend, want, triton_parts)

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
        dy, dweight, dbias = _bn_act_grads(d_input, bn_tensors, batch_stats, relu and not masked, False, backend,
                                           sync_group, count, sums)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
    d_conv_bias = None
    if ctx.conv_bias_dtype is not None and need[6]:
        d_conv_bias = grad_out.sum((0, 2, 3), dtype=compute_dtype(grad_out)).to(ctx.conv_bias_dtype)
    grads = (dy, None, None, dweight, dbias, d_conv_weight, d_conv_bias)
    return grads + (None,) * (len(need) - len(grads))


for _op in (bn_act_conv2d, conv2d_stats):
    _op.register_autograd(_prologue_conv2d_backward, setup_context=_prologue_conv2d_setup_context)
