"""Child process groups: started with ``start_new_session``, stopped as a whole (a server and its workers)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop ``proc``'s process group: ``first`` (Prefect's runner lets go of SIGTERM slowly: SIGINT for it), then
    SIGKILL to whatever of the group is left after ``timeout`` seconds. The leader's exit does not end the wait: a
    worker that ignored ``first`` would outlive it. A group already gone is not an error."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
