"""VisionZip (Yang et al., CVPR 2025) adapted to LLaVA-OneVision, whose SigLIP tower has no CLS token.

Per frame, before the language model:
- **dominant tokens**: the positions that receive the most attention in the vision tower's feature layer (the layer
  whose output the projector reads), averaged over heads and over all queries, since there is no CLS query;
- **contextual tokens**: the other positions are merged. Targets are picked uniformly among them (every
  `len // contextual`-th, in position order); each remaining token joins the target whose key (averaged over heads)
  is most cosine-similar; a contextual token is the plain mean of its target and members.

LLaVA-OneVision projects the 27x27 SigLIP patches and pools them bilinearly to 14x14 before the LLM. Selection and
merging happen on those 196 pooled, projected tokens: the attention received and the keys are pooled with the
model's own bilinear pooling, so a score or key describes exactly the patch area of the pooled token it ranks.
The attention is recomputed from the feature layer's input (its layer norm, q and k projections), in chunks of
frames; no vision layer runs with eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dycoke.config import ConfigError

ATTENTION_CHUNK_ELEMENTS = 2**26  # bound on the [frames, heads, P, P] attention probabilities held at once


@dataclass(frozen=True)
class FrameZip:
    """One frame's result: dominant positions, contextual targets, and which target each merged position joined."""

    dominant: torch.Tensor  # [d] pooled positions, ascending
    targets: torch.Tensor  # [c] pooled positions, ascending
    merged: torch.Tensor  # [m] the remaining pooled positions, ascending
    assignment: torch.Tensor  # [m] index into targets of each merged position
    tokens: torch.Tensor  # [d + c, D]: the dominant features in position order, then the contextual means


def feature_layer_index(model: torch.nn.Module) -> int:
    """Index into the vision tower's hidden states of the features the projector reads (0 = embeddings)."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError("visionzip needs a single vision_feature_layer; this model concatenates several")
    count = model.config.vision_config.num_hidden_layers + 1
    index = layer % count
    if index == 0:
        raise ConfigError("visionzip needs the features of an attention layer, not the patch embeddings")
    return index


def pooled_statistics(model: torch.nn.Module, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention received [T, N] and head-mean keys [T, N, head_dim] of the feature layer, pooled like the features.

    `layer_input` [T, P, Dv] is the hidden state entering the feature layer (P = 27x27 patches).
    """
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    layer = layers[feature_layer_index(model) - 1]
    attention = layer.self_attn
    frames, patches, _ = layer_input.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    chunk = max(1, ATTENTION_CHUNK_ELEMENTS // (heads * patches * patches))
    received, keys = [], []
    for start in range(0, frames, chunk):
        normed = layer.layer_norm1(layer_input[start:start + chunk])
        query = attention.q_proj(normed).view(-1, patches, heads, head_dim).transpose(1, 2).float()
        key = attention.k_proj(normed).view(-1, patches, heads, head_dim).transpose(1, 2).float()
        probabilities = (torch.matmul(query, key.transpose(-1, -2)) * attention.scale).softmax(dim=-1)
        received.append(probabilities.mean(dim=(1, 2)))  # over heads and queries: attention each patch receives
        keys.append(key.mean(dim=1))
    received, keys = torch.cat(received), torch.cat(keys)
    if model.config.vision_feature_select_strategy == "default":  # the features drop the first token; so do we
        received, keys = received[:, 1:], keys[:, 1:]
    pool = model.model.apply_pooling
    return pool(received[..., None])[..., 0], pool(keys)


def zip_frame(features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int,
              contextual: int) -> FrameZip:
    """Keep the `dominant` top-scored tokens of one frame and merge the rest into `contextual` mean tokens."""
    positions = features.shape[0]
    if dominant + contextual > positions:
        raise ConfigError(f"visionzip keeps dominant + contextual = {dominant + contextual} tokens per frame, "
                          f"more than the {positions} a frame has")
    device = features.device
    top = torch.topk(scores, dominant, sorted=False).indices
    kept = torch.zeros(positions, dtype=torch.bool, device=device)
    kept[top] = True
    rest = (~kept).nonzero()[:, 0]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
    if contextual:
        step = max(1, rest.numel() // contextual)
        is_target[torch.arange(0, rest.numel(), step, device=device)[:contextual]] = True
    targets = rest[is_target]
    merged = rest[~is_target] if contextual else rest[:0]  # without contextual tokens the rest is dropped
    if contextual:
        unit_keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        assignment = torch.matmul(unit_keys[merged], unit_keys[targets].T).argmax(dim=1)
    else:
        assignment = torch.zeros(0, dtype=torch.long, device=device)
    sums = features[targets].float().index_add(0, assignment, features[merged].float())
    members = 1 + torch.bincount(assignment, minlength=targets.numel())
    contextual_tokens = (sums / members[:, None]).to(features.dtype)
    dominant_positions = kept.nonzero()[:, 0]
    tokens = torch.cat([features[dominant_positions], contextual_tokens])
    return FrameZip(dominant_positions, targets, merged, assignment, tokens)
