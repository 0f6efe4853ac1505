"""CLI flags derived from a config dataclass, and the config built back from the parsed flags.

A field's name, type and default make its flag (``--seq-len`` for ``seq_len``, ``--x/--no-x`` for a bool; an
optional ``float | None`` field takes a float or stays None);
its metadata holds the help text and, where needed, ``flag`` (another name) and ``choices``. Help and
choices may be functions, called when the parser is built, so that registered methods are listed. A value the
config's own checks refuse comes back as a one-line CommandError naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from meswitch.cli import CommandError
from meswitch.compression.config import ConfigError

T = TypeVar("T")


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of the dataclass ``cls``, its value parsed under the field's name."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, meta = _unoptional(types[f.name]), f.metadata
        if f.default is dataclasses.MISSING or kind not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: a flag needs a default and a type of bool, int, float or str")
        text = _value(meta.get("help", "")).replace("%", "%%")
        options: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f"{text} (default: {f.default})"}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
            if "choices" in meta:
                options["choices"] = _value(meta["choices"])
        parser.add_argument(_flag(f), **options)


def config_from_flags(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass ``cls`` from the flags :func:`add_config_flags` added. A value its own checks refuse raises
    CommandError naming the flag (``--samples must be at least 1, got 0``), which the CLI prints as one line."""
    try:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    except ConfigError as e:
        raise flag_error(cls, e) from e


def flag_error(cls: type, e: ConfigError) -> CommandError:
    """``e``, raised by a check of ``cls``'s field (at parsing or later, against the model), as one line naming
    the field's flag."""
    f = next(f for f in dataclasses.fields(cls) if f.name == e.field_name)
    return CommandError(f"{_flag(f)} {e.problem}")


def _flag(f: dataclasses.Field) -> str:
    """A field's flag: its metadata's ``flag``, else ``--`` and its name with dashes (``--seq-len``)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _unoptional(kind: Any) -> Any:
    """``X`` of ``X | None``; any other type as it is."""
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return kind


def _value(x: Any) -> Any:
    return x() if callable(x) else x
