"""HoliTom (Shao et al., NeurIPS 2025), its outer-LLM part: global temporal merging, then spatial merging.

1. Temporal: positions whose token is cosine-similar (> tau) between every pair of adjacent frames of a window
   are *static* there. `segmentation.static_windows` picks the windows that save the most tokens; each static
   position of a window becomes one token, the mean over the window's frames, placed in its first frame.
2. Spatial: the budget is shared out over the window's static tokens and over each frame's dynamic (non-static)
   tokens, in proportion to their numbers. A frame keeps its dynamic tokens that receive the most attention in
   the vision tower (a `contextual_share` of them instead comes from density-peak merging, as for the static
   tokens); static tokens are merged by DPC-kNN: the top-scored tokens are centres, every other token joins its
   Euclidean-nearest centre, and a centre becomes beta * centre + (1 - beta) * mean(its members).

The inner-LLM merging stage (at layer k) is not part of this implementation; see README.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dycoke.budget import apportion
from dycoke.merging import Placed, density_peak_scores, group_means, nearest_by_distance, top_indices
from dycoke.segmentation import Segment, static_positions, static_windows


@dataclass(frozen=True)
class HoliTomSettings:
    threshold: float = 0.8  # tau
    beta: float = 0.6
    contextual_share: float = 0.0  # D
    neighbours: int = 7  # K of DPC-kNN


@dataclass(frozen=True)
class StaticGroup:
    """One static position merged over frames first..last (last may stop short of its window's end)."""

    first: int
    last: int
    position: int


def adjacent_similarity(frame_tokens: torch.Tensor) -> torch.Tensor:
    """[T-1, N]: cos(F[t, n], F[t+1, n])."""
    return torch.nn.functional.cosine_similarity(frame_tokens[:-1].float(), frame_tokens[1:].float(), dim=-1)


def static_groups(frame_tokens: torch.Tensor, threshold: float, most_saved: int) -> list[StaticGroup]:
    """The static groups of the best windows, in time then position order, saving at most `most_saved` tokens:
    once the budget would be undercut, the group that crosses it merges only as many frames as still fit."""
    static = adjacent_similarity(frame_tokens) > threshold
    groups, saved = [], 0
    for first, last in static_windows(static):
        if last == first:
            continue
        for position in static_positions(static, first, last).nonzero()[:, 0].tolist():
            frames = min(last - first, most_saved - saved)
            if frames <= 0:
                return groups
            groups.append(StaticGroup(first, first + frames, position))
            saved += frames
    return groups


def merge_by_density(tokens: torch.Tensor, count: int, neighbours: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN: the `count` top-scored tokens are centres; the others join the nearest centre.

    Returns the centres' indices and their merged values beta * centre + (1 - beta) * mean(members)."""
    if count == tokens.shape[0]:
        return torch.arange(count, device=tokens.device), tokens.float()
    centres = top_indices(density_peak_scores(tokens, min(neighbours, count)), count)
    is_centre = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    is_centre[centres] = True
    others = tokens[~is_centre]
    means, sizes = group_means(others, nearest_by_distance(others, tokens[centres]), count)
    centre_tokens = tokens[centres].float()
    merged = torch.where(sizes[:, None] > 0, beta * centre_tokens + (1 - beta) * means, centre_tokens)
    return centres, merged


def holitom_compress(frame_tokens: torch.Tensor, attention: torch.Tensor, kept: int,
                     settings: HoliTomSettings) -> Placed:
    """`attention` [T, N]: attention each token receives in the vision tower."""
    num_frames, tokens_per_frame, _ = frame_tokens.shape
    total = num_frames * tokens_per_frame
    if kept == total:
        return Placed.everything(frame_tokens)
    groups = static_groups(frame_tokens, settings.threshold, total - kept) if num_frames > 1 else []
    covered = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool, device=frame_tokens.device)
    for group in groups:
        covered[group.first:group.last + 1, group.position] = True
    pieces = ([(piece, False) for piece in _static_pieces(frame_tokens, groups)]
              + [(piece, True) for piece in _dynamic_pieces(frame_tokens, covered)])
    sizes = [piece.positions.numel() for piece, _ in pieces]
    counts = apportion(kept, [float(size) for size in sizes], sizes)
    parts = [_reduce(piece, count, attention, dynamic, settings)
             for (piece, dynamic), count in zip(pieces, counts) if count]
    return Placed.join(parts, frame_tokens)


def _static_pieces(frame_tokens: torch.Tensor, groups: list[StaticGroup]) -> list[Placed]:
    """One piece per window: its static groups' mean tokens, placed at the window's first frame."""
    tokens_per_frame = frame_tokens.shape[1]
    by_window: dict[int, list[StaticGroup]] = {}
    for group in groups:
        by_window.setdefault(group.first, []).append(group)
    pieces = []
    for first, members in by_window.items():
        means = torch.stack([frame_tokens[g.first:g.last + 1, g.position].float().mean(dim=0) for g in members])
        positions = torch.tensor([first * tokens_per_frame + g.position for g in members], device=frame_tokens.device)
        pieces.append(Placed(means, positions))
    return pieces


def _dynamic_pieces(frame_tokens: torch.Tensor, covered: torch.Tensor) -> list[Placed]:
    """One piece per frame: the tokens no static group covers."""
    tokens_per_frame = frame_tokens.shape[1]
    pieces = []
    for t in range(frame_tokens.shape[0]):
        positions = (~covered[t]).nonzero()[:, 0]
        pieces.append(Placed(frame_tokens[t, positions], positions + t * tokens_per_frame))
    return pieces


def _reduce(piece: Placed, count: int, attention: torch.Tensor, dynamic: bool, settings: HoliTomSettings) -> Placed:
    """`count` tokens from the piece: static ones by density-peak merging, dynamic ones mostly by attention."""
    if not dynamic:
        centres, merged = merge_by_density(piece.tokens, count, settings.neighbours, settings.beta)
        return Placed(merged, piece.positions[centres])
    dominant = round(count * (1 - settings.contextual_share))
    scores = attention.reshape(-1)[piece.positions]
    chosen = top_indices(scores, dominant)
    parts = [Placed(piece.tokens[chosen], piece.positions[chosen])]
    if count > dominant:
        rest = torch.ones(piece.positions.numel(), dtype=torch.bool, device=piece.positions.device)
        rest[chosen] = False
        centres, merged = merge_by_density(piece.tokens[rest], count - dominant, settings.neighbours, settings.beta)
        parts.append(Placed(merged, piece.positions[rest][centres]))
    return Placed.join(parts, piece.tokens)
