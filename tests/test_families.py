"""Qwen2.5-VL and Qwen3-VL adapters: preprocessing against the models' own PIL image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dycoke.families.qwen_vl import MAX_PIXELS, QWEN2_5_VL, QWEN3_VL
from dycoke.models import load


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
