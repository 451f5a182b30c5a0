"""Config fields: `setting` (a field with its help and limits) and `Section` (a section that checks itself).

Every config section (`facenet_kfp.config`, `facenet_kfp.deploy_config`) is a frozen dataclass of
`Section` whose fields are `setting`s; `facenet_kfp.config` re-exports these names. Kept apart from
the sections so that a section may live in a module of its own without importing the whole config.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, ClassVar

from facenet_kfp.errors import InputError

MAX_INT = 2**31 - 1           # a KFP int parameter is an int64; steps and counts stay far below


def setting(default: Any, help: str, *, choices: tuple = (), minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A config field: its default, one line of help and its limits (checked when a section is built).

    `minimum` and `maximum` are inclusive, `above` and `below` exclusive; every int is also >= 0
    and at most MAX_INT unless `maximum` says otherwise. `describe_limits` prints them.
    """
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
                "above": above, "below": below}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """Checks and normalises a config section's fields when it is built."""
    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.NAME}.{f.name}"
            value = _coerce(where, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            _check_limits(where, value, f.metadata)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields."""


def _coerce(where: str, value: Any, kind: Any) -> Any:
    """`value` as a field of type `kind` (ints become floats, lists tuples); InputError otherwise."""
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and type(value) is float and math.isfinite(value) and value.is_integer():
        return int(value)   # 2e4, 1e3: exponent notation of a whole number
    if kind in (int, str, bool):
        if type(value) is not kind:
            hint = "; quote it in YAML" if kind is str and isinstance(value, (int, float)) else ""
            raise InputError(f"{where} must be {kind.__name__}, got {value!r}{hint}")
        if kind is str and value != value.strip():
            raise InputError(f"{where} must not start or end with spaces, got {value!r}")
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where} must be a mapping, got {value!r}")
        value_type = args[1]
        return {str(k): v if value_type is Any else _coerce(f"{where}.{k}", v, value_type)
                for k, v in value.items()}
    raise InputError(f"{where}: config fields of type {kind} are not supported")


def _bounds(meta: typing.Mapping[str, Any], is_int: bool) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """(("[" or "(", low or None), ("]" or ")", high or None)) of a field; ints are in [0, MAX_INT]
    unless the field says otherwise."""
    low = ("(", meta["above"]) if meta["above"] is not None else ("[", meta["minimum"])
    high = (")", meta["below"]) if meta["below"] is not None else ("]", meta["maximum"])
    if is_int:
        low = low if low[1] is not None else ("[", 0)
        high = high if high[1] is not None else ("]", MAX_INT)
    return low, high


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10**5 else f"{value:g}"


def _allowed(low: tuple[str, Any], high: tuple[str, Any]) -> str:
    """How `_check_limits` says a range: "in [32, 512]", "> 0", "at least 1"."""
    if low[1] is not None and high[1] is not None:
        return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low[1] is not None:
        return f"> {_number(low[1])}" if low[0] == "(" else f"at least {_number(low[1])}"
    if high[1] is not None:
        return f"< {_number(high[1])}" if high[0] == ")" else f"at most {_number(high[1])}"
    return ""


def describe_limits(cls: type, key: str) -> str:
    """The values a config field accepts, in words ("in [32, 512]", "one of a, b"; "" for any text)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[key]
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    kind = typing.get_type_hints(cls)[key]
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
    if kind not in (int, float):
        return ""
    return _allowed(*_bounds(meta, kind is int))


def _check_limits(where: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    for item in (value if isinstance(value, tuple) else (value,)):
        if meta["choices"] and item not in meta["choices"]:
            raise InputError(f"{where} must be one of {', '.join(meta['choices'])}; got {item!r}")
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        low, high = _bounds(meta, isinstance(item, int))
        if low[1] is not None and not (item > low[1] if low[0] == "(" else item >= low[1]):
            raise InputError(f"{where} must be {_allowed(low, (None, None))}, got {_number(item)}")
        if high[1] is not None and not (item < high[1] if high[0] == ")" else item <= high[1]):
            raise InputError(f"{where} must be {_allowed((None, None), high)}, got {_number(item)}")
