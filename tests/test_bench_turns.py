"""`python -m dycoke.bench --turns N`: it runs end to end, and its summary and targets follow hand counts.

No timing is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import json

from dycoke.bench import main
from dycoke.bench.turns import summarise, targets, turns_table


def test_turns_bench_reports_follow_ups_with_and_without_reuse(tmp_path, capsys):
    out = tmp_path / "turns.json"
    code = main(["--preset", "tiny-random", "--device", "cpu", "--frames", "2", "--turns", "2", "--new-tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["method"] for row in report["rows"]] == ["baseline", "dycoke"]
    for row in report["rows"]:
        assert row["prefix_reused"] == [False, True]
        tokens = row["follow_up_prefill_tokens"]
        assert tokens["reused"]["median"] < tokens["recomputed"]["median"]
        assert row["follow_up_ttft_ms"]["reused"]["n"] == 1
    assert len(report["targets"]) == 4
    printed = capsys.readouterr().out
    assert "follow-up TTFT, reused ms" in printed and "DyCoke's follow-up TTFT <= baseline's" in printed


def turn(ttft: float, prefill: int, tokens_per_s: float, reused: bool) -> dict:
    return {"ttft_ms": ttft, "prefill_tokens": prefill, "decode_tokens_per_s": tokens_per_s,
            "prefix_reused": reused}


def test_summary_takes_medians_over_follow_ups_and_targets_compare_methods():
    def runs(first: float, follow_ups: list[float], per_s: float, reused: bool) -> list[list[dict]]:
        return [[turn(first, 1000, per_s, False)] + [turn(ms, 40 if reused else 1000, per_s, reused)
                                                     for ms in follow_ups]]

    baseline = summarise("baseline", 32, runs(500, [10, 30], 50.0, True), runs(500, [200, 400], 50.0, False))
    assert baseline["first_ttft_ms"]["median"] == 500
    assert baseline["follow_up_ttft_ms"]["reused"]["median"] == 20
    assert baseline["follow_up_ttft_lower_by"] == 300 / 20
    assert baseline["follow_up_decode_ms_per_token"]["reused"]["median"] == 20.0  # 1000 / 50 tokens per s
    dycoke = summarise("dycoke", 32, runs(300, [25, 25], 100.0, True), runs(300, [200, 200], 100.0, False))
    report = {"settings": {"frames": [32]}, "rows": [baseline, dycoke]}
    checks = {check["target"]: check for check in targets(report)}
    assert checks["baseline: follow-up TTFT with reuse >= 10x lower"]["met"]
    assert not checks["dycoke: follow-up TTFT with reuse >= 10x lower"]["met"]  # 200 / 25 = 8x
    assert checks["with reuse, DyCoke's follow-up TTFT <= baseline's"]["value"] == 25 / 20
    assert not checks["with reuse, DyCoke's follow-up TTFT <= baseline's"]["met"]
    assert checks["with reuse, DyCoke's decode ms/token <= baseline's"]["value"] == 10.0 / 20.0
    row = "| 32 | baseline | 500 (500–500) | 20 (10–30) | 300 (200–400) | 15.00× | 40 / 1,000 |"
    assert row in turns_table(report)
