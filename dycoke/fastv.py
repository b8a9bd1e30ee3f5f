"""FastV (Chen et al., ECCV 2024): after layer K, drop the visual tokens the last prompt token attended to least.

During prefill, a forward hook on layer K-1's attention scores the last prompt token's query against the keys that
layer has just cached, and the per-request FastVCache turns the scores into the kept positions. A forward pre-hook
on every decoder layer >= K then hands the layer only the kept tokens:
- layer K gets the kept rows of its input hidden states; Qwen2Model passes each layer's output to the next, so
  layers > K receive the shorter sequence as it is;
- every layer >= K gets the rotary embeddings of the kept tokens' original positions (Qwen2Model hands each layer
  the full-length ones), a mask cut to the kept tokens, and no position_ids (RoPE reads position_embeddings only,
  and flash attention would take positions with gaps for packed sequences).

Layers >= K therefore compute on, and cache, only the kept tokens. Decoding runs on that shorter cache; positions
continue from the full prompt length, which layer 0's cache (never pruned, K >= 1) reports. The hooks do nothing
unless the request's cache is a FastVCache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from dycoke.pruning import interleaved_positions, kept_prompt_positions, visual_span
from dycoke.ttm import kept_count

SCORING_HOOK = "_dycoke_fastv_scoring_hook"
SHRINK_HOOK = "_dycoke_fastv_shrink_hook"


class FastVCache(DynamicCache):
    """A DynamicCache whose layers >= K hold only the tokens FastV kept; all per-request FastV state lives here."""

    def __init__(self, visual_start: int, frame_of_visual: torch.Tensor, num_frames: int, layer: int,
                 ratio: float, visual_positions: torch.Tensor | None = None) -> None:
        super().__init__()
        self.visual_start = visual_start
        self.visual_end = visual_start + frame_of_visual.numel()
        self.visual_positions = interleaved_positions(visual_positions, visual_start)  # None: one run from visual_start
        self.frame_of_visual = frame_of_visual
        self.num_frames = num_frames
        self.layer = layer
        self.keep_visual = kept_count(frame_of_visual.numel(), ratio)
        self.pruning = frame_of_visual.numel() > 0
        self.prompt_length: int | None = None
        self.kept_positions: torch.Tensor | None = None  # prompt positions that layers >= K see, in order
        self.kept_visual: torch.Tensor | None = None  # indices into the visual span
        self.scores: torch.Tensor | None = None  # the last prompt token's head-mean attention at layer K-1
        self._frame_counts: torch.Tensor | list[int] = []

    @property
    def scoring_layer(self) -> int:
        return self.layer - 1

    @property
    def kept_per_frame(self) -> list[int]:
        """Visual tokens per frame that layers >= K attend to; read from the device on first use, not mid-forward."""
        if isinstance(self._frame_counts, torch.Tensor):
            self._frame_counts = self._frame_counts.tolist()
        return self._frame_counts

    @property
    def selected(self) -> bool:
        return self.kept_positions is not None

    def select(self, scores: torch.Tensor) -> None:
        """Keep the visual tokens with the highest scores, in position order, plus every non-visual token."""
        length = scores.numel()
        visual = visual_span(scores, self.visual_start, self.visual_end, self.visual_positions)
        top = torch.topk(visual, self.keep_visual, sorted=False).indices
        self.kept_visual = torch.sort(top).values
        kept = kept_prompt_positions(self.visual_start, self.visual_end, self.visual_positions, self.kept_visual,
                                     length, scores.device)
        self.kept_positions = torch.sort(kept).values  # prompt order: the prefill stays causal
        self.prompt_length = length
        self.scores = scores
        frames = self.frame_of_visual[self.kept_visual.to(self.frame_of_visual.device)]
        self._frame_counts = torch.bincount(frames, minlength=self.num_frames)


def last_token_attention(attention: torch.nn.Module, hidden_states: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last query over all cached keys of its layer, averaged over query heads: [S]."""
    head_dim = attention.head_dim
    query = attention.q_proj(hidden_states[:, -1:]).view(1, 1, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3-VL normalises each head's query before rotating it
        query = attention.q_norm(query)
    query = query.transpose(1, 2)
    cos, sin = (table[:, -1:] for table in position_embeddings)
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    kv_heads = keys.shape[1]
    grouped_query = query.view(1, kv_heads, -1, head_dim)  # query heads grouped by the kv head they share
    logits = torch.matmul(grouped_query.float(), keys.float().transpose(-1, -2)) * attention.scaling
    return logits.softmax(dim=-1).mean(dim=(0, 1, 2))


def _score_last_prompt_token(attention: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    cache = kwargs.get("past_key_values")
    if (not isinstance(cache, FastVCache) or not cache.pruning or cache.selected
            or attention.layer_idx != cache.scoring_layer):
        return
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if hidden_states.shape[0] != 1:
        raise ValueError("fastv runs one request at a time (batch size 1)")
    keys = cache.layers[attention.layer_idx].keys  # the whole prompt, rotary embeddings applied
    cache.select(last_token_attention(attention, hidden_states, kwargs["position_embeddings"], keys))


def _keep_only_kept_tokens(layer: torch.nn.Module, args: tuple, kwargs: dict):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, FastVCache) or not cache.selected or layer.self_attn.layer_idx < cache.layer:
        return None
    hidden_states = args[0] if args else kwargs["hidden_states"]
    kept = cache.kept_positions.to(hidden_states.device)
    cos, sin = kwargs["position_embeddings"]
    mask = kwargs.get("attention_mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise ValueError(f"fastv needs sdpa, eager or flash attention, not a {type(mask).__name__} mask")
    if cos.shape[1] == cache.prompt_length:  # prefill: the full-length inputs Qwen2Model hands every layer
        if hidden_states.shape[1] == cache.prompt_length:  # layer K; later layers already get the kept tokens
            hidden_states = hidden_states.index_select(1, kept)
        kwargs["position_embeddings"] = (cos.index_select(1, kept), sin.index_select(1, kept))
        kwargs["position_ids"] = None
        if mask is not None:
            kwargs["attention_mask"] = mask.index_select(-2, kept).index_select(-1, kept)
    elif mask is not None:  # decoding: keys are the kept prompt tokens plus every generated one
        generated = torch.arange(cache.prompt_length, mask.shape[-1], device=kept.device)
        kwargs["attention_mask"] = mask.index_select(-1, torch.cat([kept, generated]))
    if args:
        return (hidden_states, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden_states
    return args, kwargs


def install_fastv_hooks(model: torch.nn.Module) -> int:
    """Put the scoring hook on every attention module and the shrinking pre-hook on every decoder layer, once each."""
    installed = 0
    for layer in model.get_decoder().layers:
        if not hasattr(layer.self_attn, SCORING_HOOK):
            hook = layer.self_attn.register_forward_hook(_score_last_prompt_token, with_kwargs=True)
            setattr(layer.self_attn, SCORING_HOOK, hook)
            installed += 1
        if not hasattr(layer, SHRINK_HOOK):
            setattr(layer, SHRINK_HOOK, layer.register_forward_pre_hook(_keep_only_kept_tokens, with_kwargs=True))
            installed += 1
    return installed
