"""Weight gradient of fusedres.triton.conv's conv, with its prologue recomputed while x is loaded.

    x'  = act_in(x * in_scale + in_shift)                 (optional prologue, per input channel)
    dW  = d(sum(conv2d(x', W, stride, padding, dilation, groups) * dy)) / dW

so the backward of a BN-ReLU-conv unit gets dW from the unit's input x and the BatchNorm's scale and
shift without materialising x'. The prologue is conv.py's: fp32 arithmetic rounded to x's dtype, NaN
passing through the ReLU, applied before zero padding so padded positions contribute 0, never relu(t).
Products accumulate in fp32 on tensor cores (fp32 inputs as TF32, allowed by the same torch flags as
the forward; exact fp32 under TRITON_INTERPRET=1, see conv.py).

GEMM view (per group g of G): dW_g[k, col] = sum over m of dy[m, g*Kg + k] * x'[m, col] with rows
m = (n, p, q), the M = N*P*Q output positions, and columns col = (r*S + s)*Cg + c, ordered like conv.py's
packed weight, where x'[m, col] = x'[n, g*Cg + c, p*SH - PH + r*DH, q*SW - PW + s*DW] (0 outside x). A
program computes a (BLOCK_N, BLOCK_K) tile of dW_g (output channels x columns) as the sum of
dy_tile^T @ x'_tile over BLOCK_M-row steps. With Cg >= conv_plan._FLAT_K_BELOW a column tile is one (r, s)
and a block of channels; with fewer channels (the stem's C = 3) the columns are one flat axis and each
decodes its own (r, s, c). A strided conv of so few channels (the stem) runs as the forward does
(``conv_args._space_to_depth``, a prologue applied to the copy): the gradient of the stride-1 conv on the
space-to-depth copy of x, its columns flat, taken back to the conv's weight
(``conv_args._space_to_depth_weight_grad``). x and dy are addressed through their four strides
(NCHW, channels_last, ...); offsets into them and the workspace are int64; every tail is masked.

Split-K: M is large (N*56*56) and dW small (64 x 576), so the rows are cut into SPLITS contiguous
ranges of ROWS_PER_SPLIT and grid axis 2 runs one range per program. Each split writes its fp32
partial dW to its own slice of a (SPLITS, K, Cg, R, S) workspace, laid out like dW, so there are no
atomics and no zero-fill; the host adds the slices with torch (deterministic) and casts to x's dtype.
ROWS_PER_SPLIT is fixed on the host, before the autotuner picks a config, so it cannot depend on the
config: a multiple of every config's BLOCK_M (only M's last step is partial), giving at least
_SPLIT_WAVES programs per SM with the config of the fewest (largest) tiles, as long as each split keeps
about _MIN_ROWS_PER_SPLIT rows or more.
Under TRITON_INTERPRET=1 there are at least _INTERPRET_SPLITS splits where M allows, so the tests run
the split path.

Tile shapes, num_warps and num_stages are autotuned per conv shape, strides, dtype and prologue flags
(``autotuning.autotune``, as for conv.py). Under TRITON_INTERPRET=1 one small config runs, without
tuning.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._host import cdiv
from .autotuning import autotune, keyed_launch
from .conv import _DOT_PRECISION, _UPCAST_DOT
from .conv_args import (_INTERPRET, _limit, _merge_factor, _merged, _space_to_depth, _space_to_depth_channels,
                        _runnable_merge, _space_to_depth_weight_grad, _vector)
from .conv_configs import _configs, _reduction_size
from .conv_dgrad import _gradient_geometry
from .conv_plan import _FLAT_K_BELOW

_CONFIGS = _configs([(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 3),
                     (32, 64, 64, 4, 4)])
# BLOCK_Ms are powers of two, so the largest is a multiple of all of them
_ROW_QUANTUM = max(c.kwargs["BLOCK_M"] for c in _CONFIGS)
_SPLIT_WAVES = 2  # programs per SM the split count aims at
_MIN_ROWS_PER_SPLIT = 512  # on a GPU: each split's fp32 partial dW is written and summed once per ~512 rows
_INTERPRET_SPLITS = 3
_NAME = "conv2d_weight_grad"  # in error messages

_AUTOTUNE_KEY = ["N", "C", "H", "W", "K", "Cg", "R", "S", "SH", "SW", "PH", "PW", "DH", "DW", "stride_xc", "stride_dk",
                 "PROLOGUE", "IN_RELU", "FLAT_K", "ROWS_PER_SPLIT"]
_STRIDE_NAMES = ("stride_xn", "stride_xc", "stride_xh", "stride_xw", "stride_dn", "stride_dk", "stride_dp",
                 "stride_dq")


# dW tiles: output channels (BLOCK_N) x columns (BLOCK_K), reducing over a split's rows (BLOCK_M steps)
@autotune(_CONFIGS, _AUTOTUNE_KEY,
          lambda a: dict(BLOCK_M=a["ROWS_PER_SPLIT"], BLOCK_N=a["Kg"], BLOCK_K=_reduction_size(a)))
@triton.jit
def _wgrad_kernel(
    x_ptr,  # (N, C, H, W) the forward conv's input before the prologue, any strides
    dy_ptr,  # (N, K, P, Q) gradient of the conv output, x's dtype, any strides
    ws_ptr,  # (SPLITS, K, Cg, R, S) fp32 out, contiguous: slice z holds the sums over split z's rows
    in_scale_ptr, in_shift_ptr,  # (C,) fp32, read if PROLOGUE
    N, C, H, W, K, P, Q, M, Cg, Kg,  # M = N*P*Q, Cg = C/G, Kg = K/G (N and C: autotune key only)
    ROWS_PER_SPLIT,  # rows m reduced per split, a multiple of BLOCK_M
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dn, stride_dk, stride_dp, stride_dq,
    SH, SW, PH, PW, DH, DW,  # conv stride, padding, dilation
    R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, FLAT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # axis 0: tiles (output-channel tiles fastest), axis 1: groups, axis 2: splits
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    k_tiles = tl.cdiv(Kg, BLOCK_N)
    pid_k = pid % k_tiles
    pid_col = pid // k_tiles

    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels of group g
    k_mask = ks < Kg
    k_out = g * Kg + ks
    dy_k_offs = k_out.to(tl.int64)[None, :] * stride_dk

    if FLAT_K:  # every column decodes its own (r, s, c): (1, BLOCK_K) spatial offsets
        cols = pid_col * BLOCK_K + tl.arange(0, BLOCK_K)
        col_mask = cols < R * S * Cg
        c = cols % Cg
        rs = cols // Cg
        r = (rs // S)[None, :]
        s = (rs % S)[None, :]
    else:  # one (r, s) per column tile and a block of channels: scalar spatial offsets
        c_blocks = tl.cdiv(Cg, BLOCK_K)
        rs = pid_col // c_blocks
        c = (pid_col % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        col_mask = c < Cg
        r = rs // S
        s = rs % S
    ch = g * Cg + c  # input channels
    x_ch_offs = ch.to(tl.int64)[None, :] * stride_xc
    if PROLOGUE:
        scale = tl.load(in_scale_ptr + ch, mask=col_mask, other=0.0)[None, :]
        shift = tl.load(in_shift_ptr + ch, mask=col_mask, other=0.0)[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    first_row = split * ROWS_PER_SPLIT
    end_row = tl.minimum(M, first_row + ROWS_PER_SPLIT)
    for m0 in range(first_row, end_row, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # output positions m = (n, p, q)
        row_mask = rows < end_row
        n = (rows // (P * Q)).to(tl.int64)
        p = (rows // Q) % P
        q = rows % Q
        dy_offs = (n * stride_dn + p.to(tl.int64) * stride_dp + q.to(tl.int64) * stride_dq)[:, None] + dy_k_offs
        dy = tl.load(dy_ptr + dy_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)

        ih = (p * SH - PH)[:, None] + r * DH  # (BLOCK_M, 1), or (BLOCK_M, BLOCK_K) if FLAT_K
        iw = (q * SW - PW)[:, None] + s * DW
        a_mask = row_mask[:, None] & col_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_offs = (n * stride_xn)[:, None] + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw + x_ch_offs
        a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
        if PROLOGUE:
            v = a.to(tl.float32) * scale + shift
            if IN_RELU:
                v = tl.where(v < 0, 0.0, v)  # like clamp_min(0): NaN propagates
            a = tl.where(a_mask, v, 0.0).to(x_ptr.dtype.element_ty)  # padding stays 0
        if _UPCAST_DOT:
            dy = dy.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=_DOT_PRECISION)

    # dW[k_out, c, r, s] of this split, at k_out*Cg*R*S + c*R*S + r*S + s
    ws_offs = (split.to(tl.int64) * K * Cg * R * S + k_out.to(tl.int64)[:, None] * (Cg * R * S)
               + (c * (R * S) + rs)[None, :])
    tl.store(ws_ptr + ws_offs, acc, mask=k_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- host side


def _checked_geometry(x: Tensor, grad_out: Tensor, weight_shape, stride, padding, dilation, groups: int) -> dict:
    """conv.py's validated geometry of the forward conv, with grad_out checked against its output."""
    shape = tuple(weight_shape) if isinstance(weight_shape, (tuple, list)) else None
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{_NAME}: weight_shape must be 4 non-negative ints (K, C/groups, R, S), "
                         f"got {weight_shape}")
    # with a one-element stand-in for the weight: _geometry reads its shape, dtype and device only
    return _gradient_geometry(_NAME, x, x.new_empty(()).expand(shape), grad_out, stride, padding, dilation, groups)


def unsupported_reason(x: Tensor, grad_out: Tensor, weight_shape, stride, padding, dilation,
                       groups: int) -> Optional[str]:
    """None when conv2d_weight_grad can run this call, else a short sentence saying why not (the caller
    then uses torch's convolution_backward)."""
    try:
        geo = _checked_geometry(x, grad_out, weight_shape, stride, padding, dilation, groups)
    except (TypeError, ValueError) as e:
        return str(e)
    return _limit(geo, x, groups, _merge_factor(geo, groups))


def _tiles(geo: dict, block_n: int, block_k: int, flat: bool) -> int:
    """dW tiles of one group: output-channel tiles times column tiles (``flat``: one flat axis of columns)."""
    if flat:
        col_tiles = cdiv(geo["R"] * geo["S"] * geo["Cg"], block_k)
    else:
        col_tiles = geo["R"] * geo["S"] * cdiv(geo["Cg"], block_k)
    return cdiv(geo["Kg"], block_n) * col_tiles


def _rows_per_split(geo: dict, device: torch.device, flat: bool) -> int:
    """Rows of M each split reduces over (see the module docstring)."""
    if _INTERPRET:
        splits = _INTERPRET_SPLITS
    else:  # the config with the largest tiles launches the fewest programs
        groups = geo["K"] // geo["Kg"]
        tiles = groups * _tiles(geo, max(c.kwargs["BLOCK_N"] for c in _CONFIGS),
                                max(c.kwargs["BLOCK_K"] for c in _CONFIGS), flat)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(cdiv(_SPLIT_WAVES * sms, tiles), cdiv(geo["M"], _MIN_ROWS_PER_SPLIT))
    # whole steps of _ROW_QUANTUM rows, rounded down: at least that many splits where M has the steps
    return max(1, cdiv(geo["M"], _ROW_QUANTUM) // splits) * _ROW_QUANTUM


def conv2d_weight_grad(
    x: Tensor, grad_out: Tensor, weight_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
    groups: int = 1, in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = True,
) -> Tensor:
    """dW of y = conv2d(act_in(x*in_scale+in_shift), W) for the gradient grad_out of y.

    x: (N, C, H, W) fp16/bf16/fp32, any strides; grad_out: (N, K, P, Q), the conv output's shape, in x's
    dtype, any strides; weight_shape: (K, C/groups, R, S). in_scale and in_shift: (C,) fp32, given
    together or not at all (then x' = x and in_relu is ignored); act_in is ReLU if in_relu. Returns a
    contiguous weight_shape tensor in x's dtype, what
    ``torch.ops.aten.convolution_backward(grad_out, x', W, None, stride, padding, dilation, False, [0, 0],
    groups, [False, True, False])[1]`` gives with x' rounded to x's dtype. Raises TypeError / ValueError
    for invalid arguments and RuntimeError with ``unsupported_reason``'s sentence for valid calls this
    kernel does not run. Narrow groups run several as one, as in the forward (``conv_args._merge_factor``):
    the kernel computes the gradient of the merged groups' block-diagonal weight, whose diagonal blocks are
    the groups' gradients (the rest, products of one group's outputs with another's inputs, is dropped).
    """
    geo = _checked_geometry(x, grad_out, weight_shape, stride, padding, dilation, groups)
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{_NAME}: in_scale and in_shift must be given together")
    if in_scale is not None:
        in_scale, in_shift = (_vector(_NAME, "in_scale", in_scale, geo["C"], x),
                              _vector(_NAME, "in_shift", in_shift, geo["C"], x))
    merge = _runnable_merge(_NAME, geo, x, groups)

    space_to_depth = _space_to_depth_channels(geo, groups)
    if space_to_depth:  # the stem: the gradient of the stride-1 conv on x's space-to-depth copy (see conv_args),
        # the prologue applied to the copy
        x, run = _space_to_depth(x, geo, space_to_depth, in_scale, in_shift, in_relu)
        in_scale = in_shift = None
    else:
        run = _merged(geo, merge)  # merge groups run as one: dW of the block-diagonal weight, kept on its diagonal
    k, cg, r, s = weight_shape
    flat = bool(space_to_depth) or run["Cg"] < _FLAT_K_BELOW
    rows_per_split = _rows_per_split(run, x.device, flat)
    splits = cdiv(run["M"], rows_per_split)
    ws = torch.empty((splits, k, run["Cg"], run["R"], run["S"]), device=x.device, dtype=torch.float32)
    strides = dict(zip(_STRIDE_NAMES, x.stride() + grad_out.stride()))

    def grid(meta):
        return _tiles(run, meta["BLOCK_N"], meta["BLOCK_K"], flat), groups // merge, splits

    prologue = in_scale is not None
    # what decides the launch's other arguments and grid (as conv_plan._planned's key does for the forward)
    key = (x.device, x.dtype, x.shape, x.stride(), grad_out.shape, grad_out.stride(), groups, merge, flat,
           rows_per_split, prologue, bool(in_relu) and prologue, *run.values())
    keyed_launch(_wgrad_kernel, grid, key,
                 (x, grad_out, ws, in_scale if prologue else ws, in_shift if prologue else ws),
                 dict(ROWS_PER_SPLIT=rows_per_split, PROLOGUE=prologue, IN_RELU=bool(in_relu) and prologue,
                      FLAT_K=flat, **run, **strides))
    if space_to_depth:
        ws = _space_to_depth_weight_grad(ws.sum(0), weight_shape, geo["SH"], geo["SW"], space_to_depth)
        return ws.to(x.dtype).contiguous()
    if merge > 1:  # output channel kk of group j in a merged group meets only group j's input channels
        ws = ws.reshape(splits, groups // merge, merge, k // groups, merge, cg, r, s).diagonal(dim1=2, dim2=4)
        ws = ws.permute(0, 1, 6, 2, 3, 4, 5).reshape(splits, k, cg, r, s)
    return (ws.sum(0) if splits > 1 else ws[0]).to(x.dtype)
