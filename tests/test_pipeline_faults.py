"""Faults in the middle of a pipeline run: the flow killed (SIGKILL) while it compresses a batch of experts and
run again; the disk filling up while an artifact is written. Real parts: Prefect flow runs (ephemeral API
server), the real S3 server (SeaweedFS) for the registry's artifacts and MLflow's registry on its own SQLite
database (as in the outage test of test_pipeline.py: the session's tracking server is shared by the other
pipeline tests, whose router and production set these runs would change), over the micro demo family.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_fixtures import (
    make_inbox,
    router_queries,
    task_runs_since,
    use_registry,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

MESWITCH = str(Path(sys.executable).with_name("meswitch"))  # the installed command
BATCH = ["chinese", "code", "math"]
FULL_DISK = "mount -t tmpfs -o size=64k meswitch-full"  # smaller than one artifact of the micro family


@pytest.fixture
def registry_env(prefect_api, s3_server, tmp_path, monkeypatch) -> dict[str, str]:
    """MLflow's registry in a SQLite file of this test, artifacts on the S3 server; inherited by child processes."""
    prefix, tracking = f"faults-{os.getpid()}-{time.time_ns()}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    return use_registry(monkeypatch, s3_server, prefix, tracking, tmp_path / "home")


@dataclass
class Batch:
    """Experts of the micro family in an inbox, with the fast config, run by the command or in this process."""

    family: Path
    root: Path
    names: list[str]

    def __post_init__(self):
        make_inbox(self.family, self.root / "inbox", self.names)
        self.config, self.gates = write_config(self.root)
        self.queries = router_queries(self.family, self.root / "queries.jsonl")

    @property
    def artifacts(self) -> Path:
        return self.root / "work" / "artifacts"

    @property
    def cmd(self) -> list[str]:
        """``meswitch pipeline run`` of this batch, for a child process."""
        return [
            MESWITCH, "pipeline", "run", "--inbox", str(self.root / "inbox"), "--base", str(self.family / "base"),
            "--config", str(self.config), "--gates", str(self.gates), "--work-dir", str(self.root / "work"),
            "--router-test", str(self.queries), "--base-name", "micro",
        ]  # fmt: skip

    def run(self) -> dict[str, dict]:
        """Run the pipeline in this process (it must complete); return its outcomes by inbox entry."""
        from meswitch.flows import run_pipeline

        state = run_pipeline(
            self.root / "inbox", self.family / "base", config_file=self.config, gates_file=self.gates,
            work_dir=self.root / "work", router_test_queries=self.queries, base_name="micro", return_state=True,
        )  # fmt: skip
        assert state.is_completed(), state.message
        return {e["entry"]: e for e in state.result()["experts"]}

    def summary(self) -> dict[str, dict]:
        """The outcomes of the last run by inbox entry, from the report it wrote (a failed run too)."""
        report = json.loads((self.root / "work" / "reports" / "pipeline_summary.json").read_text())
        return {e["entry"]: e for e in report["experts"]}


def _finished_versions() -> dict[str, dict]:
    """{expert name: tags} of every expert version registered so far, checked whole: each one's artifact is
    downloaded from the S3 server and every file's sha256 verified against its manifest."""
    from meswitch.registry import Registry

    reg, out = Registry(), {}
    for m in reg.list_models():
        if m.name.startswith("meswitch-expert-"):
            (v,) = m.versions  # one version per expert: a re-run registers no second one
            assert reg.resolve(m.name, version=v.version).manifest.name == m.name.removeprefix("meswitch-expert-")
            out[m.name.removeprefix("meswitch-expert-")] = {"version": v.version, **v.tags}
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_flow_killed_mid_batch_resumes_without_recompressing_or_partial_versions(
    micro_family, registry_env, tmp_path
):  # fmt: skip
    """SIGKILL the flow's process once the first expert is registered, while the next one is being compressed;
    run again: the finished expert is skipped (same version, not compressed again), no version was registered
    without its whole artifact, the half-written artifact is neither taken for a finished one nor kept, and
    every expert ends registered."""
    from meswitch.registry import Registry

    batch = Batch(micro_family, tmp_path, BATCH)
    artifacts, log = batch.artifacts, tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(batch.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def alive() -> None:
            assert proc.poll() is None, f"the run ended before it was killed: {log.read_text()[-3000:]}"

        def first_done():
            alive()
            return any(m.name.startswith("meswitch-expert-") for m in Registry().list_models())

        def compressing():
            alive()
            return [p.name for p in artifacts.glob(".*.tmp")]

        wait_for(first_done, 300, "the first expert registered", interval=0.2)
        staging = wait_for(compressing, 120, "the next expert's compression", interval=0.05)
    finally:
        _kill_group(proc)

    # After the kill: what is registered is whole and finished, what was being written is hidden and unregistered.
    killed = _finished_versions()
    assert killed and len(killed) < len(BATCH), killed
    assert all(tags["pipeline.status"] == "production" for tags in killed.values()), killed
    half = staging[0].removeprefix(".").split("-")[0]
    assert half in BATCH and half not in killed and not (artifacts / staging[0] / "manifest.json").exists()
    made = sorted(p.name.rsplit("-", 1)[0] for p in artifacts.iterdir() if not p.name.startswith("."))
    assert made == sorted(killed)  # a visible artifact folder is a finished one

    t0 = time.time()
    summary = batch.run()
    tasks = task_runs_since(t0)
    after = _finished_versions()
    assert sorted(after) == BATCH and all(tags["pipeline.status"] == "production" for tags in after.values())
    for name, tags in killed.items():  # skipped as already processed: the same version of the same content
        assert (summary[name]["status"], summary[name]["processed"]) == ("production", False), summary[name]
        assert (after[name]["version"], after[name]["content_hash"]) == (tags["version"], tags["content_hash"])
    assert [n for n, _ in tasks].count("compress") == len(BATCH) - len(killed), sorted(tasks)
    assert all(summary[name]["processed"] for name in BATCH if name not in killed)
    assert not list(artifacts.glob(".*")), list(artifacts.iterdir())  # the killed writer's folder is gone too


def _on_a_full_disk(folder: Path, cmd: list[str]) -> list[str]:
    """``cmd`` with ``folder`` on a tmpfs too small for an artifact, in a mount namespace of its own: a real full
    disk, without root (``unshare --map-root-user``); then the folder's listing goes to ``FOLDER.listing``."""
    script = f'{FULL_DISK} "$0" || exit 97; "$@"; rc=$?; ls -A "$0" > "$0.listing"; exit $rc'
    return ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", script, str(folder), *cmd]


def test_disk_full_while_writing_an_artifact_fails_cleanly_and_registers_nothing(
    micro_family, registry_env, tmp_path
):  # fmt: skip
    """The work folder's artifacts on a tmpfs of 64 KiB: compressing fails with "No space left on device", the
    expert is reported failed with that reason, no version is registered and nothing is left in the folder;
    the next run, with room, compresses and registers it."""
    from meswitch.registry import Registry

    batch = Batch(micro_family, tmp_path, ["english"])
    artifacts = batch.artifacts
    artifacts.mkdir(parents=True)
    probe = subprocess.run(_on_a_full_disk(artifacts, ["true"]), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here (user namespaces off?): {probe.stderr.strip()}")

    full = subprocess.run(_on_a_full_disk(artifacts, batch.cmd), capture_output=True, text=True, timeout=600)
    assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
    outcome = batch.summary()["english"]
    reason = f"OSError: [Errno 28] No space left on device while writing {artifacts}/english-"
    assert outcome["status"] == "failed" and outcome["reasons"][0].startswith(reason), outcome
    assert "english failed" in full.stderr and "run again to resume" in full.stderr
    assert not [m.name for m in Registry().list_models() if m.name.startswith("meswitch-expert-")]
    assert (artifacts.parent / "artifacts.listing").read_text() == ""  # no partial folder, hidden or not

    t0 = time.time()
    assert batch.run()["english"]["status"] == "production"
    assert ("compress", "Completed") in task_runs_since(t0)  # the failed write cached nothing
    assert _finished_versions()["english"]["pipeline.status"] == "production"
