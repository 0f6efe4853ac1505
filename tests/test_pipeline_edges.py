"""Rough edges a new user meets first: `meswitch serve`, `pipeline run | serve` and `submit` given the wrong thing.

Each mistake ends in one line that names what is wrong and what to do, before anything slow starts; the flow
runs here are real (Prefect's API, MLflow and the S3 server of the fixtures) over the micro demo family.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pipeline_fixtures import (
    forget_served,
    rename_card,
    use_registry,
    wait_for,
    write_config,
)

from meswitch.cli import main
from meswitch.processes import stop_group


@contextlib.contextmanager
def logged(name: str, level: int = logging.WARNING):
    """Messages of the logger ``name`` (Prefect's logging setup replaces the root handlers caplog reads)."""
    seen: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def embedded_registry(tmp_path, monkeypatch) -> Path:
    """An empty registry of this test's own: MLflow on SQLite and artifacts in a folder under MESWITCH_HOME."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MESWITCH_ARTIFACT_URI", "MESWITCH_S3_BUCKET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MESWITCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- 1, 2: meswitch serve ------------------------------------------------------------------------------------


@pytest.fixture
def refused_before_serving(monkeypatch):
    """These commands must stop at a check; one that starts serving instead fails here rather than block the test."""
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started instead of refusing to")

    monkeypatch.setattr(uvicorn, "run", started)


@pytest.mark.usefixtures("refused_before_serving")
def test_serve_names_each_folder_it_cannot_serve_and_why(served_family, tmp_path, capsys):
    math_artifact = served_family.artifacts["math"]
    cases = {
        str(tmp_path / "nonexist"): "nonexist: not found",
        str(served_family.experts["math"]): "an expert folder, not a compressed artifact: run meswitch compress",
        str(served_family.root / "experts"): "holds expert folders but no compressed artifact",
        str(served_family.router): "an artifact of kind 'router', not a compressed expert",
    }
    for path, phrase in cases.items():
        rc = main(["serve", "--base", str(served_family.base), "--experts", path, "--port", str(free_port())])
        err = capsys.readouterr().err
        assert rc == 2 and path in err and phrase in err, err
    # an expert artifact given as the router: refused at start, not served without `auto`
    args = ["serve", "--base", str(served_family.base), "--experts", str(math_artifact)]
    assert main([*args, "--router", str(math_artifact), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"{math_artifact}: an artifact of kind 'expert-delta', not a router" in err, err


@pytest.mark.usefixtures("refused_before_serving")
def test_serve_fails_when_the_router_given_does_not_load(served_family, tmp_path, capsys):
    router = tmp_path / "router"
    shutil.copytree(served_family.router, router)
    (router / "classifier.safetensors").write_bytes(b"altered")  # a router artifact whose checksum fails
    args = ["serve", "--base", str(served_family.base), "--experts", str(served_family.artifact_dir())]
    rc = main([*args, "--router", str(router), "--device", "cpu", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2 and f"--router {router}: version" in err and "refused" in err, err


def test_a_router_domain_without_its_expert_is_warned_about_at_start(served_family):
    from meswitch.serving.engine import EngineConfig
    from meswitch.serving.loader import LocalSource, ModelManager

    source = LocalSource(served_family.base, [served_family.artifacts["math"]], served_family.router)
    manager = ModelManager(source, EngineConfig(device="cpu"))
    with logged("meswitch.serving.loader") as warnings:
        manager.start()
    manager.close()
    others = sorted(d for n, d in served_family.domains.items() if n != "math")
    assert any(f"router domains {others} have no loaded expert" in w for w in warnings), warnings


@pytest.mark.usefixtures("refused_before_serving")
def test_serve_checks_the_port_when_the_flags_are_read_and_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--port", "99999"])
    assert "port must be from 1 to 65535, got 99999" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--device", "gpu"])
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the base does not exist: the port is what is refused, so it was checked before anything was loaded
        rc = main(["serve", "--base", str(tmp_path / "no-base"), "--port", str(port), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"port {port} on 127.0.0.1 is in use" in err, err


@pytest.mark.usefixtures("refused_before_serving")
def test_serve_from_an_empty_registry_says_how_to_fill_it(embedded_registry, capsys):
    assert main(["serve", "--port", str(free_port()), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "found none in the registry at sqlite:///" in err and "meswitch pipeline run" in err, err
    assert "meswitch serve --base DIR --experts" in err


# -- 5: an S3 store without credentials -------------------------------------------------------------------------


def test_an_s3_store_without_credentials_is_one_line_naming_the_variables(
    embedded_registry, make_artifact, monkeypatch, capsys
):  # fmt: skip
    from meswitch.registry import RegistryConfig
    from meswitch.registry.errors import AccessDenied, is_transient
    from meswitch.registry.store import S3Store

    for k in [k for k in os.environ if k.startswith("AWS_") and k != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(embedded_registry / "none"))  # no ~/.aws either
    monkeypatch.setenv("AWS_CONFIG_FILE", str(embedded_registry / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # nor an instance role
    monkeypatch.setenv("MESWITCH_ARTIFACT_URI", "s3://nobucket/x")
    with pytest.raises(AccessDenied, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as e:
        S3Store("s3://nobucket/x", RegistryConfig.from_env()).ping()
    assert not is_transient(e.value)  # a missing key is not retried
    rc = main(["registry", "publish", str(make_artifact("zz")), "--name", "meswitch-expert-zz"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "no credentials for the object store s3://nobucket/x" in err.splitlines()[-1]  # one line says it all


# -- 3, 4: pipeline run -----------------------------------------------------------------------------------------


def test_pipeline_run_refuses_a_bad_config_or_base_or_inbox_in_one_line(
    embedded_registry, micro_family, tmp_path, capsys
):  # fmt: skip
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    base = str(micro_family / "base")
    bad_yaml, unknown, group = tmp_path / "bad.yaml", tmp_path / "unknown.yaml", tmp_path / "group.yaml"
    bad_yaml.write_text("compression: {bits: 2\n  x: [\n")
    unknown.write_text("unknown_key: 1\n")
    group.write_text("compression: {group_size: 7}\n")  # fits no matrix: refused before calibration
    cases = [
        (["--base", base, "--config", str(bad_yaml)], f"{bad_yaml}: invalid YAML"),
        (["--base", base, "--config", str(unknown)], "unknown keys ['unknown_key'] for PipelineConfig; known: ["),
        (["--base", base, "--config", str(group)], f"{group}: compression: group_size 7 does not divide the inputs"),
        (["--base", "meswitch-base-nosuch@production"], "--base meswitch-base-nosuch@production: "),
    ]
    for args, phrase in cases:
        assert main(["pipeline", "run", "--inbox", str(inbox), *args]) == 2
        err = capsys.readouterr().err
        assert phrase in err.splitlines()[-1] and "Traceback" not in err, err  # one line (MLflow may log above)
    expert = micro_family / "experts" / "math"
    assert main(["pipeline", "run", "--inbox", str(expert), "--base", base]) == 2
    err = capsys.readouterr().err
    assert f"{expert} is an expert folder" in err and "pass its parent as --inbox" in err, err


@pytest.fixture(scope="module")
def edges_mlflow(tmp_path_factory, s3_server):
    """An MLflow server of this module's own: the session's one holds the pipeline tests' base under another name."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-edges"), s3=s3_server).start()
    yield server
    server.stop()


@pytest.fixture
def registry_env(s3_server, edges_mlflow, tmp_path, monkeypatch) -> dict[str, str]:
    return use_registry(monkeypatch, s3_server, f"edges-{time.time_ns()}", edges_mlflow.url, tmp_path / "home")


@pytest.mark.slow
def test_an_empty_inbox_is_said_to_be_empty_and_the_run_goes_on(
    prefect_api, micro_family, registry_env, tmp_path, capsys
):  # fmt: skip
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config, gates = write_config(tmp_path)
    args = ["--config", str(config), "--gates", str(gates), "--work-dir", str(tmp_path / "work")]
    rc = main(["pipeline", "run", "--inbox", str(inbox), "--base", str(micro_family / "base"), *args])
    out = capsys.readouterr().out
    assert rc == 0  # a scheduled scan of an empty inbox is normal: it must not fail
    assert f"no expert folders found in {inbox}" in out and "| entry |" not in out, out


# -- 6: four broken copies of one expert -------------------------------------------------------------------------


def _broken_copies(family: Path, inbox: Path) -> dict[str, str]:
    """Copies of the math expert, every card naming it `math`; returns {inbox entry: a phrase of its reason}."""
    from safetensors.torch import load_file, save_file

    src = family / "experts" / "math"
    for entry in ("e_arch", "e_nan", "e_shape", "e_trunc", "m_good", "z_copy"):
        shutil.copytree(src, inbox / entry)
        rename_card(inbox / entry, "math", "math")
    config = json.loads((inbox / "e_arch" / "config.json").read_text())
    (inbox / "e_arch" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    weights = inbox / "e_trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for entry, change in (("e_nan", "nan"), ("e_shape", "shape")):
        tensors = load_file(inbox / entry / "model.safetensors")
        name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
        if change == "nan":
            tensors[name][0, 0] = float("nan")
        else:
            tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, inbox / entry / "model.safetensors", metadata={"format": "pt"})
    return {
        "e_arch": "architecture 'LlamaForCausalLM' differs",
        "e_nan": "non-finite",
        "e_shape": "has shape",
        "e_trunc": "not a readable safetensors file",
        "z_copy": "expert name 'math' is also used by inbox entry 'm_good'",
    }


@pytest.mark.slow
def test_entries_sharing_a_name_each_report_their_own_fault(
    prefect_api, micro_family, registry_env, tmp_path
):  # fmt: skip
    from meswitch.flows import run_pipeline
    from meswitch.flows.summary import PipelineSummary

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    expected = _broken_copies(micro_family, inbox)
    config, gates = write_config(tmp_path)
    state = run_pipeline(inbox, micro_family / "base", config_file=config, gates_file=gates,
                         work_dir=tmp_path / "work", base_name="edges", return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    summary = state.result()
    assert set(summary["rejected"]) == set(expected)  # by inbox entry, not by the name they share
    for entry, phrase in expected.items():
        (reason,) = summary["rejected"][entry]
        assert phrase in reason, (entry, reason)
    good = next(e for e in summary["experts"] if e["entry"] == "m_good")
    assert (good["name"], good["status"]) == ("math", "production")  # a broken copy does not take its name
    text = PipelineSummary.from_dict(summary).markdown()
    assert "- e_nan (rejected): " in text and "- z_copy (rejected): " in text


# -- 7: pipeline serve ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_pipeline_serve_prints_the_api_url_to_export_and_stops_on_ctrl_c_or_sigterm(
    prefect_api, micro_family, tmp_path, stop
):
    """Stopped by Ctrl-C or by SIGTERM (a supervisor's stop), the served pipeline pauses its schedule, exits with that
    signal's status and says so; Prefect's runner, left to itself, exits 0 on SIGTERM with a coroutine it never
    awaited."""
    from servers import MESWITCH_CLI

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cmd = [*MESWITCH_CLI, "pipeline", "serve", "--inbox", str(inbox),
           "--base", str(micro_family / "base"), "--no-events", "--cron", "0 0 1 1 *"]  # fmt: skip
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True)
    try:  # it names what it serves once its runner has started (from then on, a stop pauses the schedule)
        wait_for(lambda: "serving deployments" in out_file.read_text() or proc.poll() is not None, 120, "the runner")
        served = _served_deployment()
        assert served and served.parameters.get("inbox") == str(inbox.resolve()) and not served.paused
        stop_group(proc, stop, timeout=20)
        assert _served_deployment().paused  # the runner's own shutdown ran
    finally:
        stop_group(proc, stop, timeout=20)
        forget_served("expert-pipeline/scheduled-scan")
    out, stderr = out_file.read_text(), err_file.read_text()
    assert f"export PREFECT_API_URL={prefect_api}\n" in out
    assert "serving deployments: expert-pipeline/scheduled-scan\n" in out
    assert proc.returncode == 128 + stop, stderr[-2000:]  # stopped by the signal, not killed after it
    assert ("terminated" if stop == signal.SIGTERM else "interrupted") in stderr
    assert "never awaited" not in stderr


def _served_deployment():
    """The served scheduled-scan deployment as the Prefect API has it, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name("expert-pipeline/scheduled-scan")
        except ObjectNotFound:
            return None


# -- 8: submit --------------------------------------------------------------------------------------------------------


def test_submit_refuses_unsafe_names_and_leaves_nothing_behind(micro_family, tmp_path):
    from meswitch.flows.inbox import InboxError, submit

    expert = micro_family / "experts" / "math"
    inbox = tmp_path / "box" / "inbox"
    inbox.mkdir(parents=True)
    for name in ("../escape", "a/b", ".", ".hidden", "Math"):
        with pytest.raises(InboxError, match="must be 1-63 lowercase letters"):
            submit(expert, inbox, name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["box", "inbox"]
    broken = tmp_path / "broken"
    shutil.copytree(expert, broken)
    (broken / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(shutil.Error):
        submit(broken, inbox)
    assert list(inbox.iterdir()) == []  # the half-made copy is gone
    capitals = tmp_path / "Math Expert"  # a folder name that cannot name an entry: the card's name does
    shutil.copytree(expert, capitals)
    assert submit(capitals, inbox) == str(inbox / "math")
    assert (inbox / "math" / "expert.yaml").is_file()
    (capitals / "expert.yaml").write_text("name: Math\n")  # neither name valid: refused, naming the rule
    with pytest.raises(InboxError, match="'Math Expert' must be 1-63 lowercase letters"):
        submit(capitals, inbox)


def test_submit_neither_replaces_nor_creates_unless_asked(micro_family, tmp_path, capsys, monkeypatch):
    from meswitch.flows.inbox import InboxError, submit

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    expert = micro_family / "experts" / "math"
    inbox = tmp_path / "inbox"
    with pytest.raises(FileNotFoundError, match="no such inbox folder"):
        submit(expert, inbox)
    with pytest.raises(FileNotFoundError):
        submit(expert, tmp_path / "typo" / "inbox", create_inbox=True)  # a missing parent is still refused
    assert not inbox.exists() and not (tmp_path / "typo").exists()
    with logged("meswitch.flows.deployments") as warnings:
        assert main(["submit", str(expert), "--inbox", str(inbox), "--create-inbox"]) == 0
    out = capsys.readouterr().out
    assert (inbox / "math" / "expert.yaml").is_file()
    assert "".join([out, *warnings]).count("PREFECT_API_URL is not set") == 1, (out, warnings)
    assert main(["submit", str(expert), "--inbox", str(inbox), "--no-event"]) == 2
    assert "already holds an entry 'math'; pass --replace" in capsys.readouterr().err
    changed = tmp_path / "math"
    shutil.copytree(expert, changed)
    (changed / "calib.jsonl").write_text('{"text": "new"}\n')
    with pytest.raises(InboxError):
        submit(changed, inbox)
    submit(changed, inbox, replace=True)
    assert (inbox / "math" / "calib.jsonl").read_text() == '{"text": "new"}\n'
    assert [p.name for p in inbox.iterdir()] == ["math"]


def test_s3_submit_replaces_whole_and_an_expert_prefix_is_no_inbox(
    micro_family, s3_server, tmp_path, monkeypatch
):  # fmt: skip
    from meswitch.flows.inbox import InboxError, scan_inbox, submit
    from meswitch.registry import open_registry

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    inbox = f"s3://{s3_server.bucket}/edges-inbox-{time.time_ns()}"
    old = tmp_path / "old"
    shutil.copytree(micro_family / "experts" / "math", old)
    (old / "stale.txt").write_text("from the first copy")
    uri = submit(old, inbox, "math")
    with pytest.raises(InboxError, match="pass --replace"):
        submit(micro_family / "experts" / "math", inbox, "math")
    submit(micro_family / "experts" / "math", inbox, "math", replace=True)
    stored = {rel for rel, _, _ in open_registry().store_for(uri).list_files(uri)}
    assert stored == {p.name for p in (micro_family / "experts" / "math").iterdir()}  # no stale.txt
    expert_prefix = f"{inbox}/math"
    with pytest.raises(InboxError, match="is an expert folder"):
        scan_inbox(expert_prefix)
    assert [e.name for e in scan_inbox(inbox)] == ["math"]
