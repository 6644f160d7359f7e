"""The one harness every level shares: contenders, agreement check, timing, memory, ceilings, output.

A level (``cases.py``, ``convs.py``) only says what to set up: a ``Case`` whose ``prepare()`` returns a
``Setup`` with the inputs, the eager target, the fused target per backend, and
``step(target, inputs, autocast)``, one timed iteration returning named tensors (outputs and
gradients). From that the harness derives every contender (eager, fused per backend, the "auto" fused
target replayed from a CUDA graph in inference, torch.compile of the eager target), runs them on the
same weights and inputs, checks each against one upcast run of eager (``Reference``), then times it
and measures its memory. A level may name its
own contenders instead (``Case.contenders``, the first one the anchor in eager's role; the convs
level), built by ``Setup.fused(name)`` and checked against ``Setup.reference``'s outputs by name.

Timing (``timing.py``): CUDA events around each iteration, the L2 cache flushed before each one, after warm-up;
``time.perf_counter`` on CPU. Reported: median and p20/p80 of the per-iteration times, the host's median time
in a call (``host ms``), and apart the wall-clock time of the first call (synchronised; it pays one-off costs:
compilation, autotuning, cuDNN's algorithm search). A level comparing kernels (``Case.queue_ahead``: convs)
has the host's launches queued ahead of the GPU, so its times are the GPU's work alone. Peak memory
(CUDA only): ``max_memory_allocated`` over the timed iterations, counted above what was allocated before
the contender was built (inputs, the pristine weights and the eager reference are not charged to it; its
own weight copy, gradients, optimizer state and activations are).
"""

import contextlib
import gc
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import fusedres
from fusedres.ops.backends import unavailable_reason

from .timing import first_call, flush_buffer, quantile, time_ms

Step = Callable[[], dict[str, Tensor]]
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
GRAPHED = "fused[auto]+graph"  # the "auto" fused target's inference forward replayed from a CUDA graph
# the "auto" fused target converted with memory_efficient=False: its training step keeps the normalised
# activations for backward, as eager and torch.compile do, instead of recomputing them there
SAVED = "fused[auto]+saved"
# Agreement (flash-attention's rule, with norms): against eager run once in REFERENCE_DTYPE without
# autocast, each output / gradient of a contender may be off by 2x eager's own error + SLACK * |ref|.
# Errors are L2 norms, |got - ref|_2: maximum errors of tiny-batch random ResNets are dominated by a
# few ill-conditioned elements (eager fp32 vs fp64 differs by 20% of max|ref| there).
REFERENCE_DTYPE = {torch.bfloat16: torch.float32, torch.float16: torch.float32,
                   torch.float32: torch.float64}
SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format
    levels: list[str]
    modes: Optional[list[str]]  # None: every mode of each level (cases.MODES)
    models: Optional[list[str]]  # None: each level's defaults
    batches: Optional[list[int]]  # None: each level's defaults
    size: int
    repeats: int
    warmup: int
    compile: bool
    compile_mode: str
    backends: list[str]
    quick: bool
    out: Path
    precompile: bool = False  # fused modules run fusedres.precompile before their first call
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """Autocast to the benchmark dtype (plain fp32 when the dtype is fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def describe(self) -> dict:
        plain = {k: v if isinstance(v, (bool, int, list, type(None))) else str(v)
                 for k, v in vars(self).items() if k not in ("notes", "memory_format")}
        return {**plain, "dtype": str(self.dtype).replace("torch.", ""),
                "layout": "channels_last" if self.memory_format == torch.channels_last else "nchw",
                "cpu_threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn": torch.backends.cudnn.allow_tf32}}


@dataclass
class Setup:
    """What one case sets up: inputs, targets, and how to run one iteration of a target."""

    inputs: dict[str, Tensor]  # shared by every contender
    eager: Callable[[], Any]  # a fresh eager target (module copy or function)
    # the fused target for a backend name (or a level's own contender); blocks and models take memory_efficient too
    fused: Callable[..., Any]
    step: Callable[[Any, dict[str, Tensor], Callable], Step]  # (target, inputs, autocast) -> step
    # The target run upcast for the reference, when not eager: it returns every kind of output
    # the contenders return, and each contender's outputs are matched to it by name.
    reference: Optional[Callable[[], Any]] = None
    # ``step`` replayed from a CUDA graph (inference cases: the GRAPHED contender), or None
    graphed: Optional[Callable[[Any, dict[str, Tensor], Callable], Step]] = None


@dataclass
class Case:
    level: str  # "ops", "blocks", "models"
    name: str
    mode: str  # one of cases.MODES: "fwd", "fwd+bwd" (ops), "train", "infer" (blocks, models), "fwd", "bwd" (convs)
    batch: int
    shape: str  # human-readable shape / config
    bytes: Optional[int]  # required bytes per iteration (formulas in common.py), or None
    flops: Optional[int]  # FLOPs per iteration (formulas in common.py), or None
    prepare: Callable[[], Setup]
    # The level's own (contender, None or why it is skipped on this case), anchor first; None:
    # eager, fused per backend, compile (``contenders``)
    contenders: Optional[list[tuple[str, Optional[str]]]] = None
    extra: dict = field(default_factory=dict)  # more fields for the case's rows (JSON)
    # time the GPU's work alone, the host's launches queued ahead of it (``time_ms``): a level comparing
    # kernels (convs); not where the host's time is part of what is measured (a batch-1 model's latency)
    queue_ahead: bool = False

    @property
    def key(self) -> str:
        return f"{self.level}|{self.name}|{self.mode}|b{self.batch}"

    def row(self, contender: str) -> dict:
        return {"level": self.level, "case": self.name, "mode": self.mode, "batch": self.batch,
                "shape": self.shape, "contender": contender, **self.extra}


# ----------------------------------------------------------------------------- contenders
def contenders(settings: Settings, case: Optional[Case] = None) -> list[tuple[str, Optional[str]]]:
    """(contender name, None or why it is skipped), the anchor first: the case's own, or eager, then fused, then
    compile (the slowest to build: a run stopped by its time limit keeps the fused rows; the console shows a fused
    row before compile's time exists, the tables written after each case have its `vs compile`), then for training
    cases the fused model with its activations saved (SAVED)."""
    if case is not None and case.contenders is not None:
        return case.contenders
    compile_skip = None if settings.compile else (
        "torch.compile skipped on CPU (slow to compile); pass --compile to include it"
        if not settings.cuda else "torch.compile skipped (--no-compile)")
    names = [("eager", None)]
    names += [(f"fused[{b}]", None if b == "auto" else unavailable_reason(b, settings.device))
              for b in settings.backends]
    inference = case.mode == "infer" if case is not None else (
        bool({"blocks", "models"} & set(settings.levels)) and (settings.modes is None or "infer" in settings.modes))
    if "auto" in settings.backends and inference:
        names.append((GRAPHED, None if settings.cuda else "CUDA graphs need a CUDA device"))
    names.append(("compile", compile_skip))
    training = case.mode == "train" if case is not None else (
        bool({"blocks", "models"} & set(settings.levels)) and (settings.modes is None or "train" in settings.modes))
    if "auto" in settings.backends and training:  # after compile: a run its time limit stops keeps compile's row
        names.append((SAVED, None))
    return names


def build(setup: Setup, name: str, settings: Settings) -> Step:
    """The timed step of contender ``name``, on fresh copies of the case's pristine weights."""
    if name == "eager":
        return setup.step(setup.eager(), setup.inputs, settings.autocast)
    if name == "compile":
        torch._dynamo.reset()  # fresh caches: no recompile limit, no automatic dynamic shapes
        mode = None if settings.compile_mode == "default" else settings.compile_mode
        target = torch.compile(setup.eager(), mode=mode, dynamic=False)
        step = setup.step(target, setup.inputs, settings.autocast)
        if settings.compile_mode not in CUDAGRAPH_MODES or not settings.cuda:
            return step

        def cudagraph_step():
            torch.compiler.cudagraph_mark_step_begin()
            return step()
        return cudagraph_step
    if name == GRAPHED:
        if setup.graphed is None:
            raise ValueError(f"{GRAPHED} replays inference forwards; this case's step is not one")
        return setup.graphed(setup.fused("auto"), setup.inputs, settings.autocast)
    if name == SAVED:
        target = setup.fused("auto", memory_efficient=False)
    else:
        if name.startswith("fused[") and name.endswith("]"):
            name = name[len("fused["):-1]
        target = setup.fused(name)  # else a level's own
    step = setup.step(target, setup.inputs, settings.autocast)
    if settings.precompile and isinstance(target, nn.Module):
        try:  # run_contender reports it; a failed pass leaves the model as it was, so the step is still timed
            with settings.autocast():
                step.precompile = fusedres.precompile(target, setup.inputs["x"])
        except Exception as exc:
            step.precompile_error = _error_text(exc)
            _print_traceback()
    return step


def release(device: torch.device, compiled: bool = False) -> None:
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- agreement
@contextlib.contextmanager
def _exact_fp32():
    """No TF32 inside: the reference's fp32 is real fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _norm(t: Tensor) -> float:
    return torch.linalg.vector_norm(t.detach().flatten().to(torch.float64)).item()


@dataclass
class Reference:
    """Eager (or ``Setup.reference``) run once in REFERENCE_DTYPE (no autocast, no TF32) on upcast
    copies of the inputs, then the anchor's (eager's) own error against it: the yardstick for every
    other contender. A tensor the anchor does not return (``Setup.reference``'s other kinds) is held
    to the anchor's largest error."""

    outputs: Optional[dict[str, Tensor]] = None
    why_not: str = ""  # why there are no outputs
    by_name: bool = False  # contenders return some of the outputs, matched by name (else all, in order)
    eager_err: Optional[dict[str, float]] = None

    @classmethod
    def of(cls, setup: Setup, settings: Settings) -> "Reference":
        dtype = REFERENCE_DTYPE[settings.dtype]
        try:
            inputs = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) if v.is_floating_point()
                      else v for k, v in setup.inputs.items()}
            target = (setup.reference or setup.eager)()
            target = target.to(dtype) if isinstance(target, nn.Module) else target
            with _exact_fp32():
                outputs = setup.step(target, inputs, contextlib.nullcontext)()
            return cls({k: v.detach() for k, v in outputs.items()}, by_name=setup.reference is not None)
        except Exception as exc:  # e.g. out of memory in fp32/fp64: the timings are still useful
            return cls(why_not=f"no {dtype} reference ({_error_text(exc)})")
        finally:
            release(settings.device)

    def errors(self, got: dict[str, Tensor]) -> dict[str, float]:
        """|got - ref|_2 / |ref|_2 per tensor, by the reference's name (inf where missing,
        misshapen or not finite)."""
        if self.by_name:
            unknown = set(got) - set(self.outputs)
            if unknown:
                raise RuntimeError(f"no reference for {sorted(unknown)}; it has {list(self.outputs)}")
            pairs = [(n, self.outputs[n], g) for n, g in got.items()]
        elif len(got) != len(self.outputs):
            raise RuntimeError(f"{len(got)} tensors to compare, the reference has {len(self.outputs)}")
        else:
            pairs = [(n, r, g) for (n, r), g in zip(self.outputs.items(), got.values())]
        out = {}
        for n, r, g in pairs:
            err = math.inf if g is None or g.shape != r.shape else _norm(g.detach().to(r.dtype) - r)
            out[n] = err / (_norm(r) or 1.0) if math.isfinite(err) else math.inf
        return out

    def check(self, outputs: dict[str, Tensor], dtype: torch.dtype, anchor: bool = False) -> dict:
        """Row fields: agree (None for the anchor, whose own error is recorded), max_err, detail."""
        if self.outputs is None:
            return {"agree": None, "agree_detail": f"not checked: {self.why_not}"}
        who = "the reference" if self.by_name else "eager's"
        ref = f"{who} {str(REFERENCE_DTYPE[dtype]).replace('torch.', '')} run"
        err = self.errors(outputs)
        max_err = max(err.values(), default=0.0)
        if anchor:
            self.eager_err = err
            return {"agree": None, "max_err": max_err, "agree_detail": f"vs {ref}: the yardstick"}
        if self.eager_err is None:
            return {"agree": None, "agree_detail": "not checked: the anchor (eager) failed"}
        worst = max(self.eager_err.values(), default=0.0)
        bad = [f"{n}: rel. err {e:.1e} vs the anchor's {self.eager_err.get(n, worst):.1e}"
               for n, e in err.items() if not e <= 2 * self.eager_err.get(n, worst) + SLACK[dtype]]
        detail = "; ".join(bad[:3]) or f"{len(err)} tensors within 2x the anchor's error + {SLACK[dtype]:g}"
        return {"agree": not bad, "max_err": max_err, "agree_detail": f"vs {ref}: {detail}"}


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(settings: Settings) -> dict:
    """Device copy bandwidth (read + write bytes) and GEMM rate, measured now on this device."""
    device = settings.device
    if settings.cuda:
        numel, copy_dtype, n, gemm_dtype = 2**29, torch.bfloat16, 8192, torch.bfloat16
    else:
        numel, copy_dtype, n, gemm_dtype = 2**24, torch.float32, 1024, torch.float32
    src = torch.empty(numel, dtype=copy_dtype, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = quantile(time_ms(lambda: dst.copy_(src), device, 3, 20, flush=False).ms, 0.5)
    copy_bytes = 2 * numel * src.element_size()
    del src, dst
    a = torch.randn(n, n, dtype=gemm_dtype, device=device)
    b = torch.randn(n, n, dtype=gemm_dtype, device=device)
    gemm_ms = quantile(time_ms(lambda: a @ b, device, 3, 20, flush=False).ms, 0.5)
    del a, b
    release(device)
    name = str(gemm_dtype).replace("torch.", "")
    return {
        "device": torch.cuda.get_device_name(device) if settings.cuda else "cpu",
        "copy_GBps": copy_bytes / copy_ms / 1e6,
        "copy_what": f"dst.copy_(src), {copy_bytes // 2 / 2**20:.0f} MiB tensor, read+write bytes",
        "gemm_TFLOPs": 2 * n**3 / gemm_ms / 1e9,
        "gemm_what": f"{name} GEMM {n}x{n}x{n}, 2*n^3 FLOPs",
    }


# ----------------------------------------------------------------------------- running a case
def _print_traceback() -> None:
    """The last lines of the exception being handled, indented under the case's console line."""
    print("\n".join("      | " + line for line in traceback.format_exc().strip().splitlines()[-12:]), flush=True)


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:240]


def _tunings() -> list:
    """The Triton kernels' record of the keys they tuned (``fusedres.triton.autotuning.TUNINGS``), or [] where
    triton cannot be imported."""
    try:
        from fusedres.triton import autotuning
    except Exception:  # triton missing or broken: nothing is tuned
        return []
    return autotuning.TUNINGS


def run_contender(case: Case, setup: Setup, name: str, settings: Settings,
                  reference: Reference) -> dict:
    """One contender of one case: check it against the reference, then time it and take its
    peak memory. Returns its row; ``tuned``: the Triton autotuning its first call did (each key's timed
    configs and the chosen one)."""
    device, row, fn = settings.device, case.row(name), None
    try:
        flush_buffer(device)
        baseline = torch.cuda.memory_allocated(device) if settings.cuda else 0
        fn = build(setup, name, settings)
        precompiled = getattr(fn, "precompile", None)
        if precompiled is not None:
            row.update(precompile_s=precompiled.seconds, precompile_compiles=precompiled.compiles)
        if getattr(fn, "precompile_error", None):
            row["precompile_error"] = fn.precompile_error
        tunings = _tunings()
        known = len(tunings)
        outputs, row["first_call_s"] = first_call(fn, device)
        if len(tunings) > known:
            row["tuned"] = tunings[known:]
        row.update(reference.check(outputs, settings.dtype, anchor=name == contenders(settings, case)[0][0]))
        del outputs
        if settings.cuda:
            torch.cuda.synchronize(device)
            for _ in range(settings.warmup):
                fn()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_ms(fn, device, 0 if settings.cuda else settings.warmup, settings.repeats,
                         queue_ahead=case.queue_ahead)
        if settings.cuda:
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
        row.update(median_ms=quantile(timing.ms, 0.5), p20_ms=quantile(timing.ms, 0.2),
                   p80_ms=quantile(timing.ms, 0.8), repeats=len(timing.ms), host_ms=quantile(timing.host_ms, 0.5))
        if timing.late is not None:
            row["late"] = timing.late
    except Exception as exc:  # a failing contender becomes a row saying why, the run goes on
        row["error"] = _error_text(exc)
        _print_traceback()
    finally:
        del fn
        release(device, compiled=name == "compile")
    return row


def derive(rows: list[dict], case: Case, ceilings: dict) -> None:
    """Fill throughput, fraction of ceiling and speedups into a case's rows (in place)."""
    by_name = {r["contender"]: r.get("median_ms") for r in rows}
    for row in rows:
        ms = row.get("median_ms")
        if ms is None:
            continue
        if case.level in ("blocks", "models"):
            row["images_per_s"] = case.batch / ms * 1e3
        if case.bytes:
            row["bytes"], row["GBps"] = case.bytes, case.bytes / ms / 1e6
            row["frac_copy"] = row["GBps"] / ceilings["copy_GBps"] if ceilings else None
        if case.flops:
            row["flops"], row["TFLOPs"] = case.flops, case.flops / ms / 1e9
            row["frac_gemm"] = row["TFLOPs"] / ceilings["gemm_TFLOPs"] if ceilings else None
        # vs_eager: vs the anchor (the first contender: eager, or the level's own, e.g. cudnn)
        for key, other in (("vs_eager", rows[0]["contender"]), ("vs_compile", "compile")):
            if by_name.get(other):
                row[key] = by_name[other] / ms


def run_case(case: Case, settings: Settings, ceilings: dict,
             on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every contender of ``case``, eager first; ``on_row`` sees each row when it is done."""
    rows = []
    try:
        setup = case.prepare()
        reference = Reference.of(setup, settings)
    except Exception as exc:
        row = {**case.row("(setup)"), "error": _error_text(exc)}
        on_row(row)
        return [row]
    for name, skip in contenders(settings, case):
        if skip is not None:  # the level's own contenders say per case why not; others in the notes
            if case.contenders is not None:
                rows.append({**case.row(name), "skipped": skip})
                on_row(rows[-1])
            continue
        rows.append(run_contender(case, setup, name, settings, reference))
        derive(rows, case, ceilings)
        on_row(rows[-1])
    del setup, reference
    release(settings.device)
    return rows


# ----------------------------------------------------------------------------- output
def fmt(value, spec: str, none: str = "—") -> str:
    return none if value is None else format(value, spec)


def ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


def agree_text(row: dict) -> str:
    if row.get("error"):
        return "ERROR"
    if row.get("agree") is None:
        return "—" if row.get("max_err") is None else f"ref {row['max_err']:.0e}"
    return f"{'ok' if row['agree'] else 'DIFF'} {row['max_err']:.0e}"


def precompile_text(row: dict) -> str:
    """A row's fusedres.precompile before its first call: seconds (kernels compiled), why it failed, or —."""
    if row.get("precompile_error"):
        return "ERROR"
    if row.get("precompile_s") is None:
        return "—"
    return f"{row['precompile_s']:.1f} ({row['precompile_compiles']})"


def host_text(row: dict) -> str:
    """The host's median ms in a call; with queue_ahead, how many iterations it made late (see time_ms)."""
    late = f" ({row['late']} late)" if row.get("late") else ""
    return fmt(row.get("host_ms"), ".3f") + late


def ceiling_pct(row: dict) -> Optional[float]:
    frac = row.get("frac_copy") if row["level"] == "ops" else row.get("frac_gemm")
    return None if frac is None else 100 * frac


def columns(level: str, anchor: str = "eager") -> list[tuple[str, int, Callable[[dict], str]]]:
    """The result columns after the contender: (header, console width, cell text of a row)."""
    ops = level == "ops"
    cols = [
        ("median ms (p20–p80)", 26, lambda r: f"{fmt(r.get('median_ms'), '.3f')} "
                                              f"({fmt(r.get('p20_ms'), '.3f')}–{fmt(r.get('p80_ms'), '.3f')})"),
        ("img/s", 10, lambda r: fmt(r.get("images_per_s"), ".1f")),
        ("GB/s" if ops else "TFLOP/s", 9,
         lambda r: fmt(r.get("GBps"), ".1f") if ops else fmt(r.get("TFLOPs"), ".2f")),
        ("% ceiling", 10, lambda r: fmt(ceiling_pct(r), ".1f")),
        ("peak MiB", 9, lambda r: fmt(r.get("peak_mib"), ".0f")),
        ("host ms", 13, host_text),
        (f"vs {anchor}", 10, lambda r: ratio(r.get("vs_eager"))),
        ("vs compile", 11, lambda r: ratio(r.get("vs_compile"))),
        ("first call s", 13, lambda r: fmt(r.get("first_call_s"), ".3f")),
        ("precompile s", 13, precompile_text),
        ("agree", 0, agree_text),
    ]
    hidden = {"convs": ("img/s", "vs compile", "precompile s"), "models": ()}.get(level, ("first call s",
                                                                                       "precompile s"))
    return [c for c in cols if c[0] not in hidden]


def not_run(row: dict) -> Optional[str]:
    """Why a row has no measurements (an error, or the contender skipped on this case), or None."""
    if row.get("error"):
        return f"ERROR {row['error']}"
    return f"skipped: {row['skipped']}" if row.get("skipped") else None


CONTENDER_WIDTH = 18


def console_header(level: str, anchor: str = "eager") -> str:
    cols = columns(level, anchor)
    return "    " + f"{'contender':<{CONTENDER_WIDTH}}" + "".join(f"{h:>{w}}" for h, w, _ in cols[:-1]) + "  agree"


def console_row(row: dict) -> str:
    cells = not_run(row) or "".join(f"{cell(row):>{w}}" for _, w, cell in columns(row["level"])[:-1]) \
        + "  " + agree_text(row)
    return f"    {row['contender']:<{CONTENDER_WIDTH}}{cells}"


LEVEL_TITLES = {
    "ops": "BN + residual add + ReLU (training-mode BN); bandwidth = required bytes / time, "
           "% of the measured copy ceiling",
    "blocks": "Residual blocks; TFLOP/s from conv FLOPs (training = 3x forward), % of the "
              "measured GEMM ceiling",
    "models": "Whole ResNets (train = one SGD step incl. loss); TFLOP/s from conv + linear FLOPs, "
              "% of the measured GEMM ceiling; first call s = the first step's wall clock (compiles, the "
              "dispatch's and the autotuner's timing); precompile s (--precompile) = fusedres.precompile's "
              "pass before it, with the Triton kernels it compiled in brackets",
    "convs": "Every distinct conv of the selected models (default resnet50). On a GPU, times are the GPU's: a "
             "wait queued before each iteration lets the host queue all of a call's launches first, as a "
             "model's step keeps the queue full (`host ms`: the host's time a call, apart; `late`: iterations "
             "whose host time outlasted the wait); on CPU, the wall clock's. fwd (no autograd): "
             "cudnn = F.conv2d(x, w) (on CPU torch's own conv), the anchor (`vs cudnn` = its time / this "
             "one's); prologue[B] = fusedres.ops.bn_act_conv2d = conv(relu(x * scale + shift)) (cuda: a "
             "BN-apply pass, then cuDNN; triton: one Triton conv applying BN + ReLU as it loads x); "
             "triton = the bare Triton conv; triton+stats = the Triton conv with that prologue and a "
             "per-channel sum / sum-of-squares epilogue (the training forward unit); cudnn+stats = "
             "F.conv2d, then fusedres channel_stats. TFLOP/s from 2*N*P*Q*K*R*S*C/groups, % of the "
             "measured GEMM ceiling; agreement on the conv output (and the +stats contenders' per-channel "
             "mean and variance), vs F.conv2d(x) or F.conv2d(relu(x * scale + shift)) in fp32 (fp64 for "
             "fp32). bwd: a training unit's conv "
             "backward up to BatchNorm's apply pass (fusedres.ops.unit_conv._conv_backward_local), once per "
             "way the converted model runs convs of that shape in training (`prologue BN+ReLU`: after the "
             "previous BatchNorm + ReLU; `no prologue`: on a materialised input, so no BatchNorm sums and "
             "no Triton input gradient; the stem, left to torch, has no bwd row), its "
             "cudnn implementation (recomputed activation, convolution_backward, BatchNorm's reduction "
             "pass; the anchor) vs its triton one (weight gradient recomputing the prologue; the input "
             "gradient with the ReLU mask and BatchNorm's sums in its epilogue, one launch per phase of a "
             "stride); TFLOP/s from "
             "2x the forward's FLOPs; agreement on d act or dz, the two sums and dW. `first call s`: the first "
             "call's wall clock, synchronised (Triton autotuning and compilation unless cached, cuDNN's "
             "algorithm search); autotuning is cached per process, so a shape an earlier level tuned "
             "shows none: run `--levels convs` alone for the first-use cost.",
}
