"""One-call conversion of torchvision / timm ResNets to fused blocks, and back.

``convert(model)`` walks the module tree, replaces every residual block it can fuse with the
fused block of the same structure (sharing its conv/BN modules, so weights, buffers, device,
dtype and train/eval state are kept), leaves every other module untouched, and reports what it
changed and why it left the rest. ``revert(model)`` puts the original block classes back; ``refold(model)``
drops the BatchNorm folds its eval forwards cache (needed only after writes through ``.data``).

Outside the blocks it fuses a BatchNorm2d with the ReLU that follows it (the stem of
torchvision's and timm's ResNet, and any BatchNorm2d -> ReLU pair inside an nn.Sequential, such
as timm's deep stems) into a ``FusedBatchNormAct2d`` (see ``fusedres/nn/norm.py`` for what takes the
ReLU's place, and why).

A torchvision / timm ResNet itself gets a subclass of its class whose forward runs the stem (conv1, bn1 and
the ReLU) as a unit, as the blocks run theirs (``fusedres/nn/stem.py``); ``revert`` restores the class.

Blocks whose BatchNorms are ``nn.SyncBatchNorm`` convert too, and
``nn.SyncBatchNorm.convert_sync_batchnorm`` may run before or after ``convert`` (it swaps the
BatchNorm children, which the fused blocks read at each forward); either way the state_dict is
the unconverted model's.
"""

import copy
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .nn.blocks import FOLDS, FusedBasicBlock, FusedBottleneck, _FusedResidualBlock, _qualified_name
from .nn.hooks import has_run_hooks
from .nn.norm import FusedBatchNormAct2d, ReLUFusedIntoNorm
from .nn.preact import FusedPreActBasic, FusedPreActBottleneck
from .nn.stem import _FusedStemModel, fused_stem_class, stem_unsupported_reason, subclassed_stem_model
from .ops.backends import (BACKENDS, INTERPRETER_NOT_AUTO, KERNEL_DTYPES, interpreted_only, requested_backend,
                           unavailable_reason)

FUSED_BLOCK_TYPES = (FusedBasicBlock, FusedBottleneck, FusedPreActBasic, FusedPreActBottleneck)
# timm's normalisation layers other than BatchNormAct2d (GroupNormAct, EvoNorm, FRN, ...) live in
# these modules: reported and left alone when they stand outside a residual block.
_TIMM_NORM_MODULES = ("timm.layers.norm_act", "timm.layers.evo_norm",
                      "timm.layers.filter_response_norm", "timm.layers.norm")
# Model classes whose forward applies the stem as ... -> bn -> act -> ...: (bn, act) attributes.
_STEM_PAIRS = {
    "torchvision.models.resnet.ResNet": ("bn1", "relu"),
    "timm.models.resnet.ResNet": ("bn1", "act1"),
}


@dataclass
class ConversionReport:
    """What ``convert`` did: converted blocks, and the blocks it left alone with the reason."""

    model: nn.Module
    converted: list[tuple[str, str]] = field(default_factory=list)  # (name, "A -> B")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    backend_note: str = ""  # which backend "auto" runs for the model's device and dtype, and why
    already_fused: int = 0  # modules of ours the model held before (converted earlier), left as they are

    def __str__(self) -> str:
        already = f", {self.already_fused} already fused" if self.already_fused else ""
        lines = [f"fusedres.convert: {len(self.converted)} module(s) converted, "
                 f"{len(self.skipped)} left as they are{already}; {self.backend_note}"]
        lines += [f"  converted {name}: {what}" for name, what in self.converted]
        lines += [f"  left      {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _candidate_reason(module: nn.Module) -> Optional[tuple[type, Optional[str]]]:
    """(fused class, None) if convertible; (None, reason) for a residual block we cannot fuse;
    None for modules that are not residual blocks at all (not reported)."""
    if isinstance(module, _FusedResidualBlock):
        return None
    name = _qualified_name(module)
    for fused_cls in FUSED_BLOCK_TYPES:
        if fused_cls.source_classes.get(name) == fused_cls.kind:
            reason = fused_cls.unsupported_reason(module)
            return (fused_cls, None) if reason is None else (None, reason)
    looks_like_block = (not isinstance(module, nn.Sequential) and hasattr(module, "conv1") and hasattr(module, "conv2")
                        and (hasattr(module, "bn1") or hasattr(module, "norm1")))
    if looks_like_block:
        return None, f"{type(module).__name__} is not a known torchvision/timm ResNet block"
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
    requested = requested_backend(backend)
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"fusedres.convert: FUSEDRES_BACKEND={requested!r} is no backend; "
                         f"expected 'auto' or one of {BACKENDS}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport(model, already_fused=sum(
        isinstance(m, (_FusedResidualBlock, FusedBatchNormAct2d, _FusedStemModel)) for m in model.modules()))
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
    _convert_bn_relu_pairs(report, backend, filter_fn)
    _convert_stems(report, backend, filter_fn)
    if "timm" in sys.modules:  # a model holding timm modules has imported timm
        _convert_timm_norms(report, backend, filter_fn)
    report.backend_note = _backend_note(report.model, backend)
    return report


def _bn_relu_pairs(model: nn.Module):
    """(parent name, parent, bn attribute, act attribute) of each BatchNorm -> ReLU in sequence."""
    for name, module in model.named_modules():
        if isinstance(module, _FusedResidualBlock):
            continue
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for bn_name, act_name in zip(names, names[1:]):
                if isinstance(module._modules[bn_name], nn.BatchNorm2d):
                    yield name, module, bn_name, act_name
        pair = _STEM_PAIRS.get(_qualified_name(module))
        if pair is not None and hasattr(module, pair[0]) and hasattr(module, pair[1]):
            yield name, module, *pair


def _convert_bn_relu_pairs(report, backend, filter_fn) -> None:
    for parent_name, parent, bn_name, act_name in list(_bn_relu_pairs(report.model)):
        name = f"{parent_name}.{bn_name}" if parent_name else bn_name
        bn, act = getattr(parent, bn_name), getattr(parent, act_name)
        if type(act) is not nn.ReLU:
            continue  # not a BatchNorm + ReLU pair (e.g. BN then conv in a Sequential)
        if type(bn) is not nn.BatchNorm2d:
            report.skipped.append((name, f"{type(bn).__name__} outside residual blocks is not fused"))
            continue
        hooked = [n for n, m in ((bn_name, bn), (act_name, act)) if has_run_hooks(m)]
        if hooked:
            report.skipped.append((name, f"{' and '.join(hooked)} {'have' if len(hooked) > 1 else 'has'} forward "
                                         "or backward hooks, which would not run inside the fused BatchNorm + ReLU"))
            continue
        if filter_fn is not None and not filter_fn(bn, name):
            report.skipped.append((name, "rejected by filter_fn"))
            continue
        fused = FusedBatchNormAct2d.from_module(bn, relu=True, backend=backend)
        setattr(parent, bn_name, fused)
        setattr(parent, act_name, ReLUFusedIntoNorm(parent, bn_name, act_name, fused, act).train(act.training))
        report.converted.append((name, f"BatchNorm2d + {act_name} (ReLU) -> FusedBatchNormAct2d"))


def _convert_stems(report, backend, filter_fn) -> None:
    """Each torchvision / timm ResNet in the model gets the class of ours whose forward runs conv1 + bn1 +
    ReLU as a unit (``fusedres/nn/stem.py``)."""
    for name, model in report.model.named_modules():
        stem_class = fused_stem_class(type(model))
        conv_name = f"{name}.conv1" if name else "conv1"
        if stem_class is None:
            base = subclassed_stem_model(type(model))
            if base is not None:
                report.skipped.append((conv_name, f"the stem is not run as a unit: {type(model).__name__} subclasses "
                                                  f"{base}, whose forward it may change"))
            continue
        reason = stem_unsupported_reason(model, stem_class.act_name)
        if reason is None and filter_fn is not None and not filter_fn(model.conv1, conv_name):
            reason = "rejected by filter_fn"
        if reason is not None:
            report.skipped.append((conv_name, f"the stem is not run as a unit: {reason}"))
            continue
        vars(model)["fusedres_stem_backend"] = backend
        source_name = type(model).__name__
        model.__class__ = stem_class
        report.converted.append((conv_name, f"the stem conv1 + bn1 + ReLU run as a unit (the model's class "
                                            f"{source_name} -> {stem_class.__name__})"))


def _convert_timm_norms(report, backend, filter_fn) -> None:
    """timm BatchNormAct2d (with ReLU or no act) outside residual blocks -> FusedTimmBatchNormAct2d;
    timm's other norm layers there are reported and left alone."""
    from .nn.timm_norm import FusedTimmBatchNormAct2d, unsupported_reason

    # the names of the modules inside blocks start with these (all of them do where the model is a block: "")
    blocks = [_inside(name) for name, _ in report.converted + report.skipped] + [  # and those converted earlier
        _inside(name) for name, module in report.model.named_modules() if isinstance(module, _FusedResidualBlock)]
    for name, module in list(report.model.named_modules()):
        if any(name.startswith(block) for block in blocks) or isinstance(module, FusedBatchNormAct2d):
            continue
        if _qualified_name(module) == "timm.layers.norm_act.BatchNormAct2d":
            reason = unsupported_reason(module)
        elif type(module).__module__ in _TIMM_NORM_MODULES:
            reason = f"{type(module).__name__} is not a BatchNorm + ReLU we fuse"
        else:
            continue
        if reason is None and filter_fn is not None and not filter_fn(module, name):
            reason = "rejected by filter_fn"
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        report.model = _replace(report.model, name, FusedTimmBatchNormAct2d.from_module(module, backend=backend))
        report.converted.append((name, f"BatchNormAct2d -> {FusedTimmBatchNormAct2d.__name__}"))


def _inside(name: str) -> str:
    """The prefix of the names of the modules inside the module called ``name`` (the root: "")."""
    return f"{name}." if name else ""


def _backend_note(model: nn.Module, backend: str) -> str:
    """Which backend runs on the model's parameters' device and dtype, and why not the others."""
    param = next(model.parameters(), None)
    if param is None:
        return "no parameters"
    requested = requested_backend(backend)
    if requested != "auto":
        source = "" if requested == backend else " (FUSEDRES_BACKEND)"
        reason = unavailable_reason(requested, param.device)
        return (f"backend {requested!r} requested{source}" + ("" if reason is None else
                f", which cannot run on the model's device now, {param.device} ({reason}): a forward there raises "
                "(but in eval mode without autograd where every module it runs folds its BatchNorms into convs, "
                "as post-activation blocks and ResNet stems do)"))
    reasons = {name: unavailable_reason(name, param.device) for name in BACKENDS}
    if interpreted_only("triton", param.device):
        reasons["triton"] = reasons["triton"] or INTERPRETER_NOT_AUTO
    if param.dtype not in KERNEL_DTYPES:
        reasons = {name: reasons[name] or f"kernels do not support {param.dtype}" for name in BACKENDS[:-1]}
    chosen = next(name for name in BACKENDS if name == "torch" or reasons.get(name) is None)
    why_not = "; ".join(f"{name}: {reasons[name]}" for name in BACKENDS[:BACKENDS.index(chosen)])
    return (f"on {param.device.type} {param.dtype} the {chosen!r} backend runs"
            + (f" ({why_not})" if why_not else ""))


def revert(model: nn.Module) -> nn.Module:
    """Put the original modules back in place of every fused one (in place); returns model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _FusedResidualBlock):
            model = _replace(model, name, module.to_module())
        elif isinstance(module, FusedBatchNormAct2d):
            model = _replace(model, name, module.to_module())
        elif isinstance(module, ReLUFusedIntoNorm):
            model = _replace(model, name, module.original.train(module.training))
    for module in model.modules():
        if isinstance(module, _FusedStemModel):
            module.__class__ = module.source_class
            for attribute in ("fusedres_stem_backend", FOLDS):
                vars(module).pop(attribute, None)
    return model


def refold(model: nn.Module) -> nn.Module:
    """Forget the BatchNorm folds that a converted model's eval forwards keep (in place); returns model. A fold is
    made again by itself when a tensor it came from is replaced or changed in place (its version counter), and
    after every step of a ``torch.optim`` optimizer with ``fused=True`` (whose writes move no version counter), but
    not after a write through ``.data`` (``p.data.copy_(...)``, as some EMA and manual-update code does) or by a
    collective (``torch.distributed.broadcast``), which change neither: call this after such writes, or write the
    tensors themselves under ``torch.no_grad()``."""
    for module in model.modules():
        vars(module).pop(FOLDS, None)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``model``, and wherever else the module there is too (a block shared by
    several places stays one module); returns the (possibly new) root."""
    if not name:
        return new
    old = model.get_submodule(name)
    for path in [path for path, module in model.named_modules(remove_duplicate=False) if module is old]:
        parent_name, _, child_name = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new)
    return model
