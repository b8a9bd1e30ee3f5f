"""DP, dynamic KV-cache pruning (DESIGN.md §2.2), as a per-request cache plus one scoring hook per attention layer.

At each decoding step, a pre-hook on layer L-1's attention scores the new token's query against that layer's
cached keys. The cache turns the scores into a selection of visual tokens and, for layers >= L, returns a compact
view: every non-visual token plus the selected visual ones. The full cache is kept, so a token pruned at one step
can come back at a later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from dycoke.ttm import kept_count

HOOK_MARKER = "_dycoke_scoring_hook"


@dataclass(frozen=True)
class StepRecord:
    """What the newest token attended to at layers >= L in one decoding step."""

    kept_per_frame: list[int]
    reselected: bool


class DyCokeCache(DynamicCache):
    """A DynamicCache that prunes visual tokens at decode time; all per-request DP state lives here."""

    def __init__(
        self,
        visual_start: int,
        frame_of_visual: torch.Tensor,
        num_frames: int,
        prune_layer: int,
        prune_ratio: float,
        reselect_threshold: float,
    ) -> None:
        super().__init__()
        self.visual_start = visual_start
        self.visual_end = visual_start + frame_of_visual.numel()
        self.frame_of_visual = frame_of_visual
        self.num_frames = num_frames
        self.prune_layer = prune_layer
        self.reselect_threshold = reselect_threshold
        self.keep_visual = kept_count(frame_of_visual.numel(), prune_ratio)
        self.pruning = prune_ratio > 0 and frame_of_visual.numel() > 0
        self.previous_scores: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.stale_layers: set[int] = set()
        self.compact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps: list[StepRecord] = []
        self.reselections = 0
        self._kept_per_frame: list[int] = []

    @property
    def scoring_layer(self) -> int:
        return self.prune_layer - 1

    def observe(self, visual_scores: torch.Tensor) -> None:
        """Take layer L-1's head-mean attention over the visual span; reselect when it drifted below tau."""
        reselect = self.previous_scores is None or self.reselect_threshold >= 1.0 or bool(
            torch.nn.functional.cosine_similarity(visual_scores, self.previous_scores, dim=0)
            < self.reselect_threshold
        )
        self.previous_scores = visual_scores
        if reselect:
            top = torch.topk(visual_scores, self.keep_visual, sorted=False).indices
            self.selected = torch.sort(top).values
            self.stale_layers = set(range(self.prune_layer, len(self.layers)))
            self.reselections += 1
            self._kept_per_frame = torch.bincount(
                self.frame_of_visual[self.selected.to(self.frame_of_visual.device)], minlength=self.num_frames
            ).tolist()
        self.steps.append(StepRecord(self._kept_per_frame, reselect))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self._prunes(layer_idx, key_states.shape[-2]):
            return keys, values
        if layer_idx in self.stale_layers:
            self.stale_layers.discard(layer_idx)
            index = self._kept_positions(keys.shape[-2], keys.device)
            self.compact[layer_idx] = (keys.index_select(-2, index), values.index_select(-2, index))
        else:
            compact_keys, compact_values = self.compact[layer_idx]
            self.compact[layer_idx] = (
                torch.cat([compact_keys, key_states], dim=-2),
                torch.cat([compact_values, value_states], dim=-2),
            )
        return self.compact[layer_idx]

    def _prunes(self, layer_idx: int, query_length: int) -> bool:
        return self.pruning and query_length == 1 and layer_idx >= self.prune_layer and self.selected is not None

    def _kept_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.cat([
            torch.arange(self.visual_start, device=device),
            self.selected.to(device) + self.visual_start,
            torch.arange(self.visual_end, length, device=device),
        ])

    def nbytes(self) -> int:
        """Bytes held: the full cache plus the compact copies."""
        full = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
        return full + sum(k.nbytes + v.nbytes for k, v in self.compact.values())


def head_mean_attention(attention: torch.nn.Module, hidden_states: torch.Tensor,
                        position_embeddings: tuple[torch.Tensor, torch.Tensor],
                        past_keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the one new query over all keys (cached + its own), averaged over query heads."""
    head_dim = attention.head_dim
    query = attention.q_proj(hidden_states).view(1, 1, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(1, 1, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    keys = torch.cat([past_keys, key], dim=-2)  # [1, kv_heads, S + 1, head_dim]
    kv_heads = keys.shape[1]
    grouped_query = query.view(1, kv_heads, -1, head_dim)  # query heads grouped by the kv head they share
    logits = torch.matmul(grouped_query.float(), keys.float().transpose(-1, -2)) * attention.scaling
    return logits.softmax(dim=-1).mean(dim=(0, 1, 2))


def _score_new_token(attention: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, DyCokeCache) or not cache.pruning or attention.layer_idx != cache.scoring_layer:
        return
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if hidden_states is None or hidden_states.shape[:2] != (1, 1):
        return
    past_keys = cache.layers[attention.layer_idx].keys
    scores = head_mean_attention(attention, hidden_states, kwargs["position_embeddings"], past_keys)
    cache.observe(scores[cache.visual_start:cache.visual_end])


def install_dp_hooks(model: torch.nn.Module) -> int:
    """Put the scoring pre-hook on every decoder attention module once; it is inert unless given a DyCokeCache."""
    installed = 0
    for layer in model.get_decoder().layers:
        attention = layer.self_attn
        if not hasattr(attention, HOOK_MARKER):
            setattr(attention, HOOK_MARKER, attention.register_forward_pre_hook(_score_new_token, with_kwargs=True))
            installed += 1
    return installed
