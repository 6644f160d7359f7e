"""pytest-benchmark suite over the same cases and contenders as ``python -m benchmarks``.

    pytest benchmarks --benchmark-only                       # quick subset, device defaults
    FUSEDRES_BENCH_ARGS="--levels ops --dtype fp16" pytest benchmarks --benchmark-only

``FUSEDRES_BENCH_ARGS`` takes the options of ``python -m benchmarks`` (default: ``--quick``;
on CPU ``--quick --batch 2 --size 64``). Each test checks its contender (same weights, same
inputs) against an upcast run of eager, as the CLI does, before timing it; pytest-benchmark
reads the host clock, so the timed function synchronises the GPU. Skipped tests say why
(torch.compile off on CPU, a backend that cannot run here). This file lives outside ``tests/``
(a bare ``pytest`` never collects it: testpaths); the README's test command runs it too, in a process of its
own, as a smoke test of the harness and of every contender's agreement with eager (no timing is asserted).
"""

import os
import shlex

import pytest
import torch

from benchmarks import cases, harness
from benchmarks.__main__ import make_settings

_DEFAULT_ARGS = "--quick" if torch.cuda.is_available() else "--quick --batch 2 --size 64"
SETTINGS = make_settings(shlex.split(os.environ.get("FUSEDRES_BENCH_ARGS") or _DEFAULT_ARGS))
CASES = cases.build_cases(SETTINGS)
PARAMS = [pytest.param(case, name, skip, id=f"{case.key}|{name}".replace(" ", "_"))
          for case in CASES for name, skip in harness.contenders(SETTINGS, case)]


def anchor(case: harness.Case) -> str:
    """The contender the others are checked and compared against: eager, or the level's own."""
    return harness.contenders(SETTINGS, case)[0][0]


def synchronized(fn, device: torch.device):
    """fn followed by a device synchronisation: pytest-benchmark reads the host clock."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


_prepared: dict[str, tuple] = {}  # one case at a time: its Setup and its Reference


def _prepare(case: harness.Case) -> tuple:
    """The case's inputs and its upcast reference, with the anchor's own error already recorded."""
    if case.key not in _prepared:
        _prepared.clear()
        harness.release(SETTINGS.device)
        setup = case.prepare()
        reference = harness.Reference.of(setup, SETTINGS)
        if reference.outputs is not None:
            reference.check(harness.build(setup, anchor(case), SETTINGS)(), SETTINGS.dtype, anchor=True)
        harness.release(SETTINGS.device)
        _prepared[case.key] = (setup, reference)
    return _prepared[case.key]


@pytest.mark.parametrize("case, contender, skip", PARAMS)
def test_bench(benchmark, case, contender, skip):
    if skip is not None:
        pytest.skip(skip)
    setup, reference = _prepare(case)
    fn = harness.build(setup, contender, SETTINGS)
    agreement = reference.check(fn(), SETTINGS.dtype, anchor=contender == anchor(case))
    assert agreement["agree"] is not False, f"{contender} disagrees: {agreement['agree_detail']}"
    benchmark.group = f"{case.level} | {case.name} | {case.mode} | batch {case.batch}"
    benchmark.extra_info.update(
        shape=case.shape, contender=contender, **agreement,
        bytes=case.bytes, flops=case.flops, settings=SETTINGS.describe())
    try:
        benchmark.pedantic(synchronized(fn, SETTINGS.device), rounds=SETTINGS.repeats,
                           warmup_rounds=SETTINGS.warmup, iterations=1)
    finally:
        del fn
        harness.release(SETTINGS.device, compiled=contender == "compile")
