"""Plotly figures for a request's trace and metrics: per-step heatmap, TTM frame view, gauges, benchmark plot.

Every builder takes plain Python data (the CLI JSON contract) and returns a `plotly.graph_objects.Figure`.
Figure data are plain lists: plotly.py 6 turns numpy arrays into base64 typed arrays, which the older
plotly.js bundled with some gradio versions cannot read.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.colors import DEFAULT_PLOTLY_COLORS, sequential
from plotly.subplots import make_subplots
from PIL import Image

if TYPE_CHECKING:
    from dycoke.config import DyCokeConfig
    from dycoke.methods import Method

HEATMAP_UIREVISION = "dycoke-heatmap"
# Viridis spelled out, as plotly's validation would: the unvalidated live heatmap must be the same figure.
VIRIDIS = [[i / (len(sequential.Viridis) - 1), color] for i, color in enumerate(sequential.Viridis)]
RESELECTION_SCALE = [[0.0, "rgba(220, 20, 60, 0)"], [1e-6, "rgba(220, 20, 60, 0.45)"], [1.0, "rgb(220, 20, 60)"]]
MAX_STEP_COLUMNS = 120  # more steps than this are binned, so that a column stays a few pixels wide
MAX_STEP_TICKS = 6
FRAME_TICK_PX = 16  # vertical room one frame-time label needs
HEATMAP_HEIGHT = 360
HEATMAP_MARGIN = {"l": 52, "r": 8, "t": 30, "b": 36}
STRIP_SHARE = 0.07  # the reselection strip's share of the plot's height, above the grid
BYTES_PER_MB = 1_000_000
TITLE_FONT_PX = 13
# A title line's width per character, in ems: above the mean of sans-serif fonts (Open Sans, DejaVu Sans) on
# mixed lowercase text and digits, so that an estimate that fits also fits when drawn.
TITLE_EM_PER_CHAR = 0.6
TITLE_LINE_PX = 17  # the height a further title line adds at TITLE_FONT_PX


def _seconds_label(seconds: float) -> str:
    return f"{seconds:.1f} s"


def _wrapped(parts: list[str], joiner: str, most: int) -> list[str]:
    """`parts` joined by `joiner` into lines of at most `most` characters where they fit (a longer part makes a
    line of its own, to be wrapped further by the caller)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(joiner) + len(part) <= most:
            lines[-1] += joiner + part
        else:
            lines.append(part)
    return lines


def fit_title(text: str, width_px: int | None, font_px: int = TITLE_FONT_PX) -> list[str]:
    """`text` as lines that fit `width_px` at `font_px`: broken at its " · " separators, and within a part too
    long for a line at spaces; when that takes more lines than breaking at any space, at any space. One line when
    `width_px` is None (no known width) or when it fits."""
    if not width_px:
        return [text]
    most = max(8, int(width_px / (font_px * TITLE_EM_PER_CHAR)))
    at_separators = [line for part in _wrapped(text.split(" · "), " · ", most)
                     for line in _wrapped(part.split(" "), " ", most)]
    words: list[str] = []
    for word in text.split(" "):  # a separator stays at the end of its line, never starts one
        if word == "·" and words:
            words[-1] += " ·"
        else:
            words.append(word)
    at_spaces = _wrapped(words, " ", most)
    return at_separators if len(at_separators) <= len(at_spaces) else [line.removesuffix(" ·") for line in at_spaces]


def title_layout(text: str, width_px: int | None, top_px: int) -> tuple[dict, int]:
    """A left-aligned title wrapped to `width_px`, and the top margin it needs (`top_px` for one line, one
    TITLE_LINE_PX more per further line). Plotly centres it in that margin; anchored to the top instead
    (yanchor "top"), plotly.js draws a title of several lines one line too high, its first line cut off."""
    lines = fit_title(text, width_px)
    title = {"text": "<br>".join(lines), "font": {"size": TITLE_FONT_PX}, "x": 0, "xanchor": "left"}
    return title, top_px + TITLE_LINE_PX * (len(lines) - 1)


# --- themes -------------------------------------------------------------------------------------------


def theme_layout(dark: bool = False) -> dict:
    """Layout colours that follow the page: transparent backgrounds, and text and lines readable on them."""
    text, line = ("#e5e7eb", "#4b5563") if dark else ("#1f2937", "#d1d5db")
    return {"paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)", "font": {"color": text},
            "xaxis": {"gridcolor": line, "zerolinecolor": line, "linecolor": line},
            "yaxis": {"gridcolor": line, "zerolinecolor": line, "linecolor": line}}


def themed(fig: go.Figure, dark: bool = False) -> go.Figure:
    """`fig` with the page's theme applied to its layout and every axis."""
    theme = theme_layout(dark)
    axes = theme.pop("xaxis")
    fig.update_layout(**{key: value for key, value in theme.items() if key != "yaxis"})
    fig.update_xaxes(**axes)
    fig.update_yaxes(**axes)
    return fig


# --- per-step heatmap -------------------------------------------------------------------------------


def step_bins(num_steps: int, max_columns: int = MAX_STEP_COLUMNS) -> list[range]:
    """The decoding steps of each heatmap column: one step per column, or, past `max_columns` steps, runs of
    ceil(steps / max_columns) consecutive steps (the last run may be shorter)."""
    width = max(1, math.ceil(num_steps / max_columns))
    return [range(start, min(start + width, num_steps)) for start in range(0, num_steps, width)]


def _compact(value: float) -> float | int:
    """A cell value as short JSON: whole numbers as ints, the rest to one decimal."""
    rounded = round(float(value), 1)
    return int(rounded) if rounded.is_integer() else rounded


def _column_label(steps: range) -> str:
    return f"step {steps.start + 1}" if len(steps) == 1 else f"steps {steps.start + 1}–{steps.stop}"


def _thinned(values: list, most: int) -> list:
    """At most `most` of `values`, evenly spaced, the first always among them."""
    return values[::max(1, math.ceil(len(values) / max(1, most)))]


def _step_ticks(labels: list, most: int) -> list:
    """At most `most` step columns to label: all of them when they fit, else every k-th from the k-th on, so
    that the first label stands k columns clear of the TTM column's instead of on top of it."""
    spacing = max(1, math.ceil(len(labels) / max(1, most)))
    return labels[spacing - 1::spacing]


def _row_name(row: int, frames_per_group: int) -> str:
    """A heatmap row: one frame, or on Qwen-VL one temporal group of video frames (numbered from 0)."""
    if frames_per_group == 1:
        return f"frame {row}"
    first = row * frames_per_group
    return f"frames {first}–{first + frames_per_group - 1}"


def _step_heatmap_spec(trace: dict, title: str, height: int = HEATMAP_HEIGHT, dark: bool = False,
                       width: int | None = None) -> dict:
    """The heatmap as a plain {"data", "layout"} dict; `step_heatmap` and `live_step_heatmap` wrap it. The title
    is wrapped to fit `width` px (the plot's width, when known).

    Cells hold kept token counts (0..N, colour scale fixed): exact integers while a column is one step, the mean
    over the column's steps once they are binned. A column of None (the TTM column while streaming) is blank.
    """
    tokens_per_frame = trace["tokens_per_frame"]
    frame_times = [float(t) for t in trace["frame_times_s"]]
    num_frames = trace["frames"]
    steps = trace["steps"]
    bins = step_bins(len(steps))
    binned = any(len(b) > 1 for b in bins)
    kept = np.array([step["kept_per_frame"] for step in steps], dtype=float).reshape(len(steps), num_frames)
    reselected = np.array([bool(step.get("reselected")) for step in steps], dtype=int)

    frame_labels = [f"{_row_name(f, trace.get('frames_per_group', 1))} · {_seconds_label(frame_times[f])}"
                    for f in range(num_frames)]
    column_labels = ["TTM"] + [_column_label(b) for b in bins]
    ttm = trace["ttm_kept_per_frame"]
    z = [[None if ttm[f] is None else int(ttm[f])] + [_compact(kept[b, f].mean()) for b in bins]
         for f in range(num_frames)]
    average = f" (mean of {len(bins[0])} steps per column)" if binned else ""
    grid = {
        "type": "heatmap", "z": z, "x": column_labels, "y": frame_labels, "zmin": 0, "zmax": tokens_per_frame,
        "colorscale": VIRIDIS, "xgap": 0, "ygap": 0, "yaxis": "y", "name": "kept",
        "hovertemplate": f"%{{y}}<br>%{{x}}<br>kept %{{z}} of {tokens_per_frame} tokens{average}<extra></extra>",
        "colorbar": {"title": {"text": "kept", "side": "top"}, "thickness": 10, "len": 1 - STRIP_SHARE - 0.03,
                     "y": 0, "yanchor": "bottom", "tickvals": [0, tokens_per_frame / 2, tokens_per_frame],
                     "ticktext": ["0%", "50%", "100%"]},
    }
    strip = {
        "type": "heatmap", "z": [[None] + [int(reselected[b].sum()) for b in bins]], "x": column_labels,
        "y": ["reselected"], "zmin": 0, "zmax": max(1, len(bins[0]) if bins else 1),
        "colorscale": RESELECTION_SCALE, "showscale": False, "xgap": 0, "yaxis": "y2", "name": "reselected",
        "hovertemplate": "%{x}<br>%{z} reselection(s) of DP's tokens<extra></extra>",
    }
    title_spec, top = title_layout(title, width, HEATMAP_MARGIN["t"]) if title else ({"text": ""}, 10)
    plot_px = height - top - HEATMAP_MARGIN["b"]
    frame_ticks = _thinned(list(range(num_frames)), int(plot_px * (1 - STRIP_SHARE) // FRAME_TICK_PX))
    step_ticks = ["TTM"] + _step_ticks(column_labels[1:], MAX_STEP_TICKS - 1)
    theme = theme_layout(dark)
    layout = {
        "title": title_spec, "uirevision": HEATMAP_UIREVISION, "height": height, "margin": dict(HEATMAP_MARGIN, t=top),
        "paper_bgcolor": theme["paper_bgcolor"], "plot_bgcolor": theme["plot_bgcolor"], "font": theme["font"],
        # No grid: the cells cover it, and over an empty reselection strip it drew white lines in dark mode.
        "xaxis": {"type": "category", "showgrid": False, "tickvals": step_ticks,
                  "ticktext": [label.removeprefix("steps ").removeprefix("step ").split("–")[0] for label in step_ticks],
                  "title": {"text": "decoding step" + (f" ({len(bins[0])} per column)" if binned else ""),
                            "standoff": 4}},
        "yaxis": {"type": "category", "autorange": "reversed", "domain": [0, 1 - STRIP_SHARE - 0.02],
                  "tickvals": [frame_labels[f] for f in frame_ticks],
                  "ticktext": [_seconds_label(frame_times[f]) for f in frame_ticks]},
        "yaxis2": {"type": "category", "domain": [1 - STRIP_SHARE, 1], "tickvals": ["reselected"],
                   "ticktext": ["resel."], "tickfont": {"size": 10}},
    }
    return {"data": [grid, strip], "layout": layout}


def step_heatmap(trace: dict, title: str = "", height: int = HEATMAP_HEIGHT, dark: bool = False,
                 width: int | None = None) -> go.Figure:
    """Frames (rows, frame 0 on top) × [TTM, steps] (columns), cell = tokens of the frame kept; a thin strip above
    the grid marks the steps where DP selected its tokens again. The title wraps to fit `width` px."""
    return go.Figure(_step_heatmap_spec(trace, title, height, dark, width))


def live_step_heatmap(trace: dict, title: str = "", height: int = HEATMAP_HEIGHT, dark: bool = False,
                      width: int | None = None) -> go.Figure:
    """`step_heatmap` without plotly's property validation, for updates while a request is still generating.

    The same figure, built several times faster: validation competes for the GIL with the generation thread
    whose speed the app reports. The unit tests check that it equals the validated figure.
    """
    return go.Figure(_step_heatmap_spec(trace, title, height, dark, width), _validate=False)


def step_heatmap_title(method: str, trace: dict, reselections: int | None = None) -> str:
    """"dycoke · 64 new tokens (63 decoding steps) · 5 reselections": the first token comes from the prefill."""
    steps = len(trace["steps"])
    text = f"{method} · {steps + 1} new tokens ({steps} decoding steps)"
    return text if reselections is None else f"{text} · {reselections} reselections"


def partial_trace(
    frame_times_s: list[float],
    tokens_per_frame: int,
    steps: list[dict],
    ttm_kept_per_frame: list[int] | None = None,
    frames_per_group: int = 1,
) -> dict:
    """A trace in the CLI contract's layout from what a stream has delivered so far, for `step_heatmap`.

    `steps` are {"kept_per_frame": [...], "reselected": bool} dicts, one per StepTrace received. Without
    `ttm_kept_per_frame` (known only once the Result arrives) the TTM column is None: blank.
    """
    frames = len(frame_times_s)
    for index, step in enumerate(steps):
        if len(step["kept_per_frame"]) != frames:
            raise ValueError(f"step {index + 1} has {len(step['kept_per_frame'])} frames, expected {frames}")
    return {
        "frames": frames,
        "frames_per_group": int(frames_per_group),
        "tokens_per_frame": int(tokens_per_frame),
        "frame_times_s": [float(t) for t in frame_times_s],
        "ttm_kept_per_frame": [None] * frames if ttm_kept_per_frame is None else [int(k) for k in ttm_kept_per_frame],
        "steps": [{"kept_per_frame": [int(k) for k in step["kept_per_frame"]],
                   "reselected": bool(step.get("reselected", False))} for step in steps],
    }


# --- placeholders -------------------------------------------------------------------------------------


def placeholder_figure(message: str, height: int = 260) -> go.Figure:
    """An empty figure with one centred line of text: what a plot shows before there is anything to plot."""
    fig = go.Figure()
    fig.update_layout(
        height=height, margin={"l": 10, "r": 10, "t": 10, "b": 10},
        xaxis={"visible": False}, yaxis={"visible": False},
        plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)",
        annotations=[{"text": message, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
                      "showarrow": False, "font": {"size": 14, "color": "#888"}}],
    )
    return fig


# --- TTM frame thumbnails ---------------------------------------------------------------------------

TITLE_STRIP_PX = 22
GAP_PX = 4
BACKGROUND_RGB = {False: (255, 255, 255), True: (17, 24, 39)}  # light, dark
DESKTOP_PLOT_PX = 880  # the answers column's width in a desktop layout
NARROW_PAGE_PX = 900  # below this the page stacks its columns: a plot spans the page
NARROW_PADDING_PX = 64
PANE_GAP_PX = 16  # between the two answer panes side by side
MIN_THUMB_PX = 96  # a frame's label ("12.5 s · 58/196") must fit above its thumbnail


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of a frame's `tokens` visual tokens: frames at the model's size have the grid's aspect ratio
    (Qwen-VL resizes to whole tokens, e.g. 168x308 -> 6x11); a grid that does not fit is taken as square (14x14)."""
    rows = round(math.sqrt(tokens * height / width))
    if rows and tokens % rows == 0:
        return rows, tokens // rows
    side = math.isqrt(tokens)
    return side, side


def _shade_dropped(thumbnail: np.ndarray, keep_row: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    height, width = thumbnail.shape[:2]
    row_edges = np.linspace(0, height, grid[0] + 1).round().astype(int)
    col_edges = np.linspace(0, width, grid[1] + 1).round().astype(int)
    dropped = np.zeros((height, width), dtype=bool)
    for index in np.flatnonzero(keep_row == 0):
        r, c = divmod(int(index), grid[1])
        dropped[row_edges[r]:row_edges[r + 1], col_edges[c]:col_edges[c + 1]] = True
    shaded = thumbnail.astype(np.float32)
    shaded[dropped] = shaded[dropped] * 0.35 + np.array([70.0, 0.0, 0.0])
    return shaded.round().clip(0, 255).astype(np.uint8)


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def ttm_frames_figure(
    frames: np.ndarray,
    keep_mask: list[list[int]] | np.ndarray,
    timestamps: list[float],
    kept_per_frame: list[int],
    patch_grid: int | tuple[int, int] = 14,
    max_cols: int = 8,
    thumb: int = 160,
    dark: bool = False,
    font_size: int = 11,
) -> go.Figure:
    """Grid of frame thumbnails with the patches TTM dropped darkened and tinted red, as one composite image;
    each thumbnail's time and kept count in a strip above it. `patch_grid` is the tokens' grid per frame: a side,
    or (rows, columns)."""
    frames = np.asarray(frames)
    keep_mask = np.asarray(keep_mask)
    num_frames, frame_h, frame_w = frames.shape[:3]
    grid = (patch_grid, patch_grid) if isinstance(patch_grid, int) else tuple(patch_grid)
    tokens = grid[0] * grid[1]
    if keep_mask.shape != (num_frames, tokens):
        raise ValueError(f"keep_mask must be {num_frames}×{tokens}, got {keep_mask.shape}")
    thumb_w, thumb_h = thumb, max(1, round(thumb * frame_h / frame_w))
    cols = min(num_frames, max_cols)
    rows = math.ceil(num_frames / cols)
    cell_w, cell_h = thumb_w + GAP_PX, thumb_h + TITLE_STRIP_PX + GAP_PX
    composite = Image.new("RGB", (cols * cell_w + GAP_PX, rows * cell_h + GAP_PX), BACKGROUND_RGB[dark])

    annotations = []
    for f in range(num_frames):
        r, c = divmod(f, cols)
        left, top = GAP_PX + c * cell_w, GAP_PX + r * cell_h
        small = np.asarray(Image.fromarray(frames[f]).resize((thumb_w, thumb_h), Image.BILINEAR))
        composite.paste(Image.fromarray(_shade_dropped(small, keep_mask[f], grid)), (left, top + TITLE_STRIP_PX))
        annotations.append({
            "x": left + thumb_w / 2, "y": top + TITLE_STRIP_PX / 2, "xref": "x", "yref": "y", "showarrow": False,
            "text": f"{float(timestamps[f]):.1f} s · {int(kept_per_frame[f])}/{tokens}",
            "font": {"size": font_size},
        })

    fig = go.Figure(go.Image(source=_png_data_uri(composite), hoverinfo="skip"))
    fig.update_layout(
        annotations=annotations, margin={"l": 0, "r": 0, "t": 0, "b": 0}, height=composite.height,
        xaxis={"visible": False}, yaxis={"visible": False},
    )
    return themed(fig, dark)


def plot_width(page_width: int | None) -> int:
    """About how wide a plot in the answers column is drawn on a page `page_width` px wide."""
    if not page_width:
        return DESKTOP_PLOT_PX
    if page_width < NARROW_PAGE_PX:  # the page's and the column's paddings: 326 px on a 390 px page
        return max(240, int(page_width) - NARROW_PADDING_PX)
    return min(DESKTOP_PLOT_PX, int(page_width * 0.7))


def pane_width(page_width: int | None) -> int:
    """About how wide a plot in one answer pane is drawn: the answers column's width on a narrow page (the panes
    stacked), half of it, less the gap, on a wide one (the panes side by side)."""
    width = plot_width(page_width)
    return width if page_width and page_width < NARROW_PAGE_PX else (width - PANE_GAP_PX) // 2


def ttm_view(frames: np.ndarray, timestamps: list[float], method: str, trace: dict, metrics: dict,
             page_width: int | None = None, dark: bool = False) -> go.Figure:
    """The TTM frame view sized for the page: as many columns as fit thumbnails of at least MIN_THUMB_PX, the
    composite as wide as the plot (so that plotly draws it at full size, with no empty bands), and a title.

    On a model that merges frames into temporal groups (Qwen-VL: the trace counts groups), each group is drawn
    by its first frame, at the group's time."""
    groups = trace["frames"]
    if groups != len(frames):
        frames = np.asarray(frames)[::math.ceil(len(frames) / groups)]
        timestamps = trace["frame_times_s"]
    grid = token_grid(trace["tokens_per_frame"], *np.asarray(frames).shape[1:3])
    width = plot_width(page_width)
    num_frames = len(frames)
    cols = max(1, min(num_frames, 8, (width - GAP_PX) // (MIN_THUMB_PX + GAP_PX)))
    thumb = (width - GAP_PX) // cols - GAP_PX
    fig = ttm_frames_figure(frames, trace["ttm_keep_mask"], list(timestamps), trace["ttm_kept_per_frame"],
                            patch_grid=grid, max_cols=cols, thumb=thumb, dark=dark, font_size=10 if thumb < 130 else 11)
    kept, total = metrics["visual_tokens_after_ttm"], metrics["visual_tokens_in"]
    title, top = title_layout(f"{method}: {kept:,} of {total:,} visual tokens enter the language model "
                              f"({100 * kept / total:.0f}%)", width, 30)
    fig.update_layout(title=title, margin={"l": 0, "r": 0, "t": top, "b": 0}, height=fig.layout.height + top)
    return fig


# --- gauges -------------------------------------------------------------------------------------------

BETTER, WORSE, NEUTRAL, COMPARISON_GREY = "#2e9d57", "#d9534f", "#6b7a90", "#9ca3af"
SAME_WITHIN = 0.03  # ratios within 3% of 1 read as "the same": one run's timings are noisier than that


@dataclass(frozen=True)
class Quantity:
    """One gauge: a figure from the metrics, its unit, and which way is better."""

    key: str
    title: str
    unit: str
    value: float | None
    lower_is_better: bool
    number_format: str
    timed: bool  # a timing, which varies from run to run (token counts do not)


def _memory(metrics: dict, use_peak: bool) -> tuple[float | None, str]:
    key, title = ("peak_memory_bytes", "peak memory") if use_peak else ("kv_cache_bytes", "KV cache")
    value = metrics.get(key)
    return (None if value is None else value / BYTES_PER_MB), title


def _quantities(metrics: dict, use_peak: bool) -> list[Quantity]:
    memory, memory_title = _memory(metrics, use_peak)
    return [
        Quantity("ttft_ms", "time to first token", "ms", metrics.get("ttft_ms"), True, ",.0f", True),
        Quantity("decode_tokens_per_s", "decode speed", "tokens/s", metrics.get("decode_tokens_per_s"), False,
                 ",.1f", True),
        Quantity("memory_mb", memory_title, "MB", memory, True, ",.1f", False),
        Quantity("visual_attended", "visual tokens per step", "attended",
                 metrics.get("visual_tokens_attended_mean"), True, ",.0f", False),
    ]


def _uses_peak(*sides: dict) -> bool:
    return all(side.get("peak_memory_bytes") is not None for side in sides)


def gain(method: float | None, comparison: float | None, lower_is_better: bool) -> float | None:
    """How many times better the method is than the comparison (above 1: better), or None when unknown."""
    if method is None or comparison is None or method <= 0 or comparison <= 0:
        return None
    return comparison / method if lower_is_better else method / comparison


def direction_colour(ratio: float | None) -> str:
    if ratio is None or abs(ratio - 1) <= SAME_WITHIN:
        return NEUTRAL
    return BETTER if ratio > 1 else WORSE


def _times(ratio: float) -> str:
    return f"{ratio:.2f}×" if ratio < 1.1 else f"{ratio:.1f}×"


def gauges_figure(method: str, metrics: dict, comparison: str | None = None, comparison_metrics: dict | None = None,
                  dark: bool = False) -> go.Figure:
    """One row per figure (time to first token, decode speed, memory, visual tokens attended): the method's bar,
    coloured by whether it is better or worse than the comparison, the comparison's bar in grey, and a tick on
    the method's bar at the comparison's value. Titles sit on a line of their own above each row."""
    sides = [metrics] + ([comparison_metrics] if comparison_metrics is not None else [])
    use_peak = _uses_peak(*sides)
    if comparison == method:  # one bar each, even when a method is compared with itself
        comparison = f"{comparison} (comparison)"
    ours = _quantities(metrics, use_peak)
    theirs = _quantities(comparison_metrics, use_peak) if comparison_metrics is not None else [None] * len(ours)
    titles = []
    for mine, other in zip(ours, theirs):
        arrow = "lower is better" if mine.lower_is_better else "higher is better"
        title = f"<b>{mine.title}</b> ({mine.unit}; {arrow})"
        ratio = gain(mine.value, other.value if other else None, mine.lower_is_better)
        if ratio is not None:
            title += f" · <b>{_times(ratio)}</b>"
        titles.append(title)
    fig = make_subplots(rows=len(ours), cols=1, subplot_titles=titles, vertical_spacing=0.12)
    for row, (mine, other) in enumerate(zip(ours, theirs), start=1):
        ratio = gain(mine.value, other.value if other else None, mine.lower_is_better)
        bars = ([(comparison, other.value, COMPARISON_GREY)] if other is not None else []) + \
               [(method, mine.value, direction_colour(ratio))]
        names = [name for name, _, _ in bars]
        values = [value for _, value, _ in bars]
        known = [value for value in values if value is not None]
        fig.add_trace(go.Bar(
            name=f"{method}/{mine.key}", orientation="h", y=names, x=[0 if v is None else v for v in values],
            marker={"color": [colour for _, _, colour in bars]}, width=0.6,
            text=["n/a" if v is None else format(v, mine.number_format) for v in values],
            textposition="outside", cliponaxis=False, hoverinfo="skip", showlegend=False,
        ), row=row, col=1)
        if other is not None and other.value is not None:
            fig.add_trace(go.Scatter(
                name=f"{comparison}/{mine.key}", x=[other.value], y=[method], mode="markers", showlegend=False,
                marker={"symbol": "line-ns", "size": 22, "line": {"width": 3, "color": COMPARISON_GREY}},
                hovertemplate=f"{comparison}: %{{x:{mine.number_format}}} {mine.unit}<extra></extra>",
            ), row=row, col=1)
        fig.update_xaxes(range=[0, 1.3 * max(known, default=1.0) or 1.0], visible=False, row=row, col=1)
        fig.update_yaxes(autorange="reversed", automargin=True, row=row, col=1)
    fig.update_annotations(font={"size": 12}, x=0, xanchor="left")
    fig.update_layout(height=100 * len(ours) + 20, margin={"l": 8, "r": 8, "t": 28, "b": 4}, bargap=0.2)
    return themed(fig, dark)


def headline(method: str, metrics: dict, comparison: str | None = None, comparison_metrics: dict | None = None,
             same_answer: bool | None = None) -> str:
    """One line that reads at a glance: "dycoke vs baseline: 2.4× faster to first token, 1.7× less KV cache,
    same answer.", then a note that timings are from a single run each."""
    if comparison_metrics is None:
        ttft = metrics.get("ttft_ms")
        first = "n/a" if ttft is None else f"{ttft:,.0f} ms"
        return (f"**{method}: {first} to the first token, "
                f"{metrics.get('visual_tokens_attended_mean', 0):,.0f} visual tokens attended per step** "
                "(no comparison run). Timings are from this single run.")
    use_peak = _uses_peak(metrics, comparison_metrics)
    speed = gain(metrics.get("ttft_ms"), comparison_metrics.get("ttft_ms"), True)
    mine, _ = _memory(metrics, use_peak)
    theirs, memory_title = _memory(comparison_metrics, use_peak)
    memory = gain(mine, theirs, True)
    parts = [_compared(speed, "faster to first token", "slower to first token", "as fast to first token"),
             _compared(memory, f"less {memory_title}", f"more {memory_title}", f"the same {memory_title}")]
    if same_answer is not None:
        parts.append("same answer" if same_answer else "different answer")
    text = ", ".join(part for part in parts if part)
    return (f"**{method} vs {comparison}: {text}.** Timings are from a single run of each, one after the other, "
            "so they vary from run to run; token counts and memory are exact.")


def _compared(ratio: float | None, better: str, worse: str, same: str) -> str:
    if ratio is None:
        return ""
    if abs(ratio - 1) <= SAME_WITHIN:
        return same
    return f"{_times(ratio)} {better}" if ratio > 1 else f"{_times(1 / ratio)} {worse}"


# --- benchmark -----------------------------------------------------------------------------------------


def bench_figure(rows: list[dict]) -> go.Figure:
    """Latency and memory against frame count, one line per method."""
    use_peak = bool(rows) and all(row.get("peak_memory_bytes") is not None for row in rows)
    memory_key = "peak_memory_bytes" if use_peak else "kv_cache_bytes"
    memory_title = "peak memory (MB)" if use_peak else "KV cache (MB)"
    fig = make_subplots(rows=1, cols=2, subplot_titles=["latency (ms)", memory_title])
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for index, method in enumerate(methods):
        method_rows = sorted((row for row in rows if row["method"] == method), key=lambda row: row["frames"])
        frames = [int(row["frames"]) for row in method_rows]
        color = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
        line = {"mode": "lines+markers", "name": method, "legendgroup": method, "line": {"color": color}}
        fig.add_trace(go.Scatter(x=frames, y=[float(row["latency_ms"]) for row in method_rows], **line), row=1, col=1)
        memory = [None if row.get(memory_key) is None else row[memory_key] / BYTES_PER_MB for row in method_rows]
        fig.add_trace(go.Scatter(x=frames, y=memory, showlegend=False, **line), row=1, col=2)
    fig.update_xaxes(title_text="frames")
    fig.update_yaxes(title_text="latency (ms)", row=1, col=1)
    fig.update_yaxes(title_text=memory_title, row=1, col=2)
    return fig


# --- text ----------------------------------------------------------------------------------------------


def _knob_value(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def frames_label(num_frames: int, frames_per_group: int = 1) -> str:
    """`16 frames`, or on a model that merges frames into temporal groups (Qwen-VL) `16 frames in 8 groups`."""
    frames = f"{num_frames} frame{'s' * (num_frames != 1)}"
    if frames_per_group == 1:
        return frames
    groups = math.ceil(num_frames / frames_per_group)  # the processors repeat the last frame to fill a group
    return f"{frames} in {groups} group{'s' * (groups != 1)}"


def settings_line(method: "Method", config: "DyCokeConfig", num_frames: int, max_new_tokens: int,
                  tokens_per_frame: int, frames_per_group: int = 1) -> str:
    """The knobs `method` really uses, by their page labels, with a matched drop ratio resolved for this clip.

    `tokens_per_frame` counts per temporal group of `frames_per_group` video frames (2 on Qwen-VL): budgets are
    matched over the groups, which are what TTM, DP and the traces call frames."""
    from dycoke.methods import configured_values  # viz formats; methods knows what a method's knobs hold

    resolved = method.resolve(config, math.ceil(num_frames / frames_per_group), tokens_per_frame)
    parts = [f"{knob.label} {_knob_value(value)}" for knob, value in configured_values(resolved, config)]
    match = getattr(resolved, "match", None)
    if match is not None:
        parts.append(f"matched to {match}'s budget")
    if not parts:
        parts.append("no compression")
    return " · ".join(parts + [frames_label(num_frames, frames_per_group), f"≤{max_new_tokens} new tokens"])


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / BYTES_PER_MB:.1f} MB"


def stats_line(metrics: dict) -> str:
    """A run's figures in one short markdown paragraph."""
    tokens_per_s = metrics.get("decode_tokens_per_s")
    memory = (f"peak memory {_mb(metrics['peak_memory_bytes'])}" if metrics.get("peak_memory_bytes") is not None
              else f"KV cache {_mb(metrics.get('kv_cache_bytes'))}")
    speed = "n/a" if tokens_per_s is None else f"{tokens_per_s:.1f}"
    line = (f"TTFT **{metrics['ttft_ms']:,.0f} ms** · decode **{speed} tok/s** · {metrics['new_tokens']} new tokens · "
            f"visual tokens {metrics['visual_tokens_in']:,} → {metrics['visual_tokens_after_ttm']:,} → "
            f"**{metrics['visual_tokens_attended_mean']:,.0f}** attended per step · {memory} · "
            f"{metrics['reselections']} reselections")
    if metrics.get("prefix_reused"):
        line += f" · video prefix reused: {metrics['prefill_tokens']:,} new tokens prefilled"
    return line
