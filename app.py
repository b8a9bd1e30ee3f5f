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
import hashlib
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from dycoke import viz
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.limits import RequestError, check_new_tokens, clean_question
from dycoke.methods import get_method, method_names
from dycoke.models import DEFAULT_HUB_ID, OFFLINE_DEFAULT, LoadedModel, ModelLoadError, load
from dycoke.pipeline import Pipeline, Result, StepTrace, TextDelta
from dycoke.video import VideoClip, VideoError

log = logging.getLogger("dycoke.app")

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
EXAMPLE_QUESTIONS = {
    "moving_shapes.mp4": "Which shapes move, and in which direction?",
    "scene_cut.mp4": "What changes halfway through the video?",
    "static_scene.mp4": "What is moving in the room?",
}

FRAME_CHOICES = [8, 16, 32, 64]
WINDOW_CHOICES = [1, 2, 4, 8]
MAX_NEW_TOKENS_UI = 512
TEXT_INTERVAL_S = 0.1  # streamed text: at most ~10 updates a second
HEATMAP_INTERVAL_S = 0.25  # at most ~4 heatmap updates a second while streaming, plus one at the end
HEATMAP_HEIGHT = 380
GPU_QUEUE = "gpu"  # every event that runs the model shares this concurrency id, with a limit of 1
QUEUE_MAX_SIZE = 16
MAX_FILE_SIZE = "200mb"
# Gradio's own upload cache: every hour, remove uploads older than two hours (a conversation rarely lasts longer;
# a follow-up about a removed upload is asked to upload it again).
DELETE_CACHE = (3600, 7200)
ZERO_GPU_DURATION_S = 120
CLIP_CACHE_ITEMS = 6
CLIP_CACHE_BYTES = 1_500_000_000
NO_COMPARISON = "none"

CSS = """
#model-banner { padding: 8px 14px; border-radius: 8px; border: 1px solid var(--border-color-primary); }
#model-banner.random-weights { background: #fff4e5; border-color: #f0a040; color: #5a3500; }
#model-banner.random-weights strong { color: #8a3b00; }
#model-banner p { margin: 2px 0; }
.pane-header { min-height: 3.6em; }
.pane-header p { margin: 2px 0; }
.pane-stats { min-height: 2.6em; font-size: 0.9em; }
#status-line { font-size: 0.9em; color: var(--body-text-color-subdued); }
#progress-slot { min-height: 2.8em; }
"""


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
        log.warning("%s; falling back to the tiny model with random demo weights", error)
        return ModelChoice(load(OFFLINE_DEFAULT, device=device), name, fallback_reason=str(error))


def banner_markdown(choice: ModelChoice) -> str:
    loaded = choice.loaded
    dtype = str(loaded.dtype).removeprefix("torch.")
    line = f"**Model** `{loaded.name}` ({loaded.family.name}) · device `{loaded.device.type}` · dtype `{dtype}`"
    if not loaded.is_random:
        return line + " · pretrained weights"
    lines = [line + " · **tiny random weights**",
             "⚠️ **The answers are from random demo weights and mean nothing.** Token counts, heatmaps and "
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


# --- formatting ----------------------------------------------------------------------------------------


def settings_text(method: str, config: DyCokeConfig, num_frames: int, max_new_tokens: int) -> str:
    """The knobs `method` really uses: DyCoke's where its stages are on, and the method's own options."""
    chosen = get_method(method)
    effective = chosen.effective_config(config)
    parts = []
    if effective.merge_ratio > 0:
        parts.append(f"K {effective.merge_ratio:.2f} · W {effective.window}")
    if effective.prune_ratio > 0:
        parts.append(f"L {effective.prune_layer} · P {effective.prune_ratio:.2f} · "
                     f"τ {effective.reselect_threshold:.2f}")
    options = chosen.options() if hasattr(chosen, "options") else {}
    parts += [f"{name} {value}" for name, value in options.items() if value is not None]
    if not parts:
        parts.append("no compression")
    return " · ".join(parts + [f"{num_frames} frames", f"≤{max_new_tokens} new tokens"])


def pane_header(role: str, method: str, config: DyCokeConfig, num_frames: int, max_new_tokens: int) -> str:
    if method == NO_COMPARISON:
        return f"**{role}: none**\n\nPick a method under *Settings → Compare with* to run one."
    summary = get_method(method).summary
    return f"**{role}: `{method}`** — {summary}\n\n`{settings_text(method, config, num_frames, max_new_tokens)}`"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f} MB"


def stats_markdown(result: Result) -> str:
    m = result.metrics
    tokens_per_s = m.get("decode_tokens_per_s")
    memory = (f"peak memory {_mb(m['peak_memory_bytes'])}" if m.get("peak_memory_bytes") is not None
              else f"KV cache {_mb(m.get('kv_cache_bytes'))} (peak memory not measurable on CPU)")
    return (
        f"TTFT **{m['ttft_ms']:.0f} ms** · decode **{'n/a' if tokens_per_s is None else f'{tokens_per_s:.1f}'} "
        f"tok/s** · total {m['total_ms']:.0f} ms · {m['new_tokens']} new tokens  \n"
        f"visual tokens {m['visual_tokens_in']:,} → {m['visual_tokens_after_ttm']:,} after TTM → "
        f"**{m['visual_tokens_attended_mean']:,.0f}** attended per step · {memory} · "
        f"{m['reselections']} reselections"
    )


def heatmap_figure(trace: dict, title: str, live: bool = False):
    """The per-step heatmap; while generating, the unvalidated (fast) build of the same figure."""
    fig = viz.live_step_heatmap(trace, title) if live else viz.step_heatmap(trace, title)
    fig.update_layout(height=HEATMAP_HEIGHT, title={"font": {"size": 13}})
    return fig


def friendly_video_error(error: VideoError, path: str) -> str:
    """The library's one-line message, with gradio's temporary upload path shortened to the file name."""
    return str(error).replace(str(path), f"'{Path(path).name}'")


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


def empty_state() -> dict:
    return {"video": None, "comparison": [], "method": []}


# --- the app -------------------------------------------------------------------------------------------

OUTPUTS = ("question", "comparison_header", "comparison_chat", "comparison_stats", "comparison_heatmap",
           "method_header", "method_chat", "method_stats", "method_heatmap", "gauges", "ttm_view", "status",
           "state")


def gpu(fn: Callable) -> Callable:
    """spaces.GPU on ZeroGPU, a no-op elsewhere."""
    return spaces.GPU(duration=ZERO_GPU_DURATION_S)(fn) if spaces is not None else fn


class DyCokeApp:
    """The request handlers, holding the pipeline and the decoded-clip cache (no tensors in gr.State)."""

    def __init__(self, pipeline: Pipeline, banner: str) -> None:
        self.pipeline = pipeline
        self.banner = banner
        self.clips = ClipCache()
        self._run_on_gpu = gpu(self._model_runs)
        # Where a video handed to `ask` may live: gradio's upload folder (uploads, cached examples) and the examples.
        self.upload_roots: tuple[Path, ...] = (Path(gr.utils.get_upload_folder()).resolve(), EXAMPLES_DIR.resolve())

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

    def clear(self) -> tuple:
        return self._outputs(
            comparison_chat=[], method_chat=[], comparison_stats="", method_stats="",
            comparison_heatmap=viz.placeholder_figure("The comparison's per-step heatmap appears here."),
            method_heatmap=viz.placeholder_figure("The per-step heatmap appears here."),
            gauges=viz.placeholder_figure("Gauges appear once an answer is complete.", height=200),
            ttm_view=viz.placeholder_figure("Frame thumbnails with the patches TTM dropped appear here.",
                                            height=200),
            status="", state=empty_state(),
        )

    def _settings(self, method, compare, merge_ratio, window, prune_layer, prune_ratio, threshold, num_frames,
                  max_new_tokens) -> tuple[DyCokeConfig, int, int]:
        names = method_names()
        if method not in names:
            raise gr.Error(f"Unknown method '{method}': pick one of {', '.join(names)}.")
        if compare != NO_COMPARISON and compare not in names:
            raise gr.Error(f"Unknown comparison '{compare}': pick '{NO_COMPARISON}' or one of {', '.join(names)}.")
        try:
            # Sliders hand over floats (and the API may send strings): plain int / float before the config.
            config = DyCokeConfig(
                merge_ratio=float(merge_ratio), window=int(window), prune_layer=int(round(float(prune_layer))),
                prune_ratio=float(prune_ratio), reselect_threshold=float(threshold),
            )
            config.check_layers(self.loaded.num_layers)
            num_frames = int(num_frames)
            if num_frames not in FRAME_CHOICES:
                raise RequestError(f"frames must be one of {FRAME_CHOICES}, got {num_frames}")
            max_new_tokens = check_new_tokens(int(round(float(max_new_tokens))))
        except (ConfigError, RequestError, TypeError, ValueError) as error:
            raise gr.Error(f"Bad setting: {error}. Fix it under Settings and ask again.") from None
        return config, num_frames, max_new_tokens

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
            raise gr.Error(friendly_video_error(error, video)) from None
        except RequestError as error:
            raise gr.Error(f"{error}. Pick fewer frames under Settings.") from None
        except Exception as error:  # the decoder's child process could not even start: say so, keep serving
            log_failure(ref, "decoding", error)
            raise gr.Error(f"Could not decode '{Path(video).name}' ({type(error).__name__}). Try again, or "
                           "re-encode it as H.264 MP4.") from None
        self.clips.put(key, clip)
        return clip, False

    def ask(self, video, question, method, compare, merge_ratio, window, prune_layer, prune_ratio, threshold,
            num_frames, max_new_tokens, ignore_eos, state, progress=gr.Progress()) -> Iterator[tuple]:
        """Answer `question` with the comparison, then with the method, streaming both panes; sequential runs."""
        if not video:
            raise gr.Error("No video yet: upload a video (MP4, WebM, MKV, AVI) or click an example, then ask.")
        if not self.is_upload(video):  # checked before any stat or open: no probing of the server's files
            log.warning("refused a video path outside the upload folder (path %s)", short_hash(video))
            raise gr.Error("Upload the video as a file (in the page, or with gradio_client's handle_file): "
                           "paths on the server are not accepted.")
        try:
            question = clean_question(question or "")
        except RequestError as error:
            raise gr.Error(f"{str(error)[0].upper()}{str(error)[1:]}.") from None
        config, num_frames, max_new_tokens = self._settings(
            method, compare, merge_ratio, window, prune_layer, prune_ratio, threshold, num_frames, max_new_tokens)
        # The logs name a request by a short hash; the question and the upload only as hashes of their own.
        ref = short_hash(video, question, time.time_ns(), threading.get_ident())
        log.info("request %s: video %s, question %s, %s vs %s, %d frames, %d new tokens", ref, short_hash(video),
                 short_hash(question), method, compare, num_frames, max_new_tokens)
        clip, reused = self._clip(video, num_frames, progress, ref)

        state = dict(state or empty_state())
        if state.get("video") != video:  # a new video starts a new conversation
            state = empty_state() | {"video": video}
        histories = {"comparison": list(state["comparison"]), "method": list(state["method"])}
        name = Path(video).name
        status = (f"Reused the {clip.num_frames} decoded frames of `{name}`: no second decode." if reused else
                  f"Decoded {clip.num_frames} frames of `{name}` in {clip.decode_seconds * 1000:.0f} ms "
                  "(once, shared by both runs and not counted in their timings).")
        status += " Each question is answered on its own: the model does not see earlier turns."
        clip = dataclasses.replace(clip, decode_seconds=0.0)

        yield self._outputs(
            question="", status=status,
            comparison_header=pane_header("Comparison", compare, config, num_frames, max_new_tokens),
            method_header=pane_header("Method", method, config, num_frames, max_new_tokens),
            comparison_chat=histories["comparison"] + ([{"role": "user", "content": question}]
                                                       if compare != NO_COMPARISON else []),
            method_chat=histories["method"] + [{"role": "user", "content": question}],
            comparison_stats="", method_stats="",
        )
        # Validation and decoding above run on the CPU; only the model runs below hold the GPU (on ZeroGPU, in
        # its worker process, which is why the clip cache is filled out here, where it persists).
        yield from self._run_on_gpu(clip, question, method, compare, config, num_frames, max_new_tokens,
                                    bool(ignore_eos), video, histories, progress, ref)

    def _model_runs(self, clip: VideoClip, question: str, method: str, compare: str, config: DyCokeConfig,
                    num_frames: int, max_new_tokens: int, ignore_eos: bool, video: str, histories: dict,
                    progress: gr.Progress, ref: str = "-") -> Iterator[tuple]:
        """The comparison, then the method, one after the other on the same frames, each streamed and timed."""
        runs = [("comparison", compare)] if compare != NO_COMPARISON else []
        runs.append(("method", method))
        results: dict[str, Result] = {}
        for index, (role, run_method) in enumerate(runs):
            def report(fraction: float, message: str, index=index, run_method=run_method) -> None:
                progress((index + fraction) / len(runs), desc=f"{run_method}: {message}")

            history = histories[role] + [{"role": "user", "content": question}]
            answer, shown_answer = "", None
            steps: list[dict] = []
            last_text = last_plot = 0.0
            events = self.pipeline.stream(
                clip, question, method=run_method, config=config, max_new_tokens=max_new_tokens,
                ignore_eos=ignore_eos, num_frames=num_frames, progress=report,
            )
            try:
                for event in events:
                    # Generation runs in its own thread and timestamps its tokens there; whatever this loop does
                    # competes with it for the GIL, so it only collects events and yields on a throttle.
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
                        trace = viz.partial_trace(*self.pipeline.frame_times_and_tokens(clip), steps)
                        updates[f"{role}_heatmap"] = heatmap_figure(
                            trace, f"{run_method} · step {len(steps)} (TTM column at the end)", live=True)
                    if updates:
                        yield self._outputs(**updates)
            except (ConfigError, RequestError, VideoError) as error:  # out of memory is a RequestError too
                log.warning("request %s: %s refused: %s", ref, run_method, type(error).__name__)
                message = user_message(error)
                if "ask again" not in message:
                    message += " Change the input and ask again."
                raise gr.Error(f"{run_method}: {message}") from None
            except Exception as error:  # a bug or a driver fault: no traceback to the user, keep serving
                log_failure(ref, run_method, error)
                raise gr.Error(f"{run_method}: something went wrong (error {ref}). Try again, with fewer frames "
                               "or fewer new tokens.") from None
            finally:
                events.close()
            result = results[role]
            shown = result.answer if result.answer else "(empty answer: the model ended at once)"
            histories[role] = history + [{"role": "assistant", "content": shown}]
            updates = {
                f"{role}_chat": histories[role],
                f"{role}_stats": stats_markdown(result),
                f"{role}_heatmap": heatmap_figure(
                    result.trace, f"{run_method} · {len(result.trace['steps'])} steps · "
                                  f"{result.metrics['reselections']} reselections"),
                "gauges": self._gauges(results, compare, method),
            }
            if role == "method":
                updates["ttm_view"] = self._ttm_view(clip, result)
                updates["state"] = {"video": video, **histories}
            yield self._outputs(**updates)

    @staticmethod
    def _side_names(compare: str, method: str) -> tuple[str, str]:
        if compare == method:
            return f"{compare} (comparison)", method
        return compare, method

    def _gauges(self, results: dict[str, Result], compare: str, method: str):
        comparison_name, method_name = self._side_names(compare, method)
        sides = {}
        if "comparison" in results:
            sides[comparison_name] = results["comparison"].metrics
        if "method" in results:
            sides[method_name] = results["method"].metrics
        fig = viz.gauges_figure(sides, reference=comparison_name if "comparison" in results else None)
        # Smaller titles and numbers than plotly's defaults, so that a row's titles clear the row above.
        fig.update_traces(title_font_size=13, number_font_size=30, selector={"type": "indicator"})
        return fig

    def _ttm_view(self, clip: VideoClip, result: Result):
        trace = result.trace
        # About 870 px wide, a little narrower than the plot in a desktop layout: plotly then draws the image at
        # full size, and the figure's height (set by the builder from the image) leaves no empty band.
        cols, thumb, font = (6, 140, 10) if clip.num_frames <= 32 else (8, 104, 9)
        fig = viz.ttm_frames_figure(clip.frames, trace["ttm_keep_mask"], list(clip.timestamps),
                                    trace["ttm_kept_per_frame"], max_cols=min(cols, clip.num_frames), thumb=thumb)
        kept = result.metrics["visual_tokens_after_ttm"]
        total = result.metrics["visual_tokens_in"]
        fig.update_annotations(font={"size": font})
        fig.update_layout(title={"text": f"{result.method}: {kept:,} of {total:,} visual tokens enter the language "
                                         f"model ({100 * kept / total:.0f}%); shaded patches were dropped before it",
                                 "font": {"size": 13}, "x": 0.01, "y": 0.99, "yanchor": "top"},
                          margin={"l": 0, "r": 0, "t": 30, "b": 0}, height=fig.layout.height + 30)
        return fig


def preview_headers(method, compare, merge_ratio, window, prune_layer, prune_ratio, threshold, num_frames,
                    max_new_tokens) -> tuple:
    """The pane headers for the settings as they stand, before anything runs; unchanged while a value is invalid."""
    try:
        config = DyCokeConfig(merge_ratio=float(merge_ratio), window=int(window), prune_layer=int(prune_layer),
                              prune_ratio=float(prune_ratio), reselect_threshold=float(threshold))
        frames, tokens = int(num_frames), int(max_new_tokens)
        return (pane_header("Comparison", compare, config, frames, tokens),
                pane_header("Method", method, config, frames, tokens))
    except (ConfigError, TypeError, ValueError):
        return gr.skip(), gr.skip()


def _examples() -> tuple[list[list[str]], list[str]]:
    files = sorted(EXAMPLES_DIR.glob("*.mp4"))
    rows = [[str(path), EXAMPLE_QUESTIONS.get(path.name, "What happens in this video?")] for path in files]
    return rows, [path.stem.replace("_", " ") for path in files]


def answer_pane(role: str, header: str, placeholder: str) -> tuple[gr.Column, tuple]:
    """One answer pane: its header, streaming chat, stats line and per-step heatmap."""
    with gr.Column(min_width=300) as column:
        components = (
            gr.Markdown(header, elem_classes=["pane-header"], elem_id=f"{role}-header"),
            gr.Chatbot(label=f"{role} answer", height=260, buttons=["copy"], render_markdown=False,
                       elem_id=f"{role}-chat", show_label=False, placeholder=placeholder),
            gr.Markdown(elem_classes=["pane-stats"], elem_id=f"{role}-stats"),
            gr.Plot(show_label=False, elem_id=f"{role}-heatmap"),
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
    max_layer = loaded.num_layers - 1
    default_frames = 32 if loaded.device.type == "cuda" else 16
    defaults = DyCokeConfig()

    with gr.Blocks(title="DyCoke: token compression for video LLMs", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("## DyCoke: dynamic token compression for video LLMs\n"
                    "Upload a video and ask about it. The same model answers twice, one run after the other: "
                    "once with the comparison method (left) and once with DyCoke or the method you pick (right).")
        gr.Markdown(handlers.banner, elem_id="model-banner",
                    elem_classes=["random-weights"] if loaded.is_random else [])
        state = gr.State(empty_state())
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                video = gr.Video(label="Video", sources=["upload"], height=240, elem_id="video")
                question = gr.Textbox(label="Question", placeholder="Ask about the video and press Enter",
                                      lines=1, max_lines=4, max_length=4096, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
                progress_slot = gr.Markdown(elem_id="progress-slot")  # where gr.Progress draws, nothing else
                status = gr.Markdown(elem_id="status-line")
                example_rows, example_labels = _examples()
                if example_rows:
                    gr.Examples(example_rows, inputs=[video, question], example_labels=example_labels,
                                label="Examples (synthetic clips)")
                with gr.Accordion("Settings", open=False):
                    method = gr.Dropdown(names, value=default_method, label="Method (right pane)",
                                         info="The compression method to try.")
                    compare = gr.Dropdown([NO_COMPARISON] + names, value=default_compare,
                                          label="Compare with (left pane)",
                                          info="Runs first, on the same frames; 'none' skips it.")
                    merge_ratio = gr.Slider(0.0, 0.95, value=defaults.merge_ratio, step=0.05, label="K · merge ratio",
                                            info="TTM: share of each non-reference frame's tokens dropped.")
                    window = gr.Radio(WINDOW_CHOICES, value=defaults.window, label="W · window",
                                      info="TTM: frames per window; the first frame of a window keeps all.")
                    prune_layer = gr.Slider(1, max_layer, value=min(defaults.prune_layer, max_layer), step=1,
                                            label="L · pruning layer",
                                            info=f"DP prunes layers L..{max_layer}; layer L−1 picks the tokens.")
                    prune_ratio = gr.Slider(0.0, 0.95, value=defaults.prune_ratio, step=0.05, label="P · prune ratio",
                                            info="DP: share of visual tokens left out at each decoding step.")
                    threshold = gr.Slider(-1.0, 1.0, value=defaults.reselect_threshold, step=0.01,
                                          label="τ · reselect threshold",
                                          info="DP picks again when attention's cosine to the last pick "
                                               "drops below τ.")
                    num_frames = gr.Radio(FRAME_CHOICES, value=default_frames, label="Frames",
                                          info="Sampled uniformly from the video.")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_UI, value=64, step=1, label="Max new tokens",
                                               info="Upper bound on the answer's length.")
                    ignore_eos = gr.Checkbox(value=loaded.is_random, label="Always generate max new tokens",
                                             info="Ignore end-of-sequence, so both runs decode the same number of "
                                                  "tokens (on by default for random weights).")
                    gr.Markdown("\n".join(f"- `{name}`: {get_method(name).summary}" for name in names))
            with gr.Column(scale=3):
                with gr.Row(equal_height=False):
                    comparison_column, (comparison_header, comparison_chat, comparison_stats,
                                        comparison_heatmap) = answer_pane(
                        "comparison", pane_header("Comparison", default_compare, defaults, default_frames, 64),
                        "The comparison's answer streams here.")
                    _, (method_header, method_chat, method_stats, method_heatmap) = answer_pane(
                        "method", pane_header("Method", default_method, defaults, default_frames, 64),
                        "The method's answer streams here.")
                gr.Markdown("**Heatmap:** one row per frame (its time on the left), one column per decoding "
                            "step; colour = share of that frame's tokens the new token attended to at layers ≥ L "
                            "(1 = all). The first column, TTM, is the share of each frame's tokens that entered "
                            "the language model; ▼ marks steps where DP picked its tokens again. Hover a cell "
                            "for kept/total.")
                gr.Markdown("**Gauges**, one row per run, each run timed alone: time to first token, decode speed, "
                            "memory (peak GPU memory, or the KV cache where peak memory cannot be measured), and "
                            "the share of visual tokens attended per step; the last row divides the comparison's "
                            "total time and memory by the method's (above 1× = the method is faster / lighter).")
                gauges = gr.Plot(show_label=False, elem_id="gauges")
                gr.Markdown("**TTM view:** the sampled frames, with the 14×14 patches dropped before the language "
                            "model shaded red, and each frame's kept count.")
                ttm_view = gr.Plot(show_label=False, elem_id="ttm-view")

        outputs = [question, comparison_header, comparison_chat, comparison_stats, comparison_heatmap,
                   method_header, method_chat, method_stats, method_heatmap, gauges, ttm_view, status, state]
        assert len(outputs) == len(OUTPUTS)
        inputs = [video, question, method, compare, merge_ratio, window, prune_layer, prune_ratio, threshold,
                  num_frames, max_new_tokens, ignore_eos, state]
        # Progress (decoding, encoding) shows in its own slot, not as an overlay on every output.
        run = {"fn": handlers.ask, "inputs": inputs, "outputs": outputs, "concurrency_id": GPU_QUEUE,
               "concurrency_limit": 1, "show_progress": "full", "show_progress_on": [progress_slot]}
        question.submit(api_name="ask", **run)
        send.click(api_visibility="undocumented", **run)
        clear.click(handlers.clear, outputs=outputs, api_name="clear", queue=False)
        video.change(handlers.clear, outputs=outputs, api_visibility="undocumented", queue=False)
        for chat in (comparison_chat, method_chat):  # a pane's own trash icon clears the whole conversation
            chat.clear(handlers.clear, outputs=outputs, api_visibility="undocumented", queue=False)
        compare.change(lambda c: gr.update(visible=c != NO_COMPARISON), compare, comparison_column,
                       api_visibility="undocumented", queue=False)
        knobs = [method, compare, merge_ratio, window, prune_layer, prune_ratio, threshold, num_frames, max_new_tokens]
        for knob in knobs:
            knob.change(preview_headers, knobs, [comparison_header, method_header],
                        api_visibility="undocumented", queue=False, show_progress="hidden")
        demo.load(handlers.clear, outputs=outputs, api_visibility="undocumented", queue=False)
    handlers.upload_roots = (Path(demo.GRADIO_CACHE).resolve(), EXAMPLES_DIR.resolve())
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=4)
    demo.dycoke = handlers  # for tests: the handlers, their pipeline and clip cache
    return demo


def launch_app(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **options):
    """Serve `demo` with the app's CSS and upload limit; extra options go to `Blocks.launch`."""
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, css=CSS,
                       footer_links=["api", "gradio"], **options)


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
