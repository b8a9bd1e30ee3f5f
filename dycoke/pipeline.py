"""One request, end to end: video -> vision features -> compression -> streamed generation with per-step traces."""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from transformers import Cache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dycoke.config import DyCokeConfig
from dycoke.limits import (
    MAX_FRAMES, RequestError, VideoLimits, check_frames, check_new_tokens, check_question_tokens, clean_question,
)
from dycoke.memory import ConversationMemory
from dycoke.methods import Method, VisualInput, VisualLayout, get_method, install_hooks
from dycoke.metrics import Clock, RequestTimes, cache_bytes, peak_memory_bytes, reset_peak_memory
from dycoke.models import LoadedModel
from dycoke.decoder import VideoDecoder
from dycoke.video import VideoClip, to_pixel_values
from dycoke.visionzip import feature_layer_index

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT_TURN = "<|im_end|>\n<|im_start|>assistant\n"
VIDEO_NEWLINE_TOKENS = 1  # LLaVA-OneVision's image_newline, once after the video's tokens
Progress = Callable[[float, str], None]
# What running out of memory raises: CUDA's allocator (torch.OutOfMemoryError, a RuntimeError) or the host's.
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)
Value = TypeVar("Value")


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class StepTrace:
    step: int
    kept_per_frame: list[int]
    reselected: bool


@dataclass(frozen=True)
class Result:
    answer: str
    model: str
    method: str
    config: dict
    metrics: dict
    trace: dict
    token_ids: list[int] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict:
        """The CLI's JSON contract (DESIGN.md §4)."""
        contract = asdict(self)
        del contract["token_ids"]
        return contract


Event = TextDelta | StepTrace | Result


@dataclass(frozen=True)
class VisionFeatures:
    """The vision side of one clip, independent of the method: what every method compresses."""

    frame_tokens: torch.Tensor  # [T, N, D] projected, pooled frame tokens
    newline: torch.Tensor  # [D] the image_newline token
    feature_layer_input: torch.Tensor | None = None  # [T, P, Dv] entering the vision feature layer, if asked for

    def nbytes(self) -> int:
        tensors = (self.frame_tokens, self.newline, self.feature_layer_input)
        return sum(tensor.nbytes for tensor in tensors if tensor is not None)


@dataclass(frozen=True)
class VideoPrefix:
    """The prompt up to the question for one method: system turn, the kept visual tokens, the newline."""

    embeds: torch.Tensor  # [1, P, D]
    layout: VisualLayout
    keep_mask: torch.Tensor
    ttm_kept_per_frame: list[int]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


@dataclass
class Prepared:
    """Everything generation needs, built before the first token."""

    embeds: torch.Tensor
    cache: Cache
    keep_mask: torch.Tensor
    ttm_kept_per_frame: list[int]
    times: RequestTimes


class Pipeline:
    """Holds one loaded model and runs requests on it; all per-request state lives in the request's own objects."""

    def __init__(self, loaded: LoadedModel, max_frames: int = MAX_FRAMES,
                 video_limits: VideoLimits = VideoLimits(), memory: ConversationMemory | None = None) -> None:
        self.loaded = loaded
        self.max_frames = max_frames
        self.video_limits = video_limits
        self.memory = memory or ConversationMemory()  # what this process's conversations may keep between turns
        self.clock = Clock(loaded.device)
        self.decoder = VideoDecoder()  # its workers start on the first video (or on decoder.start())
        install_hooks(loaded.model)

    def load_video(self, path: str | Path, num_frames: int = 32) -> VideoClip:
        """Probe, check the limits, then decode straight to the model's frame size in a worker process that
        cannot hang or crash the caller."""
        return self.decoder.load(path, check_frames(num_frames, self.max_frames), self.loaded.image_size,
                                 self.video_limits)

    def answer(self, video: str | Path | VideoClip, question: str, **options) -> Result:
        """Run a request to the end and return its result."""
        for event in self.stream(video, question, **options):
            if isinstance(event, Result):
                return event
        raise RuntimeError("generation ended without a result")

    def stream(
        self,
        video: str | Path | VideoClip,
        question: str,
        method: str | Method = "dycoke",
        config: DyCokeConfig | None = None,
        max_new_tokens: int = 64,
        ignore_eos: bool = False,
        num_frames: int = 32,
        progress: Progress | None = None,
    ) -> Iterator[Event]:
        """Yield text deltas and one StepTrace per decoding step while generating, then the Result."""
        chosen, requested, settings = self.check_request(method, config, max_new_tokens)
        prompt = encode_prompt(self.loaded.tokenizer, question)
        report = progress or (lambda fraction, message: None)

        if not isinstance(video, VideoClip):
            report(0.0, "decoding video")
        clip = video if isinstance(video, VideoClip) else self.load_video(video, num_frames)
        times = RequestTimes(decode_video_s=clip.decode_seconds)
        chosen = chosen.resolve(requested, clip.num_frames, self.loaded.tokens_per_frame)  # e.g. a matched budget
        self.check_context(chosen, requested, settings, clip.num_frames, len(prompt[0]) + len(prompt[1]),
                           max_new_tokens)
        report(0.3, "encoding frames")
        prepared = self.guard_memory(lambda: self.prepare(clip, prompt, chosen, settings, times), clip.num_frames)
        report(0.5, "generating")
        yield from self.generate(prepared, clip, chosen, settings, max_new_tokens, ignore_eos)

    def check_request(self, method: str | Method, config: DyCokeConfig | None,
                      max_new_tokens: int) -> tuple[Method, DyCokeConfig, DyCokeConfig]:
        """The method, the requested settings and the ones it really uses, refused early if they do not fit."""
        chosen = method if isinstance(method, Method) else get_method(method)
        requested = config or DyCokeConfig()
        settings = chosen.effective_config(requested)
        settings.check_layers(self.loaded.num_layers)
        chosen.check_model(self.loaded.num_layers)
        check_new_tokens(max_new_tokens)
        return chosen, requested, settings

    def check_context(self, method: Method, requested: DyCokeConfig, settings: DyCokeConfig, num_frames: int,
                      text_tokens: int, max_new_tokens: int, context: int | None = None) -> None:
        """Refuse, before any vision work, a request whose prompt and answer would not fit the model's context,
        saying how many frames fit.

        Positions run over the tokens that enter the language model, so what counts is the method's prefill
        budget (exact, from its settings), not the clip's full T·N: DyCoke fits more frames than the baseline.
        """
        context = context or self.context_length
        per_frame = self.loaded.tokens_per_frame

        def needed(frames: int) -> tuple[int, int]:
            visual = method.resolve(requested, frames, per_frame).budget(settings, frames, per_frame).prefill
            return visual, text_tokens + visual + VIDEO_NEWLINE_TOKENS + max_new_tokens

        visual, total = needed(num_frames)
        if total <= context:
            return
        fit = next((frames for frames in range(num_frames - 1, 0, -1) if needed(frames)[1] <= context), 0)
        advice = f"use {fit} frames or fewer" if fit else "shorten the question or the answer"
        raise RequestError(f"{num_frames} frames give {visual:,} visual tokens with {method.name}; with the prompt "
                           f"and {max_new_tokens} new tokens that is {total:,}, over this model's context of "
                           f"{context:,} positions: {advice}")

    @property
    def context_length(self) -> int:
        """Positions the language model was built for."""
        return self.loaded.model.config.get_text_config().max_position_embeddings

    def guard_memory(self, work: Callable[[], Value], num_frames: int) -> Value:
        """Run `work` in inference mode; running out of memory becomes the one-line error, with the memory freed."""
        out_of_memory = False
        try:
            with torch.inference_mode():
                return work()
        except OUT_OF_MEMORY:
            out_of_memory = True  # raised below, outside this block, so no traceback keeps the tensors alive
        if out_of_memory:
            raise self._out_of_memory(num_frames)

    def _out_of_memory(self, num_frames: int, prepared: Prepared | None = None) -> RequestError:
        """Free what the failed request held, then the one-line error that tells the user what to change."""
        if prepared is not None:
            prepared.embeds = prepared.cache = prepared.keep_mask = None
        gc.collect()
        if self.loaded.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return RequestError(f"out of memory at {num_frames} frames: use fewer frames (or fewer new tokens) "
                            "and ask again")

    def prepare(self, clip: VideoClip, prompt: tuple[list[int], list[int]], method: Method,
                settings: DyCokeConfig, times: RequestTimes | None = None,
                vision: Callable[[VideoClip, bool], VisionFeatures] | None = None) -> Prepared:
        """Vision features, compression and the prompt embeddings: everything up to the first generate call.

        `method` must be resolved (Method.resolve) for this clip; `stream` does that. `vision` gives the
        features (default: `vision_features`; a conversation passes its per-clip cache).
        """
        times = times or RequestTimes()
        reset_peak_memory(self.loaded.device)
        times.vision_start = self.clock.now()
        features = (vision or self.vision_features)(clip, method.needs_vision_states)
        times.vision_end = self.clock.now()
        prefix = self.video_prefix(features, prompt[0], method, settings)
        embeds = torch.cat([prefix.embeds, self.embed_text(prompt[1])], dim=1)
        cache = method.make_cache(prefix.layout, settings)
        times.compress_end = self.clock.now()
        return Prepared(embeds, cache, prefix.keep_mask, prefix.ttm_kept_per_frame, times)

    def video_prefix(self, features: VisionFeatures, system_ids: list[int], method: Method,
                     settings: DyCokeConfig) -> VideoPrefix:
        """Compress the clip's features with `method` (resolved for the clip) into the prompt's video prefix."""
        model = self.loaded.model
        compressed = method.compress(VisualInput(features.frame_tokens, model, features.feature_layer_input),
                                     settings)
        device = model.get_input_embeddings().weight.device
        embeds = torch.cat([self.embed_text(system_ids), compressed.tokens[None].to(device),
                            features.newline[None, None].to(device)], dim=1)
        num_frames = features.frame_tokens.shape[0]
        layout = VisualLayout(start=len(system_ids), frame_of_token=compressed.frame_of_token, num_frames=num_frames)
        ttm_kept_per_frame = torch.bincount(compressed.frame_of_token, minlength=num_frames).tolist()
        return VideoPrefix(embeds, layout, compressed.keep_mask, ttm_kept_per_frame)

    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings [1, len(ids), D]."""
        embed = self.loaded.model.get_input_embeddings()
        return embed(torch.tensor([ids], dtype=torch.long, device=embed.weight.device))

    def vision_features(self, clip: VideoClip, with_feature_layer_input: bool = False) -> VisionFeatures:
        """The clip through the vision tower and projector; methods that look inside the tower ask for more."""
        return VisionFeatures(*self._vision_features(clip, with_feature_layer_input))

    def _vision_features(self, clip: VideoClip, with_feature_layer_input: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Frame tokens [T, N, D], the newline token and, if asked, the hidden state entering the feature layer."""
        model = self.loaded.model
        vision = model.model.vision_tower
        pixels = to_pixel_values(clip.frames, self.loaded.image_size, device=next(vision.parameters()).device,
                                 dtype=self.loaded.dtype)
        capture = {}
        if with_feature_layer_input:  # hidden states are counted from the embeddings: index i enters layer i
            index = feature_layer_index(model)
            capture["output_hidden_states"] = [index - 1, index]
        outputs = model.get_video_features(
            pixel_values_videos=pixels[None],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            **capture,
        )
        features = outputs.pooler_output[0]
        frame_tokens = features[:-1].view(clip.num_frames, self.loaded.tokens_per_frame, -1)
        return frame_tokens, features[-1], outputs.hidden_states[index - 1] if capture else None

    def generate(self, prepared: Prepared, clip: VideoClip, method: Method, settings: DyCokeConfig,
                 max_new_tokens: int, ignore_eos: bool, cancelled: threading.Event | None = None) -> Iterator[Event]:
        """Stream generation on `prepared` from a worker thread, always joined before this returns.

        Setting `cancelled` ends generation after the step in progress; the Result then holds the partial answer.
        """
        events: queue.Queue = queue.Queue()
        cancelled = cancelled or threading.Event()
        streamer = _TraceStreamer(self.loaded.tokenizer, prepared, method, self.clock, events)
        worker = threading.Thread(
            target=self._run_generate,
            args=(prepared, streamer, max_new_tokens, ignore_eos, cancelled, events),
            name="dycoke-generate",
            daemon=True,
        )
        worker.start()
        failure: BaseException | None = None
        try:
            while (event := events.get()) is not _DONE:
                if isinstance(event, BaseException):
                    failure = event
                    break
                yield event
        finally:  # also when the consumer stops early (close, GeneratorExit) or raises: the worker always ends
            cancelled.set()
            worker.join()
        if isinstance(failure, OUT_OF_MEMORY):
            failure = None  # its traceback holds generate's frames and their tensors: drop it before freeing
            raise self._out_of_memory(clip.num_frames, prepared)
        if failure is not None:
            raise failure  # any other fault reaches the caller as it was raised, the worker already joined
        yield self._result(prepared, clip, method, settings, streamer)

    def _run_generate(self, prepared: Prepared, streamer: "_TraceStreamer", max_new_tokens: int,
                      ignore_eos: bool, cancelled: threading.Event, events: queue.Queue) -> None:
        try:
            generation = self.loaded.model.generation_config
            stop_ids = None if ignore_eos else generation.eos_token_id
            with torch.inference_mode():
                prepared.times.generate_start = self.clock.now()
                self.loaded.model.generate(
                    inputs_embeds=prepared.embeds,
                    attention_mask=torch.ones(prepared.embeds.shape[:2], dtype=torch.long,
                                              device=prepared.embeds.device),
                    past_key_values=prepared.cache,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens if ignore_eos else 0,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=stop_ids,
                    pad_token_id=generation.pad_token_id or self.loaded.tokenizer.pad_token_id,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                )
        except BaseException as error:  # handed to the consumer, which re-raises it in its own thread
            events.put(error)
        finally:
            events.put(_DONE)

    def _result(self, prepared: Prepared, clip: VideoClip, method: Method, settings: DyCokeConfig,
                streamer: "_TraceStreamer") -> Result:
        cache = prepared.cache
        steps = streamer.steps
        visual_after_ttm = sum(prepared.ttm_kept_per_frame)  # merged tokens (visionzip) have no mask position
        attended = [sum(step.kept_per_frame) for step in steps]
        metrics = prepared.times.metrics() | {
            "peak_memory_bytes": peak_memory_bytes(self.loaded.device),
            "kv_cache_bytes": cache_bytes(cache),
            "visual_tokens_in": int(prepared.keep_mask.numel()),
            "visual_tokens_after_ttm": visual_after_ttm,
            "visual_tokens_attended_mean": sum(attended) / len(attended) if attended else float(visual_after_ttm),
            "reselections": method.reselections(cache),
        }
        trace = {
            "frames": clip.num_frames,
            "tokens_per_frame": self.loaded.tokens_per_frame,
            "frame_times_s": [round(t, 4) for t in clip.timestamps],
            "ttm_kept_per_frame": prepared.ttm_kept_per_frame,
            "ttm_keep_mask": prepared.keep_mask.int().tolist(),
            "steps": [{"kept_per_frame": s.kept_per_frame, "reselected": s.reselected} for s in steps],
        }
        config = settings.to_dict() | method.options()  # DyCoke's five settings, then the method's own knobs
        return Result(streamer.text, self.loaded.name, method.name, config, metrics, trace, streamer.token_ids)


_DONE = object()


class _Cancelled(StoppingCriteria):
    """Stops generation when the consumer of the stream went away."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


class _TraceStreamer(BaseStreamer):
    """Receives each new token from generate: times it, decodes the text delta, and records the step's trace."""

    def __init__(self, tokenizer, prepared: Prepared, method: Method, clock: Clock, events: queue.Queue) -> None:
        self.tokenizer = tokenizer
        self.prepared = prepared
        self.method = method
        self.clock = clock
        self.events = events
        self.token_ids: list[int] = []
        self.text = ""
        self.steps: list[StepTrace] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids (empty with inputs_embeds)
            self._prompt_seen = True
            return
        self.prepared.times.token_times.append(self.clock.now())
        self.token_ids.extend(value.reshape(-1).tolist())
        self._emit_text()
        if len(self.token_ids) > 1:
            self._emit_step()

    def end(self) -> None:
        self._emit_text(final=True)

    def _emit_text(self, final: bool = False) -> None:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return
        if len(text) > len(self.text) and text.startswith(self.text):
            self.events.put(TextDelta(text[len(self.text):]))
        self.text = text

    def _emit_step(self) -> None:
        index = len(self.steps)
        record = self.method.step_record(self.prepared.cache, index, self.prepared.ttm_kept_per_frame)
        step = StepTrace(index + 1, record.kept_per_frame, record.reselected)
        self.steps.append(step)
        self.events.put(step)


def encode_prompt(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the video; user text can never become chat-template special tokens."""
    question_ids = encode_question(tokenizer, question)
    return template_ids(tokenizer, SYSTEM_TURN), template_ids(tokenizer, "\n") + question_ids + template_ids(
        tokenizer, ASSISTANT_TURN)


def encode_question(tokenizer, question: str) -> list[int]:
    """The cleaned question's token ids, special-token text split into plain tokens; refused when too long."""
    cleaned = clean_question(question)
    question_ids = tokenizer(cleaned, add_special_tokens=False, split_special_tokens=True).input_ids
    check_question_tokens(len(question_ids))
    return question_ids


def template_ids(tokenizer, text: str) -> list[int]:
    """Token ids of chat-template text, whose special tokens stay special."""
    return tokenizer(text, add_special_tokens=False).input_ids
