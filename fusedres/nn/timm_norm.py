"""timm's ``BatchNormAct2d`` (BatchNorm + ReLU or nothing in one module), fused.

``FusedTimmBatchNormAct2d`` is both a ``FusedBatchNormAct2d`` (one fused pass, optional
residual) and a timm ``BatchNormAct2d`` holding the original's ``drop`` and ``act`` children,
so that ``timm.layers.convert_sync_batchnorm`` turns it into timm's ``SyncBatchNormAct`` with
the activation kept, and ``revert`` gives the timm module back. Imports timm: the converter loads
this module only for models that hold timm modules.

Torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` knows nothing of an activation inside a
norm: it drops the activation of every timm ``BatchNormAct2d`` outside a residual block,
converted or not (the fused pre-activation blocks keep theirs; see ``preact.py``). Use timm's
converter for timm models, as timm itself says.
"""

from typing import Optional

from timm.layers import BatchNormAct2d
from torch import nn

from .hooks import hooks_reason
from .norm import FusedBatchNormAct2d


def unsupported_reason(bn: nn.Module) -> Optional[str]:
    """None when ``FusedTimmBatchNormAct2d.from_module(bn)`` converts it, else why not."""
    if type(bn) is not BatchNormAct2d:
        return f"{type(bn).__name__} is not timm's BatchNormAct2d"
    if not isinstance(bn.drop, nn.Identity):
        return f"drop ({type(bn.drop).__name__}) is not fused"
    if type(bn.act) not in (nn.ReLU, nn.Identity):
        return f"act {type(bn.act).__name__} is not fused (ReLU or none only)"
    return hooks_reason(bn)


class FusedTimmBatchNormAct2d(FusedBatchNormAct2d, BatchNormAct2d):
    """act(batch_norm(x) + residual) with timm BatchNormAct2d's state; act is ReLU or nothing."""

    source_class = BatchNormAct2d
    carried_children = ("drop", "act")

    @classmethod
    def from_module(cls, bn: BatchNormAct2d, *, backend: str = "auto") -> "FusedTimmBatchNormAct2d":
        """A fused module sharing ``bn``'s parameters, buffers and drop/act children."""
        reason = unsupported_reason(bn)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_module: cannot convert: {reason}")
        return super().from_module(bn, relu=type(bn.act) is nn.ReLU, backend=backend)
