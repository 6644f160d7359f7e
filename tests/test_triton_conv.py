"""fusedres.triton.conv against F.conv2d evaluated in fp64.

Without CUDA the kernel runs under the Triton interpreter on CPU tensors, so TRITON_INTERPRET must be
set before triton is imported; with CUDA the same tests run on the GPU. An output passes when its
largest error against the fp64 reference is at most twice that of eager torch computing the same
thing in the same dtype, plus ATOL[dtype] times the reference's largest magnitude.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from conftest import requires_cuda
from triton_conv_helpers import (ATOL, BF16, DEVICE, F16, F32, F64, LAYER1_3X3, LAYER1_3X3_CHANNELS_LAST_STRIDES,
                                 LAYER1_1X1_AS_GEMM, LAYER1_1X1_AS_GEMM_STRIDES, LAYER2_3X3_S2,
                                 LAYER2_3X3_S2_CHANNELS_LAST_STRIDES, RECORD_COMPILES,
                                 STAND_IN_LAUNCH, assert_pipelined, compile_for_sm90, compile_launch_like_for_sm90,
                                 run_behind_stand_in,
                                 conv_input, geometry_id, named_strides, out_hw, pair, rand_act, rand_vec, seeded,
                                 tf32_allowance)
from fusedres.ops.backends import conv_allows_tf32, conv_flags
from fusedres.triton import autotuning, conv, conv_args, conv_configs, conv_dgrad, conv_plan, partials, relaunch


@dataclass(frozen=True)
class Case:
    c: int
    k: int
    hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dtype: torch.dtype
    channels_last: bool
    prologue: str  # "none", "relu" or "linear" (in_relu=False)
    epilogue: str  # "none", "affine" (scale, shift), "full" (+ residual, relu), "stats" or "stats_bias" (+ shift)
    dilation: tuple = (1, 1)
    groups: int = 1
    n: int = 2

    def __str__(self):
        return (f"{geometry_id(self)}-{str(self.dtype)[6:]}-{'cl' if self.channels_last else 'nchw'}"
                f"-in_{self.prologue}-out_{self.epilogue}")


def _case(c, k, hw, kernel, stride, padding, dtype, channels_last, prologue, epilogue, dilation=1, groups=1, n=2):
    return Case(c, k, pair(hw), pair(kernel), pair(stride), pair(padding), dtype, channels_last, prologue,
                epilogue, pair(dilation), groups, n)


# C, K in {3, 8, 20, 32, 40, 48}: channel tails of the 16-wide interpreter blocks, and the flat (r, s, c)
# reduction for C / groups < 16. Every dtype meets both layouts, every prologue kind and the stats path.
CASES = [
    _case(8, 20, 7, 1, 1, 0, F32, False, "relu", "none"),
    _case(20, 8, 9, 1, 2, 0, BF16, True, "none", "full"),
    _case(20, 20, 7, 3, 1, 1, F16, True, "relu", "stats"),
    _case(8, 20, 9, 3, 2, 1, BF16, False, "linear", "affine"),
    _case(3, 8, 9, 7, 2, 3, F32, True, "none", "full"),
    _case(3, 20, 9, 7, 2, 3, BF16, True, "none", "stats"),
    _case(20, 8, 9, 3, 1, 2, F32, False, "relu", "stats", dilation=2),
    _case(20, 20, (5, 7), (3, 5), (2, 1), (1, 2), F32, True, "linear", "affine"),
    _case(8, 20, (7, 6), (5, 3), (1, 2), (2, 0), F16, False, "relu", "full", dilation=(1, 2)),
    _case(20, 20, 7, 3, 1, 1, F32, False, "relu", "full"),
    _case(8, 8, 5, 3, 1, 1, F16, False, "none", "full"),
    _case(20, 8, 5, 1, 1, 0, F16, True, "linear", "none"),
    _case(20, 20, 5, 3, 2, 1, BF16, False, "relu", "none"),
    _case(8, 40, 13, 1, 1, 0, F32, True, "none", "stats"),  # 11 row tiles: more than one GROUP_M band
    _case(32, 32, 5, 3, 1, 1, BF16, True, "relu", "full", groups=2),
    _case(32, 48, 5, 1, 2, 0, F16, False, "linear", "stats", groups=2),
    _case(20, 8, 9, 3, 2, 1, BF16, True, "relu", "stats_bias"),
    # the TMA configs' launches (channels_last, stride 1, C >= 16 and strides of 16 bytes): boxes of images x
    # BOX_H x BOX_W output positions, the largest powers of two dividing P and Q (at most the smallest BLOCK_M)
    _case(40, 24, (6, 5), 3, 1, 1, BF16, True, "relu", "stats", n=3),  # 2x1 boxes, 16 images a tile: 13 past N
    _case(32, 16, 7, 3, 1, 1, F16, True, "none", "full"),  # 1x1 boxes: one output position of 32 images a tile
    # 1x1 stride-1 convs on channels_last tensors: GEMMs over the pixels (conv_plan._gemm_view), x one (M, C) matrix
    _case(32, 16, 7, 1, 1, 0, F16, True, "none", "full"),  # 98 rows: a partial row tile
    _case(16, 24, 5, 1, 1, 0, BF16, True, "relu", "stats", n=3),
    _case(32, 48, 6, 1, 1, 0, F16, True, "linear", "full", groups=2),  # grouped: the pointer configs
    _case(40, 24, 1, 1, 1, 0, F32, False, "relu", "stats", n=5),  # NCHW x of 1x1 images: already (M, C)
    _case(16, 48, 8, 3, 1, 1, F32, True, "linear", "affine", dilation=2),  # P = Q = 6: 2x2 boxes
    _case(24, 32, (8, 12), 3, 1, 1, BF16, True, "relu", "stats"),  # 8x4 boxes: one image a tile
    # strided TMA launches (H, W divisible by the stride; C a whole number of channel blocks): x seen as
    # (H/SH, SH, W/SW, N, SW*C), each tap's box in one residue of the stride
    _case(32, 24, 8, 3, 2, 1, BF16, True, "relu", "stats"),  # ResNet's 3x3/2: taps in both residues
    _case(48, 32, (12, 8), 1, 2, 0, F16, True, "none", "full"),  # the 1x1/2 downsample
    _case(16, 16, (9, 8), (3, 5), (3, 2), (1, 2), F32, True, "linear", "affine", dilation=(2, 1)),  # mixed, SH 3
    _case(32, 16, (6, 10), 3, (1, 2), 1, BF16, True, "relu", "stats_bias", n=3),  # column stride only
    # narrow groups run several as one with a block-diagonal weight (conv_args._merge_factor)
    _case(64, 64, 6, 3, 1, 1, BF16, True, "relu", "stats", groups=16),  # ResNeXt's 4 channels: all 16 as one
    _case(64, 64, 6, 3, 2, 1, F16, False, "linear", "full", groups=16),  # the same, strided, NCHW
    _case(128, 128, 5, 3, 1, 1, F32, True, "relu", "full", groups=8),  # 16 channels: 4 as one, 2 merged groups
    _case(20, 28, 6, 3, 1, 1, F32, True, "none", "stats", groups=4),  # 5 in / 7 out: 20 / 28, tails
    _case(128, 128, 4, 1, 1, 0, BF16, True, "none", "full", groups=2),  # 64 channels: none merged, 2 groups
    # strided ungrouped convs of few channels run space-to-depth (conv_args._space_to_depth), as the 7x7/2 stem
    # above does, with a prologue applied to the copy (the C = 8 strided cases above)
    _case(3, 16, (11, 9), 7, 2, 3, BF16, False, "none", "stats_bias"),  # NCHW x; odd P, Q
    _case(5, 8, (9, 8), 3, (2, 1), (0, 1), F32, True, "none", "affine"),  # row stride only: C' = 8
    _case(3, 8, 13, 2, 3, 0, F16, True, "none", "full"),  # the blocks' image ends before x's last row
    _case(8, 20, 9, 1, 2, 0, BF16, True, "none", "stats"),  # a 1x1/2 of 8 channels
]


def _make(case):
    """Random non-zero x, weight and the fused arguments, seeded by the case id."""
    gen = seeded(case)
    x = rand_act(gen, (case.n, case.c, *case.hw), case.dtype, case.channels_last)
    w = rand_act(gen, (case.k, case.c // case.groups, *case.kernel), case.dtype) / (case.c // case.groups) ** 0.5
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    if case.prologue != "none":
        kw.update(in_scale=rand_vec(gen, case.c, positive=True), in_shift=rand_vec(gen, case.c) * 0.5,
                  in_relu=case.prologue == "relu")
    if case.epilogue in ("affine", "full"):
        kw.update(out_scale=rand_vec(gen, case.k, positive=True), out_shift=rand_vec(gen, case.k))
    if case.epilogue == "full":
        kw.update(residual=rand_act(gen, (case.n, case.k, *out_hw(case)), case.dtype, case.channels_last),
                  out_relu=True)
    if case.epilogue.startswith("stats"):
        kw.update(compute_stats=True)
    if case.epilogue == "stats_bias":
        kw.update(out_shift=rand_vec(gen, case.k))
    return x, w, kw


def _conv(xp, w, kw):
    return F.conv2d(xp, w, None, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                    kw.get("groups", 1))


def _unfused(x, w, kw, dtype):
    """The fused op computed by torch: fp64 throughout (dtype=F64), or eager in x's dtype (fp32 epilogue)."""
    y = _conv(conv_input(x, kw).to(dtype), w.to(dtype), kw)
    cdt = F64 if dtype == F64 else F32
    z = y.to(cdt)
    if kw.get("out_scale") is not None:
        z = z * kw["out_scale"].to(cdt)[:, None, None]
    if kw.get("out_shift") is not None:
        z = z + kw["out_shift"].to(cdt)[:, None, None]
    if kw.get("residual") is not None:
        z = z + kw["residual"].to(cdt)
    if kw.get("out_relu"):
        z = z.relu()
    return z.to(dtype)


def _magnitude(x, w, kw):
    """fp64 sum of |products| behind each conv output (times |out_scale|): the scale of TF32's error."""
    magnitude = _conv(conv_input(x, kw).double().abs(), w.double().abs(), kw)
    if kw.get("out_scale") is not None:
        magnitude = magnitude * kw["out_scale"].double().abs()[:, None, None]
    return magnitude


def _error_bound(x, w, kw, ref) -> tuple[float, float]:
    """(bound, eager's error): the most an output's max error against the fp64 reference ``ref`` may be, twice
    eager's own error plus ATOL of the largest output plus TF32's allowance, and eager's error itself."""
    eager_err = (_unfused(x, w, kw, x.dtype).double() - ref).abs().max().item()
    bound = (2 * eager_err + ATOL[x.dtype] * max(1.0, ref.abs().max().item())
             + tf32_allowance(x.dtype, _magnitude(x, w, kw).max().item()))
    return bound, eager_err


def _check_out(out, x, w, kw, what=""):
    """out has x's dtype and memory format and meets the error rule against the fp64 reference."""
    ref = _unfused(x, w, kw, F64)
    assert out.dtype == x.dtype and out.shape == ref.shape and out.device == x.device
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    bound, eager_err = _error_bound(x, w, kw, ref)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eager's error {eager_err:.3g})"


def _check_stats(out, mean, var):
    """fp32 per-channel mean and biased variance of out as stored."""
    y = out.double()
    want_mean, want_var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    for got in (mean, var):
        assert got.dtype == F32 and got.shape == (out.shape[1],) and got.device == out.device
    spread = y.abs().amax((0, 2, 3))
    assert ((mean.double() - want_mean).abs() <= 1e-5 * spread + 1e-6).all(), f"{mean} != {want_mean}"
    assert ((var.double() - want_var).abs() <= 1e-5 * spread.square() + 1e-6).all(), f"{var} != {want_var}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv2d_fused(case):
    x, w, kw = _make(case)
    assert conv.unsupported_reason(x, w, case.stride, case.padding, case.dilation, case.groups) is None
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    _check_out(out, x, w, kw, str(case))
    if case.epilogue.startswith("stats"):
        _check_stats(out, mean, var)
    else:
        assert mean is None and var is None


@pytest.mark.parametrize("c,kernel,stride,padding,hw", [
    (3, 7, 2, 3, (16, 15)), (1, 3, 2, 1, (7, 8)), (5, (3, 2), (2, 1), (0, 1), (9, 8)), (3, 2, 3, 0, (13, 14)),
    (3, 4, 3, 2, (10, 11)), (15, 1, 2, 0, (6, 7))])
def test_space_to_depth_is_the_same_conv(c, kernel, stride, padding, hw):
    """conv_args._space_to_depth's x' and weight, as a stride-1 unpadded F.conv2d, give the strided conv's
    output exactly (fp64), padded channels and taps included; and C' * SH * SW is a multiple of 8 channels."""
    gen = seeded(f"s2d-{c}-{kernel}-{stride}-{padding}-{hw}")
    x = torch.randn(2, c, *hw, generator=gen, dtype=F64).to(DEVICE)
    w = torch.randn(4, c, *pair(kernel), generator=gen, dtype=F64).to(DEVICE)
    geo = conv_args._geometry(x.float(), w.float(), pair(stride), pair(padding), (1, 1), 1)  # checks the dtype
    channels = conv_args._space_to_depth_channels(geo, 1)
    assert channels >= c and channels * geo["SH"] * geo["SW"] % 8 == 0
    x2, geo2 = conv_args._space_to_depth(x, geo, channels)
    w2 = conv_args._space_to_depth_weight(w, geo["SH"], geo["SW"], channels)
    assert x2.is_contiguous(memory_format=torch.channels_last) and tuple(w2.shape) == (4, geo2["C"], geo2["R"],
                                                                                       geo2["S"])
    assert tuple(x2.shape) == (2, geo2["C"], geo2["H"], geo2["W"]) and geo2["SH"] == geo2["SW"] == 1
    torch.testing.assert_close(F.conv2d(x2, w2), F.conv2d(x, w, None, stride, padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,channels_last,in_relu", [(BF16, True, True), (F16, False, True), (F32, True, False)])
def test_space_to_depth_copy_applies_the_prologue_inside_the_image(dtype, channels_last, in_relu):
    """_space_to_depth's one-pass copy with a BN (+ ReLU) prologue, element for element against torch: the
    prologue (fp32, rounded to x's dtype) applied to x, then zero padding of the image and of the channels,
    blocks of SH x SW pixels as pixels of SH*SW*C' channels; NaN passes through the ReLU."""
    gen = seeded(f"s2d-copy-{dtype}-{channels_last}-{in_relu}")
    x = rand_act(gen, (2, 3, 11, 9), dtype, channels_last)
    x[1, 2, 4, 5] = float("nan")
    w = rand_act(gen, (4, 3, 7, 7), dtype)
    scale, shift = rand_vec(gen, 3, positive=True), rand_vec(gen, 3)
    geo = conv_args._geometry(x, w, (2, 2), (3, 3), (1, 1), 1)
    channels = conv_args._space_to_depth_channels(geo, 1)
    x2, geo2 = conv_args._space_to_depth(x, geo, channels, scale, shift, in_relu)
    act = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    act = (act.relu() if in_relu else act).to(dtype)
    n, (h, w_), (h2, w2) = x.shape[0], x.shape[2:], (geo2["H"], geo2["W"])
    padded = F.pad(act.permute(0, 2, 3, 1), (0, channels - 3, 3, 2 * w2 - w_ - 3, 3, 2 * h2 - h - 3))
    want = padded.reshape(n, h2, 2, w2, 2, channels).permute(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, -1)
    assert x2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x2, want.permute(0, 3, 1, 2), equal_nan=True)
    assert x2.isnan().sum() == 1


@pytest.mark.parametrize("c,kernel,stride", [(3, 7, 2), (5, (3, 2), (2, 1)), (3, 4, 3)])
def test_space_to_depth_weight_grad_is_the_weight_maps_adjoint(c, kernel, stride):
    """<w', g'> = <w, grad(g')> for the weight's space-to-depth form w' (conv_args._space_to_depth_weight)
    and any g' of its shape: the weight gradient of the stem's space-to-depth conv, taken back by
    _space_to_depth_weight_grad, is the conv's own (the padded channels and taps drop out)."""
    gen = seeded(f"s2d-adjoint-{c}-{kernel}-{stride}")
    (sh, sw), (r, s) = pair(stride), pair(kernel)
    channels = next(ch for ch in range(c, c + 8) if ch * sh * sw % 8 == 0)
    w = torch.randn(4, c, r, s, generator=gen, dtype=F64)
    w2 = conv_args._space_to_depth_weight(w, sh, sw, channels)
    g2 = torch.randn(w2.shape, generator=gen, dtype=F64)
    g = conv_args._space_to_depth_weight_grad(g2, tuple(w.shape), sh, sw, channels)
    assert g.shape == w.shape
    torch.testing.assert_close((w2 * g2).sum(), (w * g).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prologue,groups,dilation,stride,c", [
    (False, 1, 1, 2, 3), (True, 1, 1, 2, 3), (False, 3, 1, 2, 3), (False, 1, 2, 2, 3), (False, 1, 1, 1, 3),
    (False, 1, 1, 2, 16)])
def test_only_strided_ungrouped_convs_of_few_channels_run_space_to_depth(prologue, groups, dilation, stride, c,
                                                                          monkeypatch):
    """The stem runs space-to-depth, with or without a prologue (applied to the copy: the kernel runs none):
    the kernel sees a stride-1 unpadded conv with a flat reduction; groups, dilation, stride 1 or 16 channels
    keep the conv as it is."""
    launched = []
    launch = conv._launch
    monkeypatch.setattr(conv, "_launch", lambda *args, **kw: launched.append(
        (args[2], kw["flat"], kw["in_scale"] is not None)) or launch(*args, **kw))
    gen = seeded(f"s2d-route-{prologue}-{groups}-{dilation}-{stride}-{c}")
    x = rand_act(gen, (2, c, 9, 9), F32, True)
    w = rand_act(gen, (6, c // groups, 3, 3), F32)
    kw = dict(stride=stride, padding=1, dilation=dilation, groups=groups)
    if prologue:
        kw.update(in_scale=rand_vec(gen, c, positive=True), in_shift=rand_vec(gen, c))
    _check_out(conv.conv2d_fused(x, w, **kw)[0], x, w, kw)
    (geo, flat, kernel_prologue), = launched
    rewritten = groups == 1 and dilation == 1 and stride == 2 and c < 16
    assert ((geo["SH"], geo["PH"], geo["C"], flat) == (1, 0, 16, True)) == rewritten, geo
    assert kernel_prologue == (prologue and not rewritten)


def _eligible_for_tma(x, w, kw) -> bool:
    geo = conv._geometry(x, w, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    merge = conv_args._merge_factor(geo, kw["groups"])
    return conv_plan._tma_ok(x, x.stride(), conv_args._merged(geo, merge), kw["groups"] // merge)


@pytest.mark.parametrize("variant,c,stride,hw,tma", [
    ("channels_last", 32, 1, 6, True), ("nchw", 32, 1, 6, False), ("groups 2", 128, 1, 6, False),
    ("groups 2 run as one", 32, 1, 6, True),
    ("channel view, 16-byte aligned", 32, 1, 6, True), ("channel view, 8-byte aligned", 32, 1, 6, False),
    ("40-byte strides", 20, 1, 6, False), ("strided", 64, 2, 6, True), ("strided, H not a multiple", 64, 2, 7, False),
    ("strided, a partial channel block", 24, 2, 6, False), ("strided channel view", 32, 2, 6, False),
    ("strided, rows cropped from wider ones", 64, 2, 6, True)])
def test_tma_configs_run_exactly_where_allowed(variant, c, stride, hw, tma):
    """The TMA configs need an ungrouped conv (or all groups run as one) on channels-contiguous x with 16-byte
    strides and address;
    strided, also H and W divisible by the stride and pixels packed along W in whole channel blocks (64
    channels: the GPU's TMA configs' BLOCK_K; the interpreter's is 16); any
    other launch runs the pointer configs, right either way (on CPU the interpreter runs the TMA config
    wherever it is allowed, so both kernels' paths are checked here)."""
    case = _case(c, 32, hw, 3, stride, 1, BF16, variant != "nchw", "relu", "stats",
                 groups=2 if variant.startswith("groups 2") else 1)
    x, w, kw = _make(case)
    if "channel view" in variant:  # x = channels [offset, offset + 32) of a 48-channel tensor
        offset = 4 if "8-byte" in variant else 8
        wide = torch.randn(2, 48, hw, hw, dtype=BF16, device=DEVICE).to(memory_format=torch.channels_last)
        x = wide[:, offset:offset + c]
    if "cropped" in variant:  # x = columns [0, 6) of 10: pixels packed along W, rows 10 pixels apart
        x = rand_act(seeded(variant), (2, c, hw, 10), BF16, channels_last=True)[..., :hw]
    assert _eligible_for_tma(x, w, kw) == tma
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    if DEVICE == "cpu":
        assert conv._conv_kernel.best_config.kwargs["USE_TMA"] == tma
    _check_out(out, x, w, kw, variant)
    _check_stats(out, mean, var)


def _recorded(monkeypatch, name: str) -> list:
    """The results of conv_plan.<name> (a host helper of the launch's plan, e.g. _box or _gemm_view), appended as
    the plan calls it; what it returns is unchanged. The launches' plans are made anew meanwhile (conv_plan._PLANS),
    so the plan calls it whatever launches ran before."""
    results, original = [], getattr(conv_plan, name)
    monkeypatch.setattr(conv_plan, name, lambda *args: results.append(original(*args)) or results[-1])
    monkeypatch.setattr(conv_plan, "_PLANS", {})
    return results


@pytest.mark.parametrize("variant,gemm,tma", [
    ("channels_last", True, True), ("one image", True, True), ("40-byte pixels", True, False),
    ("prologue + stats", True, True), ("nchw", False, False), ("nchw residual", False, True),
    ("rows cropped from wider ones", False, True), ("3x3", False, True), ("stride 2", False, True),
    ("padded", False, True)])
def test_1x1_convs_on_a_pixel_grid_run_as_gemms(variant, gemm, tma, monkeypatch):
    """A 1x1, stride-1, unpadded conv whose x, out and residual each keep their pixels on one stride runs as a
    GEMM over N*H*W pixels of 1x1 (conv_plan._gemm_view; the TMA configs load x as one (M, C) matrix); any other
    conv as a conv; right either way (on CPU the interpreter runs the TMA config wherever it is allowed)."""
    views = _recorded(monkeypatch, "_gemm_view")
    kernel, stride, padding = {"3x3": (3, 1, 1), "stride 2": (1, 2, 0), "padded": (1, 1, 1)}.get(variant, (1, 1, 0))
    case = _case(20 if variant == "40-byte pixels" else 32, 24, 6, kernel, stride, padding, BF16, variant != "nchw",
                 "relu" if variant == "prologue + stats" else "none",
                 "stats" if variant == "prologue + stats" else "full", n=1 if variant == "one image" else 2)
    x, w, kw = _make(case)
    if variant == "nchw residual":
        kw["residual"] = kw["residual"].contiguous()
    if "cropped" in variant:  # x = columns [0, 6) of 10: pixels packed along W, rows 10 pixels apart
        x = rand_act(seeded(variant), (2, 32, 6, 10), BF16, channels_last=True)[..., :6]
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert [view is not None for view in views] == [gemm], views
    if DEVICE == "cpu":
        assert conv._conv_kernel.best_config.kwargs["USE_TMA"] == tma
    _check_out(out, x, w, kw, variant)
    if mean is not None:
        _check_stats(out, mean, var)


# batches that fill TMA row tiles of images at one output position (conv_configs._box: at most 1/8 of a tile's rows
# past N; the smallest TMA tile, conv_configs._MAX_BOX, has 32 rows in the interpreter, 128 on a GPU), whose x tile an
# H100's tensor-core dot reads from shared memory; the strided ones of whole channel blocks (conv_plan._tma_ok)
_TILE, _CHANNEL_BLOCK = conv_configs._MAX_BOX, conv_configs._TMA_MAX_BLOCK_K
_ONE_POSITION_BOX_CASES = [
    _case(2 * _CHANNEL_BLOCK, 16, 6, 3, 1, 1, BF16, True, "relu", "stats", n=_TILE),  # 6x6 outputs: 2x2 boxes for
    # a small batch; the prologue's x tiles 2-D (the kernel's X_ROWS_2D)
    _case(24, 16, 6, 3, 1, 1, BF16, True, "none", "full", n=_TILE),  # a channel tail
    _case(2 * _CHANNEL_BLOCK, 16, 6, 3, 2, 1, BF16, True, "relu", "full", n=_TILE),  # the prologue's 2-D tiles of
    _case(_CHANNEL_BLOCK, 16, 7, 3, 1, 2, F16, True, "linear", "stats", dilation=2, n=_TILE),  # strided, dilated taps
    _case(2 * _CHANNEL_BLOCK, 24, 6, 3, 2, 1, F16, True, "none", "full", n=2 * _TILE - 4),  # 3x3/2; the second
    # tile 4 rows past N
    _case(_CHANNEL_BLOCK, 32, (4, 6), 1, 2, 0, F32, True, "linear", "affine", n=2 * _TILE),  # the 1x1/2 downsample
]


def test_one_position_prologue_runs_tma_tiles_on_whole_channel_blocks_only():
    """A prologue on a launch of one-position TMA tiles loads x's tiles 2-D (the kernel's X_ROWS_2D), where past C
    a tile would hold the next pixel's channels: such a launch with a channel tail (24 channels) runs the pointer
    configs, and computes the conv; without the prologue, or on whole channel blocks, it may run the TMA ones."""
    gen = seeded("one-position-tail")
    for c, prologue, tma in ((24, True, False), (24, False, True), (2 * _CHANNEL_BLOCK, True, True)):
        x = rand_act(gen, (_TILE, c, 6, 6), BF16, channels_last=True)
        geo = conv._geometry(x, torch.empty(16, c, 3, 3, dtype=BF16), (1, 1), (1, 1), (1, 1), 1)
        assert conv_configs._box(geo) == (1, 1)
        assert conv_plan._tma_ok(x, x.stride(), geo, 1, prologue=prologue) == tma, (c, prologue)
    x, w, kw = _make(_case(24, 16, 6, 3, 1, 1, BF16, True, "relu", "stats", n=_TILE))
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert not conv._conv_kernel.best_config.kwargs["USE_TMA"]
    _check_out(out, x, w, kw, "one position, 24 channels")
    _check_stats(out, mean, var)


def test_an_expanded_x_runs_the_pointer_configs():
    """x expanded along the batch or a row (stride 0, a multiple of 16 bytes) describes nothing the tensor memory
    accelerator loads: such a launch runs the pointer configs, and computes the conv."""
    gen = seeded("expanded")
    image = rand_act(gen, (1, 32, 6, 6), BF16, channels_last=True)
    row = rand_act(gen, (2, 32, 1, 6), BF16, channels_last=True)
    w = rand_act(gen, (16, 32, 3, 3), BF16) / 16
    for x in (image.expand(4, 32, 6, 6), row.expand(2, 32, 6, 6)):
        geo = conv._geometry(x, w, (1, 1), (1, 1), (1, 1), 1)
        dense = x.contiguous(memory_format=torch.channels_last)
        assert conv_plan._tma_ok(dense, dense.stride(), geo, 1) and not conv_plan._tma_ok(x, x.stride(), geo, 1)
        out, _, _ = conv.conv2d_fused(x, w, padding=1)
        assert not conv._conv_kernel.best_config.kwargs["USE_TMA"]
        _check_out(out, x, w, dict(padding=1), f"expanded, strides {x.stride()}")


def test_one_position_boxes_only_where_the_batch_fills_the_tiles():
    tile = conv_configs._MAX_BOX
    for n, box in ((tile, (1, 1)), (2 * tile, (1, 1)), (tile * 8 // 9 + 1, (1, 1)), (tile * 8 // 9 - 1, (2, 8)),
                   (tile + 1, (2, 8)), (2, (2, 8))):
        assert conv_configs._box(dict(N=n, P=6, Q=8)) == box, (n, box)
    assert conv_configs._box(dict(N=2, P=7, Q=7)) == (1, 1)  # odd sizes: one position whatever the batch


_BOX_COMPILES = STAND_IN_LAUNCH + """
import json
from triton.runtime.jit import JITFunction

kernel = conv._conv_kernel
names = ("USE_TMA", "X_IN_L1", "PERSISTENT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BOX_H", "BOX_W")
compiles = []


def record(self, key, signature, device, constexprs, options, attrs, warmup):  # compiles nothing
    if self is kernel.fn:
        constants = {self.arg_names[index]: value for (index,), value in constexprs.items()}
        compiles.append([constants[name] for name in names] + [options.num_warps, options.num_stages])
    self.device_caches[device][0][key] = placeholder = object()
    return placeholder


JITFunction._do_compile = record
compile_without_launching(kernel)
w = torch.randn(128, 64, 3, 3, dtype=torch.bfloat16)
for size in (12, 8):  # no multiple of 16: the JIT specialises the two launches alike
    x = torch.randn(3, 64, size, size, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    conv.conv2d_fused(x, w, padding=(1, 1))
print(json.dumps(dict(names=names, compiles=compiles, boxes=[conv_configs._box(dict(N=3, P=s, Q=s)) for s in (12, 8)])))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="compiles behind a stand-in driver")
def test_only_the_tma_configs_compile_again_for_another_box(tmp_path):
    """Two 3x3 convs alike but for their size, whose TMA row tiles are boxes of other shapes (4x4 and 8x8
    output positions of a batch of 3): each TMA config compiles once per box, launched with it; each pointer
    config once, with the box (1, 1) whatever the launch's (conv_configs._config_box). Behind the H100 stand-in driver,
    nothing compiled for real."""
    found = run_behind_stand_in(_BOX_COMPILES, tmp_path)
    compiles = [dict(zip([*found["names"], "warps", "stages"], c)) for c in found["compiles"]]
    boxes = [tuple(b) for b in found["boxes"]]
    assert len(set(boxes)) == 2 and (1, 1) not in boxes, boxes
    tma = [c for c in compiles if c["USE_TMA"]]
    pointer = [c for c in compiles if not c["USE_TMA"]]
    assert tma and pointer, compiles

    def config(c):
        return tuple(v for name, v in c.items() if not name.startswith("BOX"))

    assert sorted((c["BOX_H"], c["BOX_W"]) for c in tma) == sorted(boxes * (len(tma) // 2)), tma
    assert sorted(config(c) for c in tma if (c["BOX_H"], c["BOX_W"]) == boxes[0]) == sorted(
        config(c) for c in tma if (c["BOX_H"], c["BOX_W"]) == boxes[1]), tma
    assert all((c["BOX_H"], c["BOX_W"]) == (1, 1) for c in pointer), pointer
    assert len({config(c) for c in pointer}) == len(pointer), pointer  # each once for both convs


@pytest.mark.parametrize("case", _ONE_POSITION_BOX_CASES, ids=str)
def test_one_position_boxes_compute_the_conv(case, monkeypatch):
    """Forward (prologue, statistics, residual epilogues) and, for the first case, the input gradient, with TMA
    row tiles of images at one output position: rows (image fastest) and x's descriptor (its images next to
    last, see conv.py) agree, padding and strided taps land where they should."""
    boxes = _recorded(monkeypatch, "_box")  # by the launch, and for its TMA configs by the autotuner
    x, w, kw = _make(case)
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert set(boxes) == {(1, 1)}, boxes
    if DEVICE == "cpu":
        ran = conv._conv_kernel.best_config.kwargs
        assert ran["USE_TMA"] and (ran["BOX_H"], ran["BOX_W"]) == (1, 1)
    _check_out(out, x, w, kw, str(case))
    if mean is not None:
        _check_stats(out, mean, var)
        boxes.clear()
        _check_input_grad((case.c, case.k, case.hw, case.kernel, case.stride, case.padding, 1, 1, case.dtype, True,
                           True, case.prologue), batch=case.n)
        assert set(boxes) == {(1, 1)}, boxes


def _run_only(monkeypatch, tile, **flags) -> triton.Config:
    """Make the conv kernel autotune among one config alone, with a fresh tuning cache: ``tile`` (a config of
    its, options and register cap kept) with the constexpr ``flags`` set; returns that config."""
    kernel = conv._conv_kernel
    config = triton.Config(dict(tile.kwargs, **flags), num_warps=tile.num_warps, num_stages=tile.num_stages,
                           maxnreg=tile.maxnreg)
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    return config


@pytest.mark.parametrize("launch", ["inference", "stats", "input grad"])
def test_persistent_programs_take_the_tiles_in_turn(launch, monkeypatch):
    """A persistent TMA config (the interpreter's TMA tile, one program per conv_plan._multiprocessors) on 1x1 convs
    run as GEMMs (without and with the BN + ReLU prologue): 2 programs loop over 6 output tiles (3 row tiles x 2
    column tiles); and on a 3x3 conv and a
    strided 1x1 whose row tiles are images at one output position (a batch of one tile; 5x5 outputs, 25 row tiles
    x 2 column tiles, the padding's taps zeros; 3x3 outputs of every other pixel); every output and statistic
    right."""
    kernel = conv._conv_kernel
    tma = next(c for c in kernel.configs if c.kwargs["USE_TMA"] and not c.kwargs["PERSISTENT"])
    persistent = _run_only(monkeypatch, tma, PERSISTENT=1)
    asked = []
    monkeypatch.setattr(conv_plan, "_multiprocessors", lambda device: asked.append(device) or 2)
    if launch == "input grad":  # dz of a 32->16 1x1 conv: a 16->32 GEMM over 2 x 6 x 6 pixels; of a 3x3 conv at a
        _check_input_grad((32, 16, 6, 1, 1, 0, 1, 1, BF16, True, True, "relu"))  # batch of one tile
        _check_input_grad((24, 16, 5, 3, 1, 1, 1, 1, BF16, True, True, "relu"), batch=_TILE)
        assert kernel.best_config.kwargs == dict(persistent.kwargs, BOX_H=1, BOX_W=1)
    else:  # a 24->32 GEMM over 3 x 5 x 5 pixels, then a 3x3 conv and a strided 1x1 of one-position tiles
        # (conv_configs._box)
        epilogue = "full" if launch == "inference" else "stats"
        for case in (_case(24, 32, 5, 1, 1, 0, BF16, True, "none", epilogue, n=3),
                     _case(24, 32, 5, 1, 1, 0, BF16, True, "relu", epilogue, n=3),  # a GEMM view with the prologue
                     _case(24, 32, 5, 3, 1, 1, BF16, True, "none", epilogue, n=_TILE),
                     _case(2 * _CHANNEL_BLOCK, 32, 6, 1, 2, 0, BF16, True, "none", epilogue, n=_TILE)):
            x, w, kw = _make(case)
            out, mean, var = conv.conv2d_fused(x, w, **kw)
            _check_out(out, x, w, kw, f"{launch} {case}")
            if mean is not None:
                _check_stats(out, mean, var)
            assert kernel.best_config.kwargs == dict(persistent.kwargs, BOX_H=1, BOX_W=1)  # no box of positions
    assert asked


def test_persistent_configs_run_only_where_the_dot_reads_x_from_shared_memory():
    """Where x's tile reaches the dot through registers (a box of several positions, or the prologue's
    transform) the flattened persistent loop compiles to serialised wgmma: those launches keep to the other
    configs, but for a GEMM view with the prologue whose reduction takes at most two steps (serialised, a tile's
    few wgmma cost next to nothing). A GEMM view's pixels and images at one output position, without a
    prologue, may run them."""
    persistent = dict(USE_TMA=True, PERSISTENT=1, X_IN_L1=False, CHANNEL_ROWS=False, BLOCK_M=128, BLOCK_N=128)
    gemm, one_position, several = dict(N=50176, P=1, Q=1), dict(N=256, P=14, Q=14), dict(N=8, P=14, Q=14)
    short_gemm = dict(gemm, Cg=conv_configs._PERSISTENT_PROLOGUE_CHANNELS)  # layer2's 128->512: two steps
    long_gemm = dict(gemm, Cg=2 * conv_configs._PERSISTENT_PROLOGUE_CHANNELS)
    for prologue, gemm_view, sizes, usable in ((False, True, long_gemm, True), (True, True, long_gemm, False),
                                               (True, True, short_gemm, True),
                                               (False, False, one_position, True),
                                               (True, False, one_position, False), (False, False, several, False)):
        launch = dict(TMA_OK=True, PROLOGUE=prologue, GEMM_VIEW=gemm_view, **sizes)
        assert conv_configs._usable(persistent, launch) == usable, launch
        assert conv_configs._usable(dict(persistent, PERSISTENT=0), launch)


def test_register_capped_configs_run_only_launches_with_the_prologue_or_the_statistics():
    """The 128x128 tiles (8 warps) also run capped at conv_configs._REGISTER_CAP registers, two CTAs an SM, where the
    prologue or the statistics take them past it: the training forward and the input gradient. Elsewhere the
    capped copy would compile to the same kernel, so it does not run."""
    capped = [c for c in conv._conv_kernel.configs if c.maxnreg]
    if conv._INTERPRET:  # one config, nothing to tune
        assert not capped
    else:
        assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.maxnreg, c.kwargs["USE_TMA"])
                for c in capped} == {(128, 128, 8, 128, False), (128, 128, 8, 128, True)}
    config = dict(USE_TMA=False, PERSISTENT=0, X_IN_L1=False, CHANNEL_ROWS=False, BLOCK_M=128, BLOCK_N=128,
                  num_warps=8)
    for prologue, stats, usable in ((True, False, True), (False, True, True), (True, True, True),
                                    (False, False, False)):
        launch = dict(TMA_OK=False, PROLOGUE=prologue, COMPUTE_STATS=stats, GEMM_VIEW=False, N=8, P=14, Q=14, R=3,
                      S=3, FLAT_K=False, Cg=64)
        assert conv_configs._usable(dict(config, maxnreg=conv_configs._REGISTER_CAP), launch) == usable, launch
        assert conv_configs._usable(config, launch)


def test_channel_rows_configs_run_only_gemm_views_with_the_forward_statistics():
    """The CHANNEL_ROWS configs (the tile computed as its transpose, so that a channel's statistics sum within a
    warp) run where those statistics are the forward's on a GEMM view (a 1x1 conv's training forward, with or
    without the prologue); not the input gradient's, a conv of other taps, or a launch without statistics."""
    rows = [c for c in conv._conv_kernel.configs if c.kwargs["CHANNEL_ROWS"]]
    assert not rows if conv._INTERPRET else len(rows) == 4
    config = dict(USE_TMA=True, PERSISTENT=0, X_IN_L1=False, CHANNEL_ROWS=True, BLOCK_M=128, BLOCK_N=128)
    gemm, one_position = dict(GEMM_VIEW=True, N=50176, P=1, Q=1, R=1, S=1), dict(GEMM_VIEW=False, N=256, P=14,
                                                                                  Q=14, R=3, S=3)
    for sizes, prologue, stats, grad, usable in ((gemm, True, True, False, True), (gemm, False, True, False, True),
                                                 (gemm, False, True, True, False), (gemm, True, False, False, False),
                                                 (one_position, True, True, False, False)):
        launch = dict(TMA_OK=True, PROLOGUE=prologue, COMPUTE_STATS=stats, PROLOGUE_GRAD=grad, FLAT_K=False, Cg=64,
                      **sizes)
        assert conv_configs._usable(config, launch) == usable, launch
        assert conv_configs._usable(dict(config, CHANNEL_ROWS=False), launch)


@pytest.mark.parametrize("use_tma", [False, True])
def test_channel_rows_configs_compute_the_statistics_right(use_tma, monkeypatch):
    """A CHANNEL_ROWS config (the interpreter's tile, computed as (channels, positions) and transposed back) on
    1x1 convs run as GEMMs with the statistics, with and without the prologue, a channel tail and rows past M:
    every output and statistic right."""
    kernel = conv._conv_kernel
    tile = next(c for c in kernel.configs if c.kwargs["USE_TMA"] == use_tma and not c.kwargs["PERSISTENT"])
    _run_only(monkeypatch, tile, CHANNEL_ROWS=True)
    for case in (_case(24, 32, 5, 1, 1, 0, BF16, True, "relu", "stats", n=3),
                 _case(32, 40, 7, 1, 1, 0, F16, True, "none", "stats")):
        x, w, kw = _make(case)
        out, mean, var = conv.conv2d_fused(x, w, **kw)
        assert kernel.best_config.kwargs["CHANNEL_ROWS"]
        _check_out(out, x, w, kw, str(case))
        _check_stats(out, mean, var)


def test_one_position_prologue_launches_may_run_every_tma_tile():
    """Where x's TMA tile is a box of images at one output position and the prologue transforms it, every
    non-persistent TMA tile may run, the 128x128 and 128x256 ones (8 warps) too: those launches load x's tile
    from a 2-D descriptor (the kernel's X_ROWS_2D; from the 5-D box those two tiles computed wrong outputs on an
    H200, see conv_configs._usable)."""
    one_position, several = dict(N=256, P=14, Q=14), dict(N=8, P=14, Q=14)  # ResNet-50's batch; a small one
    assert conv_configs._box(one_position) == (1, 1) and conv_configs._box(several) != (1, 1)
    for (block_m, block_n), prologue, gemm_view, sizes in (
            ((128, 128), True, False, one_position), ((128, 256), True, False, one_position),
            ((128, 64), True, False, one_position), ((256, 64), True, False, one_position),
            ((128, 256), False, False, one_position), ((128, 256), True, True, one_position),
            ((128, 256), True, False, several)):
        config = dict(USE_TMA=True, PERSISTENT=0, X_IN_L1=False, CHANNEL_ROWS=False, BLOCK_M=block_m,
                      BLOCK_N=block_n)
        launch = dict(TMA_OK=True, PROLOGUE=prologue, GEMM_VIEW=gemm_view, **sizes)
        assert conv_configs._usable(config, launch), (config, launch)


@pytest.mark.parametrize("taps,flat_k,cg,usable", [
    ((3, 3), False, 64, True), ((1, 3), False, 5, True), ((4, 4), True, 16, True),  # the space-to-depth stem
    ((1, 1), False, 64, False), ((7, 7), True, 3, False), ((3, 3), True, 6, False)])
def test_x_in_l1_configs_run_only_convs_whose_taps_overlap(taps, flat_k, cg, usable):
    """The X_IN_L1 configs (x's tiles copied in 8-byte runs, cached in L1) serve convs of several taps, where a
    tile's next steps read most of what this one read, and only where the compiler hint they rest on holds: x's
    channels contiguous in runs of 4. A flat (r, s, c) reduction has those only with Cg a multiple of 4; a false
    hint would load wrong elements. Every other config may run these launches."""
    launch = dict(TMA_OK=False, PROLOGUE=False, GEMM_VIEW=False, R=taps[0], S=taps[1], FLAT_K=flat_k, Cg=cg)
    assert conv_configs._usable(dict(USE_TMA=False, PERSISTENT=0, X_IN_L1=True, CHANNEL_ROWS=False), launch) == usable
    assert conv_configs._usable(dict(USE_TMA=False, PERSISTENT=0, X_IN_L1=False, CHANNEL_ROWS=False), launch)


@pytest.mark.skipif(DEVICE == "cuda", reason="test_gpu_x_in_l1_configs_match_the_reference runs them compiled")
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[8], next(c for c in CASES if c.groups == 8)], ids=str)
def test_x_in_l1_config_in_the_interpreter(case, monkeypatch):
    """The X_IN_L1 path on CPU, where the interpreter's configs have none (its hint means nothing there): the
    interpreter's tile with X_IN_L1 set gives the reference's output (a 3x3 with the statistics epilogue, the
    stem's space-to-depth flat reduction, a dilated NCHW conv, two groups of 4 merged ones with a prologue)."""
    kernel = conv._conv_kernel
    _run_only(monkeypatch, kernel.configs[0], X_IN_L1=True)
    x, w, kw = _make(case)
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert kernel.best_config.kwargs["X_IN_L1"]
    _check_out(out, x, w, kw, str(case))
    if case.epilogue.startswith("stats"):
        _check_stats(out, mean, var)


@pytest.mark.parametrize("channels", [8, 24], ids=["flat-columns", "row-padding"])
@pytest.mark.parametrize("in_relu", [True, False], ids=["relu", "linear"])
def test_padding_after_prologue(in_relu, channels):
    """A large positive shift: relu(0 * s + t) = t at padded positions would move every border output.
    Both ways of zeroing the padding: per element with 8 channels (flat (r, s, c) columns), by the loaded
    row factor with 24 (one (r, s) per step); 24 also leaves a channel tail in the interpreter's tiles."""
    gen = seeded(f"padding-{in_relu}-{channels}")
    x = rand_act(gen, (2, channels, 5, 5), F32, channels_last=True)
    w = rand_act(gen, (20, channels, 3, 3), F32)
    kw = dict(padding=(2, 1), dilation=(2, 1), in_scale=rand_vec(gen, channels, positive=True),
              in_shift=rand_vec(gen, channels, positive=True) + 3.0, in_relu=in_relu)
    out, _, _ = conv.conv2d_fused(x, w, **kw)
    _check_out(out, x, w, kw)
    s, t = kw["in_scale"].double()[:, None, None], kw["in_shift"].double()[:, None, None]
    v = F.pad(x.double(), (1, 1, 2, 2)) * s + t  # the prologue applied after padding
    wrong = F.conv2d(v.relu() if in_relu else v, w.double(), dilation=(2, 1))
    assert (out.double() - wrong).abs().max() > 1.0


def test_nan_input_propagates_through_the_prologue():
    """A NaN input passes relu (as clamp_min does) into exactly the outputs whose window covers it, also
    where that window reaches into the padding (the row factor scales the shift, never the input)."""
    gen = seeded("nan-forward")
    x = rand_act(gen, (2, 20, 5, 5), F32, channels_last=True)
    x[1, 3, 0, 4] = float("nan")  # a corner: every window over it also covers padding
    w = rand_act(gen, (8, 20, 3, 3), F32)
    kw = dict(padding=1, in_scale=rand_vec(gen, 20, positive=True), in_shift=rand_vec(gen, 20))
    out, _, _ = conv.conv2d_fused(x, w, **kw)
    ref = _unfused(x, w, kw, F64)
    assert ref.isnan().sum() == 4 * 8 and torch.equal(out.isnan(), ref.isnan())  # 4 positions, 8 channels
    size = _magnitude(x, w, kw).nan_to_num().max().item()
    torch.testing.assert_close(out.double().nan_to_num(), ref.nan_to_num(), rtol=1e-5,
                               atol=1e-5 + tf32_allowance(F32, size))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_prologue_rounds_to_dtype_before_the_dot(channels_last):
    """out[:, k] = x'[:, k] + x'[:, k + 1] exactly, with x' = relu(x * s + t) computed in fp32 and rounded to
    fp16 (the sum of two fp16 values is exact in fp32; torch and the interpreter round fp16 to nearest)."""
    gen = seeded(f"rounding-{channels_last}")
    x = rand_act(gen, (2, 20, 5, 3), F16, channels_last)
    eye = torch.eye(20, device=DEVICE, dtype=F16)
    w = (eye + eye.roll(1, dims=1))[:, :, None, None]
    s, t = rand_vec(gen, 20, positive=True), rand_vec(gen, 20)
    out, _, _ = conv.conv2d_fused(x, w, in_scale=s, in_shift=t)
    xp = (x.float() * s[:, None, None] + t[:, None, None]).relu().half()
    assert torch.equal(out, F.conv2d(xp.double(), w.double()).half())


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_stats_of_a_mean_far_from_zero_keep_the_variance(kernel, channels_last):
    """y's mean ~1000 of its standard deviations from 0: the mean and variance to y's own precision, where sums of
    y and y*y lost the variance's digits (20% off at 1200 std in fp32); a NaN in x makes the variance NaN, as
    eager's (the max(var, 0) of those sums made it 0)."""
    gen = seeded(f"far-mean-{kernel}-{channels_last}")
    x = rand_act(gen, (2, 16, 7, 5), F32, channels_last) + 300.0
    w = (1 / (16 * kernel * kernel) + 0.01 * torch.randn(24, 16, kernel, kernel, generator=gen)).to(DEVICE)
    out, mean, var = conv.conv2d_fused(x, w, compute_stats=True)  # unpadded: padding would spread y
    y = out.double()
    want_mean, want_var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    assert (want_mean.abs() > 500 * want_var.sqrt()).all(), "the case: a mean far from 0"
    assert ((mean.double() - want_mean).abs() <= 1e-6 * want_mean.abs()).all(), f"{mean} != {want_mean}"
    assert ((var.double() - want_var).abs() <= 1e-3 * want_var).all(), f"{var} != {want_var}"
    x[1, 3, 2, 2] = float("nan")
    _, mean, var = conv.conv2d_fused(x, w, compute_stats=True)
    assert mean.isnan().all() and var.isnan().all(), (mean, var)


def test_residual_layout_and_dtype():
    """bf16 channels_last output with an fp32 NCHW residual that is a strided view."""
    gen = seeded("residual")
    x = rand_act(gen, (2, 20, 7, 7), BF16, channels_last=True)
    w = rand_act(gen, (8, 20, 3, 3), BF16) / 20**0.5
    residual = rand_act(gen, (2, 16, 7, 7), F32)[:, ::2]
    kw = dict(padding=1, out_shift=rand_vec(gen, 8), residual=residual, out_relu=True)
    out, _, _ = conv.conv2d_fused(x, w, **kw)
    _check_out(out, x, w, kw)


@pytest.mark.parametrize("case", [_case(20, 8, 9, 1, 2, 0, BF16, True, "none", "full"),
                                  _case(20, 20, 7, 3, 1, 1, F32, False, "none", "full"),
                                  _case(8, 20, 7, 1, 1, 0, F16, True, "none", "none")], ids=str)
def test_launcher_computes_conv2d_fused_on_new_inputs_laid_out_alike(case, monkeypatch):
    """conv2d_fused_launcher (the inference epilogue: bias, residual, ReLU) checks and plans once; its launches on
    new x and residual values of the same layout compute conv2d_fused's output without calling it, and an x at an
    address off 16 bytes takes conv2d_fused's path."""
    x, w, kw = _make(case)
    kw.pop("out_scale", None)
    launch = conv.conv2d_fused_launcher(x, w, **kw)
    full = []
    conv2d_fused = conv.conv2d_fused
    monkeypatch.setattr(conv, "conv2d_fused", lambda *a, **k: full.append(1) or conv2d_fused(*a, **k))
    gen = seeded(f"{case}-launches")
    offset = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    for off in (False, False, True):
        x2 = rand_act(gen, x.shape, x.dtype, case.channels_last)
        if off:
            x2 = offset.as_strided(x2.shape, x2.stride(), storage_offset=1).copy_(x2)
            assert x2.data_ptr() % 16 != 0
        kw2 = dict(kw)
        if "residual" in kw:
            kw2["residual"] = rand_act(gen, kw["residual"].shape, x.dtype, case.channels_last)
        _check_out(launch(x2, kw2.get("residual")), x2, w, kw2, f"off={off}")
        assert full == ([1] if off else [])


def test_launcher_declines_what_it_would_not_keep_and_raises_as_conv2d_fused(monkeypatch):
    """None for a conv run space-to-depth (the stem) and for a weight packed at every call (one that needs a
    gradient); conv2d_fused's errors for invalid arguments."""
    gen = seeded("launcher")
    x = rand_act(gen, (2, 3, 9, 9), F32)
    assert conv.conv2d_fused_launcher(x, rand_act(gen, (8, 3, 7, 7), F32), stride=2, padding=3) is None
    x = rand_act(gen, (2, 20, 7, 7), F32)
    w = rand_act(gen, (8, 20, 3, 3), F32)
    assert conv.conv2d_fused_launcher(x, w.clone().requires_grad_(), padding=1) is None
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        conv.conv2d_fused_launcher(x, w, padding=1, residual=rand_act(gen, (2, 8, 5, 5), F32))
    with pytest.raises(ValueError, match=r"out_shift must have shape \(8,\)"):
        conv.conv2d_fused_launcher(x, w, padding=1, out_shift=rand_vec(gen, 20))
    with pytest.raises(TypeError, match="weight has dtype"):
        conv.conv2d_fused_launcher(x, w.double())


def test_small_groups_when_allowed(monkeypatch):
    """Groups of 5 input and 3 output channels (flat reduction, column tails) once the minimum is lifted and
    groups are not merged."""
    gen = seeded("small-groups")
    x = rand_act(gen, (2, 20, 6, 6), F16, channels_last=True)
    w = rand_act(gen, (12, 5, 3, 3), F16)
    assert conv.unsupported_reason(x, w, 1, 1, 1, 4) is None  # all 4 run as one group: a conv of 20 -> 12
    monkeypatch.setattr(conv_args, "_MAX_MERGED_GROUPS", 1)
    assert "5 input / 3 output channels per group; the" in conv.unsupported_reason(x, w, 1, 1, 1, 4)
    monkeypatch.setattr(conv_args, "_MIN_GROUP_CHANNELS", 1)
    assert conv.unsupported_reason(x, w, 1, 1, 1, 4) is None
    kw = dict(padding=1, groups=4, in_scale=rand_vec(gen, 20, positive=True), in_shift=rand_vec(gen, 20),
              compute_stats=True)
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    _check_out(out, x, w, kw)
    _check_stats(out, mean, var)


@pytest.mark.parametrize("cg,kg,groups,merge", [
    (4, 4, 32, 16),  # ResNeXt-50 32x4d's layer1: 16 groups of 4 channels make 64
    (8, 8, 32, 8), (16, 16, 32, 4), (32, 32, 32, 2), (64, 64, 32, 1),  # its layer2-4 and wider
    (4, 4, 6, 6),  # the largest divisor of the groups: 6 of 4 channels make 24
    (5, 7, 12, 6),  # the wider side decides: 9 of 7 would fit 64, 6 divides 12
    (1, 1, 64, 16),  # depthwise: at most 16 groups as one
    (96, 16, 4, 1), (4, 4, 1, 1),
])
def test_narrow_groups_run_several_as_one(cg, kg, groups, merge):
    geo = dict(Cg=cg, Kg=kg)
    assert conv_args._merge_factor(geo, groups) == merge
    assert conv_args._merged(geo, merge) == dict(Cg=cg * merge, Kg=kg * merge)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_a_merged_groups_weight_is_block_diagonal(transposed):
    """Packed with 3 of its 6 groups run as one, a weight is two block-diagonal merged weights whose diagonal
    blocks are the groups' weights as packed unmerged, and nothing but zeros off the diagonal (even where a
    weight is not finite)."""
    gen = seeded("merged-pack")
    weight = rand_act(gen, (12, 5, 3, 3), F32)  # 6 groups of 5 input and 2 output channels
    weight[0, 0, 0, 0] = float("inf")
    merged = conv_args._packed_weight(weight, 6, transposed=transposed, merge=3)
    alone = conv_args._packed_weight(weight, 6, transposed=transposed)  # (6, 9 * rows, cols)
    rows, cols = (2, 5) if transposed else (5, 2)
    assert merged.shape == (2, 9 * 3 * rows, 3 * cols)
    blocks = merged.reshape(2, 9, 3, rows, 3, cols)  # (merged group, tap, group j, row, group j', column)
    for g in range(6):
        torch.testing.assert_close(blocks[g // 3, :, g % 3, :, g % 3, :].reshape(9 * rows, cols), alone[g],
                                   rtol=0, atol=0)
    off_diagonal = blocks.clone()
    for j in range(3):
        off_diagonal[:, :, j, :, j, :] = 0
    assert (off_diagonal == 0).all() and not merged.isfinite().all()


def test_unsupported_reason(monkeypatch):
    x = torch.randn(2, 32, 5, 5, device=DEVICE)
    w = torch.randn(16, 32, 3, 3, device=DEVICE)
    assert conv.unsupported_reason(x, w, 1, 1, 1, 1) is None
    assert "dtype torch.float64" in conv.unsupported_reason(x.double(), w.double(), 1, 1, 1, 1)
    assert "expected x's dtype" in conv.unsupported_reason(x.half(), w, 1, 1, 1, 1)
    assert "does not fit" in conv.unsupported_reason(x, w[:, :16], 1, 1, 1, 1)
    assert conv.unsupported_reason(x, torch.randn(16, 4, 3, 3, device=DEVICE), 1, 1, 1, 8) is None  # 8 as one
    depthwise_34 = torch.randn(2, 34, 5, 5, device=DEVICE), torch.randn(34, 1, 3, 3, device=DEVICE)  # 2 x 17 groups
    assert ("1 input / 1 output channels per group, 2 / 2 with 2 groups run as one; the Triton conv needs at least "
            "16 of each" == conv.unsupported_reason(*depthwise_34, 1, 1, 1, 34))
    assert "too small" in conv.unsupported_reason(x, w, 1, 0, 3, 1)
    assert "empty" in conv.unsupported_reason(x[:0], w, 1, 1, 1, 1)
    assert "padding" in conv.unsupported_reason(x, w, 1, -1, 1, 1)
    if DEVICE == "cpu":
        monkeypatch.setattr(conv_args, "_INTERPRET", False)
        assert "CUDA tensor" in conv.unsupported_reason(x, w, 1, 1, 1, 1)


def test_tf32_follows_torch_conv_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not conv_allows_tf32()
    assert conv_flags(F32) == (torch.backends.cudnn.enabled, False) and conv_flags(BF16)[1] is None
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert conv_allows_tf32() and conv_flags(F32)[1]
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the per-operator precision wins
        old = torch.backends.cudnn.conv.fp32_precision  # a property of the module's class: no monkeypatch
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        try:
            assert not conv_allows_tf32()
        finally:
            torch.backends.cudnn.conv.fp32_precision = old


def test_rejects_bad_inputs():
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    w = torch.randn(4, 8, 3, 3, device=DEVICE)
    v8, v4 = torch.ones(8, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        conv.conv2d_fused(x.double(), w.double())
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        conv.conv2d_fused(x, w.half())
    with pytest.raises(ValueError, match="does not fit x with 8 channels"):
        conv.conv2d_fused(x, w[:, :4])
    with pytest.raises(ValueError, match="given together"):
        conv.conv2d_fused(x, w, in_scale=v8)
    with pytest.raises(TypeError, match="in_shift must be a float32 tensor"):
        conv.conv2d_fused(x, w, in_scale=v8, in_shift=v8.half())
    with pytest.raises(ValueError, match=r"out_scale must have shape \(4,\)"):
        conv.conv2d_fused(x, w, out_scale=v8)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        conv.conv2d_fused(x, w, residual=torch.zeros(2, 4, 5, 5, device=DEVICE))
    residual = torch.zeros(2, 4, 3, 3, device=DEVICE)
    for epilogue in (dict(out_scale=v4), dict(residual=residual), dict(out_relu=True)):
        with pytest.raises(ValueError, match="compute_stats returns the conv output"):
            conv.conv2d_fused(x, w, compute_stats=True, **epilogue)
    with pytest.raises(RuntimeError, match="per group"):  # 17 groups of 1 channel: none run together
        conv.conv2d_fused(torch.randn(2, 17, 5, 5, device=DEVICE), torch.randn(17, 1, 3, 3, device=DEVICE), groups=17)


# ----------------------------------------------------------------------------- input gradient

# (C, K, hw, kernel, stride, padding, dilation, groups, dtype, x channels_last, grad_out channels_last, prologue)
INPUT_GRAD_CASES = [
    (20, 8, 7, 3, 1, 1, 1, 1, F32, True, True, "relu"),
    (8, 20, (5, 7), 3, 1, 1, 1, 1, F32, False, False, "relu"),
    (20, 20, 6, 1, 1, 0, 1, 1, BF16, True, True, "relu"),
    (8, 20, 7, 3, 1, 1, 1, 1, BF16, False, True, "linear"),
    (20, 8, 9, 3, 1, 2, 2, 1, F16, True, False, "relu"),
    (3, 20, 9, 7, 1, 3, 1, 1, F32, True, True, "relu"),  # the stem's shape: 3 output channels of the gradient
    (32, 32, 5, 3, 1, 1, 1, 2, F16, True, True, "relu"),
    (20, 20, 5, 3, 1, 0, 1, 1, BF16, True, True, "linear"),  # no padding: the gradient conv pads by 2
    (8, 40, 13, 1, 1, 0, 1, 1, F32, True, True, "relu"),  # several GROUP_M bands of row tiles
    (16, 16, 6, 3, 1, 3, 1, 1, F32, True, True, "relu"),  # padding beyond the kernel's reach: a crop
    # strided: one stride-1 conv per phase of the stride, each with its own taps
    (20, 8, 9, 3, 2, 1, 1, 1, F32, True, True, "relu"),  # ResNet's 3x3/2: phases of 1, 2 and 4 taps
    (8, 20, (8, 7), 3, 2, 1, 1, 1, BF16, False, True, "relu"),  # even and odd sizes
    (20, 20, 7, 1, 2, 0, 1, 1, F16, True, True, "relu"),  # 1x1/2: three phases no tap reaches (dz = 0)
    (8, 16, 11, 3, 2, 2, 2, 1, F32, True, False, "linear"),  # dilation 2 on stride 2: one phase has all taps
    (16, 8, (10, 12), (5, 3), (3, 2), (2, 1), (1, 2), 1, F32, True, True, "relu"),  # mixed per-axis geometry
    (32, 32, 9, 3, 2, 1, 1, 2, F16, True, True, "relu"),  # grouped
    (3, 20, 15, 7, 2, 3, 1, 1, F32, True, True, "relu"),  # the stem's 7x7/2
    (16, 16, 1, 1, 2, 1, 1, 1, F32, True, True, "relu"),  # 1x1/2 padded on 1x1: no tap reaches x, dz = 0
    # TMA configs (channels_last grad_out with 16-byte strides, C a multiple of 8): stride 1 and strided phases
    (24, 16, 6, 3, 1, 1, 1, 1, BF16, True, True, "relu"),
    (16, 24, 9, 3, 2, 1, 1, 1, F16, True, True, "relu"),  # phase convs that crop grad_out (negative padding)
    # phases alike but for their sizes (9 = 5 + 4 rows and columns), which the autotuner's key must tell apart:
    # the second ran the first's TMA box on a grid sized for its own, leaving most of dz unwritten
    (8, 16, 9, 2, 2, 0, 1, 1, F32, True, True, "relu"),
    (8, 16, 10, 3, 3, 0, 1, 1, F16, True, True, "linear"),  # 3x3/3: phases of one tap, 4 and 3 rows
    (16, 32, 7, 1, 1, 0, 1, 1, F32, False, True, "linear"),  # NCHW x and dz
    (32, 16, 6, 1, 1, 0, 1, 1, BF16, True, True, "relu"),  # 1x1: a GEMM over the pixels (conv_plan._gemm_view)
    # narrow groups run several as one (conv_args._merge_factor): the transposed weight block-diagonal too
    (64, 64, 6, 3, 1, 1, 1, 16, BF16, True, True, "relu"),  # 4 channels a group: all 16 groups as one
    (128, 128, 7, 3, 2, 1, 1, 8, F16, True, False, "linear"),  # 16 a group: 2 merged groups, 4 phases
]


def _input_grad_case_id(case):
    c, k, hw, r, stride, pad, dil, groups, dtype, x_cl, g_cl, prologue = case
    return (f"c{c}k{k}-{hw}-r{r}s{stride}p{pad}d{dil}g{groups}-{str(dtype)[6:]}-x{'cl' if x_cl else 'nchw'}"
            f"-g{'cl' if g_cl else 'nchw'}-{prologue}").replace(" ", "")


def _input_grad_reference(grad_out, w, x, kw, dtype):
    """(dz, [sum dz, sum dz * (x - mean)], [sum |dz|, sum |dz * (x - mean)|]) by torch: fp64 throughout,
    or eager in ``dtype`` (the input gradient conv in dtype, the mask and sums in fp32 as BatchNorm's
    backward computes them)."""
    z = x.double() * kw["in_scale"].double()[:, None, None] + kw["in_shift"].double()[:, None, None]
    d_act = torch.ops.aten.convolution_backward(
        grad_out.to(dtype), z.to(dtype), w.to(dtype), None, list(pair(kw["stride"])), list(pair(kw["padding"])),
        list(pair(kw["dilation"])), False, [0, 0], kw["groups"], [True, False, False])[0]
    dz = torch.where(z > 0, d_act, 0) if kw["in_relu"] else d_act
    cdt = F64 if dtype == F64 else F32
    centred = x.to(cdt) - kw["mean"].to(cdt)[:, None, None]
    terms = (dz.to(cdt), dz.to(cdt) * centred)
    return dz, torch.stack([t.sum((0, 2, 3)) for t in terms]), torch.stack([t.abs().sum((0, 2, 3)) for t in terms])


@pytest.mark.parametrize("case", INPUT_GRAD_CASES, ids=_input_grad_case_id)
def test_conv2d_input_grad(case):
    _check_input_grad(case)


@pytest.mark.parametrize("case", [
    (24, 24, 4, 3, 3, 1, 1, 1, F16, False, False, "linear"),  # 3x3/3 on 4x4: phases of one tap, 2x1 of 2x2
    (24, 24, 4, 3, 3, 1, 1, 1, BF16, True, True, "relu"),
    (16, 24, 9, 3, 2, 1, 1, 1, F16, False, True, "relu"),
], ids=_input_grad_case_id)
def test_conv2d_input_grad_of_one_image(case):
    """A batch of one: an NCHW tensor's pixels lie on one stride too, so a strided conv's phase convs of one
    tap are 1x1 convs on pixel grids; those whose output covers only part of grad_out (fewer rows or columns)
    are not GEMMs over the pixels (conv_plan._gemm_view), which a random search found they were taken for."""
    _check_input_grad(case, batch=1)


def _check_input_grad(case, batch: int = 2):
    """dz = d act * ReLU'(z) and BatchNorm backward's two sums, against fp64: the module's error rule, where
    for a sum ATOL applies to each summand (the sums are taken of dz as stored, rounded in dz's dtype)."""
    c, k, hw, r, stride, pad, dil, groups, dtype, x_cl, g_cl, prologue = case
    gen = seeded(case)
    x = rand_act(gen, (batch, c, *pair(hw)), dtype, x_cl)
    w = rand_act(gen, (k, c // groups, *pair(r)), dtype) / (c // groups) ** 0.5
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, in_scale=rand_vec(gen, c, positive=True),
              in_shift=rand_vec(gen, c) * 0.5, in_relu=prologue == "relu", mean=rand_vec(gen, c))
    geometry = SimpleNamespace(hw=pair(hw), kernel=pair(r), stride=pair(stride), padding=pair(pad), dilation=pair(dil))
    grad_out = rand_act(gen, (batch, k, *out_hw(geometry)), dtype, g_cl)
    assert conv_dgrad.input_grad_unsupported_reason(grad_out, w, x, stride, pad, dil, groups) is None
    dz, sums = conv_dgrad.conv2d_input_grad(grad_out, w, x, **kw)

    ref_dz, ref_sums, ref_abs_sums = _input_grad_reference(grad_out, w, x, kw, F64)
    eager_dz, eager_sums, _ = _input_grad_reference(grad_out, w, x, kw, dtype)
    dz_size, _, sums_size = _input_grad_reference(grad_out.abs(), w.abs(), x, kw, F64)  # sums of |products|
    assert dz.dtype == dtype and dz.shape == x.shape and sums.dtype == F32 and sums.shape == (2, c)
    assert dz.is_contiguous(memory_format=torch.channels_last if x_cl else torch.contiguous_format)
    if prologue == "relu":  # the mask is exact: no gradient where z <= 0
        assert (dz.double()[ref_dz == 0] == 0).all()
    for what, got, ref, eager, scale, size in (
            ("dz", dz.double(), ref_dz, eager_dz.double(), max(1.0, ref_dz.abs().max().item()), dz_size.max()),
            ("sums", sums.double(), ref_sums, eager_sums.double(), ref_abs_sums, sums_size)):
        err, eager_err = (got - ref).abs(), (eager - ref).abs().max().item()
        excess = (err - 2 * eager_err - ATOL[dtype] * scale - tf32_allowance(dtype, size)).max().item()
        assert excess <= 0, f"{what}: max error {err.max().item():.3g} exceeds the bound by {excess:.3g}"


def test_input_grad_unsupported_and_bad_arguments():
    gen = seeded("input-grad-args")
    x, w = rand_act(gen, (2, 16, 6, 6), F32), rand_act(gen, (16, 16, 3, 3), F32)
    grad = rand_act(gen, (2, 16, 6, 6), F32)
    vec = dict(in_scale=rand_vec(gen, 16), in_shift=rand_vec(gen, 16), in_relu=True, mean=rand_vec(gen, 16))
    # 34 groups of 1 channel (2 x 17): 2 when run 2 as one, left to cuDNN, strided or not
    thin_x, thin_groups = rand_act(gen, (2, 34, 6, 6), F32), rand_act(gen, (34, 1, 3, 3), F32)
    thin_vec = dict(in_scale=rand_vec(gen, 34), in_shift=rand_vec(gen, 34), in_relu=True, mean=rand_vec(gen, 34))
    for stride, grad_size in ((1, 6), (2, 3)):
        thin_grad = rand_act(gen, (2, 34, grad_size, grad_size), F32)
        assert "per group, 2 / 2 with 2 groups run as one" in conv_dgrad.input_grad_unsupported_reason(
            thin_grad, thin_groups, thin_x, stride, 1, 1, 34)
        with pytest.raises(RuntimeError, match="conv2d_input_grad: .* per group"):
            conv_dgrad.conv2d_input_grad(thin_grad, thin_groups, thin_x, stride=stride, padding=1, groups=34,
                                         **thin_vec)
    assert "conv output's shape (2, 16, 6, 6)" in conv_dgrad.input_grad_unsupported_reason(grad[:1], w, x, 1, 1, 1, 1)
    assert "conv output's shape (2, 16, 3, 3)" in conv_dgrad.input_grad_unsupported_reason(grad, w, x, 2, 1, 1, 1)
    with pytest.raises(TypeError, match="conv2d_input_grad: grad_out has dtype torch.float16, expected x's dtype "
                                        "torch.float32"):
        conv_dgrad.conv2d_input_grad(grad.half(), w, x, padding=1, **vec)
    with pytest.raises(TypeError, match="conv2d_input_grad: weight has dtype torch.float16"):
        conv_dgrad.conv2d_input_grad(grad, w.half(), x, padding=1, **vec)
    with pytest.raises(ValueError, match=r"conv2d_input_grad: mean must have shape \(16,\)"):
        conv_dgrad.conv2d_input_grad(grad, w, x, padding=1, **dict(vec, mean=vec["mean"][:3]))


def test_packed_weight_cache_follows_in_place_updates():
    gen = seeded("cache")
    x = rand_act(gen, (2, 8, 5, 5), F32)
    w = rand_act(gen, (4, 8, 3, 3), F32)
    assert conv._packed_weight(w, 1) is conv._packed_weight(w, 1)
    first, _, _ = conv.conv2d_fused(x, w, padding=1)
    w.mul_(-2.0)
    second, _, _ = conv.conv2d_fused(x, w, padding=1)
    _check_out(second, x, w, dict(padding=1))
    torch.testing.assert_close(second, -2.0 * first, rtol=1e-6, atol=1e-5)


def test_packed_weight_cache_sees_a_fused_optimizer_step():
    """A detached view of a trained weight (a fold without a BatchNorm) is packed once; a fused optimizer's step,
    which moves no version counter (torch 2.14, CPU), is seen at the next call all the same."""
    gen = seeded("fused-step")
    x = rand_act(gen, (2, 8, 5, 5), F32)
    w = torch.nn.Parameter(rand_act(gen, (4, 8, 3, 3), F32))
    assert conv._packed_weight(w.detach(), 1) is conv._packed_weight(w.detach(), 1)
    first, _, _ = conv.conv2d_fused(x, w.detach(), padding=1)
    w.grad = -w.detach()  # lr 1: w - grad = 2 w
    torch.optim.SGD([w], lr=1.0, fused=True).step()
    second, _, _ = conv.conv2d_fused(x, w.detach(), padding=1)
    torch.testing.assert_close(second, 2.0 * first, rtol=1e-6, atol=1e-5)


def test_a_weight_that_needs_a_gradient_is_packed_at_every_call():
    """A trained weight is not cached packed: a manual update through ``.data`` (its version counter unmoved)
    is seen at the next call, forward and input gradient alike; a weight needing no gradient (a folded one)
    is still packed once."""
    gen = seeded("data-writes")
    x = rand_act(gen, (2, 8, 5, 5), F32)
    w = rand_act(gen, (4, 8, 3, 3), F32).requires_grad_()
    assert conv._packed_weight(w, 1) is not conv._packed_weight(w, 1)
    assert conv._packed_weight(w.detach(), 1) is conv._packed_weight(w.detach(), 1)
    first, _, _ = conv.conv2d_fused(x, w, padding=1)
    version = w._version
    w.data.mul_(-2.0)
    assert w._version == version
    second, _, _ = conv.conv2d_fused(x, w, padding=1)
    torch.testing.assert_close(second, -2.0 * first, rtol=1e-6, atol=1e-5)
    transposed = conv._packed_weight(w, 1, transposed=True)
    w.data.mul_(-0.5)
    torch.testing.assert_close(conv._packed_weight(w, 1, transposed=True), -0.5 * transposed)


def test_row_ones_are_made_once_per_device_but_not_kept_from_a_graph_capture(monkeypatch):
    """The prologue's buffer of ones: cached per device, except one made while a CUDA graph is captured (its
    fill runs only when the graph replays, so it must not serve later calls). Host logic only: torch.ones
    and the capture query are stand-ins here."""
    made = []
    monkeypatch.setattr(conv, "_ROW_ONES", {})
    monkeypatch.setattr(conv.torch, "ones", lambda *args, **kwargs: made.append(kwargs["device"]) or object())
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    first = conv._row_ones(gpu)
    assert conv._row_ones(gpu) is not first and conv._ROW_ONES == {}  # made again, never cached
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    kept = conv._row_ones(gpu)
    assert conv._row_ones(gpu) is kept and conv._ROW_ONES == {gpu: kept} and len(made) == 3


def test_packed_weight_cache_lets_a_weight_made_at_every_call_go(monkeypatch):
    """A weight that needs no gradient made anew at every call (a cast, a fold made per call) is packed at every
    call and its entry goes with it: the cache holds neither it nor its packing once the caller drops it. An entry
    of another storage at a weight's address is not used."""
    monkeypatch.setattr(conv_args, "_PACK_CACHE", {})
    gen = seeded("per-call")
    x, w = rand_act(gen, (2, 8, 5, 5), F32), rand_act(gen, (4, 8, 3, 3), F32)
    for scale in (1.0, 2.0, 3.0):
        _check_out(conv.conv2d_fused(x, w * scale, padding=1)[0], x, w * scale, dict(padding=1))
    assert conv_args._PACK_CACHE == {}
    kept = w * 4.0
    packed = conv._packed_weight(kept, 1)
    assert conv._packed_weight(kept, 1) is packed and len(conv_args._PACK_CACHE) == 1
    (key, (_, version, _)), = conv_args._PACK_CACHE.items()
    del packed
    # an entry of another storage at this weight's address (a freed weight's, its entry not yet dropped)
    stranger = torch.empty(1)
    conv_args._PACK_CACHE[key] = (weakref.ref(stranger.untyped_storage()), version, "stale")
    torch.testing.assert_close(conv._packed_weight(kept, 1), conv._packed_weight(w * 4.0, 1))
    del kept
    assert conv_args._PACK_CACHE == {}


def test_packed_weight_cache_is_shared_by_threads(monkeypatch):
    """Another thread's packing that evicts a weight's entry waits until a hit on that entry has moved it to the
    most recent place: without the cache's lock, the eviction between the hit's lookup and its move raised
    KeyError. The hit is paused after its lookup for the other thread to act (it cannot, holding the lock)."""
    monkeypatch.setattr(conv_args, "_PACK_CACHE_SIZE", 1)
    gen = seeded("threads")
    kept, other = rand_act(gen, (4, 8, 3, 3), F32), rand_act(gen, (4, 8, 3, 3), F32)
    looked_up, evicted = threading.Event(), threading.Event()
    hitting = threading.current_thread()

    class PausedAfterLookup(dict):
        def get(self, key, default=None):
            entry = super().get(key, default)
            if threading.current_thread() is hitting and entry is not None:
                looked_up.set()
                evicted.wait(0.5)  # the other thread's eviction, if nothing holds it back
            return entry

    monkeypatch.setattr(conv_args, "_PACK_CACHE", PausedAfterLookup())
    packed = conv._packed_weight(kept, 1)

    def pack_other():
        looked_up.wait(5)
        conv._packed_weight(other, 1)
        evicted.set()

    thread = threading.Thread(target=pack_other)
    thread.start()
    try:
        assert conv._packed_weight(kept, 1) is packed
    finally:
        looked_up.set()
        thread.join()
    (entry,) = conv_args._PACK_CACHE.values()  # then the other's took its place
    assert entry[2] is not packed


def test_statistics_finish_the_rows_their_own_launch_wrote_whatever_other_threads_launch(monkeypatch):
    """The conv's statistics are finished over the workspace rows its launch wrote, known from the config that launch
    ran (the autotuner's best_config, kept per thread): another thread's conv launched between the launch and that
    read (threads sharing a model; run to its end at that point here, as the interpreter takes one thread at a
    time) leaves them right. Before, the read got the other launch's config, and the finish added other rows."""
    gen = seeded("threads-stats")
    x, w = rand_act(gen, (2, 16, 6, 6), F32, True), rand_act(gen, (16, 16, 3, 3), F32)  # a TMA launch, 2x2 boxes
    other_x, other_w = rand_act(gen, (1, 16, 5, 5), F32), rand_act(gen, (16, 16, 1, 1), F32)  # a pointer launch
    start, others = conv._start, []

    def start_then_another_thread(*args, **kwargs):
        start(*args, **kwargs)
        monkeypatch.setattr(conv, "_start", start)
        thread = threading.Thread(target=lambda: others.append(conv.conv2d_fused(other_x, other_w)[0]))
        thread.start()
        thread.join()

    monkeypatch.setattr(conv, "_start", start_then_another_thread)
    out, mean, var = conv.conv2d_fused(x, w, padding=1, compute_stats=True)
    assert len(others) == 1
    _check_out(out, x, w, dict(padding=1))
    _check_stats(out, mean, var)


def test_packed_weight_cache_drops_the_least_recently_used(monkeypatch):
    """A weight used every step stays packed while others come and go (a FIFO cache smaller than a step's
    working set would repack every weight every step)."""
    monkeypatch.setattr(conv_args, "_PACK_CACHE", {})
    monkeypatch.setattr(conv_args, "_PACK_CACHE_SIZE", 3)
    gen = seeded("lru")
    weights = [rand_act(gen, (4, 8, 3, 3), F32) for _ in range(5)]
    packed = [conv._packed_weight(w, 1) for w in weights[:3]]
    assert conv._packed_weight(weights[0], 1) is packed[0]  # used again: now the most recent
    conv._packed_weight(weights[3], 1)  # full: drops weights[1], the least recently used
    assert conv._packed_weight(weights[0], 1) is packed[0]
    assert conv._packed_weight(weights[2], 1) is packed[2]
    assert conv._packed_weight(weights[1], 1) is not packed[1]  # repacked (equal, a new tensor)
    assert len(conv_args._PACK_CACHE) == 3


_COMPILE_FOR_SM90 = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedres.triton import autotuning, conv, conv_args, conv_configs, conv_dgrad, conv_plan, partials

fn = conv._conv_kernel.fn
off = dict(PROLOGUE=False, IN_RELU=False, HAS_OUT_SCALE=False, HAS_OUT_SHIFT=False, HAS_RESIDUAL=False,
           OUT_RELU=False, COMPUTE_STATS=False, PROLOGUE_GRAD=False, FLAT_K=False)
for flags in (dict(off, PROLOGUE=True, IN_RELU=True, COMPUTE_STATS=True),
              dict(off, FLAT_K=True, HAS_OUT_SCALE=True, HAS_OUT_SHIFT=True, HAS_RESIDUAL=True, OUT_RELU=True),
              dict(off, HAS_OUT_SCALE=True, HAS_OUT_SHIFT=True, OUT_RELU=True, COMPUTE_STATS=True,
                   PROLOGUE_GRAD=True)):
    config = conv_configs._CONFIGS[0]
    consts = dict(R=3, S=3, SH=1, SW=1, GROUP_M=8, TMA_OK=False, BOX_H=1, BOX_W=1, GEMM_VIEW=False, **flags,
                  **config.kwargs)
    bf16 = ("x_ptr", "w_ptr", "out_ptr", "res_ptr")
    sig = {a: "constexpr" if a in consts else "*bf16" if a in bf16 else "*fp32" if a.endswith("_ptr") else "i32"
           for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
finish = partials._finish_partials_kernel  # each mode, with the GPU's tile, not the interpreter's
for mode, planes in ((partials.SUMS, 2), (partials.SUMS, 3), (partials.CHAN_MOMENTS, 3)):
    consts = dict(MODE=mode, PLANES=planes, BLOCK_R=partials._BLOCK_R, BLOCK_C=partials._BLOCK_C)
    sig = {a: "constexpr" if a in consts else "*bf16" if a == "centre_ptr" else "*fp32" if a.endswith("_ptr")
           else "i32" for a in finish.arg_names}
    triton.compile(ASTSource(finish, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=partials._WARPS))
copy = conv_args._space_to_depth_kernel  # the stem's copy, with a BN + ReLU prologue
consts = dict(SH=2, SW=2, CHANNELS=4, PROLOGUE=True, IN_RELU=True, BLOCK=conv_args._SPACE_TO_DEPTH_BLOCK)
sig = {a: "constexpr" if a in consts else "*bf16" if a in ("x_ptr", "out_ptr") else "*fp32" if a.endswith("_ptr")
       else "i32" for a in copy.arg_names}
ptx = triton.compile(ASTSource(copy, sig, consts), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=4)).asm["ptx"]
print(json.dumps(dict(copy_divisions_64=len(re.findall(r"\\b(div|rem)\\.[su]64\\b", ptx)))))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile the kernel for real")
def test_kernel_compiles_for_sm90_on_cpu():
    """The interpreter runs code the compiler rejects (a reshape to a shape held in a tuple variable, say):
    compile three variants of the conv, the statistics' finishing kernel with its GPU tile and the stem's
    space-to-depth copy for an H100 with the wheel's ptxas, in a process without TRITON_INTERPRET. The copy
    has no 64-bit division: each program writes part of one row of x', so only the program decodes its (image,
    row), and an element's place in the row divides by constants only. Decoded from a flat 64-bit index, each
    element divided by the runtime W2 and H2: 32 64-bit divisions a thread, and on the H200 the stem's
    `triton` row took 1.472 ms where its conv kernel took 0.589 (benchmarks/RESULTS.md)."""
    done = compile_for_sm90(_COMPILE_FOR_SM90)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["copy_divisions_64"] == 0, found


_FLAGS_OFF = dict(PROLOGUE=False, IN_RELU=False, HAS_OUT_SCALE=False, HAS_OUT_SHIFT=False, HAS_RESIDUAL=False,
                  OUT_RELU=False, COMPUTE_STATS=False, PROLOGUE_GRAD=False, FLAT_K=False)


_COMPILED_VARIANTS = {"bare": _FLAGS_OFF, "prologue": dict(_FLAGS_OFF, PROLOGUE=True, IN_RELU=True),
                      "prologue+stats": dict(_FLAGS_OFF, PROLOGUE=True, IN_RELU=True, COMPUTE_STATS=True),
                      "inference epilogue": dict(_FLAGS_OFF, HAS_OUT_SCALE=True, HAS_OUT_SHIFT=True, HAS_RESIDUAL=True,
                                                 OUT_RELU=True),
                      "input grad": dict(_FLAGS_OFF, HAS_OUT_SCALE=True, HAS_OUT_SHIFT=True, OUT_RELU=True,
                                         COMPUTE_STATS=True, PROLOGUE_GRAD=True),
                      "stats": dict(_FLAGS_OFF, COMPUTE_STATS=True)}
_MAIN_VARIANTS = ("bare", "prologue", "prologue+stats", "inference epilogue", "input grad")


def _compile_for_sm90(config: dict, geometry: dict = LAYER1_3X3, strides=(LAYER1_3X3_CHANNELS_LAST_STRIDES,) * 2,
                      variants=_MAIN_VARIANTS, taps: int = 3, gemm_view: bool = False) -> dict:
    """compile_launch_like_for_sm90's findings for a conv of taps x taps (bf16; by default the layer1 3x3,
    channels_last: ``strides`` of its input and output; a 1x1 ``geometry`` of N = M images of 1x1 as
    ``gemm_view``, see conv_plan._gemm_view) with the first GPU config whose kwargs include ``config``, in
    ``variants`` of: the bare conv, the BN + ReLU prologue, the prologue with the statistics epilogue (the
    training forward), the folded-BN + residual + ReLU epilogue (inference), the input gradient's
    epilogue (PROLOGUE_GRAD) and, not by default, the statistics epilogue alone."""
    x_strides, out_strides = strides
    ints = dict(geometry, WS_ROWS=geometry["M"] // 64, **named_strides("stride_x", x_strides),
                **named_strides("stride_o", out_strides), **named_strides("stride_r", out_strides))
    box_h, box_w = conv_configs._box(geometry)
    return compile_launch_like_for_sm90(
        "fusedres.triton.conv", "_conv_kernel", config, ints,
        dict(R=taps, S=taps, GROUP_M=8, TMA_OK=True, BOX_H=box_h, BOX_W=box_w, GEMM_VIEW=gemm_view),
        {name: _COMPILED_VARIANTS[name] for name in variants}, ("x_ptr", "w_ptr", "out_ptr", "res_ptr"))


def _assert_wgmma_not_serialised(found: dict) -> None:
    """ptxas serialises a loop's wgmma (warning C7515) when it sees the accumulator written between issue
    and wait, as on the path around a loop that may run no step: each wgmma then waits for the last."""
    for name, variant in found["variants"].items():
        assert "C7515" not in variant["warnings"], (name, found)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_channels_last_kernel_is_pipelined_on_hopper_tensor_cores():
    """What the speed of the fast case rests on, checked without a GPU: on channels_last input (the layer1
    3x3 conv, bf16, the first config) the conv's reduction loop runs on Hopper's warpgroup MMA (wgmma), its
    tiles arrive by asynchronous copies into shared memory (the bare conv loads nothing synchronously and
    keeps one buffer per pipeline stage), and the BN + ReLU prologue with the statistics epilogue keeps at
    least double buffering. The prologue's transformed tile reaches the dot in registers: it stores no more
    to shared memory than the bare conv (whose shared stores are the output tile's change of layout), where
    a round trip through shared memory per step cost most of the prologue's time on an H100. No variant's
    wgmma is serialised, and none spills a register."""
    found = _compile_for_sm90(dict(USE_TMA=False))
    block = found["block"]
    tile_bytes = 2 * (block["BLOCK_M"] + block["BLOCK_N"]) * block["BLOCK_K"]  # bf16 (BLOCK_M + BLOCK_N) x BLOCK_K
    assert_pipelined(found, "bare", "prologue+stats", tile_bytes)
    assert found["variants"]["prologue"]["st_shared"] == found["variants"]["bare"]["st_shared"], found
    _assert_wgmma_not_serialised(found)
    assert all(variant["spill_bytes"] == 0 for variant in found["variants"].values()), found


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_stem_runs_space_to_depth_on_asynchronous_16_byte_copies():
    """ResNet-50's stem (3->64 7x7/2 at 224 px, batch 256, bf16 channels_last) as conv2d_fused launches it, run
    space-to-depth (conv_args._space_to_depth): with the first config (128x64x64) its bare, inference (bias +
    ReLU) and statistics variants load x only by 16-byte asynchronous copies (no synchronous global load in
    the bare conv), run wgmma unserialised and spill nothing (166 registers). Launched as the 7x7/2 conv on 3
    channels, the same config gathered x by 64 synchronous 2-byte loads a thread per step at 255 registers,
    spilling 324-328 bytes (triton 3.8) or 520-536 (triton 3.6, the GPU image's), sm_90."""
    x = torch.empty(256, 3, 224, 224, device="meta", dtype=BF16).to(memory_format=torch.channels_last)
    w = torch.empty(64, 3, 7, 7, device="meta", dtype=BF16)
    geo = conv_args._geometry(x, w, (2, 2), (3, 3), (1, 1), 1)
    geo2 = conv_args._space_to_depth_geometry(geo, conv_args._space_to_depth_channels(geo, 1))
    x2 = torch.empty(256, geo2["H"], geo2["W"], geo2["C"], device="meta", dtype=BF16).permute(0, 3, 1, 2)
    out_strides = (112 * 112 * 64, 1, 112 * 64, 64)
    ints = dict({k: v for k, v in geo2.items() if k not in ("R", "S")}, WS_ROWS=geo2["M"] // 64,
                **named_strides("stride_x", x2.stride()), **named_strides("stride_o", out_strides),
                **named_strides("stride_r", out_strides))
    flat = dict(_FLAGS_OFF, FLAT_K=True)
    variants = {"bare": flat, "inference": dict(flat, HAS_OUT_SHIFT=True, OUT_RELU=True),
                "stats": dict(flat, COMPUTE_STATS=True)}
    found = compile_launch_like_for_sm90(
        "fusedres.triton.conv", "_conv_kernel", dict(USE_TMA=False, BLOCK_M=128, BLOCK_N=64), ints,
        dict(R=geo2["R"], S=geo2["S"], GROUP_M=8, TMA_OK=False, BOX_H=1, BOX_W=1, GEMM_VIEW=False),
        variants, ("x_ptr", "w_ptr", "out_ptr", "res_ptr"))
    for variant in found["variants"].values():
        assert variant["wgmma"] > 0 and variant["cp_async"] > 0 and variant["spill_bytes"] == 0, found
    assert found["variants"]["bare"]["ld_global"] == 0, found
    _assert_wgmma_not_serialised(found)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_epilogues_that_load_a_tile_spill_no_register_in_the_widest_tile():
    """The epilogues that load a tile (inference: the residual; the input gradient: the unit's input) run on
    column sub-tiles; over whole 128x256 tiles ptxas spilled 256-1422 bytes of registers in them (sm_90, the
    pointer and TMA configs, triton 3.6 and 3.8)."""
    for kind in (False, True):
        found = _compile_for_sm90(dict(USE_TMA=kind, BLOCK_N=256), variants=("inference epilogue", "input grad"))
        assert all(variant["spill_bytes"] == 0 for variant in found["variants"].values()), found


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_tma_config_loads_its_tiles_with_the_tensor_memory_accelerator():
    """The TMA configs (first one, layer1 3x3 and the strided layer2 3x3): every variant loads both operand
    tiles with tensor copies (no per-thread asynchronous copies, no synchronous global loads in the bare
    conv), feeds them to wgmma unserialised, and the prologue's tile reaches the dot in registers without a
    trip back to shared memory (no more shared stores than the bare conv)."""
    found = _compile_for_sm90(dict(USE_TMA=True))
    strided = _compile_for_sm90(dict(USE_TMA=True), LAYER2_3X3_S2, LAYER2_3X3_S2_CHANNELS_LAST_STRIDES,
                                    ("bare", "prologue+stats"))
    for name, variant in [*found["variants"].items(), *(("strided " + k, v) for k, v in strided["variants"].items())]:
        assert variant["wgmma"] > 0 and variant["tma"] >= 2, (name, found, strided)
    for bare in (found["variants"]["bare"], strided["variants"]["bare"]):
        assert bare["cp_async"] == 0 and bare["ld_global"] == 0, (found, strided)
    assert found["variants"]["prologue"]["st_shared"] == found["variants"]["bare"]["st_shared"], found
    _assert_wgmma_not_serialised(found)
    _assert_wgmma_not_serialised(strided)


# TMA row tiles of 16x8 output positions (conv_configs._box)
_SMALL_BATCH_LAYER1_3X3 = dict(LAYER1_3X3, N=2, M=2 * 56 * 56)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_one_position_boxes_feed_the_dot_from_shared_memory():
    """At batch 256 the TMA configs' row tiles are BLOCK_M images at one output position (conv_configs._box), and wgmma
    reads x's tile from shared memory in every variant without the BN + ReLU prologue (the bare conv, the
    inference epilogue, the input gradient), on the layer1 3x3 and the strided layer2 3x3 alike, with fewer
    registers than a box of several positions (batch 2), whose tile reaches wgmma through registers. The
    prologue's transformed tile is in registers whatever the box; on one-position tiles it is a 2-D tile of x's
    images (the kernel's X_ROWS_2D, where the variants without the prologue copy 5-D boxes) and needs no per-row
    padding factor (one scalar test per step zeroes a tap outside the image), so fewer registers than on a box
    of several positions, and its ReLU is one NaN-propagating max. Nothing serialised or spilled, and the
    reduction step divides nothing (the tap and channel block are counted on from step to step)."""
    plain = ("bare", "inference epilogue", "input grad")
    one = _compile_for_sm90(dict(USE_TMA=True), variants=(*plain, "prologue+stats"))
    strided = _compile_for_sm90(dict(USE_TMA=True), LAYER2_3X3_S2, LAYER2_3X3_S2_CHANNELS_LAST_STRIDES,
                                (*plain, "prologue+stats"))
    several = _compile_for_sm90(dict(USE_TMA=True), _SMALL_BATCH_LAYER1_3X3, variants=("bare", "prologue+stats"))
    for found in (one, strided):
        for name, variant in found["variants"].items():
            in_registers = variant["wgmma"] if name == "prologue+stats" else 0
            assert variant["tma"] >= 2 and variant["wgmma"] > 0, (name, found)
            assert variant["wgmma_a_in_registers"] == in_registers and variant["spill_bytes"] == 0, (name, found)
            assert variant["step_divisions"] == 0, (name, found)
            assert variant["tma_2d"] == (variant["tma"] // 2 if name == "prologue+stats" else 0), (name, found)
        _assert_wgmma_not_serialised(found)
    bare, several_bare = one["variants"]["bare"], several["variants"]["bare"]
    assert several_bare["wgmma_a_in_registers"] == several_bare["wgmma"] > 0, several
    assert bare["registers"] < several_bare["registers"], (bare, several_bare)
    prologue, several_prologue = one["variants"]["prologue+stats"], several["variants"]["prologue+stats"]
    assert prologue["registers"] < several_prologue["registers"] and prologue["max_nan"] > 0, (prologue,
                                                                                              several_prologue)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
def test_1x1_conv_as_a_gemm_feeds_the_dot_from_shared_memory():
    """A 1x1 conv run as a GEMM over the pixels (conv_plan._gemm_view; ResNet-50's layer1 64->256 1x1, bf16): the
    TMA configs load x as 2-D tiles of the (M, C) matrix, which wgmma reads from shared memory as it reads the
    weight (a 5-D box of several output positions, as a batch of 2 gets, is reshaped in registers first:
    every TMA wgmma took A from registers), with fewer registers than that box needed; every variant
    unserialised and unspilled, pointer configs too, and the BN + ReLU prologue's tile (no padding rows to
    zero) reaches the dot without going through shared memory."""
    found = {kind: _compile_for_sm90(dict(USE_TMA=kind == "tma"), LAYER1_1X1_AS_GEMM, LAYER1_1X1_AS_GEMM_STRIDES,
                                     taps=1, gemm_view=True) for kind in ("tma", "pointer")}
    box = _compile_for_sm90(dict(USE_TMA=True), _SMALL_BATCH_LAYER1_3X3, variants=("bare",), taps=1)
    tma_bare = found["tma"]["variants"]["bare"]
    assert tma_bare["tma"] >= 2 and tma_bare["wgmma"] > 0 and tma_bare["wgmma_a_in_registers"] == 0, found
    assert box["variants"]["bare"]["wgmma_a_in_registers"] == box["variants"]["bare"]["wgmma"] > 0, box
    for kind in found.values():
        _assert_wgmma_not_serialised(kind)
        assert all(variant["spill_bytes"] == 0 for variant in kind["variants"].values()), kind
        # the prologue's tile reaches the dot without a trip through shared memory (see the 3x3 tests)
        assert kind["variants"]["prologue"]["st_shared"] == kind["variants"]["bare"]["st_shared"], kind


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
@pytest.mark.parametrize("programs_per_sm", [1, 2])  # the GPU configs' PERSISTENT values
@pytest.mark.parametrize("launch", ["gemm view", "one position"])
def test_persistent_configs_keep_the_pipelined_wgmma(programs_per_sm, launch):
    """The persistent TMA configs (their tile loop flattened with the reduction loop) on the launches _usable
    gives them, without a prologue: a 1x1 conv as a GEMM (ResNet-50's layer1 64->256) and a conv whose row tiles
    are images at one output position (layer2's strided 3x3 at batch 256). x's tile reaches wgmma from shared
    memory, ptxas keeps the wgmma pipelined (no C7515) and nothing spills, in the bare, statistics, inference
    and input-gradient variants."""
    variants = ("bare", "stats", "inference epilogue", "input grad")
    config = dict(USE_TMA=True, PERSISTENT=programs_per_sm)
    if launch == "gemm view":
        found = _compile_for_sm90(config, LAYER1_1X1_AS_GEMM, LAYER1_1X1_AS_GEMM_STRIDES, variants, taps=1,
                                  gemm_view=True)
    else:
        assert conv_configs._box(LAYER2_3X3_S2) == (1, 1)
        found = _compile_for_sm90(config, LAYER2_3X3_S2, LAYER2_3X3_S2_CHANNELS_LAST_STRIDES, variants)
    assert found["block"]["PERSISTENT"] == programs_per_sm
    for name, variant in found["variants"].items():
        assert variant["tma"] >= 2 and variant["wgmma"] > 0, (name, found)
    assert found["variants"]["bare"]["wgmma_a_in_registers"] == 0, found
    _assert_wgmma_not_serialised(found)
    assert all(variant["spill_bytes"] == 0 for variant in found["variants"].values()), found


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
@pytest.mark.parametrize("programs_per_sm", [1, 2])  # the GPU configs' PERSISTENT values
def test_persistent_prologue_gemm_views_compile_without_spilling(programs_per_sm):
    """The persistent TMA configs with the BN + ReLU prologue on a GEMM view of one reduction step (ResNet-50's
    layer1 64->256 1x1, where _usable lets them run): x's tile by tensor copies, nothing spilled, in the prologue
    and prologue + statistics variants (ptxas serialises their wgmma, C7515: one step's worth a tile)."""
    found = _compile_for_sm90(dict(USE_TMA=True, PERSISTENT=programs_per_sm), LAYER1_1X1_AS_GEMM,
                              LAYER1_1X1_AS_GEMM_STRIDES, ("prologue", "prologue+stats"), taps=1, gemm_view=True)
    assert found["block"]["PERSISTENT"] == programs_per_sm
    for name, variant in found["variants"].items():
        assert variant["tma"] >= 2 and variant["wgmma"] > 0 and variant["spill_bytes"] == 0, (name, found)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
@pytest.mark.parametrize("tile", [dict(BLOCK_M=128, BLOCK_N=64), dict(BLOCK_N=128), dict(BLOCK_M=256)])
def test_x_in_l1_configs_copy_x_in_8_byte_runs_cached_in_l1(tile):
    """On the layer1 3x3 conv (bf16, channels_last), each X_IN_L1 config copies x's tiles by 8-byte cp.async.ca
    (cached in L1 as well as L2) and still loads nothing synchronously; the weight keeps its 16-byte copies, the
    wgmma stays pipelined and the bare and inference variants spill nothing (the prologue + statistics and
    input-gradient variants of the 64-column tiles may spill 8-16 bytes at 255 registers with triton 3.8, as the
    4-stage pointer config of 128x64 spills 4-12: not asserted). Without the flag, x comes by 16-byte
    cp.async.cg only."""
    variants = ("bare", "prologue+stats", "inference epilogue", "input grad")
    cached = _compile_for_sm90(dict(tile, USE_TMA=False, X_IN_L1=True), variants=variants)
    plain = _compile_for_sm90(dict(tile, USE_TMA=False, X_IN_L1=False), variants=("bare",))
    assert plain["variants"]["bare"]["cp_async_l1_8_bytes"] == 0, plain
    for name, variant in cached["variants"].items():
        assert variant["cp_async_l1_8_bytes"] > 0 and variant["wgmma"] > 0, (name, cached)
    assert cached["variants"]["bare"]["ld_global"] == 0, cached
    _assert_wgmma_not_serialised(cached)
    assert all(cached["variants"][name]["spill_bytes"] == 0 for name in ("bare", "inference epilogue"))


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
@pytest.mark.parametrize("config", [dict(USE_TMA=True, BLOCK_M=128, BLOCK_N=128),
                                    dict(USE_TMA=False, X_IN_L1=False, BLOCK_M=128, BLOCK_N=128)])
def test_statistics_epilogue_loads_nothing_after_the_tiles_store(config):
    """A program of one output tile (not persistent) whose epilogue stores the tile at once issues every global
    load before its first global store (y's), in the forward's statistics variants (with and without the
    prologue) as in the prologue one, on layer1.0.conv3 (64->256 1x1 as a GEMM view, bf16, channels_last): no
    load of the epilogue queues behind the tile's 32 KB of stores. The statistics' shift, loaded after the
    store, was the one memory access that told the statistics variant (0.60 ms on the H200's 128x128 TMA
    config) from the prologue one (0.31 ms); cutting the column sums' shuffles from 216 to 40 a thread left
    those times unchanged (benchmarks/RESULTS.md). The epilogues that load a tile (the input gradient's, the
    residual's) run on column sub-tiles, each loaded after the last one's store: not asserted."""
    found = _compile_for_sm90(config, LAYER1_1X1_AS_GEMM, LAYER1_1X1_AS_GEMM_STRIDES,
                              variants=("prologue", "prologue+stats", "stats"), taps=1, gemm_view=True)
    for name, variant in found["variants"].items():
        assert variant["ld_global_after_st_global"] == 0, (name, variant, found)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
@pytest.mark.parametrize("launch,variants", [
    ("gemm view, pointer", ("prologue+stats", "stats")), ("gemm view, tma", ("prologue+stats", "stats", "input grad")),
    ("3x3 one position, tma", ("stats", "input grad"))])
def test_register_capped_tiles_compile_without_spilling(launch, variants):
    """The 128x128 tiles capped at conv_configs._REGISTER_CAP registers (two CTAs of 8 warps an SM) compile without a
    spill or a serialised wgmma in the statistics variants of ResNet-50's layer1 64->256 1x1 as a GEMM view
    (uncapped, the prologue + statistics took 158-168 registers there with triton 3.6 and 3.8: one CTA an SM)
    and, on the TMA tile, of its layer1 3x3 at batch 256 (uncapped 128-175); sm_90 ptxas. Capped, some other
    variants spill (the pointer tile's input gradient 0-32 bytes, the prologue + statistics on the 3x3 0-108,
    by triton version): the autotuner times both copies of each tile."""
    config = dict(USE_TMA=launch.endswith("tma"), BLOCK_M=128, BLOCK_N=128, PERSISTENT=0, X_IN_L1=False,
                  maxnreg=conv_configs._REGISTER_CAP)
    if launch.startswith("gemm view"):
        found = _compile_for_sm90(config, LAYER1_1X1_AS_GEMM, LAYER1_1X1_AS_GEMM_STRIDES, variants, taps=1,
                                  gemm_view=True)
    else:
        assert conv_configs._box(LAYER1_3X3) == (1, 1)
        found = _compile_for_sm90(config, variants=variants)
    _assert_wgmma_not_serialised(found)
    for name, variant in found["variants"].items():
        assert variant["registers"] <= conv_configs._REGISTER_CAP and variant["spill_bytes"] == 0, (name, found)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU benchmarks measure the compiled kernel itself")
@pytest.mark.parametrize("use_tma", [False, True])
def test_channel_rows_tiles_sum_the_statistics_without_crossing_warps(use_tma):
    """On layer1's 64->256 1x1 as a GEMM view (bf16, 128x128 tiles), the statistics variants (with and without
    the prologue) of the CHANNEL_ROWS tile sum each channel within a thread and its lane quad: at most 16
    shuffles a thread where the tile of positions as rows takes over 200 (the column sums' butterflies), and
    nothing spilled (sm_90 ptxas; the pointer tile as configured, capped at 128 registers)."""
    variants = ("prologue+stats", "stats")
    tile = dict(USE_TMA=use_tma, BLOCK_M=128, BLOCK_N=128, PERSISTENT=0, X_IN_L1=False)
    found = {channel_rows: _compile_for_sm90(
        dict(tile, CHANNEL_ROWS=channel_rows, **({} if use_tma or not channel_rows else {"maxnreg": 128})),
        LAYER1_1X1_AS_GEMM, LAYER1_1X1_AS_GEMM_STRIDES, variants, taps=1, gemm_view=True)
        for channel_rows in (False, True)}
    for name in variants:
        rows, positions = found[True]["variants"][name], found[False]["variants"][name]
        assert rows["shuffles"] <= 16 < 200 < positions["shuffles"], (name, rows, positions)
        assert rows["spill_bytes"] == 0 and rows["wgmma"] > 0, (name, found[True])


@pytest.mark.skipif(DEVICE == "cuda", reason="counts compiles behind the CPU's stand-in driver")
def test_compiles_script_counts_a_resnet50_inference():
    """scripts/resnet50_compiles.py (README, benchmarks/RESULTS.md) runs the converted ResNet-50's convs through
    the host path and reports the conv kernel's compiles and its autotuning keys."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(root / "scripts" / "resnet50_compiles.py"), "--mode", "infer",
                           "--batch", "8"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    compiles = re.search(r"_conv_kernel: (\d+) compiles", done.stdout)
    keys = re.findall(r"_conv_kernel: (\d+) autotuning keys", done.stdout)
    assert compiles and int(compiles.group(1)) > 0 and sum(map(int, keys)) >= 20, done.stdout  # 22+ distinct convs


@pytest.mark.skipif(DEVICE == "cuda", reason="builds behind the CPU's stand-in driver")
def test_compiles_script_builds_a_cache_another_checkout_finds(tmp_path):
    """scripts/resnet50_compiles.py --cache compiles for sm_90 into a Triton cache that a later process, run from
    a copy of the repository at another path (as on the GPU machine, scripts/gpu_check.sh), loads without
    compiling anything: the cache keys depend on the kernels and their arguments, not on where they lie. With
    --report it writes ptxas's findings on every kernel it compiled, none on those the cache served."""
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "elsewhere"
    for part in ("fusedres", "benchmarks", "scripts", "tests"):
        shutil.copytree(root / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = tmp_path / "triton-cache"

    report = tmp_path / "ptxas.json"

    def build(checkout):
        done = subprocess.run([sys.executable, str(checkout / "scripts" / "resnet50_compiles.py"), "--cache",
                               str(cache), "--report", str(report), "--mode", "infer", "--batch", "4", "--convs",
                               "layer1.0.conv1"], env=env, cwd=checkout, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        found = re.search(r": (\d+) kernels, (\d+) of them compiled now", done.stdout)
        assert found, done.stdout
        return int(found.group(1)), int(found.group(2))

    kernels, compiled = build(root)
    assert kernels == compiled > 0
    assert all(p.suffix in (".json", ".cubin", ".source") for p in cache.glob("*/*")), "binaries and metadata only"
    # --report: ptxas's findings on each compile, the config and the variant's flags among its constexprs
    records = json.loads(report.read_text())
    assert len(records) == compiled and {r["kernel"] for r in records} == {"_conv_kernel"}, records
    for record in records:
        assert 0 < record["registers"] <= 255 and record["shared"] > 0 and record["warps"] in (4, 8), record
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "HAS_OUT_SHIFT", "OUT_RELU"} <= record["constexprs"].keys(), record
    assert build(copy) == (kernels, 0)
    assert json.loads(report.read_text()) == [], "a kernel the cache served is not compiled, so not audited"


_PARALLEL_COMPILE = STAND_IN_LAUNCH + """
import json, sys, threading
import triton.compiler
from triton.runtime.errors import PTXASError

fail_block_n = int(sys.argv[1])  # configs with this BLOCK_N fail to compile, as ptxas may (0: none)
out_channels = int(sys.argv[2])
kernel = conv._conv_kernel
compiles = []
real_compile, block_n_index = triton.compiler.compile, kernel.fn.arg_names.index("BLOCK_N")


def compile(src, *args, **kwargs):  # the one JITFunction calls
    if src.fn is not kernel.fn:  # the statistics' finishing kernel
        return real_compile(src, *args, **kwargs)
    block_n = src.constants[(block_n_index,)]
    compiles.append(dict(thread=threading.current_thread().name, block_n=block_n))
    if block_n == fail_block_n:
        raise PTXASError("stand-in ptxas failure")
    return real_compile(src, *args, **kwargs)


triton.compiler.compile = compile
compile_without_launching(kernel, partials._finish_partials_kernel)
x = torch.randn(16, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
w = torch.randn(out_channels, 64, 3, 3, dtype=torch.bfloat16)
conv.conv2d_fused(x, w, padding=(1, 1), in_scale=torch.ones(64), in_shift=torch.zeros(64), compute_stats=True)
# this 3x3 conv with a prologue may not run the persistent configs, nor the CHANNEL_ROWS ones (conv_configs._usable)
print(json.dumps(dict(compiles=compiles, all_block_ns=[c.kwargs["BLOCK_N"] for c in conv_configs._CONFIGS
                                                       if not c.kwargs["PERSISTENT"] and not c.kwargs["CHANNEL_ROWS"]],
                      best_block_n=kernel.best_config.kwargs["BLOCK_N"])))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests autotune for real")
@pytest.mark.parametrize("fail_block_n,out_channels", [(0, 256), (256, 256), (0, 64)],
                         ids=["all-compile", "one-fails", "64-channels"])
def test_a_new_autotuning_key_compiles_its_configs_in_parallel(fail_block_n, out_channels, tmp_path):
    """First use of a conv shape compiles every config that fits it on worker threads before the autotuner
    times them, and those are the kernels the timing loop and the launch use (nothing compiles twice or on
    the main thread); a config that fails to compile is skipped by the timing loop as it would be without
    the parallel compile. With 256 output channels every config fits; with 64 only those with BLOCK_N = 64
    (wider tiles would mask off half their columns or more). Run on CPU with a stand-in for the H100's
    driver (compiled, never launched), in a process without TRITON_INTERPRET; two worker threads even
    where the machine has one core."""
    found = run_behind_stand_in(_PARALLEL_COMPILE, tmp_path, str(fail_block_n), str(out_channels))
    on_workers = [c for c in found["compiles"] if c["thread"].startswith("fusedres-compile")]
    fitting = [n for n in found["all_block_ns"] if n <= max(out_channels, 64)]
    assert sorted(c["block_n"] for c in on_workers) == sorted(fitting), found  # each fitting config once
    assert len({c["thread"] for c in on_workers}) == 2, found
    # nothing else compiled, but a failed config again when timed, where triton (< 3.8) did not keep the failure
    assert all(c["block_n"] == fail_block_n for c in found["compiles"] if c not in on_workers), found
    assert found["best_block_n"] != fail_block_n
    assert fail_block_n == 0 or fail_block_n in fitting  # the failure case does fail a config


_COMPILE_AHEAD = STAND_IN_LAUNCH + RECORD_COMPILES + """
from fusedres.triton import autotuning
x = torch.randn(16, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
dy = torch.randn(16, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
w64, w128 = (torch.randn(k, 64, 3, 3, dtype=torch.bfloat16) for k in (64, 128))
ones = torch.ones(64)


def step():  # four autotuning keys: two forward convs, an input gradient, a weight gradient
    conv.conv2d_fused(x, w64, padding=(1, 1), in_scale=ones, in_shift=ones, compute_stats=True)
    conv.conv2d_fused(x, w128, padding=(1, 1))
    conv_dgrad.conv2d_input_grad(dy, w64, x, padding=(1, 1), in_scale=ones, in_shift=ones, in_relu=True, mean=ones)
    conv_wgrad.conv2d_weight_grad(x, dy, w64.shape, padding=(1, 1))


with autotuning.compile_ahead() as ahead:
    with ahead.compile_only():
        step()
        step()  # the same keys again: nothing more to submit
        tuned_in_pass = len(autotuning.TUNINGS)
    submitted = len(ahead.futures)
in_pass = list(compiles)
step()  # the first real step: times every key's configs
print(json.dumps(dict(in_pass=in_pass, submitted=submitted, failed=ahead.failed(), tuned_in_pass=tuned_in_pass,
                      after=compiles[len(in_pass):], tunings=autotuning.TUNINGS)))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests autotune for real")
def test_a_compile_ahead_pass_compiles_every_key_at_once_and_the_step_after_it_only_times(tmp_path):
    """Inside a compile-ahead pass's compile_only() (fusedres.precompile's), launches of the autotuned conv
    (forward and input gradient) and weight-gradient kernels run nothing and tune nothing: each new key's
    configs, the ones its autotuning would time, are compiled on the pass's pool, every key's at once, and
    the pass waits for them. The step after the pass times each key's configs without compiling any of them
    again. Run on CPU with a stand-in for the H100's driver (compiled, never launched), in a process without
    TRITON_INTERPRET."""
    found = run_behind_stand_in(_COMPILE_AHEAD, tmp_path)
    tuned = [c for c in found["in_pass"] if c["kernel"] != "_finish_partials_kernel"]  # which is not autotuned
    assert found["tuned_in_pass"] == 0 and found["failed"] == 0, found
    assert len(tuned) == found["submitted"] and {c["thread"][:22] for c in tuned} == {"fusedres-compile-ahead"}
    assert {c["kernel"] for c in tuned} == {"_conv_kernel", "_wgrad_kernel"}, found
    assert [c for c in found["after"] if c["kernel"] != "_finish_partials_kernel"] == [], found
    assert len(found["tunings"]) == 4, found  # every config the step timed was compiled by the pass
    assert sum(len(t["ms"]) or 1 for t in found["tunings"]) == found["submitted"], found


_ONES_AT_LAUNCH = STAND_IN_LAUNCH + """
compile_without_launching(conv._conv_kernel, partials._finish_partials_kernel, conv_wgrad._wgrad_kernel)
x = torch.randn(1, 16, 1, 1, dtype=torch.bfloat16)  # N = H = W = P = Q = M = 1, so one M tile (WS_ROWS = 1)
dy, w = torch.randn(1, 16, 1, 1, dtype=torch.bfloat16), torch.randn(16, 16, 3, 3, dtype=torch.bfloat16)
v = torch.ones(16)
conv.conv2d_fused(x, w, padding=1, in_scale=v, in_shift=v, compute_stats=True)
conv_dgrad.conv2d_input_grad(dy, w, x, padding=1, in_scale=v, in_shift=v, in_relu=True, mean=v)
conv_wgrad.conv2d_weight_grad(x, dy, w.shape, padding=1, in_scale=v, in_shift=v)
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests launch these shapes for real")
def test_int_arguments_equal_to_one_compile(tmp_path, monkeypatch):
    """Triton's launcher passes int arguments equal to 1 as constants (plain Python ints in the kernel, with
    no .to()), which the interpreter never does: every config of the forward (statistics epilogue), input-
    gradient and weight-gradient kernels compiles through the real launch path where the sizes are 1."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    done = compile_for_sm90(_ONES_AT_LAUNCH)
    assert done.returncode == 0, done.stderr[-3000:]


_RELAUNCH = STAND_IN_LAUNCH + """
import json
from triton import knobs
from triton.runtime import jit

launches, jit_runs = [], []


class RecordingLauncher:  # each compiled kernel's launcher: notes the kernel, which launcher, the arguments
    def __init__(self, src, metadata):
        self.kernel = src.name

    def __call__(self, *args):
        launches.append((self.kernel, id(self), args))


def compute_cache_key(*args, real=jit.compute_cache_key):  # what every launch through JITFunction.run calls
    jit_runs.append(1)
    return real(*args)


StandInH100.launcher_cls = RecordingLauncher
jit.compute_cache_key = compute_cache_key
kernel = conv._conv_kernel
time_nothing(kernel)
x = torch.randn(16, 128, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
w = torch.randn(64, 64, 3, 3, dtype=torch.bfloat16)  # 2 groups of 64 input channels (not merged): 2 grid columns
scale, shift = torch.rand(128) + 0.5, torch.randn(128)
misaligned_scale = torch.empty(129)[1:].copy_(scale)  # 4 bytes past a 16-byte boundary


def described(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride()), value.data_ptr() % 16,
                value.data_ptr() if value.data_ptr() in (x.data_ptr(), w.data_ptr()) else None]
    return repr(value)


def launched(call):  # how call()'s launches of the conv kernel and the statistics kernel went
    runs, first = len(jit_runs), len(launches)
    call()
    found = dict(jit=len(jit_runs) - runs)
    for name, launcher, args in launches[first:]:
        launch_metadata, hooks = args[6], args[7:9]
        found[name] = dict(launcher=launcher, grid=list(args[:3]), kernel=list(args[4:6]),
                           hooks_silent=all(hook is None or hook.calls == [] for hook in hooks),
                           arguments=[described(a) for a in args[9:]])
    return found


def forward(in_scale):
    return launched(lambda: conv.conv2d_fused(x, w, padding=(1, 1), groups=2, in_scale=in_scale, in_shift=shift,
                                              compute_stats=True))


out = torch.empty(16, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)


def into_out(x):  # forward(scale)'s launch as conv2d_fused makes it, into a channels_last out whatever x's strides
    k = out.shape[1]
    return launched(lambda: conv._launch(
        x, conv._packed_weight(w, 2), conv._geometry(x, w, 1, 1, 1, 2), 2, out, in_scale=scale, in_shift=shift,
        in_relu=True, compute_stats=True, stats_out=(torch.empty(k), torch.empty(k))))


# x's values with other strides (pixels 136 channels apart): the same tuning key, another launch plan
wide_x = torch.empty(16, 8, 8, 136, dtype=torch.bfloat16).permute(0, 3, 1, 2)[:, :128].copy_(x)
found = dict(tuning=forward(scale), aligned=[forward(scale), forward(scale)],
             misaligned=[forward(misaligned_scale), forward(misaligned_scale)], aligned_again=forward(scale),
             wide=[into_out(wide_x), into_out(wide_x)], aligned_after_wide=into_out(x))
# the weight gradient's launches, with the prologue: tuned through the JIT, then relaunched by its key
grad_out = torch.randn(16, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
time_nothing(conv_wgrad._wgrad_kernel)
found["weight_grad"] = [launched(lambda: conv_wgrad.conv2d_weight_grad(
    x, grad_out, w.shape, padding=1, groups=2, in_scale=scale, in_shift=shift)) for _ in range(3)]
# an inference unit's launcher (conv2d_fused_launcher), made before its conv's first launch: its launches relaunch
# the kernel and arguments conv2d_fused's tuning call ran (the same plan, the same key)
x_unit, residual = (torch.randn(16, c, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
                    for c in (128, 64))
w_unit, bias = torch.randn(64, 128, 3, 3, dtype=torch.bfloat16), torch.randn(64)
unit = dict(padding=(1, 1), out_shift=bias, residual=residual, out_relu=True)
launch_unit = conv.conv2d_fused_launcher(x_unit, w_unit, **unit)
found["inference"] = [launched(lambda: conv.conv2d_fused(x_unit, w_unit, **unit)),
                      launched(lambda: launch_unit(x_unit, residual)), launched(lambda: launch_unit(x_unit, residual))]
hook = lambda metadata: None  # noqa: E731  (a profiler's, proton's say: the JIT path builds its metadata)
knobs.runtime.launch_enter_hook.add(hook)
found["hooked"] = forward(scale)
knobs.runtime.launch_enter_hook.remove(hook)
found["unhooked"] = forward(scale)
# BatchNorm's running statistics with momentum None (1 / batches seen): a float argument new at every step
from fusedres.triton import bn_act  # noqa: E402
stats = [torch.zeros(64), torch.ones(64), torch.zeros(64), torch.ones(64)]
found["momenta"] = [launched(lambda: bn_act.finish_batch_stats(*stats, 1 / step, 1e-5, 100)) for step in (1, 2, 3)]


def base(config):  # a config as kernel.configs holds it: without the box a launch adds (conv_configs._config_box)
    return {k: v for k, v in config.all_kwargs().items() if k not in ("BOX_H", "BOX_W")}


chosen = base(kernel.best_config)
kernel.configs, kernel.cache = [c for c in kernel.configs if base(c) != chosen], {}  # as the GPU tests pick configs
found["other_configs"] = forward(scale)
found["chosen_then"] = [base(kernel.best_config) == chosen, base(kernel.best_config) in map(base, kernel.configs)]
print(json.dumps(found))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests launch these shapes for real")
def test_a_launch_the_jit_would_specialise_alike_relaunches_its_kernel_with_the_same_arguments(tmp_path):
    """After a launch through triton's JIT path, a launch the JIT would specialise the same way runs that
    launch's compiled kernel without the JIT path (fusedres.triton.relaunch), for the autotuned conv kernel (by
    its launch plan's key, from the call that tuned it on: ``autotuning.keyed_launch``) and a plain one (the
    statistics' finishing kernel, by its signature) alike: the same launcher, grid, kernel handle and arguments
    (the launch hooks, silent, passed as None); while a launch hook is set, every launch takes the JIT path (whose
    hook gets the launch's metadata). A pointer of another alignment (which the JIT specialises on)
    goes through the JIT path once, which makes it another conv kernel, relaunched from then on; the aligned
    launch still relaunches its own. An inference unit's launcher (``conv.conv2d_fused_launcher``) relaunches what
    its conv's tuning call ran. Kernels kept are forgotten when the autotuner's configs and cache are replaced.
    Run on CPU with a stand-in for the H100's driver whose launchers record their calls, in a process
    without TRITON_INTERPRET."""
    found = run_behind_stand_in(_RELAUNCH, tmp_path)
    # the tuning call's launches (the conv's last one: the chosen config's) go through the JIT
    (stats_through_jit, conv_through_jit) = (found["tuning"][name] for name in ("_finish_partials_kernel",
                                                                              "_conv_kernel"))
    assert [run["jit"] for run in found["aligned"]] == [0, 0], found
    for relaunched in found["aligned"]:
        for through_jit, kernel in ((conv_through_jit, "_conv_kernel"),
                                    (stats_through_jit, "_finish_partials_kernel")):
            assert through_jit["hooks_silent"], found
            for key in ("launcher", "grid", "kernel", "arguments"):
                assert relaunched[kernel][key] == through_jit[key], (kernel, key)
    assert conv_through_jit["grid"][1:] == [2, 1], found
    misaligned_through_jit, misaligned_relaunched = (run["_conv_kernel"] for run in found["misaligned"])
    assert [run["jit"] for run in found["misaligned"]] == [1, 0], found
    assert misaligned_through_jit["launcher"] != conv_through_jit["launcher"], "another alignment, another kernel"
    assert misaligned_relaunched["launcher"] == misaligned_through_jit["launcher"]
    assert misaligned_relaunched["arguments"] == misaligned_through_jit["arguments"]
    assert found["aligned_again"]["jit"] == 0
    assert found["aligned_again"]["_conv_kernel"]["launcher"] == conv_through_jit["launcher"]
    # x alone of other strides: the tuned config, compiled for them once (the JIT specialises on the strides), then
    # relaunched with them; the first layout's launch still relaunches its own arguments
    wide_through_jit, wide_relaunched = (run["_conv_kernel"] for run in found["wide"])
    assert [run["jit"] for run in found["wide"]] == [1, 0], found
    strides = slice(22, 30)  # stride_xn .. stride_xw, stride_on .. stride_oq among the kernel's arguments
    assert conv_through_jit["arguments"][strides] == ["8192", "1", "1024", "128", "4096", "1", "512", "64"]
    assert wide_through_jit["arguments"][strides] == ["8704", "1", "1088", "136", "4096", "1", "512", "64"]
    assert wide_relaunched["arguments"] == wide_through_jit["arguments"]
    assert found["aligned_after_wide"]["jit"] == 0
    assert found["aligned_after_wide"]["_conv_kernel"]["arguments"] == conv_through_jit["arguments"]
    # the weight gradient's kernel likewise (autotuning.keyed_launch): the tuning call's launch kept
    tuning, *relaunches = found["weight_grad"]
    assert tuning["jit"] > 0 and [run["jit"] for run in relaunches] == [0, 0], found["weight_grad"]
    for run in relaunches:
        for key in ("launcher", "grid", "kernel", "arguments"):
            assert run["_wgrad_kernel"][key] == tuning["_wgrad_kernel"][key], key
    # an inference unit's launcher: its launches relaunch what conv2d_fused's tuning call ran
    tuning, *relaunches = found["inference"]
    assert tuning["jit"] > 0 and [run["jit"] for run in relaunches] == [0, 0], found["inference"]
    for run in relaunches:
        for key in ("launcher", "grid", "kernel", "arguments"):
            assert run["_conv_kernel"][key] == tuning["_conv_kernel"][key], key
    # a launch hook set: both kernels through the JIT path, which hands the launcher the hook; relaunched after
    hooked, unhooked = found["hooked"], found["unhooked"]
    kernels = ("_conv_kernel", "_finish_partials_kernel")
    assert hooked["jit"] == 2 and not any(hooked[kernel]["hooks_silent"] for kernel in kernels), found
    assert unhooked["jit"] == 0 and unhooked["_conv_kernel"]["arguments"] == conv_through_jit["arguments"]
    # the autotuner's configs and cache replaced: the key is tuned again among the new configs, nothing relaunched
    assert found["other_configs"]["jit"] > 0 and found["chosen_then"] == [False, True], found
    # a float argument's value, which the JIT does not specialise on: the same kernel relaunched with each value
    momenta = [run["_finish_batch_stats_kernel"] for run in found["momenta"]]
    assert [run["jit"] for run in found["momenta"]] == [1, 0, 0], found["momenta"]
    assert len({run["launcher"] for run in momenta}) == 1 and len({str(run["arguments"]) for run in momenta}) == 3
    assert all(momentum in run["arguments"] for momentum, run in zip(("1.0", "0.5", "0.3333333333333333"), momenta))


def test_relaunches_keep_a_bounded_number_of_launches(monkeypatch):
    """Launches kept by signature stop at relaunch._MAX_KEPT per kernel (shapes that keep changing take the JIT
    path beyond it), as those kept by key do: they grew by one a call with a new int argument."""
    monkeypatch.setattr(relaunch, "_MAX_KEPT", 3)
    relaunches = relaunch.Relaunches(partials._finish_partials_kernel)

    class Compiled(CompiledKernel):  # a compiled kernel, never launched (nor loaded: nothing to unload)
        def __init__(self):
            pass

        def __del__(self):
            pass

    for signature in range(5):
        relaunches.remember(signature, Compiled())
    assert list(relaunches.kernels) == [0, 1, 2]


_CORRUPT_TUNING_ENTRY = STAND_IN_LAUNCH + """
import json, os, warnings
from fusedres.triton import autotuning

tuner = conv._conv_kernel
configs, key = tuner.configs[:2], (64, 64, 56, 56, 64, 64, 3, 3, "torch.bfloat16")
timings = []


def timing():  # the autotuner's timing of a new key (Autotuner.run's benchmark)
    timings.append(1)
    tuner.configs_timings = {c: [float(i)] * 3 for i, c in enumerate(configs)}
    tuner.cache[key] = configs[0]


found = dict(enabled=tuner.cache_results, read=[])
tuner.check_disk_cache(key, configs, timing)  # tuned, and its entry written
entry, = [os.path.join(root, name) for root, _, names in os.walk(os.environ["TRITON_CACHE_DIR"]) for name in names
          if name.endswith(".autotune.json")]
for contents in ("valid", "", '{"key": 1}'):  # as written, emptied (truncated), another triton's layout
    if contents != "valid":
        with open(entry, "w") as file:
            file.write(contents)
    tuner.cache.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_disk = tuner.check_disk_cache(key, configs, timing)
    chosen = autotuning.describe(tuner.cache[key]) == autotuning.describe(configs[0])  # read back: a copy
    found["read"].append(dict(from_disk=from_disk, timings=len(timings), chosen=chosen,
                              warnings=[str(w.message) for w in caught]))
print(json.dumps(found))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="stands in for the GPU's target")
def test_an_unreadable_disk_tuning_entry_is_timed_again(tmp_path):
    """With FUSEDRES_AUTOTUNE_CACHE=1 a key's tuning is kept on disk (triton's cache_results). An entry that cannot be
    read (emptied, or of another layout) is taken as none, with a warning: the key is timed again, where every
    launch of that key raised in every process. Behind the stand-in driver (its target), nothing launched."""
    env = dict(FUSEDRES_AUTOTUNE_CACHE="1", TRITON_CACHE_DIR=str(tmp_path))
    done = compile_for_sm90(_CORRUPT_TUNING_ENTRY, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["enabled"]
    valid, emptied, other_layout = found["read"]
    assert valid == dict(from_disk=True, timings=1, chosen=True, warnings=[]), found
    for read, timings in ((emptied, 2), (other_layout, 3)):
        assert not read["from_disk"] and read["timings"] == timings and read["chosen"], found
        assert len(read["warnings"]) == 1 and "timing its configs again" in read["warnings"][0], found


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_compile_threads_rejects_what_is_not_a_positive_count(value, monkeypatch):
    monkeypatch.setenv("FUSEDRES_COMPILE_THREADS", value)
    with pytest.raises(ValueError, match=f"should be a positive number of threads, got '{value}'"):
        autotuning.compile_threads()


def test_a_compile_ahead_pass_left_by_an_exception_waits_only_for_the_compiles_running(monkeypatch):
    """fusedres.precompile's pass fails (a model that raises, say): it gives up the compiles not yet started
    instead of waiting for all of them, and the exception goes on."""
    monkeypatch.setenv("FUSEDRES_COMPILE_THREADS", "2")
    started = []
    with pytest.raises(KeyError):
        with autotuning.compile_ahead() as ahead:
            ahead.futures += [ahead.pool.submit(lambda: started.append(1) or time.sleep(0.2)) for _ in range(20)]
            raise KeyError("the model failed")
    assert all(future.done() for future in ahead.futures)
    assert len(started) <= 4 and sum(future.cancelled() for future in ahead.futures) >= 16


def _a_kernel_body(x):  # a source for JITFunction to parse
    return x + 1


def test_triton_parses_kernel_sources_one_thread_at_a_time(monkeypatch):
    """JITFunction.parse (ast.parse of a kernel's source, at each compile, on the compile threads) runs on one
    thread at a time: CPython before 3.11.8 and 3.12.2 fails two parses at once now and then (gh-106905;
    autotuning._serialise_source_parsing). Fails with parse left as triton has it."""
    from triton.runtime.jit import JITFunction

    parse, inside, most = ast.parse, [], []

    def slow_parse(*args, **kwargs):
        inside.append(1)
        most.append(len(inside))
        time.sleep(0.02)
        try:
            return parse(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(ast, "parse", slow_parse)
    kernel = JITFunction(_a_kernel_body)
    with ThreadPoolExecutor(4) as pool:
        trees = list(pool.map(lambda _: kernel.parse(), range(8)))
    assert max(most) == 1 and len(most) == 8 and all(isinstance(tree, ast.Module) for tree in trees)


def test_compile_threads_default_to_the_usable_cores(monkeypatch):
    monkeypatch.delenv("FUSEDRES_COMPILE_THREADS", raising=False)
    assert autotuning.compile_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("FUSEDRES_COMPILE_THREADS", " 3 ")
    assert autotuning.compile_threads() == 3


def test_every_autotuned_conv_kernel_prunes_and_compiles_new_keys_in_parallel():
    from fusedres.triton import conv_wgrad

    for kernel in (conv._conv_kernel, conv_wgrad._wgrad_kernel):
        assert kernel.early_config_prune.func is autotuning.prune_and_compile
        assert kernel.early_config_prune.args[0] is kernel.fn
        assert kernel.do_bench is autotuning.time_config


def test_autotuning_times_each_config_for_30_ms(monkeypatch):
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: calls.append(kwargs) or [1.0] * 3)
    assert autotuning.time_config(lambda: None, (0.5, 0.2, 0.8)) == [1.0] * 3
    assert calls == [dict(warmup=5, rep=25, quantiles=(0.5, 0.2, 0.8))]


@triton.jit
def _fill_kernel(out_ptr, n, BLOCK: tl.constexpr):  # writes BLOCK to out[:n], one BLOCK-wide tile per program
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.full((BLOCK,), BLOCK, tl.float32), mask=offs < n)


@pytest.mark.skipif(DEVICE == "cuda", reason="times configs with a stand-in clock")
def test_autotuning_records_every_new_key_it_tunes(monkeypatch):
    """autotuning.TUNINGS gets one entry per new key (kernel, key, chosen config, each config's median ms),
    none for a key seen before; here under the interpreter, with a clock that makes the second config the
    faster one, and a key (n = 5) that may run only the first, which runs untimed."""
    monkeypatch.setenv("FUSEDRES_COMPILE_THREADS", "1")
    medians = iter([3.0, 2.0, 5.0, 4.0, 1.0])
    monkeypatch.setattr(autotuning, "time_config", lambda call, quantiles: call() or [next(medians)] * 3)
    monkeypatch.setattr(autotuning, "TUNINGS", [])
    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    usable = lambda config, args: args["n"] != 5 or config["BLOCK"] == 16  # noqa: E731
    kernel = autotuning.autotune(configs, ["n"], lambda args: {}, usable)(_fill_kernel)
    for n, block in ((40, 32), (40, 32), (7, 32), (5, 16)):
        out = torch.zeros(n)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, n)
        assert (out == block).all()  # the faster config ran, or the one allowed
        # the key triton filed it under, which later calls find without triton's per-call dicts
        assert autotuning.tuning_key(kernel, (out, n), {}) in kernel.cache
    assert [(t["kernel"], t["key"], t["best"]) for t in autotuning.TUNINGS] == [
        ("_fill_kernel", ["40", "torch.float32"], "BLOCK=32 warps=4 stages=3"),  # the key: n, out's dtype
        ("_fill_kernel", ["7", "torch.float32"], "BLOCK=32 warps=4 stages=3"),
        ("_fill_kernel", ["5", "torch.float32"], "BLOCK=16 warps=4 stages=3")]
    assert autotuning.TUNINGS[1]["ms"] == {"BLOCK=16 warps=4 stages=3": 5.0, "BLOCK=32 warps=4 stages=3": 4.0}
    assert all(t["seconds"] >= 0 for t in autotuning.TUNINGS[:2])
    # the lone config the key (n = 5) may run is not timed (triton < 3.8 would time it), and the clock is unused
    assert (autotuning.TUNINGS[2]["ms"], autotuning.TUNINGS[2]["seconds"]) == ({}, None)
    assert next(medians) == 1.0


@pytest.mark.skipif(DEVICE == "cuda", reason="times configs with a stand-in clock")
def test_autotuning_adds_the_constants_a_launch_gives_its_configs(monkeypatch):
    """autotune's ``constants(config, arguments)``: constexprs a config launches with besides its own, decided
    by the key (here BLOCK by the length n); the key's tuned config holds them and a later launch of the key
    runs it with them; the configs themselves stay as they were. A lone config (which triton launches without
    pruning) gets them too."""
    monkeypatch.setenv("FUSEDRES_COMPILE_THREADS", "1")
    monkeypatch.setattr(autotuning, "time_config", lambda call, quantiles: call() or [1.0] * 3)
    configs = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=2)]
    constants = lambda config, args: {"BLOCK": 16 if args["n"] < 20 else 32}  # noqa: E731
    kernel = autotuning.autotune(configs, ["n"], lambda args: {}, constants=constants)(_fill_kernel)
    for n, block in ((40, 32), (7, 16), (40, 32)):
        out = torch.zeros(n)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, n)
        assert (out == block).all() and kernel.best_config.kwargs == {"BLOCK": block}, n
    assert len(kernel.cache) == 2 and [c.kwargs for c in kernel.configs] == [{}, {}]
    kernel.configs = configs[1:]
    out = torch.zeros(7)
    kernel[lambda meta: (triton.cdiv(7, meta["BLOCK"]),)](out, 7)
    assert (out == 16).all() and kernel.best_config.kwargs == {"BLOCK": 16} and configs[1].kwargs == {}


def test_host_integer_helpers_agree_with_triton():
    """The host's cdiv and next_power_of_2 (plain Python; triton's cost ~2 us a call from Python)."""
    from fusedres.triton._host import cdiv, next_power_of_2

    for n in [*range(1, 600), 802816, 2**30 - 1, 2**30, 2**30 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        assert all(cdiv(n, b) == triton.cdiv(n, b) for b in (1, 3, 16, 128, 1000)), n
    assert cdiv(0, 7) == 0


def test_conv_launches_find_their_tuned_config_by_key(monkeypatch):
    """A conv launch seen before goes straight to its tuned config: autotuning.tuning_key gives the key
    triton filed the first launch under (checked on the call that reached the kernel), and the second launch
    tunes nothing (on a GPU it skips triton's JIT path too: fusedres.triton.relaunch)."""
    kernel = conv._conv_kernel
    calls = []
    real_run = kernel.fn.run
    monkeypatch.setattr(kernel.fn, "run", lambda *args, **kwargs: calls.append((args, kwargs)) or real_run(
        *args, **kwargs))
    x, w, kw = _make(CASES[2])
    conv.conv2d_fused(x, w, **kw)
    assert len(kernel.configs) > 1 and len(calls) == 1
    assert autotuning.tuning_key(kernel, *calls[0]) in kernel.cache
    tuned = dict(kernel.cache)
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert kernel.cache == tuned
    _check_out(out, x, w, kw)


def test_convs_benchmark_counts_the_kinds_of_config_chosen():
    from benchmarks.convs import config_kinds_summary

    def tuned(kernel, use_tma, persistent=0, x_in_l1=False, maxnreg=None):
        config = triton.Config(dict(BLOCK_M=128, USE_TMA=use_tma, PERSISTENT=persistent, X_IN_L1=x_in_l1),
                               num_warps=8, num_stages=3, maxnreg=maxnreg)
        return dict(kernel=kernel, best=autotuning.describe(config))

    rows = [dict(tuned=[tuned("_conv_kernel", True), tuned("_wgrad_kernel", False)]), dict(),
            dict(tuned=[tuned("_conv_kernel", False, maxnreg=128), tuned("_conv_kernel", True, 2),
                        tuned("_conv_kernel", False, x_in_l1=True)])]
    assert rows[2]["tuned"][0]["best"].endswith(" warps=8 stages=3 maxnreg=128")
    assert rows[0]["tuned"][0]["best"].endswith(" warps=8 stages=3")
    assert ("TMA configs chosen for 2 of 4 (1 persistent), pointer configs for the rest (1 caching x in L1); 1 with "
            "registers capped, 0 with channels as rows;" in config_kinds_summary(rows))
    assert "no key tuned" in config_kinds_summary([dict(), dict(tuned=[tuned("_wgrad_kernel", False)])])


def test_convs_benchmark_compares_capped_and_channel_rows_tiles_with_their_twins():
    """The convs level says how the register-capped tiles and the CHANNEL_ROWS tiles timed against their twins (the
    same tile uncapped, or with positions as rows), key by key, from the autotuner's medians (a config that failed
    times inf, and counts nowhere)."""
    from benchmarks.convs import twin_configs_summary

    def described(use_tma, maxnreg=None, channel_rows=False):
        return autotuning.describe(triton.Config(dict(BLOCK_M=128, BLOCK_N=128, USE_TMA=use_tma,
                                                      CHANNEL_ROWS=channel_rows), num_warps=8, num_stages=3,
                                                 maxnreg=maxnreg))

    timings = [{described(False): 0.6, described(False, 128): 0.3, described(True): 0.5,
                described(True, channel_rows=True): 0.4},
               {described(True): 0.2, described(True, 128): 0.25, described(False, 128): 0.1,  # no pointer twin
                described(True, channel_rows=True): 0.3},
               {described(False): float("inf"), described(False, 128): 0.4}]  # the twin failed
    rows = [dict(tuned=[dict(kernel="_conv_kernel", ms=ms)]) for ms in timings]
    rows.append(dict(tuned=[dict(kernel="_wgrad_kernel", ms={described(True): 1.0, described(True, 128): 0.1})]))
    assert twin_configs_summary(rows) == [
        "Register-capped tiles: timed beside their twin 2 times, faster in 1 (time / twin's: 0.50-1.25, median 0.88).",
        "Tiles of channels as rows (CHANNEL_ROWS): timed beside their twin 2 times, faster in 1 (time / twin's: "
        "0.80-1.50, median 1.15)."]
    assert all("none timed" in line for line in twin_configs_summary(rows[2:]))


def _config(block_m, block_n, block_k):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k})


def _blocks(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs]


@pytest.mark.parametrize("sizes,kept", [
    ((802816, 64, 64), [(128, 64, 64), (64, 64, 32)]),  # layer1 1x1, batch 256: 64 output channels
    ((802816, 100, 64), [(128, 128, 64), (128, 64, 64), (64, 64, 32)]),  # 100 -> 128 wide
    ((802816, 256, 16), [(64, 64, 32)]),  # a 16-column reduction: BLOCK_K 32 (the smallest) only
    ((49, 256, 512), [(64, 64, 32)]),  # batch 1 at 7x7: 49 rows
    ((802816, 512, 512), [(128, 128, 64), (128, 64, 64), (64, 64, 32), (256, 256, 64)]),  # all
], ids=["64-channels", "100-channels", "16-columns", "49-rows", "large"])
def test_autotuning_times_only_the_configs_that_fit_the_gemm(sizes, kept):
    """A config whose block is at least twice its GEMM dimension rounded up to a power of two masks off half
    of every tile or more along it; it is not compiled or timed, unless no config would be left."""
    configs = [_config(*blocks) for blocks in [(128, 128, 64), (128, 64, 64), (64, 64, 32), (256, 256, 64)]]
    fit = autotuning.fitting(configs, dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), sizes)))
    assert _blocks(fit) == kept
    odd_pair = [_config(128, 64, 64), _config(64, 128, 32)]  # each too large somewhere for a 16x16x16 GEMM
    assert autotuning.fitting(odd_pair, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)) == odd_pair  # none fit: all


# ----------------------------------------------------------------------------- GPU only

RESNET50_CONVS = {  # (C, K, H, kernel, stride, padding) of torchvision ResNet-50 convs
    "stem": (3, 64, 224, 7, 2, 3),
    "l1_3x3": (64, 64, 56, 3, 1, 1),
    "l1_expand": (64, 256, 56, 1, 1, 0),
    "l2_3x3_s2": (128, 128, 56, 3, 2, 1),
    "l3_downsample": (512, 1024, 28, 1, 2, 0),
}


# per ResNet-50 conv, the kinds of config its launches may run: the autotuner picks by time, so each kind is
# checked on its own ("tma": not the stem, whose 3 channels take the flat reduction, see _tma_ok)
_RESNET50_MODES = ([(name, mode) for name in RESNET50_CONVS
                    for mode in (("pointer",) if name == "stem" else ("pointer", "tma"))]
                   + [("l1_expand", "persistent")]  # the 1x1 stride-1 conv: a GEMM over the pixels
                   + [("l1_expand", "persistent, prologue")]  # one reduction step: persistent with the prologue
                   # a batch of 128: TMA row tiles of images at one output position (conv_configs._box)
                   + [(name, "tma, one position") for name in ("l1_3x3", "l2_3x3_s2", "l3_downsample")]
                   + [(name, "persistent, one position") for name in ("l2_3x3_s2", "l3_downsample")]
                   + [(name, "x in L1") for name in ("stem", "l1_3x3", "l2_3x3_s2")])  # convs of several taps


_KINDS = {"pointer": (False, False, False), "tma": (True, False, False), "tma, one position": (True, False, False),
          "persistent": (True, True, False), "persistent, one position": (True, True, False),
          "persistent, prologue": (True, True, False),
          "x in L1": (False, False, True)}  # mode: _kind of its configs


def _kind(config: dict) -> tuple:
    return config["USE_TMA"], config["PERSISTENT"] > 0, config["X_IN_L1"]


def _only_configs(monkeypatch, mode: str) -> None:
    """The conv kernel autotunes among its pointer configs alone (mode "pointer"), its TMA ones ("tma", "tma,
    one position"), its persistent TMA ones ("persistent", "persistent, one position") or its pointer configs
    that cache x in L1 ("x in L1")."""
    kernel = conv._conv_kernel
    kind = _KINDS[mode]
    monkeypatch.setattr(kernel, "configs", [c for c in kernel.configs if _kind(c.kwargs) == kind])
    monkeypatch.setattr(kernel, "cache", {})


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("epilogue", ["full", "stats"])
@pytest.mark.parametrize("name,mode", _RESNET50_MODES)
def test_gpu_resnet50_shapes_bf16(name, mode, epilogue, monkeypatch):
    c, k, h, kernel, stride, padding = RESNET50_CONVS[name]
    # persistent: no prologue but on a short GEMM view (_usable)
    prologue = "none" if name == "stem" or mode in ("persistent", "persistent, one position") else "relu"
    if mode == "tma, one position" and epilogue == "full":  # x's tile from shared memory: no prologue
        prologue = "none"
    one_position = mode.endswith("one position")
    case = _case(c, k, h, kernel, stride, padding, BF16, True, prologue, epilogue, n=128 if one_position else 8)
    x, w, kw = _make(case)
    assert conv.unsupported_reason(x, w, stride, padding, 1, 1) is None
    _only_configs(monkeypatch, mode)
    boxes = _recorded(monkeypatch, "_box")
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert _kind(conv._conv_kernel.best_config.kwargs) == _KINDS[mode]
    if _KINDS[mode][0]:  # TMA: a batch of 8, boxes of several positions (but the GEMM view's pixels); one
        # position: a batch of 128
        ran = conv._conv_kernel.best_config.kwargs
        assert set(boxes) == {(ran["BOX_H"], ran["BOX_W"])}, boxes  # the launch's box is its TMA configs'
        gemm_view = kernel == 1 and stride == 1  # a GEMM over N*H*W pixels: tiles of pixels, box (1, 1)
        assert (boxes[0] == (1, 1)) == (one_position or gemm_view), boxes
    _check_out(out, x, w, kw, name)
    if epilogue == "stats":
        _check_stats(out, mean, var)
        torch.testing.assert_close(mean, out.float().mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(var, out.float().var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)


def _launch_arguments(monkeypatch) -> dict:
    """The arguments by name of the conv kernel's latest autotuned launch, as conv_configs._usable sees them (recorded
    from the constants the autotuner asks conv_configs._config_box for)."""
    launch, config_box = {}, conv_configs._config_box
    monkeypatch.setattr(conv, "_config_box", lambda use_tma, args: launch.update(args) or config_box(use_tma, args))
    return launch


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape,n", [((256, 256, 14, 3, 1, 1), 256), ((512, 1024, 28, 1, 2, 0), 256),
                                     ((64, 64, 56, 3, 1, 1), 8), ((1024, 256, 14, 1, 1, 0), 8),
                                     ((64, 256, 56, 1, 1, 0), 8)],
                         ids=["layer3_3x3-b256", "layer3_downsample-b256", "layer1_3x3-b8", "layer3_1x1-b8",
                              "layer1_expand-b8"])
def test_gpu_each_usable_config_computes_the_prologue_conv(shape, n, monkeypatch):
    """Every config conv_configs._usable lets run a launch with the BN + ReLU prologue, each alone: the autotuner runs
    only the fastest, which can hide a wrong config until another run picks it. ResNet-50 launches whose TMA
    tiles hold images at one output position (batch 256: a 3x3 and the strided 1x1, where two TMA configs
    were wrong from a 5-D box of x, see conv_configs._usable; now 2-D tiles), boxes of several (batch 8), or pixels of a
    GEMM view (a 1x1 of 16 reduction steps, 2-D tiles as well; one of a single step, which the persistent
    configs run too). The register-capped copies of the 128x128 tiles run on each (statistics)."""
    c, k, h, kernel_size, stride, padding = shape
    x, w, kw = _make(_case(c, k, h, kernel_size, stride, padding, BF16, True, "relu", "stats", n=n))
    launch = _launch_arguments(monkeypatch)
    conv.conv2d_fused(x, w, **kw)
    kernel = conv._conv_kernel
    usable = [config for config in kernel.configs if conv_configs._usable(config.all_kwargs(), launch)]
    assert len(usable) > 1 and any(config.kwargs["USE_TMA"] for config in usable)
    for config in usable:
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
        out, mean, var = conv.conv2d_fused(x, w, **kw)
        _check_out(out, x, w, kw, autotuning.describe(config))
        _check_stats(out, mean, var)


@pytest.mark.gpu
@requires_cuda
def test_gpu_relaunches_compute_what_the_jit_launch_computed():
    """Launches like an earlier one run its kernel without triton's JIT path (fusedres.triton.relaunch, by the
    launch plan's key): on the GPU, each of several calls, new inputs every time, an in_scale 4 bytes past a
    16-byte boundary (the JIT specialises pointers on their alignment: another kernel) between aligned ones, x
    channels_last then NCHW (other plans), and the statistics' own launch, meets the reference."""
    case = _case(64, 96, 9, 3, 1, 1, BF16, True, "relu", "stats", n=4)
    for call in range(7):
        # two batch sizes: two keys, alternating; the last two calls' x NCHW
        x, w, kw = _make(dataclasses.replace(case, n=4 + call % 2, channels_last=call < 5))
        if call == 2:
            misaligned = torch.empty(65, device=DEVICE)[1:]
            kw["in_scale"] = misaligned.copy_(kw["in_scale"])
            assert kw["in_scale"].data_ptr() % 16 == 4
        out, mean, var = conv.conv2d_fused(x, w, **kw)
        _check_out(out, x, w, kw, f"call {call}")
        _check_stats(out, mean, var)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("prologue", [False, True], ids=["conv", "prologue-conv"])
def test_gpu_auto_times_the_training_conv_and_keeps_the_faster(prologue, monkeypatch):
    """conv2d_stats on "auto": both convs timed once per signature (ops/dispatch.py), the faster
    kept, and its output and statistics those of the cuDNN path."""
    from fusedres.ops import dispatch

    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    monkeypatch.delenv(dispatch.CACHE_ENV, raising=False)
    gen = seeded(f"auto-{prologue}")
    x = rand_act(gen, (8, 64, 28, 28), BF16, channels_last=True)
    w = rand_act(gen, (128, 64, 3, 3), BF16) / 24
    bn = (rand_vec(gen, 64), (rand_vec(gen, 64, positive=True)), rand_vec(gen, 64, positive=True), rand_vec(gen, 64)) \
        if prologue else (None,) * 4
    args = (x, *bn, w, None, [1, 1], [1, 1], [1, 1], 1, True, True)
    results = {backend: torch.ops.fusedres.conv2d_stats(*args, backend) for backend in ("auto", "cuda")}
    (entry,) = [e for key, e in dispatch.dispatch_table().items() if key.startswith("unit_conv2d|")
                and f"prologue{int(prologue)}" in key]
    assert set(entry["ms"]) == {"cudnn", "triton"}
    assert all(isinstance(ms, float) for ms in entry["ms"].values()), entry
    assert entry["choice"] == min(entry["ms"], key=entry["ms"].get)
    for got, want in zip(results["auto"], results["cuda"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_follows_cudnn_tf32_flag(monkeypatch):
    case = _case(64, 64, 28, 3, 1, 1, F32, True, "relu", "full", n=4)
    x, w, kw = _make(case)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert "allow_tf32" in conv.unsupported_reason(x, w, 1, 1, 1, 1)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert conv.unsupported_reason(x, w, 1, 1, 1, 1) is None
    out, _, _ = conv.conv2d_fused(x, w, **kw)
    # TF32 keeps 10 of fp32's 23 mantissa bits: each product is off by at most about 2**-9 of its size
    # (truncated operands), whatever algorithm cuDNN would pick
    xp = (x.double() * kw["in_scale"].double()[:, None, None] + kw["in_shift"].double()[:, None, None]).relu()
    size = F.conv2d(xp, w.double().abs(), padding=1) * kw["out_scale"].double()[:, None, None]
    err = (out.double() - _unfused(x, w, kw, F64)).abs()
    assert (err <= 2.0**-8 * size + 1e-5).all()


@pytest.mark.gpu
@requires_cuda
def test_gpu_grouped_resnext_shape():
    case = _case(256, 256, 28, 3, 2, 1, BF16, True, "relu", "stats", groups=8, n=4)
    x, w, kw = _make(case)
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    _check_out(out, x, w, kw)
    _check_stats(out, mean, var)


@pytest.mark.gpu
@requires_cuda
# not the strided 3x3 on X_IN_L1 configs alone: one phase of its input gradient has a single tap, which they
# may not run (conv_configs._usable)
@pytest.mark.parametrize("name,mode", [case for case in _RESNET50_MODES if case != ("l2_3x3_s2", "x in L1")])
def test_gpu_input_grad_resnet50_shapes_bf16(name, mode, monkeypatch):
    """conv2d_input_grad on ResNet-50's shapes (the stem at 112x112), bf16 channels_last, against fp64 by the
    module's error rule, on each kind of config."""
    c, k, h, kernel, stride, padding = RESNET50_CONVS[name]
    _only_configs(monkeypatch, mode)
    _check_input_grad((c, k, min(h, 112), kernel, stride, padding, 1, 1, BF16, True, True, "relu"))


# CASES the X_IN_L1 configs may run (conv_configs._usable): several taps, and channels per group a multiple of 4, which
# keeps the hint true merged, flat (r, s, c) or space-to-depth (C' * SH * SW, a multiple of 8) alike
_X_IN_L1_CASES = [case for case in CASES if case.kernel != (1, 1) and case.c // case.groups % 4 == 0]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", _X_IN_L1_CASES, ids=str)
def test_gpu_x_in_l1_configs_match_the_reference(case, monkeypatch):
    """The X_IN_L1 configs alone (x copied in 8-byte runs: a compiler hint, which the interpreter ignores) on
    every dtype, layout, prologue and epilogue of CASES they may run, against the reference."""
    x, w, kw = _make(case)
    _only_configs(monkeypatch, "x in L1")
    out, mean, var = conv.conv2d_fused(x, w, **kw)
    assert _kind(conv._conv_kernel.best_config.kwargs) == _KINDS["x in L1"]
    _check_out(out, x, w, kw, str(case))
    if case.epilogue.startswith("stats"):
        _check_stats(out, mean, var)


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_times_the_training_backward_and_keeps_the_faster(monkeypatch):
    """A training unit's backward on "auto": torch's convolution_backward + BN reduction and the Triton
    kernels timed once per signature (op "unit_conv2d_backward"), the faster kept, and the gradients
    those of the cuda backend."""
    from fusedres.ops import dispatch, functional

    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    monkeypatch.delenv(dispatch.CACHE_ENV, raising=False)
    gen = seeded("auto-backward")
    x = rand_act(gen, (8, 64, 28, 28), BF16, channels_last=True)
    params = [rand_vec(gen, 64, positive=True), rand_vec(gen, 64), rand_act(gen, (64, 64, 3, 3), BF16) / 24]
    grads = {}
    for backend in ("auto", "cuda"):
        leaves = [t.detach().clone().requires_grad_() for t in [x] + params]
        pending = functional.batch_norm_stats(leaves[0], leaves[1], leaves[2], None, None, batch_stats=True,
                                              momentum=0.1, eps=1e-5, backend=backend)
        out = functional.bn_act_conv2d(pending, leaves[3], None, 1, 1, backend=backend)
        out.float().square().mean().backward()
        grads[backend] = [t.grad for t in leaves]
    (entry,) = [e for key, e in dispatch.dispatch_table().items() if key.startswith("unit_conv2d_backward|")]
    assert set(entry["ms"]) == {"cudnn", "triton"}
    assert all(isinstance(ms, float) for ms in entry["ms"].values()), entry
    assert entry["choice"] == min(entry["ms"], key=entry["ms"].get)
    for got, want in zip(grads["auto"], grads["cuda"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.float().abs().max().item())
