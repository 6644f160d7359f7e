"""BatchNorm2d + ReLU in one fused pass, for BatchNorms outside residual blocks (the stem).

``FusedBatchNormAct2d`` *is* an ``nn.BatchNorm2d`` (same parameters, buffers, state_dict keys
and constructor), whose forward also applies the ReLU that followed it. Where that ReLU was, the
converter puts a ``ReLUFusedIntoNorm``: it passes its input through while the fused norm and it are
still in place, unhooked, and is a ReLU again (the fused norm then applies none) once anything replaced
one of them (for instance ``nn.SyncBatchNorm.convert_sync_batchnorm``, which turns every BatchNorm2d,
ours included, into a plain SyncBatchNorm) or a hook would see the norm's output, so the activation is
never lost nor applied twice. ``revert`` restores both modules.

Traced by ``torch.fx`` the fused norm records nn.BatchNorm2d's forward as one call (``_batch_norm``) and
its placeholder a ReLU: the graph computes, and counts batches, as the original modules do. Under forward-mode
AD (``torch.autograd.forward_ad``) both compute so too, with torch's ops, which have forward derivatives.
"""

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .blocks import pending_bn
from .hooks import any_run_hooks, runs_torch_modules, share_hooks

_PLACEHOLDER = "_relu_placeholder"  # the plain attribute of a fused norm holding its ReLUFusedIntoNorm, if any


def _batch_norm(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """nn.BatchNorm2d's forward of ``bn`` on ``x``; one call in a ``torch.fx`` graph (``torch.fx.wrap``), which
    runs it, bookkeeping included, where the graph runs."""
    return nn.BatchNorm2d.forward(bn, x)


torch.fx.wrap("_batch_norm")


class FusedBatchNormAct2d(nn.BatchNorm2d):
    """act(batch_norm(x) + residual) with nn.BatchNorm2d's state; act is ReLU (``relu=True``) or
    none, the residual optional (``forward(x, residual=None)``, as apex's NHWC BatchNorm)."""

    source_class: type = nn.BatchNorm2d  # what from_module takes and to_module gives back
    carried_children: tuple[str, ...] = ()  # stateless children kept for to_module

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, relu: bool = True, backend: str = "auto"):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         **self._source_activation(relu))
        self.relu = relu
        self.backend = backend

    @staticmethod
    def _source_activation(relu: bool) -> dict:
        """What the source class's constructor takes for the activation ``relu`` says (nn.BatchNorm2d: nothing)."""
        return {}

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d, *, relu: bool = True,
                    backend: str = "auto") -> "FusedBatchNormAct2d":
        """A fused module sharing ``bn``'s parameters and buffers (the same tensor objects)."""
        if type(bn) is not cls.source_class:
            raise ValueError(f"{cls.__name__}.from_module: expected {cls.source_class.__name__}, "
                             f"got {type(bn).__name__}")
        fused = _copy_batch_norm_state(bn, cls.__new__(cls))
        for name in cls.carried_children:
            setattr(fused, name, getattr(bn, name))
        fused.relu, fused.backend = relu, backend
        return fused

    def to_module(self) -> nn.BatchNorm2d:
        """The source module (plain nn.BatchNorm2d here) holding this module's parameters and buffers."""
        bn = _copy_batch_norm_state(self, self.source_class.__new__(self.source_class))
        for name in self.carried_children:
            setattr(bn, name, getattr(self, name))
        return bn

    def applies_relu(self, x: Tensor) -> bool:
        """Whether this forward on ``x`` applies the ReLU: ``relu``, and where the converter fused a ReLU
        module into this norm, while its placeholder passes its input through (for a traced ``x``, never:
        the placeholder records the ReLU)."""
        placeholder = self.__dict__.get(_PLACEHOLDER)
        if placeholder is None:
            return self.relu
        return self.relu and not runs_torch_modules(x) and placeholder.passes_through()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        relu = self.applies_relu(x)
        if runs_torch_modules(x) or x.numel() == 0:
            # torch's own BatchNorm: eager's result and buffers, a traceable graph, no kernel on an empty tensor
            out = _batch_norm(self, x)
            out = out if residual is None else out + residual
            return out.relu() if relu else out
        return ops.bn_act(pending_bn(x, self, self.backend), residual, relu=relu, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without its ReLU placeholder, which refers to the model holding both and would
        take the whole model along: copied with the model, the placeholder's copy links itself to this norm's
        (``ReLUFusedIntoNorm.__setstate__``); copied alone, the norm applies its ReLU itself. Where the placeholder
        was replaced (by a LeakyReLU, say), this norm applies no ReLU, and neither does its copy."""
        state = super().__getstate__()
        placeholder = state.pop(_PLACEHOLDER, None)
        if placeholder is not None and not placeholder.in_place():
            state["relu"] = False
        return state


def _copy_batch_norm_state(source: nn.BatchNorm2d, target: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Initialise the bare module ``target`` with ``source``'s settings and the very same
    parameter and buffer objects and hook registries."""
    nn.Module.__init__(target)
    share_hooks(source, target)
    for key in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        setattr(target, key, getattr(source, key))
    for name in ("weight", "bias"):
        target.register_parameter(name, source._parameters.get(name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        target.register_buffer(name, source._buffers.get(name))
    return target


class ReLUFusedIntoNorm(nn.ReLU):
    """Stands at ``parent.<act_name>``, where a ReLU was fused into the norm ``parent.<norm_name>``.

    Identity while both are in place and neither has hooks (``passes_through``: the fused norm then
    applies the ReLU); a ReLU otherwise. ``original`` is the ReLU module it stands for, which ``revert``
    puts back.
    """

    def __init__(self, parent: nn.Module, norm_name: str, act_name: str, fused_norm: FusedBatchNormAct2d,
                 original: nn.Module):
        super().__init__()
        self.norm_name = norm_name
        self.act_name = act_name
        # Plain references, not submodules: the state_dict and module tree stay the original's.
        vars(self).update(_parent=parent, _fused_norm=fused_norm, original=original)
        vars(fused_norm)[_PLACEHOLDER] = self  # what the norm asks whether to apply the ReLU

    def in_place(self) -> bool:
        """Whether this module still stands where the ReLU it replaced was."""
        return self._parent._modules.get(self.act_name) is self

    def passes_through(self) -> bool:
        """Whether this module is the identity now (its fused norm applies the ReLU): the fused norm and
        this module are still in place, and no hook would see the norm's output or this module's input."""
        norm = self._fused_norm
        return (self._parent._modules.get(self.norm_name) is norm and self.in_place()
                and not any_run_hooks((norm, self)))

    def forward(self, x: Tensor) -> Tensor:
        return x if not runs_torch_modules(x) and self.passes_through() else super().forward(x)

    def __setstate__(self, state: dict) -> None:  # unpickled or deep-copied: the norm's copy lacks its placeholder
        super().__setstate__(state)
        vars(self._fused_norm)[_PLACEHOLDER] = self

    def __deepcopy__(self, memo: dict) -> nn.Module:
        """Copied with the model holding it (a copy of it in ``memo``): this placeholder's copy, in the model's
        copy. Copied out of it: the ReLU it stands for (a copy of ``original``), not the model it refers to."""
        if id(self._parent) not in memo:
            return copy.deepcopy(self.original, memo)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone
