"""Command line: ``python -m fusedres info`` and ``python -m fusedres demo``."""

import argparse
import copy
import statistics
import time

import torch

import fusedres


def demo(model_name: str, steps: int, batch: int | None, size: int | None) -> None:
    """Convert a torchvision ResNet, train it a few SGD steps next to the original, compare; then both models'
    batch-1 inference latency."""
    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = batch or (64 if cuda else 4)
    size = size or (224 if cuda else 64)
    torch.manual_seed(0)
    eager = getattr(torchvision.models, model_name)(num_classes=100).to(device)
    if cuda:
        eager = eager.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(eager)
    print(fusedres.convert(fused))
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    with autocast:  # the first step then only times its Triton kernels (none compile on CPU)
        print(fusedres.precompile(fused, x))
    print(f"\n{model_name}, batch {batch}, {size}x{size}, {device}"
          f"{' (bf16 autocast, channels_last)' if cuda else ' (fp32; CPU timings)'}")
    print(f"{'step':>4} {'eager loss':>11} {'fused loss':>11} {'eager ms':>9} {'fused ms':>9}")
    optims = {m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (eager, fused)}
    for step in range(steps):
        row = []
        for model in (eager, fused):
            def train_step():
                with autocast:
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                optims[model].step()
                optims[model].zero_grad(set_to_none=True)
                return loss

            loss, ms = _timed(train_step, cuda)
            row.append((loss.item(), ms))
        (le, te), (lf, tf) = row
        print(f"{step:>4} {le:>11.5f} {lf:>11.5f} {te:>9.1f} {tf:>9.1f}")
    inference_latency(eager, fused, x[:1], autocast)
    print("\nFor trustworthy timings (warm-up, medians, torch.compile, memory) run the benchmarks.")


def inference_latency(eager: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor, autocast) -> None:
    """Both models in eval mode on one image: the median wall clock of a forward, and on a GPU the converted
    model's forward replayed from a CUDA graph too (``fusedres.cuda_graphed``); each output's error against the
    eager model in float64, eager's own error the yardstick of the rounding. The converted model first takes
    eager's weights and statistics, which training's rounding has moved apart (same state_dict keys)."""
    cuda = x.is_cuda
    fused.load_state_dict(eager.state_dict())
    eager.eval(), fused.eval()
    with autocast:
        forwards = {"eager": eager, "fused": fused}
        if cuda:
            forwards["fused, CUDA graph"] = fusedres.cuda_graphed(fused, x)
    print(f"\ninference, batch 1, eval mode, eager's weights: median of 20 forwards"
          f"{'' if cuda else ' (CUDA graph: GPU only)'}; error against eager in float64")
    print(f"{'':>18} {'ms':>8} {'max |out - fp64|':>18}")
    with torch.no_grad():
        expected = copy.deepcopy(eager).double()(x.double())
        for name, forward in forwards.items():
            def infer():
                with autocast:
                    return forward(x)

            runs = [_timed(infer, cuda) for _ in range(25)][5:]  # 5 to warm up
            difference = (runs[-1][0].double() - expected).abs().max().item()
            print(f"{name:>18} {statistics.median(ms for _, ms in runs):>8.2f} {difference:>18.2e}")


def _timed(fn, cuda: bool):
    """(fn(), its wall-clock ms), the GPU synchronised before and after."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fusedres")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends are available and why not")
    demo_parser = sub.add_parser("demo", help="convert a torchvision ResNet and train it beside the original")
    demo_parser.add_argument("--model", default="resnet18")
    demo_parser.add_argument("--steps", type=int, default=5)
    demo_parser.add_argument("--batch", type=int)
    demo_parser.add_argument("--size", type=int)
    args = parser.parse_args()
    if args.command == "info":
        fusedres.info()
    else:
        fusedres.info()
        print()
        demo(args.model, args.steps, args.batch, args.size)


if __name__ == "__main__":
    main()
