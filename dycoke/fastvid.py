"""FastVID (Shen et al., NeurIPS 2025): dynamic temporal segments, then density-based spatio-temporal pruning.

1. DySeg: segments from the frames' global features (`segmentation.transition_segments`).
2. STPrune, per frame: of its retained tokens, the (1 - d) share are *salient*: the tokens that receive the most
   attention in the vision tower (ATS). The d share are *contextual* and come from density-based token merging
   (DTM) over the segment:
   - anchor frames: every p-th frame of the segment, counted back from its last frame;
   - the segment's contextual tokens are shared among its anchor frames; each anchor frame takes the non-salient
     tokens with the highest DPC-kNN density-peak scores (k = 4) in that frame as merge targets;
   - every non-salient token of the segment joins its most cosine-similar target in each anchor frame, and a
     target becomes w * target + (1 - w) * mean(members), w = max(1 / (members + 1), beta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dycoke.budget import apportion, spread
from dycoke.merging import Placed, complement, density_peak_scores, group_means, most_cosine_similar, top_indices
from dycoke.segmentation import Segment, transition_segments
from dycoke.ttm import FLOOR_EPSILON

DENSITY_NEIGHBOURS = 4


@dataclass(frozen=True)
class FastVIDSettings:
    min_segments: int = 8  # c
    segment_threshold: float = 0.9  # tau
    contextual_share: float = 0.4  # d
    anchor_step: int = 4  # p
    beta: float = 0.6


def frame_split(kept: int, num_frames: int, contextual_share: float) -> tuple[list[int], list[int]]:
    """(salient, contextual) counts per frame: the budget spread evenly, floor(d * retained) contextual."""
    retained = spread(kept, num_frames)
    contextual = [math.floor(count * contextual_share + FLOOR_EPSILON) for count in retained]
    return [count - context for count, context in zip(retained, contextual)], contextual


def anchor_frames(segment: Segment, step: int) -> list[int]:
    """Every `step`-th frame of the segment counted back from its last frame, in time order."""
    first, last = segment
    return [t for t in range(first, last + 1) if (last - t) % step == 0]


def merge_into_targets(members: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """Each member joins its most cosine-similar target; target <- w * target + (1 - w) * mean(its members)."""
    assignment = most_cosine_similar(members, targets)
    means, sizes = group_means(members, assignment, targets.shape[0])
    weight = (1.0 / (sizes + 1)).clamp(min=beta)[:, None]
    weight = torch.where(sizes[:, None] > 0, weight, torch.ones_like(weight))
    return weight * targets.float() + (1 - weight) * means


def fastvid_compress(frame_tokens: torch.Tensor, attention: torch.Tensor, kept: int,
                     settings: FastVIDSettings) -> Placed:
    """`attention` [T, N]: attention each token receives in the vision tower (the salience of ATS)."""
    num_frames, tokens_per_frame, _ = frame_tokens.shape
    if kept == num_frames * tokens_per_frame:
        return Placed.everything(frame_tokens)
    salient_counts, contextual_counts = frame_split(kept, num_frames, settings.contextual_share)
    salient = [top_indices(attention[t], salient_counts[t]) for t in range(num_frames)]
    rest = [complement(salient[t], tokens_per_frame) for t in range(num_frames)]
    parts = [Placed(frame_tokens[t, salient[t]], salient[t] + t * tokens_per_frame) for t in range(num_frames)]
    segments = transition_segments(frame_tokens.mean(dim=1), settings.segment_threshold, settings.min_segments)
    for segment in segments:
        parts.extend(_merge_segment(frame_tokens, rest, contextual_counts, segment, settings))
    return Placed.join(parts, frame_tokens)


def _merge_segment(frame_tokens: torch.Tensor, rest: list[torch.Tensor], contextual_counts: list[int],
                   segment: Segment, settings: FastVIDSettings) -> list[Placed]:
    first, last = segment
    frames = list(range(first, last + 1))
    pool = sum(contextual_counts[t] for t in frames)
    anchors = anchor_frames(segment, settings.anchor_step)
    if sum(rest[t].numel() for t in anchors) < pool:  # high budgets: the anchors alone cannot hold the pool
        anchors = frames
    counts = apportion(pool, [1.0] * len(anchors), [rest[t].numel() for t in anchors])
    members = torch.cat([frame_tokens[t, rest[t]] for t in frames])
    tokens_per_frame = frame_tokens.shape[1]
    parts = []
    for frame, count in zip(anchors, counts):
        if count == 0:
            continue
        candidates = frame_tokens[frame, rest[frame]]
        centres = top_indices(density_peak_scores(candidates, DENSITY_NEIGHBOURS), count)
        merged = merge_into_targets(members, candidates[centres], settings.beta)
        parts.append(Placed(merged, rest[frame][centres] + frame * tokens_per_frame))
    return parts
