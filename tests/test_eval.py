"""The accuracy harness: exact scores for a scripted predictor, Wilson intervals, retained accuracy, the real path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dycoke.eval import (
    Prediction, Report, Score, evaluate, markdown, resolve_method, retained, run_table,
)
from dycoke.videoqa import TASKS, items

ROOT = Path(__file__).resolve().parents[1]


def scripted(right_ids: set[str]):
    """Answers the sentence form for the listed items, a wrong colour-free word for every other."""
    def predict(item):
        return Prediction(item.response if item.id in right_ids else "banana", 100, 30.0, 4, 1)
    return predict


def test_a_scripted_predictor_is_scored_exactly():
    suite = list(items("test", 8, per_task=4, tasks=("static", "count")))
    right = {suite[0].id, suite[1].id, suite[4].id}  # 2 of 4 static, 1 of 4 count
    scores = evaluate(scripted(right), suite)
    assert (scores.per_task["static"].correct, scores.per_task["static"].total) == (2, 4)
    assert (scores.per_task["count"].correct, scores.per_task["count"].total) == (1, 4)
    assert scores.overall.correct == 3 and scores.overall.total == 8
    summary = scores.summary()
    assert summary["overall"]["accuracy"] == 0.375 and summary["reselection_rate"] == 0.25
    assert summary["visual_tokens_prefill"] == 100 and summary["visual_tokens_attended"] == 30.0


def test_the_short_answer_also_counts():
    suite = list(items("test", 8, per_task=2, tasks=("change",)))
    scores = evaluate(lambda item: Prediction(item.answer.upper() + "."), suite)
    assert scores.overall.accuracy == 1.0


def test_wilson_interval_matches_the_textbook_values():
    low, high = Score(8, 10).interval()
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = Score(0, 20).interval()  # never below 0, and the upper end is z^2 / (n + z^2)
    assert low == 0.0 and high == pytest.approx(1.96 ** 2 / (20 + 1.96 ** 2), abs=1e-9)
    assert Score(5, 5).interval()[1] == 1.0


def test_retained_is_over_the_items_the_baseline_got_right():
    suite = list(items("test", 8, per_task=4, tasks=("static",)))
    ids = [item.id for item in suite]
    baseline = evaluate(scripted(set(ids[:4])), suite)  # 4 of 4
    method = evaluate(scripted(set(ids[:3])), suite)  # 3 of 4
    assert retained(method, baseline) == 0.75
    assert retained(baseline, evaluate(scripted(set()), suite)) is None


def test_markdown_table_has_a_row_per_run():
    report = Report("fake", 4)
    scores = evaluate(scripted({"test-static-00000-f8"}), items("test", 8, per_task=4, tasks=("static",)))
    report.runs.append({"method": "baseline", "frames": 8, "blank": False, **scores.summary(), "retained": None})
    table = markdown(report)
    assert "**8 frames**" in table and "| baseline | 25 |" in table and "25.0 (5–70)" in table


def test_method_names_take_knobs_and_a_match():
    assert resolve_method("dycoke", "dycoke").name == "dycoke"
    fastv = resolve_method("fastv", "dycoke")
    assert fastv.options()["match"] == "dycoke"
    assert resolve_method("random:seed=3", None).options()["seed"] == 3


def test_the_real_pipeline_reports_the_budgets_of_the_rules(pipeline):
    """tiny-random at 8 frames: the budgets follow DESIGN's counts, computed here by hand."""
    report = Report(pipeline.loaded.name, 1)
    run_table(pipeline, [8], ["baseline", "dycoke", "ttm"], None, 1, True, 3, report, lambda: None)
    rows = {(r["method"], r["blank"]): r for r in report.runs}
    assert rows[("baseline", False)]["visual_tokens_prefill"] == 8 * 196
    after_ttm = 2 * (196 + 3 * 58)  # two windows of 4: an anchor kept whole, three frames keep floor(0.3 * 196)
    assert rows[("ttm", False)]["visual_tokens_prefill"] == after_ttm
    assert rows[("dycoke", False)]["visual_tokens_prefill"] == after_ttm
    assert rows[("dycoke", False)]["visual_tokens_attended"] == int(0.3 * after_ttm)  # 222
    assert rows[("baseline", True)]["chance"]["static"] == pytest.approx(1 / 6, abs=1e-4)
    assert all(sum(r["overall"][k] for k in ("total",)) == len(TASKS) for r in report.runs)


def test_cli_refuses_bad_arguments_in_one_line():
    for args in (["--methods", "nope"], ["--frames", "4"], ["--per-task", "0"], ["--frames", "x"]):
        done = subprocess.run([sys.executable, "-m", "dycoke.eval", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


def test_cli_writes_json_and_a_table(tmp_path):
    out = tmp_path / "accuracy.json"
    done = subprocess.run([sys.executable, "-m", "dycoke.eval", "--model", "tiny-random", "--frames", "8",
                           "--methods", "baseline,dycoke", "--per-task", "1", "--max-new-tokens", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["runs"]] == ["baseline", "dycoke"]
    assert report["runs"][1]["visual_tokens_attended"] == int(0.3 * 2 * (196 + 3 * 58))
    assert "| dycoke |" in done.stdout and "| baseline |" in done.stdout


def test_the_sweep_spans_dycokes_budgets_and_the_chart_has_a_line_per_method():
    from dycoke.eval import accuracy_budget_figure, attended_budget, sweep_points

    points = dict((f"{label} {c.prune_ratio} {c.merge_ratio}", c) for label, c in sweep_points())
    default = points["dycoke (P) 0.7 0.7"]
    assert attended_budget(default, 16, 196).attended == 444  # floor(0.3 * 4 * (196 + 3 * 58))
    assert attended_budget(points["dycoke (P) 0.0 0.7"], 16, 196).attended == 1480
    assert attended_budget(points["dycoke (K) 0.7 0.0"], 16, 196).attended == int(0.3 * 16 * 196)
    sweep = [{"method": m, "frames": 16, "attended": a, "accuracy": acc, "ci95": [acc - 0.1, acc + 0.1]}
             for m, a, acc in [("dycoke (P)", 444, 0.9), ("dycoke (P)", 148, 0.8), ("random", 444, 0.5)]]
    figure = accuracy_budget_figure(sweep, "fake")
    assert [trace.name for trace in figure.data] == ["dycoke (P)", "random"]
    assert list(figure.data[0].x) == [148, 444] and list(figure.data[0].y) == [80.0, 90.0]
