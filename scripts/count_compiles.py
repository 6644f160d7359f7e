"""How many Triton compiles a converted ResNet-50's first training step (or inference) needs, without a GPU.

    python scripts/count_compiles.py [--mode train|infer] [--batch 256]

Every distinct conv of torchvision's ResNet-50 at 224 px, as the converted model runs it (its BatchNorm +
ReLU prologue or none, ``benchmarks.convs.package_prologues``; the stem stays torch's), goes through the
Triton convs' host path behind the H100 stand-in driver of the kernel tests (tests/triton_conv_helpers.py):
the autotuner prunes and "compiles" each new key's configs, but a compile only records what it would build.
Training: the forward with statistics, the input gradient of convs with a prologue, the weight gradient.
Inference: the conv with folded BatchNorm, residual and ReLU where the block ends. Prints the compiles per
kernel and the autotuning keys that needed at least one: on the GPU each such key waits for its configs'
compiles (in parallel, about the slowest one), so they set the first step's cost.
"""

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = ""  # compile for the stand-in H100; the test helpers would set it to 1 on CPU
os.environ["FUSEDRES_COMPILE_THREADS"] = "1"  # no thread pool: every compile goes through the recorder
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton_conv_helpers import STAND_IN_LAUNCH  # noqa: E402

STAND_IN: dict = {}
exec(STAND_IN_LAUNCH, STAND_IN)  # the stand-in driver from here on; defines compile_without_launching

from benchmarks.convs import conv_specs, package_prologues  # noqa: E402
from fusedres.triton import conv, conv_dgrad, conv_wgrad  # noqa: E402

events: list[tuple[str, str]] = []  # ("key", kernel) at each new autotuning key, ("compile", kernel) per compile


def record_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    """JITFunction._do_compile's stand-in: notes the compile and caches a placeholder for its key."""
    events.append(("compile", self.__name__))
    cache = self.device_caches[device][0]
    cache[key] = object()
    return cache[key]


def record_keys(kernel):
    prune = kernel.early_config_prune

    def prune_and_note(*args, **kwargs):
        events.append(("key", kernel.base_fn.__name__))
        return prune(*args, **kwargs)
    kernel.early_config_prune = prune_and_note


def run_convs(mode: str, batch: int) -> None:
    prologues = package_prologues("resnet50")
    like = dict(dtype=torch.bfloat16)
    for spec in conv_specs(["resnet50"], 224):
        module = spec.uses[0].split(":")[1]
        if module not in prologues:  # the stem: torch's conv
            continue
        x = torch.empty(batch, *spec.in_shape, **like).to(memory_format=torch.channels_last)
        weight = torch.empty(spec.weight_shape, **like)
        grad = torch.empty(batch, *spec.out_shape, **like).to(memory_format=torch.channels_last)
        c, k = torch.ones(spec.in_shape[0]), torch.ones(spec.out_shape[0])
        relu = prologues[module] == "bn+relu"
        prologue = {} if prologues[module] == "none" else dict(in_scale=c, in_shift=c, in_relu=relu)
        if mode == "train":
            conv.conv2d_fused(x, weight, **spec.args, **prologue, compute_stats=True, stats_shift=k)
            if prologue:
                conv_dgrad.conv2d_input_grad(grad, weight, x, **spec.args, **prologue, mean=c)
            conv_wgrad.conv2d_weight_grad(x, grad, spec.weight_shape, **spec.args, **prologue)
        else:  # a block's last conv (and its downsample) adds the residual; the others end in ReLU
            last = module.endswith("conv3") or "downsample" in module
            conv.conv2d_fused(x, weight, **spec.args, out_scale=k, out_shift=k, residual=grad if last else None,
                              out_relu=not module.endswith("downsample.0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    JITFunction._do_compile = record_compile
    STAND_IN["compile_without_launching"](conv._conv_kernel, conv._finish_stats_kernel, conv_wgrad._wgrad_kernel)
    record_keys(conv._conv_kernel)
    record_keys(conv_wgrad._wgrad_kernel)
    run_convs(args.mode, args.batch)
    compiles = collections.Counter(kernel for kind, kernel in events if kind == "compile")
    keys = collections.Counter()
    starts = [i for i, (kind, _) in enumerate(events) if kind == "key"] + [len(events)]
    for start, end in zip(starts, starts[1:]):
        kernel = events[start][1]
        keys[kernel, any(e == ("compile", kernel) for e in events[start + 1:end])] += 1
    print(f"ResNet-50 {args.mode}, batch {args.batch}, bf16 channels_last, {len(conv._CONFIGS)} conv configs:")
    for kernel, n in compiles.items():
        print(f"  {kernel}: {n} compiles")
    for (kernel, compiled), n in sorted(keys.items()):
        print(f"  {kernel}: {n} autotuning keys {'with' if compiled else 'without'} a compile")


if __name__ == "__main__":
    main()
