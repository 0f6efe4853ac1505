"""Processes: whether one is alive, stopping a group we started (``start_new_session``: a server and its
workers) as a whole, and SIGTERM handled as Ctrl-C is, so that a stopped command cleans up after itself, its
worker threads included."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a supervisor, ``timeout``) raised where the main thread is, as Ctrl-C raises
    KeyboardInterrupt: the same clean-up runs (a staging folder removed, a server started for the run stopped)
    instead of the process vanishing with its hidden folders and child servers left behind."""


class Stopped(RuntimeError):
    """Raised by ``check_stop`` in a worker thread once the thread waiting for it was interrupted."""


# Signals reach the main thread only. A worker thread (an expert compressed by the pipeline's task runner) learns of
# one through this event, at its next ``check_stop`` (between matrices, blocks, batches), instead of running its
# whole expert to the end while the interrupted command waits for it.
_stop = threading.Event()


def check_stop() -> None:
    """Raise ``Stopped`` if the thread that waits for this one was interrupted; long loops call it once a step."""
    if _stop.is_set():
        raise Stopped("stopped: the command was interrupted")


@contextlib.contextmanager
def stopping_workers() -> Iterator[None]:
    """Run a block that waits for worker threads: an interrupt raised in it (Ctrl-C's KeyboardInterrupt, SIGTERM as
    ``Terminated`` or as Prefect's own TerminationSignal: a BaseException that is not an Exception) makes their
    next ``check_stop`` raise, so that the wait for them after it is short. A failure (an Exception) stops nothing:
    their results are still worth keeping. Entering clears an earlier stop, unless an interrupt came since
    :func:`exit_status_of` began (raised, it may have been swallowed before this block)."""
    if _interrupt is None:
        _stop.clear()
    try:
        yield
    except BaseException as e:
        if not isinstance(e, Exception):
            _stop.set()
        raise


def exit_status_of(main: Callable[[], int]) -> int:
    """``main()``, with SIGTERM raised as Ctrl-C is; stopped by either, the one line and the status a shell gives a
    command a signal stopped: ``interrupted``, 130 for Ctrl-C; ``terminated``, 143 for SIGTERM. Also wherever else
    the interrupt went once raised: an extension that it was raised in may turn it into an error of its own (torch,
    reading a tensor: "could not determine the shape of object type ..."; pydantic, serializing Prefect's settings:
    ``PydanticSerializationError``), which the signal caused, or swallow it, and main returns as if none came."""
    global _interrupt
    try:
        with _sigterm_raises():
            status = main()
    except KeyboardInterrupt as e:
        _drop_quietly(e)
        return _stopped_by(type(e))
    except (Exception, SystemExit) as e:  # SystemExit: main's own "failed: ..." exit
        if _interrupt is None:
            raise
        _drop_quietly(e)
        return _stopped_by(_interrupt)
    else:
        return status if _interrupt is None else _stopped_by(_interrupt)
    finally:
        _interrupt = None  # what comes after in this process (a test's next command) starts with none


def _stopped_by(kind: type[KeyboardInterrupt]) -> int:
    terminated = issubclass(kind, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def reraise_interrupt(error: BaseException) -> None:
    """Raise the interrupt (Ctrl-C, SIGTERM) that arrived while :func:`exit_status_of` ran, from ``error``: call it
    where an extension's error is turned into a message of ours, as the extension may have turned the interrupt
    into that error (a tensor read cut by SIGTERM is no corrupt file)."""
    if _interrupt is not None:
        raise _interrupt() from error


def _drop_quietly(e: BaseException) -> None:
    """Free what the interrupt's frames held, now, with its objects' complaints silenced: an object the signal cut
    in its constructor (a progress bar: tqdm's ``__del__`` then fails on the attribute it never set) would otherwise
    print "Exception ignored in ..." and a traceback after the one line, as the interpreter collects it."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        e.__traceback__ = None  # its frames, and what only they held, go here
        gc.collect()
    finally:
        sys.unraisablehook = previous


# The interrupt that arrived while _sigterm_raises ran (None: none), kept beyond the exception it raised, which an
# extension may have swallowed or replaced
_interrupt: type[KeyboardInterrupt] | None = None
_commanding = False  # True while _sigterm_raises runs: SIGTERM is ours to handle (take_back_sigterm)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` in the main thread (signals reach no other), and both it
    and Ctrl-C (where Python's own handler has it) are remembered (``_interrupt``); one raised where it cannot
    propagate is sent again (``_interrupt_again``)."""
    global _interrupt, _commanding
    _interrupt = None
    _stop.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    ctrl_c = signal.getsignal(signal.SIGINT)
    if ctrl_c is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
    hook, sys.unraisablehook = sys.unraisablehook, functools.partial(_interrupt_again, sys.unraisablehook)
    _commanding = True
    try:
        yield
    finally:
        _commanding = False
        sys.unraisablehook = hook
        signal.signal(signal.SIGTERM, previous)
        if ctrl_c is signal.default_int_handler:
            signal.signal(signal.SIGINT, ctrl_c)


def take_back_sigterm() -> None:
    """Call first thing in a Prefect flow's body. Run by a command of ours (under :func:`exit_status_of`, in the
    main thread), SIGTERM there raises ``Terminated`` and is remembered again, as everywhere else in the command:
    Prefect's flow engine puts a handler of its own in while a flow runs, which raises its ``TerminationSignal``
    and records nothing, so one swallowed where it landed left the command running on to exit 0. The engine puts
    ours back as the flow ends (it restores the handler it found). Run by anything else (a Prefect worker, whose
    cancellation is a SIGTERM its engine must see), nothing changes."""
    if _commanding and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: object) -> None:
    _remember(Terminated)
    raise Terminated()


def _raise_interrupted(signum: int, frame: object) -> None:
    _remember(KeyboardInterrupt)
    raise KeyboardInterrupt()


def _remember(kind: type[KeyboardInterrupt]) -> None:
    """Record the interrupt, and stop the worker threads at their next ``check_stop`` even if the exception about to
    be raised is swallowed where it lands (code that catches BaseException, a ``__del__``)."""
    global _interrupt
    _interrupt = kind
    _stop.set()


def _interrupt_again(hook: Callable, unraisable: object) -> None:
    """``sys.unraisablehook`` while a command runs. An interrupt of ours raised where Python cannot propagate it (a
    weakref callback, as SQLAlchemy's, or a ``__del__``: "Exception ignored in ...") would print a traceback and be
    lost, the command running on; it is remembered already, so it is sent again a moment later instead, to land in
    code that raises it. Anything else goes to the hook that was there."""
    if not isinstance(getattr(unraisable, "exc_value", None), KeyboardInterrupt) or _interrupt is None:
        return hook(unraisable)
    sig = signal.SIGTERM if issubclass(_interrupt, Terminated) else signal.SIGINT
    threading.Timer(0.01, lambda: _commanding and os.kill(os.getpid(), sig)).start()


def stop_when_this_process_dies(pid: int) -> subprocess.Popen:
    """Start a watchdog that stops ``pid`` (a server this process started; with its group, where it leads one)
    when this process dies, however it dies: SIGKILL and the kernel's out-of-memory killer run none of our
    clean-up, and a server started by a library (Prefect's API) would be left running on its port for good. The
    watchdog ends with ``pid``."""
    watch = f"from meswitch.processes import _watch; _watch({os.getpid()}, {pid})"
    return subprocess.Popen([sys.executable, "-c", watch], stdin=subprocess.DEVNULL)


def _watch(parent: int, pid: int) -> None:
    """The watchdog's loop: while ``parent`` lives, wait for ``pid`` to end; once ``parent`` is gone, SIGTERM
    ``pid`` (its group where it leads one), then SIGKILL after 5 s. Ctrl-C reaches the watchdog with its process
    group, as it reaches the process it watches for: it ignores it, and goes on watching."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == parent:
        if not pid_alive(pid):
            return
        time.sleep(0.5)
    try:  # a leader of its own group (start_new_session) is stopped with its group: a server's workers too
        leads = os.getpgid(pid) == pid
    except ProcessLookupError:
        return

    def alive() -> bool:
        return group_alive(pid) if leads else pid_alive(pid)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig) if leads else os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop ``proc``'s process group: ``first``, then SIGKILL to whatever of the group is left after ``timeout``
    seconds. The leader's exit does not end the wait: a worker that ignored ``first`` would outlive it. A group
    already gone is not an error."""
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
