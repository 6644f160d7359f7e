"""Launching a Triton kernel again without triton's JIT path.

Each launch through triton's ``JITFunction.run`` binds every argument (~70 for a conv kernel), specialises
each one, looks the compiled kernel up and checks the kernel's globals: ~30 us of a conv launch on the
development CPU (``python -m benchmarks.host_overhead``), where ResNet-50's later convs take 0.05-0.2 ms on
an H100 and a batch-1 inference is host-bound. ``Relaunches`` keeps the kernel each launch compiled, under
what the JIT specialises it on (``Relaunches.run``), and runs a later launch with the same specialisation
through that kernel's launcher, which is the call ``JITFunction.run`` ends in, with the same grid and
arguments. ``relaunched`` does this for a plain ``@triton.jit`` kernel; ``autotuning`` does it for a tuned
key's config.

Building that signature takes ~10 us of a conv launch itself. A caller that knows a key deciding every
argument but its tensors (the conv's launch plan, ``conv_plan._Plan``, one per layout, geometry and flags; the weight
gradient's layout, geometry and flags) relaunches by that key and the tensors' dtypes and alignments instead
(``Relaunches.run_keyed``, through ``autotuning.keyed_launch``), with the other arguments and the grid kept from
the launch it remembered (``remember_keyed``).

Left to the JIT path: a launch while a launch hook is set (a profiler such as proton: the JIT path builds the
hook's metadata), a warm-up, a launch with an unhashable argument, any launch under TRITON_INTERPRET=1, and
every launch with triton < 3.4. Not checked again: that the kernel's globals keep the values they were
compiled with (ours are constants; the JIT path raises if one changed).

Every launch, relaunched or not, runs on its tensors' GPU (``on_tensors_device``).
"""

import functools
import inspect

import torch

from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from triton import knobs
except ImportError:  # triton < 3.4, whose launch path this does not know: every launch goes through the JIT
    knobs = None

# launches kept per kernel, by signature and by key each: beyond it (shapes that keep changing) they take the JIT path
_MAX_KEPT = 4096


def on_tensors_device(launch, tensor_of=lambda args: args[0]):
    """``launch`` (a kernel's launch, ``tensor_of(args)`` one of its tensors) run with that tensor's GPU made the
    current CUDA device where it is not. Triton launches on the current device: it compiles for it, loads the
    kernel into its context and queues on its stream. A model moved to "cuda:1" without
    ``torch.cuda.set_device(1)`` would otherwise have its kernels run in cuda:0's context on cuda:1's memory,
    where torch's own ops (and fusedres's CUDA extension) run on the tensors' device. ~0.2 us a launch on the
    development CPU; nothing on CPU tensors (TRITON_INTERPRET=1)."""
    @functools.wraps(launch)
    def launch_on_tensors_device(*args, **kwargs):
        try:
            index = tensor_of(args).get_device()  # -1 for a CPU tensor
        except AttributeError:  # not a tensor: triton's warmup() passes stand-ins for them
            index = -1
        if index < 0 or index == torch.cuda.current_device():
            return launch(*args, **kwargs)
        with torch.cuda.device(index):
            return launch(*args, **kwargs)

    return launch_on_tensors_device


def _silent(hook) -> bool:
    """Whether a launch hook of triton's (``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``: a chain of
    hooks in triton >= 3.4, else a function or None) does nothing."""
    return hook is None or getattr(hook, "calls", None) == []


class Relaunches:
    """The compiled kernels of ``jit_fn``'s launches, by what the JIT specialised each on (none under
    TRITON_INTERPRET=1, where ``jit_fn`` is triton's interpreted function, or with triton < 3.4)."""

    def __init__(self, jit_fn):
        self.compiled = knobs is not None and isinstance(jit_fn, JITFunction)
        self.names = jit_fn.arg_names
        # per argument, whether the JIT specialises on its value (a constexpr's) whatever its type
        self.constexprs = tuple(param.is_constexpr for param in jit_fn.params) if self.compiled else ()
        self.not_options = frozenset([*self.names, "grid", "warmup"])
        self.defaults = {p.name: p.default for p in inspect.signature(jit_fn.fn).parameters.values()
                         if p.default is not inspect.Parameter.empty}
        self.kernels: dict = {}  # signature -> (compiled kernel, the autotuner's config it ran or None)
        # (caller's key, context, tensors' dtypes and alignments) -> (kernel, config, grid, the other arguments)
        self.keyed: dict = {}
        self.owners: tuple = ()

    def kept_for(self, *owners) -> None:
        """Forget every kernel kept unless ``owners`` are the objects they were at the last call (by identity):
        the autotuner's cache and configs, which the tests replace to make it choose among other configs."""
        if len(owners) != len(self.owners) or any(a is not b for a, b in zip(owners, self.owners)):
            self.kernels.clear()
            self.keyed.clear()
            self.owners = owners

    def _context(self):
        """What a launch specialises on besides its arguments: (device, triton's debug and instrumentation
        options); None where launches go through the JIT path (see ``run``)."""
        if not self.compiled or not (_silent(knobs.runtime.launch_enter_hook)
                                     and _silent(knobs.runtime.launch_exit_hook)):
            return None
        return driver.active.get_current_device(), knobs.runtime.debug, knobs.compilation.instrumentation_mode

    def run(self, args: tuple, kwargs: dict) -> tuple:
        """Relaunch ``jit_fn[grid](*args, **kwargs)`` (kwargs holds the grid and warmup, as JITFunction.run's
        do) if an earlier launch had its signature: then (the kernel, its config from ``remember``, None), else
        (None, None, the signature for ``remember``, or None where this launch is left to the JIT path).

        The signature is what the JIT specialises a launch on: the device, triton's debug and instrumentation
        options, each tensor's dtype and whether its address is a multiple of 16 bytes, each int's value, each
        constexpr's value with its type (as True == 1 == 1.0), the type alone of any other argument (a float or
        bool, whose value the JIT does not specialise on: a BatchNorm's momentum of 1 / batches seen is a new float
        every step), and keyword options that are not arguments (num_warps and the like)."""
        context = None if kwargs.get("warmup") else self._context()
        if context is None:
            return None, None, None
        values = dict(self.defaults)
        values.update(zip(self.names, args))
        values.update(kwargs)
        try:
            arguments = tuple([value if type(value) is int or value is None
                               else (value.dtype, value.data_ptr() % 16 == 0) if hasattr(value, "data_ptr")
                               else (type(value), value) if constexpr else type(value)
                               for value, constexpr in zip(map(values.get, self.names), self.constexprs)])
            options = tuple([(name, value) for name, value in kwargs.items() if name not in self.not_options])
            signature = (*context, arguments, options)
            known = self.kernels.get(signature)
        except TypeError:  # an unhashable argument: left to the JIT
            return None, None, None
        if known is None:
            return None, None, signature
        kernel, config = known
        if config is not None:
            values.update(config.kwargs)
        _run(kernel, context[0], _grid(values), map(values.__getitem__, self.names))
        return kernel, config, None

    def run_keyed(self, key, tensors: tuple):
        """Relaunch the launch ``remember_keyed`` kept under ``key`` and the dtypes and 16-byte alignments of
        ``tensors`` (the kernel's leading arguments, in their place): (its kernel, its config); None where none
        was kept, or where launches go through the JIT path now. Nothing of the launch's other arguments is
        looked at: the caller's ``key`` must decide them all, and the grid."""
        context = self._context()
        if context is None:
            return None
        known = self.keyed.get((key, context, _specialised(tensors)))
        if known is None:
            return None
        kernel, config, grid, rest = known
        _run(kernel, context[0], grid, (*tensors, *rest))
        return kernel, config

    def remember_keyed(self, key, tensors: tuple, kwargs: dict, kernel, config=None) -> None:
        """Keep ``kernel``, what the launch ``jit_fn[grid](*tensors, **kwargs)`` ran (kwargs holding the grid)
        with ``config``'s constexprs besides where the autotuner chose one, for ``run_keyed`` to relaunch by
        ``key``: the launch's grid and its arguments after ``tensors``, as they were."""
        context = self._context()
        if context is None or not isinstance(kernel, CompiledKernel) or len(self.keyed) >= _MAX_KEPT:
            return
        values = {**self.defaults, **dict(zip(self.names, tensors)), **kwargs, **(config.kwargs if config else {})}
        rest = tuple(map(values.__getitem__, self.names[len(tensors):]))
        self.keyed[key, context, _specialised(tensors)] = kernel, config, _grid(values), rest

    def remember(self, signature, kernel, config=None) -> None:
        """Keep ``kernel``, what JITFunction.run returned for a launch of ``signature`` (from ``run``) with the
        launch's arguments, and with ``config``'s constexprs besides where the autotuner added a config."""
        if signature is not None and isinstance(kernel, CompiledKernel) and len(self.kernels) < _MAX_KEPT:
            self.kernels[signature] = kernel, config


def _specialised(tensors: tuple) -> tuple:
    """What the JIT specialises ``tensors`` (pointer arguments) on: each one's dtype and whether its address is a
    multiple of 16 bytes (as ``Relaunches.run``'s signature has them)."""
    return tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


def _grid(values: dict) -> tuple[int, int, int]:
    """A launch's grid in three dimensions, from its arguments ``values`` (the grid among them, maybe a function
    of them)."""
    grid = values["grid"]
    grid = tuple(grid(values) if callable(grid) else grid)
    return grid + (1,) * (3 - len(grid))


def _run(kernel: CompiledKernel, device, grid: tuple, arguments) -> None:
    """Launch ``kernel`` on ``grid`` on the current stream of ``device``, with all of the kernel's
    ``arguments`` in order (its constexprs too: the launcher drops them), as ``JITFunction.run`` ends."""
    kernel.run(*grid, driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None,
               None, *arguments)


def relaunched(jit_fn):
    """``jit_fn`` (a ``@triton.jit`` kernel), its launches relaunched where an earlier one had their signature
    (``Relaunches``), each on its first argument's GPU (``on_tensors_device``); under TRITON_INTERPRET=1 (no
    JITFunction) as it is."""
    if not isinstance(jit_fn, JITFunction):
        return jit_fn
    relaunches, jit_run = Relaunches(jit_fn), jit_fn.run

    def run(*args, **kwargs):
        kernel, _, signature = relaunches.run(args, kwargs)
        if kernel is None:
            kernel = jit_run(*args, **kwargs)
            relaunches.remember(signature, kernel)
        return kernel

    jit_fn.run = on_tensors_device(run)
    return jit_fn
