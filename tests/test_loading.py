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
from dycoke.limits import RequestError
from dycoke.methods import get_method
from dycoke.models import ModelLoadError, build_tokenizer, load
from dycoke.pipeline import encode_prompt

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


def test_frames_beyond_the_context_are_refused_saying_how_many_fit(pipeline, tiny_random):
    clip = moving_square_clip(256, size=32)
    prefix, suffix = encode_prompt(tiny_random.tokenizer, QUESTION)
    fixed = len(prefix) + 1 + len(suffix) + 64  # the newline token and the answer
    fit = (tiny_random.model.config.text_config.max_position_embeddings - fixed) // 196
    with pytest.raises(RequestError, match=f"^256 frames give 50,176 visual tokens.*: use {fit} frames or fewer$"):
        pipeline.answer(clip, QUESTION, max_new_tokens=64)
    assert fit * 196 + fixed <= 32768 < (fit + 1) * 196 + fixed


def test_inputs_embeds_path_gives_the_models_own_logits(pipeline, tiny_random, clip8):
    family, model = tiny_random.family, tiny_random.model
    geometry = pipeline.geometry(clip8)
    layout = family.layout(model, tiny_random.tokenizer, QUESTION, geometry, clip8.timestamps, clip8.fps)
    with torch.inference_mode():
        prepared = pipeline.prepare(clip8, QUESTION, get_method("baseline"), DyCokeConfig())
        ours = model(inputs_embeds=prepared.embeds, **prepared.generate_kwargs).logits
        theirs = model(**family.reference_inputs(model, layout, clip8.frames, geometry)).logits
    assert torch.equal(ours, theirs)
