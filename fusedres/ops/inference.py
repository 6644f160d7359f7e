"""Inference path of one conv unit: BatchNorm folded into the conv once, then one launch.

Eval-mode BatchNorm is a per-channel affine map, so it folds into the conv before it (per output
channel o; gamma = 1 and beta = 0 without affine, b = 0 without a conv bias):

    g[o] = gamma[o] / sqrt(running_var[o] + eps),   W'[o] = W[o] * g[o],
    b'[o] = (b[o] - running_mean[o]) * g[o] + beta[o]
    out  = act(conv2d(x, W', b') + residual)        (op fusedres::conv_bias_act; act = ReLU or identity)

Implementations: ``cudnn`` = ``torch.cudnn_convolution_relu`` / ``_add_relu``, one cuDNN graph conv ->
+ alpha * z -> + bias -> ReLU in fp32 (ATen native/cudnn/Conv_v8.cpp ``build_opgraph_fused``; the entry
points in ConvShared.cpp check no shapes, not even z's): CUDA, ReLU only, fp32/fp16/bf16, bias in x's
dtype. ``triton`` = ``fusedres.triton.conv.conv2d_fused``, the bias (fp32) as its epilogue shift.
``torch`` = F.conv2d, add, ReLU: any device and dtype, the reference.

``backend="auto"``: torch on CPU. On CUDA, ``dispatch.MeasuredDispatch`` (see ``dispatch.py``) times
every available implementation on the first call per (GPU, dtype, layout, shapes, conv arguments,
bias / residual / ReLU, torch's cuDNN-enabled and TF32 flags) and keeps the fastest whose output agrees with
torch's (``dispatch_table()``; ``FUSEDRES_DISPATCH_CACHE=<path>`` shares them across processes); while a CUDA
graph is captured, a known choice, else the first available of cudnn, triton, torch. The output is dense in x's
memory format (channels_last when x is channels_last and not also NCHW-contiguous) whichever implementation ran.
"""

import contextlib
import operator
import weakref
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import custom_op
from torch.utils.weak import WeakIdKeyDictionary

from . import backends, dispatch, eager, writes
from .functional import _check_activation, _check_eps, _conv_tuple, _is_int, conv_output_size

IMPLEMENTATIONS = ("cudnn", "triton", "torch")  # also the fixed order when nothing is measured
_CUDNN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- folding
def fold_batch_norm(conv_weight: Tensor, conv_bias: Optional[Tensor], running_mean: Tensor,
                    running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    eps: float, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(W', b') of a conv followed by an eval-mode BatchNorm, as in the module docstring.

    Computed in float32 (float64 for a float64 weight), cast to ``dtype`` (default: the conv weight's)
    only at the end. ``bn_weight`` and ``bn_bias`` are None for ``affine=False``.
    """
    for name, kind in (("conv_weight", conv_weight.dtype), ("dtype", dtype or torch.float32)):
        if not kind.is_floating_point:  # an integer fold would be truncated
            raise TypeError(f"fold_batch_norm: expected {name} to be of a floating dtype, got {kind}")
    _check_eps(eps, batch_stats=False)
    out_channels = conv_weight.shape[0]
    for name, v in (("conv_bias", conv_bias), ("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if v is not None and v.numel() != out_channels:
            raise ValueError(f"fold_batch_norm: {name} should contain {out_channels} elements (one per "
                             f"output channel), not {v.numel()}")
    cdt = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(cdt) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(cdt)
    shift = (-running_mean.to(cdt) if conv_bias is None else conv_bias.to(cdt) - running_mean.to(cdt)) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(cdt)
    dtype = conv_weight.dtype if dtype is None else dtype
    return (conv_weight.to(cdt) * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


_ABSENT = object()


@contextlib.contextmanager
def made_to_keep():
    """Where a tensor kept across inference calls is made (a fold, a summed bias): outside inference_mode, where it
    would have no version counter (so the Triton conv could not keep its packing of a folded weight,
    ``conv_args._packed_weight``, and would pack it at every call), and without autograd."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _member(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter or buffer, reading the module's dicts directly: this
    runs for every source of every folded conv at every inference call, where ``nn.Module.__getattr__``
    (~0.5 us a lookup) would be a third of ``FoldedWeights.get``'s time."""
    t = module._parameters.get(name, _ABSENT)
    if t is _ABSENT:
        t = module._buffers.get(name, _ABSENT)
    return getattr(module, name) if t is _ABSENT else t  # e.g. a parametrized weight (a property)


def _snapshot(t: Optional[Tensor]) -> Optional[tuple]:
    """What must stay the same for ``t``'s folded value to stay valid: its storage (weakly referenced: a
    storage freed and another allocated at the same address, as a caching allocator does after
    ``module.half().float()``, is not the same one), data pointer, version counter and dtype. An
    inference tensor has no version counter (-1 here), so no snapshot of it is ever unchanged."""
    if t is None:
        return None
    return weakref.ref(t.untyped_storage()), t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype


def _unchanged(t: Optional[Tensor], snapshot: Optional[tuple]) -> bool:
    """Whether ``t``, the very tensor ``snapshot`` was taken of (or None), is still as it was then."""
    if t is None:
        return True
    storage, ptr, version, dtype = snapshot
    return (storage() is t.untyped_storage() and t.data_ptr() == ptr and version >= 0 and t._version == version
            and t.dtype == dtype)


def _fold_sources(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> tuple:
    """The tensors a fold of ``conv`` and ``bn`` depends on: ``fold_batch_norm``'s six, and
    num_batches_tracked. BatchNorm's forward updates the running stats below autograd, without moving their
    version counters, but it moves num_batches_tracked's (a Python add_): that one is watched too. Without a
    BatchNorm: the conv's weight and bias."""
    if bn is None:
        return _member(conv, "weight"), _member(conv, "bias")
    return (_member(conv, "weight"), _member(conv, "bias"), _member(bn, "running_mean"),
            _member(bn, "running_var"), _member(bn, "weight"), _member(bn, "bias"),
            _member(bn, "num_batches_tracked"))


def _folded(sources: tuple, bn: Optional[nn.BatchNorm2d], dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``fold_batch_norm`` of ``_fold_sources``' ``sources`` in ``dtype``; without a BatchNorm, the conv's weight and
    bias in ``dtype``, detached (where already in ``dtype``, views sharing their storage and version counters)."""
    if bn is None:
        return tuple(None if t is None else t.detach().to(dtype) for t in sources)
    return fold_batch_norm(*sources[:6], bn.eps, dtype)


def _eps(bn: Optional[nn.BatchNorm2d]) -> Optional[float]:
    return None if bn is None else bn.eps


class FoldedWeights:
    """Cached ``fold_batch_norm`` of one (conv, bn) pair, for a module to own; inference only. With no
    BatchNorm (bn None), the conv's own weight and bias, kept in the dtype asked for (``_folded``): under autocast
    a cast made once instead of at every call, and, needing no gradient, a weight whose Triton packing is kept.

    ``get`` folds again when a source tensor was replaced (object or storage: ``.to``, a new Parameter)
    or changed in place (version counter: optimizer steps, ``load_state_dict``; not writes through
    ``.data``), after any step of an optimizer with ``fused=True`` (whose writes move no version counter,
    ``writes.py``), or when ``bn.eps`` or the dtype asked for changed; else it returns the very same tensors.
    Tensors made under ``torch.inference_mode`` have no version counter and are folded on every call,
    as is everything under ``torch.compile`` (traced into the graph); a fold made while a CUDA graph is captured
    (written only when the graph replays) serves that call alone. The fold itself is made outside
    inference_mode, so that it has one (what the Triton conv's cache of packed weights checks). A plain
    attribute: the owner's state_dict is unchanged, nothing is allocated before the first ``get``, no
    autograd graph is kept; the source tensors last folded are held (so their identity can be checked)
    until the next fold. What a fold is checked by and the fold itself are kept as one tuple, replaced in one
    assignment: threads sharing a module never read one call's fold with another's key.
    ``get`` raises for a BatchNorm in training mode, and in grad mode if a source requires grad.
    """

    def __init__(self):
        # (key: (dtype, eps), the tensors folded, their _snapshots, the fold (W', b'), fused_optimizer_steps() before
        # it) of the last fold, or None
        self._last: Optional[tuple] = None

    def get(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d],
            dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
        """(W', b') in ``dtype`` (default: the conv weight's dtype)."""
        if bn is not None and bn.training:
            raise RuntimeError("FoldedWeights.get: the BatchNorm is in training mode; folding uses running "
                               "statistics and is for eval mode only")
        sources = _fold_sources(conv, bn)
        if bn is not None and (sources[2] is None or sources[3] is None):
            raise ValueError("FoldedWeights.get: the BatchNorm keeps no running statistics "
                             "(track_running_stats=False), so it has nothing to fold")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
            raise RuntimeError("FoldedWeights.get is for inference: call it under torch.no_grad() or "
                               "torch.inference_mode(), or with parameters that do not require grad")
        key = (sources[0].dtype if dtype is None else dtype, _eps(bn))
        if torch.compiler.is_compiling():  # traced: fold in the graph, which a compiler may freeze
            return _folded(sources, bn, key[0])
        last = self._last
        if last is None or key != last[0] or not _holds(last, sources):
            steps = writes.fused_optimizer_steps()
            with made_to_keep():
                folded = _folded(sources, bn, key[0])
            if backends.capturing(folded[0].device):  # filled only when the graph replays: for this call alone
                return folded
            self._last = last = (key, sources, tuple(map(_snapshot, sources)), folded, steps)
        return last[3]

    def kept(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """The fold ``get`` returned last, if ``get(conv, bn)`` in the dtype asked for then would return it
        again now (same sources, unchanged, same eps), else None. No checks: for a caller that ran ``get`` on
        these modules before and knows that the BatchNorm is in eval mode and autograd off."""
        last = self._last
        if last is None or _eps(bn) != last[0][1] or not _holds(last, _fold_sources(conv, bn)):
            return None
        return last[3]


def _holds(last: tuple, sources: tuple) -> bool:
    """Whether ``sources`` are the tensors of the fold ``last`` (``FoldedWeights._last``), unchanged since."""
    return (last[4] == writes.fused_optimizer_steps() and all(map(operator.is_, sources, last[1]))
            and all(map(_unchanged, sources, last[2])))


# --------------------------------------------------------------------------- implementations
def _dense_strides(shape, channels_last: bool) -> tuple:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


def _run_torch(x, weight, bias, residual, conv, relu):
    out = F.conv2d(x, weight, bias, *conv)
    if residual is not None:
        out = out.add_(residual)
    return out.relu_() if relu else out


def _run_cudnn(x, weight, bias, residual, conv, relu):
    # relu(conv(x, w) + alpha * z + bias); cudnn_convolution_relu is the same graph with alpha = 0.
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, *conv)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, *conv)


def _run_triton(x, weight, bias, residual, conv, relu):
    stride, padding, dilation, groups = conv
    return backends.triton_conv()[0].conv2d_fused(
        x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups, in_relu=False,
        out_shift=None if bias is None else _float_bias(bias), residual=residual, out_relu=relu)[0]


_FLOAT_BIASES = WeakIdKeyDictionary()  # bias -> (its writes.version_stamp, its fp32 copy)


def _float_bias(bias: Tensor) -> Tensor:
    """``bias`` in fp32, as the Triton conv takes it: itself, or its copy, kept while bias is the same tensor
    unchanged (a fold's bias is, call after call; under autocast it is in autocast's dtype; by its version counter
    and the steps of fused optimizers, which move none: ``writes.py``), else a new copy: for an inference tensor (no
    version counter to tell), and while a CUDA graph is captured (the copy is filled only when the graph replays)."""
    if bias.dtype == torch.float32:
        return bias
    version = None if bias.is_inference() else writes.version_stamp(bias)
    kept = _FLOAT_BIASES.get(bias)
    if kept is not None and version is not None and kept[0] == version:
        return kept[1]
    converted = bias.float()
    if version is not None and not backends.capturing(bias.device):
        _FLOAT_BIASES[bias] = (version, converted)
    return converted


_IMPLS = {"cudnn": _run_cudnn, "triton": _run_triton, "torch": _run_torch}


def bound_implementation(name: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                         conv: tuple, relu: bool) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    """Implementation ``name`` as a function of (x, residual) alone, for calls whose x and residual have these ones'
    type, shape, strides, dtype and device, with weight and bias kept unchanged (a fold's): the Triton conv's
    launcher, checked and planned once (``conv2d_fused_launcher``), where it has one; else the implementation with
    the other arguments bound."""
    if name == "triton":
        stride, padding, dilation, groups = conv
        launch = backends.triton_conv()[0].conv2d_fused_launcher(
            x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
            out_shift=None if bias is None else _float_bias(bias), residual=residual, out_relu=relu)
        if launch is not None:
            return launch
    run = _IMPLS[name]
    return lambda x, residual: run(x, weight, bias, residual, conv, relu)


def unavailable_reason(name: str, x, weight, bias, residual, conv, relu) -> Optional[str]:
    """None when implementation ``name`` can run this call (the op's arguments, conv = (stride,
    padding, dilation, groups)), else a sentence saying why not."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"fusedres.conv_bias_act: unknown backend {name!r}; expected one of "
                         f"{IMPLEMENTATIONS} or 'auto'")
    if name == "triton":
        module, reason = backends.triton_conv()
        return reason if module is None else module.unsupported_reason(x, weight, *conv)
    if name == "torch":
        return None
    if x.device.type != "cuda":
        return f"cuDNN runs on CUDA tensors, got a tensor on {x.device}"
    if not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        return "cuDNN is not available, or torch.backends.cudnn.enabled is False"
    if not relu:
        return "cuDNN's fused convolutions (cudnn_convolution_relu / _add_relu) always apply ReLU"
    if x.dtype not in _CUDNN_DTYPES:
        return f"cuDNN's fused convolutions take float32, float16 or bfloat16, got {x.dtype}"
    return None


# --------------------------------------------------------------------------- dispatch
def _signature(args, channels_last: bool) -> tuple:
    """Everything conv_bias_act's choice depends on, torch's conv flags included (a cached choice is not
    checked again: a cached Triton choice must not keep running TF32 once the user forbids it)."""
    x, weight, bias, residual, (stride, padding, dilation, groups), relu = args
    return (x.dtype, channels_last, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding),
            tuple(dilation), groups, bias is not None, residual is not None, relu, backends.conv_flags(x.dtype))


def _describe(signature: tuple) -> str:
    dtype, channels_last, x_shape, w_shape, stride, padding, dilation, groups, bias, residual, relu, flags = signature
    return (f"{str(dtype)[6:]}|{'cl' if channels_last else 'nchw'}|x{list(x_shape)}|w{list(w_shape)}|"
            f"s{list(stride)}p{list(padding)}d{list(dilation)}g{groups}|bias{int(bias)}|res{int(residual)}|"
            f"relu{int(relu)}|{backends.describe_conv_flags(flags)}")


_DISPATCH = dispatch.MeasuredDispatch("conv_bias_act", IMPLEMENTATIONS, _describe, references=("torch",))


def _output_mismatch(args, reference: Tensor, result: Tensor) -> Optional[str]:
    """Why an implementation's output of the call ``args`` is not the reference's (``dispatch.mismatch``), or
    None. The scale adds the largest bias and residual to the output's: an implementation that rounds the conv
    before adding them may be an ulp of the conv off, and the conv can be larger than the output they cancel."""
    bias, residual = args[2:4]
    scale = dispatch.magnitude(reference) + dispatch.magnitude(bias) + dispatch.magnitude(residual)
    return dispatch.mismatch("the output", reference, result, scale)


def _choose(backend: str, channels_last: bool, args, replayed: bool = False) -> tuple[str, bool]:
    """(the implementation to run the call ``args``, whether every later call of the same signature gets it too:
    not so for a choice made while a graph is captured or a prepare pass runs, which the dispatch does not keep).
    ``replayed``: the call is a module unit's, whose later calls replay it bound to its arguments (``FoldedUnit``,
    ``FoldedChain``), so the dispatch times each implementation that way (``_replays``); else as the op runs it."""
    if backend != "auto":
        reason = unavailable_reason(backend, *args)  # raises for an unknown name
        if args[0].dtype not in backends.KERNEL_DTYPES:  # as every op's backend: fp64 runs on torch
            return "torch", True
        if reason is not None:
            raise RuntimeError(f"fusedres.conv_bias_act: backend {backend!r} cannot run this call: {reason}")
        return backend, True
    x = args[0]
    if not backends.measured(x):
        return "torch", True
    signature = _signature(args, channels_last)
    choice = _DISPATCH.choose(x.device, signature, lambda name: unavailable_reason(name, *args),
                              _replays(args) if replayed else lambda name: _IMPLS[name](*args),
                              lambda reference, result: _output_mismatch(args, reference, result))
    return choice, _DISPATCH.kept(x.device, signature) == choice


def _replays(args: tuple) -> Callable[[str], Tensor]:
    """``run(name)``: implementation ``name`` on the call ``args`` as a replayed unit runs it, bound to the call's
    arguments once (``bound_implementation``: for the Triton conv, its launcher) and then on (x, residual) alone. At
    batch 1, where a call's host time decides, the Triton conv's bound launch costs a fraction of its whole path."""
    bound: dict = {}

    def run(name: str) -> Tensor:
        if name not in bound:
            bound[name] = bound_implementation(name, *args)
        return bound[name](args[0], args[3])

    return run


def dispatch_table() -> dict[str, dict]:
    """conv_bias_act's choices in this process: key -> {"choice": name, "ms": {name: median ms, or why
    not}}; ``dispatch.dispatch_table()`` has every op's."""
    return _DISPATCH.table()


# --------------------------------------------------------------------------- the op
def _conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                   stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
                   backend: str) -> Tensor:
    """The op's body (``_launch``)."""
    return _launch(x, weight, bias, residual, (stride, padding, dilation, groups), relu, backend)[0]


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], conv: tuple, relu: bool,
            backend: str, replayed: bool = False) -> tuple[Tensor, Optional[tuple[str, bool]]]:
    """The op's body on its arguments (conv: stride, padding, dilation, groups): (its output, (the implementation
    that computed it, whether x is channels_last) where a call like it gets the same (``_choose``; ``replayed``
    for a module unit's call) and copies neither x nor the residual, else None). It computes in its inputs'
    dtype, so autocast (which a custom op's body still sees) is turned off inside (``run_dense``)."""
    channels_last = backends.channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # The weight stays as it is (every implementation takes any layout; cuDNN's fused convs pick one from
    # both operands): when x's layout is ambiguous (H * W = 1, say) a channels_last weight would otherwise be
    # copied at every call, a larger copy than the output's below.
    dense = x.contiguous(memory_format=fmt)
    dense_residual = None if residual is None else residual.contiguous(memory_format=fmt)
    args = (dense, weight, bias, dense_residual, conv, relu)
    name, kept = _choose(backend, channels_last, args, replayed)
    copied = dense is not x or dense_residual is not residual
    return run_dense(_IMPLS[name], channels_last, args), (name, channels_last) if kept and not copied else None


def run_dense(implementation: Callable, channels_last: bool, args: tuple) -> Tensor:
    """``implementation(*args)``: one of _IMPLS on the body's arguments (checked, cast, x and residual dense in the
    memory format ``channels_last`` says), or one bound to the others (``bound_implementation``) on (x, residual);
    autocast off around it; the output dense in that format."""
    device = args[0].device.type
    autocast = backends.autocast_dtype(device) is not None
    if autocast:  # what torch.autocast(device, enabled=False) does here, without its ~4 us a call
        torch.set_autocast_enabled(device, False)
    try:
        return dense_in_format(implementation(*args), channels_last)
    finally:
        if autocast:
            torch.set_autocast_enabled(device, True)


def dense_in_format(out: Tensor, channels_last: bool) -> Tensor:
    """``out``, or a copy of it dense in the memory format ``channels_last`` says."""
    strides = _dense_strides(out.shape, channels_last)
    if out.stride() != strides:  # only where the layout is ambiguous (size-1 C or H * W)
        out = torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device).copy_(out)
    return out


conv_bias_act_op = custom_op("fusedres::conv_bias_act", mutates_args=())(_conv_bias_act)
_conv_bias_act_entry = eager.entry(conv_bias_act_op, _conv_bias_act)  # no autograd: inference only


@conv_bias_act_op.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend):
    shape = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    return x.new_empty_strided(shape, _dense_strides(shape, backends.channels_last(x)))


def conv_bias_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                  *, stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                  dilation: Union[int, Sequence[int]] = 1, groups: int = 1, relu: bool = True,
                  backend: str = "auto") -> Tensor:
    """act(conv2d(x, weight, bias) + residual) in one launch; inference only (there is no backward).

    ``weight`` and ``bias`` are typically ``fold_batch_norm``'s. Under autocast the tensors are cast to
    autocast's dtype first, as autocast does for conv2d. ``backend``: "auto", "cudnn", "triton" or
    "torch" (see the module docstring); a named one that cannot run this call raises RuntimeError, but float64,
    which only torch runs, runs on torch whatever is named (as every op's backend does).
    """
    fn = "fusedres.conv_bias_act"
    _check_activation(fn, "input", x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"{fn}: expected a 4D weight (out_channels, in_channels / groups, kH, kW), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    stride, padding, dilation = (_conv_tuple(fn, name, value) for name, value in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride + dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{fn}: stride and dilation must be positive and padding non-negative, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    out_channels, in_channels = weight.shape[0], x.shape[1]
    if not _is_int(groups):
        raise TypeError(f"{fn}: expected groups to be an int, got {groups!r}")
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the {in_channels} input and {out_channels} "
                         "output channels")
    return _checked_call(fn, x, weight, bias, residual, stride, padding, dilation, groups, relu, backend)


def conv_module_bias_act(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor],
                         residual: Optional[Tensor] = None, relu: bool = True, backend: str = "auto") -> Tensor:
    """``conv_bias_act`` with ``conv``'s stride, padding, dilation and groups, for a module running its own
    ``nn.Conv2d`` (``weight`` and ``bias``: the conv's, or ``FoldedWeights.get``'s fold of them): the
    conv's arguments were checked when the module was converted, so only the tensors are, on every call.
    A module's inference path calls this once per unit: at batch 1 its cost is the model's latency."""
    conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    tensors = checked_module_tensors(x, weight, bias, residual, conv_args)
    return _conv_bias_act_entry(*tensors, *conv_args, relu, backend)


def checked_module_tensors(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    conv_args: tuple) -> tuple:
    """``conv_module_bias_act``'s checks of its tensors (``conv_args``: the module's conv's stride, padding,
    dilation and groups): its (x, weight, bias, residual), cast to autocast's dtype under autocast."""
    fn = "fusedres.conv_bias_act"
    _check_activation(fn, "input", x)
    return _checked_tensors(fn, x, weight, bias, residual, *conv_args)


def module_unit_call(tensors: tuple, conv_args: tuple, relu: bool,
                     backend: str) -> tuple[Tensor, Optional[tuple[str, bool]]]:
    """The op on a module unit's checked (x, weight, bias, residual) (``checked_module_tensors``) and its conv's
    (stride, padding, dilation, groups), the dispatch timing each implementation as a replayed unit runs it: (its
    output, (the implementation, whether x is channels_last) where a call like it gets the same (``_launch``), else
    None). Where the op must run as an op (a tensor subclass among them, say: ``eager._body_call``), it does, and
    the second item is None."""
    if eager._body_call(tensors) is not False:
        return _conv_bias_act_entry(*tensors, *conv_args, relu, backend), None
    return _launch(*tensors, conv_args, relu, backend, replayed=True)


def _checked_call(fn: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  stride, padding, dilation, groups: int, relu: bool, backend: str) -> Tensor:
    """The op on its tensors, checked (x: a checked activation; stride, padding, dilation: two ints each,
    checked; a 4D weight and groups dividing its channels), in autocast's dtype under autocast."""
    return _conv_bias_act_entry(*_checked_tensors(fn, x, weight, bias, residual, stride, padding, dilation, groups),
                                stride, padding, dilation, groups, relu, backend)


def _checked_tensors(fn: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                     stride, padding, dilation, groups: int) -> tuple:
    """``_checked_call``'s checks: its (x, weight, bias, residual), cast to autocast's dtype under autocast."""
    if residual is not None:
        _check_activation(fn, "residual", residual)
    device = x.device
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != device:
            raise RuntimeError(f"{fn}: expected {name} to be on {device} like the input, got {t.device}")
    dtype = backends.autocast_dtype(device.type)
    if dtype is not None:  # autocast leaves fp64 alone; a .to() of nothing still costs ~1 us
        x, weight, bias, residual = (t if t is None or t.dtype in (dtype, torch.float64) else t.to(dtype)
                                     for t in (x, weight, bias, residual))
    if weight.shape[1] * groups != x.shape[1]:
        raise RuntimeError(f"{fn}: weight of size {tuple(weight.shape)} expects {weight.shape[1] * groups} "
                           f"input channels, got {x.shape[1]}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{fn}: input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    out_channels = weight.shape[0]
    if bias is not None and (bias.shape != (out_channels,) or bias.dtype != x.dtype):
        raise RuntimeError(f"{fn}: expected bias of size ({out_channels},) and type {x.dtype}, got size "
                           f"{tuple(bias.shape)} and type {bias.dtype}")
    out_shape = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    if min(out_shape[2:]) < 1:
        raise ValueError(f"{fn}: input of size {tuple(x.shape)} is too small for a weight of size "
                         f"{tuple(weight.shape)} (output size {tuple(out_shape)})")
    if residual is not None and (list(residual.shape) != out_shape or residual.dtype != x.dtype):
        raise ValueError(f"{fn}: residual of size {tuple(residual.shape)} and type {residual.dtype} does not "
                         f"match the conv output of size {tuple(out_shape)} and type {x.dtype}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        raise RuntimeError(f"{fn} is inference-only (it has no backward): call it under torch.no_grad() "
                           "or torch.inference_mode()")
    return x, weight, bias, residual
