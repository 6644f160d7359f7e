"""Measured dispatch: per call signature, run the implementation of an op that was fastest when timed.

An op with several implementations of the same result (say cuDNN, Triton and plain torch) owns one
``MeasuredDispatch``. Its ``choose`` is called on CUDA with a signature describing the call: a hashable
value holding everything the choice depends on (dtype, layout, shapes, flags), including whatever
decides whether an implementation can run the call at all (torch's TF32 and cuDNN flags, say): a known
signature is answered from a dict, without asking again. The first call per key
``f"{op}|{gpu name}|{describe(signature)}"`` times every available implementation on the call's own
inputs (CUDA events, the median of ``_REPS`` runs after ``_WARMUP``); the process keeps the fastest for
that key.
An implementation that raises while timed is recorded as ``"failed: ..."`` and never chosen, one that
cannot run the call as ``"unavailable: <why>"``; when none ran, ``choose`` raises RuntimeError with
every reason and records nothing.

``FUSEDRES_DISPATCH_CACHE=<path>`` also keeps the entries in a JSON file shared by processes: read once
per process, read again before each write so that other processes' entries stay, replaced atomically.
An entry from the file is trusted only while its choice is still available for the call; otherwise
the call is measured again.

Nothing is timed or recorded while a CUDA graph is being captured or under ``torch.compile`` (the
timing would be captured or traced): a known choice, else the first available implementation in the
op's fixed order. Warm up before capturing (as ``torch.cuda.graph`` asks) to capture the measured one.

During a prepare pass (``preparing``, run by ``fusedres.precompile``) a signature with no choice yet is
neither measured nor recorded: every available implementation runs once inside the pass's context (where
the Triton kernels only submit their compiles), and the first in the fixed order that ran runs the call.

``dispatch_table()`` gives every op's entries, ``MeasuredDispatch.table()`` one op's, and ``reset()``
forgets this process's entries and file reads (for tests).
"""

import contextlib
import copy
import functools
import json
import os
import statistics
from typing import Callable, Hashable, Optional, Union

import torch

CACHE_ENV = "FUSEDRES_DISPATCH_CACHE"
_WARMUP, _REPS = 3, 10
_TABLE: dict[str, dict] = {}  # every op's: key -> {"choice": name, "ms": {name: median ms or why not}}
_CHOSEN: dict[tuple, str] = {}  # (op, device index, signature) -> choice: known calls skip building the key

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


def _save(path: str, key: str, entry: dict) -> None:
    entries = _read_cache(path)  # again: keep what other processes wrote meanwhile
    entries[key] = entry
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, after a warm-up."""
    for _ in range(_WARMUP):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(_REPS)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _capturing_or_compiling() -> bool:
    # No capture can be under way before CUDA is initialised, and asking would fail without a driver.
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized()
                                             and torch.cuda.is_current_stream_capturing())


def reset() -> None:
    """Forget this process's entries and file reads, as a new process would start."""
    _TABLE.clear()
    _CHOSEN.clear()
    _disk_entries.cache_clear()


class MeasuredDispatch:
    """Per-call-signature choice among the implementations of one op, made from timings."""

    def __init__(self, op: str, implementations: tuple[str, ...], describe: Callable[[Hashable], str] = str):
        """``implementations`` in the fixed order used when nothing may be measured; ``describe(signature)``
        is a signature's text in the keys of the table and the file."""
        if "|" in op or not implementations:
            raise ValueError(f"MeasuredDispatch: expected an op name without '|' and at least one "
                             f"implementation, got {op!r} and {implementations!r}")
        self.op, self.implementations, self.describe = op, tuple(implementations), describe

    def choose(self, device: torch.device, signature: Hashable,
               unavailable_reason: Callable[[str], Optional[str]], run: Callable[[str], object]) -> str:
        """The implementation to run on CUDA device ``device`` for a call described by ``signature``.

        ``unavailable_reason(name)`` is None when ``name`` can run this call, else why not; ``run(name)``
        runs it once on the call's own inputs (timed).
        """
        chosen = _CHOSEN.get((self.op, device.index, signature))
        if chosen is not None:
            return chosen
        if _prepare is not None and not _capturing_or_compiling():
            return self._prepare(signature, unavailable_reason, run)
        text = self.describe(signature)
        key = f"{self.op}|{_gpu_name(device.index)}|{text}"
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
                _TABLE[key] = entry = self._measure(text, unavailable_reason, run)
                if path:
                    _save(path, key, entry)
        _CHOSEN[self.op, device.index, signature] = entry["choice"]
        return entry["choice"]

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
                 run: Callable[[str], object]) -> dict:
        ms: dict[str, Union[float, str]] = {}
        for name in self.implementations:
            reason = unavailable_reason(name)
            try:
                ms[name] = f"unavailable: {reason}" if reason else _time_ms(functools.partial(run, name))
            except Exception as exc:  # e.g. no cuDNN engine for this graph: never chosen
                ms[name] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        ran = {name: t for name, t in ms.items() if not isinstance(t, str)}
        if not ran:
            raise RuntimeError(f"{self.op}: no implementation could run this call ({signature}): "
                               + "; ".join(f"{name}: {why}" for name, why in ms.items()))
        return {"choice": min(ran, key=ran.get), "ms": ms}

    def table(self) -> dict[str, dict]:
        """This op's entries in this process: key -> {"choice": name, "ms": {name: median ms or why not}}."""
        prefix = f"{self.op}|"
        return {key: copy.deepcopy(entry) for key, entry in _TABLE.items() if key.startswith(prefix)}


def dispatch_table() -> dict[str, dict]:
    """Every op's entries in this process (copies), keyed as ``MeasuredDispatch.table``'s."""
    return copy.deepcopy(_TABLE)
