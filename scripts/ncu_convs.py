"""A few ResNet-50 convs (batch 256, bf16, channels_last) for Nsight Compute: cuDNN's and the Triton conv's
kernels side by side, each launched once inside the profiled range.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \\
        python3 scripts/ncu_convs.py

Each Triton variant (bare; BN + ReLU prologue with the statistics epilogue) is autotuned and run once before
the range starts, so only the chosen config's launch (and the statistics' finishing kernel) is profiled. On
the 3x3 convs the bare conv also runs on each kind of pointer config alone: x copied by 16-byte copies through
L2 ("pointer") and in 8-byte runs cached in L1 ("x in L1"; the memory section's L1 hit rate tells them apart).
Every shape also runs the prologue with and without the statistics epilogue on one fixed config (pointer,
128x128, 8 warps), uncapped and capped at 128 registers (two CTAs an SM), and on the 1x1 convs with the
statistics also as a CHANNEL_ROWS tile (capped): what the statistics epilogue costs on the same tile, what the
occupancy it loses does, and what summing a channel within a warp saves. On the H200 it took layer1's 64->256
1x1 from 0.227 to 0.634 ms; cutting its column sums' shuffles from 216 to 40 a thread changed nothing
(benchmarks/RESULTS.md), and b1cee7d moved its one load (the shift) before y's store: the warp-state section's
stall reasons (gpu_check.sh prints them in ncu_convs_raw.csv) say where its warps wait. The stem's rows show
its space-to-depth copy (``_space_to_depth_kernel``) beside the conv kernel: ~0.9 ms on the H200 before
b1c3bae took the copy's 64-bit divisions out.
Needs a CUDA GPU (scripts/gpu_check.sh runs it with GPU_CHECK_NCU=1).
"""

import torch
import torch.nn.functional as F

from fusedres.triton import conv, conv_configs


class ConfigSubset:
    """A subset of the Triton conv's configs (``keep(config.all_kwargs())``) with its own autotuning cache: a call
    run through it tunes its key among those configs only (the kernel's own configs and cache are back after
    each call)."""

    def __init__(self, keep):
        self.configs = [c for c in conv._conv_kernel.configs if keep(c.all_kwargs())]
        self.cache: dict = {}

    def run(self, call):
        kernel = conv._conv_kernel
        saved = kernel.configs, kernel.cache
        kernel.configs, kernel.cache = self.configs, self.cache
        try:
            return call()
        finally:
            kernel.configs, kernel.cache = saved


SHAPES = {  # name: (C, K, H, kernel, stride, padding), ResNet-50 at 224 px
    "conv1 7x7/2 3->64": (3, 64, 224, 7, 2, 3),  # the Triton conv runs it space-to-depth: the copy, then the conv
    "layer1 1x1 64->64": (64, 64, 56, 1, 1, 0),
    "layer1 3x3 64->64": (64, 64, 56, 3, 1, 1),
    "layer1 1x1 64->256": (64, 256, 56, 1, 1, 0),
    "layer2.0 3x3/2 128->128": (128, 128, 56, 3, 2, 1),
    "layer3 1x1 256->1024": (256, 1024, 14, 1, 1, 0),
}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("scripts/ncu_convs.py needs a CUDA GPU")
    torch.manual_seed(0)
    launches = []
    for name, (c, k, h, r, stride, padding) in SHAPES.items():
        x = torch.randn(256, c, h, h, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(k, c, r, r, device="cuda", dtype=torch.bfloat16) / (c * r * r) ** 0.5
        scale, shift = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        args = dict(stride=stride, padding=padding)
        variants = {
            "cudnn": lambda x=x, w=w, args=args: F.conv2d(x, w, **args),
            "triton": lambda x=x, w=w, args=args: conv.conv2d_fused(x, w, **args),
            "triton prologue+stats": lambda x=x, w=w, args=args, scale=scale, shift=shift: conv.conv2d_fused(
                x, w, **args, in_scale=scale, in_shift=shift, compute_stats=True),
        }
        fixed_tiles = [(None, False), (conv_configs._REGISTER_CAP, False)]  # (register cap, CHANNEL_ROWS)
        if (r, stride) == (1, 1):  # a GEMM view, whose statistics may run a CHANNEL_ROWS tile
            fixed_tiles.append((conv_configs._REGISTER_CAP, True))
        for cap, rows in fixed_tiles:
            fixed = ConfigSubset(lambda c, cap=cap, rows=rows: (
                not c["USE_TMA"] and not c["X_IN_L1"] and c["BLOCK_M"] == 128 and c["BLOCK_N"] == 128
                and c.get("maxnreg") == cap and c["CHANNEL_ROWS"] == rows))
            for stats in ((True,) if rows else (False, True)):
                variants[f"triton prologue{'+stats' if stats else ''}, pointer 128x128"
                         + (f" maxnreg={cap}" if cap else "") + (" channel rows" if rows else "")] = (
                    lambda x=x, w=w, args=args, scale=scale, shift=shift, stats=stats, fixed=fixed: fixed.run(
                        lambda: conv.conv2d_fused(x, w, **args, in_scale=scale, in_shift=shift, compute_stats=stats)))
        if r > 1:
            for kind, x_in_l1 in (("pointer", False), ("x in L1", True)):
                subset = ConfigSubset(lambda c, x_in_l1=x_in_l1: not c["USE_TMA"] and c["X_IN_L1"] == x_in_l1)
                variants[f"triton {kind}"] = lambda x=x, w=w, args=args, subset=subset: subset.run(
                    lambda: conv.conv2d_fused(x, w, **args))
        for variant, run in variants.items():
            run()  # autotunes and compiles outside the profiled range
            launches.append((f"{name}: {variant}", run))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, run in launches:
        torch.cuda.nvtx.range_push(label)
        run()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    for label, _ in launches:
        print(label)


if __name__ == "__main__":
    main()
