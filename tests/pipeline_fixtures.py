"""Fixtures and helpers for the pipeline tests: a Prefect API, the micro demo family, inboxes, bad experts.

``prefect_api`` starts Prefect's ephemeral API server once per session (PREFECT_HOME in a temporary
folder) and exports PREFECT_API_URL, so Dask workers and served deployments in child processes reach
the same server. ``micro_family`` is the micro family with its fifth (extra) domain; set
MESWITCH_PIPELINE_FAMILY to a prebuilt one (same size and seed) to skip the build while developing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from meswitch.flows.runtime import QUIET

FAST_CONFIG = {
    "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
    "evaluation": {"limit": 12, "max_len": 128},
    "io_retries": 1,
    "io_retry_delay_s": 0.5,
    # 32 queries a domain separate the micro family's five well past the loose gates; the default 256 take some 25 s
    # a router to encode on 2 cores, and most pipeline tests train one or two
    "router": {"max_per_domain": 32},
}
# The tests are about the pipeline, not about how well 2-bit deltas of a 160k-parameter model do.
LOOSE_GATES = {
    "max_kl": 0.5,
    "max_ppl_ratio": 1.5,
    "min_task_ratio": 0.0,
    "min_router_accuracy": 0.5,
    "min_new_domain_accuracy": 0.5,
}


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """Prefect's ephemeral API on loopback for the whole session; yields its URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**QUIET, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_HOME,
            PREFECT_SERVER_ANALYTICS_ENABLED,
            temporary_settings,
        )

        with temporary_settings(updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            server = SubprocessASGIServer()
            server.start(timeout=180)
            try:
                mp.setenv("PREFECT_API_URL", server.api_url)
                with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                    yield server.api_url
            finally:
                server.stop()


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory, micro_core_family: Path) -> Path:
    """The micro demo family (seed 0) with its extra domain, for the pipeline, routing and serving tests: a copy of
    the session's core family (conftest) with the extra expert trained onto it (the base and the core experts do
    not depend on it). Tests read it; one that changes an expert works on a copy."""
    from meswitch.demo import build_family

    if where := os.environ.get("MESWITCH_PIPELINE_FAMILY"):
        return build_family(Path(where), size="micro", seed=0, extra_domain=True)
    where = tmp_path_factory.mktemp("pipeline") / "family"
    shutil.copytree(micro_core_family, where)
    return build_family(where, size="micro", seed=0, extra_domain=True)


def use_registry(mp: pytest.MonkeyPatch, s3_server, prefix: str, tracking_uri: str, home: Path) -> dict[str, str]:
    """Set (through ``mp``) and return the registry's environment: artifacts on the S3 server under ``prefix``,
    MLflow at ``tracking_uri``, one quick retry (the tests' servers are up or down, never slow)."""
    env = {
        **s3_server.env(prefix=prefix),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MESWITCH_HOME": str(home),
        "MESWITCH_REGISTRY_RETRIES": "1",
        "MESWITCH_REGISTRY_BACKOFF_S": "0.2",
    }
    for k, v in env.items():
        mp.setenv(k, v)
    return env


def write_config(folder: Path, gates: dict | None = None, **overrides) -> tuple[Path, Path]:
    """A fast pipeline config and a gates file in ``folder``; returns (config, gates)."""
    folder.mkdir(parents=True, exist_ok=True)
    config, gates_file = folder / "pipeline.yaml", folder / "gates.yaml"
    config.write_text(yaml.safe_dump({**FAST_CONFIG, **overrides}))
    gates_file.write_text(yaml.safe_dump({**LOOSE_GATES, **(gates or {})}))
    return config, gates_file


def router_queries(family: Path, out: Path) -> Path:
    """Held-out routing queries of all five domains in one file (older families kept the fifth apart)."""
    lines = (family / "routing" / "test.jsonl").read_text().splitlines()
    extra = family / "routing" / "extra" / "test.jsonl"
    if extra.is_file():
        lines += extra.read_text().splitlines()
    out.write_text("\n".join(lines) + "\n")
    return out


def make_inbox(family: Path, inbox: Path, names: list[str]) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = family / "experts" / name
        if not src.is_dir():
            src = family / "extra" / name
        shutil.copytree(src, inbox / name)
    return inbox


def rename_card(folder: Path, name: str, domain: str | None = None) -> None:
    card = yaml.safe_load((folder / "expert.yaml").read_text())
    card["name"] = name
    card["domain"] = domain or name
    (folder / "expert.yaml").write_text(yaml.safe_dump(card, allow_unicode=True))


def add_bad_experts(family: Path, inbox: Path) -> dict[str, str]:
    """Seven bad experts in ``inbox``; returns {inbox entry: a phrase its rejection reason must contain}."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    experts = family / "experts"
    # A shard cut in half: not a readable safetensors file.
    corrupt = inbox / "corrupt-shard"
    shutil.copytree(experts / "math", corrupt)
    rename_card(corrupt, "corrupt-shard")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    # Another architecture (Llama, not the base's Mistral).
    wrong = inbox / "wrong-arch"
    torch.manual_seed(3)
    cfg = json.loads((family / "base" / "config.json").read_text())
    llama = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], tie_word_embeddings=False,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(llama).save_pretrained(wrong)
    for f in ("expert.yaml", "calib.jsonl", "eval.jsonl", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(experts / "code" / f, wrong / f)
    rename_card(wrong, "wrong-arch")
    # No expert.yaml.
    shutil.copytree(experts / "code", inbox / "no-card")
    (inbox / "no-card" / "expert.yaml").unlink()
    # NaN weights.
    nan = inbox / "nan-weights"
    shutil.copytree(experts / "english", nan)
    rename_card(nan, "nan-weights")
    tensors = load_file(nan / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    # Same shapes, but trained from another base: independent weights with the base's norms.
    other = inbox / "other-base"
    shutil.copytree(experts / "chinese", other)
    rename_card(other, "other-base")
    tensors = load_file(other / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    for n, t in tensors.items():
        if t.dim() == 2:
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            tensors[n] = (r * (t.float().norm() / r.norm())).to(t.dtype)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    # A plain save_pretrained folder with an expert.yaml, but no evaluation data; and one whose calibration
    # file has a broken line.
    no_eval = inbox / "no-eval-data"
    shutil.copytree(experts / "code", no_eval)
    rename_card(no_eval, "no-eval-data")
    (no_eval / "eval.jsonl").unlink()
    bad_calib = inbox / "bad-calib-line"
    shutil.copytree(experts / "code", bad_calib)
    rename_card(bad_calib, "bad-calib-line")
    with open(bad_calib / "calib.jsonl", "a") as f:
        f.write("{not json\n")
    return {
        "no-eval-data": "eval.jsonl: missing; expert.yaml names it as the evaluation data",
        "bad-calib-line": "calib.jsonl:",  # with its line number: "…calib.jsonl:N: expected a JSON object"
        "corrupt-shard": "not a readable safetensors file",
        "wrong-arch": "architecture 'LlamaForCausalLM' differs",
        "no-card": "no expert.yaml",
        "nan-weights": "non-finite",
        "other-base": "not a fine-tune of the base",
    }


def task_runs_since(t0: float) -> list[tuple[str, str]]:
    """(task name, state name) of every task run that finished after ``t0`` (a time.time()), cached ones too."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterEndTime

    after = datetime.fromtimestamp(t0, tz=UTC)
    flt = TaskRunFilter(end_time=TaskRunFilterEndTime(after_=after))
    runs = []
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(task_run_filter=flt, limit=200, offset=len(runs)):
            runs.extend(page)
    return [(r.name.rsplit("-", 1)[0], r.state.name if r.state else "?") for r in runs]


def forget_served(*deployments: str, automations: str | None = None) -> None:
    """Delete what a served pipeline registered in the session's Prefect API (its deployments, with their scheduled
    runs, and the automations whose names start with ``automations``), so that no later test meets it: a later
    ``pipeline serve`` of the same deployment would pick up the runs its schedule had made late."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in deployments:
            with contextlib.suppress(ObjectNotFound):
                client.delete_deployment(client.read_deployment_by_name(name).id)
        for automation in client.read_automations() if automations else []:
            if automation.name.startswith(automations):
                client.delete_automation(automation.id)


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s")
