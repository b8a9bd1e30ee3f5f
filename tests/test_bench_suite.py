"""The prepared GPU suite: its dry run goes through the same steps on tiny-random on the CPU and passes."""

from __future__ import annotations

import json

import pytest

from dycoke.bench.suite import suite_steps


def test_the_gpu_suite_covers_the_issue_grid(tmp_path):
    steps = {step.name: step.argv for step in suite_steps(tmp_path, dry_run=False)}
    assert list(steps) == ["cuda-tests", "ov-0.5b-static", "ov-7b-static", "ov-0.5b-static-compile",
                           "ov-7b-static-compile"]
    for name in ("ov-0.5b-static", "ov-7b-static-compile"):
        argv = steps[name]
        options = dict(zip(argv[::2], argv[1::2]))
        assert options["--frames"] == "8,32,128" and options["--dtype"] == "bfloat16"
        assert options["--methods"] == "baseline,dycoke,ttm,dp" and options["--cache"] == "static"
    assert "--compile" in steps["ov-7b-static-compile"] and "--compile" not in steps["ov-7b-static"]


@pytest.mark.timeout(900)  # about 50 s of CPU; 6 minutes of wall time on a two-core machine at a load of 7
def test_the_gpu_suite_dry_run_passes_on_the_cpu(tmp_path):
    from dycoke.bench.suite import run_suite

    assert run_suite(tmp_path, dry_run=True) == 0
    summary = json.loads((tmp_path / "suite.json").read_text())
    assert [step["step"] for step in summary["steps"]] == ["cuda-tests", "tiny-random-static",
                                                          "tiny-random-static-compile"]
    plain = json.loads((tmp_path / "tiny-random-static.json").read_text())
    assert plain["settings"]["cache"] == "static" and not plain["settings"]["compile"]["requested"]
    classes = {row["method"]: row["cache_class"] for row in plain["rows"]}
    assert classes == {"baseline": "StaticCache", "dycoke": "StaticDyCokeCache", "ttm": "StaticCache",
                       "dp": "StaticDyCokeCache"}
    compiled = json.loads((tmp_path / "tiny-random-static-compile.json").read_text())
    settings = compiled["settings"]["compile"]
    assert (settings["requested"], settings["backend"], settings["notes"]) == (True, "eager", [])
    # One graph per cache class and prompt length (baseline, ttm: StaticCache; dycoke, dp: StaticDyCokeCache; each
    # of a different length), none per decoding step: the timer's hooks are not traced.
    assert settings["graphs"] == 4
    assert all(row["compiled"] for row in compiled["rows"])
    assert "## tiny-random-static-compile" in (tmp_path / "README.md").read_text()
