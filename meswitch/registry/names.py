"""Registered model names, aliases and references (``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``).

Names become object-store keys and cache paths, so they are checked before anything is written:
lowercase letters, digits and ``. _ -``, never ``..`` or ``/``, and the house conventions
``meswitch-base-<name>``, ``meswitch-expert-<name>``, ``meswitch-router[-<name>]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meswitch.registry.errors import InvalidName

PREFIX = "meswitch-"
ALIASES = ("candidate", "production")
_PART = r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?"
_NAME = re.compile(rf"^meswitch-(?:(?:base|expert)-{_PART}|router(?:-{_PART})?)$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# The artifact kinds of meswitch.artifacts and the name prefix each must be registered under.
KIND_PREFIX = {"expert-delta": "meswitch-expert-", "base": "meswitch-base-", "router": "meswitch-router"}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid registered model name, else raise InvalidName saying why."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidName("model name is empty")
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidName(f"model name {name!r} must not contain '/', '\\' or '..'")
    if len(name) > 100:
        raise InvalidName(f"model name {name[:40]!r}… is longer than 100 characters")
    if not _NAME.match(name):
        raise InvalidName(
            f"model name {name!r} is not valid: use meswitch-expert-<name>, meswitch-base-<name> or "
            "meswitch-router[-<name>], with <name> made of lowercase letters, digits, '.', '_' and '-'"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias) or alias == "latest" or re.match(r"^v\d+$", alias):
        raise InvalidName(
            f"alias {alias!r} is not valid: a lowercase word such as 'candidate' or 'production' "
            "(not 'latest' nor v<number>)"
        )
    return alias


def validate_version(version: int | str) -> int:
    text = str(version)
    if not text.isdigit() or int(text) < 1:
        raise InvalidName(f"version {version!r} is not a positive integer")
    return int(text)


def expected_prefix(kind: str) -> str:
    return KIND_PREFIX.get(kind, PREFIX)


def check_kind(name: str, kind: str) -> None:
    """An artifact of one kind must not be registered under another kind's name."""
    prefix = expected_prefix(kind)
    if not name.startswith(prefix):
        raise InvalidName(f"a {kind!r} artifact must be registered under a name starting with {prefix!r}, not {name!r}")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a model, optionally one version or one alias."""

    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        if self.version:
            return f"{self.name}/{self.version}"
        return self.name


def split_ref(text: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` as (name, alias, version), unchecked: the one reading of
    the syntax, for ``parse_ref`` and for telling a reference from a folder (``flows.config``)."""
    if "@" in text:
        name, alias = text.split("@", 1)
        return name, alias, None
    if text.count("/") == 1 and text.rsplit("/", 1)[1].isdigit():
        name, version = text.rsplit("/", 1)
        return name, None, version
    return text, None, None


def parse_ref(text: str) -> Ref:
    """Parse ``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` and validate each part."""
    if not isinstance(text, str) or not text:
        raise InvalidName("reference is empty (expected NAME, NAME@ALIAS or NAME/VERSION)")
    name, alias, version = split_ref(text)
    if alias is not None:
        return Ref(validate_name(name), alias=validate_alias(alias))
    if version is not None:
        return Ref(validate_name(name), version=validate_version(version))
    return Ref(validate_name(name))
