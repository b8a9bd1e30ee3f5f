"""Training: the word-level tokenizer round-trips the suite, and a few steps on a handful of items lower the loss."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from dycoke.pipeline import encode_prompt
from dycoke.train import (Batch, ItemStream, TrainSettings, build_model, build_word_tokenizer, fit, main, sample_batch,
                          shuffled_within_frames, thinned_positions, train)
from dycoke.videoqa import TASKS, make_item
from test_videoqa import direction_shown  # the clip's direction, read from its pixels


def test_the_tokenizer_knows_every_word_of_the_suite():
    tokenizer = build_word_tokenizer()
    unknown = tokenizer.convert_tokens_to_ids("[UNK]")
    for task in TASKS:
        item = make_item("train", task, 5, 8)
        prefix, suffix = encode_prompt(tokenizer, item.question)
        response = tokenizer(item.response, add_special_tokens=False).input_ids
        assert unknown not in prefix + suffix + response, (task, item.question)
        assert tokenizer.decode(response) == item.response
    assert tokenizer.convert_ids_to_tokens(encode_prompt(tokenizer, "Zebra?")[1][1:3]) == ["[UNK]", "?"]


def test_a_few_steps_on_a_handful_of_items_lower_the_loss():
    tokenizer = build_word_tokenizer()
    model = build_model(tokenizer, seed=0)
    pool = [make_item("train", task, 0, 8) for task in ("static", "change")]

    def pool_loss() -> float:
        with torch.no_grad():
            return Batch(model, tokenizer, pool).loss(model).item()

    before = pool_loss()
    settings = TrainSettings(minutes=5, max_steps=6, batch_size=2, learning_rate=3e-3, warmup_steps=1,
                             eval_every=0, threads=torch.get_num_threads())
    history = fit(model, tokenizer, settings, pool=pool)
    assert len(history) == 6
    assert pool_loss() < 0.7 * before


def test_the_vision_position_embeddings_start_as_2d_sine_cosine():
    """Patch (row, col) of SigLIP's 27 x 27 grid: the first quarter of the width is sin(row * w_k), then cos(row *
    w_k), sin(col * w_k), cos(col * w_k), with w_k = 10000^(-k / quarter); all scaled by one constant."""
    model = build_model(build_word_tokenizer(), seed=0)
    check_sincos_table(model.model.vision_tower.embeddings.position_embedding.weight, 1 / math.sqrt(64))


def test_position_rms_resets_a_trained_towers_table_to_sine_cosine_at_that_rms(tmp_path):
    tokenizer = build_word_tokenizer()
    model = build_model(tokenizer, seed=0)
    table = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        table.normal_(0, 0.02)  # as a trained tower's table might be: small and not sine-cosine
    model.save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    train(tmp_path / "out", TrainSettings(max_steps=0, eval_items=1, threads=1, position_rms=3.0),
          init=tmp_path / "init")
    saved = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    check_sincos_table(saved.model.vision_tower.embeddings.position_embedding.weight, 3.0, tolerance=1e-2)


def check_sincos_table(weight: torch.Tensor, rms: float, tolerance: float = 1e-6) -> None:
    table = weight.detach().double()
    side, width = 27, table.shape[1]
    quarter = width // 4
    row, col, k = 5, 19, 3
    w = 10000 ** (-k / quarter)
    entry = table[row * side + col]
    scale = entry[quarter + 0] / math.cos(row * 1.0)  # k = 0: cos(row * 1)
    expected = [math.sin(row * w), math.cos(row * w), math.sin(col * w), math.cos(col * w)]
    got = [entry[k], entry[quarter + k], entry[2 * quarter + k], entry[3 * quarter + k]]
    assert [float(g / scale) for g in got] == pytest.approx(expected, abs=tolerance)
    assert table.pow(2).mean().sqrt().item() == pytest.approx(rms, rel=0.05)  # SigLIP's own init scale by default


def test_the_early_steps_draw_from_their_own_frame_mix():
    settings = TrainSettings(batch_size=1, frame_mix=((16, 1.0),), early_steps=3, early_frame_mix=((8, 1.0),),
                             task_weights=(1.0, 0, 0, 0, 0, 0))
    rng = random.Random(0)
    stream = ItemStream()
    counts = [len(sample_batch(rng, step, settings, stream)[0].frames) for step in range(6)]
    assert counts == [8, 8, 8, 16, 16, 16]


def test_reversed_twins_follow_their_items_in_the_batch_and_fill_it_exactly():
    settings = TrainSettings(batch_size=4, task_weights=(0, 1.0, 0, 0, 0, 0), reversed_twins=True)
    batch = sample_batch(random.Random(0), 0, settings, ItemStream())
    assert [item.id.endswith("-reversed") for item in batch] == [False, True, False, True]
    for item, twin in (batch[0:2], batch[2:4]):
        assert twin.id == item.id + "-reversed" and np.array_equal(twin.frames, item.frames[::-1])
    static_only = TrainSettings(batch_size=3, task_weights=(1.0, 0, 0, 0, 0, 0), reversed_twins=True)
    assert len({item.id for item in sample_batch(random.Random(0), 0, static_only, ItemStream())}) == 3  # no twin to add
    odd = TrainSettings(batch_size=3, task_weights=(0, 0, 0, 0, 1.0, 0), reversed_twins=True)
    assert [item.id.endswith("-reversed") for item in sample_batch(random.Random(0), 0, odd, ItemStream())] == [False, True, False]
    plain = TrainSettings(batch_size=4, task_weights=(0, 1.0, 0, 0, 0, 0))
    assert not any(item.id.endswith("-reversed") for item in sample_batch(random.Random(0), 0, plain, ItemStream()))


def test_motion_batches_with_twins_train_every_direction_equally():
    """With twins, each drawn `motion` item shares the batch with its reversed clip. Over eight batches the clips
    must still move in all four directions equally often (read from the pixels), each item drawn once."""
    settings = TrainSettings(batch_size=4, task_weights=(0, 1.0, 0, 0, 0, 0), reversed_twins=True,
                             frame_mix=((8, 1.0),))
    rng, stream = random.Random(0), ItemStream()
    batches = [sample_batch(rng, step, settings, stream) for step in range(8)]
    drawn = [item for batch in batches for item in batch if not item.id.endswith("-reversed")]
    assert len({item.id for item in drawn}) == len(drawn) == 16
    shown = Counter(direction_shown(item) for batch in batches for item in batch)
    assert shown == {"left": 8, "right": 8, "up": 8, "down": 8}, shown


def test_thinned_positions_keep_the_text_contiguous_and_only_thin_the_frames():
    prefix, frames, per_frame, length = 5, 3, 10, 50
    ids = thinned_positions(random.Random(3), prefix, frames, per_frame, length, min_keep=0.25).tolist()
    steps = np.diff([-1] + ids)
    assert len(ids) == length and ids[:prefix] == list(range(prefix))
    assert set(steps) <= {0, 1}
    frame_steps = steps[prefix:prefix + frames * per_frame].reshape(frames, per_frame)
    assert (frame_steps[:, 0] == 1).all() and (frame_steps[:, 1:] == 0).any()  # a frame's first token always steps
    assert (steps[prefix + frames * per_frame:] == 1).all()  # the newline, question and answer as usual
    assert thinned_positions(random.Random(3), prefix, frames, per_frame, length, 1.0).tolist() == list(range(length))


def test_thinning_at_full_keep_changes_nothing_and_below_it_changes_the_logits():
    tokenizer = build_word_tokenizer()
    model = build_model(tokenizer, seed=0).eval()
    items = [make_item("train", "motion", 0, 8), make_item("train", "count", 1, 8)]
    with torch.no_grad():
        plain = Batch(model, tokenizer, items).logits(model)
        full = Batch(model, tokenizer, items, random.Random(0), min_keep=1.0).logits(model)
        thinned = Batch(model, tokenizer, items, random.Random(0), min_keep=0.25)
        assert torch.equal(plain, full)
        assert thinned.position_ids.shape == thinned.embeds.shape[:2]
        assert thinned.position_ids[0, -1] < thinned.embeds.shape[1] - 1  # the row ends earlier in position
        assert not torch.allclose(plain, thinned.logits(model))


def test_thinning_rates_stay_between_min_and_max_keep():
    """Each frame's share of stepping tokens (its first one aside) is a binomial draw around a rate in [min, max]."""
    frames, per_frame = 60, 196
    ids = thinned_positions(random.Random(11), 0, frames, per_frame, frames * per_frame, 0.2, max_keep=0.45)
    rates = np.diff([-1] + ids.tolist()).reshape(frames, per_frame)[:, 1:].mean(axis=1)
    tolerance = 4 * math.sqrt(0.25 / (per_frame - 1))  # four binomial standard deviations at worst
    assert rates.min() > 0.2 - tolerance and rates.max() < 0.45 + tolerance
    assert rates.max() - rates.min() > 0.1  # drawn per frame, not fixed
    fixed = thinned_positions(random.Random(11), 0, frames, per_frame, frames * per_frame, 0.3, max_keep=0.3)
    assert abs(np.diff([-1] + fixed.tolist()).reshape(frames, per_frame)[:, 1:].mean() - 0.3) < 0.02


def test_thinning_bounds_out_of_order_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--thinning-min-keep", "0.5", "--thinning-max-keep", "0.3"])
    assert "--thinning-max-keep" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_per_row_thinning_varies_the_rate_between_rows_of_a_frame():
    """One rate per frame leaves every row of a frame stepping at about the same rate; one rate per row does not."""
    frames, side = 40, 14

    def row_spread(per_row: bool) -> float:
        ids = thinned_positions(random.Random(7), 0, frames, side * side, frames * side * side, 0.1, per_row)
        steps = np.diff([-1] + ids.tolist()).reshape(frames, side, side)[:, :, 1:]  # each row's first token skipped
        return float(steps.mean(axis=2).std(axis=1).mean())  # spread of the row rates within a frame

    assert row_spread(per_row=True) > 2 * row_spread(per_row=False)
    full = thinned_positions(random.Random(7), 3, 2, 16, 40, 1.0, per_row=True)
    assert full.tolist() == list(range(40))


def test_frame_shuffle_reorders_tokens_only_within_their_frame():
    frames, per_frame, width = 3, 6, 2
    tokens = torch.stack([torch.arange(frames * per_frame + 1).float()] * width, dim=1)  # token i holds i
    order = shuffled_within_frames(random.Random(1), tokens, frames)[:, 0].long().tolist()
    assert order[-1] == frames * per_frame  # the newline stays last
    for frame in range(frames):
        run = order[frame * per_frame:(frame + 1) * per_frame]
        assert sorted(run) == list(range(frame * per_frame, (frame + 1) * per_frame))
    assert order != list(range(frames * per_frame + 1))


def test_frame_shuffle_changes_the_logits_and_keeps_the_targets():
    tokenizer = build_word_tokenizer()
    model = build_model(tokenizer, seed=0).eval()
    items = [make_item("train", "motion", 0, 8), make_item("train", "count", 1, 8)]
    with torch.no_grad():
        plain = Batch(model, tokenizer, items)
        shuffled = Batch(model, tokenizer, items, shuffle=random.Random(0))
        assert torch.equal(torch.cat(plain.targets), torch.cat(shuffled.targets))
        assert plain.embeds.shape == shuffled.embeds.shape
        assert torch.allclose(plain.embeds.sum(dim=1), shuffled.embeds.sum(dim=1), atol=1e-4)  # same tokens
        assert not torch.allclose(plain.logits(model), shuffled.logits(model))
