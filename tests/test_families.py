"""Qwen2.5-VL and Qwen3-VL through the family adapters, the pipeline and conversations, against the models' own
paths and values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from conftest import moving_square_clip
from dycoke.cli import main
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.conversation import Conversation
from dycoke.families.qwen_vl import MAX_PIXELS, QWEN2_5_VL, QWEN3_VL
from dycoke.limits import RequestError
from dycoke.methods import configure, get_method
from dycoke.models import load
from dycoke.pipeline import Pipeline, Result
from dycoke.video import GridFit, load_video, resize_to

QWEN_PRESETS = ["qwen2.5-vl-tiny", "qwen3-vl-tiny"]
QUESTION = "What moves in this video?"
NEW_TOKENS = 6
SIDE = 224  # 8x8 tokens per group on Qwen2.5-VL (patch 14, merge 2), 7x7 on Qwen3-VL (patch 16)
TOKENS = {"qwen2.5-vl-tiny": (SIDE // 28) ** 2, "qwen3-vl-tiny": (SIDE // 32) ** 2}


@pytest.fixture(scope="module", params=QWEN_PRESETS)
def qwen(request) -> Pipeline:
    return Pipeline(load(request.param, device="cpu"))


@pytest.fixture(scope="module")
def clip():
    return moving_square_clip(8, size=SIDE)


def run(pipeline: Pipeline, clip, method: str = "dycoke", **config):
    return pipeline.answer(clip, QUESTION, method=method, config=DyCokeConfig(**config),
                           max_new_tokens=NEW_TOKENS, ignore_eos=True)


def own_generate(pipeline: Pipeline, clip) -> list[int]:
    """Plain `generate` on the model's own input_ids + pixel_values_videos + video_grid_thw path."""
    loaded, family = pipeline.loaded, pipeline.loaded.family
    geometry = pipeline.geometry(clip)
    layout = family.layout(loaded.model, loaded.tokenizer, QUESTION, geometry, clip.timestamps, clip.fps)
    inputs = family.reference_inputs(loaded.model, layout, clip.frames, geometry)
    with torch.inference_mode():
        ids = loaded.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_dycoke_off_equals_the_models_own_generate(qwen, clip):
    assert run(qwen, clip, merge_ratio=0.0, prune_ratio=0.0).token_ids == own_generate(qwen, clip)


def test_geometry_is_temporal_groups_of_merged_patches(qwen, clip):
    result = run(qwen, clip, "baseline")
    assert (result.trace["frames"], result.trace["tokens_per_frame"]) == (4, TOKENS[qwen.loaded.name])
    assert result.trace["frames_per_group"] == 2  # 8 video frames in the 4 rows
    times = clip.timestamps
    assert result.trace["frame_times_s"] == [round((times[i] + times[i + 1]) / 2, 4) for i in range(0, 8, 2)]


def test_ttm_and_dp_keep_exactly_their_share(qwen, clip):
    tokens = TOKENS[qwen.loaded.name]
    result = run(qwen, clip, merge_ratio=0.7, window=2, prune_ratio=0.6)
    kept = math.floor(0.3 * tokens + 1e-6)
    assert result.trace["ttm_kept_per_frame"] == [tokens, kept, tokens, kept]
    visual = 2 * (tokens + kept)
    assert result.metrics["visual_tokens_after_ttm"] == visual
    assert all(sum(step["kept_per_frame"]) == math.floor(0.4 * visual + 1e-6) for step in result.trace["steps"])


def test_kept_tokens_keep_their_full_layout_positions(qwen, clip):
    loaded, family = qwen.loaded, qwen.loaded.family
    method = configure("ttm")
    geometry = qwen.geometry(clip)
    with torch.inference_mode():
        prepared = qwen.prepare(clip, QUESTION, method, DyCokeConfig(merge_ratio=0.7, prune_ratio=0.0))
    layout = family.layout(loaded.model, loaded.tokenizer, QUESTION, geometry, clip.timestamps, clip.fps)
    ids = layout.input_ids
    is_video = ids == loaded.model.config.video_token_id
    full, _ = loaded.model.model.get_rope_index(ids[None], is_video[None].long() * 2,
                                                video_grid_thw=family.grid_thw(loaded.model, geometry),
                                                **layout.rope_inputs)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[is_video.nonzero()[:, 0][~prepared.keep_mask.flatten()]] = False  # the dropped visual tokens
    positions = prepared.generate_kwargs["position_ids"]
    assert positions.shape == (3, 1, int(keep.sum()))
    assert torch.equal(positions[:, 0], full[:, 0, keep])
    after_video = int(is_video.nonzero().max()) + 1
    assert torch.equal(positions[:, 0, -(ids.numel() - after_video):], full[:, 0, after_video:])


def decoded_positions(model, work) -> list[torch.Tensor]:
    """The 3-D position of each decoded token while `work()` runs."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] == 1:
            seen.append(kwargs["position_ids"][-3:, 0, 0].clone())

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        work()
    finally:
        handle.remove()
    return seen


def test_decode_positions_continue_as_without_compression(qwen, clip):
    """Every decoded token gets the position the model's own path gives it, TTM and DP on or off."""
    model = qwen.loaded.model
    own = decoded_positions(model, lambda: own_generate(qwen, clip))
    seen = decoded_positions(model, lambda: run(qwen, clip, merge_ratio=0.7, prune_ratio=0.7))
    assert len(own) == NEW_TOKENS - 1 and all(torch.equal(a, b) for a, b in zip(seen, own))
    geometry = qwen.geometry(clip)
    layout = qwen.loaded.family.layout(model, qwen.loaded.tokenizer, QUESTION, geometry, clip.timestamps, clip.fps)
    last = layout.positions[:, -1]  # the last prompt token is text: its three positions are equal
    assert all(torch.equal(step, last + 1 + i) for i, step in enumerate(own))


@pytest.mark.parametrize("family", [QWEN2_5_VL, QWEN3_VL], ids=lambda family: family.name)
def test_pixels_equal_the_pil_image_processor(family):
    model = load("qwen2.5-vl-tiny" if family is QWEN2_5_VL else "qwen3-vl-tiny", device="cpu").model
    vision = model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size, image_mean=list(family.image_mean),
        image_std=list(family.image_std), size={"shortest_edge": (2 * factor) ** 2, "longest_edge": MAX_PIXELS},
    )
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 180, 320, 3), dtype=np.uint8)  # two different frames, 16:9
    geometry = family.geometry(model, 2, 180, 320)
    ours = family.pixel_values(model, frames, geometry)
    patch_shape = (3, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    for index, frame in enumerate(frames):  # the image processor repeats a still frame over the temporal patch
        theirs = processor(images=frame, return_tensors="pt")
        assert theirs["image_grid_thw"][0, 1:].tolist() == family.grid_thw(model, geometry)[0, 1:].tolist()
        expected = theirs["pixel_values"].view(-1, *patch_shape)[:, :, 0]
        assert torch.equal(ours.view(-1, *patch_shape)[:, :, index], expected)


def test_dp_selection_equals_head_mean_attention_in_float64(qwen, clip):
    """DP's scores on Qwen, recomputed from eager attention probabilities of the same sequence, in float64."""
    loaded = load(qwen.loaded.name, device="cpu", dtype=torch.float64)
    pipeline = Pipeline(loaded)
    config = DyCokeConfig(merge_ratio=0.0, prune_layer=2, prune_ratio=0.5, reselect_threshold=1.0)
    method = configure("dp")
    with torch.inference_mode():
        prepared = pipeline.prepare(clip, QUESTION, method, config)
        generated = loaded.model.generate(inputs_embeds=prepared.embeds, past_key_values=prepared.cache,
                                          max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                          **prepared.generate_kwargs)[0]
        cache = prepared.cache
        # The last step fed generated[-2]; layers < L see every token, so a full forward reproduces its layer L-1.
        fed = loaded.model.get_input_embeddings()(generated[None, :-1])
        sequence = torch.cat([prepared.embeds, fed], dim=1)
        positions = prepared.generate_kwargs["position_ids"]
        steps = positions[..., -1:] + torch.arange(1, fed.shape[1] + 1)
        loaded.model.set_attn_implementation("eager")
        extra = {k: v for k, v in prepared.generate_kwargs.items() if k != "position_ids"}
        attentions = loaded.model(inputs_embeds=sequence, position_ids=torch.cat([positions, steps], dim=-1),
                                  output_attentions=True, **extra).attentions
    layout = loaded.family.layout(loaded.model, loaded.tokenizer, QUESTION, pipeline.geometry(clip),
                                  clip.timestamps, clip.fps)
    visual = (layout.input_ids == loaded.model.config.video_token_id).nonzero()[:, 0]  # K = 0: every token kept
    by_hand = attentions[config.prune_layer - 1][0, :, -1].mean(dim=0)[visual]
    assert torch.allclose(cache.previous_scores.double(), by_hand, rtol=0, atol=1e-6)
    expected = torch.sort(torch.topk(by_hand, cache.keep_visual).indices).values
    assert torch.equal(cache.selected.cpu(), expected)


@pytest.mark.parametrize("method", ["baseline", "dycoke"])
def test_the_context_check_counts_the_tokens_the_model_is_prefilled_with(qwen, clip, method):
    """Vision markers and Qwen3-VL's timestamps included: a context of exactly the prefill and the answer is
    accepted, one less refused; 8 frames are 4 groups of 2 and 7 frames still 4, so 6 frames fit."""
    chosen, config = get_method(method), DyCokeConfig()
    settings = chosen.effective_config(config)
    prompt = qwen.loaded.family.prompt_ids(qwen.loaded.tokenizer, QUESTION)
    with torch.inference_mode():
        prepared = qwen.prepare(clip, prompt, chosen, settings)
    prefill = prepared.embeds.shape[1]
    if method == "baseline":  # every token of the model's own input_ids
        assert prefill == len(qwen.layout(clip, prompt).input_ids)
    needed, text = prefill + NEW_TOKENS, len(prompt[0]) + len(prompt[1])
    visual = int(prepared.keep_mask.sum())
    qwen.check_context(chosen, config, settings, 8, text, NEW_TOKENS, context=needed, clip=clip)
    with pytest.raises(RequestError, match=f"^8 frames give {visual} visual tokens with {method}; .* that is "
                                           f"{needed:,}, over this model's context of {needed - 1:,} positions: "
                                           f"use 6 frames or fewer$"):
        qwen.check_context(chosen, config, settings, 8, text, NEW_TOKENS, context=needed - 1, clip=clip)


def test_methods_that_do_not_carry_over_are_refused_in_one_line(clip):
    qwen3 = Pipeline(load("qwen3-vl-tiny", device="cpu"))
    with pytest.raises(ConfigError, match="^visionzip does not run on this model: .*SigLIP") as refused:
        run(qwen3, clip, "visionzip")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="fastv_layer >= 2"):
        run(qwen3, clip, configure("fastv", fastv_layer=1))


def test_cli_json_contract_with_the_qwen_geometry(tmp_path, capsys):
    from test_hostile import write_video

    video = write_video(tmp_path / "clip.mp4", 320, 180, 12)  # 16:9: smart resize keeps the aspect ratio
    assert main(["answer", str(video), "What happens?", "--model", "qwen2.5-vl-tiny", "--frames", "6",
                 "--max-new-tokens", "3", "--ignore-eos", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"answer", "model", "method", "config", "metrics", "trace"}
    trace, metrics = result["trace"], result["metrics"]
    rows, columns = 168 // 28, 308 // 28  # 180x320 -> 168x308 (round to multiples of 28, under 448² pixels)
    assert (result["model"], trace["frames"], trace["tokens_per_frame"]) == ("qwen2.5-vl-tiny", 3, rows * columns)
    assert metrics["visual_tokens_in"] == 3 * rows * columns
    assert [len(mask) for mask in trace["ttm_keep_mask"]] == [rows * columns] * 3
    assert len(trace["frame_times_s"]) == 3 and len(trace["steps"]) == metrics["new_tokens"] - 1 == 2


@pytest.mark.parametrize("factor", [28, 32])
def test_grid_fit_equals_transformers_smart_resize(factor):
    fit = GridFit(factor, (2 * factor) ** 2, MAX_PIXELS)
    sides = [1, 17, 55, 56, 100, 180, 224, 320, 447, 448, 449, 720, 1080, 1920, 3840]
    for height in sides:
        for width in sides:
            if max(height, width) / min(height, width) <= 200:
                assert fit.size_for(height, width) == smart_resize(height, width, factor, fit.min_pixels,
                                                                   MAX_PIXELS), (height, width)


def test_decoder_keeps_the_aspect_ratio_on_qwen(tmp_path):
    from test_hostile import write_video

    video = write_video(tmp_path / "wide.mp4", 320, 180, 6)
    pipeline = Pipeline(load("qwen2.5-vl-tiny", device="cpu"))
    clip = pipeline.load_video(video, 4)
    full = load_video(video, 4, size=None).frames  # as decoded, then the processors' bicubic resize
    assert clip.frames.shape == (4, 168, 308, 3)
    assert all(np.array_equal(ours, resize_to(frame, 168, 308)) for ours, frame in zip(clip.frames, full))


QUESTIONS = ["What moves in this video?", "Which colour is it?", "Where does it go next?"]
# The Qwen-VL chat templates written out: the text before the video, then after it for the turns so far.
BEFORE_VIDEO = {"qwen2.5-vl-tiny": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                "qwen3-vl-tiny": "<|im_start|>user\n"}


def after_video(questions: list[str], answers: list[str]) -> str:
    text = questions[0] + "<|im_end|>\n<|im_start|>assistant\n"
    for answer, question in zip(answers, questions[1:]):
        text += f"{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return text


@pytest.fixture(scope="module", params=QWEN_PRESETS)
def qwen64(request) -> Pipeline:
    """float64, so that float noise (a prefill in one piece or in turns) cannot flip a greedy token."""
    return Pipeline(load(request.param, device="cpu", dtype=torch.float64))


def from_scratch(pipeline: Pipeline, clip, method: str, prompt: tuple[list[int], list[int]]) -> Result:
    chosen = get_method(method)
    settings = chosen.effective_config(DyCokeConfig())
    with torch.inference_mode():
        prepared = pipeline.prepare(clip, prompt, chosen, settings)
    events = pipeline.generate(prepared, clip, chosen, settings, 4, ignore_eos=False)
    return next(event for event in events if isinstance(event, Result))


def models_own_answer(pipeline: Pipeline, clip, prompt: tuple[list[int], list[int]], tokens: int) -> list[int]:
    """The model's own generate on input_ids + pixel_values_videos of the whole multi-turn prompt."""
    loaded, family = pipeline.loaded, pipeline.loaded.family
    layout = family.video_layout(loaded.model, loaded.tokenizer, *prompt, pipeline.geometry(clip), clip.timestamps,
                                 clip.fps)
    inputs = family.reference_inputs(loaded.model, layout, clip.frames, pipeline.geometry(clip))
    with torch.inference_mode():
        ids = loaded.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def small_clip():
    return moving_square_clip(4, size=112)  # two groups of 4x4 tokens on both families


@pytest.mark.parametrize("method", ["baseline", "ttm", "dp", "dycoke"])
def test_reused_turns_equal_a_from_scratch_run_of_the_template_prompt(qwen64, small_clip, method):
    clip = small_clip
    tokenizer = qwen64.loaded.tokenizer
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    before = encode(BEFORE_VIDEO[qwen64.loaded.name])
    conversation = Conversation(qwen64, clip, method, max_new_tokens=4)
    answers: list[str] = []
    for turn, question in enumerate(QUESTIONS):
        prompt = (before, encode(after_video(QUESTIONS[:turn + 1], answers)))
        assert conversation.prompt_ids(question) == prompt[1]
        result = conversation.answer(question)
        reference = from_scratch(qwen64, clip, method, prompt)
        assert result.token_ids == reference.token_ids, f"turn {turn + 1}"
        assert result.trace["steps"] == reference.trace["steps"]
        assert result.metrics["prefix_reused"] is (turn > 0)
        if method == "baseline" and turn == len(QUESTIONS) - 1:  # every position as the model's own path gives it
            assert result.token_ids == models_own_answer(qwen64, clip, prompt, len(result.token_ids))
        answer = result.token_ids[:-1] if result.token_ids[-1] == tokenizer.eos_token_id else result.token_ids
        answers.append(tokenizer.decode(answer))
