"""The committed `tiny` model: a regular checkpoint loaded through from_pretrained, answering the app's examples.

A quick regression check; the model's full accuracy is measured by `python -m dycoke.eval`, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlavaOnevisionForConditionalGeneration

from dycoke.models import load
from dycoke.pipeline import Pipeline
from dycoke.videoqa import EXAMPLE_FRAMES, EXAMPLES, is_correct, make_item

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "assets" / "models" / "tiny"
EXAMPLES_DIR = ROOT / "assets" / "examples"


@pytest.fixture(scope="module")
def trained():
    return Pipeline(load("tiny", device="cpu"))


def test_the_checkpoint_is_a_regular_directory_loaded_with_from_pretrained(monkeypatch):
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        path.name for path in CHECKPOINT.iterdir()}
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 8 * 1024 * 1024
    calls = []
    original = LlavaOnevisionForConditionalGeneration.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        calls.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(LlavaOnevisionForConditionalGeneration, "from_pretrained", classmethod(spy))
    loaded = load("tiny", device="cpu")
    assert calls == [str(CHECKPOINT)]
    assert not loaded.is_random and loaded.name == "tiny"
    text = loaded.model.config.text_config
    assert text.num_hidden_layers >= 6 and loaded.tokens_per_frame == 196 and loaded.image_size == 384


def test_the_examples_on_disk_are_the_suites_items():
    listed = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert [(entry["task"], entry["id"]) for entry in listed] == [
        (task, make_item("test", task, index, EXAMPLE_FRAMES).id) for task, index in EXAMPLES]


@pytest.mark.parametrize("method", ["baseline", "dycoke"])
@pytest.mark.parametrize("task,index", EXAMPLES)
def test_the_app_examples_are_answered_correctly_from_their_mp4_files(trained, task, index, method):
    item = make_item("test", task, index, EXAMPLE_FRAMES)
    result = trained.answer(EXAMPLES_DIR / f"{task}.mp4", item.question, method=method,
                            num_frames=EXAMPLE_FRAMES, max_new_tokens=8)
    assert is_correct(result.answer, item), (task, method, result.answer, item.response)
