"""The report for people: Markdown tables on stdout and a Plotly chart."""

from __future__ import annotations

from pathlib import Path


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _range(spread: dict, digits: int = 0) -> str:
    return f"{_fmt(spread['median'], digits)} ({_fmt(spread['min'], digits)}–{_fmt(spread['max'], digits)})"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _frames(row: dict) -> str:
    """`8`, or `8 (4 groups)` on a model that merges frames into temporal groups (Qwen-VL)."""
    groups = row.get("groups", row["frames"])
    return str(row["frames"]) if groups == row["frames"] else f"{row['frames']} ({groups} groups)"


def markdown_table(report: dict) -> str:
    """One line per (frames, method): medians with (min–max), ratios vs baseline, and % of the physical limit."""
    rows = report["rows"]
    use_peak = all(row["peak_memory_bytes"] is not None for row in rows)
    memory_title = "peak above weights MB" if use_peak else "KV cache MB"
    header = ["frames", "method", "visual tokens prefill / attended", "TTFT ms", "prefill ms", "decode ms/token",
              "latency ms", memory_title, "TTFT ×", "decode ×", "latency ×", "memory ×", "reselect rate",
              "decode % of limit", "prefill % of limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        ratios = row["vs_baseline"]
        if use_peak:
            memory, memory_ratio = row["peak_above_weights_bytes"] / 1e6, ratios["peak_above_weights"]
        else:
            memory, memory_ratio = row["kv_cache_bytes"] / 1e6, ratios["kv_cache"]
        spread = row["spread"]
        lines.append("| " + " | ".join([
            _frames(row),
            row["method"],
            f"{row['visual_tokens_prefill']:,} / {row['visual_tokens_attended']:,.0f}",
            _range(spread["ttft_ms"]),
            _fmt(row["prefill_ms"]),
            _range(spread["decode_ms_per_token"], 1),
            _range(spread["latency_ms"]),
            _fmt(memory, 1),
            _times(ratios["ttft"]),
            _times(ratios["decode_step"]),
            _times(ratios["latency"]),
            _times(memory_ratio),
            f"{row['reselection_rate']:.2f}",
            _fmt(row["limit"]["pct_decode_step"], 1),
            _fmt(row["limit"]["pct_prefill"], 1),
        ]) + " |")
    return "\n".join(lines)


def decode_table(report: dict) -> str:
    """Where a decoding step's time goes: forward time of reuse and reselect steps, and DP's own work."""
    header = ["frames", "method", "forward ms/step", "reuse step ms (n)", "reselect step ms (n)", "reselect rate",
              "DP score+select ms/step", "DP rebuild ms/reselect (static: gather ms/step)",
              "compress + DP overhead % of latency"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in report["rows"]:
        split, overhead = row["decode_step_split_ms"], row["overhead"]
        steps = max(1, round(row["new_tokens"] - 1))
        reselections = row["reselections"] or 0
        lines.append("| " + " | ".join([
            _frames(row),
            row["method"],
            _fmt(row["decode_step_ms"], 2),
            f"{_fmt(split['reuse'], 2)} ({split['reuse_steps']})",
            f"{_fmt(split['reselect'], 2)} ({split['reselect_steps']})",
            f"{row['reselection_rate']:.2f}",
            _fmt((overhead["score_select_ms"] or 0.0) / steps, 3),
            _fmt(_rebuild_ms(row, steps, reselections), 3),
            _fmt(overhead["pct_of_latency"], 2),
        ]) + " |")
    return "\n".join(lines)


def _rebuild_ms(row: dict, steps: int, reselections: int) -> float | None:
    """A dynamic DyCokeCache rebuilds its compact copy per reselection; a static one gathers at every step."""
    if row.get("cache_class") == "StaticDyCokeCache":
        return row["overhead"]["compact_rebuild_ms"] / steps
    return row["overhead"]["compact_rebuild_ms"] / reselections if reselections else None


def targets_table(report: dict) -> str:
    lines = ["| target (DESIGN.md §6) | frames | required | measured | met |", "|---|---|---|---|---|"]
    for target in report.get("targets", []):
        unit = "%" if "%" in target["target"] else "×"
        measured = "n/a (not measured here)" if target["measured"] is None else f"{target['measured']:.2f}{unit}"
        met = {True: "yes", False: "**no**", None: "–"}[target["met"]]
        lines.append(f"| {target['target']} | {target['frames']} | {target['required']}{unit} | {measured} | {met} |")
    return "\n".join(lines)


def describe(report: dict) -> str:
    machine, model, settings = report["machine"], report["model"], report["settings"]
    used = report["device_table"]["used"]
    return (
        f"{model['name']} ({model['dtype']}, {model['attention']}, "
        f"{'random' if model['random_weights'] else 'pretrained'} weights, "
        f"{model['weight_bytes'] / 1e6:,.1f} MB) on {machine['name']} ({machine['device_name']}, "
        f"{machine['torch_threads']} threads); {settings['new_tokens']} new tokens, EOS ignored; "
        f"median (min–max) of {settings['repeats']} repeats after {settings['warmup']} warm-up; "
        f"limits from {used['name']}: {used['bandwidth_TB_per_s'] * 1000:,.1f} GB/s, "
        f"{used['peak_TFLOP_per_s']:,.2f} TFLOP/s ({used['source']}); {cache_note(report)}"
    )


CACHE_NOTES = {
    "static": "static KV cache (preallocated: transformers' StaticCache for the baseline and every method that "
              "leaves decoding alone; DyCoke's unpruned layers static too, its reselect decision on the device)",
    "dynamic": "dynamic KV cache (DynamicCache, which copies the whole cache at every step; DP decides on the host)",
}


def cache_note(report: dict) -> str:
    """Which cache the baseline (and every method) decoded with, and whether decoding was compiled."""
    settings = report["settings"]
    kind = settings.get("cache", "dynamic")
    compile_settings = settings.get("compile") or {"requested": False, "notes": []}
    compiled = sorted({row["method"] for row in report["rows"] if row.get("compiled")})
    uncompiled = sorted({row["method"] for row in report["rows"] if not row.get("compiled")})
    if not compile_settings["requested"]:
        compiling = "decoding not compiled"
    elif compiled:
        compiling = f"decoding compiled (torch.compile) for {', '.join(compiled)}"
        compiling += f"; not for {', '.join(uncompiled)} (a dynamic cache)" if uncompiled else ""
    else:
        compiling = "--compile asked, but no method's decoding was compiled"
    notes = "".join(f"; note: {note}" for note in compile_settings["notes"])
    dynamic_peers = sorted({row["method"] for row in report["rows"] if row.get("cache_class") == "FastVCache"})
    peers = f"; {', '.join(dynamic_peers)} keep a dynamic cache" if kind == "static" and dynamic_peers else ""
    return f"baseline and methods on a {CACHE_NOTES[kind]}{peers}; {compiling}{notes}"


def write_chart(report: dict, path: str | Path) -> None:
    from dycoke.viz import bench_figure

    fig = bench_figure(report["rows"])
    fig.update_layout(title={"text": f"DyCoke benchmark: {report['model']['name']} on {report['machine']['name']}"})
    fig.write_html(str(path), include_plotlyjs="cdn")
