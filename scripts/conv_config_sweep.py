"""Every config of the Triton forward conv, each alone, on a few ResNet-50 shapes and the tests' small TMA cases,
several fresh random inputs each: which configs compute wrongly, for which launches, and whether conv_configs._usable
lets the autotuner run them (GPU).

The autotuner runs whichever config is fastest, so a config that is wrong on some launch can hide behind a faster
one in one run and be chosen in the next; this runs each one. Per case and config it prints the worst ratio of the
output's max error to the tests' bound (tests/test_triton_conv.py's _error_bound: twice eager's error plus half an
ulp of the largest output; <= 1 is right), and the statistics' worst error relative to the output's spread.

    PYTHONPATH=.:tests python scripts/conv_config_sweep.py [--repeats 3] [--cases NAME,...]
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_triton_conv as t  # noqa: E402  (the tests' cases, inputs and fp64 reference)

from fusedres.triton import conv, conv_configs  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
CASES = {  # name: the tests' Case (C, K, H, kernel, stride, padding, dtype, channels_last, prologue, epilogue, n);
    # the ResNet-50 ones have the keys of the convs benchmark level's Triton rows (its kernels already compiled)
    "l3_3x3": t._case(256, 256, 14, 3, 1, 1, BF16, True, "relu", "stats", n=256),
    "l3_3x3_bare": t._case(256, 256, 14, 3, 1, 1, BF16, True, "none", "none", n=256),
    "l1_expand": t._case(64, 256, 56, 1, 1, 0, BF16, True, "relu", "stats", n=256),
    "l3_downsample": t._case(512, 1024, 28, 1, 2, 0, BF16, True, "relu", "none", n=256),
    "l2_3x3": t._case(128, 128, 28, 3, 1, 1, BF16, True, "relu", "stats", n=256),
    "l1_3x3_b8": t._case(64, 64, 56, 3, 1, 1, BF16, True, "relu", "stats", n=8),  # boxes of several positions
    "l3_3x3_b8": t._case(256, 256, 14, 3, 1, 1, BF16, True, "relu", "stats", n=8),
    **{f"one_position{i}": case for i, case in enumerate(t._ONE_POSITION_BOX_CASES)},
}


def _name(config) -> str:
    kw = config.kwargs
    kind = "tma" if kw["USE_TMA"] else "ptr"
    kind += f"+persistent{kw['PERSISTENT']}" if kw["PERSISTENT"] else ""
    kind += "+L1" if kw["X_IN_L1"] else ""
    kind += "+rows" if kw["CHANNEL_ROWS"] else ""
    kind += f"+maxnreg{config.maxnreg}" if config.maxnreg else ""
    return f"{kind} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def _checked_inputs(case, repeats: int) -> list[tuple]:
    """Per repeat, fresh inputs (the case's seed varies with the repeat) with the fp64 reference and the tests'
    bound on the output's error: (x, w, kw, ref, bound), made once for all the configs."""
    inputs = []
    for repeat in range(repeats):
        x, w, kw = t._make(case if repeat == 0 else _Reseeded(case, repeat))
        ref = t._unfused(x, w, kw, t.F64)
        inputs.append((x, w, kw, ref, t._error_bound(x, w, kw, ref)[0]))
    return inputs


def _worst(inputs: list[tuple]) -> tuple:
    """(max error / bound, stats error / spread) of the conv over ``inputs`` (_checked_inputs)."""
    ratio = stats = 0.0
    for x, w, kw, ref, bound in inputs:
        out, mean, var = conv.conv2d_fused(x, w, **kw)
        ratio = max(ratio, (out.double() - ref).abs().max().item() / bound)
        if mean is not None:
            y = out.double()
            spread = y.abs().amax((0, 2, 3))
            stats = max(stats, ((mean.double() - y.mean((0, 2, 3))).abs() / spread).max().item(),
                        ((var.double() - y.var((0, 2, 3), unbiased=False)).abs() / spread.square()).max().item())
    return ratio, stats


@dataclasses.dataclass(frozen=True)
class _Reseeded:  # the case with other random values: t._make seeds its inputs by the case's repr
    case: object
    repeat: int

    def __getattr__(self, name):
        return getattr(self.case, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    kernel = conv._conv_kernel
    all_configs = list(kernel.configs)
    patches = pytest.MonkeyPatch()
    launch = t._launch_arguments(patches)  # the launch's arguments, as the autotuner gives them to _usable
    print(f"{'case':16} {'config':34} {'err/bound':>10} {'stats err':>10}  usable  "
          "(bad: err/bound > 1 or stats > 1e-5)")
    for name in args.cases.split(","):
        kernel.configs, kernel.cache = all_configs, {}
        launch.clear()
        inputs = _checked_inputs(CASES[name], args.repeats)
        x, w, kw = inputs[0][:3]
        conv.conv2d_fused(x, w, **kw)  # autotuned among all: records the launch
        for config in all_configs:
            kernel.configs, kernel.cache = [config], {}
            start = time.perf_counter()
            usable = "yes" if conv_configs._usable(config.all_kwargs(), launch) else "no"
            try:
                ratio, stats = _worst(inputs)
                verdict = "BAD" if ratio > 1 or stats > 1e-5 else "ok"
                line = f"{ratio:10.3g} {stats:10.2e}  {usable:6}  {verdict}"
            except Exception as error:  # a config this launch cannot run (a failed static_assert): say which
                line = f"{'n/a':>10} {'':10}  {usable:6}  {type(error).__name__}: {str(error).splitlines()[0][:60]}"
            print(f"{name:16} {_name(config):34} {line} ({time.perf_counter() - start:.1f} s)", flush=True)
    kernel.configs, kernel.cache = all_configs, {}
    patches.undo()


if __name__ == "__main__":
    main()
