"""Drop-in fused modules (torchvision parameter and buffer names)."""

from .blocks import FusedBasicBlock, FusedBottleneck

__all__ = ["FusedBasicBlock", "FusedBottleneck"]
