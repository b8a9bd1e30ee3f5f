"""Write the app's example videos into assets/examples/: synthetic, deterministic, no third-party media.

    python assets/make_examples.py

Each clip is 4 s of H.264 (yuv420p) at 24 fps, 640×360, drawn frame by frame with PIL.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 640, 360
FPS = 24
SECONDS = 4
NUM_FRAMES = FPS * SECONDS
OUTPUT_DIR = Path(__file__).resolve().parent / "examples"


def write_mp4(path: Path, frames) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        # One thread and no B-frames: byte-identical output on every run, and simple decoding.
        stream.options = {"crf": "20", "preset": "medium", "bf": "0", "threads": "1", "g": "48"}
        stream.codec_context.thread_count = 1
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


def moving_shapes():
    """Coloured circles and squares crossing a plain background at different speeds."""
    shapes = [  # (kind, colour, size, y, speed in px/frame, start x)
        ("circle", (230, 57, 70), 70, 80, 6.0, -70),
        ("square", (29, 53, 87), 80, 180, -4.5, WIDTH),
        ("circle", (42, 157, 143), 50, 280, 8.0, -200),
        ("square", (244, 162, 97), 60, 120, 3.0, 300),
    ]
    for t in range(NUM_FRAMES):
        image = Image.new("RGB", (WIDTH, HEIGHT), (241, 250, 238))
        draw = ImageDraw.Draw(image)
        for kind, colour, size, y, speed, start in shapes:
            x = (start + speed * t) % (WIDTH + size) - size
            box = (x, y - size / 2, x + size, y + size / 2)
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
        yield image


def _sky_with_sun(t: int) -> Image.Image:
    rows = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    top, horizon = np.array([30, 60, 140]), np.array([250, 180, 120])
    sky = (top + (horizon - top) * rows) * np.ones((1, WIDTH, 1))
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    angle = math.pi * (0.15 + 0.7 * t / NUM_FRAMES)
    sun_x, sun_y = WIDTH / 2 - 260 * math.cos(angle), HEIGHT - 60 - 220 * math.sin(angle)
    draw.ellipse((sun_x - 30, sun_y - 30, sun_x + 30, sun_y + 30), fill=(255, 230, 90))
    draw.rectangle((0, HEIGHT - 60, WIDTH, HEIGHT), fill=(40, 90, 50))
    return image


def _checkerboard_with_ball(t: int) -> Image.Image:
    cell = 40
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    board = ((ys // cell + xs // cell) % 2).astype(np.uint8)
    image = Image.fromarray(np.where(board[..., None] == 1, [60, 60, 70], [200, 200, 210]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    ball_x = 60 + (t * 7) % (2 * (WIDTH - 120))
    ball_x = ball_x if ball_x <= WIDTH - 60 else 2 * (WIDTH - 60) - ball_x + 60
    ball_y = HEIGHT - 60 - 200 * abs(math.sin(t * math.pi / 20))
    draw.ellipse((ball_x - 28, ball_y - 28, ball_x + 28, ball_y + 28), fill=(220, 40, 40))
    return image


def scene_cut():
    """A sky with a rising sun, then a hard cut at 2 s to a checkerboard with a bouncing ball."""
    for t in range(NUM_FRAMES):
        yield _sky_with_sun(t) if t < NUM_FRAMES // 2 else _checkerboard_with_ball(t)


def _room() -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), (225, 215, 195))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 250, WIDTH, HEIGHT), fill=(140, 100, 70))  # floor
    draw.rectangle((60, 50, 240, 190), fill=(150, 200, 235), outline=(90, 70, 50), width=8)  # window
    draw.line((150, 50, 150, 190), fill=(90, 70, 50), width=6)
    draw.line((60, 120, 240, 120), fill=(90, 70, 50), width=6)
    draw.rectangle((380, 190, 580, 210), fill=(110, 70, 40))  # table top
    draw.rectangle((395, 210, 410, 300), fill=(110, 70, 40))
    draw.rectangle((550, 210, 565, 300), fill=(110, 70, 40))
    draw.rectangle((460, 140, 500, 190), fill=(60, 110, 60))  # plant pot and leaves
    draw.ellipse((440, 90, 520, 150), fill=(50, 150, 60))
    draw.rectangle((300, 60, 360, 110), fill=(250, 245, 230), outline=(60, 60, 60), width=3)  # picture frame
    return image


def static_scene():
    """A still room; only a small ball rolls along the floor."""
    room = _room()
    for t in range(NUM_FRAMES):
        image = room.copy()
        x = 40 + t * (WIDTH - 80) / (NUM_FRAMES - 1)
        ImageDraw.Draw(image).ellipse((x - 12, 310 - 12, x + 12, 310 + 12), fill=(30, 80, 200))
        yield image


EXAMPLES = (("moving_shapes.mp4", moving_shapes), ("scene_cut.mp4", scene_cut), ("static_scene.mp4", static_scene))


def main() -> None:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, make_frames in EXAMPLES:
        path = OUTPUT_DIR / name
        write_mp4(path, make_frames())
        print(f"{path}: {NUM_FRAMES} frames, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
