"""Errors of the registry: each names what failed and where, so a flow or an operator can act on it."""

from __future__ import annotations

from meswitch.artifacts import ArtifactError


class RegistryError(Exception):
    """A registry operation failed; the message says what, where, and what was (not) written."""


class InvalidName(RegistryError, ValueError):
    """A model name, alias or reference is empty, malformed or breaks the naming conventions."""


class NotFound(RegistryError, LookupError):
    """A registered model, version, alias or stored object does not exist."""


class AccessDenied(RegistryError):
    """The object store refused the credentials (wrong key, missing permission)."""


class Unavailable(RegistryError):
    """MLflow or the object store did not answer, after retries with backoff."""


class IntegrityError(RegistryError, ArtifactError):
    """Stored bytes do not match their checksums, or an artifact is for another base model."""
