"""Shared by the Triton conv kernel tests (test_triton_conv.py, test_triton_conv_wgrad.py): dtypes and
tolerances, seeded random tensors, conv output sizes, and the sm_90 compile check.

Without CUDA the kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET is set here
(conftest does too), before anything imports triton.
"""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# Half an ulp at the largest magnitude (relative spacing 2**-23, 2**-10, 2**-7). Under the interpreter
# bf16 gets two whole ulps: it rounds fp32 -> bf16 by truncation (GPUs round to nearest), both the
# output and the prologue's result, which biases every input of the dot towards zero.
ATOL = {F32: 1e-6, F16: 2.0**-11, BF16: 2.0**-8 if DEVICE == "cuda" else 2.0**-6}


def pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def out_hw(case) -> tuple:
    """The conv output's (P, Q) for a case with hw, kernel, stride, padding and dilation pairs."""
    return tuple((size + 2 * p - d * (r - 1) - 1) // s + 1
                 for size, p, d, r, s in zip(case.hw, case.padding, case.dilation, case.kernel, case.stride))


def seeded(tag) -> torch.Generator:
    """A CPU generator seeded by ``tag`` (a case, or its id)."""
    return torch.Generator().manual_seed(zlib.crc32(str(tag).encode()))


def rand_act(gen, shape, dtype, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.randn(shape, generator=gen).to(DEVICE, dtype).contiguous(memory_format=fmt)


def rand_vec(gen, n, positive=False):
    v = torch.rand(n, generator=gen) + 0.5 if positive else torch.randn(n, generator=gen)
    return v.to(DEVICE)


def compile_for_sm90(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (which compiles kernel variants for an H100 with the wheel's ptxas) in a process
    without TRITON_INTERPRET: the interpreter runs code the compiler rejects."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
