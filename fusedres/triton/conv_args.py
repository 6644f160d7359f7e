"""The Triton convs' arguments on the host (conv.py, conv_dgrad.py, conv_wgrad.py): a conv's validated geometry
and why a valid one is left to torch (``_geometry``, ``_limit``), the groups run as one (``_merge_factor``), a
strided conv of few channels run as a stride-1 one (``_space_to_depth``: its input copied by one kernel), its
weight packed for the kernels and cached (``_packed_weight``), checked per-channel vectors (``_vector``)."""

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..ops.backends import capturing, channels_last, conv_allows_tf32, triton_interpreted
from ..ops.writes import version_stamp
from ._host import cdiv
from .relaunch import relaunched

_INTERPRET = triton_interpreted()
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_GROUP_CHANNELS = 16  # grouped convs with fewer input or output channels per group go to cuDNN
# The conv kernels (forward, input and weight gradients) run several consecutive groups as one
# (``_merge_factor``), with a block-diagonal weight: up to this many input and output channels (the GPU
# configs' narrowest column tile) and at most this many groups (a merged group does that many times its
# groups' products)
_MERGED_GROUP_CHANNELS = 64
_MAX_MERGED_GROUPS = 16
_MAX_M = 2**30  # output positions N*P*Q; row indices stay int32
_SPACE_TO_DEPTH_BELOW = 16  # strided convs of fewer input channels run space-to-depth (_space_to_depth_channels)
# Packed weights kept (those needing no gradient: see _packed_weight), least recently used dropped first. A
# converted ResNet-152 in eval mode packs its 155 folded conv weights; a cache smaller than a forward's working
# set would repack every weight every forward.
_PACK_CACHE_SIZE = 1024
_PACK_CACHE: dict = {}
# _PACK_CACHE's reads and writes, which threads sharing a model and the weakref callbacks of freed weights
# (_forget_packing) make at any time; reentrant, as such a callback may run while its thread holds it
_PACK_LOCK = threading.RLock()


def _pair(name: str, v, least: int) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    # written out, not all() over a generator: this runs 3 times per launch, on the host's critical path
    if len(t) != 2 or not (isinstance(t[0], int) and isinstance(t[1], int) and t[0] >= least and t[1] >= least):
        raise ValueError(f"conv2d_fused: {name} must be an int or a pair of ints >= {least}, got {v}")
    return t


def _geometry(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> dict:
    """Validated conv geometry: the kernel's shape, stride, padding and dilation arguments."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"conv2d_fused: x has dtype {x.dtype}; supported are float16, bfloat16 and float32")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv2d_fused: weight has dtype {weight.dtype}, expected x's dtype {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_fused: expected 4-D x (N, C, H, W) and weight (K, C/groups, R, S), got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"conv2d_fused: weight is on {weight.device}, x on {x.device}")
    (n, c, h, w), (k, cg, r, s) = x.shape, weight.shape
    if not isinstance(groups, int) or groups < 1 or c % groups or k % groups or cg != c // groups:
        raise ValueError(f"conv2d_fused: weight of shape {tuple(weight.shape)} with groups={groups} does not fit "
                         f"x with {c} channels (expected weight.shape[1] == C / groups and K divisible by groups)")
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dh, dw = _pair("dilation", dilation, 1)
    p = (h + 2 * ph - dh * (r - 1) - 1) // sh + 1
    q = (w + 2 * pw - dw * (s - 1) - 1) // sw + 1
    if p < 1 or q < 1:
        raise ValueError(f"conv2d_fused: output size ({p}, {q}) is too small for input {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    return dict(N=n, C=c, H=h, W=w, K=k, P=p, Q=q, M=n * p * q, Cg=cg, Kg=k // groups,
                SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, R=r, S=s)


def _merge_factor(geo: dict, groups: int) -> int:
    """How many consecutive groups the conv kernels (forward, input and weight gradients) run as one (1:
    none): the largest divisor of ``groups``, at most _MAX_MERGED_GROUPS, whose merged group has at most
    _MERGED_GROUP_CHANNELS input and output channels. A column tile narrower than a group's output channels
    would compute that many columns for nothing anyway, and a merged group's channels are contiguous rows of x
    (ResNeXt-50's 4-channel groups: 16 to a merged group of 64)."""
    most = min(groups, _MAX_MERGED_GROUPS, _MERGED_GROUP_CHANNELS // max(geo["Cg"], geo["Kg"]))
    return max((m for m in range(1, most + 1) if groups % m == 0), default=1)


def _merged(geo: dict, merge: int) -> dict:
    """The geometry of the conv with ``merge`` consecutive groups run as one (``_merge_factor``)."""
    return geo if merge == 1 else dict(geo, Cg=geo["Cg"] * merge, Kg=geo["Kg"] * merge)


def _limit(geo: dict, x: Tensor, groups: int, merge: int) -> Optional[str]:
    """Why a valid conv with this geometry is left to torch, or None; ``merge``: how many of its groups the
    kernel runs as one (``_merge_factor``)."""
    if not (x.is_cuda or _INTERPRET):
        return f"x is on {x.device}; the Triton conv needs a CUDA tensor (or TRITON_INTERPRET=1)"
    if x.dtype == torch.float32 and not _INTERPRET and not conv_allows_tf32():
        return "float32 runs as TF32, which torch's flags forbid for convs (torch.backends.cudnn.allow_tf32)"
    if groups > merge and min(geo["Cg"], geo["Kg"]) * merge < _MIN_GROUP_CHANNELS:
        merged = f", {geo['Cg'] * merge} / {geo['Kg'] * merge} with {merge} groups run as one" if merge > 1 else ""
        return (f"{geo['Cg']} input / {geo['Kg']} output channels per group{merged}; the Triton conv needs at "
                f"least {_MIN_GROUP_CHANNELS} of each")
    if geo["M"] == 0 or geo["Cg"] * geo["R"] * geo["S"] == 0 or geo["K"] == 0:
        return "the conv is empty"
    if geo["M"] > _MAX_M:
        return f"N*P*Q = {geo['M']} output positions exceed {_MAX_M}"
    return None


def _space_to_depth_channels(geo: dict, groups: int) -> int:
    """C', the channels per pixel a conv runs space-to-depth with (``_space_to_depth``), or 0 for one that
    does not: an ungrouped, undilated, strided conv of fewer than _SPACE_TO_DEPTH_BELOW input channels (the
    stem's 7x7/2 on 3 channels). C' >= C makes each SH x SW block of pixels a whole number of 16-byte runs (in
    16-bit dtypes)."""
    sh, sw = geo["SH"], geo["SW"]
    if groups != 1 or geo["C"] >= _SPACE_TO_DEPTH_BELOW or sh * sw == 1 or (geo["DH"], geo["DW"]) != (1, 1):
        return 0
    return next(c for c in range(geo["C"], geo["C"] + 8) if c * sh * sw % 8 == 0)


def _space_to_depth_geometry(geo: dict, channels: int) -> dict:
    """The geometry of the stride-1, unpadded conv that ``_space_to_depth`` runs the conv of ``geo`` as, with
    ``channels`` = C' (``_space_to_depth_channels``)."""
    sh, sw, r2, s2 = geo["SH"], geo["SW"], -(-geo["R"] // geo["SH"]), -(-geo["S"] // geo["SW"])
    return dict(geo, C=sh * sw * channels, Cg=sh * sw * channels, H=geo["P"] + r2 - 1, W=geo["Q"] + s2 - 1, R=r2,
                S=s2, SH=1, SW=1, PH=0, PW=0)


def _space_to_depth(x: Tensor, geo: dict, channels: int, in_scale: Optional[Tensor] = None,
                    in_shift: Optional[Tensor] = None, in_relu: bool = False) -> tuple[Tensor, dict]:
    """The conv of ``geo`` as a stride-1, unpadded one: (x', its geometry, ``_space_to_depth_geometry``). x'
    (channels_last) holds each SH x SW block of x's zero-padded image (channels padded to ``channels`` = C') as
    one pixel of SH*SW*C' channels, (a*SW + b)*C' + c for row a, column b of the block; the weight becomes (K,
    SH*SW*C', ceil(R/SH), ceil(S/SW)) (``_packed_weight``'s space_to_depth), its taps past R, S zero. The
    outputs are the same rows: tap r of output row p reads padded row SH*p + r, which is row p + r // SH, block
    row r % SH, of x'. Each tap then reads C' * SH * SW contiguous channels instead of C scattered ones. The
    prologue act_in(x * in_scale + in_shift), if ``in_scale`` is given, is applied to x's elements as they are
    copied, as the kernels' prologue is: fp32 arithmetic rounded to x's dtype, NaN through the ReLU; the padding
    stays zero. One pass over x and x' (``_space_to_depth_kernel``)."""
    geo2 = _space_to_depth_geometry(geo, channels)
    out = torch.empty(geo["N"], geo2["H"], geo2["W"], geo2["C"], dtype=x.dtype, device=x.device)
    prologue = in_scale is not None
    _space_to_depth_kernel[(geo["N"] * geo2["H"], cdiv(geo2["W"] * geo2["C"], _SPACE_TO_DEPTH_BLOCK))](
        x, out, in_scale if prologue else out, in_shift if prologue else out, geo["C"], geo["H"], geo["W"],
        geo2["H"], geo2["W"], geo["PH"], geo["PW"], *x.stride(), SH=geo["SH"], SW=geo["SW"], CHANNELS=channels,
        PROLOGUE=prologue, IN_RELU=in_relu, BLOCK=_SPACE_TO_DEPTH_BLOCK)
    return out.permute(0, 3, 1, 2), geo2


_SPACE_TO_DEPTH_BLOCK = 1024  # elements of x' a program writes


@relaunched
@triton.jit
def _space_to_depth_kernel(
    x_ptr,  # (N, C, H, W) any strides
    out_ptr,  # (N, H2, W2, SH, SW, CHANNELS) contiguous: x' of _space_to_depth, channels_last
    in_scale_ptr, in_shift_ptr,  # (C,) fp32, read if PROLOGUE
    C, H, W, H2, W2, PH, PW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    SH: tl.constexpr, SW: tl.constexpr, CHANNELS: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Each element of x' reads its element of x's zero-padded image (zero in the padding and past C), with the
    # prologue applied to those inside x (fp32, rounded to x's dtype), and is written once. Program (n*H2 + i,
    # b) writes elements [b*BLOCK, (b+1)*BLOCK) of x' row i of image n, so only the program divides by a
    # runtime value, once: a flat index decoded per element took 32 64-bit divisions a thread (sm_90 PTX,
    # 8 elements a thread), and the copy about 0.9 ms at ResNet-50's batch 256 on an H200 (the stem's time
    # less its conv kernel's).
    row = tl.program_id(0)
    n = row // H2
    i = row % H2
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (W2, SH, SW, CHANNELS) of the row, flat
    mask = j < W2 * (SH * SW * CHANNELS)
    c = j % CHANNELS
    w = j // (CHANNELS * SW * SH) * SW + j // CHANNELS % SW - PW
    h = i * SH + j // (CHANNELS * SW) % SH - PH
    inside = mask & (c < C) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    v = tl.load(x_ptr + n.to(tl.int64) * stride_xn + c.to(tl.int64) * stride_xc + h.to(tl.int64) * stride_xh
                + w.to(tl.int64) * stride_xw, mask=inside, other=0.0)
    if PROLOGUE:  # 0 * 0 + 0 outside x: the padding stays zero
        v = (v.to(tl.float32) * tl.load(in_scale_ptr + c, mask=inside, other=0.0)
             + tl.load(in_shift_ptr + c, mask=inside, other=0.0))
        if IN_RELU:
            v = tl.where(v < 0, 0.0, v)  # like clamp_min(0): NaN propagates
        v = v.to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * (W2 * (SH * SW * CHANNELS)) + j, v, mask=mask)


def _packed_weight(weight: Tensor, groups: int, transposed: bool = False, taps=None, merge: int = 1,
                   space_to_depth: Optional[tuple[int, int, int]] = None) -> Tensor:
    """weight (K, Cg, R, S) as a contiguous (G, R*S*Cg, Kg) tensor, row (r*S + s)*Cg + c of group g; or
    ``transposed``, the weight of the input-gradient conv: (G, R*S*Kg, Cg), row (r*S + s)*Kg + k holding
    weight[g*Kg + k, :, R-1-r, S-1-s] (the kernel flipped, input and output channels swapped). ``taps``
    (range of kernel rows, range of kernel columns) packs only those taps, as if the weight had no others.
    With ``merge`` consecutive groups run as one (``_merge_factor``): (G/merge, R*S*merge*Cg, merge*Kg), each
    merged group's weight block-diagonal (channels of one group meet only that group's; zeros elsewhere,
    written, not multiplied, so a non-finite weight stays in its group), and likewise transposed. ``space_to_depth``
    (SH, SW, C'), for a conv run space-to-depth (``_space_to_depth``): the weight of that conv,
    (K, SH*SW*C', ceil(R/SH), ceil(S/SW)), packed as above.

    Cached per (data_ptr, shape, strides, dtype, device, groups, transposed, taps, merge, space_to_depth) and
    checked against the weight's storage (weakly referenced: an entry goes when its weight's storage is freed, so a
    weight made anew at every call, a cast say, leaves nothing behind), its version counter and the steps of fused
    optimizers (which move no version counter, ``ops/writes.py``), so in-place updates repack: a fold without a
    BatchNorm is a detached view of the trained weight itself; only for a weight that needs no gradient
    (a BatchNorm-folded weight, a frozen layer's). A trained weight is packed at every call: each optimizer step
    changes it anyway, autocast hands the conv a new copy of it each step (entries that never hit again, each
    holding its weight and packing), and a write through ``.data`` (a manual update) leaves its version counter
    as it was, so a cached packing would go on serving the old values. Inference tensors have no version counter
    and are packed on every call, as is a weight packed while a CUDA graph is captured (its packing is written only
    when the graph replays). Not seen: writes through ``.data`` to a weight that needs no gradient."""
    key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device, groups, transposed,
           taps, merge, space_to_depth)
    version = version_stamp(weight) if _packing_kept(weight) else None
    with _PACK_LOCK:
        hit = _PACK_CACHE.get(key)
        if hit is not None and version is not None and hit[1] == version and hit[0]() is weight.untyped_storage():
            _PACK_CACHE[key] = _PACK_CACHE.pop(key)  # most recently used last
            return hit[2]
    chosen = weight.detach()
    if taps is not None:
        chosen = chosen[:, :, _as_slice(taps[0]), _as_slice(taps[1])]
    if space_to_depth is not None:
        chosen = _space_to_depth_weight(chosen, *space_to_depth)
    k, cg, r, s = chosen.shape
    grouped = chosen.reshape(groups // merge, merge, k // groups, cg, r, s)
    # per group, its (R, S, rows, columns) block: rows the input channels of the conv the kernel runs
    if transposed:  # flip() copies even along a dimension of one tap (a 1x1 conv's): those are left out
        flipped = [dim for dim in (4, 5) if grouped.shape[dim] > 1]
        blocks = (grouped.flip(flipped) if flipped else grouped).permute(0, 1, 4, 5, 2, 3)
    else:
        blocks = grouped.permute(0, 1, 4, 5, 3, 2)
    rows, cols = blocks.shape[-2:]
    if merge == 1:  # one copy
        packed = blocks[:, 0].contiguous().reshape(groups, r * s * rows, cols)
    else:
        packed = blocks.new_zeros(groups // merge, r, s, merge, rows, merge, cols)
        for j in range(merge):
            packed[:, :, :, j, :, j, :] = blocks[:, j]
        packed = packed.reshape(groups // merge, r * s * merge * rows, merge * cols)
    if version is not None and not capturing(weight.device):  # captured, the packing is filled at replays only
        storage = weakref.ref(weight.untyped_storage(), lambda storage: _forget_packing(key, storage))
        with _PACK_LOCK:
            _PACK_CACHE.pop(key, None)
            if len(_PACK_CACHE) >= _PACK_CACHE_SIZE:
                _PACK_CACHE.pop(next(iter(_PACK_CACHE)))  # the least recently used
            _PACK_CACHE[key] = (storage, version, packed)
    return packed


def _forget_packing(key: tuple, storage: weakref.ref) -> None:
    """Drop the _PACK_CACHE entry ``key`` whose weight's ``storage`` was just freed, unless another took its place."""
    with _PACK_LOCK:
        entry = _PACK_CACHE.get(key)
        if entry is not None and entry[0] is storage:
            del _PACK_CACHE[key]


def _packing_kept(weight: Tensor) -> bool:
    """Whether ``_packed_weight`` keeps its packing of ``weight``: one that needs no gradient and has a version
    counter (no inference tensor)."""
    return not (weight.requires_grad or weight.is_inference())


def _as_slice(taps: range) -> slice:
    return slice(taps.start, taps.stop, taps.step)


def _space_to_depth_weight(weight: Tensor, sh: int, sw: int, channels: int) -> Tensor:
    """weight (K, C, R, S) of a conv run space-to-depth with C' = ``channels`` (``_space_to_depth``):
    w'[k, (a*SW + b)*C' + c, i, j] = weight[k, c, SH*i + a, SW*j + b], zero past C, R and S."""
    k, c, r, s = weight.shape
    r2, s2 = -(-r // sh), -(-s // sw)
    padded = F.pad(weight, (0, s2 * sw - s, 0, r2 * sh - r, 0, channels - c))
    return padded.reshape(k, channels, r2, sh, s2, sw).permute(0, 3, 5, 1, 2, 4).reshape(k, sh * sw * channels, r2, s2)


def _space_to_depth_weight_grad(grad: Tensor, weight_shape: tuple, sh: int, sw: int, channels: int) -> Tensor:
    """The gradient of the weight (K, C, R, S) of ``weight_shape`` from ``grad``, that of its space-to-depth
    form (``_space_to_depth_weight``, whose adjoint this is): each weight entry's one place in it."""
    k, c, r, s = weight_shape
    r2, s2 = grad.shape[2:]
    blocks = grad.reshape(k, sh, sw, channels, r2, s2).permute(0, 3, 4, 1, 5, 2)
    return blocks.reshape(k, channels, r2 * sh, s2 * sw)[:, :c, :r, :s]


def _vector(fn: str, name: str, v: Tensor, length: int, x: Tensor) -> Tensor:
    if v.dtype != torch.float32:
        raise TypeError(f"{fn}: {name} must be a float32 tensor, got {v.dtype}")
    if tuple(v.shape) != (length,) or v.device != x.device:
        raise ValueError(f"{fn}: {name} must have shape ({length},) on {x.device}, got shape "
                         f"{tuple(v.shape)} on {v.device}")
    return v.contiguous()


def _runnable_merge(fn: str, geo: dict, x: Tensor, groups: int) -> int:
    """How many of a valid conv's groups the kernels run as one (``_merge_factor``); raises RuntimeError with
    ``_limit``'s sentence, after ``fn``, for a conv they leave to torch."""
    merge = _merge_factor(geo, groups)
    reason = _limit(geo, x, groups, merge)
    if reason is not None:
        raise RuntimeError(f"{fn}: {reason}")
    return merge


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last(t) else torch.contiguous_format
