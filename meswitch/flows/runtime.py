"""Where the flows' Prefect API comes from, and the task runner they use.

``meswitch pipeline run`` needs no server: Prefect's ephemeral API starts in-process. Dask
workers and served deployments run in other processes, which must reach the same API, so for
them an API is started first (an ephemeral one, or a full ``prefect server start`` when schedules
must fire) and ``PREFECT_API_URL`` is exported to every child process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from meswitch.processes import stop_when_this_process_dies

log = logging.getLogger(__name__)

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry from the local server
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a first start migrates a new database
}


def quiet_defaults() -> None:
    """Set before Prefect is imported: local servers report nothing, the ephemeral API is allowed."""
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)


class _StoppedInOneLine(logging.Filter):
    """Prefect logs every task and sub-flow that fails with its traceback: after Ctrl-C, each expert stopped in
    a worker (``processes.Stopped``) would print four of them. Its one line says enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        from meswitch.processes import Stopped

        if record.exc_info and isinstance(record.exc_info[1], Stopped):
            record.exc_info, record.exc_text = None, None
        return True


def stopped_in_one_line() -> None:
    """Install ``_StoppedInOneLine`` on Prefect's run loggers (once; after Prefect has set up its logging)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _StoppedInOneLine) for f in logger.filters):
            logger.addFilter(_StoppedInOneLine())


def start_ephemeral_api() -> None:
    """Start Prefect's ephemeral API now rather than on the first flow run, so a caller can overlap its
    start (a subprocess that migrates a new database: ~11 s on 2 cores) with other work; flows in this
    process then find it running (Prefect keeps one per process). Nothing to do when an API is configured."""
    quiet_defaults()
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:  # from the environment or a Prefect profile
        return
    from prefect.server.api.server import SubprocessASGIServer

    _tied(SubprocessASGIServer())


_watched: set[int] = set()


def _tied(server) -> None:
    """Start Prefect's ``SubprocessASGIServer`` (once: Prefect keeps one a port) and have it stopped when this
    process dies, even by SIGKILL (:func:`~meswitch.processes.stop_when_this_process_dies`); Prefect stops it
    only at a clean exit."""
    server.start()
    pid = server.server_process.pid
    if pid not in _watched:
        _watched.add(pid)
        stop_when_this_process_dies(pid)


@contextlib.contextmanager
def shared_api(full: bool = False, home: Path | None = None) -> Iterator[str]:
    """A Prefect API that child processes reach through ``PREFECT_API_URL``; yield its URL.

    An API already configured is used as it is. Otherwise ``full=False`` starts Prefect's ephemeral
    server (events, triggers and automations run; schedules do not) and ``full=True`` runs
    ``prefect server start`` (schedules and the UI too), both on loopback, stopped on exit.
    """
    quiet_defaults()
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    if full:
        with _prefect_server(home) as url, _api_url(url):
            yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    _tied(server)
    try:
        with _api_url(server.api_url):
            yield server.api_url
    finally:
        server.stop()


@contextlib.contextmanager
def _api_url(url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@contextlib.contextmanager
def _prefect_server(home: Path | None) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, **QUIET}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log_path = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect") / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    stop_when_this_process_dies(proc.pid)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prefect server exited with status {proc.returncode} (log {log_path}): {tail}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server on port {port} did not answer in 120 s")
            time.sleep(0.5)
        log.info("Prefect server (UI and API) at http://127.0.0.1:%d (log %s)", port, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_runner(dask: str | None = None, workers: int = 2, parallel: int = 1):
    """Threads (``parallel`` experts at once) by default; ``dask="local"`` starts a local cluster of
    ``workers`` processes; any other ``dask`` value is the address of an existing scheduler."""
    if dask:
        from prefect_dask import DaskTaskRunner

        if dask == "local":
            return DaskTaskRunner(
                cluster_kwargs={
                    "n_workers": workers,
                    "threads_per_worker": 1,
                    "processes": True,
                    "dashboard_address": None,
                }
            )
        return DaskTaskRunner(address=dask)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max(1, parallel))
