"""fusedres.cuda_graphed: a model's inference forward replayed from one CUDA graph.

    fusedres.convert(model)
    model.eval()
    with torch.autocast("cuda", torch.bfloat16):   # optional: the capture keeps the autocast state it ran under
        forward = fusedres.cuda_graphed(model, x)    # x: an example batch on the GPU
    out = forward(x2)                               # x2: x's shape, dtype and device (any strides)

At small batches a forward is host-bound: each of ResNet-50's ~50 conv units spends tens of microseconds of
Python choosing and launching a kernel that runs for a few. A CUDA graph records the launches of one forward and
replays them all from one call, so the forward costs what the GPU takes. This is torch's own capture
(``torch.cuda.graph``) with what a converted model needs around it:

- The forward runs ``warmup`` times on a side stream before the capture, so the measured dispatch has made its
  choices, the Triton kernels are tuned and compiled and the BatchNorms folded; the capture then records the
  choices the warm-up made (the dispatch measures nothing while a graph is captured). Both run inside
  ``dispatch.for_graph_replay()``: a replay runs the kernels without the host work that launched them, so the
  dispatch times each implementation by its GPU work alone, and keeps those choices apart from eager calls'.
- The graph reads its inputs from buffers of its own and writes its outputs to tensors of its own. A call
  copies its inputs into those buffers and returns those very output tensors, which the next call overwrites
  (``.clone()`` what must be kept).
- The graph computes with the model as it was when it was captured: its modules, their weights (for a converted
  model: the folded conv weights, made from them) and their settings. A call raises when any of these changed
  since: a module, parameter or buffer replaced, put where there was None, or removed; a parameter or
  buffer changed in place (an optimizer step, ``load_state_dict``, ``.to``); any step of an optimizer with
  ``fused=True``, whose writes move no version counter (even one that trained another model); a module's training
  flag (``model.train()``); a BatchNorm's ``eps``, ``momentum`` or ``track_running_stats``. Capture again then.
  Writes through ``.data`` and other attributes of the modules (a conv's ``stride``, a new ``forward``) are not
  seen.
- Inference only: the model and every module in it must be in eval mode, and the forward runs without
  autograd.
"""

import contextlib
import operator
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .ops import backends, dispatch
from .ops.writes import fused_optimizer_steps

_VERSION = operator.attrgetter("_version")
_TRAINING = operator.attrgetter("training")
_BATCH_NORM_FIELDS = ("eps", "momentum", "track_running_stats")
_BATCH_NORM_SETTINGS = operator.attrgetter(*_BATCH_NORM_FIELDS)
# capture(forward) -> (replay, outputs): records forward() once; replay() then recomputes outputs in place
Capture = Callable[[Callable[[], Any]], tuple[Callable[[], None], Any]]


def _capture_cuda_graph(forward: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = forward()
    return graph.replay, outputs


class CudaGraphedForward:
    """``model(*inputs)`` replayed from one captured graph; made by ``cuda_graphed`` (see the module docstring).
    ``capture`` is how the forward is recorded: a CUDA graph, or the tests' stand-in for one on CPU."""

    def __init__(self, model: nn.Module, inputs: tuple[Tensor, ...], warmup: int, capture: Capture):
        self._static_inputs = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                                    .copy_(t) for t in inputs)

        def forward():
            with torch.no_grad():
                return model(*self._static_inputs)

        # What the graph computes with, each with the dict and the key that hold it: every child module, parameter
        # and buffer, and the slots that hold None; and which children each module had (a module or tensor put in
        # a slot that held None, or a child put where an attribute was None, as a block's downsample, would go
        # unused)
        named = list(model.named_modules())
        self._prefixes, self._modules = [name for name, _ in named], [module for _, module in named]
        slots = [(_qualified(prefix, key), holder, key) for prefix, module in named
                 for holder in (module._modules, module._parameters, module._buffers) for key in holder]
        self._names, self._dicts, self._keys = (list(column) for column in zip(*slots))
        self._held = list(map(dict.get, self._dicts, self._keys))
        self._children = [module._modules for module in self._modules]
        self._child_keys = [set(children) for children in self._children]
        tensors = [(name, t) for name, t in zip(self._names, self._held) if isinstance(t, Tensor)]
        self._tensor_names, self._tensors = [name for name, _ in tensors], [t for _, t in tensors]
        if any(t.is_inference() for t in self._tensors):
            raise ValueError("fusedres.cuda_graphed: the model holds tensors made under torch.inference_mode, "
                             "which keep no version counter, so a change to them could not be seen; make the "
                             "model's parameters and buffers outside inference_mode")
        # How it computes: every module's training flag (the graph runs the eval forward) and every BatchNorm's
        # settings (its eps is folded into its conv's weights)
        batch_norms = [(name, m) for name, m in named if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._batch_norm_names, self._batch_norms = [name for name, _ in batch_norms], [m for _, m in batch_norms]
        device = inputs[0].device
        with backends.on_device(device):  # the inputs' GPU
            with dispatch.for_graph_replay():  # choices timed by their GPU work: a replay runs no host work
                with _side_stream(device):  # the warm-up's one-off work (allocations, cuDNN set-up) away from it
                    for _ in range(warmup):
                        forward()
                self._replay, self._outputs = capture(forward)
        self._snapshot = self._state()

    def _state(self) -> tuple[list, list, list, list, list, int]:
        """What a change since the capture shows in: the parameters' and buffers' version counters and addresses
        (``.to`` swaps a parameter's ``.data``), the modules' training flags, the BatchNorms' settings, the
        modules' numbers of children and the steps of fused optimizers (``fused=True``, whose writes move no
        version counter: any such step counts, whichever parameters it updated).
        With the check that each child module, parameter and buffer is still the one captured, ~75 us for a
        converted ResNet-50 (135 modules, 320 tensors) on a 2-core CPU, where launching its 16 blocks' kernels
        one by one takes ~3.8 ms (``python -m benchmarks.host_overhead --resnet50``)."""
        return (list(map(_VERSION, self._tensors)), list(map(Tensor.data_ptr, self._tensors)),
                list(map(_TRAINING, self._modules)), list(map(_BATCH_NORM_SETTINGS, self._batch_norms)),
                list(map(len, self._children)), fused_optimizer_steps())

    def _changes(self) -> Iterator[str]:
        """What differs from the capture, for the error."""
        for name, held, now in zip(self._names, self._held, map(dict.get, self._dicts, self._keys)):
            if now is not held:
                yield f"{name} was {'removed' if now is None else 'added' if held is None else 'replaced'}"
        for prefix, children, keys in zip(self._prefixes, self._children, self._child_keys):
            yield from (f"{_qualified(prefix, key)} was added" for key in children.keys() - keys)
        (versions, pointers, training, settings, _, steps), captured = self._state(), self._snapshot
        if steps != captured[5]:
            yield "an optimizer with fused=True took a step, which moves no version counter"
        for name, now, then in zip(self._tensor_names, zip(versions, pointers), zip(*captured[:2])):
            if now != then:
                yield f"{name} was changed in place or given new data"
        for name, now, then in zip(self._prefixes, training, captured[2]):
            if now != then:
                yield f"{name or 'the model'} was switched to {'training' if now else 'eval'} mode"
        for name, now, then in zip(self._batch_norm_names, settings, captured[3]):
            yield from (f"{name}.{field} was changed from {old!r} to {new!r}"
                        for field, new, old in zip(_BATCH_NORM_FIELDS, now, then) if new != old)

    def __call__(self, *inputs: Tensor) -> Any:
        """The outputs of ``model(*inputs)``: the graph's own tensors, overwritten by the next call."""
        _check_inputs("fusedres.cuda_graphed: calling the graph", inputs, self._static_inputs)
        if not (all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._held))
                and self._state() == self._snapshot):
            raise RuntimeError(f"fusedres.cuda_graphed: the model changed since the graph was captured "
                               f"({next(self._changes())}), and the graph would still compute as it was then; "
                               "capture the graph again (fusedres.cuda_graphed(model, ...))")
        for static, t in zip(self._static_inputs, inputs):
            static.copy_(t)
        self._replay()
        return self._outputs


def _qualified(prefix: str, key: str) -> str:
    """The name of a module's child, parameter or buffer in the model, as ``named_modules`` names modules."""
    return f"{prefix}.{key}" if prefix else key


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """On CUDA, a new stream that starts after the current one's work and that the current one then waits for."""
    if device.type != "cuda":
        yield
        return
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _check_inputs(fn: str, inputs: tuple, examples: tuple) -> None:
    if len(inputs) != len(examples):
        raise TypeError(f"{fn}: expected {len(examples)} input tensor(s), as captured, got {len(inputs)}")
    for i, (t, example) in enumerate(zip(inputs, examples)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: expected input {i} to be a Tensor, got {type(t).__name__}")
        for what, got, want in (("size", tuple(t.shape), tuple(example.shape)), ("dtype", t.dtype, example.dtype),
                                ("device", t.device, example.device)):
            if got != want:
                raise ValueError(f"{fn}: input {i} has {what} {got}, but the graph was captured for {want}; "
                                 "capture a graph per input size, dtype and device")


def cuda_graphed(model: nn.Module, *inputs: Tensor, warmup: int = 3) -> CudaGraphedForward:
    """A callable that replays ``model(*inputs)`` from one CUDA graph, for inputs of the same sizes, dtypes and
    device; see the module docstring. ``inputs``: example tensors on the GPU (their values are only run, not
    kept); ``warmup``: forwards run before the capture (at least 1)."""
    fn = "fusedres.cuda_graphed"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    training = next((name or "the model" for name, m in model.named_modules() if m.training), None)
    if training is not None:
        raise RuntimeError(f"{fn} is for inference: {training} is in training mode (call model.eval() first)")
    if not inputs:
        raise TypeError(f"{fn}: expected at least one example input tensor")
    _check_inputs(fn, inputs, inputs)  # every one a Tensor
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"{fn}: warmup must be a positive int (the capture records the choices the warm-up "
                         f"made), got {warmup!r}")
    devices = {t.device for t in inputs}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise RuntimeError(f"{fn}: CUDA graphs need the inputs on one CUDA device, got {sorted(map(str, devices))}")
    return CudaGraphedForward(model, inputs, warmup, _capture_cuda_graph)
