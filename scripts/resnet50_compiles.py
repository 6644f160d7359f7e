"""The Triton compiles a converted ResNet-50 needs, counted or built for an H100/H200, without a GPU.

    python scripts/resnet50_compiles.py [--mode train,infer,convs] [--batch 256,32]        # count them
    python scripts/resnet50_compiles.py --cache /abs/dir --mode train,convs --batch 256    # build them
    python scripts/resnet50_compiles.py --cache /abs/dir --report ptxas.json ...           # and audit them

Every distinct conv of torchvision's ResNet-50 (``--model``: another ResNet the benchmarks know) at 224 px goes
through the Triton convs' host path behind the H100 stand-in driver of the kernel tests
(tests/triton_conv_helpers.py; sm_90, 132 SMs), each mode at each batch, bf16 channels_last, as the package and
the benchmarks launch it:

- ``train``: the converted model's training step (``benchmarks.convs.package_prologues``: each conv with its
  BatchNorm + ReLU prologue or none, the stem's none): the forward with statistics, the input gradient of
  convs with a prologue, the weight gradient.
- ``infer``: the eval model's folded-BatchNorm convs (``fusedres.ops.inference``), the stem's too: bias, the
  residual and ReLU at a block's last conv, ReLU elsewhere but after the downsample conv, which has no bias
  either (its block's last conv adds it, ``blocks._FusedPostActBlock._inference_forward``).
- ``convs``: what the benchmarks' convs level adds (every conv, the stem too): the bare conv, the BN + ReLU
  prologue alone, the prologue with statistics.

Without ``--cache`` nothing is built: the autotuner prunes each new key's configs and a compile only records
itself; it prints the compiles per kernel and the autotuning keys that needed at least one (on the GPU each
such key waits for its configs' compiles, about the slowest of them, so they set a first step's cost).

With ``--cache DIR`` (an absolute path) the compiles are real, for sm_90 with this triton's ptxas, and land in
the Triton cache DIR (binaries and metadata only). A process on the GPU machine with the same triton (the same
wheel: its key hashes libtriton) and ``TRITON_CACHE_DIR`` at the same absolute path (the cache's records name
their files by it) then loads them instead of compiling: ``scripts/device_prep.sh`` builds one with the GPU
image's triton, ``scripts/gpu_check.sh`` uses it and reports how many kernels it still had to compile.

With ``--ahead`` too, the launches run inside a compile-ahead pass (``fusedres.precompile``'s): every key's
configs are compiled at once on one pool, instead of each key's while the launch waits; the summary line says
how long the compiles took either way.

With ``--report FILE`` too, every kernel compiled now is audited from ptxas's own report of it: FILE gets one
record per compile (the kernel, its constexprs, warps, stages and register cap, registers, spilled bytes,
ptxas's warnings, shared memory), and the script prints the compiles that spill registers or whose wgmma ptxas
serialised (warning C7515), grouped by kernel and config: what would slow a kernel on the GPU, found without one.
Kernels the cache already held are not compiled, so not audited: build into an empty folder to audit them all.
"""

import argparse
import collections
import contextlib
import io
import json
import os
import sys
import threading
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="train", help="comma-separated train, infer, convs (default: train)")
    parser.add_argument("--batch", default="256", help="comma-separated batch sizes (default: 256)")
    parser.add_argument("--cache", type=Path, help="build the kernels into this Triton cache folder (absolute)")
    parser.add_argument("--report", type=Path, help="with --cache: write ptxas's findings on every kernel "
                                                    "compiled now to this JSON file and print the spills and "
                                                    "serialised wgmma")
    parser.add_argument("--ahead", action="store_true",
                        help="with --cache: compile every key's configs at once, as fusedres.precompile does, "
                             "instead of key after key as a first step does")
    parser.add_argument("--model", default="resnet50",
                        help="another torchvision or timm ResNet of the benchmarks (e.g. resnext50_32x4d) instead "
                             "of resnet50")
    parser.add_argument("--convs", help="comma-separated module names: only the convs of these shapes "
                                        "(e.g. layer1.0.conv1; default: every conv)")
    args = parser.parse_args()
    args.mode = args.mode.split(",")
    args.batch = [int(b) for b in args.batch.split(",")]
    args.convs = None if args.convs is None else set(args.convs.split(","))
    if not set(args.mode) <= set(MODES):
        parser.error(f"--mode takes {', '.join(MODES)}, got {','.join(args.mode)}")
    if (args.report is not None or args.ahead) and args.cache is None:
        parser.error("--report and --ahead need --cache: they are about real compiles")
    if args.cache is not None and not args.cache.is_absolute():
        parser.error("--cache must be an absolute path: the GPU machine finds the kernels at the same one")
    return args


MODES = ("train", "infer", "convs")
ARGS = _parse() if __name__ == "__main__" else None
os.environ["TRITON_INTERPRET"] = ""  # compile for the stand-in H100; the test helpers would set it to 1 on CPU
if ARGS is not None and ARGS.cache is not None:  # before triton reads its settings
    os.environ["TRITON_CACHE_DIR"] = str(ARGS.cache)
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
else:
    os.environ["FUSEDRES_COMPILE_THREADS"] = "1"  # no thread pool: every compile goes through the recorder
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import triton.compiler  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton_conv_helpers import STAND_IN_LAUNCH, ptxas_findings  # noqa: E402

STAND_IN: dict = {}
exec(STAND_IN_LAUNCH, STAND_IN)  # the stand-in driver from here on; defines compile_without_launching

from benchmarks.convs import conv_specs, package_prologues  # noqa: E402
from fusedres.triton import autotuning, conv, conv_args, conv_dgrad, conv_wgrad, partials  # noqa: E402

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


def run_convs(model: str, mode: str, batch: int, only=None) -> None:
    """Launch (behind the stand-in driver: compile only) every conv kernel ``mode`` runs at ``batch`` in
    ``model`` (a benchmarks model name), on the conv shapes of the modules ``only`` names if given. A shape
    several convs share runs once per way the package runs them (layer1.0's conv3 and downsample conv: one
    with a prologue, one without)."""
    prologues = package_prologues(model)
    like = dict(dtype=torch.bfloat16)
    for spec in conv_specs([model], 224):
        modules = [use.split(":")[1] for use in spec.uses]
        if only is not None and not only & set(modules):
            continue
        fused = [m for m in modules if m in prologues]  # the blocks' convs and the stem (conv1)
        x = torch.empty(batch, *spec.in_shape, **like).to(memory_format=torch.channels_last)
        weight = torch.empty(spec.weight_shape, **like)
        grad = torch.empty(batch, *spec.out_shape, **like).to(memory_format=torch.channels_last)
        c, k = torch.ones(spec.in_shape[0]), torch.ones(spec.out_shape[0])
        bn_relu = dict(in_scale=c, in_shift=c, in_relu=True)
        if mode == "convs":  # the convs level's Triton contenders: bare, prologue[triton], triton+stats
            conv.conv2d_fused(x, weight, **spec.args)
            conv.conv2d_fused(x, weight, **spec.args, **bn_relu)
            conv.conv2d_fused(x, weight, **spec.args, **bn_relu, compute_stats=True)
        elif mode == "train":
            for kind in sorted({prologues[m] for m in fused}):
                prologue = {} if kind == "none" else dict(in_scale=c, in_shift=c, in_relu=kind == "bn+relu")
                conv.conv2d_fused(x, weight, **spec.args, **prologue, compute_stats=True)
                if prologue:
                    conv_dgrad.conv2d_input_grad(grad, weight, x, **spec.args, **prologue, mean=c)
                conv_wgrad.conv2d_weight_grad(x, grad, spec.weight_shape, **spec.args, **prologue)
        else:  # a block's last conv adds the residual; every conv but the downsample has a bias and ends in ReLU
            for last, downsample in sorted({(m.endswith("conv3"), m.endswith("downsample.0")) for m in fused}):
                conv.conv2d_fused(x, weight, **spec.args, in_relu=False, out_shift=None if downsample else k,
                                  residual=grad if last else None, out_relu=not downsample)


class PerThreadStdout(io.TextIOBase):
    """sys.stdout's stand-in: what a thread prints inside ``capture()`` goes to that thread's buffer, the rest
    to the real stdout (the compiles run on a thread pool, and triton prints each ptxas log)."""

    def __init__(self, real):
        self.real, self.local = real, threading.local()

    def write(self, text: str) -> int:
        buffer = getattr(self.local, "buffer", None)
        return (self.real if buffer is None else buffer).write(text)

    def flush(self) -> None:
        self.real.flush()

    @contextlib.contextmanager
    def capture(self):
        self.local.buffer = io.StringIO()
        try:
            yield self.local.buffer
        finally:
            self.local.buffer = None


def audit_compiles(records: list) -> None:
    """From here on every Triton compile appends a record to ``records``: the kernel, its constexprs (the
    config's blocks, the variant's flags, the ints the launcher made constants), warps, stages, shared memory,
    ``ptxas_findings`` of the log triton prints when asked (TRITON_DUMP_PTXAS_LOG), its wall-clock seconds,
    and the autotuning key being tuned (the number of keys met so far; without --ahead a key's compiles all
    run while it is tuned). A compile the cache served runs no ptxas and records nothing."""
    triton.knobs.nvidia.dump_ptxas_log = True
    stdout = sys.stdout = PerThreadStdout(sys.stdout)
    real_compile = triton.compiler.compile  # what JITFunction imports when it first compiles

    def compile(src, *args, **kwargs):
        key, start = sum(kind == "key" for kind, _ in events), time.perf_counter()
        with stdout.capture() as log:
            kernel = real_compile(src, *args, **kwargs)
        seconds = time.perf_counter() - start
        if "ptxas" in log.getvalue():
            options = kwargs["options"]
            constexprs = {src.fn.arg_names[index]: value for (index,), value in sorted(src.constants.items())
                          if isinstance(value, (bool, int, float, str))}
            records.append(dict(kernel=src.name, constexprs=constexprs, warps=options["num_warps"],
                                stages=options["num_stages"], maxnreg=options.get("maxnreg"),
                                shared=kernel.metadata.shared,
                                seconds=seconds, key=key, **ptxas_findings(log.getvalue())))
        return kernel
    triton.compiler.compile = compile


TUNED = {name for kernel in (conv._conv_kernel, conv_wgrad._wgrad_kernel) for config in kernel.configs
         for name in config.kwargs}


def config_of(record: dict) -> str:
    """A record's config (its tuned constexprs, warps, stages, register cap) as the autotuner describes configs."""
    tuned = {k: v for k, v in record["constexprs"].items() if k in TUNED}
    return autotuning.describe(triton.Config(tuned, num_warps=record["warps"], num_stages=record["stages"],
                                             maxnreg=record.get("maxnreg")))


def print_audit(records: list) -> None:
    """Per kernel: its compiles, the most registers one used, and the configs of those that spill or whose
    wgmma ptxas serialised (C7515), with how many compiles each and ptxas's reason."""
    for kernel in sorted({r["kernel"] for r in records}):
        mine = [r for r in records if r["kernel"] == kernel]
        print(f"  {kernel}: {len(mine)} compiles audited, up to {max(r['registers'] for r in mine)} registers, "
              f"{sum(r['spill_bytes'] > 0 for r in mine)} spill, {sum('C7515' in r['warnings'] for r in mine)} "
              "with serialised wgmma")
        flagged = collections.defaultdict(list)
        for r in mine:
            if r["spill_bytes"] > 0:
                flagged[config_of(r), "spills"].append(r["spill_bytes"])
            if "C7515" in r["warnings"]:
                flagged[config_of(r), "wgmma serialised: " + r["warnings"]["C7515"]].append(0)
        for (config, finding), sizes in sorted(flagged.items()):
            detail = f" up to {max(sizes)} bytes" if finding == "spills" else ""
            print(f"    {config}: {finding}{detail} ({len(sizes)} compiles)")


def cached_kernels(cache: Path) -> int:
    """The compiled kernels in a Triton cache folder (one metadata record each)."""
    return sum(1 for _ in cache.glob("*/__grp__*.json")) if cache.is_dir() else 0


def main() -> None:
    args = ARGS
    if args.cache is None:
        JITFunction._do_compile = record_compile
    before = cached_kernels(args.cache) if args.cache else 0
    records: list = []
    if args.report is not None:
        audit_compiles(records)
    STAND_IN["compile_without_launching"](conv._conv_kernel, partials._finish_partials_kernel,
                                          conv_wgrad._wgrad_kernel, conv_args._space_to_depth_kernel)
    record_keys(conv._conv_kernel)
    record_keys(conv_wgrad._wgrad_kernel)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.ahead:
            stack.enter_context(stack.enter_context(autotuning.compile_ahead()).compile_only())
        for mode in args.mode:
            for batch in args.batch:
                run_convs(args.model, mode, batch, args.convs)
    seconds = time.perf_counter() - start
    print(f"{args.model} {','.join(args.mode)}, batch {','.join(map(str, args.batch))}, bf16 channels_last, "
          f"{len(conv._conv_kernel.configs)} conv configs:")
    if args.cache is not None:
        after = cached_kernels(args.cache)
        print(f"  {args.cache}: {after} kernels, {after - before} of them compiled now in {seconds:.0f} s "
              f"({'all keys at once' if args.ahead else 'key after key'}, {autotuning.compile_threads()} threads)")
        if args.report is not None:
            args.report.write_text(json.dumps(records, indent=1))
            print(f"  ptxas's report on them ({args.report}):")
            print_audit(records)
        return
    compiles = collections.Counter(kernel for kind, kernel in events if kind == "compile")
    keys = collections.Counter()
    starts = [i for i, (kind, _) in enumerate(events) if kind == "key"] + [len(events)]
    for start, end in zip(starts, starts[1:]):
        kernel = events[start][1]
        keys[kernel, any(e == ("compile", kernel) for e in events[start + 1:end])] += 1
    for kernel, n in compiles.items():
        print(f"  {kernel}: {n} compiles")
    for (kernel, compiled), n in sorted(keys.items()):
        print(f"  {kernel}: {n} autotuning keys {'with' if compiled else 'without'} a compile")


if __name__ == "__main__":
    main()
