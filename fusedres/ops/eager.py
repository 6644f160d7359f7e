"""Eager calls of fusedres's custom ops without torch's custom-op machinery, where nothing needs it.

An eager call of a ``torch.library.custom_op`` costs host time its kernels do not: the dispatcher, the custom
op's Python wrappers and, for an op whose autograd is registered with a ``setup_context`` (``bn_act``,
``bn_act_conv2d``, ``conv2d_stats``), a forward that rebuilds the schema's list of arguments once per argument
(``torch._library.utils.fill_defaults``, quadratic in the arity: ~90 us a call for these ops' 16-17 arguments
on the development CPU, torch 2.11 and 2.14; pytorch/pytorch#195110). A unit of ResNet-50's later stages runs
for ~0.1 ms on an H100, so at that rate a training step's host time, not its kernels, would set its pace.

``entry(op, body, setup_context, backward)`` registers the op's autograd and returns the function the package
calls instead of the op: it runs the op's body directly where no autograd is needed, and otherwise through a
``torch.autograd.Function`` made of the same ``setup_context`` and ``backward`` (so both ways compute the same
thing with the same code). It calls the op itself wherever the dispatcher does something the body cannot:
under ``torch.compile`` and ``torch.jit.trace`` (which record the op), functorch transforms and dispatch modes
(which intercept ops at the dispatcher; selective activation checkpointing is one), for tensor subclasses
(fake tensors, DTensor) and devices other than CPU and CUDA (meta: the op's fake kernel), and where autograd
needs an op registered without a ``setup_context`` (the BatchNorm backward stages, whose autograd refuses a
double backward). Under the autograd profiler the body runs inside a ``record_function`` of the op's name.
"""

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch._library.custom_ops import CustomOpDef

_PLAIN_TYPES = (Tensor, nn.Parameter)


def _plain(t: Tensor) -> bool:
    """Not a subclass (fake tensors, DTensor), on a device the bodies run on."""
    return type(t) in _PLAIN_TYPES and (t.is_cpu or t.is_cuda)


def plain_mode() -> bool:
    """Whether nothing that must see the ops is running (torch.compile, jit.trace, functorch transforms, dispatch
    modes): the part of ``_body_call``'s answer that does not depend on the arguments."""
    # is_compiling first: torch.compile traces this function, and takes the op without tracing the rest
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack() > 0)


def _body_call(args: tuple) -> Optional[bool]:
    """None where a call on ``args`` must go through the dispatcher (see the module docstring), else whether
    it needs autograd. Tensors inside list arguments (``Tensor[]``) count too. One pass, a few microseconds:
    it runs on every call."""
    if not plain_mode():
        return None
    requires_grad = False
    for arg in args:
        if isinstance(arg, Tensor):
            if not _plain(arg):
                return None
            requires_grad = requires_grad or arg.requires_grad
        elif isinstance(arg, list) and arg and isinstance(arg[0], Tensor):  # a Tensor[] argument
            for t in arg:
                if not _plain(t):
                    return None
                requires_grad = requires_grad or t.requires_grad
    return requires_grad and torch.is_grad_enabled()


def _autograd_function(name: str, body: Callable, setup_context: Callable, backward: Callable) -> type:
    """A torch.autograd.Function running ``body`` with ``setup_context`` and ``backward``, as the op's
    registered autograd does (the forward gets every argument, defaults filled in)."""

    def forward(ctx, *args):
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward), backward=staticmethod(backward)))


def entry(op: CustomOpDef, body: Callable, setup_context: Optional[Callable] = None,
          backward: Optional[Callable] = None) -> Callable:
    """The eager entry point of ``op`` (made from ``body`` with ``torch.library.custom_op``): registers
    ``backward`` with ``setup_context`` as the op's autograd, or ``backward`` alone (no setup_context: no
    eager autograd either, such calls take the op), and returns the call described in the module docstring."""
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    function = None if setup_context is None else _autograd_function(
        f"{op._name}_function", body, setup_context, backward)
    defaults = tuple(p.default for p in inspect.signature(body).parameters.values())
    name = op._qualname

    def run(args: tuple, autograd: bool):
        return function.apply(*args, *defaults[len(args):]) if autograd else body(*args)

    def call(*args):
        autograd = _body_call(args)
        if autograd is None or (autograd and function is None):
            return op(*args)
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(name):
                return run(args, autograd)
        return run(args, autograd)

    call.__doc__ = f"Eager entry of {name} (fusedres.ops.eager): op(*args), computed without the dispatcher."
    return call
