"""fusedres benchmarks: fused vs eager PyTorch vs torch.compile, same run, same weights and inputs.

- ``python -m benchmarks``: console table, ``bench_out/results.json`` and ``results.md``
  (``--help`` for the options; ``--quick`` for a smoke run).
- ``python -m benchmarks.plot bench_out/results.json``: PNGs from the saved rows.
- ``pytest benchmarks --benchmark-only``: the same cases under pytest-benchmark.

``harness.py`` holds everything shared (contenders, agreement check, timing, memory, ceilings,
output); ``cases.py`` says what the ops, blocks and models levels set up, ``convs.py`` the convs level;
``common.py`` holds the bytes / FLOPs formulas and the set-up they share.
"""
