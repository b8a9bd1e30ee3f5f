"""Tests for dycoke.config: defaults, range checks with readable messages, check_layers, replace, to_dict."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dycoke.config import ConfigError, DyCokeConfig

POWERS_OF_TWO = {2**i for i in range(64)}
LONGEST_WINDOW = 256  # the README's documented cap: no window is longer than the longest clip (256 frames)


def test_defaults_are_the_papers():
    config = DyCokeConfig()
    assert config.merge_ratio == 0.7
    assert config.window == 4
    assert config.prune_layer == 3
    assert config.prune_ratio == 0.7
    assert config.reselect_threshold == 0.9


def test_to_dict():
    assert DyCokeConfig().to_dict() == {
        "merge_ratio": 0.7,
        "window": 4,
        "prune_layer": 3,
        "prune_ratio": 0.7,
        "reselect_threshold": 0.9,
    }


def test_frozen():
    config = DyCokeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.merge_ratio = 0.5  # type: ignore[misc]


def test_replace_returns_new_and_validates():
    config = DyCokeConfig()
    changed = config.replace(merge_ratio=0.5, window=8)
    assert changed.merge_ratio == 0.5 and changed.window == 8
    assert changed.prune_layer == 3 and changed.prune_ratio == 0.7 and changed.reselect_threshold == 0.9
    assert config.merge_ratio == 0.7 and config.window == 4  # original untouched
    with pytest.raises(ConfigError, match=r"window \(W\)"):
        config.replace(window=3)
    with pytest.raises(ConfigError, match=r"merge_ratio \(K\)"):
        config.replace(merge_ratio=1.0)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# Each invalid value: (field, value, substrings the message must contain: the field name and the range).
INVALID = [
    ("merge_ratio", 1.0, ["merge_ratio (K)", "[0, 1)"]),
    ("merge_ratio", -0.1, ["merge_ratio (K)", "[0, 1)"]),
    ("merge_ratio", 1.5, ["merge_ratio (K)", "[0, 1)"]),
    ("merge_ratio", math.nan, ["merge_ratio (K)", "[0, 1)"]),
    ("merge_ratio", math.inf, ["merge_ratio (K)", "[0, 1)"]),
    ("merge_ratio", "0.5", ["merge_ratio (K)", "[0, 1)"]),
    ("merge_ratio", None, ["merge_ratio (K)", "[0, 1)"]),
    ("prune_ratio", 1.0, ["prune_ratio (P)", "[0, 1)"]),
    ("prune_ratio", -1e-9, ["prune_ratio (P)", "[0, 1)"]),
    ("prune_ratio", math.nan, ["prune_ratio (P)", "[0, 1)"]),
    ("window", 3, ["window (W)", "power of two"]),
    ("window", 0, ["window (W)", "power of two"]),
    ("window", -4, ["window (W)", "power of two"]),
    ("window", 6, ["window (W)", "power of two"]),
    ("window", 12, ["window (W)", "power of two"]),
    ("window", 2.5, ["window (W)", "power of two"]),
    ("window", 512, ["window (W)", "power of two from 1 to 256"]),
    ("window", 2**100, ["window (W)", "power of two from 1 to 256"]),
    ("prune_layer", 0, ["prune_layer (L)", "1.."]),
    ("prune_layer", -1, ["prune_layer (L)", "1.."]),
    ("prune_layer", 2.5, ["prune_layer (L)", "1.."]),
    ("prune_layer", "3", ["prune_layer (L)", "1.."]),
    ("reselect_threshold", 1.01, ["reselect_threshold (tau)", "[-1, 1]"]),
    ("reselect_threshold", -1.01, ["reselect_threshold (tau)", "[-1, 1]"]),
    ("reselect_threshold", 2, ["reselect_threshold (tau)", "[-1, 1]"]),
    ("reselect_threshold", math.nan, ["reselect_threshold (tau)", "[-1, 1]"]),
    ("reselect_threshold", -math.inf, ["reselect_threshold (tau)", "[-1, 1]"]),
]


@pytest.mark.parametrize("field,value,needles", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_value_message_names_field_and_range(field, value, needles):
    with pytest.raises(ConfigError) as info:
        DyCokeConfig(**{field: value})
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("field,label", [
    ("merge_ratio", "merge_ratio (K)"),
    ("prune_ratio", "prune_ratio (P)"),
    ("window", "window (W)"),
    ("prune_layer", "prune_layer (L)"),
    ("reselect_threshold", "reselect_threshold (tau)"),
])
@pytest.mark.parametrize("value", [True, False])
def test_bools_rejected(field, label, value):
    with pytest.raises(ConfigError, match=label.replace("(", r"\(").replace(")", r"\)")):
        DyCokeConfig(**{field: value})


@pytest.mark.parametrize("changes", [
    {"merge_ratio": 0.0},
    {"merge_ratio": 0},
    {"merge_ratio": 0.999999},
    {"prune_ratio": 0.0},
    {"prune_ratio": 0},
    {"window": 1},
    {"window": 2},
    {"window": 64},
    {"window": 256},
    {"prune_layer": 1},
    {"prune_layer": 100},
    {"reselect_threshold": -1.0},
    {"reselect_threshold": 1.0},
    {"reselect_threshold": -1},
    {"reselect_threshold": 1},
    {"reselect_threshold": 0},
    {"merge_ratio": 0.0, "prune_ratio": 0.0, "window": 1, "prune_layer": 1, "reselect_threshold": -1.0},
])
def test_valid_edge_values_accepted(changes):
    config = DyCokeConfig(**changes)
    for field, value in changes.items():
        assert getattr(config, field) == value


@pytest.mark.parametrize("num_layers", [2, 3, 4, 24, 28])
def test_check_layers_accepts_1_to_n_minus_1(num_layers):
    for layer in range(1, num_layers):
        DyCokeConfig(prune_layer=layer).check_layers(num_layers)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 24, 28])
def test_check_layers_rejects_n_and_above(num_layers):
    for layer in (num_layers, num_layers + 1, num_layers + 10):
        with pytest.raises(ConfigError) as info:
            DyCokeConfig(prune_layer=layer).check_layers(num_layers)
        assert "prune_layer (L)" in str(info.value)
        assert str(num_layers - 1) in str(info.value)


def test_check_layers_zero_rejected_at_construction():
    with pytest.raises(ConfigError, match=r"prune_layer \(L\)"):
        DyCokeConfig(prune_layer=0)


def test_default_l3_fits_a_24_layer_model_not_a_3_layer_one():
    DyCokeConfig().check_layers(24)
    DyCokeConfig().check_layers(4)
    with pytest.raises(ConfigError):
        DyCokeConfig().check_layers(3)


# --------------------------------------------------------------------------------------------------------
# Properties: accepted iff in range, with the predicate computed here.
# --------------------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 2.0),
    st.integers(-5, 5),
    st.sampled_from([0.0, 1.0, -1.0, 0.9999999999, 1.0000000001, -1.0000000001, -0.0]),
)


def _ratio_ok(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (not math.isnan(value)) and value >= 0 and value < 1


def _tau_ok(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (not math.isnan(value)) and -1 <= value <= 1


def _window_ok(value) -> bool:
    return type(value) is int and value in POWERS_OF_TWO and value <= LONGEST_WINDOW


def _layer_ok(value) -> bool:
    return type(value) is int and value >= 1


def _accepted(**changes) -> bool:
    try:
        DyCokeConfig(**changes)
    except ConfigError:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(value=NUMBERS)
def test_property_merge_ratio(value):
    assert _accepted(merge_ratio=value) == _ratio_ok(value)


@settings(max_examples=150, deadline=None)
@given(value=NUMBERS)
def test_property_prune_ratio(value):
    assert _accepted(prune_ratio=value) == _ratio_ok(value)


@settings(max_examples=150, deadline=None)
@given(value=NUMBERS)
def test_property_reselect_threshold(value):
    assert _accepted(reselect_threshold=value) == _tau_ok(value)


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.integers(-10, 5000), st.sampled_from(sorted(POWERS_OF_TWO)[:20]), st.booleans()))
def test_property_window(value):
    assert _accepted(window=value) == _window_ok(value)


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.integers(-1000, 1000), st.booleans(), st.floats(-5, 5)))
def test_property_prune_layer(value):
    assert _accepted(prune_layer=value) == _layer_ok(value)


@settings(max_examples=100, deadline=None)
@given(layer=st.integers(1, 200), num_layers=st.integers(1, 200))
def test_property_check_layers(layer, num_layers):
    config = DyCokeConfig(prune_layer=layer)
    ok = 1 <= layer and layer <= num_layers - 1
    if ok:
        config.check_layers(num_layers)
    else:
        with pytest.raises(ConfigError):
            config.check_layers(num_layers)


@settings(max_examples=100, deadline=None)
@given(
    merge_ratio=NUMBERS,
    prune_ratio=NUMBERS,
    window=st.integers(-2, 40),
    prune_layer=st.integers(-2, 40),
    reselect_threshold=NUMBERS,
)
def test_property_all_fields_together(merge_ratio, prune_ratio, window, prune_layer, reselect_threshold):
    ok = (_ratio_ok(merge_ratio) and _ratio_ok(prune_ratio) and _window_ok(window)
          and _layer_ok(prune_layer) and _tau_ok(reselect_threshold))
    assert _accepted(merge_ratio=merge_ratio, prune_ratio=prune_ratio, window=window,
                     prune_layer=prune_layer, reselect_threshold=reselect_threshold) == ok
