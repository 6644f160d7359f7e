"""``python -m benchmarks``: fused vs eager vs torch.compile, from single ops to whole ResNets.

    PYTHONPATH=. python -m benchmarks                    # everything, sizes for the device
    PYTHONPATH=. python -m benchmarks --quick            # small smoke subset (< 1 min on CPU)
    PYTHONPATH=. python -m benchmarks --levels blocks --models resnet50 --compile-mode max-autotune
    PYTHONPATH=. python -m benchmarks --levels convs     # every ResNet-50 conv: cuDNN vs Triton
    PYTHONPATH=. python -m benchmarks.plot bench_out/results.json

On a GPU: batch 256 at 224 px, bf16 autocast, channels_last, torch.compile included. On CPU
everything shrinks (batch 2, 64 px, fp32, one thread) and torch.compile is skipped unless
--compile is given; CPU timings say nothing about GPU performance.
"""

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from fusedres._info import collect
from fusedres.ops import dispatch_table
from fusedres.ops.backends import BACKENDS
from fusedres.ops.dispatch import DISAGREES

from . import cases, common, convs, harness

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BENCH_BACKENDS = ("auto",) + BACKENDS  # auto: what a user gets by default


def _csv(choices=None, cast=str):
    def comma_separated(text: str):
        values = [cast(v) for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {choices}, got {text!r}")
        return values
    return comma_separated


def _at_least(least: int):
    """An argparse type: an integer >= ``least``."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value
    return integer


def _model_name(text: str) -> list[str]:
    import torchvision

    names = _csv()(text)
    for name in names:
        if common.is_timm_model(name):
            import timm

            if name not in timm.list_models("resnetv2*"):
                raise argparse.ArgumentTypeError(f"{name!r} is not a timm resnetv2 model")
        elif not name.startswith(("resnet", "wide_resnet", "resnext")) or not hasattr(torchvision.models, name):
            raise argparse.ArgumentTypeError(f"{name!r} is not a torchvision ResNet builder or "
                                             "timm resnetv2 model")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=_csv(cases.LEVELS), default=list(cases.LEVELS),
                   help=f"comma-separated subset of {','.join(cases.LEVELS)} (default: all)")
    p.add_argument("--modes", type=_csv(cases.MODES),
                   help="comma-separated modes to run, each level those of its own (ops: fwd, fwd+bwd; blocks and "
                        "models: train, infer; convs: fwd, bwd), e.g. infer (default: all)")
    p.add_argument("--models", type=_model_name,
                   help="torchvision ResNets and timm pre-activation resnetv2_* models for the blocks, "
                        f"models and convs levels (default: {','.join(common.DEFAULT_MODELS[None])}; "
                        f"convs: {','.join(common.DEFAULT_MODELS['convs'])})")
    p.add_argument("--backends", type=_csv(BENCH_BACKENDS), default=list(BENCH_BACKENDS),
                   help="fused backends to run, those unavailable are reported and skipped; auto is "
                        "the package default (the CUDA extension's stages, each training conv the "
                        "Triton or cuDNN one as timed on first use) "
                        f"(default: {','.join(BENCH_BACKENDS)})")
    p.add_argument("--dtype", choices=DTYPES, help="bf16/fp16 run under autocast (default: bf16 on "
                                                   "CUDA, fp32 on CPU)")
    p.add_argument("--layout", choices=LAYOUTS, default="channels_last")
    p.add_argument("--batch", type=_csv(cast=_at_least(1)), help="batch size(s) for every level, e.g. 1,32 "
                   "(default: 256 on CUDA, models inference 1,32,256, --quick convs 32; CPU: 2, "
                   "inference 1,4)")
    p.add_argument("--size", type=_at_least(1), help="image size in px (default: 224 on CUDA, 64 on CPU)")
    p.add_argument("--repeats", type=_at_least(1), help="timed iterations per contender (default: 30 on CUDA, "
                                               "5 on CPU; --quick: 10 / 3)")
    p.add_argument("--warmup", type=_at_least(0),
                   help="untimed iterations first (default: 5 CUDA, 2 CPU; --quick: 3 / 1)")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="include torch.compile (default on CUDA only)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false",
                               help="skip the torch.compile contender")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--threads", type=_at_least(1), help="CPU intra-op threads (default on CPU: 1, the least "
                                               "noisy on a shared machine; on CUDA: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="small subset (2 op shapes, 1 block per model, the models level's first model only, "
                        "one 1x1 and one 3x3 conv at batch 32, fewer repeats): a smoke run")
    p.add_argument("--precompile", action="store_true",
                   help="the blocks' and models' fused contenders run fusedres.precompile before their first "
                        "call: the rows get precompile_s and precompile_compiles, and first_call_s is what is "
                        "left (timing, no compiles)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out/)")
    return p


def make_settings(argv: Optional[list[str]] = None) -> harness.Settings:
    p = parser()
    args = p.parse_args(argv)
    try:  # where the results go, made before anything is measured
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        p.error(f"argument --out: cannot make the folder {str(args.out)!r}: {error.strerror or error}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser().error("--device cuda, but torch sees no CUDA device")
    cuda, quick = device.type == "cuda", args.quick
    settings = harness.Settings(
        device=device,
        dtype=DTYPES[args.dtype or ("bf16" if cuda else "fp32")],
        memory_format=LAYOUTS[args.layout],
        levels=args.levels, modes=args.modes, models=args.models, batches=args.batch,
        size=args.size or (224 if cuda else 64),
        repeats=args.repeats or ((10 if quick else 30) if cuda else (3 if quick else 5)),
        warmup=args.warmup if args.warmup is not None else ((3 if quick else 5) if cuda else (1 if quick else 2)),
        compile=cuda if args.compile is None else args.compile,
        compile_mode=args.compile_mode, backends=args.backends, quick=quick, out=args.out,
        precompile=args.precompile)
    if cuda:  # let cuDNN pick the fastest conv algorithms (the warm-up pays for the search)
        torch.backends.cudnn.benchmark = True
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if not cuda:
        settings.notes.append(f"CPU run: CPU timings ({torch.get_num_threads()} thread(s)) with shrunken "
                              "sizes, not representative of GPU performance; no peak memory on CPU; small "
                              "tensors stay in CPU caches, so % of the copy ceiling can exceed 100")
    last_stage = min(settings.batches or [256 if cuda else 2]) * max(1, settings.size // 32) ** 2
    if last_stage < 64 and any(level in ("blocks", "models") for level in settings.levels):
        settings.notes.append(f"training BatchNorm of the last stage sees only {last_stage} value(s) per "
                              "channel: gradients are ill-conditioned there (eager fp32 itself can be "
                              "percents off fp64), so training-row agreement verdicts are weak")
    for name, skip in harness.contenders(settings) if set(settings.levels) - {"convs"} else []:
        if skip is not None:
            settings.notes.append(f"{name} skipped: {skip}")
    if "convs" in settings.levels:
        settings.notes += convs.conv_notes(settings)
    if settings.dtype != torch.float32:
        settings.notes.append(f"{args.dtype or 'bf16'} via torch.autocast "
                              "(ops and convs levels: tensors in that dtype)")
    return settings


def markdown_tables(rows: list[dict], gpu: bool) -> str:
    """One Markdown table per level, and the level's summary lines under it (``gpu``: the timings are a GPU's)."""
    out = []
    for level, title in harness.LEVEL_TITLES.items():
        level_rows = [r for r in rows if r["level"] == level]
        if not level_rows:
            continue
        anchor = next((r["contender"] for r in level_rows if r["contender"] != "(setup)"), "eager")
        cols = harness.columns(level, anchor)
        out += [f"### {level}", "", title, "",
                "| case | shape | mode | batch | contender | " + " | ".join(h for h, _, _ in cols) + " |",
                "|" + "---|" * 5 + "---:|" * (len(cols) - 1) + "---|"]
        for r in level_rows:
            why = harness.not_run(r)
            cells = [why.replace("|", "/")] + [""] * (len(cols) - 1) if why else [c(r) for _, _, c in cols]
            out.append(f"| {r['case']} | {r['shape']} | {r['mode']} | {r['batch']} | "
                       f"{r['contender']} | " + " | ".join(cells) + " |")
        out += [""] + [line + "\n" for line in cases.LEVEL_SUMMARIES.get(level, lambda *_: [])(level_rows, gpu)]
    return "\n".join(out)


def write_results(out_dir: Path, meta: dict, rows: list[dict]) -> tuple[Path, Path]:
    """results.json (meta + rows) and results.md in ``out_dir``; safe to call after every case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    dispatch = dispatch_table()  # the implementations "auto" measured and chose, per call signature
    json_path.write_text(json.dumps({**meta, "dispatch": dispatch, "rows": rows}, indent=1, default=str) + "\n")
    env = meta["environment"]
    lines = ["# fusedres benchmark results", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}` (git {meta['git']})",
             f"- timings: {meta['timings']}"]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "backends"]
    lines += [f"- backend {k}: {'available' if v['available'] else 'unavailable'} ({v['detail']})"
              for k, v in env["backends"].items()]
    lines += [f"- settings: {json.dumps(meta['settings'])}"]
    c = meta.get("ceilings")
    if c:
        lines += [f"- ceilings ({c['device']}, measured in this run): copy {c['copy_GBps']:.1f} GB/s "
                  f"({c['copy_what']}); GEMM {c['gemm_TFLOPs']:.2f} TFLOP/s ({c['gemm_what']})"]
    lines += [f"- note: {n}" for n in meta["notes"]]
    chosen: dict[str, dict[str, int]] = {}
    disagreed: dict[str, dict[str, int]] = {}  # per op: implementations whose result the reference's refuted
    for key, entry in dispatch.items():  # a graph replay's choices (fusedres.cuda_graphed) counted apart
        op = key.split("|")[0] + (", for a CUDA graph's replay" if key.endswith("|graph") else "")
        counts = chosen.setdefault(op, {})
        counts[entry["choice"]] = counts.get(entry["choice"], 0) + 1
        for name, ms in entry["ms"].items():
            if isinstance(ms, str) and ms.startswith(DISAGREES):
                refuted = disagreed.setdefault(op, {})
                refuted[name] = refuted.get(name, 0) + 1
    lines += [f"- measured dispatch ({op}, per call signature; every timing in results.json): "
              + ", ".join(f"{name} chosen {n}x" for name, n in sorted(counts.items()))
              + "".join(f"; {name} DISAGREED with the reference {n}x (never chosen there)"
                        for name, n in sorted(disagreed.get(op, {}).items()))
              for op, counts in sorted(chosen.items())]
    lines += ["", "Agreement (`agree`): every output and gradient of a contender is compared with one "
              "run of eager in higher precision (fp32 for bf16/fp16, fp64 for fp32; no autocast, no TF32) "
              "on the same weights and inputs; `ok` when each tensor's error |got - ref|_2 is at most twice "
              "eager's own plus a small fraction of |ref|_2. The number is the worst relative error "
              "|got - ref|_2 / |ref|_2; eager's row (`ref`) shows its own. In the convs level cudnn takes "
              "eager's role, and the reference is F.conv2d upcast (of x, or of relu(x * scale + shift) "
              "for the contenders with the BN + ReLU prologue), on the conv output and the +stats "
              "contenders' per-channel mean and variance (fwd), or the conv backward written out in torch "
              "ops (bwd).", "",
              markdown_tables(rows, meta["timings"].startswith("GPU"))]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def command_line() -> str:
    return " ".join(["python -m benchmarks", *map(shlex.quote, sys.argv[1:])])


def git_revision() -> str:
    """HEAD of the checkout the package was imported from, "+dirty" with local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                        timeout=10, check=True).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def main(argv: Optional[list[str]] = None) -> None:
    settings = make_settings(argv)
    environment = collect()
    print(f"fusedres benchmarks on {settings.device} ({environment['GPU']}), torch {torch.__version__}; "
          f"{'GPU' if settings.cuda else 'CPU'} timings")
    print(f"settings: {settings.describe()}")
    for note in settings.notes:
        print(f"note: {note}")
    all_cases = cases.build_cases(settings)
    print("measuring ceilings ...", flush=True)
    ceilings = harness.measure_ceilings(settings)
    print(f"ceilings ({ceilings['device']}): copy {ceilings['copy_GBps']:.1f} GB/s "
          f"({ceilings['copy_what']}); GEMM {ceilings['gemm_TFLOPs']:.2f} TFLOP/s ({ceilings['gemm_what']})")
    meta = {"command": command_line(), "git": git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timings": (f"GPU ({environment['GPU']})" if settings.cuda else
                        "CPU (shrunken sizes; says nothing about GPU performance)"),
            "settings": settings.describe(), "environment": environment, "ceilings": ceilings,
            "notes": settings.notes}
    rows: list[dict] = []

    def on_row(row: dict) -> None:  # results written as each row finishes: a run stopped mid-case keeps them
        print(harness.console_row(row), flush=True)
        rows.append(row)
        write_results(settings.out, meta, rows)

    level = None
    for index, case in enumerate(all_cases, 1):
        if case.level != level:
            level = case.level
            anchor = harness.contenders(settings, case)[0][0]
            print(f"\n== {level}: {harness.LEVEL_TITLES[level]}\n{harness.console_header(level, anchor)}")
        print(f"[{index}/{len(all_cases)}] {case.name} | {case.shape} | {case.mode} | batch {case.batch}",
              flush=True)
        harness.run_case(case, settings, ceilings, on_row=on_row)
    if not all_cases:
        print("no cases selected")
        return
    json_path, md_path = write_results(settings.out, meta, rows)
    print("\n" + markdown_tables(rows, settings.cuda))
    print(f"wrote {json_path} and {md_path}")
    failed = [r for r in rows if r.get("error") or r.get("agree") is False]
    if failed:
        sys.exit(f"{len(failed)} row(s) failed or disagreed with eager's reference "
                 "(ERROR / DIFF in the agree column); exit status 1")


if __name__ == "__main__":
    main()
