"""Command-line options derived from settings dataclasses: one ``--option`` per field, with the help
text, choices, default and option group its :func:`~gradkit.train.settings.setting` declares.

A field typed ``bool`` is a switch (``store_true``; ``store_false`` under a ``--no-...`` flag when it
defaults to True); ``int`` / ``float`` / ``str`` (``| None``) take a value of that type; ``None`` among
the choices is typed ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gradkit.train.settings import option_name

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def cli_fields(cls: type, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (all of them, or those in ``names``)."""
    wanted = None if names is None else set(names)
    return [
        field
        for field in dataclasses.fields(cls)
        if field.metadata.get("cli", False) and (wanted is None or field.name in wanted)
    ]


def _group(parser: argparse.ArgumentParser, title: str | None) -> Any:
    """The parser's option group called ``title`` (made on first use); the parser itself for None."""
    if title is None:
        return parser
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def _value_type(field: dataclasses.Field) -> Callable[[str], Any]:
    base = _TYPES[str(field.type).replace(" | None", "").strip()]
    if None in (field.metadata.get("choices") or ()):
        return lambda text: None if text == "none" else base(text)
    return base


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    names: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> None:
    """Add an option to ``parser`` for every command-line field of the dataclass ``cls`` (or those in
    ``names``), in the field's group (or ``title``); ``defaults`` replaces a field's default for this
    command (``gradkit noise-scale`` measures at 64 tokens, not 128)."""
    defaults = defaults or {}
    for field in cli_fields(cls, names):
        meta = field.metadata
        default = defaults.get(field.name, field.default)
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": meta["help"]}
        if str(field.type) == "bool":
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = _value_type(field)
            choices = meta.get("choices")
            if choices is not None:
                kwargs["choices"] = choices
                if None in choices:
                    kwargs["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        _group(parser, title or meta.get("group")).add_argument(option_name(field), **kwargs)


def values_of(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values of ``cls``'s command-line fields that ``args`` holds, by field name."""
    parsed = vars(args)
    return {field.name: parsed[field.name] for field in cli_fields(cls) if field.name in parsed}
