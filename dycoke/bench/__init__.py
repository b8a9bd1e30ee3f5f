"""`python -m dycoke.bench`: every method side by side, on the same clip and prompt, in one process.

Every figure is the median over interleaved repeats, with its spread. Next to each time stands its physical
limit: a decode step cannot beat (weight bytes + attended KV bytes) / memory bandwidth, and prefill cannot beat
FLOPs / peak FLOP/s.

    python -m dycoke.bench --preset mini --frames 8,32 --out results.json

The parts: `runner` (measuring), `costs` (analytic FLOPs, bytes and physical limits), `devices` (datasheets and
measured peaks), `summary` (rows, ratios, targets), `report` (tables and chart), `specs` (method specs),
`clip` (the synthetic input), `cli`.
"""

from dycoke.bench.cli import build_parser, main
from dycoke.bench.clip import synthetic_clip
from dycoke.bench.costs import (TextDims, decode_flops, kv_bytes, model_vision_flops, model_weights,
                                physical_limits, prefill_flops, qwen_vision_flops, vision_flops)
from dycoke.bench.devices import DEVICE_TABLE, DeviceSpec, machine_name, measure_device, table_device
from dycoke.bench.report import decode_table, markdown_table, targets_table
from dycoke.bench.runner import QUESTION, SCHEMA, BenchSettings, run_bench
from dycoke.bench.specs import MethodSpec, parse_method_spec, parse_methods
from dycoke.bench.summary import RATIO_KEYS, TARGETS, targets

__all__ = [
    "BenchSettings", "DEVICE_TABLE", "DeviceSpec", "MethodSpec", "QUESTION", "RATIO_KEYS", "SCHEMA", "TARGETS",
    "TextDims", "build_parser", "decode_flops", "decode_table", "kv_bytes", "machine_name", "main",
    "markdown_table", "measure_device", "model_vision_flops", "model_weights", "parse_method_spec", "parse_methods",
    "physical_limits", "prefill_flops", "qwen_vision_flops", "run_bench", "synthetic_clip", "table_device",
    "targets", "targets_table", "vision_flops",
]
