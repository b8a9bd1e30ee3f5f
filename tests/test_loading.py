"""Loading real checkpoints without real weights: old key names, missing tensors, offline Hub ids, bad paths, and the
context check; plus the pipeline's inputs_embeds path against the model's own input_ids + pixel_values_videos."""

from __future__ import annotations

import re
import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from conftest import moving_square_clip
from dycoke.config import DyCokeConfig
from dycoke.conversation import Conversation
from dycoke.limits import RequestError
from dycoke.methods import get_method
from dycoke.models import ModelLoadError, build_tokenizer, load
from dycoke.pipeline import encode_prompt
from dycoke.video import to_pixel_values

QUESTION = "What moves in this video?"

# transformers 4.45 saved LLaVA-OneVision's weights under these prefixes (5.x renames them when loading).
OLD_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),  # 5.x dropped the SigLIP wrapper's prefix
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]


def small_llava(tied: bool) -> tuple[LlavaOnevisionForConditionalGeneration, object]:
    """A small LLaVA-OneVision, tied like the 0.5B checkpoint or untied like the 7B one."""
    tokenizer = build_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, vision_use_head=False),
        text_config=Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=len(tokenizer), tie_word_embeddings=tied),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=tied,
    )
    torch.manual_seed(1)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # a visible newline: the default initialisation leaves it at zero
        model.model.image_newline.normal_()
    return model, tokenizer


def save_checkpoint(directory, model, tokenizer, rename=lambda key: key, drop: str | None = None) -> None:
    tensors = {rename(key): value.contiguous() for key, value in model.state_dict().items() if key != drop}
    if model.config.tie_word_embeddings:
        tensors.pop(rename("lm_head.weight"), None)  # a tied checkpoint stores the embeddings once
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def old_name(key: str) -> str:
    for new, old in OLD_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(f"no 4.45 name for {key}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied-0.5b-layout", "untied-7b-layout"])
def test_old_key_names_load_with_no_differing_tensor(tmp_path, tied):
    model, tokenizer = small_llava(tied)
    save_checkpoint(tmp_path, model, tokenizer, rename=old_name)
    loaded = load(str(tmp_path), device="cpu")
    assert not loaded.is_random
    expected, got = model.state_dict(), loaded.model.state_dict()
    assert set(got) == set(expected)
    assert [key for key in expected if not torch.equal(got[key], expected[key])] == []
    assert (loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight) == tied


def test_a_checkpoint_missing_one_tensor_is_refused_by_name(tmp_path):
    model, tokenizer = small_llava(tied=True)
    missing = "model.language_model.layers.1.mlp.down_proj.weight"
    save_checkpoint(tmp_path, model, tokenizer, drop=missing)
    with pytest.raises(ModelLoadError, match=re.escape(f"misses 1 weight(s): {missing}")):
        load(str(tmp_path), device="cpu")


def test_a_missing_local_directory_is_named_as_a_path(tmp_path):
    absent = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"^model directory {re.escape(str(absent))} does not exist"):
        load(str(absent), device="cpu")


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_hub_ids_fail_fast_in_one_line(monkeypatch, how):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # nothing listens on port 9 of this machine: the connection is refused at once
        from huggingface_hub import constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as refused:
        load("Qwen/Qwen2.5-VL-7B-Instruct", device="cpu")
    assert time.perf_counter() - started < 5
    message = str(refused.value)
    assert "\n" not in message and "cannot be reached" in message and "Qwen/Qwen2.5-VL-7B-Instruct" in message


def prompt_tokens(tokenizer, new_tokens: int) -> int:
    """Every position of a request but the video's frame tokens: the prompt, the newline token and the answer."""
    prefix, suffix = encode_prompt(tokenizer, QUESTION)
    return len(prefix) + 1 + len(suffix) + new_tokens


def dycoke_visual_tokens(frames: int, per_frame: int = 196) -> int:
    """TTM at the paper's K=0.7, W=4: each window's first frame whole, the others floor(0.3 x 196) = 58 tokens."""
    anchors = -(-frames // 4)
    return anchors * per_frame + (frames - anchors) * 58


@pytest.fixture(scope="module")
def clip256():
    return moving_square_clip(256, size=32)


@pytest.fixture()
def no_vision_work(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline, "vision_features", lambda *a, **k: pytest.fail("vision work before the check"))


def test_frames_beyond_the_context_are_refused_saying_how_many_fit(pipeline, tiny_random, clip256, no_vision_work):
    fixed = prompt_tokens(tiny_random.tokenizer, 64)
    fit = (32768 - fixed) // 196
    assert fit * 196 + fixed <= 32768 < (fit + 1) * 196 + fixed
    expected = f"^256 frames give 50,176 visual tokens with baseline; .*: use {fit} frames or fewer$"
    with pytest.raises(RequestError, match=expected):
        pipeline.answer(clip256, QUESTION, method="baseline", max_new_tokens=64)
    with pytest.raises(RequestError, match=expected):  # a conversation's first turn, as the app asks it
        Conversation(pipeline, clip256, "baseline", max_new_tokens=64).answer(QUESTION)


def test_the_context_check_counts_the_tokens_the_method_feeds_the_model(pipeline, tiny_random):
    """DyCoke's TTM leaves 23,680 of 50,176 tokens at 256 frames: they fit 32,768 positions; under a smaller
    context the frames that fit are those of DyCoke's own budget."""
    fixed = prompt_tokens(tiny_random.tokenizer, 64)
    dycoke, config = get_method("dycoke"), DyCokeConfig()
    assert dycoke_visual_tokens(256) == 23_680 and dycoke_visual_tokens(256) + fixed <= 32768
    pipeline.check_context(dycoke, config, config, 256, fixed - 1 - 64, 64)  # accepted
    context = 12_000
    fit = max(frames for frames in range(1, 257) if dycoke_visual_tokens(frames) + fixed <= context)
    with pytest.raises(RequestError, match=f"^256 frames give 23,680 visual tokens with dycoke; with the prompt "
                                           f"and 64 new tokens that is {23_680 + fixed:,}, over this model's context "
                                           f"of 12,000 positions: use {fit} frames or fewer$"):
        pipeline.check_context(dycoke, config, config, 256, fixed - 1 - 64, 64, context=context)


def test_inputs_embeds_path_gives_the_models_own_logits(pipeline, tiny_random, clip8):
    """The pipeline's vision path, newline and prompt embeddings against the model's own input_ids with one
    <video> token per frame token and the newline, and pixel_values_videos."""
    model = tiny_random.model
    prefix, suffix = encode_prompt(tiny_random.tokenizer, QUESTION)
    video = [model.config.video_token_id] * (clip8.num_frames * 196 + 1)
    ids = torch.tensor([prefix + video + suffix])
    pixels = to_pixel_values(clip8.frames, model.config.vision_config.image_size)
    with torch.inference_mode():
        prepared = pipeline.prepare(clip8, (prefix, suffix), get_method("baseline"), DyCokeConfig())
        ours = model(inputs_embeds=prepared.embeds).logits
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels[None]).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.equal(ours, theirs)
