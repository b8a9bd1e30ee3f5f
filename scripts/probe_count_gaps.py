"""Where TTM costs `count`: right answers and undercounts, grouped by how many pairs of flashes are two frames apart.

    python scripts/probe_count_gaps.py --model assets/models/tiny-next --items 32 --split validation

Flashes in the suite are single frames at odd indices, so the closest two can be is two frames apart. With every
token, two such flashes are two frames (392 positions) apart in the language model's sequence; under TTM's contiguous
run, where a non-anchor frame keeps 58 tokens, they come within about 70 positions of each other. The table shows
whether the model's errors under TTM follow that: items whose flashes are never two frames apart against items with
one pair or more. Items with one flash are left out (nothing to merge).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.config import DyCokeConfig  # noqa: E402
from dycoke.eval import pipeline_predictor, resolve_method  # noqa: E402
from dycoke.models import load  # noqa: E402
from dycoke.pipeline import Pipeline  # noqa: E402
from dycoke.videoqa import Item, items  # noqa: E402

METHODS = ("baseline", "ttm")


def flash_frames(item: Item) -> list[int]:
    """The frames that differ from the first, which is never a flash."""
    frames = np.asarray(item.frames, dtype=np.int16)
    return [t for t in range(len(frames)) if np.any(frames[t] != frames[0])]


def said_count(answer: str) -> str:
    words = answer.split()  # "it flashes 3 times"
    return words[2] if len(words) > 2 else answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or a checkpoint directory")
    parser.add_argument("--items", type=int, default=32, help="the first N `count` items of the split")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = Pipeline(load(args.model))
    predictors = {name: pipeline_predictor(pipeline, resolve_method(name, None), DyCokeConfig()) for name in METHODS}
    groups: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for item in items(args.split, args.frames, args.items, ("count",)):
        if item.answer == "1":
            continue
        close_pairs = int(np.sum(np.diff(flash_frames(item)) == 2))
        group = groups[min(close_pairs, 2)]
        group["items"] += 1
        for name, predict in predictors.items():
            said = said_count(predict(item).text)
            group[f"{name} right"] += said == item.answer
            group[f"{name} under"] += said.isdigit() and int(said) < int(item.answer)
    print("| pairs two frames apart | items | " + " | ".join(f"{m} right | {m} under" for m in METHODS) + " |")
    print("|---" * (2 + 2 * len(METHODS)) + "|")
    for pairs in sorted(groups):
        row = groups[pairs]
        cells = [f"{row[f'{m} right']} | {row[f'{m} under']}" for m in METHODS]
        label = "2 or more" if pairs == 2 else str(pairs)
        print(f"| {label} | {row['items']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
