"""Timing on a device, shared by every benchmark level (``harness``) and nothing else.

CUDA events around each iteration, the L2 cache flushed before each one (as ``triton.testing.do_bench``
does), after warm-up; ``time.perf_counter`` on CPU. Each iteration's host time in the call (its checks and
launches, not waiting for the GPU) is taken too. With the queue drained after each flush, a call whose host
time exceeds the flush's GPU time (~0.1 ms) is timed partly on the host; ``time_ms(queue_ahead=True)`` queues
a wait before each iteration so the events time the GPU's work alone. ``first_call`` takes the wall clock of
a first call, synchronised.
"""

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from fusedres.ops import dispatch

_FLUSH: dict[str, Tensor] = {}


def flush_buffer(device: torch.device) -> Optional[Tensor]:
    """256 MiB written before each timed CUDA iteration so no iteration starts with a warm L2."""
    if device.type != "cuda":
        return None
    if str(device) not in _FLUSH:
        _FLUSH[str(device)] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _FLUSH[str(device)]


@dataclass
class Timing:
    ms: list[float]  # per iteration: between CUDA events around fn() (perf_counter on CPU)
    host_ms: list[float]  # per iteration: the host's time in fn() (its checks and launches), not synchronised
    late: Optional[int] = None  # queue_ahead: iterations whose host time outlasted the wait queued before them


_HOLD_MAX_MS = 20.0  # queue_ahead: the longest wait queued before an iteration


def _host_call_ms(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def time_ms(fn: Callable, device: torch.device, warmup: int, repeats: int, flush: bool = True,
            queue_ahead: bool = False) -> Timing:
    """Times of ``repeats`` iterations after ``warmup`` untimed ones (see the module docstring). queue_ahead
    (CUDA): before each iteration the GPU is given a wait (``torch.cuda._sleep``) of twice the host time a
    call took in three more untimed calls, so the host queues all of the call's launches before the GPU
    reaches them and the events time the GPU's work alone, as a deep queue does in a model's step. ``late``
    counts the iterations whose host time outlasted their wait (a call that synchronises, more than
    _HOLD_MAX_MS of host time, a pause of the host): their times may include some of the host's."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = [_host_call_ms(fn) for _ in range(repeats)]
        return Timing(times, times)
    buffer = flush_buffer(device) if flush else None
    hold_ms = 0.0
    if queue_ahead:
        torch.cuda.synchronize(device)
        hold_ms = min(2 * quantile([_host_call_ms(fn) for _ in range(3)], 0.5), _HOLD_MAX_MS)
        hold_cycles = int(hold_ms * dispatch.sleep_cycles_per_ms(device))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    host = []
    torch.cuda.synchronize(device)
    for start, end in events:
        if buffer is not None:
            buffer.zero_()
        if queue_ahead:
            torch.cuda._sleep(hold_cycles)
        start.record()
        host.append(_host_call_ms(fn))
        end.record()
    torch.cuda.synchronize(device)
    return Timing([start.elapsed_time(end) for start, end in events], host,
                  sum(h >= hold_ms for h in host) if queue_ahead else None)


def first_call(fn: Callable, device: torch.device) -> tuple[Any, float]:
    """(fn(), its wall-clock seconds), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
