"""Long commands stopped part-way by a real signal, then run again: what is left, what the re-run does.

Each test starts the installed ``meswitch`` command (or a writer of its own) as a child process and signals it at a
known point: while its staging folder exists, that is while it writes. The experts are wider than the micro family's
(tiny_models, 512 x 2048 matrices), so that writing one takes about a second, not milliseconds. The pipeline runs on
the embedded registry (MLflow on SQLite, artifacts in a folder) and Prefect's ephemeral API, as a user's first
``meswitch pipeline run`` does: no registry server is needed.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import write_config
from tiny_models import calib_file, make_base, make_expert

from meswitch.artifacts import staging_dir, verify
from meswitch.processes import group_alive

MESWITCH = str(Path(sys.executable).with_name("meswitch"))  # the installed command
EXPERTS = {"alpha": "prose", "beta": "verse"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A base and two carded experts (``inbox/alpha``, ``inbox/beta``) with calibration and evaluation text."""
    root = tmp_path_factory.mktemp("wide")
    base = make_base(root / "base", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    for seed, (name, domain) in enumerate(EXPERTS.items(), start=1):
        expert = make_expert(base, root / "inbox" / name, seed=seed)
        calib_file(expert / "calib.jsonl")
        calib_file(expert / "eval.jsonl", n=6)
        card = {"name": name, "domain": domain, "description": f"{domain} texts", "examples": [f"write {domain}"]}
        (expert / "expert.yaml").write_text(yaml.safe_dump(card))
    return root


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:  # the child's own process group: what it leaves running is found by its id
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _signal_when(proc: subprocess.Popen, pattern: str, sig: int, log: Path, timeout: float = 120) -> list[str]:
    """Send ``sig`` to ``proc`` as soon as a path matches ``pattern``; return the paths that matched."""
    deadline = time.monotonic() + timeout
    while not (found := glob.glob(pattern)):
        assert proc.poll() is None, f"it ended before it was signalled: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{pattern}: never appeared"
        time.sleep(0.005)
    proc.send_signal(sig)
    return found


def _ended(proc: subprocess.Popen, log: Path, timeout: float = 60) -> tuple[int, str]:
    """(exit status, output) of ``proc``; whatever of its group is still running is killed after the check."""
    try:
        return proc.wait(timeout), log.read_text()
    finally:
        _kill_group(proc.pid)


def _assert_group_ends(proc: subprocess.Popen, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid), what


def _kill_group(pgid: int) -> None:
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


def test_compress_stopped_by_sigterm_while_writing_keeps_the_earlier_artifact_and_leaves_no_staging(wide, tmp_path):
    """SIGTERM (``kill``, a supervisor, ``timeout``) while the new artifact is being written: the staging folder is
    removed as for Ctrl-C, the earlier artifact at --out is untouched, one line says why, exit status 143."""
    from meswitch.cli import main

    expert, out = wide / "inbox" / "alpha", tmp_path / "alpha"
    cmd = ["compress", "--base", str(wide / "base"), "--expert", str(expert), "--calib", str(expert / "calib.jsonl"),
           "--out", str(out)]  # fmt: skip
    assert main(cmd) == 0
    before = (out / "manifest.json").read_text()
    log = tmp_path / "compress.log"
    proc = _start([MESWITCH, *cmd], log)
    _signal_when(proc, f"{tmp_path}/.alpha.*.tmp", signal.SIGTERM, log)
    rc, output = _ended(proc, log)
    assert (rc, output.splitlines()[-1]) == (143, "terminated"), output[-3000:]
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha", "compress.log"]  # no hidden staging folder
    verify(out)
    assert (out / "manifest.json").read_text() == before


def _registry_env(root: Path, prefect_home: Path) -> dict[str, str]:
    """The child's environment: the embedded registry under ``root/home``, Prefect's ephemeral API (no
    PREFECT_API_URL) with its database in ``prefect_home``, nothing of the other tests' servers."""
    own = ("MLFLOW_", "MESWITCH_", "PREFECT_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return {**env, "MESWITCH_HOME": str(root / "home"), "PREFECT_HOME": str(prefect_home)}


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One database for the children's ephemeral APIs: only the first start migrates it (about 11 s here)."""
    return tmp_path_factory.mktemp("prefect-home")


def _pipeline(wide: Path, root: Path) -> list[str]:
    config, gates = write_config(root, router={"max_per_domain": 16})
    return [MESWITCH, "pipeline", "run", "--inbox", str(wide / "inbox"), "--base", str(wide / "base"),
            "--config", str(config), "--gates", str(gates), "--work-dir", str(root / "work")]  # fmt: skip


@pytest.mark.slow
def test_pipeline_run_stopped_by_sigterm_stops_its_expert_and_leaves_no_prefect_server_running(
    wide, prefect_home, tmp_path
):
    """SIGTERM while an expert is being compressed (in a worker thread of the flow's task runner, which signals do
    not reach): the compression stops at its next matrix, rather than the expert running on to be evaluated and
    published while the command waits, and nothing half-written is left; the ephemeral Prefect API server that the
    run started (a uvicorn process) is stopped with it, not left running on its port for good; exit 143, one line."""
    env, log = _registry_env(tmp_path, prefect_home), tmp_path / "terminated.log"
    proc = _start(_pipeline(wide, tmp_path), log, env)
    try:
        _signal_when(proc, f"{tmp_path}/work/artifacts/.alpha-*.tmp", signal.SIGTERM, log, timeout=180)
        rc = proc.wait(60)
        output = log.read_text()
        assert rc == 143 and "terminated" in output.splitlines(), output[-3000:]
        assert not list((tmp_path / "work" / "artifacts").iterdir()), "the stopped expert's compression went on"
        assert "Stopped: stopped: the command was interrupted" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]  # one line for each task the stop ended, not four tracebacks
        _assert_group_ends(proc, "a process the run started outlived it (the Prefect API server)")
    finally:
        _kill_group(proc.pid)


@pytest.mark.slow
def test_pipeline_run_killed_outright_leaves_no_prefect_server_running(wide, prefect_home, tmp_path):
    """SIGKILL (``kill -9``, the out-of-memory killer) runs none of the run's clean-up: the ephemeral Prefect API
    server it started (a uvicorn process of its own) is stopped all the same, by a watchdog, not left running."""
    env, log = _registry_env(tmp_path, prefect_home), tmp_path / "killed.log"
    proc = _start(_pipeline(wide, tmp_path), log, env)
    try:
        _signal_when(proc, f"{tmp_path}/work/artifacts/.alpha-*.tmp", signal.SIGKILL, log, timeout=180)
        assert proc.wait(30) == -signal.SIGKILL
        _assert_group_ends(proc, "the Prefect API server outlived the run killed outright", timeout=20)
    finally:
        _kill_group(proc.pid)


def test_a_submit_killed_mid_copy_leaves_nothing_once_the_next_submit_is_done(wide, tmp_path):
    """SIGKILL (no clean-up possible) while ``meswitch submit`` copies an expert into the inbox: its hidden copy is
    never scanned, and the next submit of that entry removes it rather than leaving a checkpoint's worth of disk
    behind for good."""
    from meswitch.flows.inbox import scan_inbox, submit

    src, inbox = tmp_path / "alpha", tmp_path / "inbox"
    (src / "shards").mkdir(parents=True)  # thousands of files: the copy lasts long enough to be caught in it
    for f in (wide / "inbox" / "alpha").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    for i in range(3000):
        (src / "shards" / f"{i:05d}.txt").write_text("x")
    inbox.mkdir()
    log = tmp_path / "submit.log"
    proc = _start([MESWITCH, "submit", str(src), "--inbox", str(inbox), "--no-event"], log)
    _signal_when(proc, f"{inbox}/.alpha*", signal.SIGKILL, log)
    assert proc.wait(30) == -signal.SIGKILL
    assert [p.name for p in inbox.iterdir() if p.name.startswith(".")] and not scan_inbox(inbox)
    submit(src, inbox)
    assert sorted(p.name for p in inbox.iterdir()) == ["alpha"]
    assert [e.name for e in scan_inbox(inbox)] == ["alpha"]


def test_an_s3_submit_stopped_mid_upload_leaves_no_entry_and_the_next_submit_goes_through(
    wide, s3_server, tmp_path, monkeypatch
):
    """SIGTERM (as Ctrl-C: SIGINT itself is ignored by a suite started in the background, and so by its children)
    while ``meswitch submit`` uploads an expert to an S3 inbox: the files it had uploaded are deleted (an entry
    without its card would sit in the inbox for good, and refuse the same submit run again), exit 143, one line;
    and an entry that never got its card (a submit killed outright) is replaced by the next submit."""
    from meswitch.flows.inbox import submit

    src = tmp_path / "alpha"
    (src / "shards").mkdir(parents=True)  # hundreds of objects: the upload lasts long enough to be caught in it
    for f in (wide / "inbox" / "alpha").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    for i in range(400):
        (src / "shards" / f"{i:05d}.txt").write_text("x")
    inbox = f"s3://{s3_server.bucket}/interrupted-{time.time_ns()}"
    prefix = inbox.split("/", 3)[3] + "/alpha/"
    client, env = s3_server.client(), {**os.environ, **s3_server.env(), "MESWITCH_HOME": str(tmp_path / "home")}

    def stored() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix).get("Contents", [])]

    log = tmp_path / "submit.log"
    proc = _start([MESWITCH, "submit", str(src), "--inbox", inbox, "--no-event"], log, env)
    try:
        deadline = time.monotonic() + 60
        while not stored():
            assert proc.poll() is None, f"it ended before it was signalled: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "nothing was uploaded"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        rc, output = _ended(proc, log)
    finally:
        _kill_group(proc.pid)
    assert (rc, output.splitlines()[-1]) == (143, "terminated"), output[-3000:]
    assert stored() == [], "the stopped upload left files in the inbox"
    client.put_object(Bucket=s3_server.bucket, Key=prefix + "config.json", Body=b"{}")  # a killed submit's remains
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    submit(wide / "inbox" / "alpha", inbox)  # no --replace needed: that entry never got its card
    expert = sorted(p.name for p in (wide / "inbox" / "alpha").iterdir())
    assert sorted(k.removeprefix(prefix) for k in stored()) == expert


_SERVER_STARTER = """
import subprocess, sys, time
from meswitch.processes import stop_when_this_process_dies
worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(600)"
server = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True)
stop_when_this_process_dies(server.pid)
print(server.pid, flush=True)
time.sleep(600)
"""


def test_a_server_group_is_stopped_when_the_process_that_started_it_is_killed_outright():
    """``stop_when_this_process_dies``: a server started in a group of its own, with a worker that ignores SIGTERM,
    outlives a parent killed by SIGKILL only until the watchdog notices (SIGTERM to the group, SIGKILL after 5 s)."""
    parent = subprocess.Popen([sys.executable, "-c", _SERVER_STARTER], stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while len(_group_pids(server)) < 2:  # the leader and its worker
            assert time.monotonic() < deadline, "the server's worker never started"
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while group_alive(server):
            assert time.monotonic() < deadline, "the server's group outlived the process that started it"
            time.sleep(0.1)
    finally:
        _kill_group(server)


def _group_pids(pgid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.split("/")[2]))
    return found


_KILLED_WRITER = """
import os, signal, sys
from meswitch.artifacts import staging_dir
with staging_dir(sys.argv[1]) as tmp:
    (tmp / "delta-00000.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_before_its_parent_reaps_it_leaves_nothing_after_the_next_write(tmp_path):
    """A writer SIGKILLed mid-write whose parent (a script, a supervisor) has not reaped it yet is a zombie, not a
    running writer: the next write of its artifact removes its staging folder."""
    out = tmp_path / "math"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # it has ended; left unreaped, a zombie
    assert len(list(tmp_path.glob(".math.*.tmp"))) == 1
    with staging_dir(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["math"]
    proc.wait()


@pytest.mark.slow
def test_the_demo_stopped_by_sigterm_stops_everything_it_started(micro_family, tmp_path):
    """``make demo`` runs ``python -m meswitch.demo.main``, not the CLI: SIGTERM while its pipeline runs ends it as
    the commands end (one line, exit 143, no traceback) with nothing of its process group left running (the
    Prefect API it started)."""
    log = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "meswitch.demo.main", "--out", str(tmp_path / "demo"), "--size", "micro",
           "--family", str(micro_family), "--no-serve"]  # fmt: skip
    proc = _start(cmd, log, {**os.environ, "MESWITCH_REGISTRY_RETRIES": "1"})
    try:
        deadline = time.monotonic() + 180
        while "running the expert pipeline" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo's pipeline never started"
            time.sleep(0.05)
        time.sleep(2)  # into the flow
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        output = log.read_text()
        assert rc == 143 and output.splitlines()[-1] == "terminated", output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        _assert_group_ends(proc, "a process the demo started outlived it")
    finally:
        _kill_group(proc.pid)
