"""The op registry (``registry``), backend choice (``backends``) and the functional API."""

from . import registry  # noqa: F401  (registers the torch.ops.fusedres.* ops)
from .functional import PendingBN, batch_norm_stats, bn_act, bn_act_conv2d

__all__ = ["PendingBN", "batch_norm_stats", "bn_act", "bn_act_conv2d"]
