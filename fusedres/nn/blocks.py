"""Drop-in fused ResNet blocks with torchvision's parameter and buffer names.

A fused block keeps the very same child modules as the block it replaces (``conv1``, ``bn1``,
..., ``downsample.0`` / ``downsample.1``), so its ``state_dict`` is the original's, key for
key, and loads both ways. Only ``forward`` changes: each conv and its BatchNorm's statistics are
one op (``conv_batch_norm_stats``: one launch with the Triton conv), every conv output is carried
as a ``PendingBN`` and its BatchNorm + ReLU is applied by the next conv as it loads its input, or,
in the last unit, together with the shortcut add and the final ReLU in one ``bn_act`` pass. In
eval mode without autograd each BatchNorm is folded into its conv and a unit is one
``conv_bias_act`` launch; a post-activation block's forward like its last one runs that one's launches
again without their checks (``folded_units.FoldedChain``).

Supported source blocks (``from_module``) are torchvision's and timm's BasicBlock and
Bottleneck whose optional parts are absent: every activation a ReLU, no squeeze-excitation,
drop-path, drop-block or anti-aliasing, zero-padded convs; the downsample shortcut is
Sequential(parameter-free modules such as AvgPool2d..., Conv2d, BatchNorm2d). Every BatchNorm
may be an ``nn.SyncBatchNorm`` (before conversion, or put in afterwards by
``nn.SyncBatchNorm.convert_sync_batchnorm``: the blocks read their children at each forward);
it synchronises when and over what torch's would.

A fused block holds every child of the original, its ReLUs too, and checks them at each forward: where one was
replaced by a module it does not fuse (a ``FrozenBatchNorm2d``, a ``LeakyReLU``), one of them has hooks, a global
hook is registered, the batch is empty, ``torch.fx`` traces the block or forward-mode AD is on
(``hooks.runs_torch_modules``), it runs the original block's forward on them (``_unfused_forward``).
"""

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import backends, folded_units
from ..ops.functional import PendingBN
from ..reference import batch_norm_momentum
from .hooks import any_run_hooks, hooks_reason, runs_torch_modules, share_hooks


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _sync_group(bn: nn.modules.batchnorm._BatchNorm):
    """The process group ``nn.SyncBatchNorm.forward`` synchronises ``bn`` over now, or None.

    Torch's SyncBatchNorm synchronises in training mode once torch.distributed is initialised
    (over ``bn.process_group``, else the default group) and behaves as BatchNorm2d otherwise;
    a group of one rank is left to ``ops.batch_norm_stats``. Unlike torch's, whose synchronised
    path needs a GPU, this one runs on any device (CPU with the gloo backend too).
    """
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    return bn.process_group or dist.group.WORLD


def runs_empty_batch_fused(modules) -> bool:
    """Whether a module that fuses ``modules`` runs an empty batch fused too, where it otherwise runs the original
    forward: when one of them is a BatchNorm that synchronises now (``_sync_group``). The other ranks' fused
    BatchNorms exchange their statistics and gradient sums through our collectives, torch's SyncBatchNorm through
    others (an input-dtype (mean, invstd, count) where ours is an fp64 (mean, var, count)): an empty rank must
    take part in ours, with a count of 0, or its group would hang or mix the two."""
    return any(_sync_group(m) is not None for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _batch_norm_args(bn: nn.modules.batchnorm._BatchNorm) -> tuple[tuple, dict]:
    """The BatchNorm arguments of ``ops.batch_norm_stats`` / ``conv_batch_norm_stats`` that make
    them do what ``bn``'s forward would: nn.BatchNorm2d's (or nn.SyncBatchNorm's) buffer
    bookkeeping and synchronisation."""
    batch_stats, momentum = batch_norm_momentum(bn)
    track = not bn.training or bn.track_running_stats
    return ((bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None),
            dict(batch_stats=batch_stats, momentum=momentum, eps=bn.eps, process_group=_sync_group(bn)))


def _counted(bn: nn.modules.batchnorm._BatchNorm, op: Callable[[tuple, dict], PendingBN],
             counts: Callable[[], bool]) -> PendingBN:
    """``op(*_batch_norm_args(bn))``. Where ``op`` raises, the batch that ``_batch_norm_args`` counted in
    ``bn.num_batches_tracked`` is uncounted again unless ``counts()``: eager's BatchNorm counts a batch once its
    input is there and 4-D (the conv before it ran, and its dimension check passed), before its other checks.
    Where the backend asked for cannot run at all (``BackendUnavailableError``), which eager would not have
    failed on, the module is left as it was: uncounted."""
    counter = bn.num_batches_tracked if bn.training and bn.track_running_stats else None
    args, kwargs = _batch_norm_args(bn)
    try:
        return op(args, kwargs)
    except Exception as error:
        if counter is not None and (isinstance(error, backends.BackendUnavailableError) or not counts()):
            counter.sub_(1)
        raise


def _torch_conv_counts(source: Union[Tensor, PendingBN], conv: nn.Conv2d) -> bool:
    """Whether eager's BatchNorm after ``conv`` counts the batch: torch's conv runs on ``source`` (a pending
    source's values before their BatchNorm, of the size of its activation) and gives it a 4-D output. Asked only
    after the fused op raised."""
    y = source.y if isinstance(source, PendingBN) else source
    try:
        with torch.no_grad():
            return F.conv2d(y, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups).dim() == 4
    except Exception:
        return False


def pending_bn(y: Tensor, bn: nn.modules.batchnorm._BatchNorm, backend: str) -> PendingBN:
    """Statistics for ``bn`` applied to ``y``."""
    return _counted(bn, lambda args, kwargs: ops.batch_norm_stats(y, *args, backend=backend, **kwargs),
                    lambda: y.dim() == 4)


def conv_pending_bn(source: Union[Tensor, PendingBN], conv: nn.Conv2d,
                    bn: nn.modules.batchnorm._BatchNorm, backend: str, relu: bool = True) -> PendingBN:
    """Statistics for ``bn`` applied to ``conv(source)``; a pending source is applied (with
    ``relu``) as the conv's prologue. The conv and the statistics are one op
    (``conv_batch_norm_stats``)."""
    return _counted(bn, lambda args, kwargs: ops.conv_batch_norm_stats(
        source, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, *args, relu=relu,
        backend=backend, **kwargs), lambda: _torch_conv_counts(source, conv))


FOLDS = "_folded"  # the plain attribute in which a FoldingModule keeps its folds (folded_conv_bias_act)
CHAIN = "chain"  # the key of a block's folded_units.FoldedChain among its folds


def folding_allowed() -> bool:
    """Whether a forward in eval mode may run its units with their BatchNorms folded (``folded_conv_bias_act``):
    without autograd (the folded launch has no backward), and not under ``torch.jit.trace``, which would keep
    the cached folds as constants and whose check traces again under no_grad: traced, every forward records the
    running-statistics path, with autograd on or off, its weights read from the modules."""
    return not torch.is_grad_enabled() and not torch.jit.is_tracing()


class FoldingModule(nn.Module):
    """Base of the modules that run units with their BatchNorms folded (``folded_conv_bias_act``): the folds
    are a cache of derived tensors in a plain attribute (``FOLDS``), neither in the state_dict nor pickled."""

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop(FOLDS, None)  # rebuilt on first use
        return state


def folded_conv_bias_act(owner: FoldingModule, source: Tensor, conv: nn.Conv2d, bn: Optional[nn.Module],
                         residual: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    """act(conv(source) [eval BatchNorm ``bn`` folded in] + residual) in one ``conv_bias_act`` launch
    (inference). The fold (with ``bn`` None, the conv's weight and bias in the compute dtype) is cached in
    ``owner`` (``FoldingModule``), refolded when a source tensor changes (``FoldedWeights``), with what the
    unit's last call checked and chose (``FoldedUnit``)."""
    return folded_unit(owner, conv, bn)(source, conv, bn, residual, relu, _folded_backend(backend))


def _folded_backend(backend: str) -> str:
    """The backend a module's folded units run on, for the module's ``backend``: the CUDA extension has no
    conv, so anything but "torch" lets the inference op choose."""
    return "torch" if backend == "torch" else "auto"


def folded_unit(owner: FoldingModule, conv: nn.Conv2d, bn: Optional[nn.Module]) -> folded_units.FoldedUnit:
    """The ``FoldedUnit`` that ``owner`` keeps for ``conv`` and ``bn``."""
    cache = owner.__dict__.setdefault(FOLDS, {})
    unit = cache.get((id(conv), id(bn)))
    if unit is None:
        unit = cache[id(conv), id(bn)] = folded_units.FoldedUnit()
    return unit


def _conv_unsupported(name: str, conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{name} is {type(conv).__name__}, not nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"{name} uses padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
    return None


def _bn_unsupported(name: str, bn: nn.Module) -> Optional[str]:
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"{name} is {type(bn).__name__}, not nn.BatchNorm2d or nn.SyncBatchNorm"
    return None


def _shortcut_parts(downsample: nn.Sequential) -> tuple[list[nn.Module], nn.Conv2d, nn.Module]:
    """(parameter-free modules applied first, the conv, the BatchNorm) of a downsample."""
    parts = [m for m in downsample if not isinstance(m, nn.Identity)]
    return parts[:-2], parts[-2], parts[-1]


def _downsample_unsupported(downsample: Optional[nn.Module]) -> Optional[str]:
    if downsample is None:
        return None
    if not isinstance(downsample, nn.Sequential):
        return f"downsample is {type(downsample).__name__}, not Sequential(..., Conv2d, BatchNorm2d)"
    parts = [m for m in downsample if not isinstance(m, nn.Identity)]
    if len(parts) < 2:
        return "downsample is not Sequential(..., Conv2d, BatchNorm2d)"
    prefix, conv, bn = parts[:-2], parts[-2], parts[-1]
    for module in prefix:
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return f"downsample holds {type(module).__name__} with parameters before its conv"
    return _conv_unsupported("downsample conv", conv) or _bn_unsupported("downsample norm", bn)


_FUSABLE = "_fusable_modules"  # plain attribute: (modules, _conv_paddings) a forward last found fusable


def _conv_paddings(modules: tuple) -> tuple:
    """What ``_conv_unsupported`` reads of the convs among ``modules`` besides their class: their padding and
    padding_mode, plain attributes that a caller may set at any time."""
    return tuple((m.padding, m.padding_mode) for m in modules if type(m) is nn.Conv2d)


def _children(block: nn.Module) -> dict[str, nn.Module]:
    """``block``'s child modules by name, a module held under two names under both (``named_children`` gives it
    once: a block converted without its second name, an activation used twice say, lost it)."""
    return {name: child for name, child in block._modules.items() if child is not None}


def _shared_part_reason(block: nn.Module) -> Optional[str]:
    """Why ``block`` is not fused if one conv or BatchNorm is two of its parts (``conv2`` set to ``conv1``, a
    downsample holding ``conv1``), else None: the fused block runs each part as its own unit, in its own order."""
    names: dict[int, str] = {}
    for name, module in block.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            first = names.setdefault(id(module), name)
            if first != name:
                return f"{name} is {first} too (a conv or BatchNorm shared by two parts of the block)"
    return None


class _FusedResidualBlock(FoldingModule):
    """Base of every fused block: holds the very children of the block it replaces, in their order.

    Subclasses say which source classes they convert (``source_classes``: qualified class name
    -> kind), which ``kind`` they are, the names of the children they take over
    (``child_names``), and why a given block cannot be fused (``_structure_reason``).
    """

    family: str = ""
    source_classes: dict[str, str] = {}
    kind: str = ""
    child_names: tuple[str, ...] = ()

    def __init__(self, children: dict[str, Optional[nn.Module]], *, backend: str = "auto",
                 memory_efficient: bool = True):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)
        for name in self.child_names:
            if name not in children:
                setattr(self, name, None)
        self.backend = backend
        self.memory_efficient = memory_efficient
        self._source = None  # (class, plain attributes, names of its children in their order) for to_module

    # ------------------------------------------------------------------ conversion
    @classmethod
    def unsupported_reason(cls, block: nn.Module) -> Optional[str]:
        """None when ``from_module(block)`` can convert it, else why it cannot."""
        kind = cls.source_classes.get(_qualified_name(block))
        if kind is None:
            return f"{type(block).__name__} is not a known {cls.family} block"
        if kind != cls.kind:
            return f"{type(block).__name__} is a {kind} block, not a {cls.kind} block"
        return hooks_reason(block) or _shared_part_reason(block) or cls._structure_reason(block)

    @classmethod
    def _structure_reason(cls, block: nn.Module) -> Optional[str]:
        """Why ``block``, of one of ``source_classes``, has a part this family does not fuse, or
        None. Each family implements it (``_FusedPostActBlock``, ``preact._FusedPreActBlock``);
        the base is never asked, having no source classes."""
        raise NotImplementedError(f"{cls.__name__} does not say which blocks it can fuse")

    @classmethod
    def from_module(cls, block: nn.Module, *, backend: str = "auto",
                    memory_efficient: bool = True) -> "_FusedResidualBlock":
        """A fused block sharing ``block``'s conv/BN/downsample modules (weights, buffers, device)."""
        reason = cls.unsupported_reason(block)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_module: cannot convert: {reason}")
        children = _children(block)
        fused = cls(children, backend=backend, memory_efficient=memory_efficient)
        fused.training = block.training  # not .train(): that would set every child's mode too
        share_hooks(block, fused)
        fused._source = (
            type(block),
            {k: v for k, v in vars(block).items() if not k.startswith("_") and k != "training"},
            tuple(children),
        )
        return fused

    def to_module(self) -> nn.Module:
        """The original torchvision/timm block, holding this block's current modules."""
        if self._source is None:
            raise RuntimeError(f"{type(self).__name__}.to_module: this block was not made by "
                               "from_module, so there is no original block class to return")
        source_cls, attributes, names = self._source
        block = source_cls.__new__(source_cls)
        nn.Module.__init__(block)
        vars(block).update(attributes)
        for name in names:  # this block's current children
            setattr(block, name, self._modules.get(name))
        share_hooks(self, block)
        block.training = self.training  # not .train(): that would set every child's mode too
        return block

    # ------------------------------------------------------------------ the original forward
    def _fused_modules(self) -> tuple:
        """The modules the fused forward stands in for: the children, then theirs (a fusable block's deepest
        modules, e.g. the downsample's conv and BatchNorm). A flat tuple, not self.modules(): it is made at
        every forward, and a ``FoldedChain`` compares it with the one it was recorded with."""
        children = modules = tuple(self._modules.values())
        for child in children:
            if child is not None and child._modules:
                modules += tuple(child._modules.values())
        return modules

    def _runs_fused(self, x: Tensor, modules: tuple) -> bool:
        """Whether this forward may run fused, where ``modules`` are ``_fused_modules()``: x needs no torch
        modules (``runs_torch_modules``: a ``torch.fx`` proxy, forward-mode AD), is non-empty unless a BatchNorm
        synchronises (``runs_empty_batch_fused``), no hook would miss a call (``any_run_hooks``), and the modules are
        still ones this block fuses (``_structure_reason``, asked once for the same modules with the same convs'
        padding: a module's class does not change, a conv's padding_mode may)."""
        if (runs_torch_modules(x) or (x.numel() == 0 and not runs_empty_batch_fused(modules))
                or any_run_hooks(modules)):
            return False
        fusable = (modules, _conv_paddings(modules))
        if self.__dict__.get(_FUSABLE) == fusable:
            return True
        if self._structure_reason(self) is not None:
            return False
        self.__dict__[_FUSABLE] = fusable
        return True

    def _unfused_forward(self, x: Tensor) -> Tensor:
        """The original block's forward (``to_module``) on this block's children: torch's own ops give eager's
        result and side effects (an empty batch counted, hooks run, a traced graph of the original's calls),
        and no fused kernel is launched on an empty tensor. Its ``forward``, not its call: this block's call
        runs this block's hooks (the same ones) already."""
        return self.to_module().forward(x)

    # ------------------------------------------------------------------ inference
    def _folding_applies(self, modules: tuple) -> bool:
        """Whether this forward may fold the block's BatchNorms into their convs: eval mode,
        running statistics in every one (``modules``: ``_fused_modules()``), and ``folding_allowed``."""
        if self.training or not folding_allowed():
            return False
        for module in modules:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
                return False
        return True

    def _conv_bias_act(self, source: Tensor, conv: nn.Conv2d, bn: Optional[nn.Module] = None,
                       residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
        """act(conv(source) [BatchNorm ``bn`` folded in] + residual) in one launch (inference)."""
        return folded_conv_bias_act(self, source, conv, bn, residual, relu, self.backend)

    # ------------------------------------------------------------------ forward
    def _conv(self, source: Union[Tensor, PendingBN], conv: nn.Conv2d, relu: bool = True) -> Tensor:
        """conv(source), or conv(act(bn(y))) for a pending BatchNorm source (act: ReLU or none)."""
        if isinstance(source, Tensor):
            return conv(source)
        if self.memory_efficient:
            return ops.bn_act_conv2d(source, conv.weight, conv.bias, conv.stride, conv.padding,
                                     conv.dilation, conv.groups, relu=relu, backend=self.backend)
        return conv(ops.bn_act(source, relu=relu, backend=self.backend))

    def _conv_bn(self, source: Union[Tensor, PendingBN], conv: nn.Conv2d, bn: nn.Module,
                 relu: bool = True) -> PendingBN:
        """``_conv``, then the statistics of ``bn`` on its output, in one op where a backend can."""
        if isinstance(source, PendingBN) and not self.memory_efficient:
            source = ops.bn_act(source, relu=relu, backend=self.backend)
        return conv_pending_bn(source, conv, bn, self.backend, relu)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, memory_efficient={self.memory_efficient}"


class _FusedPostActBlock(_FusedResidualBlock):
    """relu(unit_k(...unit_1(x)) + shortcut(x)), each unit conv -> BatchNorm (-> ReLU)."""

    family = "torchvision/timm ResNet"
    source_classes = {
        "torchvision.models.resnet.BasicBlock": "basic",
        "torchvision.models.resnet.Bottleneck": "bottleneck",
        "timm.models.resnet.BasicBlock": "basic",
        "timm.models.resnet.Bottleneck": "bottleneck",
    }
    unit_names: tuple[tuple[str, str], ...] = ()

    @classmethod
    def _structure_reason(cls, block: nn.Module) -> Optional[str]:
        for conv_name, bn_name in cls.unit_names:
            reason = (_conv_unsupported(conv_name, getattr(block, conv_name))
                      or _bn_unsupported(bn_name, getattr(block, bn_name)))
            if reason:
                return reason
        for name, child in _children(block).items():
            if name in cls.child_names or isinstance(child, nn.Identity):
                continue
            if type(child) is not nn.ReLU:
                return f"{name} ({type(child).__name__}) is not fused"
        return _downsample_unsupported(getattr(block, "downsample", None))

    def _downsample_conv_input(self, x: Tensor) -> tuple[Tensor, nn.Conv2d, nn.Module]:
        """(x through the downsample's parameter-free modules, its conv, its BatchNorm)."""
        prefix, conv, bn = _shortcut_parts(self.downsample)
        for module in prefix:
            x = module(x)
        return x, conv, bn

    def _shortcut(self, x: Tensor) -> Union[Tensor, PendingBN]:
        if self.downsample is None:
            return x
        return conv_pending_bn(*self._downsample_conv_input(x), self.backend)

    def _inference_forward(self, x: Tensor, modules: tuple) -> Tensor:
        """Every BatchNorm folded into its conv; each unit (and the add + ReLU) one launch. Where the downsample
        is its conv and BatchNorm alone, the forward is recorded as the block's ``folded_units.FoldedChain``, which
        assumes ``modules`` (``_fused_modules()``)."""
        backend = _folded_backend(self.backend)
        guard = folded_units.chain_guard(x, backend)
        values, units = [x], []  # values: x, then each unit's output; units: what FoldedChain.record takes

        def unit(source: int, conv: nn.Conv2d, bn: nn.Module, residual: Optional[int] = None, relu: bool = True,
                 moved_bias: Optional[Tensor] = None, keep_bias: bool = True) -> tuple[int, Tensor]:
            """Run one unit on values[source] with its folded bias plus ``moved_bias``, or none without
            ``keep_bias``: the index of its output among values, and its own folded bias."""
            runner = folded_unit(self, conv, bn)
            weight, own_bias = runner.folded(values[source], conv, bn)
            bias = own_bias if moved_bias is None else runner.summed_bias(own_bias, moved_bias)
            out, plan = runner.planned_call(values[source], conv, bn, None if residual is None else values[residual],
                                            relu, backend, folded=(weight, bias if keep_bias else None))
            values.append(out)
            units.append((runner, conv, bn, source, residual, relu, plan))
            return len(values) - 1, own_bias

        # The downsample's folded bias is added to the last unit's instead (relu(conv3 + b3 + (conv_ds + b_ds)) is
        # relu(conv3 + (b3 + b_ds) + conv_ds)): without a ReLU cuDNN's fused convs cannot run the downsample, and
        # torch's conv adds a bias by a pass of its own over the output (ATen's cuDNN convs take no bias), where
        # the last unit's conv adds its own in the same launch.
        shortcut = out = 0
        moved_bias = None
        if self.downsample is not None:
            pooled, conv, bn = self._downsample_conv_input(x)
            if pooled is not x:  # a chain holds conv units only
                guard = None
                values.append(pooled)
            shortcut, moved_bias = unit(len(values) - 1, conv, bn, relu=False, keep_bias=False)
        for index, (conv_name, bn_name) in enumerate(self.unit_names):
            last = index == len(self.unit_names) - 1
            out, _ = unit(out, self._modules[conv_name], self._modules[bn_name], residual=shortcut if last else None,
                          moved_bias=moved_bias if last else None)
        if guard is not None:  # else no chain is recorded; one kept from before still checks what it assumes
            self.__dict__[FOLDS][CHAIN] = folded_units.FoldedChain.record(guard, modules, units)
        return values[out]

    def forward(self, x: Tensor) -> Tensor:
        modules = self._fused_modules()
        if not self._runs_fused(x, modules):
            return self._unfused_forward(x)
        folds = None if self.training else self.__dict__.get(FOLDS)
        chain = None if folds is None else folds.get(CHAIN)
        if chain is not None:  # eval mode: the last forward's units again, if nothing that decided them changed
            out = chain(x, _folded_backend(self.backend), modules)
            if out is not None:
                return out
        if self._folding_applies(modules):
            return self._inference_forward(x, modules)
        source: Union[Tensor, PendingBN] = x
        for conv_name, bn_name in self.unit_names:
            source = self._conv_bn(source, getattr(self, conv_name), getattr(self, bn_name))
        shortcut = self._shortcut(x)
        if isinstance(shortcut, PendingBN) and not shortcut.normalised_like(source):
            # e.g. one of the two BatchNorms in eval mode, or only one a SyncBatchNorm:
            # the shortcut's is applied by a pass of its own.
            shortcut = ops.bn_act(shortcut, relu=False, backend=self.backend)
        return ops.bn_act(source, shortcut, relu=True, backend=self.backend)


class FusedBasicBlock(_FusedPostActBlock):
    """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), fused."""

    kind = "basic"
    unit_names = (("conv1", "bn1"), ("conv2", "bn2"))
    child_names = ("conv1", "bn1", "conv2", "bn2", "downsample")
    expansion = 1


class FusedBottleneck(_FusedPostActBlock):
    """torchvision Bottleneck: three units, the last with the residual add and ReLU, fused."""

    kind = "bottleneck"
    unit_names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    child_names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
    expansion = 4
