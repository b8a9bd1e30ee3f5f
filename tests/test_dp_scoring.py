"""DP's scoring point, the `dycoke_*` attention functions: the model's own query, checked against transformers' eager
attention probabilities; inert for every cache that is not a DyCokeCache; the same answer under sdpa and eager."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from conftest import moving_square_clip
from dycoke.config import DyCokeConfig
from dycoke.methods import get_method
from dycoke.pipeline import Pipeline, encode_prompt
from dycoke.pruning import ATTENTION_PREFIX, DyCokeCache, install_dp_hooks

QUESTION = "What moves in this video?"
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def clip2():
    return moving_square_clip(2)


@pytest.fixture(scope="module")
def double_pipeline():
    from dycoke.models import load

    return Pipeline(load("tiny-random", device="cpu", dtype=torch.float64))


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """The language model on another attention implementation for the block; the one it had afterwards."""
    decoder = model.get_decoder()
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation(name)
    try:
        yield
    finally:
        decoder.set_attn_implementation(previous)


def run(pipeline: Pipeline, clip, method: str, **config):
    return pipeline.answer(clip, QUESTION, method=method, config=DyCokeConfig(**config),
                           max_new_tokens=NEW_TOKENS, ignore_eos=True)


def test_the_language_model_runs_the_dycoke_variant_and_the_vision_tower_is_untouched(tiny_random):
    config = tiny_random.model.config
    assert config.text_config._attn_implementation == ATTENTION_PREFIX + "sdpa"
    assert config.vision_config._attn_implementation == "sdpa"


def test_scores_are_the_head_mean_attention_of_the_new_token_at_layer_l_minus_1(double_pipeline, clip2,
                                                                              monkeypatch):
    observed = []
    original = DyCokeCache.observe
    monkeypatch.setattr(DyCokeCache, "observe", lambda cache, scores: observed.append(scores.clone()) or
                        original(cache, scores))
    result = run(double_pipeline, clip2, "dp")
    assert len(observed) == NEW_TOKENS - 1 and observed[0].dtype == torch.float64

    # Reference, by hand in float64 from the hidden states entering layer L-1 of one forward of the prompt and
    # the generated tokens: layers < L are untouched by DP, so row S+k-1 is what decoding step k scored.
    loaded = double_pipeline.loaded
    model = loaded.model
    config = DyCokeConfig()
    prompt = encode_prompt(loaded.tokenizer, QUESTION)
    with torch.inference_mode():
        prepared = double_pipeline.prepare(clip2, prompt, get_method("dp"), config)
        generated = torch.tensor([result.token_ids[:-1]])
        embeds = torch.cat([prepared.embeds, model.get_input_embeddings()(generated)], dim=1)
        hidden = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[config.prune_layer - 1][0]
        probabilities = head_mean_attention_by_hand(model, config.prune_layer - 1, hidden)
    start, visual, prompt_length = len(prompt[0]), int(prepared.keep_mask.sum()), prepared.embeds.shape[1]
    for step, scores in enumerate(observed, start=1):
        expected = probabilities[prompt_length + step - 1, start:start + visual]
        torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-14)


def head_mean_attention_by_hand(model: torch.nn.Module, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
    """Qwen2 layer `layer_idx`'s causal attention probabilities [query, key], mean over query heads: the layer's
    RMS norm, q and k projections, rotary embedding at positions 0.. (the model's cos and sin), softmax of q.k / sqrt(head_dim)."""
    text = model.config.text_config
    layer = model.get_decoder().layers[layer_idx]
    attention = layer.self_attn
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = text.hidden_size // heads
    normed = layer.input_layernorm(hidden)  # the model's own norm and rotary: they compute in float32 whatever
    query = (normed @ attention.q_proj.weight.T + attention.q_proj.bias).view(-1, heads, head_dim)
    key = (normed @ attention.k_proj.weight.T + attention.k_proj.bias).view(-1, kv_heads, head_dim)
    cos, sin = model.get_decoder().rotary_emb(hidden[None], torch.arange(hidden.shape[0])[None])
    cos, sin = cos[0, :, None], sin[0, :, None]
    rotate = lambda x: torch.cat([-x[..., head_dim // 2:], x[..., :head_dim // 2]], dim=-1)  # noqa: E731
    query, key = (x * cos + rotate(x) * sin for x in (query, key))
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.einsum("qhd,khd->hqk", query, key) / head_dim**0.5
    causal = torch.ones(hidden.shape[0], hidden.shape[0], dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=0)


def test_baseline_through_the_dycoke_variant_equals_plain_sdpa(pipeline, tiny_random, clip2):
    patched = run(pipeline, clip2, "baseline")
    with torch.inference_mode():
        prepared = pipeline.prepare(clip2, encode_prompt(tiny_random.tokenizer, QUESTION), get_method("baseline"),
                                    DyCokeConfig())
        with attention_implementation(tiny_random.model, "sdpa"):
            plain = tiny_random.model.generate(inputs_embeds=prepared.embeds, max_new_tokens=NEW_TOKENS,
                                               min_new_tokens=NEW_TOKENS, do_sample=False)
    assert patched.token_ids == plain[0].tolist()


def test_dp_gives_the_same_answer_and_trace_under_eager_attention(double_pipeline, clip2):
    model = double_pipeline.loaded.model
    sdpa = run(double_pipeline, clip2, "dycoke", prune_ratio=0.5)
    with attention_implementation(model, "eager"):
        install_dp_hooks(model)
        assert model.config.text_config._attn_implementation == ATTENTION_PREFIX + "eager"
        eager = run(double_pipeline, clip2, "dycoke", prune_ratio=0.5)
    assert model.config.text_config._attn_implementation == ATTENTION_PREFIX + "sdpa"
    assert eager.token_ids == sdpa.token_ids
    assert eager.trace["steps"] == sdpa.trace["steps"]
    assert eager.metrics["reselections"] >= 1
