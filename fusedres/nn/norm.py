"""BatchNorm2d + ReLU in one fused pass, for BatchNorms outside residual blocks (the stem).

``FusedBatchNormAct2d`` *is* an ``nn.BatchNorm2d`` (same parameters, buffers, state_dict keys
and constructor), whose forward also applies the ReLU that followed it; the converter puts an
``nn.Identity`` where that ReLU was and remembers it, so ``revert`` restores both.
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
        self.displaced_activation: Optional[tuple[str, nn.Module]] = None  # (attribute, module)

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d, *, relu: bool = True, backend: str = "auto",
                    displaced_activation: Optional[tuple[str, nn.Module]] = None) -> "FusedBatchNormAct2d":
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
        fused.displaced_activation = displaced_activation
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
