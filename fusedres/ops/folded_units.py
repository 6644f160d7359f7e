"""A converted module's inference units, and a block's forward replayed through them.

``FoldedUnit``: one conv unit's eval-mode call, act(conv(x) [BatchNorm folded in] + residual), through the
``conv_bias_act`` op (``inference.py``) on the fold it keeps; a call like its last checked one runs that call's
implementation again without the op's checks and choice. ``FoldedChain``: a block's whole forward through its
units, run again without the units' own paths while nothing that decided them changed. At batch 1 a converted
model's forward is host-bound: these are what keep its host time down.
"""

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import backends, dispatch, eager
from .inference import (FoldedWeights, bound_implementation, checked_module_tensors, conv_module_bias_act,
                        dense_in_format, made_to_keep, module_unit_call, run_dense)


def _layout(t: Optional[Tensor]) -> Optional[tuple]:
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)


class FoldedUnit:
    """One conv unit's inference call, for a module to own (``blocks.folded_conv_bias_act``): act(conv(x) [eval
    BatchNorm folded in] + residual), as ``conv_module_bias_act`` computes it, on the fold that ``fold``
    (``FoldedWeights``) keeps.

    At batch 1 a converted model's forward is host-bound, and about a third of a unit's own host time (outside
    the conv call) is the op's checks and its choice of implementation. A call like the last one that took the
    whole path runs the implementation that call ran, without them (``run_dense``, as the op's body does). Like
    means: the same folded tensors; x and the residual of the same type, shape, strides, dtype and device; the
    same conv arguments, ReLU and backend; the same autocast dtype and torch conv flags; the same
    ``dispatch.resets()`` and ``dispatch.graph_replay()``. Such a call passes the same checks and gets the same
    choice. A call takes the whole path where the op must be seen (``eager.plain_mode``), under the autograd
    profiler (which records the op's name), with autograd on, and after a call that cast a tensor to autocast's
    dtype, copied x or the residual into x's memory format, or got a choice the dispatch did not keep (while a
    graph was captured or a prepare pass ran). The plan's first replay binds its implementation to the call's
    arguments (``bound_implementation``: for the Triton conv, its launch checked and planned once), which later
    replays run. A block whose units all ran their plans keeps the whole forward as a ``FoldedChain``, which skips
    the units' own paths too.
    """

    def __init__(self):
        self.fold = FoldedWeights()
        # (guard, weight, bias, implementation, channels_last, conv arguments, the implementation bound to the
        # plan's arguments or None before its first replay): one tuple, replaced in one assignment, so that threads
        # sharing the unit never pair one call's plan with a launch bound to another's shapes
        self._plan: Optional[tuple] = None
        self._summed: Optional[tuple] = None  # (bias, other, bias + other) of summed_bias

    def folded(self, x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
        """(W', b'), ``bn`` folded into ``conv`` (``fold``) in the dtype a call on ``x`` computes in."""
        return self._fold(conv, bn, backends.autocast_dtype(x.device.type))

    def _fold(self, conv: nn.Conv2d, bn: nn.Module, autocast: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
        weight = conv.weight  # autocast leaves float64 alone
        return self.fold.get(conv, bn, autocast if autocast and weight.dtype != torch.float64 else weight.dtype)

    def summed_bias(self, bias: Tensor, other: Tensor) -> Tensor:
        """bias + other (a bias moved to this unit from another one), the same tensor while both are; made
        outside inference_mode, as folds are (``FoldedWeights.get``)."""
        if torch.compiler.is_compiling():
            return bias + other
        summed = self._summed
        if summed is None or summed[0] is not bias or summed[1] is not other:
            with made_to_keep():
                summed = (bias, other, bias + other)
            if not backends.capturing(bias.device):  # captured, filled only when the graph replays
                self._summed = summed
        return summed[2]

    def __call__(self, x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool,
                 backend: str, folded: Optional[tuple[Tensor, Optional[Tensor]]] = None) -> Tensor:
        """act(conv(x) [bn folded in] + residual); with ``folded``, (W', b') to compute with instead of
        ``folded(x, conv, bn)``'s (a block that moves a unit's bias to another unit, ``summed_bias``)."""
        return self.planned_call(x, conv, bn, residual, relu, backend, folded)[0]

    def planned_call(self, x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool,
                     backend: str, folded: Optional[tuple[Tensor, Optional[Tensor]]] = None
                     ) -> tuple[Tensor, Optional[tuple]]:
        """The call's output and the plan this call ran or kept, None where it kept none: what
        ``FoldedChain.record`` takes for this call (not the unit's last plan, which a later call of the same unit in
        the forward, or another thread's call, may have replaced)."""
        autocast = backends.autocast_dtype(x.device.type)
        weight, bias = self._fold(conv, bn, autocast) if folded is None else folded
        if not eager.plain_mode() or torch.is_grad_enabled() or torch.autograd._profiler_enabled():
            return conv_module_bias_act(x, conv, weight, bias, residual, relu, backend), None
        conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        guard = (_layout(x), _layout(residual), conv_args, relu, backend, autocast, backends.conv_flags(x.dtype),
                 dispatch.resets(), dispatch.graph_replay())
        plan = self._plan
        if plan is not None and plan[1] is weight and plan[2] is bias and plan[0] == guard:
            bound = plan[6]
            if bound is None:  # the plan's first replay: its implementation bound to its held arguments
                bound = bound_implementation(plan[3], x, weight, bias, residual, plan[5], relu)
                if not backends.capturing(x.device):  # bound while captured, a fp32 bias would be the graph's
                    self._plan = (*plan[:6], bound)
            return run_dense(bound, plan[4], (x, residual)), plan
        tensors = checked_module_tensors(x, weight, bias, residual, conv_args)
        out, launch = module_unit_call(tensors, conv_args, relu, backend)
        cast = any(map(operator.is_not, tensors, (x, weight, bias, residual)))
        plan = None if launch is None or cast else (guard, weight, bias, *launch, conv_args, None)
        self._plan = plan
        return out, plan


class FoldedChain:
    """A module's inference forward through its folded units (``FoldedUnit``), in a fixed order, run again
    without the units' own paths where nothing that decided them changed.

    A converted block's eval forward at batch 1 is host-bound, and most of a unit's host time is spent on
    checks that come out the same at every call. A forward in which every unit ran its kept plan (the
    implementation of its last checked call, nothing cast or copied) records the chain (``record``): each
    unit's fold, conv and BatchNorm, the weight and bias it ran with (its fold's, or its bias summed with
    another unit's or dropped, as the owner decided), its implementation and the values it read (x, or an
    earlier unit's output). A later call (``__call__``) runs those implementations straight away, autocast
    off around them all, each bound at the chain's first call to its held arguments (``bound_implementation``: for
    the Triton conv, its launch checked and planned once), where:
    - x has the same type, shape, strides, dtype and device, and ``chain_guard``'s context is the same
      (backend, autocast dtype, torch's conv flags, ``dispatch.resets()`` and ``graph_replay()``);
    - the owner holds the same modules (``modules``, its children, say);
    - each conv has the same stride, padding, dilation and groups, each BatchNorm is in eval mode, and each
      fold still holds (``FoldedWeights.kept``).
    Each unit's plan checks the same (an intermediate value's layout follows from x's and the implementations;
    a bias summed with another unit's holds while both folds do, and both units are in the chain), so the chain
    computes what the units would. Otherwise ``__call__`` returns None and the owner takes the units' path,
    which records the chain anew.
    """

    def __init__(self, guard: tuple, modules: tuple, steps: tuple):
        self._guard = guard
        self._modules = modules
        self._steps = steps
        self._runs: Optional[list] = None  # each step's implementation bound to its arguments

    @classmethod
    def record(cls, guard: tuple, modules: tuple, units: Sequence[tuple]) -> Optional["FoldedChain"]:
        """The chain of a forward that just ran ``units`` in order, each (its FoldedUnit, conv, BatchNorm, the
        index of the value it read, of its residual or None, ReLU, the plan its call ran: ``planned_call``'s):
        values are numbered 0 for x, then k for the k-th unit's output. ``guard``: ``chain_guard`` at the forward's
        start (not None); ``modules``: what the owner holds, as its calls will pass them. None where a call kept no
        plan, or where its fold no longer holds (another thread's call may have folded the same modules in
        another dtype since)."""
        steps = []
        for unit, conv, bn, source, residual, relu, plan in units:
            folded = unit.fold.kept(conv, bn)
            if plan is None or folded is None or folded[0] is not plan[1]:
                return None
            bias, name, channels_last, conv_args = plan[2:6]  # bias: the fold's, None or summed with one
            steps.append((unit.fold, folded, conv, bn, conv_args, bias, name, channels_last, source, residual,
                          relu))
        return cls(guard, modules, tuple(steps))

    def __call__(self, x: Tensor, backend: str, modules: tuple) -> Optional[Tensor]:
        """The owner's forward on ``x`` (the units' last output), or None where the chain does not hold."""
        if modules != self._modules or chain_guard(x, backend) != self._guard:
            return None
        for fold, folded, conv, bn, conv_args, *_ in self._steps:
            if ((bn is not None and bn.training) or (conv.stride, conv.padding, conv.dilation, conv.groups) != conv_args
                    or fold.kept(conv, bn) is not folded):
                return None
        device = x.device.type
        autocast = self._guard[2] is not None
        if autocast:
            torch.set_autocast_enabled(device, False)
        try:
            values, runs = [x], self._runs
            bind = runs is None  # the first call: each step's implementation is bound to its held arguments
            if bind:
                runs = []
            for i, (_, (weight, _), _, _, conv_args, bias, name, channels_last, source, residual, relu) in enumerate(
                    self._steps):
                added = None if residual is None else values[residual]
                if bind:
                    runs.append(bound_implementation(name, values[source], weight, bias, added, conv_args, relu))
                values.append(dense_in_format(runs[i](values[source], added), channels_last))
            if bind and not backends.capturing(x.device):  # bound while captured, a fp32 bias would be the graph's
                self._runs = runs
            return values[-1]
        finally:
            if autocast:
                torch.set_autocast_enabled(device, True)


def chain_guard(x: Tensor, backend: str) -> Optional[tuple]:
    """What a ``FoldedChain``'s calls share with the forward that recorded it, besides its modules: x's layout,
    the units' backend, autocast's dtype, torch's conv flags, the dispatch's resets and graph replay. None where
    no chain may run (or be recorded): where the ops must be seen (``eager.plain_mode``), with autograd or its
    profiler on (``FoldedUnit`` takes the op's whole path there)."""
    if not eager.plain_mode() or torch.is_grad_enabled() or torch.autograd._profiler_enabled():
        return None
    return (_layout(x), backend, backends.autocast_dtype(x.device.type), backends.conv_flags(x.dtype),
            dispatch.resets(), dispatch.graph_replay())
