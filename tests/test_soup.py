"""`python -m dycoke.soup`: the weighted mean of two committed checkpoints, checked tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dycoke.models import load
from dycoke.soup import main

MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"


def test_a_soup_is_the_weighted_mean_of_its_checkpoints_and_loads_like_any_checkpoint(tmp_path):
    out = tmp_path / "soup"
    assert main(["--out", str(out), str(MODELS / "tiny-v1"), f"{MODELS / 'tiny-next'}:3"]) == 0
    first, second = (load_file(MODELS / name / "model.safetensors") for name in ("tiny-v1", "tiny-next"))
    soup = load_file(out / "model.safetensors")
    assert set(soup) == set(first)
    differing = 0
    for key, tensor in soup.items():
        expected = (0.25 * first[key].double() + 0.75 * second[key].double()).to(torch.float16)
        assert tensor.dtype == torch.float16
        assert torch.allclose(tensor.double(), expected.double(), rtol=1e-3, atol=1e-4), key
        differing += not torch.equal(first[key], second[key])
    assert differing > 10  # the two checkpoints really differ, so the mean is not one of them
    record = json.loads((out / "training.json").read_text())["soup"]
    assert [(Path(r["checkpoint"]).name, r["weight"]) for r in record] == [("tiny-v1", 0.25), ("tiny-next", 0.75)]
    assert record[0]["training"]["total_minutes"] > 0
    assert load(str(out), device="cpu").tokens_per_frame == 196


def test_checkpoints_that_do_not_match_are_refused(tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(MODELS / "tiny-v1", other)
    state = load_file(other / "model.safetensors")
    name = next(key for key, tensor in state.items() if tensor.ndim == 2)
    state[name] = state[name][:, :-1].contiguous()
    from safetensors.torch import save_file

    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    assert main(["--out", str(tmp_path / "soup"), str(MODELS / "tiny-v1"), str(other)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize("argument", ["dir:0", "dir:-1", "dir:heavy"])
def test_a_weight_must_be_a_positive_number(argument, capsys):
    with pytest.raises(SystemExit):
        main(["--out", "x", str(MODELS / "tiny-v1"), argument])
    assert "weight" in capsys.readouterr().err


def test_one_checkpoint_is_not_a_soup(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "soup"), str(MODELS / "tiny-v1")]) == 2
    assert "two checkpoints" in capsys.readouterr().err


def test_states_with_other_keys_or_shapes_are_refused():
    from dycoke.soup import average_state

    one = {"a": torch.ones(2, 3), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="differ in their weights"):
        average_state([one, {"a": torch.ones(2, 3)}], [1, 1])
    with pytest.raises(ValueError, match="different shapes"):
        average_state([one, {"a": torch.ones(3, 2), "b": torch.zeros(2)}], [1, 1])
    assert torch.equal(average_state([one, {"a": torch.full((2, 3), 4.0), "b": torch.ones(2)}], [1, 3])["a"],
                       torch.full((2, 3), 3.25))
