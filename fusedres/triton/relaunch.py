"""Launching a Triton kernel again without triton's JIT path.

Each launch through triton's ``JITFunction.run`` binds every argument (~70 for a conv kernel), specialises
each one, looks the compiled kernel up and checks the kernel's globals: ~30 us of a conv launch on the
development CPU (``python -m benchmarks.host_overhead``), where ResNet-50's later convs take 0.05-0.2 ms on
an H100 and a batch-1 inference is host-bound. ``Relaunches`` keeps the kernel each launch compiled, under
what the JIT specialises it on (``Relaunches.run``), and runs a later launch with the same specialisation
through that kernel's launcher, which is the call ``JITFunction.run`` ends in, with the same grid and
arguments. ``relaunched`` does this for a plain ``@triton.jit`` kernel; ``autotuning`` does it for a tuned
key's config.

Left to the JIT path: a launch while a launch hook is set (a profiler such as proton: the JIT path builds the
hook's metadata), a warm-up, a launch with an unhashable argument, any launch under TRITON_INTERPRET=1, and
every launch with triton < 3.4. Not checked again: that the kernel's globals keep the values they were
compiled with (ours are constants; the JIT path raises if one changed).
"""

import inspect

from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from triton import knobs
except ImportError:  # triton < 3.4, whose launch path this does not know: every launch goes through the JIT
    knobs = None


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
        self.not_options = frozenset([*self.names, "grid", "warmup"])
        self.defaults = {p.name: p.default for p in inspect.signature(jit_fn.fn).parameters.values()
                         if p.default is not inspect.Parameter.empty}
        self.kernels: dict = {}  # signature -> (compiled kernel, the autotuner's config it ran or None)
        self.owners: tuple = ()

    def kept_for(self, *owners) -> None:
        """Forget every kernel kept unless ``owners`` are the objects they were at the last call (by identity):
        the autotuner's cache and configs, which the tests replace to make it choose among other configs."""
        if len(owners) != len(self.owners) or any(a is not b for a, b in zip(owners, self.owners)):
            self.kernels.clear()
            self.owners = owners

    def run(self, args: tuple, kwargs: dict) -> tuple:
        """Relaunch ``jit_fn[grid](*args, **kwargs)`` (kwargs holds the grid and warmup, as JITFunction.run's
        do) if an earlier launch had its signature: then (the kernel, its config from ``remember``, None), else
        (None, None, the signature for ``remember``, or None where this launch is left to the JIT path).

        The signature is what the JIT specialises a launch on: the device, triton's debug and instrumentation
        options, each tensor's dtype and whether its address is a multiple of 16 bytes, every other argument's
        value (a bool or float with its type, as True == 1 == 1.0), and keyword options that are not arguments
        (num_warps and the like)."""
        if not self.compiled or kwargs.get("warmup") or not (_silent(knobs.runtime.launch_enter_hook)
                                                             and _silent(knobs.runtime.launch_exit_hook)):
            return None, None, None
        values = dict(self.defaults)
        values.update(zip(self.names, args))
        values.update(kwargs)
        device = driver.active.get_current_device()
        try:
            arguments = tuple([value if type(value) is int or value is None
                               else (value.dtype, value.data_ptr() % 16 == 0) if hasattr(value, "data_ptr")
                               else (type(value), value) for value in map(values.get, self.names)])
            options = tuple([(name, value) for name, value in kwargs.items() if name not in self.not_options])
            signature = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, arguments, options)
            known = self.kernels.get(signature)
        except TypeError:  # an unhashable argument: left to the JIT
            return None, None, None
        if known is None:
            return None, None, signature
        kernel, config = known
        if config is not None:
            values.update(config.kwargs)
        grid = values["grid"]
        grid = grid(values) if callable(grid) else grid
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None,
                   None, *map(values.__getitem__, self.names))
        return kernel, config, None

    def remember(self, signature, kernel, config=None) -> None:
        """Keep ``kernel``, what JITFunction.run returned for a launch of ``signature`` (from ``run``) with the
        launch's arguments, and with ``config``'s constexprs besides where the autotuner added a config."""
        if signature is not None and isinstance(kernel, CompiledKernel):
            self.kernels[signature] = kernel, config


def relaunched(jit_fn):
    """``jit_fn`` (a ``@triton.jit`` kernel), its launches relaunched where an earlier one had their signature
    (``Relaunches``); under TRITON_INTERPRET=1 (no JITFunction) as it is."""
    if not isinstance(jit_fn, JITFunction):
        return jit_fn
    relaunches, jit_run = Relaunches(jit_fn), jit_fn.run

    def run(*args, **kwargs):
        kernel, _, signature = relaunches.run(args, kwargs)
        if kernel is None:
            kernel = jit_run(*args, **kwargs)
            relaunches.remember(signature, kernel)
        return kernel

    jit_fn.run = run
    return jit_fn
