"""Figure builders: figure data must equal the trace / metrics they were built from."""

import base64
import io
import math

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

import json

from dycoke.viz import (
    GAP_PX, TITLE_STRIP_PX, bench_figure, fit_title, gain, gauges_figure, headline, live_step_heatmap, pane_width,
    partial_trace, placeholder_figure, plot_width, step_bins, step_heatmap, step_heatmap_title, token_grid,
    ttm_frames_figure, ttm_view,
)

N = 196


def make_trace(ttm, steps, times):
    return {
        "frames": len(ttm), "tokens_per_frame": N, "frame_times_s": times, "ttm_kept_per_frame": ttm,
        "ttm_keep_mask": [[1] * k + [0] * (N - k) for k in ttm],
        "steps": [{"kept_per_frame": kept, "reselected": reselected} for kept, reselected in steps],
    }


def assert_no_typed_arrays(fig):
    assert '"bdata"' not in fig.to_json()


def grid_and_strip(fig):
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert [t.name for t in heatmaps] == ["kept", "reselected"]
    return heatmaps


# --- heatmap --------------------------------------------------------------------------------------------


def test_heatmap_matches_trace():
    trace = make_trace(
        ttm=[196, 58, 58, 58],
        steps=[([59, 17, 17, 0], True), ([59, 17, 17, 0], False), ([30, 30, 20, 9], True)],
        times=[0.0, 1.25, 2.5, 3.75],
    )
    fig = step_heatmap(trace, title="DyCoke")
    grid, strip = grid_and_strip(fig)

    assert [list(row) for row in grid.z] == [[196, 59, 59, 30], [58, 17, 17, 30], [58, 17, 17, 20], [58, 0, 0, 9]]
    assert list(grid.x) == ["TTM", "step 1", "step 2", "step 3"]
    assert list(grid.y) == ["frame 0 · 0.0 s", "frame 1 · 1.2 s", "frame 2 · 2.5 s", "frame 3 · 3.8 s"]
    assert (grid.zmin, grid.zmax) == (0, N) and grid.xgap == 0 and grid.ygap == 0
    assert fig.layout.uirevision == "dycoke-heatmap"
    assert fig.layout.yaxis.autorange == "reversed", "frame 0 must be on top"
    assert list(fig.layout.yaxis.ticktext) == ["0.0 s", "1.2 s", "2.5 s", "3.8 s"]
    assert list(fig.layout.xaxis.ticktext) == ["TTM", "1", "2", "3"]
    assert fig.layout.title.text == "DyCoke"
    assert "kept %{z} of 196 tokens" in grid.hovertemplate and "mean" not in grid.hovertemplate

    # Reselections: a strip of its own above the grid, one cell per column.
    assert list(strip.z[0]) == [None, 1, 0, 1]
    strip_low, strip_high = fig.layout.yaxis2.domain
    assert strip_low > fig.layout.yaxis.domain[1] and strip_high == 1
    assert_no_typed_arrays(fig)


def test_heatmap_without_steps_is_the_ttm_column():
    grid, strip = grid_and_strip(step_heatmap(make_trace(ttm=[196, 58], steps=[], times=[0.0, 2.0])))
    assert list(grid.x) == ["TTM"] and [list(row) for row in grid.z] == [[196], [58]]
    assert list(strip.z[0]) == [None]


def test_heatmap_single_frame():
    fig = step_heatmap(make_trace(ttm=[196], steps=[([58], True), ([58], False)], times=[0.5]))
    grid, strip = grid_and_strip(fig)
    assert [list(row) for row in grid.z] == [[196, 58, 58]]
    assert list(fig.layout.yaxis.ticktext) == ["0.5 s"]
    assert list(strip.z[0]) == [None, 1, 0]


@pytest.mark.parametrize("frames", [8, 32, 64, 128])
def test_heatmap_thins_frame_labels_to_fit_the_plot(frames):
    fig = step_heatmap(make_trace(ttm=[196] * frames, steps=[], times=[i * 0.5 for i in range(frames)]), height=360)
    labels = list(fig.layout.yaxis.tickvals)
    # 360 px less the margins (30 + 36) less the strip: 273 px of grid, so at most 17 labels of 16 px.
    assert len(labels) <= 17 and labels[0] == "frame 0 · 0.0 s"
    rows_between = frames / 17
    assert len(labels) == (frames if frames <= 17 else math.ceil(frames / math.ceil(rows_between)))
    assert fig.layout.yaxis.ticktext[1] == labels[1].split(" · ")[1]


@pytest.mark.parametrize(("steps", "labelled"), [(63, ["13", "26", "39", "52"]), (7, ["2", "4", "6"]),
                                                 (250, ["49", "100", "151", "202"])])
def test_step_labels_stand_clear_of_the_ttm_label(steps, labelled):
    """With more columns than labels, the first step label is as far from "TTM" as the labels are apart."""
    trace = make_trace(ttm=[196], steps=[([58], False)] * steps, times=[0.0])
    axis = step_heatmap(trace).layout.xaxis
    assert list(axis.ticktext) == ["TTM"] + labelled
    assert axis.tickvals[0] == "TTM" and axis.tickvals[1] != "step 1"


def test_step_bins_cover_every_step_once_in_at_most_120_columns():
    assert step_bins(0) == [] and step_bins(1) == [range(0, 1)]
    assert step_bins(120) == [range(i, i + 1) for i in range(120)]
    bins = step_bins(121)
    assert len(bins) == 61 and bins[0] == range(0, 2) and bins[-1] == range(120, 121)
    for steps in (500, 1000, 1024, 4096):
        bins = step_bins(steps)
        assert len(bins) <= 120 and [i for b in bins for i in b] == list(range(steps))


def test_many_steps_are_binned_into_column_means_and_the_hover_says_so():
    steps = 250  # 2 frames, 250 steps: 3 per column, 84 columns, the last holding step 250 alone
    trace = make_trace(ttm=[196, 58], times=[0.0, 1.0],
                       steps=[([step % 196, 100], step % 3 == 0) for step in range(steps)])
    grid, strip = grid_and_strip(step_heatmap(trace))
    assert len(grid.x) == 1 + 84 and grid.x[1] == "steps 1–3" and grid.x[-1] == "step 250"
    assert list(grid.z[0][1:3]) == [1, 4] and grid.z[0][-1] == 249 % 196  # means of 0,1,2 and 3,4,5
    assert grid.z[1][1] == 100
    assert list(strip.z[0][1:4]) == [1, 1, 1] and strip.zmax == 3
    assert "mean of 3 steps per column" in grid.hovertemplate


def test_live_update_of_512_steps_at_64_frames_is_under_100_kb():
    steps = [{"kept_per_frame": [(7 * step + frame) % 197 for frame in range(64)], "reselected": step % 2 == 0}
             for step in range(512)]
    trace = partial_trace([i * 0.25 for i in range(64)], N, steps)
    payload = live_step_heatmap(trace, "dycoke · step 512").to_json()
    assert len(payload.encode()) < 100_000
    assert len(step_heatmap(dict(trace, ttm_kept_per_frame=[58] * 64)).to_json().encode()) < 100_000


def test_heatmap_follows_the_theme():
    trace = make_trace(ttm=[196], steps=[([58], False)], times=[0.0])
    light, dark = step_heatmap(trace).layout, step_heatmap(trace, dark=True).layout
    assert light.paper_bgcolor == dark.paper_bgcolor == "rgba(0,0,0,0)"
    assert light.font.color != dark.font.color


def test_heatmap_title_counts_the_prefills_token():
    trace = make_trace(ttm=[196], steps=[([58], False)] * 63, times=[0.0])
    assert step_heatmap_title("dycoke", trace, 5) == "dycoke · 64 new tokens (63 decoding steps) · 5 reselections"


HEATMAP_TITLE = "dycoke · 512 new tokens (511 decoding steps) · 17 reselections"


@pytest.mark.parametrize("width", [200, 326, 432, 880])
def test_a_title_wraps_to_lines_that_fit_its_width(width):
    lines = fit_title(HEATMAP_TITLE, width)
    most = width // (13 * 0.6)  # characters of 0.6 em at 13 px
    assert all(len(line) <= most for line in lines), lines
    words = [word for word in " ".join(lines).split() if word != "·"]
    assert words == [word for word in HEATMAP_TITLE.split() if word != "·"]
    assert not any(line.startswith("·") or line.endswith("·") for line in lines)
    assert (len(lines) == 1) == (len(HEATMAP_TITLE) <= most)


def test_a_title_breaks_at_its_separators_unless_that_takes_more_lines():
    assert fit_title(HEATMAP_TITLE, 350) == ["dycoke · 512 new tokens (511 decoding steps)", "17 reselections"]
    # 41 characters a line: at the separators, "dycoke" would stand alone on a line of three.
    assert len(fit_title(HEATMAP_TITLE, 326)) == 2
    assert fit_title(HEATMAP_TITLE, None) == [HEATMAP_TITLE]


def test_the_heatmap_title_fits_a_phone_pane_and_the_plot_moves_down_for_it():
    trace = make_trace(ttm=[196], steps=[([58], False)] * 3, times=[0.0])
    wide, narrow = step_heatmap(trace, HEATMAP_TITLE), step_heatmap(trace, HEATMAP_TITLE, width=pane_width(390))
    assert wide.layout.title.text == HEATMAP_TITLE
    lines = narrow.layout.title.text.split("<br>")
    assert lines == ["dycoke · 512 new tokens (511 decoding", "steps) · 17 reselections"]
    assert narrow.layout.margin.t == wide.layout.margin.t + 17
    assert narrow.layout.title.y is None  # centred in the top margin (see title_layout)
    live = live_step_heatmap(trace, HEATMAP_TITLE, width=pane_width(390))
    assert live.layout.title.text == narrow.layout.title.text


def test_a_pane_is_half_the_answers_column_side_by_side_and_all_of_it_stacked():
    assert pane_width(390) == plot_width(390) == 326  # measured in chromium: the column's width at 390 px
    assert pane_width(1280) == (plot_width(1280) - 16) // 2 == 432  # measured: each pane 432 px at 1280 px


# --- TTM frames -------------------------------------------------------------------------------------------


def decode_composite(fig):
    (image,) = fig.data
    assert isinstance(image, go.Image)
    header, payload = image.source.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))


def test_ttm_frames_shades_dropped_patches():
    frames = np.full((3, 140, 280, 3), 200, dtype=np.uint8)
    keep_mask = np.ones((3, N), dtype=int)
    keep_mask[1, 0] = 0  # frame 1: top-left patch dropped
    keep_mask[2, 13 * 14 + 13] = 0  # frame 2: bottom-right patch dropped
    fig = ttm_frames_figure(frames, keep_mask.tolist(), [0.0, 1.2, 2.4], [196, 195, 195], max_cols=2, thumb=140)
    composite = decode_composite(fig)

    # 2 columns × 2 rows of 140×70 thumbnails, each with a title strip above it.
    gap, strip = 4, 22
    assert composite.shape == (gap + 2 * (70 + strip + gap), gap + 2 * (140 + gap), 3)

    def patch(frame, row, col):
        grid_row, grid_col = divmod(frame, 2)
        top = gap + grid_row * (70 + strip + gap) + strip + row * 5
        left = gap + grid_col * (140 + gap) + col * 10
        return composite[top + 1:top + 4, left + 2:left + 8].astype(int)

    source_value = 200
    assert (patch(0, 0, 0) == source_value).all()
    assert (patch(1, 0, 0).sum(axis=-1) < 3 * source_value).all()
    assert (patch(1, 0, 0)[..., 0] > patch(1, 0, 0)[..., 1]).all(), "dropped patches are tinted red"
    assert (patch(1, 0, 1) == source_value).all()
    assert (patch(2, 13, 13).sum(axis=-1) < 3 * source_value).all()
    assert (patch(2, 0, 0) == source_value).all()

    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["0.0 s · 196/196", "1.2 s · 195/196", "2.4 s · 195/196"]
    assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False
    assert_no_typed_arrays(fig)


@pytest.mark.parametrize("page_width, columns", [(390, 3), (1280, 8), (None, 8)])
def test_ttm_view_fits_its_thumbnails_to_the_page(page_width, columns):
    frames = np.full((16, 60, 80, 3), 100, dtype=np.uint8)
    trace = {"frames": 16, "tokens_per_frame": N, "ttm_keep_mask": [[1] * N] * 16, "ttm_kept_per_frame": [N] * 16}
    metrics = {"visual_tokens_after_ttm": 16 * N, "visual_tokens_in": 16 * N}
    fig = ttm_view(frames, [i / 2 for i in range(16)], "dycoke", trace, metrics, page_width=page_width, dark=True)
    composite = decode_composite(fig)
    # As wide as the plot (390 px page: 326 px, 3 columns of 103 px thumbnails), so no band is left empty.
    assert abs(composite.shape[1] - plot_width(page_width)) < columns + 4
    assert len({round(a.y) for a in fig.layout.annotations}) == math.ceil(16 / columns)
    assert tuple(composite[0, 0]) == (17, 24, 39)  # the dark page's background
    assert "3,136 of 3,136" in fig.layout.title.text
    assert all(len(line) * 13 * 0.6 <= plot_width(page_width) for line in fig.layout.title.text.split("<br>"))


def test_ttm_view_draws_qwens_temporal_groups_on_their_token_grid():
    """8 frames of 168x308 on Qwen2.5-VL are 4 groups of 6x11 tokens: one thumbnail per group (its first frame), at
    the group's time, with the dropped tokens' cells shaded on that grid."""
    frames = np.full((8, 168, 308, 3), 200, dtype=np.uint8)
    frames[1::2] = 0  # the second frame of each group is black: a thumbnail of it would show
    tokens = 6 * 11
    mask = [[1] * tokens for _ in range(4)]
    mask[1][tokens - 1] = 0  # group 1 drops its bottom-right token
    trace = {"frames": 4, "tokens_per_frame": tokens, "frame_times_s": [0.25, 0.75, 1.25, 1.75],
             "ttm_keep_mask": mask, "ttm_kept_per_frame": [tokens, tokens - 1, tokens, tokens]}
    metrics = {"visual_tokens_after_ttm": 4 * tokens - 1, "visual_tokens_in": 4 * tokens}
    fig = ttm_view(frames, [i / 4 for i in range(8)], "dycoke", trace, metrics, page_width=1280)
    assert [a.text for a in fig.layout.annotations] == ["0.2 s · 66/66", "0.8 s · 65/66", "1.2 s · 66/66",
                                                        "1.8 s · 66/66"]
    composite = decode_composite(fig)
    thumb = (plot_width(1280) - GAP_PX) // 4 - GAP_PX  # four columns fill the plot
    height = round(thumb * 168 / 308)
    top = GAP_PX + TITLE_STRIP_PX
    inside_last_cell = (top + height - height // 12, thumb - thumb // 22)  # centre of the 6x11 grid's last cell
    for group in range(4):
        left = GAP_PX + group * (thumb + GAP_PX)
        centre = tuple(composite[top + height // 2, left + thumb // 2])
        corner = tuple(composite[inside_last_cell[0], left + inside_last_cell[1]])
        assert centre == (200, 200, 200)  # the group's first frame, not its black second one
        assert corner == ((140, 70, 70) if group == 1 else (200, 200, 200))  # 200·0.35 + (70, 0, 0)
    assert token_grid(tokens, 168, 308) == (6, 11) and token_grid(196, 384, 384) == (14, 14)
    assert token_grid(196, 60, 80) == (14, 14)  # a grid that does not fit the aspect ratio: square


def test_heatmap_rows_name_qwens_groups_by_their_video_frames():
    trace = {"frames": 3, "frames_per_group": 2, "tokens_per_frame": 4, "frame_times_s": [0.25, 0.75, 1.25],
             "ttm_kept_per_frame": [4, 2, 3], "ttm_keep_mask": [[1] * 4, [1, 1, 0, 0], [1, 1, 1, 0]],
             "steps": [{"kept_per_frame": [4, 1, 2], "reselected": True}]}
    rows = list(step_heatmap(trace).data[0].y)
    assert [row.split(" · ")[0] for row in rows] == ["frames 0–1", "frames 2–3", "frames 4–5"]
    plain = {**trace, "frames_per_group": 1}
    assert [row.split(" · ")[0] for row in step_heatmap(plain).data[0].y] == ["frame 0", "frame 1", "frame 2"]


def test_ttm_frames_rejects_wrong_mask_shape():
    with pytest.raises(ValueError):
        ttm_frames_figure(np.zeros((2, 32, 32, 3), np.uint8), [[1] * N], [0.0, 1.0], [196, 196])


# --- gauges ---------------------------------------------------------------------------------------------


BASELINE = {
    "ttft_ms": 900.0, "decode_tokens_per_s": 20.0, "peak_memory_bytes": 34_000_000_000, "kv_cache_bytes": 400_000_000,
    "visual_tokens_in": 6272, "visual_tokens_after_ttm": 6272, "visual_tokens_attended_mean": 6272.0,
    "total_ms": 2300.0,
}
DYCOKE = {
    "ttft_ms": 450.0, "decode_tokens_per_s": 30.0, "peak_memory_bytes": 24_000_000_000, "kv_cache_bytes": 200_000_000,
    "visual_tokens_in": 6272, "visual_tokens_after_ttm": 2960, "visual_tokens_attended_mean": 888.0,
    "total_ms": 1490.0,
}


def bars_by_name(fig):
    return {t.name: t for t in fig.data if isinstance(t, go.Bar)}


def test_gauges_show_both_sides_coloured_by_direction_with_the_comparison_marked():
    fig = gauges_figure("dycoke", DYCOKE, "baseline", BASELINE)
    bars = bars_by_name(fig)
    assert list(bars) == ["dycoke/ttft_ms", "dycoke/decode_tokens_per_s", "dycoke/memory_mb", "dycoke/visual_attended"]
    ttft = bars["dycoke/ttft_ms"]
    assert list(ttft.y) == ["baseline", "dycoke"] and list(ttft.x) == [900.0, 450.0]
    green, red = "#2e9d57", "#d9534f"
    assert list(ttft.marker.color) == ["#9ca3af", green]  # 450 ms against 900: better
    assert list(bars["dycoke/decode_tokens_per_s"].marker.color)[1] == green  # 30 tokens/s against 20: higher
    slower = bars_by_name(gauges_figure("dycoke", dict(DYCOKE, ttft_ms=1000.0), "baseline", BASELINE))
    assert list(slower["dycoke/ttft_ms"].marker.color)[1] == red
    assert list(bars["dycoke/memory_mb"].x) == [34_000.0, 24_000.0]  # peak memory, in MB
    assert list(bars["dycoke/visual_attended"].x) == [6272.0, 888.0]
    markers = {t.name: t for t in fig.data if isinstance(t, go.Scatter)}
    assert list(markers["baseline/ttft_ms"].x) == [900.0] and list(markers["baseline/ttft_ms"].y) == ["dycoke"]
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "<b>time to first token</b> (ms; lower is better) · <b>2.0×</b>"
    assert "higher is better" in titles[1] and "peak memory" in titles[2]
    assert_no_typed_arrays(fig)


def test_gain_is_above_one_when_the_method_is_better_either_way():
    assert gain(450, 900, lower_is_better=True) == 2.0
    assert gain(30, 20, lower_is_better=False) == 1.5
    assert gain(10, 20, lower_is_better=False) == 0.5
    assert gain(None, 20, True) is None and gain(0, 20, True) is None


def test_gauges_fall_back_to_kv_cache_and_survive_missing_values():
    cpu_dycoke = dict(DYCOKE, peak_memory_bytes=None, ttft_ms=None)
    fig = gauges_figure("dycoke", cpu_dycoke, "baseline", dict(BASELINE, peak_memory_bytes=None))
    bars = bars_by_name(fig)
    assert list(bars["dycoke/memory_mb"].x) == [400.0, 200.0]
    assert "KV cache" in fig.layout.annotations[2].text
    assert list(bars["dycoke/ttft_ms"].text) == ["900", "n/a"]
    assert list(bars["dycoke/ttft_ms"].marker.color)[1] == "#6b7a90"  # unknown: neutral
    assert "×" not in fig.layout.annotations[0].text
    fig.to_json()


def test_gauges_without_comparison_have_one_bar_per_row():
    fig = gauges_figure("dycoke", DYCOKE)
    assert all(len(bar.y) == 1 for bar in bars_by_name(fig).values())
    assert not [t for t in fig.data if isinstance(t, go.Scatter)]


def test_headline_reads_the_direction_and_notes_the_single_run():
    assert headline("dycoke", DYCOKE, "baseline", BASELINE, same_answer=True).startswith(
        "**dycoke vs baseline: 2.0× faster to first token, 1.4× less peak memory, same answer.**")
    slower = headline("fastv", dict(DYCOKE, ttft_ms=1800.0, peak_memory_bytes=34_500_000_000), "baseline", BASELINE,
                      same_answer=False)
    assert "2.0× slower to first token, 1.01× more peak memory" not in slower  # within 3%: the same
    assert "2.0× slower to first token, the same peak memory, different answer." in slower
    assert "single run" in slower
    assert "no comparison" in headline("dycoke", DYCOKE)


# --- benchmark ------------------------------------------------------------------------------------------


def bench_rows(peak):
    rows = []
    for method, scale in [("baseline", 2.0), ("dycoke", 1.0)]:
        for frames in [32, 8, 16]:
            rows.append({
                "frames": frames, "method": method, "latency_ms": scale * 10.0 * frames,
                "peak_memory_bytes": int(scale * frames * 1e6) if peak else None,
                "kv_cache_bytes": int(scale * frames * 1e5),
            })
    return rows


def traces_by_axis(fig):
    return {(t.name, t.xaxis): t for t in fig.data}


def test_bench_figure_lines_per_method_and_subplot():
    fig = bench_figure(bench_rows(peak=True))
    traces = traces_by_axis(fig)
    assert len(fig.data) == 4
    assert list(traces[("dycoke", "x")].x) == [8, 16, 32]
    assert list(traces[("baseline", "x")].y) == [160.0, 320.0, 640.0]
    assert list(traces[("baseline", "x2")].y) == [16.0, 32.0, 64.0]
    assert fig.layout.yaxis2.title.text == "peak memory (MB)"
    assert_no_typed_arrays(fig)


def test_bench_figure_uses_kv_bytes_without_peak_memory():
    fig = bench_figure(bench_rows(peak=False))
    traces = traces_by_axis(fig)
    assert list(traces[("dycoke", "x2")].y) == pytest.approx([0.8, 1.6, 3.2])
    assert "KV" in fig.layout.yaxis2.title.text
    assert_no_typed_arrays(fig)


# --- live updates while streaming ----------------------------------------------------------------------------


def test_partial_trace_has_the_contract_layout_and_a_pending_ttm_column():
    steps = [{"kept_per_frame": [59, 17], "reselected": True}, {"kept_per_frame": [40, 36], "reselected": False}]
    trace = partial_trace([0.0, 1.5], N, steps)
    assert trace == {
        "frames": 2, "frames_per_group": 1, "tokens_per_frame": N, "frame_times_s": [0.0, 1.5],
        "ttm_kept_per_frame": [None, None], "steps": steps,
    }
    assert partial_trace([0.0, 1.5], N, steps, frames_per_group=2)["frames_per_group"] == 2
    assert partial_trace([0.0, 1.5], N, steps, ttm_kept_per_frame=[196, 58])["ttm_kept_per_frame"] == [196, 58]
    with pytest.raises(ValueError, match="step 1 has 3 frames, expected 2"):
        partial_trace([0.0, 1.5], N, [{"kept_per_frame": [1, 2, 3], "reselected": False}])


def test_heatmap_of_a_partial_trace_leaves_the_ttm_column_blank():
    steps = [{"kept_per_frame": [59, 17], "reselected": True}]
    grid, strip = grid_and_strip(step_heatmap(partial_trace([0.0, 1.5], N, steps)))
    assert [list(row) for row in grid.z] == [[None, 59], [None, 17]]
    assert list(strip.z[0]) == [None, 1]


@pytest.mark.parametrize("ttm", [None, [196, 58, 58]])
def test_live_heatmap_is_the_validated_figure(ttm):
    steps = [{"kept_per_frame": [59, 17, 0], "reselected": i % 2 == 0} for i in range(5)]
    trace = partial_trace([0.0, 1.0, 2.0], N, steps, ttm_kept_per_frame=ttm)
    live = live_step_heatmap(trace, "live", height=380)
    checked = step_heatmap(trace, "live")
    checked.update_layout(height=380)
    assert json.loads(live.to_json()) == json.loads(checked.to_json())
    assert live.layout.uirevision == "dycoke-heatmap" and live.layout.height == 380
    assert_no_typed_arrays(live)


def test_placeholder_is_an_empty_figure_with_its_message():
    fig = placeholder_figure("nothing yet", height=120)
    assert len(fig.data) == 0 and fig.layout.height == 120
    assert [a.text for a in fig.layout.annotations] == ["nothing yet"]


def test_settings_line_counts_qwens_temporal_groups():
    """On Qwen-VL 8 frames are 4 groups of 2: the header says so, and a matched drop ratio is resolved over the
    groups (what TTM and DP count), not over the frames."""
    from dycoke.config import DyCokeConfig
    from dycoke.methods import get_method
    from dycoke.viz import frames_label, settings_line

    assert frames_label(16) == "16 frames"
    assert frames_label(16, 2) == "16 frames in 8 groups"
    assert frames_label(15, 2) == "15 frames in 8 groups"  # the last group repeats the last frame
    assert frames_label(1, 2) == "1 frame in 1 group"
    # DyCoke with K 0.7, W 8, P 0.7 over 4 groups of 256: group 0 whole, 3 groups keep 76: 484 enter, 145 attended
    # of 1024, drop ratio 0.858. Over 8 "frames" it would be 788 -> 236 of 2048, 0.885.
    line = settings_line(get_method("random"), DyCokeConfig(window=8), 8, 16, 256, frames_per_group=2)
    expected = 1 - math.floor(0.3 * (256 + 3 * math.floor(0.3 * 256))) / (4 * 256)
    assert f"drop ratio {expected:.2f}" in line and "0.88" not in line
    assert line.endswith("8 frames in 4 groups · ≤16 new tokens")
    assert settings_line(get_method("random"), DyCokeConfig(), 8, 16, 196).endswith(" · 8 frames · ≤16 new tokens")
