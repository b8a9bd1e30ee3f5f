"""Tests for dycoke.video: sampling, probing, decoding real, odd and hostile files, and pixel preprocessing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dycoke import video
from dycoke.limits import VideoLimits
from dycoke.video import (
    StreamInfo, VideoClip, VideoError, check_limits, decode_plan, load_video, probe, resize_frame, sample_indices,
    to_pixel_values,
)
from media import ONE_GOP, ffmpeg, frame_greys, grey_level, write_grey_video

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
EDGE = SHARED / "edge"
BBB = SHARED / "big_buck_bunny_480p_30s.mp4"
STREET = SHARED / "street_720p_3s.mp4"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip("../shared/videos not present: real test media is absent")
    return path


@pytest.fixture(scope="module")
def bbb_clip() -> VideoClip:
    return load_video(_need(BBB), num_frames=32)


@pytest.fixture(scope="module")
def street_full() -> VideoClip:
    """The street clip at its decoded size, for the sampling and pixel checks."""
    return load_video(_need(STREET), num_frames=32, size=None)


def _assert_video_error(path: Path, substring: str, **options) -> VideoError:
    with pytest.raises(VideoError) as info:
        load_video(path, **options)
    message = str(info.value)
    assert substring in message, message
    assert "\n" not in message and "\r" not in message
    assert isinstance(info.value, ValueError)
    return info.value


# ---------------------------------------------------------------- sample_indices

@pytest.mark.parametrize(
    ("total", "num", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),
        (3, 8, [0, 1, 2]),
        (5, 5, [0, 1, 2, 3, 4]),
        (100, 1, [0]),
        (1, 1, [0]),
        (1, 32, [0]),
        (11, 3, [0, 5, 10]),
        (720, 4, [0, 239, 479, 719]),  # 719/3 = 239.67 and 479.33, truncated as the official code does
        (8, 3, [0, 3, 7]),  # 3.5 -> 3, where rounding gives 4
        # the street clip, 96 frames -> 32: i * 95 / 31 truncated; 15 of these differ from rounding
        (96, 32, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 49, 52, 55, 58, 61, 64, 67, 70,
                  73, 76, 79, 82, 85, 88, 91, 95]),
    ],
)
def test_sample_indices_known_values(total: int, num: int, expected: list[int]) -> None:
    assert sample_indices(total, num) == expected


def test_sample_indices_truncate_where_rounding_differs() -> None:
    by_hand = [(i * 95) // 31 for i in range(32)]  # exact integer floor of i * (n - 1) / (T - 1)
    rounded = [int(np.floor(i * 95 / 31 + 0.5)) for i in range(32)]
    assert sample_indices(96, 32) == by_hand
    assert sum(a != b for a, b in zip(by_hand, rounded)) == 15


@settings(deadline=None)
@given(total=st.integers(1, 5000), num=st.integers(1, 300))
def test_sample_indices_properties(total: int, num: int) -> None:
    idx = sample_indices(total, num)
    assert len(idx) == min(total, num)
    assert all(isinstance(i, int) for i in idx)
    assert idx[0] == 0
    assert all(b > a for a, b in zip(idx, idx[1:]))  # no repeated frames
    assert idx[-1] == (total - 1 if num > 1 or total == 1 else 0)
    if num < total and num > 1:  # never above the exact value, and less than one frame below it
        exact = [i * (total - 1) / (num - 1) for i in range(num)]
        assert all(e - 1 - 1e-9 <= i <= e + 1e-9 for i, e in zip(idx, exact))


@pytest.mark.parametrize(("total", "num"), [(10, 0), (10, -1), (0, 4)])
def test_sample_indices_rejects_bad_counts(total: int, num: int) -> None:
    with pytest.raises(ValueError):
        sample_indices(total, num)


# ---------------------------------------------------------------- the decode plan and its budget

def test_decode_plan_by_hand() -> None:
    # keyframes 0, 10, 20; frame 0 from the start; 5 follows on; 15 seeks to 10 (decodes 10..15); 16 follows;
    # 25 seeks to 20 (20..25): 1 + 5 + 6 + 1 + 6 = 19 frames decoded
    assert decode_plan((0, 10, 20), [0, 5, 15, 16, 25]) == ([False, False, True, False, True], 19)
    assert decode_plan((0,), [0, 99]) == ([False, False], 100)  # one GOP: everything up to the last frame
    assert decode_plan((0, 1, 2, 3), [1, 3]) == ([True, True], 2)  # all intra: only the wanted frames


def _info(width: int, height: int, frames: int, keyframes: tuple[int, ...] = (0,)) -> StreamInfo:
    return StreamInfo(width, height, tuple(range(frames)), keyframes, 1 / 25, 25.0)


def test_absurd_decode_is_refused_from_the_probe(tmp_path: Path) -> None:
    """The review's 223 KB file: 2,000 frames of 8000x8000 in one GOP. 32 sampled frames need all 2,000 decoded:
    2000 * 64e6 = 128 billion pixels, over the 10 billion budget; the same size with a keyframe per frame is fine."""
    path = tmp_path / "small.mp4"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(VideoError, match=r"128 billion decoded pixels \(2,000 frames of 8000x8000"):
        check_limits(path, _info(8000, 8000, 2000), VideoLimits(), 32)
    check_limits(path, _info(8000, 8000, 2000, tuple(range(2000))), VideoLimits(), 32)  # 32 * 64e6 = 2 billion


def test_costly_file_is_refused_before_any_frame_is_decoded(tmp_path: Path, monkeypatch) -> None:
    path = write_grey_video(tmp_path / "one_gop.mp4", 64, 64, 300, options=ONE_GOP)
    monkeypatch.setattr(video, "_decode_file", lambda *a, **k: pytest.fail("decoding started"))
    limits = VideoLimits(max_decode_pixels=64 * 64 * 100)  # 32 of 300 frames in one GOP: all 300 are decoded
    _assert_video_error(path, "1.229 million decoded pixels (300 frames of 64x64", num_frames=32, limits=limits)


# ---------------------------------------------------------------- real videos

def test_big_buck_bunny(bbb_clip: VideoClip) -> None:
    clip = bbb_clip
    assert clip.source_frames == 720
    assert clip.fps == pytest.approx(24.0)
    assert clip.num_frames == 32
    assert clip.frames.shape == (32, 384, 384, 3)  # decoded straight to the model's size
    assert clip.source_size == (854, 480)
    assert clip.frames.dtype == np.uint8
    assert clip.duration_s == pytest.approx(30.0)
    assert len(clip.timestamps) == 32
    # linspace(0, 719, 32) truncated: step 719/31 = 23.19 -> indices 0, 23, 46, ..., 719
    assert clip.timestamps[0] == pytest.approx(0.0, abs=1e-3)
    assert clip.timestamps[1] == pytest.approx(23 / 24, abs=1e-3)
    assert clip.timestamps[2] == pytest.approx(46 / 24, abs=1e-3)
    assert clip.timestamps[-1] == pytest.approx(719 / 24, abs=1e-3)
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))
    assert clip.frames[-1].std() > 10  # real picture content, not a blank decode


def test_street(street_full: VideoClip) -> None:
    clip = street_full
    assert (clip.source_frames, clip.num_frames) == (96, 32)
    assert clip.fps == pytest.approx(30.0)
    assert clip.frames.shape == (32, 720, 1280, 3)
    assert clip.duration_s == pytest.approx(3.2)
    # truncated linspace(0, 95, 32): 0, 3, 6, ..., 21, 24 (24.52), ...
    assert clip.timestamps[:4] == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=1e-3)
    assert clip.timestamps[8] == pytest.approx(24 / 30, abs=1e-3)
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))


def test_street_frames_are_the_sampled_ones(street_full: VideoClip) -> None:
    """Sampled frames equal a plain sequential decode of frames 0, 3, ..., 24 and not their neighbours."""
    import av

    with av.open(str(STREET)) as container:
        raw = [f.to_ndarray(format="rgb24").astype(np.int16) for _, f in zip(range(26), container.decode(video=0))]
    for k, idx in enumerate([0, 3, 6, 9, 24]):
        got = street_full.frames[k if idx < 24 else 8].astype(np.int16)
        assert np.abs(got - raw[idx]).mean() < 0.5
        assert np.abs(got - raw[idx + 1]).mean() > 0.5


def test_minimal_single_frame() -> None:
    clip = load_video(_need(EDGE / "minimal.mp4"), size=None)
    assert clip.num_frames == 1 and clip.source_frames == 1
    assert clip.frames.shape == (1, 240, 320, 3)
    assert clip.timestamps == pytest.approx((0.0,))
    assert clip.fps == pytest.approx(25.0)


def test_white_all_white() -> None:
    clip = load_video(_need(EDGE / "white.mp4"), num_frames=16)
    assert clip.source_frames == 300 and clip.num_frames == 16
    assert clip.frames.shape == (16, 384, 384, 3)
    assert clip.frames.min() >= 250
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))
    assert clip.timestamps[-1] == pytest.approx(299 / 30, abs=1e-3)


def test_rotation_metadata_is_applied() -> None:
    import av

    clip = load_video(_need(EDGE / "video_rotation_90.mp4"), size=None)
    assert clip.num_frames == 1
    # coded 100 wide x 60 high; the rotation metadata turns it upright to 60 wide x 100 high
    assert clip.frames.shape == (1, 100, 60, 3) and clip.source_size == (60, 100)
    with av.open(str(EDGE / "video_rotation_90.mp4")) as container:
        raw = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert raw.shape == (60, 100, 3)
    np.testing.assert_array_equal(clip.frames[0], np.rot90(raw, k=-1))


@pytest.mark.parametrize(
    ("name", "substring"),
    [("bipbop_audioinit.mp4", "no video stream (audio-only file)"), ("short-cenc.mp4", "cannot be decoded")],
)
def test_edge_files_fail_clearly(name: str, substring: str) -> None:
    err = _assert_video_error(_need(EDGE / name), substring)
    assert name in str(err)


def test_every_shared_file_is_covered() -> None:
    """A new file dropped into shared/videos must get a test here."""
    covered = {"big_buck_bunny_480p_30s.mp4", "street_720p_3s.mp4", "minimal.mp4", "white.mp4",
               "video_rotation_90.mp4", "bipbop_audioinit.mp4", "short-cenc.mp4"}
    present = {p.name for p in _need(SHARED).rglob("*") if p.is_file() and p.suffix != ".md"}
    assert present == covered


# ---------------------------------------------------------------- valid files that decord refused (issue 11, item 3)

def _assert_greys(clip: VideoClip, total: int) -> None:
    """Each sampled frame is the frame sample_indices names: its grey level says which one it is."""
    expected = [grey_level(i) for i in sample_indices(total, clip.num_frames)]
    assert all(abs(got - want) <= 2 for got, want in zip(frame_greys(clip.frames), expected)), \
        (frame_greys(clip.frames), expected)


@pytest.mark.parametrize("width", [16, 24, 48, 72])
def test_narrow_widths_decode_with_three_channels(tmp_path: Path, width: int) -> None:
    path = write_grey_video(tmp_path / f"w{width}.mp4", width, 32, 20)
    clip = load_video(path, num_frames=8, size=None)
    assert clip.frames.shape == (8, 32, width, 3) and clip.source_frames == 20
    _assert_greys(clip, 20)


def test_hundred_thousand_frames_of_16x16(tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=16x16:r=100", "-frames:v", "100000", "-c:v", "libx264",
           "-preset", "ultrafast", "-g", "250", "-pix_fmt", "yuv420p", str(path))
    clip = load_video(path, num_frames=32)
    assert clip.source_frames == 100_000 and clip.num_frames == 32
    # truncated linspace(0, 99999, 32) at 100 fps: frame 3225 (99999/31 = 3225.77) at 32.25 s
    assert clip.timestamps[1] == pytest.approx(32.25, abs=1e-6)
    assert clip.timestamps[-1] == pytest.approx(999.99, abs=1e-6)


@pytest.mark.parametrize("offset", [None, "-3"])
def test_mpeg_ts_with_and_without_negative_timestamps(tmp_path: Path, offset: str | None) -> None:
    source = write_grey_video(tmp_path / "source.mp4", 64, 48, 24, options={"bf": "2", "g": "8"})
    path = tmp_path / "clip.ts"
    shift = ["-output_ts_offset", offset] if offset else []
    ffmpeg("-i", str(source), "-c", "copy", *shift, "-f", "mpegts", str(path))
    clip = load_video(path, num_frames=8, size=None)
    assert clip.source_frames == 24 and clip.timestamps[0] == 0.0
    assert clip.timestamps[-1] == pytest.approx(23 / 8, abs=1e-3)
    _assert_greys(clip, 24)


def test_av1_in_matroska(tmp_path: Path) -> None:
    path = write_grey_video(tmp_path / "av1.mkv", 64, 64, 16, codec="libsvtav1", options={"preset": "12"})
    clip = load_video(path, num_frames=4, size=None)
    assert clip.source_frames == 16 and clip.frames.shape == (4, 64, 64, 3)
    _assert_greys(clip, 16)


def test_matroska_without_duration(tmp_path: Path) -> None:
    import av

    source = write_grey_video(tmp_path / "source.mp4", 64, 48, 24)
    path = tmp_path / "live.mkv"
    with open(path, "wb") as out:  # written to a pipe, the muxer cannot go back to write Duration
        import subprocess

        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(source), "-c", "copy", "-f", "matroska",
                        "pipe:1"], stdout=out, check=True)
    with av.open(str(path)) as container:
        assert container.duration is None
    clip = load_video(path, num_frames=6, size=None)
    assert clip.source_frames == 24
    _assert_greys(clip, 24)


# ---------------------------------------------------------------- files that are not videos, each told so

def test_gif_is_named_as_an_animated_image(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=5:d=1", str(path))
    _assert_video_error(path, "is an animated image (GIF")


def test_audio_with_cover_art(tmp_path: Path) -> None:
    cover = tmp_path / "cover.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(cover)
    path = tmp_path / "song.mp3"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-i", str(cover), "-map", "0", "-map", "1", "-c:a", "libmp3lame",
           "-c:v", "png", "-disposition:v:0", "attached_pic", str(path))
    _assert_video_error(path, "audio file with cover art")


@pytest.mark.parametrize("suffix", [".mp3", ".m4a", ".wav"])
def test_audio_only_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"sound{suffix}"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", str(path))
    _assert_video_error(path, "no video stream (audio-only file)")


def test_fifo_is_named_and_never_opened(tmp_path: Path) -> None:
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)  # opening it would block until a writer came
    _assert_video_error(path, "is a pipe or socket")


def test_directory(tmp_path: Path) -> None:
    _assert_video_error(tmp_path, "is a folder, not a video file")


def test_unreadable_file(tmp_path: Path, monkeypatch) -> None:
    path = write_grey_video(tmp_path / "locked.mp4", 32, 32, 2)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path else real_access(p, mode))
    _assert_video_error(path, "cannot be read: permission denied")


def test_file_under_an_unreadable_folder(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "locked" / "clip.mp4"
    real_stat = os.stat

    def stat(p, *args, **kwargs):
        if Path(p) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    _assert_video_error(path, "permission denied on the file or a folder above it")


def test_name_too_long(tmp_path: Path) -> None:
    _assert_video_error(tmp_path / ("x" * 300 + ".mp4"), "too long for the file system")


# ---------------------------------------------------------------- hostile files made here

def _truncated(tmp_path: Path, fraction: float) -> Path:
    data = _need(STREET).read_bytes()
    out = tmp_path / f"truncated_{int(fraction * 100)}.mp4"
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def test_truncated_40_percent(tmp_path: Path) -> None:
    _assert_video_error(_truncated(tmp_path, 0.4), "cannot be decoded")


def test_truncated_half_decodes_or_fails_clearly(tmp_path: Path) -> None:
    path = _truncated(tmp_path, 0.5)
    try:
        clip = load_video(path, num_frames=8)
    except VideoError as err:
        assert ("cannot be decoded" in str(err) or "not a readable video" in str(err)) and "\n" not in str(err)
    else:
        assert clip.num_frames in range(1, 9)
        assert clip.frames.shape[1:] == (384, 384, 3)


def test_text_file_renamed(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    _assert_video_error(path, "not a readable video")


def test_png_renamed(tmp_path: Path) -> None:
    path = tmp_path / "picture.mp4"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(path, format="PNG")
    _assert_video_error(path, "is a still image, not a video")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    _assert_video_error(path, "is empty")


def test_missing_path(tmp_path: Path) -> None:
    err = _assert_video_error(tmp_path / "nope.mp4", "video file not found")
    assert "nope.mp4" in str(err)


def test_newline_in_name_stays_one_line(tmp_path: Path) -> None:
    _assert_video_error(tmp_path / "bad\nname.mp4", "video file not found")


def test_message_about_another_subject(tmp_path: Path) -> None:
    """The app words the same error about "the uploaded video", without the file name."""
    with pytest.raises(VideoError) as info:
        load_video(tmp_path / "SECRETNAME.mp4")
    assert "SECRETNAME" in str(info.value)
    assert info.value.message_for("the uploaded video") == (
        "video file not found: the uploaded video; check the path and that the file exists")


def test_bad_num_frames() -> None:
    with pytest.raises(ValueError):
        load_video(_need(STREET), num_frames=0)


def test_corrupt_packets_are_skipped(tmp_path: Path) -> None:
    """Garbage in the middle of the stream: the decoder skips what it rejects and still returns the frames."""
    path = write_grey_video(tmp_path / "damaged.mp4", 64, 48, 40, options={"g": "4"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    try:
        clip = load_video(path, num_frames=4, size=None)
    except VideoError as err:
        assert "cannot be decoded" in str(err)
    else:
        assert clip.num_frames == 4


# ---------------------------------------------------------------- to_pixel_values

def _processor_pixels(frame: np.ndarray) -> np.ndarray:
    """transformers' own PIL processor on one full-size frame: the base (first) patch, [3, 384, 384] float32."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    processor = LlavaOnevisionImageProcessorPil(image_mean=0.5, image_std=0.5)
    return processor(images=[Image.fromarray(frame)], return_tensors="np")["pixel_values"][0][0]


def test_pixel_values_equal_the_processor_exactly(street_full: VideoClip) -> None:
    """Full-size frames through to_pixel_values equal LlavaOnevisionImageProcessorPil(image_mean=0.5,
    image_std=0.5) bit for bit, on a real frame and on noise (every grey level, sharp edges)."""
    noise = np.random.default_rng(0).integers(0, 256, size=(90, 160, 3), dtype=np.uint8)
    for frame in (street_full.frames[5], noise):
        ours = to_pixel_values(frame[None])[0].numpy()
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, _processor_pixels(frame))


def test_decoder_path_equals_the_processor_on_the_decoded_frames(street_full: VideoClip) -> None:
    """The model's path: the decoder resizes each frame as it decodes it (PIL bicubic, the processor's resize),
    and to_pixel_values then only rescales and normalises. That equals the processor applied to the same
    decoded frames at full size, exactly."""
    small = load_video(STREET, num_frames=32)
    assert small.frames.shape == (32, 384, 384, 3)
    for k in (0, 13, 31):
        np.testing.assert_array_equal(small.frames[k], resize_frame(street_full.frames[k], 384))
        np.testing.assert_array_equal(to_pixel_values(small.frames[k:k + 1])[0].numpy(),
                                      _processor_pixels(street_full.frames[k]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_pixel_values_in_the_model_dtype(dtype: torch.dtype) -> None:
    """In another dtype: the processor's float32 values rounded once, never a lower-precision computation."""
    frames = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    expected = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    pixels = to_pixel_values(frames, size=16, dtype=dtype)
    assert pixels.dtype == dtype
    torch.testing.assert_close(pixels[0, 0].reshape(-1), torch.from_numpy(expected).to(dtype), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pixel_values_on_cuda_equal_the_cpu() -> None:
    frames = np.random.default_rng(1).integers(0, 256, size=(4, 384, 384, 3), dtype=np.uint8)
    on_cuda = to_pixel_values(frames, device="cuda", dtype=torch.bfloat16)
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), to_pixel_values(frames).to(torch.bfloat16), rtol=0, atol=0)


def test_pixel_values_shape_dtype_range(street_full: VideoClip) -> None:
    pixels = to_pixel_values(street_full.frames[:4])
    assert pixels.shape == (4, 3, 384, 384)
    assert pixels.dtype == torch.float32
    assert pixels.is_contiguous()
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.std() > 0.1


def test_pixel_values_grey_is_exact() -> None:
    frames = np.full((2, 50, 70, 3), 128, np.uint8)
    pixels = to_pixel_values(frames, size=384)
    expected = (128 / 255 - 0.5) / 0.5  # 0.003921...
    assert pixels.shape == (2, 3, 384, 384)
    torch.testing.assert_close(pixels, torch.full_like(pixels, expected), rtol=0, atol=1e-7)


def test_pixel_values_channel_order_and_size() -> None:
    frame = np.zeros((1, 20, 40, 3), np.uint8)
    frame[..., 0] = 255  # pure red
    pixels = to_pixel_values(frame, size=28)
    assert pixels.shape == (1, 3, 28, 28)
    assert torch.all(pixels[0, 0] == 1.0)
    assert torch.all(pixels[0, 1:] == -1.0)


@pytest.mark.parametrize(
    "frames",
    [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
     np.zeros((2, 8, 8, 4), np.uint8), np.zeros((0, 8, 8, 3), np.uint8)],
)
def test_pixel_values_rejects_bad_input(frames: np.ndarray) -> None:
    with pytest.raises(ValueError):
        to_pixel_values(frames)


def test_bad_streams_do_not_spam_stderr(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """ffmpeg's per-packet complaints must stay quiet; the CLI promises one line on stderr."""
    capfd.readouterr()
    for path in (_need(EDGE / "short-cenc.mp4"), _truncated(tmp_path, 0.5)):
        try:
            load_video(path)
        except VideoError:
            pass
    assert capfd.readouterr().err == ""
