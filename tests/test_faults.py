"""Injected faults: a generation step raises, or runs out of memory. The caller gets one clear error, nothing
leaks (threads, the request's tensors), and the next request gives the answer a clean run gives."""

from __future__ import annotations

import gc
import logging
import sys
import threading
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from dycoke.config import DyCokeConfig
from dycoke.limits import RequestError
from dycoke.pipeline import Pipeline, Result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py sits at the repository root, outside the installed package

QUESTION = "What moves in this video?"
NEW_TOKENS = 5
FAULTS = {  # what the injected step raises, and what the caller must see
    "cuda out of memory": (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                           RequestError, r"^out of memory at 8 frames: use fewer frames"),
    "host out of memory": (lambda: MemoryError(), RequestError, r"^out of memory at 8 frames: use fewer frames"),
    "any other fault": (lambda: RuntimeError("injected fault in a decoding step"), RuntimeError,
                        r"^injected fault in a decoding step$"),
}


def run(pipeline: Pipeline, clip, method: str = "dycoke") -> Result:
    return pipeline.answer(clip, QUESTION, method=method, config=DyCokeConfig(prune_layer=2),
                           max_new_tokens=NEW_TOKENS, ignore_eos=True)


def generate_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "dycoke-generate"]


class FailOnce:
    """Replaces DynamicCache.update (every method's cache, DyCoke's included, goes through it) so that its
    `at`-th call raises `make()` once: a fault in the middle of generate, in the generate thread."""

    def __init__(self, make, at: int = 6) -> None:
        self.make, self.at, self.calls, self.fired = make, at, 0, False
        self.caches: list[weakref.ref] = []
        self.original = DynamicCache.update

    def install(self, monkeypatch) -> "FailOnce":
        def update(cache, *args, **kwargs):  # a function, so that it binds to the cache like a method
            self.calls += 1
            if not self.fired and self.calls == self.at:
                self.fired = True
                self.caches.append(weakref.ref(cache))
                raise self.make()
            return self.original(cache, *args, **kwargs)

        monkeypatch.setattr(DynamicCache, "update", update)
        return self


# --- the library -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("method", ["dycoke", "baseline"])
def test_a_fault_in_generation_reaches_the_caller_and_the_next_request_works(pipeline, clip8, monkeypatch,
                                                                             fault, method):
    clean = run(pipeline, clip8, method)
    threads_before = threading.active_count()
    make, expected_type, expected_message = FAULTS[fault]
    failing = FailOnce(make).install(monkeypatch)

    with pytest.raises(expected_type, match=expected_message) as caught:
        run(pipeline, clip8, method)
    assert failing.fired
    if expected_type is RequestError:
        assert "\n" not in str(caught.value) and caught.value.__context__ is None
    del caught
    gc.collect()
    assert not generate_threads(), "the generate thread outlived the failed request"
    assert threading.active_count() <= threads_before  # other tests' servers may still be winding down
    if expected_type is RequestError:  # out of memory: the request's KV cache is released, not held by the error
        assert failing.caches[0]() is None, "the failed request's KV cache is still alive"

    again = run(pipeline, clip8, method)  # the patch is still there, but fires only once
    assert again.token_ids == clean.token_ids and again.answer == clean.answer
    assert again.trace["steps"] == clean.trace["steps"]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), MemoryError()],
                         ids=["cuda", "host"])
def test_out_of_memory_while_encoding_frames_says_use_fewer_frames(pipeline, clip8, monkeypatch, error):
    clean = run(pipeline, clip8)
    original = Pipeline._vision_features

    def out_of_memory(self, *args, **kwargs):
        monkeypatch.setattr(Pipeline, "_vision_features", original)  # once
        raise error

    monkeypatch.setattr(Pipeline, "_vision_features", out_of_memory)
    with pytest.raises(RequestError, match="^out of memory at 8 frames: use fewer frames") as caught:
        run(pipeline, clip8)
    assert caught.value.__context__ is None  # the error holds no traceback of the tensors' frames
    assert not generate_threads()
    assert run(pipeline, clip8).token_ids == clean.token_ids


def test_out_of_memory_empties_the_cuda_cache(pipeline, monkeypatch):
    """On CUDA the allocator's cached blocks go back to the device (checked here without a GPU)."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline, "loaded", type("Loaded", (), {"device": torch.device("cuda")})())
    error = pipeline._out_of_memory(16)
    assert emptied == [True]
    assert str(error) == "out of memory at 16 frames: use fewer frames (or fewer new tokens) and ask again"


@pytest.mark.parametrize("stop", ["close", "drop", "raise in the consumer"])
def test_the_generate_thread_is_joined_when_the_consumer_stops_early(pipeline, clip8, stop):
    threads_before = threading.active_count()
    events = pipeline.stream(clip8, QUESTION, max_new_tokens=40, ignore_eos=True)
    if stop == "close":
        next(events)
        assert generate_threads()
        events.close()
    elif stop == "drop":
        next(events)
        del events
        gc.collect()
    else:
        with pytest.raises(KeyError):
            for _ in events:
                raise KeyError("the consumer failed")
        events.close()
    assert not generate_threads()
    assert threading.active_count() <= threads_before  # other tests' servers may still be winding down


# --- the app -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_app(pipeline):
    from conftest import serving

    with serving(pipeline) as served:
        yield served


def method_answer(client, video: str) -> str:
    from gradio_client import handle_file

    import app
    from test_app import FAST, assistant_texts, latest

    client.predict(api_name="/clear")  # a new conversation: the same question again is no follow-up
    job = client.submit(video=handle_file(video), question=QUESTION, api_name="/ask",
                        **(FAST | {"compare": "none", "max_new_tokens": NEW_TOKENS}))
    outputs = [dict(zip(app.OUTPUTS, output)) for output in job]
    job.result(timeout=120)
    return assistant_texts(latest(outputs)["method_chat"])[-1]


@pytest.mark.parametrize("fault, expected", [
    ("cuda out of memory", "dycoke: Out of memory at 8 frames: use fewer frames"),
    ("any other fault", r"dycoke: something went wrong \(error [0-9a-f]{8}\)\. Try again, with fewer frames"),
])
def test_the_user_sees_an_error_and_the_next_request_succeeds(served_app, street, monkeypatch, caplog, fault,
                                                               expected):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served_app[1], verbose=False, download_files=False)
    clean = method_answer(client, street)
    failing = FailOnce(FAULTS[fault][0]).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dycoke.app"):
        with pytest.raises(AppError, match=expected) as caught:
            method_answer(client, street)
    assert failing.fired
    message = str(caught.value)
    assert "Traceback" not in message and "injected" not in message and "/" not in message
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert QUESTION not in logged and street not in logged and Path(street).name not in logged
    assert "request " in logged  # each request is logged, by hash
    if fault == "any other fault":  # the error's reference is in the log, with the fault's type and place
        reference = message.split("(error ")[1][:8]
        assert f"request {reference}: dycoke failed with RuntimeError" in logged
    assert method_answer(client, street) == clean  # the queue moves on, and the next answer is the clean one
    assert not generate_threads()


def raw_ask(url: str, file_data: dict) -> str:
    """/ask over plain HTTP, the FileData exactly as given (gradio_client would upload a local path instead)."""
    import json

    import app
    from test_app import FAST, api_values

    data = api_values(url, **(FAST | {"compare": "none", "max_new_tokens": 2, "video": file_data,
                                      "question": QUESTION, "state": app.empty_state()}))
    request = urllib.request.Request(f"{url}gradio_api/call/ask", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=10).read())["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/ask/{event}", timeout=60).read().decode()


def test_no_endpoint_takes_a_path_on_the_server(served_app, street):
    """The API's only file input is the video upload. A FileData naming a server path is refused by gradio, and
    the handler itself refuses any path outside the upload folder before looking at it; gradio's file route
    serves nothing outside its upload folder."""
    from gradio_client import Client

    import app

    demo, url = served_app
    client = Client(url, verbose=False, download_files=False)
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/ask", "/regenerate", "/stop", "/clear"} and not api["unnamed_endpoints"]
    file_inputs = sorted((name, p["parameter_name"]) for name, endpoint in api["named_endpoints"].items()
                         for p in endpoint["parameters"] if p["python_type"]["type"] == "filepath")
    assert file_inputs == [("/ask", "video"), ("/regenerate", "video")]

    for target in [street, "/etc/passwd", str(ROOT / "app.py"), "/no/such/file.mp4"]:
        answer = raw_ask(url, {"path": target, "meta": {"_type": "gradio.FileData"}})
        assert answer.startswith("event: error"), (target, answer[:200])
        assert not demo.dycoke.is_upload(target)
    with pytest.raises(Exception, match="paths on the server are not accepted"):
        list(demo.dycoke.ask(street, QUESTION, "dycoke", "none", 8, 2, True, None, progress=lambda *a, **k: None))
    assert demo.dycoke.is_upload(str(Path(demo.GRADIO_CACHE) / "abc" / "clip.mp4"))
    assert not demo.dycoke.is_upload(str(Path(demo.GRADIO_CACHE) / ".." / "escape.mp4"))
    for target in ["/etc/passwd", str(ROOT / "app.py"), street]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}gradio_api/file={target}", timeout=10)
        assert refused.value.code == 403
    assert demo.max_file_size == 200 * 1024 * 1024 and demo.delete_cache == app.DELETE_CACHE
    assert not demo.allowed_paths
