"""stop_group: a whole process group ends, a child that ignores the first signal included."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from meswitch.processes import pid_alive, stop_group

# a parent and a child that ignores SIGTERM; the parent prints the child's PID once both run
_TREE = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_group_kills_a_child_that_ignores_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    t0 = time.monotonic()
    stop_group(proc, timeout=1)
    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child), "the child that ignored SIGTERM outlived the group's stop"
    assert time.monotonic() - t0 < 10


def test_stop_group_of_a_finished_process_is_quiet():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    stop_group(proc, timeout=1)  # the group is gone: no ProcessLookupError
    assert proc.returncode == 0


def test_pid_alive_counts_a_zombie_as_gone():
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(proc.pid) and time.monotonic() < deadline:  # exits, then is a zombie until reaped
        time.sleep(0.05)
    assert not pid_alive(proc.pid)


def test_an_interrupt_that_cuts_an_object_in_its_constructor_ends_on_its_one_line(capsys, monkeypatch):
    """A signal raised inside a constructor (a progress bar's: tqdm's ``__del__`` then fails on what it never set)
    leaves a half-built object whose collection would print "Exception ignored in ..." after ``interrupted``: it is
    collected at once, quietly, and the hook the process had is back afterwards."""
    import sys

    from meswitch.processes import exit_status_of

    class HalfBuilt:
        def __init__(self):
            raise KeyboardInterrupt

        def __del__(self):
            self.pos  # noqa: B018  (never set: AttributeError, as tqdm's close())

    deleted, seen = [], []
    monkeypatch.setattr(HalfBuilt, "__del__", lambda self: (deleted.append(1), self.pos))
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    assert exit_status_of(lambda: HalfBuilt()) == 130
    assert deleted == [1] and seen == []  # collected during the clean-up, its complaint silenced
    assert sys.unraisablehook == seen.append
    assert capsys.readouterr().err == "interrupted\n"


def test_a_sigterm_that_an_extension_turns_into_its_own_error_still_ends_as_terminated(capsys):
    """SIGTERM raised inside an extension that reports it as an error of its own (torch reading a tensor: "could
    not determine the shape of object type ..."; here a real SIGTERM to this process, caught and replaced as the
    extension does): where the code calls ``reraise_interrupt`` it becomes the interrupt again, and where it only
    reports the error and fails, the command still ends on ``terminated``, 143. A failure with no signal stays
    the failure it is."""
    import signal

    from meswitch.processes import exit_status_of, reraise_interrupt

    def read_tensor():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except BaseException as e:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from e

    def careful() -> int:
        try:
            read_tensor()
        except ValueError as e:
            reraise_interrupt(e)
            print("error: cannot read tensor", file=sys.stderr)
            return 2
        return 0

    def reports_only() -> int:
        try:
            read_tensor()
        except ValueError:
            print("error: cannot read tensor", file=sys.stderr)
            return 2
        return 0

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)  # SIGINT ignored under nohup
    assert exit_status_of(careful) == 143
    assert capsys.readouterr().err == "terminated\n"
    assert exit_status_of(reports_only) == 143
    assert capsys.readouterr().err == "error: cannot read tensor\nterminated\n"
    assert exit_status_of(lambda: 2) == 2 and capsys.readouterr().err == ""  # the last signal is forgotten
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the handlers are back


def test_a_sigterm_turned_into_an_uncaught_error_or_swallowed_still_ends_as_terminated(capsys):
    """Where the interrupt goes once raised: into an extension's error that escapes the command (pydantic
    serializing Prefect's settings while Prefect imports: ``PydanticSerializationError``, seen with SIGTERM half a
    second into the demo's pipeline), or into code that swallows it and returns as if none came. Either way the
    command ends on ``terminated``, 143, with no traceback, and a worker thread's next ``check_stop`` raises
    (it would otherwise run its expert to the end). An error with no signal still escapes as it is."""
    import contextlib
    import signal
    import threading

    import pytest

    from meswitch.processes import Stopped, check_stop, exit_status_of

    def signalled():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here

    def escapes() -> int:
        try:
            signalled()
        except BaseException as e:
            raise RuntimeError("Error calling function `_ser_model`: Terminated: ") from e
        return 0

    stopped = []

    def expert():
        with pytest.raises(Stopped):
            check_stop()
        stopped.append(True)

    def swallows() -> int:
        with contextlib.suppress(BaseException):  # as the code that loses it does
            signalled()
        worker = threading.Thread(target=expert)
        worker.start()
        worker.join()
        return 0

    assert exit_status_of(escapes) == 143
    assert capsys.readouterr().err == "terminated\n"
    assert exit_status_of(swallows) == 143 and len(stopped) == 1
    assert capsys.readouterr().err == "terminated\n"
    assert exit_status_of(lambda: check_stop() or 0) == 0  # the next command starts with no stop pending
    with pytest.raises(RuntimeError, match="no signal"):
        exit_status_of(lambda: (_ for _ in ()).throw(RuntimeError("no signal")))


def test_a_flow_body_run_by_a_command_takes_sigterm_back_from_the_flow_engine(capsys):
    """Prefect's flow engine installs its own SIGTERM handler while a flow runs and restores the one it found after
    (here a stand-in doing the same); a body that calls ``take_back_sigterm`` run under ``exit_status_of`` has ours
    again, so a SIGTERM there is remembered (and ends the command on ``terminated`` though the body swallows it).
    Outside a command (a Prefect worker's run) the engine's handler stays."""
    import contextlib
    import signal

    from meswitch.processes import exit_status_of, take_back_sigterm

    def engines(signum, frame):
        raise SystemExit("the engine's handler")

    seen = []

    def body(send: bool) -> int:
        take_back_sigterm()
        seen.append(signal.getsignal(signal.SIGTERM) is engines)
        if send:
            with contextlib.suppress(BaseException):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        return 0

    def flow(send: bool) -> int:
        previous = signal.signal(signal.SIGTERM, engines)  # as capture_sigterm does around the flow
        try:
            return body(send)
        finally:
            signal.signal(signal.SIGTERM, previous)

    assert exit_status_of(lambda: flow(True)) == 143 and seen == [False]
    assert capsys.readouterr().err == "terminated\n"
    seen.clear()
    assert exit_status_of(lambda: flow(False)) == 0 and seen == [False] and capsys.readouterr().err == ""
    seen.clear()
    before = signal.getsignal(signal.SIGTERM)
    flow(False)  # no command of ours around it
    assert seen == [True] and signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_raised_in_a_weakref_callback_is_sent_again_and_stops_the_command(capsys):
    """A signal handler runs wherever the main thread is; in a weakref callback (SQLAlchemy's, as the demo's
    pipeline starts) its exception cannot propagate: Python prints "Exception ignored in ..." with a traceback and
    goes on. The command instead receives the signal again a moment later, in code that raises it, and ends on its
    one line."""
    import signal
    import weakref

    from meswitch.processes import exit_status_of

    class Collected:
        pass

    def callback(ref):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises here, inside the callback

    reached = []

    def command() -> int:
        obj = Collected()
        ref = weakref.ref(obj, callback)
        del obj  # the callback runs now
        for i in range(100):  # the signal sent again lands here
            time.sleep(0.02)
            reached.append(i)
        return 0 if ref() is None else 1

    assert exit_status_of(command) == 143
    assert capsys.readouterr().err == "terminated\n"  # no "Exception ignored", no traceback
    assert len(reached) < 50
