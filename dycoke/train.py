"""Train the embedded `tiny` model from scratch on the synthetic video-QA suite, on a CPU.

    python -m dycoke.train --out assets/models/tiny --minutes 75

The model is a LLaVA-OneVision built from a config with the real classes and geometry (SigLIP at 384 px,
patch 14, the projector, 2x2 bilinear pooling to 196 tokens per frame, the newline token) and a small Qwen2
language model with a word-level tokenizer. Every example goes through the same prompt as the pipeline
(`encode_prompt`: system turn, the frame tokens, the newline token, the question, the assistant turn), and the
loss is on the response tokens only. Training is plain: no compression method is ever applied, so whatever
DyCoke keeps of the accuracy it keeps without having been trained for it. The two options that touch what
pruning touches never remove a token and follow no method's choice of tokens: `--position-thinning` gives some
batches' visual tokens sparser position ids (`thinned_positions`), and `--frame-shuffle` puts some batches'
tokens in a random order within each frame (`shuffled_within_frames`), so that the model cannot read where a
patch is from its rotary position alone and has to read it from the token (docs/motion-finding.md, sections 8-9).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from tqdm import tqdm
from transformers import (
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from dycoke.models import IMAGE_SIZE, QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS, llava_onevision_config
from dycoke.pipeline import encode_prompt
from dycoke.video import to_pixel_values
from dycoke.videoqa import TASKS, Item, is_correct, make_item, reversed_twin, vocabulary

log = logging.getLogger(__name__)

SYSTEM_WORDS = ["system", "you", "are", "a", "helpful", "assistant", ".", "user", "\n"]
UNKNOWN = "[UNK]"
TEXT_SIZES = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2)
VISION_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)


@dataclass(frozen=True)
class TrainSettings:
    minutes: float = 75.0  # wall-clock budget; training stops at the first step past it
    max_steps: int = 100_000
    batch_size: int = 4
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    frame_mix: tuple[tuple[int, float], ...] = ((8, 0.45), (16, 0.4), (32, 0.15))
    eval_every: int = 150
    eval_items: int = 8  # per task, validation split, 16 frames
    seed: int = 0
    threads: int = 2
    save_every: int = 0  # steps between checkpoints written to the output folder (0: only at the end)
    item_offset: int = 0  # each task's first train-split index; a continued run starts past those seen
    task_weights: tuple[float, ...] = (1.0,) * len(TASKS)  # sampling weight of each task, in TASKS order
    # The first `early_steps` draw from `early_frame_mix`: short clips are cheap steps, and a model from scratch
    # spends its first hundreds of steps learning to read the frames at all, which it learns as well from 8.
    early_steps: int = 0
    early_frame_mix: tuple[tuple[int, float], ...] = ((8, 1.0),)
    # A drawn `motion` or `order` item brings its time-reversed twin into the same batch (videoqa.reversed_twin):
    # the pair differs only in the direction of time, so the loss cannot fall through where the circle starts.
    reversed_twins: bool = False
    # Reset the vision tower's position embeddings to sine-cosine at this RMS before training (None: keep them).
    # The patch embedding's output grows to an RMS of 5-8 in training while the position table stays near its
    # init of 0.13, so a trained tower barely sees where a patch is, and `motion` cannot be learned from it.
    position_rms: float | None = None
    # The share of batches whose visual tokens get thinned position ids, and the lowest per-frame keep rate.
    position_thinning: float = 0.0
    thinning_min_keep: float = 0.25
    thinning_max_keep: float = 1.0
    thinning_per_row: bool = False  # one step rate per row of each frame's grid instead of one per frame
    # The share of batches whose tokens are put in a random order within each frame (`shuffled_within_frames`).
    frame_shuffle: float = 0.0


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-cased: the suite's words, the chat template's words and Qwen's chat tokens."""
    words = sorted(set(vocabulary()) | set(SYSTEM_WORDS)) + [UNKNOWN]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces go, newlines stay tokens
        pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="isolated"),
    ])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", unk_token=UNKNOWN)
    wrapped.chat_template = QWEN_CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaOnevisionForConditionalGeneration:
    model_class, config = llava_onevision_config({"text": TEXT_SIZES, "vision": VISION_SIZES}, tokenizer)
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    set_sincos_positions(model, model.model.vision_tower.embeddings.position_embedding.weight.std().item())
    return model


def set_sincos_positions(model: LlavaOnevisionForConditionalGeneration, rms: float) -> None:
    """Make the vision tower's position embeddings 2-D sine-cosine (`sincos_positions`) at `rms`."""
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        weight.copy_(sincos_positions(int(math.isqrt(weight.shape[0])), weight.shape[1], rms))


def sincos_positions(side: int, width: int, rms: float) -> torch.Tensor:
    """2-D sine-cosine position embeddings (MAE's), [side * side, width] in row-major patch order, scaled to `rms`.

    A randomly initialised embedding gives each patch an unrelated vector; a small model then needs most of its
    budget to learn where patches are before it can learn which way something moves. Here half the width
    encodes the row and half the column, at frequencies from one cycle per patch to one per ~10^4 patches, and
    training may still change them."""
    quarter = width // 4
    frequencies = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    table = torch.nn.functional.pad(table, (0, width - table.shape[1]))
    return (table * rms / table.pow(2).mean().sqrt()).float()


class Batch:
    """Prompt embeddings of a few items with the same frame count, right-padded, and their response targets."""

    def __init__(self, model, tokenizer, batch: list[Item], thinning: random.Random | None = None,
                 min_keep: float = 0.25, per_row: bool = False, shuffle: random.Random | None = None,
                 max_keep: float = 1.0) -> None:
        pixels = torch.stack([to_pixel_values(item.frames, IMAGE_SIZE) for item in batch])
        features = model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output  # [B, T*N + 1, D]: frame tokens, then the newline token
        if shuffle is not None:
            features = torch.stack([shuffled_within_frames(shuffle, row, len(batch[0].frames)) for row in features])
        embed = model.get_input_embeddings()
        rows, self.positions, self.targets = [], [], []
        for index, item in enumerate(batch):
            prefix, suffix = encode_prompt(tokenizer, item.question)
            response = tokenizer(item.response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            after = torch.tensor(suffix + response[:-1])
            rows.append(torch.cat([embed(torch.tensor(prefix)), features[index], embed(after)]))
            first = len(prefix) + features.shape[1] + len(suffix) - 1  # predicts the response's first token
            self.positions.append(torch.arange(first, first + len(response)))
            self.targets.append(torch.tensor(response))
        length = max(row.shape[0] for row in rows)
        self.embeds = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, length - row.shape[0])) for row in rows])
        self.position_ids = None if thinning is None else torch.stack([
            thinned_positions(thinning, len(encode_prompt(tokenizer, item.question)[0]), len(item.frames),
                              (features.shape[1] - 1) // len(item.frames), length, min_keep, per_row, max_keep)
            for item in batch])

    def logits(self, model) -> torch.Tensor:
        """The logits at every response position of every item, concatenated in batch order: [sum of lengths, V]."""
        hidden = model.model.language_model(inputs_embeds=self.embeds, position_ids=self.position_ids,
                                            use_cache=False).last_hidden_state
        return model.lm_head(torch.cat([hidden[b, positions] for b, positions in enumerate(self.positions)]))

    def loss(self, model) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(model), torch.cat(self.targets))


def thinned_positions(rng: random.Random, prefix: int, frames: int, per_frame: int, length: int,
                      min_keep: float, per_row: bool = False, max_keep: float = 1.0) -> torch.Tensor:
    """Position ids for a row of `length`: the prefix's as usual, then each frame's tokens step forward with a
    probability drawn per frame (or, `per_row`, per row of the frame's square grid) from [min_keep, max_keep] (ties
    allowed, the first token of a frame always steps), then the rest as usual from there. Every token stays; only
    the rotary distances between patches change. With one rate per frame a patch's offset into its frame is still
    its place in the grid times a constant, which says where it is; one rate per row breaks that too."""
    side = math.isqrt(per_frame) if per_row else per_frame
    steps = [1] * prefix
    for _ in range(frames):
        rates = [rng.uniform(min_keep, max_keep) for _ in range(per_frame // side)]
        steps += [1] + [int(rng.random() < rates[index // side]) for index in range(1, per_frame)]
    steps += [1] * (length - len(steps))
    return torch.tensor(steps).cumsum(0) - 1


def shuffled_within_frames(rng: random.Random, tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """`tokens` ([T*N + 1, D], frame-major, then the newline) with each frame's N tokens in a random order of
    their own. Nothing is removed and the frames keep their order, but a patch's place in its frame's run no
    longer says where it is in the picture, as after any pruning that compacts a frame's kept tokens; the
    place is left to what the token holds (the tower's position table)."""
    per_frame = (tokens.shape[0] - 1) // frames
    order = []
    for frame in range(frames):
        slots = list(range(frame * per_frame, (frame + 1) * per_frame))
        rng.shuffle(slots)
        order += slots
    return tokens[order + list(range(frames * per_frame, tokens.shape[0]))]


class ItemStream:
    """Train-split items of each task in index order, from index `first`: each task's answers cycle as its
    drawer balances them over consecutive indices, whatever share of each batch the task and its twins take.

    (Numbering items by their slot in the batch instead, as this module once did, gave a `motion` item drawn
    with its twin only the first two slots' indices, so only `left` and `right` clips were ever trained.)"""

    def __init__(self, first: int = 0) -> None:
        self.next_index = dict.fromkeys(TASKS, first)

    def draw(self, task: str, num_frames: int) -> Item:
        index = self.next_index[task]
        self.next_index[task] += 1
        return make_item("train", task, index, num_frames)


def sample_batch(rng: random.Random, step: int, settings: TrainSettings, stream: ItemStream) -> list[Item]:
    frame_counts, weights = zip(*(settings.early_frame_mix if step < settings.early_steps else settings.frame_mix))
    num_frames = rng.choices(frame_counts, weights)[0]
    chosen: list[Item] = []
    while len(chosen) < settings.batch_size:
        chosen.append(stream.draw(rng.choices(TASKS, settings.task_weights)[0], num_frames))
        twin = reversed_twin(chosen[-1]) if settings.reversed_twins else None
        if twin is not None and len(chosen) < settings.batch_size:
            chosen.append(twin)
    return chosen


@torch.inference_mode()
def greedy_response(model, tokenizer, item: Item, max_new_tokens: int = 8) -> str:
    """Greedy decode through the plain model on the pipeline's prompt, for validation during training."""
    pixels = to_pixel_values(item.frames, IMAGE_SIZE)[None]
    features = model.get_video_features(
        pixel_values_videos=pixels, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output[0]
    prefix, suffix = encode_prompt(tokenizer, item.question)
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(prefix)), features, embed(torch.tensor(suffix))])[None]
    ids = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def validate(model, tokenizer, per_task: int, num_frames: int = 16) -> dict[str, float]:
    model.eval()
    scores = {}
    for task in TASKS:
        right = sum(is_correct(greedy_response(model, tokenizer, make_item("validation", task, i, num_frames)),
                               make_item("validation", task, i, num_frames)) for i in range(per_task))
        scores[task] = right / per_task
    model.train()
    scores["overall"] = sum(scores[task] for task in TASKS) / len(TASKS)
    return scores


def learning_rate(step: int, settings: TrainSettings, total_steps: int) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
    return settings.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model, tokenizer, settings: TrainSettings, pool: list[Item] | None = None,
        log_path: Path | None = None, out: Path | None = None) -> list[dict]:
    """Train `model` in place for the time or step budget; `pool`, if given, is the only data (smoke tests)."""
    torch.set_num_threads(settings.threads)
    rng = random.Random(settings.seed)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    budget_s = settings.minutes * 60
    started = time.monotonic()
    history: list[dict] = []
    stream = ItemStream(settings.item_offset)
    thinning = random.Random(settings.seed + 1)  # its own stream: the batches drawn do not depend on it
    shuffling = random.Random(settings.seed + 2)
    # The step budget follows the measured pace, so the cosine schedule ends near the time budget.
    total_steps = settings.max_steps
    progress = tqdm(total=total_steps, desc="training", unit="step", file=sys.stderr, mininterval=5)
    step = 0
    while step < total_steps and time.monotonic() - started < budget_s:
        chosen = rng.sample(pool, settings.batch_size) if pool else sample_batch(rng, step, settings, stream)
        thin = settings.position_thinning and thinning.random() < settings.position_thinning
        shuffle = settings.frame_shuffle and shuffling.random() < settings.frame_shuffle
        loss = Batch(model, tokenizer, chosen, thinning if thin else None, settings.thinning_min_keep,
                     settings.thinning_per_row, shuffling if shuffle else None, settings.thinning_max_keep).loss(model)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, settings, total_steps)
        optimiser.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % 50 == 20 and settings.max_steps > 100:  # the machine's load changes: re-estimate now and then
            elapsed = time.monotonic() - started
            total_steps = min(settings.max_steps, step + int((budget_s - elapsed) / (elapsed / step)))
            progress.total = total_steps
        record = {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.monotonic() - started, 1)}
        if settings.eval_every and step % settings.eval_every == 0:
            record["validation"] = validate(model, tokenizer, settings.eval_items)
            log.info("step %d: validation %s", step, record["validation"])
        history.append(record)
        if out is not None and settings.save_every and step % settings.save_every == 0:
            save(model, tokenizer, out, {"steps": step, "partial": True})
        if log_path is not None:
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    progress.close()
    return history


def train(out: Path, settings: TrainSettings, log_path: Path | None = None, init: Path | None = None) -> dict:
    """Build (or continue from `init`), train and validate the model, save it to `out`; returns the summary."""
    started = time.monotonic()
    tokenizer = build_word_tokenizer()
    if init is None:
        model = build_model(tokenizer, settings.seed)
    else:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32,
                                                                       attn_implementation="sdpa")
    if settings.position_rms is not None:
        set_sincos_positions(model, settings.position_rms)
    history = fit(model, tokenizer, settings, log_path=log_path, out=out)
    final = validate(model, tokenizer, settings.eval_items)
    summary = {"steps": len(history), "minutes": round((time.monotonic() - started) / 60, 1), "validation": final,
               "settings": {**settings.__dict__, "frame_mix": [list(pair) for pair in settings.frame_mix],
                            "early_frame_mix": [list(pair) for pair in settings.early_frame_mix]}}
    save(model.eval(), tokenizer, out, summary)
    return summary


def save(model, tokenizer, out: Path, summary: dict) -> None:
    """A regular checkpoint directory: config, tokenizer files and fp16 safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.float16).save_pretrained(out)  # a copy: the training weights stay float32
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dycoke.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/models/tiny"))
    parser.add_argument("--minutes", type=float, default=TrainSettings.minutes)
    parser.add_argument("--max-steps", type=int, default=TrainSettings.max_steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--learning-rate", type=float, default=TrainSettings.learning_rate)
    parser.add_argument("--eval-every", type=int, default=TrainSettings.eval_every)
    parser.add_argument("--eval-items", type=int, default=TrainSettings.eval_items)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads)
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per step to this file")
    parser.add_argument("--frame-mix", default="8:0.45,16:0.4,32:0.15",
                        help="frame counts and their shares of the batches (default 8:0.45,16:0.4,32:0.15)")
    parser.add_argument("--early-steps", type=int, default=0,
                        help="the first N steps draw their frame counts from --early-frame-mix")
    parser.add_argument("--early-frame-mix", default="8:1", help="frame mix of the early steps (default 8:1)")
    parser.add_argument("--warmup-steps", type=int, default=TrainSettings.warmup_steps)
    parser.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps")
    parser.add_argument("--init", type=Path, default=None, help="continue from this checkpoint directory")
    parser.add_argument("--task-weights", default=None,
                        help=f"sampling weights of the tasks ({','.join(TASKS)}), comma-separated (default equal)")
    parser.add_argument("--reversed-twins", action="store_true",
                        help="pair each motion and order item with its time-reversed twin in the batch")
    parser.add_argument("--position-rms", type=float, default=None,
                        help="reset the vision tower's position embeddings to 2-D sine-cosine at this RMS first")
    parser.add_argument("--position-thinning", type=float, default=0.0,
                        help="the share of batches whose visual tokens get sparser position ids (no token is removed)")
    parser.add_argument("--thinning-min-keep", type=float, default=TrainSettings.thinning_min_keep,
                        help="the lowest per-frame rate at which a thinned frame's position ids step forward")
    parser.add_argument("--thinning-max-keep", type=float, default=TrainSettings.thinning_max_keep,
                        help="the highest per-frame rate (TTM's non-anchor frames keep 0.3 of their tokens)")
    parser.add_argument("--thinning-per-row", action="store_true",
                        help="draw the thinning's step rate per row of each frame's grid, not per frame")
    parser.add_argument("--frame-shuffle", type=float, default=0.0,
                        help="the share of batches whose tokens are put in a random order within each frame")
    parser.add_argument("--item-offset", type=int, default=0,
                        help="each task's first train-split item index (a continued run passes at least the earlier run's "
                             "offset + steps x batch size, past every item it drew)")
    args = parser.parse_args(argv)
    if not 0 < args.thinning_min_keep <= args.thinning_max_keep <= 1:
        parser.error("need 0 < --thinning-min-keep <= --thinning-max-keep <= 1")
    mix, early_mix = (tuple((int(frames), float(share)) for frames, share in
                            (pair.split(":") for pair in text.split(","))) for text in (args.frame_mix,
                                                                                         args.early_frame_mix))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = TrainSettings(minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size,
                             learning_rate=args.learning_rate, eval_every=args.eval_every,
                             eval_items=args.eval_items, seed=args.seed, threads=args.threads,
                             frame_mix=mix, warmup_steps=args.warmup_steps, save_every=args.save_every,
                             item_offset=args.item_offset, early_steps=args.early_steps,
                             early_frame_mix=early_mix, reversed_twins=args.reversed_twins,
                             position_rms=args.position_rms, position_thinning=args.position_thinning,
                             thinning_min_keep=args.thinning_min_keep, thinning_max_keep=args.thinning_max_keep,
                             thinning_per_row=args.thinning_per_row,
                             frame_shuffle=args.frame_shuffle,
                             task_weights=tuple(float(w) for w in args.task_weights.split(","))
                             if args.task_weights else TrainSettings.task_weights)
    summary = train(args.out, settings, args.log, args.init)
    print(json.dumps(summary["validation"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
