"""Building blocks shared by the peers that merge tokens: ranking, density peaks, merging into centres, placing.

Every ranking here is deterministic: ties go to the lower index, where the official codes add random noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MATMUL_DISTANCES = "use_mm_for_euclid_dist"  # cdist through one matmul: far faster on CPU for wide features


class Placed(NamedTuple):
    """Tokens that enter the LLM, each at the (frame, position) it stands for, as global indices t * N + n."""

    tokens: torch.Tensor  # [V, D]
    positions: torch.Tensor  # [V] long, distinct

    @classmethod
    def everything(cls, frame_tokens: torch.Tensor) -> "Placed":
        num_frames, tokens_per_frame, dim = frame_tokens.shape
        positions = torch.arange(num_frames * tokens_per_frame, device=frame_tokens.device)
        return cls(frame_tokens.reshape(-1, dim), positions)

    @classmethod
    def join(cls, parts: list["Placed"], like: torch.Tensor) -> "Placed":
        """All parts in one, in global position order (frame-major, then spatial)."""
        parts = [part for part in parts if part.positions.numel()]
        if not parts:
            return cls(like.new_zeros(0, like.shape[-1]), torch.zeros(0, dtype=torch.long, device=like.device))
        tokens = torch.cat([part.tokens.to(like.dtype) for part in parts])
        positions = torch.cat([part.positions for part in parts])
        order = torch.argsort(positions)
        return cls(tokens[order], positions[order])


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest scores' indices, ascending; ties to the lower index."""
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values


def bottom_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` lowest scores' indices, ascending; ties to the lower index."""
    return torch.sort(torch.argsort(scores, stable=True)[:count]).values


def complement(chosen: torch.Tensor, length: int) -> torch.Tensor:
    """The indices of range(length) not in `chosen`, ascending."""
    left = torch.ones(length, dtype=torch.bool, device=chosen.device)
    left[chosen] = False
    return left.nonzero()[:, 0]


def scaled_distances(tokens: torch.Tensor) -> torch.Tensor:
    """[n, n] Euclidean distances divided by sqrt(D), as DPC-kNN uses them."""
    flat = tokens.float()
    return torch.cdist(flat, flat, compute_mode=MATMUL_DISTANCES) / math.sqrt(tokens.shape[-1])


def density_peak_scores(tokens: torch.Tensor, neighbours: int) -> torch.Tensor:
    """DPC-kNN score per token [n]: local density times the distance to the nearest denser token.

    Density is exp(-mean squared distance to the `neighbours` nearest tokens, itself included). The densest token
    scores with the largest distance of all. Equal densities count the lower index as the denser.
    """
    count = tokens.shape[0]
    distances = scaled_distances(tokens)
    nearest = torch.topk(distances, min(neighbours, count), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    index = torch.arange(count, device=tokens.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))  # [i, j]: j denser than i
    to_denser = torch.where(denser, distances, distances.max()).min(dim=-1).values
    return to_denser * density


def nearest_by_distance(tokens: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index into `centres` of the Euclidean-nearest centre of each token (ties to the lower index)."""
    return torch.cdist(tokens.float(), centres.float(), compute_mode=MATMUL_DISTANCES).argmin(dim=-1)


def most_cosine_similar(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Index into `targets` of the most cosine-similar target of each token (ties to the lower index)."""
    unit = torch.nn.functional.normalize
    return torch.matmul(unit(tokens.float(), dim=-1), unit(targets.float(), dim=-1).T).argmax(dim=-1)


def group_means(tokens: torch.Tensor, assignment: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token of each group [groups, D] (zeros for an empty group) and the group sizes [groups]."""
    membership = torch.nn.functional.one_hot(assignment, groups).float()  # [n, groups]: a matmul, not a scatter
    sizes = membership.sum(dim=0)
    return (membership.T @ tokens.float()) / sizes.clamp(min=1)[:, None], sizes.long()
