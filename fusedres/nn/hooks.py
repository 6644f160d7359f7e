"""Module hooks across conversion.

A fused module does its children's work itself, without calling them, so hooks registered on those
children (forward, forward-pre, backward) would silently never run: ``convert`` leaves such modules as
they are and says why (``hooks_reason``). Hooks on the converted module itself keep running: the fused
module takes the very hook dictionaries of the module it replaces (``share_hooks``), so handles returned by
``register_*_hook`` before conversion still remove them, and ``revert`` hands them back the same way.
"""

from typing import Optional

from torch import nn

_RUN_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# every per-module hook registry of nn.Module (those a torch version lacks are skipped)
_HOOK_ATTRIBUTES = _RUN_HOOKS + (
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks")


def has_run_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a forward, forward-pre or backward hook of its own."""
    return any(getattr(module, name, None) for name in _RUN_HOOKS)


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
