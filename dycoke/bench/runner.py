"""Running the benchmark: every method on the same clip, interleaved repeats, one report.

Each repeat runs every method once, in an order that rotates from repeat to repeat, so that drift (clock
boost, cache state, allocator) hits all methods alike.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from dycoke.bench.clip import synthetic_clip
from dycoke.bench.costs import TextDims, dims_dict, model_weights
from dycoke.bench.devices import (DEVICE_TABLE, DeviceSpec, better_of, device_spec_for, load_average,
                                  machine_info, measure_device, needs_measuring)
from dycoke.bench.specs import MethodSpec
from dycoke.bench.summary import add_limits, add_overhead_share, add_ratios, summarise
from dycoke.config import DyCokeConfig
from dycoke.metrics import Clock
from dycoke.video import VideoClip

SCHEMA = "dycoke.bench/1"


QUESTION = "Describe what happens in this video."


class ForwardTimer:
    """Times every forward of the model inside generate: the first is the prefill, each later one a decode step."""

    def __init__(self, model: torch.nn.Module, clock: Clock) -> None:
        self.model = model
        self.clock = clock
        self.spans: list[float] = []
        self.cache = None  # the request's cache, as the prefill forward received it
        self._start = 0.0

    @contextmanager
    def attached(self) -> Iterator["ForwardTimer"]:
        self.spans, self.cache = [], None
        handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                   self.model.register_forward_hook(self._after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    # Never traced: a compiled decoding step would otherwise guard on (and recompile for) the timer's own state.
    @torch.compiler.disable
    def _before(self, module, args, kwargs) -> None:
        if self.cache is None:
            self.cache = kwargs.get("past_key_values")
        self._start = self.clock.now()

    @torch.compiler.disable
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
    cache_class: str = ""  # the request's KV cache
    compiled: bool = False  # decoding ran through torch.compile


def run_once(pipeline, clip: VideoClip, spec: MethodSpec, base: DyCokeConfig, new_tokens: int,
             timer: ForwardTimer, match: str | None = None) -> Sample:
    from dycoke.caches import decode_compiles
    from dycoke.pruning import overhead_timing

    gc.collect()
    # Compiled, DP's regions are not timed: a stopwatch inside the step would split its graph.
    timing = nullcontext([]) if pipeline.compile_decode else overhead_timing()
    with timer.attached(), timing as stopwatches:
        result = pipeline.answer(clip, QUESTION, method=spec.resolved(match), config=spec.config(base),
                                 max_new_tokens=new_tokens, ignore_eos=True)
    cache = timer.cache
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
        cache_class=type(cache).__name__,
        compiled=pipeline.compile_decode and cache is not None and decode_compiles(cache),
    )


def run_once_or_eager(pipeline, clip: VideoClip, spec: MethodSpec, base: DyCokeConfig, new_tokens: int,
                      timer: ForwardTimer, match: str | None, notes: list[str]) -> Sample:
    """run_once; where compiling the decoding step fails, a note, and this and every later run uncompiled."""
    if not pipeline.compile_decode:
        return run_once(pipeline, clip, spec, base, new_tokens, timer, match)
    try:
        return run_once(pipeline, clip, spec, base, new_tokens, timer, match)
    except Exception as error:  # torch.compile's failures are of many kinds (backend, compiler, dynamo)
        pipeline.compile_decode = False
        notes.append(f"torch.compile failed on {spec.label} ({type(error).__name__}: {str(error)[:300]}); "
                     "every run from there on decodes uncompiled")
        return run_once(pipeline, clip, spec, base, new_tokens, timer, match)


def _compiled_graphs() -> int:
    """How many graphs dynamo has traced in this process: with --compile, one per method and shape, none per step."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
    loaded = pipeline.loaded
    clock = pipeline.clock
    measured = device_spec is None and needs_measuring(loaded.device)
    device_spec = device_spec or device_spec_for(loaded.device, loaded.dtype, clock)
    timer = ForwardTimer(loaded.model, clock)
    weights = model_weights(loaded.model)
    load_before = load_average()
    compile_requested, notes = pipeline.compile_decode, []
    graphs_before = _compiled_graphs()
    rows = []
    for frames in settings.frames:
        clip, video_decode_ms = _clip(pipeline, settings.video, frames)
        geometry = pipeline.geometry(clip)
        # Every prompt token that is not a frame token: the template, the question, and the video's own markers
        # (LLaVA-OneVision's newline; Qwen-VL's vision start/end and Qwen3-VL's timestamps, which grow with frames).
        text_tokens = len(pipeline.layout(clip, QUESTION).input_ids) - geometry.frame_tokens
        samples: dict[str, list[Sample]] = {spec.label: [] for spec in settings.methods}
        for repeat in range(settings.warmup + settings.repeats):
            shift = repeat % len(settings.methods)
            order = settings.methods[shift:] + settings.methods[:shift]
            for spec in order:
                sample = run_once_or_eager(pipeline, clip, spec, settings.base_config, settings.new_tokens,
                                           timer, settings.match, notes)
                kind = "warm-up" if repeat < settings.warmup else f"repeat {repeat - settings.warmup + 1}"
                log(f"{frames:>4} frames  {spec.label:<18} {kind:<10} total {sample.metrics['total_ms']:>10.1f} ms")
                if repeat >= settings.warmup:
                    samples[spec.label].append(sample)
        frame_rows = [
            summarise(spec, frames, samples[spec.label], loaded, text_tokens, weights, video_decode_ms, geometry)
            for spec in settings.methods
        ]
        add_ratios(frame_rows)
        add_overhead_share(frame_rows)
        rows.extend(frame_rows)
    if measured:  # other work on the machine only ever slows a measurement down: keep the best of two
        device_spec = better_of(device_spec, measure_device(loaded.device, loaded.dtype, clock))
    add_limits(rows, device_spec)
    machine = machine_info(loaded.device, device_spec)
    machine["load_average_1min"] = {"before": load_before, "after": load_average()}
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
            "text_config": dims_dict(TextDims.of(loaded.model.config.text_config)),
            "family": loaded.family.name,
            "tokens_per_frame": loaded.tokens_per_frame,  # per temporal group on Qwen-VL, for a square clip
            "frames_per_group": loaded.frames_per_group,
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
            "video": settings.video or (f"synthetic moving shapes, {loaded.image_size}x{loaded.image_size}, "
                                        "generated in-process"),
            "cache": pipeline.cache,
            "compile": {"requested": bool(compile_requested),
                        "backend": (compile_requested if isinstance(compile_requested, str) else "inductor")
                        if compile_requested else None,
                        "graphs": _compiled_graphs() - graphs_before, "notes": notes},
            "question": QUESTION,
            "prompt_text_tokens": {str(row["frames"]): row["prefill_tokens"] - row["visual_tokens_prefill"]
                                   for row in rows},
            "config": settings.base_config.to_dict(),
        },
        "device_table": {key: spec.to_dict() for key, spec in DEVICE_TABLE.items()} | {"used": device_spec.to_dict()},
        "rows": rows,
    }


def _clip(pipeline, video: str | None, frames: int) -> tuple[VideoClip, float]:
    if video is None:  # at the model's own square frame size: 384 on LLaVA-OneVision, 448 on Qwen-VL
        return synthetic_clip(frames, pipeline.loaded.image_size), 0.0
    clip = pipeline.load_video(video, frames)
    return replace(clip, decode_seconds=0.0), round(1000.0 * clip.decode_seconds, 3)
