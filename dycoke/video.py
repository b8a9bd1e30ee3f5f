"""Video probing, decoding straight to the model's frame size, and LLaVA-OneVision pixel normalisation.

PyAV (FFmpeg) probes and decodes every video. decord, the earlier decoder, returned 4 or 6 colour channels at
widths of 16-72 px, refused `.ts`, AV1-in-MKV and MKV files without a Duration element, and held every sampled
frame at full size (4.6 GB at 8 frames of 8000x8000); PyAV decodes all of those, one frame at a time.

The probe is one pass over the container's packets, without decoding: it gives the exact frame count, every
frame's timestamp and the keyframes, so the cost of a decode is known, and checked, before it starts.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import stat
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from PIL import Image

from dycoke.limits import VideoLimits

if TYPE_CHECKING:
    import torch

MODEL_FRAME_SIZE = 384  # LLaVA-OneVision's frames: 384 x 384
_FIX_ENCODING = "re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`"
_IMAGE_FORMATS = ("image2", "apng", "webp_pipe")
_ANIMATED_IMAGES = ("gif", "apng", "webp")


class VideoError(ValueError):
    """Bad or unusable video input. str(err) is ONE line saying what was wrong and what to do.

    The message names the file; `message_for("the upload")` gives the same line about another subject, for
    places (the app, its logs) where the file name must not appear.
    """

    def __init__(self, template: str, name: str = "the video") -> None:
        self.template = template
        self.name = name
        super().__init__(template.format(video=name))

    def message_for(self, subject: str) -> str:
        return self.template.format(video=subject)


class DecoderFailure(VideoError):
    """The decoder process failed or its answer did not arrive whole: a fault on our side, not proof of a bad file."""


@dataclass(frozen=True)
class VideoClip:
    frames: np.ndarray  # uint8, [T, H, W, 3], RGB; H = W = 384 when decoded for the model
    timestamps: tuple[float, ...]  # seconds of each sampled frame from the first frame, len T
    source_frames: int  # frames in the file
    fps: float  # average fps of the file
    decode_seconds: float = 0.0  # wall time the decode took; 0 for a clip that is reused
    source_size: tuple[int, int] | None = None  # (width, height) as displayed, before resizing
    decoder_peak_bytes: int | None = field(default=None, compare=False)  # the decoder process's peak RSS

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.source_frames / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True)
class GridFit:
    """Frames resized to multiples of `factor` per side, aspect ratio kept, within [min_pixels, max_pixels]: the
    smart resize of Qwen-VL's processors (transformers' `smart_resize`, redone here so that the decoder worker
    never imports transformers)."""

    factor: int
    min_pixels: int
    max_pixels: int

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a frame of height x width once resized."""
        factor = self.factor
        resized_h, resized_w = round(height / factor) * factor, round(width / factor) * factor
        if resized_h * resized_w > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            resized_h = max(factor, math.floor(height / beta / factor) * factor)
            resized_w = max(factor, math.floor(width / beta / factor) * factor)
        elif resized_h * resized_w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            resized_h = math.ceil(height * beta / factor) * factor
            resized_w = math.ceil(width * beta / factor) * factor
        return resized_h, resized_w


# What the decoder resizes each frame to: a square side (LLaVA-OneVision), a GridFit (Qwen-VL), None: as decoded.
FrameSize = int | GridFit | None


def target_size(size: FrameSize, height: int, width: int) -> tuple[int, int] | None:
    """(height, width) that a decoded frame of height x width is resized to; None: it is kept as decoded."""
    if size is None:
        return None
    return size.size_for(height, width) if isinstance(size, GridFit) else (size, size)


def size_to_json(size: FrameSize) -> int | dict | None:
    return {"grid_fit": [size.factor, size.min_pixels, size.max_pixels]} if isinstance(size, GridFit) else size


def size_from_json(value: int | dict | None) -> FrameSize:
    return GridFit(*(int(n) for n in value["grid_fit"])) if isinstance(value, dict) else value


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Uniform indices exactly as LLaVA-OneVision and lmms-eval: linspace truncated to int; a short video gives
    all its frames, none repeated."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if total_frames <= num_frames:
        return list(range(total_frames))
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


# ---------------------------------------------------------------- the file itself

def display_name(path: str | os.PathLike) -> str:
    # A newline in a file name would break the one-line error contract.
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


def check_file(path: str | os.PathLike) -> int:
    """The file's size in bytes, or a VideoError that says what the path really is (never opens it)."""
    name = display_name(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise VideoError("video file not found: {video}; check the path and that the file exists", name) from None
    except PermissionError:
        raise VideoError("{video} cannot be read: permission denied on the file or a folder above it; "
                         "fix the permissions or copy the video somewhere readable", name) from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise VideoError("the path of {video} is too long for the file system (a name may have at most "
                             "255 bytes); rename or move the file", name) from None
        if error.errno == errno.ENOTDIR:
            raise VideoError("video file not found: {video}; a part of the path is a file, not a folder",
                             name) from None
        raise VideoError(f"{{video}} cannot be read ({os.strerror(error.errno or 0)}); check the path",
                         name) from None
    except ValueError:  # an embedded NUL byte
        raise VideoError("{video} is not a valid path (it contains a NUL byte)", name) from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoError("{video} is a folder, not a video file; pass the path of a video file inside it", name)
    if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
        raise VideoError("{video} is a pipe or socket, not a regular file; save the video to a file first", name)
    if not stat.S_ISREG(info.st_mode):
        raise VideoError("{video} is a device or special file, not a regular video file", name)
    if info.st_size == 0:
        raise VideoError("video file {video} is empty (0 bytes); re-download or re-export it", name)
    if not os.access(path, os.R_OK):
        raise VideoError("{video} cannot be read: permission denied; fix its permissions", name)
    return info.st_size


# ---------------------------------------------------------------- probing

@dataclass(frozen=True)
class StreamInfo:
    """What the container says about its video stream, read from its packets without decoding a frame."""

    width: int  # coded size; a rotation (applied when decoding) only swaps the sides
    height: int
    frame_pts: tuple[int, ...]  # presentation timestamps of every frame, ascending, in time_base units
    keyframes: tuple[int, ...]  # indices into frame_pts of the keyframes, ascending
    time_base: float
    fps: float
    has_timestamps: bool = True  # False: frame_pts are only the frames' order (no usable timestamps)

    @property
    def num_frames(self) -> int:
        return len(self.frame_pts)

    @property
    def duration_s(self) -> float:
        if self.num_frames < 2:
            return 1.0 / self.fps if self.fps > 0 else 0.0
        return (self.frame_pts[-1] - self.frame_pts[0]) * self.time_base + 1.0 / self.fps


def _not_readable(name: str) -> VideoError:
    return VideoError("{video} is not a readable video (unknown or non-video format); "
                      "pass a video file such as MP4, MKV, WebM or AVI", name)


def _undecodable(name: str) -> VideoError:
    return VideoError("{video} cannot be decoded (encrypted, truncated or corrupt video stream); "
                      f"{_FIX_ENCODING}", name)


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    fmt = container.format.name
    if fmt in _ANIMATED_IMAGES or fmt == "gif_pipe":
        raise VideoError("{video} is an animated image (GIF, APNG or WebP), not a video; convert it, e.g. "
                         "`ffmpeg -i IN -pix_fmt yuv420p OUT.mp4`", name)
    if fmt in _IMAGE_FORMATS or fmt.endswith("_pipe"):  # a still image opens as a one-frame "video" in ffmpeg
        raise VideoError("{video} is a still image, not a video; pass a video file such as MP4, MKV or WebM", name)
    streams = container.streams.video
    moving = [s for s in streams if not s.disposition & av.stream.Disposition.attached_pic]
    if not moving and streams:
        raise VideoError("{video} is an audio file with cover art: its only picture is a still image; "
                         "pass a file that contains video", name)
    if not moving:
        kind = "audio-only" if container.streams.audio else "metadata-only"
        raise VideoError(f"{{video}} has no video stream ({kind} file); pass a file that contains video", name)
    return moving[0]


def _frame_rate(stream: av.video.stream.VideoStream, pts: list[int], time_base: float) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and math.isfinite(float(rate)) and 0 < float(rate) <= 1000:
            return float(rate)
    span = (pts[-1] - pts[0]) * time_base if len(pts) > 1 else 0.0
    return (len(pts) - 1) / span if span > 0 else 25.0


def _packet_times(container, stream, name: str, max_frames: int) -> tuple[list[int | None], list[bool]]:
    """Every video packet's presentation time (its decode time where it has none) and the keyframe flags."""
    times, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        times.append(packet.pts if packet.pts is not None else packet.dts)
        keys.append(bool(packet.is_keyframe))
        if len(times) > max_frames:
            raise VideoError(f"{{video}} has over {max_frames:,} frames; the limit is {max_frames:,}: "
                             "trim it or lower its frame rate", name)
    return times, keys


def _timeline(times: list[int | None], keys: list[bool]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Frames in presentation order, which of them are keyframes, and whether the timestamps can be trusted.

    Missing or repeated timestamps leave only the decode order: frames are then counted, never sought.
    """
    if None in times or len(set(times)) != len(times):
        return tuple(range(len(times))), (0,), False
    order = sorted(range(len(times)), key=times.__getitem__)
    keyframes = [rank for rank, i in enumerate(order) if keys[i]]
    if not keyframes or keyframes[0] != 0:
        keyframes.insert(0, 0)  # decoding from the start always works
    return tuple(times[i] for i in order), tuple(keyframes), True


def probe(path: str | os.PathLike, limits: VideoLimits = VideoLimits()) -> StreamInfo:
    """The file's video stream: its size, and every frame's time and keyframe flag (one demux pass, no decoding)."""
    name = display_name(path)
    check_file(path)
    av.logging.set_level(None)  # ffmpeg's per-packet complaints would break the one-line contract on stderr
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _video_stream(container, name)
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            time_base = float(stream.time_base) if stream.time_base else 1.0
            times, keys = _packet_times(container, stream, name, limits.max_source_frames)
            if not times:
                raise VideoError("{video} has no frames; pass a video with at least one frame", name)
            frame_pts, keyframes, has_timestamps = _timeline(times, keys)
            fps = _frame_rate(stream, list(frame_pts) if has_timestamps else [0], time_base)
    except av.FFmpegError as err:
        raise _not_readable(name) from err
    return StreamInfo(width, height, frame_pts, keyframes, time_base, fps, has_timestamps)


# ---------------------------------------------------------------- limits and the decode plan

def keyframe_before(keyframes: tuple[int, ...], index: int) -> int:
    """The last keyframe at or before frame `index` (keyframes is ascending and starts at 0)."""
    return keyframes[int(np.searchsorted(keyframes, index, side="right")) - 1]


def decode_plan(keyframes: tuple[int, ...], indices: list[int]) -> tuple[list[bool], int]:
    """For each wanted frame (ascending), whether to seek to its keyframe first, and how many frames the decoder
    then decodes in all. Seeking pays off when the wanted frame's keyframe lies beyond the last decoded frame."""
    seeks, decoded, position = [], 0, -1
    for index in indices:
        key = keyframe_before(keyframes, index)
        seek = key > position + 1
        decoded += index - (key - 1 if seek else position)
        seeks.append(seek)
        position = index
    return seeks, decoded


def check_limits(path: str | os.PathLike, info: StreamInfo, limits: VideoLimits, num_frames: int) -> None:
    """Refuse files too big, too long, too small, too large, too wide, or too costly to decode, before decoding."""
    name = display_name(path)
    size = os.stat(path).st_size
    if size > limits.max_file_bytes:
        raise VideoError(f"{{video}} is {size / 2**20:.0f} MB; the limit is {limits.max_file_bytes / 2**20:.0f} MB: "
                         "trim or compress it", name)
    if info.duration_s > limits.max_duration_s:
        raise VideoError(f"{{video}} lasts {info.duration_s / 60:.0f} min; the limit is "
                         f"{limits.max_duration_s / 60:.0f} min: trim it", name)
    short, long = sorted((info.width, info.height))
    if short < limits.min_side or long > limits.max_side:
        raise VideoError(f"{{video}} is {info.width}x{info.height} pixels; each side must be between "
                         f"{limits.min_side} and {limits.max_side}: resize it", name)
    if long / short > limits.max_aspect_ratio:
        raise VideoError(f"{{video}} is {info.width}x{info.height}, wider than {limits.max_aspect_ratio:.0f}:1; "
                         "crop it to a usual aspect ratio", name)
    _, decoded = decode_plan(info.keyframes, sample_indices(info.num_frames, num_frames))
    pixels = decoded * info.width * info.height
    if pixels > limits.max_decode_pixels:
        raise VideoError(f"{{video}} would take {_pixels(pixels)} decoded pixels ({decoded:,} frames of "
                         f"{info.width}x{info.height}, keyframes included); the limit is "
                         f"{_pixels(limits.max_decode_pixels)}: use fewer frames, or re-encode it smaller "
                         "or with more keyframes", name)


def _pixels(count: int) -> str:
    value, unit = (count / 1e9, "billion") if count >= 1e9 else (count / 1e6, "million")
    return f"{value:,.3f}".rstrip("0").rstrip(".") + f" {unit}"


# ---------------------------------------------------------------- decoding

def _decoded_frames(container, stream) -> Iterator[av.VideoFrame]:
    """Frames from the container's current position on; a packet the decoder rejects is skipped, as ffmpeg does."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.FFmpegError:
            continue


def _picture(frame: av.VideoFrame) -> np.ndarray:
    """RGB as displayed: the frame's display-matrix rotation applied (-90 = a quarter turn clockwise)."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = int(round((frame.rotation or 0) / 90))
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns % 4 else rgb


_WAITING_FRAMES = 2
_FRAME_THREADS_MAX_PIXELS = 1920 * 1088  # above this, frame threads would each hold another large frame


class _SeekMissed(Exception):
    """A seek landed after the frame it was for (some containers index keyframes loosely)."""


def _decode(container, stream, info: StreamInfo, indices: list[int], size: FrameSize, name: str,
            may_seek: bool, resizer: ThreadPoolExecutor) -> tuple[np.ndarray, tuple[int, int]]:
    """The frames at `indices`, each resized (in `resizer`, while the next one decodes) as soon as it is decoded;
    and the displayed (width, height). At most _WAITING_FRAMES full-size frames wait for their resize; a frame
    above _FRAME_THREADS_MAX_PIXELS is resized before the next one decodes, so that a slow resize on a loaded
    machine never lets several huge frames pile up (8000x8000: 192 MB each)."""
    seeks, _ = decode_plan(info.keyframes, indices)
    may_wait = _WAITING_FRAMES if info.width * info.height <= _FRAME_THREADS_MAX_PIXELS else 0
    pictures: list[np.ndarray | Future] = []
    waiting: deque[Future] = deque()
    displayed = (info.width, info.height)
    frames: Iterator[av.VideoFrame] = _decoded_frames(container, stream)
    counted = -1  # the decode-order count of the last frame, used where there are no timestamps
    for index, seek in zip(indices, seeks):
        target = info.frame_pts[index]
        sought = may_seek and seek and info.has_timestamps
        if sought:
            key_pts = info.frame_pts[keyframe_before(info.keyframes, index)]
            container.seek(key_pts, stream=stream, backward=True, any_frame=False)
            frames = _decoded_frames(container, stream)
        for frame in frames:
            counted += 1
            reached = (frame.pts is None or frame.pts >= target) if info.has_timestamps else counted >= index
            if not reached:
                sought = False
                continue
            if sought and frame.pts is not None and frame.pts > target:
                raise _SeekMissed
            rgb = _picture(frame)
            displayed = (rgb.shape[1], rgb.shape[0])
            if size is None:
                pictures.append(rgb)
            else:
                waiting.append(resizer.submit(resize_to, rgb, *target_size(size, *rgb.shape[:2])))
                pictures.append(waiting[-1])
                del rgb  # the future holds it until resized; the loop must not keep it alive past that
                while len(waiting) > may_wait:
                    waiting.popleft().result()
            break
        else:
            raise _undecodable(name)
    return np.stack([p.result() if isinstance(p, Future) else p for p in pictures]), displayed


def load_video(path: str | os.PathLike, num_frames: int = 32, size: FrameSize = MODEL_FRAME_SIZE,
               limits: VideoLimits = VideoLimits()) -> VideoClip:
    """Probe once, check the limits, then decode num_frames uniformly sampled RGB frames, each resized to
    size x size, or as a GridFit says (PIL bicubic, as the processors) as soon as it is decoded; size=None keeps
    the decoded size.

    Runs in the calling process: a server uses `dycoke.decoder`, which runs this in a killable worker.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    started = time.perf_counter()
    _reset_peak_rss()
    name = display_name(path)
    info = probe(path, limits)
    check_limits(path, info, limits, num_frames)
    indices = sample_indices(info.num_frames, num_frames)
    try:
        try:
            frames, displayed = _decode_file(path, info, indices, size, name, may_seek=True)
        except _SeekMissed:
            frames, displayed = _decode_file(path, info, indices, size, name, may_seek=False)
    except av.FFmpegError as err:
        raise _undecodable(name) from err
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.size == 0:
        raise _undecodable(name)
    if info.has_timestamps:
        times = tuple((info.frame_pts[i] - info.frame_pts[0]) * info.time_base for i in indices)
    else:
        times = tuple(i / info.fps for i in indices)
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=tuple(float(t) for t in times),
        source_frames=info.num_frames,
        fps=info.fps,
        decode_seconds=time.perf_counter() - started,
        source_size=displayed,
        decoder_peak_bytes=_peak_rss_bytes(),
    )


def _reset_peak_rss() -> None:
    """Linux: restart this process's high-water RSS (VmHWM), so that the next reading is this decode's peak and not
    an earlier one's (the decoder worker is long-lived)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """The high-water RSS of this process image: VmHWM where /proc has it. Not ru_maxrss: at exec Linux folds the old
    address space's peak into it, and a worker spawned by vfork had its parent's, so a worker started from a
    1.7 GB test process reported 1.7 GB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _decode_file(path, info: StreamInfo, indices: list[int], size: FrameSize, name: str,
                 may_seek: bool) -> tuple[np.ndarray, tuple[int, int]]:
    with av.open(str(path), metadata_errors="ignore") as container, ThreadPoolExecutor(1) as resizer:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO" if info.width * info.height <= _FRAME_THREADS_MAX_PIXELS else "SLICE"
        return _decode(container, stream, info, indices, size, name, may_seek, resizer)


# ---------------------------------------------------------------- pixels for the model

def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """PIL bicubic to size x size: the resize of LlavaOnevisionImageProcessorPil (a same-size frame is unchanged)."""
    return resize_to(frame, size, size)


def resize_to(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic to height x width, as the PIL image processors resize (a same-size frame is unchanged)."""
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC))


def _normalise_table() -> np.ndarray:
    """Every uint8 value through the processor's float ops: rescale in float64 then float32, normalise in float32."""
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (rescaled - half) / half


_NORMALISED = _normalise_table()


def to_pixel_values(frames: np.ndarray, size: int = MODEL_FRAME_SIZE, device: "torch.device | str | None" = None,
                    dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """LLaVA-OneVision pixels [T, 3, size, size] in [-1, 1]: bicubic resize (skipped for frames the decoder
    already resized), then /255 and (x - 0.5) / 0.5 on `device`, in `dtype` (default float32).

    The uint8 frames are moved to the device and mapped through a 256-entry table of the processor's own
    float32 results, so the values equal LlavaOnevisionImageProcessorPil(image_mean=0.5, image_std=0.5)
    exactly (then rounded once to `dtype`).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(
            f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if frames.shape[1:3] != (size, size):
        frames = np.stack([resize_frame(frame, size) for frame in frames])
    import torch  # here, so that the decoder worker starts without it

    dtype = dtype or torch.float32
    table = torch.from_numpy(_NORMALISED).to(device=device, dtype=dtype)
    values = torch.from_numpy(np.ascontiguousarray(frames)).to(device=device)
    pixels = table.index_select(0, values.view(-1).int()).view(values.shape)
    return pixels.permute(0, 3, 1, 2).contiguous()
