"""The public functional API: input checks, layout and dtype normalisation, then the ops.

A unit's conv output is carried as a ``PendingBN``: the raw conv output ``y`` plus the
per-channel statistics its BatchNorm will use. The BatchNorm (+ residual + ReLU) is applied
only by whoever consumes it: ``bn_act`` (materialises the activation) or ``bn_act_conv2d``
(the next conv applies it while loading its input, and nothing normalised is ever saved).

Bad input raises here, before any kernel runs, with torch-style messages that name the
argument.
"""

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends, registry, torch_backend, unit_conv
from .registry import same_layout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtype in which BatchNorm computes for an input of each floating dtype (``registry.compute_dtype``).
_COMPUTE_DTYPES = {dtype: torch.float64 if dtype == torch.float64 else torch.float32 for dtype in FLOAT_DTYPES}


class PendingBN(NamedTuple):
    """bn(y) = (y - mean) * invstd * weight + bias, not yet applied.

    ``sync_group`` and ``count``: the name of the process group whose ranks' batches the
    statistics were taken over, and the number of values per channel on all those ranks;
    "" and 0 when the statistics are y's own (or running statistics).
    """

    y: Tensor
    mean: Tensor
    invstd: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    batch_stats: bool
    sync_group: str = ""
    count: int = 0

    def normalised_like(self, other: "PendingBN") -> bool:
        """Whether one ``bn_act`` can apply both: batch statistics in both or in neither, and
        synchronised over the same process group or not at all."""
        return ((self.batch_stats, self.sync_group, self.count)
                == (other.batch_stats, other.sync_group, other.count))


def _kernel_layout(t: Tensor) -> Tensor:
    """t itself when contiguous NCHW or channels_last, else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _check_activation(fn: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{fn}: expected {name} to be a 4D (N, C, H, W) tensor, got {t.dim()}D "
                         f"input of size {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: expected {name} to have a floating dtype (float16, bfloat16, "
                        f"float32 or float64), got {t.dtype}")


def _check_pending(fn: str, pending) -> None:
    if not isinstance(pending, PendingBN):
        raise TypeError(f"{fn}: expected a PendingBN (from batch_norm_stats or conv_batch_norm_stats), got "
                        f"{type(pending).__name__}")


def _is_int(value) -> bool:
    """Whether ``value`` is an integer as torch's conv arguments take one (int, a numpy or symbolic integer)."""
    return hasattr(type(value), "__index__") and not isinstance(value, Tensor)


def _check_channel_vector(fn: str, name: str, v: Optional[Tensor], channels: int,
                          device: torch.device, dtype: torch.dtype) -> None:
    """Raises unless ``v`` (if given) is on ``device`` with one element per channel, in a dtype that torch's
    BatchNorm takes for an input of ``dtype``: the input's own, or its compute dtype (float32, float64 for
    float64)."""
    if v is None:
        return
    if v.device != device:
        raise RuntimeError(f"{fn}: expected {name} to be on {device} like the input, got {v.device}")
    if v.numel() != channels:
        raise ValueError(f"{fn}: {name} should contain {channels} elements (one per channel of "
                         f"the BatchNorm's input), not {v.numel()}")
    if v.dtype != dtype and v.dtype != _COMPUTE_DTYPES[dtype]:
        also = "" if _COMPUTE_DTYPES[dtype] == dtype else f" (or {name} type {_COMPUTE_DTYPES[dtype]})"
        raise RuntimeError(f"{fn}: input type ({dtype}) and {name} type ({v.dtype}) should be the same{also}")


def _check_running_stat(fn: str, name: str, v: Tensor, channels: int, updated: bool) -> None:
    """Raises unless the running statistic ``v`` is a (C,) tensor without requires_grad, as torch's BatchNorm
    requires, and where ``updated``, one that can take each channel's update in place (torch would write every
    channel's into an element that several share); ``_check_channel_vector`` checked the rest."""
    if v.dim() != 1:
        raise RuntimeError(f"{fn}: expected {name} to be a 1D tensor of size ({channels},), got size "
                           f"{tuple(v.shape)}")
    if v.requires_grad:
        raise RuntimeError(f"{fn}: BatchNorm is not differentiable with respect to {name}; it cannot have "
                           "requires_grad=True")
    if updated and channels > 1 and v.stride(0) == 0:
        raise RuntimeError(f"{fn}: {name} is updated in place, but more than one of its elements refers to a "
                           "single memory location; clone() it first")


def _check_like(fn: str, name: str, t: Tensor, y: Tensor) -> None:
    _check_activation(fn, name, t)
    if t.device != y.device:
        raise RuntimeError(f"{fn}: expected {name} to be on {y.device} like the input, got {t.device}")
    if t.shape != y.shape:
        raise ValueError(f"{fn}: {name} of size {tuple(t.shape)} does not match the conv output "
                         f"of size {tuple(y.shape)}")


def _group_stats(mean: Tensor, var: Tensor, count: int,
                 process_group) -> tuple[Tensor, Tensor, int]:
    """(mean, biased var, count) of the union of all ranks' batches, from each rank's own.

    Chan et al.'s parallel combination over the ranks r, with counts n_r (ranks may hold
    different batch sizes, or none) and N = sum n_r:
        mean = sum n_r * mean_r / N,    var = sum n_r * (var_r + (mean_r - mean)^2) / N.
    All-gathered as one fp64 tensor per rank, so counts stay exact.
    """
    if count == 0:  # an empty batch's statistics are NaN; its weight in the sums is 0
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    local = torch.cat([mean.double(), var.double(),
                       mean.new_full((1,), count, dtype=torch.float64)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    channels = mean.numel()
    means, variances, counts = torch.stack(gathered).split([channels, channels, 1], dim=1)
    total = counts.sum()
    group_mean = (counts * means).sum(0) / total
    group_var = (counts * (variances + (means - group_mean).square())).sum(0) / total
    return group_mean.to(mean.dtype), group_var.to(var.dtype), int(total.item())


def batch_norm_stats(
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    batch_stats: bool,
    momentum: float,
    eps: float,
    backend: str = "auto",
    process_group=None,
) -> PendingBN:
    """Statistics of the conv output ``y`` for its BatchNorm; running stats updated in place.

    ``batch_stats`` and ``momentum`` are what ``nn.BatchNorm2d.forward`` would use
    (see ``fusedres.reference.batch_norm_momentum``). With batch statistics the running stats
    become r = (1 - momentum) * r + momentum * stat, with the unbiased variance
    var * M / (M - 1) for M values per channel; invstd = 1 / sqrt(var + eps). An empty ``y`` (M = 0) leaves
    them alone, as ``F.batch_norm`` does, and its PendingBN has nothing to normalise (``_empty_batch``).

    ``process_group`` (a ``torch.distributed`` group of more than one rank; needs batch
    statistics): the statistics, M and the running stats are those of the union of all its
    ranks' batches, as ``nn.SyncBatchNorm`` computes them, and the backward of the op that
    consumes the result all-reduces BatchNorm's gradient sums over the group. Every rank of the
    group must make the same calls in the same order.
    """
    fn = "fusedres.batch_norm_stats"
    _check_activation(fn, "input", y)
    _check_batch_norm_args(fn, y.shape, y.device, y.dtype, weight, bias, running_mean, running_var,
                           batch_stats, momentum, eps, process_group)
    y = _kernel_layout(y)
    if batch_stats and y.numel() == 0 and not _synchronises(process_group):
        return _empty_batch(y, weight, bias)
    with torch.no_grad():
        stats = registry.channel_stats(y, backend) if batch_stats else None
    return _pending_bn(y, stats, weight, bias, running_mean, running_var, momentum, eps, process_group, backend)


def _synchronises(process_group) -> bool:
    """Whether batch statistics are combined over ``process_group``: a group of more than one rank."""
    return process_group is not None and dist.get_world_size(process_group) > 1


def _check_batch_norm_args(fn: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype, weight,
                           bias, running_mean, running_var, batch_stats: bool, momentum, eps,
                           process_group) -> None:
    """Raises for BatchNorm arguments that do not fit its input of size ``shape``, on ``device`` in ``dtype``,
    before anything runs: so a call that raises leaves the running statistics as they were."""
    for name, value in (("momentum", momentum), ("eps", eps)):  # as F.batch_norm takes them (symbolic too)
        if not (isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt))
                or (isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex())):
            raise TypeError(f"{fn}: expected {name} to be a float, got {value!r}")
    channels = shape[1]
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_channel_vector(fn, name, v, channels, device, dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together")
    if running_mean is not None:
        _check_running_stat(fn, "running_mean", running_mean, channels, batch_stats)
        _check_running_stat(fn, "running_var", running_var, channels, batch_stats)
    if not batch_stats and running_mean is None:
        raise ValueError(f"{fn}: running statistics are required when batch_stats=False")
    if process_group is not None and not batch_stats:
        raise ValueError(f"{fn}: a process_group synchronises batch statistics; "
                         "it needs batch_stats=True")
    # As F.batch_norm: one value per channel raises, none (an empty batch) does not.
    if batch_stats and not _synchronises(process_group) and shape[0] * math.prod(shape[2:]) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)}")
    _check_eps(eps, batch_stats)


def _check_eps(eps, batch_stats: bool) -> None:
    """F.batch_norm's checks of eps (torch 2.14), in its words: positive with batch statistics (a zero eps divides by
    0), non-negative with running ones. Not of a tensor eps inside a compiled graph, where its value is not known."""
    if isinstance(eps, Tensor) and torch.compiler.is_compiling():
        return
    if batch_stats and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _empty_batch(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> PendingBN:
    """The PendingBN of an empty ``y`` with batch statistics, as F.batch_norm treats an empty batch: the running
    statistics left alone, and nothing to normalise (mean 0 and invstd 1, as running statistics, so that no
    backward divides by its count of 0 values per channel; weight and bias get zero gradients)."""
    mean = y.new_zeros(y.shape[1], dtype=registry.compute_dtype(y))
    return PendingBN(y, mean, torch.ones_like(mean), weight, bias, False)


def _pending_bn(y: Tensor, stats: Optional[tuple[Tensor, Tensor]], weight, bias, running_mean,
                running_var, momentum: float, eps: float, process_group, backend: str) -> PendingBN:
    """The PendingBN of y from this rank's batch statistics ``stats`` = (mean, biased var), or
    from the running statistics when ``stats`` is None; see ``batch_norm_stats``."""
    synced = _synchronises(process_group)
    count = y.numel() // max(y.shape[1], 1)
    momentum, eps = (float(v) if isinstance(v, Tensor) else v for v in (momentum, eps))  # a 0-dim tensor's value
    with torch.no_grad():  # the consumer op owns the whole BatchNorm backward
        if stats is not None:
            mean, var = stats
            if synced:
                mean, var, count = _group_stats(mean, var, count, process_group)
                if count <= 1:
                    raise ValueError("Expected more than 1 value per channel when training, got "
                                     f"{count} over the process group's ranks")
            # one launch where a kernel backend runs it; traced by torch.compile, torch's ops (for inductor to fuse)
            kernels = torch_backend if torch.compiler.is_compiling() else backends.select(backend, y)
            invstd = kernels.finish_batch_stats(mean, var, running_mean, running_var, momentum, eps, count)
        else:
            mean = running_mean.to(registry.compute_dtype(y), copy=True)
            invstd = torch.rsqrt(running_var.to(mean.dtype) + eps)
    sync = (process_group.group_name, count) if synced else ()
    return PendingBN(y, mean, invstd, weight, bias, stats is not None, *sync)


def bn_act(
    pending: PendingBN,
    residual: Union[Tensor, PendingBN, None] = None,
    *,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """act(bn(y) + residual); ``residual`` may be a tensor or another pending BatchNorm. The result has y's dtype
    (where eager's sum would take the wider of y's and the residual's), computed in fp32 or y's float64."""
    fn = "fusedres.bn_act"
    _check_pending(fn, pending)
    y = pending.y
    identity = sc = None
    if isinstance(residual, PendingBN):
        _check_like(fn, "shortcut", residual.y, y)
        if not residual.normalised_like(pending):
            raise ValueError(f"{fn}: both BatchNorms must use batch statistics, or neither, and be "
                             "synchronised over the same process group, or neither")
        sc = residual._replace(y=same_layout(residual.y, y))
    elif residual is not None:
        _check_like(fn, "residual", residual, y)
        if residual.dtype == torch.float64 and y.dtype != torch.float64:  # no kernel reads float64: added in fp32
            residual = residual.float()  # as other dtypes are, on every backend alike
        identity = same_layout(residual, y)
    sc_args = (None,) * 5 if sc is None else (sc.y, sc.mean, sc.invstd, sc.weight, sc.bias)
    return registry.bn_act(
        y, pending.mean, pending.invstd, pending.weight, pending.bias, identity, *sc_args,
        pending.batch_stats, relu, backend, pending.sync_group, pending.count)


def _conv_tuple(fn: str, name: str, value: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(value, str):
        raise ValueError(f"{fn}: padding={value!r} is not supported; give explicit integers")
    values = [value, value] if _is_int(value) else list(value) if isinstance(value, (tuple, list)) else None
    if values is None or not all(_is_int(v) for v in values):
        raise TypeError(f"{fn}: expected {name} to be an int or a pair of ints, got {value!r}")
    if len(values) != 2:
        raise ValueError(f"{fn}: expected {name} to have 2 elements, got {values}")
    return values


def conv_output_size(x_size: Sequence[int], weight_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """(N, K, P, Q) of conv2d(x, weight) for 4-D sizes and two-int stride, padding, dilation."""
    return [x_size[0], weight_size[0]] + [
        (x_size[i] + 2 * padding[i - 2] - dilation[i - 2] * (weight_size[i] - 1) - 1) // stride[i - 2] + 1
        for i in (2, 3)]


def _checked_conv_args(fn: str, y: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                       stride, padding, dilation, groups: int) -> tuple:
    """(conv_weight, conv_bias, stride, padding, dilation) checked against the conv input ``y``,
    in autocast's dtype under autocast (float64 ones left alone, as autocast does), as lists of two ints."""
    in_channels = y.shape[1]
    if not isinstance(conv_weight, Tensor):
        raise TypeError(f"{fn}: expected conv_weight to be a Tensor, got {type(conv_weight).__name__}")
    if not _is_int(groups):
        raise TypeError(f"{fn}: expected groups to be an int, got {groups!r}")
    if conv_weight.dim() != 4:
        raise ValueError(f"{fn}: expected a 4D conv weight, got size {tuple(conv_weight.shape)}")
    if conv_weight.device != y.device:
        raise RuntimeError(f"{fn}: expected conv_weight to be on {y.device} like the input, "
                           f"got {conv_weight.device}")
    if groups < 1 or in_channels % groups or conv_weight.shape[0] % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the {in_channels} input and "
                         f"{conv_weight.shape[0]} output channels")
    if conv_weight.shape[1] * groups != in_channels:
        raise RuntimeError(f"{fn}: weight of size {tuple(conv_weight.shape)} expects "
                           f"{conv_weight.shape[1] * groups} input channels, got {in_channels}")
    if conv_bias is not None and conv_bias.shape != (conv_weight.shape[0],):
        raise ValueError(f"{fn}: conv_bias should have size ({conv_weight.shape[0]},), "
                         f"got {tuple(conv_bias.shape)}")
    stride, padding, dilation = (_conv_tuple(fn, "stride", stride), _conv_tuple(fn, "padding", padding),
                                 _conv_tuple(fn, "dilation", dilation))
    if min(stride + dilation) < 1 or min(padding) < 0:  # with F.conv2d's messages
        what = ("non-positive stride" if min(stride) < 1 else "non-positive dilation" if min(dilation) < 1
                else "negative padding")
        raise RuntimeError(f"{fn}: {what} is not supported, got stride={stride}, padding={padding}, "
                           f"dilation={dilation}")
    input_dtype = y.dtype
    dtype = backends.autocast_dtype(y.device.type)
    if dtype is not None:
        # What autocast does to conv2d: every operand but a float64 one in its dtype (the input inside the op).
        if conv_weight.dtype != torch.float64:
            conv_weight = conv_weight.to(dtype)
        if conv_bias is not None and conv_bias.dtype != torch.float64:
            conv_bias = conv_bias.to(dtype)
        if input_dtype != torch.float64:
            input_dtype = dtype
    if conv_weight.dtype != input_dtype:
        raise RuntimeError(f"{fn}: input type ({input_dtype}) and weight type ({conv_weight.dtype}) "
                           "should be the same")
    if conv_bias is not None and conv_bias.dtype != input_dtype:
        raise RuntimeError(f"{fn}: input type ({input_dtype}) and bias type ({conv_bias.dtype}) should be the same")
    return conv_weight, conv_bias, stride, padding, dilation


def bn_act_conv2d(
    pending: PendingBN,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    *,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """conv2d(act(bn(y))) with the activation recomputed in backward instead of saved."""
    _check_pending("fusedres.bn_act_conv2d", pending)
    conv_args = _checked_conv_args("fusedres.bn_act_conv2d", pending.y, conv_weight, conv_bias,
                                   stride, padding, dilation, groups)
    return unit_conv.bn_act_conv2d(
        pending.y, pending.mean, pending.invstd, pending.weight, pending.bias, *conv_args, groups,
        pending.batch_stats, relu, backend, pending.sync_group, pending.count)


def conv_batch_norm_stats(
    source: Union[Tensor, PendingBN],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    stride: Union[int, Sequence[int]],
    padding: Union[int, Sequence[int]],
    dilation: Union[int, Sequence[int]],
    groups: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    batch_stats: bool,
    momentum: float,
    eps: float,
    relu: bool = True,
    backend: str = "auto",
    process_group=None,
) -> PendingBN:
    """One unit up to its BatchNorm: ``batch_norm_stats(conv2d(x))`` for a tensor source x, or
    ``batch_norm_stats(bn_act_conv2d(source))`` for a pending BatchNorm (applied with ``relu``
    as the conv's prologue, recomputed in backward), with the arguments of those two.

    With batch statistics the conv and the statistics of its output are one op (``conv2d_stats``):
    with the Triton conv (the triton backend where it supports the conv; "auto" on CUDA when it
    measured faster) one launch that also reduces its output to the statistics as it stores it,
    and one that merges them; with cuDNN's, the conv and then the statistics pass. The running
    statistics are only updated: the batch's do not depend on them.
    """
    fn = "fusedres.conv_batch_norm_stats"
    pending = isinstance(source, PendingBN)
    if pending:
        y = source.y
        prologue = (source.mean, source.invstd, source.weight, source.bias)
        flags = (source.batch_stats, relu, backend, source.sync_group, source.count)
    else:
        _check_activation(fn, "input", source)
        y = _kernel_layout(source)
        prologue = (None,) * 4
        flags = (False, False, backend, "", 0)
    conv_weight, conv_bias, stride, padding, dilation = _checked_conv_args(
        fn, y, conv_weight, conv_bias, stride, padding, dilation, groups)
    if not pending and y.dtype != conv_weight.dtype:
        y = y.to(conv_weight.dtype)  # autocast's cast of a conv input
    conv = (*prologue, conv_weight, conv_bias, stride, padding, dilation, groups)
    if batch_stats:
        out_size = conv_output_size(y.shape, conv_weight.shape, stride, padding, dilation)
        if min(out_size[2:]) < 1:
            raise ValueError(f"{fn}: input of size {tuple(y.shape)} is too small for a conv weight of size "
                             f"{tuple(conv_weight.shape)} (output size {tuple(out_size)})")
        _check_batch_norm_args(fn, out_size, y.device, conv_weight.dtype, weight, bias, running_mean, running_var,
                               True, momentum, eps, process_group)
    if not batch_stats or (math.prod(out_size) == 0 and not _synchronises(process_group)):
        # The conv alone; batch_norm_stats then takes the running statistics, or an empty batch's.
        if pending:
            out = unit_conv.bn_act_conv2d(y, *conv, *flags)
        else:
            out = torch.nn.functional.conv2d(y, conv_weight, conv_bias, stride, padding, dilation, groups)
        return batch_norm_stats(out, weight, bias, running_mean, running_var, batch_stats=batch_stats,
                                momentum=momentum, eps=eps, backend=backend, process_group=process_group)
    out, mean, var = unit_conv.conv2d_stats(y, *conv, *flags)
    return _pending_bn(out, (mean, var), weight, bias, running_mean, running_var, momentum, eps,
                       process_group, backend)
