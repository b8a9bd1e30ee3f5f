"""Odd media made on the spot with ffmpeg and PyAV, for the video, decoder, CLI and app tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest


ONE_GOP = {"x264-params": "keyint=1000:min-keyint=1000:scenecut=0"}  # libx264: a keyframe only at the start


def ffmpeg(*args: str) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-nostdin", *args], check=True)


def grey_level(index: int) -> int:
    """The grey of frame `index` in `write_grey_video`: distinct for 32 consecutive frames."""
    return 16 + (index * 7) % 224


def write_grey_video(path: Path, width: int, height: int, frames: int, rate: int = 8, codec: str = "libx264",
                     options: dict | None = None, container_options: dict | None = None) -> Path:
    """Flat frames whose grey level says which frame they are (grey_level(i)); yuv420p."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            image = np.full((height, width, 3), grey_level(index), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_greys(frames: np.ndarray) -> list[int]:
    """The mean grey of each decoded frame, rounded."""
    return [int(round(float(frame.mean()))) for frame in frames]
