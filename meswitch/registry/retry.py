"""Retries: one layer per kind of call, one rule for what is transient (``errors.is_transient``).

- MLflow calls: ``with_retries`` below (MLflow's own HTTP retries are turned off by ``Registry``):
  ``1 + retries`` attempts, waiting ``backoff_s``, doubled each time up to 30 s.
- S3 requests: botocore's standard retry mode (``S3Store.client``), ``total_max_attempts = 1 + retries``,
  waiting at random up to 0.05 s * 2**i (1 s * 2**i when throttled, at most 20 s a wait). Nothing else
  retries an S3 request; what botocore could not do is raised as ``Unavailable`` when transient.
- Flow steps: Prefect's task retries of the I/O tasks (``flows.tasks``), ``1 + io_retries`` runs
  ``io_retry_delay_s`` apart, only for transient failures.

Worst case with the defaults (``MESWITCH_REGISTRY_RETRIES=5``, ``MESWITCH_REGISTRY_BACKOFF_S=1``,
``io_retries: 3``, ``io_retry_delay_s: 5``):

- one MLflow call: 6 attempts; 31 s of waits, 6 * 60 s + 31 s ~ 6.5 min if every attempt times out;
- one S3 request: 6 attempts; under 1.6 s of waits (31 s when throttled), 6 * (5 s connect +
  60 s read) + 31 s ~ 7 min if every attempt times out;
- the same request inside a pipeline step: 4 runs of the step, so 24 attempts (was 4 * 6 * 4 = 96), about
  20 s against a server that refuses connections, 4 * 7 min + 15 s ~ 28.5 min if every attempt
  times out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from meswitch.registry.errors import Unavailable, chain, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_WAIT_S = 30.0


def with_retries(fn: Callable[[], T], *, what: str, retries: int, backoff_s: float) -> T:
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
                    f"{time.monotonic() - start:.0f}s; last error: {short(e)}"
                ) from e
            log.warning("%s failed (%s); attempt %d of %d in %.1fs", what, short(e), attempt + 2, retries + 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_WAIT_S)
    raise AssertionError("unreachable")


def short(e: BaseException, limit: int = 300) -> str:
    """The root cause, which says most (``ConnectionRefusedError: [Errno 111] Connection refused``)."""
    root = chain(e)[-1]
    text = f"{type(root).__name__}: {root}"
    return text if len(text) <= limit else text[:limit] + "…"
