"""Implicit-GEMM 2-D convolution in Triton with a fused per-channel prologue and epilogue.

    x'  = act_in(x * in_scale + in_shift)                 (optional prologue, per input channel)
    y   = conv2d(x', W, stride, padding, dilation, groups)
    out = act_out(y * out_scale + out_shift + residual)   (each term optional, per output channel)

or, with compute_stats=True (the training forward), out = y (+ out_shift, a conv bias) and the
per-output-channel mean and variance of it as stored: BatchNorm's batch statistics without a pass
over y.

The prologue runs on every loaded input element before zero padding, so padded positions add 0
(as ``F.conv2d(F.relu(x * s + t), W, padding=p)`` does), never relu(t). Where a reduction step is one
(r, s) (Cg >= _FLAT_K_BELOW) padding is a property of the row, and the prologue computes
x * s + t * f with a row factor f loaded from a buffer of ones (0 where the row is padding, as x is):
written with a select on the padding mask instead, triton converts the transformed tile to the
tensor-core dot's register layout through shared memory (a write, a read and a barrier per step, the
difference between the prologue's compiled code and the bare conv's; the prologue measured 0.3x-3x of
the bare conv's time on an H100); a tile computed only from loaded values is loaded from shared
memory straight into that layout. This assumes finite scale and shift (0 * inf is NaN), as
BatchNorm's are with finite parameters. In a TMA tile of one output position (see below) a tap's input
pixel is in the image for every row or for none, so the shift itself is loaded masked by that (no row
factor, no per-element product: the training forward's step at batch 256 compiles to 453 PTX instructions
where the row factor's took 845, sm_90, layer1 3x3, 128x64). The prologue is fp32 arithmetic whose result is
rounded to x's dtype before the dot, as the unfused computation feeds the conv a tensor in x's dtype; its ReLU
is a NaN-propagating maximum (as clamp_min), one instruction per element.

Products accumulate in fp32 on tensor cores: fp16/bf16 as they are, fp32 as TF32, which only runs
where torch's conv would use TF32 too (``torch.backends.cudnn.allow_tf32``, or
``torch.backends.cudnn.conv.fp32_precision`` on torch >= 2.9); otherwise ``unsupported_reason`` says
so and the caller uses cuDNN. Under TRITON_INTERPRET=1 the dot is exact fp32 ("ieee") on fp32
copies of its operands: the interpreter's tl.dot multiplies bf16 bit patterns as integers (triton
3.8), and fp32 copies give the same sums.

GEMM view (per group g of G): rows m = (n, p, q) are the M = N*P*Q output positions, columns are
the Kg = K/G output channels of the group, and the reduction runs over (r, s, c) with c one of the
Cg = C/G input channels of the group. The weight is packed on the host to (G, R*S*Cg, Kg), row
(r*S + s)*Cg + c, so each (BLOCK_K, BLOCK_N) weight tile is contiguous along its columns; packed
weights are cached per weight tensor, version counter and fused optimizer steps (``conv_args._packed_weight``).
Narrow groups (ResNeXt's 4-32 channels) run several consecutive groups as one (``conv_args._merge_factor``: up to
64 channels, 16 groups) with a block-diagonal weight: a column tile of 64 computes what it would compute for one
narrow group anyway, and a merged group's input channels are contiguous rows of x, loaded whole; where all groups
merge into one, the TMA configs may run it. x, residual and out are addressed
through their four strides, so NCHW, channels_last and other layouts all work; out takes x's
memory format, as with F.conv2d. channels_last is the fast case: with channels contiguous along the
reduction (and C/G, K/G multiples of 16) the compiler turns the input loads into pipelined async
copies; NCHW gathers them element by element.

Tiles: a program computes a (BLOCK_M, BLOCK_N) output tile of one group (grid axis 0: tiles in
GROUP_M-row bands so a weight column tile stays in L2 while it is reused; axis 1: groups). Each
reduction step loads a (BLOCK_M, BLOCK_K) input tile, gathered with the padding masks, and a
(BLOCK_K, BLOCK_N) weight tile. With Cg >= _FLAT_K_BELOW a step is one (r, s) and a block of
channels, so the spatial index math is per row; with fewer channels (the stem's C = 3) the
reduction is one flat axis of R*S*Cg and each column decodes its own (r, s, c), so no step is
mostly masked-off channels. A strided conv of so few channels (the stem's 7x7/2) runs as a stride-1 conv on
a space-to-depth copy of x (``conv_args._space_to_depth``: each SH x SW block of pixels one pixel of
SH*SW*C' >= 16 channels; a prologue applied as x is copied), its reduction kept flat: each tap then reads
16-byte runs, which the compiler loads by asynchronous copies, where x's 3-channel pixels were gathered by
synchronous 2-byte loads. Every tail (M, channels, spatial edges) is masked; offsets into x, out, residual
and the workspace are int64, while M itself is capped at 2**30 output positions.

Two kinds of config share the kernel (USE_TMA). The pointer configs above run every launch. The TMA
configs run the launches _tma_ok allows (groups 1, Cg >= _FLAT_K_BELOW, channels contiguous, other strides
and the address multiples of 16 bytes, sm_90+; a strided conv's H and W divisible by its stride): their row
tile is a box of BOX_I images x BOX_H x BOX_W output positions (``conv_configs._box``: BLOCK_M images at
one position where the batch fills such tiles, else the largest powers of two dividing P and Q, so boxes tile
the output), and each step loads the box shifted by its (r, s) from one tensor descriptor of x, and the weight
tile from one of (R*S, Cg, Kg), with Hopper's tensor memory accelerator: one copy per tile instead of an
address per 16 bytes, and zeros wherever the box leaves the image or the channels (padding and tails need no
mask). x is described as (H/SH, SH, W/SW, N, SW*C): the input rows a strided box reads are those of one
residue of h modulo SH, every SH-th row, which is a box of that view (and likewise the columns); with stride 1
it is x as (H, 1, W, N, C). The dot reads a box of one position, (1, 1, 1, BLOCK_M, BLOCK_K), from shared
memory as it reads a 2-D tile; a box of several positions is reshaped in registers on its way (sm_90 PTX,
triton 3.6: wgmma with A in registers, each step's tile copied out of shared memory by ldmatrix first, 122
registers against 90 for the layer1 3x3 at 128x64). With the prologue, which transforms the tile in registers
anyway, a one-position tile is instead a 2-D tile of x seen as (N, an image's span of elements), its columns
starting at the tap's pixel (X_ROWS_2D; where the tap leaves the image, its rows are moved past N, which gives
zeros), on whole channel blocks only (past C such a tile holds the next pixel's channels). The descriptors are
made on the device (their block shapes follow the config), in a global scratch that ``_with_descriptor_scratch``
lends triton for the launch. The autotuner times both kinds where both may run; the key's TMA_OK keeps them
apart where not.

The pointer configs copy x's tiles by 16-byte cp.async.cg, which triton emits for every 16-byte asynchronous
copy, and which caches in L2 only: a conv of R x S taps reads each element of x once per tap, all of them through
L2 (layer1's 3x3: ~0.9 GB of the ~1.5 GB a 128-row tiling makes L2 serve, where x itself is 0.1 GB). The
X_IN_L1 configs tell the compiler x's channels run contiguous for 8 bytes only (``tl.max_contiguous``), which it
copies by cp.async.ca, cached in L1 too: a tile's next taps read mostly the pixels this one read, shifted by a
column or a row, from L1. Twice the copy instructions for x, so the autotuner times them beside the others, on
convs of several taps only (``conv_configs._usable``).

A 1x1, stride-1, unpadded conv whose x, out and residual each keep their pixels on one stride (channels_last)
launches as a GEMM over the pixels (``_gemm_view``: the same conv on N = M images of 1x1): rows need no division
by P and Q (ints equal to 1 compile as constants), and the TMA configs load x as 2-D tiles of the (M, C)
matrix (GEMM_VIEW), which the tensor-core dot reads from shared memory, as it does a box of one output
position (a box of several is reshaped in registers on its way to the dot; sm_90 PTX, triton 3.6 and 3.8). On
those launches and on one-position ones, without a prologue, the autotuner also times persistent TMA configs:
PERSISTENT programs per SM take the output tiles in turn, in a loop that triton flattens with the reduction
loop, so one tile's epilogue overlaps the next tile's loads (short reductions, such as the 64 input channels of
ResNet's layer1 1x1 convs or the 4 channel blocks of layer2's strided 1x1, are one or a few steps a tile). Where
the dot's x tile is in registers (a box of several positions, or the prologue's transform) ptxas serialises that
loop's wgmma (warning C7515).

Statistics without a second pass over y: each program reduces its (BLOCK_M, BLOCK_N) tile of y, as stored in x's
dtype, in registers to per-channel (count, mean, M2), M2 the sum of squared deviations from the tile's own mean,
and writes them to row pid_m of an fp32 workspace (3, rows, K); every row is written by exactly one program, so no
atomics and no zero-fill are needed, and one more launch (``partials.finish``, Chan's merge, rows added in a fixed
order, so deterministic) turns them into the batch's mean and biased variance, where torch took five small ops.
Nothing cancels when |mean| >> std (sums of y and y*y about a running mean far from the batch's had lost most
digits of the variance: 20% at |mean| = 1200 std in fp32), the mean is as exact as eager's, ~ulp(|mean|) (sums
about a shift made it ~ulp(|y - shift|)), and a NaN in y gives a NaN variance, as eager's. On the tensor cores'
accumulator layout a column's values lie across the lanes and warps of the tile's rows, so these column sums took
shuffles and a reduction across warps through shared memory (2088 sm_90 instructions a thread against the prologue
variant's 960 on layer1's 64->256 1x1, TMA 128x128). CHANNEL_ROWS configs compute the tile as its transpose,
(channels, positions) = w^T x^T, and transpose it back (a change of layout, no data moved): a channel's values then
lie in one warp, its sums within a thread and its lane quad (1424 instructions; 8 shuffles a thread where there
were 216). The dot then takes x's tile from shared memory, so with the prologue the transformed tile goes there and
back each step: the autotuner times both on GEMM views with statistics.

The same kernel runs the input side of the training backward (PROLOGUE_GRAD; see conv_dgrad.py): the
unit input x is read where a residual would be, and the epilogue applies the prologue's ReLU mask and
sums BatchNorm's backward reduction into the same workspace.

Tile shapes, num_warps and num_stages are autotuned per conv shape, dtypes and fused flags
(``autotuning.autotune`` over the space in conv_configs.py: only the configs that fit the conv's GEMM,
compiled in parallel, cached per process and optionally on disk). Under TRITON_INTERPRET=1 one small config
runs, without tuning.

Host side: conv_plan.py decides a launch's flags, geometry (``_gemm_view``), TMA use (``_tma_ok``), workspace
rows and grid, once per layout, geometry and flags (``_planned``; ``_FLAT_K_BELOW`` is its); this module checks
the arguments, packs the weight (conv_args.py) and launches the kernel by the plan (``_start``).
"""

import contextvars
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.backends import capturing
from . import partials
from .autotuning import autotune, keyed_launch
from .conv_args import (_DTYPES, _INTERPRET, _geometry, _limit, _memory_format, _merge_factor, _merged,
                        _packed_weight, _packing_kept, _runnable_merge, _space_to_depth, _space_to_depth_channels,
                        _vector)
from .conv_configs import _AUTOTUNE_KEY, _CONFIGS, _MAX_BLOCK_M, _config_box, _reduction_size, _usable
from .conv_plan import _flags, _Plan, _planned, _row_tiles


_DOT_PRECISION = tl.constexpr("ieee" if _INTERPRET else "tf32")  # TF32 only matters for fp32
_UPCAST_DOT = tl.constexpr(_INTERPRET)
# column sub-tile of the epilogues that load a tile (see _conv_kernel); narrower than the interpreter's
# 16-column tile under TRITON_INTERPRET=1, so the CPU tests run the sub-tiled path too
_EPILOGUE_COLUMNS = tl.constexpr(8 if _INTERPRET else 16)
_ROW_ONES: dict = {}  # device -> fp32 ones of _MAX_BLOCK_M


# the forward / input-gradient GEMM: output positions x output channels, reducing over the input's columns
@autotune(_CONFIGS, _AUTOTUNE_KEY, lambda a: dict(BLOCK_M=a["M"], BLOCK_N=a["Kg"], BLOCK_K=_reduction_size(a)),
          usable=_usable, constants=lambda config, args: _config_box(config["USE_TMA"], args))
# WS_ROWS unspecialised: whether it is 1 or a multiple of 16 changes nothing but would compile every variant
# once more (36 of the 306 compiles a ResNet-50 training step needed)
@triton.jit(do_not_specialize=["WS_ROWS"])
def _conv_kernel(
    x_ptr,  # (N, C, H, W) input, any strides
    w_ptr,  # (G, R*S*Cg, Kg) packed weight, contiguous, x's dtype
    out_ptr,  # (N, K, P, Q) out, x's dtype: y or dz if COMPUTE_STATS, else the epilogue's result
    in_scale_ptr, in_shift_ptr,  # (C,) fp32, read if PROLOGUE
    row_ones_ptr,  # (>= BLOCK_M,) fp32 ones, read if PROLOGUE, not FLAT_K, not GEMM_VIEW: padding row factors
    out_scale_ptr, out_shift_ptr,  # (K,) fp32, read if HAS_OUT_SCALE / HAS_OUT_SHIFT
    res_ptr,  # (N, K, P, Q) any float dtype and strides: the residual if HAS_RESIDUAL, the unit input if PROLOGUE_GRAD
    x_mean_ptr,  # (K,) fp32, read if PROLOGUE_GRAD: the batch mean of the unit input x (at res_ptr)
    ws_ptr,  # (3, WS_ROWS, K) fp32 out if COMPUTE_STATS (2 if PROLOGUE_GRAD): row pid_m = this tile's partials
    N, C, H, W, K, P, Q, M, Cg, Kg, WS_ROWS,  # M = N*P*Q, Cg = C/G, Kg = K/G (N and C: autotune key only)
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_ok, stride_op, stride_oq,
    stride_rn, stride_rk, stride_rp, stride_rq,
    PH, PW, DH, DW,  # conv padding, dilation
    SH: tl.constexpr, SW: tl.constexpr,  # conv stride: constants, so a TMA step's tap offsets divide by no variable
    R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, HAS_OUT_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, OUT_RELU: tl.constexpr, COMPUTE_STATS: tl.constexpr, PROLOGUE_GRAD: tl.constexpr,
    FLAT_K: tl.constexpr,
    TMA_OK: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,  # see _tma_ok and _config_box
    GEMM_VIEW: tl.constexpr,  # x is the GEMM's (M, C) operand: N = M pixels of 1x1, R = S = 1 (see _gemm_view)
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,  # 0: a program per output tile; else PERSISTENT programs per SM take the tiles in turn
    X_IN_L1: tl.constexpr,  # pointer configs: x's tiles by 8-byte copies, cached in L1 (see _usable)
    CHANNEL_ROWS: tl.constexpr,  # the tile computed as (channels, positions): see the module docstring
):
    g = tl.program_id(1)
    ONE_POSITION: tl.constexpr = USE_TMA and BOX_H * BOX_W == 1 and not GEMM_VIEW  # TMA rows: images at one (p, q)
    # x's TMA tile from a 2-D descriptor of x's rows (GEMM pixels, or images: a one-position tile with the prologue,
    # on whole channel blocks (_tma_ok); see _usable)
    X_ROWS_2D: tl.constexpr = GEMM_VIEW or (ONE_POSITION and PROLOGUE)
    if USE_TMA:  # a row tile is a box of BOX_I images x BOX_H x BOX_W output positions; descriptors of x, w
        tl.static_assert(TMA_OK and not FLAT_K, "USE_TMA needs a launch that allows it (TMA_OK)")
        BOX_I: tl.constexpr = BLOCK_M // (BOX_H * BOX_W)
        box_cols = tl.cdiv(Q, BOX_W)
        box_rows = tl.cdiv(P, BOX_H)
        m_tiles = (N + BOX_I - 1) // BOX_I * box_rows * box_cols
        if X_ROWS_2D:  # 2-D tiles of x as (rows, an image's span of elements), which the dot takes from shared
            # memory (a 5-D box it reshapes in registers): GEMM_VIEW's (M, C); a one-position tile's columns start
            # at its tap's pixel, h * stride_xh + w * stride_xw (zeros past N)
            tl.static_assert(BOX_I == BLOCK_M)
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, (H - 1) * stride_xh + (W - 1) * stride_xw + C],
                                               strides=[stride_xn, 1], block_shape=[BLOCK_M, BLOCK_K])
        else:
            # x as (H/SH, SH, W/SW, N, SW*C): input row h = SH*i + a is (i, a) and column w = SW*j + b with
            # channel c is (j, b*C + c), so a box of output positions shifted by a tap is one box of it; the
            # images next to last, so a box of one output position (BOX_H = BOX_W = 1) leads with dims of 1
            # and reaches the dot from shared memory like a 2-D tile (other boxes via registers; sm_90 PTX)
            x_desc = tl.make_tensor_descriptor(
                x_ptr, shape=[H // SH, SH, W // SW, N, SW * C], strides=[SH * stride_xh, stride_xh, SW * stride_xw,
                                                                          stride_xn, 1],
                block_shape=[BOX_H, 1, BOX_W, BOX_I, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[R * S, Cg, Kg], strides=[Cg * Kg, Kg, 1],  # G = 1
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    else:  # a row tile is BLOCK_M consecutive output positions
        m_tiles = tl.cdiv(M, BLOCK_M)
    band = GROUP_M * tl.cdiv(Kg, BLOCK_N)
    if PERSISTENT:  # every program_id(0) + k * num_programs(0)-th tile; the loop over them flattened with the
        end_tile = m_tiles * tl.cdiv(Kg, BLOCK_N)  # reduction's, so the next tile's loads overlap this epilogue
        tile_step = tl.num_programs(0)
    else:
        end_tile = tl.program_id(0) + 1
        tile_step = 1
    for pid in tl.range(tl.program_id(0), end_tile, tile_step, flatten=PERSISTENT > 0):
        # (pid_m, pid_n) from the flat tile index, bands of GROUP_M row tiles per column tile
        first_m = (pid // band) * GROUP_M
        band_rows = tl.minimum(m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % band_rows
        pid_n = (pid % band) // band_rows

        i = tl.arange(0, BLOCK_M)
        if USE_TMA:  # the tile's box, its rows (h, w, image) with the image fastest, as x's descriptor has them
            q0 = pid_m % box_cols * BOX_W
            p0 = pid_m // box_cols % box_rows * BOX_H
            n0 = pid_m // (box_cols * box_rows) * BOX_I
            n = n0 + i % BOX_I
            p = p0 + i // (BOX_I * BOX_W)
            q = q0 + i // BOX_I % BOX_W
            row_mask = (n < N) & (p < P) & (q < Q)
            n = n.to(tl.int64)
        else:
            rows = pid_m * BLOCK_M + i  # output positions m = (n, p, q)
            row_mask = rows < M
            n = (rows // (P * Q)).to(tl.int64)
            p = (rows // Q) % P
            q = rows % Q
        ih0 = p * SH - PH
        iw0 = q * SW - PW
        x_rows = x_ptr + n * stride_xn
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels of group g
        col_mask = cols < Kg
        w_cols = w_ptr + g.to(tl.int64) * (R * S * Cg * Kg) + cols[None, :]

        acc = tl.zeros((BLOCK_N, BLOCK_M) if CHANNEL_ROWS else (BLOCK_M, BLOCK_N), dtype=tl.float32)
        c_blocks = tl.cdiv(Cg, BLOCK_K)
        if FLAT_K:
            steps = tl.cdiv(R * S * Cg, BLOCK_K)
        else:
            steps = R * S * c_blocks
        # steps >= 1 already: saying so drops the compiled path around a loop of no step, on which ptxas
        # serialised the pipelined wgmma (warning C7515, each wgmma waiting for the one before)
        steps = tl.maximum(steps, 1)
        rs = 0  # TMA configs: the step's tap (r, s) and first channel, counted on from step to step (below)
        c0 = 0
        for step in range(steps):
            if FLAT_K:  # every column decodes its own (r, s, c): (1, BLOCK_K) spatial offsets
                kk = step * BLOCK_K + tl.arange(0, BLOCK_K)  # packed weight rows
                k_mask = kk < R * S * Cg
                c = kk % Cg
                r = (kk // Cg // S)[None, :]
                s = (kk // Cg % S)[None, :]
            else:  # one (r, s) per step and a block of channels: scalar spatial offsets
                if not USE_TMA:
                    rs = step // c_blocks
                    c0 = (step % c_blocks) * BLOCK_K
                c = c0 + tl.arange(0, BLOCK_K)
                k_mask = c < Cg
                kk = rs * Cg + c
                r = rs // S
                s = rs % S
            ih = ih0[:, None] + r * DH  # (BLOCK_M, 1), or (BLOCK_M, BLOCK_K) if FLAT_K
            iw = iw0[:, None] + s * DW
            ch = g * Cg + c  # input channels
            if USE_TMA and GEMM_VIEW:  # zeros past M and past C
                a = x_desc.load([n0, c0])
            elif USE_TMA and X_ROWS_2D:  # the tap's pixel of BLOCK_M images; where the tap leaves the image, rows
                h_tap = p0 * SH - PH + r * DH  # past N (zeros: a select on the tile there kept it off the dot's
                w_tap = q0 * SW - PW + s * DW  # register layout, and a shared-memory round trip a step followed)
                in_image = (h_tap >= 0) & (h_tap < H) & (w_tap >= 0) & (w_tap < W)
                a = x_desc.load([tl.where(in_image, n0, N), h_tap * stride_xh + w_tap * stride_xw + c0])
            elif USE_TMA:  # the box shifted by the tap: zeros outside the image, past C and past N
                th = r * DH - PH + SH * PH  # >= 0: h = SH*p + r*DH - PH = SH*(p + th // SH - PH) + th % SH
                tw = s * DW - PW + SW * PW
                a = x_desc.load([p0 + th // SH - PH, th % SH, q0 + tw // SW - PW, n0, tw % SW * C + c0])
                a = a.reshape(BLOCK_M, BLOCK_K)
            else:
                a_mask = row_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_ch = ch
                if X_IN_L1:  # contiguous runs of 8 bytes, which triton copies by cp.async.ca (cached in L1 and L2),
                    # where its 16-byte copies are cp.async.cg (L2 only) whatever the load's cache modifier
                    x_ch = tl.max_contiguous(ch, 64 // x_ptr.dtype.element_ty.primitive_bitwidth)
                a_ptrs = (x_rows[:, None] + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
                          + x_ch.to(tl.int64)[None, :] * stride_xc)
                a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if PROLOGUE:
                # padding (a = 0 there) gets shift * 0: see the module docstring; a GEMM_VIEW conv has no padding
                # (its rows past M, where a = 0 too, are neither stored nor in the statistics)
                shift_mask = k_mask  # 0 past Cg, where a is 0 too
                if ONE_POSITION:  # the tap's pixel is in the image for every row or for none (rows past N, a = 0
                    shift_mask = k_mask & in_image  # too, are not stored)
                shift = tl.load(in_shift_ptr + ch, mask=shift_mask, other=0.0)[None, :]
                if not FLAT_K and not GEMM_VIEW and not ONE_POSITION:  # a row factor per output position
                    in_bounds = row_mask[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # (BLOCK_M, 1)
                    row_factor = tl.load(row_ones_ptr + tl.arange(0, BLOCK_M)[:, None], mask=in_bounds, other=0.0)
                    shift = shift * row_factor
                v = a.to(tl.float32) * tl.load(in_scale_ptr + ch, mask=k_mask, other=0.0)[None, :] + shift
                if IN_RELU:  # like clamp_min(0), NaN propagating: one max.NaN where a compare and select took two
                    v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
                if FLAT_K:
                    v = tl.where(a_mask, v, 0.0)  # padding stays 0
                a = v.to(x_ptr.dtype.element_ty)
            if USE_TMA:
                b = w_desc.load([rs, c0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:
                b = tl.load(w_cols + kk.to(tl.int64)[:, None] * Kg, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if _UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if CHANNEL_ROWS:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=_DOT_PRECISION)
            else:
                acc = tl.dot(a, b, acc, input_precision=_DOT_PRECISION)
            # TMA configs: the next channel block, else the next tap, without dividing step by the runtime
            # c_blocks, which took 34 of the bare step's 127 sm_90 instructions (layer1 3x3). The pointer configs
            # divide: counting saved them 23-30 of 377-855 but pushed X_IN_L1 ones to spill (triton 3.8)
            if USE_TMA:
                c0 += BLOCK_K
                next_tap = c0 >= Cg
                rs += next_tap.to(tl.int32)
                c0 = tl.where(next_tap, 0, c0)

        if CHANNEL_ROWS:
            acc = tl.trans(acc)  # (positions, channels) again, on the transposed layout
        # an epilogue that loads a tile (the residual, or PROLOGUE_GRAD's unit input) runs on column sub-tiles
        # of _EPILOGUE_COLUMNS: whole (BLOCK_M, BLOCK_N) tiles of offsets, masks and loaded values spilled
        # registers in every 128-row config from BLOCK_N = 64 up (ptxas -v, sm_90)
        EPILOGUE_PARTS: tl.constexpr = BLOCK_N // _EPILOGUE_COLUMNS if HAS_RESIDUAL or PROLOGUE_GRAD else 1
        _epilogue(acc, g * Kg + cols, col_mask, row_mask,
                  n * stride_on + p.to(tl.int64) * stride_op + q.to(tl.int64) * stride_oq,
                  n * stride_rn + p.to(tl.int64) * stride_rp + q.to(tl.int64) * stride_rq,  # unused without res_ptr
                  pid_m, out_ptr, out_scale_ptr, out_shift_ptr, res_ptr, x_mean_ptr, ws_ptr, K, WS_ROWS, stride_ok,
                  stride_rk, HAS_OUT_SCALE, HAS_OUT_SHIFT, HAS_RESIDUAL, OUT_RELU, COMPUTE_STATS, PROLOGUE_GRAD,
                  EPILOGUE_PARTS)


@triton.jit
def _epilogue(acc, k_out, col_mask, row_mask, out_rows, res_rows, pid_m, out_ptr, out_scale_ptr, out_shift_ptr,
              res_ptr, x_mean_ptr, ws_ptr, K, WS_ROWS, stride_ok, stride_rk,
              HAS_OUT_SCALE: tl.constexpr, HAS_OUT_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              OUT_RELU: tl.constexpr, COMPUTE_STATS: tl.constexpr, PROLOGUE_GRAD: tl.constexpr, PARTS: tl.constexpr):
    """_conv_kernel's epilogue on its accumulator tile acc (rows: output positions at offsets out_rows into
    out, res_rows into res_ptr; columns: output channels k_out): in PARTS column sub-tiles, one after the
    other (halves, each split again)."""
    if PARTS > 1:
        rows: tl.constexpr = acc.shape[0]
        half: tl.constexpr = acc.shape[1] // 2
        acc_halves = tl.split(acc.reshape(rows, 2, half).permute(0, 2, 1))
        k_halves = tl.split(k_out.reshape(2, half).permute(1, 0))
        mask_halves = tl.split(col_mask.reshape(2, half).permute(1, 0))
        for i in tl.static_range(2):
            _epilogue(acc_halves[i], k_halves[i], mask_halves[i], row_mask, out_rows, res_rows, pid_m, out_ptr,
                      out_scale_ptr, out_shift_ptr, res_ptr, x_mean_ptr, ws_ptr, K, WS_ROWS, stride_ok,
                      stride_rk, HAS_OUT_SCALE, HAS_OUT_SHIFT, HAS_RESIDUAL, OUT_RELU, COMPUTE_STATS,
                      PROLOGUE_GRAD, PARTS // 2)
        return
    mask = row_mask[:, None] & col_mask[None, :]
    out_offs = out_rows[:, None] + k_out.to(tl.int64)[None, :] * stride_ok
    res_offs = res_rows[:, None] + k_out.to(tl.int64)[None, :] * stride_rk
    if COMPUTE_STATS:  # store y (or dz) and this tile's per-channel statistics of it
        if PROLOGUE_GRAD:  # acc = d act: dz = acc * act'(z), z = x*out_scale + out_shift recomputed from the input x
            # loaded before dz's store, so no load of the epilogue queues behind the tile's stores (the lead on
            # the statistics' cost in benchmarks/RESULTS.md)
            x_mean = tl.load(x_mean_ptr + k_out, mask=col_mask, other=0.0)[None, :]
            x_in = tl.load(res_ptr + res_offs, mask=mask, other=0.0).to(tl.float32)
            if OUT_RELU:
                z = (x_in * tl.load(out_scale_ptr + k_out, mask=col_mask, other=0.0)[None, :]
                     + tl.load(out_shift_ptr + k_out, mask=col_mask, other=0.0)[None, :])
                acc = tl.where(z > 0, acc, 0.0)  # as torch's threshold_backward: NaN z passes no gradient
        elif HAS_OUT_SHIFT:  # a conv bias
            acc = acc + tl.load(out_shift_ptr + k_out, mask=col_mask, other=0.0)[None, :]
        y = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_offs, y, mask=mask)
        # rows pid_m of the planes; int args equal to 1 arrive as constants, so no .to() on WS_ROWS or K
        row = pid_m.to(tl.int64)
        if PROLOGUE_GRAD:  # sum dz and sum dz * (x - mean): BatchNorm's backward reduction
            d = tl.where(mask, y.to(tl.float32), 0.0)
            tl.store(ws_ptr + row * K + k_out, tl.sum(d, axis=0), mask=col_mask)
            tl.store(ws_ptr + (row + WS_ROWS) * K + k_out, tl.sum(d * (x_in - x_mean), axis=0), mask=col_mask)
        else:  # the batch statistics of y as stored: (count, mean, M2) over the tile's rows, M2 about the tile's
            # own mean, for Chan's merge (nothing cancels however large |mean| / std)
            count = tl.sum(row_mask.to(tl.float32), axis=0)
            tile_mean = tl.sum(tl.where(mask, y.to(tl.float32), 0.0), axis=0) / tl.maximum(count, 1.0)
            deviation = tl.where(mask, y.to(tl.float32) - tile_mean[None, :], 0.0)
            tl.store(ws_ptr + row * K + k_out, tl.zeros_like(tile_mean) + count, mask=col_mask)
            tl.store(ws_ptr + (row + WS_ROWS) * K + k_out, tile_mean, mask=col_mask)
            tl.store(ws_ptr + (row + 2 * WS_ROWS) * K + k_out, tl.sum(deviation * deviation, axis=0), mask=col_mask)
    else:
        z = acc
        if HAS_OUT_SCALE:
            z = z * tl.load(out_scale_ptr + k_out, mask=col_mask, other=0.0)[None, :]
        if HAS_OUT_SHIFT:
            z = z + tl.load(out_shift_ptr + k_out, mask=col_mask, other=0.0)[None, :]
        if HAS_RESIDUAL:
            z = z + tl.load(res_ptr + res_offs, mask=mask, other=0.0).to(tl.float32)
        if OUT_RELU:
            z = tl.where(z < 0, 0.0, z)
        tl.store(out_ptr + out_offs, z.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side


def unsupported_reason(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> Optional[str]:
    """None when conv2d_fused can run this conv, else a short sentence saying why not (the caller then uses
    torch's conv / cuDNN)."""
    try:
        geo = _geometry(x, weight, stride, padding, dilation, groups)
    except (TypeError, ValueError) as e:
        return str(e)
    return _limit(geo, x, groups, _merge_factor(geo, groups))


def _row_ones(device: torch.device) -> Tensor:
    """The kernel's row_ones: _MAX_BLOCK_M fp32 ones on device, made once per device. One made while a CUDA
    graph is being captured is filled only when the graph replays, so it serves that call alone."""
    ones = _ROW_ONES.get(device)
    if ones is None:
        ones = torch.ones(_MAX_BLOCK_M, device=device, dtype=torch.float32)
        if not capturing(device):
            _ROW_ONES[device] = ones
    return ones


def _descriptor_scratch(size: int, alignment: int, stream) -> Tensor:
    """triton's allocator for the global memory a launch writes its tensor descriptors to (the TMA
    configs make theirs on the device): bytes on the current CUDA device, torch's blocks 512-byte aligned."""
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def _with_descriptor_scratch(launch):
    """launch(), with _descriptor_scratch as triton's allocator for it alone (a context variable set in
    a copy of the caller's context: the caller's own allocator, if any, stays)."""
    def run():
        triton.set_allocator(_descriptor_scratch)
        return launch()
    return contextvars.copy_context().run(run)


def _start(plan: _Plan, x: Tensor, packed_weight: Tensor, out: Tensor, in_scale=None, in_shift=None,
           out_scale=None, out_shift=None, res=None, x_mean=None, ws=None) -> None:
    """Launch _conv_kernel by ``plan`` (``_planned``) on these tensors (res: the residual, or None; ws: the
    statistics' workspace where the plan's flags compute them); absent ones are passed as out. A launch of a plan
    launched before relaunches that one's kernel and config (``autotuning.keyed_launch``, the plan its key)."""
    tensors = (x, packed_weight, out, out if in_scale is None else in_scale, out if in_shift is None else in_shift,
               _row_ones(x.device) if plan.row_ones else out, out if out_scale is None else out_scale,
               out if out_shift is None else out_shift, out if res is None else res,
               out if x_mean is None else x_mean, out if ws is None else ws)

    def launch():
        return keyed_launch(_conv_kernel, plan.grid, plan, tensors, plan.constants)

    if plan.tma_ok:  # only the TMA configs make descriptors
        _with_descriptor_scratch(launch)
    else:
        launch()


def _launch(x: Tensor, packed_weight: Tensor, geo: dict, groups: int, out: Tensor, *,
            in_scale=None, in_shift=None, in_relu=False, out_scale=None, out_shift=None, residual=None,
            out_relu=False, compute_stats=False, prologue_grad=False, x_mean=None, stats_out=(), flat=False):
    """Run _conv_kernel on validated arguments into out ((N, K, P, Q) in x's dtype, any strides). With
    compute_stats, also ``partials.finish`` into stats_out, two (K,) fp32 tensors: the mean and variance of y,
    or with prologue_grad the per-channel sums of dz and dz * (x - x_mean) over all M rows (see the kernel).
    The reduction is flat over (r, s, c) where Cg < _FLAT_K_BELOW, or ``flat``."""
    flags = _flags(in_scale, in_relu, out_scale, out_shift, residual, out_relu, compute_stats, prologue_grad, flat,
                   geo)
    plan = _planned(x, out, out if residual is None else residual, geo, groups, flags)
    ws = (torch.empty((2 if prologue_grad else 3, plan.ws_rows, geo["K"]), device=x.device, dtype=torch.float32)
          if compute_stats else None)
    if in_scale is None:  # read only by the prologue: passed as out, as the launch's kernel was specialised on
        in_shift = None
    _start(plan, x, packed_weight, out, in_scale, in_shift, out_scale, out_shift, residual,
           x_mean if prologue_grad else None, ws)
    if compute_stats:  # the rows the launch wrote: one per row tile of the config the autotuner ran
        best = _conv_kernel.best_config.kwargs
        partials.finish(ws, _row_tiles(plan.geo, plan.box, best["BLOCK_M"], best["USE_TMA"]), stats_out,
                        partials.SUMS if prologue_grad else partials.CHAN_MOMENTS, count=geo["M"])


def _check_residual(fn: str, residual: Optional[Tensor], geo: dict, x: Tensor) -> None:
    if residual is None:
        return
    if residual.dtype not in _DTYPES:
        raise TypeError(f"{fn}: residual has dtype {residual.dtype}; supported are float16, bfloat16 "
                        "and float32")
    shape = (geo["N"], geo["K"], geo["P"], geo["Q"])
    if tuple(residual.shape) != shape or residual.device != x.device:
        raise ValueError(f"{fn}: residual must have the output's shape {shape} on {x.device}, "
                         f"got {tuple(residual.shape)} on {residual.device}")


def conv2d_fused(
    x: Tensor, weight: Tensor, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
    in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = True,
    out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
    out_relu: bool = False, compute_stats: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """out = act_out(conv2d(act_in(x*in_scale+in_shift)) * out_scale + out_shift + residual); returns
    (out, mean, var).

    x: (N, C, H, W) fp16/bf16/fp32, any strides; weight: (K, C/groups, R, S) in x's dtype. in_scale and
    in_shift: (C,) fp32, given together or not at all (then x' = x and in_relu is ignored); act_in is
    ReLU if in_relu. out_scale (default 1), out_shift (default 0; a conv bias goes here): (K,) fp32;
    residual: (N, K, P, Q) of any supported float dtype; act_out is ReLU if out_relu. out has x's dtype
    and memory format. With compute_stats, out is the conv output y (+ out_shift, a conv bias; no
    other epilogue argument allowed) and mean / var are the fp32 (K,) mean and biased variance over
    (N, P, Q) of y as stored in x's dtype (see the module docstring); else both are None. Raises TypeError /
    ValueError for invalid arguments and RuntimeError with ``unsupported_reason``'s sentence for valid convs this
    kernel does not run.
    """
    fn = "conv2d_fused"
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    merge = _runnable_merge(fn, geo, x, groups)
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{fn}: in_scale and in_shift must be given together")
    if compute_stats and (out_scale is not None or residual is not None or out_relu):
        raise ValueError(f"{fn}: compute_stats returns the conv output (+ out_shift, a conv bias); "
                         "out_scale, residual and out_relu must be absent")
    n, k, p, q = geo["N"], geo["K"], geo["P"], geo["Q"]
    if in_scale is not None:
        in_scale, in_shift = (_vector(fn, "in_scale", in_scale, geo["C"], x),
                              _vector(fn, "in_shift", in_shift, geo["C"], x))
    if out_scale is not None:
        out_scale = _vector(fn, "out_scale", out_scale, k, x)
    if out_shift is not None:
        out_shift = _vector(fn, "out_shift", out_shift, k, x)
    _check_residual(fn, residual, geo, x)
    out = torch.empty((n, k, p, q), device=x.device, dtype=x.dtype, memory_format=_memory_format(x))
    mean = var = None
    if compute_stats:  # separate tensors: the op returning them may not alias its outputs
        mean, var = (torch.empty(k, device=x.device, dtype=torch.float32) for _ in range(2))
    space_to_depth = _space_to_depth_channels(geo, groups)
    if space_to_depth:  # the stem: a stride-1 conv reading runs of SH*SW*C' channels (see conv_args), the
        # prologue applied to the copy
        packed = _packed_weight(weight, groups, space_to_depth=(geo["SH"], geo["SW"], space_to_depth))
        x, geo = _space_to_depth(x, geo, space_to_depth, in_scale, in_shift, in_relu)
        in_scale = in_shift = None
    else:
        packed = _packed_weight(weight, groups, merge=merge)
    _launch(x, packed, _merged(geo, merge), groups // merge, out,
            in_scale=in_scale, in_shift=in_shift, in_relu=in_relu, out_scale=out_scale, out_shift=out_shift,
            residual=residual, out_relu=out_relu, compute_stats=compute_stats,
            stats_out=(mean, var), flat=bool(space_to_depth))
    return out, mean, var


def conv2d_fused_launcher(x: Tensor, weight: Tensor, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          groups: int = 1, out_shift: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                          out_relu: bool = False) -> Optional[Callable[[Tensor, Optional[Tensor]], Tensor]]:
    """``launch(x2, residual2)``, computing ``conv2d_fused(x2, weight, stride=stride, padding=padding,
    dilation=dilation, groups=groups, out_shift=out_shift, residual=residual2, out_relu=out_relu)[0]`` for any x2
    and residual2 (None where residual is) of the types, shapes, strides, dtypes and devices of x and residual:
    the inference epilogue's call, checked and planned here once, so that a launch only allocates the output and
    relaunches the kernel its plan ran last (``_planned``, ``_start``); an x2 aligned otherwise
    than x (16 bytes) takes conv2d_fused's whole path. For a caller that keeps weight and out_shift unchanged (an
    inference fold): the weight is packed here, and its packing held. None where conv2d_fused runs the conv
    otherwise (space-to-depth), or where it would pack the weight at every call (``_packed_weight``: a weight
    that needs grad, an inference tensor). Raises as conv2d_fused does for invalid arguments."""
    fn = "conv2d_fused"
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    merge = _runnable_merge(fn, geo, x, groups)
    if _space_to_depth_channels(geo, groups) or not _packing_kept(weight):
        return None
    if out_shift is not None:
        out_shift = _vector(fn, "out_shift", out_shift, geo["K"], x)
    _check_residual(fn, residual, geo, x)
    packed = _packed_weight(weight, groups, merge=merge)
    shape, device, dtype = (geo["N"], geo["K"], geo["P"], geo["Q"]), x.device, x.dtype
    memory_format = _memory_format(x)
    out = torch.empty(shape, device=device, dtype=dtype, memory_format=memory_format)
    flags = _flags(None, False, None, out_shift, residual, out_relu, False, False, False, geo)
    plan = _planned(x, out, out if residual is None else residual, _merged(geo, merge), groups // merge, flags)
    aligned = x.data_ptr() % 16 == 0

    def launch(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if (x.data_ptr() % 16 == 0) != aligned:
            return conv2d_fused(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                out_shift=out_shift, residual=residual, out_relu=out_relu)[0]
        out = torch.empty(shape, device=device, dtype=dtype, memory_format=memory_format)
        _start(plan, x, packed, out, out_shift=out_shift, res=residual)
        return out

    return launch
