"""The Gradio app, in-process with the tiny model, driven through gradio_client like a remote user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py sits at the repository root, outside the installed package

import app  # noqa: E402
from dycoke.config import DyCokeConfig  # noqa: E402
from dycoke.methods import matchable_names  # noqa: E402
from dycoke.models import ModelLoadError  # noqa: E402
from dycoke.video import VideoClip  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from conftest import free_port, serving  # noqa: E402

SKIPPED = {"__type__": "update"}  # what the client receives for an output the handler left alone (gr.skip())
FAST = dict(method="dycoke", compare="baseline", merge_ratio=0.7, window=4, prune_layer=3, prune_ratio=0.7,
            threshold=0.9, num_frames=8, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def served(pipeline):
    with serving(pipeline) as served_app:
        yield served_app


@pytest.fixture()
def client(served):
    return Client(served[1], verbose=False, download_files=False)


@pytest.fixture()
def decode_calls(served, monkeypatch):
    """Counts the pipeline's video decodes."""
    pipeline = served[0].dycoke.pipeline
    calls = []
    original = pipeline.load_video

    def counting(path, num_frames=32):
        calls.append((path, num_frames))
        return original(path, num_frames)

    monkeypatch.setattr(pipeline, "load_video", counting)
    return calls


def ask(client: Client, video: str | None, question: str, **overrides) -> list[dict]:
    """Submit one question, iterate the streamed job, and return each output as {name: value}."""
    job = client.submit(video=None if video is None else handle_file(video), question=question,
                        api_name="/ask", **(FAST | overrides))
    outputs = [dict(zip(app.OUTPUTS, output)) for output in job]
    job.result()  # raises AppError where the handler raised gr.Error
    return outputs


def api_values(url: str, **values) -> list:
    """/ask's positional data for a raw HTTP call: each API parameter's value from `values`, else its default
    (the order as the server's API description gives it, so that the test follows the app's settings)."""
    api = Client(url, verbose=False, download_files=False).view_api(return_format="dict", print_info=False)
    parameters = api["named_endpoints"]["/ask"]["parameters"]
    return [values[p["parameter_name"]] if p["parameter_name"] in values else p["parameter_default"]
            for p in parameters]


def latest(outputs: list[dict]) -> dict:
    """What the page shows at the end: each output's last value that was not skipped."""
    shown = {}
    for output in outputs:
        shown.update({name: value for name, value in output.items() if value != SKIPPED})
    return shown


def assistant_texts(chat) -> list[str]:
    if chat == SKIPPED or not chat:
        return []
    texts = []
    for message in chat:
        if message["role"] != "assistant":
            continue
        content = message["content"]
        texts.append(content if isinstance(content, str) else "".join(part.get("text", "") for part in content))
    return texts


def user_texts(chat) -> list[str]:
    return [part["text"] for message in chat if message["role"] == "user" for part in message["content"]]


def figure(value) -> dict:
    assert isinstance(value, dict) and value["type"] == "plotly"
    return json.loads(value["plot"])


def has_grid(value) -> bool:
    """Whether an output is a step heatmap (not skipped, not a placeholder figure)."""
    return value != SKIPPED and any(trace["type"] == "heatmap" and trace.get("name") == "kept"
                                    for trace in figure(value)["data"])


def heatmap_z(value) -> np.ndarray:
    """The grid's cells as the share of each frame's tokens kept (the figure holds counts out of 196)."""
    grids = [trace for trace in figure(value)["data"] if trace["type"] == "heatmap" and trace["name"] == "kept"]
    assert len(grids) == 1
    return np.array([[np.nan if cell is None else cell / 196 for cell in row] for row in grids[0]["z"]], dtype=float)


# --- the main flow -----------------------------------------------------------------------------------------


def test_answers_stream_then_follow_up_reuses_the_decoded_frames(served, client, street, decode_calls):
    outputs = ask(client, street, "What happens in this video?")
    final = latest(outputs)

    # Streaming: partial answers for both panes arrive before the final outputs.
    partial_comparison = [o for o in outputs[:-1] if assistant_texts(o["comparison_chat"])]
    # While the comparison runs, the method's pane says it waits for it; then it streams its own answer.
    assert assistant_texts(outputs[0]["method_chat"]) == [app.WAITING]
    partial_method = [o for o in outputs[:-1] if assistant_texts(o["method_chat"])
                      and assistant_texts(o["method_chat"])[-1] != app.WAITING]
    assert len(outputs) >= 4, f"expected several streamed outputs, got {len(outputs)}"
    assert partial_comparison and partial_method
    comparison_answer = assistant_texts(final["comparison_chat"])[-1]
    method_answer = assistant_texts(final["method_chat"])[-1]
    assert comparison_answer and method_answer
    first_partial = assistant_texts(partial_method[0]["method_chat"])[-1]
    assert method_answer.startswith(first_partial) and len(first_partial) <= len(method_answer)

    # A heatmap arrives while the method streams, its TTM column still pending (None).
    # (Before it, the pane shows a placeholder while it waits for the comparison: a figure with no grid.)
    live = [o["method_heatmap"] for o in outputs[:-1] if has_grid(o["method_heatmap"])]
    assert live and np.isnan(heatmap_z(live[0])[:, 0]).all()

    # Final heatmaps: frames × (TTM + one column per decoding step after the first token), values in 0..1.
    for pane in ("comparison_heatmap", "method_heatmap"):
        z = heatmap_z(final[pane])
        assert z.shape == (8, 1 + FAST["max_new_tokens"] - 1)
        assert not np.isnan(z).any() and ((0 <= z) & (z <= 1)).all()
    assert (heatmap_z(final["comparison_heatmap"]) == 1).all()  # the baseline attends to everything
    method_z = heatmap_z(final["method_heatmap"])
    assert method_z[0, 0] == 1 and (method_z[1:4, 0] < 1).all()  # TTM: W=4, frame 0 is the window's reference
    assert (method_z[:, 1:] < 1).all()  # DP attends to a subset at every step

    # Gauges for both sides, the comparison marked on the method's bars; a headline; the TTM view is one image.
    names = {trace.get("name") for trace in figure(final["gauges"])["data"]}
    assert {"baseline/ttft_ms", "dycoke/ttft_ms", "dycoke/decode_tokens_per_s", "dycoke/visual_attended"} <= names
    assert final["headline"].startswith("**dycoke vs baseline: ") and "single run" in final["headline"]
    assert [trace["type"] for trace in figure(final["ttm_view"])["data"]] == ["image"]
    assert "`baseline`" in final["comparison_header"] and "`dycoke`" in final["method_header"]
    assert "merge ratio K 0.70" in final["method_header"] and "8 frames" in final["method_header"]

    # The run's numbers to download: both results in the CLI's JSON contract.
    download = final["download"]
    path = download["value"]["path"] if isinstance(download.get("value"), dict) else download["value"]
    run = json.loads(Path(path).read_text())
    # Written into gradio's cache, where it is served as it is and `delete_cache` removes it.
    assert Path(path).resolve().is_relative_to(Path(served[0].GRADIO_CACHE).resolve())
    assert set(run) == {"comparison", "method"}
    assert run["method"]["answer"] == method_answer and run["comparison"]["method"] == "baseline"
    assert set(run["method"]) == {"answer", "model", "method", "config", "metrics", "trace"}
    assert "TTFT" in final["comparison_stats"] and "TTFT" in final["method_stats"]
    assert "Decoded 8 frames" in final["status"]
    assert final["question"] == ""
    assert len(decode_calls) == 1

    # A follow-up about the same video: no second decode, and both panes keep the conversation.
    follow = latest(ask(client, street, "And then?"))
    assert len(decode_calls) == 1, "the follow-up decoded the video again"
    assert "Reused the 8 decoded frames" in follow["status"]
    assert "Turn 2: the model sees the 1 earlier turn" in follow["status"]
    # Both panes continue their conversation: the video prefix is reused, only the new turn is prefilled.
    assert "video prefix reused" in follow["method_stats"] and "video prefix reused" in follow["comparison_stats"]
    assert user_texts(follow["method_chat"]) == ["What happens in this video?", "And then?"]
    assert user_texts(follow["comparison_chat"]) == ["What happens in this video?", "And then?"]
    assert len(assistant_texts(follow["method_chat"])) == 2


def test_non_video_upload_is_an_error_and_the_app_keeps_serving(client, street, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a video\n")
    with pytest.raises(AppError) as caught:
        ask(client, str(notes), "What happens?")
    message = str(caught.value)
    assert message.startswith("The uploaded video is not a readable video") and "MP4" in message
    assert "/gradio/" not in message and "notes.txt" not in message, "a path or file name is in the message"

    audio_only = Path(street).parent / "edge" / "bipbop_audioinit.mp4"
    if audio_only.is_file():
        with pytest.raises(AppError, match="has no video stream"):
            ask(client, str(audio_only), "What happens?")

    final = latest(ask(client, street, "What happens?"))
    assert assistant_texts(final["method_chat"]) and assistant_texts(final["comparison_chat"])


@pytest.mark.parametrize(
    ("video", "question", "overrides", "expected"),
    [
        (None, "What happens?", {}, "No video yet"),
        ("street", "   \t ", {}, "empty"),
        # Out-of-range controls are refused by gradio itself, with the allowed values.
        ("street", "What happens?", {"window": 3}, r"not in the list of choices: \[1, 2, 4, 8\]"),
        ("street", "What happens?", {"prune_layer": 7}, "greater than maximum value 3"),
        ("street", "What happens?", {"method": "nope"}, "nope is not in the list of choices"),
    ],
)
def test_bad_input_gets_an_error_that_says_what_to_do(client, street, video, question, overrides, expected):
    with pytest.raises(AppError, match=expected):
        ask(client, street if video == "street" else video, question, **overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"window": 3}, r"Bad setting: window \(W\) must be a power of two"),
        ({"prune_layer": 4}, r"prune_layer \(L\) must be in 1..3 for this model"),
        ({"num_frames": 12}, r"frames must be one of \[8, 16, 32, 64\]"),
        ({"max_new_tokens": 0}, "max new tokens must be an integer"),
        ({"method": "nope"}, "Unknown method 'nope'"),
        ({"compare": "nope"}, "Unknown comparison 'nope'"),
    ],
)
def test_settings_are_checked_behind_the_controls(served, overrides, expected):
    """What gets past gradio's own checks (the API, or a model with fewer layers) still gets a clear error."""
    import gradio as gr

    settings = {key: value for key, value in (FAST | overrides).items() if key != "ignore_eos"}
    with pytest.raises(gr.Error, match=expected):
        served[0].dycoke._settings(**settings)


def test_settings_become_plain_numbers(served):
    settings = served[0].dycoke._settings(**(
        {key: value for key, value in FAST.items() if key != "ignore_eos"}
        | {"prune_layer": 2.0, "window": "4", "num_frames": 8.0, "max_new_tokens": 8.0}))
    config = settings.config
    assert type(config.prune_layer) is int and type(config.window) is int and config.prune_layer == 2
    assert type(settings.num_frames) is int and type(settings.max_new_tokens) is int
    assert type(config.merge_ratio) is float
    assert [method.name for method in settings.methods.values()] == ["baseline", "dycoke"]


def test_peers_match_dycokes_budget_unless_switched_off(served):
    handlers = served[0].dycoke
    base = {key: value for key, value in FAST.items() if key != "ignore_eos"} | {"method": "fastv", "fastv_ratio": 0.2}
    matched = handlers._settings(**base).methods["method"]
    assert matched.match == "dycoke" and matched.budget(DyCokeConfig(), 8, 196).attended == 222  # 8 frames, by hand
    own = handlers._settings(**base, match_budget=False).methods["method"]
    assert own.match is None and own.ratio == 0.2


@pytest.mark.parametrize(("method", "compare", "match", "expected"), [
    ("dycoke", "baseline", True, {"merge_ratio", "window", "prune_layer", "prune_ratio", "reselect_threshold"}),
    ("ttm", "none", True, {"merge_ratio", "window"}),
    ("baseline", "none", True, set()),
    ("fastv", "baseline", False, {"fastv_layer", "fastv_ratio"}),
    # Matched to DyCoke, a peer's own ratio is set by DyCoke's budget, which its K, W and P set.
    ("fastv", "baseline", True, {"fastv_layer", "merge_ratio", "window", "prune_ratio"}),
    ("random", "none", False, {"drop_ratio", "seed"}),
    ("visionzip", "dp", False, {"visionzip_dominant", "visionzip_contextual", "prune_layer", "prune_ratio",
                                "reselect_threshold"}),
])
def test_the_settings_panel_shows_exactly_the_selected_methods_knobs(method, compare, match, expected):
    match_switch, *knobs = app.shown_controls(method, compare, match)
    shown = {knob.name for knob, update in zip(app.all_knobs(), knobs) if update["visible"]}
    assert shown == expected
    assert match_switch["visible"] == (method in matchable_names() or compare in matchable_names())


def test_labels_on_the_page_name_each_knob_once(served):
    labels = [c["props"].get("label") for c in served[0].config["components"] if c["props"].get("label")]
    knob_labels = [knob.label for knob in app.all_knobs()]
    assert all(labels.count(label) == 1 for label in knob_labels)
    header = app.pane_header("Method", app.get_method("fastv"), DyCokeConfig(), 8, 8, 196)
    assert "FastV layer 2" in header and " K " not in header.replace("merge ratio K", "")


def test_a_non_video_upload_gets_the_apps_message_when_it_arrives(served, tmp_path, monkeypatch):
    handlers = served[0].dycoke
    monkeypatch.setattr(handlers, "upload_roots", (tmp_path.resolve(),))
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a video\n")
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not an mp4 at all" * 100)
    for path in (notes, fake):
        shown = dict(zip(app.OUTPUTS, handlers.new_video(str(path))))
        assert "The uploaded video is not a readable video" in shown["error"], shown["error"]
        assert path.name not in shown["error"]
        assert str(tmp_path) not in shown["error"]
    video = tmp_path / "ok.mp4"
    video.write_bytes((app.EXAMPLES_DIR / "change.mp4").read_bytes())
    shown = dict(zip(app.OUTPUTS, handlers.new_video(str(video))))
    assert shown["error"] == "" and "New conversation about `ok.mp4`" in shown["status"]


def test_a_512_step_64_frame_run_streams_updates_under_100_kb(client, street):
    outputs = ask(client, street, "Describe it.", compare="none", num_frames=64, max_new_tokens=512)
    live = [output for output in outputs[:-1] if output["method_heatmap"] != SKIPPED]
    assert len(live) >= 3, "expected several live heatmap updates"
    sizes = [len(json.dumps(output).encode()) for output in outputs[:-1]]
    assert max(sizes) < 100_000, f"largest live update {max(sizes):,} bytes"
    final = heatmap_z(latest(outputs)["method_heatmap"])
    # 511 decoding steps: 5 per column, 103 columns, after the TTM column; every cell drawn.
    assert final.shape == (64, 1 + 103) and not np.isnan(final).any()


def test_stop_keeps_the_partial_answer_and_regenerate_asks_again(client, street):
    settings = FAST | {"compare": "none", "max_new_tokens": 400}
    job = client.submit(video=handle_file(street), question="Tell me everything.", api_name="/ask", **settings)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not job.done():
        if any(assistant_texts(dict(zip(app.OUTPUTS, output))["method_chat"]) for output in job.outputs()):
            break
        time.sleep(0.05)
    client.predict(api_name="/stop")
    final = latest([dict(zip(app.OUTPUTS, output)) for output in job])
    job.result()
    stopped = assistant_texts(final["method_chat"])[-1]
    assert stopped.endswith("(stopped)") and "Stopped" in final["status"]
    assert not [thread for thread in threading.enumerate() if thread.name == "dycoke-generate"]

    regenerated = latest([dict(zip(app.OUTPUTS, output)) for output in client.submit(
        video=handle_file(street), api_name="/regenerate", **(settings | {"max_new_tokens": 6}))])
    assert user_texts(regenerated["method_chat"]) == ["Tell me everything."]
    assert not assistant_texts(regenerated["method_chat"])[-1].endswith("(stopped)")


def test_compare_none_runs_the_method_alone(client, street, decode_calls):
    final = latest(ask(client, street, "What happens?", compare="none", method="ttm"))
    assert assistant_texts(final["method_chat"])
    assert "comparison_chat" not in final or not assistant_texts(final["comparison_chat"])
    names = {trace.get("name") for trace in figure(final["gauges"])["data"]}
    assert "ttm/ttft_ms" in names and not any(trace["type"] == "scatter" for trace in figure(final["gauges"])["data"])
    assert "`ttm`" in final["method_header"] and "merge ratio K 0.70 · window W 4" in final["method_header"]
    assert "prune ratio P" not in final["method_header"]  # ttm does not prune
    assert "no comparison" in final["headline"]


def test_no_page_load_handler_writes_what_an_upload_writes(served):
    """What the page shows first is in its components' values: a page-load handler writing the status line
    would race an upload's check, and, answered late, overwrite what the upload said (seen once in a browser)."""
    demo = served[0]
    upload = next(fn for fn in demo.fns.values() if any(getattr(demo.blocks.get(block), "elem_id", None) == "video"
                                                       and event == "change" for block, event in fn.targets))
    written_by_upload = {id(block) for block in upload.outputs}
    for fn in demo.fns.values():
        if any(event == "load" for _, event in fn.targets):
            assert not written_by_upload & {id(block) for block in fn.outputs}, [b.elem_id for b in fn.outputs]
    config = {block["id"]: block["props"] for block in demo.config["components"]}
    shown = config[next(b._id for b in upload.outputs if b.elem_id == "method-heatmap")]["value"]
    assert "The per-step heatmap appears here." in shown["plot"]


class FakeResult:
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def to_dict(self) -> dict:
        return {"answer": self.answer}


def test_a_page_holds_one_run_file_in_gradios_cache_and_closing_it_removes_it(served):
    demo, handlers = served[0], served[0].dycoke
    page, other = SimpleNamespace(session_hash="page-one"), SimpleNamespace(session_hash="page-two")
    first = Path(handlers._run_file({"method": FakeResult("one")}, page.session_hash, "aaaa"))
    second = Path(handlers._run_file({"method": FakeResult("two")}, page.session_hash, "bbbb"))
    theirs = Path(handlers._run_file({"method": FakeResult("three")}, other.session_hash, "cccc"))
    assert second.resolve().is_relative_to(Path(demo.GRADIO_CACHE).resolve())
    assert "page-one" not in str(second)  # the session hash is the page's key; it never names a file
    assert not first.exists() and json.loads(second.read_text()) == {"method": {"answer": "two"}}
    assert [path.name for path in second.parent.iterdir()] == [second.name]
    handlers.end_page(page)
    assert not second.exists() and not second.parent.exists()
    assert theirs.exists()  # another page's file stays
    handlers.end_page(other)
    assert not theirs.exists()


def test_clear_resets_the_conversation(client, street):
    ask(client, street, "What happens?")
    cleared = dict(zip(app.OUTPUTS, client.predict(api_name="/clear")))
    assert cleared["method_chat"] == [] and cleared["comparison_chat"] == []
    final = latest(ask(client, street, "Again?"))
    assert user_texts(final["method_chat"]) == ["Again?"]


# --- pieces -------------------------------------------------------------------------------------------------


def test_server_side_settings_only(served):
    config = served[0].config
    labels = {component.get("props", {}).get("label") for component in config["components"]}
    assert "Method (right pane)" in labels and not any(label and "model" in label.lower() for label in labels)
    on_gpu = [fn for fn in served[0].fns.values() if fn.concurrency_id == app.GPU_QUEUE]
    # Enter, Send and Regenerate: REQUEST_SLOTS requests validate and decode at once; the model runs one at a time
    assert len(on_gpu) == 3 and all(fn.concurrency_limit == app.REQUEST_SLOTS for fn in on_gpu)
    assert {fn.name for fn in on_gpu} == {"ask", "regenerate"}
    assert served[0]._queue.max_size == app.QUEUE_MAX_SIZE


def clip_of(num_frames: int, side: int = 8) -> VideoClip:
    frames = np.zeros((num_frames, side, side, 3), dtype=np.uint8)
    return VideoClip(frames=frames, timestamps=tuple(range(num_frames)), source_frames=num_frames, fps=1.0)


def test_clip_cache_is_lru_bounded_by_count_and_bytes():
    cache = app.ClipCache(max_items=2, max_bytes=10_000)
    cache.put("a", clip_of(1))
    cache.put("b", clip_of(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", clip_of(1))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("big", clip_of(60))  # 11,520 bytes: over budget alone, still kept as the newest
    assert len(cache) == 1 and cache.get("big") is not None


def test_clip_cache_key_names_the_file_its_size_and_the_frame_count(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"1")
    first = app.ClipCache.key(str(path), 8)
    assert first != app.ClipCache.key(str(path), 16)
    path.write_bytes(b"22")
    assert first != app.ClipCache.key(str(path), 8)


def test_fallback_to_tiny_with_a_banner(tiny_random, monkeypatch):
    def fake_load(name, device=None):
        if name == app.OFFLINE_DEFAULT:
            return tiny_random
        raise ModelLoadError(f"could not load model '{name}': no network")

    monkeypatch.setattr(app, "load", fake_load)
    choice = app.load_model("llava-hf/some-model")
    assert choice.loaded is tiny_random and "no network" in choice.fallback_reason
    banner = app.banner_markdown(choice)
    assert "tiny random weights" in banner and "random demo weights" in banner
    assert "`llava-hf/some-model`" in banner and "`cpu`" in banner and "`float32`" in banner

    def broken(name, device=None):
        raise ModelLoadError("could not load model 'tiny': broken")

    monkeypatch.setattr(app, "load", broken)
    with pytest.raises(ModelLoadError):  # no fallback from the fallback
        app.load_model(app.OFFLINE_DEFAULT)


def test_model_runs_are_wrapped_in_spaces_gpu_when_spaces_is_importable(pipeline, monkeypatch):
    wrapped = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):  # noqa: N802 - the real decorator's name
            def decorate(fn):
                wrapped.append((fn.__name__, duration))
                return fn
            return decorate

    monkeypatch.setattr(app, "spaces", FakeSpaces)
    app.DyCokeApp(pipeline, banner="")
    assert wrapped == [("_model_runs", app.ZERO_GPU_DURATION_S)]
    monkeypatch.setattr(app, "spaces", None)
    assert app.gpu(len) is len


def test_headers_show_only_the_knobs_a_method_uses():
    config = DyCokeConfig()
    line = app.viz.settings_line
    assert line(app.get_method("baseline"), config, 32, 64, 196) == "no compression · 32 frames · ≤64 new tokens"
    assert line(app.get_method("dycoke"), config, 32, 64, 196).startswith(
        "merge ratio K 0.70 · window W 4 · pruning layer L 3 · prune ratio P 0.70 · reselect threshold τ 0.90")
    assert line(app.get_method("dp"), config, 8, 16, 196).startswith("pruning layer L 3 · prune ratio P 0.70")
    # random matches DyCoke by default: at 32 frames DyCoke attends 888 of 6,272 tokens, a drop ratio of 0.86.
    assert line(app.get_method("random"), config, 32, 64, 196).startswith(
        "drop ratio 0.86 · random seed 0 · matched to dycoke's budget")
    assert "none" in app.pane_header("Comparison", None, config, 8, 8, 196)


def test_arguments_and_environment(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("DYCOKE_MODEL", raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, app.DEFAULT_HUB_ID)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9001")
    monkeypatch.setenv("DYCOKE_MODEL", "tiny")
    args = app.parse_args([])
    assert (args.port, args.model) == (9001, "tiny")
    args = app.parse_args(["--port", "9002", "--host", "0.0.0.0", "--model", "ov-0.5b"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 9002, "ov-0.5b")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit):
        app.parse_args([])


def test_spacefile_runs_the_app_on_port_with_the_model_preset():
    manifest = yaml.safe_load((ROOT / "Spacefile").read_text())
    assert manifest["v"] == 0 and len(manifest["micros"]) == 1
    micro = manifest["micros"][0]
    assert micro["engine"].startswith("python") and "python app.py" in micro["run"] and "$PORT" in micro["run"]
    presets = {env["name"]: env for env in micro["presets"]["env"]}
    assert presets["DYCOKE_MODEL"]["default"] == app.DEFAULT_HUB_ID


def test_python_app_py_serves_and_falls_back_to_tiny(tmp_path):
    """`python app.py` with a model that cannot load: it logs why, serves, and shows the random-weights banner."""
    port = free_port()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "DYCOKE_MODEL": str(tmp_path / "no-such-model")}
    log = (tmp_path / "app.log").open("w+")
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        config = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as response:
                    config = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        log.seek(0)
        output = log.read()
        assert config is not None, f"the app did not come up:\n{output}"
        values = " ".join(str(c.get("props", {}).get("value")) for c in config["components"])
        assert "trained on synthetic clips of shapes" in values and "fell back" in values
        assert "falling back to the tiny model" in output and "no-such-model" in output
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
