"""``python -m benchmarks``'s case selection (no timing): what --levels and --modes leave to run."""

import pytest

from benchmarks import cases
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
