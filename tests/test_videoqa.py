"""The synthetic video-QA suite: deterministic, balanced, disjoint splits, and clips that show their answers.

The pixel checks recompute each answer from the frames alone (colours, centroids, lit frames), independently of the
drawing code's own bookkeeping.
"""

from __future__ import annotations

import json
from collections import Counter

import av
import numpy as np
import pytest

from dycoke.videoqa import (
    CHANCE, COLOURS, ORDER_COLOURS, SPLIT_SEEDS, TASKS, TEST_ITEMS_PER_TASK, blank_like, export, is_correct,
    item_seed, items, main, make_item, normalise, reversed_twin,
)


def colour_mask(frame: np.ndarray, name: str) -> np.ndarray:
    return np.all(frame.astype(int) == COLOURS[name], axis=-1)


def test_items_are_deterministic():
    for task in TASKS:
        first, second = make_item("test", task, 7, 16), make_item("test", task, 7, 16)
        assert (first.question, first.answer, first.response, first.id) == (
            second.question, second.answer, second.response, second.id)
        assert np.array_equal(first.frames, second.frames)
        assert first.frames.shape == (16, 384, 384, 3) and first.frames.dtype == np.uint8


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_balanced_in_the_test_split(task):
    suite = [make_item("test", task, i, 8) for i in range(TEST_ITEMS_PER_TASK)]
    answers = Counter(item.answer for item in suite)
    assert len(answers) == (4 if task == "order" else round(1 / CHANCE[task]))
    assert len(set(answers.values())) == 1, answers
    if task == "order":  # the answer is the first-named shape exactly half the time
        first_named = Counter(item.question.split(", the ")[1].split(" or ")[0] == item.answer for item in suite)
        assert first_named[True] == first_named[False]


def test_splits_draw_from_disjoint_seeds():
    seeds = {split: {item_seed(split, task, i) for task in TASKS for i in (0, 1, 999_999)} for split in SPLIT_SEEDS}
    assert not seeds["train"] & seeds["validation"] and not seeds["train"] & seeds["test"]
    assert not seeds["validation"] & seeds["test"]
    assert max(seeds["train"]) < min(seeds["validation"]) and max(seeds["validation"]) < min(seeds["test"])
    with pytest.raises(ValueError, match="index"):
        item_seed("train", "static", 1_000_000)
    assert not np.array_equal(make_item("train", "static", 0, 8).frames, make_item("test", "static", 0, 8).frames)


@pytest.mark.parametrize("task", ["static", "needle", "change", "count"])
def test_the_question_alone_does_not_give_the_answer(task):
    questions = {make_item("test", task, i, 8).question for i in range(12)}
    assert len(questions) == 1  # one wording for every answer of the task


def test_static_the_large_square_has_the_answers_colour():
    for index in range(6):
        item = make_item("test", "static", index, 8)
        area = {name: colour_mask(item.frames[0], name).sum() for name in COLOURS}
        assert max(area, key=area.get) == item.answer
        assert all(np.array_equal(frame, item.frames[0]) for frame in item.frames)


def direction_shown(item) -> str:
    """Which way the named circle's pixels move from the first frame to the last."""
    colour = item.question.split()[-3]
    centres = [np.argwhere(colour_mask(frame, colour)).mean(axis=0) for frame in (item.frames[0], item.frames[-1])]
    dy, dx = centres[1] - centres[0]
    assert max(abs(dx), abs(dy)) > 100
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def test_motion_the_named_circle_moves_the_answers_way():
    for index in range(8):
        item = make_item("test", "motion", index, 16)
        assert direction_shown(item) == item.answer


def first_shape_shown(item) -> str:
    """The shape of `order` whose colour is on screen first."""
    for frame in item.frames:
        shown = [shape for shape, colour in ORDER_COLOURS.items() if colour_mask(frame, colour).sum() > 500]
        if shown:
            return shown[0]
    raise AssertionError("no shape on screen")


def test_reversed_twins_play_the_clip_backwards_and_answer_what_it_then_shows():
    for index in range(8):
        for task, shown in (("motion", direction_shown), ("order", first_shape_shown)):
            item = make_item("train", task, index, 8 + 8 * (index % 3))
            twin = reversed_twin(item)
            assert np.array_equal(twin.frames, item.frames[::-1]) and twin.question == item.question
            assert shown(item) == item.answer and shown(twin) == twin.answer != item.answer
            assert is_correct(twin.response, twin) and not is_correct(item.response, twin)
    for task in ("static", "needle", "count", "change"):
        assert reversed_twin(make_item("train", task, 0, 8)) is None


def test_needle_shows_the_answers_colour_in_one_to_three_frames():
    for index in range(6):
        item = make_item("test", "needle", index, 16)
        shown = [t for t, frame in enumerate(item.frames) if colour_mask(frame, item.answer).sum() > 500]
        assert 1 <= len(shown) <= 3 and shown == list(range(shown[0], shown[-1] + 1))
        assert 0 < shown[0] and shown[-1] < 15
        changed = [t for t in range(16) if not np.array_equal(item.frames[t], item.frames[0])]
        assert changed == shown


@pytest.mark.parametrize("frames", [8, 16, 32])
def test_count_the_light_is_lit_in_as_many_frames_as_the_answer(frames):
    for index in range(4):
        item = make_item("test", "count", index, frames)
        lit = [t for t, frame in enumerate(item.frames) if np.all(frame == 255, axis=-1).sum() > 1000]
        assert len(lit) == int(item.answer)
        assert all(b - a >= 2 for a, b in zip(lit, lit[1:]))  # separate flashes, never two frames running


def test_order_two_separate_appearances_and_the_answer_names_one_of_the_two():
    for index in range(6):
        item = make_item("test", "order", index, 16)
        background = item.frames[0][0, 0]
        busy = [t for t, frame in enumerate(item.frames) if np.any(np.any(frame != background, axis=-1))]
        runs = np.split(busy, np.where(np.diff(busy) > 1)[0] + 1)
        first_run, last_run = item.frames[busy[0]], item.frames[busy[-1]]
        assert not np.array_equal(first_run, last_run)
        assert len(runs) in (1, 2)  # one run when the two showings are back to back
        named = item.question.split(", the ")[1].rstrip("?").split(" or the ")
        assert item.answer in named and item.response == f"the {item.answer} came first"


def test_change_the_last_frame_has_the_answers_background():
    for index in range(6):
        item = make_item("test", "change", index, 16)
        last, first = item.frames[-1], item.frames[0]
        assert colour_mask(last, item.answer).mean() > 0.5
        assert colour_mask(first, item.answer).mean() == 0


def test_scoring_normalises_case_space_and_punctuation():
    item = make_item("test", "static", 0, 8)
    assert item.answer == "red" and item.response == "the square is red"
    assert normalise("  The   Square, is RED! ") == "the square is red"
    for right in ["red", "Red.", "the square is red", "The square is red."]:
        assert is_correct(right, item)
    for wrong in ["blue", "the square is blue", "red square", ""]:
        assert not is_correct(wrong, item)


def test_blank_clips_keep_the_question_and_lose_the_picture():
    item = make_item("test", "needle", 0, 8)
    blank = blank_like(item)
    assert blank.question == item.question and blank.answer == item.answer
    assert np.all(blank.frames == 128) and blank.frames.shape == item.frames.shape


def test_split_listing_and_bad_arguments():
    listed = list(items("validation", 8, per_task=2, tasks=("static", "count")))
    assert [i.id for i in listed] == ["validation-static-00000-f8", "validation-static-00001-f8",
                                      "validation-count-00000-f8", "validation-count-00001-f8"]
    with pytest.raises(ValueError, match="split"):
        make_item("dev", "static", 0, 8)
    with pytest.raises(ValueError, match="task"):
        make_item("test", "colour", 0, 8)
    with pytest.raises(ValueError, match="num_frames"):
        make_item("test", "static", 0, 4)


def test_export_writes_mp4_files_and_items_jsonl(tmp_path):
    assert main(["export", str(tmp_path), "--split", "test", "--frames", "8", "--frames-per-second", "8",
                 "--per-task", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == list(TASKS)
    assert set(records[0]) == {"id", "task", "video", "question", "answer", "response", "frames"}
    static = records[0]
    with av.open(str(tmp_path / static["video"])) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == static["frames"] == 8
    expected = make_item("test", "static", 0, 8).frames[0]
    inside = colour_mask(expected, static["answer"])
    assert np.abs(decoded[0][inside].astype(int) - COLOURS[static["answer"]]).mean() < 12  # colours survive H.264
    assert main(["export", str(tmp_path), "--frames", "4"]) == 1


def test_export_returns_the_count(tmp_path):
    assert export(tmp_path / "two", "validation", 8, 4, per_task=2) == 2 * len(TASKS)
