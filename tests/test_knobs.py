"""Each method's knobs: named as the CLI and the results name them, one label each, shown for the methods that use them."""

from __future__ import annotations

import dataclasses

import pytest

from dycoke.cli import build_parser
from dycoke.config import ConfigError, DyCokeConfig
from dycoke.knobs import Knob
from dycoke.methods import REGISTRY, all_knobs, configure_from_knobs, get_method, knobs_shown, method_names

CONFIG_FIELDS = [field.name for field in dataclasses.fields(DyCokeConfig)]


def answer_options() -> dict[str, object]:
    """The CLI's `answer` options, flag -> default, read from the parser."""
    parser = build_parser()
    answer = next(action for action in parser._subparsers._group_actions[0].choices.values())
    return {flag: action.default for action in answer._actions for flag in action.option_strings}


def test_dycoke_and_its_ablations_use_exactly_the_settings_of_their_stages():
    names = {name: [knob.name for knob in get_method(name).knobs()] for name in ("baseline", "dycoke", "ttm", "dp")}
    assert names == {
        "baseline": [],
        "dycoke": CONFIG_FIELDS,
        "ttm": ["merge_ratio", "window"],
        "dp": ["prune_layer", "prune_ratio", "reselect_threshold"],
    }


@pytest.mark.parametrize("name", method_names())
def test_a_methods_own_knobs_are_its_options_with_the_registrys_defaults(name):
    method = get_method(name)
    for knob in method.knobs():
        assert isinstance(knob, Knob)
        if knob.in_config:
            assert getattr(DyCokeConfig(), knob.name) == knob.default
            continue
        assert knob.name in method.OPTIONS, f"{name}: knob {knob.name} is not one of its options"
        field_default = getattr(method, method.OPTIONS[knob.name])
        if field_default is not None:  # None: the ratio comes from a matched budget by default
            assert field_default == knob.default


def test_every_knob_is_a_cli_option_with_the_same_default():
    options = answer_options()
    for knob in all_knobs():
        assert knob.cli_flag in options, f"{knob.cli_flag} is not an option of `python -m dycoke answer`"
        if knob.in_config:
            assert options[knob.cli_flag] == knob.default


def test_labels_are_unique_on_the_page():
    labels = [knob.label for knob in all_knobs()]
    assert len(labels) == len(set(labels)), labels
    # "K" is DyCoke's merge ratio only: FastV's layer (K in its paper) has a label of its own.
    assert [label for label in labels if label.endswith(" K")] == ["merge ratio K"]


def test_the_knobs_that_set_dycokes_budget_are_exactly_those_that_change_it():
    dycoke = get_method("dycoke")
    base = DyCokeConfig()
    changed = {"merge_ratio": 0.5, "window": 2, "prune_layer": 2, "prune_ratio": 0.5, "reselect_threshold": 0.5}
    for knob in dycoke.knobs():
        moved = dycoke.budget(base.replace(**{knob.name: changed[knob.name]}), 32, 196) != dycoke.budget(base, 32, 196)
        assert moved == knob.sets_budget, knob.name


def test_shown_knobs_follow_the_methods_and_the_match():
    assert knobs_shown(["baseline"]) == []
    assert [k.name for k in knobs_shown(["fastv", "baseline"])] == ["fastv_layer", "fastv_ratio"]
    # Matched to DyCoke, FastV's ratio is set by DyCoke's budget, whose knobs it then needs.
    assert [k.name for k in knobs_shown(["fastv", "baseline"], match="dycoke")] == [
        "fastv_layer", "merge_ratio", "window", "prune_ratio"]
    # Two methods share DyCoke's knobs; each appears once.
    assert [k.name for k in knobs_shown(["dycoke", "ttm"])] == CONFIG_FIELDS
    assert [k.name for k in knobs_shown(["random"], match="dycoke")][:1] == ["seed"]


def test_knob_values_become_a_config_and_a_configured_method():
    config, method = configure_from_knobs("random", {"drop_ratio": "0.25", "seed": 3.0, "merge_ratio": 0.5})
    assert config == DyCokeConfig(merge_ratio=0.5)
    assert (method.ratio, method.match, method.seed) == (0.25, None, 3)
    # Matching ignores the ratio knob. DyCoke's budget by hand at 8 frames: TTM keeps 2 anchors × 196 + 6 × 58
    # = 740, DP attends floor(0.3 × 740) = 222.
    _, matched = configure_from_knobs("fastv", {"fastv_layer": 2, "fastv_ratio": 0.1}, match="dycoke")
    assert matched.match == "dycoke"
    assert matched.budget(DyCokeConfig(), 8, 196).attended == 222
    _, dycoke = configure_from_knobs("dycoke", {}, match="dycoke")
    assert dycoke is REGISTRY["dycoke"]


@pytest.mark.parametrize("values, message", [
    ({"seed": 1.5}, "random seed must be a whole number"),
    ({"seed": "x"}, "random seed must be a number"),
    ({"merge_ratio": float("nan")}, "merge ratio K must be a finite number"),
])
def test_bad_knob_values_name_the_knob(values, message):
    with pytest.raises(ConfigError, match=message):
        configure_from_knobs("random", values)


def test_a_knob_refuses_an_unknown_kind_and_a_default_outside_its_choices():
    with pytest.raises(ValueError, match="kind"):
        Knob("x", "x", "text", 0, "")
    with pytest.raises(ValueError, match="not among"):
        Knob("x", "x", "choice", 3, "", choices=(1, 2))
