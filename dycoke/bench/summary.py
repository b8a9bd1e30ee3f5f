"""From samples to report rows: medians and spreads, analytic costs, ratios against the baseline, targets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from dycoke.bench.costs import TextDims, decode_flops, kv_bytes, model_vision_flops, physical_limits, prefill_flops
from dycoke.bench.devices import DEVICE_TABLE, DeviceSpec
from dycoke.bench.specs import MethodSpec
from dycoke.families import Geometry

if TYPE_CHECKING:
    from dycoke.bench.runner import Sample


def _spread(values: Sequence[float]) -> dict:
    clean = sorted(v for v in values if v is not None and not math.isnan(v))
    if not clean:
        return {"median": None, "min": None, "q1": None, "q3": None, "max": None, "n": 0}
    quartiles = statistics.quantiles(clean, n=4, method="inclusive") if len(clean) > 1 else [clean[0]] * 3
    return {"median": statistics.median(clean), "min": clean[0], "q1": quartiles[0], "q3": quartiles[2],
            "max": clean[-1], "n": len(clean)}


def _median(values: Sequence[float]) -> float | None:
    return _spread(values)["median"]


def summarise(spec: MethodSpec, frames: int, samples: list[Sample], loaded, text_tokens: int, weights: dict,
              video_decode_ms: float, geometry: Geometry) -> dict:
    """One row of the report: medians, spreads, token counts, analytic FLOPs and bytes, limits on every device.

    `geometry` is the clip's on this model: `frames` video frames are `geometry.groups` temporal groups on
    Qwen-VL, each of `geometry.tokens_per_group` merged tokens."""
    model_config = loaded.model.config
    text_config = model_config.text_config
    first = samples[0].metrics
    config = samples[0].config
    bytes_per_value = torch.empty((), dtype=loaded.dtype).element_size()
    per_sample = {
        "ttft_ms": [s.metrics["ttft_ms"] for s in samples],
        "prefill_ms": [s.metrics["prefill_ms"] for s in samples],
        "vision_ms": [s.metrics["vision_ms"] for s in samples],
        "compress_ms": [s.metrics["compress_ms"] for s in samples],
        "decode_ms_per_token": [1000.0 / s.metrics["decode_tokens_per_s"] if s.metrics["decode_tokens_per_s"]
                                else None for s in samples],
        "latency_ms": [s.metrics["total_ms"] for s in samples],
        "prefill_forward_ms": [s.prefill_forward_ms for s in samples],
        "decode_step_ms": [_median(s.reuse_step_ms + s.reselect_step_ms) for s in samples],
    }
    spread = {key: _spread(values) for key, values in per_sample.items()}
    medians = {key: value["median"] for key, value in spread.items()}

    new_tokens = first["new_tokens"]
    visual_prefill = first["visual_tokens_after_ttm"]
    visual_attended = first["visual_tokens_attended_mean"]
    prefill_tokens = text_tokens + visual_prefill
    mean_context = prefill_tokens + new_tokens / 2  # decode step j attends prefill + j keys, j = 1 .. n-1
    dims = TextDims.of(text_config)
    # Layers from which fewer visual tokens are attended: DP's L, or FastV's K (it also shortens the prefill).
    shortens_prefill = "fastv_layer" in config
    pruned_from = config["fastv_layer"] if shortens_prefill else config.get("prune_layer", dims.layers)
    prunes = visual_attended < visual_prefill
    dropped = visual_prefill - visual_attended if prunes else 0
    keys_per_layer = [mean_context - dropped if layer >= pruned_from else mean_context for layer in range(dims.layers)]
    prefill_lengths = [prefill_tokens - dropped if shortens_prefill and layer >= pruned_from else prefill_tokens
                       for layer in range(dims.layers)]
    dp_active = first["reselections"] > 0
    flops = {
        "vision": model_vision_flops(model_config, geometry),
        "prefill": prefill_flops(text_config, prefill_lengths),
        "decode_step": decode_flops(text_config, keys_per_layer, scored_keys=round(mean_context) if dp_active else 0),
    }
    flops["example"] = flops["vision"] + flops["prefill"] + (new_tokens - 1) * flops["decode_step"]
    attended_kv = kv_bytes(text_config, keys_per_layer, bytes_per_value)

    peaks = [s.metrics["peak_memory_bytes"] for s in samples]
    peak = None if any(p is None for p in peaks) else _median(peaks)
    all_reuse = [ms for s in samples for ms in s.reuse_step_ms]
    all_reselect = [ms for s in samples for ms in s.reselect_step_ms]
    steps = sum(s.steps for s in samples)
    return {
        "frames": frames,
        "method": spec.label,
        "base_method": spec.method,
        "groups": geometry.groups,
        "tokens_per_group": geometry.tokens_per_group,
        "config": config,
        "cache_class": samples[-1].cache_class,
        "compiled": all(s.compiled for s in samples),
        "samples": len(samples),
        "new_tokens": new_tokens,
        "visual_tokens_in": first["visual_tokens_in"],
        "visual_tokens_prefill": visual_prefill,
        "visual_tokens_attended": visual_attended,
        "prefill_tokens": prefill_tokens,
        **{key: (round(value, 3) if value is not None else None) for key, value in medians.items()},
        "peak_memory_bytes": peak,
        "peak_above_weights_bytes": None if peak is None else peak - weights["all"],
        "kv_cache_bytes": first["kv_cache_bytes"],
        "kv_cache_bytes_analytic_full": kv_bytes(text_config, prefill_tokens + new_tokens - 1, bytes_per_value),
        "attended_kv_bytes_per_step": attended_kv,
        "reselections": _median([s.metrics["reselections"] for s in samples]),
        "reselection_rate": round(sum(s.reselected_steps for s in samples) / steps, 4) if steps else 0.0,
        "decode_step_split_ms": {
            "reuse": _median(all_reuse), "reuse_steps": len(all_reuse),
            "reselect": _median(all_reselect), "reselect_steps": len(all_reselect),
        },
        "video_decode_ms": video_decode_ms,
        "flops": flops,
        "language_weight_bytes": weights["language"],
        "limit": None,  # set by add_limits, once the device's figures are final
        "limits_by_device": {
            key: {name: round(value, 4) for name, value in
                  physical_limits(other, weights["language"], attended_kv, flops, new_tokens).items()
                  if name.endswith("_ms")}
            for key, other in DEVICE_TABLE.items()
        },
        "overhead": overhead_summary(samples),
        "spread": spread,
        "values": {key: values for key, values in per_sample.items()},
    }


def add_limits(rows: list[dict], device: DeviceSpec) -> None:
    """Each row's lower bounds on `device`, and the share of them its medians reach (100% = at the limit)."""
    measured_keys = {"decode_step_ms": "decode_ms_per_token", "prefill_ms": "prefill_ms", "ttft_ms": "ttft_ms",
                     "latency_ms": "latency_ms"}
    for row in rows:
        limit = physical_limits(device, row["language_weight_bytes"], row["attended_kv_bytes_per_step"],
                                row["flops"], row["new_tokens"])
        for key, measured_key in measured_keys.items():
            value = row[measured_key]
            limit[f"pct_{key.removesuffix('_ms')}"] = round(100.0 * limit[key] / value, 2) if value else None
        row["limit"] = limit


RATIO_KEYS = {
    "ttft": "ttft_ms",
    "prefill": "prefill_ms",
    "decode_step": "decode_ms_per_token",
    "latency": "latency_ms",
    "peak_memory": "peak_memory_bytes",
    "peak_above_weights": "peak_above_weights_bytes",
    "kv_cache": "kv_cache_bytes",
}


def add_ratios(rows: list[dict]) -> None:
    """`vs_baseline[k]` = baseline's median / this row's median, from the same run: above 1 is faster or smaller."""
    baseline = next((row for row in rows if row["method"] == "baseline"), None)
    for row in rows:
        ratios = {}
        for name, key in RATIO_KEYS.items():
            ratios[name] = _ratio(baseline and baseline.get(key), row.get(key))
        ratios["prefill_flops"] = _ratio(baseline and baseline["flops"]["prefill"], row["flops"]["prefill"])
        ratios["example_flops"] = _ratio(baseline and baseline["flops"]["example"], row["flops"]["example"])
        row["vs_baseline"] = ratios


def _ratio(reference: float | None, value: float | None) -> float | None:
    if reference is None or not value:
        return None
    return reference / value


def overhead_summary(samples: list[Sample]) -> dict:
    """DP's scoring, selection and compact rebuilds, and the compress stage, medians over the samples.

    Host time on the CPU; on CUDA the device time of the regions' kernels, read from events, so that the one
    host-device sync of the reselect decision is not counted as work.
    """
    def region_ms(sample: Sample, region: str) -> float:
        totals = sample.dp_regions.get(region)
        if not totals:
            return 0.0
        return totals["device_ms"] if totals["device_ms"] is not None else totals["host_ms"]

    return {
        "compress_ms": _median([s.metrics["compress_ms"] for s in samples]),
        "score_select_ms": _median([region_ms(s, "score") for s in samples]),
        "compact_rebuild_ms": _median([region_ms(s, "rebuild") for s in samples]),
    }


def add_overhead_share(rows: list[dict]) -> None:
    """TTM = this method's compress stage minus the baseline's (which only assembles the prompt), plus DP's work."""
    baseline = next((row for row in rows if row["method"] == "baseline"), None)
    reference = baseline["overhead"]["compress_ms"] if baseline else 0.0
    for row in rows:
        overhead = row["overhead"]
        overhead["ttm_ms"] = max(0.0, overhead["compress_ms"] - reference) if row is not baseline else 0.0
        overhead["overhead_ms"] = overhead["ttm_ms"] + overhead["score_select_ms"] + overhead["compact_rebuild_ms"]
        latency = row["latency_ms"]
        overhead["pct_of_latency"] = 100.0 * overhead["overhead_ms"] / latency if latency else None


# DESIGN.md §6: DyCoke against the sdpa baseline, same run, same input.
TARGETS = [
    # (name, ratio key or figure, frames (None: every frame count), required, comparison)
    ("TTFT faster", "ttft", 32, 2.0, ">="),
    ("TTFT faster", "ttft", 128, 3.0, ">="),
    ("per-example latency faster (<= 32 tokens)", "latency", 32, 1.6, ">="),
    ("peak memory above weights lower", "peak_above_weights", 32, 1.5, ">="),
    ("decode step not slower", "decode_step", None, 1.0, ">="),
    ("TTM + selection overhead, % of latency", "overhead", None, 2.0, "<="),
]


def targets(report: dict, method: str = "dycoke") -> list[dict]:
    """Each DESIGN.md §6 target that this run can speak to, with the measured value and whether it is met."""
    found = []
    rows = [row for row in report["rows"] if row["method"] == method]
    for name, key, frames, required, comparison in TARGETS:
        for row in rows:
            if frames is not None and row["frames"] != frames:
                continue
            value = row["overhead"]["pct_of_latency"] if key == "overhead" else row["vs_baseline"].get(key)
            met = None if value is None else (value >= required if comparison == ">=" else value <= required)
            found.append({"target": name, "frames": row["frames"], "required": f"{comparison} {required}",
                          "measured": value, "met": met})
    return found
