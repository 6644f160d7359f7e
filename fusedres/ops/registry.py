"""Every fusedres op, declared once: torch.library custom op + fake kernel + autograd.

The ops (all in the ``fusedres`` namespace, so ``torch.compile`` sees them without graph
breaks) and their maths; "act" is ReLU or identity, per-channel vectors broadcast over (N, H, W):

``batch_norm_stats(y, running_mean?, running_var?, batch_stats, momentum, eps, backend)``
    -> (mean, invstd). With ``batch_stats``: the batch's per-channel mean and
    1/sqrt(var + eps) (biased var), and the running stats (if given) updated in place as torch
    does: r = (1 - momentum) * r + momentum * stat, with the unbiased variance. Otherwise the
    running stats themselves. Outputs carry no gradient: the consumer op below owns the
    whole BatchNorm backward, the statistics path included.

``bn_act(y, mean, invstd, weight?, bias?, residual?, sc_y?, sc_mean?, sc_invstd?, sc_weight?,
sc_bias?, batch_stats, relu, backend)``
    out = act(bn(y) + r), bn(y) = (y - mean) * invstd * weight + bias, and r = 0, the
    identity ``residual``, or a second BatchNorm bn_sc(sc_y) (the downsample shortcut).
    Saves for backward: y, sc_y, per-channel vectors, and the identity residual only when
    relu needs it for its mask. Never the normalised or activated tensor.

``bn_act_conv2d(y, mean, invstd, weight?, bias?, conv_weight, conv_bias?, stride, padding,
dilation, groups, batch_stats, relu, backend)``
    out = conv2d(act(bn(y)), conv_weight, conv_bias): the next unit's conv with the
    previous unit's BatchNorm + act as its prologue. Saves y and per-channel vectors; the
    activation is recomputed in backward for the weight gradient, never kept.

``bn_act_backward(...)``: the backward of bn_act, one reduction pass (sums of dz and
dz * (y - mean), the ReLU mask recomputed from y) and one elementwise pass writing dy (and
the residual's gradient).

Inputs reach these ops already validated and in kernel layout (see ``functional.py``).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from . import backends

_LIB = "fusedres"


def compute_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def same_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` contiguous in ``like``'s memory format (NCHW or channels_last); no copy if it is."""
    if like.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def _affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """(scale, shift) with bn(y) = y * scale + shift."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
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


# --------------------------------------------------------------------------- batch_norm_stats
@custom_op(f"{_LIB}::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_stats(
    y: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    batch_stats: bool,
    momentum: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if not batch_stats:
        mean = running_mean.to(compute_dtype(y), copy=True)
        return mean, torch.rsqrt(running_var.to(mean.dtype) + eps)
    mean, var = backends.select(backend, y).channel_stats(y)
    if running_mean is not None:
        count = y.numel() // y.shape[1]
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
    return mean, torch.rsqrt(var + eps)


@batch_norm_stats.register_fake
def _(y, running_mean, running_var, batch_stats, momentum, eps, backend):
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
) -> Tensor:
    scale, shift = _affine(mean, invstd, weight, bias)
    res, res_scale, res_shift, _ = _residual_args(residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias)
    return backends.select(backend, y).act_forward(y, scale, shift, res, res_scale, res_shift, relu)


@bn_act.register_fake
def _(y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias,
      batch_stats, relu, backend):
    return torch.empty_like(y)


@custom_op(f"{_LIB}::bn_act_backward", mutates_args=())
def bn_act_backward(
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
    batch_stats: bool,
    relu: bool,
    want_residual_grad: bool,
    backend: str,
) -> list[Tensor]:
    """[dy, dweight, dbias] + [d_residual if want_residual_grad] + [dsc_y, dsc_weight, dsc_bias if sc_y]."""
    kernels = backends.select(backend, y)
    grad_out = same_layout(grad_out.to(y.dtype), y)  # autograd's gradient may have any strides
    count = y.numel() // y.shape[1]
    scale, shift = _affine(mean, invstd, weight, bias)
    res, res_scale, res_shift, res_mean = _residual_args(residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias)
    sum_dz, sum_dz_yc, sum_dz_rc = kernels.backward_reduce(
        grad_out, y, scale, shift, res, res_scale, res_shift, relu, mean, res_mean)
    coef = _input_grad_coef(sum_dz, sum_dz_yc, mean, invstd, weight, batch_stats, count)
    res_coef = None
    if sc_y is not None:
        res_coef = _input_grad_coef(sum_dz, sum_dz_rc, sc_mean, sc_invstd, sc_weight, batch_stats, count)
    want_res = want_residual_grad or sc_y is not None
    dy, d_res = kernels.backward_apply(
        grad_out, y, scale, shift, res, res_scale, res_shift, relu, coef, res_coef, want_res)
    grads = [dy, sum_dz_yc * invstd, sum_dz.clone()]
    if want_residual_grad and sc_y is None:
        grads.append(d_res)
    if sc_y is not None:
        grads += [d_res, sum_dz_rc * sc_invstd, sum_dz.clone()]
    return grads


@bn_act_backward.register_fake
def _(grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
      sc_bias, batch_stats, relu, want_residual_grad, backend):
    grads = [torch.empty_like(y), torch.empty_like(mean), torch.empty_like(mean)]
    if want_residual_grad and sc_y is None:
        grads.append(torch.empty_like(residual))
    if sc_y is not None:
        grads += [torch.empty_like(sc_y), torch.empty_like(mean), torch.empty_like(mean)]
    return grads


def _bn_act_setup_context(ctx, inputs, output):
    (y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias,
     batch_stats, relu, backend) = inputs
    # The identity residual is only needed to recompute the ReLU mask.
    ctx.save_for_backward(y, mean, invstd, weight, bias, residual if relu else None,
                          sc_y, sc_mean, sc_invstd, sc_weight, sc_bias)
    ctx.flags = (batch_stats, relu, backend)
    ctx.residual_dtype = None if residual is None else residual.dtype


def _bn_act_backward(ctx, grad_out):
    y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight, sc_bias = ctx.saved_tensors
    batch_stats, relu, backend = ctx.flags
    residual_given = ctx.residual_dtype is not None
    want_res_kernel = residual_given and relu and ctx.needs_input_grad[5]
    grads = torch.ops.fusedres.bn_act_backward(
        grad_out, y, mean, invstd, weight, bias, residual, sc_y, sc_mean, sc_invstd, sc_weight,
        sc_bias, batch_stats, relu, want_res_kernel, backend)
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
            None, None, None)


bn_act.register_autograd(_bn_act_backward, setup_context=_bn_act_setup_context)


# --------------------------------------------------------------------------- bn_act_conv2d
@custom_op(f"{_LIB}::bn_act_conv2d", mutates_args=())
def bn_act_conv2d(
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
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
) -> Tensor:
    scale, shift = _affine(mean, invstd, weight, bias)
    act = backends.select(backend, y).act_forward(y, scale, shift, None, None, None, relu)
    return F.conv2d(act.to(conv_weight.dtype), conv_weight, conv_bias, stride, padding, dilation, groups)


@bn_act_conv2d.register_fake
def _(y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
      batch_stats, relu, backend):
    act = torch.empty_like(y, dtype=conv_weight.dtype)
    return F.conv2d(act, conv_weight, conv_bias, stride, padding, dilation, groups)


def _bn_act_conv2d_setup_context(ctx, inputs, output):
    (y, mean, invstd, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
     batch_stats, relu, backend) = inputs
    ctx.save_for_backward(y, mean, invstd, weight, bias, conv_weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.flags = (batch_stats, relu, backend)
    ctx.conv_bias_dtype = None if conv_bias is None else conv_bias.dtype


def _bn_act_conv2d_backward(ctx, grad_out):
    y, mean, invstd, weight, bias, conv_weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    batch_stats, relu, backend = ctx.flags
    need = ctx.needs_input_grad
    need_bn_side = need[0] or need[3] or need[4]
    has_conv_bias = ctx.conv_bias_dtype is not None
    # Recompute the prologue's activation: it was never saved.
    act = torch.ops.fusedres.bn_act(y, mean, invstd, weight, bias, None, None, None, None, None,
                                    None, batch_stats, relu, backend).to(conv_weight.dtype)
    d_act, d_conv_weight, d_conv_bias = torch.ops.aten.convolution_backward(
        grad_out, act, conv_weight, [conv_weight.shape[0]] if has_conv_bias else None,
        stride, padding, dilation, False, [0, 0], groups,
        [need_bn_side, need[5], has_conv_bias and need[6]])
    dy = dweight = dbias = None
    if need_bn_side:
        dy, dweight, dbias = torch.ops.fusedres.bn_act_backward(
            d_act, y, mean, invstd, weight, bias, None, None, None, None, None, None,
            batch_stats, relu, False, backend)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
    if d_conv_bias is not None:
        d_conv_bias = d_conv_bias.to(ctx.conv_bias_dtype)
    return (dy, None, None, dweight, dbias, d_conv_weight, d_conv_bias,
            None, None, None, None, None, None, None)


bn_act_conv2d.register_autograd(_bn_act_conv2d_backward, setup_context=_bn_act_conv2d_setup_context)
