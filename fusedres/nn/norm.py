"""BatchNorm2d + ReLU in one fused pass, for BatchNorms outside residual blocks (the stem).

``FusedBatchNormAct2d`` *is* an ``nn.BatchNorm2d`` (same parameters, buffers, state_dict keys
and constructor), whose forward also applies the ReLU that followed it. Where that ReLU was, the
converter puts a ``ReLUFusedIntoNorm``: it passes its input through while the fused norm is
still in place, and is a ReLU again once anything replaced that norm (for instance
``nn.SyncBatchNorm.convert_sync_batchnorm``, which turns every BatchNorm2d, ours included, into
a plain SyncBatchNorm), so the activation is never lost. ``revert`` restores both modules.
"""

from typing import Optional

from torch import Tensor, nn

from .. import ops
from .blocks import pending_bn


class FusedBatchNormAct2d(nn.BatchNorm2d):
    """relu(batch_norm(x)) (or batch_norm(x) with ``relu=False``), with nn.BatchNorm2d's state."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, relu: bool = True, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d, *, relu: bool = True,
                    backend: str = "auto") -> "FusedBatchNormAct2d":
        """A fused module sharing ``bn``'s parameters and buffers (the same tensor objects)."""
        if type(bn) is not nn.BatchNorm2d:
            raise ValueError(f"{cls.__name__}.from_module: expected nn.BatchNorm2d, got {type(bn).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for key in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            setattr(fused, key, getattr(bn, key))
        for name, param in bn.named_parameters(recurse=False):
            fused.register_parameter(name, param)
        for name in ("weight", "bias"):
            if name not in fused._parameters:
                fused.register_parameter(name, None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            fused.register_buffer(name, getattr(bn, name))
        fused.relu, fused.backend = relu, backend
        return fused

    def to_module(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d holding this module's parameters and buffers."""
        bn = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
        nn.Module.__init__(bn)
        for key in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            setattr(bn, key, getattr(self, key))
        for name in ("weight", "bias"):
            bn.register_parameter(name, self._parameters[name])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(name, self._buffers[name])
        return bn

    def forward(self, x: Tensor) -> Tensor:
        return ops.bn_act(pending_bn(x, self, self.backend), relu=self.relu, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"


class ReLUFusedIntoNorm(nn.ReLU):
    """Stands where a ReLU was fused into the norm ``parent.<norm_name>``.

    Identity while that attribute is still the fused norm; a ReLU if the norm was replaced.
    ``original`` is the ReLU module it stands for, which ``revert`` puts back.
    """

    def __init__(self, parent: nn.Module, norm_name: str, fused_norm: FusedBatchNormAct2d,
                 original: nn.Module):
        super().__init__()
        self.norm_name = norm_name
        # Plain references, not submodules: the state_dict and module tree stay the original's.
        vars(self).update(_parent=parent, _fused_norm=fused_norm, original=original)

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self._parent, self.norm_name) is self._fused_norm:
            return x
        return super().forward(x)
