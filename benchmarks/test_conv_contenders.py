"""The convs level's Triton contenders, built and run as the GPU run does, under the Triton interpreter on CPU.

On CPU ``python -m benchmarks --levels convs`` skips its Triton contenders (the level times CUDA kernels), so a
break in how one is built, or a result its check refuses, would first show on the GPU machine, whose time is
scarce. Here each contender of the quick convs (the first 1x1 and the first 3x3 conv of ResNet-50), forward and
backward, runs once through ``harness.run_contender`` and must agree with the upcast reference; the +stats
contenders' per-channel statistics are checked too. The cases run in a child process: TRITON_INTERPRET must be
set before triton decorates the kernels, and the rest of the benchmark suite runs them compiled or not at all.
(bfloat16 is left out: the interpreter rounds float32 to bfloat16 toward zero, which biases the variances by
about an ulp, most of the check's slack on these small shapes; a GPU rounds to nearest.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import convs

ROOT = Path(__file__).resolve().parents[1]
CASES = ("resnet50 layer1.0.conv1", "resnet50 layer1.0.conv2")  # --quick: the first 1x1 and 3x3 conv


def run_quick_convs(dtype: str) -> list[dict]:
    """Every quick convs case (fwd and bwd) and each of its contenders once: one row per contender."""
    from benchmarks import cases, harness
    from benchmarks.__main__ import make_settings

    cpu_skips = convs.conv_run_skips  # the Triton contenders are skipped on CPU: un-skip them, keep the rest
    convs.conv_run_skips = lambda settings, mode="fwd": {
        name: None if name in convs.TRITON_CONV_CONTENDERS else why
        for name, why in cpu_skips(settings, mode).items()}
    settings = make_settings(["--device", "cpu", "--levels", "convs", "--quick", "--batch", "2", "--size", "32",
                              "--dtype", dtype, "--repeats", "1", "--warmup", "0"])
    rows = []
    for case in cases.build_cases(settings):
        setup = case.prepare()
        reference = harness.Reference.of(setup, settings)
        rows += [harness.run_contender(case, setup, name, settings, reference) for name, _ in case.contenders]
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the convs level runs these contenders compiled")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_triton_conv_contender_runs_and_agrees_with_the_reference(dtype):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-m", "benchmarks.test_conv_contenders", dtype], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    rows = json.loads(child.stdout.splitlines()[-1])
    ran = {(row["case"], row["mode"], row["contender"]) for row in rows}
    assert ran == {(case, "fwd", name) for case in CASES for name in convs.CONV_CONTENDERS
                   if name != "prologue[cuda]"} | {  # the CUDA extension cannot run on CPU
        (case, "bwd", name) for case in CASES for name in convs.CONV_BWD_CONTENDERS}, ran
    for row in rows:
        anchor = row["contender"] == "cudnn"  # its own error is the yardstick
        assert not row.get("error") and row["agree"] is (None if anchor else True), (
            f"{row['case']} {row['mode']} {row['contender']}: {row.get('error') or row['agree_detail']}")
    stats_rows = [row for row in rows if row["contender"].endswith("+stats")]
    assert stats_rows and all("3 tensors" in row["agree_detail"] for row in stats_rows), stats_rows


if __name__ == "__main__":
    print(json.dumps(run_quick_convs(sys.argv[1]), default=str))
