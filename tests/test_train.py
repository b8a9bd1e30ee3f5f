"""Training: the word-level tokenizer round-trips the suite, and a few steps on a handful of items lower the loss."""

from __future__ import annotations

import torch

from dycoke.pipeline import encode_prompt
from dycoke.train import Batch, TrainSettings, build_model, build_word_tokenizer, fit
from dycoke.videoqa import TASKS, make_item


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
