"""Errors of the registry, and the one rule that says which failures are worth trying again.

Each error names what failed and where, so a flow or an operator can act on it.
"""

from __future__ import annotations

from meswitch.artifacts import ArtifactError


class RegistryError(Exception):
    """A registry operation failed; the message says what, where, and what was (not) written."""


class InvalidName(RegistryError, ValueError):
    """A model name, alias or reference is empty, malformed or breaks the naming conventions."""


class NotFound(RegistryError, LookupError):
    """A registered model, version, alias or stored object does not exist."""


class AccessDenied(RegistryError):
    """The object store refused the credentials (wrong key, missing permission), or none were found."""


class Unavailable(RegistryError):
    """MLflow or the object store did not answer, after retries with backoff."""


class IntegrityError(RegistryError, ArtifactError):
    """Stored bytes do not match their checksums, or an artifact is for another base model."""


# S3 error codes that mean "try later"; any 5xx status counts too.
_S3_TRANSIENT = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed", "503"}
# MLflow error codes that mean "try later".
_MLFLOW_TRANSIENT = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and every exception it was raised from or while handling."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code carried by ``exc`` or anything in its chain, e.g. ``NoSuchKey``; any 5xx
    that is not a known "try later" code reads as ``InternalError``."""
    from botocore.exceptions import ClientError

    for e in chain(exc):
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(err.get("Code") or status or "")
            if status and int(status) >= 500 and code not in _S3_TRANSIENT:
                return "InternalError"
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth trying again later: a server down, restarting or overloaded, a lost connection, a timeout,
    a locked SQLite file; not refused credentials, a bad name or bad input, which fail every time.

    The one rule of the package: the registry's MLflow retries, the translation of what botocore still
    could not do into ``Unavailable``, and Prefect's retries of I/O tasks all ask it.
    """
    import requests
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError

    errors = chain(exc)
    if any(isinstance(e, (AccessDenied, InvalidName)) for e in errors):
        return False
    if any(isinstance(e, Unavailable) for e in errors):  # already judged so, after retries
        return True
    if (code := s3_error_code(exc)) is not None:
        return code in _S3_TRANSIENT
    lost = (
        ConnectionError, TimeoutError, requests.RequestException,
        BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
    )  # fmt: skip
    for e in errors:
        if isinstance(e, lost):
            return True
        if type(e).__name__ == "OperationalError" and "locked" in str(e):  # SQLite, under concurrent writers
            return True
        if type(e).__name__ == "MlflowException":
            message = str(getattr(e, "message", e))
            if getattr(e, "error_code", None) in _MLFLOW_TRANSIENT:
                return True
            if message.startswith("API request to") and " failed" in message:  # a 5xx/429 or a lost connection
                return True
    return False
