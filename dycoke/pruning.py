"""DP, dynamic KV-cache pruning (DESIGN.md §2.2), as a per-request cache plus an attention function.

Scoring point: `dycoke_sdpa` (and `dycoke_eager`, ...) is registered through transformers' `AttentionInterface`
and wraps the model's own attention. At layer L-1 of a decoding step it receives the new token's query exactly as
the model built it (normed and rotated, whatever the family: 1-D RoPE, M-RoPE, q/k norms) and that layer's cached
keys, and hands the head-mean softmax attention over the visual span to the request's DyCokeCache. A pre-hook on
each attention module only passes the request's cache along as the `dycoke_cache` keyword; for any other cache
the function is the wrapped attention, untouched. The cache turns the scores into a selection of visual tokens
and, for layers >= L, returns a compact view: every non-visual token plus the selected visual ones. The full
cache is kept, so a token pruned at one step can come back at a later one.

Cost per decoding step, on top of the baseline's: one row of attention scores at layer L-1 (the query is the
model's own), and one host-device sync for the reselect decision. At layers >= L a step writes one row into the
compact copy, and a reselection gathers the newly selected visual rows into it; the full cache of those layers is
the prefill, which no step copies or scans.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sys

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dycoke.metrics import Stopwatch
from dycoke.ttm import kept_count

HOOK_MARKER = "_dycoke_cache_hook"
# Registered attention implementations are named ATTENTION_PREFIX + the wrapped one: dycoke_sdpa, dycoke_eager.
ATTENTION_PREFIX = "dycoke_"
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

    __slots__ = ("_counts", "_reselected")

    def __init__(self, kept_per_frame: _FrameCounts | list[int], reselected: bool | torch.Tensor) -> None:
        self._counts = kept_per_frame
        self._reselected = reselected

    @property
    def reselected(self) -> bool:
        # A static cache decides on the device: its flag is a 0-d tensor until someone reads it, after the step.
        if isinstance(self._reselected, torch.Tensor):
            self._reselected = bool(self._reselected)
        return self._reselected

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

    Layers < L are plain DynamicCache layers. Layers >= L (the pruned layers) keep their prefill K/V in their own
    cache layer, and what they attend to while decoding in a compact tensor of their own, on the layer's device
    (several GPUs: each layer's storage stays where the layer runs), [K|V, kv_heads, rows, head_dim]: the text
    before the video, the selected visual tokens, the text after the video, then every generated token. Only the
    selected segment changes on reselection, and it keeps its size, so a reselection is one gather per pruned
    layer, copied in place; a step writes one row per layer. Generated tokens are never pruned, so pruned layers
    keep them once, in the compact tensor. DP runs on one request at a time (batch 1).
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
        self.num_layers: int | None = None  # told by the attention hook during prefill
        self.previous_scores: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self._steps: list[StepRecord] = []
        self._reselections = 0
        self.prefill_length: int | None = None
        # Per pruned layer, on that layer's device: [K|V, kv_heads, capacity, head_dim], the rows in use, and the
        # selection (counted in reselections) that its visual segment holds.
        self.compact: list[torch.Tensor | None] = []
        self.compact_lengths: list[int] = []
        self._gathered: list[int] = []
        self._kept_per_frame: _FrameCounts | list[int] = []
        self._positions: dict[torch.device, torch.Tensor] = {}  # the selection's prefill positions, per device
        self.stopwatch: Stopwatch | None = None
        if _stopwatches is not None:
            self.stopwatch = Stopwatch(frame_of_visual.device)
            _stopwatches.append(self.stopwatch)

    @property
    def scoring_layer(self) -> int:
        return self.prune_layer - 1

    @property
    def steps(self) -> list[StepRecord]:
        """One record per decoding step so far."""
        return self._steps

    @property
    def reselections(self) -> int:
        return self._reselections

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
            self._reselections += 1
            self._positions = {}
            self._kept_per_frame = _FrameCounts(torch.bincount(
                self.frame_of_visual[self.selected.to(self.frame_of_visual.device)], minlength=self.num_frames
            ))
        self._steps.append(StepRecord(self._kept_per_frame, reselect))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._prunes(layer_idx, key_states.shape[-2]):
            return self._update_pruned(key_states, value_states, layer_idx)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self._holds_prefill(layer_idx, key_states.shape[-2]):
            keys, values = self._keep_prefill(keys, values, layer_idx)
        return keys, values

    def attend(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, attention_mask, scaling: float):
        """Called by the attention function with the layer's own query and keys; returns the mask to attend with.

        At layer L-1 of a decoding step the query is scored against the keys; at pruned layers of a decoding step
        the keys are the compact view, which every query may attend to whole (it is one token long)."""
        if not self.pruning or query.shape[-2] != 1:
            return attention_mask
        if layer_idx == self.scoring_layer:
            self.score(query, keys, scaling)
        elif self._prunes(layer_idx, 1):
            return None
        return attention_mask

    def score(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """Head-mean attention of the new token's query over the layer's keys, its own included, then `observe`."""
        started = self.stopwatch.start() if self.stopwatch else None
        scores = head_mean_scores(query, keys, scaling)
        self.observe(visual_span(scores, self.visual_start, self.visual_end, self.visual_positions))
        if started:
            self.stopwatch.stop("score", started)

    def _holds_prefill(self, layer_idx: int, query_length: int) -> bool:
        return self.pruning and query_length > 1 and layer_idx >= self.prune_layer and self.num_layers is not None

    def _keep_prefill(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int):
        """A pruned layer's prefill stays in its own cache layer, on its own device; decoding reads compact rows."""
        if self.prefill_length is None:
            self.prefill_length = keys.shape[-2]
            pruned = self.num_layers - self.prune_layer
            self.compact, self.compact_lengths, self._gathered = [None] * pruned, [0] * pruned, [0] * pruned
        if keys.shape[-2] != self.prefill_length or any(compact is not None for compact in self.compact):
            raise RuntimeError("DyCokeCache takes a prefill, then one token per step (as generate does); "
                               "crop() it back to the prompt before a further prefill")
        return keys, values

    def _update_pruned(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """A decoding step at a layer >= L: gather once per reselection, then write this step's row."""
        slot = layer_idx - self.prune_layer
        if self._gathered[slot] != self.reselections:
            started = self.stopwatch.start() if self.stopwatch else None
            self._gather_selection(slot)
            self._gathered[slot] = self.reselections
            if started:
                self.stopwatch.stop("rebuild", started)
        row = self.compact_lengths[slot]
        if row >= self.compact[slot].shape[2]:
            self._grow(slot, row + 1)
        compact = self.compact[slot]
        compact[0, :, row] = key_states[0, :, 0]
        compact[1, :, row] = value_states[0, :, 0]
        self.compact_lengths[slot] = row + 1
        return compact[0, :, :row + 1].unsqueeze(0), compact[1, :, :row + 1].unsqueeze(0)

    def _gather_selection(self, slot: int) -> None:
        """Copy the kept prefill rows of one pruned layer into its compact tensor: all of them the first time,
        then only the selected visual segment, in place."""
        layer = self.layers[self.prune_layer + slot]
        positions = self._positions_on(layer.keys.device)
        first = 0
        if self.compact[slot] is None:
            keys = layer.keys
            self.compact[slot] = keys.new_empty((2, keys.shape[1], positions.numel() + COMPACT_GROWTH,
                                                 keys.shape[3]))
            self.compact_lengths[slot] = positions.numel()
        else:
            positions = positions[self.visual_start:self.visual_start + self.keep_visual]
            first = self.visual_start
        rows = slice(first, first + positions.numel())
        self.compact[slot][0, :, rows] = layer.keys[0].index_select(1, positions)
        self.compact[slot][1, :, rows] = layer.values[0].index_select(1, positions)

    def _grow(self, slot: int, rows: int) -> None:
        compact = self.compact[slot]
        grown = compact.new_empty((*compact.shape[:2], rows + COMPACT_GROWTH, compact.shape[3]))
        used = self.compact_lengths[slot]
        grown[:, :, :used] = compact[:, :, :used]
        self.compact[slot] = grown

    def _prunes(self, layer_idx: int, query_length: int) -> bool:
        return (self.pruning and query_length == 1 and layer_idx >= self.prune_layer and self.selected is not None
                and self.prefill_length is not None)

    def _positions_on(self, device: torch.device) -> torch.Tensor:
        """The current selection's prefill positions on `device`: computed once per reselection, moved per device."""
        if not self._positions:
            positions = self._kept_positions(self.prefill_length, self.selected.device)
            self._positions[positions.device] = positions
        if device not in self._positions:
            self._positions[device] = next(iter(self._positions.values())).to(device)
        return self._positions[device]

    def _kept_positions(self, length: int, device: torch.device) -> torch.Tensor:
        """Prefill positions the pruned layers attend to: text, the selected visual tokens, text."""
        return kept_prompt_positions(self.visual_start, self.visual_end, self.visual_positions,
                                     self.selected.to(device), length, device)

    def crop(self, tokens_to_remove: int) -> None:
        """Cut the cache to `get_seq_length() - |tokens_to_remove|` positions and forget the selection.

        Decoded tokens' K/V at the pruned layers were computed against the selected visual tokens only, so a
        further prefill (the next turn of a conversation) must come after a crop to the end of the last prompt:
        the new prompt then attends to everything, as a first prefill does, and decoding after it selects afresh.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as a negative integer, got {tokens_to_remove}")
        length = self.get_seq_length() - abs(tokens_to_remove)
        for layer in self.layers:  # the pruned layers hold only their prefill, possibly shorter than layer 0
            if layer.is_initialized and layer.keys.shape[-2] > length:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        self.prefill_length = self.selected = self.previous_scores = None
        self.compact, self.compact_lengths, self._gathered, self._steps, self._reselections = [], [], [], [], 0
        self._positions, self._kept_per_frame = {}, []

    def _length_layer(self, layer_idx: int) -> int:
        # Pruned layers hold only the prefill in `layers` once decoding starts; layer 0 holds every position.
        return 0 if self.pruning and layer_idx >= self.prune_layer else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._length_layer(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._prunes(layer_idx, query_length):  # a decoding step of a pruned layer attends the compact view
            return self._compact_length(layer_idx - self.prune_layer) + query_length, 0
        return super().get_mask_sizes(query_length, self._length_layer(layer_idx))

    def _compact_length(self, slot: int) -> int:
        if self.compact[slot] is not None:
            return self.compact_lengths[slot]
        return self.prefill_length - (self.visual_end - self.visual_start) + self.keep_visual

    def nbytes(self) -> int:
        """Bytes held: every layer's full K/V (the prefill, at pruned layers) plus the compact tensors."""
        full = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
        return full + sum(compact.nbytes for compact in self.compact if compact is not None)



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



def head_mean_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one query over `keys` ([1, kv_heads, S, head_dim]), averaged over query heads.

    `valid` (bool [S]) marks the keys that exist; a static cache's unwritten rows get no weight. In float32, or in
    the model's dtype where that is wider, so that ties are broken as the exact rule does."""
    kv_heads, head_dim = keys.shape[1], keys.shape[-1]
    grouped_query = query.view(1, kv_heads, -1, head_dim)  # query heads grouped by the kv head they share
    dtype = torch.promote_types(query.dtype, torch.float32)
    logits = torch.matmul(grouped_query.to(dtype), keys.to(dtype).transpose(-1, -2)) * scaling
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(0, 1, 2))


def dycoke_attention(wrapped: str):
    """The attention function registered as ATTENTION_PREFIX + `wrapped`: that attention, plus DP's scoring."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask, dycoke_cache: DyCokeCache | None = None, **kwargs):
        if dycoke_cache is not None:
            attention_mask = dycoke_cache.attend(module.layer_idx, query, key, attention_mask,
                                                 kwargs.get("scaling") or module.scaling)
        return _wrapped_function(wrapped, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{ATTENTION_PREFIX}{wrapped}_attention"
    return attention


def _wrapped_function(wrapped: str, module: torch.nn.Module):
    if wrapped == "eager":  # eager is not registered: each modelling file defines its own
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[wrapped]


def register_attention(wrapped: str) -> str:
    """Register the DyCoke variant of a registered attention implementation (and its mask); return its name."""
    if wrapped.startswith(ATTENTION_PREFIX):
        return wrapped
    if wrapped != "eager" and wrapped not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"DP cannot wrap the attention implementation '{wrapped}'")
    name = ATTENTION_PREFIX + wrapped
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, dycoke_attention(wrapped))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[wrapped])
    return name


def _pass_cache_along(attention: torch.nn.Module, args: tuple, kwargs: dict):
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, DyCokeCache) or not cache.pruning:
        return None
    cache.num_layers = attention.config.num_hidden_layers  # the prefill tensor of the pruned layers needs it
    return args, {**kwargs, "dycoke_cache": cache}


def install_dp_hooks(model: torch.nn.Module) -> int:
    """Switch the language model to the DyCoke variant of its attention, and put the pre-hook that passes a
    DyCokeCache along on every decoder attention module, once; with any other cache nothing changes."""
    decoder = model.get_decoder()
    decoder.set_attn_implementation(register_attention(decoder.config._attn_implementation))
    installed = 0
    for layer in decoder.layers:
        attention = layer.self_attn
        if not hasattr(attention, HOOK_MARKER):
            setattr(attention, HOOK_MARKER, attention.register_forward_pre_hook(_pass_cache_along, with_kwargs=True))
            installed += 1
    return installed
