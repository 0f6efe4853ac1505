"""The one registry module: MLflow model registry over artifact folders in a local folder or on S3.

Needs the ``registry`` extra (mlflow, boto3). GPU workers and ``meswitch.compression``,
``kernels``, ``routing`` and ``artifacts`` never import it.

    from meswitch.registry import Registry
    reg = Registry()                                   # configuration from the environment
    v = reg.publish("out/math", "meswitch-expert-math", alias="candidate")
    reg.promote("meswitch-expert-math", v)             # -> production
    r = reg.resolve("meswitch-expert-math", "production", base_fingerprint=fp)
    r.version, r.path                                  # a verified local copy
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meswitch.registry.client import (
    ModelInfo,
    Registry,
    Resolved,
    VersionInfo,
    manifest_tags,
)
from meswitch.registry.config import RegistryConfig
from meswitch.registry.errors import (
    AccessDenied,
    IntegrityError,
    InvalidName,
    NotFound,
    RegistryError,
    Unavailable,
)
from meswitch.registry.names import Ref, parse_ref, validate_alias, validate_name
from meswitch.registry.store import content_hash


def publish(folder: Path | str, name: str, **kwargs: Any) -> int:
    """``Registry().publish(...)`` with the configuration from the environment."""
    return Registry().publish(folder, name, **kwargs)


def resolve(name: str, alias: str | None = "production", **kwargs: Any) -> Resolved:
    """``Registry().resolve(...)`` with the configuration from the environment."""
    return Registry().resolve(name, alias, **kwargs)


__all__ = [
    "AccessDenied",
    "IntegrityError",
    "InvalidName",
    "ModelInfo",
    "NotFound",
    "Ref",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "Resolved",
    "Unavailable",
    "VersionInfo",
    "content_hash",
    "manifest_tags",
    "parse_ref",
    "publish",
    "resolve",
    "validate_alias",
    "validate_name",
]
