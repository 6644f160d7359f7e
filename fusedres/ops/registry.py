"""The BatchNorm ops of fusedres, each declared once: torch.library custom op + fake kernel + autograd, and
the entry point the package calls (``eager.entry``: the op's body without the dispatcher in eager code).

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

The backward of bn_act (and of bn_act_conv2d's prologue), with dz = d out * act'(z)
(the ReLU mask recomputed from y) and sums over (N, H, W):

``bn_act_backward_reduce(grad_out, y, <bn_act's tensors>, relu, backend)``
    -> [sum dz, sum dz * (y - mean)] + [sum dz * (sc_y - sc_mean) with a shortcut BatchNorm]:
    one reduction pass, this rank's sums.

``bn_act_backward_apply(grad_out, y, <bn_act's tensors>, sums, group_sums, count,
batch_stats, relu, want_residual_grad, backend)``
    -> [dy, dweight, dbias] + [d_residual if want_residual_grad] + [dsc_y, dsc_weight,
    dsc_bias with a shortcut BatchNorm]: one per-channel launch per BatchNorm (the backend's
    ``backward_coefficients``), then one elementwise pass. With M = ``count`` values per
    channel and S = ``group_sums`` (the reduce's sums added over the ranks of the sync group,
    or ``sums`` itself unsynchronised),
        dy = weight * invstd * (dz - S[0] / M - (y - mean) * invstd^2 * S[1] / M)
    (batch statistics; weight * invstd * dz with running statistics), and alike for dsc_y with
    S[2]. dweight = invstd * sums[1] and dbias = sums[0] are this rank's own, as torch's
    SyncBatchNorm returns them: DistributedDataParallel adds them up across ranks.
    Between the two ops the autograd formula all-reduces the sums over ``sync_group``.

The other ops, declared the same way, live beside their conv dispatch: ``bn_act_conv2d`` and
``conv2d_stats`` (a training unit's conv with this BatchNorm + act as its prologue) in ``unit_conv.py``;
``conv_bias_act`` (the eval-mode unit with BatchNorm folded into the conv, no autograd) in ``inference.py``.

Inputs reach these ops already validated and in kernel layout (see ``functional.py``).
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.library import custom_op

from . import backends, eager


def compute_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` contiguous in ``like``'s memory format (NCHW or channels_last); no copy if it is."""
    if like.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- channel_stats
def _channel_stats(y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return backends.select(backend, y).channel_stats(y)


channel_stats_op = custom_op("fusedres::channel_stats", mutates_args=())(_channel_stats)
channel_stats = eager.entry(channel_stats_op, _channel_stats)


@channel_stats_op.register_fake
def _(y, backend):
    stat = y.new_empty((y.shape[1],), dtype=compute_dtype(y))
    return stat, torch.empty_like(stat)


# --------------------------------------------------------------------------- bn_act
def _residual_args(kernels, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias):
    """Stage-kernel residual arguments: (tensor, res_scale, res_shift, res_mean)."""
    if sc_y is not None:
        return sc_y, *kernels.affine(sc_mean, sc_invstd, sc_weight, sc_bias), sc_mean
    return residual, None, None, None


def _bn_act(
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
    kernels = backends.select(backend, y)
    res, res_scale, res_shift, _ = _residual_args(kernels, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias)
    return kernels.act_forward(y, *kernels.affine(mean, invstd, weight, bias), res, res_scale, res_shift, relu)


bn_act_op = custom_op("fusedres::bn_act", mutates_args=())(_bn_act)


@bn_act_op.register_fake
def _(y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias,
      batch_stats, relu, backend, sync_group="", count=0):
    return torch.empty_like(y)


def _stage_grad(grad_out: Tensor, y: Tensor) -> Tensor:
    """grad_out as the backward stages take it: y's dtype and layout (autograd's gradient may have any strides)."""
    return same_layout(grad_out.to(y.dtype), y)


def _bn_act_backward_reduce(
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
    kernels = backends.select(backend, y)
    res, res_scale, res_shift, res_mean = _residual_args(kernels, residual, sc_y, sc_mean, sc_invstd, sc_weight,
                                                         sc_bias)
    sums = kernels.backward_reduce(_stage_grad(grad_out, y), y, *kernels.affine(mean, invstd, weight, bias), res,
                                   res_scale, res_shift, relu, mean, res_mean)
    return [s for s in sums if s is not None]


bn_act_backward_reduce_op = custom_op("fusedres::bn_act_backward_reduce", mutates_args=())(_bn_act_backward_reduce)


@bn_act_backward_reduce_op.register_fake
def _(grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
      sc_bias, relu, backend):
    return [torch.empty_like(mean) for _ in range(2 if sc_y is None else 3)]


def _bn_act_backward_apply(
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
    kernels = backends.select(backend, y)
    coef, shift, dweight, dbias = kernels.backward_coefficients(
        sums[0], sums[1], group_sums[0], group_sums[1], mean, invstd, weight, bias, count, batch_stats)
    res, res_scale, res_shift, res_coef = residual, None, None, None
    if sc_y is not None:
        res_coef, res_shift, dsc_weight, dsc_bias = kernels.backward_coefficients(
            sums[0], sums[2], group_sums[0], group_sums[2], sc_mean, sc_invstd, sc_weight, sc_bias, count,
            batch_stats)
        res, res_scale = sc_y, res_coef[0]
    want_res = want_residual_grad or sc_y is not None
    dy, d_res = kernels.backward_apply(_stage_grad(grad_out, y), y, coef[0], shift, res, res_scale, res_shift, relu,
                                       coef, res_coef, want_res)
    grads = [dy, dweight, dbias]
    if want_residual_grad and sc_y is None:
        grads.append(d_res)
    if sc_y is not None:
        grads += [d_res, dsc_weight, dsc_bias]
    return grads


bn_act_backward_apply_op = custom_op("fusedres::bn_act_backward_apply", mutates_args=())(_bn_act_backward_apply)


@bn_act_backward_apply_op.register_fake
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


def bn_act_grads(grad_out, bn_tensors, batch_stats, relu, want_residual_grad, backend,
                  sync_group, count, sums=None) -> list[Tensor]:
    """bn_act_backward_apply's gradients; ``bn_tensors`` are bn_act's first 11 arguments, ``sums`` this
    rank's bn_act_backward_reduce of them when already taken."""
    if sums is None:
        sums = bn_act_backward_reduce(grad_out, *bn_tensors, relu, backend)
    if sync_group:
        group_sums = _all_reduce_sums(sums, sync_group)
    else:
        y = bn_tensors[0]
        # Values per channel. An empty y's sums are 0, and so are the terms they scale, whatever the count.
        group_sums, count = sums, max(y.numel() // max(y.shape[1], 1), 1)
    return bn_act_backward_apply(
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
    grads = bn_act_grads(grad_out, bn_tensors, batch_stats, relu, want_res_kernel, backend,
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


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedres: the backward of a fused BatchNorm cannot be differentiated again (double backward: "
                       "a gradient taken with create_graph=True, then differentiated, as a gradient penalty does); "
                       "fusedres.revert(model) gives the model back in torch's modules, which can")


# What the package calls (eager.entry: the op's body without the dispatcher where nothing needs it). The backward
# stages are differentiated only by a second backward, which their autograd refuses.
bn_act = eager.entry(bn_act_op, _bn_act, _bn_act_setup_context, _bn_act_backward)
bn_act_backward_reduce = eager.entry(bn_act_backward_reduce_op, _bn_act_backward_reduce, None, _no_double_backward)
bn_act_backward_apply = eager.entry(bn_act_backward_apply_op, _bn_act_backward_apply, None, _no_double_backward)
