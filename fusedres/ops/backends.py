"""Which implementation of the four stage kernels (and of BatchNorm's per-channel arithmetic) runs a call.

A backend is a namespace with the stages ``channel_stats``, ``act_forward``, ``backward_reduce`` and
``backward_apply`` and the per-channel ``affine``, ``finish_batch_stats`` and ``backward_coefficients``, as
specified in ``torch_backend.py``:

- ``cuda``:   the compiled extension ``fusedres._C`` (csrc/), CUDA tensors, fp32/fp16/bf16.
- ``triton``: ``fusedres.triton.bn_act``, CUDA tensors (CPU tensors under TRITON_INTERPRET=1).
- ``torch``:  ``torch_backend``, any device and dtype.

The choice is made at call time: an explicit backend name wins; ``"auto"`` reads the
``FUSEDRES_BACKEND`` environment variable and otherwise takes the first available of
cuda, triton, torch for the tensor's device and dtype. A dtype a kernel does not support
(fp64) falls back to ``torch``. Asking by name for a backend that cannot run raises.
"""

import contextlib
import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

from . import torch_backend

BACKENDS = ("cuda", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str]:
    """(module or None, reason it is unavailable); imported once per process."""
    if name == "torch":
        return torch_backend, "pure PyTorch, always available"
    if name == "cuda":
        from .._extension import extension_status

        return extension_status()
    try:
        module = importlib.import_module("fusedres.triton.bn_act")
    except Exception as exc:  # triton missing or broken: report why, never fail the import
        return None, f"cannot import triton kernels: {type(exc).__name__}: {exc}"
    return module, f"triton {importlib.import_module('triton').__version__}"


@functools.lru_cache(maxsize=None)
def triton_conv(module: str = "conv") -> tuple[ModuleType | None, str]:
    """(``fusedres.triton.<module>`` or None, why it is unavailable), imported once per process: "conv" (the
    conv), "conv_dgrad" (its input gradient) or "conv_wgrad" (its weight gradient). The convs are not a backend of the
    four stages: the ops that run a conv choose it separately."""
    try:
        return importlib.import_module(f"fusedres.triton.{module}"), ""
    except Exception as exc:  # triton missing or broken: that implementation is unavailable
        return None, f"cannot import fusedres.triton.{module}: {type(exc).__name__}: {exc}"


def requested_backend(name: str) -> str:
    """The backend a call asking for ``name`` asks for: ``FUSEDRES_BACKEND`` stands in for "auto"."""
    return os.environ.get("FUSEDRES_BACKEND", "auto") if name == "auto" else name


def measured(t: torch.Tensor) -> bool:
    """Whether the "auto" backend times the implementations of a call on ``t`` (``ops/dispatch.py``) and
    keeps the fastest: on CUDA tensors; elsewhere it runs torch's."""
    return t.device.type == "cuda"


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is dense channels_last and not also NCHW-contiguous (size-1 C or H * W make both
    formats coincide; those count as NCHW)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives a conv's operands on ``device_type``, or None where autocast is off or does
    not exist for that device type (meta, say, where ``torch.is_autocast_enabled`` raises). Traced by
    torch.compile, the device is a real one and the availability check is skipped: torch 2.11's dynamo
    cannot trace ``torch.amp.is_autocast_available`` (a graph break at every call)."""
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream: a tensor made then is filled only
    when the graph replays, so it may serve that call alone (nothing made then is kept for later calls)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def on_device(device: torch.device):
    """A context in which ``device`` is torch's current CUDA device (``torch.cuda.device``), for work on tensors of a
    GPU that may not be the current one (a model moved to "cuda:1" without ``torch.cuda.set_device``); nothing for
    another device type, or before CUDA has started, when no tensor is on a GPU (the tests' stand-ins for one)."""
    cuda = device.type == "cuda" and torch.cuda.is_initialized()
    return torch.cuda.device(device) if cuda else contextlib.nullcontext()


def conv_allows_tf32() -> bool:
    """Whether torch's own conv may use TF32: torch >= 2.9 resolves cudnn.conv.fp32_precision through its
    parents ("none" inherits, and reading the legacy cudnn.allow_tf32 raises once the two APIs were mixed);
    older torch has only cudnn.allow_tf32."""
    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):
        return bool(cudnn.allow_tf32)
    for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def conv_flags(dtype: torch.dtype) -> tuple[bool, Optional[bool]]:
    """torch's flags that decide which convs may run a call in ``dtype``, for measured-dispatch signatures:
    (cuDNN enabled, TF32 allowed for convs; None unless ``dtype`` is float32)."""
    return torch.backends.cudnn.enabled, conv_allows_tf32() if dtype == torch.float32 else None


def describe_conv_flags(flags: tuple[bool, Optional[bool]]) -> str:
    """``conv_flags``' text in a dispatch key: "cudnn1", or "cudnn1|tf32{0,1}" for float32."""
    cudnn_enabled, tf32 = flags
    return f"cudnn{int(cudnn_enabled)}" + ("" if tf32 is None else f"|tf32{int(tf32)}")


def refresh() -> None:
    """Forget cached availability (after ``fusedres.build_extension()``)."""
    _load.cache_clear()


def triton_interpreted() -> bool:
    """Whether triton runs its kernels in its interpreter (TRITON_INTERPRET, read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


# why "auto" takes no backend that would run in Triton's interpreter (``interpreted_only``)
INTERPRETER_NOT_AUTO = ("Triton's interpreter (TRITON_INTERPRET=1) runs for backend='triton' only, "
                        "never chosen by 'auto'")


def interpreted_only(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` would run on ``device`` in Triton's interpreter, which is for tests: available to
    calls naming it, never an automatic choice (INTERPRETER_NOT_AUTO)."""
    return name == "triton" and device.type != "cuda"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"fusedres: unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")
    module, reason = _load(name)
    if module is None:
        return reason
    if name == "cuda" and device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, got a tensor on {device}"
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        return f"triton kernels run on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}"
    return None


class BackendUnavailableError(RuntimeError):
    """A call named a backend that cannot run on its device (``select``): a failure of fusedres's set-up, not of
    the call's arguments, which eager torch would have run."""


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def select(requested: str, tensor: torch.Tensor) -> ModuleType:
    """The backend namespace that runs a call on ``tensor``."""
    name = requested_backend(requested)
    if name == "auto":
        if tensor.is_cuda and _load("cuda")[0] is None:
            _warn_once(f"fusedres: CUDA backend unavailable ({_load('cuda')[1]}); using Triton/PyTorch.")
        for candidate in BACKENDS:
            if unavailable_reason(candidate, tensor.device) is None and (
                candidate == "torch" or tensor.dtype in KERNEL_DTYPES
            ):
                if interpreted_only(candidate, tensor.device):
                    continue
                return _load(candidate)[0]
    reason = unavailable_reason(name, tensor.device)
    if reason is not None:
        raise BackendUnavailableError(f"fusedres: backend {name!r} is not available: {reason}")
    if tensor.dtype not in KERNEL_DTYPES:
        return torch_backend
    return _load(name)[0]
