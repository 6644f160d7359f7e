"""Autotuning of the Triton conv kernels (``conv._conv_kernel``, ``conv_wgrad._wgrad_kernel``).

``autotune`` wraps ``triton.autotune``. A key seen for the first time keeps only the configs whose tiles
fit the conv's GEMM (``fitting``), compiles them all at once on a thread per CPU core
(``triton.AsyncCompileMode``; FUSEDRES_COMPILE_THREADS=n sets the number, 1 compiles them one by one),
then times each for 5 + 25 ms (``time_config``): first use waits for about the slowest compile instead of
the sum of them. FUSEDRES_AUTOTUNE_CACHE=1 also keeps the tuning results on disk (``cache_results``,
triton >= 3.2) so later processes skip the timing. A launch whose key was tuned goes straight to its
config (``tuning_key``), and every key tuned is recorded in ``TUNINGS`` (the benchmarks report which
configs won, and by how much). A launch the JIT would specialise as an earlier launch of a tuned key runs
that launch's compiled kernel without triton's JIT path (``relaunch.Relaunches``).

Across keys, a compile-ahead pass (``compile_ahead``, used by ``fusedres.precompile``) compiles the configs
of every key a model's step will meet on one pool at once: inside ``CompileAhead.compile_only()`` a launch
only submits its configs' compiles and returns, so a step waits for the sum of its compiles divided by the
cores instead of, key after key, for each key's slowest compile.
"""

import contextlib
import copy
import functools
import inspect
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from ._host import next_power_of_2
from .relaunch import Relaunches, on_tensors_device


_SCALARS = (int, bool, float)
# one entry per key this process tuned, in order (``fast_path_and_record``): what the benchmarks report
TUNINGS: list[dict] = []


def _serialise_source_parsing() -> None:
    """Make triton's ``JITFunction.parse`` (``ast.parse`` of a kernel's source, at every compile, for the kernel and
    each jit function it calls) run on one thread at a time. CPython before 3.11.8 and 3.12.2 (gh-106905) counts
    the AST constructor's recursion in interpreter-wide state, so two threads parsing at once can fail with
    "SystemError: AST constructor recursion depth mismatch": seen on this module's compile threads (Python 3.11.7,
    a config's compile lost, and the autotuner's timing of it raised). The lock costs the compiles nothing
    measurable (a parse takes a few ms of a compile's seconds). Once per process; every Python alike."""
    parse = JITFunction.parse
    if getattr(parse, "serialised", False):
        return
    lock = threading.Lock()

    @functools.wraps(parse)
    def serialised(self):
        with lock:
            return parse(self)

    serialised.serialised = True
    JITFunction.parse = serialised


_serialise_source_parsing()


def describe(config) -> str:
    """A config as "BLOCK_M=128 BLOCK_N=64 ... warps=4 stages=4" (+ " maxnreg=128" where it caps registers)."""
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"warps={config.num_warps}",
                     f"stages={config.num_stages}", *([f"maxnreg={config.maxnreg}"] if config.maxnreg else [])])


def tuning_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """The key triton's Autotuner.run files a call under (triton 3.6-3.8): the ``key`` arguments' values, then
    the dtype of every argument that has one, in argument order. Built here without the dicts of every
    argument that run() makes on each call (~25 us a conv launch on the development CPU)."""
    values = dict(zip(tuner.arg_names, args))
    values.update(kwargs)  # with the launch's own (grid, warmup): not keys, no dtype, so no part of the key
    key = [values[name] for name in tuner.keys if name in values]
    # a plain int or bool has no dtype: not asking spares a failed attribute lookup per scalar argument
    key += [str(value.dtype) for value in values.values() if type(value) not in _SCALARS and hasattr(value, "dtype")]
    return tuple(key)


def _arguments(tuner, args: tuple, kwargs: dict) -> dict:
    """A launch's arguments by name, as ``keep`` and ``constants`` take them."""
    return {**dict(zip(tuner.arg_names, args)), **kwargs}


def fast_path_and_record(tuner, keep, constants):
    """``tuner`` (a triton Autotuner) with a fast path for keys it has tuned (their config launched straight
    away, ``tuning_key``), appending to TUNINGS whenever a call tunes a new key: the kernel, the key, the
    chosen config, and from the timing (none where one config was left, which runs untimed; none read from the
    disk cache either) its seconds and every timed config's median ms (inf: it failed).
    Triton itself keeps only the last key's timings. A tuned key's launch like an earlier one goes through
    ``relaunch.Relaunches``. Inside a compile-ahead pass's ``compile_only()`` a call
    launches nothing and submits the compiles of the configs it would time (``keep(configs, arguments)``:
    those it may run that fit, with their constants, see ``prune_and_compile``) instead. A lone config, which
    triton launches without pruning, launches with its ``constants(config kwargs, arguments)`` too."""
    _best_config_per_thread(tuner)
    plain_run = tuner.run
    relaunches = tuner.relaunches = Relaunches(tuner.fn)  # keyed_launch uses it too

    def run(*args, **kwargs):
        ahead = getattr(_AHEAD, "pass_", None)
        if ahead is not None:
            return ahead.submit(tuner, keep, args, kwargs)
        if len(tuner.configs) == 1:  # which triton launches as it is: no key, no pruning, no constants
            config = tuner.configs[0]
            config = tuner.best_config = _with_constants(
                config, constants(config.kwargs, _arguments(tuner, args, kwargs)))
            return tuner.fn.run(*args, **kwargs, **config.all_kwargs())
        relaunches.kept_for(tuner.cache, tuner.configs)
        kernel, config, signature = relaunches.run(args, kwargs)
        if kernel is not None:
            tuner.best_config = config
            return kernel
        key = tuning_key(tuner, args, kwargs)
        config = tuner.cache.get(key)
        if config is None:
            kept = keep(tuner.configs, _arguments(tuner, args, kwargs))
            if len(kept) == 1:  # nothing to time; triton < 3.8 would time it all the same (~30 ms, and under
                config = tuner.cache[key] = kept[0]  # TRITON_INTERPRET=1 it has no driver to time with)
                _record(tuner, key, seconds=None, timings={})
        if config is not None and config.pre_hook is None:
            tuner.best_config = config
            kernel = tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            relaunches.remember(signature, kernel, config)
            return kernel
        known = len(tuner.cache)
        timings, seconds = getattr(tuner, "configs_timings", None), getattr(tuner, "bench_time", None)
        result = plain_run(*args, **kwargs)
        if len(tuner.cache) > known:
            new_timings, new_seconds = getattr(tuner, "configs_timings", None), getattr(tuner, "bench_time", None)
            _record(tuner, next(reversed(tuner.cache)),  # the key just tuned: dicts keep insertion order
                    seconds=None if new_seconds is seconds else new_seconds,
                    timings={} if new_timings is timings else new_timings)
        return result

    tuner.run = on_tensors_device(run)  # the tuning too: it times and compiles on the current device
    return tuner


def _best_config_per_thread(tuner) -> None:
    """Make ``tuner.best_config`` (the config its last launch ran, which triton sets and host code reads after a
    launch: ``keyed_launch`` to keep it, the conv's statistics to size their finish) the last launch's of the
    calling thread. A launch on another thread (threads sharing a model, nn.DataParallel's replicas) between a
    launch and its read would otherwise hand the read that launch's config: triton's launcher releases the GIL."""
    best = vars(tuner).pop("best_config", None)  # None before its first launch
    tuner.__class__ = _with_best_config_per_thread(type(tuner))
    tuner.best_configs = threading.local()
    tuner.best_config = best


@functools.cache
def _with_best_config_per_thread(autotuner: type) -> type:
    """``autotuner`` (triton's Autotuner class) with ``best_config`` kept in the instance's ``best_configs``
    (a threading.local): each thread reads the last config it set, None before its first."""
    def get(tuner):
        return getattr(tuner.best_configs, "config", None)

    def set_(tuner, config):
        tuner.best_configs.config = config

    return type(autotuner.__name__, (autotuner,), {"best_config": property(get, set_)})


@functools.partial(on_tensors_device, tensor_of=lambda args: args[3][0])  # the relaunch of a kept launch too
def keyed_launch(kernel, grid, key, tensors: tuple, kwargs: dict):
    """``kernel[grid](*tensors, **kwargs)``, where ``key`` (hashable) with the dtypes and 16-byte alignments of
    ``tensors`` decides everything else about the launch: ``kwargs``, the grid's value, and so the autotuner's
    key and config. A launch of a key launched before runs that launch's compiled kernel and config straight
    away (``Relaunches.run_keyed``), without the autotuner's path or the signature of every argument that
    ``Relaunches.run`` builds. ``kernel`` is a tuner made by ``autotune``; anything else (a test's stub) is
    launched as it is, as is every launch inside a compile-ahead pass."""
    relaunches = getattr(kernel, "relaunches", None)
    if relaunches is None or getattr(_AHEAD, "pass_", None) is not None:
        return kernel[grid](*tensors, **kwargs)
    relaunches.kept_for(kernel.cache, kernel.configs)
    known = relaunches.run_keyed(key, tensors)
    if known is not None:
        kernel.best_config = known[1]
        return known[0]
    compiled = kernel[grid](*tensors, **kwargs)
    if kernel.best_config.pre_hook is None:  # a pre-hook would have to run at each launch
        relaunches.remember_keyed(key, tensors, dict(kwargs, grid=grid), compiled, kernel.best_config)
    return compiled


def _record(tuner, key: tuple, seconds, timings: dict) -> None:
    """Append ``tuner``'s tuning of ``key`` to TUNINGS: its chosen config, the timing's seconds and each timed
    config's median ms (``timings``: triton's, a median or (median, p20, p80) per config)."""
    TUNINGS.append(dict(kernel=tuner.base_fn.__name__, key=[str(k) for k in key], best=describe(tuner.cache[key]),
                        seconds=seconds, ms={describe(c): t[0] if isinstance(t, (list, tuple)) else t
                                             for c, t in timings.items()}))


def compile_threads() -> int:
    """FUSEDRES_COMPILE_THREADS, else the CPU cores this process may use."""
    value = os.environ.get("FUSEDRES_COMPILE_THREADS", "").strip()
    if not value:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FUSEDRES_COMPILE_THREADS should be a positive number of threads, got {value!r}")
    return int(value)


def fitting(configs: list, sizes: dict) -> list:
    """The configs whose tiles fit the problem: none with a block (BLOCK_M, BLOCK_N or BLOCK_K, the keys of
    ``sizes``) larger than its GEMM dimension rounded up to a power of two, or than the smallest block of
    that name among the configs; those mask off at least half of every tile along it. All configs if none
    fit."""
    def limit(name, size):
        return max(next_power_of_2(size), min(c.kwargs[name] for c in configs))

    fit = [c for c in configs if all(c.kwargs[name] <= limit(name, size) for name, size in sizes.items())]
    return fit or configs


def runnable(gemm_sizes, usable, constants, configs: list, arguments: dict) -> list:
    """The configs a launch with ``arguments`` may run (``usable(config.all_kwargs(), arguments)``: its constexprs
    and options such as num_warps and maxnreg) that fit its GEMM
    (``gemm_sizes(arguments)``: {block name: size}, see ``fitting``), each with the constexprs
    ``constants(config kwargs, arguments)`` added: those the autotuner times."""
    return [_with_constants(c, constants(c.kwargs, arguments))
            for c in fitting([c for c in configs if usable(c.all_kwargs(), arguments)], gemm_sizes(arguments))]


def _with_constants(config, constants: dict):
    """``config``, or where ``constants`` holds any a copy of it with them added to its constexprs."""
    if not constants:
        return config
    config = copy.copy(config)
    config.kwargs = {**config.kwargs, **constants}
    return config


def prune_and_compile(jit_fn, keep, configs: list, positional: dict, **launch) -> list:
    """The autotuner's config hook, called once per new key before the configs are timed: keeps the configs
    ``keep(configs, arguments)`` (``runnable``), then compiles them all at once on a thread pool (triton
    compiles with the GIL released), so the timing loop finds them built. A config that fails to compile is
    left for the timing loop to fail and skip, as it would without this."""
    configs = keep(configs, {**positional, **launch})
    workers = min(len(configs), compile_threads())
    async_compile = getattr(triton, "AsyncCompileMode", None)  # triton >= 3.4
    if workers < 2 or async_compile is None:
        return configs
    with ThreadPoolExecutor(workers, thread_name_prefix="fusedres-compile") as pool, \
            contextlib.ExitStack() as stack:
        try:
            stack.enter_context(async_compile(pool, ignore_errors=True))
        except RuntimeError:  # the caller runs its own AsyncCompileMode (one at a time): leave compiling to it
            return configs
        for config in configs:
            _compile(jit_fn, tuple(positional.values()), launch, config)
    return configs


def _compile(jit_fn, args: tuple, launch: dict, config) -> None:
    """Compile ``jit_fn`` for a launch with ``args`` and keyword arguments ``launch`` (the launch's own grid and
    warmup among them, left out) in ``config``, without running it."""
    meta = {k: v for k, v in launch.items() if k not in ("grid", "warmup")}
    jit_fn.warmup(*args, grid=(1,), **meta, **config.all_kwargs())


_AHEAD = threading.local()  # .pass_: the CompileAhead whose compile_only() this thread is in, else None


class CompileAhead:
    """A compile-ahead pass (``compile_ahead``): its thread pool and the compiles submitted to it."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool, self.futures, self.lock = pool, [], threading.Lock()
        self.keys: set = set()  # (jit function, device, tuning key) of every launch submitted

    @contextlib.contextmanager
    def compile_only(self):
        """Within, on this thread: a launch of an autotuned kernel (``autotune``) runs nothing, and where its key
        is new submits the compiles of the configs the autotuner would time to this pass's pool. The launch's
        outputs stay unwritten; host code that reads the config that ran (``best_config``) after a launch finds
        one of the key's configs."""
        previous = getattr(_AHEAD, "pass_", None)
        _AHEAD.pass_ = self
        try:
            yield
        finally:
            _AHEAD.pass_ = previous

    def submit(self, tuner, keep, args: tuple, kwargs: dict) -> None:
        """``tuner``'s launch with ``args`` and ``kwargs`` inside ``compile_only()`` (see there)."""
        key = tuning_key(tuner, args, kwargs)
        tuned = tuner.cache.get(key)
        if tuned is not None:
            tuner.best_config = tuned
            return
        configs = keep(tuner.configs, _arguments(tuner, args, kwargs))
        tuner.best_config = configs[0]
        jit_fn, device = tuner.fn, driver.active.get_current_device()
        with self.lock:  # launches may come from the forward's thread and autograd's
            if (jit_fn, device, key) in self.keys:
                return
            self.keys.add((jit_fn, device, key))
        jit_fn.device_caches[device]  # made here: the pool's threads would each make one and keep the last
        args = tuple(_PointerArgument(a) if hasattr(a, "data_ptr") else a for a in args)
        futures = [self.pool.submit(_compile_on, device, jit_fn, args, kwargs, config) for config in configs]
        with self.lock:
            self.futures += futures

    def failed(self) -> int:
        """How many submitted compiles raised (after the pass: the timing loop skips those configs)."""
        return sum(future.exception() is not None for future in self.futures)


class _PointerArgument:
    """A tensor argument as a compile needs it: its dtype, and its address (triton's launcher specialises a
    pointer on its alignment). The pass's queued compiles hold these, not the tensors and their memory."""

    __slots__ = ("dtype", "address")

    def __init__(self, tensor):
        self.dtype, self.address = tensor.dtype, tensor.data_ptr()

    def data_ptr(self) -> int:
        return self.address


def _compile_on(device: int, *compile_args) -> None:
    """``_compile(*compile_args)`` for ``device``, on a pool thread (which starts on device 0)."""
    driver.active.set_current_device(device)
    _compile(*compile_args)


@contextlib.contextmanager
def compile_ahead():
    """A compile-ahead pass: yields a ``CompileAhead`` whose ``compile_only()`` turns launches of autotuned
    kernels into compiles on one pool of ``compile_threads()`` threads; on leaving, waits for every compile
    (left by an exception: only for those already running). The compiled kernels stay in each kernel's
    in-process cache and in triton's disk cache, so the launches that follow the pass time their configs
    without compiling them."""
    pool = ThreadPoolExecutor(compile_threads(), thread_name_prefix="fusedres-compile-ahead")
    try:
        yield CompileAhead(pool)
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()


def time_config(kernel_call, quantiles):
    """The autotuner's timing of one config: 5 ms of warm-up and 25 ms of timed calls (a median over 25 to
    250 calls of these 0.1-1 ms kernels). Triton's default, 25 + 100 ms, made an already compiled new key
    of 6 configs cost ~0.7 s on an H100 (benchmarks/RESULTS.md, `first call s`)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(configs: list, key: list, gemm_sizes, usable=lambda config, arguments: True,
             constants=lambda config, arguments: {}):
    """triton.autotune over ``configs`` keyed by the argument names ``key``, timing (``time_config``) only
    the configs a new key may run and that fit its GEMM, compiled in parallel (``prune_and_compile``;
    ``gemm_sizes`` maps the launch's arguments to {block name: GEMM size}, ``usable(config.all_kwargs(),
    arguments)`` says whether a config may run them, ``constants(config kwargs, arguments)`` gives constexprs
    the config launches with besides its own, which the launch then does not pass: the key must decide both),
    with the disk cache if FUSEDRES_AUTOTUNE_CACHE=1; a key tuned before launches its config directly, and
    each new key's tuning is recorded (``fast_path_and_record``)."""
    def decorate(jit_fn):
        extra = ({"cache_results": os.environ.get("FUSEDRES_AUTOTUNE_CACHE") == "1"}
                 if "cache_results" in inspect.signature(triton.autotune).parameters else {})
        keep = functools.partial(runnable, gemm_sizes, usable, constants)
        hook = {"early_config_prune": functools.partial(prune_and_compile, jit_fn, keep)}
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by=hook, do_bench=time_config,
                                **extra)(jit_fn)
        if getattr(tuner, "cache_results", False):
            _tolerant_disk_cache(tuner)
        return fast_path_and_record(tuner, keep, constants)
    return decorate


def _tolerant_disk_cache(tuner) -> None:
    """``tuner``'s lookup of a new key on disk (triton's ``check_disk_cache``: FUSEDRES_AUTOTUNE_CACHE=1) taking an
    entry it cannot read (emptied or cut short by a crash or a full disk, another triton's layout) as none: the key
    is timed again, with a warning, where triton raised at every launch of that key, in every process, until the
    file was removed. An entry that cannot be written after the timing only warns: the timing's choice stands."""
    check = tuner.check_disk_cache

    def check_or_time(tuning_key, configs, timing):
        timed = []

        def time_configs():
            timed.append(True)
            timing()

        try:
            return check(tuning_key, configs, time_configs)
        except (OSError, ValueError, KeyError, TypeError) as error:
            if timed and not isinstance(error, OSError):  # the timing's own error
                raise
            warnings.warn(f"fusedres: the autotuning disk cache (FUSEDRES_AUTOTUNE_CACHE=1) could not "
                          f"{'write' if timed else 'read'} {tuner.base_fn.__name__}'s entry for {tuning_key} "
                          f"({type(error).__name__}: {error}); "
                          f"{'the timing stands' if timed else 'timing its configs again'}", RuntimeWarning)
            if not timed:
                timing()
            return False

    tuner.check_disk_cache = check_or_time
