"""Why DyCoke at K = 0.3 fails on the trained `tiny` model: a probe of the visual token count, not of TTM's choice.

    nice -n 10 python scripts/probe_ttm_length.py            # a few minutes on two busy cores
    python scripts/probe_ttm_length.py --model R2 --tasks 8  # per task, TTM's positions against none

For a `static` test item (16 identical frames) it prints the teacher-forced margin of the right colour word after
"the square is" (gold logit minus the best other logit; below 0 the answer is wrong), for:
1. TTM's own mask at several K, with the pipeline's contiguous positions and with the positions the kept tokens have
   in the uncompressed layout (holes where tokens were dropped);
2. masks that are not TTM's at all: anchors whole and every other frame a prefix of n tokens, for n around 137.

With `--tasks N` it scores instead the first N items (of `--split`, test by default) of `motion`, `needle` and
`count` (or the tasks of `--task-names`) at 16 frames: how many have a positive margin (the answer word wins once
the rest of the sentence is given) with every token, with every token but each frame's tokens in a random order (can
the model tell where a patch is from the token alone?), with TTM's tokens at the pipeline's contiguous positions, and
with TTM's tokens at their uncompressed positions.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.config import DyCokeConfig  # noqa: E402
from dycoke.eval import item_clip  # noqa: E402
from dycoke.methods import Method  # noqa: E402
from dycoke.models import load  # noqa: E402
from dycoke.pipeline import Pipeline  # noqa: E402
from dycoke.train import shuffled_within_frames  # noqa: E402
from dycoke.ttm import temporal_keep_mask  # noqa: E402
from dycoke.videoqa import make_item  # noqa: E402


class FixedMask(Method):
    """Keeps what `choose(frame_tokens)` says: a bool [T, N] mask."""

    name = "fixed-mask"
    summary = "a given keep mask"

    def __init__(self, choose) -> None:
        self.choose = choose

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        return self.choose(frame_features)


def prefixes(per_frame: int, window: int = 4):
    """Anchors whole, every other frame its first `per_frame` positions."""
    def choose(features: torch.Tensor) -> torch.Tensor:
        frames, tokens, _ = features.shape
        mask = torch.zeros(frames, tokens, dtype=torch.bool)
        mask[:, :per_frame] = True
        mask[torch.arange(frames) % window == 0] = True
        return mask
    return choose


def margin(pipeline: Pipeline, item, method: Method, positions: str = "compact") -> tuple[str, float, int]:
    """(top word, gold margin, visual tokens) after the teacher-forced words before the answer ("the square is").

    `positions`: "compact" (the pipeline's), "original" (each kept token at its uncompressed position) or
    "shuffled" (every frame's tokens in a random order of their own, `train.shuffled_within_frames`)."""
    model, tokenizer = pipeline.loaded.model, pipeline.loaded.tokenizer
    before, after = pipeline.loaded.family.prompt_ids(tokenizer, item.question)
    with torch.inference_mode():
        prepared = pipeline.prepare(item_clip(item), (before, after), method, DyCokeConfig())
        forced = tokenizer(item.response[:item.response.rindex(item.answer)], add_special_tokens=False).input_ids
        embeds = torch.cat([prepared.embeds, model.get_input_embeddings()(torch.tensor([forced]))], dim=1)
        mask = prepared.keep_mask.flatten()
        length, visual, start = embeds.shape[1], int(mask.sum()), len(before)
        if positions == "shuffled":
            span = slice(start, start + visual + 1)  # the frames' tokens and the newline token after them
            embeds[0, span] = shuffled_within_frames(random.Random(item.id), embeds[0, span],
                                                     prepared.keep_mask.shape[0])
        if positions in ("compact", "shuffled"):  # what the pipeline feeds (DESIGN.md 2.1: one contiguous run)
            position_ids = torch.arange(length)
        else:  # each kept token where it sits in the uncompressed prompt
            tail = start + mask.numel()
            position_ids = torch.cat([torch.arange(start), start + mask.nonzero()[:, 0],
                                      torch.arange(tail, tail + length - start - visual)])
        logits = model(inputs_embeds=embeds, position_ids=position_ids[None]).logits[0, -1]
    gold = tokenizer(item.answer, add_special_tokens=False).input_ids[0]
    others = logits.clone()
    others[gold] = -torch.inf
    return tokenizer.decode([int(logits.argmax())]), round(float(logits[gold] - others.max()), 2), visual


def ttm_at(ratio: float) -> FixedMask:
    return FixedMask(lambda features: temporal_keep_mask(features, ratio, 4))


def every_token(features: torch.Tensor) -> torch.Tensor:
    return torch.ones(features.shape[:2], dtype=torch.bool)


def score_tasks(pipeline: Pipeline, per_task: int, split: str = "test",
                tasks: tuple[str, ...] = ("motion", "needle", "count")) -> None:
    ttm = ttm_at(0.7)
    variants = {"every token": (FixedMask(every_token), "compact"),
                "every token, shuffled within frames": (FixedMask(every_token), "shuffled"),
                "TTM, contiguous": (ttm, "compact"), "TTM, uncompressed positions": (ttm, "original")}
    for task in tasks:
        right = dict.fromkeys(variants, 0)
        for index in range(per_task):
            item = make_item(split, task, index, 16)
            for name, (method, positions) in variants.items():
                right[name] += margin(pipeline, item, method, positions)[1] > 0
        print(task, ", ".join(f"{name}: {count}/{per_task}" for name, count in right.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or a checkpoint directory")
    parser.add_argument("--tasks", type=int, default=0, metavar="N", help="score N items per temporal task")
    parser.add_argument("--split", default="test", help="the suite's split for --tasks (default test)")
    parser.add_argument("--task-names", default="motion,needle,count", help="the tasks --tasks scores")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = Pipeline(load(args.model))
    if args.tasks:
        return score_tasks(pipeline, args.tasks, args.split, tuple(args.task_names.split(",")))
    item = make_item("test", "static", 0, 16)
    print(f"{item.id}: {item.question} -> {item.answer}")
    for ratio in (0.25, 0.3, 0.35, 0.5):
        ttm = ttm_at(ratio)
        for positions in ("compact", "original"):
            print(f"TTM K={ratio} {positions:8s} positions:", margin(pipeline, item, ttm, positions), flush=True)
    for per_frame in (135, 136, 137, 138, 139):
        print(f"prefixes of {per_frame}:", margin(pipeline, item, FixedMask(prefixes(per_frame))), flush=True)


if __name__ == "__main__":
    main()
