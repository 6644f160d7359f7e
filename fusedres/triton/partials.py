"""The launch that finishes a per-program reduction.

A reduction kernel here (the conv's statistics epilogue, bn_act's channel statistics and backward reduction)
writes one row of per-channel partial results per program into an fp32 workspace of planes (PLANES, rows, C),
no atomics and no zero-fill. ``finish`` turns the rows written into the (C,) results in one more launch, each
channel's rows added in a fixed order (deterministic), where torch took 2-11 small ops:

- ``SUMS``: the sum of each plane's rows (2 or 3 planes).
- ``CHAN_MOMENTS``: planes (count, mean, M2) of y - centre per program: mean = centre + sum(count_i * mean_i)
  / count and variance sum(M2_i + count_i * (mean_i - mean)^2) / count, the deviations taken about the mean in
  a second pass over the rows (Chan's merge; nothing cancels whatever the centre). The centre is 0 (the conv's
  statistics epilogue) or a (C,) tensor of any stride and float dtype, converted to fp32 (bn_act's: a view of
  the activation's first pixel).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._host import cdiv
from .conv_args import _INTERPRET
from .relaunch import relaunched

# the modes, as the kernel reads them (a jit function reads only constexpr globals) and as callers name them
_SUMS, _CHAN_MOMENTS = tl.constexpr(0), tl.constexpr(1)
SUMS, CHAN_MOMENTS = _SUMS.value, _CHAN_MOMENTS.value

# the tile: narrow, so a reduction over few channels (64) still spreads over several programs, and tall, so
# each adds its rows (6272 for ResNet-50's layer1 conv at batch 256) in few steps: the loop's loads are not
# pipelined (sm_90 PTX: plain ld.global), each step waits for the last one's (L2) loads
_BLOCK_R, _BLOCK_C, _WARPS = (16, 8, 4) if _INTERPRET else (1024, 8, 8)


@triton.jit
def _row_block(first_row, ROWS, cols, col_mask, C, BLOCK_R: tl.constexpr):
    """Offsets into a plane and mask of rows [first_row, first_row + BLOCK_R) x cols, rows past ROWS masked."""
    rows = first_row + tl.arange(0, BLOCK_R)
    return rows.to(tl.int64)[:, None] * C + cols[None, :], (rows < ROWS)[:, None] & col_mask[None, :]


@relaunched
@triton.jit
def _finish_partials_kernel(
    ws_ptr,  # (PLANES, >= ROWS, C) fp32 partials, planes PLANE elements apart: rows [0, ROWS) read
    first_ptr, second_ptr, third_ptr,  # (C,) fp32 out: the sums (third if PLANES == 3), or mean and variance
    centre_ptr,  # C elements CENTRE_STRIDE apart, any float dtype: read by CHAN_MOMENTS if CENTRED
    ROWS, PLANE, C, COUNT, CENTRE_STRIDE,  # COUNT: the elements each channel's moments are over
    MODE: tl.constexpr, CENTRED: tl.constexpr, PLANES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    c = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for first_row in range(0, ROWS, BLOCK_R):
        offs, mask = _row_block(first_row, ROWS, cols, col_mask, C, BLOCK_R)
        p0 = tl.load(ws_ptr + offs, mask=mask, other=0.0)
        p1 = tl.load(ws_ptr + PLANE + offs, mask=mask, other=0.0)
        if MODE == _CHAN_MOMENTS:  # sum count_i * mean_i here, the deviations in a second pass
            a += tl.sum(p0 * p1, axis=0)
        else:  # _SUMS
            a += tl.sum(p0, axis=0)
            b += tl.sum(p1, axis=0)
            if PLANES == 3:
                c += tl.sum(tl.load(ws_ptr + 2 * PLANE + offs, mask=mask, other=0.0), axis=0)
    if MODE == _SUMS:
        tl.store(first_ptr + cols, a, mask=col_mask)
        tl.store(second_ptr + cols, b, mask=col_mask)
        if PLANES == 3:
            tl.store(third_ptr + cols, c, mask=col_mask)
    else:
        mean = a / COUNT  # of y - centre, so far
        for first_row in range(0, ROWS, BLOCK_R):
            offs, mask = _row_block(first_row, ROWS, cols, col_mask, C, BLOCK_R)
            count = tl.load(ws_ptr + offs, mask=mask, other=0.0)  # rows past ROWS: 0, adding nothing
            deviation = tl.load(ws_ptr + PLANE + offs, mask=mask, other=0.0) - mean[None, :]
            b += tl.sum(tl.load(ws_ptr + 2 * PLANE + offs, mask=mask, other=0.0)
                        + count * deviation * deviation, axis=0)
        variance = b / COUNT
        if CENTRED:
            mean += tl.load(centre_ptr + cols.to(tl.int64) * CENTRE_STRIDE, mask=col_mask).to(tl.float32)
        tl.store(first_ptr + cols, mean, mask=col_mask)
        tl.store(second_ptr + cols, variance, mask=col_mask)


def finish(ws: Tensor, rows: int, out: tuple, mode: int, count: int = 1, centre: Optional[Tensor] = None) -> None:
    """Writes the results of rows [0, rows) of the (planes, >= rows, C) fp32 workspace ``ws`` (contiguous
    rows) into ``out``: one (C,) fp32 tensor per plane for SUMS, else (mean, variance) of the ``count``
    elements, about ``centre`` (a (C,) tensor of any stride and float dtype; None: 0)."""
    planes, _, channels = ws.shape
    _finish_partials_kernel[(cdiv(channels, _BLOCK_C),)](
        ws, out[0], out[1], out[-1], ws if centre is None else centre, rows, ws.stride(0), channels, count,
        1 if centre is None else centre.stride(0), MODE=mode, CENTRED=centre is not None, PLANES=planes,
        BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_WARPS)


def finished(ws: Tensor, rows: int, mode: int, count: int = 1,
             centre: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """``finish`` into new tensors: one per plane for SUMS, else (mean, variance); each its own tensor."""
    outputs = ws.shape[0] if mode == SUMS else 2
    out = tuple(torch.empty(ws.shape[2], device=ws.device, dtype=torch.float32) for _ in range(outputs))
    finish(ws, rows, out, mode, count, centre)
    return out
