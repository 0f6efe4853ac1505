"""The expert pipeline end to end: real Prefect flow runs (ephemeral API server) against the real registry
servers (MLflow tracking server + SeaweedFS S3), over the micro demo family.

The issue asks for the tiny family; the micro family is the same code (build_family) at a smaller size,
which keeps these tests within minutes on two CPU cores. Flow runs cost seconds each, so the module
shares them: one first run (happy path and bad experts together), one re-run, one event-triggered run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_fixtures import (
    add_bad_experts,
    forget_served,
    make_inbox,
    rename_card,
    router_queries,
    task_runs_since,
    use_registry,
    wait_for,
    write_config,
)

from meswitch.processes import stop_group

pytestmark = pytest.mark.slow

GOOD = ["chinese", "code", "english", "math"]
MESWITCH = str(Path(sys.executable).with_name("meswitch"))  # the installed command
COMPUTE = {"calibrate", "compress", "evaluate", "train-router", "evaluate-router"}


@pytest.fixture(scope="module")
def registry_env(s3_server, mlflow_server, tmp_path_factory):
    """The registry on the real servers (MLflow tracking server, S3 artifacts), for this module."""
    with pytest.MonkeyPatch.context() as mp:
        yield use_registry(mp, s3_server, "pipeline", mlflow_server.url, tmp_path_factory.mktemp("pipeline-home"))


@dataclass
class Scenario:
    family: Path
    inbox: Path
    work: Path
    config: Path
    gates: Path
    queries: Path
    bad: dict[str, str]

    def run(self, base: str | Path | None = None, **kw):
        from meswitch.flows import run_pipeline

        return run_pipeline(
            self.inbox, base or self.family / "base", config_file=self.config, gates_file=self.gates,
            work_dir=self.work, router_test_queries=self.queries, base_name="micro", return_state=True, **kw,
        )  # fmt: skip


# mlflow_server_starting first: pytest sets session fixtures up in the order they are listed, so the MLflow server
# boots while the Prefect API does (prefect_api), and registry_env (mlflow_server) finds it up.
@pytest.fixture(scope="module")
def scenario(mlflow_server_starting, prefect_api, micro_family, registry_env, tmp_path_factory) -> Scenario:
    root = tmp_path_factory.mktemp("scenario")
    inbox = make_inbox(micro_family, root / "inbox", GOOD)
    bad = add_bad_experts(micro_family, inbox)
    config, gates = write_config(root)
    queries = router_queries(micro_family, root / "queries.jsonl")
    return Scenario(micro_family, inbox, root / "work", config, gates, queries, bad)


@pytest.fixture(scope="module")
def first_run(scenario):
    t0 = time.time()
    state = scenario.run()
    return state, task_runs_since(t0)


def _outcomes(summary: dict) -> dict[str, dict]:
    return {e["entry"]: e for e in summary["experts"]}


def test_happy_path_registers_validated_experts_and_a_router(scenario, first_run):
    from mlflow import MlflowClient

    from meswitch.registry import Registry

    state, tasks = first_run
    assert state.is_completed(), state.message
    summary = state.result()
    outcomes = _outcomes(summary)
    reg = Registry()
    for name in GOOD:
        e = outcomes[name]
        assert (e["status"], e["processed"]) == ("production", True), e
        assert 2.0 < e["bits_per_param"] < 4.0 and e["kl"] is not None and e["version"] >= 1
        model = f"meswitch-expert-{name}"
        assert reg.aliases(model)["production"] == e["version"] == reg.aliases(model)["candidate"]
        v = reg.get_version(model, version=e["version"])
        assert v.tags["pipeline.status"] == "production" and v.tags["gates_passed"] == "true"
        assert v.tags["domain"] == name and float(v.tags["kl"]) == pytest.approx(e["kl"])
        assert reg.resolve(model).manifest.source_fingerprint == e["fingerprint"]
    assert summary["base"].startswith("meswitch-base-micro/")
    assert "production" in reg.aliases("meswitch-base-micro")

    router = summary["router"]
    assert (router["status"], router["retrained"], router["domains"]) == ("production", True, sorted(GOOD))
    assert router["accuracy"] >= 0.5
    rv = reg.get_version("meswitch-router", alias="production")
    assert rv.version == router["version"] and rv.tags["routing_key"] == ",".join(f"{d}={d}" for d in sorted(GOOD))

    # Each expert's MLflow run: parameters, metrics, quality table, plot, manifest and card.
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(outcomes["math"]["mlflow_run_id"])
    assert run.data.params["compression.bits"] == "2" and run.data.params["domain"] == "math"
    assert run.data.metrics["kl"] == pytest.approx(outcomes["math"]["kl"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"quality.md", "quality.json", "quality_vs_size.png", "artifact", "card"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "card")} == {"card/expert.yaml", "card/calib.jsonl"}

    assert {name for name, st in tasks if st == "Completed"} >= COMPUTE
    report = Path(summary["report_dir"])
    assert (report / "pipeline_summary.json").is_file() and "| math | math |" in (
        report / "pipeline_summary.md"
    ).read_text()


def test_bad_experts_are_rejected_with_reasons_and_nothing_partial_is_registered(scenario, first_run):
    from meswitch.registry import NotFound, Registry

    state, _ = first_run
    summary = state.result()
    outcomes = _outcomes(summary)
    for entry, phrase in scenario.bad.items():
        assert outcomes[entry]["status"] == "rejected", outcomes[entry]
        assert phrase in " ".join(outcomes[entry]["reasons"]), outcomes[entry]["reasons"]
        assert entry in summary["rejected"] or outcomes[entry]["name"] in summary["rejected"]
    reg = Registry()
    for name in ("corrupt-shard", "wrong-arch", "nan-weights", "other-base"):
        with pytest.raises(NotFound):
            reg.get_model(f"meswitch-expert-{name}")
    made = sorted(p.name.rsplit("-", 1)[0] for p in (scenario.work / "artifacts").iterdir())
    assert made == GOOD  # no artifact, not even a partial one, for a bad expert


def test_rerun_recomputes_nothing_and_registers_no_duplicate(scenario, first_run):
    from mlflow import MlflowClient

    from meswitch.flows.tracking import EXPERIMENT
    from meswitch.registry import Registry

    reg = Registry()
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    versions = {m.name: len(m.versions) for m in reg.list_models()}
    runs = len(client.search_runs([exp], max_results=1000))

    t0 = time.time()
    state = scenario.run(base="meswitch-base-micro@production")  # the base from the registry, this time
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["base"] == first_run[0].result()["base"]
    first = _outcomes(first_run[0].result())
    for name in GOOD:
        e = _outcomes(summary)[name]
        assert (e["status"], e["processed"], e["version"]) == ("production", False, first[name]["version"])
    assert summary["router"]["status"] == "unchanged"
    tasks = task_runs_since(t0)
    assert not [(n, s) for n, s in tasks if n in COMPUTE and s != "Cached"], tasks
    assert ("validate", "Cached") in tasks  # the bad experts' verdicts come from the cache too
    assert {m.name: len(m.versions) for m in reg.list_models()} == versions
    assert len(client.search_runs([exp], max_results=1000)) == runs


def test_submitted_new_domain_triggers_a_run_that_retrains_the_router(scenario, first_run, tmp_path):
    """`meswitch pipeline serve` + `meswitch submit` of the fifth domain's expert: the event starts the
    on-arrival deployment, which registers the expert and retrains the router over five domains."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from meswitch.registry import Registry

    reg = Registry()
    before = reg.get_version("meswitch-router", alias="production").version
    # The first run's four experts, registered already (the served run skips them), without its bad ones: those the
    # served run would validate and log again, in a fresh process, ahead of the new expert (some 6 s on 2 cores).
    inbox = make_inbox(scenario.family, tmp_path / "inbox", GOOD)
    log = tmp_path / "serve.log"
    cmd = [
        MESWITCH, "pipeline", "serve", "--inbox", str(inbox),
        "--base", str(scenario.family / "base"), "--config", str(scenario.config), "--gates", str(scenario.gates),
        "--work-dir", str(scenario.work), "--router-test", str(scenario.queries), "--base-name", "micro",
        "--cron", "*/30 * * * *",
    ]  # fmt: skip
    with open(log, "w") as out:
        # the runner asks for runs to start every second, not every 10 (Prefect's default): the triggered run starts
        # as soon as the automation has made it
        env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        with get_client(sync_client=True) as client:

            def served():
                assert server.poll() is None, log.read_text()[-3000:]
                names = {d.name: d for d in client.read_deployments()}
                autos = [a for a in client.read_automations() if a.name.startswith("expert arrived in")]
                return names if {"on-arrival", "scheduled-scan"} <= set(names) and autos else None

            deployments = wait_for(served, 180, "served deployments")
            assert deployments["scheduled-scan"].schedules[0].schedule.cron == "*/30 * * * *"
            time.sleep(3)  # the triggers service loads new automations on its next pass

            submit = [MESWITCH, "submit", str(scenario.family / "extra" / "definitions"), "--inbox", str(inbox)]
            done = subprocess.run(submit, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and "emitted meswitch.expert.arrived" in done.stdout, done.stdout + done.stderr
            assert (inbox / "definitions" / "expert.yaml").is_file()

            on_arrival = DeploymentFilter(name=DeploymentFilterName(any_=["on-arrival"]))

            def finished():
                runs = client.read_flow_runs(deployment_filter=on_arrival)
                return [r for r in runs if r.state and r.state.is_final()]

            runs = wait_for(finished, 420, "the on-arrival flow run")
    finally:
        stop_group(server)
        forget_served("expert-pipeline/on-arrival", "expert-pipeline/scheduled-scan", automations="expert arrived in")
    assert runs[0].state.is_completed(), (runs[0].state.message, log.read_text()[-4000:])
    assert "production" in reg.aliases("meswitch-expert-definitions")
    router = reg.get_version("meswitch-router", alias="production")
    assert router.version > before
    assert router.tags["routing_key"] == ",".join(f"{d}={d}" for d in sorted([*GOOD, "definitions"]))
    assert float(router.tags["heldout_accuracy"]) >= 0.5


def test_dask_runner_compresses_experts_in_parallel_on_two_workers(
    prefect_api, micro_family, s3_server, tmp_path, monkeypatch
):  # fmt: skip
    """A local Dask cluster of two worker processes runs two experts' sub-flows at the same time. The inbox
    is on S3; the gates here are impossible (KL must be 0), so both experts are registered as rejected, with
    the reason, and take no alias."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterStartTime

    from meswitch.flows import run_pipeline
    from meswitch.flows.inbox import submit
    from meswitch.registry import Registry

    t0 = datetime.now(UTC)
    for k, v in s3_server.env().items():  # the inbox's S3 server
        monkeypatch.setenv(k, v)
    for k in ("MLFLOW_TRACKING_URI", "MESWITCH_ARTIFACT_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MESWITCH_HOME", str(tmp_path / "home"))  # the embedded registry: SQLite + a folder
    inbox = f"s3://{s3_server.bucket}/dask-inbox-{time.time_ns()}"
    for name in ("code", "math"):
        submit(micro_family / "experts" / name, inbox)
    config, gates = write_config(tmp_path, gates={"max_kl": 0.0})
    state = run_pipeline(inbox, micro_family / "base", config_file=config, gates_file=gates,
                         work_dir=tmp_path / "work", dask="local", dask_workers=2, return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    outcomes = _outcomes(state.result())
    workers = {outcomes[n]["worker"] for n in ("code", "math")}
    assert len(workers) == 2 and f"{os.uname().nodename}:{os.getpid()}" not in workers
    reg = Registry()
    for name in ("code", "math"):
        e = outcomes[name]
        assert e["status"] == "rejected" and "max_kl" in e["reasons"][0] and e["version"] == 1
        v = reg.get_version(f"meswitch-expert-{name}", version=1)
        assert "max_kl" in v.rejected and v.aliases == [] and v.tags["pipeline.status"] == "rejected"
    with get_client(sync_client=True) as client:
        names = FlowRunFilterName(any_=["expert-code", "expert-math"])
        since = FlowRunFilterStartTime(after_=t0)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=names, start_time=since))
    assert len(runs) == 2
    assert max(r.start_time for r in runs) < min(r.end_time for r in runs)  # they overlapped


def test_object_store_outage_fails_the_run_and_a_rerun_resumes(
    prefect_api, micro_family, s3_server, tmp_path, monkeypatch
):  # fmt: skip
    """With MLflow unreachable, the run fails at its first registry call, after retries, having computed
    nothing. With the object store unreachable, publishing fails after its retries and nothing is
    registered; the next run (store back) takes calibration, compression and evaluation from the cache."""
    from servers import free_ports

    from meswitch.flows import run_pipeline
    from meswitch.registry import Registry

    env = {**s3_server.env(prefix=f"outage-{os.getpid()}"), "MESWITCH_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MESWITCH_REGISTRY_RETRIES": "1", "MESWITCH_REGISTRY_BACKOFF_S": "0.1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", dead)
    inbox = make_inbox(micro_family, tmp_path / "inbox", ["english"])
    config, gates = write_config(tmp_path)
    args = dict(config_file=config, gates_file=gates, work_dir=tmp_path / "work", return_state=True)

    with monkeypatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_ports(1)[0]}")
        t = time.time()
        state = run_pipeline(inbox, micro_family / "base", **args)
        assert state.is_failed() and "MLflow" in state.message, state.message
        tasks = task_runs_since(t)
        assert ("registry-lookup", "Failed") in tasks and not {n for n, _ in tasks} & {"calibrate", "compress"}

    t0 = time.time()
    state = run_pipeline(inbox, micro_family / "base", **args)
    assert state.is_failed()
    assert "english" in state.message and "run again to resume" in state.message
    tasks = task_runs_since(t0)
    assert ("compress", "Completed") in tasks, sorted(tasks)
    assert {n for n, s in tasks if s == "Failed"} & {"log-expert-run", "publish"}, tasks
    assert not [m.name for m in Registry().list_models()]  # nothing registered, not even in part

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)
    t1 = time.time()
    state = run_pipeline(inbox, micro_family / "base", **args)
    assert state.is_completed(), state.message
    assert _outcomes(state.result())["english"]["status"] == "production"
    tasks = task_runs_since(t1)
    assert {n: s for n, s in tasks if n in ("calibrate", "compress", "evaluate")} == {
        "calibrate": "Cached", "compress": "Cached", "evaluate": "Cached"
    }  # fmt: skip
    assert Registry().aliases("meswitch-expert-english")["production"] == 1


def test_a_new_domain_that_breaks_an_old_one_is_refused_and_the_old_router_keeps_serving(scenario, first_run, tmp_path):
    """An expert whose domain reads like math (its card is math's, renamed "arithmetic"): the retrained router
    splits math's queries between the two, so the per-domain gate refuses it and production keeps the old one."""
    import json

    from safetensors.torch import load_file, save_file

    from meswitch.registry import Registry

    reg = Registry()
    before = reg.get_version("meswitch-router", alias="production")
    inbox = make_inbox(scenario.family, tmp_path / "inbox", ["math"])
    (inbox / "math").rename(inbox / "arithmetic")
    rename_card(inbox / "arithmetic", "arithmetic")
    shard = next((inbox / "arithmetic").glob("*.safetensors"))  # another expert's weights, not math's copy
    tensors = load_file(shard)
    norm = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[norm] = tensors[norm] * 1.001
    save_file(tensors, shard, metadata={"format": "pt"})
    math_queries = [line for line in scenario.queries.read_text().splitlines() if json.loads(line)["domain"] == "math"]
    queries = tmp_path / "queries.jsonl"  # the held-out set covers every domain of the new router
    queries.write_text(
        scenario.queries.read_text() + "".join(line.replace('"math"', '"arithmetic"') + "\n" for line in math_queries)
    )
    from meswitch.flows import run_pipeline

    state = run_pipeline(
        inbox, scenario.family / "base", config_file=scenario.config, gates_file=scenario.gates,
        work_dir=scenario.work, router_test_queries=queries, base_name="micro", return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    router = state.result()["router"]
    assert router["status"] == "rejected" and router["retrained"], router
    # the reason names the domain and by how much: math's queries went to arithmetic, or arithmetic's to math
    named = ("max_domain_accuracy_drop: math fell from", "min_new_domain_accuracy: new domain arithmetic")
    assert router["reasons"] and any(r.startswith(named) for r in router["reasons"]), router["reasons"]
    after = reg.get_version("meswitch-router", alias="production")
    assert after.version == before.version  # the old router keeps serving
    assert "arithmetic" not in after.tags["routing_key"]


def test_the_same_base_under_another_folder_and_no_name_is_the_registered_base(scenario, first_run, tmp_path):
    """One base is one registered base, identified by its content: a copy under another folder name, run without
    --base-name, goes to the name it already has, and the registry still serves exactly one base."""
    import shutil

    from meswitch.flows import run_pipeline
    from meswitch.registry import Registry
    from meswitch.serving.loader import RegistrySource

    copy = shutil.copytree(scenario.family / "base", tmp_path / "my-llm")
    (tmp_path / "empty-inbox").mkdir()
    state = run_pipeline(
        tmp_path / "empty-inbox", copy, config_file=scenario.config, gates_file=scenario.gates,
        work_dir=scenario.work, router_test_queries=scenario.queries, return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    assert state.result()["base"].startswith("meswitch-base-micro/")
    assert not [m.name for m in Registry().list_models() if m.name == "meswitch-base-my-llm"]
    assert RegistrySource().resolve().base.name == "micro"
