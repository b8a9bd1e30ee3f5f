"""Compression methods behind one interface, in a registry shared by the app, the CLI and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from dycoke.config import DyCokeConfig
from dycoke.pruning import DyCokeCache
from dycoke.ttm import temporal_keep_mask


@dataclass(frozen=True)
class VisualLayout:
    """Where the kept visual tokens sit in the prompt, and which frame each came from."""

    start: int
    frame_of_token: torch.Tensor  # [V] frame index of each kept visual token
    num_frames: int


class Method:
    """A compression method: which visual tokens enter the LLM, and which cache decodes them."""

    name: str
    summary: str

    def effective_config(self, config: DyCokeConfig) -> DyCokeConfig:
        """The settings this method really uses, as reported in results."""
        return config

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        """Bool [T, N]: the frame tokens that enter the language model."""
        return torch.ones(frame_features.shape[:2], dtype=torch.bool, device=frame_features.device)

    def make_cache(self, layout: VisualLayout, config: DyCokeConfig) -> Cache:
        return DynamicCache()


@dataclass(frozen=True)
class DyCokeMethod(Method):
    """DyCoke and its ablations: TTM before the LLM, DP while decoding, either or both."""

    name: str
    summary: str
    merges: bool
    prunes: bool

    def effective_config(self, config: DyCokeConfig) -> DyCokeConfig:
        return config.replace(
            merge_ratio=config.merge_ratio if self.merges else 0.0,
            prune_ratio=config.prune_ratio if self.prunes else 0.0,
        )

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        if not self.merges:
            return super().keep_mask(frame_features, config)
        return temporal_keep_mask(frame_features, config.merge_ratio, config.window)

    def make_cache(self, layout: VisualLayout, config: DyCokeConfig) -> Cache:
        if not self.prunes:
            return DynamicCache()
        return DyCokeCache(
            visual_start=layout.start,
            frame_of_visual=layout.frame_of_token,
            num_frames=layout.num_frames,
            prune_layer=config.prune_layer,
            prune_ratio=config.prune_ratio,
            reselect_threshold=config.reselect_threshold,
        )


REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        DyCokeMethod("baseline", "no compression: every visual token, plain KV cache", merges=False, prunes=False),
        DyCokeMethod("dycoke", "TTM before the LLM plus DP at every decoding step", merges=True, prunes=True),
        DyCokeMethod("ttm", "TTM only: temporal merging before the LLM", merges=True, prunes=False),
        DyCokeMethod("dp", "DP only: dynamic KV-cache pruning while decoding", merges=False, prunes=True),
    )
}


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(REGISTRY)}") from None
