"""Temporal segmentation of a video's frames, as the peers that merge over time use it.

- `transition_segments`: FastVID's dynamic segmentation (DySeg), also FlashVID's: cut between two adjacent frames
  whose global features are less cosine-similar than a threshold, and at the lowest-similarity transitions until
  there are at least a minimum number of segments.
- `static_windows`: HoliTom's global redundancy-aware segmentation: the partition of the frames into contiguous
  windows that maximises the tokens saved by merging each window's static positions into one token.
"""

from __future__ import annotations

import torch

Segment = tuple[int, int]  # first and last frame, inclusive


def transition_similarities(global_features: torch.Tensor) -> torch.Tensor:
    """[T-1]: cosine similarity of each frame's global feature [T, D] with the next frame's."""
    unit = torch.nn.functional.normalize(global_features.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def transition_segments(global_features: torch.Tensor, threshold: float, min_segments: int) -> list[Segment]:
    """Cut after frame t where similarity(t, t+1) < threshold, and after the min_segments - 1 least similar
    transitions whatever their similarity (ties to the earlier transition)."""
    num_frames = global_features.shape[0]
    if num_frames == 1:
        return [(0, 0)]
    similarity = transition_similarities(global_features)
    lowest = torch.argsort(similarity, stable=True)[: max(min_segments - 1, 0)]
    cuts = sorted(set(lowest.tolist()) | set((similarity < threshold).nonzero()[:, 0].tolist()))
    starts = [0] + [cut + 1 for cut in cuts]
    ends = cuts + [num_frames - 1]
    return list(zip(starts, ends))


def static_positions(static: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Bool [N]: positions that stay static through frames start..end, from `static` [T-1, N] (t vs t+1)."""
    return static[start:end].all(dim=0)


def static_windows(static: torch.Tensor, max_window: int | None = None) -> list[Segment]:
    """Partition frames 0..T-1 into windows maximising sum(static positions x (window length - 1)).

    `static[t, n]` says whether position n is similar enough between frames t and t+1. Dynamic programming over
    the last frame i: the best of leaving frame i alone or closing a window [j, i]; ties keep the shorter window.
    """
    num_frames = static.shape[0] + 1
    longest = num_frames if max_window is None else max_window
    saved = torch.zeros(num_frames, num_frames)
    for start in range(num_frames - 1):
        still = torch.ones(static.shape[1], dtype=torch.bool, device=static.device)
        for end in range(start + 1, num_frames):
            still = still & static[end - 1]
            saved[start, end] = int(still.sum()) * (end - start)
    best = [0.0] * (num_frames + 1)  # best[i + 1]: frames 0..i
    window_start = [0] * num_frames
    for last in range(num_frames):
        best[last + 1], window_start[last] = best[last], last
        for length in range(2, min(last + 1, longest) + 1):
            first = last - length + 1
            value = best[first] + float(saved[first, last])
            if value > best[last + 1]:
                best[last + 1], window_start[last] = value, first
    windows = []
    last = num_frames - 1
    while last >= 0:
        windows.append((window_start[last], last))
        last = window_start[last] - 1
    return windows[::-1]
