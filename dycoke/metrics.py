"""Honest wall-clock timing and memory figures for one request (DESIGN.md §4, Metrics)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Cache


class Clock:
    """perf_counter that first waits for the device, so that a reading covers the work queued before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class Stopwatch:
    """Adds up the time spent in named regions without ever waiting for the device.

    Host time comes from perf_counter. On CUDA each region also records a pair of events, read once at the end,
    which gives the device time of the work the region queued.
    """

    def __init__(self, device: torch.device) -> None:
        self.on_cuda = device.type == "cuda"
        self.host_s: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._event_pairs: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> tuple[float, "torch.cuda.Event | None"]:
        event = None
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def stop(self, region: str, started: tuple[float, "torch.cuda.Event | None"]) -> None:
        start_time, start_event = started
        self.host_s[region] += time.perf_counter() - start_time
        self.calls[region] += 1
        if start_event is not None:
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record()
            self._event_pairs.append((region, start_event, end_event))

    def totals_ms(self) -> dict[str, dict[str, float | int | None]]:
        """Per region: host ms, device ms (None off CUDA) and the number of times it ran."""
        device_ms: dict[str, float] = defaultdict(float)
        for region, start, end in self._event_pairs:
            end.synchronize()
            device_ms[region] += start.elapsed_time(end)
        return {
            region: {"host_ms": _ms(seconds), "device_ms": round(device_ms[region], 3) if self.on_cuda else None,
                     "calls": self.calls[region]}
            for region, seconds in self.host_s.items()
        }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the reset; None on CPU, where no honest per-request figure exists."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the KV cache, including any compact copies a pruning cache keeps."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(
        layer.keys.nbytes + layer.values.nbytes
        for layer in cache.layers
        if getattr(layer, "is_initialized", False) and layer.keys is not None
    )


@dataclass
class RequestTimes:
    """Clock readings of one request, in seconds; metrics are derived from them."""

    decode_video_s: float = 0.0
    vision_start: float = 0.0
    vision_end: float = 0.0
    compress_end: float = 0.0
    generate_start: float = 0.0
    token_times: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float | int | None]:
        first = self.token_times[0] if self.token_times else self.generate_start
        last = self.token_times[-1] if self.token_times else self.generate_start
        decode_span = last - first
        new_tokens = len(self.token_times)
        return {
            "decode_video_ms": _ms(self.decode_video_s),
            "vision_ms": _ms(self.vision_end - self.vision_start),
            "compress_ms": _ms(self.compress_end - self.vision_end),
            "prefill_ms": _ms(first - self.generate_start),
            "ttft_ms": _ms(first - self.vision_start),
            "total_ms": _ms(self.decode_video_s + last - self.vision_start),
            "new_tokens": new_tokens,
            "decode_tokens_per_s": (new_tokens - 1) / decode_span if new_tokens > 1 and decode_span > 0 else None,
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
