"""Limits on one request, checked at the edge (CLI, app) before any heavy work starts."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_FRAMES = 256
MAX_NEW_TOKENS = 1024
MAX_QUESTION_TOKENS = 512
MAX_QUESTION_CHARS = 8 * MAX_QUESTION_TOKENS


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be before any frame is decoded; the defaults suit a public Space."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_duration_s: float = 3 * 3600.0
    min_side: int = 16
    max_side: int = 8192
    max_aspect_ratio: float = 16.0
    max_source_frames: int = 2_000_000  # frames in the file, counted by the probe
    # width x height x the frames the decoder must decode (the sampled ones and those from each one's keyframe):
    # 10 billion is about a minute of one-thread CPU decoding; a file whose plan is costlier is refused at once.
    max_decode_pixels: int = 10_000_000_000
    decode_timeout_s: float = 120.0


class RequestError(ValueError):
    """A request that is refused; the message says what to change."""


def check_frames(num_frames: int, max_frames: int = MAX_FRAMES) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= max_frames:
        raise RequestError(f"frames must be an integer in 1..{max_frames}, got {num_frames!r}")
    return num_frames


def check_new_tokens(max_new_tokens: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise RequestError(f"max new tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    return max_new_tokens


def clean_question(question: str) -> str:
    """Strip control characters (tabs and carriage returns become spaces) and surrounding whitespace."""
    if not isinstance(question, str):
        raise RequestError("the question must be text")
    kept = (" " if ch in "\t\r" else ch for ch in question
            if ch in "\n\t\r" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    cleaned = "".join(kept).strip()
    if not cleaned:
        raise RequestError("the question is empty: type a question about the video")
    if len(cleaned) > MAX_QUESTION_CHARS:
        raise RequestError(f"the question is {len(cleaned)} characters long; the limit is "
                           f"{MAX_QUESTION_TOKENS} tokens: shorten it")
    return cleaned


def check_question_tokens(count: int) -> None:
    if count > MAX_QUESTION_TOKENS:
        raise RequestError(f"the question is {count} tokens long; the limit is {MAX_QUESTION_TOKENS}: shorten it")
