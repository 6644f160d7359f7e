"""Measured dispatch: per call signature, run the implementation of an op that was fastest when timed.

An op with several implementations of the same result (say cuDNN, Triton and plain torch) owns one
``MeasuredDispatch``. Its ``choose`` is called on CUDA with a signature describing the call: a hashable
value holding everything the choice depends on (dtype, layout, shapes, flags), including whatever
decides whether an implementation can run the call at all (torch's TF32 and cuDNN flags, say): a known
signature is answered from a dict, without asking again. The first call per key
``f"{op}|{gpu name}|{describe(signature)}"`` times every available implementation on the call's own
inputs (``_REPS`` runs after ``_WARMUP``; what is timed: below); the process keeps the fastest for that key.
An implementation that raises while timed is recorded as ``"failed: ..."`` and never chosen, one that
cannot run the call as ``"unavailable: <why>"``; when none ran, ``choose`` raises RuntimeError with
every reason and records nothing.

Speed alone must not choose a wrong result: a kernel that skips work is fast. Where the caller passes a
``compare`` (the conv ops do), the measurement runs the op's ``references`` first (torch's own conv, say) and
checks every other implementation's result against the first reference that ran before timing it; one whose
result differs beyond what rounding explains (``mismatch``) is recorded as ``"failed: disagrees with ..."``,
never chosen, and reported by a RuntimeWarning. This holds the reference's result while the others run once
more each, on the first call per key only.

``FUSEDRES_DISPATCH_CACHE=<path>`` also keeps the entries in a JSON file shared by processes: read once
per process, read again before each write so that other threads' and processes' entries stay (one writer at a
time), replaced atomically. A file that cannot be written is warned about once; the op call goes on.
An entry from the file is trusted only while its choice is still available for the call; otherwise
the call is measured again.

Nothing is timed or recorded while a CUDA graph is being captured or under ``torch.compile`` (the
timing would be captured or traced): a known choice, else the first available implementation in the
op's fixed order. Warm up before capturing (as ``torch.cuda.graph`` asks) to capture the measured one.

During a prepare pass (``preparing``, run by ``fusedres.precompile``) a signature with no choice yet is
neither measured nor recorded: every available implementation runs once inside the pass's context (where
the Triton kernels only submit their compiles), and the first in the fixed order that ran runs the call.

What is timed: a wait queued before the timed calls (``torch.cuda._sleep``, twice their host time) holds the GPU
back while the host queues them, so the events time each call's GPU work alone, and the host's time per call
is taken apart. An eager call costs the longer of the two: a stream of calls runs at the pace of the host
where it is slower than the GPU, and of the GPU otherwise (events around calls that start on an idle GPU would
add the host's time to the GPU's instead). A forward to be replayed from a CUDA graph (``fusedres.cuda_graphed``)
runs its warm-up and capture inside ``for_graph_replay()``: a replay runs the kernels without the host work
that launched them, so there the GPU's work alone counts, and those choices are kept apart (their keys end in
``|graph``).

``dispatch_table()`` gives every op's entries, ``MeasuredDispatch.table()`` one op's, and ``reset()``
forgets this process's entries and file reads (for tests).
"""

import contextlib
import copy
import functools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from typing import Callable, Hashable, Optional, Union

import torch
from torch import Tensor

from . import backends

try:
    import fcntl
except ImportError:  # Windows: the cache file's writers are serialised within each process only
    fcntl = None

CACHE_ENV = "FUSEDRES_DISPATCH_CACHE"
DISAGREES = "failed: disagrees with"  # starts the entry of an implementation whose result the reference's refuted
_WARMUP, _REPS = 3, 10
_TABLE: dict[str, dict] = {}  # every op's: key -> {"choice": name, "ms": {name: median ms or why not}}
_CHOSEN: dict[tuple, str] = {}  # (op, device index, signature, graph replay) -> choice: known calls skip the key
_resets = 0  # how many times ``reset`` ran (``resets``)
_graph_replay = False  # inside ``for_graph_replay``
_HOLD_MAX_MS = 20.0  # the longest wait queued before the timed calls
_CYCLES_PER_MS: dict[str, float] = {}  # device -> torch.cuda._sleep cycles per ms, measured once
_SAVE_LOCK = threading.Lock()  # held by the thread writing the cache file (``_save``)
_unwritable: set[str] = set()  # the cache files ``_save`` could not write, warned about once each

_gpu_name = functools.lru_cache(maxsize=None)(torch.cuda.get_device_name)
# the running prepare pass's context factory (``preparing``): a global, as autograd runs the backward's calls
# on threads of its own
_prepare: Optional[Callable] = None


@contextlib.contextmanager
def preparing(prepare: Callable):
    """A prepare pass: within it, on every thread, ``choose`` meets a signature with no choice yet by running
    each available implementation once inside ``prepare()`` (a context manager) and answering the first in
    the op's fixed order that ran without raising (else the first available), without measuring or recording
    anything. One pass at a time."""
    global _prepare
    if _prepare is not None:
        raise RuntimeError("fusedres: a prepare pass (fusedres.precompile) is already running")
    _prepare = prepare
    try:
        yield
    finally:
        _prepare = None


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):  # no file yet, or unreadable: measure again
        return {}


_disk_entries = functools.lru_cache(maxsize=None)(_read_cache)  # read once per path


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive flock on the cache file at ``path`` (made, empty, where there is none yet), for writers in
    other processes; nothing without fcntl (Windows). ``_save`` replaces the file: a writer that was waiting on
    the one replaced locks the new one instead."""
    if fcntl is None:
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                yield
                return
        finally:
            os.close(fd)  # which releases the lock


def _save(path: str, key: str, entry: dict) -> None:
    """Adds ``key``'s entry to the cache file at ``path``, one writer at a time across threads and processes:
    read again to keep what others wrote meanwhile, written to a temporary file of its own beside it, which
    replaces the file atomically. Where that fails (a missing directory, a read-only place) the entry stays in
    this process only: a warning, once per path, and no temporary file left."""
    tmp = None
    try:
        with _SAVE_LOCK, _file_lock(path):
            entries = _read_cache(path)
            entries[key] = entry
            fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.", suffix=".tmp",
                                       dir=os.path.dirname(path) or None)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            with contextlib.suppress(FileNotFoundError):  # none yet without fcntl
                shutil.copymode(path, tmp)  # mkstemp makes its file private to this user
            os.replace(tmp, path)
            tmp = None
    except OSError as exc:
        with _SAVE_LOCK:
            warn = path not in _unwritable
            _unwritable.add(path)
        if warn:
            warnings.warn(f"fusedres: cannot write the dispatch cache {path!r} ({CACHE_ENV}): {type(exc).__name__}: "
                          f"{exc}; the measured choices are kept in this process only", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


@contextlib.contextmanager
def for_graph_replay():
    """Choices for a forward replayed from a CUDA graph, timed by their GPU work alone, the host's time left out
    (see the module docstring). Not reentrant across threads: one capture at a time."""
    global _graph_replay
    outer, _graph_replay = _graph_replay, True
    try:
        yield
    finally:
        _graph_replay = outer


def graph_replay() -> bool:
    """Whether ``choose`` answers for a graph replay (inside ``for_graph_replay``)."""
    return _graph_replay


def sleep_cycles_per_ms(device: torch.device) -> float:
    """How many cycles of ``torch.cuda._sleep`` (a kernel spinning on the SM clock) last a millisecond on
    ``device`` (the current one of its stream), measured on first use."""
    if str(device) not in _CYCLES_PER_MS:
        cycles = 2**21
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        spans = []
        for _ in range(4):
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize(device)
            spans.append(start.elapsed_time(end))
        _CYCLES_PER_MS[str(device)] = cycles / statistics.median(spans[1:])
    return _CYCLES_PER_MS[str(device)]


def _time_ms(fn: Callable[[], object]) -> float:
    """Milliseconds a call of ``fn()`` costs on the current CUDA stream, after a warm-up (see the module
    docstring): the median GPU work of ``_REPS`` timed calls, held apart from their host time by a wait queued
    before them (twice their host time, measured on one more call); outside ``for_graph_replay``, the longer of
    that and the median host time of a timed call."""
    for _ in range(_WARMUP):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    host_ms = 1e3 * (time.perf_counter() - start)
    torch.cuda._sleep(int(min(2 * _REPS * host_ms, _HOLD_MAX_MS)
                          * sleep_cycles_per_ms(torch.device("cuda", torch.cuda.current_device()))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(_REPS)]
    host = []
    for start, end in events:
        start.record()
        began = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - began))
        end.record()
    events[-1][1].synchronize()
    gpu_ms = statistics.median(start.elapsed_time(end) for start, end in events)
    return gpu_ms if _graph_replay else max(gpu_ms, statistics.median(host))


def tolerance(dtype: torch.dtype) -> float:
    """How far two correct implementations' results in ``dtype`` may differ, as a fraction of the result's
    scale: each rounds its fp32 sums to ``dtype``, so where the sums' order differs an element may differ by an
    ulp (bfloat16: 2**-7 of it), four times that allowed; float16 and float32 (TF32 products) results closer."""
    return 2.0 ** -5 if dtype == torch.bfloat16 else 2.0 ** -7


@torch.no_grad()
def magnitude(t: Optional[Tensor]) -> float:
    """The largest finite magnitude in ``t`` (0 for None or an empty tensor): a scale for ``mismatch``."""
    if t is None or t.numel() == 0:
        return 0.0
    return float(t.abs().nan_to_num_(0.0, 0.0, 0.0).max())


@torch.no_grad()
def mismatch(what: str, reference: Tensor, result: Tensor, scale: Optional[float] = None,
             dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why ``result`` is not ``reference`` (``what`` names them), or None where it is: the same shape, finite at
    the same elements, and nowhere further from it than ``tolerance(dtype)`` (``dtype``: ``reference``'s by
    default) times ``scale`` (default: the largest finite magnitude of ``reference``). The difference is taken in
    the tensors' dtype (rounded to 2**-8 of itself at worst), so the check holds one more tensor of their size."""
    if result.shape != reference.shape:
        return f"{what} has shape {list(result.shape)}, expected {list(reference.shape)}"
    if reference.numel() == 0:
        return None
    finite = torch.isfinite(reference)
    differently_finite = int((finite != torch.isfinite(result)).sum())
    if differently_finite:
        return f"{what} is finite at {differently_finite} element(s) where the reference is not, or the reverse"
    if scale is None:
        scale = magnitude(reference)
    error = float(torch.sub(result, reference).abs_().masked_fill_(~finite, 0).max())
    allowed = tolerance(dtype or reference.dtype) * scale
    if error > allowed:
        return f"{what} differs by up to {error:.3g} where {allowed:.3g} is allowed (scale {scale:.3g})"
    return None


def _capturing_or_compiling() -> bool:
    # No capture can be under way before CUDA is initialised, and asking would fail without a driver.
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized()
                                             and torch.cuda.is_current_stream_capturing())


def reset() -> None:
    """Forget this process's entries, file reads and warnings, as a new process would start."""
    global _resets
    _resets += 1
    _TABLE.clear()
    _CHOSEN.clear()
    _disk_entries.cache_clear()
    _unwritable.clear()


class MeasuredDispatch:
    """Per-call-signature choice among the implementations of one op, made from timings."""

    def __init__(self, op: str, implementations: tuple[str, ...], describe: Callable[[Hashable], str] = str,
                 references: tuple[str, ...] = ()):
        """``implementations`` in the fixed order used when nothing may be measured; ``describe(signature)``
        is a signature's text in the keys of the table and the file; ``references``: the implementations whose
        result the others must agree with where ``choose`` is given a ``compare``, the first that runs."""
        if "|" in op or not implementations or not set(references) <= set(implementations):
            raise ValueError(f"MeasuredDispatch: expected an op name without '|', at least one implementation "
                             f"and references among them, got {op!r}, {implementations!r} and {references!r}")
        self.op, self.implementations, self.describe = op, tuple(implementations), describe
        self.references = tuple(references)

    def choose(self, device: torch.device, signature: Hashable,
               unavailable_reason: Callable[[str], Optional[str]], run: Callable[[str], object],
               compare: Optional[Callable[[object, object], Optional[str]]] = None) -> str:
        """The implementation to run on CUDA device ``device`` for a call described by ``signature``.

        ``unavailable_reason(name)`` is None when ``name`` can run this call, else why not; ``run(name)``
        runs it once on the call's own inputs (timed) and returns its result; ``compare(reference's result,
        result)`` is None where two results agree, else why not (see the module's docstring).
        """
        chosen = _CHOSEN.get((self.op, device.index, signature, _graph_replay))
        if chosen is not None:
            return chosen
        if _prepare is not None and not _capturing_or_compiling():
            return self._prepare(signature, unavailable_reason, run)
        text = self.describe(signature)
        key = f"{self.op}|{_gpu_name(device.index)}|{text}" + ("|graph" if _graph_replay else "")
        entry = _TABLE.get(key)
        if entry is None:
            path = os.environ.get(CACHE_ENV)
            entry = _disk_entries(path).get(key) if path else None
            if isinstance(entry, dict) and entry.get("choice") in self.implementations \
                    and unavailable_reason(entry["choice"]) is None:
                _TABLE[key] = entry
            elif _capturing_or_compiling():
                available = [name for name in self.implementations if unavailable_reason(name) is None]
                if not available:
                    raise RuntimeError(f"{self.op}: no implementation can run this call ({text})")
                return available[0]  # not kept: measured once capturing or compiling is over
            else:
                with backends.on_device(device):  # the timing's events, wait and synchronize: the current device's
                    _TABLE[key] = entry = self._measure(text, unavailable_reason, run, compare)
                if path:
                    _save(path, key, entry)
        _CHOSEN[self.op, device.index, signature, _graph_replay] = entry["choice"]
        return entry["choice"]

    def kept(self, device: torch.device, signature: Hashable) -> Optional[str]:
        """The choice ``choose`` keeps for ``signature`` on ``device`` (every later call gets it until ``reset``),
        or None: none made yet, or the last one made while a graph was captured or a prepare pass ran."""
        return _CHOSEN.get((self.op, device.index, signature, _graph_replay))

    def _prepare(self, signature: Hashable, unavailable_reason: Callable[[str], Optional[str]],
                 run: Callable[[str], object]) -> str:
        """``choose`` during a prepare pass (``preparing``)."""
        available = [name for name in self.implementations if unavailable_reason(name) is None]
        if not available:
            raise RuntimeError(f"{self.op}: no implementation can run this call ({self.describe(signature)})")
        ran = []
        for name in available:
            with _prepare():
                try:
                    run(name)
                    ran.append(name)
                except Exception:  # measured after the pass, and recorded there as failed
                    pass
        return (ran or available)[0]

    def _measure(self, signature: str, unavailable_reason: Callable[[str], Optional[str]],
                 run: Callable[[str], object], compare: Optional[Callable[[object, object], Optional[str]]]) -> dict:
        ms: dict[str, Union[float, str]] = {}
        reference = None  # (name, result) of the first reference that ran, where results are compared
        order = self.implementations
        if compare is not None:  # the references first, each in the fixed order
            order = sorted(order, key=lambda name: name not in self.references)
        for name in order:
            reason = unavailable_reason(name)
            if reason:
                ms[name] = f"unavailable: {reason}"
                continue
            try:
                if compare is not None:
                    result = run(name)
                    if reference is None and name in self.references:
                        reference = name, result
                    elif reference is not None:
                        why = compare(reference[1], result)
                        if why:
                            ms[name] = f"{DISAGREES} {reference[0]}: {why}"
                            warnings.warn(f"fusedres: {self.op}: {name!r} disagrees with {reference[0]!r} on this "
                                          f"call ({signature}): {why}; it will not run this call. This is a "
                                          "fusedres bug: please report it.", RuntimeWarning, stacklevel=2)
                            continue
                    del result
                ms[name] = _time_ms(functools.partial(run, name))
            except Exception as exc:  # e.g. no cuDNN engine for this graph: never chosen
                ms[name] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        ms = {name: ms[name] for name in self.implementations}
        ran = {name: t for name, t in ms.items() if not isinstance(t, str)}
        if not ran:
            raise RuntimeError(f"{self.op}: no implementation could run this call ({signature}): "
                               + "; ".join(f"{name}: {why}" for name, why in ms.items()))
        return {"choice": min(ran, key=ran.get), "ms": ms}

    def table(self) -> dict[str, dict]:
        """This op's entries in this process: key -> {"choice": name, "ms": {name: median ms or why not}}."""
        prefix = f"{self.op}|"
        return {key: copy.deepcopy(entry) for key, entry in _TABLE.items() if key.startswith(prefix)}


def resets() -> int:
    """How many times ``reset`` ran in this process. A caller may remember a kept choice (``MeasuredDispatch.kept``)
    past the call that asked for it while this count stays the same."""
    return _resets


def dispatch_table() -> dict[str, dict]:
    """Every op's entries in this process (copies), keyed as ``MeasuredDispatch.table``'s."""
    return copy.deepcopy(_TABLE)
