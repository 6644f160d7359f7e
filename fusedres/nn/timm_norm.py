"""timm's ``BatchNormAct2d`` (BatchNorm + ReLU or nothing in one module), fused.

``FusedTimmBatchNormAct2d`` is both a ``FusedBatchNormAct2d`` (one fused pass, optional
residual) and a timm ``BatchNormAct2d`` holding the original's ``drop`` and ``act`` children,
so that ``timm.layers.convert_sync_batchnorm`` turns it into timm's ``SyncBatchNormAct`` with
the activation kept, and ``revert`` gives the timm module back. Imports timm: the converter loads
this module only for models that hold timm modules.

It checks its ``drop`` and ``act`` children at each forward, as timm's forward calls them: where one was
replaced by a module it does not fuse (any drop but ``nn.Identity``, any act but the one it was converted
with), one has hooks or a global hook is registered, the batch is empty, ``torch.fx`` traces it or forward-mode
AD is on, it runs timm's forward on them (``_unfused_forward``), so a trace records what the original's does.

Torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` knows nothing of an activation inside a
norm: it drops the activation of every timm ``BatchNormAct2d`` outside a residual block,
converted or not (the fused pre-activation blocks keep theirs; see ``preact.py``). Use timm's
converter for timm models, as timm itself says.
"""

from typing import Optional

from timm.layers import BatchNormAct2d
from torch import Tensor, nn

from .hooks import any_run_hooks, hooks_reason, runs_torch_modules
from .norm import FusedBatchNormAct2d, _batch_norm


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

    @staticmethod
    def _source_activation(relu: bool) -> dict:
        """timm's constructor makes ``act`` a ReLU where it applies one, else an ``nn.Identity``."""
        return dict(apply_act=relu)

    @classmethod
    def from_module(cls, bn: BatchNormAct2d, *, backend: str = "auto") -> "FusedTimmBatchNormAct2d":
        """A fused module sharing ``bn``'s parameters, buffers and drop/act children."""
        reason = unsupported_reason(bn)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_module: cannot convert: {reason}")
        return super().from_module(bn, relu=type(bn.act) is nn.ReLU, backend=backend)

    def _runs_fused(self, x: Tensor) -> bool:
        """Whether this forward on ``x`` may run fused: x is a non-empty tensor needing no torch
        modules (``runs_torch_modules``: a ``torch.fx`` proxy, forward-mode AD), the
        drop is an ``nn.Identity`` and the act the ReLU or ``nn.Identity`` it was converted with (``relu``),
        and neither has hooks nor is a global hook registered (``any_run_hooks``)."""
        drop, act = self._modules.get("drop"), self._modules.get("act")
        return (not runs_torch_modules(x) and x.numel() != 0 and type(drop) is nn.Identity
                and type(act) is (nn.ReLU if self.relu else nn.Identity) and not any_run_hooks((drop, act)))

    def _unfused_forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """timm's forward on this module's current children, act(drop(batch_norm(x))), the residual added before
        the act: eager's result, hook calls and bookkeeping, and a trace of timm's calls."""
        if residual is None:
            return BatchNormAct2d.forward(self, x)
        return self.act(self.drop(_batch_norm(self, x)) + residual)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self._runs_fused(x):
            return super().forward(x, residual)
        return self._unfused_forward(x, residual)
