"""tests/conftest.py's failure log: the tracebacks a GPU check keeps when its time limit stops the tests."""

from types import SimpleNamespace

from conftest import pytest_runtest_logreport


def _report(failed: bool) -> SimpleNamespace:
    return SimpleNamespace(failed=failed, nodeid="tests/test_x.py::test_y[a]", when="call",
                           longreprtext="E   AssertionError: planted")


def test_failures_are_appended_as_they_arrive_by_the_controlling_process(monkeypatch, tmp_path):
    log = tmp_path / "failures.log"
    monkeypatch.setenv("FUSEDRES_FAILURES_LOG", str(log))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytest_runtest_logreport(_report(failed=False))
    assert not log.exists()
    for _ in range(2):
        pytest_runtest_logreport(_report(failed=True))
    assert log.read_text() == "==== tests/test_x.py::test_y[a] (call)\nE   AssertionError: planted\n\n" * 2
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a worker: its controller writes the report
    pytest_runtest_logreport(_report(failed=True))
    assert log.read_text().count("planted") == 2


def test_nothing_is_written_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSEDRES_FAILURES_LOG", raising=False)
    monkeypatch.chdir(tmp_path)
    pytest_runtest_logreport(_report(failed=True))
    assert list(tmp_path.iterdir()) == []
