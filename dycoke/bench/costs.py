"""Analytic costs of a request (matmul FLOPs, weight and KV bytes) and the physical limits they imply.

A decode step cannot beat (weight bytes + attended KV bytes) / memory bandwidth; prefill cannot beat
FLOPs / peak FLOP/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dycoke.bench.devices import DeviceSpec
from dycoke.families import Geometry


@dataclass(frozen=True)
class TextDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "TextDims":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads, kv_heads,
                   head_dim, config.vocab_size)

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in one decoder layer: q, k, v, o and the gated MLP."""
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q_width + 2 * self.hidden * kv_width + 3 * self.hidden * self.intermediate


def prefill_flops(config, seq_len: int | Sequence[int], logits_tokens: int = 1) -> int:
    """Matmul FLOPs of the language model's prefill over seq_len tokens (Qwen2 text config).

    2 FLOPs per multiply-add: 2·S·(layer weights) per layer, causal attention QK^T and AV over S(S+1)/2 query-key
    pairs, and the LM head for the `logits_tokens` positions whose logits are computed (generate asks for 1).
    `seq_len` is one length, or one per layer for a method that shortens the sequence inside the model (FastV).
    Norms, rotary and softmax are left out: they are O(S·hidden), far below the matmuls.
    """
    dims = TextDims.of(config)
    lengths = [seq_len] * dims.layers if isinstance(seq_len, int) else list(seq_len)
    if len(lengths) != dims.layers:
        raise ValueError(f"seq_len has {len(lengths)} entries for {dims.layers} layers")
    total = 0
    for length in lengths:
        linear = 2 * length * dims.layer_matmul_params
        attention = 2 * 2 * dims.heads * dims.head_dim * (length * (length + 1) // 2)
        total += linear + attention
    return total + 2 * logits_tokens * dims.hidden * dims.vocab


def decode_flops(config, keys_per_layer: int | Sequence[float], scored_keys: int = 0) -> float:
    """Matmul FLOPs of one decoding step: one token through every layer, attending `keys_per_layer` keys.

    `keys_per_layer` is one count for all layers, or one per layer (DP attends fewer keys from layer L on).
    `scored_keys` > 0 adds DP's scoring at layer L-1: QK^T over those keys (the query and keys are the layer's own,
    handed to DP's attention function, so nothing is projected twice).
    """
    dims = TextDims.of(config)
    keys = [keys_per_layer] * dims.layers if isinstance(keys_per_layer, (int, float)) else list(keys_per_layer)
    if len(keys) != dims.layers:
        raise ValueError(f"keys_per_layer has {len(keys)} entries for {dims.layers} layers")
    linear = 2 * dims.layers * dims.layer_matmul_params
    attention = sum(2 * 2 * dims.heads * dims.head_dim * k for k in keys)
    scoring = 0
    if scored_keys:
        scoring = 2 * dims.heads * dims.head_dim * scored_keys
    return linear + attention + 2 * dims.hidden * dims.vocab + scoring


def vision_flops(vision_config, frames: int, text_hidden: int) -> int:
    """Matmul FLOPs of SigLIP on `frames` frames, plus LLaVA-OneVision's two-layer projector.

    Per frame: the patch embedding, then per layer 2·P·(4d² + 2d·I) for the projections and MLP and 4·P²·d for
    full (non-causal) attention, with P = (image/patch)² patches; the pooling head when the config has one; the
    projector maps every patch d -> h -> h before the 2x2 pooling.
    """
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    d, inner = vision_config.hidden_size, vision_config.intermediate_size
    embed = 2 * patches * 3 * vision_config.patch_size**2 * d
    layer = 2 * patches * (4 * d * d + 2 * d * inner) + 4 * patches * patches * d
    head = 0
    if getattr(vision_config, "vision_use_head", False):  # one probe query over all patches, MLP on it
        head = 2 * patches * 2 * d * d + 4 * patches * d + 2 * (2 * d * d + 2 * d * inner)
    projector = 2 * patches * (d * text_hidden + text_hidden * text_hidden)
    return frames * (embed + vision_config.num_hidden_layers * layer + head + projector)


def window_sides(side: int, window: int) -> list[int]:
    """Merged tokens per window along one side: full windows, then the remainder (Qwen2.5-VL's window index)."""
    return [window] * (side // window) + ([side % window] if side % window else [])


def qwen_vision_flops(vision_config, geometry: Geometry) -> int:
    """Matmul FLOPs of Qwen2.5-VL's or Qwen3-VL's vision tower and mergers on a clip of `geometry`.

    Per temporal group of P = grid_h·grid_w·m² patches (m the spatial merge): the 3-D patch embedding
    2·P·(3·tp·p²)·d, per layer 2·P·(4d² + MLP) with a gated MLP (3·d·I, Qwen2.5-VL) or a plain one (2·d·I,
    Qwen3-VL), and attention 4·d·Σ L² over the sequences it runs on: the whole group, or on Qwen2.5-VL's windowed
    layers each window of (window_size / p / m)² merged tokens (m⁴·Σ rows²·Σ columns² in patches²). Each merger
    maps the grid_h·grid_w merged tokens d·m² -> d·m² -> out: one, plus one per DeepStack layer on Qwen3-VL.
    """
    d, inner, merge = vision_config.hidden_size, vision_config.intermediate_size, vision_config.spatial_merge_size
    patches = geometry.tokens_per_group * merge**2
    embed = 2 * patches * 3 * vision_config.temporal_patch_size * vision_config.patch_size**2 * d
    full_layers = getattr(vision_config, "fullatt_block_indexes", None)
    windowed = full_layers is not None  # Qwen2.5-VL: windowed attention and a gated MLP
    mlp = (3 if windowed else 2) * d * inner
    layers = vision_config.depth * 2 * patches * (4 * d * d + mlp)
    pairs = [patches**2] * vision_config.depth
    if windowed:
        window = vision_config.window_size // vision_config.patch_size // merge
        rows = sum(r * r for r in window_sides(geometry.grid_h, window))
        columns = sum(c * c for c in window_sides(geometry.grid_w, window))
        pairs = [pairs[layer] if layer in full_layers else merge**4 * rows * columns
                 for layer in range(vision_config.depth)]
    attention = 4 * d * sum(pairs)
    merged_width = d * merge**2
    mergers = 1 + len(getattr(vision_config, "deepstack_visual_indexes", None) or ())
    merger = 2 * geometry.tokens_per_group * (merged_width**2 + merged_width * vision_config.out_hidden_size)
    return geometry.groups * (embed + layers + attention + mergers * merger)


def model_vision_flops(config, geometry: Geometry) -> int:
    """Vision FLOPs of a clip of `geometry` on a model of `config`, whatever its family."""
    vision = config.vision_config
    if hasattr(vision, "temporal_patch_size"):
        return qwen_vision_flops(vision, geometry)
    return vision_flops(vision, geometry.groups, config.text_config.hidden_size)


def kv_bytes(config, keys_per_layer: int | Sequence[float], bytes_per_value: int) -> float:
    """Bytes of K and V for `keys_per_layer` positions (one count, or one per layer)."""
    dims = TextDims.of(config)
    keys = [keys_per_layer] * dims.layers if isinstance(keys_per_layer, (int, float)) else list(keys_per_layer)
    return sum(2 * dims.kv_heads * dims.head_dim * bytes_per_value * k for k in keys)


def model_weights(model: torch.nn.Module) -> dict:
    """Bytes of all parameters (resident) and of what a decode step reads: the language model's layers and norm,
    and the LM head; of the input embeddings only one row, unless they are the head (tied)."""
    head = model.get_output_embeddings()
    read = {id(p): p for p in model.get_decoder().parameters()}
    for p in model.get_input_embeddings().parameters():
        read.pop(id(p), None)
    if head is not None:
        read |= {id(p): p for p in head.parameters()}
    return {"all": sum(p.nbytes for p in model.parameters()), "language": sum(p.nbytes for p in read.values())}


def dims_dict(dims: TextDims) -> dict:
    return {name: getattr(dims, name) for name in TextDims.__dataclass_fields__}


def physical_limits(device: DeviceSpec, language_weight_bytes: int, attended_kv_bytes: float, flops: dict,
                    new_tokens: int) -> dict:
    """Lower bounds in ms: a decode step reads every LM weight and the attended KV once; prefill does its FLOPs."""
    decode_ms = 1000.0 * (language_weight_bytes + attended_kv_bytes) / device.bandwidth_bytes_per_s
    prefill_ms = 1000.0 * flops["prefill"] / device.peak_flops_per_s
    # Prefill and the vision tower each also read their weights once; FLOPs dominate for any real clip.
    ttft_ms = 1000.0 * (flops["vision"] + flops["prefill"]) / device.peak_flops_per_s
    return {
        "device": device.name,
        "decode_step_ms": decode_ms,
        "prefill_ms": prefill_ms,
        "ttft_ms": ttft_ms,
        "latency_ms": ttft_ms + (new_tokens - 1) * decode_ms,
    }
