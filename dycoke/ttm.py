"""TTM, token temporal merging (DESIGN.md §2.1): drop frame tokens that barely changed within a window."""

from __future__ import annotations

import math

import torch

from dycoke.config import DyCokeConfig

# Float error must never drop a token: (1 - 0.9) * 50 is 4.999... and must keep 5.
FLOOR_EPSILON = 1e-6


def kept_count(total: int, ratio: float) -> int:
    """floor((1 - ratio) * total), robust to float error."""
    return math.floor((1.0 - ratio) * total + FLOOR_EPSILON)


def reference_frames(num_frames: int, window: int) -> torch.Tensor:
    """For each frame, the frame it is compared with: offset o & (o - 1) inside its window; anchors map to themselves."""
    frame = torch.arange(num_frames)
    offset = frame % window
    return frame - offset + (offset & (offset - 1))


def temporal_keep_mask(features: torch.Tensor, merge_ratio: float, window: int = 4) -> torch.Tensor:
    """Bool mask [T, N]: anchors whole, other frames keep their floor((1-K)·N) least similar positions."""
    DyCokeConfig(merge_ratio=merge_ratio, window=window)  # same range checks as the config
    num_frames, tokens_per_frame, _ = features.shape
    references = reference_frames(num_frames, window).to(features.device)
    dtype = torch.promote_types(features.dtype, torch.float32)  # float64 features: ties as the exact rule has them
    similarity = torch.nn.functional.cosine_similarity(
        features.to(dtype), features[references].to(dtype), dim=-1
    )
    least_similar_first = torch.argsort(similarity, dim=1, stable=True)
    keep = kept_count(tokens_per_frame, merge_ratio)
    mask = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool, device=features.device)
    mask.scatter_(1, least_similar_first[:, :keep], True)
    mask[torch.arange(num_frames, device=features.device) % window == 0] = True
    return mask


def apply_keep_mask(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept tokens [V, D] in their original order: frame-major, then spatial position."""
    return features[mask]
