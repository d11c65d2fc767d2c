"""A setting declared once: a dataclass field whose metadata holds its help text, choices and range.

:func:`setting` writes the field (PEFT's ``field(default=..., metadata={"help": ...})`` pattern);
the command line derives its options from the metadata (:mod:`gradkit.cli.options`) and
:func:`check_settings` is the one range checker, so a new option is one field. Torch-free: building
the command line imports this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gradkit.errors import GradkitError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Allowed numbers: finite and within ``[low, high]``, with open ends where asked."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: Any) -> bool:
        """``value`` is a finite int or float (not a bool) inside the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """``in [0, 1)``, ``> 0``, ``>= 1``... (whole bounds written in full: ``[0, 4294967296)``)."""
        low, high = _number(self.low), _number(self.high)
        if math.isfinite(self.high):
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        return f"> {low}" if self.low_open else f">= {low}"


def _number(value: float) -> str:
    """A bound as written: an int in full (2**32 as 4294967296, not 4.29497e+09), else ``:g``."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def setting(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple[Any, ...] | None = None,
    range: Range | None = None,
    example: str | None = None,
    why: str | None = None,
    group: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field carrying everything about one setting.

    ``help``: what it does (the command line's help text). ``choices``: the allowed values.
    ``range``: the allowed numbers (``None`` passes both where the field's type admits it);
    ``example``: a good value, quoted by the range error; ``why``: the reason for the range, added to
    that error. ``group``: the command line's option group. ``flag``: the option's name where it is not
    ``--field-name`` (``--no-trim-padding`` for a True default turns the option into store_false).
    ``metavar``: the value's name in ``--help``. ``cli=False``: a setting of library callers only.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "range": range,
        "example": example,
        "why": why,
        "group": group,
        "flag": flag,
        "metavar": metavar,
        "cli": cli,
    }
    if isinstance(default, (dict, list)):
        factory = type(default)
        return dataclasses.field(default_factory=lambda: factory(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def optional(field: dataclasses.Field) -> bool:
    """The field's type admits ``None`` (``float | None``): None then means "the default applies"."""
    return "None" in str(field.type)


def option_name(field: dataclasses.Field) -> str:
    """The field's command-line spelling (``--batch-size``), also used in error messages."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def check_value(field: dataclasses.Field, value: Any) -> None:
    """One setting against its choices and range; one clear line naming the option, the value, what
    is allowed and a value to pass."""
    meta = field.metadata
    if value is None and optional(field):
        return  # None: the default of the method or the data applies
    name = option_name(field) if meta.get("cli", True) else field.name
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join("none" if c is None else str(c) for c in choices)
        raise GradkitError(f"{name} {value!r} is not one of: {shown}")
    allowed = meta.get("range")
    if allowed is not None and not allowed.contains(value):
        why = f" ({meta['why']})" if meta.get("why") else ""
        example = f"; pass e.g. {name} {meta['example']}" if meta.get("example") else ""
        raise GradkitError(
            f"{name} {value} is not allowed: it must be finite and {allowed.describe()}{why}{example}"
        )


def check_settings(instance: Any) -> None:
    """Every field of the dataclass ``instance`` against its metadata, in declaration order."""
    for field in dataclasses.fields(instance):
        check_value(field, getattr(instance, field.name))


def check_values(cls: type, values: Mapping[str, Any]) -> None:
    """The entries of ``values`` that name fields of the dataclass ``cls``, each against its field."""
    for field in dataclasses.fields(cls):
        if field.name in values:
            check_value(field, values[field.name])


def settings_from(cls: type[T], values: Mapping[str, Any]) -> T:
    """An instance of the dataclass ``cls`` from the entries of ``values`` that name its fields (the
    rest keep their defaults; other keys are left to other dataclasses), checked."""
    names = {field.name for field in dataclasses.fields(cls)}
    instance = cls(**{key: value for key, value in values.items() if key in names})
    check_settings(instance)
    return instance
