"""LLaVA-OneVision (the paper's model): SigLIP frames pooled to 14x14, one newline token after the video, 1-D RoPE."""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from dycoke.families import Family, Geometry, ModelInputs, PromptLayout, VideoFeatures
from dycoke.video import to_pixel_values
from dycoke.visionzip import feature_layer_index

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


class LlavaOneVision(Family):
    name = "llava-onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    model_types = ("llava_onevision",)
    before_video = SYSTEM_TURN
    after_video = "\n"  # after the video's own newline token

    def geometry(self, model: torch.nn.Module, num_frames: int, height: int, width: int) -> Geometry:
        vision = model.config.vision_config
        side = (vision.image_size // vision.patch_size + 1) // 2  # 27x27 patches pooled bilinearly to 14x14
        return Geometry(groups=num_frames, grid_h=side, grid_w=side, extra_tokens=1)

    def decode_size(self, config) -> int:
        return config.vision_config.image_size

    def encode(self, model: torch.nn.Module, frames, geometry: Geometry,
               with_layer_input: bool = False) -> VideoFeatures:
        vision = model.model.vision_tower
        pixels = to_pixel_values(frames, model.config.vision_config.image_size,
                                 device=next(vision.parameters()).device, dtype=model.dtype)
        capture = {}
        if with_layer_input:  # hidden states are counted from the embeddings: index i enters layer i
            index = feature_layer_index(model)
            capture["output_hidden_states"] = [index - 1, index]
        outputs = model.get_video_features(
            pixel_values_videos=pixels[None],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            **capture,
        )
        features = outputs.pooler_output[0]
        frame_tokens = features[:-1].view(geometry.groups, geometry.tokens_per_group, -1)
        layer_input = outputs.hidden_states[index - 1] if capture else None
        return VideoFeatures(frame_tokens, layer_input, {"newline": features[-1]})

    def video_layout(self, model: torch.nn.Module, tokenizer, before: list[int], after: list[int],
                     geometry: Geometry, timestamps: tuple[float, ...], fps: float) -> PromptLayout:
        video = [model.config.video_token_id] * (geometry.frame_tokens + geometry.extra_tokens)
        ids = torch.tensor(before + video + after, dtype=torch.long)
        return PromptLayout(ids, len(before) + torch.arange(geometry.frame_tokens))

    def model_inputs(self, model: torch.nn.Module, layout: PromptLayout, features: VideoFeatures,
                     compressed) -> ModelInputs:
        """Text, the kept (or merged) visual tokens as one run, the newline, text: positions are 1-D, in order."""
        embed = model.get_input_embeddings()
        device = embed.weight.device
        start = int(layout.frame_slots[0])
        end = int(layout.frame_slots[-1]) + 1 + 1  # the newline slot follows the frame tokens
        prefix, suffix = layout.input_ids[:start].to(device), layout.input_ids[end:].to(device)
        tokens = compressed.tokens.to(device)
        newline = features.extras["newline"].to(device)
        embeds = torch.cat([embed(prefix), tokens, newline[None], embed(suffix)])[None]
        return ModelInputs(embeds, start + torch.arange(tokens.shape[0], device=device))

    def reference_inputs(self, model: torch.nn.Module, layout: PromptLayout, frames, geometry: Geometry) -> dict:
        pixels = to_pixel_values(frames, model.config.vision_config.image_size).to(model.device, model.dtype)
        ids = layout.input_ids[None].to(model.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels[None]}


LLAVA_ONEVISION = LlavaOneVision()


def encode_prompt(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the video (its frame tokens and the newline)."""
    return LLAVA_ONEVISION.prompt_ids(tokenizer, question)
