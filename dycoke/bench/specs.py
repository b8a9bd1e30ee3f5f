"""Method specs on the command line: a registered method, optionally with settings (`dycoke:tau=-1`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dycoke.config import DyCokeConfig
from dycoke.methods import get_method, method_names


# Short names for DyCokeConfig fields in method specs such as `dycoke:tau=-1`.
KNOBS = {"K": "merge_ratio", "W": "window", "L": "prune_layer", "P": "prune_ratio", "tau": "reselect_threshold"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method, optionally with settings changed: `dycoke`, `dycoke:tau=-1`, `fastv:fastv_ratio=0.5`.

    DyCoke settings (K, W, L, P, tau or their field names) change the DyCokeConfig; any other KEY=VALUE is one of
    the method's own options (`Method.OPTIONS`), set through `dycoke.methods.configure`.
    """

    label: str
    method: str
    overrides: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def config(self, base: DyCokeConfig) -> DyCokeConfig:
        return base.replace(**self.overrides)

    def resolved(self, match: str | None = None):
        """What Pipeline.answer takes as `method`: the name, or a configured Method when options are set."""
        options = dict(self.options)
        if match and match != self.method and getattr(get_method(self.method), "matchable", False) \
                and not {"match", *_RATIO_OPTIONS} & set(options):
            options["match"] = match
        if not options:
            return self.method
        return _configure()(self.method, **options)


_RATIO_OPTIONS = {"fastv_ratio", "visionzip_ratio", "drop_ratio"}


def _configure():
    try:
        from dycoke.methods import configure
    except ImportError:  # a registry without per-method options
        raise ValueError("this version of dycoke.methods has no per-method options (configure)") from None
    return configure


def _option_value(text: str) -> object:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_method_spec(text: str) -> MethodSpec:
    name, *settings = text.strip().split(":")
    method = get_method(name)  # unknown names fail here, with the list of known ones
    overrides, options = {}, {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        field_name = KNOBS.get(key, key)
        if sep and field_name in DyCokeConfig.__dataclass_fields__:
            overrides[field_name] = int(value) if field_name in ("window", "prune_layer") else float(value)
        elif sep and key in getattr(method, "OPTIONS", {}):
            options[key] = _option_value(value)
        else:
            known = list(KNOBS) + list(getattr(method, "OPTIONS", {}))
            raise ValueError(f"bad setting '{setting}' in method '{text}'; use KEY=VALUE with KEY one of "
                             f"{', '.join(known)} or a DyCokeConfig field")
    DyCokeConfig().replace(**overrides)  # range checks now, not after minutes of benchmarking
    spec = MethodSpec(text.strip(), name, overrides, options)
    spec.resolved()  # the method's own range checks, also now
    return spec


def parse_methods(text: str | None) -> list[MethodSpec]:
    """Method specs, baseline first (ratios need it; it is added when missing)."""
    specs = [parse_method_spec(part) for part in (text.split(",") if text else method_names()) if part.strip()]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is listed twice: {text}")
    baseline = [spec for spec in specs if spec.label == "baseline"] or [MethodSpec("baseline", "baseline")]
    return baseline + [spec for spec in specs if spec.label != "baseline"]
