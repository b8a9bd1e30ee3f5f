"""The benchmark's default input: a synthetic clip that is the same on every machine."""

from __future__ import annotations

import math

import numpy as np

from dycoke.video import VideoClip


def synthetic_clip(num_frames: int, size: int = 384, fps: float = 8.0) -> VideoClip:
    """Deterministic moving shapes on a still gradient: real motion in known places, no file, no randomness."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.stack([40 + 60 * rows, 70 + 40 * cols, 110 + 30 * rows * cols], axis=-1)
    shapes = [  # (colour, half-size, row centre, speed in px/frame, start column, circle?)
        ((230, 57, 70), 28, 0.25, 9.0, 0.0, True),
        ((240, 240, 240), 34, 0.55, -6.0, 0.8, False),
        ((42, 157, 143), 20, 0.80, 14.0, 0.3, True),
        ((244, 162, 97), 24, 0.40, 4.0, 0.5, False),
    ]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    pixel_rows, pixel_cols = rows * size, cols * size
    for t in range(num_frames):
        frame = background.copy()
        for colour, half, row, speed, start, circle in shapes:
            centre_col = (start * size + speed * t) % (size + 2 * half) - half
            centre_row = row * size + 10 * math.sin(t / 5)
            if circle:
                inside = (pixel_rows - centre_row) ** 2 + (pixel_cols - centre_col) ** 2 <= half**2
            else:
                inside = (abs(pixel_rows - centre_row) <= half) & (abs(pixel_cols - centre_col) <= half)
            frame[inside] = colour
        frames[t] = frame.round().clip(0, 255)
    return VideoClip(frames=frames, timestamps=tuple(t / fps for t in range(num_frames)),
                     source_frames=num_frames, fps=fps)
