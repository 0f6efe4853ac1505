"""Retry with exponential backoff for calls that fail transiently (a server restarting, a lost connection)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from meswitch.registry.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_WAIT_S = 30.0


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    retries: int,
    backoff_s: float,
    is_transient: Callable[[BaseException], bool],
) -> T:
    """Call ``fn``; on a transient error wait ``backoff_s``, ``2*backoff_s``, ... and try again.

    Errors that are not transient propagate at once. After ``retries`` further attempts the last
    transient error is raised as ``Unavailable`` naming ``what`` and how long it was tried.
    """
    start = time.monotonic()
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == retries:
                raise Unavailable(
                    f"{what}: still failing after {retries + 1} attempts over "
                    f"{time.monotonic() - start:.0f}s; last error: {_short(e)}"
                ) from e
            log.warning("%s failed (%s); attempt %d of %d in %.1fs", what, _short(e), attempt + 2, retries + 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_WAIT_S)
    raise AssertionError("unreachable")


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and every exception it was raised from or while handling."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _short(e: BaseException, limit: int = 300) -> str:
    """The root cause, which says most (``ConnectionRefusedError: [Errno 111] Connection refused``)."""
    root = chain(e)[-1]
    text = f"{type(root).__name__}: {root}"
    return text if len(text) <= limit else text[:limit] + "…"
