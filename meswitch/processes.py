"""Processes we started: whether one is alive, and stopping a group (``start_new_session``: a server and its
workers) as a whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop ``proc``'s process group: ``first`` (Prefect's runner lets go of SIGTERM slowly: SIGINT for it), then
    SIGKILL to whatever of the group is left after ``timeout`` seconds. The leader's exit does not end the wait: a
    worker that ignored ``first`` would outlive it. A group already gone is not an error."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` remains (a zombie not yet reaped counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (a child of ours not yet reaped, which this reaps) counts as gone; a process
    of another user counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
