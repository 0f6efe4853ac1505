"""The one registry module: MLflow model registry over artifact folders in a local folder or on S3.

Needs the ``registry`` extra (mlflow, boto3). GPU workers and ``meswitch.compression``,
``kernels``, ``routing`` and ``artifacts`` never import it.

    from meswitch.registry import open_registry
    reg = open_registry()                              # configuration from the environment, made once
    v = reg.publish("out/math", "meswitch-expert-math", alias="candidate")
    reg.promote("meswitch-expert-math", v)             # -> production
    r = reg.resolve("meswitch-expert-math", "production", base_fingerprint=fp)
    r.version, r.path                                  # a verified local copy

MLflow is imported when the facade (``client``: ``Registry``, ``open_registry``, ...) is first asked for,
so the names, URIs, configuration and errors are light enough for the CLI and the flows' plain modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from meswitch.registry.uri import Location, is_s3, parse_location

if TYPE_CHECKING:
    from meswitch.registry.client import (
        CachePrune,
        ModelInfo,
        Registry,
        Resolved,
        VersionInfo,
        manifest_tags,
        open_registry,
    )

_FACADE = {"CachePrune", "ModelInfo", "Registry", "Resolved", "VersionInfo", "manifest_tags", "open_registry"}


def __getattr__(name: str) -> Any:
    if name in _FACADE:
        return getattr(importlib.import_module("meswitch.registry.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AccessDenied",
    "CachePrune",
    "IntegrityError",
    "InvalidName",
    "Location",
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
    "is_s3",
    "manifest_tags",
    "open_registry",
    "parse_location",
    "parse_ref",
    "validate_alias",
    "validate_name",
]
