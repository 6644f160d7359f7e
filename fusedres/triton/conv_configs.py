"""The autotuning space of the forward conv kernel (``conv._conv_kernel``): the configs it times, which
launches each may run (``_usable``), and the row box a TMA config launches with (``_box``, ``_config_box``).
``_configs`` also builds conv_wgrad's space.

A config is a tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) and the kernel's config flags, each
explained in conv.py's docstring: USE_TMA (tiles loaded by Hopper's tensor memory accelerator), PERSISTENT
(programs per SM that take the output tiles in turn), X_IN_L1 (x's tiles copied through L1 too), CHANNEL_ROWS
(the tile computed as its transpose, for the statistics' column sums); and triton's maxnreg, a register cap.
The autotuner (``autotuning.autotune``) times, per key (``_AUTOTUNE_KEY``), the configs that fit the conv's
GEMM and that ``_usable`` lets run it.
"""

from typing import Optional

import triton

from ._host import cdiv
from .conv_args import _INTERPRET


def _configs(gpu_tiles: list[tuple[int, int, int, int, int]], maxnreg: Optional[int] = None,
             **flags) -> list[triton.Config]:
    """The autotuning space of a conv kernel: ``gpu_tiles`` as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages), or under TRITON_INTERPRET=1 one small config (nothing to tune); ``flags``: constexpr
    arguments every one of these configs sets; ``maxnreg``: the registers a thread may use (ptxas's cap)."""
    if _INTERPRET:
        gpu_tiles = [(32, 16, 16, 4, 1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **flags}, num_warps=w, num_stages=st,
                          maxnreg=maxnreg)
            for bm, bn, bk, w, st in gpu_tiles]


# Two CTAs of 8 warps share an SM's 64K registers only at <= 128 registers a thread. The 128x128 tiles' variants
# with the BN + ReLU prologue or the statistics epilogue take 138-181 (ptxas, sm_90, triton 3.6: the training
# forward and the input gradient on ResNet-50's convs), so those launches also time a copy of each capped at 128:
# most compile without a spill (the prologue + statistics on the 3x3 convs spill 48-108 bytes). On layer1's
# 64->256 1x1, one CTA an SM took the prologue + statistics variant from 0.227 ms to 0.634 (ncu, H200).
_REGISTER_CAP = 128
_PERSISTENT_PROLOGUE_CHANNELS = 128  # the widest reduction (two 64-channel steps) a persistent prologue runs


def _conv_configs(gpu_tiles: list[tuple[int, int, int, int, int]], *, use_tma: bool, persistent: int = 0,
                  x_in_l1: bool = False, channel_rows: bool = False, maxnreg: Optional[int] = None) -> list:
    """``_configs`` with the conv kernel's config flags (see _conv_kernel's arguments and _usable)."""
    return _configs(gpu_tiles, maxnreg=maxnreg, USE_TMA=use_tma, PERSISTENT=persistent, X_IN_L1=x_in_l1,
                    CHANNEL_ROWS=channel_rows)


_CONFIGS = (_conv_configs([(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                           (256, 128, 64, 8, 3), (64, 64, 32, 4, 4)], use_tma=False)
            + ([] if _INTERPRET else  # x cached in L1: convs of several taps (see _usable)
               _conv_configs([(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (256, 64, 64, 8, 3)], use_tma=False,
                             x_in_l1=True))
            + _conv_configs([(128, 64, 64, 4, 4), (256, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)],
                            use_tma=True)
            + ([] if _INTERPRET else
               # persistent: x's tile from shared memory, or a short prologue (see _usable)
               _conv_configs([(128, 64, 64, 4, 4)], use_tma=True, persistent=2)
               + _conv_configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)], use_tma=True, persistent=1)
               # the 128x128 tiles capped for two CTAs an SM (_REGISTER_CAP, see _usable)
               + _conv_configs([(128, 128, 64, 8, 3)], use_tma=False, maxnreg=_REGISTER_CAP)
               + _conv_configs([(128, 128, 64, 8, 3)], use_tma=True, maxnreg=_REGISTER_CAP)
               # channels as the tile's rows: GEMM views' statistics (see conv.py's docstring)
               + _conv_configs([(256, 128, 64, 8, 3)], use_tma=False, channel_rows=True)
               + _conv_configs([(128, 128, 64, 8, 3)], use_tma=False, channel_rows=True, maxnreg=_REGISTER_CAP)
               + _conv_configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)], use_tma=True, channel_rows=True)))
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in _CONFIGS)  # sizes the prologue's row_ones
# output positions in a box: BOX_H * BOX_W <= every TMA config's BLOCK_M, so a box tile holds whole boxes
_MAX_BOX = min(c.kwargs["BLOCK_M"] for c in _CONFIGS if c.kwargs["USE_TMA"])
_ONE_POSITION_BOX_WASTE = 1 / 8  # the share of its rows past N a tile of images at one position may have (_box)
_ROW_TILINGS = sorted({(c.kwargs["BLOCK_M"], c.kwargs["USE_TMA"]) for c in _CONFIGS})  # the configs' row tiles
_TMA_MAX_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in _CONFIGS if c.kwargs["USE_TMA"])
# P and Q too: a conv's other fields decide them, but the input gradient's phase convs (conv_dgrad) set their own,
# and a TMA config's box (its constants, kept with the key's config) follows them (_config_box)
_AUTOTUNE_KEY = ["N", "C", "H", "W", "K", "P", "Q", "Cg", "R", "S", "SH", "SW", "PH", "PW", "DH", "DW", "stride_xc",
                 "PROLOGUE", "IN_RELU", "HAS_OUT_SCALE", "HAS_OUT_SHIFT", "HAS_RESIDUAL", "OUT_RELU",
                 "COMPUTE_STATS", "PROLOGUE_GRAD", "FLAT_K", "TMA_OK", "GEMM_VIEW"]


def _reduction_size(args: dict) -> int:
    """The GEMM reduction a BLOCK_K step covers: the flat (r, s, c) columns, or one (r, s)'s channels."""
    return args["R"] * args["S"] * args["Cg"] if args["FLAT_K"] else args["Cg"]


def _usable(config: dict, args: dict) -> bool:
    """Whether a config (its keyword arguments as launched: constexprs, num_warps, maxnreg, ...) may run a launch
    with ``args``: TMA configs only where the launch allows them (TMA_OK); under
    TRITON_INTERPRET=1, where one config runs untimed, the TMA one wherever it is allowed. Persistent configs
    only where the dot reads x's tile from shared memory: launches without a prologue whose row tiles are a
    GEMM view's pixels or images at one output position (``_box`` (1, 1)); elsewhere the dot takes the tile
    from registers, and in the flattened loop ptxas then serialises every wgmma (C7515, sm_90; a box of several
    positions and the prologue's transform both put the tile in registers). A GEMM view with the prologue may
    run them too where its reduction takes one or two steps (Cg <= _PERSISTENT_PROLOGUE_CHANNELS): there the
    serialised wgmma of a tile cost next to nothing, and the next tile's loads still overlap this one's
    epilogue (layer1's 64->256 1x1 bare: 0.294 ms a program a tile, 0.149 persistent; H200). X_IN_L1 configs
    only where taps overlap (R*S > 1: the next steps read most of this step's x again) and their hint holds: runs
    of 4 channels contiguous, which a flat (r, s, c) reduction has only with Cg a multiple of 4 (a false hint
    would load wrong elements). Every TMA config may run a prologue on a one-position launch, whose x tile comes
    from a 2-D descriptor of x's images (X_ROWS_2D) as a GEMM view's does: from the 5-D box, the 128x128 and
    128x256 TMA configs (8 warps) computed outputs 15-23x the tests' error bound there on an H200 (triton 3.6;
    ResNet-50's 3x3 launches at batch 256, and the strided 1x1 with 128x256), where the same tiles over a GEMM
    view were right (scripts/conv_config_sweep.py; benchmarks/RESULTS.md). Configs capped at _REGISTER_CAP
    registers only on launches with the prologue or the statistics, the variants that take their tiles past the
    cap (elsewhere the capped copy compiles to the same kernel). CHANNEL_ROWS configs only on GEMM views with the
    forward's statistics, whose column sums they make cheap (see conv.py's docstring); not the input gradient's,
    whose epilogue loads tiles on column sub-tiles."""
    if config.get("maxnreg") and not (args["PROLOGUE"] or args["COMPUTE_STATS"]):
        return False
    if config["CHANNEL_ROWS"] and not (args["GEMM_VIEW"] and args["COMPUTE_STATS"] and not args["PROLOGUE_GRAD"]):
        return False
    if config["PERSISTENT"] and not (
            args["GEMM_VIEW"] and (not args["PROLOGUE"] or args["Cg"] <= _PERSISTENT_PROLOGUE_CHANNELS)
            or not args["PROLOGUE"] and _box(args) == (1, 1)):
        return False
    if config["X_IN_L1"] and (args["R"] * args["S"] == 1 or args["FLAT_K"] and args["Cg"] % 4):
        return False
    return config["USE_TMA"] == args["TMA_OK"] if _INTERPRET else args["TMA_OK"] or not config["USE_TMA"]


def _box(geo: dict) -> tuple[int, int]:
    """(BOX_H, BOX_W) of a TMA row tile. (1, 1), a tile of BLOCK_M images at one output position, where the
    batch fills tiles of _MAX_BOX images but for at most _ONE_POSITION_BOX_WASTE of their rows (ResNet's batch of
    256): the dot then reads x's tile from shared memory (see conv.py's docstring). Else the largest powers of two
    dividing P and Q, the box at most _MAX_BOX positions, so that boxes tile the output without a partial one
    where they can."""
    if cdiv(geo["N"], _MAX_BOX) * _MAX_BOX <= geo["N"] * (1 + _ONE_POSITION_BOX_WASTE):
        return 1, 1
    box_w = min(geo["Q"] & -geo["Q"], _MAX_BOX)
    return min(geo["P"] & -geo["P"], _MAX_BOX // box_w), box_w


def _config_box(use_tma: bool, args: dict) -> dict:
    """The constexprs BOX_H, BOX_W a config launches with (``autotune``'s ``constants``): a TMA config's box of
    the launch (``_box``), (1, 1) for the pointer configs, which tile rows without boxes. Given per config, not
    by the launch, so that the pointer configs compile once for launches whose boxes differ."""
    box_h, box_w = _box(args) if use_tma else (1, 1)
    return dict(BOX_H=box_h, BOX_W=box_w)
