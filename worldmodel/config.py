"""Config dataclasses: every option declared once, nested, and walked to build the command line.

A config is a dataclass whose fields carry their help (and, where the value is one of a few, their
choices) in ``metadata``. A field whose default is a dataclass nests a sub-config; on the command line
its options get the field's name as a prefix (``--encoder.kind``) unless the field is ``flat``
(``TrainConfig.model``'s own fields read ``--latent-dim``). ``wm`` turns every field into an option by
itself, so adding an option means adding one field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator


def option(default: Any, help: str, choices: tuple | None = None, cli: bool = True) -> Any:
    """A config field: its default, the help the command line shows, the allowed values if few.

    ``cli=False`` keeps a field off the command line (a value the program fills in, such as the image
    size a model was trained at, which comes from the data).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def nested(cls, help: str = "", flat: bool = False) -> Any:
    """A sub-config field; ``flat`` puts its options on the command line without a prefix."""
    return field(default_factory=cls, metadata={"help": help, "flat": flat, "nested": True})


@dataclass(frozen=True)
class ConfigField:
    """One leaf option of a (nested) config."""

    path: str  # dotted attribute path from the root config: "model.encoder.kind"
    flag: str  # the command-line option: "--encoder.kind"
    type: Any  # the annotation: int, float, str, bool, int | None, ...
    value: Any  # its value in the config walked (the default, or the preset's value)
    help: str
    choices: tuple | None
    cli: bool


def is_config(x) -> bool:
    return dataclasses.is_dataclass(x)


def config_fields(cfg, path: str = "", prefix: str = "") -> Iterator[ConfigField]:
    """Every leaf field of ``cfg`` (an instance), nested configs walked depth-first."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        sub_path = f"{path}{f.name}"
        if is_config(value):
            sub_prefix = prefix if f.metadata.get("flat") else f"{prefix}{f.name.replace('_', '-')}."
            yield from config_fields(value, sub_path + ".", sub_prefix)
            continue
        yield ConfigField(sub_path, "--" + prefix + f.name.replace("_", "-"), hints[f.name], value,
                          f.metadata.get("help", ""), f.metadata.get("choices"), f.metadata.get("cli", True))


def check_at_least(cfg, minimum: float, names, prefix: str = "", strictly: bool = False) -> None:
    """A ``ValueError`` naming every option among ``names`` below ``minimum`` (or not above it, ``strictly``);
    ``prefix`` is the options' prefix on the command line (``encoder.``)."""
    bad = [n for n in names if not (getattr(cfg, n) > minimum if strictly else getattr(cfg, n) >= minimum)]
    if bad:
        bound = f"> {minimum:g}" if strictly else f">= {minimum:g}"
        raise ValueError("invalid settings: " + ", ".join(
            f"--{prefix}{n.replace('_', '-')} {getattr(cfg, n)} (must be {bound})" for n in bad))


def check_choices(cfg) -> None:
    """A ``ValueError`` naming the option for any value outside its declared choices."""
    for f in config_fields(cfg):
        if f.choices is not None and f.value not in f.choices:
            raise ValueError(f"{f.flag} must be one of {list(f.choices)}, got {f.value!r}")


def apply_overrides(cfg, overrides: dict[str, Any]):
    """``cfg`` with every ``{dotted path: value}`` applied at once (so checks that relate two settings see
    both new values); unknown paths are a ``ValueError``. Configs are rebuilt, their checks run again."""
    known = {f.path for f in config_fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown} for {type(cfg).__name__}")
    return _replace(cfg, overrides)


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


def from_dict(cls, d: dict, what: str = ""):
    """Rebuild a (nested) config from ``dataclasses.asdict`` output; unknown keys are a ``ValueError``."""
    if not isinstance(d, dict):
        raise ValueError(f"{what or cls.__name__}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        kind = hints[name]
        kwargs[name] = from_dict(kind, value, what) if isinstance(kind, type) and is_config(kind) else value
    return cls(**kwargs)
