"""The ops: ``registry`` (the BatchNorm ops), ``unit_conv`` (the training unit's conv ops) and
``inference`` (the eval-mode unit's op) declare them, ``eager`` makes the entry points eager code calls;
backend choice (``backends``; per call signature, measured, in ``dispatch``) and the functional API;
``folded_units``: a converted module's eval-mode units on that op, and a block's forward replayed through them."""

from . import registry, unit_conv  # noqa: F401  (register the torch.ops.fusedres.* ops)
from .dispatch import dispatch_table
from .functional import PendingBN, batch_norm_stats, bn_act, bn_act_conv2d, conv_batch_norm_stats
from .inference import conv_bias_act, fold_batch_norm

__all__ = ["PendingBN", "batch_norm_stats", "bn_act", "bn_act_conv2d", "conv_batch_norm_stats", "conv_bias_act",
           "dispatch_table", "fold_batch_norm"]
