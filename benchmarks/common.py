"""What every level shares: the bytes / FLOPs formulas (the one place they are written), the
models' builders, the seeded pristine weights every contender copies, and the seeded inputs."""

import functools
import math
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn

from .harness import Settings

DEFAULT_MODELS = {"convs": ["resnet50"], None: ["resnet18", "resnet50", "resnetv2_50"]}


# ----------------------------------------------------------------------------- formulas
def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# Whole-tensor passes over memory that BN (batch statistics) + add + ReLU cannot avoid when it
# runs on its own (the activation does not fit on chip):
#   fwd      4 = statistics pass reads y; apply pass reads y and the residual, writes out.
#   fwd+bwd 12 = fwd + backward reduction pass (reads grad_out, y, residual: the ReLU mask is
#                recomputed) + backward apply pass (reads the same three, writes dy, d_residual).
# Per-channel vectors are negligible. Eager moves more than this (it also saves and re-reads the
# normalised output); the same count is used for every contender so GB/s compare like for like.
BN_ADD_RELU_PASSES = {"fwd": 4, "fwd+bwd": 12}


def bn_add_relu_bytes(shape, dtype: torch.dtype, mode: str) -> int:
    return BN_ADD_RELU_PASSES[mode] * tensor_bytes(shape, dtype)


def conv2d_flops(conv: nn.Conv2d, out_shape) -> int:
    """2 * N * C_out * H_out * W_out * (C_in / groups) * kh * kw (multiply + add)."""
    n, c_out, h, w = out_shape
    kh, kw = conv.kernel_size
    return 2 * n * c_out * h * w * (conv.in_channels // conv.groups) * kh * kw


def linear_flops(linear: nn.Linear, out_shape) -> int:
    return 2 * math.prod(out_shape[:-1]) * linear.in_features * linear.out_features


TRAIN_FLOPS_FACTOR = 3  # training = forward + input gradient + weight gradient (BN etc. not counted)


def hooked_forward(module: nn.Module, types: tuple[type, ...], hook, input_shape) -> None:
    """One eval-mode forward of a meta-device ``module`` on an ``input_shape`` input (no memory),
    calling ``hook(name, submodule, inputs, output)`` after each submodule of one of ``types``."""
    handles = [m.register_forward_hook(functools.partial(hook, n)) for n, m in module.named_modules()
               if isinstance(m, types)]
    try:
        with torch.no_grad():
            module.eval()(torch.empty(input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()


def forward_flops(module: nn.Module, input_shape) -> int:
    """Conv + linear FLOPs of one forward of ``module`` (run on the meta device: no memory)."""
    total = 0

    def count(name, mod, inputs, output):
        nonlocal total
        total += (conv2d_flops if isinstance(mod, nn.Conv2d) else linear_flops)(mod, output.shape)

    hooked_forward(module, (nn.Conv2d, nn.Linear), count, input_shape)
    return total


# ----------------------------------------------------------------------------- shared set-up
def default_batches(settings: Settings, level: str, mode: str) -> list[int]:
    if settings.batches:
        return settings.batches
    if level == "models" and mode == "infer":
        if settings.quick:
            return [32] if settings.cuda else [1]
        return [1, 32, 256] if settings.cuda else [1, 4]
    if level == "convs" and settings.quick:
        return [32] if settings.cuda else [2]
    return [256] if settings.cuda else [2]


def default_models(settings: Settings, level: str) -> list[str]:
    return settings.models or DEFAULT_MODELS.get(level, DEFAULT_MODELS[None])


def activation(shape, settings: Settings, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Seeded random tensor in the benchmark dtype and layout."""
    fmt = settings.memory_format if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or settings.dtype, device=settings.device,
                       memory_format=fmt).normal_()


def is_timm_model(name: str) -> bool:
    """timm's pre-activation ResNets (``resnetv2_*``); every other name is a torchvision builder."""
    return name.startswith("resnetv2")


def build_model(name: str) -> nn.Module:
    if is_timm_model(name):
        import timm

        return timm.create_model(name)
    return getattr(torchvision.models, name)()


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(name)


@functools.lru_cache(maxsize=None)
def pristine_model(name: str) -> nn.Module:
    """The seeded CPU model every contender's weights are copied from."""
    torch.manual_seed(0)
    model = build_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model
