"""The accuracy benchmark: every method on the synthetic video-QA suite, per task, at matched budgets.

    python -m dycoke.eval --model tiny --frames 16,32 \\
        --methods baseline,dycoke,ttm,dp,fastv,visionzip,random,uniform-frames --match dycoke \\
        --out assets/benchmarks/accuracy-tiny.json

Each method answers the same test items through `Pipeline`, exactly as the app and the CLI run it. Scores are
exact match after normalising (`videoqa.is_correct`), with 95% Wilson intervals; "retained" is a method's overall
accuracy over the baseline's on the same items. `--blank` adds the baseline on blank clips (the suite must not be
answerable from the question), `--sweep` the accuracy-versus-budget chart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dycoke.budget import VisualBudget
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.methods import Method, configure, get_method, match_budget, method_names
from dycoke.video import VideoClip
from dycoke.videoqa import (CHANCE, EVIDENCE_TASKS, TASKS, TEST_ITEMS_PER_TASK, Item, blank_like, evidence_mask,
                            is_correct, items)

# DyCoke settings of the sweep: P at the default K, then K at the default P. Peers are matched to the P line.
SWEEP_PRUNE_RATIOS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
SWEEP_MERGE_RATIOS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Prediction:
    text: str
    visual_tokens_prefill: int = 0
    visual_tokens_attended: float = 0.0
    decode_steps: int = 0
    reselections: int = 0
    evidence: "Evidence | None" = None


@dataclass(frozen=True)
class Evidence:
    """What a method kept of the tokens where an item's answer lives (`videoqa.evidence_mask`), from its trace.

    `kept`: the share of those tokens that enter the language model (TTM, or a peer's pruning before the LLM).
    `focus`: over the decoding steps, the share of the evidence frames' entering tokens that were attended, over
    the same share for all frames: 1 attends the evidence frames as much as any, above 1 more, below 1 less.
    """

    kept: float
    focus: float | None


def trace_evidence(item: Item, trace: dict) -> Evidence | None:
    """The item's `Evidence` from a result's trace; None where the task has none or tokens are not positions."""
    if item.task not in EVIDENCE_TASKS:
        return None
    cells = evidence_mask(item.frames, round(math.sqrt(trace["tokens_per_frame"])))
    keep = np.array(trace["ttm_keep_mask"], dtype=bool)
    if keep.shape != cells.shape or not cells.any():
        return None
    frames = cells.any(axis=1)
    entering = keep.sum(axis=1)
    shares = []
    for step in trace["steps"]:
        attended = np.array(step["kept_per_frame"])
        if attended.sum() and entering[frames].sum():  # a method may keep no token of the evidence frames
            shares.append((attended[frames].sum() / entering[frames].sum()) / (attended.sum() / entering.sum()))
    kept = (cells & keep).sum() / cells.sum()
    return Evidence(round(float(kept), 4), round(float(np.mean(shares)), 4) if shares else None)


Predictor = Callable[[Item], Prediction]


@dataclass
class Score:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The Wilson score interval (95% for z = 1.96)."""
        if self.total == 0:
            return (0.0, 1.0)
        n, p = self.total, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (max(0.0, centre - half), min(1.0, centre + half))

    def to_dict(self) -> dict:
        low, high = self.interval()
        return {"correct": self.correct, "total": self.total, "accuracy": round(self.accuracy, 4),
                "ci95": [round(low, 4), round(high, 4)]}


@dataclass
class RunScores:
    """One method at one frame count over a list of items."""

    per_task: dict[str, Score] = field(default_factory=dict)
    answers: dict[str, bool] = field(default_factory=dict)  # item id -> correct
    prefill_tokens: list[int] = field(default_factory=list)
    attended_tokens: list[float] = field(default_factory=list)
    decode_steps: int = 0
    reselections: int = 0
    evidence: dict[str, list[tuple[Evidence, bool]]] = field(default_factory=dict)  # task -> (evidence, correct)

    @property
    def overall(self) -> Score:
        return Score(sum(s.correct for s in self.per_task.values()), sum(s.total for s in self.per_task.values()))

    def add(self, item: Item, prediction: Prediction) -> None:
        right = is_correct(prediction.text, item)
        score = self.per_task.setdefault(item.task, Score())
        score.correct += right
        score.total += 1
        self.answers[item.id] = right
        self.prefill_tokens.append(prediction.visual_tokens_prefill)
        self.attended_tokens.append(prediction.visual_tokens_attended)
        self.decode_steps += prediction.decode_steps
        self.reselections += prediction.reselections
        if prediction.evidence is not None:
            self.evidence.setdefault(item.task, []).append((prediction.evidence, right))

    def evidence_summary(self) -> dict:
        """Per task: the mean share of evidence tokens kept and the mean focus, overall and over wrong answers."""
        mean = lambda values: round(sum(values) / len(values), 4) if values else None  # noqa: E731
        summary = {}
        for task, rows in self.evidence.items():
            focus = [e.focus for e, _ in rows if e.focus is not None]
            summary[task] = {"kept": mean([e.kept for e, _ in rows]), "focus": mean(focus),
                             "kept_when_wrong": mean([e.kept for e, right in rows if not right]),
                             "focus_when_wrong": mean([e.focus for e, right in rows
                                                       if not right and e.focus is not None])}
        return summary

    def summary(self) -> dict:
        mean = lambda values: round(sum(values) / len(values), 1) if values else 0.0  # noqa: E731
        return {
            "tasks": {task: score.to_dict() for task, score in self.per_task.items()},
            "overall": self.overall.to_dict(),
            "visual_tokens_prefill": mean(self.prefill_tokens),
            "visual_tokens_attended": mean(self.attended_tokens),
            "reselection_rate": round(self.reselections / self.decode_steps, 4) if self.decode_steps else None,
            "evidence": self.evidence_summary(),
        }


def evaluate(predict: Predictor, suite: Iterable[Item], progress: str | None = None) -> RunScores:
    """Score `predict` on every item of `suite`."""
    scores = RunScores()
    listed = list(suite)
    for item in tqdm(listed, desc=progress, unit="item", file=sys.stderr, disable=progress is None,
                     mininterval=2):
        scores.add(item, predict(item))
    return scores


def retained(method: RunScores, baseline: RunScores) -> float | None:
    """The method's accuracy over the baseline's, on the items both answered."""
    shared = method.answers.keys() & baseline.answers.keys()
    base = sum(baseline.answers[i] for i in shared)
    return round(sum(method.answers[i] for i in shared) / base, 4) if base else None


def item_clip(item: Item, fps: float = 8.0) -> VideoClip:
    return VideoClip(frames=item.frames, timestamps=tuple(t / fps for t in range(item.num_frames)),
                     source_frames=item.num_frames, fps=fps)


def pipeline_predictor(pipeline, method: Method, config: DyCokeConfig, max_new_tokens: int = 8) -> Predictor:
    """Answers through `Pipeline.answer`, as the app and the CLI do."""

    def predict(item: Item) -> Prediction:
        result = pipeline.answer(item_clip(item), item.question, method=method, config=config,
                                 max_new_tokens=max_new_tokens, num_frames=item.num_frames)
        metrics = result.metrics
        return Prediction(result.answer, metrics["visual_tokens_after_ttm"], metrics["visual_tokens_attended_mean"],
                          len(result.trace["steps"]), metrics["reselections"], trace_evidence(item, result.trace))

    return predict


def resolve_method(name: str, match: str | None) -> Method:
    """A registry method, optionally matched to `match`'s attended budget; `name:opt=value` sets a knob."""
    base, _, settings = name.partition(":")
    options = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    method = get_method(base)
    if match and method.matchable and base != match:
        options.setdefault("match", match)
    return configure(method, **{key: _number(value) for key, value in options.items()})


def _number(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_points() -> list[tuple[str, DyCokeConfig]]:
    """(line label, DyCoke settings) of the sweep."""
    default = DyCokeConfig()
    points = [("dycoke (P)", default.replace(prune_ratio=p)) for p in SWEEP_PRUNE_RATIOS]
    points += [("dycoke (K)", default.replace(merge_ratio=k)) for k in SWEEP_MERGE_RATIOS]
    return points


def attended_budget(config: DyCokeConfig, frames: int, tokens_per_frame: int) -> VisualBudget:
    return get_method("dycoke").budget(config, frames, tokens_per_frame)


@dataclass
class Report:
    model: str
    items_per_task: int
    split: str = "test"
    first_item: int = 0  # each task's items are first_item .. first_item + items_per_task - 1
    runs: list[dict] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_table(pipeline, frames: list[int], names: list[str], match: str | None, per_task: int,
              blank: bool, max_new_tokens: int, report: Report, save: Callable[[], None]) -> None:
    config = DyCokeConfig()
    for num_frames in frames:
        suite = list(items(report.split, num_frames, per_task, first=report.first_item))
        baseline: RunScores | None = None
        jobs = [(name, False) for name in names] + ([("baseline", True)] if blank else [])
        for name, on_blank in jobs:
            method = resolve_method(name, match)
            label = f"{name} on blank clips" if on_blank else name
            scores = evaluate(pipeline_predictor(pipeline, method, config, max_new_tokens),
                              [blank_like(item) for item in suite] if on_blank else suite,
                              progress=f"{label}, {num_frames} frames")
            if name == "baseline" and not on_blank:
                baseline = scores
            row = {"method": name, "frames": num_frames, "blank": on_blank, **scores.summary(),
                   "retained": retained(scores, baseline) if baseline and not on_blank else None,
                   "config": method.effective_config(config).to_dict() | method.options()}
            if on_blank:
                row["chance"] = {task: round(CHANCE[task], 4) for task in TASKS}
            report.runs.append(row)
            save()


def run_sweep(pipeline, frames: int, peers: list[str], per_task: int, max_new_tokens: int,
              report: Report, save: Callable[[], None]) -> None:
    suite = list(items(report.split, frames, per_task, first=report.first_item))
    geometry = pipeline.geometry(item_clip(suite[0]))  # Qwen-VL counts temporal groups of two frames
    groups, tokens_per_frame = geometry.groups, geometry.tokens_per_group
    dycoke = get_method("dycoke")
    for label, config in sweep_points():
        budget = attended_budget(config, groups, tokens_per_frame)
        jobs = [(label, dycoke)]
        if label == "dycoke (P)" and 0 < budget.attended < groups * tokens_per_frame:
            for peer in peers:
                try:
                    jobs.append((peer, match_budget(peer, dycoke, config, groups, tokens_per_frame)))
                except ConfigError:
                    continue  # the budget is outside what this peer's ratio can give
        for line, method in jobs:
            scores = evaluate(pipeline_predictor(pipeline, method, config, max_new_tokens), suite,
                              progress=f"sweep {line} at {budget.attended}")
            report.sweep.append({"method": line, "frames": frames, "attended": scores.summary()[
                "visual_tokens_attended"], "budget": budget.attended, "config": config.to_dict() | method.options(),
                **scores.overall.to_dict()})
            save()


def _items_described(report: Report) -> str:
    first = f", from item {report.first_item}" if report.first_item else ""
    return f"{report.items_per_task} {report.split} items per task{first}"


def markdown(report: Report) -> str:
    """Per frame count: one row per method, accuracy per task, overall with its interval, retained, budgets."""
    lines = []
    for frames in sorted({run["frames"] for run in report.runs}):
        lines += [f"\n**{frames} frames** ({_items_described(report)})\n",
                  "| method | " + " | ".join(TASKS) + " | overall (95% CI) | retained | prefill / attended | "
                  "reselect |", "|---" * (len(TASKS) + 5) + "|"]
        for run in (r for r in report.runs if r["frames"] == frames):
            name = run["method"] + (" (blank video)" if run["blank"] else "")
            cells = [f"{run['tasks'][task]['accuracy'] * 100:.0f}" if task in run["tasks"] else "–" for task in TASKS]
            overall = run["overall"]
            low, high = overall["ci95"]
            kept = f"{run['retained'] * 100:.1f}%" if run["retained"] is not None else "–"
            rate = f"{run['reselection_rate']:.2f}" if run["reselection_rate"] is not None else "–"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall['accuracy'] * 100:.1f} "
                         f"({low * 100:.0f}–{high * 100:.0f}) | {kept} | {run['visual_tokens_prefill']:.0f} / "
                         f"{run['visual_tokens_attended']:.0f} | {rate} |")
        lines += evidence_table([r for r in report.runs if r["frames"] == frames and r.get("evidence")])
    return "\n".join(lines).strip() + "\n"


def evidence_table(runs: list[dict]) -> list[str]:
    """Per method and task: % of the answer's tokens kept before the LLM, and the decoding steps' focus on them."""
    if not runs:
        return []
    lines = ["", "Evidence tokens kept (%) / decoding focus on their frames (1 = as any frame), from the traces:", "",
             "| method | " + " | ".join(EVIDENCE_TASKS) + " |", "|---" * (len(EVIDENCE_TASKS) + 1) + "|"]
    for run in runs:
        cells = []
        for task in EVIDENCE_TASKS:
            entry = run["evidence"].get(task)
            focus = f"{entry['focus']:.2f}" if entry and entry["focus"] is not None else "–"
            cells.append(f"{entry['kept'] * 100:.0f} / {focus}" if entry else "–")
        lines.append(f"| {run['method']} | " + " | ".join(cells) + " |")
    return lines


def accuracy_budget_figure(sweep: list[dict], model: str):
    """Accuracy against the visual tokens attended per decoding step, one line per method, with 95% intervals."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for method in dict.fromkeys(point["method"] for point in sweep):
        points = sorted((p for p in sweep if p["method"] == method), key=lambda p: p["attended"])
        figure.add_trace(go.Scatter(
            x=[p["attended"] for p in points], y=[p["accuracy"] * 100 for p in points], name=method,
            mode="lines+markers",
            error_y=dict(type="data", symmetric=False,
                         array=[(p["ci95"][1] - p["accuracy"]) * 100 for p in points],
                         arrayminus=[(p["accuracy"] - p["ci95"][0]) * 100 for p in points], thickness=1),
        ))
    frames = sorted({p["frames"] for p in sweep})
    figure.update_layout(
        title=f"Accuracy against attended visual tokens: {model}, {', '.join(map(str, frames))} frames",
        xaxis=dict(title="visual tokens attended per decoding step", type="log"),
        yaxis=dict(title="accuracy (%)", range=[0, 100]), template="plotly_white", width=900, height=520,
        legend=dict(orientation="v"),
    )
    return figure


def write_png(figure, path: Path) -> None:
    """Render the figure to PNG in Debian's chromium through Playwright (no kaleido download needed)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        page_path = Path(folder) / "chart.html"
        figure.write_html(page_path, include_plotlyjs=True, full_html=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update"])
            page = browser.new_page(viewport={"width": figure.layout.width, "height": figure.layout.height})
            page.goto(page_path.as_uri())
            page.wait_for_selector(".main-svg")
            page.screenshot(path=str(path))
            browser.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dycoke.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, a preset, a Hub id or a local path (default tiny)")
    parser.add_argument("--frames", default="16,32", help="comma-separated frame counts (default 16,32)")
    parser.add_argument("--methods", default="baseline,dycoke,ttm,dp",
                        help=f"comma-separated, from: {', '.join(method_names())}; name:knob=value sets a knob")
    parser.add_argument("--match", default=None, metavar="METHOD",
                        help="match every matchable peer's attended budget to METHOD's (e.g. dycoke)")
    parser.add_argument("--per-task", type=int, default=TEST_ITEMS_PER_TASK,
                        help=f"items per task (default {TEST_ITEMS_PER_TASK}, the whole test split)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="validation: choose between models there, and report the test split (default test)")
    parser.add_argument("--first-item", type=int, default=0,
                        help="each task's first item index (default 0); the validation split has no end")
    parser.add_argument("--blank", action="store_true", help="also score the baseline on blank clips")
    parser.add_argument("--sweep", action="store_true", help="also run the accuracy-versus-budget sweep")
    parser.add_argument("--sweep-frames", type=int, default=16)
    parser.add_argument("--sweep-per-task", type=int, default=20)
    parser.add_argument("--sweep-methods", default=None,
                        help="peers matched along the sweep (default: the matchable ones among --methods)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (written as runs finish)")
    parser.add_argument("--html", type=Path, default=None, help="the sweep chart as HTML")
    parser.add_argument("--png", type=Path, default=None, help="the sweep chart as PNG (needs chromium)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        frames = [int(value) for value in args.frames.split(",")]
        names = [name for name in args.methods.split(",") if name]
        for name in names:
            resolve_method(name, args.match)
        if args.per_task < 1 or args.sweep_per_task < 1 or any(not 8 <= f <= 256 for f in frames):
            raise ValueError("--per-task must be >= 1 and every frame count in 8..256")
        if args.first_item < 0:
            raise ValueError("--first-item must be >= 0")
        needed = max(args.per_task, args.sweep_per_task if args.sweep else 0)
        if args.split == "test" and args.first_item + needed > TEST_ITEMS_PER_TASK:
            raise ValueError(f"the test split has {TEST_ITEMS_PER_TASK} items per task: --first-item plus "
                             "--per-task (and --sweep-per-task) must stay within them")
    except (ValueError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from dycoke.models import ModelLoadError, load
    from dycoke.pipeline import Pipeline

    try:
        pipeline = Pipeline(load(args.model, device=args.device))
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    started = time.monotonic()
    report = Report(pipeline.loaded.name, args.per_task, args.split, args.first_item)

    def save() -> None:
        report.seconds = round(time.monotonic() - started, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")

    run_table(pipeline, frames, names, args.match, args.per_task, args.blank, args.max_new_tokens, report, save)
    print(markdown(report))
    if args.sweep:
        peers = (args.sweep_methods.split(",") if args.sweep_methods
                 else [n for n in names if get_method(n.partition(":")[0]).matchable])
        run_sweep(pipeline, args.sweep_frames, peers, args.sweep_per_task, args.max_new_tokens, report, save)
        figure = accuracy_budget_figure(report.sweep, pipeline.loaded.name)
        if args.html:
            figure.write_html(args.html, include_plotlyjs="cdn")
        if args.png:
            write_png(figure, args.png)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
