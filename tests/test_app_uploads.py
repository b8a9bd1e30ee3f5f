"""The app's upload and error paths, through its HTTP API as an API-only client would use them."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from conftest import serving  # noqa: E402

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import FAST, api_values, ask, assistant_texts, latest  # noqa: E402

@pytest.fixture(scope="module")
def served(pipeline):
    with serving(pipeline) as served_app:
        yield served_app


def raw_call(url: str, **arguments) -> tuple[str, object]:
    """POST /gradio_api/call/ask with exactly these JSON values, then read the event stream: (event, data)."""
    values = FAST | {"question": "What happens?", "state": None} | arguments
    body = json.dumps({"data": api_values(url, **values)}).encode()
    request = urllib.request.Request(f"{url}gradio_api/call/ask", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/ask/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    events = [line.split(":", 1)[1].strip() for line in stream.splitlines() if line.startswith("event:")]
    data = [json.loads(line.split(":", 1)[1]) for line in stream.splitlines() if line.startswith("data:")]
    last = data[-1] if data else None
    return events[-1], last.get("error") if isinstance(last, dict) else last


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def upload(url: str, path: str) -> str:
    """POST the file to gradio's upload route, as a browser does; the server path it was stored under."""
    boundary = "dycoke-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{Path(path).name}"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode() + Path(path).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}gradio_api/upload", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)[0]


class _CountingServer(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(50 * 2**20))
        self.end_headers()
        try:
            for _ in range(50):
                self.wfile.write(b"\0" * 2**20)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_a_url_is_refused_before_anything_is_fetched(served, monkeypatch):
    """A FileData whose path is a URL on a public host (simulated: loopback allowed as if it were public) is
    refused with a clear message, and the host never sees a request."""
    from gradio import processing_utils

    monkeypatch.setattr(processing_utils, "PUBLIC_HOSTNAME_WHITELIST", ["127.0.0.1"])
    _CountingServer.hits = []
    host = ThreadingHTTPServer(("127.0.0.1", 0), _CountingServer)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        event, message = raw_call(served[1], video=file_data(f"http://127.0.0.1:{host.server_port}/big.mp4"))
    finally:
        host.shutdown()
    assert event == "error" and "URLs are not fetched" in message
    assert _CountingServer.hits == []


@pytest.mark.parametrize("arguments", [
    {"merge_ratio": "abc"},
    {"window": "abc"},
    {"prune_layer": None},
    {"num_frames": "many"},
    {"max_new_tokens": "lots"},
    {"threshold": [1]},
    {"method": None},
    {"video": file_data("/etc/passwd")},
    {"video": file_data("../../../../etc/hostname")},
    {"video": "/etc/passwd"},
    {"video": {"path": 5}},
    {"video": {"meta": {"_type": "gradio.FileData"}}},
    {"video": file_data("ftp://example.com/video.mp4")},
])
def test_every_api_refusal_says_what_was_wrong(served, arguments, street):
    values = arguments if "video" in arguments else {"video": file_data(upload(served[1], street))} | arguments
    event, message = raw_call(served[1], **values)
    assert event == "error", (arguments, event, message)
    assert isinstance(message, str) and message.strip() and message.strip() != "Error", (arguments, message)
    assert "Traceback" not in message, message


def test_file_names_stay_out_of_the_logs(served, tmp_path, caplog, capfd):
    """gradio logs (prints) every gr.Error with its message; no message about a video names the file."""
    secret = tmp_path / "SECRETNAME-notavideo.mp4"
    secret.write_text("not a video at all\n")
    client = Client(served[1], verbose=False, download_files=False)
    caplog.set_level("DEBUG")
    capfd.readouterr()
    with pytest.raises(AppError) as caught:
        ask(client, str(secret), "What happens?")
    out, err = capfd.readouterr()
    assert str(caught.value).startswith("The uploaded video is not a readable video")
    assert "SECRETNAME" not in out + err + caplog.text
    assert "SECRETNAME" not in str(caught.value)


def test_a_slow_decode_does_not_hold_the_model_slot(served, street, tmp_path, monkeypatch):
    """User A's upload decodes slowly (simulated: its decode waits until user B has been answered, at most 90 s);
    user B, who asks while A is decoding, is answered first."""
    pipeline = served[0].dycoke.pipeline
    slow = tmp_path / "slow.mp4"
    slow.write_bytes(Path(street).read_bytes())
    original = pipeline.load_video
    a_decoding, b_answered, outcome = threading.Event(), threading.Event(), {}

    def load_video(path, num_frames=32):
        if Path(path).name == "slow.mp4":
            a_decoding.set()
            outcome["B answered while A decoded"] = b_answered.wait(timeout=90)
        return original(path, num_frames)

    monkeypatch.setattr(pipeline, "load_video", load_video)
    clients = [Client(served[1], verbose=False, download_files=False) for _ in range(2)]
    answers = {}

    def user(name, client, path):
        answers[name] = assistant_texts(latest(ask(client, path, "What happens?", max_new_tokens=2,
                                                   compare="none"))["method_chat"])

    a = threading.Thread(target=user, args=("A", clients[0], str(slow)))
    a.start()
    assert a_decoding.wait(timeout=120)
    user("B", clients[1], street)
    b_answered.set()
    a.join(timeout=300)
    assert outcome["B answered while A decoded"], "B waited for A's decode"
    assert answers["A"] and answers["B"]


def test_the_upload_component_is_drawn_as_a_file_input_with_a_video_preview(served):
    """The upload is drawn by the frontend's own file component (a template subclass, not an unknown custom one)
    and takes any file, so that the app's own check speaks about a non-video (not the browser's file-type filter
    or a player's "not playable"); the player is a separate preview that shows only what arrived."""
    components = {c.get("props", {}).get("elem_id"): c for c in served[0].config["components"]}
    upload, preview = components["video"], components["video-preview"]
    assert upload["type"] == "file" and not upload["props"].get("file_types")
    assert preview["type"] == "video" and preview["props"].get("interactive") is False
