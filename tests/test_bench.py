"""The benchmark: it runs end to end on `tiny`, its analytic figures match hand counts, its ratios come from its own run.

No timing is asserted anywhere: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from dycoke.bench import (
    DEVICE_TABLE,
    DeviceSpec,
    RATIO_KEYS,
    decode_flops,
    kv_bytes,
    main,
    markdown_table,
    parse_method_spec,
    parse_methods,
    physical_limits,
    prefill_flops,
    qwen_vision_flops,
    synthetic_clip,
    table_device,
    vision_flops,
)
from dycoke.config import ConfigError
from dycoke.families import Geometry

# hidden 8, 2 heads of 4, 1 kv head, MLP 16, 2 layers, vocabulary 10
SMALL_TEXT = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=10)
# 28 px frames of 14 px patches: 4 patches; width 4, MLP 8, one layer, no pooling head
SMALL_VISION = SimpleNamespace(image_size=28, patch_size=14, hidden_size=4, intermediate_size=8, num_hidden_layers=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny_random.json"
    code = main(["--preset", "tiny-random", "--device", "cpu", "--frames", "2,4", "--methods", "baseline,dycoke",
                 "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--out", str(out), "--quiet"])
    assert code == 0
    assert out.with_suffix(".html").stat().st_size > 1000
    return json.loads(out.read_text())


def test_bench_writes_a_report_with_every_row_and_key(report, capsys):
    assert report["schema"] == "dycoke.bench/1"
    assert report["model"]["name"] == "tiny-random"
    assert report["settings"]["frames"] == [2, 4]
    assert report["settings"]["methods"] == ["baseline", "dycoke"]
    assert report["machine"]["name"].startswith("cpu-")
    assert {"H100", "H200", "A10G", "L4", "used"} <= set(report["device_table"])
    assert [(row["frames"], row["method"]) for row in report["rows"]] == [
        (2, "baseline"), (2, "dycoke"), (4, "baseline"), (4, "dycoke")]
    for row in report["rows"]:
        for key in ("ttft_ms", "prefill_ms", "decode_ms_per_token", "latency_ms", "kv_cache_bytes",
                    "peak_memory_bytes", "peak_above_weights_bytes", "visual_tokens_prefill",
                    "visual_tokens_attended", "reselection_rate", "flops", "limit", "limits_by_device",
                    "vs_baseline", "spread", "overhead", "decode_step_split_ms"):
            assert key in row, key
        assert row["samples"] == 1 and row["new_tokens"] == 4
        assert row["peak_memory_bytes"] is None  # CPU: not measured
        assert row["flops"]["prefill"] > 0 and row["flops"]["decode_step"] > 0 and row["flops"]["vision"] > 0
        assert 0 < row["limit"]["decode_step_ms"] and 0 < row["limit"]["prefill_ms"]
        assert set(row["limits_by_device"]) == set(DEVICE_TABLE)
        assert row["spread"]["latency_ms"]["min"] <= row["latency_ms"] <= row["spread"]["latency_ms"]["max"]
    baseline, dycoke = report["rows"][2], report["rows"][3]
    assert baseline["visual_tokens_prefill"] == baseline["visual_tokens_attended"] == 4 * 196
    assert dycoke["visual_tokens_attended"] < dycoke["visual_tokens_prefill"] < 4 * 196
    assert dycoke["reselection_rate"] > 0 and baseline["reselection_rate"] == 0
    assert dycoke["overhead"]["score_select_ms"] > 0 and baseline["overhead"]["score_select_ms"] == 0


def test_analytic_kv_bytes_equal_the_measured_baseline_cache(report):
    for row in report["rows"]:
        if row["method"] == "baseline":
            assert row["kv_cache_bytes"] == row["kv_cache_bytes_analytic_full"]


def test_ratio_columns_come_from_the_same_run(report):
    rows = report["rows"]
    for frames in report["settings"]["frames"]:
        baseline = next(r for r in rows if r["frames"] == frames and r["method"] == "baseline")
        for row in (r for r in rows if r["frames"] == frames):
            for name, key in RATIO_KEYS.items():
                if baseline[key] is None or row[key] is None:
                    assert row["vs_baseline"][name] is None
                else:
                    assert row["vs_baseline"][name] == pytest.approx(baseline[key] / row[key])
            assert row["vs_baseline"]["prefill_flops"] == pytest.approx(
                baseline["flops"]["prefill"] / row["flops"]["prefill"])
        assert all(baseline["vs_baseline"][name] in (None, pytest.approx(1.0)) for name in RATIO_KEYS)


def test_prefill_flops_match_a_hand_count():
    # Per layer and token, matmul weights: q 8*8 + k 8*4 + v 8*4 + o 8*8 + MLP 3*8*16 = 64+32+32+64+384 = 576.
    # 3 tokens: linear 2*3*576 = 3456; causal pairs 3*4/2 = 6, QK 2*2*4*6 = 96 and AV 96: 3648 per layer.
    # Two layers 7296, plus the LM head for one position, 2*8*10 = 160.
    assert prefill_flops(SMALL_TEXT, 3) == 7456
    assert prefill_flops(SMALL_TEXT, 3, logits_tokens=3) == 7296 + 3 * 160


def test_decode_flops_match_a_hand_count():
    # One token: linear 2*576 per layer, attention 2*2*(2 heads*4)*keys per layer, LM head 160.
    assert decode_flops(SMALL_TEXT, 5) == 2 * 1152 + 2 * 160 + 160  # 2784
    assert decode_flops(SMALL_TEXT, [5, 2]) == 2 * 1152 + (160 + 64) + 160  # layer 1 attends 2 keys
    # DP's scoring: QK over 5 keys 2*2*4*5 = 80; the query and keys are the layer's own, projected once.
    assert decode_flops(SMALL_TEXT, 5, scored_keys=5) == 2784 + 80
    with pytest.raises(ValueError):
        decode_flops(SMALL_TEXT, [5, 5, 5])


def test_kv_bytes_match_a_hand_count():
    # K and V, 2 layers, 1 kv head of 4, 2 bytes each (bf16), 7 positions: 2*2*1*4*2*7 = 224.
    assert kv_bytes(SMALL_TEXT, 7, 2) == 224
    assert kv_bytes(SMALL_TEXT, [7, 3], 4) == 2 * 1 * 4 * 4 * (7 + 3)


def test_vision_flops_match_a_hand_count():
    # 4 patches: embedding 2*4*(3*14*14)*4 = 18816; layer 2*4*(4*16 + 2*4*8) = 1024 plus attention 4*4*4*4 = 256;
    # projector to the 8-wide text model 2*4*(4*8 + 8*8) = 768. Per frame 20864, two frames 41728.
    assert vision_flops(SMALL_VISION, 2, text_hidden=8) == 41728


def test_physical_limits_are_bytes_over_bandwidth_and_flops_over_peak():
    device = DeviceSpec("toy", bandwidth_bytes_per_s=1e9, peak_flops_per_s=1e12, source="test")
    limits = physical_limits(device, language_weight_bytes=3_000_000, attended_kv_bytes=1_000_000,
                             flops={"prefill": 2e12, "vision": 1e12}, new_tokens=5)
    assert limits["decode_step_ms"] == pytest.approx(4.0)  # 4 MB at 1 GB/s
    assert limits["prefill_ms"] == pytest.approx(2000.0)
    assert limits["ttft_ms"] == pytest.approx(3000.0)
    assert limits["latency_ms"] == pytest.approx(3000.0 + 4 * 4.0)


def test_method_specs_and_device_names():
    spec = parse_method_spec("dycoke:tau=-1:P=0.5")
    assert (spec.label, spec.method, spec.overrides) == ("dycoke:tau=-1:P=0.5", "dycoke",
                                                          {"reselect_threshold": -1.0, "prune_ratio": 0.5})
    assert [s.label for s in parse_methods("dycoke,ttm")] == ["baseline", "dycoke", "ttm"]
    with pytest.raises(ValueError, match="unknown method"):
        parse_method_spec("nope")
    with pytest.raises(ValueError, match="bad setting"):
        parse_method_spec("dycoke:speed=9")
    with pytest.raises(ConfigError):
        parse_method_spec("dycoke:P=1.5")
    assert table_device("NVIDIA H100 80GB HBM3") == "H100"
    assert table_device("NVIDIA H100 PCIe") == "H100-PCIe"
    assert table_device("NVIDIA H200") == "H200"
    assert table_device("NVIDIA A10G") == "A10G"
    assert table_device("NVIDIA L4") == "L4"
    assert table_device("NVIDIA L40S") is None


def test_synthetic_clip_is_deterministic_and_moves():
    first, again = synthetic_clip(4), synthetic_clip(4)
    assert first.frames.shape == (4, 384, 384, 3)
    assert (first.frames == again.frames).all()
    assert (first.frames[0] != first.frames[1]).any()


def test_prefill_flops_per_layer_lengths():
    # Layer 0 over 3 tokens (3648, as above), layer 1 over 2: linear 2*2*576 = 2304, pairs 3, attention 2*2*2*4*3 = 96.
    assert prefill_flops(SMALL_TEXT, [3, 2]) == 3648 + 2304 + 96 + 160


@pytest.mark.parametrize("tied", [True, False])
def test_decode_weight_bytes_count_the_head_but_not_the_embedding_table(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dycoke.bench import model_weights

    config = Qwen2Config(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=10, tie_word_embeddings=tied)
    weights = model_weights(Qwen2ForCausalLM(config))
    # Per layer: q 8*8+8, k and v 8*4+4 each, o 8*8, MLP 3*8*16, two norms 2*8: 608; two layers, final norm 8,
    # head 10*8 = 80: 1304 float32 values read per step, whether or not the head is the embedding table.
    assert weights["language"] == 4 * 1304
    assert weights["all"] == 4 * (1304 if tied else 1304 + 80)


# Qwen2.5-VL-like: 14 px patches, merge 2, temporal patch 2, width 4, MLP 8 (gated), 2 layers, layer 1 full
# attention, layer 0 in windows of 56 px = 2x2 merged tokens, merger out to 8.
SMALL_QWEN25_VISION = SimpleNamespace(hidden_size=4, intermediate_size=8, spatial_merge_size=2, patch_size=14,
                                      temporal_patch_size=2, depth=2, fullatt_block_indexes=[1], window_size=56,
                                      out_hidden_size=8)
# Qwen3-VL-like: 16 px patches, plain MLP, 1 layer of full attention, one DeepStack merger besides the main one.
SMALL_QWEN3_VISION = SimpleNamespace(hidden_size=4, intermediate_size=8, spatial_merge_size=2, patch_size=16,
                                     temporal_patch_size=2, depth=1, deepstack_visual_indexes=[0], out_hidden_size=8)


def test_qwen25_vision_flops_match_a_hand_count():
    # 2 groups of 3x2 merged tokens = 6 tokens, 24 patches each (2x2 per token).
    # Patch embedding 2*24*(3*2*14*14)*4 = 225792. Per layer 2*24*(4*16 + 3*4*8) = 7680, two layers 15360.
    # Layer 0's windows of 2x2 merged tokens: rows split 2+1, columns 2: windows of 16 and 8 patches, pairs
    # 256 + 64 = 320, attention 4*4*320 = 5120; layer 1 over all 24 patches: 4*4*576 = 9216.
    # Merger on 6 tokens of width 16: 2*6*(16*16 + 16*8) = 4608. Per group 260096, two groups 520192.
    assert qwen_vision_flops(SMALL_QWEN25_VISION, Geometry(2, 3, 2, 2)) == 520192


def test_qwen3_vision_flops_match_a_hand_count():
    # 1 group of 2x2 merged tokens, 16 patches. Embedding 2*16*(3*2*16*16)*4 = 196608; the layer 2*16*(4*16 + 2*4*8)
    # = 4096 and attention 4*4*16*16 = 4096; two mergers (main, DeepStack) 2 * 2*4*(16*16 + 16*8) = 6144.
    assert qwen_vision_flops(SMALL_QWEN3_VISION, Geometry(1, 2, 2, 2)) == 210944


def test_qwen_vision_flops_count_groups_not_frames():
    # The cost is per temporal group: twice the groups, twice the FLOPs; a 448x448 clip of Qwen2.5-VL's real
    # geometry is 16x16 merged tokens per group whatever the frame count inside the group.
    one = qwen_vision_flops(SMALL_QWEN25_VISION, Geometry(1, 16, 16, 2))
    assert qwen_vision_flops(SMALL_QWEN25_VISION, Geometry(4, 16, 16, 2)) == 4 * one


@pytest.fixture(scope="module", params=["qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def qwen_report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / f"{request.param}.json"
    code = main(["--preset", request.param, "--device", "cpu", "--frames", "4", "--methods", "baseline,dycoke",
                 "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--out", str(out), "--html", "",
                 "--quiet"])
    assert code == 0
    return json.loads(out.read_text())


def test_qwen_presets_bench_temporal_groups_of_merged_tokens(qwen_report):
    from dycoke.models import load

    name = qwen_report["model"]["name"]
    # The synthetic clip is drawn at 448x448: 16x16 tokens per group with patch 14 (Qwen2.5-VL), 14x14 with
    # patch 16 (Qwen3-VL); 4 frames are 2 groups of 2.
    side = {"qwen2.5-vl-tiny": 16, "qwen3-vl-tiny": 14}[name]
    tokens = side * side
    assert qwen_report["model"]["frames_per_group"] == 2 and qwen_report["model"]["tokens_per_frame"] == tokens
    baseline, dycoke = qwen_report["rows"]
    assert (baseline["groups"], baseline["tokens_per_group"]) == (2, tokens)
    assert baseline["visual_tokens_prefill"] == baseline["visual_tokens_attended"] == 2 * tokens
    # DyCoke's defaults K = 0.7, W = 4, P = 0.7: group 0 is the only anchor, group 1 keeps floor(0.3 N).
    kept = tokens + math.floor(0.3 * tokens + 1e-9)
    assert dycoke["visual_tokens_prefill"] == kept
    assert dycoke["visual_tokens_attended"] == math.floor(0.3 * kept + 1e-9)
    # Markers and timestamps counted as text: the analytic cache equals the one the baseline really filled.
    assert baseline["kv_cache_bytes"] == baseline["kv_cache_bytes_analytic_full"]
    assert dycoke["prefill_tokens"] - dycoke["visual_tokens_prefill"] == \
        baseline["prefill_tokens"] - baseline["visual_tokens_prefill"]
    config = load(name, device="cpu").model.config
    assert baseline["flops"]["vision"] == qwen_vision_flops(config.vision_config, Geometry(2, side, side, 2))
    assert "\n| 4 (2 groups) | baseline | " in markdown_table(qwen_report)
