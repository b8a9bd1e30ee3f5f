"""DP, dynamic KV-cache pruning (DESIGN.md §2.2), as a per-request cache plus one scoring hook per attention layer.

At each decoding step, a pre-hook on layer L-1's attention computes the new token's query; when the layer then
writes its key into the cache, the cache scores that query against all of the layer's keys. The cache turns the
scores into a selection of visual tokens and, for layers >= L, returns a compact view: every non-visual token
plus the selected visual ones. The full cache is kept, so a token pruned at one step can come back at a later one.

Cost per decoding step, on top of the baseline's: one query projection and one row of attention scores at layer
L-1, and one host-device sync for the reselect decision. At layers >= L a step writes one row into the compact
copy, and a reselection gathers the newly selected visual rows into it; the full cache of those layers is the
prefill, which no step copies or scans.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from dycoke.metrics import Stopwatch
from dycoke.ttm import kept_count

HOOK_MARKER = "_dycoke_scoring_hook"
# Spare rows the compact tensor is allocated with, so that steps write in place instead of copying.
COMPACT_GROWTH = 64

# Set only inside `overhead_timing()`; a cache made then times its own DP work on its own Stopwatch.
_stopwatches: list[Stopwatch] | None = None


@contextmanager
def overhead_timing() -> Iterator[list[Stopwatch]]:
    """Every DyCokeCache made inside the block times its scoring/selection and its compact rebuilds."""
    global _stopwatches
    previous, _stopwatches = _stopwatches, []
    try:
        yield _stopwatches
    finally:
        _stopwatches = previous


class _FrameCounts:
    """Kept tokens per frame of one selection, read back from the device only when someone asks."""

    def __init__(self, counts: torch.Tensor) -> None:
        self._counts: torch.Tensor | None = counts
        self._list: list[int] | None = None

    def tolist(self) -> list[int]:
        if self._list is None:
            self._list = self._counts.tolist()
            self._counts = None
        return self._list


class StepRecord:
    """What the newest token attended to at layers >= L in one decoding step."""

    __slots__ = ("_counts", "reselected")

    def __init__(self, kept_per_frame: _FrameCounts | list[int], reselected: bool) -> None:
        self._counts = kept_per_frame
        self.reselected = reselected

    @property
    def kept_per_frame(self) -> list[int]:
        # Read lazily: converting at selection time would stall the device in the middle of the forward pass.
        return self._counts.tolist() if isinstance(self._counts, _FrameCounts) else self._counts

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepRecord):
            return NotImplemented
        return (self.kept_per_frame, self.reselected) == (other.kept_per_frame, other.reselected)

    def __repr__(self) -> str:
        return f"StepRecord(kept_per_frame={self.kept_per_frame}, reselected={self.reselected})"


class DyCokeCache(DynamicCache):
    """A DynamicCache that prunes visual tokens at decode time; all per-request DP state lives here.

    Layers < L are plain DynamicCache layers. Layers >= L (the pruned layers) keep their prefill K/V together in
    one tensor, and what they attend to while decoding in one compact tensor
    ([pruned layer, K|V, kv_heads, rows, head_dim], the same layout per head as any KV cache): the text before
    the video, the selected visual tokens, the text after the video, then every generated token. Only the
    selected segment changes on reselection, and it keeps its size, so a reselection is one gather for all
    pruned layers, copied in place; a step writes one row per layer. Generated tokens are never pruned,
    so pruned layers keep them once, in the compact tensor. DP runs on one request at a time (batch 1).
    """

    def __init__(
        self,
        visual_start: int,
        frame_of_visual: torch.Tensor,
        num_frames: int,
        prune_layer: int,
        prune_ratio: float,
        reselect_threshold: float,
        visual_positions: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.visual_start = visual_start
        self.visual_end = visual_start + frame_of_visual.numel()
        # Where each visual token sits in the prompt, when text sits between them (Qwen3-VL's timestamps).
        self.visual_positions = interleaved_positions(visual_positions, visual_start)
        self.frame_of_visual = frame_of_visual
        self.num_frames = num_frames
        self.prune_layer = prune_layer
        self.reselect_threshold = reselect_threshold
        self.keep_visual = kept_count(frame_of_visual.numel(), prune_ratio)
        self.pruning = prune_ratio > 0 and frame_of_visual.numel() > 0
        self.num_layers: int | None = None  # told by the scoring hook during prefill
        self.previous_scores: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.stale = False
        self.steps: list[StepRecord] = []
        self.reselections = 0
        self.prefill: torch.Tensor | None = None  # [pruned layers, K|V, kv_heads, S, head_dim]
        self.compact: torch.Tensor | None = None  # [pruned layers, K|V, kv_heads, capacity, head_dim]
        self.compact_lengths: list[int] = []
        self._kept_per_frame: _FrameCounts | list[int] = []
        self._pending_query: tuple[torch.Tensor, float] | None = None
        self._positions: tuple[int, torch.device, torch.Tensor] | None = None
        self.stopwatch: Stopwatch | None = None
        if _stopwatches is not None:
            self.stopwatch = Stopwatch(frame_of_visual.device)
            _stopwatches.append(self.stopwatch)

    @property
    def scoring_layer(self) -> int:
        return self.prune_layer - 1

    def observe(self, visual_scores: torch.Tensor) -> None:
        """Take layer L-1's head-mean attention over the visual span; reselect when it drifted below tau.

        The reselect decision is the one point per step where the host waits for the device.
        """
        reselect = self.previous_scores is None or self.reselect_threshold >= 1.0 or bool(
            torch.nn.functional.cosine_similarity(visual_scores, self.previous_scores, dim=0)
            < self.reselect_threshold
        )
        self.previous_scores = visual_scores
        if reselect:
            top = torch.topk(visual_scores, self.keep_visual, sorted=False).indices
            self.selected = torch.sort(top).values
            self.stale = True
            self.reselections += 1
            self._positions = None
            self._kept_per_frame = _FrameCounts(torch.bincount(
                self.frame_of_visual[self.selected.to(self.frame_of_visual.device)], minlength=self.num_frames
            ))
        self.steps.append(StepRecord(self._kept_per_frame, reselect))

    def await_scores(self, query: torch.Tensor, scaling: float) -> None:
        """The new token's rotated query at layer L-1; it is scored when that layer's key arrives in `update`."""
        self._pending_query = (query, scaling)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._prunes(layer_idx, key_states.shape[-2]):
            return self._update_pruned(key_states, value_states, layer_idx)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self._pending_query is not None and layer_idx == self.scoring_layer:
            self._score(keys)
        if self._holds_prefill(layer_idx, key_states.shape[-2]):
            keys, values = self._keep_prefill(keys, values, layer_idx)
        return keys, values

    def _holds_prefill(self, layer_idx: int, query_length: int) -> bool:
        return self.pruning and query_length > 1 and layer_idx >= self.prune_layer and self.num_layers is not None

    def _keep_prefill(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int):
        """Move a pruned layer's prefill K/V into the shared prefill tensor; the layer keeps views of it."""
        slot = layer_idx - self.prune_layer
        if self.prefill is None:
            shape = (self.num_layers - self.prune_layer, 2, *keys.shape[1:])
            self.prefill = keys.new_empty(shape)
        if self.prefill.shape[3] != keys.shape[-2] or self.compact is not None:
            raise RuntimeError("DyCokeCache takes one prefill, then one token per step (as generate does)")
        self.prefill[slot, 0] = keys[0]
        self.prefill[slot, 1] = values[0]
        layer = self.layers[layer_idx]
        layer.keys, layer.values = self.prefill[slot, 0].unsqueeze(0), self.prefill[slot, 1].unsqueeze(0)
        return layer.keys, layer.values

    def _update_pruned(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """A decoding step at a layer >= L: gather once per reselection, then write this step's row."""
        slot = layer_idx - self.prune_layer
        if self.stale:
            started = self.stopwatch.start() if self.stopwatch else None
            self.stale = False
            self._gather_selection()
            if started:
                self.stopwatch.stop("rebuild", started)
        row = self.compact_lengths[slot]
        if row >= self.compact.shape[3]:
            self._grow(row + 1)
        self.compact[slot, 0, :, row] = key_states[0, :, 0]
        self.compact[slot, 1, :, row] = value_states[0, :, 0]
        self.compact_lengths[slot] = row + 1
        return self.compact[slot, 0, :, :row + 1].unsqueeze(0), self.compact[slot, 1, :, :row + 1].unsqueeze(0)

    def _gather_selection(self) -> None:
        """Copy the kept prefill rows of every pruned layer into the compact tensor: all of them the first time,
        then only the selected visual segment, in place. Two kernels for all layers, whatever their number."""
        prefill = self.prefill
        positions = self._kept_positions(prefill.shape[3], prefill.device)
        first = 0
        if self.compact is None:
            shape = (*prefill.shape[:3], positions.numel() + COMPACT_GROWTH, prefill.shape[4])
            self.compact = prefill.new_empty(shape)
            self.compact_lengths = [positions.numel()] * prefill.shape[0]
        else:
            positions = positions[self.visual_start:self.visual_start + self.keep_visual]
            first = self.visual_start
        self.compact[:, :, :, first:first + positions.numel()] = prefill.index_select(3, positions)

    def _grow(self, rows: int) -> None:
        grown = self.compact.new_empty((*self.compact.shape[:3], rows + COMPACT_GROWTH, self.compact.shape[4]))
        used = max(self.compact_lengths)
        grown[:, :, :, :used] = self.compact[:, :, :, :used]
        self.compact = grown

    def _score(self, keys: torch.Tensor) -> None:
        """Head-mean attention of the pending query over the layer's keys, its own included, then `observe`."""
        started = self.stopwatch.start() if self.stopwatch else None
        query, scaling = self._pending_query
        self._pending_query = None
        scores = head_mean_scores(query, keys, scaling)
        self.observe(visual_span(scores, self.visual_start, self.visual_end, self.visual_positions))
        if started:
            self.stopwatch.stop("score", started)

    def _prunes(self, layer_idx: int, query_length: int) -> bool:
        return (self.pruning and query_length == 1 and layer_idx >= self.prune_layer and self.selected is not None
                and self.prefill is not None)

    def _kept_positions(self, length: int, device: torch.device) -> torch.Tensor:
        """Prefill positions the pruned layers attend to: text, the selected visual tokens, text."""
        if self._positions is None or self._positions[:2] != (length, device):
            positions = kept_prompt_positions(self.visual_start, self.visual_end, self.visual_positions,
                                              self.selected.to(device), length, device)
            self._positions = (length, device, positions)
        return self._positions[2]

    def _length_layer(self, layer_idx: int) -> int:
        # Pruned layers hold only the prefill in `layers` once decoding starts; layer 0 holds every position.
        return 0 if self.pruning and layer_idx >= self.prune_layer else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._length_layer(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._length_layer(layer_idx))

    def nbytes(self) -> int:
        """Bytes held: every layer's full K/V (the prefill, at pruned layers) plus the compact tensor."""
        full = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
        return full + (self.compact.nbytes if self.compact is not None else 0)


def interleaved_positions(visual_positions: torch.Tensor | None, visual_start: int) -> torch.Tensor | None:
    """The visual tokens' prompt positions if they are not one run from visual_start, else None."""
    if visual_positions is None or visual_positions.numel() == 0:
        return None
    run = visual_start + torch.arange(visual_positions.numel(), device=visual_positions.device)
    return None if torch.equal(visual_positions, run) else visual_positions


def visual_span(scores: torch.Tensor, visual_start: int, visual_end: int,
                visual_positions: torch.Tensor | None) -> torch.Tensor:
    """The scores of the visual tokens, in visual order."""
    if visual_positions is None:
        return scores[visual_start:visual_end]
    return scores[visual_positions.to(scores.device)]


def kept_prompt_positions(visual_start: int, visual_end: int, visual_positions: torch.Tensor | None,
                          selected: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """Prompt positions that pruned layers attend to: the text before the video, the selected visual tokens, then
    every other prompt token. The selected run keeps its place, so a reselection rewrites only that run."""
    if visual_positions is None:
        chosen, rest = selected + visual_start, torch.arange(visual_end, length, device=device)
    else:
        visual_positions = visual_positions.to(device)
        chosen = visual_positions[selected]
        is_rest = torch.ones(length, dtype=torch.bool, device=device)
        is_rest[:visual_start] = False
        is_rest[visual_positions] = False
        rest = is_rest.nonzero()[:, 0]
    return torch.cat([torch.arange(visual_start, device=device), chosen, rest])


def rotated_query(attention: torch.nn.Module, hidden_states: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention module's query for `hidden_states`, with rotary applied: [1, heads, 1, head_dim]."""
    query = attention.q_proj(hidden_states).view(1, 1, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3-VL normalises each head's query before rotating it
        query = attention.q_norm(query)
    query = query.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin  # the query half of apply_rotary_pos_emb


def head_mean_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of one query over `keys` ([1, kv_heads, S, head_dim]), averaged over query heads."""
    kv_heads, head_dim = keys.shape[1], keys.shape[-1]
    grouped_query = query.view(1, kv_heads, -1, head_dim)  # query heads grouped by the kv head they share
    logits = torch.matmul(grouped_query.float(), keys.float().transpose(-1, -2)) * scaling
    return logits.softmax(dim=-1).mean(dim=(0, 1, 2))


def _score_new_token(attention: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, DyCokeCache) or not cache.pruning or attention.layer_idx != cache.scoring_layer:
        return
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    cache.num_layers = attention.config.num_hidden_layers  # the prefill tensor of the pruned layers needs it
    if hidden_states is None or hidden_states.shape[:2] != (1, 1):
        return
    started = cache.stopwatch.start() if cache.stopwatch else None
    cache.await_scores(rotated_query(attention, hidden_states, kwargs["position_embeddings"]), attention.scaling)
    if started:
        cache.stopwatch.stop("score", started)


def install_dp_hooks(model: torch.nn.Module) -> int:
    """Put the scoring pre-hook on every decoder attention module once; it is inert unless given a DyCokeCache."""
    installed = 0
    for layer in model.get_decoder().layers:
        attention = layer.self_attn
        if not hasattr(attention, HOOK_MARKER):
            setattr(attention, HOOK_MARKER, attention.register_forward_pre_hook(_score_new_token, with_kwargs=True))
            installed += 1
    return installed
