"""The Triton conv's launch plan: what a launch of ``conv._conv_kernel`` decides from its tensors' layout, its
geometry and its flags, the same at every launch that has them, made once per such launch (``_planned``).

A plan (``_Plan``) holds the geometry launched (a 1x1 conv over all of x as a GEMM over its pixels,
``_gemm_view``), whether the TMA configs may run (``_tma_ok``) and their row box, the statistics workspace's
rows, and the kernel's arguments after its tensors (flags, geometry, strides) with its grid. ``conv._start``
launches the kernel by it; the plan, equal by identity, is also the key its launches are relaunched by
(``autotuning.keyed_launch``). See conv.py's docstring for what the kernel does with each of these.
"""

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from ._host import cdiv
from .conv_args import _INTERPRET
from .conv_configs import _ROW_TILINGS, _TMA_MAX_BLOCK_K, _box

_FLAT_K_BELOW = 16  # per-group input channels below which the reduction is one flat (r, s, c) axis
_INTERPRET_SMS = 2  # under TRITON_INTERPRET=1 a persistent program takes several tiles in the tests' shapes

_STRIDE_NAMES = ("stride_xn", "stride_xc", "stride_xh", "stride_xw", "stride_on", "stride_ok", "stride_op",
                 "stride_oq", "stride_rn", "stride_rk", "stride_rp", "stride_rq")


def _tma_ok(x: Tensor, x_strides: tuple, geo: dict, groups: int, prologue: bool = False) -> bool:
    """Whether the TMA configs may run: an ungrouped conv reducing one (r, s) per step, on an x (addressed
    with ``x_strides``) whose channels are contiguous, whose other strides and address are multiples of 16
    bytes and its strides positive (the tensor memory accelerator's rules: a stride of 0, an expanded x's,
    describes no tensor it loads; the packed weight's rows likewise), on a GPU that has one (sm_90+). A strided conv
    also needs H and W divisible by its stride (x seen as (H/SH, SH, W/SW, N, SW*C), see the kernel) and,
    with a column stride, pixels packed along W with a whole number of channel blocks (a block past C would
    read the next pixel's channels where a descriptor of C columns gives zeros), as does a ``prologue`` (on a
    launch other than a GEMM view) whose TMA row tiles are images at one position (``_box``; the kernel's
    X_ROWS_2D)."""
    size = x.element_size()
    stride_n, stride_c, stride_h, stride_w = x_strides
    strided_ok = geo["H"] % geo["SH"] == 0 and geo["W"] % geo["SW"] == 0 and (
        geo["SW"] == 1 or (stride_w == geo["C"] and geo["C"] % _TMA_MAX_BLOCK_K == 0))
    whole_blocks_ok = not prologue or _box(geo) != (1, 1) or geo["C"] % _TMA_MAX_BLOCK_K == 0
    return (groups == 1 and geo["Cg"] >= _FLAT_K_BELOW and stride_c == 1 and strided_ok and whole_blocks_ok
            and all(stride > 0 and stride * size % 16 == 0 for stride in (stride_n, stride_h, stride_w, geo["Kg"]))
            and x.data_ptr() % 16 == 0
            and (_INTERPRET or torch.cuda.get_device_capability(x.device)[0] >= 9))


def _pixel_stride(shape, strides) -> Optional[int]:
    """The offset between consecutive pixels where a tensor's (n, h, w) positions lie in that order on one
    stride (a dense pixel grid, as in a channels_last tensor), else None (also for a single pixel)."""
    stride, pixels = None, 1
    for dim in (3, 2, 0):
        if shape[dim] == 1:
            continue
        if stride is None:
            stride = strides[dim]
        elif strides[dim] != pixels * stride:
            return None
        pixels *= shape[dim]
    return stride


def _gemm_view(geo: dict, shapes: tuple, tensor_strides: tuple) -> Optional[tuple]:
    """A 1x1, stride-1, unpadded conv over all of x (P = H, Q = W) whose x, out and residual (their ``shapes``
    and ``tensor_strides``) each keep their pixels on one stride is a GEMM over the M pixels: (geometry,
    strides) of the same conv on N = M images of 1x1, each tensor's 4 strides as if it were viewed as
    (M, channels, 1, 1); or None. The kernel then indexes rows without dividing by P and Q (ints equal to 1
    compile as constants) and its TMA configs load x as the GEMM's (M, C) matrix (GEMM_VIEW). (An input
    gradient's phase convs may cover part of x only: output pixel m is then not x's pixel m.)"""
    if (geo["R"], geo["S"], geo["SH"], geo["SW"], geo["PH"], geo["PW"]) != (1, 1, 1, 1, 0, 0) or (
            (geo["P"], geo["Q"]) != (geo["H"], geo["W"])):
        return None
    pixel_strides = [_pixel_stride(shape, strides) for shape, strides in zip(shapes, tensor_strides)]
    if None in pixel_strides:
        return None
    return (dict(geo, N=geo["M"], H=1, W=1, P=1, Q=1),
            tuple((step, strides[1], step, step) for strides, step in zip(tensor_strides, pixel_strides)))


def _row_tiles(geo: dict, box: tuple[int, int], block_m: int, use_tma: bool) -> int:
    """The row tiles (grid rows, statistics workspace rows) of a launch with BLOCK_M ``block_m``."""
    if not use_tma:
        return cdiv(geo["M"], block_m)
    box_h, box_w = box
    return (cdiv(geo["N"], block_m // (box_h * box_w)) * cdiv(geo["P"], box_h)
            * cdiv(geo["Q"], box_w))


def _multiprocessors(device: torch.device) -> int:
    """The SMs a persistent launch spreads over: the GPU's, or _INTERPRET_SMS under TRITON_INTERPRET=1."""
    return _INTERPRET_SMS if _INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """What ``_launch`` decides from a launch's layout, geometry and flags (``_plan``), the same at every launch
    that has them: the geometry launched (a GEMM view's, ``_gemm_view``), whether the TMA configs may run and
    their box, the statistics workspace's rows, whether the kernel reads row_ones, and the kernel's arguments
    after its tensors with its grid. Equal and hashed by identity: the plan is the key its launches are relaunched
    by (``autotuning.keyed_launch``), one plan per key of ``_PLANS``."""
    geo: dict
    tma_ok: bool
    box: tuple
    ws_rows: int
    row_ones: bool
    constants: dict
    grid: Callable


_PLANS: dict = {}  # _planned's key -> _Plan
_MAX_PLANS = 4096  # beyond it (shapes that keep changing) the plans are made anew


def _plan(x: Tensor, out: Tensor, res: Tensor, geo: dict, groups: int, flags: dict) -> _Plan:
    """The _Plan of a launch into out (res: the residual, or out where there is none) with the kernel's
    ``flags`` (PROLOGUE, ..., FLAT_K)."""
    tensor_strides = x.stride(), out.stride(), res.stride()
    gemm = _gemm_view(geo, (x.shape, out.shape, res.shape), tensor_strides)
    if gemm is not None:
        geo, tensor_strides = gemm
    tma_ok = not flags["FLAT_K"] and _tma_ok(x, tensor_strides[0], geo, groups,
                                             prologue=flags["PROLOGUE"] and gemm is None)
    box = _box(geo) if tma_ok else (1, 1)  # the TMA configs' (_config_box); the others tile rows without one
    ws_rows = max(_row_tiles(geo, box, block_m, use_tma and tma_ok) for block_m, use_tma in _ROW_TILINGS)
    device = x.device

    def grid(meta):
        tiles = _row_tiles(geo, box, meta["BLOCK_M"], meta["USE_TMA"]) * cdiv(geo["Kg"], meta["BLOCK_N"])
        if meta["PERSISTENT"]:
            tiles = min(tiles, meta["PERSISTENT"] * _multiprocessors(device))
        return tiles, groups

    constants = dict(flags, TMA_OK=tma_ok, GEMM_VIEW=gemm is not None, WS_ROWS=ws_rows, GROUP_M=8, **geo,
                     **dict(zip(_STRIDE_NAMES, tensor_strides[0] + tensor_strides[1] + tensor_strides[2])))
    return _Plan(geo, tma_ok, box, ws_rows, flags["PROLOGUE"] and not flags["FLAT_K"] and gemm is None,
                 constants, grid)


def _flags(in_scale, in_relu, out_scale, out_shift, residual, out_relu, compute_stats, prologue_grad, flat,
           geo: dict) -> dict:
    """The kernel's flags (PROLOGUE, ..., FLAT_K) for a launch with these arguments (``_launch``'s)."""
    prologue = in_scale is not None
    return dict(PROLOGUE=prologue, IN_RELU=bool(in_relu) and prologue, HAS_OUT_SCALE=out_scale is not None,
                HAS_OUT_SHIFT=out_shift is not None, HAS_RESIDUAL=residual is not None and not prologue_grad,
                OUT_RELU=bool(out_relu), COMPUTE_STATS=bool(compute_stats), PROLOGUE_GRAD=bool(prologue_grad),
                FLAT_K=flat or geo["Cg"] < _FLAT_K_BELOW)


def _planned(x: Tensor, out: Tensor, res: Tensor, geo: dict, groups: int, flags: dict) -> _Plan:
    """The launch's _Plan: a launch like an earlier one (by what _plan reads) takes that one's plan, and so its
    kernel and config (``_start``)."""
    # geo's values alone: every geometry has _geometry's keys in its order (the others are dict(geo, ...) of one)
    key = (x.device, x.dtype, x.data_ptr() % 16 == 0, x.shape, x.stride(), out.shape, out.stride(), res.shape,
           res.stride(), groups, *flags.values(), *geo.values())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(x, out, res, geo, groups, flags)
    return plan
