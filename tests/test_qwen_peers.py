"""The peers FastV, random, uniform frames and VidCom² on the tiny random Qwen2.5-VL and Qwen3-VL models: each keeps
exactly DyCoke's matched budget, counted here by hand over temporal groups, and every kept token keeps the M-RoPE
position of the full layout."""

from __future__ import annotations

import math

import pytest
import torch

from dycoke.config import DyCokeConfig
from dycoke.fastv import FastVCache
from dycoke.methods import configure
from dycoke.pipeline import Pipeline
from test_families import QUESTION, TOKENS, clip, decoded_positions, qwen  # noqa: F401  (fixtures)

NEW_TOKENS = 4
GROUPS = 4  # 8 frames, 2 per temporal group; TOKENS: 8x8 per group on Qwen2.5-VL (patch 14), 7x7 on Qwen3-VL
CONFIG = DyCokeConfig(merge_ratio=0.7, window=2, prune_ratio=0.6)
BEFORE_LLM = ["random", "uniform-frames", "vidcom2"]


def matched_budget(tokens: int) -> int:
    """DyCoke's attended visual tokens with CONFIG over 4 groups: W = 2 makes groups 0 and 2 anchors (whole), groups
    1 and 3 keep floor(0.3·N); DP then attends floor(0.4·V) of them."""
    visual = 2 * tokens + 2 * math.floor(0.3 * tokens + 1e-9)
    return math.floor(0.4 * visual + 1e-9)


def peer(name: str):
    return configure(name, match="dycoke")


def full_layout_positions(pipeline: Pipeline, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own M-RoPE positions [3, S] of the uncompressed prompt, and where its video tokens are."""
    loaded, family = pipeline.loaded, pipeline.loaded.family
    geometry = pipeline.geometry(clip)
    layout = family.layout(loaded.model, loaded.tokenizer, QUESTION, geometry, clip.timestamps, clip.fps)
    ids = layout.input_ids
    is_video = ids == loaded.model.config.video_token_id
    full, _ = loaded.model.model.get_rope_index(ids[None], is_video[None].long() * 2,
                                                video_grid_thw=family.grid_thw(loaded.model, geometry),
                                                **layout.rope_inputs)
    return full[:, 0], is_video


def prepared_for(pipeline: Pipeline, clip, name: str):
    method = pipeline.resolve(peer(name), CONFIG, clip)
    with torch.inference_mode():
        return method, pipeline.prepare(clip, QUESTION, method, method.effective_config(CONFIG))


@pytest.mark.parametrize("name", BEFORE_LLM + ["fastv"])
def test_peers_keep_exactly_dycokes_matched_budget(qwen, clip, name):
    budget = matched_budget(TOKENS[qwen.loaded.name])
    result = qwen.answer(clip, QUESTION, method=peer(name), config=CONFIG, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert result.trace["frames"] == GROUPS and result.metrics["visual_tokens_in"] == GROUPS * TOKENS[qwen.loaded.name]
    assert len(result.trace["steps"]) == NEW_TOKENS - 1
    assert all(sum(step["kept_per_frame"]) == budget for step in result.trace["steps"])
    assert result.metrics["visual_tokens_attended_mean"] == budget
    prefilled = GROUPS * TOKENS[qwen.loaded.name] if name == "fastv" else budget  # FastV drops inside the model
    assert result.metrics["visual_tokens_after_ttm"] == prefilled
    assert sum(map(sum, result.trace["ttm_keep_mask"])) == prefilled


@pytest.mark.parametrize("name", BEFORE_LLM)
def test_tokens_dropped_before_the_llm_keep_their_full_layout_positions(qwen, clip, name):
    full, is_video = full_layout_positions(qwen, clip)
    _, prepared = prepared_for(qwen, clip, name)
    keep = torch.ones(is_video.numel(), dtype=torch.bool)
    keep[is_video.nonzero()[:, 0][~prepared.keep_mask.flatten()]] = False
    positions = prepared.generate_kwargs["position_ids"]
    assert int(prepared.keep_mask.sum()) == matched_budget(TOKENS[qwen.loaded.name])
    assert positions.shape == (3, 1, int(keep.sum())) == (3, 1, prepared.embeds.shape[1])
    assert torch.equal(positions[:, 0], full[:, keep])


def test_fastv_rotates_the_kept_tokens_at_their_full_layout_positions(qwen, clip):
    """From layer K on, FastV's layers see only the kept tokens, each with the rotary table row of its own position
    in the full layout (M-RoPE), and every text token."""
    model = qwen.loaded.model
    full, is_video = full_layout_positions(qwen, clip)
    method, prepared = prepared_for(qwen, clip, "fastv")
    assert torch.equal(prepared.generate_kwargs["position_ids"][:, 0], full)  # FastV prefills every token
    seen = []

    def record(module, args, kwargs):
        if kwargs["position_embeddings"][0].shape[1] > 1:
            seen.append(kwargs["position_embeddings"][0].clone())

    layers = model.model.language_model.layers
    handle = layers[method.layer].register_forward_pre_hook(record, with_kwargs=True)  # after FastV's own hook
    try:
        with torch.inference_mode():
            model.generate(inputs_embeds=prepared.embeds, past_key_values=prepared.cache, max_new_tokens=2,
                           min_new_tokens=2, do_sample=False, **prepared.generate_kwargs)
    finally:
        handle.remove()
    cache: FastVCache = prepared.cache
    kept = cache.kept_positions.cpu()
    text = (~is_video).nonzero()[:, 0]
    assert torch.isin(text, kept).all()
    assert int(is_video[kept].sum()) == matched_budget(TOKENS[qwen.loaded.name])
    rotary = model.model.language_model.rotary_emb
    with torch.inference_mode():
        cos, _ = rotary(prepared.embeds, full[:, None])
    assert len(seen) == 1 and torch.equal(seen[0], cos[:, kept])


@pytest.mark.parametrize("name", BEFORE_LLM + ["fastv"])
def test_peers_decode_at_the_positions_of_the_uncompressed_prompt(qwen, clip, name):
    """Decoded token i sits at the last prompt position + 1 + i, as on the model's own path, whatever was dropped."""
    full, _ = full_layout_positions(qwen, clip)
    seen = decoded_positions(qwen.loaded.model, lambda: qwen.answer(
        clip, QUESTION, method=peer(name), config=CONFIG, max_new_tokens=NEW_TOKENS, ignore_eos=True))
    last = full[:, -1]
    assert len(seen) == NEW_TOKENS - 1
    assert all(torch.equal(step, last + 1 + i) for i, step in enumerate(seen))
