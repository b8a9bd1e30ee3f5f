"""DyCoke web app: upload a video, ask about it, and watch the comparison and DyCoke answer side by side.

    python app.py [--host 127.0.0.1] [--port 7860] [--model HUB_ID|PATH|tiny]

The model is chosen on the server only (`--model` or `DYCOKE_MODEL`; default the 0.5B LLaVA-OneVision). When
it cannot be loaded the app falls back to `tiny`, whose random weights give meaningless answers, and says so
in a banner. This file only builds the UI and calls `dycoke`; the figures come from `dycoke.viz`.
"""

from __future__ import annotations

try:  # ZeroGPU on Hugging Face Spaces: `spaces` must be imported before torch initialises CUDA.
    import spaces
except ImportError:
    spaces = None

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio_client.utils import is_http_url_like

from dycoke import viz
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.conversation import Conversation, Notice
from dycoke.knobs import Knob
from dycoke.limits import RequestError, check_new_tokens, clean_question
from dycoke.methods import Method, all_knobs, configure_from_knobs, get_method, knobs_shown, method_names
from dycoke.models import DEFAULT_HUB_ID, OFFLINE_DEFAULT, LoadedModel, ModelLoadError, load
from dycoke.pipeline import Pipeline, Result, StepTrace, TextDelta
from dycoke.video import VideoClip, VideoError, check_limits, probe
from dycoke.videoqa import read_examples

log = logging.getLogger("dycoke.app")

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
# (video, question) pairs shown under the question box, in order.
EXAMPLES = read_examples(EXAMPLES_DIR)  # items of the video-QA suite that the trained tiny model answers

FRAME_CHOICES = [8, 16, 32, 64]
WINDOW_CHOICES = [1, 2, 4, 8]
MAX_NEW_TOKENS_UI = 512
TEXT_INTERVAL_S = 0.1  # streamed text: at most ~10 updates a second
HEATMAP_INTERVAL_S = 0.25  # at most ~4 heatmap updates a second while streaming, plus one at the end
GPU_QUEUE = "gpu"  # every event that runs the model shares this concurrency id
# Requests handled at once: each validates and decodes on its own (in a decoder worker), then waits for the one
# model slot (DyCokeApp.model_slot), so a slow decode never holds up another user's model run.
REQUEST_SLOTS = 2
QUEUE_MAX_SIZE = 16
MAX_FILE_SIZE = "200mb"
# Gradio's own upload cache: every hour, remove uploads older than two hours (a conversation rarely lasts longer;
# a follow-up about a removed upload is asked to upload it again).
DELETE_CACHE = (3600, 7200)
ZERO_GPU_DURATION_S = 120
DOWNLOADS_DIR = "dycoke-runs"  # in gradio's cache: one folder per page, holding its latest run's JSON
CLIP_CACHE_ITEMS = 6
CLIP_CACHE_BYTES = 1_500_000_000
NO_COMPARISON = "none"
MATCH_REFERENCE = "dycoke"  # peers with "match the budget" on keep exactly as many visual tokens as it attends
NARROW_PAGE_PX = viz.NARROW_PAGE_PX
STOPPED = " ⏹ (stopped)"
STOPPED_OUT = "stopped"  # a conversation's prefix after Stop skipped one of its panes' runs
WAITING = "⏳ Waiting for the comparison run to finish: the two runs go one after the other, each timed alone."

CSS = """
#model-banner { padding: 8px 14px; border-radius: 8px; border: 1px solid var(--border-color-primary); }
#model-banner.random-weights { background: #fff4e5; border-color: #f0a040; }
#model-banner.random-weights, #model-banner.random-weights * { color: #5a3500; }
#model-banner.random-weights strong { color: #8a3b00; }
/* One selector per .dark rule: gradio's scoping mangles the second selector of a .dark list. */
.dark #model-banner.random-weights { background: #3b2a12; border-color: #b07020; color: #ffe0b8; }
.dark #model-banner.random-weights * { color: #ffe0b8; }
#model-banner p { margin: 2px 0; }
/* The panes side by side share their rows (header, chat, stats, heatmap), so that each row starts at the same
   height in both: a grid of panes, each pane a subgrid of the four rows. A hidden pane leaves no empty track. */
#panes { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(300px, 100%), 1fr));
  gap: var(--layout-gap); }
#panes > .pane { display: grid; grid-template-rows: subgrid; grid-row: span 4; min-width: 0; }
.pane-header { min-height: 5.2em; }
.pane-header p { margin: 2px 0; }
.pane-stats { min-height: 3.2em; font-size: 0.9em; }
#status-line { min-height: 1.6em; font-size: 0.9em; color: var(--body-text-color-subdued); }
#status-line p { margin: 0; }
#error-box:not(:empty) .prose:not(:empty), #upload-note.bad .prose { border-left: 4px solid #d9534f;
  padding: 6px 10px; background: rgba(217, 83, 79, 0.10); border-radius: 4px; }
#error-box p, #upload-note p { margin: 0; }
#progress-slot { min-height: 2.8em; }
#headline p { margin: 4px 0; }
.js-plotly-plot .modebar-container { display: none !important; }
@media (max-width: 899px) { #answers { min-width: 100% !important; } }
"""


def scroll_to_answers_js(num_inputs: int) -> str:
    """Run before Send's request: on a narrow page (the columns stacked) bring the answers into view. It returns
    the event's input values unchanged (gradio hands it the inputs, then the outputs), for the Python handler."""
    return f"""(...args) => {{
  if (window.innerWidth < {NARROW_PAGE_PX}) {{
    document.querySelector('#answers')?.scrollIntoView({{block: 'start'}});
  }}
  return args.slice(0, {num_inputs});
}}"""
# On load: the page's width and whether it is dark, so that the figures fit and follow the theme.
PAGE_INFO_JS = """() => {
  const theme = new URLSearchParams(window.location.search).get('__theme');
  const dark = theme ? theme === 'dark' : (document.querySelector('.dark') !== null
               || window.matchMedia('(prefers-color-scheme: dark)').matches);
  return [window.innerWidth, dark];
}"""


# --- model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """The loaded model and, when the app fell back to `tiny`, the model that was asked for and why it failed."""

    loaded: LoadedModel
    requested: str
    fallback_reason: str | None = None


def load_model(name: str, device: str | None = None) -> ModelChoice:
    """Load `name`; when that fails (no network, no weights, no GPU) fall back to `tiny` and say why."""
    log.info("loading model %s", name)
    try:
        return ModelChoice(load(name, device=device), name)
    except ModelLoadError as error:
        if name == OFFLINE_DEFAULT:
            raise
        log.warning("%s; falling back to the tiny model", error)
        return ModelChoice(load(OFFLINE_DEFAULT, device=device), name, fallback_reason=str(error))


def banner_markdown(choice: ModelChoice) -> str:
    loaded = choice.loaded
    dtype = str(loaded.dtype).removeprefix("torch.")
    line = f"**Model** `{loaded.name}` ({loaded.family.name}) · device `{loaded.device.type}` · dtype `{dtype}`"
    if loaded.notice is None:
        return line + " · pretrained weights"
    if loaded.is_random:
        lines = [line + " · **tiny random weights**",
                 "⚠️ **The answers are from random demo weights and mean nothing.** Token counts, heatmaps and "
                 "timings are real measurements of this small model."]
    else:
        lines = [line + " · **tiny trained model**",
                 f"ℹ️ **This is {loaded.notice}.** Try the examples: it answers them. Token counts, heatmaps and "
                 "timings are real measurements of this small model."]
    if choice.fallback_reason:
        cause = choice.fallback_reason.split("': ", 1)[-1]  # "could not load model 'NAME': CAUSE"
        lines.append(f"The app asked for `{choice.requested}` but could not load it ({cause.rstrip('.')}), so it "
                     f"fell back to `{OFFLINE_DEFAULT}`. Start it with `--model` or `DYCOKE_MODEL` on a machine that can reach "
                     "the weights.")
    return "\n\n".join(lines)


# --- decoded-clip cache --------------------------------------------------------------------------------


class ClipCache:
    """Decoded clips keyed by file (path, size) and frame count, least recently used dropped first.

    Gradio stores each upload under a directory named after the hash of its content, so a path names one
    content; a second upload of the same file rewrites it there (a new mtime, the same bytes) and still hits.

    Follow-up questions about the same upload reuse the frames instead of decoding again. Only numpy frames
    live here (no tensors), bounded by a count and a byte budget; the newest clip is always kept.
    """

    def __init__(self, max_items: int = CLIP_CACHE_ITEMS, max_bytes: int = CLIP_CACHE_BYTES) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._clips: OrderedDict[tuple, VideoClip] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: str, num_frames: int) -> tuple:
        stat = Path(path).stat()
        return (str(Path(path).resolve()), stat.st_size, int(num_frames))

    def get(self, key: tuple) -> VideoClip | None:
        with self._lock:
            clip = self._clips.get(key)
            if clip is not None:
                self._clips.move_to_end(key)
            return clip

    def put(self, key: tuple, clip: VideoClip) -> None:
        with self._lock:
            self._clips[key] = clip
            self._clips.move_to_end(key)
            while len(self._clips) > 1 and (
                len(self._clips) > self.max_items
                or sum(c.frames.nbytes for c in self._clips.values()) > self.max_bytes
            ):
                self._clips.popitem(last=False)

    def __len__(self) -> int:
        return len(self._clips)


# --- conversations -------------------------------------------------------------------------------------


class PageConversations:
    """Each page's two conversations (one per pane), by browser session, the least recently used page dropped
    past `max_pages`. The conversations' caches are bounded by the pipeline's memory; this bounds the objects."""

    def __init__(self, max_pages: int = 64) -> None:
        self.max_pages = max_pages
        self._pages: OrderedDict[str, dict[str, Conversation]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, page: str) -> dict[str, Conversation] | None:
        with self._lock:
            conversations = self._pages.get(page)
            if conversations is not None:
                self._pages.move_to_end(page)
            return conversations

    def start(self, page: str, conversations: dict[str, Conversation]) -> None:
        with self._lock:
            self._pages[page] = conversations
            self._pages.move_to_end(page)
            while len(self._pages) > self.max_pages:
                self._pages.popitem(last=False)

    def forget(self, page: str) -> None:
        with self._lock:
            self._pages.pop(page, None)

    def stop(self, page: str) -> None:
        for conversation in (self.get(page) or {}).values():
            conversation.stop()


def page_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "-"


# --- settings ------------------------------------------------------------------------------------------


def api_name(knob: Knob) -> str:
    """The API parameter of a knob's control: its CLI option, in snake case (`--threshold` → `threshold`)."""
    return knob.cli_flag.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class RunSettings:
    """What one Send runs: the DyCoke settings, each pane's configured method, and the generation limits."""

    config: DyCokeConfig
    methods: dict[str, Method]  # "comparison" (absent when there is none), then "method"
    num_frames: int
    max_new_tokens: int

    def prefix(self, video: str) -> tuple:
        """What the video prefix of each pane depends on: a change starts a new conversation. The answer's length
        does not change it; every other setting changes what enters or is attended in the language model."""
        return (video, self.num_frames) + tuple(
            (role, method.name, tuple(sorted(method.options().items())), method.effective_config(self.config))
            for role, method in self.methods.items())


def pane_header(role: str, method: Method | None, config: DyCokeConfig, num_frames: int, max_new_tokens: int,
                tokens_per_frame: int, frames_per_group: int = 1) -> str:
    if method is None:
        return f"**{role}: none**\n\nPick a method under *Settings → Compare with* to run one."
    line = viz.settings_line(method, config, num_frames, max_new_tokens, tokens_per_frame, frames_per_group)
    return f"**{role}: `{method.name}`** — {method.summary}\n\n`{line}`"


def friendly_video_error(error: VideoError) -> str:
    """The library's one-line message about "the uploaded video": gradio logs every gr.Error's message, and the
    logs never hold a file name."""
    return user_message(error.message_for("the uploaded video"))


class UploadedFile(gr.File):
    """gr.File that takes only files sent to this server. Gradio would download a `FileData` whose path is an
    http(s) URL (an API-only input) before any handler runs; this refuses it before anything is fetched."""

    is_template = True  # drawn by the frontend's own file component

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        if is_http_url_like(url_or_file_path):
            raise gr.Error("The video must be uploaded as a file (in the page, or with gradio_client's "
                           "handle_file): URLs are not fetched.")
        return await super().async_move_resource_to_block_cache(url_or_file_path)


def short_hash(*parts: object) -> str:
    """8 hex digits standing in for user data (a question, an upload) in the logs, which never hold the data itself."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()[:8]


def log_failure(ref: str, stage: str, error: BaseException) -> None:
    """An unexpected fault: its type and where it happened, but not its message, which may quote user data."""
    where = "".join(traceback.format_tb(error.__traceback__)).rstrip()
    log.error("request %s: %s failed with %s\n%s", ref, stage, type(error).__name__, where)


def user_message(error: Exception) -> str:
    """A library error (one line that says what to change) as a sentence for the UI."""
    text = str(error).strip().rstrip(".")
    return f"{text[:1].upper()}{text[1:]}."


def error_markdown(message: str) -> str:
    return f"⚠️ **{message}**"


def empty_state() -> dict:
    """A conversation: its video, what its prefix depends on, both panes' turns, and the last question."""
    return {"video": None, "prefix": None, "comparison": [], "method": [], "question": None}


# --- the app -------------------------------------------------------------------------------------------

OUTPUTS = ("question", "comparison_header", "comparison_chat", "comparison_stats", "comparison_heatmap",
           "method_header", "method_chat", "method_stats", "method_heatmap", "headline", "gauges", "ttm_view",
           "download", "status", "error", "state")


def gpu(fn: Callable) -> Callable:
    """spaces.GPU on ZeroGPU, a no-op elsewhere."""
    return spaces.GPU(duration=ZERO_GPU_DURATION_S)(fn) if spaces is not None else fn


def placeholders(comparison: str = "The comparison's per-step heatmap appears here.",
                 method: str = "The per-step heatmap appears here.") -> dict:
    """What the figures show before a run has produced them."""
    return {
        "comparison_heatmap": viz.placeholder_figure(comparison),
        "method_heatmap": viz.placeholder_figure(method),
        "gauges": viz.placeholder_figure("Gauges appear once an answer is complete.", height=120),
        "ttm_view": viz.placeholder_figure("Frame thumbnails with the patches TTM dropped appear here.", height=120),
    }


class DyCokeApp:
    """The request handlers, holding the pipeline and the decoded-clip cache (no tensors in gr.State)."""

    def __init__(self, pipeline: Pipeline, banner: str) -> None:
        self.pipeline = pipeline
        self.banner = banner
        self.clips = ClipCache()
        self.model_slot = threading.Lock()  # one model run at a time; decoding happens before, outside it
        self._run_on_gpu = gpu(self._model_runs)
        pipeline.decoder.start()  # a warm decoder worker, so that the first upload waits for no interpreter
        self._stops: dict[str, threading.Event] = {}  # per browser session: Stop sets it, the running Send reads it
        self._stops_lock = threading.Lock()
        self.conversations = PageConversations()
        self.serve_from(Path(gr.utils.get_upload_folder()))

    def serve_from(self, cache: Path) -> None:
        """Take uploads from, and write downloads into, gradio's cache folder `cache` (a Blocks' GRADIO_CACHE).
        A file there is served as it is, without a copy, and `delete_cache` and the server's shutdown remove it."""
        cache = cache.resolve()
        # Where a video handed to `ask` may live: gradio's upload folder (uploads, cached examples) and the examples.
        self.upload_roots: tuple[Path, ...] = (cache, EXAMPLES_DIR.resolve())
        self.downloads = cache / DOWNLOADS_DIR

    def is_upload(self, video: str) -> bool:
        """Whether `video` is a file gradio received (or an example). The API's FileData names a `path`; gradio
        already refuses one it did not receive, and this second check keeps it so if that ever changes."""
        try:
            resolved = Path(os.path.realpath(video))
        except (TypeError, ValueError, OSError):
            return False
        return any(resolved.is_relative_to(root) for root in self.upload_roots)

    @property
    def loaded(self) -> LoadedModel:
        return self.pipeline.loaded

    # Each handler's outputs are a dict from OUTPUTS names; names left out are not updated.
    @staticmethod
    def _outputs(**updates) -> tuple:
        return tuple(updates[name] if name in updates else gr.skip() for name in OUTPUTS)

    def _stop_event(self, request: gr.Request | None) -> threading.Event:
        with self._stops_lock:
            return self._stops.setdefault(page_key(request), threading.Event())

    def end_page(self, request: gr.Request = None) -> None:
        """The page was closed: forget its conversations, its Stop flag and its download."""
        page = page_key(request)
        self.conversations.forget(page)
        with self._stops_lock:
            self._stops.pop(page, None)
        shutil.rmtree(self._page_downloads(page), ignore_errors=True)

    def _page_downloads(self, page: str) -> Path:
        return self.downloads / short_hash(page)  # the session hash is the page's key: never a file name

    def stop(self, request: gr.Request = None) -> None:
        """Stop this page's running generation: it ends after the current step, keeping its partial answer, and
        a run not yet started is skipped."""
        self._stop_event(request).set()
        self.conversations.stop(page_key(request))

    def _cleared(self, status: str = "") -> dict:
        return placeholders() | {
            "comparison_chat": [], "method_chat": [], "comparison_stats": "", "method_stats": "", "headline": "",
            "download": gr.update(value=None, visible=False), "status": status, "error": "", "state": empty_state(),
        }

    def clear(self, request: gr.Request = None) -> tuple:
        self.conversations.forget(page_key(request))
        return self._outputs(**self._cleared("New conversation: the panes were cleared."))

    def new_video(self, video: str | None, num_frames: int | None = None, request: gr.Request = None) -> tuple:
        """A video arrived (or was removed): a new conversation, and the file checked now, before any Send, for
        the page's frame count (Send checks it again for the count it runs with)."""
        self.conversations.forget(page_key(request))
        if not video:
            return self._outputs(**self._cleared())
        try:
            info = self.check_video(video, int(num_frames or min(FRAME_CHOICES)))
        except gr.Error as error:
            return self._outputs(**(self._cleared() | {"error": error_markdown(error.message)}))
        return self._outputs(**self._cleared(f"New conversation about `{Path(video).name}` ({info})."))

    def check_video(self, video: str, num_frames: int) -> str:
        """Probe `video` without decoding it: gr.Error with the app's wording if it is no usable video (or too
        costly to decode `num_frames` of), else a short description of it."""
        if not self.is_upload(video):
            raise gr.Error("Upload the video as a file (in the page, or with gradio_client's handle_file): "
                           "paths on the server are not accepted.")
        try:
            limits = self.pipeline.video_limits
            info = probe(video, limits)
            check_limits(video, info, limits, num_frames)
        except VideoError as error:
            raise gr.Error(friendly_video_error(error)) from None
        except OSError:
            raise gr.Error("The uploaded video is gone from the server: upload it again.") from None
        length = "" if info.duration_s is None else f", {info.duration_s:.1f} s"
        return f"{info.width}×{info.height}{length}"

    def _settings(self, method, compare, num_frames, max_new_tokens, match_budget=True, **knobs) -> RunSettings:
        names = method_names()
        if method not in names:
            raise gr.Error(f"Unknown method '{method}': pick one of {', '.join(names)}.")
        if compare != NO_COMPARISON and compare not in names:
            raise gr.Error(f"Unknown comparison '{compare}': pick '{NO_COMPARISON}' or one of {', '.join(names)}.")
        values = {knob.name: knobs[api_name(knob)] for knob in all_knobs() if api_name(knob) in knobs}
        match = MATCH_REFERENCE if match_budget else None
        try:
            config, chosen = configure_from_knobs(method, values, match)
            methods = {"method": chosen}
            if compare != NO_COMPARISON:
                methods = {"comparison": configure_from_knobs(compare, values, match)[1]} | methods
            for run_method in methods.values():
                run_method.effective_config(config).check_layers(self.loaded.num_layers)
                run_method.check_model(self.loaded.num_layers)
            frames = int(num_frames)
            if frames not in FRAME_CHOICES:
                raise RequestError(f"frames must be one of {FRAME_CHOICES}, got {frames}")
            tokens = check_new_tokens(int(round(float(max_new_tokens))))
        except (ConfigError, RequestError, TypeError, ValueError) as error:
            raise gr.Error(f"Bad setting: {error}. Fix it under Settings and ask again.") from None
        return RunSettings(config, methods, frames, tokens)

    def _clip(self, video: str, num_frames: int, progress: gr.Progress, ref: str = "-") -> tuple[VideoClip, bool]:
        try:
            key = ClipCache.key(video, num_frames)
        except OSError:
            raise gr.Error("The uploaded video is gone from the server: upload it again.") from None
        clip = self.clips.get(key)
        if clip is not None:
            return clip, True
        progress(0.0, desc="decoding video")
        try:
            clip = self.pipeline.load_video(video, num_frames)
        except VideoError as error:
            raise gr.Error(friendly_video_error(error)) from None
        except RequestError as error:
            raise gr.Error(f"{error}. Pick fewer frames under Settings.") from None
        except Exception as error:  # the decoder's worker could not even start: say so, keep serving
            log_failure(ref, "decoding", error)
            raise gr.Error(f"Could not decode the uploaded video ({type(error).__name__}). Try again, or "
                           "re-encode it as H.264 MP4.") from None
        self.clips.put(key, clip)
        return clip, False

    def ask(self, video, question, method, compare, num_frames, max_new_tokens, ignore_eos, state,
            match_budget=True, page_width=0, dark=False, request: gr.Request = None, progress=gr.Progress(),
            **knobs) -> Iterator[tuple]:
        """Answer `question` with the comparison, then with the method, streaming both panes; sequential runs.

        A refused request also shows its message on the page, where it stays until the next Send.
        """
        try:
            yield from self._ask(video, question, method, compare, num_frames, max_new_tokens, ignore_eos, state,
                                 bool(match_budget), int(page_width or 0), bool(dark), request, progress, knobs)
        except gr.Error as error:
            yield self._outputs(error=error_markdown(error.message))
            raise

    def regenerate(self, video, method, compare, num_frames, max_new_tokens, ignore_eos, state, match_budget=True,
                   page_width=0, dark=False, request: gr.Request = None, progress=gr.Progress(),
                   **knobs) -> Iterator[tuple]:
        """Ask the conversation's last question again, in place of its last answer."""
        try:
            question = (state or {}).get("question")
            if not question or self.conversations.get(page_key(request)) is None:
                raise gr.Error("Nothing to regenerate yet: ask a question first.")
            yield from self._ask(video, question, method, compare, num_frames, max_new_tokens, ignore_eos, state,
                                 bool(match_budget), int(page_width or 0), bool(dark), request, progress, knobs,
                                 regenerate=True)
        except gr.Error as error:
            yield self._outputs(error=error_markdown(error.message))
            raise

    def _ask(self, video, question, method, compare, num_frames, max_new_tokens, ignore_eos, state, match_budget,
             page_width, dark, request, progress, knobs, regenerate: bool = False) -> Iterator[tuple]:
        if not video:
            raise gr.Error("No video yet: upload a video (MP4, WebM, MKV, AVI) or click an example, then ask.")
        if not self.is_upload(video):  # checked before any stat or open: no probing of the server's files
            log.warning("refused a video path outside the upload folder (path %s)", short_hash(video))
            raise gr.Error("Upload the video as a file (in the page, or with gradio_client's handle_file): "
                           "paths on the server are not accepted.")
        try:
            question = clean_question(question or "")
        except RequestError as error:
            raise gr.Error(user_message(error)) from None
        settings = self._settings(method, compare, num_frames, max_new_tokens, match_budget, **knobs)
        # The logs name a request by a short hash; the question and the upload only as hashes of their own.
        ref = short_hash(video, question, time.time_ns(), threading.get_ident())
        log.info("request %s: video %s, question %s, %s vs %s, %d frames, %d new tokens", ref, short_hash(video),
                 short_hash(question), method, compare, settings.num_frames, settings.max_new_tokens)
        clip, reused = self._clip(video, settings.num_frames, progress, ref)

        state = dict(state or empty_state())
        page = page_key(request)
        conversations = self.conversations.get(page)
        prefix = settings.prefix(video)
        notice = ""
        if regenerate and (state.get("prefix") != prefix or conversations is None):
            raise gr.Error("The settings or the video changed since the last answer: press Send to ask again.")
        if regenerate:
            for role in settings.methods:  # the last exchange is asked again
                state[role] = state[role][:-2]
        elif state.get("video") != video or state.get("prefix") != prefix or conversations is None:
            if state.get("prefix") == STOPPED_OUT:
                notice = "New conversation: Stop skipped a pane's run, so the panes no longer hold the same turns. "
            elif state.get("method") or state.get("comparison"):
                notice = ("New conversation: the settings changed what the model sees of the video. "
                          if state.get("video") == video and conversations is not None else
                          "New conversation: the earlier one is no longer held by the server. ")
            state = empty_state()
            # The decode is shared by both runs and reported in the status line, not in their timings.
            conversations = self._start_conversations(page, dataclasses.replace(clip, decode_seconds=0.0), settings,
                                                      bool(ignore_eos))
        for conversation in conversations.values():  # the answer's length is not part of the prefix
            conversation.max_new_tokens, conversation.ignore_eos = settings.max_new_tokens, bool(ignore_eos)
        state |= {"video": video, "prefix": prefix, "question": question}
        name = Path(video).name
        turns = len(state["method"]) // 2
        status = notice + (f"Reused the {clip.num_frames} decoded frames of `{name}`: no second decode." if reused
                           else f"Decoded {clip.num_frames} frames of `{name}` in {clip.decode_seconds * 1000:.0f} ms "
                                "(once, shared by both runs and not counted in their timings).")
        if turns:
            status += f" Turn {turns + 1}: the model sees the {turns} earlier turn{'s' * (turns > 1)}."
        stop = self._stop_event(request)
        stop.clear()

        with_comparison = "comparison" in settings.methods
        asked = {"role": "user", "content": question}
        tokens = self.loaded.tokens_per_frame
        header = {role: pane_header(role.title(), settings.methods.get(role), settings.config, settings.num_frames,
                                    settings.max_new_tokens, tokens, self.loaded.frames_per_group)
                  for role in ("comparison", "method")}
        waiting = placeholders(method="Waiting for the comparison run.") if with_comparison else placeholders()
        yield self._outputs(
            question="", status=status, error="", headline="", download=gr.update(value=None, visible=False),
            comparison_header=header["comparison"], method_header=header["method"],
            comparison_chat=state["comparison"] + ([asked] if with_comparison else []),
            method_chat=state["method"] + [asked] + ([{"role": "assistant", "content": WAITING}]
                                                     if with_comparison else []),
            comparison_stats="", method_stats="", **waiting,
        )
        # Validation and decoding above run on the CPU; only the model runs below hold the GPU (on ZeroGPU, in
        # its worker process, which is why the clip cache is filled out here, where it persists).
        # Validation and decoding above run outside the model slot; only the model runs below hold it and the GPU.
        with self.model_slot:
            yield from self._run_on_gpu(clip, question, conversations, regenerate, state, stop, page_width, dark,
                                        progress, page, ref)

    def _start_conversations(self, page: str, clip: VideoClip, settings: RunSettings,
                             ignore_eos: bool) -> dict[str, Conversation]:
        """A new conversation per pane, on the same decoded clip; on ZeroGPU their caches wait on the host."""
        try:
            conversations = {role: Conversation(self.pipeline, clip, method, settings.config,
                                                max_new_tokens=settings.max_new_tokens, ignore_eos=ignore_eos,
                                                num_frames=settings.num_frames, keep_on_host=spaces is not None)
                             for role, method in settings.methods.items()}
        except (ConfigError, RequestError) as error:
            raise gr.Error(f"Bad setting: {error}. Fix it under Settings and ask again.") from None
        self.conversations.start(page, conversations)
        return conversations

    def _model_runs(self, clip: VideoClip, question: str, conversations: dict[str, Conversation], regenerate: bool,
                    state: dict, stop: threading.Event, page_width: int, dark: bool, progress: gr.Progress,
                    page: str = "-", ref: str = "-") -> Iterator[tuple]:
        """The comparison, then the method, one after the other on the same frames, each streamed and timed."""
        runs = [(role, conversation.method) for role, conversation in conversations.items()]
        results: dict[str, Result] = {}
        for index, (role, run_method) in enumerate(runs):
            def report(fraction: float, message: str, index=index, name=run_method.name) -> None:
                progress((index + fraction) / len(runs), desc=f"{name}: {message}")

            history = state[role] + [{"role": "user", "content": question}]
            if stop.is_set():  # the panes no longer hold the same turns: the next Send starts afresh
                state[role] = history + [{"role": "assistant", "content": "(not run: stopped)"}]
                state["prefix"] = STOPPED_OUT
                yield self._outputs(**{f"{role}_chat": state[role], "state": state})
                continue
            yield from self._stream_run(clip, question, role, conversations[role], regenerate, history, results,
                                        page_width, dark, report, ref)
            result = results[role]
            shown = result.answer if result.answer else "(empty answer: the model ended at once)"
            if result.metrics.get("stopped"):
                shown = result.answer + STOPPED
            state[role] = history + [{"role": "assistant", "content": shown}]
            trace = result.trace
            updates = {
                f"{role}_chat": state[role],
                f"{role}_stats": viz.stats_line(result.metrics),
                **({"status": "Stopped: the partial answer is kept."} if result.metrics.get("stopped") else {}),
                f"{role}_heatmap": viz.step_heatmap(
                    trace, viz.step_heatmap_title(run_method.name, trace, result.metrics["reselections"]), dark=dark,
                    width=viz.pane_width(page_width)),
                "state": state,
            }
            if role == "method":
                comparison = results.get("comparison")
                updates |= {
                    "headline": viz.headline(
                        result.method, result.metrics, comparison and comparison.method,
                        comparison and comparison.metrics,
                        None if comparison is None else comparison.token_ids == result.token_ids),
                    "gauges": viz.gauges_figure(result.method, result.metrics, comparison and comparison.method,
                                                comparison and comparison.metrics, dark=dark),
                    "ttm_view": viz.ttm_view(clip.frames, list(clip.timestamps), result.method, trace, result.metrics,
                                             page_width, dark),
                    "download": gr.update(value=self._run_file(results, page, ref), visible=True),
                }
            yield self._outputs(**updates)

    def _stream_run(self, clip: VideoClip, question: str, role: str, conversation: Conversation, regenerate: bool,
                    history: list, results: dict, page_width: int, dark: bool, report: Callable,
                    ref: str) -> Iterator[tuple]:
        """Stream one turn of `conversation` into its pane; its Result (stopped or not) goes into `results`."""
        method = conversation.method
        answer, shown_answer = "", None
        steps: list[dict] = []
        last_text = last_plot = 0.0
        events = conversation.regenerate(report) if regenerate else conversation.ask(question, report)
        try:
            for event in events:
                # Generation runs in its own thread and timestamps its tokens there; whatever this loop does
                # competes with it for the GIL, so it only collects events and yields on a throttle.
                if isinstance(event, Notice):
                    yield self._outputs(status=f"{method.name}: {event.text}.")
                    continue
                if isinstance(event, TextDelta):
                    answer += event.text
                elif isinstance(event, StepTrace):
                    steps.append({"kept_per_frame": event.kept_per_frame, "reselected": event.reselected})
                elif isinstance(event, Result):
                    results[role] = event
                    continue
                now = time.monotonic()
                updates = {}
                if answer != shown_answer and now - last_text >= TEXT_INTERVAL_S:
                    last_text, shown_answer = now, answer
                    updates[f"{role}_chat"] = history + [{"role": "assistant", "content": answer}]
                if steps and now - last_plot >= HEATMAP_INTERVAL_S:
                    last_plot = now
                    trace = viz.partial_trace(*self.pipeline.frame_times_and_tokens(clip), steps,
                                              frames_per_group=self.pipeline.loaded.frames_per_group)
                    updates[f"{role}_heatmap"] = viz.live_step_heatmap(
                        trace, f"{method.name} · step {len(steps)} (TTM column once the run ends)", dark=dark,
                        width=viz.pane_width(page_width))
                if updates:
                    yield self._outputs(**updates)
        except (ConfigError, RequestError, VideoError) as error:  # out of memory is a RequestError too
            log.warning("request %s: %s refused: %s", ref, method.name, type(error).__name__)
            message = user_message(error)
            if "ask again" not in message:
                message += " Change the input and ask again."
            raise gr.Error(f"{method.name}: {message}") from None
        except Exception as error:  # a bug or a driver fault: no traceback to the user, keep serving
            log_failure(ref, method.name, error)
            raise gr.Error(f"{method.name}: something went wrong (error {ref}). Try again, with fewer frames "
                           "or fewer new tokens.") from None
        finally:
            events.close()  # joins the generation thread

    def _run_file(self, results: dict[str, Result], page: str, ref: str) -> str:
        """The run's results as the CLI's JSON contract, {"comparison": ..., "method": ...}, in a file to download:
        the page's only one, so a page holds one file however many runs it makes (the previous run's button was
        hidden when this run began)."""
        folder = self._page_downloads(page)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"dycoke-run-{ref}.json"
        path.write_text(json.dumps({role: result.to_dict() for role, result in results.items()}, indent=1))
        return str(path)


def preview_headers(handlers: DyCokeApp, method, compare, num_frames, max_new_tokens, match_budget=True,
                    **knobs) -> tuple:
    """The pane headers for the settings as they stand, before anything runs; unchanged while a value is invalid."""
    try:
        settings = handlers._settings(method, compare, num_frames, max_new_tokens, match_budget, **knobs)
    except gr.Error:
        return gr.skip(), gr.skip()
    tokens = handlers.loaded.tokens_per_frame
    return tuple(pane_header(role.title(), settings.methods.get(role), settings.config, settings.num_frames,
                             settings.max_new_tokens, tokens, handlers.loaded.frames_per_group)
                 for role in ("comparison", "method"))


def shown_controls(method: str, compare: str, match_budget: bool) -> list:
    """Visibility of the match switch and of each knob's control: exactly the knobs the chosen methods use."""
    names = [name for name in (method, compare) if name in method_names()]
    shown = {knob.name for knob in knobs_shown(names, MATCH_REFERENCE if match_budget else None)}
    peers = any(get_method(name).matchable for name in names)
    return [gr.update(visible=peers)] + [gr.update(visible=knob.name in shown) for knob in all_knobs()]


def knob_control(knob: Knob, num_layers: int, visible: bool) -> gr.components.Component:
    """The control of one knob, labelled as everywhere on the page."""
    if knob.kind == "choice":
        return gr.Radio(list(knob.choices), value=knob.default, label=knob.label, info=knob.help, visible=visible,
                        elem_id=f"knob-{knob.name}")
    maximum = num_layers - 1 if knob.kind == "layer" else knob.maximum
    return gr.Slider(knob.minimum, maximum, value=min(knob.default, maximum), step=knob.step, label=knob.label,
                     info=knob.help, visible=visible, elem_id=f"knob-{knob.name}")


def _examples() -> tuple[list[list[str]], list[str]]:
    rows = [[str(path), question] for path, question in EXAMPLES if Path(path).is_file()]
    return rows, [f"{Path(path).stem}: {question}" for path, question in rows]


def answer_pane(role: str, header: str, placeholder: str, heatmap) -> tuple[gr.Column, tuple]:
    """One answer pane: its header, streaming chat, stats line and per-step heatmap (`heatmap` until a run)."""
    with gr.Column(min_width=300, elem_classes=["pane"]) as column:
        components = (
            gr.Markdown(header, elem_classes=["pane-header"], elem_id=f"{role}-header"),
            gr.Chatbot(label=f"{role} answer", height=340, buttons=["copy"], render_markdown=False,
                       elem_id=f"{role}-chat", show_label=False, placeholder=placeholder, autoscroll=True),
            gr.Markdown(elem_classes=["pane-stats"], elem_id=f"{role}-stats"),
            gr.Plot(heatmap, show_label=False, elem_id=f"{role}-heatmap"),
        )
    return column, components


def build_app(model: Pipeline | LoadedModel | ModelChoice) -> gr.Blocks:
    """The gr.Blocks UI around one pipeline. Launch it with `launch_app`, which sets the CSS and upload limit."""
    if isinstance(model, ModelChoice):
        choice = model
    else:
        loaded = model.loaded if isinstance(model, Pipeline) else model
        choice = ModelChoice(loaded, loaded.name)
    pipeline = model if isinstance(model, Pipeline) else Pipeline(choice.loaded)
    handlers = DyCokeApp(pipeline, banner_markdown(choice))
    loaded = pipeline.loaded
    names = method_names()
    default_method = "dycoke" if "dycoke" in names else names[0]
    default_compare = "baseline" if "baseline" in names else NO_COMPARISON
    default_frames = 32 if loaded.device.type == "cuda" else 16
    default_tokens = 64
    defaults = DyCokeConfig()
    shown = {knob.name for knob in knobs_shown([default_method, default_compare], MATCH_REFERENCE)}
    tokens, per_group = loaded.tokens_per_frame, loaded.frames_per_group

    with gr.Blocks(title="DyCoke: token compression for video LLMs", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("## DyCoke: dynamic token compression for video LLMs\n"
                    "Upload a video and ask about it. The same model answers twice, one run after the other: "
                    "once with the comparison method (left) and once with DyCoke or the method you pick (right).")
        gr.Markdown(handlers.banner, elem_id="model-banner",
                    elem_classes=["random-weights"] if loaded.is_random else [])
        state = gr.State(empty_state())
        page_width = gr.Number(0, visible=False, elem_id="page-width")
        dark = gr.Checkbox(False, visible=False, elem_id="page-dark")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320, elem_id="inputs"):
                video = UploadedFile(label="Video (MP4, WebM, MKV, AVI, MOV)", file_count="single", type="filepath",
                                height=90, elem_id="video")
                preview = gr.Video(label="Preview", interactive=False, height=200, elem_id="video-preview")
                question = gr.Textbox(label="Question", placeholder="Ask about the video and press Enter",
                                      lines=1, max_lines=4, max_length=4096, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send", min_width=120)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=120)
                    regenerate = gr.Button("Regenerate", elem_id="regenerate", min_width=120)
                    clear = gr.Button("Clear", elem_id="clear", min_width=120)
                progress_slot = gr.Markdown(elem_id="progress-slot")  # where gr.Progress draws, nothing else
                example_rows, example_labels = _examples()
                if example_rows:
                    gr.Examples(example_rows, inputs=[video, question], example_labels=example_labels,
                                label="Examples (synthetic clips)")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    method = gr.Dropdown(names, value=default_method, label="Method (right pane)",
                                         info="The compression method to try.", elem_id="method")
                    compare = gr.Dropdown([NO_COMPARISON] + names, value=default_compare,
                                          label="Compare with (left pane)",
                                          info="Runs first, on the same frames; 'none' skips it.", elem_id="compare")
                    match_budget = gr.Checkbox(
                        True, label=f"Match {MATCH_REFERENCE}'s budget", elem_id="match-budget",
                        visible=any(get_method(n).matchable for n in (default_method, default_compare) if n in names),
                        info=f"Peers keep exactly as many visual tokens as {MATCH_REFERENCE} attends per step under "
                             "its settings here, instead of their own drop ratio.")
                    knob_controls = {knob.name: knob_control(knob, loaded.num_layers, knob.name in shown)
                                     for knob in all_knobs()}
                    num_frames = gr.Radio(FRAME_CHOICES, value=default_frames, label="Frames",
                                          info="Sampled uniformly from the video.", elem_id="frames")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_UI, value=default_tokens, step=1,
                                               label="Max new tokens", info="Upper bound on the answer's length.",
                                               elem_id="max-new-tokens")
                    ignore_eos = gr.Checkbox(value=loaded.is_random, label="Always generate max new tokens",
                                             info="Ignore end-of-sequence, so both runs decode the same number of "
                                                  "tokens (on by default for random weights).")
                    reset = gr.Button("Reset settings to defaults", size="sm", elem_id="reset")
                    gr.Markdown("\n".join(f"- `{name}`: {get_method(name).summary}" for name in names))
            with gr.Column(scale=3, min_width=320, elem_id="answers"):
                status = gr.Markdown(elem_id="status-line")
                error = gr.Markdown(elem_id="error-box")
                initial = placeholders()
                with gr.Row(elem_id="panes"):
                    comparison_column, (comparison_header, comparison_chat, comparison_stats,
                                        comparison_heatmap) = answer_pane(
                        "comparison", pane_header("Comparison", get_method(default_compare), defaults,
                                                  default_frames, default_tokens, tokens, per_group),
                        "The comparison's answer streams here.", initial["comparison_heatmap"])
                    _, (method_header, method_chat, method_stats, method_heatmap) = answer_pane(
                        "method", pane_header("Method", get_method(default_method), defaults, default_frames,
                                              default_tokens, tokens, per_group),
                        "The method's answer streams here.", initial["method_heatmap"])
                gr.Markdown("**Heatmap:** one row per frame (its time on the left), one column per decoding "
                            "step (several once there are more than 120 steps, averaged); colour = share of that "
                            "frame's tokens the new token attended to at the pruned layers (1 = all). The first "
                            "column, TTM, is the share of each frame's tokens that entered the language model; the "
                            "red strip above the grid marks steps where DP picked its tokens again. Hover a cell "
                            "for the exact count.")
                headline = gr.Markdown(elem_id="headline")
                gauges = gr.Plot(initial["gauges"], show_label=False, elem_id="gauges")
                download = gr.DownloadButton("Download this run (JSON)", visible=False, size="sm",
                                             elem_id="download")
                gr.Markdown("**TTM view:** the sampled frames, with the 14×14 patches dropped before the language "
                            "model shaded red, and each frame's kept count.")
                ttm_view = gr.Plot(initial["ttm_view"], show_label=False, elem_id="ttm-view")

        outputs = [question, comparison_header, comparison_chat, comparison_stats, comparison_heatmap,
                   method_header, method_chat, method_stats, method_heatmap, headline, gauges, ttm_view, download,
                   status, error, state]
        assert len(outputs) == len(OUTPUTS)
        page = {"page_width": page_width, "dark": dark}
        settings_kwargs = {"match_budget": match_budget} | {api_name(knob): control
                                                            for knob, control in zip(all_knobs(),
                                                                                     knob_controls.values())}
        # Progress (decoding, encoding) shows in its own slot, not as an overlay on every output.
        run = {"outputs": outputs, "inputs_kwargs": settings_kwargs | page, "concurrency_id": GPU_QUEUE,
               "concurrency_limit": REQUEST_SLOTS, "show_progress": "full", "show_progress_on": [progress_slot]}
        asking = [video, question, method, compare, num_frames, max_new_tokens, ignore_eos, state]
        scroll = scroll_to_answers_js(len(asking) + len(run["inputs_kwargs"]))
        question.submit(handlers.ask, asking, api_name="ask", js=scroll, **run)
        send.click(handlers.ask, asking, api_visibility="undocumented", js=scroll, **run)
        regenerating = [video, method, compare, num_frames, max_new_tokens, ignore_eos, state]
        regenerate.click(handlers.regenerate, regenerating, api_name="regenerate",
                         js=scroll_to_answers_js(len(regenerating) + len(run["inputs_kwargs"])), **run)
        stop.click(handlers.stop, api_name="stop", queue=False)
        clear.click(handlers.clear, outputs=outputs, api_name="clear", queue=False)
        video.change(handlers.new_video, [video, num_frames], outputs, api_visibility="undocumented",
                     queue=False).then(
            lambda path: path if path and handlers.is_upload(path) else None, video, preview,
            api_visibility="undocumented", queue=False)
        for chat in (comparison_chat, method_chat):  # a pane's own trash icon clears the whole conversation
            chat.clear(handlers.clear, outputs=outputs, api_visibility="undocumented", queue=False)
        compare.change(lambda c: gr.update(visible=c != NO_COMPARISON), compare, comparison_column,
                       api_visibility="undocumented", queue=False)
        controls = [match_budget, *knob_controls.values()]
        for selector in (method, compare, match_budget):
            selector.change(shown_controls, [method, compare, match_budget], controls,
                            api_visibility="undocumented", queue=False, show_progress="hidden")
        header_inputs = {"inputs": [method, compare, num_frames, max_new_tokens], "inputs_kwargs": settings_kwargs}
        for knob in [method, compare, num_frames, max_new_tokens, *controls]:
            knob.change(functools.partial(preview_headers, handlers),
                        outputs=[comparison_header, method_header], api_visibility="undocumented", queue=False,
                        show_progress="hidden", **header_inputs)
        resettable = [method, compare, num_frames, max_new_tokens, ignore_eos, *controls]
        reset.click(lambda: [default_method, default_compare, default_frames, default_tokens, loaded.is_random, True]
                    + [min(knob.default, loaded.num_layers - 1) if knob.kind == "layer" else knob.default
                       for knob in all_knobs()],
                    outputs=resettable, api_visibility="undocumented", queue=False)
        # No load-time handler writes these outputs: their first values are set above, and one answered late
        # would overwrite what an upload (or a Send) made of them meanwhile.
        demo.unload(handlers.end_page)
        demo.load(None, outputs=[page_width, dark], js=PAGE_INFO_JS, api_visibility="undocumented")
    handlers.serve_from(Path(demo.GRADIO_CACHE))
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=4)
    demo.dycoke = handlers  # for tests: the handlers, their pipeline and clip cache
    return demo


def launch_app(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **options):
    """Serve `demo` with the app's CSS and upload limit; extra options go to `Blocks.launch`."""
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, css=CSS,
                       footer_links=["api", "gradio"], show_error=True, **options)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DyCoke web app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--model", default=os.environ.get("DYCOKE_MODEL") or DEFAULT_HUB_ID,
                        help=f"tiny, a Hub id or a local path (default DYCOKE_MODEL, else {DEFAULT_HUB_ID})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.port is None:
        env_port = os.environ.get("GRADIO_SERVER_PORT", "7860")
        try:
            args.port = int(env_port)
        except ValueError:
            parser.error(f"GRADIO_SERVER_PORT must be a port number, got {env_port!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    choice = load_model(args.model, device=args.device)
    log.info("serving %s", choice.loaded.describe())
    launch_app(build_app(choice), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
