"""`python -m dycoke.bench --turns N`: the follow-up questions of a conversation, with and without reuse.

Every method holds the same conversation (the bench question, then follow-ups) twice per repeat: once reusing
its video prefix and earlier turns, once recomputing every turn from scratch (vision, compression, the whole
prefill). A follow-up is any turn after the first. Repeats rotate the method order, as the main bench does.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dycoke.bench.clip import synthetic_clip
from dycoke.bench.devices import device_spec_for, load_average, machine_info
from dycoke.bench.runner import QUESTION
from dycoke.bench.specs import MethodSpec
from dycoke.bench.summary import _ratio, _spread
from dycoke.config import DyCokeConfig
from dycoke.memory import ConversationMemory

SCHEMA = "dycoke.bench.turns/1"
FOLLOW_UPS = ["What colour is the shape that moves fastest?", "Where is it at the end of the video?",
              "Which shapes move to the left?", "How many shapes are there?", "Does anything stay still?"]


@dataclass(frozen=True)
class TurnSettings:
    frames: list[int]
    methods: list[MethodSpec]
    turns: int = 3
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    base_config: DyCokeConfig = DyCokeConfig()

    @property
    def questions(self) -> list[str]:
        return [QUESTION] + [FOLLOW_UPS[i % len(FOLLOW_UPS)] for i in range(self.turns - 1)]


def converse(pipeline, clip, spec: MethodSpec, settings: TurnSettings, reuse: bool) -> list[dict]:
    """One conversation; the metrics of each turn."""
    from dycoke.conversation import Conversation

    pipeline.memory = ConversationMemory()  # nothing kept from an earlier conversation: the first turn pays in full
    gc.collect()
    conversation = Conversation(pipeline, clip, spec.resolved(), spec.config(settings.base_config),
                                max_new_tokens=settings.new_tokens, ignore_eos=True, reuse=reuse)
    return [conversation.answer(question).metrics for question in settings.questions]


def run_turns(pipeline, settings: TurnSettings, log: Callable[[str], None] = lambda line: None) -> dict:
    """Measure every (frames, method) conversation with and without reuse, and return the report."""
    loaded = pipeline.loaded
    load_before = load_average()
    rows = []
    for frames in settings.frames:
        clip = synthetic_clip(frames, loaded.image_size)  # the model's own square frame size, as in run_bench
        turns: dict[tuple[str, bool], list[list[dict]]] = {}
        for repeat in range(settings.warmup + settings.repeats):
            shift = repeat % len(settings.methods)
            for spec in settings.methods[shift:] + settings.methods[:shift]:
                for reuse in (True, False):
                    metrics = converse(pipeline, clip, spec, settings, reuse)
                    kind = "warm-up" if repeat < settings.warmup else f"repeat {repeat - settings.warmup + 1}"
                    log(f"{frames:>4} frames  {spec.label:<12} {'reuse' if reuse else 'recompute':<9} {kind:<9} "
                        f"follow-up TTFT {[round(m['ttft_ms']) for m in metrics[1:]]} ms")
                    if repeat >= settings.warmup:
                        turns.setdefault((spec.label, reuse), []).append(metrics)
        rows.extend(summarise(spec.label, frames, turns[spec.label, True], turns[spec.label, False])
                    for spec in settings.methods)
    return {
        "schema": SCHEMA,
        "machine": machine_info(loaded.device, device_spec_for(loaded.device, loaded.dtype, pipeline.clock))
        | {"load_average_1min": {"before": load_before, "after": load_average()}},
        "model": {"name": loaded.name, "random_weights": loaded.is_random,
                  "dtype": str(loaded.dtype).removeprefix("torch.")},
        "settings": {"frames": settings.frames, "methods": [spec.label for spec in settings.methods],
                     "turns": settings.turns, "questions": settings.questions, "new_tokens": settings.new_tokens,
                     "ignore_eos": True, "repeats": settings.repeats, "warmup": settings.warmup,
                     "config": settings.base_config.to_dict()},
        "rows": rows,
    }


def summarise(method: str, frames: int, reused: list[list[dict]], recomputed: list[list[dict]]) -> dict:
    """Medians over repeats and follow-up turns; the first turn is the same work either way."""
    def figure(runs: list[list[dict]], key: str, first: bool = False) -> dict:
        return _spread([turn[key] for run in runs for turn in (run[:1] if first else run[1:])])

    def step_ms(runs: list[list[dict]]) -> dict:
        return _spread([1000.0 / turn["decode_tokens_per_s"] for run in runs for turn in run[1:]
                        if turn["decode_tokens_per_s"]])

    row = {
        "frames": frames, "method": method,
        "first_ttft_ms": figure(reused, "ttft_ms", first=True),
        "follow_up_ttft_ms": {"reused": figure(reused, "ttft_ms"), "recomputed": figure(recomputed, "ttft_ms")},
        "follow_up_prefill_tokens": {"reused": figure(reused, "prefill_tokens"),
                                     "recomputed": figure(recomputed, "prefill_tokens")},
        "follow_up_decode_ms_per_token": {"reused": step_ms(reused), "recomputed": step_ms(recomputed)},
        "prefix_reused": [turn["prefix_reused"] for turn in reused[0]],
    }
    ttft = row["follow_up_ttft_ms"]
    row["follow_up_ttft_lower_by"] = _ratio(ttft["recomputed"]["median"], ttft["reused"]["median"])
    return row


def targets(report: dict, methods: tuple[str, ...] = ("baseline", "dycoke")) -> list[dict]:
    """Issue 13's targets: reuse >= 10x lower follow-up TTFT; with reuse, DyCoke no slower than the baseline."""
    checks = []
    for frames in report["settings"]["frames"]:
        rows = {row["method"]: row for row in report["rows"] if row["frames"] == frames}
        for method in methods:
            if method in rows:
                lower = rows[method]["follow_up_ttft_lower_by"]
                checks.append({"frames": frames, "target": f"{method}: follow-up TTFT with reuse >= 10x lower",
                               "value": lower, "met": lower is not None and lower >= 10.0})
        if {"baseline", "dycoke"} <= set(rows):
            for key, name in (("follow_up_ttft_ms", "follow-up TTFT"),
                              ("follow_up_decode_ms_per_token", "decode ms/token")):
                dycoke, baseline = (rows[m][key]["reused"]["median"] for m in ("dycoke", "baseline"))
                ratio = _ratio(dycoke, baseline)
                checks.append({"frames": frames, "target": f"with reuse, DyCoke's {name} <= baseline's",
                               "value": ratio, "met": ratio is not None and ratio <= 1.0})
    return checks


def main_turns(pipeline, settings: TurnSettings, out: str, log: Callable[[str], None]) -> int:
    """Run, write the JSON report, print the tables."""
    report = run_turns(pipeline, settings, log)
    report["targets"] = targets(report)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['model']['name']} ({report['model']['dtype']}) on {report['machine']['device_name']}, "
          f"{settings.turns} turns of {settings.new_tokens} tokens, {settings.repeats} repeats + "
          f"{settings.warmup} warm-up, load {report['machine']['load_average_1min']}")
    print()
    print(turns_table(report))
    print()
    print(turn_targets_table(report["targets"]))
    log(f"wrote {path}")
    return 0


def turns_table(report: dict) -> str:
    header = ["frames", "method", "1st-turn TTFT ms", "follow-up TTFT, reused ms", "follow-up TTFT, recomputed ms",
              "lower by", "follow-up prefill tokens reused / recomputed", "decode ms/token reused"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in report["rows"]:
        ttft, tokens = row["follow_up_ttft_ms"], row["follow_up_prefill_tokens"]
        cells = [str(row["frames"]), row["method"], _ms(row["first_ttft_ms"]), _ms(ttft["reused"]),
                 _ms(ttft["recomputed"]), _times(row["follow_up_ttft_lower_by"]),
                 f"{tokens['reused']['median']:,.0f} / {tokens['recomputed']['median']:,.0f}",
                 _ms(row["follow_up_decode_ms_per_token"]["reused"], digits=1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def turn_targets_table(checks: list[dict]) -> str:
    lines = ["| frames | target | value | met |", "|---|---|---|---|"]
    lines += [f"| {c['frames']} | {c['target']} | {_times(c['value'])} | {'yes' if c['met'] else 'no'} |"
              for c in checks]
    return "\n".join(lines)


def _ms(spread: dict, digits: int = 0) -> str:
    if spread["median"] is None:
        return "n/a"
    return f"{spread['median']:,.{digits}f} ({spread['min']:,.{digits}f}–{spread['max']:,.{digits}f})"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"
