"""Fused pre-activation (ResNet v2) blocks with timm's parameter and buffer names.

He et al.'s "Identity Mappings in Deep Residual Networks" puts BatchNorm + ReLU in front of
each conv (timm's ``PreActBasic`` / ``PreActBottleneck``, used by ``resnetv2_*``):

    a   = act(norm1(x))
    out = drop_path(conv_k(act(norm_k(... conv1(a))))) + shortcut,
    shortcut = x, or downsample.conv(pool(a)) (timm's DownsampleConv / DownsampleAvg)

Every BatchNorm + act here is exactly the prologue of the conv that follows it, so each conv
runs as ``bn_act_conv2d`` on the previous conv's (pending) output: autograd keeps only the
pre-BN tensors (x and each conv's output) and the per-channel statistics, and recomputes the
normalised activation in backward. The shortcut conv reads the same pending ``norm1`` as
``conv1`` (no activation is materialised), except after an average pool, which needs ``a``
itself: then ``a`` is materialised once and both convs read it.

Like the post-activation blocks (``blocks.py``) a fused block holds the very children of the
block it replaces (``norm1``, ``conv1``, ..., ``downsample``, ``drop_path``), so its state_dict
is the original's, and reads them at each forward. A norm's activation is read from its ``act``
child: ReLU, or none (``nn.Identity``); the norms may be timm's ``BatchNormAct2d`` or
``SyncBatchNormAct``, or the ``nn.SyncBatchNorm`` that torch's ``convert_sync_batchnorm``
makes of a ``BatchNormAct2d`` (it keeps the ``act`` child but never calls it: the fused block
still applies it). Where a child was replaced by one this block cannot fuse, or hooked, the block runs the
original's forward (``_FusedResidualBlock._unfused_forward``).
"""

from typing import NamedTuple, Optional, Union

from torch import Tensor, nn

from .. import ops
from ..ops.functional import PendingBN
from .blocks import _children, _conv_unsupported, _FusedResidualBlock, _qualified_name, pending_bn

_DOWNSAMPLE_CLASSES = ("timm.models.resnetv2.DownsampleConv", "timm.models.resnetv2.DownsampleAvg")
# the norms whose forward is batch_norm, then act (timm's), exactly: a subclass may compute something else
_NORM_CLASSES = ("torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.batchnorm.SyncBatchNorm",
                 "timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct")
_DROP_PATH_CLASSES = ("timm.layers.drop.DropPath",)


class _PreActivation(NamedTuple):
    """act(bn(y)) not yet applied: a pending BatchNorm and whether act is a ReLU."""

    pending: PendingBN
    relu: bool


def _norm_relu(norm: nn.Module) -> Optional[bool]:
    """Whether the fused BatchNorm + act ``norm`` ends in a ReLU (True) or nothing (False);
    None when it is not a BatchNorm (one of _NORM_CLASSES) followed only by a ReLU or nothing."""
    if _qualified_name(norm) not in _NORM_CLASSES:
        return None
    if not isinstance(getattr(norm, "drop", nn.Identity()), nn.Identity):
        return None
    act = getattr(norm, "act", nn.Identity())
    if type(act) is nn.ReLU:
        return True
    return False if type(act) is nn.Identity else None


def _norm_unsupported(name: str, norm: nn.Module) -> Optional[str]:
    if _norm_relu(norm) is None:
        return (f"{name} is {type(norm).__name__}"
                f"{'(act=' + type(norm.act).__name__ + ')' if hasattr(norm, 'act') else ''}, "
                "not a BatchNorm followed by ReLU or nothing")
    return None


def _downsample_unsupported(downsample: Optional[nn.Module]) -> Optional[str]:
    if downsample is None:
        return None
    if _qualified_name(downsample) not in _DOWNSAMPLE_CLASSES:
        return f"downsample is {type(downsample).__name__}, not timm's DownsampleConv/DownsampleAvg"
    if not isinstance(downsample.norm, nn.Identity):
        return "downsample has a norm of its own (preact=False)"
    pool = getattr(downsample, "pool", nn.Identity())
    if any(True for _ in pool.parameters()) or any(True for _ in pool.buffers()):
        return f"downsample pool {type(pool).__name__} holds parameters"
    return _conv_unsupported("downsample conv", downsample.conv)


class _FusedPreActBlock(_FusedResidualBlock):
    """x_or_shortcut + drop_path(conv_k(act(norm_k(...conv1(act(norm1(x))))))), fused."""

    family = "timm pre-activation ResNet (resnetv2)"
    source_classes = {
        "timm.models.resnetv2.PreActBasic": "basic",
        "timm.models.resnetv2.PreActBottleneck": "bottleneck",
    }
    unit_names: tuple[tuple[str, str], ...] = ()  # (norm, conv) in order

    @classmethod
    def _structure_reason(cls, block: nn.Module) -> Optional[str]:
        for norm_name, conv_name in cls.unit_names:
            reason = (_norm_unsupported(norm_name, getattr(block, norm_name))
                      or _conv_unsupported(conv_name, getattr(block, conv_name)))
            if reason:
                return reason
        drop_path = block.drop_path
        if not (isinstance(drop_path, nn.Identity) or _qualified_name(drop_path) in _DROP_PATH_CLASSES):
            return f"drop_path is {type(drop_path).__name__}, not timm's DropPath"
        extra = [name for name in _children(block) if name not in cls.child_names]
        if extra:
            return f"{', '.join(extra)} not fused"
        return _downsample_unsupported(block.downsample)

    def _pre_activation(self, y: Tensor, norm: nn.Module) -> _PreActivation:
        return _PreActivation(pending_bn(y, norm, self.backend), _norm_relu(norm))

    def _conv_pre_activation(self, source: Union[Tensor, _PreActivation], conv: nn.Conv2d,
                             norm: nn.Module) -> _PreActivation:
        """``_pre_activation(_conv_of(source, conv), norm)``, the conv and norm's statistics in
        one op where a backend can."""
        relu = _norm_relu(norm)
        if isinstance(source, Tensor):
            return _PreActivation(self._conv_bn(source, conv, norm), relu)
        return _PreActivation(self._conv_bn(source.pending, conv, norm, relu=source.relu), relu)

    def _conv_of(self, source: Union[Tensor, _PreActivation], conv: nn.Conv2d) -> Tensor:
        if isinstance(source, Tensor):
            return conv(source)
        return self._conv(source.pending, conv, relu=source.relu)

    def _materialised(self, source: Union[Tensor, _PreActivation]) -> Tensor:
        if isinstance(source, Tensor):
            return source
        return ops.bn_act(source.pending, relu=source.relu, backend=self.backend)

    def _inference_forward(self, x: Tensor) -> Tensor:
        """Eval mode without autograd: norm_k+1 (+ act) folded into conv_k as its bias and ReLU
        epilogue, the last conv with the shortcut add as its epilogue; norm1 one bn_act pass."""
        source = self._materialised(self._pre_activation(x, self.norm1))
        shortcut = x
        if self.downsample is not None:
            pool = getattr(self.downsample, "pool", nn.Identity())
            shortcut = self.downsample.norm(
                self._conv_bias_act(pool(source), self.downsample.conv, relu=False))
        units = self.unit_names
        for (_, conv_name), (next_norm_name, _) in zip(units, units[1:]):
            next_norm = getattr(self, next_norm_name)
            source = self._conv_bias_act(source, getattr(self, conv_name), next_norm,
                                         relu=_norm_relu(next_norm))
        return self._conv_bias_act(source, getattr(self, units[-1][1]), residual=shortcut, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        modules = self._fused_modules()
        if not self._runs_fused(x, modules):
            return self._unfused_forward(x)
        if self._folding_applies(modules) and not self.drop_path.training:  # the folded forward drops no path
            return self._inference_forward(x)
        source = self._pre_activation(x, self.norm1)
        shortcut = x
        downsample = self.downsample
        if downsample is not None:
            pool = getattr(downsample, "pool", nn.Identity())
            if not isinstance(pool, nn.Identity):
                source = self._materialised(source)  # the pool and conv1 both read act(norm1(x))
                shortcut = downsample.norm(downsample.conv(pool(source)))
            else:
                shortcut = downsample.norm(self._conv_of(source, downsample.conv))
        units = self.unit_names
        for (_, conv_name), (next_norm_name, _) in zip(units, units[1:]):
            source = self._conv_pre_activation(source, getattr(self, conv_name),
                                               getattr(self, next_norm_name))
        return self.drop_path(self._conv_of(source, getattr(self, units[-1][1]))) + shortcut


class FusedPreActBasic(_FusedPreActBlock):
    """timm PreActBasic: x + conv2(act(norm2(conv1(act(norm1(x)))))), fused."""

    kind = "basic"
    unit_names = (("norm1", "conv1"), ("norm2", "conv2"))
    child_names = ("downsample", "norm1", "conv1", "norm2", "conv2", "drop_path")


class FusedPreActBottleneck(_FusedPreActBlock):
    """timm PreActBottleneck: three pre-activated convs and the shortcut add, fused."""

    kind = "bottleneck"
    unit_names = (("norm1", "conv1"), ("norm2", "conv2"), ("norm3", "conv3"))
    child_names = ("downsample", "norm1", "conv1", "norm2", "conv2", "norm3", "conv3", "drop_path")
