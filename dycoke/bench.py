"""`python -m dycoke.bench`: every method side by side, on the same clip and prompt, in one process.

Each repeat runs every method once, in an order that rotates from repeat to repeat, so that drift (clock
boost, cache state, allocator) hits all methods alike. Every figure is the median over the repeats, with its
spread. Next to each time stands its physical limit: a decode step cannot beat (weight bytes + attended KV
bytes) / memory bandwidth, and prefill cannot beat FLOPs / peak FLOP/s.

    python -m dycoke.bench --preset mini --frames 8,32 --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dycoke.config import DyCokeConfig
from dycoke.methods import get_method, method_names
from dycoke.metrics import Clock
from dycoke.video import VideoClip

QUESTION = "Describe what happens in this video."
SCHEMA = "dycoke.bench/1"

# Repeats and warm-up per preset: `mini` at 8 and 32 frames stays within a few minutes on two CPU cores.
PRESET_DEFAULTS = {
    "tiny-random": dict(repeats=3, warmup=1),
    "mini": dict(repeats=3, warmup=1),
    "ov-0.5b": dict(repeats=5, warmup=1),
    "ov-7b": dict(repeats=5, warmup=1),
}
DEFAULT_RUNS = dict(repeats=5, warmup=1)

# Short names for DyCokeConfig fields in method specs such as `dycoke:tau=-1`.
KNOBS = {"K": "merge_ratio", "W": "window", "L": "prune_layer", "P": "prune_ratio", "tau": "reselect_threshold"}

# --- devices and their physical limits ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bandwidth_bytes_per_s: float
    peak_flops_per_s: float
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "bandwidth_TB_per_s": self.bandwidth_bytes_per_s / 1e12,
                "peak_TFLOP_per_s": self.peak_flops_per_s / 1e12, "source": self.source}


# Peak FLOP/s are dense bf16 tensor-core figures (no sparsity). Where two figures circulate, the higher one is
# used, so that the limit stays a true lower bound.
DEVICE_TABLE: dict[str, DeviceSpec] = {
    "H100": DeviceSpec("H100 SXM", 3.35e12, 989e12, "NVIDIA H100 datasheet, SXM5: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense"),
    "H100-PCIe": DeviceSpec("H100 PCIe", 2.0e12, 756e12, "NVIDIA H100 datasheet, PCIe: 2.0 TB/s HBM2e, 756 TFLOP/s bf16 dense"),
    "H200": DeviceSpec("H200 SXM", 4.8e12, 989e12, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense"),
    "A10G": DeviceSpec("A10G", 0.6e12, 125e12,
                       "600 GB/s GDDR6; 125 TFLOP/s is NVIDIA's bf16 dense figure for the A10 (same GA102 chip). "
                       "The A10G is also quoted near 70 TFLOP/s sustained; the higher figure keeps the bound a bound"),
    "L4": DeviceSpec("L4", 0.3e12, 121e12, "NVIDIA L4 datasheet: 300 GB/s GDDR6, 121 TFLOP/s bf16 dense (242 sparse)"),
}


def table_device(cuda_name: str) -> str | None:
    """The DEVICE_TABLE key for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100'."""
    upper = cuda_name.upper()
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        return "H100-PCIe" if "PCIE" in upper else "H100"
    if "A10G" in upper:
        return "A10G"
    if re.search(r"\bL4\b", upper):
        return "L4"
    return None


def machine_name(device: torch.device) -> str:
    """What result files are named after: `cpu-2core`, `h100`, or a slug of the GPU's name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = table_device(name)
        return key.lower() if key else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"cpu-{cores}core"


def measure_device(device: torch.device, dtype: torch.dtype, clock: Clock) -> DeviceSpec:
    """Best-of-N copy bandwidth (bytes read + written) and square-matmul FLOP/s: a practical, measured peak."""
    elements = 32 * 1024 * 1024
    source = torch.ones(elements, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_s = _best_of(lambda: target.copy_(source), clock, 10)
    size = 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul_s = _best_of(lambda: torch.matmul(a, b), clock, 5)
    bandwidth = 2 * source.nbytes / copy_s
    peak = 2 * size**3 / matmul_s
    label = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    return DeviceSpec(label, bandwidth, peak,
                      f"measured on this machine: best of 10 copies of 128 MB (read + write) and of 5 "
                      f"{size}x{size} {dtype_name} matmuls; a practical peak, not a datasheet one")


def _best_of(work: Callable[[], object], clock: Clock, times: int) -> float:
    work()
    best = math.inf
    for _ in range(times):
        start = clock.now()
        work()
        best = min(best, clock.now() - start)
    return best


# --- analytic FLOPs and bytes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "TextDims":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads, kv_heads,
                   head_dim, config.vocab_size)

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in one decoder layer: q, k, v, o and the gated MLP."""
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q_width + 2 * self.hidden * kv_width + 3 * self.hidden * self.intermediate


def prefill_flops(config, seq_len: int | Sequence[int], logits_tokens: int = 1) -> int:
    """Matmul FLOPs of the language model's prefill over seq_len tokens (Qwen2 text config).

    2 FLOPs per multiply-add: 2·S·(layer weights) per layer, causal attention QK^T and AV over S(S+1)/2 query-key
    pairs, and the LM head for the `logits_tokens` positions whose logits are computed (generate asks for 1).
    `seq_len` is one length, or one per layer for a method that shortens the sequence inside the model (FastV).
    Norms, rotary and softmax are left out: they are O(S·hidden), far below the matmuls.
    """
    dims = TextDims.of(config)
    lengths = [seq_len] * dims.layers if isinstance(seq_len, int) else list(seq_len)
    if len(lengths) != dims.layers:
        raise ValueError(f"seq_len has {len(lengths)} entries for {dims.layers} layers")
    total = 0
    for length in lengths:
        linear = 2 * length * dims.layer_matmul_params
        attention = 2 * 2 * dims.heads * dims.head_dim * (length * (length + 1) // 2)
        total += linear + attention
    return total + 2 * logits_tokens * dims.hidden * dims.vocab


def decode_flops(config, keys_per_layer: int | Sequence[float], scored_keys: int = 0) -> float:
    """Matmul FLOPs of one decoding step: one token through every layer, attending `keys_per_layer` keys.

    `keys_per_layer` is one count for all layers, or one per layer (DP attends fewer keys from layer L on).
    `scored_keys` > 0 adds DP's scoring at layer L-1: the q and k projections once more and QK^T over those keys.
    """
    dims = TextDims.of(config)
    keys = [keys_per_layer] * dims.layers if isinstance(keys_per_layer, (int, float)) else list(keys_per_layer)
    if len(keys) != dims.layers:
        raise ValueError(f"keys_per_layer has {len(keys)} entries for {dims.layers} layers")
    linear = 2 * dims.layers * dims.layer_matmul_params
    attention = sum(2 * 2 * dims.heads * dims.head_dim * k for k in keys)
    scoring = 0
    if scored_keys:
        scoring = 2 * dims.hidden * (dims.heads + dims.kv_heads) * dims.head_dim + 2 * dims.heads * dims.head_dim * scored_keys
    return linear + attention + 2 * dims.hidden * dims.vocab + scoring


def vision_flops(vision_config, frames: int, text_hidden: int) -> int:
    """Matmul FLOPs of SigLIP on `frames` frames, plus LLaVA-OneVision's two-layer projector.

    Per frame: the patch embedding, then per layer 2·P·(4d² + 2d·I) for the projections and MLP and 4·P²·d for
    full (non-causal) attention, with P = (image/patch)² patches; the pooling head when the config has one; the
    projector maps every patch d -> h -> h before the 2x2 pooling.
    """
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    d, inner = vision_config.hidden_size, vision_config.intermediate_size
    embed = 2 * patches * 3 * vision_config.patch_size**2 * d
    layer = 2 * patches * (4 * d * d + 2 * d * inner) + 4 * patches * patches * d
    head = 0
    if getattr(vision_config, "vision_use_head", False):  # one probe query over all patches, MLP on it
        head = 2 * patches * 2 * d * d + 4 * patches * d + 2 * (2 * d * d + 2 * d * inner)
    projector = 2 * patches * (d * text_hidden + text_hidden * text_hidden)
    return frames * (embed + vision_config.num_hidden_layers * layer + head + projector)


def kv_bytes(config, keys_per_layer: int | Sequence[float], bytes_per_value: int) -> float:
    """Bytes of K and V for `keys_per_layer` positions (one count, or one per layer)."""
    dims = TextDims.of(config)
    keys = [keys_per_layer] * dims.layers if isinstance(keys_per_layer, (int, float)) else list(keys_per_layer)
    return sum(2 * dims.kv_heads * dims.head_dim * bytes_per_value * k for k in keys)


# --- input -------------------------------------------------------------------------------------------------


def synthetic_clip(num_frames: int, size: int = 384, fps: float = 8.0) -> VideoClip:
    """Deterministic moving shapes on a still gradient: real motion in known places, no file, no randomness."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.stack([40 + 60 * rows, 70 + 40 * cols, 110 + 30 * rows * cols], axis=-1)
    shapes = [  # (colour, half-size, row centre, speed in px/frame, start column, circle?)
        ((230, 57, 70), 28, 0.25, 9.0, 0.0, True),
        ((240, 240, 240), 34, 0.55, -6.0, 0.8, False),
        ((42, 157, 143), 20, 0.80, 14.0, 0.3, True),
        ((244, 162, 97), 24, 0.40, 4.0, 0.5, False),
    ]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    pixel_rows, pixel_cols = rows * size, cols * size
    for t in range(num_frames):
        frame = background.copy()
        for colour, half, row, speed, start, circle in shapes:
            centre_col = (start * size + speed * t) % (size + 2 * half) - half
            centre_row = row * size + 10 * math.sin(t / 5)
            if circle:
                inside = (pixel_rows - centre_row) ** 2 + (pixel_cols - centre_col) ** 2 <= half**2
            else:
                inside = (abs(pixel_rows - centre_row) <= half) & (abs(pixel_cols - centre_col) <= half)
            frame[inside] = colour
        frames[t] = frame.round().clip(0, 255)
    return VideoClip(frames=frames, timestamps=tuple(t / fps for t in range(num_frames)),
                     source_frames=num_frames, fps=fps)


# --- methods ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A registered method, optionally with settings changed: `dycoke`, `dycoke:tau=-1`, `fastv:fastv_ratio=0.5`.

    DyCoke settings (K, W, L, P, tau or their field names) change the DyCokeConfig; any other KEY=VALUE is one of
    the method's own options (`Method.OPTIONS`), set through `dycoke.methods.configure`.
    """

    label: str
    method: str
    overrides: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def config(self, base: DyCokeConfig) -> DyCokeConfig:
        return base.replace(**self.overrides)

    def resolved(self, match: str | None = None):
        """What Pipeline.answer takes as `method`: the name, or a configured Method when options are set."""
        options = dict(self.options)
        if match and match != self.method and getattr(get_method(self.method), "matchable", False) \
                and not {"match", *_RATIO_OPTIONS} & set(options):
            options["match"] = match
        if not options:
            return self.method
        return _configure()(self.method, **options)


_RATIO_OPTIONS = {"fastv_ratio", "visionzip_ratio", "drop_ratio"}


def _configure():
    try:
        from dycoke.methods import configure
    except ImportError:  # a registry without per-method options
        raise ValueError("this version of dycoke.methods has no per-method options (configure)") from None
    return configure


def _option_value(text: str) -> object:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_method_spec(text: str) -> MethodSpec:
    name, *settings = text.strip().split(":")
    method = get_method(name)  # unknown names fail here, with the list of known ones
    overrides, options = {}, {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        field_name = KNOBS.get(key, key)
        if sep and field_name in DyCokeConfig.__dataclass_fields__:
            overrides[field_name] = int(value) if field_name in ("window", "prune_layer") else float(value)
        elif sep and key in getattr(method, "OPTIONS", {}):
            options[key] = _option_value(value)
        else:
            known = list(KNOBS) + list(getattr(method, "OPTIONS", {}))
            raise ValueError(f"bad setting '{setting}' in method '{text}'; use KEY=VALUE with KEY one of "
                             f"{', '.join(known)} or a DyCokeConfig field")
    DyCokeConfig().replace(**overrides)  # range checks now, not after minutes of benchmarking
    spec = MethodSpec(text.strip(), name, overrides, options)
    spec.resolved()  # the method's own range checks, also now
    return spec


def parse_methods(text: str | None) -> list[MethodSpec]:
    """Method specs, baseline first (ratios need it; it is added when missing)."""
    specs = [parse_method_spec(part) for part in (text.split(",") if text else method_names()) if part.strip()]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is listed twice: {text}")
    baseline = [spec for spec in specs if spec.label == "baseline"] or [MethodSpec("baseline", "baseline")]
    return baseline + [spec for spec in specs if spec.label != "baseline"]


# --- one measured request --------------------------------------------------------------------------------


class ForwardTimer:
    """Times every forward of the model inside generate: the first is the prefill, each later one a decode step."""

    def __init__(self, model: torch.nn.Module, clock: Clock) -> None:
        self.model = model
        self.clock = clock
        self.spans: list[float] = []
        self._start = 0.0

    @contextmanager
    def attached(self) -> Iterator["ForwardTimer"]:
        self.spans = []
        handles = [self.model.register_forward_pre_hook(self._before),
                   self.model.register_forward_hook(self._after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _before(self, module, args) -> None:
        self._start = self.clock.now()

    def _after(self, module, args, output) -> None:
        self.spans.append(self.clock.now() - self._start)


@dataclass
class Sample:
    metrics: dict
    config: dict
    prefill_forward_ms: float
    reuse_step_ms: list[float]
    reselect_step_ms: list[float]
    steps: int
    reselected_steps: int
    dp_regions: dict  # Stopwatch totals of DP's scoring/selection and compact rebuilds; empty without DP


def run_once(pipeline, clip: VideoClip, spec: MethodSpec, base: DyCokeConfig, new_tokens: int,
             timer: ForwardTimer, match: str | None = None) -> Sample:
    from dycoke.pruning import overhead_timing

    gc.collect()
    with timer.attached(), overhead_timing() as stopwatches:
        result = pipeline.answer(clip, QUESTION, method=spec.resolved(match), config=spec.config(base),
                                 max_new_tokens=new_tokens, ignore_eos=True)
    spans_ms = [1000.0 * s for s in timer.spans]
    steps = result.trace["steps"]
    reselected = [bool(step["reselected"]) for step in steps]
    decode_spans = spans_ms[1:]
    return Sample(
        metrics=result.metrics,
        config=result.config,
        prefill_forward_ms=spans_ms[0] if spans_ms else math.nan,
        reuse_step_ms=[ms for ms, again in zip(decode_spans, reselected) if not again],
        reselect_step_ms=[ms for ms, again in zip(decode_spans, reselected) if again],
        steps=len(steps),
        reselected_steps=sum(reselected),
        dp_regions=stopwatches[-1].totals_ms() if stopwatches else {},
    )


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


# --- the benchmark -----------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    frames: list[int]
    methods: list[MethodSpec]
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    video: str | None = None
    base_config: DyCokeConfig = field(default_factory=DyCokeConfig)
    match: str | None = None  # peers with a budget knob get the attended budget of this method


def run_bench(pipeline, settings: BenchSettings, device_spec: DeviceSpec | None = None,
              log: Callable[[str], None] = lambda line: None) -> dict:
    """Measure every (frames, method) and return the report: settings, machine, model, and one row each."""
    from dycoke.pipeline import encode_prompt

    loaded = pipeline.loaded
    clock = pipeline.clock
    measured = device_spec is None and _needs_measuring(loaded.device)
    device_spec = device_spec or _device_spec(loaded.device, loaded.dtype, clock)
    timer = ForwardTimer(loaded.model, clock)
    prefix, suffix = encode_prompt(loaded.tokenizer, QUESTION)
    text_tokens = len(prefix) + len(suffix) + 1  # the newline after the frames is a text token too
    weights = model_weights(loaded.model)
    load_before = _load_average()
    rows = []
    for frames in settings.frames:
        clip, video_decode_ms = _clip(pipeline, settings.video, frames)
        samples: dict[str, list[Sample]] = {spec.label: [] for spec in settings.methods}
        for repeat in range(settings.warmup + settings.repeats):
            shift = repeat % len(settings.methods)
            order = settings.methods[shift:] + settings.methods[:shift]
            for spec in order:
                sample = run_once(pipeline, clip, spec, settings.base_config, settings.new_tokens, timer,
                                  settings.match)
                kind = "warm-up" if repeat < settings.warmup else f"repeat {repeat - settings.warmup + 1}"
                log(f"{frames:>4} frames  {spec.label:<18} {kind:<10} total {sample.metrics['total_ms']:>10.1f} ms")
                if repeat >= settings.warmup:
                    samples[spec.label].append(sample)
        frame_rows = [
            summarise(spec, frames, samples[spec.label], loaded, text_tokens, weights, video_decode_ms)
            for spec in settings.methods
        ]
        add_ratios(frame_rows)
        add_overhead_share(frame_rows)
        rows.extend(frame_rows)
    if measured:  # other work on the machine only ever slows a measurement down: keep the best of two
        device_spec = _best(device_spec, measure_device(loaded.device, loaded.dtype, clock))
    add_limits(rows, device_spec)
    machine = machine_info(loaded.device, device_spec)
    machine["load_average_1min"] = {"before": load_before, "after": _load_average()}
    return {
        "schema": SCHEMA,
        "machine": machine,
        "model": {
            "name": loaded.name,
            "random_weights": loaded.is_random,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "attention": getattr(loaded.model.config, "_attn_implementation", None),
            "weight_bytes": weights["all"],
            "language_weight_bytes": weights["language"],
            "text_config": _dims_dict(TextDims.of(loaded.model.config.text_config)),
            "tokens_per_frame": loaded.tokens_per_frame,
        },
        "settings": {
            "frames": settings.frames,
            "methods": [spec.label for spec in settings.methods],
            "new_tokens": settings.new_tokens,
            "ignore_eos": True,
            "match": settings.match,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "order": "interleaved: every repeat runs every method once, starting one method later each repeat",
            "video": settings.video or "synthetic moving shapes, 384x384, generated in-process",
            "question": QUESTION,
            "prompt_text_tokens": text_tokens,
            "config": settings.base_config.to_dict(),
        },
        "device_table": {key: spec.to_dict() for key, spec in DEVICE_TABLE.items()} | {"used": device_spec.to_dict()},
        "rows": rows,
    }


def _clip(pipeline, video: str | None, frames: int) -> tuple[VideoClip, float]:
    if video is None:
        return synthetic_clip(frames), 0.0
    clip = pipeline.load_video(video, frames)
    return replace(clip, decode_seconds=0.0), round(1000.0 * clip.decode_seconds, 3)


def _needs_measuring(device: torch.device) -> bool:
    return device.type != "cuda" or table_device(torch.cuda.get_device_name(device)) is None


def _best(first: DeviceSpec, second: DeviceSpec) -> DeviceSpec:
    return replace(first, bandwidth_bytes_per_s=max(first.bandwidth_bytes_per_s, second.bandwidth_bytes_per_s),
                   peak_flops_per_s=max(first.peak_flops_per_s, second.peak_flops_per_s),
                   source=first.source + "; measured before and after the runs, the better of the two kept")


def _device_spec(device: torch.device, dtype: torch.dtype, clock: Clock) -> DeviceSpec:
    if device.type == "cuda":
        key = table_device(torch.cuda.get_device_name(device))
        if key:
            return DEVICE_TABLE[key]
    return measure_device(device, dtype, clock)


def model_weights(model: torch.nn.Module) -> dict:
    """Bytes of all parameters (resident) and of the language model alone (what a decode step reads)."""
    language = model.get_decoder()
    head = model.get_output_embeddings()
    read = {id(p): p for p in language.parameters()}
    if head is not None:
        read |= {id(p): p for p in head.parameters()}  # tied to the embeddings when the config says so
    return {"all": sum(p.nbytes for p in model.parameters()), "language": sum(p.nbytes for p in read.values())}


def _dims_dict(dims: TextDims) -> dict:
    return {name: getattr(dims, name) for name in TextDims.__dataclass_fields__}


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
              video_decode_ms: float) -> dict:
    """One row of the report: medians, spreads, token counts, analytic FLOPs and bytes, limits on every device."""
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
        "vision": vision_flops(model_config.vision_config, frames, text_config.hidden_size),
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
        "config": config,
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


def physical_limits(device: DeviceSpec, language_weight_bytes: int, attended_kv_bytes: float, flops: dict,
                    new_tokens: int) -> dict:
    """Lower bounds in ms: a decode step reads every LM weight and the attended KV once; prefill does its FLOPs."""
    decode_ms = 1000.0 * (language_weight_bytes + attended_kv_bytes) / device.bandwidth_bytes_per_s
    prefill_ms = 1000.0 * flops["prefill"] / device.peak_flops_per_s
    # Prefill and the vision tower each also read their weights once; FLOPs dominate for any real clip.
    ttft_ms = 1000.0 * (flops["vision"] + flops["prefill"]) / device.peak_flops_per_s
    return {
        "device": device.name,
        "decode_step_ms": decode_ms,
        "prefill_ms": prefill_ms,
        "ttft_ms": ttft_ms,
        "latency_ms": ttft_ms + (new_tokens - 1) * decode_ms,
    }


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


def machine_info(device: torch.device, device_spec: DeviceSpec) -> dict:
    info = {
        "name": machine_name(device),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "platform": platform.platform(),
        "limits_from": device_spec.to_dict(),
        "git": _git_state(),
        "date": time.strftime("%Y-%m-%d"),
    }
    return info


def _load_average() -> float | None:
    """Other work on the machine skews every timing; the report keeps the 1-minute load so that it shows."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_state() -> dict | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# --- output ---------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _range(spread: dict, digits: int = 0) -> str:
    return f"{_fmt(spread['median'], digits)} ({_fmt(spread['min'], digits)}–{_fmt(spread['max'], digits)})"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


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
            str(row["frames"]),
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
              "DP score+select ms/step", "DP rebuild ms/reselect", "compress + DP overhead % of latency"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in report["rows"]:
        split, overhead = row["decode_step_split_ms"], row["overhead"]
        steps = max(1, round(row["new_tokens"] - 1))
        reselections = row["reselections"] or 0
        lines.append("| " + " | ".join([
            str(row["frames"]),
            row["method"],
            _fmt(row["decode_step_ms"], 2),
            f"{_fmt(split['reuse'], 2)} ({split['reuse_steps']})",
            f"{_fmt(split['reselect'], 2)} ({split['reselect_steps']})",
            f"{row['reselection_rate']:.2f}",
            _fmt((overhead["score_select_ms"] or 0.0) / steps, 3),
            _fmt(overhead["compact_rebuild_ms"] / reselections if reselections else None, 3),
            _fmt(overhead["pct_of_latency"], 2),
        ]) + " |")
    return "\n".join(lines)


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
        f"{used['peak_TFLOP_per_s']:,.2f} TFLOP/s ({used['source']})"
    )


def write_chart(report: dict, path: str | Path) -> None:
    from dycoke.viz import bench_figure

    fig = bench_figure(report["rows"])
    fig.update_layout(title={"text": f"DyCoke benchmark: {report['model']['name']} on {report['machine']['name']}"})
    fig.write_html(str(path), include_plotlyjs="cdn")


# --- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dycoke.bench",
        description="Latency, memory and physical limits of every method, side by side in one process.",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=["tiny-random", "mini", "ov-0.5b", "ov-7b"],
                       help="random-weight model with the compute of its name (default: mini)")
    model.add_argument("--model", help="real weights: a Hugging Face Hub id or a local path")
    parser.add_argument("--frames", default="8,32", help="comma-separated frame counts (default: 8,32)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods, each optionally with settings, e.g. dycoke:tau=-1 "
                             f"(default: every registered method: {','.join(method_names())})")
    parser.add_argument("--match", default=None, metavar="METHOD",
                        help="give every peer with a budget knob (fastv, visionzip, random, uniform-frames) the "
                             "attended visual budget of METHOD, e.g. dycoke")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request, EOS ignored")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats (default depends on the preset)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured repeats first (default: 1)")
    parser.add_argument("--video", default=None, help="a video file instead of the synthetic clip")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default="results.json", help="JSON report (default: results.json)")
    parser.add_argument("--html", default=None, help="Plotly chart (default: the --out path with .html; '' for none)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        frames = [int(part) for part in args.frames.split(",") if part.strip()]
        methods = parse_methods(args.methods)
        if args.match is not None:
            get_method(args.match)
    except ValueError as error:  # ConfigError is a ValueError too
        parser.error(str(error))
    if not frames or any(not 1 <= f <= 256 for f in frames):
        parser.error(f"--frames must be comma-separated integers in 1..256, got {args.frames!r}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: the decode figures need a second token")
    name = args.model or args.preset or "mini"
    runs = PRESET_DEFAULTS.get(name, DEFAULT_RUNS)
    repeats = runs["repeats"] if args.repeats is None else args.repeats
    warmup = runs["warmup"] if args.warmup is None else args.warmup
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    from dycoke.models import ModelLoadError, load
    from dycoke.pipeline import Pipeline

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        loaded = load(name, device=args.device, dtype=dtype)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    pipeline = Pipeline(loaded)
    settings = BenchSettings(frames=frames, methods=methods, new_tokens=args.new_tokens, repeats=repeats,
                             warmup=warmup, video=args.video, match=args.match)
    log(f"benchmarking {loaded.describe()}: frames {frames}, methods {[m.label for m in methods]}, "
        f"{repeats} repeats + {warmup} warm-up")
    report = run_bench(pipeline, settings, log=log)
    report["targets"] = targets(report)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    html = out.with_suffix(".html") if args.html is None else (Path(args.html) if args.html else None)
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        write_chart(report, html)
    print(describe(report))
    print()
    print(markdown_table(report))
    print()
    print(decode_table(report))
    if report["targets"]:
        print()
        print(targets_table(report))
    log(f"wrote {out}" + (f" and {html}" if html else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
