"""Module hooks across conversion.

A fused module does its children's work itself, without calling them, so hooks registered on those
children (forward, forward-pre, backward) would silently never run: ``convert`` leaves such modules as
they are and says why (``hooks_reason``). Hooks on the converted module itself keep running: the fused
module takes the very hook dictionaries of the module it replaces (``share_hooks``), so handles returned by
``register_*_hook`` before conversion still remove them, and ``revert`` hands them back the same way. Hooks
registered after conversion on a module a fused module stands in for, or globally, make that module's forward run
the original computation (``any_run_hooks``, asked at each call), as do a ``torch.fx`` trace and forward-mode AD
(``runs_torch_modules``).
"""

from typing import Iterable, Optional

from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules import module as torch_module

_RUN_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# every per-module hook registry of nn.Module (those a torch version lacks are skipped)
_HOOK_ATTRIBUTES = _RUN_HOOKS + (
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks")


def has_run_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a forward, forward-pre or backward hook of its own (``_RUN_HOOKS``, read directly:
    asked at every forward of a fused module, and torch >= 2.4 has them all)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def runs_torch_modules(x: Tensor) -> bool:
    """Whether a fused module's forward on ``x`` must compute with torch's own modules and ops: ``x`` is no
    tensor (a ``torch.fx`` proxy, whose trace records them; anything else, which they reject in their words), or
    forward-mode AD is on (inside ``torch.autograd.forward_ad.dual_level``: the fused ops have no forward
    derivative, torch's do)."""
    return not isinstance(x, Tensor) or forward_ad._current_level >= 0


def global_run_hooks() -> bool:
    """Whether a global forward, forward-pre or backward hook is registered (``register_module_forward_hook``,
    ...): it runs at every module call, so on the modules a fused module does not call too."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def any_run_hooks(modules: Iterable[Optional[nn.Module]]) -> bool:
    """Whether a module of ``modules`` (None skipped) has a forward, forward-pre or backward hook
    (``has_run_hooks``), or a global one is registered."""
    for module in modules:
        if module is not None and has_run_hooks(module):
            return True
    return global_run_hooks()


def hooks_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be fused because of hooks on a module inside it (not on itself), or None."""
    for name, child in module.named_modules():
        if child is not module and has_run_hooks(child):
            return f"{name} has forward or backward hooks, which would not run inside a fused module"
    return None


def share_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the very hook registries of ``source`` (the same dict objects, so existing handles
    work on it)."""
    for name in _HOOK_ATTRIBUTES:
        if name in vars(source):
            vars(target)[name] = vars(source)[name]
