"""The CLI as a user runs it: a subprocess, the JSON contract, and one-line errors with exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dycoke.cli import main

METRIC_KEYS = {
    "decode_video_ms", "vision_ms", "compress_ms", "prefill_ms", "ttft_ms", "total_ms", "new_tokens",
    "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes", "visual_tokens_in", "visual_tokens_after_ttm",
    "visual_tokens_attended_mean", "reselections", "prefix_reused", "prefill_tokens", "stopped",
}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dycoke", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bunny_json(shared_videos):
    video = shared_videos / "big_buck_bunny_480p_30s.mp4"
    done = cli("answer", str(video), "What happens?", "--model", "tiny-random", "--method", "dycoke", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_json_follows_the_contract(bunny_json):
    assert set(bunny_json) == {"answer", "model", "method", "config", "metrics", "trace"}
    assert isinstance(bunny_json["answer"], str) and bunny_json["answer"].isprintable()
    assert (bunny_json["model"], bunny_json["method"]) == ("tiny-random", "dycoke")
    assert bunny_json["config"] == {"merge_ratio": 0.7, "window": 4, "prune_layer": 3, "prune_ratio": 0.7,
                                    "reselect_threshold": 0.9}
    metrics = bunny_json["metrics"]
    assert set(metrics) == METRIC_KEYS
    assert metrics["peak_memory_bytes"] is None
    assert all(isinstance(metrics[k], (int, float)) for k in METRIC_KEYS - {"peak_memory_bytes"})
    trace = bunny_json["trace"]
    assert set(trace) == {"frames", "frames_per_group", "tokens_per_frame", "frame_times_s", "ttm_kept_per_frame",
                          "ttm_keep_mask", "steps"}
    assert (trace["frames"], trace["frames_per_group"], trace["tokens_per_frame"]) == (32, 1, 196)
    assert len(trace["ttm_keep_mask"]) == 32 and all(len(row) == 196 for row in trace["ttm_keep_mask"])
    assert [sum(row) for row in trace["ttm_keep_mask"]] == trace["ttm_kept_per_frame"]
    assert len(trace["steps"]) == metrics["new_tokens"] - 1


def test_json_figures_for_the_bunny(bunny_json):
    metrics, trace = bunny_json["metrics"], bunny_json["trace"]
    assert metrics["visual_tokens_in"] == 6272
    assert metrics["visual_tokens_after_ttm"] == 2960
    assert metrics["visual_tokens_attended_mean"] == 888
    assert all(sum(step["kept_per_frame"]) == 888 for step in trace["steps"])
    assert metrics["reselections"] == sum(step["reselected"] for step in trace["steps"])
    # 720 frames at 24 fps sampled uniformly: frame i*719/31 rounded, at 1/24 s each.
    expected = [round(i * 719 / 31) / 24 for i in range(32)]
    assert trace["frame_times_s"] == pytest.approx(expected, abs=0.05)


def test_several_questions_are_one_conversation_printed_as_an_array(street, capsys):
    args = ["answer", street, "What is there?", "What colour is it?", "Where does it go?", "--frames", "4",
            "--max-new-tokens", "3", "--dtype", "float64", "--json"]
    assert main(args) == 0
    reused = json.loads(capsys.readouterr().out)
    assert main(args + ["--no-reuse"]) == 0
    recomputed = json.loads(capsys.readouterr().out)
    assert isinstance(reused, list) and len(reused) == 3
    assert all(set(turn["metrics"]) == METRIC_KEYS for turn in reused)
    assert [turn["metrics"]["prefix_reused"] for turn in reused] == [False, True, True]
    assert [turn["metrics"]["prefix_reused"] for turn in recomputed] == [False, False, False]
    assert [turn["answer"] for turn in recomputed] == [turn["answer"] for turn in reused]
    first, later = reused[0]["metrics"]["prefill_tokens"], [t["metrics"]["prefill_tokens"] for t in reused[1:]]
    # the first turn prefills DyCoke's 196 + 3 x 58 visual tokens of 4 frames and the prompt; a follow-up only
    # its own few dozen
    assert first > 196 + 3 * 58 and all(tokens < 60 for tokens in later)
    assert [t["metrics"]["prefill_tokens"] for t in recomputed][1:] == [
        first + sum(later[:i + 1]) for i in range(2)]


def test_plain_output_streams_the_answer_and_says_what_tiny_knows(shared_videos):
    done = cli("answer", str(shared_videos / "street_720p_3s.mp4"), "What is there?", "--frames", "4",
               "--max-new-tokens", "8", "--ignore-eos")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.rstrip("\n")) >= 1
    assert "trained on synthetic clips of shapes" in done.stderr
    done = cli("answer", str(shared_videos / "street_720p_3s.mp4"), "What is there?", "--frames", "4",
               "--max-new-tokens", "2", "--model", "tiny-random")
    assert done.returncode == 0 and "random weights" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["/no/such/video.mp4", "q"], "not found"),
    (["{edge}/bipbop_audioinit.mp4", "q"], "no video stream"),
    (["{edge}/short-cenc.mp4", "q"], "cannot be decoded"),
    (["{edge}/white.mp4", "   "], "question is empty"),
    (["{edge}/white.mp4", "q", "--merge-ratio", "1.5"], "merge_ratio"),
    (["{edge}/white.mp4", "q", "--window", "3"], "power of two"),
    (["{edge}/white.mp4", "q", "--prune-layer", "6"], "prune_layer"),
    (["{edge}/white.mp4", "q", "--threshold", "2"], "reselect_threshold"),
    (["{edge}/white.mp4", "q", "--frames", "0"], "frames"),
    (["{edge}/white.mp4", "q", "--max-new-tokens", "100000"], "max new tokens"),
    (["{edge}/white.mp4", "x " * 1500], "limit is 512"),  # over 512 tokens, within the character cap
    (["{edge}/white.mp4", "x" * 5000], "limit is 512"),  # over the character cap, refused before tokenizing
])
def test_bad_input_exits_1_with_one_line(shared_videos, args, message, capfd):
    args = [arg.replace("{edge}", str(shared_videos / "edge")) for arg in args]
    assert main(["answer", *args]) == 1
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_text_file_renamed_mp4_exits_1_without_traceback(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n")
    done = cli("answer", str(fake), "q")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "not a readable video" in done.stderr and "Traceback" not in done.stderr


def test_edge_videos_that_must_answer(shared_videos, capfd):
    for name in ("minimal.mp4", "white.mp4", "video_rotation_90.mp4"):
        code = main(["answer", str(shared_videos / "edge" / name), "What is it?", "--max-new-tokens", "4", "--json"])
        out, err = capfd.readouterr()
        assert code == 0, (name, err)
        result = json.loads(out)
        if name != "white.mp4":
            assert result["trace"]["frames"] == 1
            assert result["metrics"]["visual_tokens_after_ttm"] == 196  # one frame: TTM keeps everything


@pytest.mark.parametrize("args", [[], ["answer"], ["answer", "v.mp4"], ["answer", "v.mp4", "q", "--method", "x"],
                                  ["answer", "v.mp4", "q", "--frames", "many"]])
def test_usage_errors_exit_2(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2


def test_console_script_is_installed():
    if shutil.which("dycoke") is None:
        pytest.skip("the package is not pip-installed here, so the `dycoke` script is absent")
    assert subprocess.run(["dycoke", "answer", "--help"], capture_output=True).returncode == 0
