"""One request, end to end: video -> vision features -> compression -> streamed generation with per-step traces."""

from __future__ import annotations

import gc
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from transformers import Cache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dycoke.caches import compile_options, plan_for
from dycoke.config import DyCokeConfig
from dycoke.decoder import VideoDecoder
from dycoke.families import Geometry, PromptLayout, VideoFeatures, question_ids, text_ids
from dycoke.families.llava_onevision import SYSTEM_TURN, encode_prompt  # noqa: F401  (LLaVA-OneVision's prompt)
from dycoke.limits import MAX_FRAMES, RequestError, VideoLimits, check_frames, check_new_tokens
from dycoke.memory import ConversationMemory
from dycoke.methods import Method, VisualInput, VisualLayout, get_method, install_hooks
from dycoke.metrics import Clock, RequestTimes, cache_bytes, peak_memory_bytes, reset_peak_memory
from dycoke.models import LoadedModel
from dycoke.video import FrameSize, VideoClip, target_size

# A prompt: a question, or the token ids before and after the video (a conversation's turns after it).
Prompt = str | tuple[list[int], list[int]]
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


# The vision side of one clip, independent of the method: what every method compresses.
VisionFeatures = VideoFeatures


@dataclass
class Prepared:
    """Everything generation needs, built before the first token."""

    embeds: torch.Tensor
    cache: Cache
    keep_mask: torch.Tensor
    ttm_kept_per_frame: list[int]
    times: RequestTimes
    generate_kwargs: dict = field(default_factory=dict)  # what the family adds to generate (M-RoPE position_ids)


class Pipeline:
    """Holds one loaded model and runs requests on it; all per-request state lives in the request's own objects."""

    def __init__(self, loaded: LoadedModel, max_frames: int = MAX_FRAMES,
                 video_limits: VideoLimits = VideoLimits(), memory: ConversationMemory | None = None,
                 cache: str = "dynamic", compile_decode: bool | str = False) -> None:
        self.loaded = loaded
        self.cache = cache  # "static": single requests preallocate their KV cache (dycoke.caches)
        self.compile_decode = compile_decode  # True or a backend: generate compiles decoding where the cache allows
        self.max_frames = max_frames
        self.video_limits = video_limits
        self.memory = memory or ConversationMemory()  # what this process's conversations may keep between turns
        self.clock = Clock(loaded.device)
        self.decoder = VideoDecoder()  # its workers start on the first video (or on decoder.start())
        install_hooks(loaded.model)

    def load_video(self, path: str | Path, num_frames: int = 32) -> VideoClip:
        """Probe, check the limits, then decode straight to the model's frame size in a worker process that
        cannot hang or crash the caller."""
        return self.decoder.load(path, check_frames(num_frames, self.max_frames), self.frame_size,
                                 self.video_limits)

    @property
    def frame_size(self) -> FrameSize:
        """What the decoder resizes this model's frames to."""
        return self.loaded.family.decode_size(self.loaded.model.config)

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
        prompt = self.loaded.family.prompt_ids(self.loaded.tokenizer, question)
        report = progress or (lambda fraction, message: None)

        if not isinstance(video, VideoClip):
            report(0.0, "decoding video")
        clip = video if isinstance(video, VideoClip) else self.load_video(video, num_frames)
        times = RequestTimes(decode_video_s=clip.decode_seconds)
        chosen = self.resolve(chosen, requested, clip)  # e.g. a matched budget
        self.check_context(chosen, requested, settings, clip.num_frames, len(prompt[0]) + len(prompt[1]),
                           max_new_tokens, clip=clip)
        report(0.3, "encoding frames")
        prepared = self.guard_memory(lambda: self.prepare(clip, prompt, chosen, settings, times,
                                                          new_tokens=max_new_tokens), clip.num_frames)
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
        self.loaded.family.check_method(chosen, self.loaded.model)
        check_new_tokens(max_new_tokens)
        return chosen, requested, settings

    def resolve(self, method: Method, requested: DyCokeConfig, clip: VideoClip) -> Method:
        """The method as it runs on this clip (a matched budget counts this model's frames and tokens)."""
        geometry = self.geometry(clip)
        return method.resolve(requested, geometry.groups, geometry.tokens_per_group)

    def geometry(self, clip: VideoClip) -> Geometry:
        """Temporal groups and tokens per group of this clip on this model."""
        height, width = clip.frames.shape[1:3]
        return self.loaded.family.geometry(self.loaded.model, clip.num_frames, height, width)

    def layout(self, clip: VideoClip, prompt: Prompt) -> PromptLayout:
        """The full prompt layout of `prompt` on this clip, every visual token included."""
        loaded = self.loaded
        before, after = self._prompt_ids(prompt)
        return loaded.family.video_layout(loaded.model, loaded.tokenizer, before, after, self.geometry(clip),
                                          clip.timestamps, clip.fps)

    def _prompt_ids(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        return self.loaded.family.prompt_ids(self.loaded.tokenizer, prompt) if isinstance(prompt, str) else prompt

    def frame_times_and_tokens(self, clip: VideoClip) -> tuple[list[float], int]:
        """The times of the clip's frames as the traces count them (temporal groups), and tokens per frame."""
        geometry = self.geometry(clip)
        return self.loaded.family.group_times(clip.timestamps, geometry), geometry.tokens_per_group

    def check_context(self, method: Method, requested: DyCokeConfig, settings: DyCokeConfig, num_frames: int,
                      text_tokens: int, max_new_tokens: int, context: int | None = None,
                      clip: VideoClip | None = None) -> None:
        """Refuse, before any vision work, a request whose prompt and answer would not fit the model's context,
        saying how many frames fit.

        Positions run over the tokens that enter the language model, so what counts is the method's prefill
        budget (exact, from its settings), not the clip's full T·N: DyCoke fits more frames than the baseline.
        `text_tokens` are the prompt's tokens around the video; the video's own other tokens (LLaVA-OneVision's
        newline, Qwen-VL's markers and timestamps) are the family's. `clip` gives a Qwen model's frame size and
        times; without it, square frames of the model's size. On Qwen-VL the tokens are counted, not the M-RoPE
        positions, which run slower than the tokens unless frames are minutes apart.
        """
        context = context or self.context_length

        def needed(frames: int) -> tuple[int, int]:
            visual, other = self.video_tokens(method, requested, settings, frames, clip)
            return visual, text_tokens + visual + other + max_new_tokens

        visual, total = needed(num_frames)
        if total <= context:
            return
        fit = next((frames for frames in range(num_frames - 1, 0, -1) if needed(frames)[1] <= context), 0)
        advice = f"use {fit} frames or fewer" if fit else "shorten the question or the answer"
        raise RequestError(f"{num_frames} frames give {visual:,} visual tokens with {method.name}; with the prompt "
                           f"and {max_new_tokens} new tokens that is {total:,}, over this model's context of "
                           f"{context:,} positions: {advice}")

    def video_tokens(self, method: Method, requested: DyCokeConfig, settings: DyCokeConfig, num_frames: int,
                     clip: VideoClip | None = None) -> tuple[int, int]:
        """The visual tokens `method` feeds the model from `num_frames` frames of `clip` (its exact prefill budget
        over this model's temporal groups), and the video's other tokens in the prompt."""
        loaded = self.loaded
        height, width = clip.frames.shape[1:3] if clip is not None else self._square_frame()
        geometry = loaded.family.geometry(loaded.model, num_frames, height, width)
        groups, per_group = geometry.groups, geometry.tokens_per_group
        visual = method.resolve(requested, groups, per_group).budget(settings, groups, per_group).prefill
        other = loaded.family.video_text_tokens(loaded.tokenizer, loaded.model, geometry,
                                                _frame_times(clip, num_frames))
        return visual, other

    def _square_frame(self) -> tuple[int, int]:
        size = self.frame_size
        side = size if isinstance(size, int) else math.isqrt(size.max_pixels)
        return target_size(size, side, side)

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

    def prepare(self, clip: VideoClip, prompt: Prompt, method: Method, settings: DyCokeConfig,
                times: RequestTimes | None = None,
                vision: Callable[[VideoClip, bool], VisionFeatures] | None = None,
                new_tokens: int | None = None) -> Prepared:
        """Vision features, compression and the prompt embeddings: everything up to the first generate call.

        `prompt` is a question or the token ids before and after the video. `method` must be resolved
        (`resolve`) for this clip; `stream` does that. `vision` gives the features (default: `vision_features`;
        a conversation passes its per-clip cache). `new_tokens`, where known, lets a static cache (`self.cache`)
        be allocated for the whole request.
        """
        times = times or RequestTimes()
        reset_peak_memory(self.loaded.device)
        model, family = self.loaded.model, self.loaded.family
        layout = self.layout(clip, prompt)
        times.vision_start = self.clock.now()
        features = (vision or self.vision_features)(clip, method.needs_vision_states)
        times.vision_end = self.clock.now()
        compressed = method.compress(VisualInput(features.frame_tokens, model, features.layer_input), settings)
        inputs = family.model_inputs(model, layout, features, compressed)
        num_frames = features.frame_tokens.shape[0]
        visual = VisualLayout(start=int(inputs.visual_positions[0]) if inputs.visual_positions.numel() else 0,
                              frame_of_token=compressed.frame_of_token, num_frames=num_frames,
                              positions=inputs.visual_positions)
        plan = plan_for(self.cache, inputs.embeds.shape[1], new_tokens, model.config)
        cache = method.make_cache(visual, settings, plan)
        ttm_kept_per_frame = torch.bincount(compressed.frame_of_token, minlength=num_frames).tolist()
        times.compress_end = self.clock.now()
        return Prepared(inputs.embeds, cache, compressed.keep_mask, ttm_kept_per_frame, times, inputs.generate_kwargs)

    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings [1, len(ids), D]."""
        embed = self.loaded.model.get_input_embeddings()
        return embed(torch.tensor([ids], dtype=torch.long, device=embed.weight.device))

    def vision_features(self, clip: VideoClip, with_feature_layer_input: bool = False) -> VisionFeatures:
        """The clip through the vision tower and projector; methods that look inside the tower ask for more."""
        return self._vision_features(clip, with_feature_layer_input)

    def _vision_features(self, clip: VideoClip, with_feature_layer_input: bool = False) -> VisionFeatures:
        """Frame tokens [T groups, N, D] and, if asked, the hidden state entering the vision feature layer."""
        return self.loaded.family.encode(self.loaded.model, clip.frames, self.geometry(clip), with_feature_layer_input)

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
                    **prepared.generate_kwargs,
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
                    **compile_options(self.compile_decode, prepared.embeds.device),
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
        frame_times, tokens_per_frame = self.frame_times_and_tokens(clip)
        trace = {
            "frames": len(frame_times),  # rows of the trace: temporal groups on Qwen-VL
            "frames_per_group": self.loaded.frames_per_group,
            "tokens_per_frame": tokens_per_frame,
            "frame_times_s": [round(t, 4) for t in frame_times],
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


def _frame_times(clip: VideoClip | None, num_frames: int) -> tuple[float, ...]:
    """The times of `num_frames` frames sampled over the clip's span (its own times when it has as many), or at the
    Qwen-VL processors' 2 fps without a clip: what a Qwen3-VL prompt writes before each group."""
    if clip is None:
        return tuple(index / 2 for index in range(num_frames))
    if clip.num_frames == num_frames:
        return tuple(clip.timestamps)
    first, step = clip.timestamps[0], (clip.timestamps[-1] - clip.timestamps[0]) / max(num_frames - 1, 1)
    return tuple(first + step * index for index in range(num_frames))


# The cleaned question's token ids (refused when too long), and chat-template text's ids.
encode_question, template_ids = question_ids, text_ids
