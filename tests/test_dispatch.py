"""fusedres.ops.dispatch.MeasuredDispatch, on CPU: a fake GPU name, and a timer that runs an
implementation once and takes what it returns as its time, so choosing touches no CUDA. The real
timer is tested on a GPU; conv_bias_act's use of the dispatch in test_inference_ops.py, the training
unit's conv choice here.
"""

import contextlib
import json
import multiprocessing
import threading

import pytest
import torch

from conftest import pretend_capturing, requires_cuda
from fusedres.ops.dispatch import MeasuredDispatch, preparing

DEVICE = torch.device("cuda", 0)
IMPLEMENTATIONS = ("a", "b", "c")


@pytest.fixture
def dispatch(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(fresh_dispatch, "_gpu_name", lambda index: f"FakeGPU{index}")
    monkeypatch.setattr(fresh_dispatch, "_time_ms", lambda fn: fn())
    return fresh_dispatch


@pytest.fixture
def cache_path(dispatch, monkeypatch, tmp_path):
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    return path


class Fake:
    """One call's implementations: each one's fake time (or the exception it raises), the reasons
    some cannot run it, and the names run, in order."""

    def __init__(self, timings, unavailable=None):
        self.timings, self.unavailable, self.runs = timings, unavailable or {}, []

    def choose(self, op, signature="sig", device=DEVICE):
        return op.choose(device, signature, self.unavailable.get, self.run)

    def run(self, name):
        self.runs.append(name)
        if isinstance(self.timings[name], Exception):
            raise self.timings[name]
        return self.timings[name]


def test_picks_the_fastest_once_per_key(dispatch):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    fake = Fake({"a": 3.0, "b": 1.0, "c": 2.0})
    assert fake.choose(op) == "b"
    assert fake.runs == ["a", "b", "c"]
    entry = {"choice": "b", "ms": {"a": 3.0, "b": 1.0, "c": 2.0}}
    assert op.table() == dispatch.dispatch_table() == {"op|FakeGPU0|sig": entry}
    assert fake.choose(op) == "b" and len(fake.runs) == 3  # known: not timed again
    fake.timings = {"a": 1.0, "b": 3.0, "c": 2.0}
    assert fake.choose(op, device=torch.device("cuda", 1)) == "a"  # another GPU is another key
    assert op.table()["op|FakeGPU1|sig"]["choice"] == "a"
    op.table()["op|FakeGPU0|sig"]["ms"]["b"] = 9.0  # tables are copies
    dispatch.dispatch_table()["op|FakeGPU0|sig"]["choice"] = "c"
    assert op.table()["op|FakeGPU0|sig"] == entry


def test_failing_implementation_recorded_and_never_chosen(dispatch):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    fake = Fake({"a": RuntimeError("no engine for this graph\nmore lines"), "b": 2.0, "c": 3.0})
    assert fake.choose(op) == "b"
    assert op.table()["op|FakeGPU0|sig"]["ms"]["a"] == "failed: RuntimeError: no engine for this graph"
    fake.timings = {name: ValueError(f"{name} broke") for name in IMPLEMENTATIONS}
    with pytest.raises(RuntimeError, match=r"op: no implementation could run this call \(other\): "
                                           "a: failed: ValueError: a broke; b: failed: .*; c: failed"):
        fake.choose(op, "other")
    assert list(op.table()) == ["op|FakeGPU0|sig"]  # nothing recorded for the failed call


def test_unavailable_recorded_with_reason_and_never_run(dispatch):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    fake = Fake({"a": 3.0, "b": 1.0, "c": 2.0}, unavailable={"b": "b needs a newer GPU"})
    assert fake.choose(op) == "c"
    assert fake.runs == ["a", "c"]
    assert op.table()["op|FakeGPU0|sig"]["ms"] == {"a": 3.0, "b": "unavailable: b needs a newer GPU", "c": 2.0}


def test_ops_with_the_same_signature_keep_separate_entries(dispatch):
    first, second = MeasuredDispatch("first", ("a", "b")), MeasuredDispatch("second", ("a", "b"))
    assert Fake({"a": 1.0, "b": 2.0}).choose(first) == "a"
    assert Fake({"a": 2.0, "b": 1.0}).choose(second) == "b"
    assert first.table() == {"first|FakeGPU0|sig": {"choice": "a", "ms": {"a": 1.0, "b": 2.0}}}
    assert second.table() == {"second|FakeGPU0|sig": {"choice": "b", "ms": {"a": 2.0, "b": 1.0}}}
    assert dispatch.dispatch_table() == {**first.table(), **second.table()}


@pytest.mark.parametrize("op, implementations, references", [("a|b", ("a",), ()), ("op", (), ()),
                                                                ("op", ("a", "b"), ("c",))],
                         ids=["bar", "empty", "unknown-reference"])
def test_rejects_bad_construction(op, implementations, references):
    with pytest.raises(ValueError, match="expected an op name without '|', at least one implementation and "
                                         "references among them"):
        MeasuredDispatch(op, implementations, references=references)


class Results(Fake):
    """A call whose implementations return results (``timings`` holds each one's result, or the exception it
    raises; the test's timer gives the times): ``compare`` records what it is given."""

    def choose(self, op, signature="sig", device=DEVICE):
        def compare(reference, result):
            self.compared.append((reference, result))
            return None if result == reference else f"{result} is not {reference}"

        self.compared = []
        return op.choose(device, signature, self.unavailable.get, self.run, compare)


def timer(monkeypatch, dispatch, times: dict) -> list:
    """Patch the dispatch's timer to give each implementation its time from ``times`` without running it; the
    names timed, in order, are the list returned."""
    timed = []
    monkeypatch.setattr(dispatch, "_time_ms", lambda fn: timed.append(fn.args[0]) or times[fn.args[0]])
    return timed


def test_an_implementation_whose_result_disagrees_with_the_reference_is_never_chosen(dispatch, monkeypatch):
    """Speed does not choose a wrong result: the reference runs first, the others' results are compared with
    it before they are timed, and one that disagrees is recorded as failed, warned of and never chosen, however
    fast. Agreeing ones are timed as before."""
    timed = timer(monkeypatch, dispatch, {"a": 1.0, "b": 2.0, "c": 3.0})
    op = MeasuredDispatch("op", IMPLEMENTATIONS, references=("c",))
    fake = Results({"a": "wrong", "b": "right", "c": "right"})
    with pytest.warns(RuntimeWarning, match=r"fusedres: op: 'a' disagrees with 'c' on this call \(sig\): wrong is "
                                            r"not right; it will not run this call\. This is a fusedres bug"):
        assert fake.choose(op) == "b"
    assert fake.runs == ["c", "a", "b"]  # the reference first
    assert fake.compared == [("right", "wrong"), ("right", "right")]
    assert timed == ["c", "b"]  # a is never timed
    entry = op.table()["op|FakeGPU0|sig"]
    assert entry == {"choice": "b", "ms": {"a": "failed: disagrees with c: wrong is not right", "b": 2.0, "c": 3.0}}
    assert list(entry["ms"]) == list(IMPLEMENTATIONS)  # listed in the fixed order, whatever ran first
    assert fake.choose(op) == "b" and fake.runs == ["c", "a", "b"]  # known: neither run nor compared again


def test_results_are_checked_against_the_first_reference_that_runs(dispatch, monkeypatch):
    """A reference that cannot run or fails leaves the next one the reference; with none, the others are
    timed unchecked (nothing to check them against); without a compare nothing is run but the timings."""
    timed = timer(monkeypatch, dispatch, {"a": 1.0, "b": 2.0, "c": 3.0})
    op = MeasuredDispatch("op", IMPLEMENTATIONS, references=("b", "c"))
    fake = Results({"a": "x", "b": RuntimeError("b broke"), "c": "x"})
    assert fake.choose(op) == "a"
    assert fake.runs == ["b", "c", "a"] and fake.compared == [("x", "x")]
    assert op.table()["op|FakeGPU0|sig"]["ms"]["b"] == "failed: RuntimeError: b broke"
    fake = Results({"a": "y", "b": "x", "c": "x"}, unavailable={"b": "no b here"})
    with pytest.warns(RuntimeWarning, match="'a' disagrees with 'c'"):
        assert fake.choose(op, "other") == "c"
    fake = Results({"a": "y", "b": "x", "c": "x"}, unavailable={"b": "no b", "c": "no c"})
    assert fake.choose(op, "third") == "a" and fake.compared == [] and fake.runs == ["a"]
    timed.clear()
    plain = Fake({"a": "y", "b": "x", "c": "x"})
    assert plain.choose(op, "plain") == "a" and plain.runs == []  # no compare: only timed, in the fixed order
    assert timed == ["a", "b", "c"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mismatch_allows_rounding_and_names_what_differs(dtype):
    """``mismatch``: a result an ulp away from the reference everywhere agrees with it; one with a wrong element,
    another shape or a non-finite element where the reference is finite does not, and says so."""
    from fusedres.ops.dispatch import mismatch, tolerance

    torch.manual_seed(0)
    reference = torch.randn(4, 8, 5, 5).to(dtype)
    ulp = torch.finfo(dtype).eps * reference.abs().float()
    assert mismatch("y", reference, (reference.float() + ulp).to(dtype)) is None
    assert mismatch("y", reference, (reference.float() - ulp).to(dtype)) is None
    assert mismatch("y", reference[:0], reference[:0]) is None
    scale = reference.abs().max().item()
    wrong = reference.clone()
    wrong[1, 3, 2, 2] += 4 * tolerance(dtype) * scale
    assert mismatch("y", reference, wrong) == (
        f"y differs by up to {4 * tolerance(dtype) * scale:.3g} where {tolerance(dtype) * scale:.3g} is allowed "
        f"(scale {scale:.3g})")
    assert mismatch("y", reference, wrong, scale=8 * scale) is None  # a scale of the caller's
    assert mismatch("the mean", reference.float(), wrong.float(), dtype=dtype).startswith("the mean differs")
    assert mismatch("y", reference, reference[:, :4]) == "y has shape [4, 4, 5, 5], expected [4, 8, 5, 5]"
    nan = reference.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert mismatch("y", reference, nan) == "y is finite at 1 element(s) where the reference is not, or the reverse"
    assert mismatch("y", nan, nan) is None  # NaN where the reference has NaN
    assert mismatch("y", nan, reference) is not None


def test_disk_cache_round_trip_across_processes(dispatch, cache_path):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    assert Fake({"a": 3.0, "b": 1.0, "c": 2.0}).choose(op) == "b"
    entries = json.loads(cache_path.read_text())
    assert entries == op.table()
    # Another process adds an entry after this one read the file: writing keeps it.
    cache_path.write_text(json.dumps({**entries, "op|FakeGPU0|theirs": {"choice": "c", "ms": {}}}))
    assert Fake({"a": 1.0, "b": 2.0, "c": 3.0}).choose(op, "mine") == "a"
    assert sorted(json.loads(cache_path.read_text())) == ["op|FakeGPU0|mine", "op|FakeGPU0|sig",
                                                          "op|FakeGPU0|theirs"]
    assert [p.name for p in cache_path.parent.iterdir()] == [cache_path.name]  # no temporary file left

    dispatch.reset()  # a new process: the file answers, nothing is timed
    fake = Fake({"a": 1.0, "b": 2.0, "c": 3.0})
    assert [fake.choose(op, signature) for signature in ("sig", "theirs")] == ["b", "c"]
    assert fake.runs == []
    assert op.table()["op|FakeGPU0|sig"] == entries["op|FakeGPU0|sig"]


@pytest.mark.parametrize("stale", ["now_unavailable", "unknown_choice", "not_an_entry", "not_json"])
def test_untrusted_disk_entry_measured_again(dispatch, cache_path, stale):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    entry = {"now_unavailable": {"choice": "b", "ms": {}}, "unknown_choice": {"choice": "d", "ms": {}},
             "not_an_entry": "b"}.get(stale)
    cache_path.write_text("{not json" if stale == "not_json" else json.dumps({"op|FakeGPU0|sig": entry}))
    fake = Fake({"a": 2.0, "b": 1.0, "c": 3.0}, unavailable={"b": "gone"} if stale == "now_unavailable" else {})
    expected = "a" if stale == "now_unavailable" else "b"
    assert fake.choose(op) == expected
    assert fake.runs == (["a", "c"] if stale == "now_unavailable" else ["a", "b", "c"])
    assert json.loads(cache_path.read_text()) == op.table()
    assert op.table()["op|FakeGPU0|sig"]["choice"] == expected


@pytest.mark.parametrize("where", ["missing_directory", "a_directory", "replace_fails"])
def test_an_unwritable_cache_file_warns_once_and_the_call_goes_on(dispatch, monkeypatch, tmp_path, where):
    """The file only saves measuring again: a write that fails costs a warning (once per file, naming it and
    the error), never the op call, and leaves no temporary file."""
    path = tmp_path / {"missing_directory": "missing/dispatch.json", "a_directory": "directory",
                       "replace_fails": "dispatch.json"}[where]
    (tmp_path / "directory").mkdir()
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    if where == "replace_fails":
        def replace(src, dst):
            raise PermissionError(13, "Permission denied", dst)

        monkeypatch.setattr(dispatch.os, "replace", replace)
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    with pytest.warns(RuntimeWarning) as warned:
        assert Fake({"a": 3.0, "b": 1.0, "c": 2.0}).choose(op) == "b"
        assert Fake({"a": 1.0, "b": 3.0, "c": 2.0}).choose(op, "other") == "a"
    error = {"missing_directory": "FileNotFoundError", "a_directory": "IsADirectoryError",
             "replace_fails": "PermissionError"}[where]
    assert len(warned) == 1
    assert str(warned[0].message).startswith(
        f"fusedres: cannot write the dispatch cache {str(path)!r} (FUSEDRES_DISPATCH_CACHE): {error}: ")
    assert sorted(op.table()) == ["op|FakeGPU0|other", "op|FakeGPU0|sig"]  # kept in this process
    assert Fake({}).choose(op) == "b"
    # Nothing left but what a failed replace leaves: the file its lock made, still without entries.
    left = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert left == ({"dispatch.json": ""} if where == "replace_fails" else {})


def _record(op, names):
    """Measure (with the fake timer) and record a new signature per name: what each writer of the file does."""
    for name in names:
        Fake({"a": 2.0, "b": 1.0, "c": 3.0}).choose(op, name)


def test_threads_writing_the_cache_file_keep_every_entry(dispatch, cache_path):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    errors = []

    def writer(thread):
        try:
            _record(op, [f"t{thread}-{i}" for i in range(25)])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(json.loads(cache_path.read_text())) == sorted(op.table()) and len(op.table()) == 100
    assert [p.name for p in cache_path.parent.iterdir()] == [cache_path.name]


def test_processes_writing_the_cache_file_keep_every_entry(dispatch, cache_path):
    """Processes (forked, with this one's fakes) that write at once: each keeps the others' entries."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(3)

    def writer(process):
        start.wait()
        _record(MeasuredDispatch("op", IMPLEMENTATIONS), [f"p{process}-{i}" for i in range(40)])

    processes = [context.Process(target=writer, args=(process,)) for process in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert sorted(json.loads(cache_path.read_text())) == sorted(
        f"op|FakeGPU0|p{process}-{i}" for process in range(3) for i in range(40))
    assert [p.name for p in cache_path.parent.iterdir()] == [cache_path.name]


@pytest.mark.parametrize("mode", ["capturing", "compiling"])
def test_capturing_or_compiling_takes_the_fixed_order_and_records_nothing(dispatch, cache_path, monkeypatch,
                                                                          mode):
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    fake = Fake({"a": 3.0, "b": 2.0, "c": 1.0}, unavailable={"a": "no a here"})
    assert fake.choose(op, "known") == "c"
    fake.runs.clear()
    if mode == "capturing":
        pretend_capturing(monkeypatch)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fake.choose(op, "new") == "b"  # the first available, though "c" is faster
    assert fake.choose(op, "known") == "c"  # a known choice still answers
    dispatch.reset()
    assert fake.choose(op, "known") == "c"  # also one from the file
    assert fake.runs == []
    assert list(op.table()) == list(json.loads(cache_path.read_text())) == ["op|FakeGPU0|known"]
    fake.unavailable = {name: "none here" for name in IMPLEMENTATIONS}
    with pytest.raises(RuntimeError, match=r"op: no implementation can run this call \(new\)"):
        fake.choose(op, "new")


def test_choices_for_a_graph_replay_are_measured_and_kept_apart(dispatch, cache_path):
    """A forward replayed from a CUDA graph runs no host work, so its choices are timed by GPU work alone and
    kept under keys of their own; outside ``for_graph_replay`` the eager choices answer as before."""
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    eager = Fake({"a": 3.0, "b": 1.0, "c": 2.0})  # a host-bound call: b's host time is lower
    replay = Fake({"a": 3.0, "b": 2.0, "c": 0.5})  # its GPU work alone: c's is less
    assert eager.choose(op) == "b" and dispatch.graph_replay() is False
    with dispatch.for_graph_replay():
        assert dispatch.graph_replay() is True
        assert replay.choose(op) == "c" and replay.runs == ["a", "b", "c"]
        assert replay.choose(op) == "c" and len(replay.runs) == 3  # known: not timed again
        assert op.kept(DEVICE, "sig") == "c"
        with dispatch.for_graph_replay():
            pass
        assert dispatch.graph_replay() is True  # an inner one leaves the outer one on
    assert dispatch.graph_replay() is False
    assert eager.choose(op) == "b" and len(eager.runs) == 3 and op.kept(DEVICE, "sig") == "b"
    assert op.table() == {"op|FakeGPU0|sig": {"choice": "b", "ms": {"a": 3.0, "b": 1.0, "c": 2.0}},
                          "op|FakeGPU0|sig|graph": {"choice": "c", "ms": {"a": 3.0, "b": 2.0, "c": 0.5}}}
    assert json.loads(cache_path.read_text()) == op.table()
    dispatch.reset()  # a new process: the file answers both
    with dispatch.for_graph_replay():
        assert Fake({}).choose(op) == "c"
    assert Fake({}).choose(op) == "b"


def test_time_ms_queues_a_wait_covering_the_timed_calls_host_time_and_takes_the_longer_of_host_and_gpu(
        fresh_dispatch, monkeypatch):
    """After the warm-up, one more call's host time is taken, and a wait of twice the timed calls' host time is
    queued before them, so the host queues their launches before the GPU reaches them and the events time their
    GPU work alone. An eager call costs the longer of its GPU work and its host time; a graph replay's, its GPU
    work (CUDA faked: the order of the GPU's work is what is checked)."""
    dispatch = fresh_dispatch
    gpu_work = []
    gpu_ms = [0.125]

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            gpu_work.append("event")

        def elapsed_time(self, end):
            return gpu_ms[0]

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: gpu_work.append(("sleep", cycles)))
    monkeypatch.setattr(dispatch, "_CYCLES_PER_MS", {"cuda:0": 1000.0})
    clock = [0.0]

    def perf_counter():  # each call's host part takes 2**-12 s (0.244 ms)
        clock[0] += 2**-12
        return clock[0]

    monkeypatch.setattr(dispatch.time, "perf_counter", perf_counter)

    def call():
        gpu_work.append("call")

    hold = ("sleep", int(2 * dispatch._REPS * 0.244140625 * 1000.0))
    timed = ["call"] * (dispatch._WARMUP + 1) + [hold] + ["event", "call", "event"] * dispatch._REPS
    assert dispatch._time_ms(call) == 0.244140625 and gpu_work == timed  # host-bound: the host's time
    gpu_work.clear()
    gpu_ms[0] = 0.5
    assert dispatch._time_ms(call) == 0.5 and gpu_work == timed  # the GPU's
    gpu_work.clear()
    gpu_ms[0] = 0.125
    with dispatch.for_graph_replay():
        assert dispatch._time_ms(call) == 0.125 and gpu_work == timed  # a replay runs no host work


def test_a_prepare_pass_runs_each_available_implementation_inside_its_context_and_records_nothing(
        dispatch, cache_path, monkeypatch):
    """fusedres.precompile's pass: a new signature runs every available implementation once inside the pass's
    context (where the Triton kernels only start compiling) and takes the first in the fixed order that ran,
    measuring and recording nothing; a known signature keeps its choice; after the pass it is measured."""
    op = MeasuredDispatch("op", IMPLEMENTATIONS)
    inside = []

    @contextlib.contextmanager
    def prepare():
        inside.append(True)
        yield
        inside.pop()

    class InPass(Fake):
        def run(self, name):
            self.runs.append((name, bool(inside)))
            if isinstance(self.timings[name], Exception):
                raise self.timings[name]
            return self.timings[name]

    known = Fake({"a": 3.0, "b": 2.0, "c": 1.0})
    assert known.choose(op, "known") == "c"
    fake = InPass({"a": 3.0, "b": RuntimeError("no engine"), "c": 1.0})
    with preparing(prepare):
        assert fake.choose(op) == "a"
        assert InPass({"a": 3.0, "b": 2.0, "c": 1.0}, unavailable={"a": "no"}).choose(op) == "b"
        assert InPass({"a": RuntimeError("x"), "b": RuntimeError("y"), "c": 1.0}).choose(op) == "c"
        assert known.choose(op, "known") == "c" and len(known.runs) == 3  # not run again
        with pytest.raises(RuntimeError, match="already running"), preparing(prepare):
            pass
        with pytest.raises(RuntimeError, match="no implementation can run this call"):
            Fake({}, unavailable=dict.fromkeys(IMPLEMENTATIONS, "no")).choose(op, "none")
        capturing = InPass({"a": 3.0, "b": 2.0, "c": 1.0})
        with monkeypatch.context() as patch:
            pretend_capturing(patch)  # a CUDA graph capture in the pass: nothing runs but the call
            assert capturing.choose(op, "captured") == "a" and capturing.runs == []
    assert fake.runs == [("a", True), ("b", True), ("c", True)]
    assert list(op.table()) == ["op|FakeGPU0|known"]
    assert list(json.loads(cache_path.read_text())) == ["op|FakeGPU0|known"]
    assert Fake({"a": 3.0, "b": 2.0, "c": 1.0}).choose(op) == "c"  # measured once the pass is over


def test_a_known_signature_is_answered_without_describing_or_checking_it(dispatch):
    described = []
    op = MeasuredDispatch("op", IMPLEMENTATIONS, lambda signature: described.append(signature) or "-".join(signature))
    fake = Fake({"a": 3.0, "b": 1.0, "c": 2.0})
    assert fake.choose(op, ("x", "y")) == "b"
    assert list(op.table()) == ["op|FakeGPU0|x-y"]
    fake.unavailable = {"b": "would raise if asked"}  # the signature says everything: not asked again
    assert fake.choose(op, ("x", "y")) == "b"
    assert described == [("x", "y")] and fake.runs == ["a", "b", "c"]
    dispatch.reset()
    assert fake.choose(op, ("x", "y")) == "c" and described == [("x", "y")] * 2


def test_training_conv_choice_measures_again_when_torch_conv_flags_change(dispatch, monkeypatch):
    """The training unit's conv ("unit_conv2d"): a CUDA call on "auto" is measured once per signature, which
    holds torch's TF32 and cuDNN flags, so a Triton (TF32) choice stops once TF32 is forbidden."""
    from fusedres.ops import unit_conv

    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    monkeypatch.setattr(unit_conv, "_triton_conv_unavailable", lambda y, w, conv_args: (
        None if unit_conv.backends.conv_allows_tf32() else "TF32 is forbidden"))
    monkeypatch.setattr(unit_conv, "_unit_forward_mismatch", lambda *args: None)  # the fake results are times
    y = torch.empty(2, 16, 5, 5).to(memory_format=torch.channels_last)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: DEVICE))
    weight = torch.empty(8, 16, 3, 3)
    timings = {"cudnn": 2.0, "triton": 1.0}

    def choice():
        return unit_conv._conv_implementation("auto", y, weight, None, ([1, 1], [1, 1], [1, 1], 1), True, True,
                                              True, timings.get)

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert choice() == "triton"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert choice() == "cudnn"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert choice() == "triton"
    table = dispatch.dispatch_table()
    assert list(table) == ["unit_conv2d|FakeGPU0|float32|cl|x[2, 16, 5, 5]|w[8, 16, 3, 3]|s[1, 1]p[1, 1]d[1, 1]g1|"
                           f"prologue1|relu1|stats1|bias0|cudnn1|tf32{allowed}" for allowed in (1, 0)]
    assert table[list(table)[1]]["ms"] == {"cudnn": 2.0, "triton": "unavailable: TF32 is forbidden"}


@requires_cuda
def test_gpu_time_ms_takes_the_longer_of_host_and_gpu_and_for_a_graph_replay_the_gpu(fresh_dispatch):
    """A call whose host part (a 2 ms sleep before its launch) far outlasts its GPU work: timed as an eager call it
    costs the host's time; for a graph replay, its GPU work alone. A call whose GPU work outlasts its host part
    costs its GPU work either way."""
    import time

    x = torch.randn(256, 256, device="cuda")

    def host_bound():
        time.sleep(0.002)
        return x @ x

    eager_ms = fresh_dispatch._time_ms(host_bound)
    with fresh_dispatch.for_graph_replay():
        replay_ms = fresh_dispatch._time_ms(host_bound)
    assert eager_ms > 1.5 and replay_ms < 0.5, (eager_ms, replay_ms)

    big = torch.randn(4096, 4096, device="cuda")
    gpu_bound = fresh_dispatch._time_ms(lambda: big @ big)  # 137 GFLOP in fp32: ms on an H100; host ~10 us
    with fresh_dispatch.for_graph_replay():
        replay_ms = fresh_dispatch._time_ms(lambda: big @ big)
    assert gpu_bound > 0.5 and abs(gpu_bound - replay_ms) < 0.2 * replay_ms, (gpu_bound, replay_ms)


@requires_cuda
def test_time_ms_warms_up_then_takes_the_median(fresh_dispatch):
    calls = []
    x = torch.randn(256, 256, device="cuda")
    ms = fresh_dispatch._time_ms(lambda: calls.append(x @ x))
    assert len(calls) == fresh_dispatch._WARMUP + 1 + fresh_dispatch._REPS  # + the call whose host time sizes the wait
    assert isinstance(ms, float) and ms > 0
