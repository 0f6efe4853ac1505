"""Reading settings: YAML files that hold a mapping, and environment variables, each error naming its source."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_yaml_mapping(path: Path, expected: str = "a mapping", error: type[Exception] = ValueError) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty for an empty file).

    Invalid YAML or anything but a mapping raises ``error`` naming the file; ``expected`` says what it should hold.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}")
    return data


def env_value(env: Mapping[str, str], keys: str | tuple[str, ...], parse: Callable[[str], T], default: T) -> T:
    """The first of ``keys`` set to a non-empty value in ``env``, parsed; ``default`` when none is.

    A value that does not parse raises ``ValueError`` naming the variable.
    """
    for key in (keys,) if isinstance(keys, str) else keys:
        if raw := env.get(key):
            try:
                return parse(raw)
            except ValueError as e:
                raise ValueError(f"environment variable {key}={raw!r}: {e}") from e
    return default
