"""DyCokeConfig: the five knobs of DyCoke, validated where they are made."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, replace


MAX_WINDOW = 256  # no window needs to be longer than the longest clip (limits.MAX_FRAMES)


class ConfigError(ValueError):
    """A setting is out of its allowed range; the message names the field and the range."""


def _is_power_of_two(value: int) -> bool:
    return _is_integer(value) and value >= 1 and int(value) & (int(value) - 1) == 0


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class DyCokeConfig:
    """Defaults are the paper's main setting (K=0.7, W=4, L=3, P=0.7, tau=0.9)."""

    merge_ratio: float = 0.7
    window: int = 4
    prune_layer: int = 3
    prune_ratio: float = 0.7
    reselect_threshold: float = 0.9

    def __post_init__(self) -> None:
        _check_ratio("merge_ratio (K)", self.merge_ratio)
        _check_ratio("prune_ratio (P)", self.prune_ratio)
        if not _is_power_of_two(self.window) or self.window > MAX_WINDOW:
            raise ConfigError(f"window (W) must be a power of two from 1 to {MAX_WINDOW} (1, 2, 4, 8, ...), "
                              f"got {self.window!r}")
        if not _is_integer(self.prune_layer) or self.prune_layer < 1:
            raise ConfigError(f"prune_layer (L) must be an integer in 1..num_layers-1, got {self.prune_layer!r}")
        tau = self.reselect_threshold
        if not _is_number(tau) or not -1.0 <= tau <= 1.0:
            raise ConfigError(f"reselect_threshold (tau) must be in [-1, 1], got {tau!r}")

    def check_layers(self, num_layers: int) -> None:
        """L is checked against the model: layers L..num_layers-1 are pruned, layer L-1 is scored."""
        if not 1 <= self.prune_layer <= num_layers - 1:
            raise ConfigError(
                f"prune_layer (L) must be in 1..{num_layers - 1} for this model ({num_layers} layers), "
                f"got {self.prune_layer}"
            )

    def replace(self, **changes: float | int) -> "DyCokeConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_ratio(name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
