"""Visual-token budgets: how many video tokens a method feeds the LLM and attends to, computed from its settings.

Every count here is an exact integer, because matched-budget comparisons must be exact: a peer matched to DyCoke
attends to exactly as many visual tokens per decoding step as DyCoke does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dycoke.config import ConfigError
from dycoke.ttm import kept_count


@dataclass(frozen=True)
class VisualBudget:
    """Visual tokens of one request: those that enter the LLM (prefill) and those attended per decoding step.

    `attended` counts what the newest token attends to at the layers a method prunes (DyCoke: layers >= L,
    FastV: layers >= K); methods that prune before the LLM attend to everything they feed it.
    """

    prefill: int
    attended: int


def ttm_kept_total(num_frames: int, tokens_per_frame: int, merge_ratio: float, window: int) -> int:
    """Tokens TTM keeps (DESIGN.md §2.1): anchors whole, every other frame floor((1-K)·N)."""
    anchors = len(range(0, num_frames, window))
    return anchors * tokens_per_frame + (num_frames - anchors) * kept_count(tokens_per_frame, merge_ratio)


def ratio_keeping(kept: int, total: int) -> float:
    """The drop ratio R with kept_count(total, R) == kept exactly."""
    if not 0 < kept <= total:
        raise ConfigError(f"cannot match a budget of {kept} of {total} visual tokens; it must be in 1..{total}")
    ratio = 1.0 - kept / total
    assert kept_count(total, ratio) == kept, (kept, total, ratio)  # float error is far below the floor's epsilon
    return ratio


def evenly_spaced(count: int, length: int) -> list[int]:
    """`count` distinct indices spread evenly over range(length), each at the centre of its share."""
    return [math.floor((i + 0.5) * length / count) for i in range(count)]


def spread(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` counts that differ by at most one; the larger ones sit at evenly spaced parts."""
    base, extra = divmod(total, parts)
    counts = [base] * parts
    for part in evenly_spaced(extra, parts) if extra else ():
        counts[part] += 1
    return counts


def apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split `total` into counts proportional to `weights`, none above its cap, summing to `total` exactly.

    Parts whose share reaches their cap get the cap and the rest is shared again among the others; the
    fractional remainders then go to the largest fractions (ties to the lower index).
    """
    if total > sum(caps):
        raise ConfigError(f"cannot place {total} tokens in parts that hold {sum(caps)}")
    counts = [0] * len(caps)
    free = [part for part, cap in enumerate(caps) if cap > 0]
    remaining = total
    while free:
        weight = sum(weights[part] for part in free)
        quotas = {part: remaining * (weights[part] / weight if weight > 0 else 1 / len(free)) for part in free}
        full = [part for part in free if quotas[part] >= caps[part]]
        if not full:
            break
        for part in full:
            counts[part] = caps[part]
            remaining -= caps[part]
            free.remove(part)
    else:
        return counts
    floors = {part: math.floor(quotas[part]) for part in free}
    by_fraction = sorted(free, key=lambda part: (floors[part] - quotas[part], part))
    for rank, part in enumerate(by_fraction):
        counts[part] = floors[part] + (rank < remaining - sum(floors.values()))
    assert sum(counts) == total, (total, weights, caps)
    return counts
