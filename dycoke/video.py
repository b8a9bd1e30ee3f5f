"""Video loading and LLaVA-OneVision preprocessing, without torchvision.

decord is the decoder. PyAV, where installed, only probes the container first, because decord's
errors for non-video or audio-only files are C++ check failures that say little.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import decord
import numpy as np
from PIL import Image

from dycoke.limits import VideoLimits

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class StreamInfo:
    """What the container says about its first video stream, read without decoding a frame."""

    width: int
    height: int
    duration_s: float | None


def probe(path: str | os.PathLike) -> StreamInfo | None:
    """Container and stream facts via PyAV; VideoError for non-videos and files without video, None without PyAV."""
    path = Path(path)
    name = _display_name(path)
    _check_file(path, name)
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as container:
            fmt = container.format.name
            streams = container.streams.video
            if not streams:
                raise _no_video_stream(name)
            context = streams[0].codec_context
            duration = container.duration / 1e6 if container.duration else None
            info = StreamInfo(int(context.width or 0), int(context.height or 0), duration)
    except av.FFmpegError as err:
        raise _not_readable(name) from err
    # A still image opens as a one-stream "video" in ffmpeg (png_pipe, image2, ...).
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise _not_readable(name)
    return info


def check_limits(path: str | os.PathLike, info: StreamInfo | None, limits: VideoLimits) -> None:
    """Refuse files too big, too long, too small, too large or too wide before decoding them."""
    path = Path(path)
    name = _display_name(path)
    size_mb, limit_mb = path.stat().st_size / 2**20, limits.max_file_bytes / 2**20
    if path.stat().st_size > limits.max_file_bytes:
        raise VideoError(f"{name} is {size_mb:.0f} MB; the limit is {limit_mb:.0f} MB: trim or compress it")
    if info is None:
        return
    if info.duration_s is not None and info.duration_s > limits.max_duration_s:
        raise VideoError(f"{name} lasts {info.duration_s / 60:.0f} min; the limit is "
                         f"{limits.max_duration_s / 60:.0f} min: trim it")
    short, long = sorted((info.width, info.height))
    if short < limits.min_side or long > limits.max_side:
        raise VideoError(f"{name} is {info.width}x{info.height} pixels; each side must be between "
                         f"{limits.min_side} and {limits.max_side}: resize it")
    if long / short > limits.max_aspect_ratio:
        raise VideoError(f"{name} is {info.width}x{info.height}, wider than {limits.max_aspect_ratio:.0f}:1; "
                         "crop it to a usual aspect ratio")


def _classify_decord_error(err: Exception, name: str, video_confirmed: bool) -> VideoError:
    if video_confirmed:
        return _undecodable(name)
    msg = str(err)
    if "cannot find video stream" in msg:
        return _no_video_stream(name)
    if "Error reading" in msg or "Invalid data" in msg or "broken metadata" in msg:
        return _not_readable(name)
    return _undecodable(name)


def _check_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise VideoError(f"video file not found: {name}; check the path and that the file exists")
    if path.stat().st_size == 0:
        raise VideoError(f"video file {name} is empty (0 bytes); re-download or re-export it")


def _open_reader(path: Path, name: str) -> decord.VideoReader:
    video_confirmed = probe(path) is not None
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


def to_pixel_values(frames: np.ndarray, size: int = 384) -> "torch.Tensor":
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
    import torch  # here, so that the decoding child process starts without it

    pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return ((pixels - 0.5) / 0.5).contiguous()


def load_video_isolated(path: str | os.PathLike, num_frames: int = 32,
                        limits: VideoLimits = VideoLimits()) -> VideoClip:
    """load_video behind the limits, in a child process that is killed if it hangs or dies with the decoder.

    decord can hang or crash on hostile files; a server must survive both, so the decode never runs in-process.
    A fresh interpreter (not a fork) keeps the child free of the server's threads and locks.
    """
    started = time.perf_counter()
    path = Path(path)
    name = _display_name(path)
    check_limits(path, probe(path), limits)
    command = [sys.executable, "-m", "dycoke.video", str(path), str(num_frames)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=limits.decode_timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise VideoError(f"decoding {name} took over {limits.decode_timeout_s:.0f} s; "
                         f"the file may be damaged: {_FIX_ENCODING}") from None
    try:
        outcome = pickle.loads(done.stdout)  # written by our own child below, never by the user
    except Exception:
        raise _undecodable(name) from None  # the decoder died without an answer
    if isinstance(outcome, VideoError):
        raise outcome
    return replace(outcome, decode_seconds=time.perf_counter() - started)


def _decode_for_parent(path: str, num_frames: int) -> None:
    try:
        outcome: VideoClip | VideoError = load_video(path, num_frames)
    except VideoError as error:
        outcome = error
    except Exception:  # anything else the decoder raises still means an unusable file for the caller
        outcome = _undecodable(_display_name(Path(path)))
    sys.stdout.buffer.write(pickle.dumps(outcome))


if __name__ == "__main__":
    from dycoke import video  # the importable module, so the pickled classes are dycoke.video's, not __main__'s

    video._decode_for_parent(sys.argv[1], int(sys.argv[2]))
