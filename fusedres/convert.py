"""One-call conversion of torchvision / timm ResNets to fused blocks, and back.

``convert(model)`` walks the module tree, replaces every residual block it can fuse with the
fused block of the same structure (sharing its conv/BN modules, so weights, buffers, device,
dtype and train/eval state are kept), leaves every other module untouched, and reports what it
changed and why it left the rest. ``revert(model)`` puts the original block classes back.

Blocks whose BatchNorms are ``nn.SyncBatchNorm`` convert too, and
``nn.SyncBatchNorm.convert_sync_batchnorm`` may run before or after ``convert`` (it swaps the
BatchNorm children, which the fused blocks read at each forward); either way the state_dict is
the unconverted model's.
"""

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .nn.blocks import FusedBasicBlock, FusedBottleneck, _FusedResidualBlock
from .ops.backends import BACKENDS

FUSED_BLOCK_TYPES = (FusedBasicBlock, FusedBottleneck)


@dataclass
class ConversionReport:
    """What ``convert`` did: converted blocks, and the blocks it left alone with the reason."""

    model: nn.Module
    converted: list[tuple[str, str]] = field(default_factory=list)  # (name, "A -> B")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __str__(self) -> str:
        lines = [f"fusedres.convert: {len(self.converted)} block(s) converted, "
                 f"{len(self.skipped)} left as they are"]
        lines += [f"  converted {name}: {what}" for name, what in self.converted]
        lines += [f"  left      {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _candidate_reason(module: nn.Module) -> Optional[tuple[type, Optional[str]]]:
    """(fused class, None) if convertible; (None, reason) for a residual block we cannot fuse;
    None for modules that are not residual blocks at all (not reported)."""
    if isinstance(module, _FusedResidualBlock):
        return None
    reasons = []
    for fused_cls in FUSED_BLOCK_TYPES:
        reason = fused_cls.unsupported_reason(module)
        if reason is None:
            return fused_cls, None
        reasons.append(reason)
    looks_like_block = hasattr(module, "conv1") and hasattr(module, "bn1") and hasattr(module, "conv2")
    if looks_like_block:
        return None, "; ".join(dict.fromkeys(reasons))
    return None


def convert(
    model: nn.Module,
    backend: str = "auto",
    memory_efficient: bool = True,
    inplace: bool = True,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> ConversionReport:
    """Replace every supported ResNet block of ``model`` by its fused equivalent.

    Args:
        backend: "auto" (CUDA extension, else Triton, else PyTorch, chosen per call) or one of
            "cuda", "triton", "torch".
        memory_efficient: recompute normalised activations in backward instead of saving them.
        inplace: modify ``model`` itself (default) or a deep copy of it.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; only blocks it accepts are
            converted (the others are reported as filtered out).

    Returns a ``ConversionReport``; ``report.model`` is the converted model.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"fusedres.convert: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport(model)
    for name, module in list(model.named_modules()):
        found = _candidate_reason(module)
        if found is None:
            continue
        fused_cls, reason = found
        if fused_cls is None:
            report.skipped.append((name, reason))
            continue
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped.append((name, "rejected by filter_fn"))
            continue
        fused = fused_cls.from_module(module, backend=backend, memory_efficient=memory_efficient)
        report.model = _replace(report.model, name, fused)
        report.converted.append((name, f"{type(module).__name__} -> {fused_cls.__name__}"))
    return report


def revert(model: nn.Module) -> nn.Module:
    """Put the original block back in place of every fused block (in place); returns model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _FusedResidualBlock):
            model = _replace(model, name, module.to_module())
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``model``; returns the (possibly new) root."""
    if not name:
        return new
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)
    return model
