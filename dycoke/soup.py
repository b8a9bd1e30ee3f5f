"""Average trained checkpoints of one lineage into one ("model soup", Wortsman et al., ICML 2022).

    python -m dycoke.soup --out SOUP RUN_A RUN_B RUN_C:2

Fine-tuned continuations of one checkpoint stay in one basin of the loss, so the mean of their weights is a model
too, often better balanced than any of them: one continuation may keep DyCoke's accuracy while another lifts the
baseline's. Each ingredient is loaded with `from_pretrained`; the weighted mean is taken in float32 and saved as
`dycoke.train` saves (float16, the first ingredient's tokenizer), with `training.json` listing the ingredients and
their own training records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from dycoke.train import save


def parse_ingredient(text: str) -> tuple[Path, float]:
    """`DIR` or `DIR:WEIGHT` (a weight > 0; the weights are normalised to sum to 1)."""
    path, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight after ':' must be a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be > 0")
    return Path(path), value


def average_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts with the same keys and shapes, in float32."""
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError(f"the checkpoints differ in their weights: {sorted(keys ^ set(state))[:5]}")
    total = sum(weights)
    averaged = {}
    for key in states[0]:
        shapes = {tuple(state[key].shape) for state in states}
        if len(shapes) > 1:
            raise ValueError(f"{key} has different shapes in the checkpoints: {sorted(shapes)}")
        averaged[key] = sum(w / total * state[key].float() for w, state in zip(weights, states))
    return averaged


def make_soup(ingredients: list[tuple[Path, float]], out: Path) -> None:
    """Average the checkpoints and save the result to `out`."""
    if len(ingredients) < 2:
        raise ValueError("a soup needs two checkpoints or more")
    models = [_load(path) for path, _ in ingredients]
    weights = [weight for _, weight in ingredients]
    models[0].load_state_dict(average_state([model.state_dict() for model in models], weights))
    records = [{"checkpoint": str(path), "weight": weight / sum(weights), "training": _training(path)}
               for path, weight in ingredients]
    save(models[0], AutoTokenizer.from_pretrained(ingredients[0][0]), out, {"soup": records})


def _load(path: Path) -> LlavaOnevisionForConditionalGeneration:
    try:
        return LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except RuntimeError as error:  # weights that do not fit the checkpoint's own config
        raise ValueError(f"{path}: {error}") from None


def _training(path: Path) -> dict | None:
    record = path / "training.json"
    return json.loads(record.read_text()) if record.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dycoke.soup", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("checkpoints", nargs="+", type=parse_ingredient, help="DIR or DIR:WEIGHT")
    args = parser.parse_args(argv)
    try:
        make_soup(args.checkpoints, args.out)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
