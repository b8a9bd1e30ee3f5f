"""Tests for dycoke.video: sampling, decoding of real and hostile files, and pixel preprocessing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dycoke.video import VideoClip, VideoError, load_video, sample_indices, to_pixel_values

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
EDGE = SHARED / "edge"
BBB = SHARED / "big_buck_bunny_480p_30s.mp4"
STREET = SHARED / "street_720p_3s.mp4"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip("../shared/videos not present: real test media is absent")
    return path


@pytest.fixture(params=["with-pyav", "without-pyav"])
def pyav_mode(request, monkeypatch) -> str:
    """Run error classification both with the PyAV probe and from decord's errors alone."""
    if request.param == "without-pyav":
        monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    else:
        pytest.importorskip("av")
    return request.param


@pytest.fixture(scope="module")
def bbb_clip() -> VideoClip:
    return load_video(_need(BBB), num_frames=32)


@pytest.fixture(scope="module")
def street_clip() -> VideoClip:
    return load_video(_need(STREET), num_frames=32)


def _assert_video_error(path: Path, substring: str) -> VideoError:
    with pytest.raises(VideoError) as info:
        load_video(path)
    message = str(info.value)
    assert substring in message
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
        (720, 4, [0, 240, 479, 719]),  # 719/3 = 239.67 -> 240, 479.33 -> 479
    ],
)
def test_sample_indices_known_values(total: int, num: int, expected: list[int]) -> None:
    assert sample_indices(total, num) == expected


@given(total=st.integers(1, 5000), num=st.integers(1, 300))
def test_sample_indices_properties(total: int, num: int) -> None:
    idx = sample_indices(total, num)
    assert len(idx) == min(total, num)
    assert all(isinstance(i, int) for i in idx)
    assert idx[0] == 0
    assert all(b > a for a, b in zip(idx, idx[1:]))  # no repeated frames
    assert idx[-1] == (total - 1 if num > 1 or total == 1 else 0)


@pytest.mark.parametrize(("total", "num"), [(10, 0), (10, -1), (0, 4)])
def test_sample_indices_rejects_bad_counts(total: int, num: int) -> None:
    with pytest.raises(ValueError):
        sample_indices(total, num)


# ---------------------------------------------------------------- real videos

def test_big_buck_bunny(bbb_clip: VideoClip) -> None:
    clip = bbb_clip
    assert clip.source_frames == 720
    assert clip.fps == pytest.approx(24.0)
    assert clip.num_frames == 32
    assert clip.frames.shape == (32, 480, 854, 3)
    assert clip.frames.dtype == np.uint8
    assert clip.duration_s == pytest.approx(30.0)
    assert len(clip.timestamps) == 32
    # linspace(0, 719, 32): step 719/31 = 23.19 -> indices 0, 23, 46, ..., 719
    assert clip.timestamps[0] == pytest.approx(0.0, abs=1e-3)
    assert clip.timestamps[1] == pytest.approx(23 / 24, abs=1e-3)
    assert clip.timestamps[2] == pytest.approx(46 / 24, abs=1e-3)
    assert clip.timestamps[-1] == pytest.approx(719 / 24, abs=1e-3)
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))
    assert clip.frames[-1].std() > 10  # real picture content, not a blank decode


def test_street(street_clip: VideoClip) -> None:
    clip = street_clip
    assert (clip.source_frames, clip.num_frames) == (96, 32)
    assert clip.fps == pytest.approx(30.0)
    assert clip.frames.shape == (32, 720, 1280, 3)
    assert clip.duration_s == pytest.approx(3.2)
    # linspace(0, 95, 32): step 95/31 = 3.065 -> 0, 3, 6, 9, 12, 15, 18, 21, 25, ...
    assert clip.timestamps[:4] == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=1e-3)
    assert clip.timestamps[8] == pytest.approx(25 / 30, abs=1e-3)
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))


def test_street_frames_are_the_sampled_ones(street_clip: VideoClip) -> None:
    """Sampled frames equal PyAV's sequential decode of frames 0, 3, 6, 9 and not their neighbours."""
    av = pytest.importorskip("av")
    with av.open(str(STREET)) as container:
        raw = [f.to_ndarray(format="rgb24").astype(np.int16)
               for _, f in zip(range(11), container.decode(video=0))]
    for k, idx in enumerate([0, 3, 6, 9]):
        got = street_clip.frames[k].astype(np.int16)
        assert np.abs(got - raw[idx]).mean() < 0.5
        assert np.abs(got - raw[idx + 1]).mean() > 0.5


def test_minimal_single_frame() -> None:
    clip = load_video(_need(EDGE / "minimal.mp4"))
    assert clip.num_frames == 1 and clip.source_frames == 1
    assert clip.frames.shape == (1, 240, 320, 3)
    assert clip.timestamps == pytest.approx((0.0,))
    assert clip.fps == pytest.approx(25.0)


def test_white_all_white() -> None:
    clip = load_video(_need(EDGE / "white.mp4"), num_frames=16)
    assert clip.source_frames == 300 and clip.num_frames == 16
    assert clip.frames.shape == (16, 240, 320, 3)
    assert clip.frames.min() >= 250
    assert all(b > a for a, b in zip(clip.timestamps, clip.timestamps[1:]))
    assert clip.timestamps[-1] == pytest.approx(299 / 30, abs=1e-3)


def test_rotation_metadata_is_applied() -> None:
    clip = load_video(_need(EDGE / "video_rotation_90.mp4"))
    assert clip.num_frames == 1
    # coded 100 wide x 60 high; the rotation metadata turns it upright to 60 wide x 100 high
    assert clip.frames.shape == (1, 100, 60, 3)
    av = pytest.importorskip("av")
    with av.open(str(EDGE / "video_rotation_90.mp4")) as container:
        raw = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert raw.shape == (60, 100, 3)
    np.testing.assert_array_equal(clip.frames[0], np.rot90(raw, k=-1))


@pytest.mark.usefixtures("pyav_mode")
@pytest.mark.parametrize(
    ("name", "substring"),
    [("bipbop_audioinit.mp4", "no video stream"), ("short-cenc.mp4", "cannot be decoded")],
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


# ---------------------------------------------------------------- hostile files made here

def _truncated(tmp_path: Path, fraction: float) -> Path:
    data = _need(STREET).read_bytes()
    out = tmp_path / f"truncated_{int(fraction * 100)}.mp4"
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


@pytest.mark.usefixtures("pyav_mode")
def test_truncated_40_percent(tmp_path: Path) -> None:
    _assert_video_error(_truncated(tmp_path, 0.4), "cannot be decoded")


@pytest.mark.usefixtures("pyav_mode")
def test_truncated_half_decodes_or_fails_clearly(tmp_path: Path) -> None:
    path = _truncated(tmp_path, 0.5)
    try:
        clip = load_video(path, num_frames=8)
    except VideoError as err:
        assert "cannot be decoded" in str(err) and "\n" not in str(err)
    else:
        assert clip.num_frames in range(1, 9)
        assert clip.frames.shape[1:] == (720, 1280, 3)


@pytest.mark.usefixtures("pyav_mode")
def test_text_file_renamed(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    _assert_video_error(path, "not a readable video")


@pytest.mark.usefixtures("pyav_mode")
def test_png_renamed(tmp_path: Path) -> None:
    path = tmp_path / "picture.mp4"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(path, format="PNG")
    _assert_video_error(path, "not a readable video")


@pytest.mark.usefixtures("pyav_mode")
def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    _assert_video_error(path, "is empty")


@pytest.mark.usefixtures("pyav_mode")
def test_missing_path_and_directory(tmp_path: Path) -> None:
    err = _assert_video_error(tmp_path / "nope.mp4", "video file not found")
    assert "nope.mp4" in str(err)
    _assert_video_error(tmp_path, "video file not found")


def test_newline_in_name_stays_one_line(tmp_path: Path) -> None:
    _assert_video_error(tmp_path / "bad\nname.mp4", "video file not found")


def test_bad_num_frames() -> None:
    with pytest.raises(ValueError):
        load_video(_need(STREET), num_frames=0)


# ---------------------------------------------------------------- decord misbehaving (simulated)

class _FakeBatch:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def asnumpy(self) -> np.ndarray:
        return self._array


def test_zero_frames(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "copy.mp4"
    shutil.copy(_need(EDGE / "minimal.mp4"), path)
    monkeypatch.setattr(decord.VideoReader, "__len__", lambda self: 0)
    _assert_video_error(path, "no frames")


def test_zero_size_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decord.VideoReader, "get_batch",
                        lambda self, idx: _FakeBatch(np.zeros((len(idx), 0, 0, 3), np.uint8)))
    _assert_video_error(_need(EDGE / "white.mp4"), "cannot be decoded")


def test_decord_raising_mid_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, idx):
        raise decord.DECORDError("[00:00:00] threaded_decoder.cc:218: Check failed\nThread worker: Error")
    monkeypatch.setattr(decord.VideoReader, "get_batch", boom)
    _assert_video_error(_need(EDGE / "white.mp4"), "cannot be decoded")


def test_broken_timestamps_fall_back_to_index_over_fps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp",
                        lambda self, idx: np.zeros((len(idx), 2), np.float32))
    clip = load_video(_need(EDGE / "white.mp4"), num_frames=4)
    # linspace(0, 299, 4) -> 0, 100, 199, 299 at 30 fps
    assert clip.timestamps == pytest.approx((0.0, 100 / 30, 199 / 30, 299 / 30))


def test_reads_only_the_sampled_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[list[int]] = []
    real_get_batch = decord.VideoReader.get_batch

    def spy(self, indices):
        requested.append(list(indices))
        return real_get_batch(self, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", spy)
    monkeypatch.setattr(decord.VideoReader, "__getitem__",
                        lambda self, i: pytest.fail("load_video decoded a frame with vr[i]"))
    monkeypatch.setattr(decord.VideoReader, "next",
                        lambda self: pytest.fail("load_video decoded frames sequentially"))
    clip = load_video(_need(EDGE / "white.mp4"), num_frames=8)
    assert clip.num_frames == 8
    flat = [i for call in requested for i in call]
    assert len(flat) == 8
    # linspace(0, 299, 8): step 42.71 -> 0, 43, 85, 128, 171, 214, 256, 299
    assert flat == [0, 43, 85, 128, 171, 214, 256, 299]


# ---------------------------------------------------------------- to_pixel_values

def test_pixel_values_shape_dtype_range(street_clip: VideoClip) -> None:
    pixels = to_pixel_values(street_clip.frames[:4])
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


def test_pixel_values_match_direct_pil() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(90, 160, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(frame, "RGB").resize((384, 384), Image.Resampling.BICUBIC))
    expected = (resized.astype(np.float64) / 255.0 - 0.5) / 0.5
    pixels = to_pixel_values(frame[None])
    assert pixels.shape == (1, 3, 384, 384)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)


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
    pytest.importorskip("av")
    capfd.readouterr()
    for path in (_need(EDGE / "short-cenc.mp4"), _truncated(tmp_path, 0.5)):
        with pytest.raises(VideoError):
            load_video(path)
    assert capfd.readouterr().err == ""
