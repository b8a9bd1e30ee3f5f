"""Load: 8 concurrent gradio_client users, 40 requests in all, on the tiny model and loopback only.

Every request completes (or is told the queue is full), nothing hangs, every answer equals the answer the same
request gives alone (no cross-talk), and afterwards no temp files or threads are left behind.
"""

from __future__ import annotations

import queue
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dycoke.config import DyCokeConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py sits at the repository root, outside the installed package

import app  # noqa: E402

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from conftest import serving  # noqa: E402
from test_app import assistant_texts  # noqa: E402

USERS = 8
REQUESTS = 40
REQUEST_TIMEOUT_S = 180  # one request, queue wait included
BURST_TIMEOUT_S = 300  # the whole burst
QUESTIONS = ["What happens in this video?", "Which object moves fastest?", "Describe the colours you see.",
             "How many things are there?", "Does the camera move? Answer briefly."]
METHODS = ["dycoke", "ttm", "baseline"]
MERGE_RATIOS = [0.7, 0.5]


@dataclass(frozen=True)
class Spec:
    video: str
    question: str
    method: str
    max_new_tokens: int
    merge_ratio: float

    def api_arguments(self) -> dict:
        return dict(video=handle_file(self.video), question=self.question, method=self.method, compare="none",
                    merge_ratio=self.merge_ratio, window=4, prune_layer=3, prune_ratio=0.7, threshold=0.9,
                    num_frames=8, max_new_tokens=self.max_new_tokens, ignore_eos=True)

    def config(self) -> DyCokeConfig:  # what the app builds from the same controls
        return DyCokeConfig(merge_ratio=self.merge_ratio, window=4, prune_layer=3, prune_ratio=0.7,
                            reselect_threshold=0.9)


@pytest.fixture(scope="module")
def videos(shared_videos) -> list[str]:
    found = sorted(str(path) for path in app.EXAMPLES_DIR.glob("*.mp4"))
    street = shared_videos / "street_720p_3s.mp4"
    if street.is_file():
        found.append(str(street))
    if len(found) < 2:
        pytest.skip("fewer than two test videos")
    return found


@pytest.fixture(scope="module")
def private_tmp(tmp_path_factory):
    """Everything that asks tempfile or $TMPDIR where to write (gradio's upload folder included) writes here."""
    folder = tmp_path_factory.mktemp("load-tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        patch.setenv("TMPDIR", str(folder))
        patch.delenv("GRADIO_TEMP_DIR", raising=False)
        yield folder


@pytest.fixture(scope="module")
def served(pipeline, private_tmp):
    with serving(pipeline) as (demo, url):
        assert Path(demo.GRADIO_CACHE).resolve().is_relative_to(private_tmp.resolve())
        yield demo, url


def specs_for(videos: list[str]) -> list[Spec]:
    """40 different requests: each index picks its own mix of video, question, method, length and K."""
    return [Spec(videos[i % len(videos)], QUESTIONS[i % len(QUESTIONS)], METHODS[i % len(METHODS)],
                 4 + i % 3, MERGE_RATIOS[(i // 4) % 2]) for i in range(REQUESTS)]


def shown_answer(answer: str) -> str:
    """The answer as the method pane shows it: gr.Chatbot strips the message's surrounding whitespace."""
    return answer.strip() if answer else "(empty answer: the model ended at once)"


def close_client(client: Client) -> None:
    """Client.close stops the heartbeat only; the client's own thread pools (this test's side, not the server's)
    are shut down here, so that the thread count after the burst says something about the server."""
    client.close()
    for pool in (client.executor, client.helper_executor, client.stream_executor):
        pool.shutdown(wait=False, cancel_futures=True)


def worker_threads() -> dict[int, str]:
    return {thread.ident: thread.name for thread in threading.enumerate()}


def test_eight_users_forty_requests_no_cross_talk(served, pipeline, videos, private_tmp, one_intra_op_thread):
    # one_intra_op_thread: with several intra-op threads, a run that overlaps another may differ from its solo
    # run by float noise (the random tiny model amplifies it); with one thread, any difference is cross-talk.
    demo, url = served
    specs = specs_for(videos)
    assert len(set(specs)) == REQUESTS

    # Alone: each request on the library, one at a time, on the frames the app will decode from the same bytes.
    clips = {video: pipeline.load_video(video, 8) for video in videos}
    alone = [shown_answer(pipeline.answer(clips[s.video], s.question, method=s.method, config=s.config(),
                                          max_new_tokens=s.max_new_tokens, ignore_eos=True).answer)
             for s in specs]

    clients = [Client(url, verbose=False, download_files=False) for _ in range(USERS)]
    time.sleep(0.5)
    threads_before = worker_threads()
    work: queue.Queue = queue.Queue()
    for index in range(REQUESTS):
        work.put(index)
    answers: dict[int, str] = {}
    queue_full: list[int] = []
    failures: dict[int, str] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def user(client: Client) -> None:
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                return
            started = time.monotonic()
            try:
                # Each request is a new conversation, as the same request asked alone is: with the same
                # video and settings as this user's last one it would otherwise be a follow-up.
                client.predict(api_name="/clear")
                job = client.submit(api_name="/ask", **specs[index].api_arguments())
                final = dict(zip(app.OUTPUTS, job.result(timeout=REQUEST_TIMEOUT_S)))
                outcome = ("answer", assistant_texts(final["method_chat"])[-1].strip())
            except Exception as error:  # noqa: BLE001 - sorted below: queue full is allowed, the rest is not
                text = f"{type(error).__name__}: {error}"
                outcome = ("full", text) if "queue is full" in text.lower() else ("failed", text)
            with lock:
                latencies.append(time.monotonic() - started)
                kind, value = outcome
                if kind == "answer":
                    answers[index] = value
                elif kind == "full":
                    queue_full.append(index)
                else:
                    failures[index] = value

    burst_started = time.monotonic()
    users = [threading.Thread(target=user, args=(client,), name=f"load-user-{n}", daemon=True)
             for n, client in enumerate(clients)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(timeout=max(1.0, BURST_TIMEOUT_S - (time.monotonic() - burst_started)))
    burst_s = time.monotonic() - burst_started
    hung = [thread.name for thread in users if thread.is_alive()]
    for client in clients:
        close_client(client)

    figures = (f"load: {REQUESTS} requests from {USERS} concurrent users in {burst_s:.1f} s: "
               f"{len(answers)} completed, {len(queue_full)} queue-full, {len(failures)} failed; "
               f"max latency {max(latencies, default=0):.1f} s, "
               f"mean {sum(latencies) / max(len(latencies), 1):.1f} s")
    print("\n" + figures)
    assert not hung, f"users still waiting after {BURST_TIMEOUT_S} s: {hung}; {figures}"
    assert not failures, f"{failures}; {figures}"
    assert len(answers) + len(queue_full) == REQUESTS, figures
    assert len(answers) >= REQUESTS // 2, f"too few requests got through: {figures}"
    mixed = {index: (answers[index], alone[index]) for index in answers if answers[index] != alone[index]}
    assert not mixed, f"answers differ from the same request run alone (cross-talk): {mixed}; {figures}"

    # Nothing left behind: no generate threads, no threads beyond gradio's pooled workers, no temp files.
    deadline = time.monotonic() + 10
    while True:
        extra = {ident: name for ident, name in worker_threads().items()
                 if ident not in threads_before and not name.startswith("AnyIO worker thread")}
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not extra, f"threads left after the burst: {sorted(extra.values())}"
    cache = Path(demo.GRADIO_CACHE).resolve()
    stray = [path for path in private_tmp.iterdir() if path.resolve() != cache]
    assert not stray, f"temp files left outside gradio's upload folder: {stray}"
    files = [path for path in cache.rglob("*") if path.is_file()] if cache.is_dir() else []
    downloads = [path for path in files if path.is_relative_to(demo.dycoke.downloads)]
    uploads = [path for path in files if path not in downloads]
    assert len(uploads) <= len(videos) + 3 * len(app.EXAMPLES), \
        f"gradio's upload folder holds {len(uploads)} files for {len(videos)} distinct videos"
    # One run file per page (each client is a page), whatever the number of runs: a new run replaces it.
    assert len(downloads) <= USERS, f"{len(downloads)} run files for {USERS} pages after {len(answers)} runs"
    assert len(demo.dycoke.clips) <= app.CLIP_CACHE_ITEMS
    print(f"load: nothing left: 0 extra threads, 0 stray temp files, {len(uploads)} uploads in gradio's upload "
          f"folder (content-addressed, {len(videos)} distinct videos), {len(downloads)} run files")


def test_a_full_queue_is_refused_with_a_clear_message_and_the_rest_complete(served, videos, monkeypatch):
    """More users than queue places: the extra ones are told the queue is full, at once; the others complete."""
    demo, url = served
    monkeypatch.setattr(demo._queue, "max_size", 2)
    spec = Spec(videos[0], QUESTIONS[0], "dycoke", 6, 0.7)
    clients = [Client(url, verbose=False, download_files=False) for _ in range(6)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def user(client: Client) -> None:
        try:
            client.submit(api_name="/ask", **spec.api_arguments()).result(timeout=REQUEST_TIMEOUT_S)
            outcome = "completed"
        except Exception as error:  # noqa: BLE001
            outcome = f"{type(error).__name__}: {error}"
        with lock:
            outcomes.append(outcome)

    users = [threading.Thread(target=user, args=(client,), daemon=True) for client in clients]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    for client in clients:
        close_client(client)
    full = [outcome for outcome in outcomes if "queue is full" in outcome.lower()]
    print(f"\nqueue of 2: {len(clients)} users, {outcomes.count('completed')} completed, {len(full)} queue-full")
    assert len(outcomes) == len(clients), "a user hung"
    assert outcomes.count("completed") + len(full) == len(clients), outcomes
    assert outcomes.count("completed") >= 2 and full, outcomes
