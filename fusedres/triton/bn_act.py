"""Triton kernels for the four BN + residual + ReLU stages and BatchNorm's per-channel arithmetic between them
(``affine``, ``finish_batch_stats``, ``backward_coefficients``: one small launch each, see the section "per-channel
kernels"); ``fusedres.ops.torch_backend`` is the contract.

Every kernel views an activation of shape (N, C, H, W) as (N, C, HW) with element strides
(stride_n, stride_c, stride_hw): NCHW is (C*HW, HW, 1), channels_last is (HW*C, 1, C). A program
works on (BLOCK_R rows of the N*HW axis) x (BLOCK_C channels) tiles, and the constexpr
CHANNELS_LAST lays the tiles out so that the contiguous axis is the tile's fast axis:

* channels_last: rows are the flat (n, hw) index (row r starts at r * C) and channels are
  contiguous, so a tile spans up to 128 channels and loads vectorise along them.
* NCHW: a row tile never crosses an image (tile -> (n, block of hw)), so its BLOCK_R positions are
  contiguous (stride_hw == 1) and loads vectorise along hw; BLOCK_R is about HW.

The residual kind (none / identity / BN output), relu, etc. are constexpr flags, so one kernel per
stage serves every variant:

* ``_channel_stats_kernel`` reads y once. Each program folds ROW_TILES row tiles of one channel
  block into per-channel (count, mean, M2) of y - y[0, c, 0, 0] with Chan's parallel formula (each
  tile's own moments are two-pass in registers) and writes them to an fp32 workspace, whose rows one
  more launch merges with the same formula (``partials``, CHAN_MOMENTS). Nothing cancels when |mean| >> std: the
  shift keeps the partial means O(std) and M2 is only ever a sum of squared deviations.
* ``_act_forward_kernel``: out = act(y * scale + shift + r) in one read of y (and residual).
* ``_backward_reduce_kernel`` recomputes z (hence the ReLU mask) from y and the residual and writes
  per-program sums of dz, dz * (y - mean), dz * (residual - res_mean), which one more launch adds up
  (``partials``, SUMS).
* ``_backward_apply_kernel`` recomputes dz and writes dy and, optionally, d_residual in one pass.

Assumptions (checked on the host: TypeError for dtypes, ValueError otherwise): y is 4-D and
contiguous NCHW or channels_last; residual and grad_out have y's shape, device and memory format;
activations are fp32, fp16 or bf16 (fp64 belongs to the torch backend) and the residual's dtype may
differ from y's; per-channel vectors are contiguous fp32, (C,) or (4, C) for coef / res_coef.
Arithmetic is fp32 and offsets are int64, so tensors with more than 2**31 elements work. Empty
tensors are handed to the torch backend.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedres.ops import torch_backend

from . import partials
from ._host import cdiv, next_power_of_2
from .relaunch import relaunched

_TILE_ELEMS = 2048  # elements in one (BLOCK_R, BLOCK_C) tile
_MAX_BLOCK_C = 128  # channels in one channels_last tile
_MIN_REDUCE_PROGRAMS = 1024  # reductions fold up to 8 row tiles per program while keeping this many

_RES_NONE, _RES_IDENTITY, _RES_BN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_DRES_NONE, _DRES_DZ, _DRES_AFFINE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """(BLOCK_C,) int64 channel indices of this program's block (grid axis 1), and their mask."""
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _tile(tile, cols, cmask, N, HW, ROWS, stride_n, stride_c, stride_hw,
          BLOCK_R: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(BLOCK_R, BLOCK_C) int64 element offsets and mask of row tile `tile` (int64 scalar)."""
    if CHANNELS_LAST:
        # flat rows; stride_n == HW * stride_hw, so row r starts at r * stride_hw
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < ROWS
        row_offs = rows * stride_hw
    else:
        # tile -> (image n, block of hw); past the last image (reduction tails) is masked
        hw_tiles = tl.cdiv(HW, BLOCK_R)
        n = tile // hw_tiles
        hw = (tile % hw_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = (hw < HW) & (n < N)
        row_offs = n * stride_n + hw * stride_hw
    offs = row_offs[:, None] + cols[None, :] * stride_c
    return offs, rmask[:, None] & cmask[None, :]


@triton.jit
def _per_channel(ptr, cols, cmask):
    """Values of a (C,) fp32 vector for this channel block, as a (1, BLOCK_C) row."""
    return tl.load(ptr + cols, mask=cmask, other=0.0)[None, :]


@triton.jit
def _pre_activation(y_ptr, res_ptr, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                    offs, mask, cols, cmask, RES: tl.constexpr):
    """fp32 (y, raw residual or zeros, z = y * scale + shift + r) of one tile."""
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = y * _per_channel(scale_ptr, cols, cmask) + _per_channel(shift_ptr, cols, cmask)
    r = tl.zeros_like(z)
    if RES != _RES_NONE:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RES == _RES_BN:
            z += r * _per_channel(res_scale_ptr, cols, cmask) + _per_channel(res_shift_ptr, cols, cmask)
        else:
            z += r
    return y, r, z


@triton.jit
def _grad_z(g_ptr, offs, mask, z, RELU: tl.constexpr):
    """fp32 dz of one tile: grad_out, times the ReLU mask (z > 0) if RELU (0 outside `mask`)."""
    dz = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dz = dz * (z > 0).to(tl.float32)
    return dz


@triton.jit
def _store_partials(ws_ptr, C, cols, cmask, a, b, c):
    """Writes (BLOCK_C,) vectors a, b, c to row program_id(0) of planes 0, 1, 2 of ws (3, P, C)."""
    row = ws_ptr + tl.program_id(0).to(tl.int64) * C + cols
    plane = tl.num_programs(0).to(tl.int64) * C
    tl.store(row, a, mask=cmask)
    tl.store(row + plane, b, mask=cmask)
    tl.store(row + 2 * plane, c, mask=cmask)


# ----------------------------------------------------------------------------- kernels
# Shared layout arguments: N, C, HW, ROWS = N * HW, (stride_n, stride_c, stride_hw) of the
# (N, C, HW) view, tile shape BLOCK_R x BLOCK_C, CHANNELS_LAST. Grid axis 0: row tiles (groups of
# ROW_TILES of them in reductions); axis 1: channel blocks.


@relaunched
@triton.jit
def _channel_stats_kernel(
    y_ptr,  # (N, C, HW) activation
    ws_ptr,  # (3, P, C) fp32 out, P = grid axis 0: per-program count, mean - y[0, :, 0], M2
    N, C, HW, ROWS, stride_n, stride_c, stride_hw,
    ROW_TILES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    cols, cmask = _channel_block(C, BLOCK_C)
    # moments of y - pivot, pivot = y[0, c, 0]: keeps the partial means small next to |mean|
    pivot = tl.load(y_ptr + cols * stride_c, mask=cmask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROW_TILES):
        tile = tl.program_id(0).to(tl.int64) * ROW_TILES + i
        offs, mask = _tile(tile, cols, cmask, N, HW, ROWS, stride_n, stride_c, stride_hw, BLOCK_R, CHANNELS_LAST)
        x = tl.where(mask, tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot[None, :], 0.0)
        t_count = tl.sum(mask.to(tl.float32), axis=0)
        t_mean = tl.sum(x, axis=0) / tl.maximum(t_count, 1.0)
        d = tl.where(mask, x - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        # Chan: merge the tile's (t_count, t_mean, t_m2) into the running (count, mean, m2)
        new_count = count + t_count
        w = t_count / tl.maximum(new_count, 1.0)
        delta = t_mean - mean
        mean += delta * w
        m2 += t_m2 + delta * delta * count * w
        count = new_count
    _store_partials(ws_ptr, C, cols, cmask, count, mean, m2)


@relaunched
@triton.jit
def _act_forward_kernel(
    y_ptr, res_ptr,  # (N, C, HW) activation and residual (y's strides; res_ptr unused if _RES_NONE)
    out_ptr,  # (N, C, HW) out, y's dtype and strides
    scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,  # (C,) fp32 (res_* read only if _RES_BN)
    N, C, HW, ROWS, stride_n, stride_c, stride_hw,
    RES: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    cols, cmask = _channel_block(C, BLOCK_C)
    offs, mask = _tile(tl.program_id(0).to(tl.int64), cols, cmask, N, HW, ROWS,
                       stride_n, stride_c, stride_hw, BLOCK_R, CHANNELS_LAST)
    _, _, z = _pre_activation(y_ptr, res_ptr, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                              offs, mask, cols, cmask, RES)
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # like clamp_min(0): NaN propagates
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@relaunched
@triton.jit
def _backward_reduce_kernel(
    g_ptr, y_ptr, res_ptr,  # (N, C, HW) grad_out, activation, residual (y's strides)
    scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,  # (C,) fp32 (res_* read only if _RES_BN)
    mean_ptr, res_mean_ptr,  # (C,) fp32 centres of y and of the residual (the latter used if RES_SUM)
    ws_ptr,  # (3, P, C) fp32 out, P = grid axis 0: sums of dz, dz*(y-mean), dz*(res-res_mean)
    N, C, HW, ROWS, stride_n, stride_c, stride_hw,
    RES: tl.constexpr, RELU: tl.constexpr, RES_SUM: tl.constexpr,
    ROW_TILES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    cols, cmask = _channel_block(C, BLOCK_C)
    mean = _per_channel(mean_ptr, cols, cmask)
    res_mean = _per_channel(res_mean_ptr, cols, cmask)
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dz_yc = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dz_rc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROW_TILES):
        tile = tl.program_id(0).to(tl.int64) * ROW_TILES + i
        offs, mask = _tile(tile, cols, cmask, N, HW, ROWS, stride_n, stride_c, stride_hw, BLOCK_R, CHANNELS_LAST)
        y, r, z = _pre_activation(y_ptr, res_ptr, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                                  offs, mask, cols, cmask, RES)
        dz = _grad_z(g_ptr, offs, mask, z, RELU)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_yc += tl.sum(dz * (y - mean), axis=0)
        if RES_SUM:
            sum_dz_rc += tl.sum(dz * (r - res_mean), axis=0)
    _store_partials(ws_ptr, C, cols, cmask, sum_dz, sum_dz_yc, sum_dz_rc)


@relaunched
@triton.jit
def _backward_apply_kernel(
    g_ptr, y_ptr, res_ptr,  # (N, C, HW) grad_out, activation, residual (y's strides)
    dy_ptr,  # (N, C, HW) out, y's dtype and strides
    dres_ptr,  # (N, C, HW) out, residual's dtype, y's strides (written unless _DRES_NONE)
    scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,  # (C,) fp32 (res_* read only if _RES_BN)
    coef_ptr, res_coef_ptr,  # (4, C) fp32 contiguous (res_coef read only if _DRES_AFFINE)
    N, C, HW, ROWS, stride_n, stride_c, stride_hw,
    RES: tl.constexpr, RELU: tl.constexpr, DRES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    cols, cmask = _channel_block(C, BLOCK_C)
    offs, mask = _tile(tl.program_id(0).to(tl.int64), cols, cmask, N, HW, ROWS,
                       stride_n, stride_c, stride_hw, BLOCK_R, CHANNELS_LAST)
    y, r, z = _pre_activation(y_ptr, res_ptr, scale_ptr, shift_ptr, res_scale_ptr, res_shift_ptr,
                              offs, mask, cols, cmask, RES)
    dz = _grad_z(g_ptr, offs, mask, z, RELU)
    # centred on coef[3] (the mean) so nothing cancels when |mean| >> std
    dy = (dz * _per_channel(coef_ptr, cols, cmask)
          + (y - _per_channel(coef_ptr + 3 * C, cols, cmask)) * _per_channel(coef_ptr + C, cols, cmask)
          + _per_channel(coef_ptr + 2 * C, cols, cmask))
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if DRES == _DRES_DZ:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    elif DRES == _DRES_AFFINE:
        dres = (dz * _per_channel(res_coef_ptr, cols, cmask)
                + (r - _per_channel(res_coef_ptr + 3 * C, cols, cmask)) * _per_channel(res_coef_ptr + C, cols, cmask)
                + _per_channel(res_coef_ptr + 2 * C, cols, cmask))
        tl.store(dres_ptr + offs, dres.to(dres_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- per-channel kernels
# BatchNorm's vector arithmetic between the stages, one launch each where torch takes several small ops:
# programs of BLOCK channels (grid axis 0), fp32 arithmetic; the vectors are contiguous (C,), fp32 unless said
# otherwise. See torch_backend.py's affine / finish_batch_stats / backward_coefficients for the maths.


@triton.jit
def _affine(mean, invstd, weight_ptr, bias_ptr, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(scale, shift) with bn(y) = y * scale + shift, from the loaded mean and invstd; weight and bias of any
    float dtype, read only if given."""
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    shift = -(mean * scale)
    if HAS_BIAS:
        shift += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _update_running(ptr, cols, mask, stat, momentum):
    """ptr[cols] = momentum * stat + (1 - momentum) * ptr[cols], eager BatchNorm's update of a running statistic:
    the fp32 stat, fp32 arithmetic on ptr's value (any float dtype), rounded once to ptr's dtype."""
    running = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    updated = momentum * stat + (1.0 - momentum) * running
    tl.store(ptr + cols, updated.to(ptr.dtype.element_ty), mask=mask)


@relaunched
@triton.jit
def _affine_kernel(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, C,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    scale, shift = _affine(tl.load(mean_ptr + cols, mask=mask), tl.load(invstd_ptr + cols, mask=mask),
                           weight_ptr, bias_ptr, cols, mask, HAS_WEIGHT, HAS_BIAS)
    tl.store(scale_ptr + cols, scale, mask=mask)
    tl.store(shift_ptr + cols, shift, mask=mask)


@relaunched
@triton.jit
def _finish_batch_stats_kernel(
    mean_ptr, var_ptr,  # the batch's mean and biased variance
    invstd_ptr,  # out
    running_mean_ptr, running_var_ptr,  # updated in place (any float dtype), if RUNNING
    C, momentum, eps, bessel,  # bessel = count / (count - 1), in fp32
    RUNNING: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    var = tl.load(var_ptr + cols, mask=mask, other=1.0)
    tl.store(invstd_ptr + cols, tl.div_rn(1.0, tl.sqrt_rn(var + eps)), mask=mask)  # rounded as torch's rsqrt
    if RUNNING:
        _update_running(running_mean_ptr, cols, mask, tl.load(mean_ptr + cols, mask=mask), momentum)
        _update_running(running_var_ptr, cols, mask, var * bessel, momentum)


@relaunched
@triton.jit
def _backward_coefficients_kernel(
    sum_dz_ptr, sum_dz_yc_ptr, group_sum_dz_ptr, group_sum_dz_yc_ptr, mean_ptr, invstd_ptr,
    weight_ptr, bias_ptr,  # any float dtype, read only if HAS_WEIGHT / HAS_BIAS
    coef_ptr,  # (4, C) out: dy = dz * coef[0] + (y - coef[3]) * coef[1] + coef[2]
    shift_ptr, dweight_ptr, dbias_ptr,  # out
    C, neg_inv_count,  # -1 / (values per channel over the group), in fp32
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    mean = tl.load(mean_ptr + cols, mask=mask)
    invstd = tl.load(invstd_ptr + cols, mask=mask)
    scale, shift = _affine(mean, invstd, weight_ptr, bias_ptr, cols, mask, HAS_WEIGHT, HAS_BIAS)
    c1 = tl.zeros_like(scale)  # running statistics: dy = dz * scale
    c2 = c1
    c3 = c1
    if BATCH_STATS:
        per_value = scale * neg_inv_count
        c1 = tl.load(group_sum_dz_yc_ptr + cols, mask=mask) * (invstd * invstd) * per_value
        c2 = tl.load(group_sum_dz_ptr + cols, mask=mask) * per_value
        c3 = mean
    tl.store(coef_ptr + cols, scale, mask=mask)
    tl.store(coef_ptr + C + cols, c1, mask=mask)
    tl.store(coef_ptr + 2 * C + cols, c2, mask=mask)
    tl.store(coef_ptr + 3 * C + cols, c3, mask=mask)
    tl.store(shift_ptr + cols, shift, mask=mask)
    tl.store(dweight_ptr + cols, tl.load(sum_dz_yc_ptr + cols, mask=mask) * invstd, mask=mask)
    tl.store(dbias_ptr + cols, tl.load(sum_dz_ptr + cols, mask=mask), mask=mask)


# ----------------------------------------------------------------------------- host side

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in _ACT_DTYPES:
        raise TypeError(f"fusedres.triton: {name} has dtype {t.dtype}; supported are float32, float16 and "
                        "bfloat16 (float64 goes to the torch backend)")


def _channels_last(y: Tensor) -> bool:
    """y's layout: False for contiguous NCHW (also when H*W == 1 or C == 1 make both formats
    coincide), True for channels_last; ValueError for anything else."""
    _check_dtype("y", y)
    if y.dim() != 4:
        raise ValueError(f"fusedres.triton: y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
    if y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last):
        return not y.is_contiguous()
    raise ValueError(f"fusedres.triton: y must be contiguous NCHW or channels_last, got strides {y.stride()}")


def _check_like_y(name: str, t: Tensor, y: Tensor, channels_last: bool) -> None:
    _check_dtype(name, t)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if t.shape != y.shape or t.device != y.device or not t.is_contiguous(memory_format=fmt):
        raise ValueError(f"fusedres.triton: {name} must have y's shape {tuple(y.shape)}, device {y.device} and "
                         f"memory format {fmt}; got shape {tuple(t.shape)}, strides {t.stride()}, device {t.device}")


def _check_vec(name: str, v: Optional[Tensor], channels: int, device: torch.device, rows: int = 1) -> None:
    """v must be a contiguous fp32 (channels,) vector on ``device``, or (rows, channels) when rows > 1."""
    if v is None or v.dtype != torch.float32:
        raise TypeError(f"fusedres.triton: {name} must be a float32 tensor, got {None if v is None else v.dtype}")
    shape = (channels,) if rows == 1 else (rows, channels)
    if tuple(v.shape) != shape or not v.is_contiguous() or v.device != device:
        raise ValueError(f"fusedres.triton: {name} must be a contiguous {shape} tensor on {device}, got "
                         f"shape {tuple(v.shape)}, strides {v.stride()}, device {v.device}")


def _check_inputs(y, scale, shift, residual, res_scale, res_shift, grad_out=None) -> tuple[bool, int]:
    """Validates the arguments the stages share; returns (channels_last, residual kind)."""
    channels_last = _channels_last(y)
    _check_vec("scale", scale, y.shape[1], y.device)
    _check_vec("shift", shift, y.shape[1], y.device)
    if grad_out is not None:
        _check_like_y("grad_out", grad_out, y, channels_last)
    if residual is None:
        if res_scale is not None or res_shift is not None:
            raise ValueError("fusedres.triton: res_scale/res_shift given without a residual")
        return channels_last, _RES_NONE.value
    _check_like_y("residual", residual, y, channels_last)
    if res_scale is None and res_shift is None:
        return channels_last, _RES_IDENTITY.value
    if res_scale is None or res_shift is None:
        raise ValueError("fusedres.triton: res_scale and res_shift must be given together")
    _check_vec("res_scale", res_scale, y.shape[1], y.device)
    _check_vec("res_shift", res_shift, y.shape[1], y.device)
    return channels_last, _RES_BN.value


def _geometry(y: Tensor, channels_last: bool) -> tuple[dict, int, int]:
    """Layout arguments shared by the kernels, the number of row tiles and of channel blocks."""
    n, c, h, w = y.shape
    hw = h * w
    if channels_last:  # channels are the fast tile axis
        block_c = min(next_power_of_2(c), _MAX_BLOCK_C)
        block_r = min(max(_TILE_ELEMS // block_c, 1), next_power_of_2(n * hw))
        row_tiles = cdiv(n * hw, block_r)
        strides = (hw * c, 1, c)
    else:  # hw is the fast tile axis; row tiles stay inside one image
        block_r = min(next_power_of_2(hw), _TILE_ELEMS)
        block_c = min(max(_TILE_ELEMS // block_r, 1), next_power_of_2(c))
        row_tiles = n * cdiv(hw, block_r)
        strides = (c * hw, hw, 1)
    geo = dict(N=n, C=c, HW=hw, ROWS=n * hw, stride_n=strides[0], stride_c=strides[1], stride_hw=strides[2],
               BLOCK_R=block_r, BLOCK_C=block_c, CHANNELS_LAST=channels_last)
    return geo, row_tiles, cdiv(c, block_c)


def _reduce_launch(y: Tensor, channels_last: bool) -> tuple[dict, tuple[int, int], Tensor]:
    """Layout arguments (with ROW_TILES), grid and (3, P, C) fp32 workspace of a reduction kernel."""
    geo, row_tiles, col_blocks = _geometry(y, channels_last)
    per_program = 1  # 1, 2, 4 or 8 row tiles per program, keeping >= _MIN_REDUCE_PROGRAMS programs
    while per_program < 8 and row_tiles >= 2 * per_program * _MIN_REDUCE_PROGRAMS:
        per_program *= 2
    programs = cdiv(row_tiles, per_program)
    ws = torch.empty((3, programs, y.shape[1]), device=y.device, dtype=torch.float32)
    return dict(geo, ROW_TILES=per_program), (programs, col_blocks), ws


def _or(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    """Stand-in pointer for an argument the kernel's flags say it never reads."""
    return fallback if t is None else t


def channel_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 mean and biased variance of y over (N, H, W)."""
    channels_last = _channels_last(y)
    if y.numel() == 0:
        return torch_backend.channel_stats(y)
    geo, grid, ws = _reduce_launch(y, channels_last)
    _channel_stats_kernel[grid](y, ws, **geo)
    # the programs' moments are of y - y[0, :, 0, 0], the pivot (channel c at y's element c * stride_c)
    return partials.finished(ws, grid[0], partials.CHAN_MOMENTS, count=geo["ROWS"], centre=y[0, :, 0, 0])


def act_forward(y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], res_scale: Optional[Tensor],
                res_shift: Optional[Tensor], relu: bool) -> Tensor:
    """out = act(y * scale + shift + r), in y's dtype and memory format."""
    channels_last, res = _check_inputs(y, scale, shift, residual, res_scale, res_shift)
    if y.numel() == 0:
        return torch_backend.act_forward(y, scale, shift, residual, res_scale, res_shift, relu)
    geo, row_tiles, col_blocks = _geometry(y, channels_last)
    out = torch.empty_like(y)
    _act_forward_kernel[(row_tiles, col_blocks)](
        y, _or(residual, y), out, scale, shift, _or(res_scale, scale), _or(res_shift, shift),
        RES=res, RELU=bool(relu), **geo)
    return out


def backward_reduce(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                    res_scale: Optional[Tensor], res_shift: Optional[Tensor], relu: bool, mean: Tensor,
                    res_mean: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """fp32 (sum dz, sum dz * (y - mean), sum dz * (residual - res_mean) or None if res_mean is None)."""
    channels_last, res = _check_inputs(y, scale, shift, residual, res_scale, res_shift, grad_out)
    _check_vec("mean", mean, y.shape[1], y.device)
    if res_mean is not None:
        if residual is None:
            raise ValueError("fusedres.triton: res_mean given without a residual")
        _check_vec("res_mean", res_mean, y.shape[1], y.device)
    if y.numel() == 0:
        return torch_backend.backward_reduce(grad_out, y, scale, shift, residual, res_scale, res_shift, relu,
                                             mean, res_mean)
    geo, grid, ws = _reduce_launch(y, channels_last)
    _backward_reduce_kernel[grid](
        grad_out, y, _or(residual, y), scale, shift, _or(res_scale, scale), _or(res_shift, shift),
        mean, _or(res_mean, mean), ws, RES=res, RELU=bool(relu), RES_SUM=res_mean is not None, **geo)
    # each sum its own tensor: ops must not return views of one another
    sums = partials.finished(ws if res_mean is not None else ws[:2], grid[0], partials.SUMS)
    return sums[0], sums[1], (sums[2] if res_mean is not None else None)


def backward_apply(grad_out: Tensor, y: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                   res_scale: Optional[Tensor], res_shift: Optional[Tensor], relu: bool, coef: Tensor,
                   res_coef: Optional[Tensor], want_residual_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(dy in y's dtype, d_residual in residual's dtype or None), both in y's memory format."""
    channels_last, res = _check_inputs(y, scale, shift, residual, res_scale, res_shift, grad_out)
    _check_vec("coef", coef, y.shape[1], y.device, rows=4)
    dres_kind = _DRES_NONE.value
    if want_residual_grad:
        if residual is None:
            raise ValueError("fusedres.triton: want_residual_grad needs a residual")
        dres_kind = _DRES_DZ.value
        if res_coef is not None:
            _check_vec("res_coef", res_coef, y.shape[1], y.device, rows=4)
            dres_kind = _DRES_AFFINE.value
    if y.numel() == 0:
        return torch_backend.backward_apply(grad_out, y, scale, shift, residual, res_scale, res_shift, relu,
                                            coef, res_coef, want_residual_grad)
    geo, row_tiles, col_blocks = _geometry(y, channels_last)
    dy = torch.empty_like(y)
    d_residual = torch.empty_like(residual) if want_residual_grad else None
    _backward_apply_kernel[(row_tiles, col_blocks)](
        grad_out, y, _or(residual, y), dy, _or(d_residual, dy), scale, shift, _or(res_scale, scale),
        _or(res_shift, shift), coef, _or(res_coef, coef), RES=res, RELU=bool(relu), DRES=dres_kind, **geo)
    return dy, d_residual


_MAX_VECTOR_BLOCK = 1024  # channels per program of a per-channel kernel


def _vector_grid(channels: int) -> tuple[tuple[int], int]:
    block = min(next_power_of_2(channels), _MAX_VECTOR_BLOCK)
    return (cdiv(channels, block),), block


def _operand(name: str, v: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A weight or bias as the per-channel kernels read it: ``like``'s (C,) size and device, any float dtype
    (converted as loaded), made contiguous if it is not."""
    if v is None:
        return None
    if not v.is_floating_point() or v.numel() != like.numel() or v.device != like.device:
        raise ValueError(f"fusedres.triton: {name} must be a floating-point tensor of {like.numel()} elements on "
                         f"{like.device}, got dtype {v.dtype}, shape {tuple(v.shape)}, device {v.device}")
    return v if v.dim() == 1 and v.is_contiguous() else v.reshape(-1).contiguous()


def affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """fp32 (scale, shift) with bn(y) = y * scale + shift, in one launch."""
    channels, device = mean.numel(), mean.device
    _check_vec("mean", mean, channels, device)
    _check_vec("invstd", invstd, channels, device)
    weight, bias = _operand("weight", weight, mean), _operand("bias", bias, mean)
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    grid, block = _vector_grid(channels)
    _affine_kernel[grid](mean, invstd, _or(weight, mean), _or(bias, mean), scale, shift, channels,
                         HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block)
    return scale, shift


def finish_batch_stats(mean: Tensor, var: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       momentum: float, eps: float, count: int) -> Tensor:
    """fp32 invstd of the batch variance, the running statistics (any float dtype) updated in place as eager's
    BatchNorm does, r = momentum * stat + (1 - momentum) * r in fp32 rounded once to r's dtype, in one launch."""
    channels, device = mean.numel(), mean.device
    _check_vec("mean", mean, channels, device)
    _check_vec("var", var, channels, device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fusedres.triton: running_mean and running_var must be given together")
    if running_mean is not None and count < 2:
        raise ValueError(f"fusedres.triton: the running variance is unbiased with count values per channel, needs "
                         f"count > 1, got {count}")
    running = [_operand(name, r, mean) for name, r in (("running_mean", running_mean), ("running_var", running_var))]
    invstd = torch.empty_like(mean)
    grid, block = _vector_grid(channels)
    _finish_batch_stats_kernel[grid](
        mean, var, invstd, _or(running[0], mean), _or(running[1], var), channels, float(momentum), float(eps),
        count / (count - 1) if running_mean is not None else 1.0, RUNNING=running_mean is not None, BLOCK=block)
    for given, updated in zip((running_mean, running_var), running):
        if given is not None and updated.data_ptr() != given.data_ptr():  # updated a contiguous copy
            given.copy_(updated.view_as(given))
    return invstd


def backward_coefficients(sum_dz: Tensor, sum_dz_yc: Tensor, group_sum_dz: Tensor, group_sum_dz_yc: Tensor,
                          mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          count: int, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 (coef (4, C), shift, dweight, dbias) of BatchNorm's backward from its sums, in one launch."""
    channels, device = mean.numel(), mean.device
    for name, v in (("sum_dz", sum_dz), ("sum_dz_yc", sum_dz_yc), ("group_sum_dz", group_sum_dz),
                    ("group_sum_dz_yc", group_sum_dz_yc), ("mean", mean), ("invstd", invstd)):
        _check_vec(name, v, channels, device)
    weight, bias = _operand("weight", weight, mean), _operand("bias", bias, mean)
    coef = mean.new_empty((4, channels))
    shift, dweight, dbias = (torch.empty_like(mean) for _ in range(3))
    grid, block = _vector_grid(channels)
    _backward_coefficients_kernel[grid](
        sum_dz, sum_dz_yc, group_sum_dz, group_sum_dz_yc, mean, invstd, _or(weight, mean), _or(bias, mean),
        coef, shift, dweight, dbias, channels, -1.0 / count if batch_stats else 0.0,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BATCH_STATS=bool(batch_stats), BLOCK=block)
    return coef, shift, dweight, dbias
