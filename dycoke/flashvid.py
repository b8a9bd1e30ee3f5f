"""FlashVID (Fan et al., ICLR 2026), its vision-side part: attention-and-diversity token selection, then
tree-based spatio-temporal token merging, per dynamic segment.

1. Segments: FastVID's DySeg on the frames' mean tokens (`segmentation.transition_segments`).
2. ADTS, per frame: an alpha share of the frame's budget solves a calibrated max-min diversity problem greedily.
   The distance of token j to token i is (1 - cos(x_i, x_j)) * a_j, a_j the attention token j receives in the
   vision tower. The first pick maximises its distance to its nearest other token; each next pick maximises its
   distance to the nearest token picked so far.
3. TSTM, over the segment's other tokens: each token of frame t > first links to its most cosine-similar token of
   frame t - 1 when their similarity exceeds `temporal_threshold`; the links form trees rooted in the earliest
   frames, and a tree becomes the mean of its tokens, at its root. The remaining (1 - alpha) share of the
   segment's budget is shared over the frames by their number of roots; each frame clusters its roots by
   DPC-kNN (k = min(7, clusters)), and a cluster becomes the mean of its roots, at its centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dycoke.budget import apportion, spread
from dycoke.merging import Placed, complement, density_peak_scores, group_means, nearest_by_distance, top_indices
from dycoke.segmentation import Segment, transition_segments
from dycoke.ttm import FLOOR_EPSILON

DENSITY_NEIGHBOURS = 7


@dataclass(frozen=True)
class FlashVIDSettings:
    selection_share: float = 0.7  # alpha
    temporal_threshold: float = 0.8
    segment_threshold: float = 0.9
    min_segments: int = 8


def diverse_selection(tokens: torch.Tensor, attention: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Greedy calibrated max-min diversity in every frame at once: counts[t] indices into frame t's tokens
    [T, n, D], ascending. A frame's first k picks do not depend on how many more follow, so all frames run the
    same number of greedy steps and each keeps its own first counts[t]."""
    frames, count = tokens.shape[0], tokens.shape[1]
    steps = max(counts, default=0)
    if steps == 0:
        return [torch.zeros(0, dtype=torch.long, device=tokens.device) for _ in range(frames)]
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    distance = (1 - unit @ unit.transpose(1, 2)) * attention.float()[:, None, :]  # [t, i, j]: to candidate j
    itself = torch.eye(count, dtype=torch.bool, device=tokens.device)
    rows = torch.arange(frames, device=tokens.device)
    pick = distance.masked_fill(itself, float("inf")).min(dim=1).values.argmax(dim=1)
    picks, taken = [pick], torch.zeros(frames, count, dtype=torch.bool, device=tokens.device)
    nearest_pick = distance[rows, pick]
    for _ in range(1, steps):
        taken[rows, pick] = True
        pick = nearest_pick.masked_fill(taken, -1.0).argmax(dim=1)
        picks.append(pick)
        nearest_pick = torch.minimum(nearest_pick, distance[rows, pick])
    chosen = torch.stack(picks, dim=1)
    return [torch.sort(chosen[t, :counts[t]]).values for t in range(frames)]


def frame_split(kept: int, num_frames: int, selection_share: float) -> tuple[list[int], list[int]]:
    """(selected, merged) counts per frame: the budget spread evenly, ceil(alpha * budget) selected."""
    budgets = spread(kept, num_frames)
    selected = [min(count, math.ceil(count * selection_share - FLOOR_EPSILON)) for count in budgets]
    return selected, [count - chosen for count, chosen in zip(budgets, selected)]


def temporal_links(frame_tokens: torch.Tensor, rest: list[torch.Tensor], segment: Segment, threshold: float,
                   most_links: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per frame t > first: (linked, parent) indices into rest[t] and rest[t-1].

    A link needs similarity > threshold; if more than `most_links` qualify, only the most similar are kept (ties to
    the earlier frame and position), so that enough roots remain for the segment's budget."""
    first, last = segment
    unit = torch.nn.functional.normalize
    similarity, frame, index, parent = [], [], [], []
    for t in range(first + 1, last + 1):
        if rest[t].numel() == 0 or rest[t - 1].numel() == 0:
            continue
        cosine = unit(frame_tokens[t, rest[t]].float(), dim=-1) @ unit(frame_tokens[t - 1, rest[t - 1]].float(), dim=-1).T
        best, nearest = cosine.max(dim=-1)
        similarity.append(best)
        frame.append(torch.full_like(nearest, t))
        index.append(torch.arange(nearest.numel(), device=nearest.device))
        parent.append(nearest)
    if not similarity:
        return {}
    similarity, frame, index, parent = (torch.cat(part) for part in (similarity, frame, index, parent))
    qualified = (similarity > threshold).nonzero()[:, 0]
    strongest = qualified[torch.argsort(similarity[qualified], descending=True, stable=True)[:max(most_links, 0)]]
    kept = torch.zeros_like(similarity, dtype=torch.bool)
    kept[strongest] = True
    return {t: (index[kept & (frame == t)], parent[kept & (frame == t)])
            for t in torch.unique(frame[kept]).tolist()}


def tree_roots(frame_tokens: torch.Tensor, rest: list[torch.Tensor], segment: Segment, threshold: float,
               pool: int) -> list[Placed]:
    """Per frame of the segment: its roots, each the mean of its tree, at the root's position."""
    first, last = segment
    tokens_per_frame = frame_tokens.shape[1]
    sums = {t: frame_tokens[t, rest[t]].float().clone() for t in range(first, last + 1)}
    counts = {t: torch.ones(rest[t].numel(), device=frame_tokens.device) for t in range(first, last + 1)}
    total = sum(rest[t].numel() for t in range(first, last + 1))
    links = temporal_links(frame_tokens, rest, segment, threshold, total - pool)
    is_root = {t: torch.ones(rest[t].numel(), dtype=torch.bool, device=frame_tokens.device) for t in sums}
    for t in range(last, first, -1):  # children hand their trees to their parents, latest frame first
        if t not in links:
            continue
        linked, parent = links[t]
        sums[t - 1].index_add_(0, parent, sums[t][linked])
        counts[t - 1].index_add_(0, parent, counts[t][linked])
        is_root[t][linked] = False
    return [Placed((sums[t] / counts[t][:, None])[is_root[t]], rest[t][is_root[t]] + t * tokens_per_frame)
            for t in range(first, last + 1)]


def cluster_roots(roots: Placed, count: int) -> Placed:
    if count == roots.positions.numel():
        return roots
    centres = top_indices(density_peak_scores(roots.tokens, min(DENSITY_NEIGHBOURS, count)), count)
    assignment = nearest_by_distance(roots.tokens, roots.tokens[centres])
    assignment[centres] = torch.arange(count, device=centres.device)  # a centre always stays in its own cluster
    means, _ = group_means(roots.tokens, assignment, count)
    return Placed(means, roots.positions[centres])


def flashvid_compress(frame_tokens: torch.Tensor, attention: torch.Tensor, kept: int,
                      settings: FlashVIDSettings) -> Placed:
    """`attention` [T, N]: attention each token receives in the vision tower."""
    num_frames, tokens_per_frame, _ = frame_tokens.shape
    if kept == num_frames * tokens_per_frame:
        return Placed.everything(frame_tokens)
    selected_counts, merged_counts = frame_split(kept, num_frames, settings.selection_share)
    selected = diverse_selection(frame_tokens, attention, selected_counts)
    rest = [complement(selected[t], tokens_per_frame) for t in range(num_frames)]
    parts = [Placed(frame_tokens[t, selected[t]], selected[t] + t * tokens_per_frame) for t in range(num_frames)]
    for first, last in transition_segments(frame_tokens.mean(dim=1), settings.segment_threshold,
                                           settings.min_segments):
        pool = sum(merged_counts[first:last + 1])
        if pool == 0:
            continue
        roots = tree_roots(frame_tokens, rest, (first, last), settings.temporal_threshold, pool)
        sizes = [root.positions.numel() for root in roots]
        counts = apportion(pool, [float(size) for size in sizes], sizes)
        parts.extend(cluster_roots(root, count) for root, count in zip(roots, counts) if count)
    return Placed.join(parts, frame_tokens)
