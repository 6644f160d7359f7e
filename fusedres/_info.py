"""``fusedres.info()`` / ``python -m fusedres info``: versions, GPU and backend availability."""

import importlib.metadata
import platform

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything ``info()`` prints, as a dict (also written into benchmark results)."""
    from .ops.backends import BACKENDS, INTERPRETER_NOT_AUTO, interpreted_only, unavailable_reason, _load

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    facts = {
        "fusedres": _version("fusedres"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU-only build)",
        "triton": _version("triton"),
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a",
        "GPU": "none",
        "backends": {},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["GPU"] = (f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                        f"{props.total_memory / 2**30:.0f} GiB)")
    for name in BACKENDS:
        reason = unavailable_reason(name, device)
        detail = _load(name)[1] if reason is None else reason
        if reason is None and interpreted_only(name, device):
            detail += f"; {INTERPRETER_NOT_AUTO}"
        facts["backends"][name] = {"available": reason is None, "detail": detail}
    return facts


def info(print_out: bool = True) -> dict:
    """Print (and return) versions, the GPU, and which backends are available and why not."""
    facts = collect()
    if print_out:
        for key, value in facts.items():
            if key != "backends":
                print(f"{key:>12}: {value}")
        print(f"{'backends':>12}: (on {'cuda' if torch.cuda.is_available() else 'cpu'} tensors)")
        for name, status in facts["backends"].items():
            mark = "available  " if status["available"] else "unavailable"
            print(f"{'':>14}{name:<7} {mark} {status['detail']}")
    return facts
