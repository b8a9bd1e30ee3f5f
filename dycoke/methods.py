"""Compression methods behind one interface, in a registry shared by the app, the CLI and the benchmark.

A method is a frozen object that carries its own knobs; `configure` makes a copy with knobs changed, and
`match_budget` one whose drop ratio gives exactly the attended visual budget of a reference method.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
from transformers import Cache

from dycoke.budget import VisualBudget, evenly_spaced, ratio_keeping, spread, ttm_kept_total
from dycoke.caches import DYNAMIC, CachePlan
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.fastv import FastVCache, install_fastv_hooks
from dycoke.fastvid import FastVIDSettings, fastvid_compress
from dycoke.flashvid import FlashVIDSettings, flashvid_compress
from dycoke.holitom import HoliTomSettings, holitom_compress
from dycoke.knobs import DP_KNOBS, TTM_KNOBS, Knob, config_from
from dycoke.merging import Placed
from dycoke.pruning import DyCokeCache, StepRecord, install_dp_hooks
from dycoke.static_pruning import StaticDyCokeCache
from dycoke.ttm import kept_count, temporal_keep_mask
from dycoke.vidcom2 import vidcom2_compress
from dycoke.visionzip import pooled_statistics, zip_frame


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_ratio(name: str, value: object) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class VisualLayout:
    """Where the kept visual tokens sit in the prompt, and which frame each came from."""

    start: int
    frame_of_token: torch.Tensor  # [V] frame index of each kept visual token
    num_frames: int
    positions: torch.Tensor | None = None  # [V] prompt index of each kept visual token; None: start, start+1, ...


@dataclass(frozen=True)
class VisualInput:
    """What the vision side produced for one request, handed to a method to compress."""

    frame_tokens: torch.Tensor  # [T, N, D] projected frame tokens (T temporal groups on Qwen-VL)
    model: torch.nn.Module  # the model, for methods that look inside the vision tower
    feature_layer_input: torch.Tensor | None = None  # [T, P, Dv] entering the vision feature layer, if asked for


@dataclass(frozen=True)
class CompressedVisual:
    """The visual tokens that enter the language model."""

    tokens: torch.Tensor  # [V, D] in prompt order
    keep_mask: torch.Tensor  # bool [T, N]: pooled positions that enter the LLM as themselves
    frame_of_token: torch.Tensor  # [V] frame of each token
    token_index: torch.Tensor | None = None  # [V] index in T·N of each token; None where tokens were merged

    @classmethod
    def from_mask(cls, frame_tokens: torch.Tensor, mask: torch.Tensor) -> "CompressedVisual":
        return cls(frame_tokens[mask], mask, mask.nonzero()[:, 0], mask.flatten().nonzero()[:, 0])

    @classmethod
    def from_placed(cls, placed: Placed, num_frames: int, tokens_per_frame: int) -> "CompressedVisual":
        """Tokens in global position order; the mask marks the position each (possibly merged) token sits at."""
        mask = torch.zeros(num_frames * tokens_per_frame, dtype=torch.bool, device=placed.positions.device)
        mask[placed.positions] = True
        return cls(placed.tokens, mask.view(num_frames, tokens_per_frame), placed.positions // tokens_per_frame,
                   placed.positions)


class Method:
    """A compression method: which visual tokens enter the LLM, and which cache decodes them."""

    name: str
    summary: str
    prunes_at: str = "nothing"
    matchable = False  # has a drop ratio that `match_budget` can set
    needs_vision_states = False  # compress() reads VisualInput.feature_layer_input
    resumes_cache = True  # a conversation's next turn can prefill on top of this method's cache
    OPTIONS: dict[str, str] = {}  # option name (as in the CLI and the results' config) -> field
    KNOBS: tuple[Knob, ...] = ()  # the method's own knobs (named as in OPTIONS), for the app's settings panel

    def knobs(self) -> tuple[Knob, ...]:
        """Every knob this method uses: DyCoke's settings where its stages are on, then its own options."""
        return self.KNOBS

    def effective_config(self, config: DyCokeConfig) -> DyCokeConfig:
        """The DyCoke settings this method really uses, as reported in results."""
        return config

    def options(self) -> dict:
        """The method's own knobs, reported next to the DyCoke settings."""
        return {option: getattr(self, field) for option, field in self.OPTIONS.items()}

    def check_model(self, num_layers: int) -> None:
        """Refuse knobs that do not fit the model, with a one-line message."""

    def resolve(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> "Method":
        """This method with every knob that depends on the request (a matched budget) fixed."""
        return self

    def matched(self, ratio: float, reference: str) -> "Method":
        """This method with drop ratio `ratio`, recorded as matched to `reference`."""
        raise _no_budget_knob(self)

    def install(self, model: torch.nn.Module) -> None:
        """Put the method's hooks on the model, once; they must do nothing for other methods' requests."""

    def budget(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> VisualBudget:
        """Visual tokens in prefill and attended per decoding step, from the settings; results measure the same."""
        everything = num_frames * tokens_per_frame
        return VisualBudget(everything, everything)

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        """Bool [T, N]: the frame tokens that enter the language model."""
        return torch.ones(frame_features.shape[:2], dtype=torch.bool, device=frame_features.device)

    def compress(self, visual: VisualInput, config: DyCokeConfig) -> CompressedVisual:
        return CompressedVisual.from_mask(visual.frame_tokens, self.keep_mask(visual.frame_tokens, config))

    def make_cache(self, layout: VisualLayout, config: DyCokeConfig, plan: CachePlan = DYNAMIC) -> Cache:
        """The request's cache: `plan` says dynamic or static (preallocated, for methods whose cache can be)."""
        return plan.plain()

    def step_record(self, cache: Cache, step_index: int, entered_per_frame: list[int]) -> StepRecord:
        """What decoding step `step_index` (0-based) attended to, per frame, at the layers the method prunes."""
        return StepRecord(entered_per_frame, False)

    def reselections(self, cache: Cache) -> int:
        return 0


@dataclass(frozen=True)
class DyCokeMethod(Method):
    """DyCoke and its ablations: TTM before the LLM, DP while decoding, either or both."""

    name: str
    summary: str
    merges: bool
    prunes: bool
    prunes_at: str = "nothing"

    def effective_config(self, config: DyCokeConfig) -> DyCokeConfig:
        return config.replace(
            merge_ratio=config.merge_ratio if self.merges else 0.0,
            prune_ratio=config.prune_ratio if self.prunes else 0.0,
        )

    def knobs(self) -> tuple[Knob, ...]:
        return (TTM_KNOBS if self.merges else ()) + (DP_KNOBS if self.prunes else ())

    def install(self, model: torch.nn.Module) -> None:
        install_dp_hooks(model)

    def budget(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> VisualBudget:
        settings = self.effective_config(config)
        entered = ttm_kept_total(num_frames, tokens_per_frame, settings.merge_ratio, settings.window)
        attended = kept_count(entered, settings.prune_ratio) if settings.prune_ratio > 0 else entered
        return VisualBudget(entered, attended)

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        if not self.merges:
            return super().keep_mask(frame_features, config)
        return temporal_keep_mask(frame_features, config.merge_ratio, config.window)

    def make_cache(self, layout: VisualLayout, config: DyCokeConfig, plan: CachePlan = DYNAMIC) -> Cache:
        if not self.prunes:
            return plan.plain()
        settings = dict(
            visual_start=layout.start,
            frame_of_visual=layout.frame_of_token,
            num_frames=layout.num_frames,
            prune_layer=config.prune_layer,
            prune_ratio=config.prune_ratio,
            reselect_threshold=config.reselect_threshold,
            visual_positions=layout.positions,
        )
        return StaticDyCokeCache(plan, **settings) if plan.static else DyCokeCache(**settings)

    def step_record(self, cache: Cache, step_index: int, entered_per_frame: list[int]) -> StepRecord:
        if isinstance(cache, DyCokeCache) and cache.pruning:
            return cache.steps[step_index]
        return super().step_record(cache, step_index, entered_per_frame)

    def reselections(self, cache: Cache) -> int:
        return cache.reselections if isinstance(cache, DyCokeCache) else 0


class _PeerMethod(Method):
    """A method compared with DyCoke: DyCoke's own stages are off, and its drop ratio can be matched to a reference."""

    matchable = True
    ratio: float | None
    match: str | None

    def __post_init__(self) -> None:
        if self.ratio is not None:
            _check_ratio(self.ratio_option, self.ratio)
        if self.match is not None and not isinstance(self.match, str):
            raise ConfigError(f"match must be a method name, got {self.match!r}")

    @property
    def ratio_option(self) -> str:
        return next(option for option, field in self.OPTIONS.items() if field == "ratio")

    def effective_config(self, config: DyCokeConfig) -> DyCokeConfig:
        return config.replace(merge_ratio=0.0, prune_ratio=0.0)

    def resolve(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> "Method":
        if self.match is None:
            return self
        return match_budget(self, self.match, config, num_frames, tokens_per_frame)

    def matched(self, ratio: float, reference: str) -> "Method":
        return replace(self, ratio=ratio, match=reference)

    def kept_total(self, num_frames: int, tokens_per_frame: int) -> int:
        """Visual tokens kept out of the video's T·N by the drop ratio (of a resolved method)."""
        if self.ratio is None:
            raise ConfigError(f"{self.name} needs {self.ratio_option} or a method to match")
        return kept_count(num_frames * tokens_per_frame, self.ratio)


@dataclass(frozen=True)
class FastVMethod(_PeerMethod):
    """FastV: from its layer on, drop the share of visual tokens the last prompt token attended to least in the
    layer before (the paper calls the layer K and the share R)."""

    name: str = "fastv"
    summary: str = ("FastV: from the FastV layer of the prefill on, drop the visual tokens the last prompt token "
                    "attends to least")
    prunes_at: str = "prefill (layers from the FastV layer on), and decode on the shorter cache"
    resumes_cache = False  # its layers >= K hold only the first prompt's kept tokens
    layer: int = 2
    ratio: float | None = 0.5
    match: str | None = None
    OPTIONS = {"fastv_layer": "layer", "fastv_ratio": "ratio", "match": "match"}
    KNOBS = (
        Knob("fastv_layer", "FastV layer", "layer", 2, "FastV drops visual tokens from this layer on; the layer "
             "before it ranks them by the attention of the prompt's last token.", minimum=1, step=1),
        Knob("fastv_ratio", "FastV drop ratio", "float", 0.5, "FastV: share of the visual tokens dropped.",
             minimum=0.0, maximum=0.95, step=0.05, matched=True),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_integer(self.layer) or self.layer < 1:
            raise ConfigError(f"fastv_layer (K) must be an integer in 1..num_layers-1, got {self.layer!r}")

    def check_model(self, num_layers: int) -> None:
        if not 1 <= self.layer <= num_layers - 1:
            raise ConfigError(f"fastv_layer (K) must be in 1..{num_layers - 1} for this model ({num_layers} layers), "
                              f"got {self.layer}")

    def install(self, model: torch.nn.Module) -> None:
        install_fastv_hooks(model)

    def budget(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> VisualBudget:
        kept = self.resolve(config, num_frames, tokens_per_frame).kept_total(num_frames, tokens_per_frame)
        return VisualBudget(num_frames * tokens_per_frame, kept)

    def make_cache(self, layout: VisualLayout, config: DyCokeConfig, plan: CachePlan = DYNAMIC) -> Cache:
        # Always dynamic: layers >= K hold fewer positions than the prompt, and FastV's hooks cut the model's mask.
        if self.ratio is None:
            raise ConfigError("fastv needs fastv_ratio or a method to match")
        return FastVCache(layout.start, layout.frame_of_token, layout.num_frames, self.layer, self.ratio,
                          layout.positions)

    def step_record(self, cache: Cache, step_index: int, entered_per_frame: list[int]) -> StepRecord:
        if isinstance(cache, FastVCache) and cache.selected:
            return StepRecord(cache.kept_per_frame, False)
        return super().step_record(cache, step_index, entered_per_frame)


@dataclass(frozen=True)
class VisionZipMethod(_PeerMethod):
    """VisionZip: per frame, dominant tokens by attention received in the vision tower, the rest merged."""

    name: str = "visionzip"
    summary: str = ("VisionZip: per frame, keep the tokens the vision tower attends to most and merge the rest "
                    "into a few contextual tokens")
    prunes_at: str = "before the LLM (vision tower attention)"
    dominant: int = 24
    contextual: int = 4
    ratio: float | None = None
    match: str | None = None
    needs_vision_states = True
    OPTIONS = {"visionzip_dominant": "dominant", "visionzip_contextual": "contextual", "visionzip_ratio": "ratio",
               "match": "match"}
    KNOBS = (
        Knob("visionzip_dominant", "dominant tokens per frame", "int", 24, "VisionZip keeps the tokens the vision "
             "tower attends to most; with a matched budget this sets their share.", minimum=0, maximum=196, step=1),
        Knob("visionzip_contextual", "contextual tokens per frame", "int", 4, "VisionZip merges the rest into this "
             "many tokens; with a matched budget this sets their share.", minimum=0, maximum=196, step=1),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for option, value in (("visionzip_dominant", self.dominant), ("visionzip_contextual", self.contextual)):
            if not _is_integer(value) or value < 0:
                raise ConfigError(f"{option} must be a whole number of tokens per frame, >= 0, got {value!r}")
        if self.dominant + self.contextual < 1:
            raise ConfigError("visionzip keeps no token: visionzip_dominant + visionzip_contextual must be >= 1")

    def frame_counts(self, num_frames: int, tokens_per_frame: int) -> list[tuple[int, int]]:
        """(dominant, contextual) per frame: the knobs as they are or, given a drop ratio (of a resolved method),
        its kept tokens spread evenly over the frames in the knobs' dominant:contextual proportion."""
        if self.ratio is None:
            return [(self.dominant, self.contextual)] * num_frames
        share = self.contextual / (self.dominant + self.contextual)
        totals = spread(self.kept_total(num_frames, tokens_per_frame), num_frames)
        return [(total - math.floor(total * share + 0.5), math.floor(total * share + 0.5)) for total in totals]

    def budget(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> VisualBudget:
        resolved = self.resolve(config, num_frames, tokens_per_frame)
        kept = sum(d + c for d, c in resolved.frame_counts(num_frames, tokens_per_frame))
        return VisualBudget(kept, kept)

    def compress(self, visual: VisualInput, config: DyCokeConfig) -> CompressedVisual:
        frame_tokens = visual.frame_tokens
        num_frames, tokens_per_frame, _ = frame_tokens.shape
        counts = self.frame_counts(num_frames, tokens_per_frame)
        scores, keys = pooled_statistics(visual.model, visual.feature_layer_input)
        frames = [zip_frame(frame_tokens[t], scores[t], keys[t], *counts[t]) for t in range(num_frames)]
        mask = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool, device=frame_tokens.device)
        for t, frame in enumerate(frames):
            mask[t, frame.dominant] = True
        per_frame = torch.tensor([frame.tokens.shape[0] for frame in frames], device=frame_tokens.device)
        frame_of_token = torch.repeat_interleave(torch.arange(num_frames, device=frame_tokens.device), per_frame)
        return CompressedVisual(torch.cat([frame.tokens for frame in frames]), mask, frame_of_token)


DROP_RATIO = Knob("drop_ratio", "drop ratio", "float", 0.5, "Share of the video's visual tokens dropped before "
                  "the language model.", minimum=0.0, maximum=0.95, step=0.05, matched=True)


class _PrunedBeforeLLM(_PeerMethod):
    """A peer that drops tokens before the LLM: every layer attends to the kept_count(T·N, ratio) it keeps."""

    def budget(self, config: DyCokeConfig, num_frames: int, tokens_per_frame: int) -> VisualBudget:
        kept = self.resolve(config, num_frames, tokens_per_frame).kept_total(num_frames, tokens_per_frame)
        return VisualBudget(kept, kept)


@dataclass(frozen=True)
class RandomMethod(_PrunedBeforeLLM):
    """Random: a seeded, uniformly random subset of the video's tokens, of a matched size."""

    name: str = "random"
    summary: str = "random tokens (seeded) with the same visual budget as DyCoke, dropped before the LLM"
    prunes_at: str = "before the LLM"
    ratio: float | None = None
    match: str | None = "dycoke"
    seed: int = 0
    OPTIONS = {"drop_ratio": "ratio", "match": "match", "seed": "seed"}
    KNOBS = (
        DROP_RATIO,
        Knob("seed", "random seed", "int", 0, "Seed of the random choice of tokens.", minimum=0, maximum=10_000,
             step=1),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_integer(self.seed) or not 0 <= self.seed < 2**64:  # torch's generator takes 64 bits
            raise ConfigError(f"seed must be a whole number in 0..2**64-1, got {self.seed!r}")

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        num_frames, tokens_per_frame = frame_features.shape[:2]
        kept = self.kept_total(num_frames, tokens_per_frame)
        chosen = torch.randperm(num_frames * tokens_per_frame, generator=torch.Generator().manual_seed(self.seed))
        mask = torch.zeros(num_frames * tokens_per_frame, dtype=torch.bool)
        mask[chosen[:kept]] = True
        return mask.view(num_frames, tokens_per_frame).to(frame_features.device)


@dataclass(frozen=True)
class UniformFramesMethod(_PrunedBeforeLLM):
    """Uniform frames: whole, evenly spaced frames of a matched budget (the last one in part if it does not divide)."""

    name: str = "uniform-frames"
    summary: str = "whole evenly spaced frames with the same visual budget as DyCoke, dropped before the LLM"
    prunes_at: str = "before the LLM"
    ratio: float | None = None
    match: str | None = "dycoke"
    OPTIONS = {"drop_ratio": "ratio", "match": "match"}
    KNOBS = (DROP_RATIO,)

    def keep_mask(self, frame_features: torch.Tensor, config: DyCokeConfig) -> torch.Tensor:
        num_frames, tokens_per_frame = frame_features.shape[:2]
        whole, partial = divmod(self.kept_total(num_frames, tokens_per_frame), tokens_per_frame)
        frames = evenly_spaced(whole + (partial > 0), num_frames)
        mask = torch.zeros(num_frames, tokens_per_frame, dtype=torch.bool)
        mask[frames[:whole]] = True
        if partial:  # the last chosen frame keeps `partial` tokens on an even spatial stride
            mask[frames[-1], evenly_spaced(partial, tokens_per_frame)] = True
        return mask.to(frame_features.device)


class _MergedBeforeLLM(_PrunedBeforeLLM):
    """A peer that prunes and merges before the LLM to exactly its budget: kept_count(T·N, ratio) tokens, each
    placed at the (frame, position) it stands for. Its knobs other than the ratio are checked against their knobs'
    ranges."""

    needs_vision_states = True  # the salience scores are the attention tokens receive in the vision tower

    def __post_init__(self) -> None:
        super().__post_init__()
        fields = {option: field for option, field in self.OPTIONS.items() if field not in ("ratio", "match")}
        for knob in self.KNOBS:
            if knob.name in fields:
                _check_knob(knob, getattr(self, fields[knob.name]))

    def compress(self, visual: VisualInput, config: DyCokeConfig) -> CompressedVisual:
        frame_tokens = visual.frame_tokens
        num_frames, tokens_per_frame, _ = frame_tokens.shape
        attention = (pooled_statistics(visual.model, visual.feature_layer_input)[0].to(frame_tokens.device)
                     if self.needs_vision_states else None)
        placed = self.place(frame_tokens, attention, self.kept_total(num_frames, tokens_per_frame))
        return CompressedVisual.from_placed(placed, num_frames, tokens_per_frame)

    def place(self, frame_tokens: torch.Tensor, attention: torch.Tensor | None, kept: int) -> Placed:
        raise NotImplementedError


def _check_knob(knob: Knob, value: object) -> None:
    whole = knob.kind in ("int", "layer")
    right_type = _is_integer(value) if whole else isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not right_type or not knob.minimum <= value <= knob.maximum:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{knob.name} ({knob.label}) must be {kind} in [{knob.minimum}, {knob.maximum}], "
                          f"got {value!r}")


def _ratio_knob(method: str, paper_keeps: str, default: float) -> Knob:
    return Knob(f"{method}_ratio", f"{method} drop ratio", "float", default,
                f"Share of the video's visual tokens dropped before the language model ({paper_keeps}).",
                minimum=0.0, maximum=0.95, step=0.05, matched=True)


@dataclass(frozen=True)
class HoliTomMethod(_MergedBeforeLLM):
    """HoliTom's outer-LLM merging: global static windows merged over time, then density-peak merging in space."""

    name: str = "holitom"
    summary: str = ("HoliTom: merge positions that stay static through the best temporal windows, then keep the "
                    "most attended dynamic tokens and merge static ones by density peaks")
    prunes_at: str = "before the LLM (temporal windows + spatial merging; its inner-LLM merging is left out)"
    ratio: float | None = 0.85
    match: str | None = None
    threshold: float = 0.8
    beta: float = 0.6
    contextual_share: float = 0.0
    neighbours: int = 7
    OPTIONS = {"holitom_ratio": "ratio", "holitom_tau": "threshold", "holitom_beta": "beta",
               "holitom_contextual": "contextual_share", "holitom_neighbours": "neighbours", "match": "match"}
    KNOBS = (
        _ratio_knob("holitom", "the paper keeps 15%", 0.85),
        Knob("holitom_tau", "HoliTom static threshold τ", "float", 0.8, "HoliTom: a position is static between "
             "adjacent frames when its tokens are more cosine-similar than this.", minimum=-1.0, maximum=1.0,
             step=0.05),
        Knob("holitom_beta", "HoliTom merge weight β", "float", 0.6, "HoliTom: a merged token is β·centre + "
             "(1−β)·mean of the tokens merged into it.", minimum=0.0, maximum=1.0, step=0.05),
        Knob("holitom_contextual", "HoliTom contextual share D", "float", 0.0, "HoliTom: share of each frame's "
             "dynamic budget merged by density peaks instead of kept by attention.", minimum=0.0, maximum=1.0,
             step=0.05),
        Knob("holitom_neighbours", "HoliTom density neighbours k", "int", 7, "HoliTom: neighbours in the DPC-kNN "
             "density.", minimum=1, maximum=64, step=1),
    )

    def place(self, frame_tokens: torch.Tensor, attention: torch.Tensor | None, kept: int) -> Placed:
        settings = HoliTomSettings(self.threshold, self.beta, self.contextual_share, self.neighbours)
        return holitom_compress(frame_tokens, attention, kept, settings)


@dataclass(frozen=True)
class FastVIDMethod(_MergedBeforeLLM):
    """FastVID: dynamic temporal segments, salient tokens by attention, contextual tokens by density merging."""

    name: str = "fastvid"
    summary: str = ("FastVID: split the video at its scene changes, keep each frame's most attended tokens and "
                    "merge each segment into density-peak tokens of its anchor frames")
    prunes_at: str = "before the LLM (segments + salient and density-merged tokens)"
    ratio: float | None = 0.9
    match: str | None = None
    min_segments: int = 8
    segment_threshold: float = 0.9
    contextual_share: float = 0.4
    anchor_step: int = 4
    beta: float = 0.6
    OPTIONS = {"fastvid_ratio": "ratio", "fastvid_segments": "min_segments", "fastvid_tau": "segment_threshold",
               "fastvid_contextual": "contextual_share", "fastvid_anchor_step": "anchor_step",
               "fastvid_beta": "beta", "match": "match"}
    KNOBS = (
        _ratio_knob("fastvid", "the paper keeps 10%", 0.9),
        Knob("fastvid_segments", "FastVID segments c", "int", 8, "FastVID: at least this many temporal segments "
             "(cuts at the least similar transitions).", minimum=1, maximum=64, step=1),
        Knob("fastvid_tau", "FastVID segment threshold τ", "float", 0.9, "FastVID: cut between frames whose "
             "global features are less cosine-similar than this.", minimum=-1.0, maximum=1.0, step=0.05),
        Knob("fastvid_contextual", "FastVID contextual share d", "float", 0.4, "FastVID: share of each frame's "
             "budget given to density-merged contextual tokens.", minimum=0.0, maximum=1.0, step=0.05),
        Knob("fastvid_anchor_step", "FastVID anchor step p", "int", 4, "FastVID: every p-th frame of a segment "
             "(from its last) holds the segment's contextual tokens.", minimum=1, maximum=64, step=1),
        Knob("fastvid_beta", "FastVID merge weight β", "float", 0.6, "FastVID: a merged token keeps at least "
             "this weight of its anchor token.", minimum=0.0, maximum=1.0, step=0.05),
    )

    def place(self, frame_tokens: torch.Tensor, attention: torch.Tensor | None, kept: int) -> Placed:
        settings = FastVIDSettings(self.min_segments, self.segment_threshold, self.contextual_share,
                                   self.anchor_step, self.beta)
        return fastvid_compress(frame_tokens, attention, kept, settings)


@dataclass(frozen=True)
class VidCom2Method(_MergedBeforeLLM):
    """VidCom²: a budget per frame from its uniqueness, then the frame's most distinct tokens."""

    name: str = "vidcom2"
    summary: str = ("VidCom²: give unique frames more tokens, and keep in each frame the tokens least like the "
                    "video and the frame")
    prunes_at: str = "before the LLM (per-frame budgets from frame uniqueness)"
    ratio: float | None = 0.75
    match: str | None = None
    temperature: float = 0.01
    needs_vision_states = False
    OPTIONS = {"vidcom2_ratio": "ratio", "vidcom2_temperature": "temperature", "match": "match"}
    KNOBS = (
        _ratio_knob("vidcom2", "the paper keeps 25%", 0.75),
        Knob("vidcom2_temperature", "VidCom² temperature", "float", 0.01, "VidCom²: softmax temperature of the "
             "frame uniqueness; lower gives unique frames a larger share.", minimum=0.001, maximum=10.0,
             step=0.001),
    )

    def place(self, frame_tokens: torch.Tensor, attention: torch.Tensor | None, kept: int) -> Placed:
        return vidcom2_compress(frame_tokens, kept, self.temperature)


@dataclass(frozen=True)
class FlashVIDMethod(_MergedBeforeLLM):
    """FlashVID's vision side: attention-and-diversity selection, then tree-based spatio-temporal merging."""

    name: str = "flashvid"
    summary: str = ("FlashVID: per frame, pick diverse well-attended tokens, and merge the rest along temporal "
                    "trees and density-peak clusters")
    prunes_at: str = "before the LLM (ADTS + tree merging; its inner-LLM pruning is left out)"
    ratio: float | None = 0.75
    match: str | None = None
    selection_share: float = 0.7
    temporal_threshold: float = 0.8
    segment_threshold: float = 0.9
    min_segments: int = 8
    OPTIONS = {"flashvid_ratio": "ratio", "flashvid_alpha": "selection_share", "flashvid_tau": "temporal_threshold",
               "flashvid_segment_tau": "segment_threshold", "flashvid_segments": "min_segments", "match": "match"}
    KNOBS = (
        _ratio_knob("flashvid", "the paper keeps 25%", 0.75),
        Knob("flashvid_alpha", "FlashVID selection share α", "float", 0.7, "FlashVID: share of each frame's budget "
             "picked by attention and diversity; the rest comes from tree merging.", minimum=0.0, maximum=1.0,
             step=0.05),
        Knob("flashvid_tau", "FlashVID tree threshold", "float", 0.8, "FlashVID: a token joins its most similar "
             "token of the previous frame when their cosine similarity is above this.", minimum=-1.0, maximum=1.0,
             step=0.05),
        Knob("flashvid_segment_tau", "FlashVID segment threshold", "float", 0.9, "FlashVID: cut between frames "
             "whose mean tokens are less cosine-similar than this.", minimum=-1.0, maximum=1.0, step=0.05),
        Knob("flashvid_segments", "FlashVID segments", "int", 8, "FlashVID: at least this many temporal segments.",
             minimum=1, maximum=64, step=1),
    )

    def place(self, frame_tokens: torch.Tensor, attention: torch.Tensor | None, kept: int) -> Placed:
        settings = FlashVIDSettings(self.selection_share, self.temporal_threshold, self.segment_threshold,
                                    self.min_segments)
        return flashvid_compress(frame_tokens, attention, kept, settings)


REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        DyCokeMethod("baseline", "no compression: every visual token, plain KV cache", merges=False, prunes=False),
        DyCokeMethod("dycoke", "TTM before the LLM plus DP at every decoding step", merges=True, prunes=True,
                     prunes_at="before the LLM (TTM) and decode (DP, layers >= L)"),
        DyCokeMethod("ttm", "TTM only: temporal merging before the LLM", merges=True, prunes=False,
                     prunes_at="before the LLM (TTM)"),
        DyCokeMethod("dp", "DP only: dynamic KV-cache pruning while decoding", merges=False, prunes=True,
                     prunes_at="decode (DP, layers >= L)"),
        FastVMethod(),
        VisionZipMethod(),
        RandomMethod(),
        UniformFramesMethod(),
        HoliTomMethod(),
        FastVIDMethod(),
        VidCom2Method(),
        FlashVIDMethod(),
    )
}


def method_names() -> list[str]:
    return list(REGISTRY)


def matchable_names() -> list[str]:
    return [name for name, method in REGISTRY.items() if method.matchable]


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(REGISTRY)}") from None


def configure(method: str | Method, **options) -> Method:
    """The method with the given knobs (option names as in `Method.OPTIONS`); None and foreign options are ignored.

    An explicit ratio turns off a default match (random and uniform-frames match DyCoke unless given a ratio).
    """
    chosen = get_method(method) if isinstance(method, str) else method
    given = {option: value for option, value in options.items() if value is not None}
    if "match" in given:
        if not chosen.matchable:
            raise _no_budget_knob(chosen)
        get_method(given["match"])  # an unknown name fails here, with the list of known ones
    changes = {chosen.OPTIONS[option]: value for option, value in given.items() if option in chosen.OPTIONS}
    if chosen.matchable and "ratio" in changes:
        if "match" in changes:
            raise ConfigError(f"give {chosen.ratio_option} or a method to match, not both")
        changes["match"] = None
    return replace(chosen, **changes) if changes else chosen


def match_budget(method: str | Method, reference: str | Method, config: DyCokeConfig, num_frames: int,
                 tokens_per_frame: int) -> Method:
    """`method` with the drop ratio that makes its attended visual budget equal `reference`'s, exactly."""
    chosen = get_method(method) if isinstance(method, str) else method
    peer = get_method(reference) if isinstance(reference, str) else reference
    if not chosen.matchable:
        raise _no_budget_knob(chosen)
    target = peer.budget(config, num_frames, tokens_per_frame).attended
    return chosen.matched(ratio_keeping(target, num_frames * tokens_per_frame), peer.name)


def _no_budget_knob(method: Method) -> ConfigError:
    return ConfigError(f"'{method.name}' has no budget knob of its own; matching applies to "
                       f"{', '.join(matchable_names())}")


def knobs_shown(names: list[str], match: str | None = None) -> list[Knob]:
    """The knobs the methods `names` use, each once, in order; when a peer among them matches the budget of
    `match`, also `match`'s knobs that set that budget, and without the drop ratios that the matching sets."""
    chosen = [get_method(name) for name in names]
    matching = match is not None and any(method.matchable for method in chosen)
    shown: dict[str, Knob] = {}
    for method in chosen:
        for knob in method.knobs():
            if not (matching and method.matchable and knob.matched):
                shown.setdefault(knob.name, knob)
    if matching:
        for knob in get_method(match).knobs():
            if knob.sets_budget:
                shown.setdefault(knob.name, knob)
    return list(shown.values())


def all_knobs() -> list[Knob]:
    """Every registered method's knobs, each once: what the app builds a control for."""
    return knobs_shown(method_names())


def configure_from_knobs(name: str, values: dict[str, object], match: str | None = None
                         ) -> tuple[DyCokeConfig, Method]:
    """The DyCoke settings and the method `name` from knob values keyed by knob name (each parsed to its type);
    a peer given `match` gets its drop ratio from that method's budget instead of its ratio knob."""
    method = get_method(name)
    matching = match is not None and method.matchable
    options = {knob.name: knob.parse(values[knob.name]) for knob in method.knobs()
               if not knob.in_config and knob.name in values and not (matching and knob.matched)}
    if method.matchable:
        options["match"] = match
    return config_from(values), configure(method, **options)


def configured_values(method: Method, config: DyCokeConfig) -> list[tuple[Knob, object]]:
    """Each of `method`'s knobs with the value it runs with: DyCoke's from `config`, the rest from the method;
    a drop ratio still left to a match (None) is left out."""
    values = []
    for knob in method.knobs():
        value = getattr(config, knob.name) if knob.in_config else method.options()[knob.name]
        if value is not None:
            values.append((knob, value))
    return values


def install_hooks(model: torch.nn.Module) -> None:
    """Every registered method's hooks, once each; each is inert for the other methods' requests."""
    for method in REGISTRY.values():
        method.install(model)

