"""A conversation about one video: multi-turn prompts, with the compressed video prefix and earlier turns reused.

The prompt is the chat template's multi-turn form, the video standing where the template puts it, as the model's
family lays it out (LLaVA-OneVision below; Qwen-VL puts its vision markers around it, and no newline after it):

    <|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n[kept visual tokens][newline]\\nQ1<|im_end|>\\n
    <|im_start|>assistant\\nA1<|im_end|>\\n<|im_start|>user\\nQ2<|im_end|>\\n<|im_start|>assistant\\n ...

Between turns the conversation keeps its KV cache, holding a prefix of that prompt exactly as a prefill of it
would have computed it. A new turn prefills only what the cache lacks:
- for a plain cache (baseline, ttm), the previous answer's last token (generate never feeds it back) and the new
  turn's text; decoded tokens' K/V are what a prefill would give;
- for DP's cache (dp, dycoke), the previous answer too: its K/V at the pruned layers were computed against the
  selected visual tokens only, so the cache is cropped back to the end of the last prompt and the answer is
  prefilled with the new turn, attending to everything (DP leaves prefill untouched); decoding then selects afresh.
Either way every turn's tokens equal those of a from-scratch run of the same prompt. On Qwen-VL the kept visual
tokens keep their M-RoPE positions of the full layout, and the text after the video counts on from its end. Vision features are kept per
clip, whatever the method, so two conversations on one clip encode it once. What is kept is bounded by the
pipeline's `ConversationMemory`; an evicted conversation recomputes its prefix on its next turn, and says so.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import Cache

from dycoke.config import DyCokeConfig
from dycoke.families import ASSISTANT_TURN, NEXT_USER_TURN, positions_after
from dycoke.families import question_ids as encode_question, text_ids as template_ids
from dycoke.limits import RequestError
from dycoke.methods import Method
from dycoke.metrics import RequestTimes, cache_bytes, reset_peak_memory
from dycoke.pipeline import Event, Pipeline, Prepared, Progress, Result, VisionFeatures
from dycoke.pruning import DyCokeCache
from dycoke.video import VideoClip

MAX_TURNS = 32
REENCODED = ("this conversation's cache was evicted to stay within the memory budget: the video was re-encoded "
             "and the conversation so far prefilled again")


@dataclass(frozen=True)
class Notice:
    """Something the user should know about this turn, streamed before its first token."""

    text: str


@dataclass(frozen=True)
class Turn:
    question: str
    prompt_ids: list[int]  # the turn's text before its answer: the question in its chat-template frame
    answer_ids: list[int]  # as the prompt holds it: generated ids, a final end-of-turn token left out
    result: Result

    @property
    def answer(self) -> str:
        return self.result.answer

    @property
    def stopped(self) -> bool:
        return self.result.metrics["stopped"]


@dataclass
class _Kept:
    """What a conversation keeps between turns: the cache and the facts of the video prefix it starts with."""

    cache: Cache
    prefix_length: int
    keep_mask: torch.Tensor
    ttm_kept_per_frame: list[int]
    positions: torch.Tensor | None = None  # [3, 1, prefix_length] M-RoPE positions of the prefix; None for 1-D


class Conversation:
    """One conversation about one clip with one method and its settings; `ask` streams `Pipeline.stream`'s events.

    Turns run one at a time (a second `ask` while one runs is refused); `stop` ends the running one after the
    decoding step in progress, keeping its partial answer. Different conversations share nothing but the
    pipeline's memory bounds and the clip's vision features.
    """

    def __init__(self, pipeline: Pipeline, video: str | Path | VideoClip, method: str | Method = "dycoke",
                 config: DyCokeConfig | None = None, max_new_tokens: int = 64, ignore_eos: bool = False,
                 num_frames: int = 32, reuse: bool = True, max_turns: int = MAX_TURNS,
                 keep_on_host: bool = False, context_limit: int | None = None) -> None:
        chosen, requested, settings = pipeline.check_request(method, config, max_new_tokens)
        self.pipeline = pipeline
        self.clip = video if isinstance(video, VideoClip) else pipeline.load_video(video, num_frames)
        self.method = pipeline.resolve(chosen, requested, self.clip)
        self._requested = requested
        self.settings = settings
        self.max_new_tokens = max_new_tokens
        self.ignore_eos = ignore_eos
        self.reuse = reuse
        self.max_turns = max_turns
        self.keep_on_host = keep_on_host  # ZeroGPU: the GPU is not held between calls, so the cache waits on the host
        self.context_limit = min(context_limit or pipeline.context_length, pipeline.context_length)
        self._turns: list[Turn] = []
        self._kept: _Kept | None = None
        self._evicted = False
        self._busy = threading.Lock()
        self._cancel: threading.Event | None = None
        self._stop_requested = False
        tokenizer, family = pipeline.loaded.tokenizer, pipeline.loaded.family
        self._system_ids = template_ids(tokenizer, family.before_video)
        self._frames = {"first": template_ids(tokenizer, family.after_video),
                        "next": template_ids(tokenizer, NEXT_USER_TURN), "end": template_ids(tokenizer, ASSISTANT_TURN)}
        self._end_of_turn = _eos_ids(pipeline.loaded)

    @property
    def turns(self) -> list[Turn]:
        return list(self._turns)

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids after the video prefix that a turn asking `question` next would have as its prompt."""
        return self._history_ids() + self._turn_ids(encode_question(self.pipeline.loaded.tokenizer, question))

    def ask(self, question: str, progress: Progress | None = None) -> Iterator[Event | Notice]:
        """Answer `question` as the next turn: a Notice if the prefix had to be recomputed, then text deltas and
        one StepTrace per decoding step, then the Result (with `prefix_reused`, `prefill_tokens`, `stopped`)."""
        question_ids = encode_question(self.pipeline.loaded.tokenizer, question)
        with self._turn_slot() as slot:
            yield from self._run_turn(slot, question, question_ids, progress)

    def regenerate(self, progress: Progress | None = None) -> Iterator[Event | Notice]:
        """Ask the last question again in place of its answer (greedy decoding gives the same answer unless the
        last one was stopped or cut short)."""
        with self._turn_slot() as slot:
            if not self._turns:
                raise RequestError("there is no answer to regenerate: ask a question first")
            last = self._turns.pop()
            if self._kept is not None:
                _rewind(self._kept.cache, self._kept.prefix_length + len(self._history_ids()))
            question_ids = encode_question(self.pipeline.loaded.tokenizer, last.question)
            yield from self._run_turn(slot, last.question, question_ids, progress)

    def answer(self, question: str) -> Result:
        """Run a turn to the end and return its result."""
        for event in self.ask(question):
            if isinstance(event, Result):
                return event
        raise RuntimeError("generation ended without a result")

    def stop(self) -> None:
        """End the running turn after the decoding step in progress; its partial answer is kept, marked stopped."""
        cancel = self._cancel
        if cancel is not None:
            self._stop_requested = True
            cancel.set()

    def clear(self) -> None:
        """Forget the turns and the cache; the next question starts the conversation afresh."""
        with self._turn_slot():
            self._turns.clear()
            self._drop_cache()
            self._evicted = False

    def evict(self) -> bool:
        """Drop the cache to free memory (ConversationMemory calls this); False while a turn is running."""
        if not self._busy.acquire(blocking=False):
            return False
        try:
            self._forget_cache()
            return True
        finally:
            self._busy.release()

    def _forget_cache(self) -> None:
        if self._kept is not None:
            self._kept = None
            self._evicted = True

    # --- one turn ---------------------------------------------------------------------------------------------

    @contextmanager
    def _turn_slot(self) -> Iterator["_Slot"]:
        if not self._busy.acquire(blocking=False):
            raise RequestError("this conversation is still answering: wait for the answer or stop it")
        slot = _Slot(self._busy)
        try:
            yield slot
        finally:
            slot.release()

    def _run_turn(self, slot: "_Slot", question: str, question_ids: list[int],
                  progress: Progress | None) -> Iterator[Event | Notice]:
        if len(self._turns) >= self.max_turns:
            raise RequestError(f"this conversation has reached its limit of {self.max_turns} turns: "
                               "start a new conversation")
        pipeline = self.pipeline
        turn_ids = self._turn_ids(question_ids)
        text_ids = self._history_ids() + turn_ids
        times = RequestTimes(decode_video_s=0.0 if self._turns else self.clip.decode_seconds)
        kept = self._kept if self.reuse and self.method.resumes_cache else None
        self._check_context(text_ids, kept)  # before any vision work or prefill
        if kept is None and self._evicted:
            self._evicted = False
            yield Notice(REENCODED)
        if kept is not None:
            reset_peak_memory(pipeline.loaded.device)
            times.vision_start = pipeline.clock.now()
            self._to_device(kept.cache, pipeline.loaded.device)
            times.vision_end = pipeline.clock.now()
            cached = kept.cache.get_seq_length()
            prepared = pipeline.guard_memory(lambda: self._resumed(kept, text_ids, times), self.clip.num_frames)
        else:
            cached = 0
            if progress:
                progress(0.3, "encoding frames")
            prepared, kept = pipeline.guard_memory(lambda: self._from_scratch(text_ids, times), self.clip.num_frames)
        self._cancel, self._stop_requested = threading.Event(), False
        if progress:
            progress(0.5, "generating")
        events = pipeline.generate(prepared, self.clip, self.method, self.settings, self.max_new_tokens,
                                   self.ignore_eos, self._cancel)
        result = None
        try:
            for event in events:
                if isinstance(event, Result):
                    result = event
                else:
                    yield event
        except GeneratorExit:  # the consumer went away: the turn never happened, the cache goes back to before it
            events.close()  # joins the worker before the cache is touched
            _rewind(kept.cache, cached)
            raise
        except BaseException:
            events.close()
            self._drop_cache()  # a failed turn may have left the cache half-written
            raise
        finally:
            self._cancel = None
        result = self._commit(question, turn_ids, text_ids, kept, result, reused=cached > 0,
                              prefill_tokens=prepared.embeds.shape[1] - cached)
        # Free before the Result is handed over: a consumer that keeps the stream open must not block the next turn.
        slot.release()
        if self._kept is kept:
            self.pipeline.memory.hold(self, cache_bytes(kept.cache))  # this conversation itself may be evicted
        yield result

    def _resumed(self, kept: _Kept, text_ids: list[int], times: RequestTimes) -> Prepared:
        """Embeddings for what the cache lacks, at the end of a full-length tensor as generate expects
        (it slices off the cached length); the cached part is never read, so it is left uninitialised."""
        cached = kept.cache.get_seq_length()
        new = self.pipeline.embed_text(text_ids[cached - kept.prefix_length:])
        embeds = new.new_empty((1, kept.prefix_length + len(text_ids), new.shape[-1]))
        embeds[:, cached:] = new
        times.compress_end = self.pipeline.clock.now()
        positions = positions_after(kept.positions, len(text_ids))
        kwargs = {} if positions is None else {"position_ids": positions}  # Qwen3-VL's DeepStack rows are cached
        return Prepared(embeds, kept.cache, kept.keep_mask, kept.ttm_kept_per_frame, times, kwargs)

    def _from_scratch(self, text_ids: list[int], times: RequestTimes) -> tuple[Prepared, _Kept]:
        vision = self._shared_features if self.reuse else None
        prepared = self.pipeline.prepare(self.clip, (self._system_ids, text_ids), self.method, self.settings,
                                         times, vision)
        prefix_length = prepared.embeds.shape[1] - len(text_ids)
        positions = prepared.generate_kwargs.get("position_ids")
        return prepared, _Kept(prepared.cache, prefix_length, prepared.keep_mask, prepared.ttm_kept_per_frame,
                               None if positions is None else positions[..., :prefix_length])

    def _shared_features(self, clip: VideoClip, needs_states: bool) -> VisionFeatures:
        """The clip's features from the pipeline's memory, shared with every conversation on the same clip."""
        return self.pipeline.memory.features(
            clip, needs_states, lambda: self.pipeline.vision_features(clip, needs_states),
            nbytes=lambda features: features.nbytes(),
            satisfies=lambda has_states: has_states or not needs_states,  # features with states serve all
        )

    def _commit(self, question: str, turn_ids: list[int], text_ids: list[int], kept: _Kept, result: Result,
                reused: bool, prefill_tokens: int) -> Result:
        """Record the turn, keep the cache for the next one (within the memory bounds), and return its result."""
        answer_ids = result.token_ids
        if answer_ids and answer_ids[-1] in self._end_of_turn:  # the next turn's frame closes the answer itself
            answer_ids = answer_ids[:-1]
        if isinstance(kept.cache, DyCokeCache) and kept.cache.pruning:
            _rewind(kept.cache, kept.prefix_length + len(text_ids))  # decoded K/V saw only the selected tokens
        result = replace(result, metrics=result.metrics | {
            "prefix_reused": reused, "prefill_tokens": prefill_tokens, "stopped": self._stop_requested,
        })
        self._turns.append(Turn(question, turn_ids, answer_ids, result))
        if self.reuse and self.method.resumes_cache:
            self._to_device(kept.cache, torch.device("cpu") if self.keep_on_host else self.pipeline.loaded.device)
            self._kept = kept
        return result

    def _drop_cache(self) -> None:
        self._kept = None
        self.pipeline.memory.release(self)

    # --- the prompt -------------------------------------------------------------------------------------------

    def _turn_ids(self, question_ids: list[int]) -> list[int]:
        opening = self._frames["next"] if self._turns else self._frames["first"]
        return opening + question_ids + self._frames["end"]

    def _history_ids(self) -> list[int]:
        return [token for turn in self._turns for token in turn.prompt_ids + turn.answer_ids]

    def _check_context(self, text_ids: list[int], kept: "_Kept | None") -> None:
        if not self._turns:  # the first turn: the video itself may be what does not fit
            self.pipeline.check_context(self.method, self._requested, self.settings, self.clip.num_frames,
                                        len(self._system_ids) + len(text_ids), self.max_new_tokens,
                                        self.context_limit, clip=self.clip)
            return
        prefix_length = kept.prefix_length if kept is not None else self._planned_prefix_length()
        needed = prefix_length + len(text_ids) + self.max_new_tokens
        if needed > self.context_limit:
            raise RequestError(f"this conversation would need {needed} tokens with this turn, past the model's "
                               f"context of {self.context_limit}: start a new conversation")

    def _planned_prefix_length(self) -> int:
        """The video prefix's length from the method's exact budget: the system turn, the visual tokens and the
        video's other tokens (LLaVA-OneVision's newline, Qwen-VL's markers and timestamps)."""
        visual, other = self.pipeline.video_tokens(self.method, self._requested, self.settings,
                                                   self.clip.num_frames, self.clip)
        return len(self._system_ids) + visual + other

    def _to_device(self, cache: Cache, device: torch.device) -> None:
        if not self.keep_on_host:
            return
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.device != device:
                layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
                layer.device = device


class _Slot:
    """The right to run a turn: a held lock, released once."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock: threading.Lock | None = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


def _rewind(cache: Cache, length: int) -> None:
    """Cut the cache back to its first `length` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _eos_ids(loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return set(eos) | {loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")}
