"""What each level sets up, and the bytes / FLOPs formulas (the one place they are written).

- ``ops``: BatchNorm (batch statistics) + residual add + ReLU on the ResNet-50 activation shapes
  where a residual add happens (C = 256, 512, 1024, 2048 at size/4 ... size/32), forward
  (``fwd``, no autograd) and forward + backward (``fwd+bwd``). Eager is
  ``relu_(batch_norm(y) += residual)`` as torchvision writes it; fused is
  ``ops.bn_act(ops.batch_norm_stats(y, ...), residual)``.
- ``blocks``: every distinct residual block configuration of the selected models
  (``train`` = forward + backward in training mode, ``infer`` = eval-mode forward without grad).
- ``models``: whole torchvision ResNets and timm ``resnetv2_*``: ``train`` = one SGD step
  (forward, cross-entropy, backward, optimizer step), ``infer`` = eval-mode forward without grad.
- ``convs``: every distinct conv shape of the selected models (default resnet50). ``fwd`` (no
  autograd): cuDNN (the anchor) vs fusedres' prologue conv (``bn_act_conv2d``) per backend vs the
  Triton implicit-GEMM conv bare and as the training forward unit (BN + ReLU prologue, statistics
  epilogue) vs cuDNN + fusedres ``channel_stats``; the issue's targets for the Triton conv are
  ``CONV_TARGETS``. ``bwd``: the training unit's conv backward as the package runs it before
  BatchNorm's apply pass (``registry._conv_backward_local``: d act or dz, BatchNorm backward's
  sums, dW), its "cudnn" implementation (the anchor) vs its "triton" one (``CONV_BWD_CONTENDERS``).

Every case builds its weights from one seeded pristine model (BatchNorm affine parameters and
running statistics randomised, so eval-mode folding is exercised) and its inputs from a seed;
the contenders get deep copies of the same weights and share the inputs.
"""

import copy
import functools
import importlib
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import fusedres
from fusedres.ops.backends import unavailable_reason

from .harness import Case, Settings, Setup, Step

LEVELS = ("ops", "blocks", "models", "convs")
DEFAULT_MODELS = {"convs": ["resnet50"], None: ["resnet18", "resnet50", "resnetv2_50"]}
# identity basic, downsample bottleneck, downsample pre-activation bottleneck
QUICK_BLOCKS = {"resnet18": "layer1.0", "resnet50": "layer2.0", "resnetv2_50": "stages.1.blocks.0"}
BN_MOMENTUM, BN_EPS = 0.1, 1e-5


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
def _meta_model(name: str) -> nn.Module:
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


def _on_device(module: nn.Module, settings: Settings, train: bool) -> nn.Module:
    return copy.deepcopy(module).to(settings.device, memory_format=settings.memory_format).train(train)


def convert_copy(template: nn.Module, backend: str) -> nn.Module:
    report = fusedres.convert(template, backend=backend, inplace=False)
    if not report.converted:
        raise RuntimeError(f"fusedres.convert converted nothing: {report.skipped}")
    return report.model


def _named_params(target: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n.removeprefix("_orig_mod."), p) for n, p in target.named_parameters()]


def grad_step(target: nn.Module, inputs: dict[str, Tensor], autocast) -> Step:
    """Forward + backward of a block on inputs["x"]; returns the output and every gradient."""
    params, x = _named_params(target), inputs["x"]

    def run():
        x.grad = None
        for _, p in params:
            p.grad = None
        with autocast():
            out = target(x)
        out.backward(inputs["grad"].to(out.dtype))
        return {"out": out, "grad input": x.grad, **{f"grad {n}": p.grad for n, p in params}}
    return run


def sgd_step(target: nn.Module, inputs: dict[str, Tensor], autocast) -> Step:
    """One training step: forward, cross-entropy, backward, SGD; returns logits and gradients."""
    params = _named_params(target)
    optimizer = torch.optim.SGD([p for _, p in params], lr=0.01, momentum=0.9)

    def run():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = target(inputs["x"])
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), inputs["labels"])
        loss.backward()
        result = {"logits": logits, **{f"grad {n}": p.grad for n, p in params}}
        optimizer.step()
        return result
    return run


def infer_step(target: nn.Module, inputs: dict[str, Tensor], autocast) -> Step:
    def run():
        with torch.no_grad(), autocast():
            return {"out": target(inputs["x"])}
    return run


# ----------------------------------------------------------------------------- ops
def eager_bn_add_relu(y, residual, weight, bias, running_mean, running_var):
    out = F.batch_norm(y, running_mean, running_var, weight, bias, True, BN_MOMENTUM, BN_EPS)
    out += residual
    return F.relu_(out)


def fused_bn_add_relu(y, residual, weight, bias, running_mean, running_var, *, backend):
    pending = fusedres.ops.batch_norm_stats(y, weight, bias, running_mean, running_var,
                                            batch_stats=True, momentum=BN_MOMENTUM, eps=BN_EPS,
                                            backend=backend)
    return fusedres.ops.bn_act(pending, residual, relu=True, backend=backend)


_OP_ARGS = ("y", "residual", "weight", "bias", "running_mean", "running_var")


def op_step(target, inputs: dict[str, Tensor], autocast) -> Step:
    """BN + add + ReLU forward (no autograd), or forward + backward when inputs has "grad"."""
    args = [inputs[k] for k in _OP_ARGS]

    def run():
        if "grad" not in inputs:
            with torch.no_grad():
                return {"out": target(*args)}
        out = target(*args)
        grads = torch.autograd.grad(out, args[:4], inputs["grad"])
        return {"out": out, **{f"grad {k}": g for k, g in zip(_OP_ARGS, grads)}}
    return run


def _prepare_op(settings: Settings, shape, mode: str) -> Setup:
    torch.manual_seed(0)
    channels, dev, train = shape[1], settings.device, mode == "fwd+bwd"
    inputs = {"y": activation(shape, settings), "residual": activation(shape, settings).relu_(),
              "weight": torch.rand(channels, device=dev) + 0.5,
              "bias": 0.1 * torch.randn(channels, device=dev),
              "running_mean": torch.zeros(channels, device=dev),
              "running_var": torch.ones(channels, device=dev)}
    for k in _OP_ARGS[:4]:
        inputs[k].requires_grad_(train)
    if train:
        inputs["grad"] = activation(shape, settings)
    return Setup(inputs, eager=lambda: eager_bn_add_relu,
                 fused=lambda backend: functools.partial(fused_bn_add_relu, backend=backend),
                 step=op_step)


def op_cases(settings: Settings) -> list[Case]:
    cases = []
    for batch in default_batches(settings, "ops", "fwd+bwd"):
        shapes = [(batch, 256 << i, max(1, settings.size // (4 << i)), max(1, settings.size // (4 << i)))
                  for i in range(4)]
        if settings.quick:
            shapes = [shapes[0], shapes[-1]]
        for shape in shapes:
            for mode in ("fwd", "fwd+bwd"):
                cases.append(Case(
                    "ops", f"bn+add+relu C={shape[1]} {shape[2]}x{shape[3]}", mode, batch,
                    "x".join(map(str, shape)), bn_add_relu_bytes(shape, settings.dtype, mode), None,
                    functools.partial(_prepare_op, settings, shape, mode)))
    return cases


# ----------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class BlockConfig:
    model: str
    names: tuple[str, ...]  # every block of the model with this configuration
    in_shape: tuple[int, int, int]  # (C, H, W) per image
    out_shape: tuple[int, int, int]
    stride: int
    downsample: bool
    flops_per_image: int  # forward

    def describe(self) -> str:
        (ci, h, w), co = self.in_shape, self.out_shape[0]
        kind = type(_meta_model(self.model).get_submodule(self.names[0])).__name__
        return (f"{kind} {ci}->{co} {h}x{w} s{self.stride}{' +downsample' if self.downsample else ''}"
                f" (x{len(self.names)}: {', '.join(self.names)})")


def _block_types(model_name: str) -> tuple[type, ...]:
    if is_timm_model(model_name):
        from timm.models.resnetv2 import PreActBasic, PreActBottleneck

        return PreActBasic, PreActBottleneck
    return torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck


def block_configs(model_name: str, size: int) -> list[BlockConfig]:
    """The distinct residual blocks of a torchvision ResNet or timm ResNetV2 at ``size`` px, in
    network order."""
    model = _meta_model(model_name)
    seen: dict[tuple, list] = {}

    def record(name, block, inputs, output):
        in_shape, out_shape = tuple(inputs[0].shape[1:]), tuple(output.shape[1:])
        key = (type(block).__name__, in_shape, out_shape, block.conv1.out_channels,
               in_shape[1] // out_shape[1], block.downsample is not None)
        seen.setdefault(key, []).append(name)

    hooked_forward(model, _block_types(model_name), record, (1, 3, size, size))
    return [BlockConfig(model_name, tuple(names), in_shape, out_shape, stride, ds,
                        forward_flops(model.get_submodule(names[0]), (1, *in_shape)))
            for (_, in_shape, out_shape, _, stride, ds), names in seen.items()]


def _prepare_block(settings: Settings, cfg: BlockConfig, mode: str, batch: int) -> Setup:
    torch.manual_seed(0)
    train = mode == "train"
    template = _on_device(pristine_model(cfg.model).get_submodule(cfg.names[0]), settings, train)
    inputs = {"x": activation((batch, *cfg.in_shape), settings).relu_().requires_grad_(train)}
    if train:
        inputs["grad"] = activation((batch, *cfg.out_shape), settings)
    return Setup(inputs, eager=lambda: copy.deepcopy(template),
                 fused=lambda backend: convert_copy(template, backend),
                 step=grad_step if train else infer_step)


def block_cases(settings: Settings) -> list[Case]:
    cases = []
    for model in default_models(settings, "blocks"):
        configs = block_configs(model, settings.size)
        if settings.quick:
            wanted = QUICK_BLOCKS.get(model)
            configs = [next((c for c in configs if wanted in c.names), configs[0])]
        for cfg in configs:
            for mode in ("train", "infer"):
                factor = TRAIN_FLOPS_FACTOR if mode == "train" else 1
                for batch in default_batches(settings, "blocks", mode):
                    cases.append(Case(
                        "blocks", f"{model} {cfg.names[0]}", mode, batch, cfg.describe(), None,
                        factor * cfg.flops_per_image * batch,
                        functools.partial(_prepare_block, settings, cfg, mode, batch)))
    return cases


# ----------------------------------------------------------------------------- models
def _prepare_model(settings: Settings, name: str, mode: str, batch: int) -> Setup:
    torch.manual_seed(0)
    train = mode == "train"
    template = _on_device(pristine_model(name), settings, train)
    inputs = {"x": activation((batch, 3, settings.size, settings.size), settings, dtype=torch.float32),
              "labels": torch.randint(0, 1000, (batch,), device=settings.device)}
    return Setup(inputs, eager=lambda: copy.deepcopy(template),
                 fused=lambda backend: convert_copy(template, backend),
                 step=sgd_step if train else infer_step)


def model_cases(settings: Settings) -> list[Case]:
    cases = []
    models = default_models(settings, "models")
    for name in models[:1] if settings.quick else models:
        per_image = forward_flops(_meta_model(name), (1, 3, settings.size, settings.size))
        for mode in ("train", "infer"):
            factor = TRAIN_FLOPS_FACTOR if mode == "train" else 1
            for batch in default_batches(settings, "models", mode):
                cases.append(Case(
                    "models", name, mode, batch, f"{settings.size}x{settings.size} px, 1000 classes",
                    None, factor * per_image * batch,
                    functools.partial(_prepare_model, settings, name, mode, batch)))
    return cases


# ----------------------------------------------------------------------------- convs
CONV_CONTENDERS = ("cudnn", "prologue[cuda]", "prologue[triton]", "triton", "triton+stats", "cudnn+stats")
TRITON_CONV_CONTENDERS = ("prologue[triton]", "triton", "triton+stats")  # run fusedres.triton.conv
# bwd: the implementations of the package's unit conv backward (_conv_backward_local), anchor first
CONV_BWD_CONTENDERS = ("cudnn", "triton")
CONV_MODES = ("fwd", "bwd")
# The targets: time at most this factor of cudnn's, on the 1x1 and 3x3 convs
CONV_TARGETS = {"triton+stats": 1.15, "triton": 1 / 0.9}
BARE, PROLOGUE = "conv(x)", "conv(relu(x*scale+shift))"  # what a contender's output is


@dataclass(frozen=True)
class ConvSpec:
    uses: tuple[str, ...]  # "model:module" of every conv with this shape, in network order
    in_shape: tuple[int, int, int]  # (C, H, W) per image
    out_shape: tuple[int, int, int]  # (K, P, Q)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_shape[0], self.in_shape[0] // self.groups, *self.kernel)

    def module(self) -> nn.Conv2d:
        model, name = self.uses[0].split(":")
        return _meta_model(model).get_submodule(name)

    def geometry(self) -> dict:
        (c, h, w), (k, p, q), (r, s) = self.in_shape, self.out_shape, self.kernel
        return dict(C=c, H=h, W=w, K=k, P=p, Q=q, R=r, S=s, **self.args, uses=len(self.uses))

    def describe(self) -> str:
        (c, h, w), (k, p, q), (r, s) = self.in_shape, self.out_shape, self.kernel
        pair = lambda v: str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
        tags = f" s{pair(self.stride)} p{pair(self.padding)}" + (
            f" d{pair(self.dilation)}" if self.dilation != (1, 1) else "") + (
            f" g{self.groups}" if self.groups > 1 else "")
        names = [u.replace(":", " ") for u in self.uses]
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{c}->{k} {r}x{s} {h}x{w}->{p}x{q}{tags} (x{len(names)}: {listed})"


def conv_specs(model_names: list[str], size: int) -> list[ConvSpec]:
    """The distinct convs of the models at ``size`` px (network order, first model first)."""
    seen: dict[tuple, list[str]] = {}

    def record(model_name, name, conv, inputs, output):
        key = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]), conv.kernel_size, conv.stride,
               conv.padding, conv.dilation, conv.groups)
        seen.setdefault(key, []).append(f"{model_name}:{name}")

    for model_name in model_names:
        hooked_forward(_meta_model(model_name), (nn.Conv2d,), functools.partial(record, model_name),
                       (1, 3, size, size))
    return [ConvSpec(tuple(uses), *key) for key, uses in seen.items()]


def conv_run_skips(settings: Settings, mode: str = "fwd") -> dict[str, Optional[str]]:
    """Per conv contender of ``mode``, None or why it cannot run at all in this run (noted once, not
    per case)."""
    triton = "Triton conv runs on CUDA (the interpreter is for tests)" if not settings.cuda else (
        unavailable_reason("triton", settings.device))
    for module in ("conv",) + (("conv_wgrad",) if mode == "bwd" else ()):
        if triton is None:
            try:
                importlib.import_module(f"fusedres.triton.{module}")
            except Exception as exc:
                triton = f"cannot import fusedres.triton.{module}: {type(exc).__name__}: {exc}"
    if mode == "bwd":
        return {"cudnn": None, "triton": triton}
    skips = {name: triton if name in TRITON_CONV_CONTENDERS else None for name in CONV_CONTENDERS}
    for backend in ("cuda", "triton"):
        if backend not in settings.backends:
            skips[f"prologue[{backend}]"] = f"backend {backend} not selected (--backends)"
    if skips["prologue[cuda]"] is None:
        skips["prologue[cuda]"] = unavailable_reason("cuda", settings.device)
    return skips


def stats_backend(settings: Settings) -> str:
    """channel_stats' backend in cudnn+stats: the CUDA extension, else Triton, on CUDA; else torch."""
    usable = [b for b in ("cuda", "triton")
              if settings.cuda and unavailable_reason(b, settings.device) is None]
    return (usable or ["torch"])[0]


def conv_notes(settings: Settings) -> list[str]:
    return [f"convs {mode}: {name} skipped: {why}" for mode in CONV_MODES
            for name, why in conv_run_skips(settings, mode).items() if why] + [
        f"convs: cudnn+stats takes the channel statistics, and the bwd contenders recompute the activation "
        f"(cudnn) and take BatchNorm backward's sums (cudnn; triton where torch computes its input gradient), "
        f"with fusedres' {stats_backend(settings)} backend",
        "convs bwd: each contender is fusedres.ops.registry._conv_backward_local (the conv backward of a "
        "training unit up to BatchNorm's apply pass: d act or dz, sum dz, sum dz*(x-mean), dW) with its "
        "cudnn or triton implementation; TFLOP/s from 2x the forward's FLOPs (input + weight gradient)"]


def _triton_conv_skip(settings: Settings, spec: ConvSpec, batch: int) -> Optional[str]:
    """Why fusedres.triton.conv does not take this conv (prologue[triton] would fall back to
    BN-apply + cuDNN), or None. Checked on expanded 0-d tensors: no memory."""
    from fusedres.triton.conv import unsupported_reason

    like = lambda shape: torch.empty((), dtype=settings.dtype, device=settings.device).expand(shape)
    why = unsupported_reason(like((batch, *spec.in_shape)), like(spec.weight_shape), **spec.args)
    return None if why is None else f"the Triton conv does not take this conv: {why}"


def _triton_bwd_parts(settings: Settings, spec: ConvSpec, batch: int) -> dict[str, Optional[str]]:
    """Why the Triton backward kernels do not take each part of this conv's backward ("input gradient":
    ``conv2d_input_grad``, "weight gradient": ``conv2d_weight_grad``), or None per part; the package runs
    a part they do not take with torch (``registry._triton_backward_parts``). Checked on expanded 0-d
    tensors: no memory."""
    from fusedres.triton.conv import input_grad_unsupported_reason
    from fusedres.triton.conv_wgrad import unsupported_reason

    like = lambda shape: torch.empty((), dtype=settings.dtype, device=settings.device).expand(shape)
    x, grad, weight = like((batch, *spec.in_shape)), like((batch, *spec.out_shape)), like(spec.weight_shape)
    return {"input gradient": input_grad_unsupported_reason(grad, weight, x, **spec.args),
            "weight gradient": unsupported_reason(x, grad, spec.weight_shape, **spec.args)}


def _bn_relu(i: dict[str, Tensor]) -> Tensor:
    return F.relu(i["x"] * i["scale"].view(1, -1, 1, 1) + i["shift"].view(1, -1, 1, 1))


def conv_target(name: str, spec: ConvSpec, stats: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Contender ``name``'s forward on the inputs (x, weight, scale, shift, mean): its conv output,
    named BARE or PROLOGUE; "reference" (run upcast) returns both."""
    args = spec.args
    if name == "reference":
        return lambda i: {BARE: F.conv2d(i["x"], i["weight"], **args),
                          PROLOGUE: F.conv2d(_bn_relu(i), i["weight"], **args)}
    if name in ("cudnn", "cudnn+stats"):
        def cudnn(i):
            y = F.conv2d(i["x"], i["weight"], **args)
            if name == "cudnn+stats":
                torch.ops.fusedres.channel_stats(y, stats)
            return {BARE: y}
        return cudnn
    if name.startswith("prologue["):  # BatchNorm as y * scale + shift: mean 0, invstd scale, bias shift
        backend = name[len("prologue["):-1]
        return lambda i: {PROLOGUE: fusedres.ops.bn_act_conv2d(
            fusedres.ops.PendingBN(i["x"], i["mean"], i["scale"], None, i["shift"], batch_stats=False),
            i["weight"], None, **args, backend=backend)}
    from fusedres.triton.conv import conv2d_fused

    if name == "triton":
        return lambda i: {BARE: conv2d_fused(i["x"], i["weight"], **args)[0]}
    if name == "triton+stats":
        return lambda i: {PROLOGUE: conv2d_fused(i["x"], i["weight"], **args, in_scale=i["scale"],
                                                 in_shift=i["shift"], in_relu=True, compute_stats=True)[0]}
    raise ValueError(f"unknown conv contender {name!r}")


def conv_step(target, inputs: dict[str, Tensor], autocast) -> Step:
    """One forward, no autograd, on tensors already in the benchmark dtype (no autocast)."""
    def run():
        with torch.no_grad():
            return target(inputs)
    return run


# The bwd outputs, by name. A contender returns D_ACT (d act = the input gradient of the conv of act =
# relu(x * scale + shift)) or DZ (= d act * relu'(x * scale + shift), the Triton input side's), the
# BatchNorm backward sums over (N, H, W) and D_WEIGHT; the reference returns all of them.
D_ACT, DZ, SUM_DZ, SUM_DZ_XC, D_WEIGHT = "d act", "dz", "sum dz", "sum dz*(x-mean)", "dW"


def _conv_args_lists(spec: ConvSpec) -> tuple:
    """(stride, padding, dilation, groups) as the custom op hands them to its backward."""
    return list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups


def _bwd_reference(i: dict[str, Tensor], spec: ConvSpec) -> dict[str, Tensor]:
    """The unit conv's backward written out in torch ops (run upcast: the reference)."""
    stride, padding, dilation, groups = _conv_args_lists(spec)
    x, mean = i["x"], i["mean"].view(1, -1, 1, 1)
    z = x * i["scale"].view(1, -1, 1, 1) + i["shift"].view(1, -1, 1, 1)
    d_act, d_weight = torch.ops.aten.convolution_backward(
        i["grad"], z.relu(), i["weight"], None, stride, padding, dilation, False, [0, 0], groups,
        [True, True, False])[:2]
    dz = d_act * (z > 0)
    return {D_ACT: d_act, DZ: dz, SUM_DZ: dz.sum((0, 2, 3)), SUM_DZ_XC: (dz * (x - mean)).sum((0, 2, 3)),
            D_WEIGHT: d_weight}


def conv_bwd_target(name: str, spec: ConvSpec, stats: str) -> Callable[[dict[str, Tensor]], Step]:
    """Contender ``name``'s backward of a training unit's conv on the inputs (x, weight, scale, shift,
    mean, grad = the conv output's gradient): a Step for those inputs. "cudnn" / "triton": the package's
    ``_conv_backward_local`` with that implementation, its arguments built as ``_prologue_conv2d_backward``
    builds them (BatchNorm as x * scale + shift: mean 0, invstd scale, no weight, bias shift; both the
    input and the weight gradient wanted), with ``stats`` the backend of its BatchNorm ops; "reference"
    (run upcast) returns every kind of output."""
    if name == "reference":
        return lambda i: functools.partial(_bwd_reference, i, spec)
    if name not in CONV_BWD_CONTENDERS:
        raise ValueError(f"unknown conv bwd contender {name!r}")
    from fusedres.ops import registry

    conv_args = _conv_args_lists(spec)

    def prepare(i: dict[str, Tensor]) -> Step:
        x, grad, weight = i["x"], i["grad"], i["weight"]
        bn_tensors = (x, i["mean"], i["scale"], None, i["shift"]) + (None,) * 6
        prologue = registry._affine(i["mean"], i["scale"], None, i["shift"])  # = (scale, shift)

        def run():
            # per call, as in the package: which parts the Triton kernels take, asked at most once
            triton_parts = functools.cache(lambda: registry._triton_backward_parts(
                grad, x, weight, conv_args, True, True, True))
            with torch.no_grad():
                d_input, sums, d_weight, masked = registry._conv_backward_local(
                    name, grad, bn_tensors, prologue, weight, conv_args, True, True, stats, (True, True),
                    triton_parts)
            return {DZ if masked else D_ACT: d_input, SUM_DZ: sums[0], SUM_DZ_XC: sums[1], D_WEIGHT: d_weight}
        return run
    return prepare


def conv_bwd_step(target, inputs: dict[str, Tensor], autocast) -> Step:
    """The bwd target's step on the inputs (tensors already in the benchmark dtype, no autocast)."""
    return target(inputs)


def _prepare_conv(settings: Settings, spec: ConvSpec, batch: int, stats: str, mode: str = "fwd") -> Setup:
    torch.manual_seed(0)
    channels, dev = spec.in_shape[0], settings.device
    fan_in = math.prod(spec.weight_shape[1:])
    inputs = {"x": activation((batch, *spec.in_shape), settings),
              "weight": activation(spec.weight_shape, settings).mul_(fan_in ** -0.5),
              "scale": torch.rand(channels, device=dev) + 0.5,
              "shift": 0.5 * torch.randn(channels, device=dev), "mean": torch.zeros(channels, device=dev)}
    if mode == "bwd":
        inputs["grad"] = activation((batch, *spec.out_shape), settings)
    target = functools.partial(conv_bwd_target if mode == "bwd" else conv_target, spec=spec, stats=stats)
    return Setup(inputs, eager=lambda: target("cudnn"), fused=target,
                 step=conv_bwd_step if mode == "bwd" else conv_step, reference=lambda: target("reference"))


def _conv_bwd_case_info(settings: Settings, spec: ConvSpec, batch: int,
                        run_skip: Optional[str]) -> tuple[Optional[str], str, dict]:
    """(why the triton bwd contender is skipped on this case or None, text added to the case's shape,
    the Triton parts' reasons for the rows' JSON) of a bwd case."""
    if run_skip is not None:
        return None, "", {}
    parts = _triton_bwd_parts(settings, spec, batch)
    by_torch = [f"{part} by torch ({why})" for part, why in parts.items() if why is not None]
    if len(by_torch) == len(parts):  # the package runs its cudnn implementation then: nothing to time
        return "the Triton backward kernels take no part of this conv: " + "; ".join(by_torch), "", parts
    return None, "".join(f"; triton bwd: {text}" for text in by_torch), parts


def conv_cases(settings: Settings) -> list[Case]:
    stats = stats_backend(settings)
    specs = conv_specs(default_models(settings, "convs"), settings.size)
    if settings.quick:  # the first 1x1 and the first 3x3 conv
        quick = [next((s for s in specs if s.kernel == k), None) for k in ((1, 1), (3, 3))]
        specs = [s for s in quick if s] or specs[:1]
    cases = []
    for spec in specs:
        for mode in CONV_MODES:
            run_skips = conv_run_skips(settings, mode)
            triton_names = TRITON_CONV_CONTENDERS if mode == "fwd" else ("triton",)
            for batch in default_batches(settings, "convs", mode):
                shape, extra = spec.describe(), {"conv": spec.geometry()}
                if mode == "fwd":
                    shape_skip = None if run_skips["triton"] else _triton_conv_skip(settings, spec, batch)
                else:
                    shape_skip, tail, parts = _conv_bwd_case_info(settings, spec, batch, run_skips["triton"])
                    shape += tail
                    if parts:
                        extra["triton_bwd_by_torch"] = parts
                flops = conv2d_flops(spec.module(), (batch, *spec.out_shape))
                cases.append(Case(
                    "convs", spec.uses[0].replace(":", " "), mode, batch, shape, None,
                    flops * (2 if mode == "bwd" else 1),  # bwd: the input and the weight gradient
                    functools.partial(_prepare_conv, settings, spec, batch, stats, mode),
                    contenders=[(n, shape_skip if n in triton_names else None)
                                for n, why in run_skips.items() if why is None],
                    extra=extra))
    return cases


def conv_bwd_summary(rows: list[dict]) -> str:
    """The bwd rows' line: on how many shapes triton's backward beats cudnn's (no target in the issue)."""
    got = [r for r in rows if r["mode"] == "bwd" and r["contender"] == "triton" and r.get("vs_eager")]
    if not got:
        return "Backward (bwd), triton vs cudnn: not measured."
    speed = sorted(r["vs_eager"] for r in got)
    median = statistics.median(speed)
    slower = [f"{r['case']} b{r['batch']} {1 / r['vs_eager']:.2f}x" for r in got if r["vs_eager"] < 1]
    by_torch = sum(1 for r in got if (r.get("triton_bwd_by_torch") or {}).get("input gradient"))
    return (f"Backward (bwd), triton time vs cudnn's: faster on {len(got) - len(slower)}/{len(got)} shapes, "
            f"median speedup {median:.2f}x (range {speed[0]:.2f}x-{speed[-1]:.2f}x)"
            + (f"; slower (time vs cudnn's): {', '.join(slower)}" if slower else "")
            + (f"; {by_torch} of the shapes with torch's input gradient (stride 2 etc.)" if by_torch else "") + ".")


def conv_summary(rows: list[dict]) -> list[str]:
    """Under the convs table: the forward targets met, the backward's speedups, and the first calls summed
    over the shapes."""
    counted = [r for r in rows if r.get("vs_eager") and r["mode"] == "fwd"
               and (r["conv"]["R"], r["conv"]["S"]) in ((1, 1), (3, 3))]
    parts = []
    for name, limit in CONV_TARGETS.items():
        got = [r for r in counted if r["contender"] == name]
        missed = [f"{r['case']} b{r['batch']} {1 / r['vs_eager']:.2f}x"
                  for r in got if 1 / r["vs_eager"] > limit]
        verdict = "not measured" if not got else f"met on {len(got) - len(missed)}/{len(got)}" + (
            f" (missed: {', '.join(missed)})" if missed else "")
        parts.append(f"{name} time <= {limit:.2f}x cudnn's: {verdict}")
    first: dict[str, list[float]] = {}
    for r in rows:
        if r.get("first_call_s") is not None:
            label = r["contender"] + ("" if r["mode"] == "fwd" else f" {r['mode']}")
            first.setdefault(label, []).append(r["first_call_s"])
    return ["Targets (fwd, 1x1 and 3x3 convs): " + "; ".join(parts) + ".", conv_bwd_summary(rows),
            "First calls summed over the shapes (s): "
            + ", ".join(f"{n} {sum(v):.2f} ({len(v)} shapes)" for n, v in first.items()) + "."]


LEVEL_SUMMARIES = {"convs": conv_summary}


def build_cases(settings: Settings) -> list[Case]:
    """Every case of the selected levels, in level order."""
    makers = {"ops": op_cases, "blocks": block_cases, "models": model_cases, "convs": conv_cases}
    return [case for level in LEVELS if level in settings.levels for case in makers[level](settings)]
