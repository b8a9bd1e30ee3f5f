"""Knobs: each method declares the settings it uses, so that the app's settings panel, the pane headers and the
CLI name them the same way.

A knob's `name` is the key in the results' `config` and in `dycoke.methods.configure` (DyCoke's own five are the
`DyCokeConfig` fields); `label` is the one name the app shows for it, everywhere on the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dycoke.config import ConfigError, DyCokeConfig

KINDS = ("float", "int", "layer", "choice")


@dataclass(frozen=True)
class Knob:
    """One setting: what it is called, what values it takes, its default, and one line of help.

    kind: "float" and "int" take values in [minimum, maximum] on `step`; "layer" is a decoder layer index from
    `minimum` to the model's last layer (the maximum is the model's); "choice" is one of `choices`.
    """

    name: str
    label: str
    kind: str
    default: float | int
    help: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple = ()
    flag: str = ""  # the CLI option, when it is not "--" + name with dashes
    in_config: bool = False  # a DyCokeConfig field, shared by every method that uses it
    sets_budget: bool = False  # the method's attended visual budget depends on it (a peer matching it needs it)
    matched: bool = False  # a drop ratio that matching another method's budget sets instead

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice" and self.default not in self.choices:
            raise ValueError(f"knob {self.name}: default {self.default!r} is not among {self.choices}")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def parse(self, value: object) -> float | int:
        """`value` as this knob's type (sliders send floats, the API may send strings), or a ConfigError."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.label} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{self.label} must be a finite number, got {value!r}")
        if self.kind == "float":
            return number
        if not number.is_integer():
            raise ConfigError(f"{self.label} must be a whole number, got {value!r}")
        return int(number)


MERGE_RATIO = Knob("merge_ratio", "merge ratio K", "float", DyCokeConfig.merge_ratio,
                   "TTM: share of each non-anchor frame's tokens dropped before the language model.",
                   minimum=0.0, maximum=0.95, step=0.05, in_config=True, sets_budget=True)
WINDOW = Knob("window", "window W", "choice", DyCokeConfig.window,
              "TTM: frames per window; the window's first frame keeps all its tokens.",
              choices=(1, 2, 4, 8), in_config=True, sets_budget=True)
PRUNE_LAYER = Knob("prune_layer", "pruning layer L", "layer", DyCokeConfig.prune_layer,
                   "DP prunes layers L and up; layer L−1's attention picks the tokens.",
                   minimum=1, step=1, in_config=True)
PRUNE_RATIO = Knob("prune_ratio", "prune ratio P", "float", DyCokeConfig.prune_ratio,
                   "DP: share of the visual tokens left out at each decoding step.",
                   minimum=0.0, maximum=0.95, step=0.05, in_config=True, sets_budget=True)
THRESHOLD = Knob("reselect_threshold", "reselect threshold τ", "float", DyCokeConfig.reselect_threshold,
                 "DP picks its tokens again when attention's cosine similarity to the last pick drops below τ.",
                 minimum=-1.0, maximum=1.0, step=0.01, flag="--threshold", in_config=True)
TTM_KNOBS = (MERGE_RATIO, WINDOW)
DP_KNOBS = (PRUNE_LAYER, PRUNE_RATIO, THRESHOLD)


def config_from(values: dict[str, object]) -> DyCokeConfig:
    """The DyCokeConfig of the config knobs in `values`; those left out keep their defaults."""
    fields = {knob.name: knob.parse(values[knob.name]) for knob in TTM_KNOBS + DP_KNOBS if knob.name in values}
    return DyCokeConfig(**fields)
