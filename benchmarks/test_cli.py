"""``python -m benchmarks``'s options: what --levels and --modes leave to run, and --precompile's rows (on CPU,
one tiny models case)."""

import json

import pytest

import fusedres
from benchmarks import cases, harness, timing
from benchmarks.__main__ import make_settings


def test_modes_keep_only_those_cases_of_each_level():
    args = ["--device", "cpu", "--levels", "models,convs", "--models", "resnet18", "--quick"]
    every = cases.build_cases(make_settings(args))
    assert {(c.level, c.mode) for c in every} == {("models", "train"), ("models", "infer"), ("convs", "fwd"),
                                                   ("convs", "bwd")}
    only = cases.build_cases(make_settings(args + ["--modes", "infer,bwd"]))
    assert [c.key for c in only] == [c.key for c in every if c.mode in ("infer", "bwd")]


def test_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        make_settings(["--device", "cpu", "--modes", "inference"])
    assert "expected a comma-separated list of" in capsys.readouterr().err


def test_precompile_runs_before_the_fused_first_call_and_is_reported():
    """--precompile: the fused contender's row says what fusedres.precompile did before its first call (on CPU
    nothing compiles); eager's row has no such fields; the fused step still agrees with eager."""
    settings = make_settings(["--device", "cpu", "--levels", "models", "--models", "resnet18", "--quick",
                              "--batch", "2", "--size", "64", "--modes", "train", "--backends", "auto",
                              "--repeats", "1", "--warmup", "0", "--precompile"])
    case, = cases.build_cases(settings)
    setup = case.prepare()
    reference = harness.Reference.of(setup, settings)
    rows = {name: harness.run_contender(case, setup, name, settings, reference)
            for name in ("eager", "fused[auto]")}
    assert "precompile_s" not in rows["eager"] and not rows["eager"].get("error"), rows["eager"]
    fused = rows["fused[auto]"]
    assert not fused.get("error") and fused["agree"] is not False, fused
    assert fused["precompile_compiles"] == 0 and fused["precompile_s"] > 0, fused


def test_a_failed_precompile_is_reported_and_the_step_still_timed(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fusedres, "precompile", fail)
    settings = make_settings(["--device", "cpu", "--levels", "models", "--models", "resnet18", "--quick",
                              "--batch", "2", "--size", "64", "--modes", "infer", "--backends", "auto",
                              "--repeats", "1", "--warmup", "0", "--precompile"])
    case = cases.build_cases(settings)[0]
    setup = case.prepare()
    row = harness.run_contender(case, setup, "fused[auto]", settings, harness.Reference.of(setup, settings))
    assert row["precompile_error"] == "RuntimeError: no compiler here" and row["median_ms"] > 0, row
    headers = [header for header, _, _ in harness.columns("models")]
    assert "first call s" in headers and "precompile s" in headers
    assert harness.precompile_text(row) == "ERROR"


def test_inference_cases_add_the_graphed_contender_which_agrees_with_eager(monkeypatch):
    """fused[auto]+graph: listed for inference cases only (after the fused rows, before compile), skipped on CPU
    with the reason; its step (here with the capture rerunning the forward, as tests/test_graphs.py's stand-in
    does) captures on its first call and agrees with eager."""
    from fusedres.graphs import CudaGraphedForward

    settings = make_settings(["--device", "cpu", "--levels", "models", "--models", "resnet18", "--quick",
                              "--batch", "2", "--size", "64", "--backends", "auto", "--repeats", "2",
                              "--warmup", "0"])
    by_mode = {case.mode: case for case in cases.build_cases(settings)}
    assert [name for name, _ in harness.contenders(settings, by_mode["train"])] == [
        "eager", "fused[auto]", "compile", harness.SAVED]
    assert [name for name, _ in harness.contenders(settings, by_mode["infer"])] == [
        "eager", "fused[auto]", harness.GRAPHED, "compile"]  # compile last: the slowest to build
    assert dict(harness.contenders(settings, by_mode["infer"]))[harness.GRAPHED] == "CUDA graphs need a CUDA device"
    captures = []

    def rerun_capture(forward):
        outputs = forward()
        captures.append(outputs)
        return (lambda: outputs.copy_(forward())), outputs

    monkeypatch.setattr(fusedres, "cuda_graphed", lambda model, x: CudaGraphedForward(model, (x,), 1, rerun_capture))
    setup = by_mode["infer"].prepare()
    reference = harness.Reference.of(setup, settings)
    rows = {name: harness.run_contender(by_mode["infer"], setup, name, settings, reference)
            for name in ("eager", harness.GRAPHED)}
    graphed = rows[harness.GRAPHED]
    assert not graphed.get("error") and graphed["agree"] is True and graphed["median_ms"] > 0, graphed
    assert len(captures) == 1  # captured once, in the first call; the timed calls replay


@pytest.mark.parametrize("level", ["blocks", "models"])
def test_training_cases_add_the_saved_activations_contender_which_agrees_with_eager(level, monkeypatch):
    """fused[auto]+saved: listed for training cases only (after compile's row), the model converted with
    memory_efficient=False (its training step keeps the normalised activations, as eager and torch.compile do),
    and its step agrees with eager."""
    settings = make_settings(["--device", "cpu", "--levels", level, "--models", "resnet18", "--quick",
                              "--batch", "2", "--size", "64", "--backends", "auto", "--repeats", "2",
                              "--warmup", "0"])
    by_mode = {case.mode: case for case in cases.build_cases(settings)}
    assert harness.SAVED in dict(harness.contenders(settings, by_mode["train"]))
    assert harness.SAVED not in dict(harness.contenders(settings, by_mode["infer"]))
    converted = []
    convert = fusedres.convert
    monkeypatch.setattr(fusedres, "convert", lambda *args, **kwargs: converted.append(kwargs) or convert(*args,
                                                                                                         **kwargs))
    setup = by_mode["train"].prepare()
    reference = harness.Reference.of(setup, settings)
    rows = {name: harness.run_contender(by_mode["train"], setup, name, settings, reference)
            for name in ("eager", harness.SAVED)}  # the anchor first: agreement is against its error
    saved = rows[harness.SAVED]
    assert not saved.get("error") and saved["agree"] is True and saved["median_ms"] > 0, saved
    assert [kwargs["memory_efficient"] for kwargs in converted] == [False]


def test_the_models_summary_checks_the_inference_targets_against_compile():
    def row(batch, contender, ms, mode="infer"):
        return {"case": "resnet50", "mode": mode, "batch": batch, "contender": contender, "median_ms": ms}

    rows = [row(256, "eager", 40.0), row(256, "fused[auto]", 20.0), row(256, "compile", 29.0),
            row(256, "fused[auto]", 90.0, mode="train"), row(256, "compile", 80.0, mode="train"),
            row(1, "fused[auto]", 3.0), row(1, "fused[auto]+graph", 0.5), row(1, "compile", 1.0),
            row(32, "fused[auto]", 2.0), row(32, "compile", 2.0), row(4, "fused[auto]", 2.0), row(8, "compile", 1.0)]
    assert cases.model_summary(rows) == [
        "resnet50 inference, batch 256, speed over torch.compile (29.000 ms): fused[auto] 1.45x (20.000 ms); "
        "target >= 1.50x: not met (best 1.45x).",
        "resnet50 inference, batch 1, speed over torch.compile (1.000 ms): fused[auto] 0.33x (3.000 ms), "
        "fused[auto]+graph 2.00x (0.500 ms); target >= 1.00x: not met (best 0.33x); replayed from a CUDA graph met "
        "(2.00x, against torch.compile without one).",
        "resnet50 inference, batch 32, speed over torch.compile (2.000 ms): fused[auto] 1.00x (2.000 ms); "
        "no target at this batch.",
        "resnet50 inference, batch 4: no torch.compile time to compare (the targets need both).",
        "resnet50 inference, batch 8: no fused time to compare (the targets need both)."]
    assert cases.model_summary(rows[:3], gpu=False) == [  # CPU timings: no verdict either way
        "resnet50 inference, batch 256, speed over torch.compile (29.000 ms): fused[auto] 1.45x (20.000 ms); "
        "the targets are for GPU timings, not judged on these CPU ones."]


def test_results_md_counts_the_dispatch_choices_and_the_implementations_that_disagreed(monkeypatch, tmp_path):
    """The summary's dispatch lines: per op, how often each implementation was chosen and, loudly, how often one
    was refused because its result disagreed with the reference's (a fusedres bug the run has found)."""
    from benchmarks import __main__ as main

    from fusedres.ops.dispatch import DISAGREES

    disagrees = f"{DISAGREES} cudnn: the output differs by up to 3 where 0.1 is allowed (scale 4)"
    monkeypatch.setattr(main, "dispatch_table", lambda: {
        "unit_conv2d|GPU|a": {"choice": "cudnn", "ms": {"cudnn": 1.0, "triton": disagrees}},
        "unit_conv2d|GPU|b": {"choice": "triton", "ms": {"cudnn": 1.0, "triton": 0.5}},
        "conv_bias_act|GPU|a": {"choice": "cudnn", "ms": {"cudnn": 1.0, "triton": 2.0, "torch": 3.0}},
        "conv_bias_act|GPU|a|graph": {"choice": "triton", "ms": {"cudnn": 1.0, "triton": 0.9, "torch": 3.0}}})
    meta = dict(date="today", command="python -m benchmarks", git="abc", timings="t", settings={}, notes=[],
                environment={"backends": {}})
    md = main.write_results(tmp_path, meta, [])[1].read_text()
    assert ("- measured dispatch (unit_conv2d, per call signature; every timing in results.json): cudnn chosen 1x, "
            "triton chosen 1x; triton DISAGREED with the reference 1x (never chosen there)") in md.splitlines()
    assert ("- measured dispatch (conv_bias_act, per call signature; every timing in results.json): cudnn chosen "
            "1x") in md.splitlines()
    assert ("- measured dispatch (conv_bias_act, for a CUDA graph's replay, per call signature; every timing in "
            "results.json): triton chosen 1x") in md.splitlines()


def test_a_run_stopped_mid_case_keeps_its_finished_rows(monkeypatch, tmp_path):
    """results.json and results.md are written as each row finishes: a run stopped during a case (the GPU check
    stops a step at its time limit with SIGINT, as Ctrl-C does) keeps the case's finished rows."""
    from benchmarks import __main__ as main

    run_contender, ran = harness.run_contender, []

    def stopped_at_the_second(case, setup, name, *args):
        if ran:
            raise KeyboardInterrupt
        ran.append(name)
        return run_contender(case, setup, name, *args)

    monkeypatch.setattr(harness, "run_contender", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        main.main(["--device", "cpu", "--levels", "ops", "--quick", "--no-compile", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["contender"] for row in rows] == ran == ["eager"]
    assert "| eager |" in (tmp_path / "results.md").read_text()


def test_host_overhead_counts_the_torch_ops_that_compute_or_copy():
    """``host_overhead --train``'s launch count: views, allocations and no-op conversions count nothing, an op
    that computes or copies (itself or through the op it calls) counts once."""
    import torch

    from benchmarks.host_overhead import _torch_ops_with_work

    x = torch.randn(4, 6)
    with torch.autograd.profiler.profile(use_kineto=False) as nothing:
        x.t()
        x.view(6, 4).reshape(24).to(torch.float32).contiguous()
        torch.empty(3).unsqueeze(0).expand(2, 3)
    with torch.autograd.profiler.profile(use_kineto=False) as three:
        x.t().contiguous()  # a copy, through clone
        x.to(torch.float64)  # a copy, through _to_copy
        (x * 2).sum()  # only the outermost op that works counts, and each of them
    assert _torch_ops_with_work(nothing.function_events) == 0
    assert _torch_ops_with_work(three.function_events) == 4


def test_host_overhead_behind_the_stand_in_lets_the_triton_backends_take_cpu_tensors():
    """``host_overhead``'s stand-in set-up (``--resnet50`` and the launch rows on CPU): the kernels compile for
    sm_90, not interpreted, and the ops' triton backends accept CPU tensors. It set a name the backends no longer
    read, so ``--resnet50`` raised "backend 'triton' is not available". Run in a process of its own (it replaces
    triton's driver)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import torch\n"
              "from benchmarks import host_overhead\n"
              "host_overhead._behind_stand_in()\n"
              "from fusedres.ops import backends\n"
              "from triton.runtime.jit import JITFunction\n"
              "from fusedres.triton import partials\n"
              "assert backends.unavailable_reason('triton', torch.device('cpu')) is None\n"
              "assert isinstance(partials._finish_partials_kernel, JITFunction), 'compiled, not interpreted'\n")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}  # as it is run
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_queue_ahead_puts_a_wait_of_twice_the_host_time_before_each_timed_call(monkeypatch):
    """``time_ms(queue_ahead=True)``'s CUDA path behind stand-ins for torch.cuda (events that report 2 ms,
    a recorded ``_sleep``): it calibrates the sleep's cycles per ms, then queues before each timed call's
    start event a wait of twice the host time three untimed calls took, and counts the calls whose host
    time outlasted it."""
    import torch

    gpu_work = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            gpu_work.append("event")

        def elapsed_time(self, end):
            return 2.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: gpu_work.append(("sleep", cycles)))
    monkeypatch.setattr(timing.dispatch, "_CYCLES_PER_MS", {})
    monkeypatch.setattr(timing, "flush_buffer", lambda device: None)
    host_ms = iter([1.0, 1.5, 1.0, 0.5, 3.0, 1.0, 0.2, 0.3])  # three untimed calls, three timed; two timed
    monkeypatch.setattr(timing, "_host_call_ms", lambda fn: (fn(), next(host_ms))[1])
    device = torch.device("cuda", 0)

    result = timing.time_ms(lambda: gpu_work.append("call"), device, 0, 3, queue_ahead=True)
    assert timing.dispatch._CYCLES_PER_MS[str(device)] == 2**21 / 2.0  # 2**21 cycles timed at 2 ms
    wait = ("sleep", int(2 * 1.0 * 2**20))  # twice the median untimed host time
    calibration = ["event", ("sleep", 2**21), "event"] * 4
    assert gpu_work == ["call"] * 3 + calibration + [wait, "event", "call", "event"] * 3
    assert (result.ms, result.host_ms, result.late) == ([2.0] * 3, [0.5, 3.0, 1.0], 1)

    gpu_work.clear()
    result = timing.time_ms(lambda: gpu_work.append("call"), device, 0, 2)
    assert gpu_work == ["event", "call", "event"] * 2 and (result.host_ms, result.late) == ([0.2, 0.3], None)


def _run(git: str, rows: list[dict]) -> dict:
    return {"command": "python -m benchmarks --levels convs", "git": git, "date": "2026-12-04",
            "environment": {"GPU": "H200", "torch": "2.11"}, "rows": rows}


def _row(case: str, contender: str, ms: float, agree=True, best=None) -> dict:
    row = {"level": "convs", "case": case, "mode": "fwd", "batch": 256, "contender": contender, "median_ms": ms,
           "agree": agree}
    if best is not None:
        row["tuned"] = [{"kernel": "_conv_kernel", "best": best, "ms": {}}]
    return row


def test_compare_sets_two_runs_rows_side_by_side():
    """benchmarks.compare: new/old per row both runs have, the autotuner's choice where it changed, agreement
    both ways, rows only one run has; --contenders and --changed filter."""
    from benchmarks.compare import compare

    tma = "BLOCK_M=128 BLOCK_N=256 BLOCK_K=64 USE_TMA=True PERSISTENT=0 X_IN_L1=False BOX_H=1 BOX_W=1 warps=8 stages=3"
    ptr = tma.replace("USE_TMA=True", "USE_TMA=False")
    old = _run("aaa", [_row("l3", "triton", 0.200, best=ptr), _row("l3", "cudnn", 0.100, agree=None),
                       _row("l4", "triton", 0.100, agree=False)])
    new = _run("bbb", [_row("l3", "triton", 0.120, best=tma), _row("l3", "cudnn", 0.101, agree=None),
                       _row("l5", "triton", 0.050)])
    lines = compare(old, new)
    assert "aaa" in lines[0] and "bbb" in lines[1]
    (l3,) = [line for line in lines if line.startswith("| l3 | fwd | 256 | triton |")]
    assert "| 0.200 | 0.120 | 0.60 | ok/ok | 128x256 ptr warps=8 stages=3 -> 128x256 tma warps=8 stages=3 |" in l3
    assert any(line.startswith("| l3 | fwd | 256 | cudnn | 0.100 | 0.101 | 1.01 | ref/ref |") for line in lines)
    assert "new run only: l5 fwd b256 triton" in lines and "old run only: l4 fwd b256 triton" in lines
    assert not any("| cudnn |" in line for line in compare(old, new, contenders={"triton"}))
    assert not any("| l3 | fwd | 256 | cudnn |" in line for line in compare(old, new, changed=0.05))
    # the same case and contender in two modes: two rows, told apart by the mode column
    backward = dict(_row("l3", "triton", 0.300), mode="bwd")
    lines = compare(_run("aaa", old["rows"] + [backward]), _run("bbb", new["rows"] + [dict(backward, median_ms=0.150)]))
    assert any(line.startswith("| l3 | bwd | 256 | triton | 0.300 | 0.150 | 0.50 |") for line in lines)


@pytest.mark.parametrize("argument, message", [
    ("--batch=0", "argument --batch: expected an integer >= 1, got 0"),
    ("--batch=4,-3", "argument --batch: expected an integer >= 1, got -3"),
    ("--batch=x", "argument --batch: expected an integer, got 'x'"),
    ("--repeats=0", "argument --repeats: expected an integer >= 1, got 0"),
    ("--size=-5", "argument --size: expected an integer >= 1, got -5"),
    ("--threads=0", "argument --threads: expected an integer >= 1, got 0"),
    ("--warmup=-1", "argument --warmup: expected an integer >= 0, got -1"),
])
def test_numbers_out_of_range_are_refused_by_the_parser(argument, message, capsys):
    """Each had run (batch 0), ended in a traceback (negative sizes, repeats, threads) or quietly become its
    default (0 for repeats, size, threads)."""
    from benchmarks import __main__ as main
    with pytest.raises(SystemExit):
        main.make_settings(["--levels", "ops", argument])
    assert message in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_refused_before_anything_runs(tmp_path, capsys):
    from benchmarks import __main__ as main
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        main.make_settings(["--levels", "ops", "--out", str(blocker)])
    assert "argument --out: cannot make the folder" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("garbage", "is not JSON"), ('{"a": 1}', "is no results.json of python -m benchmarks")])
def test_compare_refuses_a_file_that_is_no_results_json(content, message, tmp_path, capsys):
    from benchmarks.compare import main
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        main([str(path), str(path)])
    assert message in capsys.readouterr().err


def test_compare_warns_where_the_runs_time_different_work():
    """Rows are matched by case name; runs of another size, dtype, layout or device time other work under it."""
    from benchmarks.compare import compare
    old, new = _run("aaa", [_row("l3", "cudnn", 0.1)]), _run("bbb", [_row("l3", "cudnn", 0.2)])
    old["settings"] = {"device": "cpu", "dtype": "float32", "size": 64, "layout": "channels_last"}
    new["settings"] = dict(old["settings"], size=128, dtype="bfloat16")
    assert "- **warning: the runs differ in dtype 'float32' -> 'bfloat16', size 64 -> 128; each row below compares " \
           "different work**" in compare(old, new)
    assert not any("warning" in line for line in compare(old, dict(new, settings=old["settings"])))
