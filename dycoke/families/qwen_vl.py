"""Qwen2.5-VL and Qwen3-VL: two frames per temporal patch, 2x2 patches merged per token, 3-D M-RoPE positions.

A "frame" of TTM, DP's traces and the heatmaps is one temporal group (two video frames). The frames are resized
to the patch grid (smart resize, aspect ratio kept, at most MAX_PIXELS pixels) and patchified here, without
torchvision. Positions come from the model's own `get_rope_index` on the full layout; the kept tokens keep theirs,
so the text after the video and every decoded token sit where they would without compression.
Qwen3-VL writes each group's timestamp as text before it and adds DeepStack features to its first layers; both
follow its own processor and forward (the kept tokens' DeepStack rows go through `mm_encoder_outputs`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from dycoke.families import (
    Family, Geometry, ModelInputs, PromptLayout, VideoFeatures, kept_layout_index, refuse, text_ids,
)
from dycoke.video import GridFit

# The models' video processors sample 2 fps and allow up to 768·28² pixels a frame; we fix 448² a frame (16x16
# tokens per group on Qwen2.5-VL, 14x14 on Qwen3-VL for a square clip) and the CLI's 32 frames, so that a clip
# costs about as many tokens as on LLaVA-OneVision.
MAX_PIXELS = 448 * 448
MIN_GRID = 2  # merged tokens per side, at least
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
VIDEO_TYPE = 2  # mm_token_type_ids: 0 text, 1 image, 2 video
USER_TURN = "<|im_start|>user\n"


class QwenVL(Family):
    """What Qwen2.5-VL and Qwen3-VL share; the subclasses differ in the prompt, the pixels' statistics and DeepStack."""

    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def factor(self, model: torch.nn.Module) -> int:
        vision = model.config.vision_config
        return vision.patch_size * vision.spatial_merge_size

    def decode_size(self, config) -> GridFit:
        """Multiples of patch·merge, aspect kept, at most MAX_PIXELS: the processors' smart resize."""
        factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        return GridFit(factor, (MIN_GRID * factor) ** 2, MAX_PIXELS)

    def frame_size(self, model: torch.nn.Module, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the resized frames."""
        return self.decode_size(model.config).size_for(height, width)

    def geometry(self, model: torch.nn.Module, num_frames: int, height: int, width: int) -> Geometry:
        vision = model.config.vision_config
        resized_h, resized_w = self.frame_size(model, height, width)
        factor = self.factor(model)
        groups = math.ceil(num_frames / vision.temporal_patch_size)
        return Geometry(groups, resized_h // factor, resized_w // factor, vision.temporal_patch_size)

    def grid_thw(self, model: torch.nn.Module, geometry: Geometry) -> torch.Tensor:
        merge = model.config.vision_config.spatial_merge_size
        return torch.tensor([[geometry.groups, geometry.grid_h * merge, geometry.grid_w * merge]])

    def pixel_values(self, model: torch.nn.Module, frames: np.ndarray, geometry: Geometry) -> torch.Tensor:
        """[groups·grid_h·grid_w patches, C·temporal·patch·patch]: the layout of the models' video processors."""
        vision = model.config.vision_config
        merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        pixels = torch.from_numpy(normalized_frames(frames, self.frame_size(model, *frames.shape[1:3]),
                                                    self.image_mean, self.image_std))
        if pad := -len(pixels) % temporal:  # the processors repeat the last frame to fill the last group
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        channels = pixels.shape[1]
        rows, columns = geometry.grid_h, geometry.grid_w
        patches = pixels.view(geometry.groups, temporal, channels, rows, merge, patch, columns, merge, patch)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(geometry.groups * rows * merge * columns * merge, channels * temporal * patch * patch)

    def encode(self, model: torch.nn.Module, frames, geometry: Geometry,
               with_layer_input: bool = False) -> VideoFeatures:
        pixels = self.pixel_values(model, frames, geometry)
        visual = model.model.visual
        pixels = pixels.to(device=next(visual.parameters()).device, dtype=visual.dtype)
        outputs = model.model.get_video_features(pixels, self.grid_thw(model, geometry).to(pixels.device))
        tokens = outputs.pooler_output[0].view(geometry.groups, geometry.tokens_per_group, -1)
        return VideoFeatures(tokens, extras=self.feature_extras(outputs))

    def feature_extras(self, outputs) -> dict:
        return {}

    def video_text(self, tokenizer, model: torch.nn.Module, geometry: Geometry,
                   timestamps: tuple[float, ...]) -> list[int]:
        raise NotImplementedError

    def video_layout(self, model: torch.nn.Module, tokenizer, before: list[int], after: list[int],
                     geometry: Geometry, timestamps: tuple[float, ...], fps: float) -> PromptLayout:
        ids = torch.tensor(before + self.video_text(tokenizer, model, geometry, timestamps) + after, dtype=torch.long)
        is_video = ids == model.config.video_token_id
        mm_token_type_ids = is_video.long() * VIDEO_TYPE
        rope_inputs = self.rope_kwargs(geometry, timestamps, fps)
        positions, _ = model.model.get_rope_index(
            ids[None], mm_token_type_ids[None], video_grid_thw=self.grid_thw(model, geometry), **rope_inputs
        )
        return PromptLayout(ids, is_video.nonzero()[:, 0], positions[:, 0], mm_token_type_ids, rope_inputs)

    def rope_kwargs(self, geometry: Geometry, timestamps: tuple[float, ...], fps: float) -> dict:
        return {}

    def video_text_tokens(self, tokenizer, model: torch.nn.Module, geometry: Geometry,
                          timestamps: tuple[float, ...]) -> int:
        """The vision markers and, on Qwen3-VL, each group's timestamp."""
        return len(self.video_text(tokenizer, model, geometry, timestamps)) - geometry.frame_tokens

    def model_inputs(self, model: torch.nn.Module, layout: PromptLayout, features: VideoFeatures,
                     compressed) -> ModelInputs:
        if compressed.token_index is None:
            raise refuse("a method whose tokens stand for no position", "Qwen-VL's M-RoPE needs each visual "
                                                                         "token's position")
        embed = model.get_input_embeddings()
        device = embed.weight.device
        keep, visual_rows = kept_layout_index(layout, compressed.token_index)
        embeds = self.place_tokens(embed(layout.input_ids.to(device)[keep.to(device)]), visual_rows.to(device),
                                   compressed.tokens.to(device))
        kwargs = {"position_ids": layout.positions[:, keep][:, None].to(device)}
        return ModelInputs(embeds[None], visual_rows.to(device),
                           kwargs | self.extra_inputs(features, compressed.token_index))

    def place_tokens(self, embeds: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        embeds[rows] = tokens.to(embeds.dtype)
        return embeds

    def extra_inputs(self, features: VideoFeatures, token_index: torch.Tensor) -> dict:
        return {}

    def reference_inputs(self, model: torch.nn.Module, layout: PromptLayout, frames, geometry: Geometry) -> dict:
        ids = layout.input_ids[None].to(model.device)
        pixels = self.pixel_values(model, frames, geometry).to(model.device, model.dtype)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels,
                  "video_grid_thw": self.grid_thw(model, geometry).to(model.device),
                  "mm_token_type_ids": layout.mm_token_type_ids[None].to(model.device)}
        return inputs | {name: value.to(model.device) for name, value in layout.rope_inputs.items()}

    def group_times(self, timestamps: tuple[float, ...], geometry: Geometry) -> list[float]:
        """Each group's time: the mean of its first and last frame, as Qwen3-VL's processor writes it."""
        size = geometry.frames_per_group
        padded = list(timestamps) + [timestamps[-1]] * (-len(timestamps) % size)
        return [(padded[i] + padded[i + size - 1]) / 2 for i in range(0, len(padded), size)]

    def check_method(self, method, model: torch.nn.Module) -> None:
        if method.name == "visionzip":
            raise refuse("visionzip", "its adaptation reads LLaVA-OneVision's SigLIP feature layer and 14x14 "
                                      "pooling; Qwen-VL's windowed tower and 2x2 merger are not adapted")
        if method.needs_vision_states:
            raise refuse(method.name, "it scores tokens by the attention of LLaVA-OneVision's SigLIP feature "
                                      "layer, which Qwen-VL's vision tower does not have")

    def describe(self, model: torch.nn.Module) -> str:
        return f"{self.name} (M-RoPE, {model.config.vision_config.temporal_patch_size} frames per group)"


class Qwen2_5VL(QwenVL):
    name = "qwen2.5-vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    model_types = ("qwen2_5_vl",)
    before_video = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + USER_TURN
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def video_text(self, tokenizer, model, geometry, timestamps) -> list[int]:
        pads = [model.config.video_token_id] * geometry.frame_tokens
        return text_ids(tokenizer, "<|vision_start|>") + pads + text_ids(tokenizer, "<|vision_end|>")

    def rope_kwargs(self, geometry: Geometry, timestamps: tuple[float, ...], fps: float) -> dict:
        """Seconds per group, from the sampled frames' spacing, as the processor's temporal_patch_size / fps."""
        span = timestamps[-1] - timestamps[0] if len(timestamps) > 1 else 0.0
        sampled_fps = (len(timestamps) - 1) / span if span > 0 else (fps if fps > 0 else 2.0)
        return {"second_per_grid_ts": torch.tensor([geometry.frames_per_group / sampled_fps])}


class Qwen3VL(QwenVL):
    name = "qwen3-vl"
    model_class = Qwen3VLForConditionalGeneration
    model_types = ("qwen3_vl",)
    before_video = USER_TURN  # Qwen3-VL's chat template adds no default system turn
    image_mean, image_std = HALF, HALF

    def video_text(self, tokenizer, model, geometry, timestamps) -> list[int]:
        """The chat template's <|vision_start|><|video_pad|><|vision_end|>, its pad replaced by the processor with
        `<t seconds><|vision_start|>pads<|vision_end|>` per group."""
        pads = [model.config.video_token_id] * geometry.tokens_per_group
        start, end = text_ids(tokenizer, "<|vision_start|>"), text_ids(tokenizer, "<|vision_end|>")
        stamps = [f"<{seconds:.1f} seconds><|vision_start|>" for seconds in self.group_times(timestamps, geometry)]
        ids = list(start)
        for stamp in tokenizer(stamps, add_special_tokens=False).input_ids:  # one call: the context check counts often
            ids += stamp + pads + end
        return ids + end

    def feature_extras(self, outputs) -> dict:
        return {"deepstack": [features[0] for features in outputs.deepstack_features]}

    def place_tokens(self, embeds, rows, tokens) -> torch.Tensor:
        return embeds  # the placeholders stay: the model's forward scatters the tokens and their DeepStack rows

    def extra_inputs(self, features: VideoFeatures, token_index: torch.Tensor) -> dict:
        return {"mm_encoder_outputs": {"video": BaseModelOutputWithDeepstackFeatures(
            pooler_output=(features.frame_tokens.flatten(0, 1)[token_index],),
            deepstack_features=[(layer[token_index],) for layer in features.extras["deepstack"]],
        )}}

    def check_method(self, method, model: torch.nn.Module) -> None:
        super().check_method(method, model)
        deepstack = len(model.config.vision_config.deepstack_visual_indexes)
        if method.name == "fastv" and method.layer < deepstack:
            raise refuse("fastv", f"Qwen3-VL adds DeepStack features to the visual tokens after each of its first "
                                  f"{deepstack} layers; use fastv_layer >= {deepstack}")


def normalized_frames(frames: np.ndarray, size: tuple[int, int], mean, std) -> np.ndarray:
    """Bicubic resize to (height, width), rescale to [0, 1] and normalise, as the PIL image processor does:
    float32 [T, 3, H, W]."""
    height, width = size
    resized = np.stack([np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.BICUBIC))
                        for frame in frames])
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))


QWEN2_5_VL = Qwen2_5VL()
QWEN3_VL = Qwen3VL()
