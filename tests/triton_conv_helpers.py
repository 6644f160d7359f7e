"""Shared by the Triton conv kernel tests (test_triton_conv.py, test_triton_conv_wgrad.py): dtypes and
tolerances, seeded random tensors, conv output sizes, and the sm_90 compiles (a kernel compiles; what
the compiled kernel is made of at a launch-like specialisation).

Without CUDA the kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET is set here
(conftest does too), before anything imports triton.
"""

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# Half an ulp at the largest magnitude (relative spacing 2**-23, 2**-10, 2**-7). Under the interpreter
# bf16 gets two whole ulps: it rounds fp32 -> bf16 by truncation (GPUs round to nearest), both the
# output and the prologue's result, which biases every input of the dot towards zero.
ATOL = {F32: 1e-6, F16: 2.0**-11, BF16: 2.0**-8 if DEVICE == "cuda" else 2.0**-6}


def conv_input(x, kw):
    """What the conv is fed: the prologue in fp64, rounded to x's dtype."""
    if kw.get("in_scale") is None:
        return x
    v = x.double() * kw["in_scale"].double()[:, None, None] + kw["in_shift"].double()[:, None, None]
    return (v.relu() if kw.get("in_relu", True) else v).to(x.dtype)


def tf32_allowance(dtype, magnitude):
    """What TF32 may add to the error of an fp32 result of the Triton kernels' dot on a GPU, where torch's
    conv flags allow TF32 (elsewhere the kernel refuses fp32): 0 for other dtypes and under the interpreter
    (an exact fp32 dot). TF32 keeps 10 of fp32's 23 mantissa bits, so each product is off by at most about
    2**-9 of its size; ``magnitude``: the sum of |products| behind the result (a float or a tensor)."""
    from fusedres.ops.backends import conv_allows_tf32  # on use: importing fusedres imports triton

    if dtype != F32 or DEVICE != "cuda" or not conv_allows_tf32():
        return 0.0 * magnitude
    return 2.0**-8 * magnitude


def pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def out_hw(case) -> tuple:
    """The conv output's (P, Q) for a case with hw, kernel, stride, padding and dilation pairs."""
    return tuple((size + 2 * p - d * (r - 1) - 1) // s + 1
                 for size, p, d, r, s in zip(case.hw, case.padding, case.dilation, case.kernel, case.stride))


def geometry_id(case) -> str:
    """A test id's conv part: channels, spatial size, kernel, stride, padding (dilation, groups when set)."""
    (h, w), (r, s), (sh, sw), (ph, pw), (dh, dw) = case.hw, case.kernel, case.stride, case.padding, case.dilation
    return (f"c{case.c}k{case.k}-{h}x{w}-r{r}x{s}-s{sh}{sw}-p{ph}{pw}" + (f"-d{dh}{dw}" if (dh, dw) != (1, 1) else "")
            + (f"-g{case.groups}" if case.groups > 1 else ""))


def seeded(tag) -> torch.Generator:
    """A CPU generator seeded by ``tag`` (a case, or its id)."""
    return torch.Generator().manual_seed(zlib.crc32(str(tag).encode()))


def rand_act(gen, shape, dtype, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.randn(shape, generator=gen).to(DEVICE, dtype).contiguous(memory_format=fmt)


def rand_vec(gen, n, positive=False):
    v = torch.rand(n, generator=gen) + 0.5 if positive else torch.randn(n, generator=gen)
    return v.to(DEVICE)


def compile_for_sm90(script: str, *args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` as its sys.argv[1:] (it compiles kernel variants for an H100 with the
    wheel's ptxas) in a process without TRITON_INTERPRET (the interpreter runs code the compiler rejects),
    ``env`` added to this one's environment."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)


def run_behind_stand_in(script: str, cache: Path, *args: str) -> dict:
    """``compile_for_sm90(script, *args)`` with two compile threads (even on one core) and the Triton cache in
    ``cache`` (compiles for real: a cached kernel would load at once); the JSON its last line prints."""
    env = dict(FUSEDRES_COMPILE_THREADS="2", TRITON_CACHE_DIR=str(cache))
    done = compile_for_sm90(script, *args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# A ResNet-50 layer1 3x3 conv (64->64, 56x56, batch 256) as launched: the kernels' geometry arguments, and
# the (n, c, h, w) strides of its channels_last input and output (the same: C = K, H = P, W = Q)
LAYER1_3X3 = dict(N=256, C=64, H=56, W=56, K=64, P=56, Q=56, M=256 * 56 * 56, Cg=64, Kg=64,
                  SH=1, SW=1, PH=1, PW=1, DH=1, DW=1)
LAYER1_3X3_CHANNELS_LAST_STRIDES = (56 * 56 * 64, 1, 56 * 64, 64)
# ResNet-50's layer2.0.conv2 (128->128 3x3/2, 56x56 -> 28x28, batch 256), its input's and output's strides
LAYER2_3X3_S2 = dict(N=256, C=128, H=56, W=56, K=128, P=28, Q=28, M=256 * 28 * 28, Cg=128, Kg=128,
                     SH=2, SW=2, PH=1, PW=1, DH=1, DW=1)
LAYER2_3X3_S2_CHANNELS_LAST_STRIDES = ((56 * 56 * 128, 1, 56 * 128, 128), (28 * 28 * 128, 1, 28 * 128, 128))
# ResNet-50's layer1.0.conv3 (64->256 1x1, 56x56, batch 256) as the Triton conv launches it on channels_last
# tensors: a GEMM over the 802816 pixels, each an image of 1x1 (conv_plan._gemm_view), and its x's and out's strides
LAYER1_1X1_AS_GEMM = dict(N=256 * 56 * 56, C=64, H=1, W=1, K=256, P=1, Q=1, M=256 * 56 * 56, Cg=64, Kg=256,
                          SH=1, SW=1, PH=0, PW=0, DH=1, DW=1)
LAYER1_1X1_AS_GEMM_STRIDES = ((64, 1, 64, 64), (256, 1, 256, 256))


def named_strides(prefix: str, strides) -> dict:
    """{"<prefix>n": .., "<prefix>c" or "<prefix>k": .., "<prefix>h" or "p": .., "<prefix>w" or "q": ..} from
    4 strides, for the kernels' stride arguments (x: stride_x{n,c,h,w}; outputs: stride_?{n,k,p,q})."""
    dims = "nchw" if prefix == "stride_x" else "nkpq"
    return {prefix + d: v for d, v in zip(dims, strides)}


# A script's opening for ``compile_for_sm90``: triton's launch path for an H100 with no GPU. The kernels
# handed to compile_without_launching compile exactly as at a launch (the launcher's specialisation of
# the arguments included) and never run (a compiled kernel launched directly, as the autotuner's relaunches
# do, runs a launcher that does nothing); the autotuner's timing calls once and rates every config alike;
# CPU tensors pass the Triton convs' device check. Outputs are left unwritten.
STAND_IN_LAUNCH = """
import types
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from fusedres.triton import conv, conv_args, conv_configs, conv_dgrad, conv_wgrad, partials


class StandInH100:  # what JITFunction.run asks the active driver before it compiles
    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    class launcher_cls:  # the launcher a compiled kernel makes when first launched: one that runs nothing
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args):
            pass

    utils = types.SimpleNamespace(  # what a compiled kernel asks when first launched: an H100's limits
        load_binary=lambda name, kernel, shared, device: (None, 0, 0, 0, 1024),
        get_device_properties=lambda device: dict(max_shared_mem=232448, multiprocessor_count=132))


driver.set_active(StandInH100())
conv._limit = conv_args._limit = conv_dgrad._limit = conv_wgrad._limit = lambda *args: None
torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)
torch.cuda.get_device_capability = lambda device=None: (9, 0)


def time_nothing(*tuners):  # autotuned kernels: their timing calls a config once and rates every config alike
    def do_bench(call, quantiles):
        call()
        return [1.0] * 3

    for tuner in tuners:
        tuner.do_bench = do_bench


def compile_without_launching(*kernels):  # autotuned kernels, or plain jit functions
    for kernel in kernels:
        jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel

        def run(*args, grid, warmup, real_run=jit_fn.run, **kwargs):
            built = real_run(*args, grid=grid, warmup=True, **kwargs)
            if not warmup and isinstance(built, triton.FutureKernel):
                built.result()  # a failed compile raises here, as the launch's first use of it would
            return built

        jit_fn.run = run
        if jit_fn is not kernel:
            time_nothing(kernel)
"""

# After STAND_IN_LAUNCH: every compile of the three conv kernels is noted in ``compiles`` ({kernel, thread}), and
# their launches compile without running
RECORD_COMPILES = """
import json, threading
import triton.compiler

compiles = []
real_compile = triton.compiler.compile


def compile(src, *args, **kwargs):  # the one JITFunction calls
    compiles.append(dict(kernel=src.name, thread=threading.current_thread().name))
    return real_compile(src, *args, **kwargs)


triton.compiler.compile = compile
compile_without_launching(conv._conv_kernel, partials._finish_partials_kernel, conv_wgrad._wgrad_kernel)
"""

_LAUNCH_LIKE_SCRIPT = """
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
module = importlib.import_module(spec["module"])
autotuned = getattr(module, spec["kernel"])
fn = autotuned.fn
config = next(c for c in autotuned.configs  # a register cap only where asked for (maxnreg)
              if spec["config"].items() <= c.all_kwargs().items() and c.maxnreg == spec["config"].get("maxnreg"))
ints = spec["ints"]
constexprs = {p.name for p in fn.params if p.is_constexpr}  # ints the kernel takes as constants (a stride)
found = {}


def reduction_loop(lines):  # the innermost loop around the first wgmma: from its label to the branch back
    first = next(i for i, line in enumerate(lines) if "wgmma.mma_async" in line)
    for head in reversed(range(first)):
        label = re.match(r"(\\$L__BB\\w+):", lines[head])
        if label is None:
            continue
        for back in range(first, len(lines)):
            if re.search(r"\\bbra(\\.uni)?\\s+" + re.escape(label.group(1)) + ";", lines[back]):
                return lines[head:back]
    return []


for name, flags in spec["variants"].items():
    consts = dict(spec["consts"], **flags, **config.kwargs,
                  **{k: v for k, v in ints.items() if v == 1 or k in constexprs})
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
            continue
        pointer = arg.endswith("_ptr")
        sig[arg] = ("*bf16" if arg in spec["bf16_pointers"] else "*fp32") if pointer else "i32"
        if pointer or ints[arg] % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                         **({"maxnreg": config.maxnreg} if config.maxnreg else {})))
    ptx = kernel.asm["ptx"]
    step = reduction_loop(ptx.splitlines())
    with tempfile.TemporaryDirectory() as tmp:  # ptxas's report: warnings and spills
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(ptx)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        report = subprocess.run([ptxas, "-v", "-arch=sm_90a", os.path.join(tmp, "k.ptx"), "-o",
                                 os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    found[name] = dict(wgmma=ptx.count("wgmma.mma_async"),
                       cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                       cp_async_l1_8_bytes=len(re.findall(r"cp\\.async\\.ca\\.shared\\.global[^;]*, 0x8[,;]", ptx)),
                       tma=ptx.count("cp.async.bulk.tensor"), tma_2d=ptx.count("cp.async.bulk.tensor.2d"),
                       wgmma_a_in_registers=len(re.findall(r"wgmma\\.mma_async[^;]*\\}, \\{", ptx)),
                       ld_global=ptx.count("ld.global"), st_shared=ptx.count("st.shared"),
                       ld_global_after_st_global=ptx.partition("st.global")[2].count("ld.global"),
                       max_nan=ptx.count("max.NaN.f32"), shuffles=ptx.count("shfl.sync"),
                       step_divisions=sum(bool(re.search(r"\\b(div|rem)\\.[su](32|64)\\b", line))
                                          for line in step),
                       shared=kernel.metadata.shared, ptxas_log=report)
print(json.dumps(dict(variants=found, stages=config.num_stages, block=config.kwargs)))
"""


def compile_launch_like_for_sm90(module: str, kernel: str, config: dict, ints: dict, consts: dict,
                                 variants: dict, bf16_pointers: tuple) -> dict:
    """Compile ``module.kernel`` with the first of its GPU configs whose kwargs and options include ``config``
    (a register cap only with "maxnreg" in it) for an
    H100 (the wheel's ptxas, no GPU), its int arguments (``ints``: their values at a real launch)
    specialised as triton's launcher specialises them: ints equal to 1 (and those the kernel declares
    constexpr) become constants, pointers and multiples of 16 get a divisibility-16 hint. Per variant
    (constexpr flags added to ``consts``), what the PTX holds: wgmma (Hopper's warpgroup MMA;
    wgmma_a_in_registers: those whose A operand is in registers, not read from shared memory), cp_async
    (asynchronous copies into shared memory; cp_async_l1_8_bytes: those of 8 bytes cached in L1,
    cp.async.ca), tma (tensor copies; tma_2d: those of 2-D tiles), ld_global, st_shared, max_nan (fp32
    NaN-propagating maximum) and shuffles (shfl.sync) instruction counts, ld_global_after_st_global (global
    loads after the first global store, in the PTX's order), step_divisions (integer divisions and remainders in
    the reduction loop, the one around the first wgmma), the shared memory in bytes, and what ptxas reports
    (``ptxas_findings``: registers, spill_bytes, warnings, C7515 being a serialised wgmma); with the config's
    stages and block sizes."""
    spec = dict(module=module, kernel=kernel, config=config, ints=ints, consts=consts, variants=variants,
                bf16_pointers=list(bf16_pointers))
    done = compile_for_sm90(_LAUNCH_LIKE_SCRIPT, json.dumps(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for variant in found["variants"].values():
        variant.update(ptxas_findings(variant.pop("ptxas_log")))
    return found


def ptxas_findings(log: str) -> dict:
    """What ``ptxas -v`` reports of one kernel (its log): the registers a thread uses, the bytes it spills
    (stores) to local memory, and its warnings as {code: the text after the code}, e.g. C7515: wgmma
    serialised (each warpgroup MMA waits for the last), with ptxas's reason."""
    registers = re.findall(r"Used (\d+) registers", log)
    return dict(registers=max(map(int, registers), default=0),
                spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log)),
                warnings=dict(sorted(re.findall(r"\((C\d+)\) ([^\n]*)", log))))


def assert_pipelined(found: dict, bare: str, fused: str, tile_bytes: int) -> None:
    """``compile_launch_like_for_sm90``'s findings show the fast case's kernel: every variant on wgmma fed by
    asynchronous copies, the ``bare`` one with no synchronous global load and a buffer of ``tile_bytes``
    (one step's operand tiles) per stage, the ``fused`` one (prologue) with at least double buffering."""
    for variant in found["variants"].values():
        assert variant["wgmma"] > 0 and variant["cp_async"] > 0, found
    assert found["variants"][bare]["ld_global"] == 0, found
    assert found["variants"][bare]["shared"] >= found["stages"] * tile_bytes, found
    assert found["variants"][fused]["shared"] >= 2 * tile_bytes, found
