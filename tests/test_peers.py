"""HoliTom, FastVID, VidCom² and FlashVID: each rule on a small input against values worked out by hand, exact
budgets for any frame count, and the no-op setting against the baseline's tokens."""

from __future__ import annotations

import math

import pytest
import torch

from dycoke.budget import apportion
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.fastvid import FastVIDSettings, anchor_frames, fastvid_compress, frame_split
from dycoke.flashvid import FlashVIDSettings, diverse_selection, flashvid_compress, tree_roots
from dycoke.holitom import HoliTomSettings, holitom_compress, static_groups
from dycoke.merging import density_peak_scores, top_indices
from dycoke.methods import configure, get_method, match_budget
from dycoke.segmentation import static_windows, transition_segments
from dycoke.vidcom2 import vidcom2_compress

PEERS = ("holitom", "fastvid", "vidcom2", "flashvid")
N = 196
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def at_angle(degrees: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


# --- shared rules -------------------------------------------------------------------------------------------------


def test_apportion_is_proportional_capped_and_exact():
    assert apportion(7, [1, 2], [7, 7]) == [2, 5]  # quotas 2.33, 4.67: the remainder goes to the larger fraction
    assert apportion(10, [10, 1, 1], [4, 5, 5]) == [4, 3, 3]  # the first is capped; 6 shared by the other two
    assert apportion(7, [2, 2, 5], [4, 4, 4]) == [2, 1, 4]  # quotas 1.56, 1.56, 3.89: equal fractions, lower first
    with pytest.raises(ConfigError, match="cannot place 9"):
        apportion(9, [1, 1], [4, 4])


def test_transition_segments_cut_below_the_threshold_and_at_the_least_similar_transitions():
    # Adjacent similarities 1.0, 0.0, 1.0, 0.6, 0.95 between six frames.
    frames = torch.stack([E1, E1, E2, E2, at_angle(math.degrees(math.acos(0.6))),
                          at_angle(math.degrees(math.acos(0.6)) - math.degrees(math.acos(0.95)))])
    assert transition_segments(frames, threshold=0.9, min_segments=2) == [(0, 1), (2, 3), (4, 5)]
    # Four segments wanted: the third cut is the least similar of the others (0.95, between frames 4 and 5).
    assert transition_segments(frames, threshold=0.9, min_segments=4) == [(0, 1), (2, 3), (4, 4), (5, 5)]
    assert transition_segments(frames[:1], threshold=0.9, min_segments=8) == [(0, 0)]


def test_density_peaks_are_the_middles_of_the_two_clusters():
    points = torch.tensor([[0.0], [0.25], [0.5], [4.0], [4.25], [4.5]])  # exact in binary: no float ties broken
    # Each middle point has the two others of its cluster as neighbours: the highest density, equal for both
    # clusters, so the lower index counts as denser; it scores with the largest distance (4.5), the other middle
    # with its distance to it (4.0); the rest only with 0.25, to their middle.
    scores = density_peak_scores(points, neighbours=3)
    assert top_indices(scores, 2).tolist() == [1, 4]
    density = math.exp(-(0 + 0.0625 + 0.0625) / 3)
    assert scores[1].item() == pytest.approx(4.5 * density, rel=1e-5)
    assert scores[4].item() == pytest.approx(4.0 * density, rel=1e-5)
    assert scores[0].item() == pytest.approx(0.25 * math.exp(-(0 + 0.0625 + 0.25) / 3), rel=1e-5)


# --- HoliTom ------------------------------------------------------------------------------------------------------


def test_static_windows_maximise_the_tokens_saved():
    # static[t, n]: position n similar between frames t and t+1 (5 frames, 3 positions).
    static = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    # [0, 2] keeps 2 positions static over 3 frames (saves 2 x 2 = 4), [3, 4] saves 1: 5 in all; [0, 1] + [3, 4]
    # would save 3 + 1 = 4.
    assert static_windows(static) == [(0, 2), (3, 4)]
    assert static_windows(torch.zeros(3, 3, dtype=torch.bool)) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def holitom_input() -> tuple[torch.Tensor, torch.Tensor]:
    """3 frames x 4 positions: positions 0 and 1 hold still, 2 and 3 turn 90 degrees from frame to frame."""
    frames = torch.zeros(3, 4, 2)
    frames[:, 0], frames[:, 1] = E1, at_angle(30)
    for t in range(3):
        frames[t, 2], frames[t, 3] = at_angle(90 * t + 45), at_angle(90 * t + 60) * 2
    attention = torch.tensor([[0.0, 0.0, 0.5, 0.1], [0.0, 0.0, 0.1, 0.5], [0.0, 0.0, 0.3, 0.2]])
    return frames, attention


def test_holitom_merges_static_positions_and_keeps_attended_dynamic_ones():
    frames, attention = holitom_input()
    groups = static_groups(frames, threshold=0.8, most_saved=12)
    assert [(g.first, g.last, g.position) for g in groups] == [(0, 2, 0), (0, 2, 1)]
    # 12 tokens: 2 static (one per position, at frame 0) + 3 x 2 dynamic. A budget of 5 shares out as
    # 5 x 2/8 = 1.25 static and 1.25 per frame: floors 1, 1, 1, 1 and the one left over to the static piece
    # (the first of the equal fractions). Static: two tokens kept as they are; each frame its most attended one.
    placed = holitom_compress(frames, attention, kept=5, settings=HoliTomSettings())
    assert placed.positions.tolist() == [0, 1, 2, 4 + 3, 8 + 2]
    assert torch.allclose(placed.tokens[0], E1) and torch.allclose(placed.tokens[1], at_angle(30), atol=1e-6)
    assert torch.equal(placed.tokens[2], frames[0, 2])


def test_holitom_never_merges_below_its_budget():
    frames, _ = holitom_input()
    # Saving at most 3 tokens: position 0 merges all three frames (saves 2), position 1 only frames 0-1 (saves 1).
    groups = static_groups(frames, threshold=0.8, most_saved=3)
    assert [(g.first, g.last, g.position) for g in groups] == [(0, 2, 0), (0, 1, 1)]


# --- FastVID ------------------------------------------------------------------------------------------------------


def test_fastvid_budget_split_and_anchor_frames():
    salient, contextual = frame_split(888, 32, 0.4)
    # 888 / 32 = 27.75: 24 frames keep 28 (11 contextual = floor(11.2)), 8 keep 27 (10 = floor(10.8)).
    assert sorted(set(zip(salient, contextual))) == [(17, 10), (17, 11)]
    assert contextual.count(11) == 24 and sum(salient) + sum(contextual) == 888
    assert anchor_frames((0, 5), 4) == [1, 5]  # every 4th frame counted back from the last
    assert anchor_frames((2, 3), 4) == [3]
    assert anchor_frames((7, 7), 4) == [7]


def test_fastvid_keeps_salient_tokens_and_merges_the_segment_into_its_anchor_frame():
    # One segment of 2 frames x 4 tokens; a budget of 4: 2 per frame, 1 salient + 1 contextual (d = 0.5).
    frames = torch.stack([torch.stack([E1, at_angle(80), at_angle(85), at_angle(10)]),
                          torch.stack([at_angle(5), at_angle(88), at_angle(90), E1])])
    attention = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.9]])
    settings = FastVIDSettings(min_segments=1, segment_threshold=-1.0, contextual_share=0.5, anchor_step=4,
                               beta=0.6)
    placed = fastvid_compress(frames, attention, kept=4, settings=settings)
    # Salient: position 0 of frame 0 and 3 of frame 1 (most attended). The only anchor frame is frame 1 (the
    # segment's last), which takes both contextual tokens among its non-salient positions 0, 1, 2: density peaks
    # of 5, 88 and 90 degrees are 88 (densest: its two neighbours are close) and then 5 (farthest from it).
    assert placed.positions.tolist() == [0, 4 + 0, 4 + 1, 4 + 3]
    # Members: the non-salient tokens of both frames, at 80, 85, 10 (frame 0) and 5, 88, 90 (frame 1).
    # Target 88 gathers 80, 85, 88, 90; target 5 gathers 10 and 5. Weights max(1/(n+1), 0.6) = 0.6 both.
    near_88 = torch.stack([at_angle(a) for a in (80, 85, 88, 90)]).mean(dim=0)
    near_5 = torch.stack([at_angle(a) for a in (10, 5)]).mean(dim=0)
    assert torch.allclose(placed.tokens[1], 0.6 * at_angle(5) + 0.4 * near_5, atol=1e-6)
    assert torch.allclose(placed.tokens[2], 0.6 * at_angle(88) + 0.4 * near_88, atol=1e-6)
    assert torch.equal(placed.tokens[0], frames[0, 0]) and torch.equal(placed.tokens[3], frames[1, 3])


# --- VidCom² ------------------------------------------------------------------------------------------------------


def test_vidcom2_gives_the_unique_frame_more_tokens_and_keeps_the_most_distinct():
    # Frames 0 and 1: three tokens along e1, one along e2; frame 2: e2, e2, -e1, e1.
    frames = torch.stack([torch.stack([E1, E1, E1, E2])] * 2 + [torch.stack([E2, E2, -E1, E1])])
    # Video centre (6, 4)/12 -> cos with e1 0.832, with e2 0.555. Uniqueness -mean cos: -0.763 (frames 0, 1),
    # -0.277 (frame 2); softmax at temperature 0.01 is ~(0, 0, 1), so the shares are 1 + sigma - 1/3 =
    # (2/3, 2/3, 5/3), and 7 tokens go (1.56, 1.56, 3.89) -> (2, 1, 4).
    # Frame 0 (centre along (0.949, 0.316)): e2 scores 0.555 + 0.316, e1 0.832 + 0.949: keep e2 and the first e1;
    # frame 1 keeps e2 alone. Frame 2 (centre e2): -e1 scores -0.832, e1 0.832, e2 1.555: with 3 it would keep
    # -e1, e1 and the first e2.
    placed = vidcom2_compress(frames, kept=7, temperature=0.01)
    assert placed.positions.tolist() == [0, 3, 4 + 3, 8 + 0, 8 + 1, 8 + 2, 8 + 3]
    three = vidcom2_compress(frames[2:], kept=3, temperature=0.01)
    assert three.positions.tolist() == [0, 2, 3]


# --- FlashVID -----------------------------------------------------------------------------------------------------


def test_flashvid_selection_maximises_the_attention_weighted_minimum_distance():
    tokens = torch.stack([E1, at_angle(10), E2, -E1])
    # Equal attention: the first pick is the token farthest from its nearest other token: -e1 (nearest e2,
    # 1 - cos = 1); then the token farthest from -e1: e1 (distance 2) before 10 degrees (1.985).
    assert diverse_selection(tokens[None], torch.ones(1, 4), [2])[0].tolist() == [0, 3]
    # With e1 ignored by the vision tower, the 10-degree token takes its place.
    weighted = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert diverse_selection(tokens[None], weighted, [2])[0].tolist() == [1, 3]
    # Frames run side by side: each keeps its own first picks, as if it had run alone.
    both = diverse_selection(torch.stack([tokens, tokens]), torch.cat([torch.ones(1, 4), weighted]), [1, 2])
    assert [picks.tolist() for picks in both] == [[3], [1, 3]]


def test_flashvid_trees_link_similar_tokens_to_the_previous_frame():
    frames = torch.stack([torch.stack([E1, E2]), torch.stack([at_angle(5), -E1]), torch.stack([at_angle(8), E2])])
    rest = [torch.arange(2)] * 3
    # Position 0 drifts by 5 then 3 degrees (cos > 0.8): one tree rooted in frame 0. -e1 has no similar token in
    # frame 0 (e2 at 90 degrees, cos 0) and roots its own tree; frame 2's e2 links to neither (cos 0, -1).
    roots = tree_roots(frames, rest, (0, 2), threshold=0.8, pool=2)
    assert [root.positions.tolist() for root in roots] == [[0, 1], [3], [5]]
    tree = torch.stack([E1, at_angle(5), at_angle(8)]).mean(dim=0)
    assert torch.allclose(roots[0].tokens[0], tree, atol=1e-6)
    # A pool of 5 roots needs one more: only the most similar link of the two (3 degrees, frames 1-2) stays.
    loose = tree_roots(frames, rest, (0, 2), threshold=0.8, pool=5)
    assert sum(root.positions.numel() for root in loose) == 5
    assert [root.positions.tolist() for root in loose] == [[0, 1], [2, 3], [5]]


# --- exact budgets and the registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, references", [(1, ("dycoke",)), (5, ("dycoke", "fastv")), (16, ("dycoke",))])
def test_every_peer_places_exactly_its_budget(frames, references):
    generator = torch.Generator().manual_seed(frames)
    base = torch.randn(1, N, 8, generator=generator)
    video = base + 0.3 * torch.randn(frames, N, 8, generator=generator)  # similar frames: merging happens
    attention = torch.rand(frames, N, generator=generator)
    for name in PEERS:
        for reference in references:
            method = match_budget(name, reference, DyCokeConfig(), frames, N)
            kept = method.kept_total(frames, N)
            assert kept == get_method(reference).budget(DyCokeConfig(), frames, N).attended
            placed = method.place(video, attention, kept)
            assert placed.positions.numel() == kept and bool((placed.positions.diff() > 0).all()), (name, frames)
            assert placed.tokens.shape == (kept, 8)


def test_peer_knobs_are_checked_and_reported():
    with pytest.raises(ConfigError, match=r"fastvid_segments \(FastVID segments c\) must be a whole number"):
        configure("fastvid", fastvid_segments=0)
    with pytest.raises(ConfigError, match="holitom_tau"):
        configure("holitom", holitom_tau=1.5)
    with pytest.raises(ConfigError, match="vidcom2_ratio must be in"):
        configure("vidcom2", vidcom2_ratio=1.0)
    method = configure("flashvid", flashvid_alpha=0.5, match="dycoke")
    assert method.options() == {"flashvid_ratio": 0.75, "flashvid_alpha": 0.5, "flashvid_tau": 0.8,
                                "flashvid_segment_tau": 0.9, "flashvid_segments": 8, "match": "dycoke"}
    for name in PEERS:
        assert {knob.name for knob in get_method(name).knobs()} == set(get_method(name).OPTIONS) - {"match"}


@pytest.mark.parametrize("name", PEERS)
def test_peer_at_no_drop_gives_the_baselines_tokens(name, pipeline, clip8):
    options = dict(max_new_tokens=8, ignore_eos=True)
    baseline = pipeline.answer(clip8, "What moves?", method="baseline", **options)
    unchanged = pipeline.answer(clip8, "What moves?", method=configure(name, **{f"{name}_ratio": 0.0}), **options)
    assert unchanged.token_ids == baseline.token_ids
    assert unchanged.metrics["visual_tokens_attended_mean"] == 8 * N
