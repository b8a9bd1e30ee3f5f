"""Tests for dycoke.ttm (DESIGN.md §2.1, TTM).

Every expected value here is computed independently of the code under test: by hand, from hard-coded
reference tables, or by the deliberately simple loop reference `_loop_mask` below. None of the code's
helpers (`kept_count`, `reference_frames`) is used to compute an expectation.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dycoke.ttm import apply_keep_mask, kept_count, reference_frames, temporal_keep_mask

# Reference frame of each in-window offset, written out by hand from DESIGN.md §2.1 (o with its lowest set
# bit cleared). Offset 0 is the anchor and has no reference.
REFERENCE_OFFSETS = {
    1: {},
    2: {1: 0},
    4: {1: 0, 2: 0, 3: 2},
    8: {1: 0, 2: 0, 3: 2, 4: 0, 5: 4, 6: 4, 7: 6},
    16: {1: 0, 2: 0, 3: 2, 4: 0, 5: 4, 6: 4, 7: 6,
         8: 0, 9: 8, 10: 8, 11: 10, 12: 8, 13: 12, 14: 12, 15: 14},
}

# Wrong reference rules: a test that passes with the right rule must fail with any of these.
WRONG_RULES = {
    "previous frame": lambda o: o - 1,
    "always the anchor": lambda o: 0,
}


def _expected_count(n: int, k: float) -> int:
    """floor((1 - K) * N + 1e-6), the DESIGN.md formula, written out here."""
    return math.floor((1.0 - k) * n + 1e-6)


def _ref_of(t: int, window: int, rule=None) -> int | None:
    """Absolute reference frame of frame t, or None for an anchor."""
    start, offset = t - t % window, t % window
    if offset == 0:
        return None
    if rule is None:
        return start + REFERENCE_OFFSETS[window][offset]
    return start + rule(offset)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def _loop_mask(features: torch.Tensor, k: float, window: int, rule=None) -> list[list[bool]]:
    """Deliberately simple reference: explicit loops, float64 cosine, stable sort by (similarity, position)."""
    t_count, n_count, _ = features.shape
    rows = features.double().tolist()
    keep = _expected_count(n_count, k)
    mask = []
    for t in range(t_count):
        ref = _ref_of(t, window, rule)
        if ref is None:
            mask.append([True] * n_count)
            continue
        sims = [_cos(rows[t][n], rows[ref][n]) for n in range(n_count)]
        order = sorted(range(n_count), key=lambda n: (sims[n], n))
        chosen = set(order[:keep])
        mask.append([n in chosen for n in range(n_count)])
    return mask


def _angles_to_features(angles: list[list[float]]) -> torch.Tensor:
    """[T][N] angles -> [T, N, 2] unit vectors (cos a, sin a)."""
    return torch.tensor(
        [[[math.cos(a), math.sin(a)] for a in row] for row in angles], dtype=torch.float32
    )


def _designed(t_count: int, n_count: int, window: int, k: float, seed: int):
    """Features whose kept positions are known by construction, with a wide similarity gap.

    Anchors get random angles. A non-anchor frame t gets its reference's angle plus a delta: the positions
    chosen to be kept get |delta| in [1.5, 2.5] rad, the others |delta| in [0, 1) rad, so the kept set is
    exactly the chosen set under the right reference (cos is decreasing on [0, pi]). Returns the features
    and the expected [T][N] mask.
    """
    rng = random.Random(seed)
    keep = _expected_count(n_count, k)
    angles: list[list[float]] = []
    expected: list[list[bool]] = []
    for t in range(t_count):
        ref = _ref_of(t, window)
        if ref is None:
            angles.append([rng.uniform(-math.pi, math.pi) for _ in range(n_count)])
            expected.append([True] * n_count)
            continue
        chosen = set(rng.sample(range(n_count), keep))
        small = rng.sample(range(n_count), n_count)  # distinct ranks for distinct deltas
        row = []
        for n in range(n_count):
            if n in chosen:
                delta = 1.5 + small[n] / n_count
            else:
                delta = small[n] / n_count
            row.append(angles[ref][n] + rng.choice((-1.0, 1.0)) * delta)
        angles.append(row)
        expected.append([n in chosen for n in range(n_count)])
    return _angles_to_features(angles), expected


def _mask_list(mask: torch.Tensor) -> list[list[bool]]:
    return [[bool(v) for v in row] for row in mask.tolist()]


def _loop_gather(features: torch.Tensor, mask: list[list[bool]]) -> torch.Tensor:
    rows = []
    for t in range(features.shape[0]):
        for n in range(features.shape[1]):
            if mask[t][n]:
                rows.append(features[t, n])
    if not rows:
        return features.new_zeros((0, features.shape[2]))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------------
# Hand-built cases
# --------------------------------------------------------------------------------------------------------


def test_hand_built_w4_exact_positions_and_references():
    """W=4, N=4, K=0.5 (keep 2). Each frame's expected kept set is worked out by hand; a wrong reference
    (previous frame, or always the anchor) would give a different answer for frame 2 or frame 3."""
    angles = [
        [0.0, 0.0, 0.0, 0.0],  # frame 0: anchor
        [0.0, 0.1, 1.0, 2.0],  # vs 0: deltas 0, .1, 1, 2          -> keep {2, 3}
        [2.0, 1.0, 0.0, 0.1],  # vs 0: deltas 2, 1, 0, .1          -> keep {0, 1}
        #                        (vs 1 would be 2, .9, 1, 1.9        -> {0, 3}: wrong)
        [2.0, 1.0, 0.5, 0.7],  # vs 2: deltas 0, 0, .5, .6         -> keep {2, 3}
        #                        (vs 0 would be 2, 1, .5, .7         -> {0, 1}: wrong)
    ]
    mask = temporal_keep_mask(_angles_to_features(angles), 0.5, window=4)
    assert _mask_list(mask) == [
        [True, True, True, True],
        [False, False, True, True],
        [True, True, False, False],
        [False, False, True, True],
    ]


def test_hand_built_w2_frame1_vs_0_and_new_window():
    """W=2, N=3, K=0.3 (keep floor(2.1) = 2). Frame 3 is compared with frame 2, the anchor of its own window."""
    angles = [
        [0.0, 0.0, 0.0],  # anchor
        [1.0, 0.1, 2.0],  # vs 0: keep the two largest deltas: {0, 2}
        [3.0, 3.0, 3.0],  # anchor of the second window
        [3.0, 1.0, 3.2],  # vs 2 (not 0, not 1): deltas 0, 2, .2 -> keep {1, 2}
    ]
    mask = temporal_keep_mask(_angles_to_features(angles), 0.3, window=2)
    assert _mask_list(mask) == [
        [True, True, True],
        [True, False, True],
        [True, True, True],
        [False, True, True],
    ]


def test_hand_built_w8_each_frame_uses_its_reference():
    """W=8, N=2, K=0.5 (keep 1). Frame t's reference holds angle a at position 0 and b at position 1; frame t
    moves position p_t by 1 rad from its reference and keeps position 1 - p_t equal to it. Every other frame
    of the window is given a different layout, so comparing with any other frame changes the answer."""
    refs = {1: 0, 2: 0, 3: 2, 4: 0, 5: 4, 6: 4, 7: 6}  # from the brief, by hand
    moved = {1: 0, 2: 1, 3: 0, 4: 1, 5: 0, 6: 0, 7: 1}  # the position that changes in each frame
    angles = {0: [0.0, 0.0]}
    for t in range(1, 8):
        row = list(angles[refs[t]])
        row[moved[t]] += 1.0 + 0.3 * t  # a distinct step per frame, < pi from its reference
        angles[t] = row
    features = _angles_to_features([angles[t] for t in range(8)])
    mask = _mask_list(temporal_keep_mask(features, 0.5, window=8))
    expected = [[True, True]] + [[moved[t] == 0, moved[t] == 1] for t in range(1, 8)]
    assert mask == expected
    # The features do discriminate: the loop reference with a wrong rule disagrees.
    for name, rule in WRONG_RULES.items():
        assert _loop_mask(features, 0.5, 8, rule) != expected, name


@pytest.mark.parametrize("window", [2, 4, 8])
@pytest.mark.parametrize("t_count", [1, 2, 3, 4, 5, 30, 32])
@pytest.mark.parametrize("k", [0.0, 0.3, 0.5, 0.7])
def test_designed_features_exact_mask(window, t_count, k):
    n_count = 20
    features, expected = _designed(t_count, n_count, window, k, seed=1000 * window + 10 * t_count + int(10 * k))
    mask = temporal_keep_mask(features, k, window=window)
    assert mask.shape == (t_count, n_count)
    assert mask.dtype == torch.bool
    assert _mask_list(mask) == expected
    # The simple loop reference agrees with the construction.
    assert _loop_mask(features, k, window) == expected


@pytest.mark.parametrize("window", [4, 8])
def test_designed_features_reject_wrong_reference_rules(window):
    """The designed data discriminates: with a wrong reference rule the loop reference gives another mask,
    so the exact-mask tests above would catch a code using that rule."""
    features, expected = _designed(32, 20, window, 0.5, seed=7)
    assert _loop_mask(features, 0.5, window) == expected
    for name, rule in WRONG_RULES.items():
        assert _loop_mask(features, 0.5, window, rule) != expected, name


@pytest.mark.parametrize("window", [1, 2, 4, 8, 16])
def test_reference_frames_table(window):
    t_count = 37
    expected = [t if t % window == 0 else t - t % window + REFERENCE_OFFSETS[window][t % window]
                for t in range(t_count)]
    assert reference_frames(t_count, window).tolist() == expected


def test_reference_frames_w4_w8_literal():
    assert reference_frames(8, 4).tolist() == [0, 0, 0, 2, 4, 4, 4, 6]
    assert reference_frames(8, 8).tolist() == [0, 0, 0, 2, 0, 4, 4, 6]
    assert reference_frames(4, 2).tolist() == [0, 0, 2, 2]


# --------------------------------------------------------------------------------------------------------
# Ties, order, counts
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [2, 4, 8])
@pytest.mark.parametrize("k", [0.3, 0.5, 0.7])
def test_identical_frames_keep_lowest_positions(window, k):
    """All tokens of all frames equal: every similarity ties, so the lowest position indices are kept."""
    t_count, n_count = 9, 10
    features = torch.ones(t_count, n_count, 3)
    keep = {0.3: 7, 0.5: 5, 0.7: 3}[k]  # floor((1-K)*10) by hand
    mask = _mask_list(temporal_keep_mask(features, k, window=window))
    for t in range(t_count):
        if t % window == 0:
            assert mask[t] == [True] * n_count
        else:
            assert mask[t] == [n < keep for n in range(n_count)], t


def test_identical_frames_with_distinct_positions_tie_to_lowest():
    """Frames repeat exactly but positions differ (axis-aligned vectors: cos is exactly 1 everywhere)."""
    frame = [[1.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, 1.0], [8.0, 0.0], [0.0, 0.5]]
    features = torch.tensor([frame] * 4)
    mask = _mask_list(temporal_keep_mask(features, 0.5, window=4))
    assert mask[0] == [True] * 6
    for t in (1, 2, 3):
        assert mask[t] == [True, True, True, False, False, False]


def test_partial_ties_stable_lowest_index():
    """Among equally similar positions, the lower index wins; the strictly less similar one always wins."""
    angles = [
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 2.0, 1.0, 1.0],  # position 2 least similar; then 0, 1, 3, 4 tie -> keep {2, 0}
    ]
    mask = _mask_list(temporal_keep_mask(_angles_to_features(angles), 0.6, window=2))
    assert mask[1] == [True, False, True, False, False]


def test_apply_keep_mask_order_is_frame_major_position_ascending():
    """Least similar order is position-descending here; the output must still be position-ascending."""
    angles = [
        [0.0] * 6,
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # least similar: 5, 4, 3 -> keep {3, 4, 5}
    ]
    features = _angles_to_features(angles)
    mask = temporal_keep_mask(features, 0.5, window=2)
    out = apply_keep_mask(features, mask)
    expected = torch.stack([features[0, n] for n in range(6)] + [features[1, 3], features[1, 4], features[1, 5]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("t_count", [1, 3, 5, 30, 32])
@pytest.mark.parametrize("window", [2, 4, 8])
def test_apply_keep_mask_matches_loop(t_count, window):
    features, expected = _designed(t_count, 12, window, 0.7, seed=t_count + window)
    out = apply_keep_mask(features, temporal_keep_mask(features, 0.7, window=window))
    assert torch.equal(out, _loop_gather(features, expected))


def test_apply_keep_mask_arbitrary_mask_with_tags():
    """Each token carries its (frame, position) as its feature, so the output order can be read off."""
    t_count, n_count = 3, 5
    features = torch.tensor([[[float(t), float(n)] for n in range(n_count)] for t in range(t_count)])
    mask = torch.tensor([
        [False, True, False, True, True],
        [True, False, False, False, False],
        [False, False, True, False, True],
    ])
    out = apply_keep_mask(features, mask)
    assert out.tolist() == [[0, 1], [0, 3], [0, 4], [1, 0], [2, 2], [2, 4]]


def test_paper_figure_2960_tokens():
    torch.manual_seed(0)
    features = torch.randn(32, 196, 16)
    mask = temporal_keep_mask(features, 0.7, window=4)
    assert mask.shape == (32, 196)
    assert int(mask.sum()) == 2960 == 8 * (196 + 3 * 58)
    for t in range(32):
        assert int(mask[t].sum()) == (196 if t % 4 == 0 else 58), t
    assert apply_keep_mask(features, mask).shape == (2960, 16)


@pytest.mark.parametrize("window", [1, 2, 4, 8])
@pytest.mark.parametrize("t_count", [1, 5, 32])
def test_k0_keeps_everything_and_output_is_unchanged(window, t_count):
    torch.manual_seed(t_count)
    features = torch.randn(t_count, 17, 8)
    mask = temporal_keep_mask(features, 0.0, window=window)
    assert bool(mask.all())
    out = apply_keep_mask(features, mask)
    assert torch.equal(out, features.reshape(t_count * 17, 8))


# --------------------------------------------------------------------------------------------------------
# The official code's faults are absent
# --------------------------------------------------------------------------------------------------------


def test_last_window_is_pruned_frame30_of_32():
    torch.manual_seed(1)
    mask = temporal_keep_mask(torch.randn(32, 196, 8), 0.7, window=4)
    assert int(mask[28].sum()) == 196
    assert int(mask[29].sum()) == 58
    assert int(mask[30].sum()) == 58
    assert int(mask[31].sum()) == 58


@pytest.mark.parametrize("t_count,last_count", [(31, 58), (5, 196), (7, 58), (3, 58)])
def test_odd_frame_count_keeps_last_frame(t_count, last_count):
    torch.manual_seed(t_count)
    mask = temporal_keep_mask(torch.randn(t_count, 196, 8), 0.7, window=4)
    assert mask.shape == (t_count, 196)
    assert int(mask[-1].sum()) == last_count


@pytest.mark.parametrize("t_count", [1, 2, 3, 4])
def test_short_videos_work(t_count):
    torch.manual_seed(t_count)
    features = torch.randn(t_count, 196, 8)
    mask = temporal_keep_mask(features, 0.7, window=4)
    assert mask.shape == (t_count, 196)
    assert [int(mask[t].sum()) for t in range(t_count)] == [196, 58, 58, 58][:t_count]
    assert apply_keep_mask(features, mask).shape == (196 + 58 * (t_count - 1), 8)


def test_single_frame_drops_nothing():
    features = torch.randn(1, 9, 4)
    for k in (0.3, 0.7, 0.95):
        for window in (1, 2, 4, 8):
            assert bool(temporal_keep_mask(features, k, window=window).all())


def test_kept_order_is_position_order_not_topk_order():
    """Similarity increases with position in frame 1, so top-k (least similar first) order would be
    descending positions; the output must be ascending."""
    n_count = 10
    angles = [[0.0] * n_count, [0.1 * n for n in range(n_count)]]  # least similar: 9, 8, 7, ...
    features = _angles_to_features(angles)
    mask = temporal_keep_mask(features, 0.7, window=4)  # keep floor(3.0 + eps) = 3: {7, 8, 9}
    assert _mask_list(mask)[1] == [n >= 7 for n in range(n_count)]
    out = apply_keep_mask(features, mask)
    assert torch.equal(out[n_count:], torch.stack([features[1, 7], features[1, 8], features[1, 9]]))


# --------------------------------------------------------------------------------------------------------
# Floor epsilon, partial last window, anchors
# --------------------------------------------------------------------------------------------------------


def test_floor_epsilon_n50_k09_keeps_5():
    assert (1 - 0.9) * 50 < 5  # the float trap is real
    torch.manual_seed(2)
    mask = temporal_keep_mask(torch.randn(4, 50, 8), 0.9, window=4)
    assert [int(mask[t].sum()) for t in range(4)] == [50, 5, 5, 5]


@pytest.mark.parametrize("total,ratio,expected", [
    (50, 0.9, 5), (196, 0.7, 58), (196, 0.0, 196), (10, 0.3, 7), (10, 0.7, 3), (100, 0.99, 1), (3, 0.5, 1),
])
def test_kept_count_by_hand(total, ratio, expected):
    assert kept_count(total, ratio) == expected


def test_partial_last_window_t6_w4():
    """Frames 4 and 5 form a partial window: 4 is an anchor (whole), 5 is compared with 4 (not with 0)."""
    angles = [
        [0.0, 0.0, 0.0, 0.0],  # 0 anchor
        [0.0, 0.0, 0.0, 0.0],  # 1
        [0.0, 0.0, 0.0, 0.0],  # 2
        [0.0, 0.0, 0.0, 0.0],  # 3
        [2.0, 2.0, 0.0, 0.0],  # 4: anchor of the partial window, kept whole though it differs
        [2.0, 2.0, 1.0, 1.5],  # 5 vs 4: deltas 0, 0, 1, 1.5 -> keep {2, 3}; (vs 0 it would be {0, 1})
    ]
    mask = _mask_list(temporal_keep_mask(_angles_to_features(angles), 0.5, window=4))
    assert len(mask) == 6
    assert mask[4] == [True] * 4
    assert mask[5] == [False, False, True, True]
    # frames 1..3 equal their references everywhere: ties -> lowest positions
    assert mask[1] == mask[2] == mask[3] == [True, True, False, False]


@pytest.mark.parametrize("window", [1, 2, 4, 8, 16])
def test_anchors_are_whole_in_every_window(window):
    torch.manual_seed(window)
    t_count = 37
    mask = temporal_keep_mask(torch.randn(t_count, 30, 6), 0.9, window=window)
    for t in range(0, t_count, window):
        assert bool(mask[t].all()), t
    for t in range(t_count):
        if t % window:
            assert int(mask[t].sum()) == 3, t


def test_half_precision_input():
    features, expected = _designed(8, 16, 4, 0.5, seed=3)
    mask = temporal_keep_mask(features.to(torch.bfloat16), 0.5, window=4)
    assert mask.dtype == torch.bool
    assert _mask_list(mask) == expected


# --------------------------------------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,window", [(1.0, 4), (-0.1, 4), (0.7, 3), (0.7, 0), (1.5, 4), (0.7, 6)])
def test_invalid_arguments_raise_value_error(k, window):
    with pytest.raises(ValueError):
        temporal_keep_mask(torch.randn(4, 8, 4), k, window=window)


# --------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    t_count=st.integers(1, 40),
    n_count=st.integers(1, 64),
    k=st.floats(0.0, 0.95, allow_nan=False),
    window=st.sampled_from([1, 2, 4, 8, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_counts_shape_dtype_determinism(t_count, n_count, k, window, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(t_count, n_count, 5, generator=generator)
    mask = temporal_keep_mask(features, k, window=window)
    assert mask.shape == (t_count, n_count)
    assert mask.dtype == torch.bool
    keep = math.floor((1.0 - k) * n_count + 1e-6)
    for t in range(t_count):
        assert int(mask[t].sum()) == (n_count if t % window == 0 else keep)
    assert torch.equal(mask, temporal_keep_mask(features.clone(), k, window=window))
    out = apply_keep_mask(features, mask)
    assert out.shape == (int(mask.sum()), 5)


@settings(max_examples=40, deadline=None)
@given(
    t_count=st.integers(1, 40),
    n_count=st.integers(1, 40),
    k=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]),
    window=st.sampled_from([1, 2, 4, 8, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_exact_mask_on_designed_features(t_count, n_count, k, window, seed):
    features, expected = _designed(t_count, n_count, window, k, seed)
    mask = temporal_keep_mask(features, k, window=window)
    assert _mask_list(mask) == expected
    assert torch.equal(apply_keep_mask(features, mask), _loop_gather(features, expected))
