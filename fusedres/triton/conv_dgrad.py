"""Input gradient of fusedres.triton.conv's conv with its BN + ReLU prologue: the input side of a training
unit's backward in one launch per phase of the stride (``conv2d_input_grad``).

    d act = conv2d's input gradient for grad_out       (the prologue's output act = relu(x*scale + shift))
    dz    = d act * act'(x*scale + shift)              (the ReLU mask, recomputed from the unit input x)
    sums  = sum dz, sum dz * (x - mean)                (BatchNorm's backward reduction), per channel

For a stride-1 conv the gradient of its input is a conv of grad_out with the flipped, channel-swapped
weight (``conv._packed_weight(transposed=True)``); a strided conv's is one such stride-1 conv per phase
of the stride (the input positions congruent modulo the stride, each reached by its own subset of the
taps, ``_input_grad_phases``), written into a strided view of dz. Each runs conv.py's kernel with
PROLOGUE_GRAD: the epilogue reads x where a residual would be, applies the ReLU mask and sums dz and
dz * (x - mean) into the statistics workspace, so d act is never stored and BatchNorm's backward needs no
reduction pass over it.
"""

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .conv import _launch
from .conv_args import _geometry, _limit, _memory_format, _merge_factor, _merged, _packed_weight, _vector


def _gradient_geometry(fn: str, x: Tensor, weight: Tensor, grad_out: Tensor, stride, padding, dilation,
                       groups: int) -> dict:
    """The forward conv's validated geometry (``_geometry``, its messages under gradient function ``fn``'s
    name), with grad_out checked against the conv output: x's dtype and device, the output's shape."""
    try:
        geo = _geometry(x, weight, stride, padding, dilation, groups)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("conv2d_fused", fn, 1)) from None
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{fn}: grad_out has dtype {grad_out.dtype}, expected x's dtype {x.dtype}")
    out_shape = (geo["N"], geo["K"], geo["P"], geo["Q"])
    if tuple(grad_out.shape) != out_shape or grad_out.device != x.device:
        raise ValueError(f"{fn}: grad_out must have the conv output's shape {out_shape} on {x.device}, "
                         f"got {tuple(grad_out.shape)} on {grad_out.device}")
    return geo


@dataclass(frozen=True)
class _Phase:
    """The input positions (rows, cols) congruent to (a, b) modulo the forward's stride, and the stride-1
    conv giving their gradient: its geometry and the forward taps it uses, or geo None where no tap
    reaches them (their gradient is 0)."""
    rows: slice
    cols: slice
    geo: Optional[dict]
    taps: tuple[range, range]


def _phase_taps(a: int, stride: int, pad: int, dil: int, kernel: int) -> tuple[range, int, int]:
    """(taps, dilation, padding) along one dimension of the conv that gives input rows h = a + stride*i
    their gradient (``_input_grad_phases``); taps an empty range when no tap reaches them. The taps r with
    r*dil = a + pad modulo the stride are one residue modulo stride / gcd(stride, dil): a range, which the
    weight's packing takes as a slice (a view, where indexing by a list would copy)."""
    first = next((r for r in range(kernel) if (a + pad - r * dil) % stride == 0), kernel)
    taps = range(first, kernel, stride // math.gcd(stride, dil))
    if not taps:
        return taps, 1, 0
    step_in_grad_out = dil // math.gcd(stride, dil)  # rows of grad_out between consecutive taps
    first = (a + pad - taps[0] * dil) // stride  # grad_out row of tap taps[0] for i = 0
    return taps, step_in_grad_out, step_in_grad_out * (len(taps) - 1) - first


def _input_grad_phases(grad_out: Tensor, weight: Tensor, x: Tensor, stride, padding, dilation,
                       groups: int) -> tuple[list, int, Optional[str]]:
    """(the phases of the input gradient, how many groups run as one, None), or (.., why they cannot run).
    A phase's geometry is that of the conv its launch runs (groups merged: ``_merge_factor``).

    Input row h = a + SH*i receives grad_out[p] * W[r] for the taps r with a + PH - r*DH divisible by SH,
    equally spaced: r_j = r0 + T*j (T = SH / gcd(SH, DH)), at p = i + f - e*j (f = (a + PH - r0*DH) / SH,
    e = T*DH / SH). So phase a is a stride-1 conv of grad_out with those taps flipped, dilation e, padding
    e*(J-1) - f (negative: a crop) and ceil((H - a) / SH) output rows; columns alike, channels swapped. With
    stride 1 that is one phase with every tap and padding DH*(R-1) - PH. Raises TypeError / ValueError for
    invalid arguments."""
    geo = _gradient_geometry("conv2d_input_grad", x, weight, grad_out, stride, padding, dilation, groups)
    merge = _merge_factor(geo, groups)
    phases, reason = [], None
    for a in range(min(geo["SH"], geo["H"])):
        taps_h, dil_h, pad_h = _phase_taps(a, geo["SH"], geo["PH"], geo["DH"], geo["R"])
        rows = len(range(a, geo["H"], geo["SH"]))
        for b in range(min(geo["SW"], geo["W"])):
            taps_w, dil_w, pad_w = _phase_taps(b, geo["SW"], geo["PW"], geo["DW"], geo["S"])
            cols = len(range(b, geo["W"], geo["SW"]))
            phase_geo = None
            if taps_h and taps_w:
                phase_geo = dict(geo, C=geo["K"], H=geo["P"], W=geo["Q"], K=geo["C"], P=rows, Q=cols,
                                 M=geo["N"] * rows * cols, Cg=geo["Kg"], Kg=geo["Cg"], SH=1, SW=1, PH=pad_h,
                                 PW=pad_w, DH=dil_h, DW=dil_w, R=len(taps_h), S=len(taps_w))
                reason = reason or _limit(phase_geo, grad_out, groups, merge)
                phase_geo = _merged(phase_geo, merge)
            phases.append(_Phase(slice(a, None, geo["SH"]), slice(b, None, geo["SW"]), phase_geo, (taps_h, taps_w)))
    return phases, merge, reason


def input_grad_unsupported_reason(grad_out: Tensor, weight: Tensor, x: Tensor, stride, padding, dilation,
                                  groups: int) -> Optional[str]:
    """None when conv2d_input_grad can run, else a short sentence saying why not (invalid arguments too)."""
    try:
        return _input_grad_phases(grad_out, weight, x, stride, padding, dilation, groups)[2]
    except (TypeError, ValueError) as e:
        return str(e)


def conv2d_input_grad(
    grad_out: Tensor, weight: Tensor, x: Tensor, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
    groups: int = 1, in_scale: Tensor, in_shift: Tensor, in_relu: bool, mean: Tensor,
) -> tuple[Tensor, Tensor]:
    """The input side of conv2d_fused's backward with its prologue (one launch), for a training unit:
    returns (dz, sums).

    d act = the input gradient of conv2d(act, weight) for grad_out (torch's convolution_backward), and
    dz = d act * act_in'(x*in_scale + in_shift): ReLU's mask (z > 0) if in_relu, else d act itself;
    dz has grad_out's dtype and x's memory format. sums: (2, C) fp32, over (N, H, W), of dz and of
    dz * (x - mean), dz as stored: BatchNorm's backward reduction (``bn_act_backward_reduce``'s sums).
    x: the forward's input (N, C, H, W); grad_out: (N, K, P, Q) in x's dtype, any strides; in_scale,
    in_shift, mean: (C,) fp32. A strided conv takes one launch per phase of its stride
    (``_input_grad_phases``). ``input_grad_unsupported_reason`` says why a call cannot run (RuntimeError
    here), TypeError / ValueError for invalid arguments.
    """
    fn = "conv2d_input_grad"
    phases, merge, reason = _input_grad_phases(grad_out, weight, x, stride, padding, dilation, groups)
    if reason is not None:
        raise RuntimeError(f"{fn}: {reason}")
    c = x.shape[1]
    in_scale, in_shift, mean = (_vector(fn, name, v, c, x) for name, v in
                                (("in_scale", in_scale), ("in_shift", in_shift), ("mean", mean)))
    dz = torch.empty(x.shape, device=x.device, dtype=grad_out.dtype, memory_format=_memory_format(x))
    sums = []  # per launched phase: stride 1's one is returned as it is, no zero-fill and add
    for phase in phases:
        dz_part = dz[:, :, phase.rows, phase.cols]
        if phase.geo is None:  # no tap reaches these positions: no gradient, nothing to sum
            dz_part.zero_()
            continue
        sums.append(torch.empty((2, c), device=x.device, dtype=torch.float32))
        _launch(grad_out, _packed_weight(weight, groups, transposed=True, taps=phase.taps, merge=merge), phase.geo,
                groups // merge, dz_part, out_scale=in_scale, out_shift=in_shift,
                residual=x[:, :, phase.rows, phase.cols], out_relu=in_relu, compute_stats=True, prologue_grad=True,
                x_mean=mean, stats_out=sums[-1].unbind(0))
    return dz, functools.reduce(torch.add, sums) if sums else x.new_zeros((2, c), dtype=torch.float32)
