"""Plotly figures for a request's trace and metrics: per-step heatmap, TTM frame view, gauges, benchmark plot.

Every builder takes plain Python data (the CLI JSON contract) and returns a `plotly.graph_objects.Figure`.
Figure data are plain lists: plotly.py 6 turns numpy arrays into base64 typed arrays, which the older
plotly.js bundled with some gradio versions cannot read.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import plotly.graph_objects as go
from plotly.colors import DEFAULT_PLOTLY_COLORS, sequential
from plotly.subplots import make_subplots
from PIL import Image

HEATMAP_UIREVISION = "dycoke-heatmap"
# Viridis spelled out, as plotly's validation would: the unvalidated live heatmap must be the same figure.
VIRIDIS = [[i / (len(sequential.Viridis) - 1), color] for i, color in enumerate(sequential.Viridis)]
MAX_FRAME_TICKS = 32
BYTES_PER_MB = 1_000_000


def _seconds_label(seconds: float) -> str:
    return f"{seconds:.1f} s"


# --- per-step heatmap -------------------------------------------------------------------------------


def _step_heatmap_spec(trace: dict, title: str) -> dict:
    """The heatmap as a plain {"data", "layout"} dict; `step_heatmap` and `live_step_heatmap` wrap it."""
    tokens_per_frame = trace["tokens_per_frame"]
    frame_times = [float(t) for t in trace["frame_times_s"]]
    steps = trace["steps"]
    columns = [trace["ttm_kept_per_frame"]] + [step["kept_per_frame"] for step in steps]
    column_labels = ["TTM"] + [str(i) for i in range(1, len(steps) + 1)]
    frame_ids = list(range(trace["frames"]))

    # A TTM column of None (still streaming: the TTM counts come with the final result) is drawn as a gap.
    fractions = [[None if col[f] is None else int(col[f]) / tokens_per_frame for col in columns] for f in frame_ids]
    hover = [
        [
            f"frame {f} · {_seconds_label(frame_times[f])}<br>step {label}<br>"
            + ("kept: pending" if col[f] is None else f"kept {int(col[f])}/{tokens_per_frame}")
            for col, label in zip(columns, column_labels)
        ]
        for f in frame_ids
    ]
    heatmap = {
        "type": "heatmap", "z": fractions, "x": column_labels, "y": frame_ids, "zmin": 0, "zmax": 1,
        "colorscale": VIRIDIS, "text": hover, "hovertemplate": "%{text}<extra></extra>", "xgap": 1,
        "colorbar": {"title": {"text": "fraction kept"}},
    }
    reselected = [label for step, label in zip(steps, column_labels[1:]) if step.get("reselected")]
    # Markers sit on a virtual row -1, just above frame 0, so they never cover a cell.
    markers = {
        "type": "scatter", "x": reselected, "y": [-1] * len(reselected), "mode": "markers", "name": "reselected",
        "marker": {"symbol": "triangle-down", "size": 9, "color": "crimson"},
        "hovertemplate": "step %{x}: selection recomputed<extra></extra>", "showlegend": False,
    }
    tick_every = max(1, math.ceil(len(frame_ids) / MAX_FRAME_TICKS))
    tick_frames = frame_ids[::tick_every]
    layout = {
        "title": {"text": title}, "uirevision": HEATMAP_UIREVISION,
        "margin": {"l": 60, "r": 20, "t": 50 if title else 20, "b": 40},
        "xaxis": {"type": "category", "title": {"text": "decoding step (▼ = reselection)"}},
        "yaxis": {
            "title": {"text": "frame time"}, "range": [len(frame_ids) - 0.5, -1.5],  # descending: frame 0 on top
            "tickvals": tick_frames, "ticktext": [_seconds_label(frame_times[f]) for f in tick_frames],
        },
    }
    return {"data": [heatmap, markers], "layout": layout}


def step_heatmap(trace: dict, title: str = "") -> go.Figure:
    """Frames (rows, frame 0 on top) × [TTM, step 1..S] (columns); cell = fraction of the frame's tokens kept."""
    return go.Figure(_step_heatmap_spec(trace, title))


def live_step_heatmap(trace: dict, title: str = "", height: int | None = None) -> go.Figure:
    """`step_heatmap` without plotly's property validation, for updates while a request is still generating.

    The same figure, built about 7× faster: validating a few thousand hover strings takes tens of ms of
    Python, which would compete for the GIL with the generation thread whose speed the app reports. The
    unit tests check that it equals the validated figure.
    """
    spec = _step_heatmap_spec(trace, title)
    if height is not None:
        spec["layout"]["height"] = int(height)
    return go.Figure(spec, _validate=False)


def partial_trace(
    frame_times_s: list[float],
    tokens_per_frame: int,
    steps: list[dict],
    ttm_kept_per_frame: list[int] | None = None,
) -> dict:
    """A trace in the CLI contract's layout from what a stream has delivered so far, for `step_heatmap`.

    `steps` are {"kept_per_frame": [...], "reselected": bool} dicts, one per StepTrace received. Without
    `ttm_kept_per_frame` (known only once the Result arrives) the TTM column is None: a gap, hover "pending".
    """
    frames = len(frame_times_s)
    for index, step in enumerate(steps):
        if len(step["kept_per_frame"]) != frames:
            raise ValueError(f"step {index + 1} has {len(step['kept_per_frame'])} frames, expected {frames}")
    return {
        "frames": frames,
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
BACKGROUND_RGB = (255, 255, 255)


def _shade_dropped(thumbnail: np.ndarray, keep_row: np.ndarray, patch_grid: int) -> np.ndarray:
    height, width = thumbnail.shape[:2]
    row_edges = np.linspace(0, height, patch_grid + 1).round().astype(int)
    col_edges = np.linspace(0, width, patch_grid + 1).round().astype(int)
    dropped = np.zeros((height, width), dtype=bool)
    for index in np.flatnonzero(keep_row == 0):
        r, c = divmod(int(index), patch_grid)
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
    patch_grid: int = 14,
    max_cols: int = 8,
    thumb: int = 160,
) -> go.Figure:
    """Grid of frame thumbnails with the patches TTM dropped darkened and tinted red, as one composite image."""
    frames = np.asarray(frames)
    keep_mask = np.asarray(keep_mask)
    num_frames, frame_h, frame_w = frames.shape[:3]
    if keep_mask.shape != (num_frames, patch_grid * patch_grid):
        raise ValueError(f"keep_mask must be {num_frames}×{patch_grid * patch_grid}, got {keep_mask.shape}")
    thumb_w, thumb_h = thumb, max(1, round(thumb * frame_h / frame_w))
    cols = min(num_frames, max_cols)
    rows = math.ceil(num_frames / cols)
    cell_w, cell_h = thumb_w + GAP_PX, thumb_h + TITLE_STRIP_PX + GAP_PX
    composite = Image.new("RGB", (cols * cell_w + GAP_PX, rows * cell_h + GAP_PX), BACKGROUND_RGB)

    annotations = []
    for f in range(num_frames):
        r, c = divmod(f, cols)
        left, top = GAP_PX + c * cell_w, GAP_PX + r * cell_h
        small = np.asarray(Image.fromarray(frames[f]).resize((thumb_w, thumb_h), Image.BILINEAR))
        composite.paste(Image.fromarray(_shade_dropped(small, keep_mask[f], patch_grid)), (left, top + TITLE_STRIP_PX))
        annotations.append({
            "x": left + thumb_w / 2, "y": top + TITLE_STRIP_PX / 2, "xref": "x", "yref": "y", "showarrow": False,
            "text": f"t={float(timestamps[f]):.1f} s · kept {int(kept_per_frame[f])}/{patch_grid * patch_grid}",
            "font": {"size": 11},
        })

    fig = go.Figure(go.Image(source=_png_data_uri(composite), hoverinfo="skip"))
    fig.update_layout(
        annotations=annotations, margin={"l": 0, "r": 0, "t": 0, "b": 0}, height=composite.height,
        xaxis={"visible": False}, yaxis={"visible": False},
    )
    return fig


# --- gauges -------------------------------------------------------------------------------------------


def _memory_mb(metrics: dict) -> tuple[float | None, str]:
    """Peak memory when measured, else the KV cache size; the label says which one it is."""
    if metrics.get("peak_memory_bytes") is not None:
        return metrics["peak_memory_bytes"] / BYTES_PER_MB, "peak memory (MB)"
    if metrics.get("kv_cache_bytes") is not None:
        return metrics["kv_cache_bytes"] / BYTES_PER_MB, "KV cache (MB)"
    return None, "memory (MB)"


def _visual_attended_percent(metrics: dict) -> float | None:
    attended, total = metrics.get("visual_tokens_attended_mean"), metrics.get("visual_tokens_in")
    if attended is None or not total:
        return None
    return 100.0 * attended / total


def _side_quantities(metrics: dict) -> list[tuple[str, str, float | None, str]]:
    """(key, title, value, number format) for each gauge of one side."""
    memory, memory_title = _memory_mb(metrics)
    return [
        ("ttft_ms", "TTFT (ms)", metrics.get("ttft_ms"), ".0f"),
        ("decode_tokens_per_s", "decode tokens/s", metrics.get("decode_tokens_per_s"), ".1f"),
        ("memory_mb", memory_title, memory, ".1f"),
        ("visual_attended_pct", "visual tokens attended (%)", _visual_attended_percent(metrics), ".1f"),
    ]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _comparisons(reference_metrics: dict, other_metrics: dict) -> list[tuple[str, str, float | None]]:
    """(key, title, ratio) of reference over other: above 1 means the other side is faster / lighter."""
    if reference_metrics.get("peak_memory_bytes") is not None and other_metrics.get("peak_memory_bytes") is not None:
        memory_key, memory_name = "peak_memory_bytes", "peak memory"
    else:
        memory_key, memory_name = "kv_cache_bytes", "KV cache"
    return [
        ("speedup", "speed-up (total time)", _ratio(reference_metrics.get("total_ms"), other_metrics.get("total_ms"))),
        ("memory_ratio", f"{memory_name} lower by",
         _ratio(reference_metrics.get(memory_key), other_metrics.get(memory_key))),
    ]


def _gauge(name: str, title: str, value: float | None, number_format: str, axis_max: float | None) -> go.Indicator:
    if value is None:
        return go.Indicator(name=name, mode="gauge", title={"text": f"{title}<br>n/a"}, gauge={"axis": {"range": [0, 1]}})
    return go.Indicator(
        name=name, mode="gauge+number", value=float(value), title={"text": title},
        number={"valueformat": number_format}, gauge={"axis": {"range": [0, axis_max]}},
    )


def _ratio_indicator(name: str, title: str, value: float | None) -> go.Indicator:
    if value is None:
        return go.Indicator(name=name, mode="number", title={"text": f"{title}<br>n/a"})
    return go.Indicator(
        name=name, mode="number+delta", value=float(value), title={"text": title},
        number={"valueformat": ".2f", "suffix": "×"}, delta={"reference": 1, "valueformat": ".2f"},
    )


def gauges_figure(sides: dict[str, dict], reference: str | None = None) -> go.Figure:
    """One row of gauges per side (TTFT, tokens/s, memory, visual tokens attended), plus ratios vs `reference`."""
    if not sides:
        return go.Figure()
    quantities = {side: _side_quantities(metrics) for side, metrics in sides.items()}
    # Sides share each gauge's scale so the needles compare at a glance.
    axis_max = {}
    for key, *_ in next(iter(quantities.values())):
        values = [value for side in quantities for k, _, value, _ in quantities[side] if k == key and value is not None]
        axis_max[key] = 100.0 if key == "visual_attended_pct" else 1.2 * max(values, default=0.0) or 1.0

    others = [side for side in sides if side != reference] if reference in sides else []
    num_cols = 4
    specs = [[{"type": "domain"}] * num_cols for _ in range(len(sides) + len(others))]
    row_titles = list(sides) + [f"{other} vs {reference}" for other in others]
    fig = make_subplots(rows=len(specs), cols=num_cols, specs=specs, row_titles=row_titles,
                        vertical_spacing=min(0.12, 0.5 / len(specs)))
    for row, (side, side_quantities) in enumerate(quantities.items(), start=1):
        for col, (key, title, value, number_format) in enumerate(side_quantities, start=1):
            fig.add_trace(_gauge(f"{side}/{key}", title, value, number_format, axis_max[key]), row=row, col=col)
    for row, other in enumerate(others, start=len(sides) + 1):
        for col, (key, title, value) in enumerate(_comparisons(sides[reference], sides[other]), start=1):
            fig.add_trace(_ratio_indicator(f"{other}/{key}", title, value), row=row, col=col)
    fig.update_layout(height=230 * len(specs), margin={"l": 30, "r": 60, "t": 40, "b": 20})
    return fig


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
