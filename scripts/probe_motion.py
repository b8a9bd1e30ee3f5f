"""Why the trained `tiny` model does not learn `motion`: what its visual tokens say about where things are.

    python scripts/probe_motion.py positions assets/models/tiny             # linear probe of position, ~1 min
    python scripts/probe_motion.py positions assets/models/tiny --rms 1.5   # the same after a sine-cosine reset
    python scripts/probe_motion.py answers assets/models/tiny --frames 16   # which way it says, axis and sign
    python scripts/probe_motion.py probabilities assets/models/tiny --frames 8   # each direction word's probability

`positions` fits a least-squares map from each visual token's features (what the language model receives) to the
token's row and column on the 14 x 14 grid, on three quarters of the tokens of 12 validation `motion` clips, and
prints R^2 on the other quarter, for all tokens and for the moving circle's tokens (`videoqa.evidence_mask`). It
also prints the RMS of the vision tower's patch embedding output and of its position table. `answers` tabulates
the model's replies on validation `motion` items: right, and right about the axis (horizontal or vertical).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.models import IMAGE_SIZE  # noqa: E402
from dycoke.train import Batch, build_word_tokenizer, greedy_response, set_sincos_positions  # noqa: E402
from dycoke.video import to_pixel_values  # noqa: E402
from dycoke.videoqa import DIRECTIONS, evidence_mask, make_item, normalise  # noqa: E402

AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}


def visual_tokens(model, frames: np.ndarray) -> np.ndarray:
    pixels = to_pixel_values(frames, IMAGE_SIZE)[None]
    with torch.no_grad():
        features = model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output[0]
    return features[:-1].numpy()  # the newline token last


def held_out_r2(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    order = np.random.default_rng(0).permutation(len(features))
    train, test = order[: len(order) * 3 // 4], order[len(order) * 3 // 4:]
    design = np.c_[features, np.ones(len(features))]
    weights = np.linalg.lstsq(design[train], targets[train], rcond=None)[0]
    residual = design[test] @ weights - targets[test]
    return 1 - (residual ** 2).sum(0) / ((targets[test] - targets[test].mean(0)) ** 2).sum(0)


def positions(model, clips: int = 12, frames: int = 8) -> None:
    grid = np.stack(np.meshgrid(np.arange(14), np.arange(14), indexing="ij"), -1).reshape(-1, 2)
    features, cells, circle = [], [], []
    for index in range(clips):
        item = make_item("validation", "motion", index, frames)
        features.append(visual_tokens(model, item.frames))
        cells.append(np.tile(grid, (frames, 1)))
        circle.append(evidence_mask(item.frames).reshape(-1))
    features, cells, circle = np.concatenate(features), np.concatenate(cells).astype(float), np.concatenate(circle)
    embeddings = model.model.vision_tower.embeddings
    pixels = to_pixel_values(make_item("validation", "motion", 0, 8).frames[:1], IMAGE_SIZE)
    with torch.no_grad():
        patch_rms = embeddings.patch_embedding(pixels).pow(2).mean().sqrt().item()
        table_rms = embeddings.position_embedding.weight.pow(2).mean().sqrt().item()
    print(f"patch embedding output RMS {patch_rms:.2f}, position table RMS {table_rms:.3f}")
    print("held-out R^2 of (row, column): all tokens {:.3f} {:.3f}, circle tokens {:.3f} {:.3f} ({} of them)".format(
        *held_out_r2(features, cells), *held_out_r2(features[circle], cells[circle]), int(circle.sum())))


def answers(model, frames: int, count: int) -> None:
    tokenizer = build_word_tokenizer()
    said = Counter()
    for index in range(count):
        item = make_item("validation", "motion", index, frames)
        said[(item.answer, normalise(greedy_response(model, tokenizer, item)).split()[-1])] += 1
    right = sum(n for (answer, reply), n in said.items() if reply == answer)
    axis = sum(n for (answer, reply), n in said.items() if AXIS.get(reply) == AXIS[answer])
    print(f"{count} items at {frames} frames: right {right / count:.0%} (chance 25%), axis right {axis / count:.0%} "
          f"(chance 50%)")
    print("answer -> reply:", ", ".join(f"{a}->{r} {n}" for (a, r), n in sorted(said.items())))


def probabilities(model, frames: int, count: int) -> None:
    """The language model's probability of each direction word where the reply names it, by the clip's direction:
    which axis and which sign it has learned, before greedy decoding hides it."""
    tokenizer = build_word_tokenizer()
    word_ids = [tokenizer.convert_tokens_to_ids(word) for word in DIRECTIONS]
    by_answer: dict[str, list[np.ndarray]] = {direction: [] for direction in DIRECTIONS}
    for index in range(count):
        item = make_item("validation", "motion", index, frames)
        batch = Batch(model, tokenizer, [item])
        with torch.no_grad():
            logits = batch.logits(model)
        where = batch.targets[0].tolist().index(tokenizer.convert_tokens_to_ids(item.answer))
        by_answer[item.answer].append(logits[where].softmax(-1)[word_ids].numpy())
    print(f"{count} items at {frames} frames; mean probability of each word, by the clip's direction:")
    print("clip   " + " ".join(f"{word:>6}" for word in DIRECTIONS))
    for direction, rows in by_answer.items():
        print(f"{direction:<6} " + " ".join(f"{p:6.2f}" for p in np.mean(rows, axis=0)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["positions", "answers", "probabilities"])
    parser.add_argument("model", type=Path, help="a checkpoint directory")
    parser.add_argument("--rms", type=float, default=None, help="reset the position table to sine-cosine first")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--items", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.rms is not None:
        set_sincos_positions(model, args.rms)
    if args.probe == "positions":
        positions(model)
    elif args.probe == "answers":
        answers(model, args.frames, args.items)
    else:
        probabilities(model, args.frames, args.items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
