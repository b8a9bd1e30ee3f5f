"""DP on a preallocated cache, with the reselect decision on the device: a decoding step that never waits for the host.

The DyCokeCache of `pruning` decides on the host whether to reselect (`bool(cos < tau)`), which stalls the forward
pass and keeps CUDA graphs and `torch.compile` out. Here every layer is one of transformers' StaticLayers, and every
decoding step does the same work whatever the attention did:
- at layer L-1, the head-mean attention over the valid keys, its cosine with the previous step's, a fixed-size
  top-k, and `torch.where` between the old and the new selection;
- at every pruned layer, a gather of the selected visual rows (keep = floor((1-P)·V) of them, not the full cache)
  into the compact tensor's fixed visual segment, and this step's row written at a position held in a tensor;
- the step's trace (kept tokens per frame, reselected or not) written into preallocated tensors, read on demand.

The compact tensor of a pruned layer is allocated at prefill for the whole request: the text before the video, the
selected visual segment, the rest of the prompt (copied once, at prefill), then a row per decoding step. It is
attended whole, with a mask over the rows written so far. Buffers are marked as static addresses, as StaticLayer's
are, so that CUDA graphs can replay a step. Conversations (a crop, then a further prefill) use the dynamic cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Cache

from dycoke.caches import CachePlan
from dycoke.pruning import DyCokeCache, StepRecord, _FrameCounts, head_mean_scores, visual_span


@dataclass
class _DecodeState:
    """Per-request decoding state on the scoring layer's device; every field is updated in place."""

    previous: torch.Tensor  # [V] the last step's visual scores
    has_selection: torch.Tensor  # 0-d bool
    selected: torch.Tensor  # [keep] indices into the visual span, in order
    decoded: torch.Tensor  # 0-d long: decoding steps so far
    counts: torch.Tensor  # [max_steps, frames] kept visual tokens per frame, per step
    reselected: torch.Tensor  # [max_steps] bool
    frame_of_visual: torch.Tensor  # [V] on this device


class StaticDyCokeCache(DyCokeCache):
    """DyCokeCache on transformers' StaticLayers, for one request of at most `plan.capacity` positions."""

    def __init__(self, plan: CachePlan, **settings) -> None:
        super().__init__(**settings)
        Cache.__init__(self, layers=plan.static_layers())
        self.capacity = plan.capacity
        self.num_layers = len(self.layers)
        self.compact_base: int | None = None  # rows of the compact tensor before the first decoded one
        self._state: _DecodeState | None = None
        self._rest: torch.Tensor | None = None  # prompt positions after the text before the video, not visual
        self._per_device: dict = {}  # this step's selected positions and masks, per device

    # --- prefill: every layer in place; the decode-time buffers are allocated once ---------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._prunes(layer_idx, key_states.shape[-2]):
            return self._update_pruned(key_states, value_states, layer_idx)
        keys, values = Cache.update(self, key_states, value_states, layer_idx, *args, **kwargs)
        if self.pruning and key_states.shape[-2] > 1:
            self._prepare_decoding(layer_idx, key_states, keys, values)
        return keys, values

    def _prepare_decoding(self, layer_idx: int, key_states: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor) -> None:
        if layer_idx == 0:
            if self.prefill_length is not None:
                raise RuntimeError("a static DyCokeCache takes one prefill, then one token per step")
            self.prefill_length = key_states.shape[-2]
        if layer_idx == self.scoring_layer:
            self._state = self._new_state(key_states.device, torch.promote_types(key_states.dtype, torch.float32))
            self.selected = self._state.selected
        elif layer_idx >= self.prune_layer:
            slot = layer_idx - self.prune_layer
            if not self.compact:
                self.compact = [None] * (self.num_layers - self.prune_layer)
            self.compact[slot] = self._new_compact(keys, values)

    def _new_state(self, device: torch.device, dtype: torch.dtype) -> _DecodeState:
        steps, visual = self.capacity - self.prefill_length, self.visual_end - self.visual_start
        state = _DecodeState(
            previous=torch.zeros(visual, dtype=dtype, device=device),
            has_selection=torch.zeros((), dtype=torch.bool, device=device),
            selected=torch.zeros(self.keep_visual, dtype=torch.long, device=device),
            decoded=torch.zeros((), dtype=torch.long, device=device),
            counts=torch.zeros((steps, self.num_frames), dtype=torch.long, device=device),
            reselected=torch.zeros(steps, dtype=torch.bool, device=device),
            frame_of_visual=self.frame_of_visual.to(device),
        )
        for tensor in (state.previous, state.has_selection, state.selected, state.decoded, state.counts,
                       state.reselected):
            torch._dynamo.mark_static_address(tensor)
        return state

    def _rest_positions(self, device: torch.device) -> torch.Tensor:
        """Prompt positions, after the text before the video, that are not visual: computed once, at prefill."""
        if self._rest is None:
            length = self.prefill_length
            if self.visual_positions is None:
                self._rest = torch.arange(self.visual_end, length, device=device)
            else:
                is_rest = torch.ones(length, dtype=torch.bool, device=device)
                is_rest[:self.visual_start] = False
                is_rest[self.visual_positions.to(device)] = False
                self._rest = is_rest.nonzero()[:, 0]
        return self._rest.to(device)

    def _new_compact(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[K|V, kv_heads, rows, head_dim]: the text before the video and the rest of the prompt copied now; the
        visual segment is gathered at every step."""
        rest = self._rest_positions(keys.device)
        start, keep = self.visual_start, self.keep_visual
        self.compact_base = start + keep + rest.numel()
        rows = self.compact_base + self.capacity - self.prefill_length
        compact = keys.new_zeros((2, keys.shape[1], rows, keys.shape[3]))
        for index, full in enumerate((keys, values)):
            compact[index, :, :start] = full[0, :, :start]
            compact[index, :, start + keep:self.compact_base] = full[0].index_select(1, rest)
        torch._dynamo.mark_static_address(compact)
        return compact

    # --- a decoding step --------------------------------------------------------------------------------------

    def score(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """Head-mean attention over the keys written so far (the rest of the static layer is empty), then observe."""
        started = self.stopwatch.start() if self.stopwatch else None
        written = self.layers[self.scoring_layer].cumulative_length
        valid = torch.arange(keys.shape[-2], device=keys.device) < written
        scores = head_mean_scores(query, keys, scaling, valid)
        self.observe(visual_span(scores, self.visual_start, self.visual_end, self.visual_positions))
        if started:
            self.stopwatch.stop("score", started)

    def observe(self, visual_scores: torch.Tensor) -> None:
        """Reselect where the attention drifted below tau, on the device: the top-k runs every step, and
        `torch.where` keeps the old selection where it did not."""
        state = self._state
        if self.reselect_threshold >= 1.0:  # a setting, not data: every step reselects
            reselect = torch.ones((), dtype=torch.bool, device=visual_scores.device)
        else:
            similarity = torch.nn.functional.cosine_similarity(visual_scores, state.previous, dim=0)
            reselect = ~state.has_selection | (similarity < self.reselect_threshold)
        top = torch.sort(torch.topk(visual_scores, self.keep_visual, sorted=False).indices).values
        state.selected.copy_(torch.where(reselect, top, state.selected))
        state.previous.copy_(visual_scores)
        state.has_selection.fill_(True)
        counts = torch.zeros(self.num_frames, dtype=torch.long, device=visual_scores.device)
        counts.index_add_(0, state.frame_of_visual[state.selected], torch.ones_like(state.selected))
        step = state.decoded.view(1)
        state.counts.index_copy_(0, step, counts[None])
        state.reselected.index_copy_(0, step, reselect.view(1))
        state.decoded.add_(1)
        self._per_device = {}

    def _selected_positions(self, device: torch.device) -> torch.Tensor:
        key = ("positions", device)
        if key not in self._per_device:
            selected = self._state.selected
            chosen = (selected + self.visual_start if self.visual_positions is None
                      else self.visual_positions.to(selected.device)[selected])
            self._per_device[key] = chosen.to(device)
        return self._per_device[key]

    def _update_pruned(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Gather this step's selection into the visual segment, write this step's row, return the whole tensor."""
        started = self.stopwatch.start() if self.stopwatch else None
        layer, compact = self.layers[layer_idx], self.compact[layer_idx - self.prune_layer]
        positions = self._selected_positions(compact.device)
        segment = slice(self.visual_start, self.visual_start + self.keep_visual)
        compact[0, :, segment] = layer.keys[0].index_select(1, positions)
        compact[1, :, segment] = layer.values[0].index_select(1, positions)
        if started:
            self.stopwatch.stop("rebuild", started)
        row = (self._state.decoded.to(compact.device) + (self.compact_base - 1)).view(1)
        compact[0].index_copy_(1, row, key_states[0])
        compact[1].index_copy_(1, row, value_states[0])
        return compact[0:1], compact[1:2]

    def attend(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, attention_mask, scaling: float):
        """As DyCokeCache's, but a pruned layer attends its compact tensor through a mask over the rows written."""
        mask = super().attend(layer_idx, query, keys, attention_mask, scaling)
        if not self.pruning or query.shape[-2] != 1 or not self._prunes(layer_idx, 1):
            return mask
        return self._compact_mask(keys.shape[-2], keys.device, attention_mask)

    def _compact_mask(self, rows: int, device: torch.device, like) -> torch.Tensor:
        """[1, 1, 1, rows]: boolean for sdpa, additive (0 or the dtype's minimum) where the model's mask is."""
        additive = isinstance(like, torch.Tensor) and like.dtype != torch.bool
        key = ("mask", device, like.dtype if additive else torch.bool)
        if key not in self._per_device:
            written = self._state.decoded.to(device) + self.compact_base
            valid = (torch.arange(rows, device=device) < written).view(1, 1, 1, rows)
            if additive:
                valid = torch.zeros(valid.shape, dtype=like.dtype, device=device).masked_fill_(
                    ~valid, torch.finfo(like.dtype).min)
            self._per_device[key] = valid
        return self._per_device[key]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._prunes(layer_idx, query_length):
            return self.compact[layer_idx - self.prune_layer].shape[2], 0
        return Cache.get_mask_sizes(self, query_length, self._length_layer(layer_idx))

    # --- what the request reads afterwards --------------------------------------------------------------------

    @property
    def steps(self) -> Sequence[StepRecord]:
        return _DeviceTrace(self._state)

    @property
    def reselections(self) -> int:
        if self._state is None:
            return 0
        return int(self._state.reselected[:int(self._state.decoded)].sum())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a static DyCokeCache serves one request; conversations use the dynamic cache")


class _DeviceTrace(Sequence[StepRecord]):
    """The steps' records, read from the device tensors one step at a time, after the step."""

    def __init__(self, state: _DecodeState | None) -> None:
        self._state = state

    def __len__(self) -> int:
        return 0 if self._state is None else int(self._state.decoded)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"step {index} of {length}")
        return StepRecord(_FrameCounts(self._state.counts[index]), self._state.reselected[index])
