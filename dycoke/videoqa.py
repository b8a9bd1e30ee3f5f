"""A synthetic video-QA suite whose answers can be scored exactly: clips of shapes drawn with PIL.

Every item is deterministic from (split, task, index, frames): the same call always draws the same clip and asks
the same question. Answers are balanced inside each task (the answer of item i is option i mod n), and the three
splits draw from disjoint seed ranges.

    python -m dycoke.videoqa export DIR --split test --frames 16 --frames-per-second 8
    python -m dycoke.videoqa examples assets/examples     # the app's example clips
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FRAME_SIZE = 384
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("square", "circle", "triangle", "star")
DIRECTIONS = ("left", "right", "up", "down")
COUNTS = ("1", "2", "3", "4")
TASKS = ("static", "motion", "needle", "count", "order", "change")
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}  # disjoint: at most 10M items a split
TEST_ITEMS_PER_TASK = 120  # divisible by 2, 4 and 6: every task's answers are exactly balanced
# The order task draws each shape in its own colour, so that it tests temporal order rather than the recognition of
# a shape's outline from a few 27-pixel tokens, which a one-layer vision tower barely learns.
ORDER_COLOURS = {"square": "blue", "circle": "green", "triangle": "red", "star": "yellow"}
EVIDENCE_TASKS = ("motion", "needle", "count", "order")  # where `evidence_mask` marks the answer's tokens
LIGHT_SIZE = 112  # the count task's light: one size, so every flash lights the same number of tokens
# Chance accuracy of a model that sees no video and knows the answer set of each task.
CHANCE = {"static": 1 / 6, "motion": 1 / 4, "needle": 1 / 6, "count": 1 / 4, "order": 1 / 2, "change": 1 / 6}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
MOTION_RESPONSE = "it moves {}"
ORDER_QUESTION = "Which appeared first, the {} or the {}?"
ORDER_RESPONSE = "the {} came first"


@dataclass(frozen=True)
class Item:
    id: str
    task: str
    question: str
    answer: str  # the short answer, e.g. "red"
    response: str  # the sentence the trained model says, e.g. "the square is red"; also scored as correct
    frames: np.ndarray  # uint8 [T, 384, 384, 3]

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def record(self, video: str) -> dict:
        """The line of items.jsonl for this item."""
        return {"id": self.id, "task": self.task, "video": video, "question": self.question,
                "answer": self.answer, "response": self.response, "frames": self.num_frames}


def normalise(text: str) -> str:
    """Lower case, punctuation removed, runs of white space collapsed."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return re.sub(r"\s+", " ", text).strip()


def is_correct(prediction: str, item: Item | dict) -> bool:
    """Exact match, after normalising, with the short answer or with the suite's sentence form of it."""
    answer, response = (item.answer, item.response) if isinstance(item, Item) else (item["answer"], item["response"])
    return normalise(prediction) in {normalise(answer), normalise(response)}


def item_seed(split: str, task: str, index: int) -> int:
    """The seed item `index` of `task` is drawn from: each split owns 10M seeds, each task 1M of them."""
    if not 0 <= index < 1_000_000:
        raise ValueError(f"index must be in 0..999999, got {index}")
    return SPLIT_SEEDS[split] + TASKS.index(task) * 1_000_000 + index


def make_item(split: str, task: str, index: int, num_frames: int) -> Item:
    """Item `index` of `task` in `split`, drawn with `num_frames` frames."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 8 <= num_frames <= 256:
        raise ValueError(f"num_frames must be in 8..256, got {num_frames}")
    rng = np.random.default_rng(item_seed(split, task, index))
    question, answer, response, frames = _DRAWERS[task](rng, index, num_frames)
    return Item(f"{split}-{task}-{index:05d}-f{num_frames}", task, question, answer, response, frames)


def items(split: str, num_frames: int, per_task: int | None = None, tasks: tuple[str, ...] = TASKS,
          first: int = 0) -> Iterator[Item]:
    """The split's items `first` to `first + per_task - 1`, task by task (TEST_ITEMS_PER_TASK unless told)."""
    count = per_task if per_task is not None else TEST_ITEMS_PER_TASK
    for task in tasks:
        for index in range(first, first + count):
            yield make_item(split, task, index, num_frames)


def blank_like(item: Item) -> Item:
    """The same question with every frame a uniform mid grey: what the model answers without the video."""
    return Item(item.id + "-blank", item.task, item.question, item.answer, item.response,
                np.full_like(item.frames, 128))


def reversed_twin(item: Item) -> Item | None:
    """The item's clip played backwards with the answer that clip has, where the suite can say it: the circle of
    `motion` then moves the opposite way, and in `order` the other shape comes first. None for the other tasks.

    A pair that differs only in the order of its frames is what training needs to learn the direction of time:
    every single-frame cue (where the circle starts, which shapes are on screen) is the same in both."""
    if item.task == "motion":
        answer = OPPOSITE[item.answer]
        response = MOTION_RESPONSE.format(answer)
    elif item.task == "order":
        named = re.fullmatch(ORDER_QUESTION.format(r"(\w+)", r"(\w+)").replace("?", r"\?"), item.question).groups()
        answer = named[1] if named[0] == item.answer else named[0]
        response = ORDER_RESPONSE.format(answer)
    else:
        return None
    return Item(item.id + "-reversed", item.task, item.question, answer, response, item.frames[::-1].copy())


def evidence_mask(frames: np.ndarray, grid: int = 14, threshold: int = 24) -> np.ndarray:
    """bool [T, grid*grid]: the token cells where a frame differs from the clip's per-pixel median frame.

    The median is the scene the clip mostly shows, so in the tasks of EVIDENCE_TASKS these cells are where the
    answer lives: the flash of `needle` and `count`, the moving circle, the two shapes of `order`. (`static` has
    none, and in `change` they mark whichever side of the cut is shorter.) The cells are the language model's
    visual tokens, which pool the frame on a `grid` x `grid` lattice, row by row.
    """
    median = np.median(frames, axis=0)
    changed = (np.abs(frames.astype(np.int16) - median).max(axis=-1) > threshold)  # [T, H, W]
    edges = np.linspace(0, frames.shape[1], grid + 1).round().astype(int)
    cells = np.zeros((frames.shape[0], grid, grid), dtype=bool)
    for row in range(grid):
        for column in range(grid):
            block = changed[:, edges[row]:edges[row + 1], edges[column]:edges[column + 1]]
            cells[:, row, column] = block.any(axis=(1, 2))
    return cells.reshape(frames.shape[0], grid * grid)

# --- drawing ----------------------------------------------------------------------------------------------------


class _Canvas:
    """One frame: a background colour and shapes drawn over it."""

    def __init__(self, background: tuple[int, int, int]) -> None:
        self.image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), background)
        self.draw = ImageDraw.Draw(self.image)

    def shape(self, kind: str, centre: tuple[float, float], size: float, colour: tuple[int, int, int]) -> None:
        x, y = centre
        half = size / 2
        if kind == "square":
            self.draw.rectangle([x - half, y - half, x + half, y + half], fill=colour)
        elif kind == "circle":
            self.draw.ellipse([x - half, y - half, x + half, y + half], fill=colour)
        elif kind == "triangle":
            self.draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=colour)
        elif kind == "star":
            points = []
            for k in range(10):
                radius = half if k % 2 == 0 else half * 0.42
                angle = -math.pi / 2 + k * math.pi / 5
                points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
            self.draw.polygon(points, fill=colour)
        else:
            raise ValueError(f"unknown shape {kind!r}")

    def array(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)


def _dark(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(15, 60, 3))


def _grey(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(70, 200))
    return (level, level, level)


def _place(rng: np.random.Generator, size: float, taken: list[tuple[float, float, float]],
           margin: float = 8) -> tuple[float, float]:
    """A centre where a shape of `size` fits inside the frame and, if possible, overlaps no shape in `taken`."""
    low, high = size / 2 + margin, FRAME_SIZE - size / 2 - margin
    for _ in range(50):
        x, y = rng.uniform(low, high, 2)
        if all(math.hypot(x - ox, y - oy) > (size + osize) / 2 + margin for ox, oy, osize in taken):
            break
    taken.append((x, y, size))
    return float(x), float(y)


def _scene(rng: np.random.Generator, background: tuple[int, int, int], shapes: list[tuple]) -> np.ndarray:
    canvas = _Canvas(background)
    for kind, centre, size, colour in shapes:
        canvas.shape(kind, centre, size, colour)
    return canvas.array()


def _other_colours(rng: np.random.Generator, excluded: str, count: int) -> list[str]:
    names = [name for name in COLOURS if name != excluded]
    return [names[i] for i in rng.choice(len(names), count, replace=count > len(names))]


def _draw_static(rng: np.random.Generator, index: int, num_frames: int) -> tuple:
    colour = list(COLOURS)[index % len(COLOURS)]
    taken: list = []
    size = rng.uniform(120, 170)
    shapes = [("square", _place(rng, size, taken), size, COLOURS[colour])]
    for other in _other_colours(rng, colour, int(rng.integers(2, 5))):
        small = rng.uniform(30, 55)
        shapes.append((str(rng.choice(["circle", "triangle"])), _place(rng, small, taken), small, COLOURS[other]))
    frame = _scene(rng, _dark(rng), shapes)
    return ("What colour is the large square?", colour, f"the square is {colour}",
            np.repeat(frame[None], num_frames, axis=0))


def _draw_motion(rng: np.random.Generator, index: int, num_frames: int) -> tuple:
    direction = DIRECTIONS[index % len(DIRECTIONS)]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = _dark(rng)
    size = rng.uniform(60, 90)
    travel = rng.uniform(150, 230)
    low, high = size / 2 + 8, FRAME_SIZE - size / 2 - 8
    along = rng.uniform(low, high - travel)  # start on the axis of motion, so the whole path fits
    across = rng.uniform(low, high)
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    start = along if step[0] + step[1] > 0 else along + travel
    taken: list = []
    distractors = []
    for other in _other_colours(rng, colour, int(rng.integers(1, 3))):
        small = rng.uniform(30, 50)
        distractors.append(("square", _place(rng, small, taken), small, COLOURS[other]))
    frames = []
    for t in range(num_frames):
        position = start + (step[0] + step[1]) * travel * t / (num_frames - 1)
        centre = (position, across) if step[0] else (across, position)
        frames.append(_scene(rng, background, distractors + [("circle", centre, size, COLOURS[colour])]))
    return (f"Which way does the {colour} circle move?", direction, MOTION_RESPONSE.format(direction),
            np.stack(frames))


def _busy_background(rng: np.random.Generator, background: tuple[int, int, int]) -> tuple[list, list]:
    taken: list = []
    shapes = []
    for _ in range(int(rng.integers(8, 14))):
        size = rng.uniform(25, 60)
        shapes.append((str(rng.choice(SHAPES)), _place(rng, size, taken), size, _grey(rng)))
    return shapes, taken


def _draw_needle(rng: np.random.Generator, index: int, num_frames: int) -> tuple:
    colour = list(COLOURS)[index % len(COLOURS)]
    background = _dark(rng)
    scene, taken = _busy_background(rng, background)
    length = int(rng.integers(1, 4))
    start = int(rng.integers(1, num_frames - length))  # never the first or the last frame
    size = rng.uniform(70, 110)
    needle = (str(rng.choice(SHAPES)), _place(rng, size, taken, margin=0), size, COLOURS[colour])
    plain = _scene(rng, background, scene)
    flashed = _scene(rng, background, scene + [needle])
    frames = np.repeat(plain[None], num_frames, axis=0)
    frames[start:start + length] = flashed
    return ("What colour was the shape that flashed?", colour, f"it was {colour}", frames)


def _draw_count(rng: np.random.Generator, index: int, num_frames: int) -> tuple:
    count = int(COUNTS[index % len(COUNTS)])
    background = _dark(rng)
    scene, taken = _busy_background(rng, background)
    light = ("circle", _place(rng, LIGHT_SIZE, taken, margin=0), LIGHT_SIZE, (255, 255, 255))
    # Flash frames are single frames, at least one frame apart, never the first frame.
    slots = np.arange(1, num_frames, 2)
    flashes = np.sort(rng.choice(slots, count, replace=False))
    plain = _scene(rng, background, scene)
    lit = _scene(rng, background, scene + [light])
    frames = np.repeat(plain[None], num_frames, axis=0)
    frames[flashes] = lit
    times = "time" if count == 1 else "times"
    return ("How many times does the light flash?", str(count), f"it flashes {count} {times}", frames)


def _draw_order(rng: np.random.Generator, index: int, num_frames: int) -> tuple:
    first = SHAPES[index % len(SHAPES)]
    second = str(rng.choice([shape for shape in SHAPES if shape != first]))
    named = (first, second) if (index // len(SHAPES)) % 2 == 0 else (second, first)
    background = _dark(rng)
    taken: list = []
    shown = []
    for kind in (first, second):
        size = rng.uniform(100, 140)
        shown.append((kind, _place(rng, size, taken), size, COLOURS[ORDER_COLOURS[kind]]))
    # Each shape is on screen for a quarter to a third of the clip; the first leaves before the second comes.
    length = int(rng.integers(max(2, num_frames // 4), max(3, num_frames // 3) + 1))
    gap = int(rng.integers(0, num_frames - 2 * length + 1))
    start_first = int(rng.integers(0, num_frames - 2 * length - gap + 1))
    start_second = start_first + length + gap
    empty = _scene(rng, background, [])
    frames = np.repeat(empty[None], num_frames, axis=0)
    frames[start_first:start_first + length] = _scene(rng, background, [shown[0]])
    frames[start_second:start_second + length] = _scene(rng, background, [shown[1]])
    return (ORDER_QUESTION.format(*named), first, ORDER_RESPONSE.format(first), frames)


def _draw_change(rng: np.random.Generator, index: int, num_frames: int) -> tuple:
    final = list(COLOURS)[index % len(COLOURS)]
    initial = _other_colours(rng, final, 1)[0]
    taken: list = []
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        size = rng.uniform(40, 80)
        shapes.append((str(rng.choice(SHAPES)), _place(rng, size, taken), size, _grey(rng)))
    cut = int(rng.integers(round(0.3 * num_frames), round(0.7 * num_frames) + 1))
    before = _scene(rng, COLOURS[initial], shapes)
    after = _scene(rng, COLOURS[final], shapes)
    frames = np.repeat(before[None], num_frames, axis=0)
    frames[cut:] = after
    return ("What colour is the background at the end?", final, f"the background is {final}", frames)


_DRAWERS = {
    "static": _draw_static, "motion": _draw_motion, "needle": _draw_needle,
    "count": _draw_count, "order": _draw_order, "change": _draw_change,
}


def vocabulary() -> list[str]:
    """Every word and punctuation mark the suite's questions and responses use, for a word-level tokenizer."""
    words = set(COLOURS) | set(SHAPES) | set(DIRECTIONS) | set(COUNTS)
    sentences = [
        "what colour is the large square ?", "which way does the circle move ?", "it moves",
        "what colour was the shape that flashed ?", "it was", "how many times does the light flash ?",
        "it flashes time times", "which appeared first , the or the ?", "came first",
        "what colour is the background at the end ?", "the background is", "the square is",
    ]
    for sentence in sentences:
        words.update(sentence.split())
    return sorted(words)


# --- export -----------------------------------------------------------------------------------------------------


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """H.264 at high quality (CRF 12), so the colours survive for any model that reads the file."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def export(directory: Path, split: str, num_frames: int, fps: int, per_task: int | None = None) -> int:
    """Write the split as MP4 files and DIR/items.jsonl; returns the number of items written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    with (directory / "items.jsonl").open("w") as index:
        for item in items(split, num_frames, per_task):
            name = f"{item.id}.mp4"
            write_mp4(item.frames, directory / name, fps)
            index.write(json.dumps(item.record(name)) + "\n")
            written += 1
    return written


# The app's examples: test items of the tasks the trained `tiny` model has learned, which it answers correctly with
# every token and with DyCoke (checked by tests/test_tiny_model.py through the MP4 files, as the app reads them).
# `change` was item 3 until 2026-12-05; under DyCoke the current `tiny` calls its background orange (README, Accuracy).
EXAMPLES = (("static", 0), ("needle", 2), ("change", 4))
EXAMPLE_FRAMES = 16


def write_examples(directory: Path, fps: int = 8) -> list[dict]:
    """The app's example clips as MP4 files plus examples.json: video, question, answer, task."""
    directory.mkdir(parents=True, exist_ok=True)
    listed = []
    for task, index in EXAMPLES:
        item = make_item("test", task, index, EXAMPLE_FRAMES)
        write_mp4(item.frames, directory / f"{task}.mp4", fps)
        listed.append({"video": f"{task}.mp4", "question": item.question, "answer": item.answer,
                       "response": item.response, "task": task, "id": item.id})
    (directory / "examples.json").write_text(json.dumps(listed, indent=1) + "\n")
    return listed


def read_examples(directory: Path) -> list[tuple[Path, str]]:
    """(video path, question) of each example written by `write_examples`; none if the folder has none."""
    listing = directory / "examples.json"
    if not listing.is_file():
        return []
    return [(directory / entry["video"], entry["question"]) for entry in json.loads(listing.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dycoke.videoqa", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write a split as MP4 files plus items.jsonl")
    out.add_argument("directory", type=Path)
    out.add_argument("--split", choices=list(SPLIT_SEEDS), default="test")
    out.add_argument("--frames", type=int, default=16, help="frames per clip, 8..256 (default 16)")
    out.add_argument("--frames-per-second", type=int, default=8, help="frame rate of the MP4 files (default 8)")
    out.add_argument("--per-task", type=int, default=None,
                     help=f"items per task (default {TEST_ITEMS_PER_TASK})")
    examples = commands.add_parser("examples", help="write the app's example clips and examples.json")
    examples.add_argument("directory", type=Path, nargs="?", default=Path("assets/examples"))
    args = parser.parse_args(argv)
    if args.command == "examples":
        print(f"wrote {len(write_examples(args.directory))} examples to {args.directory}")
        return 0
    if not 8 <= args.frames <= 256 or args.frames_per_second < 1 or (args.per_task is not None and args.per_task < 1):
        print("error: --frames must be in 8..256, --frames-per-second and --per-task at least 1", file=sys.stderr)
        return 1
    count = export(args.directory, args.split, args.frames, args.frames_per_second, args.per_task)
    print(f"wrote {count} items to {args.directory / 'items.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
