"""Figure builders: figure data must equal the trace / metrics they were built from."""

import base64
import io

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

import json

from dycoke.viz import (
    bench_figure, gauges_figure, live_step_heatmap, partial_trace, placeholder_figure, step_heatmap, ttm_frames_figure,
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


def heatmap_and_markers(fig):
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    markers = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert len(heatmaps) == 1 and len(markers) == 1
    return heatmaps[0], markers[0]


# --- heatmap --------------------------------------------------------------------------------------------


def test_heatmap_matches_trace():
    trace = make_trace(
        ttm=[196, 58, 58, 58],
        steps=[([59, 17, 17, 0], True), ([59, 17, 17, 0], False), ([30, 30, 20, 9], True)],
        times=[0.0, 1.25, 2.5, 3.75],
    )
    fig = step_heatmap(trace, title="DyCoke")
    heatmap, markers = heatmap_and_markers(fig)

    expected_z = [
        [196 / 196, 59 / 196, 59 / 196, 30 / 196],
        [58 / 196, 17 / 196, 17 / 196, 30 / 196],
        [58 / 196, 17 / 196, 17 / 196, 20 / 196],
        [58 / 196, 0 / 196, 0 / 196, 9 / 196],
    ]
    assert np.array(heatmap.z).shape == (4, 4)
    np.testing.assert_allclose(np.array(heatmap.z, dtype=float), expected_z)
    assert list(heatmap.x) == ["TTM", "1", "2", "3"]
    assert list(heatmap.y) == [0, 1, 2, 3]
    assert (heatmap.zmin, heatmap.zmax) == (0, 1)
    assert fig.layout.uirevision == "dycoke-heatmap"
    assert fig.layout.xaxis.type == "category"
    assert list(fig.layout.yaxis.tickvals) == [0, 1, 2, 3]
    assert list(fig.layout.yaxis.ticktext) == ["0.0 s", "1.2 s", "2.5 s", "3.8 s"]
    low, high = fig.layout.yaxis.range
    assert low > high, "y axis must be descending so that frame 0 is on top"
    assert fig.layout.title.text == "DyCoke"

    assert "58/196" in heatmap.text[1][0] and "frame 1" in heatmap.text[1][0] and "TTM" in heatmap.text[1][0]
    assert "9/196" in heatmap.text[3][3] and "step 3" in heatmap.text[3][3] and "3.8 s" in heatmap.text[3][3]

    assert list(markers.x) == ["1", "3"]
    assert all(y < 0 for y in markers.y)
    assert_no_typed_arrays(fig)


def test_heatmap_without_steps_is_the_ttm_column():
    fig = step_heatmap(make_trace(ttm=[196, 58], steps=[], times=[0.0, 2.0]))
    heatmap, markers = heatmap_and_markers(fig)
    assert list(heatmap.x) == ["TTM"]
    np.testing.assert_allclose(np.array(heatmap.z, dtype=float), [[1.0], [58 / 196]])
    assert len(markers.x) == 0
    assert_no_typed_arrays(fig)


def test_heatmap_single_frame():
    fig = step_heatmap(make_trace(ttm=[196], steps=[([58], True), ([58], False)], times=[0.5]))
    heatmap, markers = heatmap_and_markers(fig)
    np.testing.assert_allclose(np.array(heatmap.z, dtype=float), [[1.0, 58 / 196, 58 / 196]])
    assert list(fig.layout.yaxis.ticktext) == ["0.5 s"]
    assert list(markers.x) == ["1"]
    assert_no_typed_arrays(fig)


def test_heatmap_thins_frame_ticks_for_long_videos():
    frames = 128
    fig = step_heatmap(make_trace(ttm=[196] * frames, steps=[], times=[i * 0.5 for i in range(frames)]))
    heatmap, _ = heatmap_and_markers(fig)
    assert len(heatmap.z) == frames
    assert len(fig.layout.yaxis.tickvals) <= 32
    assert fig.layout.yaxis.ticktext[1] == f"{fig.layout.yaxis.tickvals[1] * 0.5:.1f} s"


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
    assert titles == ["t=0.0 s · kept 196/196", "t=1.2 s · kept 195/196", "t=2.4 s · kept 195/196"]
    assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False
    assert_no_typed_arrays(fig)


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


def indicators_by_name(fig):
    assert all(isinstance(t, go.Indicator) for t in fig.data)
    return {t.name: t for t in fig.data}


def test_gauges_show_each_side_and_ratios():
    fig = gauges_figure({"baseline": BASELINE, "dycoke": DYCOKE}, reference="baseline")
    by_name = indicators_by_name(fig)
    for side, metrics in [("baseline", BASELINE), ("dycoke", DYCOKE)]:
        assert by_name[f"{side}/ttft_ms"].value == metrics["ttft_ms"]
        assert by_name[f"{side}/decode_tokens_per_s"].value == metrics["decode_tokens_per_s"]
        assert by_name[f"{side}/memory_mb"].value == pytest.approx(metrics["peak_memory_bytes"] / 1e6)
        assert "peak memory" in by_name[f"{side}/memory_mb"].title.text
        expected_pct = 100 * metrics["visual_tokens_attended_mean"] / metrics["visual_tokens_in"]
        assert by_name[f"{side}/visual_attended_pct"].value == pytest.approx(expected_pct)
    assert by_name["dycoke/visual_attended_pct"].value == pytest.approx(100 * 888 / 6272)

    assert by_name["dycoke/speedup"].value == pytest.approx(2300.0 / 1490.0)
    assert by_name["dycoke/speedup"].number.suffix == "×"
    assert by_name["dycoke/speedup"].delta.reference == 1
    assert by_name["dycoke/memory_ratio"].value == pytest.approx(34 / 24)
    assert len(fig.data) == 2 * 4 + 2
    assert_no_typed_arrays(fig)


def test_gauges_fall_back_to_kv_cache_and_survive_missing_values():
    cpu_dycoke = dict(DYCOKE, peak_memory_bytes=None, ttft_ms=None, total_ms=None)
    fig = gauges_figure({"baseline": dict(BASELINE, peak_memory_bytes=None), "dycoke": cpu_dycoke}, "baseline")
    by_name = indicators_by_name(fig)
    memory = by_name["dycoke/memory_mb"]
    assert memory.value == pytest.approx(200.0)
    assert "KV" in memory.title.text and "peak" not in memory.title.text
    assert by_name["dycoke/ttft_ms"].value is None and "n/a" in by_name["dycoke/ttft_ms"].title.text
    assert by_name["dycoke/speedup"].value is None
    assert by_name["dycoke/memory_ratio"].value == pytest.approx(2.0)
    assert "KV" in by_name["dycoke/memory_ratio"].title.text
    fig.to_json()


def test_gauges_without_reference_have_no_ratios():
    fig = gauges_figure({"dycoke": DYCOKE})
    assert sorted(indicators_by_name(fig)) == sorted(
        f"dycoke/{key}" for key in ["ttft_ms", "decode_tokens_per_s", "memory_mb", "visual_attended_pct"]
    )
    assert len(gauges_figure({"dycoke": DYCOKE}, reference="dycoke").data) == 4


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
        "frames": 2, "tokens_per_frame": N, "frame_times_s": [0.0, 1.5], "ttm_kept_per_frame": [None, None],
        "steps": steps,
    }
    assert partial_trace([0.0, 1.5], N, steps, ttm_kept_per_frame=[196, 58])["ttm_kept_per_frame"] == [196, 58]
    with pytest.raises(ValueError, match="step 1 has 3 frames, expected 2"):
        partial_trace([0.0, 1.5], N, [{"kept_per_frame": [1, 2, 3], "reselected": False}])


def test_heatmap_of_a_partial_trace_leaves_the_ttm_column_blank():
    steps = [{"kept_per_frame": [59, 17], "reselected": True}]
    heatmap, markers = heatmap_and_markers(step_heatmap(partial_trace([0.0, 1.5], N, steps)))
    assert [row[0] for row in heatmap.z] == [None, None]
    np.testing.assert_allclose([row[1] for row in heatmap.z], [59 / N, 17 / N])
    assert "pending" in heatmap.text[0][0] and "59/196" in heatmap.text[0][1]
    assert list(markers.x) == ["1"]


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
