"""Pure-PyTorch implementation of the four stage kernels and BatchNorm's per-channel arithmetic; runs on
any device and dtype.

This file is also the contract every backend (``cuda_backend``, ``fusedres.triton``) meets:
the same functions, the same arguments, the same results up to rounding. The stages (``channel_stats``,
``act_forward``, ``backward_reduce``, ``backward_apply``) each pass over an activation; the per-channel
functions (``affine``, ``finish_batch_stats``, ``backward_coefficients``) make the vectors the stages take
from the statistics and sums the stages give, one launch each in the kernel backends where torch needs
several small ops.

Notation, for an activation ``y`` of shape (N, C, H, W) and per-channel (C,) vectors:

    r   = 0                                  if residual is None
        = residual                           if res_scale is None      (identity shortcut)
        = residual * res_scale + res_shift   otherwise                 (shortcut is a BN output)
    z   = y * scale + shift + r
    out = relu(z) if relu else z
    dz  = grad_out * (z > 0) if relu else grad_out

Layout contract (the ops in ``registry.py`` and ``unit_conv.py`` guarantee it): ``y`` is contiguous in
either NCHW or channels_last; ``residual`` and ``grad_out`` have ``y``'s shape and memory
format; per-channel vectors are contiguous fp32 (fp64 when ``y`` is fp64). Results have
``y``'s (or ``residual``'s) dtype and ``y``'s memory format. All arithmetic is done in fp32
(fp64 for fp64 inputs) whatever the storage dtype.
"""

import struct
from typing import Optional

import torch
from torch import Tensor

_REDUCE_DIMS = (0, 2, 3)


def _compute_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _pre_activation(y, scale, shift, residual, res_scale, res_shift) -> Tensor:
    """z in the compute dtype."""
    cdt = _compute_dtype(y)
    z = y.to(cdt) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        r = residual.to(cdt)
        if res_scale is not None:
            r = r * _per_channel(res_scale) + _per_channel(res_shift)
        z = z + r
    return z


def affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(scale, shift) with bn(y) = (y - mean) * invstd * weight + bias = y * scale + shift:
    scale = invstd * weight (invstd without a weight), shift = bias - mean * scale (-mean * scale without a bias).
    ``weight`` and ``bias`` may have another dtype than mean and invstd, whose dtype the results take."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = (mean * scale).neg_() if bias is None else torch.addcmul(bias.to(invstd.dtype), mean, scale, value=-1.0)
    return scale.contiguous(), shift.contiguous()


def finish_batch_stats(mean: Tensor, var: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       momentum: float, eps: float, count: int) -> Tensor:
    """invstd = 1 / sqrt(var + eps) of a batch's per-channel mean and biased variance over ``count`` values per
    channel; with running statistics (both or neither, any float dtype), each updated in place as eager's
    BatchNorm updates them, r = momentum * stat + (1 - momentum) * r in the statistics' dtype (fp32, fp64 for
    fp64 ones; momentum rounded to it first, as torch's kernels take it) and rounded once to r's dtype, the
    variance's stat unbiased: var * count / (count - 1)."""
    if running_mean is not None:  # a few launches for both on a GPU (foreach)
        if torch.compiler.is_compiling():  # a symbolic float, which struct cannot take: rounded in the graph
            momentum = torch.tensor(momentum, dtype=mean.dtype, device=mean.device)
        elif mean.dtype == torch.float32:
            momentum = _round_to_fp32(momentum)
        # the buffers themselves where they have the statistics' dtype, else fp32 copies written back at the end
        work = [r if r.dtype == mean.dtype else r.to(mean.dtype) for r in (running_mean, running_var)]
        torch._foreach_mul_(work, 1.0 - momentum)  # rounded as eager's (1 - momentum) * r: no fused multiply-add
        torch._foreach_add_(work, torch._foreach_mul([mean, var * (count / (count - 1))], momentum))
        copies = [(r, w) for r, w in zip((running_mean, running_var), work) if w is not r]
        if copies:
            torch._foreach_copy_([r for r, _ in copies], [w for _, w in copies])
    return torch.rsqrt(var + eps)


def _round_to_fp32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float): 1 - x then rounds once, as in fp32 arithmetic."""
    return struct.unpack("f", struct.pack("f", x))[0]


def backward_coefficients(sum_dz: Tensor, sum_dz_yc: Tensor, group_sum_dz: Tensor, group_sum_dz_yc: Tensor,
                          mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          count: int, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What BatchNorm's backward needs from its sums: (coef, shift, dweight, dbias).

    ``sum_dz``, ``sum_dz_yc``: this rank's sums of dz and dz * (y - mean) (``backward_reduce``'s);
    ``group_sum_*``: the same added over the ranks that took the statistics (the same tensors when
    unsynchronised), ``count`` values per channel in all. With (scale, shift) = ``affine(mean, invstd,
    weight, bias)``:

    - coef (4, C), dy = dz * coef[0] + (y - coef[3]) * coef[1] + coef[2] (``backward_apply``'s):
      batch statistics, dy = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)):
      coef = [scale, S_yc * invstd^2 * (scale * -1/M), S_dz * (scale * -1/M), mean] with S the group sums;
      running statistics, dy = scale * dz: coef = [scale, 0, 0, 0].
      Centred on the mean: folding coef[3] into coef[2] cancels catastrophically when |mean| >> std.
    - shift (C,), for the stages that recompute z; scale is coef[0].
    - dweight = invstd * sum_dz_yc, dbias = sum_dz: this rank's own, as torch's SyncBatchNorm returns
      them (DistributedDataParallel adds them up across ranks).
    """
    scale, shift = affine(mean, invstd, weight, bias)
    if batch_stats:
        coef = torch.stack([scale, group_sum_dz_yc * invstd.square(), group_sum_dz, mean])
        coef[1:3].mul_(scale * (-1.0 / count))  # mul_ on the view: `*=` would also copy it back onto itself
    else:
        zero = torch.zeros_like(scale)
        coef = torch.stack([scale, zero, zero, zero])
    return coef, shift, sum_dz_yc * invstd, sum_dz.clone()


def channel_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``y`` over (N, H, W), in the compute dtype.

    Two-pass (mean, then centred second moment), so large means do not cancel.
    """
    yc = y.to(_compute_dtype(y))
    mean = yc.mean(dim=_REDUCE_DIMS)
    var = (yc - _per_channel(mean)).square().mean(dim=_REDUCE_DIMS)
    return mean, var


def act_forward(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    res_scale: Optional[Tensor],
    res_shift: Optional[Tensor],
    relu: bool,
) -> Tensor:
    """out = act(y * scale + shift + r), stored in y's dtype and memory format."""
    z = _pre_activation(y, scale, shift, residual, res_scale, res_shift)
    if relu:
        z = z.clamp_min(0)
    return z.to(y.dtype)


def _masked_grad(grad_out, y, scale, shift, residual, res_scale, res_shift, relu) -> Tensor:
    dz = grad_out.to(_compute_dtype(y))
    if relu:
        z = _pre_activation(y, scale, shift, residual, res_scale, res_shift)
        dz = dz * (z > 0)
    return dz


def backward_reduce(
    grad_out: Tensor,
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    res_scale: Optional[Tensor],
    res_shift: Optional[Tensor],
    relu: bool,
    mean: Tensor,
    res_mean: Optional[Tensor],
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-channel sums for BN backward, ReLU mask recomputed from y (and the residual).

    Returns (sum dz, sum dz * (y - mean), sum dz * (residual - res_mean) or None); the third
    only when the shortcut is a BN output (res_mean given).
    """
    dz = _masked_grad(grad_out, y, scale, shift, residual, res_scale, res_shift, relu)
    cdt = dz.dtype
    sum_dz = dz.sum(dim=_REDUCE_DIMS)
    sum_dz_yc = (dz * (y.to(cdt) - _per_channel(mean))).sum(dim=_REDUCE_DIMS)
    sum_dz_rc = None
    if res_mean is not None:
        sum_dz_rc = (dz * (residual.to(cdt) - _per_channel(res_mean))).sum(dim=_REDUCE_DIMS)
    return sum_dz, sum_dz_yc, sum_dz_rc


def backward_apply(
    grad_out: Tensor,
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    res_scale: Optional[Tensor],
    res_shift: Optional[Tensor],
    relu: bool,
    coef: Tensor,
    res_coef: Optional[Tensor],
    want_residual_grad: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """Input gradients from the per-channel coefficients the caller derived from the sums.

    coef is (4, C): dy = dz * coef[0] + (y - coef[3]) * coef[1] + coef[2]  (in y's dtype);
    coef[3] is the mean, so the terms do not cancel when |mean| >> std.
    d_residual (only if want_residual_grad, stored in residual's dtype):
        = dz                                                                   if res_coef is None
        = dz * res_coef[0] + (residual - res_coef[3]) * res_coef[1] + res_coef[2]  otherwise
    """
    dz = _masked_grad(grad_out, y, scale, shift, residual, res_scale, res_shift, relu)
    cdt = dz.dtype

    def centred(t: Tensor, c: Tensor) -> Tensor:
        return dz * _per_channel(c[0]) + (t.to(cdt) - _per_channel(c[3])) * _per_channel(c[1]) + _per_channel(c[2])

    dy = centred(y, coef)
    d_residual = None
    if want_residual_grad:
        if res_coef is None:
            d_residual = dz.to(residual.dtype, copy=True)  # a new tensor, never grad_out itself
        else:
            d_residual = centred(residual, res_coef).to(residual.dtype)
    return dy.to(y.dtype), d_residual
