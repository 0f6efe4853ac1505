"""The pipeline's parts without a flow run: gates, config, the inbox (local and S3), the base check,
the GPU concurrency limit, the deployments, and the CLI's argument checks."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import calib_file, make_base, make_expert

from meswitch.flows.config import load_config
from meswitch.flows.gates import Gates, check_expert_gates, check_router_gates, load_gates

# -- gates and config -----------------------------------------------------------------------------------


def test_default_gates_come_from_the_packaged_file_which_matches_the_dataclass():
    from meswitch.flows.gates import DEFAULT_GATES_FILE

    assert load_gates() == Gates(**yaml.safe_load(DEFAULT_GATES_FILE.read_text())) == Gates()


def test_gates_file_overrides_some_and_rejects_unknown_keys(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("max_kl: 0.2\n")
    gates = load_gates(f)
    assert gates.max_kl == 0.2 and gates.max_ppl_ratio == load_gates().max_ppl_ratio
    f.write_text("max_kll: 0.2\n")
    with pytest.raises(ValueError, match="unknown gates \\['max_kll'\\]"):
        load_gates(f)
    f.write_text("max_kl: -1\n")
    with pytest.raises(ValueError, match="finite number >= 0"):
        load_gates(f)


def test_expert_gates_say_which_failed_and_why():
    gates = Gates(max_kl=0.05, max_ppl_ratio=1.05, min_task_ratio=0.9)
    ok = {"kl": 0.01, "ppl_ratio": 1.01, "task_score_expert": 0.5, "task_score_compressed": 0.5}
    assert check_expert_gates(ok, gates).passed
    bad = {"kl": 0.2, "ppl_ratio": 1.01, "task_score_expert": 0.5, "task_score_compressed": 0.25}
    report = check_expert_gates(bad, gates)
    assert not report.passed
    assert report.reasons == ["max_kl: 0.2 is not <= 0.05", "min_task_ratio: 0.5 is not >= 0.9"]
    assert report.to_dict()["max_kl"] == {"passed": False, "value": 0.2, "limit": 0.05}
    # no task data, or a full expert that scores 0: the task gate is not applied, and says so
    for scores in ({"task_score_expert": None, "task_score_compressed": None},
                   {"task_score_expert": 0.0, "task_score_compressed": 0.0}):  # fmt: skip
        r = check_expert_gates({"kl": 0.01, "ppl_ratio": 1.0, **scores}, gates)
        assert r.passed and "not applied" in r.to_dict()["min_task_ratio"]["note"]
    assert not check_expert_gates({"kl": float("nan"), "ppl_ratio": 1.0}, gates).passed
    assert not check_router_gates({"accuracy": 0.4, "per_domain": {}}, Gates(min_router_accuracy=0.6)).passed


def _router_eval(**acc: float) -> dict:
    return {
        "accuracy": sum(acc.values()) / len(acc),
        "per_domain": {d: {"n": 50, "accuracy": a} for d, a in acc.items()},
    }


def test_router_gate_is_per_domain_and_says_which_domain_failed_by_how_much():
    gates = Gates()
    old = {"code": 0.98, "math": 1.0}
    # a new domain that steals code's queries: overall accuracy still high, but code drops 8 points
    report = check_router_gates(_router_eval(code=0.90, math=1.0, english=0.96), gates, old)
    assert not report.passed
    assert report.reasons == [
        "max_domain_accuracy_drop: code fell from 0.980 to 0.900 (8.0 points; at most 2.0 allowed)"
    ]
    # within two points, and a new domain at 90% or more: promoted
    assert check_router_gates(_router_eval(code=0.96, math=0.99, english=0.9), gates, old).passed
    # a new domain under 90%
    weak = check_router_gates(_router_eval(code=0.98, math=1.0, english=0.8), gates, old)
    assert weak.reasons == ["min_new_domain_accuracy: new domain english: 0.800 is below 0.900"]
    # a domain without held-out queries cannot be checked: refused, not passed
    missing = _router_eval(code=0.98, math=1.0)
    missing["per_domain"]["english"] = {"n": 0, "accuracy": float("nan")}
    assert "english: no held-out queries" in check_router_gates(missing, gates, old).reasons[0]
    # the first router has no router to keep serving instead: the overall accuracy decides
    assert check_router_gates(_router_eval(code=0.85, math=1.0), gates).passed
    assert not check_router_gates(_router_eval(code=0.2, math=0.9), gates).passed
    assert check_router_gates(None, gates).passed  # no test queries at all: not applied, and says so


def test_config_sections_gates_and_unknown_keys(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"compression": {"bits": 3}, "gates": {"max_kl": 0.3}, "gpu_slots": 2}))
    gates = tmp_path / "g.yaml"
    gates.write_text("max_kl: 0.4\n")
    cfg = load_config(f)
    assert (cfg.compression.bits, cfg.compression.method, cfg.gates.max_kl, cfg.gpu_slots) == (3, "meswitch", 0.3, 2)
    assert load_config(f, gates).gates.max_kl == 0.4  # the gates file has the last word
    assert cfg.digest("compression") != load_config().digest("compression")
    assert cfg.digest("evaluation") == load_config().digest("evaluation")
    f.write_text(yaml.safe_dump({"compression": {"bitz": 3}}))
    with pytest.raises(ValueError, match="unknown keys \\['bitz'\\]"):
        load_config(f)


# -- inbox -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = make_base(root / "base")
    expert = make_expert(base, root / "math-expert", seed=1, scale=0.002)
    calib_file(expert / "calib.jsonl")
    (expert / "expert.yaml").write_text(yaml.safe_dump({"name": "math-expert", "domain": "math", "description": "m"}))
    return base, expert


def test_local_inbox_submit_is_whole_and_the_stamp_follows_changes(tiny_expert, tmp_path):
    from meswitch.flows.inbox import scan_inbox, submit

    _, expert = tiny_expert
    inbox = tmp_path / "inbox"
    (inbox / ".half-copied.part-1").mkdir(parents=True)  # hidden: still arriving
    (inbox / "no-card").mkdir()
    (inbox / "no-card" / "config.json").write_text("{}")
    uri = submit(expert, inbox)
    assert uri == str(inbox / "math-expert") and not list(inbox.glob(".math-expert*"))
    entries = {e.name: e for e in scan_inbox(inbox)}
    assert set(entries) == {"math-expert", "no-card"}
    assert entries["math-expert"].has_card and not entries["no-card"].has_card
    stamp = entries["math-expert"].stamp
    assert scan_inbox(inbox)[0].stamp == stamp
    (inbox / "math-expert" / "calib.jsonl").write_text('{"text": "changed"}\n')
    assert {e.name: e for e in scan_inbox(inbox)}["math-expert"].stamp != stamp
    with pytest.raises(FileNotFoundError, match=r"expert\.yaml"):
        submit(inbox / "no-card", inbox)


def test_a_killed_writers_staging_folder_is_removed_by_the_next_write_and_a_live_ones_is_kept(tmp_path):
    """A process killed mid-write leaves its hidden staging folder; the next write of that artifact removes it, never
    the folder of a writer still running (this one, here), nor one of another artifact."""
    import os
    import socket
    import subprocess
    import sys

    from meswitch.artifacts import staging_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, out = socket.gethostname(), tmp_path / "math-0123"
    abandoned = tmp_path / f".math-0123.{host}-{dead.stdout.strip()}.x1y2z3.tmp"
    live = tmp_path / f".math-0123.{host}-{os.getpid()}.a1b2c3.tmp"
    other = tmp_path / f".math-0123-b.{host}-{dead.stdout.strip()}.x1y2z3.tmp"
    for folder in (abandoned, live, other):
        folder.mkdir()
        (folder / "delta-00000.safetensors").write_bytes(b"half")
    with staging_dir(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not abandoned.exists() and live.exists() and other.exists() and (out / "manifest.json").is_file()


def test_a_folder_named_by_its_content_is_kept_when_a_concurrent_writer_got_there_first(tmp_path):
    """``staging_dir(keep_existing=True)`` (the registry's cache, a stored artifact, a downloaded inbox entry): the
    folder already there holds the same content, so it stays, and the staged copy is dropped, not left hidden."""
    from meswitch.artifacts import staging_dir

    out = tmp_path / "3f2a9c"
    with staging_dir(out, checked=False, keep_existing=True) as tmp:
        (tmp / "a").write_text("first")
        with staging_dir(out, checked=False, keep_existing=True) as other:  # another writer finishes first
            (other / "a").write_text("second")
    assert (out / "a").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_s3_inbox_scan_and_fetch(tiny_expert, s3_server, tmp_path, monkeypatch):
    from meswitch.flows.inbox import InboxEntry, fetch_entry, scan_inbox, submit

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    _, expert = tiny_expert
    inbox = f"s3://{s3_server.bucket}/inbox-{time.time_ns()}"
    uri = submit(expert, inbox)
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key=inbox.split("/", 3)[3] + "/partial/config.json", Body=b"{}"
    )
    entries = {e.name: e for e in scan_inbox(inbox)}
    assert entries["math-expert"] == InboxEntry("math-expert", uri, True, entries["math-expert"].stamp)
    assert not entries["partial"].has_card  # no expert.yaml yet: its upload is not finished
    local = fetch_entry(entries["math-expert"], tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in expert.iterdir())
    assert (local / "model.safetensors").read_bytes() == (expert / "model.safetensors").read_bytes()
    assert fetch_entry(entries["math-expert"], tmp_path / "cache") == local  # downloaded once per stamp


def test_an_expert_of_another_base_is_refused_with_a_clear_reason(tiny_expert, tmp_path):
    from meswitch.checkpoints import Checkpoint, CheckpointError, check_expert, relative_delta

    base, expert = tiny_expert
    assert max(relative_delta(Checkpoint(base), Checkpoint(expert)).values()) < 0.2
    assert check_expert(Checkpoint(base), Checkpoint(expert)).relative_delta < 0.2
    other = make_base(tmp_path / "other-base", seed=5)  # same shapes, independent weights
    with pytest.raises(CheckpointError, match=r"not a fine-tune of the base .* was it trained from another base"):
        check_expert(Checkpoint(base), Checkpoint(other))
    assert check_expert(Checkpoint(base), Checkpoint(other), max_relative_delta=None).relative_delta is None


# -- Prefect: the GPU limit and the deployments -------------------------------------------------------------


def test_gpu_slots_limit_how_many_gpu_tasks_run_at_once(prefect_api):
    from meswitch.flows.config import PipelineConfig
    from meswitch.flows.tasks import ensure_gpu_limit, gpu_slot

    def most_inside(cfg, wait_s: float) -> int:
        """Two threads each take a slot, then wait (up to ``wait_s``) for the other to be inside too.

        A barrier rather than overlapping sleeps: on a loaded 2-core machine the second thread's
        acquisition can take longer than any fixed sleep, which is not what this test is about.
        """
        lock, inside, most = threading.Lock(), [0], [0]
        both = threading.Barrier(2)

        def work():
            with gpu_slot(cfg):
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                with contextlib.suppress(threading.BrokenBarrierError):
                    both.wait(timeout=wait_s)
                with lock:
                    inside[0] -= 1

        threads = [threading.Thread(target=work) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads)
        return most[0]

    one = PipelineConfig(gpu_slots=1)
    assert ensure_gpu_limit(one) == 1
    assert most_inside(one, wait_s=2.0) == 1  # the second waits for the first to let go
    two = PipelineConfig(gpu_slots=2)
    assert ensure_gpu_limit(two) == 2
    assert most_inside(two, wait_s=60.0) == 2
    assert PipelineConfig(gpu_slots=None).resolved_gpu_slots() == 0  # no GPU here: no limit by default


def test_deployments_schedule_and_arrival_trigger(prefect_api, tmp_path):
    from meswitch.flows.deployments import ARRIVED, build_deployments, inbox_id

    params = {"inbox": str(tmp_path / "inbox" / ".." / "inbox"), "base": "/models/base"}
    scheduled, on_arrival = build_deployments(params, cron="*/15 * * * *")
    assert (scheduled.name, on_arrival.name) == ("scheduled-scan", "on-arrival")
    assert scheduled.schedules[0].schedule.cron == "*/15 * * * *" and not on_arrival.schedules
    assert scheduled.parameters["inbox"] == str((tmp_path / "inbox").resolve()) == inbox_id(params["inbox"])
    (trigger,) = on_arrival.triggers
    assert trigger.expect == {ARRIVED}
    assert trigger.match.root == {
        "prefect.resource.id": "meswitch.expert.*",
        "meswitch.inbox": inbox_id(params["inbox"]),
    }
    assert scheduled.entrypoint == "meswitch.flows.expert_pipeline.expert_pipeline"
    assert [d.name for d in build_deployments(params, cron=None)] == ["on-arrival"]
    assert inbox_id("s3://bucket/inbox/") == "s3://bucket/inbox"


def test_cli_refuses_missing_inputs_before_starting_anything(tmp_path, capsys):
    from meswitch.cli import main

    (tmp_path / "inbox").mkdir()
    assert main(["pipeline", "run", "--inbox", str(tmp_path / "inbox"), "--base", str(tmp_path / "nope")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    assert main(["pipeline", "run", "--inbox", str(tmp_path / "missing"), "--base", str(tmp_path / "base")]) == 2
    assert "--inbox" in capsys.readouterr().err
    assert main(["pipeline", "run", "--inbox", str(tmp_path / "inbox"), "--base", str(tmp_path / "base")]) == 2
    assert "--base" in (err := capsys.readouterr().err) and "no *.safetensors weights" in err, err
    assert main(["submit", str(tmp_path / "base"), "--inbox", str(tmp_path / "inbox"), "--no-event"]) == 2
    assert "expert.yaml" in capsys.readouterr().err


def test_prefect_yaml_declares_both_deployments_for_the_gpu_pool():
    import importlib

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from meswitch.flows.deployments import ARRIVED

    spec = yaml.safe_load(Path(__file__).parents[1].joinpath("prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"scheduled-scan", "on-arrival"}
    for d in deployments.values():
        path, name = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert getattr(module, name).name == "expert-pipeline"
        assert d["work_pool"]["name"] == "meswitch-gpu" and d["concurrency_limit"] == 1
    assert deployments["scheduled-scan"]["schedules"][0]["cron"] == "0 * * * *"
    (trigger,) = [DeploymentEventTrigger(**t) for t in deployments["on-arrival"]["triggers"]]
    assert trigger.expect == {ARRIVED}
    template = json.loads(Path(__file__).parents[1].joinpath("infra/k8s/base-job-template.json").read_text())
    resources = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpus }}"


def test_an_expert_folder_without_data_may_take_the_generic_default_corpus(tmp_path):
    from meswitch.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
    from meswitch.flows.tasks import read_card

    (tmp_path / "expert.yaml").write_text("name: plain\ndomain: prose\ndescription: d\n")
    refused = read_card.fn(str(tmp_path))
    assert refused.card is None and "'calibration: default'" in refused.error  # the reason names the way out
    (tmp_path / "expert.yaml").write_text(
        "name: plain\ndomain: prose\ndescription: d\ncalibration: default\nevaluation: default\n"
    )
    warned = []  # Prefect's logging setup replaces the root handlers pytest's caplog reads: listen on the logger
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("meswitch.expert_card").addHandler(handler)
    try:
        ok = read_card.fn(str(tmp_path))
    finally:
        logging.getLogger("meswitch.expert_card").removeHandler(handler)
    assert ok.card is not None and ok.error is None
    assert ok.card.calibration_path == DEFAULT_CALIBRATION and ok.card.evaluation_path == DEFAULT_EVALUATION
    assert any("generic default corpus" in w for w in warned)
    texts = [json.loads(line)["text"] for line in DEFAULT_CALIBRATION.read_text().splitlines()]
    held_out = {json.loads(line)["text"] for line in DEFAULT_EVALUATION.read_text().splitlines()}
    assert len(texts) >= 128 and not held_out & set(texts)  # evaluation texts are not calibration texts


def test_too_little_calibration_text_is_refused_with_the_file_and_the_count(tmp_path):
    from meswitch.flows.tasks import read_card

    (tmp_path / "expert.yaml").write_text("name: short\ndomain: prose\ndescription: d\nevaluation: default\n")
    (tmp_path / "calib.jsonl").write_text(json.dumps({"text": "one short line"}) + "\n")
    refused = read_card.fn(str(tmp_path))
    assert refused.card is None
    assert "calib.jsonl: too little calibration text (14 characters in 1 texts" in refused.error
