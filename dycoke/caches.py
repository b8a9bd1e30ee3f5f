"""How a request's KV cache is allocated: grown at every step, or preallocated once.

transformers' DynamicCache concatenates every layer's whole K/V with the new row at every decoding step; its
StaticCache allocates the prompt plus the new tokens once and writes each row in place, which is what
`torch.compile` and CUDA graphs need. The bench's baseline is the static one: the fastest thing transformers offers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, CompileConfig, DynamicCache, PretrainedConfig, StaticCache

CACHE_KINDS = ("static", "dynamic")


@dataclass(frozen=True)
class CachePlan:
    """The kind of cache a request gets and, for a static one, how many positions it holds and for which model."""

    kind: str = "dynamic"
    capacity: int | None = None
    config: PretrainedConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {', '.join(CACHE_KINDS)}, got {self.kind!r}")
        if self.static and (self.capacity is None or self.config is None):
            raise ValueError("a static cache needs its capacity and the model's config")

    @property
    def static(self) -> bool:
        return self.kind == "static"

    def plain(self) -> Cache:
        """The cache of a method that leaves decoding alone."""
        return StaticCache(self.config, max_cache_len=self.capacity) if self.static else DynamicCache()

    def static_layers(self) -> list:
        """transformers' own static layers for this model (sliding or full, as its config says), unallocated."""
        return StaticCache(self.config, max_cache_len=self.capacity).layers


DYNAMIC = CachePlan()


def plan_for(kind: str, prompt_length: int, new_tokens: int | None, config: PretrainedConfig) -> CachePlan:
    """The plan of a request of `prompt_length` positions and up to `new_tokens` new ones; without a known number
    of new tokens (a conversation's turns, which crop and extend one cache) it is dynamic. The last new token is
    never fed back, so the cache holds one position less, as transformers' own static cache does."""
    if kind == "dynamic" or new_tokens is None:
        return DYNAMIC
    return CachePlan(kind, prompt_length + max(new_tokens - 1, 0), config)


def compile_options(compile_decode: bool | str, device: torch.device) -> dict:
    """generate() options: compile the decoding step (transformers compiles it where the cache allows), or never.
    `compile_decode` is True (inductor, CUDA graphs on CUDA) or the name of a torch.compile backend.

    On CUDA transformers compiles a static cache's decoding by itself; an uncompiled run must say so."""
    if not compile_decode:
        return {"disable_compile": True}
    backend = compile_decode if isinstance(compile_decode, str) else "inductor"
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    # dynamic=False: the static cache fixes every shape of a decoding step, so one graph per (method, prompt
    # length), never a dynamic-shape one; dynamo's recompile_limit (set by the bench) bounds their number.
    config = CompileConfig(fullgraph=False, dynamic=False, backend=backend, mode=mode)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return {"compile_config": config}


def decode_compiles(cache: Cache) -> bool:
    """Whether generate compiles decoding on this cache when asked to (it needs a compileable, non-dynamic one)."""
    return bool(cache.is_compileable) and type(cache) is not DynamicCache
