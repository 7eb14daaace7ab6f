"""Config dataclasses: every option declared once, nested, and walked to build the command line.

A config is a dataclass whose fields carry their help (and, where the value is one of a few, their
choices) in ``metadata`` (``option``). A field whose default is a dataclass nests a sub-config
(``nested``); on the command line its options get the field's name as a prefix (``--encoder.kind``)
unless the field is ``flat`` (the policy's planner settings read ``--samples``, not
``--plan.samples``). The command line builds every option from the fields by itself, so adding an
option means adding one field.

Every setting has ONE name, the one the command line shows without its dashes and with underscores:
``samples``, ``cem.init_std``, ``subgoals.enabled``. ``apply_overrides`` and every function that takes
settings by name (``load_policy``, presets, protocols) use that name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


def comma_list(text: str) -> list[str]:
    """The names of a comma-separated command-line value, stripped, empty ones dropped: ``"a, b,"`` -> [a, b]."""
    return [name.strip() for name in text.split(",") if name.strip()]


def distinct_list(text: str, option_name: str) -> list[str]:
    """``comma_list``, each name once: a protocol or method named twice would count its episodes twice and
    narrow every interval."""
    names = comma_list(text)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{option_name} names {', '.join(twice)} twice: its episodes would count twice")
    return names


def path_list(text: str) -> list[str]:
    """The paths of a comma list; a path that exists is one path, commas in its name and all."""
    return [text] if os.path.exists(text) else comma_list(text)


def check_some_path_exists(text: str, option_name: str = "--checkpoint") -> None:
    """A ``ValueError`` for a comma list none of whose paths exists, nor the text as one path, and whose parts
    are not all model files by name (``.pt``): a mistyped path holding a comma is said to be missing, not
    taken for several models (a list of model files not yet there is left for the command to name)."""
    parts = path_list(text)
    if len(parts) > 1 and not any(os.path.exists(p) for p in parts) and not all(p.endswith(".pt") for p in parts):
        raise ValueError(f"{option_name} {text}: no such file (nor, read as a comma list, any of {parts})")


def model_paths(text: str, option_name: str = "--checkpoint") -> list[str]:
    """The model files of a comma list, each named once: a model pooled with itself would count its episodes
    twice and narrow every interval."""
    check_some_path_exists(text, option_name)
    paths, seen = path_list(text), {}
    for path in paths:
        where = os.path.realpath(path)
        if where in seen:
            raise ValueError(f"{option_name} names one model twice ({seen[where]}, {path}): pooled with itself, its "
                             f"episodes would count twice")
        seen[where] = path
    return paths


def option(default: Any, help: str, choices: tuple | None = None, cli: bool = True, path: bool = False) -> Any:
    """A config field: its default, the help the command line shows, the allowed values if few.

    ``cli=False`` keeps a field off the command line (a value the program fills in, such as the image
    size a model was trained at, which comes from the data). ``path=True`` marks a file or directory: the
    command line refuses it typed empty (an unset shell variable), which would mean the default or the
    working directory.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "path": path})


def nested(cls, help: str = "", flat: bool = False) -> Any:
    """A sub-config field; ``flat`` puts its options on the command line without a prefix."""
    return field(default_factory=cls, metadata={"help": help, "flat": flat, "nested": True})


@dataclass(frozen=True)
class ConfigField:
    """One leaf setting of a (nested) config."""

    path: str  # dotted attribute path from the root config: "policy.plan.samples"
    name: str  # the setting's one name (the option without dashes): "samples", "cem.init_std"
    type: Any  # the annotation: int, float, str, bool, int | None, ...
    value: Any  # its value in the config walked (the default, or the preset's value)
    help: str
    choices: tuple | None
    cli: bool
    is_path: bool = False  # a file or directory (``option(path=True)``)

    @property
    def flag(self) -> str:
        """The command-line option: ``--cem.init-std``."""
        return option_flag(self.name)


def option_flag(name: str) -> str:
    """A setting's command-line option: ``cem.init_std`` -> ``--cem.init-std``."""
    return "--" + name.replace("_", "-")


def as_options(settings: dict[str, Any]) -> str:
    """Settings by name as the command line types them: ``{"samples": 100, "subgoals.enabled": False}`` ->
    ``--samples 100 --no-subgoals.enabled``."""
    def typed(name: str, value) -> str:
        flag = option_flag(name)
        if isinstance(value, bool):
            return flag if value else "--no-" + flag[2:]
        return f"{flag} {value}"

    return " ".join(typed(name, value) for name, value in settings.items())


def is_config(x) -> bool:
    return dataclasses.is_dataclass(x)


def config_fields(cfg, path: str = "", prefix: str = "") -> Iterator[ConfigField]:
    """Every leaf field of ``cfg`` (an instance), nested configs walked depth-first."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        sub_path = f"{path}{f.name}"
        if is_config(value):
            sub_prefix = prefix if f.metadata.get("flat") else f"{prefix}{f.name}."
            yield from config_fields(value, sub_path + ".", sub_prefix)
            continue
        yield ConfigField(sub_path, prefix + f.name, hints[f.name], value, f.metadata.get("help", ""),
                          f.metadata.get("choices"), f.metadata.get("cli", True), f.metadata.get("path", False))


def check_at_least(cfg, minimum: float, names, prefix: str = "", strictly: bool = False) -> None:
    """A ``ValueError`` naming every option among ``names`` below ``minimum`` (or not above it, ``strictly``);
    ``prefix`` is the options' prefix on the command line (``encoder.``)."""
    ok = (lambda v: v > minimum) if strictly else (lambda v: v >= minimum)
    _check_bound(cfg, names, prefix, ok, f"> {minimum:g}" if strictly else f">= {minimum:g}")


def check_at_most(cfg, maximum: float, names, prefix: str = "") -> None:
    """A ``ValueError`` naming every option among ``names`` above ``maximum``: what a saved config or a
    command line may ask for is bounded before anything is allocated."""
    _check_bound(cfg, names, prefix, lambda v: v <= maximum, f"<= {maximum:g}")


def _check_bound(cfg, names, prefix: str, ok, bound: str) -> None:
    bad = [n for n in names if not ok(getattr(cfg, n))]
    if bad:
        raise ValueError("invalid settings: " + ", ".join(
            f"--{prefix}{n.replace('_', '-')} {getattr(cfg, n)} (must be {bound})" for n in bad))


def check_integer(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (no upper bound when ``high`` is None), or a ``ValueError`` naming
    ``name`` and the value. A numpy integer is taken; a bool is refused: ``True`` would quietly mean 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def check_paths_named(cfg, names) -> None:
    """A ``ValueError`` naming every path option among ``names`` given as an empty string (an unset shell
    variable, say), which would otherwise mean the working directory."""
    empty = [option_flag(n) for n in names if not str(getattr(cfg, n)).strip()]
    if empty:
        raise ValueError(f"{', '.join(empty)} must name a path, got an empty string")


def check_choices(cfg) -> None:
    """A ``ValueError`` naming the option for any value outside its declared choices."""
    for f in config_fields(cfg):
        if f.choices is not None and f.value not in f.choices:
            raise ValueError(f"{f.flag} must be one of {list(f.choices)}, got {f.value!r}")


def typed_options(cfg, names) -> list[str]:
    """The options among ``names`` (setting names; one ending in "." stands for every setting under it) whose
    value in ``cfg`` is not its class's default: those typed, so that one that does not apply is refused by name
    rather than ignored (one typed at its default changes nothing)."""
    defaults = dict(_defaults(type(cfg)))
    return [f.flag for f in config_fields(cfg) if f.cli and f.value != defaults[f.name]
            and any(f.name == n or (n.endswith(".") and f.name.startswith(n)) for n in names)]


def _defaults(cls, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(setting name, default) of every leaf field of ``cls``, without building ``cls`` (its checks may ask)."""
    for f in dataclasses.fields(cls):
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if is_config(value):
            inner = prefix if f.metadata.get("flat") else f"{prefix}{f.name}."
            yield from ((g.name, g.value) for g in config_fields(value, prefix=inner))
        else:
            yield prefix + f.name, value


def unwrap_optional(kind) -> tuple[Any, bool]:
    """(the type inside ``X | None``, True) or (kind, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return (inner[0] if len(inner) == 1 else Any), True
    return kind, False


def check_value(f: ConfigField, value, where: str = "") -> Any:
    """``value`` as the type of field ``f`` (an int for a float field becomes a float; a numpy scalar, from a
    grid of settings say, becomes the Python number), or a ``ValueError`` naming the setting: a string for a
    number, 2.5 for an int, NaN or infinity for a float, a number for a switch."""
    if isinstance(value, np.generic):
        value = value.item()
    kind, optional = unwrap_optional(f.type)
    if kind is Any or (value is None and optional):
        return value  # a setting of any type (a cost may be a callable) is checked by its config
    what = f"{where}: " if where else ""
    bad = ValueError(f"{what}{f.name} must be {_type_name(kind)}{' or None' if optional else ''}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad
    if f.choices is not None and value not in f.choices:
        raise ValueError(f"{what}{f.name} must be one of {list(f.choices)}, got {value!r}")
    return value


@functools.cache
def _own_fields(cls) -> tuple:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("nested"))


def check_types(cfg, prefix: str = "") -> None:
    """``check_value`` on every setting of ``cfg`` but its nested configs (they check their own), each value
    replaced by its checked form: a config built directly in Python (``PlannerConfig(samples=3.5)``) is
    refused as the same value by name or on the command line is. ``prefix`` names its settings (``cem.``)."""
    for f, kind in _own_fields(type(cfg)):
        view = ConfigField(f.name, prefix + f.name, kind, None, "", f.metadata.get("choices"), True)
        setattr(cfg, f.name, check_value(view, getattr(cfg, f.name)))


def _type_name(kind) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, str(kind))


def apply_overrides(cfg, overrides: dict[str, Any]):
    """``cfg`` with every ``{name: value}`` applied at once (so checks that relate two settings see both
    new values). Names are the settings' names (``samples``, ``cem.elites``; dashes work too); an unknown
    name or a value of the wrong type is a ``ValueError``. Configs are rebuilt, their checks run again."""
    # a setting of the command line wins a name it shares with one the program fills in (``env``: the
    # data's, typed; the model's, filled from the data)
    fields = {f.name: f for f in sorted(config_fields(cfg), key=lambda f: f.cli)}
    by_path = {}
    unknown = []
    for name, value in overrides.items():
        f = fields.get(name.replace("-", "_"))
        if f is None:
            unknown.append(name)
            continue
        by_path[f.path] = check_value(f, value)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} for {type(cfg).__name__}; known: {sorted(fields)}")
    return _replace(cfg, by_path)


def _replace(cfg, overrides: dict[str, Any]):
    direct, deeper = {}, {}
    for path, value in overrides.items():
        head, _, rest = path.partition(".")
        if rest:
            deeper.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in deeper.items():
        direct[head] = _replace(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct)


def from_dict(cls, d: dict, what: str = "", filled: list | None = None, prefix: str = ""):
    """Rebuild a (nested) config from its saved form (``dataclasses.asdict``).

    Settings the saved form lacks (added to the code after it was written) take today's defaults, and
    their names are appended to ``filled``; unknown keys (a config from newer code) are a ``ValueError``
    naming them. ``what`` names the file in errors.
    """
    where = what or cls.__name__
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys {unknown} (written by a newer version of this "
                         f"program?)")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        kind = hints[name]
        if name not in d:
            if filled is not None:
                filled.append(prefix + name)
            continue
        if isinstance(kind, type) and is_config(kind):
            kwargs[name] = from_dict(kind, d[name], what, filled, f"{prefix}{name}.")
        else:
            leaf = ConfigField(prefix + name, prefix + name, kind, None, "", f.metadata.get("choices"), True)
            kwargs[name] = check_value(leaf, d[name], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
