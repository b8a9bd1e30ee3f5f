"""Video loading and LLaVA-OneVision preprocessing, without torchvision.

decord is the decoder. PyAV, where installed, only probes the container first, because decord's
errors for non-video or audio-only files are C++ check failures that say little.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import torch
from PIL import Image

# Everything decord has been seen to raise on bad input (DECORDError is not a RuntimeError).
_DECORD_ERRORS = (decord.DECORDError, RuntimeError, OSError, ValueError, IndexError)

_FIX_ENCODING = "re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`"


class VideoError(ValueError):
    """Bad or unusable video input. str(err) is ONE line saying what was wrong and what to do."""


@dataclass(frozen=True)
class VideoClip:
    frames: np.ndarray  # uint8, [T, H, W, 3], RGB
    timestamps: tuple[float, ...]  # seconds of each sampled frame, len T
    source_frames: int  # frames in the file
    fps: float  # average fps of the file
    decode_seconds: float = 0.0  # wall time load_video spent; 0 for a clip that is reused

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.source_frames / self.fps if self.fps > 0 else 0.0


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Uniform indices like LLaVA-OneVision; a short video gives all its frames, none repeated."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if total_frames <= num_frames:
        return list(range(total_frames))
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()


def _display_name(path: Path) -> str:
    # A newline in a file name would break the one-line error contract.
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


def _not_readable(name: str) -> VideoError:
    return VideoError(f"{name} is not a readable video (unknown or non-video format); "
                      "pass a video file such as MP4, MKV, WebM or AVI")


def _no_video_stream(name: str) -> VideoError:
    return VideoError(f"{name} has no video stream (audio-only or metadata-only file); "
                      "pass a file that contains video")


def _undecodable(name: str) -> VideoError:
    return VideoError(f"{name} cannot be decoded (encrypted, truncated or corrupt video stream); "
                      f"{_FIX_ENCODING}")


def _probe_with_av(path: Path, name: str) -> bool:
    """Raise VideoError for non-videos and files without video; True if PyAV confirmed a video stream."""
    try:
        import av
    except ImportError:
        return False
    try:
        with av.open(str(path)) as container:
            fmt = container.format.name
            has_video = len(container.streams.video) > 0
    except av.FFmpegError as err:
        raise _not_readable(name) from err
    # A still image opens as a one-stream "video" in ffmpeg (png_pipe, image2, ...).
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise _not_readable(name)
    if not has_video:
        raise _no_video_stream(name)
    return True


def _classify_decord_error(err: Exception, name: str, video_confirmed: bool) -> VideoError:
    if video_confirmed:
        return _undecodable(name)
    msg = str(err)
    if "cannot find video stream" in msg:
        return _no_video_stream(name)
    if "Error reading" in msg or "Invalid data" in msg or "broken metadata" in msg:
        return _not_readable(name)
    return _undecodable(name)


def _open_reader(path: Path, name: str) -> decord.VideoReader:
    if not path.is_file():
        raise VideoError(f"video file not found: {name}; check the path and that the file exists")
    if path.stat().st_size == 0:
        raise VideoError(f"video file {name} is empty (0 bytes); re-download or re-export it")
    video_confirmed = _probe_with_av(path, name)
    decord.logging.set_level(decord.logging.QUIET)  # otherwise ffmpeg floods stderr on bad files
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except _DECORD_ERRORS as err:
        raise _classify_decord_error(err, name, video_confirmed) from err


def _timestamps(vr: decord.VideoReader, indices: list[int], fps: float, name: str) -> tuple[float, ...]:
    try:
        ts = np.asarray(vr.get_frame_timestamp(indices), dtype=np.float64)[:, 0]
    except (AttributeError, *_DECORD_ERRORS):
        ts = None
    # decord's per-frame times go non-monotonic on damaged files; index / fps is then the better guess.
    if ts is None or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) <= 0):
        if not (math.isfinite(fps) and fps > 0):
            raise VideoError(f"{name} has no usable frame rate or timestamps; {_FIX_ENCODING}")
        ts = np.asarray(indices, dtype=np.float64) / fps
    return tuple(float(t) for t in ts)


def load_video(path: str | os.PathLike, num_frames: int = 32) -> VideoClip:
    """Decode num_frames uniformly sampled RGB frames; only the sampled frames are decoded."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    started = time.perf_counter()
    path = Path(path)
    name = _display_name(path)
    vr = _open_reader(path, name)
    total = len(vr)
    if total < 1:
        raise VideoError(f"{name} has no frames; pass a video with at least one frame")
    indices = sample_indices(total, num_frames)
    try:
        frames = vr.get_batch(indices).asnumpy()
    except _DECORD_ERRORS as err:
        raise _undecodable(name) from err
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3 or frames.size == 0:
        raise _undecodable(name)
    fps = float(vr.get_avg_fps())
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=_timestamps(vr, indices, fps, name),
        source_frames=total,
        fps=fps,
        decode_seconds=time.perf_counter() - started,
    )


def to_pixel_values(frames: np.ndarray, size: int = 384) -> torch.Tensor:
    """LLaVA-OneVision pixels: bicubic resize to size x size, /255, (x - 0.5) / 0.5.

    Returns float32 [T, 3, size, size] in [-1, 1].
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(
            f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    resized = np.stack([
        np.asarray(Image.fromarray(frame).resize((size, size), resample=Image.BICUBIC))
        for frame in frames
    ])
    pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return ((pixels - 0.5) / 0.5).contiguous()
