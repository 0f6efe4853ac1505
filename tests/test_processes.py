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
