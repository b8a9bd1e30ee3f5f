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
    for args in (["--methods", "nope"], ["--frames", "4"], ["--per-task", "0"], ["--frames", "x"],
                 ["--first-item", "-1"], ["--first-item", "100", "--per-task", "40"],
                 ["--first-item", "110", "--per-task", "10", "--sweep"]):
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


def block_clip(num_frames: int = 8, flash: int = 3):
    """Black frames; in frame `flash` a white block over the first two token cells of the top row.

    The 14 x 14 token lattice of a 384-pixel frame has cell edges at 0, 27, 55, ... pixels (384 * k / 14 rounded),
    so pixels [0, 27) x [0, 55) are cells 0 and 1 exactly.
    """
    import numpy as np

    frames = np.zeros((num_frames, 384, 384, 3), dtype=np.uint8)
    frames[flash, 0:27, 0:55] = 255
    return frames


def test_the_evidence_mask_marks_the_cells_that_differ_from_the_median_frame():
    from dycoke.videoqa import evidence_mask

    cells = evidence_mask(block_clip())
    assert cells.shape == (8, 196)
    assert sorted(zip(*cells.nonzero())) == [(3, 0), (3, 1)]


def test_trace_evidence_counts_kept_tokens_and_the_focus_on_their_frames():
    from dycoke.eval import trace_evidence
    from dycoke.videoqa import Item

    item = Item("x", "needle", "q", "red", "it was red", block_clip())
    keep = [[1] * 196 for _ in range(8)]
    keep[3][1] = 0  # one of the two evidence cells dropped before the LLM
    for t in range(8):  # 100 tokens of every frame enter, 99 others in frame 3 (with cell 0), so shares are known
        for n in range(100, 196):
            keep[t][n] = 0
    entering = [sum(row) for row in keep]
    assert entering[3] == 99 and entering[0] == 100
    # Step 1 attends 33 of frame 3's 99 and 50 of each other frame's 100; step 2 attends every frame equally (half).
    steps = [{"kept_per_frame": [50, 50, 50, 33, 50, 50, 50, 50]},
             {"kept_per_frame": [50, 50, 50, 49.5, 50, 50, 50, 50]}]
    trace = {"tokens_per_frame": 196, "ttm_keep_mask": keep, "steps": steps}
    evidence = trace_evidence(item, trace)
    assert evidence.kept == 0.5
    share_1 = (33 / 99) / (383 / 799)
    share_2 = (49.5 / 99) / (399.5 / 799)
    assert evidence.focus == pytest.approx(round((share_1 + share_2) / 2, 4))
    assert trace_evidence(Item("y", "static", "q", "red", "r", block_clip()), trace) is None


def test_a_validation_run_scores_the_validation_items_from_the_first_index(monkeypatch):
    asked: list[str] = []

    def predictor(pipeline, method, config, max_new_tokens):
        def predict(item):
            asked.append(item.id)
            return Prediction("banana", 100, 30.0, 4, 1)
        return predict

    monkeypatch.setattr("dycoke.eval.pipeline_predictor", predictor)
    report = Report("fake", 2, "validation", 16)
    run_table(None, [8], ["baseline"], None, 2, False, 3, report, lambda: None)
    assert asked == [f"validation-{task}-{index:05d}-f8" for task in TASKS for index in (16, 17)]
    assert "(2 validation items per task, from item 16)" in markdown(report)
