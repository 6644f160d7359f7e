"""Where a converted model's inference forward (or training step) spends its host and GPU time.

    PYTHONPATH=. python scripts/profile_model.py [--mode infer|train] [--model resnet50] [--batch 256] [--out DIR]

The benchmarks' models level measured ResNet-50 inference at batch 256 (bf16 autocast, channels_last, eval) at
10.96 ms a forward, and the same kernels replayed from one CUDA graph at 7.76 ms (H200, 2026-12-04): the GPU
waited for the host about 3 ms a forward, which that level cannot show (its host time tracks the median once the
launch queue is full). This runs the converted model ("auto" backend, as the benchmarks do) and, per forward
(``--mode train``: per training step, forward, cross-entropy, backward and SGD step, as the benchmarks' models
level runs it), timed so that neither the host nor the GPU hides the other:

- ``host ms``: the time the Python call takes to return (every launch queued), and ``gpu ms``: CUDA events
  around it, the call's launches queued behind a wait (``benchmarks.timing.time_ms(queue_ahead=True)``) so that
  they time the GPU's work alone. host > gpu means the host bounds the forward;
- the host time of each top-level child module's forward (forward pre/post hooks): where that time goes;
- torch.profiler over a few of them: the ops by self CPU time and by self GPU time (in training: which kernels the
  step's time goes to, the convs' or the BatchNorm passes around them), and the calls that can make the host wait
  for the GPU (synchronisations, copies to the host, ``.item()``), which would stall the queue every time.

On CPU it runs too (``--device cpu``; no GPU columns): the host side of the torch paths. Writes ``profile.txt``
and a Chrome trace ``trace.json`` under ``--out``.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import timing  # noqa: E402
from benchmarks.cases import convert_copy, infer_step, sgd_step  # noqa: E402
from benchmarks.common import pristine_model  # noqa: E402

# the host waits on these (and on the cudaMemcpy* calls)
_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
          "aten::_local_scalar_dense", "aten::nonzero")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=10, help="forwards (or training steps) timed (default 10)")
    parser.add_argument("--out", type=Path, default=Path("profile_out"))
    return parser.parse_args()


def _child_host_times(model: torch.nn.Module) -> tuple[dict, list]:
    """Per top-level child, a list its hooks append each forward's host seconds to; the hook handles."""
    times, handles = {}, []
    for name, child in model.named_children():
        times[name] = []
        started = []
        handles.append(child.register_forward_pre_hook(lambda m, a, s=started: s.append(time.perf_counter())))
        handles.append(child.register_forward_hook(
            lambda m, a, o, s=started, t=times[name]: t.append(time.perf_counter() - s.pop())))
    return times, handles


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    train = args.mode == "train"
    template = pristine_model(args.model).train(train).to(device, memory_format=torch.channels_last)
    model = convert_copy(template, args.backend)
    inputs = {"x": torch.randn(args.batch, 3, args.size, args.size, device=device).to(
                  memory_format=torch.channels_last),
              "labels": torch.randint(0, 1000, (args.batch,), device=device)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # the benchmarks' models-level steps: an SGD step (forward, cross-entropy, backward) or a no-grad forward
    run = (sgd_step if train else infer_step)(model, inputs, lambda: torch.autocast(device.type, dtype=torch.bfloat16))

    for _ in range(3):  # the measured dispatch's first calls, autotuning, compiles
        run()
    sync()

    times, handles = _child_host_times(model)
    # GPU time: the events time the GPU's work alone, the host's launches queued behind a wait before it
    # (queue_ahead), so that host > gpu means the host bounds the step; without the wait the events would time the
    # GPU's idle gaps too, never less than the host's time
    measured = timing.time_ms(run, device, 0, args.repeats, flush=False, queue_ahead=cuda)
    host, gpu = measured.host_ms, measured.ms if cuda else []
    for handle in handles:
        handle.remove()

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(3):
            run()
        sync()
    args.out.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(args.out / "trace.json"))
    averages = profiler.key_averages()

    unit = "training step" if train else "forward"
    lines = [f"{args.model} {args.mode} batch {args.batch} on {torch.cuda.get_device_name(device) if cuda else 'cpu'}"
             f", backend {args.backend}, bf16 autocast, channels_last, {args.repeats} {unit}s, each alone",
             f"host ms a {unit} (median, min-max): {statistics.median(host):.3f} ({min(host):.3f}-{max(host):.3f})"]
    if cuda:
        late = (f"; {measured.late} of {len(gpu)} outlasted the wait queued before them, their times include host "
                f"time" if measured.late else "")
        lines.append(f"gpu ms a {unit} (median, min-max): {statistics.median(gpu):.3f} ({min(gpu):.3f}-{max(gpu):.3f})"
                     f"  -> {'HOST-BOUND' if statistics.median(host) > statistics.median(gpu) else 'gpu-bound'}{late}")
    lines += ["", "host ms per top-level module's forward (median):"]
    lines += [f"  {name:24} {statistics.median(t) * 1e3:8.3f}" for name, t in times.items() if t]
    waits = [e for e in averages if e.key in _WAITS or e.key.startswith("cudaMemcpy")]
    lines += ["", f"calls that can make the host wait (over 3 {unit}s):"]
    lines += [f"  {e.key:32} {e.count:6d} calls  {e.cpu_time_total / 1e3:9.3f} ms" for e in waits] or ["  none"]
    lines += ["", f"ops by self CPU time (3 {unit}s):", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if cuda:  # the kernels' own time: what a forward would take were the host never late
        lines += ["", f"ops by self GPU time (3 {unit}s):",
                  averages.table(sort_by="self_device_time_total", row_limit=30)]
    text = "\n".join(lines)
    (args.out / "profile.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
