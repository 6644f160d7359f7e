"""Drop-in fused modules (torchvision parameter and buffer names)."""

from .blocks import FusedBasicBlock, FusedBottleneck
from .norm import FusedBatchNormAct2d

__all__ = ["FusedBasicBlock", "FusedBatchNormAct2d", "FusedBottleneck"]
