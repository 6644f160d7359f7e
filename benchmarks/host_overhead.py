"""Host (CPU) time per call of the Triton conv paths, with the conv kernel itself stubbed out.

Where a conv takes 0.06-0.2 ms on the GPU (ResNet-50's later stages), the Python around its launch
(argument checks, grid and workspace sizing, the statistics' finishing ops, the custom op's dispatch)
decides whether the GPU waits for the host. This times that Python alone: ``_conv_kernel`` is replaced by a
stub that launches nothing (triton's own launch path is not included), so it runs on CPU tensors too.
On a CUDA device the tensors are CUDA ones and the small torch ops still launch their kernels; on CPU
the Triton conv takes CPU tensors only under TRITON_INTERPRET=1 (whose 2 configs stand in for the GPU's
10 where the launch sizes its workspace for every config).

    PYTHONPATH=. TRITON_INTERPRET=1 python -m benchmarks.host_overhead      # CPU
    PYTHONPATH=. python -m benchmarks.host_overhead                         # GPU, or CPU behind a stand-in

Prints the median over 7 rounds of 2000 calls, in microseconds per call; on a GPU first with the real
kernels too (their launches included: the host time a small conv costs in all). On CPU without
TRITON_INTERPRET, first with triton's whole launch path instead: the kernels compiled for an H100 (sm_90,
once, into triton's cache) behind the tests' stand-in driver, whose launcher runs nothing; all but the
driver's own launch call. There, ``--resnet50`` adds the host time of a converted ResNet-50's blocks in a
batch-1 inference forward, every conv unit on the Triton conv (its first forward compiles ~100 kernels).

    PYTHONPATH=. python -m benchmarks.host_overhead --resnet50             # CPU: + ResNet-50's blocks

``--inference-blocks`` (CPU) times instead the Python around the convs of a converted ResNet-50's 16 blocks in a
batch-1 inference forward, fp32 and under bf16 autocast, the conv implementation stubbed:

    PYTHONPATH=. python -m benchmarks.host_overhead --inference-blocks

``--train`` (CPU, TRITON_INTERPRET=1) times instead the host side of a training step, forward and backward,
through ResNet-50's 16 blocks at a sixteenth of their widths (the same 53 conv units and the same calls; the
tensors too small for the CPU's own arithmetic to count), every Triton kernel stubbed out, backend "triton",
with eager torch's step on the same blocks beside it, and what each step would launch on a GPU: the torch ops
that compute or copy (each a kernel launch at least) and the Triton kernels:

    PYTHONPATH=. TRITON_INTERPRET=1 python -m benchmarks.host_overhead --train
"""

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import triton

from fusedres.ops import backends, inference, unit_conv
from fusedres.triton import conv, partials


class _NoLaunch:
    """Stands in for the autotuned kernel: indexing by a grid gives a launch that does nothing."""
    best_config = types.SimpleNamespace(kwargs=dict(BLOCK_M=128, USE_TMA=False))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _microseconds(fn, calls: int = 2000, rounds: int = 7) -> float:
    for _ in range(min(calls // 10, 200) or 1):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def _behind_stand_in() -> None:
    """Make triton launch for an H100 with no GPU (tests/triton_conv_helpers.py's stand-in driver): kernels
    compile for sm_90, each config's timing rates it like the others, the launcher runs nothing, and the ops'
    triton backends take CPU tensors."""
    os.environ["TRITON_INTERPRET"] = "0"  # the helpers interpret where there is no GPU unless told otherwise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from triton_conv_helpers import STAND_IN_LAUNCH

    stand_in: dict = {}
    exec(STAND_IN_LAUNCH, stand_in)
    stand_in["time_nothing"](conv._conv_kernel)
    backends.triton_interpreted = lambda: True  # the ops' check: triton backends take CPU tensors here


def _converted_resnet50_blocks(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """A converted torchvision ResNet-50's 16 blocks (52 conv units) in eval mode, in ``dtype``, channels_last,
    and a batch-1 input for them (the stem's output)."""
    import torchvision

    import fusedres

    model = torchvision.models.resnet50().eval().to(dtype, memory_format=torch.channels_last)
    fusedres.convert(model)
    blocks = torch.nn.Sequential(model.layer1, model.layer2, model.layer3, model.layer4)
    return blocks, torch.randn(1, 64, 56, 56, dtype=dtype).to(memory_format=torch.channels_last)


def _resnet50_blocks_ms() -> float:
    """Host ms of a converted torchvision ResNet-50's 16 blocks (52 conv units: folded BN + residual + ReLU in
    one Triton conv each) in an inference forward at batch 1, bf16, channels_last: median of 5 rounds of 5,
    after a forward that compiles and tunes them. Behind the stand-in only; the dispatch's choice is fixed
    to the Triton conv (it measures on a GPU, where the models benchmark times the whole forward)."""
    inference._choose = lambda *args: ("triton", True)
    blocks, x = _converted_resnet50_blocks(torch.bfloat16)
    with torch.no_grad():
        return _microseconds(lambda: blocks(x), calls=5, rounds=5) / 1e3


def _inference_blocks_ms() -> dict[str, float]:
    """Host ms of a converted torchvision ResNet-50's 16 blocks (52 conv units) in an inference forward at batch 1,
    channels_last, on CPU ("auto" runs torch's conv there), with that implementation stubbed: each unit returns
    an output it kept from its first call, so what is timed is the Python around the units' convs (the blocks,
    the folds' checks, the op's checks and casts, autocast's handling), in fp32 and under bf16 autocast (how the
    benchmarks run inference). Median of 7 rounds of 30 forwards."""
    kept: dict = {}
    run_torch = inference._IMPLS["torch"]

    def kept_output(x, weight, bias, residual, conv_args, relu):
        key = (x.shape, x.dtype, weight.shape, tuple(conv_args[0]), residual is None)
        if key not in kept:
            kept[key] = run_torch(x, weight, bias, residual, conv_args, relu)
        return kept[key]

    blocks, x = _converted_resnet50_blocks(torch.float32)
    inference._IMPLS["torch"] = kept_output
    try:
        with torch.no_grad():
            fp32 = _microseconds(lambda: blocks(x), calls=30) / 1e3
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x_bf16 = x.bfloat16()
                autocast = _microseconds(lambda: blocks(x_bf16), calls=30) / 1e3
    finally:
        inference._IMPLS["torch"] = run_torch
    return {"fp32": fp32, "bf16 autocast": autocast}


# aten ops that only make a view, allocate, or call another op to do their work (which then counts itself)
_NO_WORK = frozenset("aten::" + name for name in (
    "view", "view_as", "reshape", "_reshape_alias", "permute", "as_strided", "expand", "unbind", "select", "slice",
    "detach", "alias", "t", "transpose", "unsqueeze", "squeeze", "empty", "empty_strided", "empty_like",
    "new_empty", "new_empty_strided", "to", "contiguous", "result_type", "lift_fresh", "resolve_conj",
    "resolve_neg"))


def _torch_ops_with_work(events) -> int:
    """The outermost aten ops among a profile's ``events`` that compute or copy (themselves or through the ops
    they call): on a GPU, each a kernel launch at least."""
    def works(event) -> bool:
        return event.name.startswith("aten::") and (
            event.name not in _NO_WORK or any(works(child) for child in event.cpu_children))

    return sum(1 for event in events if works(event) and not (
        event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::")))


def _training_step_ms() -> dict[str, tuple[float, float, int, int]]:
    """Host ms of a training step (forward, backward) through ResNet-50's blocks at 1/16 of its widths, batch 2,
    8x8 images, fp32: eager torch and the blocks converted with backend "triton", each Triton kernel's launch
    returning at once (the interpreter's). Lowest decile of 100 steps, after 10: the host's own time, the
    least disturbed by whatever else the machine runs. Then, counted over one more step: the torch ops that
    compute or copy (``_torch_ops_with_work``) and the Triton kernel launches, what the step would launch on a
    GPU (cuDNN's kernels per torch conv and the autograd engine's own gradient sums aside)."""
    import copy

    import torchvision
    import triton.runtime.interpreter

    import fusedres

    interpreted = triton.runtime.interpreter.InterpretedFunction
    triton_launches = [0]

    def no_launch(self, *args, **kwargs):
        triton_launches[0] += 1

    launch, interpreted.run = interpreted.run, no_launch
    try:
        torch.manual_seed(0)
        resnet = torchvision.models.resnet
        blocks, inplanes = [], 4
        for planes, count, stride in ((4, 3, 1), (8, 4, 2), (16, 6, 2), (32, 3, 2)):  # layer1..layer4 / 16
            for index in range(count):
                downsample = None
                if index == 0:
                    downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                                      torch.nn.BatchNorm2d(planes * 4))
                blocks.append(resnet.Bottleneck(inplanes, planes, stride if index == 0 else 1, downsample))
                inplanes = planes * 4
        eager = torch.nn.Sequential(*blocks).to(memory_format=torch.channels_last)
        fused = fusedres.convert(copy.deepcopy(eager), backend="triton").model
        x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
        result = {}
        for name, model in (("eager", eager), ("fused[triton]", fused)):
            forward, backward = [], []
            for step in range(110):
                start = time.perf_counter()
                out = model(x)
                middle = time.perf_counter()
                out.sum().backward()
                if step >= 10:
                    forward.append(middle - start)
                    backward.append(time.perf_counter() - middle)
            triton_launches[0] = 0
            with torch.autograd.profiler.profile(use_kineto=False) as step_profile:
                model(x).sum().backward()
            result[name] = (*(sorted(times)[len(times) // 10] * 1e3 for times in (forward, backward)),
                            _torch_ops_with_work(step_profile.function_events), triton_launches[0])
        return result
    finally:
        interpreted.run = launch


def _arguments():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="a training step's host time (TRITON_INTERPRET=1)")
    mode.add_argument("--inference-blocks", action="store_true",
                      help="the Python around a converted ResNet-50's convs at batch-1 inference (CPU)")
    mode.add_argument("--resnet50", action="store_true",
                      help="also a converted ResNet-50's blocks at batch-1 inference behind the stand-in (CPU)")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.train:
        if not conv._INTERPRET:
            raise SystemExit("--train stubs the kernels in Triton's interpreter: run it with TRITON_INTERPRET=1")
        print(f"host ms of a training step, ResNet-50's 16 blocks at 1/16 width, batch 2, every Triton kernel "
              f"stubbed (cpu, torch {torch.__version__}, triton {triton.__version__}):")
        for name, (forward, backward, torch_ops, triton_launches) in _training_step_ms().items():
            print(f"  {name:14s} forward {forward:6.2f}  backward {backward:6.2f}  step {forward + backward:6.2f}"
                  f"   launches: {torch_ops} torch ops + {triton_launches} Triton kernels")
        return
    if args.inference_blocks:
        print(f"host ms of a converted ResNet-50's 16 blocks, inference at batch 1, conv implementation stubbed "
              f"(cpu, torch {torch.__version__}):")
        for name, ms in _inference_blocks_ms().items():
            print(f"  {name:14s} {ms:6.3f}")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = device == "cuda" or not conv._INTERPRET
    if device == "cpu" and launches:
        _behind_stand_in()
    if args.resnet50 and not (device == "cpu" and launches):
        print("note: --resnet50 times ResNet-50's blocks behind the stand-in driver: on CPU without TRITON_INTERPRET")
    n, c, k, hw = 2, 256, 1024, 14  # ResNet-50's layer3 1x1 expand, at batch 2 (no size matters here)
    x = torch.randn(n, c, hw, hw, dtype=torch.bfloat16, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(k, c, 1, 1, dtype=torch.bfloat16, device=device)
    ones_c = torch.ones(c, device=device)
    bn = (torch.zeros(c, device=device), torch.ones(c, device=device), ones_c, torch.zeros(c, device=device))
    unit = (x, *bn, w, None, [1, 1], [0, 0], [1, 1], 1, True, True)
    # x needing its gradient makes the call record autograd's graph; w does not (a trained weight is packed anew
    # at every call, on CPU a copy whose time would hide the rest)
    unit_grad = (x.detach().requires_grad_(), *unit[1:])
    x_k = torch.randn(n, k, hw, hw, dtype=torch.bfloat16, device=device).to(memory_format=torch.channels_last)
    w_k, bias_k = (torch.randn(*shape, dtype=torch.bfloat16, device=device) for shape in ((k, k, 1, 1), (k,)))
    rows = {
        "conv2d_fused, bare": lambda: conv.conv2d_fused(x, w),
        "conv2d_fused, BN + ReLU prologue": lambda: conv.conv2d_fused(x, w, in_scale=ones_c, in_shift=ones_c),
        "conv2d_fused, prologue + statistics": lambda: conv.conv2d_fused(
            x, w, in_scale=ones_c, in_shift=ones_c, compute_stats=True),
        # the ops as the package calls them (eager.entry: the body, without the dispatcher), and the op itself
        "bn_act_conv2d (triton)": lambda: unit_conv.bn_act_conv2d(*unit, "triton"),
        "conv2d_stats (triton)": lambda: unit_conv.conv2d_stats(*unit, "triton", "", 0),
        "conv2d_stats (triton), with autograd": lambda: unit_conv.conv2d_stats(*unit_grad, "triton", "", 0),
        "op conv2d_stats, with autograd": lambda: torch.ops.fusedres.conv2d_stats(*unit_grad, "triton", "", 0),
        # an inference unit (folded BN as a bias, + residual, ReLU) as a converted block runs it
        "conv_bias_act, residual (triton)": lambda: inference.conv_bias_act(x_k, w_k, bias_k, x_k, backend="triton"),
        # the same unit replayed in a block's chain: its launch checked and planned once (conv2d_fused_launcher)
        "the same, replayed (launcher)": lambda: launch_k(x_k, x_k),
    }
    launch_k = conv.conv2d_fused_launcher(x_k, w_k, out_shift=bias_k.float(), residual=x_k, out_relu=True)
    if launches:  # the kernels (tuned on the first call): the host path with triton's launches
        print(f"host us per call, real kernels (cuda, triton {triton.__version__}; the GPU's part of a call is "
              "a few us at this size):" if device == "cuda" else
              f"host us per call, sm_90 kernels behind a stand-in driver that launches nothing (cpu, triton "
              f"{triton.__version__}):")
        for name, fn in rows.items():
            fn()
            print(f"  {name:40s} {_microseconds(fn):7.1f}")
        if device == "cpu" and args.resnet50:
            print(f"host ms, ResNet-50's 16 blocks, inference forward at batch 1: {_resnet50_blocks_ms():.2f}")
    conv._conv_kernel = partials._finish_partials_kernel = _NoLaunch()
    if not launches:  # in the interpreter, the other Triton kernels (bn_act's) would run too: every kernel stubbed
        triton.runtime.interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    print(f"host us per call, conv kernels stubbed ({device}, torch {torch.__version__}):")
    for name, fn in rows.items():
        print(f"  {name:40s} {_microseconds(fn):7.1f}")


if __name__ == "__main__":
    main()
