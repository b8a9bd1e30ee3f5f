"""The static (preallocated) KV cache: the same tokens as the dynamic one, and DP's device-side reselect decision
gives the same tokens and trace as the host-side one, without a single host-device sync in a decoding step."""

from __future__ import annotations

import collections
from contextlib import contextmanager

import pytest
import torch
from transformers import StaticCache

from conftest import moving_square_clip
from dycoke.config import DyCokeConfig
from dycoke.methods import get_method
from dycoke.pipeline import Pipeline, encode_prompt
from dycoke.pruning import DyCokeCache
from dycoke.static_pruning import StaticDyCokeCache

QUESTION = "What moves in this video?"
NEW_TOKENS = 6
# On this clip and model, DyCoke's step-to-step cosines are 0.0002, 0.0093, 0.0, 0.0058: tau = 0.005
# reselects at some steps and reuses at others, so both sides of the device-side decision are exercised.
MIXED_TAU = 0.005
# What waits for the device on CUDA: reading a value, or an output whose size depends on values.
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


@pytest.fixture(scope="module")
def clip2():
    return moving_square_clip(2)


@pytest.fixture(scope="module")
def loaded64():
    from dycoke.models import load

    return load("tiny-random", device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def pipelines(loaded64):
    return {kind: Pipeline(loaded64, cache=kind) for kind in ("dynamic", "static")}


def answer(pipeline: Pipeline, clip, method: str, **config):
    return pipeline.answer(clip, QUESTION, method=method, config=DyCokeConfig(**config), max_new_tokens=NEW_TOKENS,
                           ignore_eos=True)


def test_static_and_dynamic_caches_give_the_same_tokens(pipelines, clip2):
    dynamic, static = (answer(pipelines[kind], clip2, "baseline") for kind in ("dynamic", "static"))
    assert static.token_ids == dynamic.token_ids
    assert len(static.token_ids) == NEW_TOKENS


@pytest.mark.parametrize("method, config", [
    ("dycoke", {"reselect_threshold": MIXED_TAU}),
    ("dycoke", {"reselect_threshold": -1.0}),  # selects once
    ("dp", {"reselect_threshold": 1.0, "prune_ratio": 0.5}),  # selects at every step
])
def test_the_device_side_decision_gives_the_host_side_tokens_and_trace(pipelines, clip2, method, config):
    host, device = (answer(pipelines[kind], clip2, method, **config) for kind in ("dynamic", "static"))
    assert device.token_ids == host.token_ids
    assert device.trace["steps"] == host.trace["steps"]
    assert device.metrics["reselections"] == host.metrics["reselections"]
    assert device.metrics["visual_tokens_attended_mean"] == host.metrics["visual_tokens_attended_mean"]
    if config.get("reselect_threshold") == MIXED_TAU:
        assert {step["reselected"] for step in host.trace["steps"]} == {True, False}


@pytest.mark.parametrize("preset", ["qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_qwen_vl_m_rope_decodes_alike_on_both_caches(preset):
    """M-RoPE positions (generate_kwargs) and DyCoke's kept positions go through the static cache unchanged."""
    from dycoke.models import load

    loaded = load(preset, device="cpu", dtype=torch.float64)
    clip = moving_square_clip(4, size=112)
    by_kind = {kind: Pipeline(loaded, cache=kind) for kind in ("dynamic", "static")}
    for method, config in (("baseline", {}), ("dycoke", {"reselect_threshold": 1.0})):
        host, device = (answer(by_kind[kind], clip, method, **config) for kind in ("dynamic", "static"))
        assert device.token_ids == host.token_ids and len(host.token_ids) == NEW_TOKENS
        assert device.trace["steps"] == host.trace["steps"]


def test_a_static_request_preallocates_prompt_plus_new_tokens(pipelines, loaded64, clip2):
    pipeline = pipelines["static"]
    prompt = encode_prompt(loaded64.tokenizer, QUESTION)
    with torch.inference_mode():
        for method, kind in (("baseline", StaticCache), ("dycoke", StaticDyCokeCache)):
            chosen = get_method(method)
            prepared = pipeline.prepare(clip2, prompt, chosen, chosen.effective_config(DyCokeConfig()),
                                        new_tokens=NEW_TOKENS)
            assert type(prepared.cache) is kind
            # The last new token is never fed back: transformers' own static cache also holds max_length - 1.
            assert all(layer.max_cache_len == prepared.embeds.shape[1] + NEW_TOKENS - 1
                       for layer in prepared.cache.layers)
        # A conversation's turns (no number of new tokens) keep the dynamic cache, which they crop and extend.
        prepared = pipeline.prepare(clip2, prompt, get_method("dycoke"), DyCokeConfig())
        assert type(prepared.cache) is DyCokeCache


@contextmanager
def counting_syncs(model: torch.nn.Module):
    """Counts, per call site, the calls that make the host wait for the device inside decoding forwards."""
    counts: collections.Counter = collections.Counter()
    decoding = [False]
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(name):
        def call(self, *args, **kwargs):
            if decoding[0]:
                counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return call

    def before(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        decoding[0] = embeds is not None and embeds.shape[1] == 1

    def after(module, args, kwargs, output):
        decoding[0] = False

    decoder = model.get_decoder()
    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.register_forward_hook(after, with_kwargs=True)]
    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, counted(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for handle in handles:
            handle.remove()


def test_a_static_dycoke_decoding_step_makes_no_host_sync(pipelines, loaded64, clip2):
    with counting_syncs(loaded64.model) as counts:
        result = answer(pipelines["static"], clip2, "dycoke", reselect_threshold=MIXED_TAU)
    assert len(result.trace["steps"]) == NEW_TOKENS - 1
    assert dict(counts) == {}
    # The counter sees the host-side decision: one bool() per step that has a previous selection.
    with counting_syncs(loaded64.model) as counts:
        answer(pipelines["dynamic"], clip2, "dycoke", reselect_threshold=MIXED_TAU)
    assert dict(counts) == {"__bool__": NEW_TOKENS - 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_a_static_dycoke_decoding_step_makes_no_cuda_sync(clip2):
    from dycoke.models import load

    pipeline = Pipeline(load("tiny-random", device="cuda", dtype=torch.float32), cache="static")
    answer(pipeline, clip2, "dycoke", reselect_threshold=MIXED_TAU)  # warm up outside the check
    decoder = pipeline.loaded.model.get_decoder()

    def before(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        torch.cuda.set_sync_debug_mode("error" if embeds is not None and embeds.shape[1] == 1 else "default")

    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.register_forward_hook(lambda *a, **k: torch.cuda.set_sync_debug_mode("default"),
                                             with_kwargs=True)]
    try:
        result = answer(pipeline, clip2, "dycoke", reselect_threshold=MIXED_TAU)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for handle in handles:
            handle.remove()
    assert len(result.trace["steps"]) == NEW_TOKENS - 1


def test_static_pruned_layers_gather_the_selection_on_their_own_device():
    from transformers import Qwen2Config

    from dycoke.caches import CachePlan

    dim, prompt, devices = 4, 7, ["cpu", "cpu", "cpu", "meta"]  # 2 text, 4 visual, 1 text; L = 2, layer 3 on meta
    config = Qwen2Config(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=dim,
                         num_hidden_layers=len(devices))
    cache = StaticDyCokeCache(CachePlan("static", prompt + 2, config), visual_start=2,
                              frame_of_visual=torch.tensor([0, 0, 1, 1]), num_frames=2, prune_layer=2,
                              prune_ratio=0.5, reselect_threshold=0.9)
    generator = torch.Generator().manual_seed(0)
    rows = lambda length: torch.randn(1, 1, length, dim, generator=generator)  # noqa: E731
    prefill = [(rows(prompt), rows(prompt)) for _ in devices]
    for layer, device in enumerate(devices):
        cache.update(prefill[layer][0].to(device), prefill[layer][1].to(device), layer)

    step = [(rows(1), rows(1)) for _ in devices]
    cache.update(*step[0], 0)
    scoring_keys, _ = cache.update(*step[1], 1)
    assert scoring_keys.shape[-2] == prompt + 2  # the static layer: one row still unwritten
    query = torch.randn(1, 2, 1, dim, generator=generator)
    cache.attend(1, query, scoring_keys, None, dim**-0.5)
    # By hand: both query heads share the one kv head; softmax over the 8 written keys, mean, visual span 2..5.
    logits = query[0, :, 0] @ scoring_keys[0, 0, :prompt + 1].T * dim**-0.5
    visual = logits.softmax(dim=-1).mean(dim=0)[2:6]
    selected = sorted(visual.argsort(descending=True)[:2].tolist())
    assert cache.selected.tolist() == selected

    kept = [0, 1, *(2 + index for index in selected), 6]
    for layer in (2, 3):
        keys, values = cache.update(step[layer][0].to(devices[layer]), step[layer][1].to(devices[layer]), layer)
        assert keys.device.type == values.device.type == devices[layer]
        assert keys.shape == (1, 1, len(kept) + 2, dim)  # kept prompt rows, then one row per decoding step
        mask = cache.attend(layer, query.to(devices[layer]), keys, None, dim**-0.5)
        assert mask.shape == (1, 1, 1, len(kept) + 2)
        if devices[layer] == "cpu":
            torch.testing.assert_close(keys[0, :, :len(kept)], prefill[layer][0][0, :, kept], rtol=0, atol=0)
            torch.testing.assert_close(values[0, :, len(kept)], step[layer][1][0, :, 0], rtol=0, atol=0)
            assert mask.flatten().tolist() == [True] * (len(kept) + 1) + [False]
    assert [(record.kept_per_frame, record.reselected) for record in cache.steps] == [
        ([sum(1 for index in selected if index < 2), sum(1 for index in selected if index >= 2)], True)]
