"""Host (CPU) time per call of the Triton conv paths, with the conv kernel itself stubbed out.

Where a conv takes 0.06-0.2 ms on the GPU (ResNet-50's later stages), the Python around its launch
(argument checks, grid and workspace sizing, the statistics' finishing ops, the custom op's dispatch)
decides whether the GPU waits for the host. This times that Python alone: ``_conv_kernel`` is replaced by a
stub that launches nothing (triton's own launch path is not included), so it runs on CPU tensors too.
On a CUDA device the tensors are CUDA ones and the small torch ops still launch their kernels; on CPU
the Triton conv takes CPU tensors only under TRITON_INTERPRET=1 (whose 2 configs stand in for the GPU's
10 where the launch sizes its workspace for every config).

    PYTHONPATH=. TRITON_INTERPRET=1 python -m benchmarks.host_overhead      # CPU
    PYTHONPATH=. python -m benchmarks.host_overhead                         # GPU

Prints the median over 7 rounds of 2000 calls, in microseconds per call; on a GPU first with the real
kernels too (their launches included: the host time a small conv costs in all).
"""

import statistics
import time
import types

import torch
import triton

from fusedres.triton import conv


class _NoLaunch:
    """Stands in for the autotuned kernel: indexing by a grid gives a launch that does nothing."""
    best_config = types.SimpleNamespace(kwargs=dict(BLOCK_M=128, USE_TMA=False))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _microseconds(fn, calls: int = 2000, rounds: int = 7) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not conv._INTERPRET:
        raise SystemExit("benchmarks.host_overhead: no CUDA device; run it with TRITON_INTERPRET=1 on CPU")
    n, c, k, hw = 2, 256, 1024, 14  # ResNet-50's layer3 1x1 expand, at batch 2 (no size matters here)
    x = torch.randn(n, c, hw, hw, dtype=torch.bfloat16, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(k, c, 1, 1, dtype=torch.bfloat16, device=device)
    ones_c, zeros_k = torch.ones(c, device=device), torch.zeros(k, device=device)
    bn = (torch.zeros(c, device=device), torch.ones(c, device=device), ones_c, torch.zeros(c, device=device))
    unit = (x, *bn, w, None, [1, 1], [0, 0], [1, 1], 1, True, True)
    rows = {
        "conv2d_fused, bare": lambda: conv.conv2d_fused(x, w),
        "conv2d_fused, BN + ReLU prologue": lambda: conv.conv2d_fused(x, w, in_scale=ones_c, in_shift=ones_c),
        "conv2d_fused, prologue + statistics": lambda: conv.conv2d_fused(
            x, w, in_scale=ones_c, in_shift=ones_c, compute_stats=True, stats_shift=zeros_k),
        "op bn_act_conv2d (triton)": lambda: torch.ops.fusedres.bn_act_conv2d(*unit, "triton"),
        "op conv2d_stats (triton)": lambda: torch.ops.fusedres.conv2d_stats(*unit, "triton", "", 0, zeros_k),
    }
    if device == "cuda":  # the real kernels (tuned on the first call): the host path with triton's launches
        print(f"host us per call, real kernels (cuda, triton {triton.__version__}; the GPU's part of a call is "
              "a few us at this size):")
        for name, fn in rows.items():
            fn()
            print(f"  {name:40s} {_microseconds(fn):7.1f}")
    conv._conv_kernel = conv._finish_stats_kernel = _NoLaunch()
    print(f"host us per call, conv kernels stubbed ({device}, torch {torch.__version__}):")
    for name, fn in rows.items():
        print(f"  {name:40s} {_microseconds(fn):7.1f}")


if __name__ == "__main__":
    main()
