"""Model families: what differs between LLaVA-OneVision and Qwen-VL, behind one interface.

A family knows how to turn a clip into its model's pixels, vision features per temporal group ([T, N, D]: a "frame"
for TTM, DP's traces and the heatmaps), the prompt's full token layout with its positions, and the inputs the
language model is given once a method has chosen which visual tokens enter it. Everything else (the pipeline, the
methods, DP, the traces, the CLI, the bench, the app) sees only these objects.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from dycoke.config import ConfigError
from dycoke.limits import check_question_tokens, clean_question
from dycoke.video import FrameSize

ASSISTANT_TURN = "<|im_end|>\n<|im_start|>assistant\n"  # closes a question, opens its answer
NEXT_USER_TURN = "<|im_end|>\n<|im_start|>user\n"  # closes an answer, opens the next question

# A fast tokenizer's call sets the shared Rust tokenizer's `encode_special_tokens` flag, then encodes with the GIL
# released: a question (special tokens split) and template text (special tokens meant) encoded at the same time
# in two threads, as the app's two panes do, can each be encoded with the other's setting.
_ENCODING = threading.Lock()


@dataclass(frozen=True)
class Geometry:
    """How a clip maps onto the model's visual tokens."""

    groups: int  # temporal groups: the frames of TTM, the traces and the heatmaps
    grid_h: int  # tokens per group, rows
    grid_w: int  # tokens per group, columns
    frames_per_group: int = 1  # video frames merged into one group (Qwen-VL's temporal patch)
    extra_tokens: int = 0  # visual-slot tokens that are not frame tokens (LLaVA-OneVision's newline)

    @property
    def tokens_per_group(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def frame_tokens(self) -> int:
        return self.groups * self.tokens_per_group


@dataclass
class VideoFeatures:
    """What the vision side produced for one clip."""

    frame_tokens: torch.Tensor  # [T groups, N, D] in the language model's embedding space
    layer_input: torch.Tensor | None = None  # hidden state entering the vision feature layer, if asked for
    extras: dict = field(default_factory=dict)  # family-specific: LLaVA's newline, Qwen3-VL's DeepStack features

    def nbytes(self) -> int:
        tensors = [self.frame_tokens, self.layer_input]
        for extra in self.extras.values():
            tensors += extra if isinstance(extra, list) else [extra]
        return sum(tensor.nbytes for tensor in tensors if isinstance(tensor, torch.Tensor))


@dataclass(frozen=True)
class PromptLayout:
    """The prompt as the model's own processor lays it out, every visual token included."""

    input_ids: torch.Tensor  # [S] the family's video token at every frame-token slot
    frame_slots: torch.Tensor  # [T·N] layout index of each frame token, group-major
    positions: torch.Tensor | None = None  # [3, S] M-RoPE positions of the full layout; None for 1-D RoPE
    mm_token_type_ids: torch.Tensor | None = None  # [S] 0 text, 2 video, as the processor makes them
    rope_inputs: dict = field(default_factory=dict)  # what else get_rope_index read (Qwen2.5-VL: second_per_grid_ts)


@dataclass
class ModelInputs:
    """What `generate` is given for one request, once the kept visual tokens are known."""

    embeds: torch.Tensor  # [1, S', D]
    visual_positions: torch.Tensor  # [V] index in `embeds` of each kept visual token, ascending
    generate_kwargs: dict = field(default_factory=dict)  # e.g. M-RoPE position_ids


def question_ids(tokenizer, question: str) -> list[int]:
    """The question's token ids; user text can never become chat-template special tokens."""
    ids = _encode(tokenizer, clean_question(question), split_special_tokens=True)
    check_question_tokens(len(ids))
    return ids


def text_ids(tokenizer, text: str) -> list[int]:
    """Template text, whose special tokens are meant."""
    return _encode(tokenizer, text, split_special_tokens=False) if text else []


def _encode(tokenizer, text: str, split_special_tokens: bool) -> list[int]:
    with _ENCODING:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens).input_ids


def positions_after(positions: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """M-RoPE positions [3, 1, P] followed by those of `count` more text tokens (text counts on from the last
    position, which is text: its three positions are equal); None (1-D positions, left to generate) stays None."""
    if positions is None:
        return None
    steps = torch.arange(1, count + 1, device=positions.device)
    return torch.cat([positions, positions[..., -1:] + steps], dim=-1)


def kept_layout_index(layout: PromptLayout, token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout indices that enter the model (every non-frame token, the kept frame tokens) in layout order, and where
    in them each kept frame token lands."""
    device = layout.input_ids.device
    is_kept = torch.ones(layout.input_ids.numel(), dtype=torch.bool, device=device)
    is_kept[layout.frame_slots] = False
    kept_slots = layout.frame_slots[token_index.to(device)]
    is_kept[kept_slots] = True
    keep = is_kept.nonzero()[:, 0]
    return keep, torch.searchsorted(keep, kept_slots)


class Family(ABC):
    """One model family: each step from a clip to the inputs of `generate`."""

    name: str
    model_class: type
    model_types: tuple[str, ...]
    before_video: str  # the chat template's text before the video: the system turn, the user's opening
    after_video: str = ""  # the template's text between the video and the first question

    @abstractmethod
    def geometry(self, model: torch.nn.Module, num_frames: int, height: int, width: int) -> Geometry:
        """Temporal groups and tokens per group of a clip of `num_frames` frames of height x width."""

    @abstractmethod
    def encode(self, model: torch.nn.Module, frames, geometry: Geometry,
               with_layer_input: bool = False) -> VideoFeatures:
        """Vision features of uint8 frames [T, H, W, 3], per temporal group."""

    @abstractmethod
    def decode_size(self, config) -> FrameSize:
        """What the decoder resizes frames to for a model of this config."""

    def prompt_ids(self, tokenizer, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the video of a one-question prompt."""
        after = text_ids(tokenizer, self.after_video) + question_ids(tokenizer, question)
        return text_ids(tokenizer, self.before_video), after + text_ids(tokenizer, ASSISTANT_TURN)

    def layout(self, model: torch.nn.Module, tokenizer, question: str, geometry: Geometry,
               timestamps: tuple[float, ...], fps: float) -> PromptLayout:
        """The full one-question prompt as the model's processor lays it out, with its positions."""
        before, after = self.prompt_ids(tokenizer, question)
        return self.video_layout(model, tokenizer, before, after, geometry, timestamps, fps)

    @abstractmethod
    def video_layout(self, model: torch.nn.Module, tokenizer, before: list[int], after: list[int],
                     geometry: Geometry, timestamps: tuple[float, ...], fps: float) -> PromptLayout:
        """Token ids `before`, the video as the model's processor lays it out, then `after`, with positions."""

    def video_text_tokens(self, tokenizer, model: torch.nn.Module, geometry: Geometry,
                          timestamps: tuple[float, ...]) -> int:
        """Tokens the video takes in the prompt besides its frame tokens."""
        return geometry.extra_tokens

    @abstractmethod
    def model_inputs(self, model: torch.nn.Module, layout: PromptLayout, features: VideoFeatures,
                     compressed) -> ModelInputs:
        """The inputs of `generate` once the method chose its tokens (a CompressedVisual)."""

    @abstractmethod
    def reference_inputs(self, model: torch.nn.Module, layout: PromptLayout, frames, geometry: Geometry) -> dict:
        """The model's own inputs for the same request (input_ids, pixel_values_videos, ...), for `generate`."""

    def group_times(self, timestamps: tuple[float, ...], geometry: Geometry) -> list[float]:
        return list(timestamps)

    def check_method(self, method, model: torch.nn.Module) -> None:
        """Refuse a method that does not carry over to this family, with a one-line reason."""

    def describe(self, model: torch.nn.Module) -> str:
        return self.name


def refuse(method_name: str, reason: str) -> ConfigError:
    return ConfigError(f"{method_name} does not run on this model: {reason}")


def families() -> list[Family]:
    from dycoke.families.llava_onevision import LLAVA_ONEVISION
    from dycoke.families.qwen_vl import QWEN2_5_VL, QWEN3_VL

    return [LLAVA_ONEVISION, QWEN2_5_VL, QWEN3_VL]


def family_of(model_or_config) -> Family:
    """The family of a model, or of a config, by its model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in families():
        if config.model_type in family.model_types:
            return family
    known = ", ".join(t for family in families() for t in family.model_types)
    raise ValueError(f"model type '{config.model_type}' is not supported; supported: {known}")
