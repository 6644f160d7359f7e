"""The ``convs`` level: every distinct conv shape of the selected models (default resnet50).

- ``fwd`` (no autograd): cuDNN (the anchor) vs fusedres' prologue conv (``bn_act_conv2d``) per
  backend vs the Triton implicit-GEMM conv bare and as the training forward unit (BN + ReLU prologue,
  statistics epilogue) vs cuDNN + fusedres ``channel_stats``; the issue's targets for the Triton conv
  are ``CONV_TARGETS``. Each contender's output, and the +stats contenders' per-channel mean and
  variance, are checked against an upcast reference.
- ``bwd``: the training unit's conv backward as the package runs it before BatchNorm's apply pass
  (``unit_conv._conv_backward_local``: d act or dz, BatchNorm backward's sums, dW), its "cudnn"
  implementation (the anchor) vs its "triton" one (``CONV_BWD_CONTENDERS``), once per way the
  converted model runs convs of that shape (``PROLOGUES``: after the previous BatchNorm + ReLU as the
  conv's prologue, or on a materialised input; the stem's: on the image, no prologue); convs the
  converted model leaves to torch have no bwd case.
"""

import dataclasses
import functools
import importlib
import math
import re
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedres
from fusedres.ops.backends import unavailable_reason
from fusedres.ops.functional import PendingBN

from .common import (activation, build_model, conv2d_flops, default_batches, default_models, hooked_forward,
                     meta_model)
from .harness import Case, Settings, Setup, Step

CONV_CONTENDERS = ("cudnn", "prologue[cuda]", "prologue[triton]", "triton", "triton+stats", "cudnn+stats")
TRITON_CONV_CONTENDERS = ("prologue[triton]", "triton", "triton+stats")  # run fusedres.triton.conv
# bwd: the implementations of the package's unit conv backward (_conv_backward_local), anchor first
CONV_BWD_CONTENDERS = ("cudnn", "triton")
CONV_MODES = ("fwd", "bwd")
# The targets: time at most this factor of cudnn's, on the 1x1 and 3x3 convs
CONV_TARGETS = {"triton+stats": 1.15, "triton": 1 / 0.9}
BARE, PROLOGUE = "conv(x)", "conv(relu(x*scale+shift))"  # what a contender's output is


def _named_stats(output: str, y: Tensor, mean: Tensor, var: Tensor) -> dict[str, Tensor]:
    """A +stats contender's outputs by name: ``y`` (named ``output``, BARE or PROLOGUE) and its per-channel batch
    mean and biased variance."""
    return {output: y, f"mean of {output}": mean, f"var of {output}": var}


@dataclass(frozen=True)
class ConvSpec:
    uses: tuple[str, ...]  # "model:module" of every conv with this shape, in network order
    in_shape: tuple[int, int, int]  # (C, H, W) per image
    out_shape: tuple[int, int, int]  # (K, P, Q)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_shape[0], self.in_shape[0] // self.groups, *self.kernel)

    def module(self) -> nn.Conv2d:
        model, name = self.uses[0].split(":")
        return meta_model(model).get_submodule(name)

    def geometry(self) -> dict:
        (c, h, w), (k, p, q), (r, s) = self.in_shape, self.out_shape, self.kernel
        return dict(C=c, H=h, W=w, K=k, P=p, Q=q, R=r, S=s, **self.args, uses=len(self.uses))

    def describe(self) -> str:
        (c, h, w), (k, p, q), (r, s) = self.in_shape, self.out_shape, self.kernel
        pair = lambda v: str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
        tags = f" s{pair(self.stride)} p{pair(self.padding)}" + (
            f" d{pair(self.dilation)}" if self.dilation != (1, 1) else "") + (
            f" g{self.groups}" if self.groups > 1 else "")
        names = [u.replace(":", " ") for u in self.uses]
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{c}->{k} {r}x{s} {h}x{w}->{p}x{q}{tags} (x{len(names)}: {listed})"


def conv_specs(model_names: list[str], size: int) -> list[ConvSpec]:
    """The distinct convs of the models at ``size`` px (network order, first model first)."""
    seen: dict[tuple, list[str]] = {}

    def record(model_name, name, conv, inputs, output):
        key = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]), conv.kernel_size, conv.stride,
               conv.padding, conv.dilation, conv.groups)
        seen.setdefault(key, []).append(f"{model_name}:{name}")

    for model_name in model_names:
        hooked_forward(meta_model(model_name), (nn.Conv2d,), functools.partial(record, model_name),
                       (1, 3, size, size))
    return [ConvSpec(tuple(uses), *key) for key, uses in seen.items()]


# How the converted model runs a conv in training: on its materialised input, or with the previous
# BatchNorm (and ReLU) applied as the conv's prologue. The text is what a bwd case's shape says.
PROLOGUES = {"bn+relu": "prologue BN+ReLU", "bn": "prologue BN", "none": "no prologue"}


@functools.lru_cache(maxsize=None)
def package_prologues(model_name: str) -> dict[str, str]:
    """"module" -> how the converted model runs that conv in training (a ``PROLOGUES`` key), for every
    conv it runs through fusedres' conv ops (the blocks' and the stem's, ``fusedres.nn.stem``); a conv
    the converted model leaves to torch's nn.Conv2d is absent. Found by watching those ops' calls
    (``conv_batch_norm_stats``, ``bn_act_conv2d``, which the blocks look up on ``fusedres.ops`` per call)
    during one training forward of the converted model on CPU at 32 px."""
    model = fusedres.convert(build_model(model_name), backend="torch").model.train()
    conv_names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    seen: dict[str, str] = {}

    def watched(op):
        def call(source, weight, *args, relu=True, **kwargs):
            pending = isinstance(source, PendingBN)
            seen[conv_names[id(weight)]] = ("bn+relu" if relu else "bn") if pending else "none"
            return op(source, weight, *args, relu=relu, **kwargs)
        return call

    originals = {name: getattr(fusedres.ops, name) for name in ("conv_batch_norm_stats", "bn_act_conv2d")}
    try:
        for name, op in originals.items():
            setattr(fusedres.ops, name, watched(op))
        model(torch.randn(2, 3, 32, 32))
    finally:
        for name, op in originals.items():
            setattr(fusedres.ops, name, op)
    return seen


def conv_bwd_units(spec: ConvSpec) -> dict[str, ConvSpec]:
    """Prologue kind -> this shape with only the uses the converted model runs that way (network order)."""
    uses: dict[str, list[str]] = {}
    for use in spec.uses:
        model, name = use.split(":")
        kind = package_prologues(model).get(name)
        if kind is not None:
            uses.setdefault(kind, []).append(use)
    return {kind: dataclasses.replace(spec, uses=tuple(names)) for kind, names in uses.items()}


def conv_run_skips(settings: Settings, mode: str = "fwd") -> dict[str, Optional[str]]:
    """Per conv contender of ``mode``, None or why it cannot run at all in this run (noted once, not
    per case)."""
    triton = "Triton conv runs on CUDA (the interpreter is for tests)" if not settings.cuda else (
        unavailable_reason("triton", settings.device))
    for module in ("conv",) + (("conv_wgrad",) if mode == "bwd" else ()):
        if triton is None:
            try:
                importlib.import_module(f"fusedres.triton.{module}")
            except Exception as exc:
                triton = f"cannot import fusedres.triton.{module}: {type(exc).__name__}: {exc}"
    if mode == "bwd":
        return {"cudnn": None, "triton": triton}
    skips = {name: triton if name in TRITON_CONV_CONTENDERS else None for name in CONV_CONTENDERS}
    for backend in ("cuda", "triton"):
        if backend not in settings.backends:
            skips[f"prologue[{backend}]"] = f"backend {backend} not selected (--backends)"
    if skips["prologue[cuda]"] is None:
        skips["prologue[cuda]"] = unavailable_reason("cuda", settings.device)
    return skips


def stats_backend(settings: Settings) -> str:
    """channel_stats' backend in cudnn+stats: the CUDA extension, else Triton, on CUDA; else torch."""
    usable = [b for b in ("cuda", "triton")
              if settings.cuda and unavailable_reason(b, settings.device) is None]
    return (usable or ["torch"])[0]


def conv_notes(settings: Settings) -> list[str]:
    return [f"convs {mode}: {name} skipped: {why}" for mode in CONV_MODES
            for name, why in conv_run_skips(settings, mode).items() if why] + [
        f"convs: cudnn+stats takes the channel statistics, and the bwd contenders recompute the activation "
        f"(cudnn) and take BatchNorm backward's sums (cudnn; triton where torch computes its input gradient), "
        f"with fusedres' {stats_backend(settings)} backend",
        "convs bwd: each contender is fusedres.ops.unit_conv._conv_backward_local (the conv backward of a "
        "training unit up to BatchNorm's apply pass: d act or dz, sum dz, sum dz*(x-mean), dW) with its "
        "cudnn or triton implementation; TFLOP/s from 2x the forward's FLOPs (input + weight gradient)"]


def _triton_conv_skip(settings: Settings, spec: ConvSpec, batch: int) -> Optional[str]:
    """Why fusedres.triton.conv does not take this conv (prologue[triton] would fall back to
    BN-apply + cuDNN), or None. Checked on expanded 0-d tensors: no memory."""
    from fusedres.triton.conv import unsupported_reason

    like = lambda shape: torch.empty((), dtype=settings.dtype, device=settings.device).expand(shape)
    why = unsupported_reason(like((batch, *spec.in_shape)), like(spec.weight_shape), **spec.args)
    return None if why is None else f"the Triton conv does not take this conv: {why}"


def _triton_bwd_parts(settings: Settings, spec: ConvSpec, batch: int, prologue: str) -> dict[str, Optional[str]]:
    """Why the Triton backward kernels do not take each part of this conv's backward ("input gradient":
    ``conv2d_input_grad``, "weight gradient": ``conv2d_weight_grad``), or None per part; the package runs
    a part they do not take with torch (``unit_conv._triton_backward_parts``). Checked on expanded 0-d
    tensors: no memory."""
    from fusedres.triton.conv_dgrad import input_grad_unsupported_reason
    from fusedres.triton.conv_wgrad import unsupported_reason

    like = lambda shape: torch.empty((), dtype=settings.dtype, device=settings.device).expand(shape)
    x, grad, weight = like((batch, *spec.in_shape)), like((batch, *spec.out_shape)), like(spec.weight_shape)
    input_why = ("no prologue: the Triton input side exists to fuse BatchNorm's backward" if prologue == "none"
                 else input_grad_unsupported_reason(grad, weight, x, **spec.args))
    return {"input gradient": input_why,
            "weight gradient": unsupported_reason(x, grad, spec.weight_shape, **spec.args)}


def _bn_relu(i: dict[str, Tensor]) -> Tensor:
    return F.relu(i["x"] * i["scale"].view(1, -1, 1, 1) + i["shift"].view(1, -1, 1, 1))


def conv_target(name: str, spec: ConvSpec, stats: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Contender ``name``'s forward on the inputs (x, weight, scale, shift, mean): its conv output,
    named BARE or PROLOGUE, and for the +stats contenders its per-channel statistics (``_named_stats``);
    "reference" (run upcast) returns all of them."""
    args = spec.args
    if name == "reference":
        def reference(i):
            outputs = {BARE: F.conv2d(i["x"], i["weight"], **args),
                       PROLOGUE: F.conv2d(_bn_relu(i), i["weight"], **args)}
            for output, y in list(outputs.items()):
                outputs.update(_named_stats(output, y, *torch.var_mean(y, (0, 2, 3), correction=0)[::-1]))
            return outputs
        return reference
    if name == "cudnn":
        return lambda i: {BARE: F.conv2d(i["x"], i["weight"], **args)}
    if name == "cudnn+stats":
        def cudnn_stats(i):
            y = F.conv2d(i["x"], i["weight"], **args)
            return _named_stats(BARE, y, *torch.ops.fusedres.channel_stats(y, stats))
        return cudnn_stats
    if name.startswith("prologue["):  # BatchNorm as y * scale + shift: mean 0, invstd scale, bias shift
        backend = name[len("prologue["):-1]
        return lambda i: {PROLOGUE: fusedres.ops.bn_act_conv2d(
            fusedres.ops.PendingBN(i["x"], i["mean"], i["scale"], None, i["shift"], batch_stats=False),
            i["weight"], None, **args, backend=backend)}
    from fusedres.triton.conv import conv2d_fused

    if name == "triton":
        return lambda i: {BARE: conv2d_fused(i["x"], i["weight"], **args)[0]}
    if name == "triton+stats":
        return lambda i: _named_stats(PROLOGUE, *conv2d_fused(i["x"], i["weight"], **args, in_scale=i["scale"],
                                                              in_shift=i["shift"], in_relu=True, compute_stats=True))
    raise ValueError(f"unknown conv contender {name!r}")


def conv_step(target, inputs: dict[str, Tensor], autocast) -> Step:
    """One forward, no autograd, on tensors already in the benchmark dtype (no autocast)."""
    def run():
        with torch.no_grad():
            return target(inputs)
    return run


# The bwd outputs, by name. A contender returns D_ACT (d act = the input gradient of the conv of act =
# relu(x * scale + shift)) or DZ (= d act * relu'(x * scale + shift), the Triton input side's), the
# BatchNorm backward sums over (N, H, W) and D_WEIGHT; the reference returns all of them.
D_ACT, DZ, SUM_DZ, SUM_DZ_XC, D_WEIGHT = "d act", "dz", "sum dz", "sum dz*(x-mean)", "dW"


def _conv_args_lists(spec: ConvSpec) -> tuple:
    """(stride, padding, dilation, groups) as the custom op hands them to its backward."""
    return list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups


def _bwd_reference(i: dict[str, Tensor], spec: ConvSpec, prologue: str) -> dict[str, Tensor]:
    """The unit conv's backward written out in torch ops (run upcast: the reference)."""
    stride, padding, dilation, groups = _conv_args_lists(spec)
    x, mean = i["x"], i["mean"].view(1, -1, 1, 1)
    z = x if prologue == "none" else x * i["scale"].view(1, -1, 1, 1) + i["shift"].view(1, -1, 1, 1)
    d_act, d_weight = torch.ops.aten.convolution_backward(
        i["grad"], z.relu() if prologue == "bn+relu" else z, i["weight"], None, stride, padding, dilation,
        False, [0, 0], groups, [True, True, False])[:2]
    if prologue == "none":
        return {D_ACT: d_act, D_WEIGHT: d_weight}
    dz = d_act * (z > 0) if prologue == "bn+relu" else d_act
    return {D_ACT: d_act, DZ: dz, SUM_DZ: dz.sum((0, 2, 3)), SUM_DZ_XC: (dz * (x - mean)).sum((0, 2, 3)),
            D_WEIGHT: d_weight}


def conv_bwd_target(name: str, spec: ConvSpec, stats: str,
                    prologue: str) -> Callable[[dict[str, Tensor]], Step]:
    """Contender ``name``'s backward of a training unit's conv on the inputs (x, weight, scale, shift,
    mean, grad = the conv output's gradient): a Step for those inputs. "cudnn" / "triton": the package's
    ``_conv_backward_local`` with that implementation, its arguments built as ``_prologue_conv2d_backward``
    builds them (with a ``prologue``, BatchNorm as x * scale + shift: mean 0, invstd scale, no weight,
    bias shift; both the input and the weight gradient wanted), with ``stats`` the backend of its
    BatchNorm ops; "reference" (run upcast) returns every kind of output."""
    if name == "reference":
        return lambda i: functools.partial(_bwd_reference, i, spec, prologue)
    if name not in CONV_BWD_CONTENDERS:
        raise ValueError(f"unknown conv bwd contender {name!r}")
    from fusedres.ops import unit_conv

    conv_args = _conv_args_lists(spec)
    has_prologue, relu = prologue != "none", prologue == "bn+relu"

    def prepare(i: dict[str, Tensor]) -> Step:
        x, grad, weight = i["x"], i["grad"], i["weight"]
        bn = (i["mean"], i["scale"], None, i["shift"]) if has_prologue else (None,) * 4
        bn_tensors = (x, *bn) + (None,) * 6

        def run():
            # per call, as in the package: which parts the Triton kernels take, asked at most once
            triton_parts = functools.cache(lambda: unit_conv._triton_backward_parts(
                grad, x, weight, conv_args, has_prologue, True, True))
            with torch.no_grad():
                d_input, sums, d_weight, masked = unit_conv._conv_backward_local(
                    name, grad, bn_tensors, weight, conv_args, True, relu, stats, (True, True),
                    triton_parts)
            out = {DZ if masked else D_ACT: d_input, D_WEIGHT: d_weight}
            return out if sums is None else {**out, SUM_DZ: sums[0], SUM_DZ_XC: sums[1]}
        return run
    return prepare


def conv_bwd_step(target, inputs: dict[str, Tensor], autocast) -> Step:
    """The bwd target's step on the inputs (tensors already in the benchmark dtype, no autocast)."""
    return target(inputs)


def _prepare_conv(settings: Settings, spec: ConvSpec, batch: int, stats: str, mode: str = "fwd",
                  prologue: str = "bn+relu") -> Setup:
    """Seeded inputs and the contenders of one case; ``prologue`` (a ``PROLOGUES`` key): bwd only."""
    torch.manual_seed(0)
    channels, dev = spec.in_shape[0], settings.device
    fan_in = math.prod(spec.weight_shape[1:])
    inputs = {"x": activation((batch, *spec.in_shape), settings),
              "weight": activation(spec.weight_shape, settings).mul_(fan_in ** -0.5),
              "scale": torch.rand(channels, device=dev) + 0.5,
              "shift": 0.5 * torch.randn(channels, device=dev), "mean": torch.zeros(channels, device=dev)}
    if mode == "bwd":
        inputs["grad"] = activation((batch, *spec.out_shape), settings)
    target = (functools.partial(conv_bwd_target, spec=spec, stats=stats, prologue=prologue) if mode == "bwd"
              else functools.partial(conv_target, spec=spec, stats=stats))
    return Setup(inputs, eager=lambda: target("cudnn"), fused=target,
                 step=conv_bwd_step if mode == "bwd" else conv_step, reference=lambda: target("reference"))


def _conv_bwd_case_info(settings: Settings, spec: ConvSpec, batch: int, prologue: str,
                        run_skip: Optional[str]) -> tuple[Optional[str], str, dict]:
    """(why the triton bwd contender is skipped on this case or None, text added to the case's shape,
    the Triton parts' reasons for the rows' JSON) of a bwd case."""
    if run_skip is not None:
        return None, "", {}
    parts = _triton_bwd_parts(settings, spec, batch, prologue)
    by_torch = [f"{part} by torch ({why})" for part, why in parts.items() if why is not None]
    if len(by_torch) == len(parts):  # the package runs its cudnn implementation then: nothing to time
        return "the Triton backward kernels take no part of this conv: " + "; ".join(by_torch), "", parts
    return None, "".join(f"; triton bwd: {text}" for text in by_torch), parts


def conv_cases(settings: Settings) -> list[Case]:
    """fwd: every distinct conv shape; bwd: every shape once per way the converted model runs it."""
    stats = stats_backend(settings)
    specs = conv_specs(default_models(settings, "convs"), settings.size)
    if settings.quick:  # the first 1x1 and the first 3x3 conv
        quick = [next((s for s in specs if s.kernel == k), None) for k in ((1, 1), (3, 3))]
        specs = [s for s in quick if s] or specs[:1]
    run_skips = {mode: conv_run_skips(settings, mode) for mode in CONV_MODES}
    cases = []

    def add(mode: str, spec: ConvSpec, batch: int, shape_skip: Optional[str], shape: str, extra: dict,
            prologue: str = "bn+relu") -> None:
        triton_names = TRITON_CONV_CONTENDERS if mode == "fwd" else ("triton",)
        flops = conv2d_flops(spec.module(), (batch, *spec.out_shape))
        cases.append(Case(
            "convs", spec.uses[0].replace(":", " "), mode, batch, shape, None,
            flops * (2 if mode == "bwd" else 1),  # bwd: the input and the weight gradient
            functools.partial(_prepare_conv, settings, spec, batch, stats, mode, prologue),
            contenders=[(n, shape_skip if n in triton_names else None)
                        for n, why in run_skips[mode].items() if why is None],
            extra={"conv": spec.geometry(), **extra}, queue_ahead=True))

    for spec in specs:
        for batch in default_batches(settings, "convs", "fwd"):
            skip = None if run_skips["fwd"]["triton"] else _triton_conv_skip(settings, spec, batch)
            add("fwd", spec, batch, skip, spec.describe(), {})
        for prologue, unit in conv_bwd_units(spec).items():
            for batch in default_batches(settings, "convs", "bwd"):
                skip, tail, parts = _conv_bwd_case_info(settings, unit, batch, prologue, run_skips["bwd"]["triton"])
                add("bwd", unit, batch, skip, f"{unit.describe()}; {PROLOGUES[prologue]}{tail}",
                    {"prologue": prologue, **({"triton_bwd_by_torch": parts} if parts else {})}, prologue)
    return cases


def conv_bwd_summary(rows: list[dict]) -> str:
    """The bwd rows' line: on how many shapes triton's backward beats cudnn's (no target in the issue)."""
    got = [r for r in rows if r["mode"] == "bwd" and r["contender"] == "triton" and r.get("vs_eager")]
    if not got:
        return "Backward (bwd), triton vs cudnn: not measured."
    speed = sorted(r["vs_eager"] for r in got)
    median = statistics.median(speed)
    slower = [f"{r['case']} b{r['batch']} {1 / r['vs_eager']:.2f}x" for r in got if r["vs_eager"] < 1]
    by_torch = sum(1 for r in got if (r.get("triton_bwd_by_torch") or {}).get("input gradient"))
    return (f"Backward (bwd), triton time vs cudnn's: faster on {len(got) - len(slower)}/{len(got)} shapes, "
            f"median speedup {median:.2f}x (range {speed[0]:.2f}x-{speed[-1]:.2f}x)"
            + (f"; slower (time vs cudnn's): {', '.join(slower)}" if slower else "")
            + (f"; {by_torch} of the shapes with torch's input gradient (no prologue, or a conv the Triton "
               "kernel does not take)" if by_torch else "") + ".")


def conv_summary(rows: list[dict]) -> list[str]:
    """Under the convs table: the forward targets met, the backward's speedups, and the first calls summed
    over the shapes."""
    counted = [r for r in rows if r.get("vs_eager") and r["mode"] == "fwd"
               and (r["conv"]["R"], r["conv"]["S"]) in ((1, 1), (3, 3))]
    parts = []
    for name, limit in CONV_TARGETS.items():
        got = [r for r in counted if r["contender"] == name]
        missed = [f"{r['case']} b{r['batch']} {1 / r['vs_eager']:.2f}x"
                  for r in got if 1 / r["vs_eager"] > limit]
        verdict = "not measured" if not got else f"met on {len(got) - len(missed)}/{len(got)}" + (
            f" (missed: {', '.join(missed)})" if missed else "")
        parts.append(f"{name} time <= {limit:.2f}x cudnn's: {verdict}")
    first: dict[str, list[float]] = {}
    for r in rows:
        if r.get("first_call_s") is not None:
            label = r["contender"] + ("" if r["mode"] == "fwd" else f" {r['mode']}")
            first.setdefault(label, []).append(r["first_call_s"])
    return ["Targets (fwd, 1x1 and 3x3 convs): " + "; ".join(parts) + ".", conv_bwd_summary(rows),
            "First calls summed over the shapes (s): "
            + ", ".join(f"{n} {sum(v):.2f} ({len(v)} shapes)" for n, v in first.items()) + ".",
            config_kinds_summary(rows), *twin_configs_summary(rows)]


# configs the Triton conv's autotuner times beside a twin that differs in one setting: (what tells them, the twin's)
_TWINS = {"Register-capped tiles": (r" maxnreg=\d+$", ""),
          "Tiles of channels as rows (CHANNEL_ROWS)": (r"CHANNEL_ROWS=True", "CHANNEL_ROWS=False")}


def twin_configs_summary(rows: list[dict]) -> list[str]:
    """How each kind of config in _TWINS (register-capped tiles, CHANNEL_ROWS tiles) timed against its twin, the
    same tile without that setting, over the keys the rows' first calls tuned where both ran: the autotuner's
    medians (a config that failed times inf, and counts nowhere)."""
    lines = []
    for label, (pattern, twin_setting) in _TWINS.items():
        ratios = []
        for tuned in (t for r in rows for t in r.get("tuned", ()) if t["kernel"] == "_conv_kernel"):
            for config, ms in tuned["ms"].items():
                twin = tuned["ms"].get(re.sub(pattern, twin_setting, config))
                if re.search(pattern, config) and twin is not None and math.isfinite(ms) and math.isfinite(twin):
                    ratios.append(ms / twin)
        if not ratios:
            lines.append(f"{label}: none timed beside their twin in this run's first calls.")
            continue
        ratios.sort()
        lines.append(f"{label}: timed beside their twin {len(ratios)} times, faster in "
                     f"{sum(ratio < 1 for ratio in ratios)} (time / twin's: {ratios[0]:.2f}-{ratios[-1]:.2f}, "
                     f"median {statistics.median(ratios):.2f}).")
    return lines


def config_kinds_summary(rows: list[dict]) -> str:
    """Which kind of Triton conv config the autotuner chose, over the keys the rows' first calls tuned."""
    chosen = [t["best"] for r in rows for t in r.get("tuned", ()) if t["kernel"] == "_conv_kernel"]
    if not chosen:
        return "Triton conv autotuning: no key tuned in this run's first calls (none on CPU)."
    tma = sum("USE_TMA=True" in best for best in chosen)
    persistent = sum("USE_TMA=True" in best and "PERSISTENT=0" not in best for best in chosen)
    x_in_l1 = sum("X_IN_L1=True" in best for best in chosen)
    capped = sum("maxnreg=" in best for best in chosen)
    channel_rows = sum("CHANNEL_ROWS=True" in best for best in chosen)
    return (f"Triton conv autotuning (forward and input-gradient keys tuned in this run): TMA configs chosen for "
            f"{tma} of {len(chosen)} ({persistent} persistent), pointer configs for the rest ({x_in_l1} caching x "
            f"in L1); {capped} with registers capped, {channel_rows} with channels as rows; every config's time in "
            "results.json (rows' `tuned`).")
