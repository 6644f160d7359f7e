"""The stem of a converted torchvision / timm ResNet run as a unit, as the blocks run theirs.

The stem ``conv1 -> bn1 -> ReLU -> maxpool`` (conv1 a conv, or timm's deep stem: a Sequential ending
in one, whose last conv is the unit's) runs in the model's own forward (torchvision's
``ResNet._forward_impl``, timm's ``ResNet.forward_features``), not inside a block, so no module of ours
can fuse ``conv1`` with ``bn1``: a replaced ``conv1`` returning normalised values would change what
``model.conv1(x)`` and hooks on it see. ``convert`` instead gives the model a class of ours
(``fused_stem_class``: a subclass of the model's own class) whose forward runs the stem as a unit, then
the rest of the original forward:

- in eval mode without autograd (``blocks.folding_allowed``), conv1 with bn1 folded into it and the ReLU as
  one ``conv_bias_act`` launch (the dispatch times cuDNN's fused conv + bias + ReLU against the Triton conv);
- otherwise (training, autograd on, or traced), conv1 and bn1's statistics as one op (``conv_batch_norm_stats``:
  one launch with the Triton conv where it measured faster), then bn1 and the ReLU as one ``bn_act``
  pass, as in a block.

Where the stem's modules are not what convert saw (hooks on one of them or global ones, one replaced by
something else), the batch is empty, ``torch.fx`` traces the model or forward-mode AD is on, it runs the original
forward unchanged.
The class adds no parameters, buffers, children or hooks: the state_dict, the module tree and ``isinstance``
checks are the model's own, and ``revert`` puts the original class back.

The classes are made on first use, and pickling finds them by name in this module
(``__getattr__`` makes them on demand), so a pickled converted model loads in a fresh process.
"""

import importlib
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .blocks import FoldingModule, conv_pending_bn, folded_conv_bias_act, folding_allowed, runs_empty_batch_fused
from .hooks import global_run_hooks, has_run_hooks, runs_torch_modules
from .norm import FusedBatchNormAct2d, ReLUFusedIntoNorm


class _FusedStemModel(FoldingModule):
    """What every fused-stem class adds to its model class: the stem unit (its fold kept as a FoldingModule).
    ``act_name``: the model's attribute holding the stem's ReLU; ``source_class``: the model's own class
    (``_made_class``), which ``revert`` puts back."""

    act_name = "relu"
    source_class: type

    def _fused_stem(self, x: Tensor) -> Optional[Tensor]:
        """relu(bn1(conv1(x))) run as a unit (see the module docstring), or None where the original forward
        must run instead."""
        if (runs_torch_modules(x) or global_run_hooks()
                or stem_unsupported_reason(self, self.act_name) is not None):
            return None
        conv1, bn, act = self._modules["conv1"], self._modules["bn1"], self._modules[self.act_name]
        if x.numel() == 0 and not runs_empty_batch_fused((bn,)):
            return None
        before, conv = _stem_conv(conv1)
        for module in before:
            x = module(x)
        # the ReLU is act's (a ReLU, or our placeholder once the norm it stands for was replaced), or bn1's
        # (our fused norm)
        relu = ((type(act) is nn.ReLU or not act.passes_through())
                or (isinstance(bn, FusedBatchNormAct2d) and bn.relu))
        backend = self.fusedres_stem_backend
        if not (bn.training or bn.running_mean is None) and folding_allowed():
            return folded_conv_bias_act(self, x, conv, bn, None, relu, backend)
        return ops.bn_act(conv_pending_bn(x, conv, bn, backend), relu=relu, backend=backend)


class _TorchvisionStem(_FusedStemModel):
    act_name = "relu"

    def _forward_impl(self, x: Tensor) -> Tensor:
        stem = self._fused_stem(x)
        if stem is None:
            return super()._forward_impl(x)
        # the rest of torchvision.models.ResNet._forward_impl
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.maxpool(stem)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _TimmStem(_FusedStemModel):
    act_name = "act1"

    def forward_features(self, x: Tensor) -> Tensor:
        stem = self._fused_stem(x)
        if stem is None:
            return super().forward_features(x)
        # the rest of timm.models.resnet.ResNet.forward_features
        x = self.maxpool(stem)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import resnet  # the checkpointing timm's own forward uses
            return resnet.checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# the model classes whose stem runs as a unit: qualified name -> (our class's name, the family's forward)
_FUSED_STEM_CLASSES = {
    "torchvision.models.resnet.ResNet": ("FusedStemTorchvisionResNet", _TorchvisionStem),
    "timm.models.resnet.ResNet": ("FusedStemTimmResNet", _TimmStem),
}


def _stem_conv(conv1: Optional[nn.Module]) -> tuple[tuple, Optional[nn.Module]]:
    """(the modules run before the stem's last conv, that conv): ((), conv1), or for a deep stem (timm's
    "d" variants: conv1 = Sequential(conv, norm, act, ..., conv)) its modules before its last."""
    if type(conv1) is nn.Sequential and len(conv1) and type(conv1[-1]) is nn.Conv2d:
        return tuple(conv1)[:-1], conv1[-1]
    return (), conv1


def fused_stem_class(model_cls: type) -> Optional[type]:
    """Our class for models of class ``model_cls`` (exactly one of _FUSED_STEM_CLASSES; not a subclass,
    whose forward we do not know), or None."""
    entry = _FUSED_STEM_CLASSES.get(f"{model_cls.__module__}.{model_cls.__qualname__}")
    return None if entry is None else _made_class(entry[0])


def subclassed_stem_model(model_cls: type) -> Optional[str]:
    """The name of the class of _FUSED_STEM_CLASSES that ``model_cls`` (not one of ours) strictly subclasses, or
    None: a model whose stem is not run as a unit, since its forward may differ."""
    if issubclass(model_cls, _FusedStemModel):
        return None
    return next((base.__qualname__ for base in model_cls.__mro__[1:]
                 if f"{base.__module__}.{base.__qualname__}" in _FUSED_STEM_CLASSES), None)


def stem_unsupported_reason(model: nn.Module, act_name: str) -> Optional[str]:
    """Why the stem of ``model`` (a model of one of _FUSED_STEM_CLASSES, or ours; ``act_name``: its ReLU's
    attribute) cannot run as a unit, or None: asked by ``convert``, and by the forward at every call (a stem
    module may be replaced or hooked after conversion)."""
    conv1, bn, act = (model._modules.get(name) for name in ("conv1", "bn1", act_name))
    conv = _stem_conv(conv1)[1]
    if type(conv) is not nn.Conv2d:
        return f"conv1 is {type(conv1).__name__}, neither nn.Conv2d nor a Sequential ending in one"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"the stem's conv uses padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
    # exactly these classes: a subclass's forward may compute something else
    if (type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm, FusedBatchNormAct2d)
            or type(act) not in (nn.ReLU, ReLUFusedIntoNorm)):
        return f"the stem is conv1 -> {type(bn).__name__} -> {type(act).__name__}, not conv -> BatchNorm -> ReLU"
    parts = [("conv1", conv1)] + ([("conv1's last conv", conv)] if conv is not conv1 else []) + [("bn1", bn),
                                                                                             (act_name, act)]
    hooked = [name for name, m in parts if has_run_hooks(m)]
    if hooked:
        return f"{' and '.join(hooked)} {'have' if len(hooked) > 1 else 'has'} forward or backward hooks"
    return None


def _made_class(name: str) -> type:
    """The class called ``name`` of _FUSED_STEM_CLASSES, made on first use from the model's class."""
    made = globals().get(name)
    if made is None:
        source, family = next((source, family) for source, (our_name, family) in _FUSED_STEM_CLASSES.items()
                              if our_name == name)
        module_name, _, class_name = source.rpartition(".")
        base = getattr(importlib.import_module(module_name), class_name)
        made = type(name, (family, base), {"__module__": __name__, "__qualname__": name, "source_class": base,
                                           "__doc__": f"{source} whose stem runs as a unit (fusedres.nn.stem)"})
        globals()[name] = made
    return made


def __getattr__(name: str) -> type:
    """Pickle finds our classes by name: make one on first access."""
    if any(our_name == name for our_name, _ in _FUSED_STEM_CLASSES.values()):
        return _made_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
