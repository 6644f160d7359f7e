"""Writes that move no version counter: the steps of torch's fused optimizers.

What fusedres keeps across calls from a tensor (a BatchNorm fold, the Triton conv's packed weight, a captured
CUDA graph) sees the tensor changed in place by its version counter. torch's fused optimizers (``fused=True``: SGD,
Adam, AdamW and Adagrad in torch 2.14, CPU) write their parameters without moving it, so their steps are counted here
instead, by a global optimizer-step hook, and what was made before one is made again (or refused): after any fused
step, whichever parameters it updated (so a frozen conv's packing for the Triton conv is made again too; a count per
parameter would cost every check a lookup). Writes through ``.data`` and by collectives
(``torch.distributed.broadcast``) move no counter either, and are not seen.
"""

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_fused_steps = 0


def fused_optimizer_steps() -> int:
    """The steps optimizers with ``fused=True`` took in this process since fusedres was imported."""
    return _fused_steps


def version_stamp(t: torch.Tensor) -> tuple[int, int]:
    """What moves when ``t`` is written in place, fused optimizers' steps included: its version counter and
    ``fused_optimizer_steps()``. For a tensor with a version counter (no inference tensor)."""
    return t._version, _fused_steps


def _count_fused_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    global _fused_steps
    if any(group.get("fused") for group in optimizer.param_groups):
        _fused_steps += 1


register_optimizer_step_post_hook(_count_fused_step)
