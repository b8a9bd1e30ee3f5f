"""Hostile media through the CLI: every bad file gets exit 1 and one line, never a traceback or a hang."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from dycoke.cli import main
from dycoke.decoder import load_video_isolated
from dycoke.limits import VideoLimits
from dycoke.video import VideoError
from media import ONE_GOP, ffmpeg

av = pytest.importorskip("av", reason="PyAV writes the synthetic hostile videos")


def write_video(path: Path, width: int, height: int, frames: int, options: dict | None = None) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            image = np.full((height, width, 3), (index * 30) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def damaged_header(source: Path, target: Path) -> Path:
    data = bytearray(source.read_bytes())
    moov = data.find(b"moov") - 4
    size = struct.unpack(">I", data[moov:moov + 4])[0]
    data[moov + size // 2:moov + size // 2 + 256] = b"\xff" * 256
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def hostile_corpus(shared_videos, tmp_path_factory) -> dict[str, Path]:
    """Bad files made from real ones, plus the shared edge files that must be refused."""
    folder = tmp_path_factory.mktemp("hostile")
    street = shared_videos / "street_720p_3s.mp4"
    data = street.read_bytes()
    corpus = {
        "truncated": folder / "truncated.mp4",
        "header overwritten": damaged_header(street, folder / "overwritten.mp4"),
        "zero bytes": folder / "empty.mp4",
        "png renamed": folder / "image.mp4",
        "text file": folder / "notes.mp4",
        "2x2 video": write_video(folder / "tiny.mp4", 2, 2, 4),
        "very wide video": write_video(folder / "wide.mp4", 2048, 32, 4),
        "audio only": shared_videos / "edge" / "bipbop_audioinit.mp4",
        "encrypted": shared_videos / "edge" / "short-cenc.mp4",
        "GIF": folder / "anim.gif",
        "MP3 with cover art": folder / "song.mp3",
        "WAV audio": folder / "sound.wav",
        "FIFO": folder / "pipe.mp4",
        "directory": folder / "folder.mp4",
        "one GOP too costly to decode": write_video(folder / "gop.mp4", 64, 64, 40, ONE_GOP),
    }
    corpus["truncated"].write_bytes(data[: len(data) * 2 // 5])
    corpus["zero bytes"].write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(corpus["png renamed"], format="PNG")
    corpus["text file"].write_text("not a video at all\n" * 20)
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=5:d=1", str(corpus["GIF"]))
    Image.new("RGB", (32, 32), (0, 90, 200)).save(folder / "cover.png")
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-i", str(folder / "cover.png"), "-map", "0", "-map", "1",
           "-c:a", "libmp3lame", "-c:v", "png", "-disposition:v:0", "attached_pic", str(corpus["MP3 with cover art"]))
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", str(corpus["WAV audio"]))
    os.mkfifo(corpus["FIFO"])
    corpus["directory"].mkdir()
    return corpus


COSTLY = VideoLimits(max_decode_pixels=64 * 64 * 20)  # the one-GOP file needs 40 frames decoded: refused


CLIENT_SIDE_ONLY = {"FIFO", "directory"}  # an upload is a regular file: these exist only for the CLI


@pytest.fixture()
def tight_decode_budget(monkeypatch):
    """The CLI's limits with a decode budget that the corpus's one-GOP file exceeds."""
    import dycoke.cli

    monkeypatch.setattr(dycoke.cli, "load_video_isolated", functools.partial(load_video_isolated, limits=COSTLY))


def test_every_hostile_file_exits_1_with_one_line(hostile_corpus, capfd, tight_decode_budget):
    refused = []
    for label, path in hostile_corpus.items():
        code = main(["answer", str(path), "What is this?", "--max-new-tokens", "2"])
        out, err = capfd.readouterr()
        lines = err.strip().splitlines()
        assert code == 1, (label, err)
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), (label, err)
        refused.append(label)
    print(f"\nhostile files refused with one line: {len(refused)} of {len(hostile_corpus)}")


def test_single_frame_video_answers(tmp_path, capfd):
    video = write_video(tmp_path / "one.mp4", 64, 48, 1)
    assert main(["answer", str(video), "What is it?", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["trace"]["frames"] == 1 and result["metrics"]["visual_tokens_after_ttm"] == 196


@pytest.mark.parametrize("limits, message", [
    (VideoLimits(max_file_bytes=1000), "the limit is 0 MB"),
    (VideoLimits(max_duration_s=1.0), "the limit is 0 min"),
    (VideoLimits(max_side=640), "each side must be between"),
    (VideoLimits(max_aspect_ratio=1.5), "wider than"),
    (VideoLimits(decode_timeout_s=0.001), "took over"),
    (VideoLimits(max_decode_pixels=1280 * 720 * 10), "million decoded pixels ("),
])
def test_limits_refuse_before_decoding(shared_videos, limits, message):
    with pytest.raises(VideoError, match=re.escape(message)) as error:
        load_video_isolated(shared_videos / "street_720p_3s.mp4", 4, limits)
    assert "\n" not in str(error.value)


def test_long_video_is_sampled_uniformly(shared_videos):
    clip = load_video_isolated(shared_videos / "big_buck_bunny_480p_30s.mp4", 4)
    assert clip.num_frames == 4 and clip.source_frames == 720
    assert clip.timestamps == pytest.approx([0.0, 239 / 24, 479 / 24, 719 / 24], abs=1e-3)  # truncated


@pytest.mark.parametrize("args, message", [
    (["--window", str(2**100)], "window (W) must be a power of two from 1 to 256"),
    (["--method", "random", "--seed", str(2**70)], "seed must be a whole number in 0..2**64-1"),
])
def test_huge_numbers_exit_1_with_one_line(shared_videos, args, message, capfd):
    video = str(shared_videos / "edge" / "white.mp4")
    assert main(["answer", video, "q", "--max-new-tokens", "2", *args]) == 1
    out, err = capfd.readouterr()
    assert out == "" and err.strip().splitlines() == [f"error: {err.strip()[7:]}"] and message in err, err


def test_path_too_long_exits_1_with_one_line(tmp_path, capfd):
    assert main(["answer", str(tmp_path / ("v" * 300 + ".mp4")), "q"]) == 1
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "too long for the file system" in err


def test_file_under_an_unreadable_folder_exits_1_with_one_line(tmp_path, capfd, monkeypatch):
    locked = tmp_path / "locked" / "clip.mp4"
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # what a folder without read permission gives (this test may run as root)
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert main(["answer", str(locked), "q"]) == 1
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "permission denied" in err


def test_the_app_refuses_every_hostile_file_and_keeps_serving(hostile_corpus, pipeline, shared_videos,
                                                              monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from conftest import serving
    from test_app import ask, assistant_texts, latest

    monkeypatch.setattr(pipeline, "video_limits", COSTLY)
    uploads = {label: path for label, path in hostile_corpus.items() if label not in CLIENT_SIDE_ONLY}
    with serving(pipeline) as (_, url):
        client = Client(url, verbose=False, download_files=False)
        refused = []
        for label, path in uploads.items():
            with pytest.raises(AppError) as caught:
                ask(client, str(path), "What is this?")
            message = str(caught.value)
            assert message.strip() and "Traceback" not in message and "\n" not in message.strip(), label
            refused.append(label)
        monkeypatch.undo()  # the default limits again, for the good request
        final = latest(ask(client, str(shared_videos / "street_720p_3s.mp4"), "What happens?"))
        client.close()
    assert assistant_texts(final["method_chat"]), "the app stopped answering after the hostile files"
    print(f"\napp: hostile files refused {len(refused)} of {len(uploads)}, then answered a good request")
