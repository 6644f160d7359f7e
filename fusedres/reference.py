"""The oracle: the fused unit and both ResNet block types written with plain torch ops.

Every backend of fusedres must match these functions (outputs, all gradients through autograd,
running_mean / running_var / num_batches_tracked). They import nothing else from fusedres, so a
bug in the package cannot hide in its own reference.

The fused unit (DESIGN.md):

    x'  = x  or  relu(x * in_scale + in_shift)          optional prologue, per input channel
    y   = conv2d(x', W, b, stride, padding, dilation, groups)
    z   = batch_norm(y)      training: batch statistics, running stats updated with momentum
                             (momentum=None: cumulative average); eval: running statistics
    z   = z + residual       optional
    out = relu(z) or z
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


def batch_norm_momentum(bn: nn.modules.batchnorm._BatchNorm) -> tuple[bool, float]:
    """Exactly ``nn.BatchNorm2d.forward``'s bookkeeping, done once per forward call.

    Increments ``num_batches_tracked`` when the module is training and tracks running stats,
    and returns (use_batch_statistics, exponential_average_factor).
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    return use_batch_stats, factor


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.modules.batchnorm._BatchNorm,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
) -> Tensor:
    """One fused unit, using ``conv``'s and ``bn``'s parameters and buffers (buffers updated)."""
    if in_scale is not None:
        x = F.relu(x * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1))
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    use_batch_stats, factor = batch_norm_momentum(bn)
    track = not bn.training or bn.track_running_stats
    z = F.batch_norm(
        y,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        factor,
        bn.eps,
    )
    if residual is not None:
        z = z + residual
    return F.relu(z) if relu else z


def shortcut(x: Tensor, downsample: Optional[nn.Module]) -> Tensor:
    """Identity, or torchvision's downsample = Sequential(conv1x1, BatchNorm2d)."""
    if downsample is None:
        return x
    conv, bn = downsample[0], downsample[1]
    return conv_bn_act(x, conv, bn, relu=False)


def basic_block(x: Tensor, block: nn.Module) -> Tensor:
    """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    out = conv_bn_act(x, block.conv1, block.bn1)
    return conv_bn_act(out, block.conv2, block.bn2, residual=shortcut(x, block.downsample))


def bottleneck(x: Tensor, block: nn.Module) -> Tensor:
    """torchvision Bottleneck: three units, the last one with the residual add and ReLU."""
    out = conv_bn_act(x, block.conv1, block.bn1)
    out = conv_bn_act(out, block.conv2, block.bn2)
    return conv_bn_act(out, block.conv3, block.bn3, residual=shortcut(x, block.downsample))
