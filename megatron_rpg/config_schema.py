"""The machinery under every config section: typed dataclasses that check their fields.

    @dataclass
    class MySection(Section):
        lr: float = 1e-6
        def validate(self) -> None:
            check("lr", self.lr, self.lr > 0, "> 0")

A section built in code or loaded (`build(cls, mapping)`) is type-checked field by field and
then range-checked by its own `validate`; every failure is a `ConfigError` naming the dotted key,
the value and what is allowed. Components own their sections (losses/config.py); config.py
assembles the run's.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

UNBOUNDED = {"infinity": True}  # field metadata: a float field that may be .inf


class ConfigError(ValueError):
    """A config value is unknown or invalid; `key` is its dotted path (e.g. `loss.beta`)."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key {key!r}: got {value!r}; allowed: {allowed}")

    def under(self, section: str) -> ConfigError:
        return ConfigError(
            f"{section}.{self.key}" if section else self.key, self.value, self.allowed
        )


def check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


class Section:
    """Base of every config section: type-check all fields, then the section's own `validate`."""

    def __post_init__(self) -> None:
        validate_fields(self)
        self.validate()

    def validate(self) -> None:
        """Range checks of the section; raise ConfigError naming the field."""


def validate_fields(obj: Any) -> None:
    """Type-check a dataclass built in code (the loader coerces; this only checks)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = coerce(f.name, getattr(obj, f.name), hints[f.name])
        if isinstance(value, float) and not f.metadata.get("infinity"):
            check(f.name, value, math.isfinite(value), "a finite number")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
        check(key, value, value in choices, f"one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if tp is bool:
        check(key, value, isinstance(value, bool), "true or false")
        return value
    if tp is int:
        check(key, value, isinstance(value, int) and not isinstance(value, bool), "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, value, "a number") from None
        check(
            key,
            value,
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and not math.isnan(value),
            "a number",
        )
        return float(value)
    if tp is str:
        check(
            key,
            value,
            isinstance(value, str | int | float) and not isinstance(value, bool),
            "a string",
        )
        return str(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} for {key!r}")


def build(cls: Any, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", data, f"a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                _join(prefix, str(key)), data[key], f"a key of {cls.__name__}: {sorted(names)}"
            )
    kwargs = {k: coerce(_join(prefix, k), v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by cls's own checks, with a key local to cls
        raise err.under(prefix) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
