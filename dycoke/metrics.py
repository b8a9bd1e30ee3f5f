"""Honest wall-clock timing and memory figures for one request (DESIGN.md §4, Metrics)."""

from __future__ import annotations

import time
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
