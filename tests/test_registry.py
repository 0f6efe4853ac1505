"""The registry against the embedded default (SQLite + local folder) and against real servers (MLflow
tracking server + SeaweedFS S3 with authentication): publish, resolve, promote, roll back, list,
concurrent publishers, bad names, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("boto3")

from meswitch.artifacts import verify
from meswitch.registry import (
    IntegrityError,
    InvalidName,
    NotFound,
    Registry,
    RegistryConfig,
    RegistryError,
    content_hash,
)

BASE = "b" * 64
_names = itertools.count()


@pytest.fixture
def name() -> str:
    """A model name no other test uses (the servers and the embedded database live for the session)."""
    return f"meswitch-expert-t{next(_names)}"


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("meswitch-home")


def _config(request, kind: str, tmp_path: Path, embedded_home: Path) -> RegistryConfig:
    if kind == "embedded":
        return RegistryConfig.from_env({}, home=embedded_home, cache_dir=tmp_path / "cache", backoff_s=0.2)
    s3 = request.getfixturevalue("s3_server")
    mlflow = request.getfixturevalue("mlflow_server")
    env = {**s3.env(), "MLFLOW_TRACKING_URI": mlflow.url}
    return RegistryConfig.from_env(env, home=tmp_path / "home", backoff_s=0.2)


@pytest.fixture(params=["embedded", "server"])
def backend(request, tmp_path, embedded_home) -> RegistryConfig:
    """The configuration of one backend: embedded (SQLite + folder) or servers (MLflow + S3)."""
    return _config(request, request.param, tmp_path, embedded_home)


@pytest.fixture
def registry(backend) -> Registry:
    return Registry(backend)


def test_publish_resolve_promote_rollback(registry, make_artifact, name, tmp_path):
    first = make_artifact("first", b"delta one")
    second = make_artifact("second", b"delta two")

    assert registry.publish(first, name, alias="candidate") == 1
    assert registry.publish(first, name) == 1, "same content must return the existing version"
    assert registry.publish(second, name, alias="candidate") == 2
    assert registry.aliases(name) == {"candidate": 2}

    info = registry.get_version(name, version=1)
    assert info.tags["domain"] == "math"
    assert info.tags["base_fingerprint"] == BASE
    assert info.tags["bits_per_param"] == "2.25"
    assert info.tags["gates_passed"] == "true"
    assert json.loads(info.tags["gates"]) == {"kl": {"passed": True, "value": 0.01}}
    assert info.tags["content_hash"] == content_hash(first)
    assert info.source.endswith(f"/{name}/{content_hash(first)}")

    registry.promote(name, 1)
    registry.promote(name, 2)
    resolved = registry.resolve(name, "production", base_fingerprint=BASE)
    assert (resolved.version, resolved.alias) == (2, "production")
    assert (resolved.path / "delta.safetensors").read_bytes() == b"delta two"
    assert resolved.path.parent == registry.config.cache_dir
    verify(resolved.path, BASE)

    assert registry.rollback(name) == 1
    assert registry.aliases(name) == {"candidate": 2, "production": 1}
    assert registry.get_version(name, version=2).tags["rolled_back.production"]
    assert (registry.resolve(name).path / "delta.safetensors").read_bytes() == b"delta one"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback(name)

    pulled = registry.pull(f"{name}/2", tmp_path / "pulled")
    assert (pulled.path / "delta.safetensors").read_bytes() == b"delta two"
    verify(pulled.path, BASE)

    model = next(m for m in registry.list_models() if m.name == name)
    assert [v.version for v in model.versions] == [1, 2]
    assert model.aliases == {"candidate": 2, "production": 1}
    assert [v.aliases for v in model.versions] == [["production"], ["candidate"]]


def test_rejected_version_never_takes_an_alias(registry, make_artifact, name):
    bad = make_artifact("bad", metrics={"bits_per_param": 2.1, "gates": {"kl": {"passed": False}}})
    version = registry.publish(bad, name, rejected="kl 0.9 > 0.05")
    info = registry.get_version(name, version=version)
    assert info.rejected == "kl 0.9 > 0.05"
    assert info.tags["gates_passed"] == "false"
    with pytest.raises(RegistryError, match="rejected"):
        registry.promote(name, version)
    with pytest.raises(RegistryError, match="rejected"):
        registry.publish(make_artifact("other"), name, alias="candidate", rejected="no")
    assert registry.aliases(name) == {}

    good = registry.publish(make_artifact("good"), name, alias="production")
    registry.reject(name, good, "found wanting")
    assert registry.get_version(name, version=good).rejected == "found wanting"

    # the same content judged again (under new gates) and passed: the rejection is lifted and it may be promoted
    again = registry.publish(bad, name)
    assert again == version and registry.get_version(name, version=version).rejected is None
    registry.promote(name, version)
    assert registry.aliases(name)["production"] == version


def test_resolve_refuses_another_base_and_caches_nothing(registry, make_artifact, name):
    registry.publish(make_artifact("e"), name, alias="candidate")
    with pytest.raises(IntegrityError, match="made for base"):
        registry.resolve(name, "candidate", base_fingerprint="c" * 64)
    cache = registry.config.cache_dir
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_alias_and_version_are_clear(registry, make_artifact, name):
    registry.publish(make_artifact("e"), name)
    with pytest.raises(NotFound, match="production"):
        registry.resolve(name, "production")
    with pytest.raises(NotFound):
        registry.get_version(name, version=7)
    with pytest.raises(NotFound):
        registry.aliases("meswitch-expert-never-published")


def test_damaged_cache_copy_is_fetched_again(registry, make_artifact, name):
    registry.publish(make_artifact("e", b"good bytes"), name, alias="candidate")
    path = registry.resolve(name, "candidate").path
    (path / "delta.safetensors").write_bytes(b"rotten bytes")
    again = registry.resolve(name, "candidate")
    assert again.path == path
    assert (again.path / "delta.safetensors").read_bytes() == b"good bytes"


def test_prune_cache_keeps_what_aliases_need_and_frees_the_rest(registry, cli, make_artifact, name):
    """``prune_cache`` (``meswitch registry prune-cache``): of four cached versions it keeps production's and the
    one a rollback would return to, and candidate's; it removes the fourth and a download killed on this host
    (a staging folder whose writer is gone), never a live writer's staging folder or a folder that is no cached
    version; a dry run removes nothing; a pruned version resolves again from the object store."""
    import socket
    import subprocess
    import sys

    versions = [registry.publish(make_artifact("p", f"version {i}".encode()), name) for i in range(4)]
    for v in versions[:3]:
        registry.promote(name, v)  # production: 1, 2, 3 in turn -> 3, and a rollback returns to 2
    registry.set_alias(name, "candidate", versions[3])  # version 1: history that no alias needs
    paths = {v: registry.resolve(name, version=v).path for v in versions}
    cache = registry.config.cache_dir
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = cache / f".{paths[versions[0]].name}.{host}-{int(gone.stdout)}.abc123.tmp"
    live = cache / f".{paths[versions[0]].name}.{host}-{os.getpid()}.def456.tmp"
    other = cache / "notes"
    for folder in (killed, live, other):
        folder.mkdir()
        (folder / "part").write_bytes(b"x" * 1000)

    code, out, _ = cli("prune-cache", "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] and all(p.is_dir() for p in (*paths.values(), killed, live, other))
    assert report["removed"] == [paths[versions[0]].name] and report["abandoned"] == [killed.name]
    kept = report["kept"]
    assert kept[paths[versions[2]].name] == [f"{name}@production"]
    assert kept[paths[versions[1]].name] == [f"{name}@production rollback"]
    assert kept[paths[versions[3]].name] == [f"{name}@candidate"]
    size = sum(f.stat().st_size for f in paths[versions[0]].rglob("*") if f.is_file())
    assert report["freed_bytes"] == size + 1000

    code, out, _ = cli("prune-cache")
    assert code == 0 and "removed 1 version and 1 abandoned download, 0.0 MB" in out, out
    assert not paths[versions[0]].exists() and not killed.exists()
    assert all(p.is_dir() for p in (paths[versions[1]], paths[versions[2]], paths[versions[3]], live, other))
    assert not list(cache.glob(f".{paths[versions[0]].name}.*.pruned.tmp"))  # renamed aside, then deleted
    again = registry.resolve(name, version=versions[0])  # fetched and verified again
    assert again.path == paths[versions[0]] and (again.path / "delta.safetensors").read_bytes() == b"version 0"
    assert registry.rollback(name) == versions[1]  # from the cache: it was kept


BAD_NAMES = [
    "",
    "   ",
    "../meswitch-expert-x",
    "meswitch-expert-../../etc",
    "meswitch-expert-a/b",
    "meswitch-expert-",
    "meswitch-expert-Upper",
    "meswitch-expert-a b",
    "meswitch-expert-x;rm",
    "expert-math",
    "meswitch-expert-" + "x" * 100,
]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_before_anything_is_written(bad, make_artifact, tmp_path, embedded_home):
    config = RegistryConfig.from_env({}, home=tmp_path / "fresh-home")
    registry = Registry(config)
    with pytest.raises(InvalidName):
        registry.publish(make_artifact("e"), bad)
    assert not (tmp_path / "fresh-home").exists(), "nothing may be written for a bad name"


def test_kind_must_match_the_name_and_aliases_are_checked(make_artifact, tmp_path):
    registry = Registry(RegistryConfig.from_env({}, home=tmp_path / "fresh-home"))
    with pytest.raises(InvalidName, match="meswitch-base-"):
        registry.publish(make_artifact("b", kind="base"), "meswitch-expert-b")
    with pytest.raises(InvalidName, match="alias"):
        registry.publish(make_artifact("e"), "meswitch-expert-e", alias="Prod/../x")
    with pytest.raises(InvalidName, match="alias"):
        registry.publish(make_artifact("e"), "meswitch-expert-e", alias="latest")
    assert not (tmp_path / "fresh-home").exists()


def test_damaged_artifact_folder_is_not_published(registry, make_artifact, name):
    folder = make_artifact("e")
    (folder / "delta.safetensors").write_bytes(b"changed after sealing")
    with pytest.raises(Exception, match="does not match the manifest"):
        registry.publish(folder, name)
    with pytest.raises(NotFound):
        registry.aliases(name)


# -- two publishers at once ---------------------------------------------------------------------------


def test_concurrent_publishers(backend, make_artifact, name):
    """Three publishers at once, each with its own client: two different artifacts and one of them twice."""
    a, b = make_artifact("a", b"aaaa"), make_artifact("b", b"bbbb")
    clients = [Registry(backend) for _ in range(3)]
    for reg in clients:
        reg.list_models()  # connected (and the embedded database created) before the race starts
    barrier = threading.Barrier(3)

    def publish(reg: Registry, folder: Path) -> tuple[str, int | str]:
        barrier.wait(timeout=60)
        try:
            return str(folder), reg.publish(folder, name)
        except Exception as e:  # reported below
            return str(folder), f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(publish, clients, [a, b, a]))
    assert all(isinstance(v, int) for _, v in got), got
    by_folder: dict[str, set[int]] = {}
    for folder, version in got:
        by_folder.setdefault(folder, set()).add(version)
    assert len(by_folder[str(a)]) == 1, f"the same content got two versions: {got}"
    assert by_folder[str(a)] != by_folder[str(b)]

    registry = Registry(backend)
    model = registry.get_model(name)
    # A duplicate created in the race is deleted again; version numbers are not reused.
    assert {v.version for v in model.versions} == by_folder[str(a)] | by_folder[str(b)], "one version per content"
    for folder in (a, b):
        (version,) = by_folder[str(folder)]
        resolved = registry.resolve(name, version=version)
        assert resolved.content_hash == content_hash(folder)
        assert (resolved.path / "delta.safetensors").read_bytes() == (folder / "delta.safetensors").read_bytes()


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch, backend, capsys):
    """Run ``meswitch registry ...`` in this process with the backend's configuration in the environment."""
    import meswitch.cli

    for key in ("MLFLOW_TRACKING_URI", "MESWITCH_ARTIFACT_URI", "AWS_ENDPOINT_URL", "MESWITCH_S3_BUCKET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MESWITCH_HOME", str(backend.home))
    monkeypatch.setenv("MESWITCH_CACHE_DIR", str(backend.cache_dir))
    monkeypatch.setenv("MESWITCH_REGISTRY_BACKOFF_S", "0.2")
    if backend.is_remote_tracking:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", backend.tracking_uri)
        monkeypatch.setenv("MESWITCH_ARTIFACT_URI", backend.artifact_uri)
        monkeypatch.setenv("AWS_ENDPOINT_URL", backend.s3_endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", backend.aws_access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", backend.aws_secret_access_key)
    # Only this command: the others' modules are not needed here.
    monkeypatch.setattr(meswitch.cli, "COMMAND_MODULES", ["registry"])

    def run(*argv: str) -> tuple[int, str, str]:
        code = meswitch.cli.main(["registry", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_round_trip(cli, make_artifact, name, tmp_path):
    folder = make_artifact("cli", b"cli delta")
    code, out, _ = cli("publish", str(folder), "--name", name, "--alias", "candidate", "--tag", "team=nlp")
    assert (code, out.strip()) == (0, "1")
    code, out, _ = cli("publish", str(make_artifact("cli2", b"cli delta 2")), "--name", name)
    assert (code, out.strip()) == (0, "2")

    code, out, _ = cli("list", "--json")
    assert code == 0
    listing = json.loads(out)
    model = next(m for m in listing["models"] if m["name"] == name)
    assert model["aliases"] == {"candidate": 1}
    assert [v["version"] for v in model["versions"]] == [1, 2]
    assert model["versions"][0]["aliases"] == ["candidate"]
    assert model["versions"][0]["tags"]["team"] == "nlp"
    assert "secret" not in out.lower()

    assert cli("promote", name, "1")[0] == 0
    assert cli("promote", name, "2")[0] == 0
    code, out, _ = cli("show", f"{name}@production", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    code, out, _ = cli("show", name)
    assert code == 0 and "production=2" in out and "v1" in out
    code, out, _ = cli("list")
    assert code == 0 and name in out

    code, out, _ = cli("rollback", name)
    assert (code, out.strip()) == (0, f"{name}@production -> version 1")
    code, out, _ = cli("pull", f"{name}@production", "--out", str(tmp_path / "pulled"))
    assert code == 0
    assert (tmp_path / "pulled" / "delta.safetensors").read_bytes() == b"cli delta"
    verify(tmp_path / "pulled")

    code, _, err = cli("rollback", name)
    assert code == 2 and "no earlier version" in err
    code, _, err = cli("pull", f"{name}@production", "--out", str(tmp_path / "x"), "--base-fingerprint", "c" * 64)
    assert code == 2 and "made for base" in err and not (tmp_path / "x").exists()


def test_cli_bad_input_is_one_clear_line(cli, make_artifact, tmp_path):
    folder = make_artifact("cli")
    code, out, err = cli("publish", str(folder), "--name", "../../etc/passwd")
    assert code == 2 and out == "" and "must not contain" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("publish", str(tmp_path / "nope"), "--name", "meswitch-expert-x")
    assert code == 2 and "not a folder" in err
    code, _, err = cli("show", "meswitch-expert-never-published@production")
    assert code == 2 and "meswitch-expert-never-published" in err
    code, _, err = cli("pull", "meswitch-expert-x", "--out", str(tmp_path / "o"))
    assert code == 2 and "NAME@ALIAS" in err


def test_stored_copy_is_checked_on_download_local(make_artifact, tmp_path, embedded_home, name):
    """A stored file altered after publishing: the download fails verification and caches nothing."""
    registry = Registry(RegistryConfig.from_env({}, home=embedded_home, cache_dir=tmp_path / "cache"))
    version = registry.publish(make_artifact("e", b"original"), name, alias="candidate")
    stored = Path(registry.get_version(name, version=version).source.removeprefix("file://"))
    (stored / "delta.safetensors").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="nothing was cached"):
        registry.resolve(name, "candidate")
    assert list((tmp_path / "cache").iterdir()) == [], "a failed download must leave nothing in the cache"
    shutil.rmtree(stored)
    with pytest.raises(NotFound, match="missing"):
        registry.resolve(name, "candidate")


def test_gpu_side_modules_never_import_the_registry():
    """DESIGN.md: compression, kernels, routing, artifacts and checkpoints run without MLflow or boto3."""
    import re

    root = Path(__file__).resolve().parents[1] / "meswitch"
    forbidden = re.compile(r"^\s*(from|import)\s+(mlflow|boto3|botocore|meswitch\.registry)\b", re.M)
    files = [root / "artifacts.py", root / "checkpoints.py"]
    for package in ("compression", "kernels", "routing"):
        files += sorted((root / package).rglob("*.py"))
    offenders = [str(f.relative_to(root)) for f in files if f.exists() and forbidden.search(f.read_text())]
    assert offenders == []


def test_one_rule_says_what_is_transient(tmp_path):
    """``is_transient`` (retried by the registry and by Prefect) against the errors each layer raises."""
    import requests
    from botocore.exceptions import ClientError, EndpointConnectionError
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from meswitch.registry import AccessDenied, Unavailable
    from meswitch.registry.errors import is_transient

    def s3(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def wrapped(cause: BaseException) -> RegistryError:
        try:
            raise RegistryError("publish failed") from cause
        except RegistryError as e:
            return e

    for transient in (
        Unavailable("down"), ConnectionRefusedError(), TimeoutError(), requests.ConnectionError("lost"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), s3("SlowDown", 503), s3("Whatever", 502),
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), wrapped(s3("InternalError", 500)),
        MlflowException("API request to http://x failed with exception Max retries exceeded"),
    ):  # fmt: skip
        assert is_transient(transient), transient
    for permanent in (
        AccessDenied("refused"), InvalidName("bad"), NotFound("gone"), s3("NoSuchKey", 404), s3("AccessDenied", 403),
        MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST), ValueError("bad input"),
        wrapped(s3("NoSuchKey", 404)),
    ):  # fmt: skip
        assert not is_transient(permanent), permanent


def test_registry_environment_is_parsed_with_clear_errors(tmp_path):
    env = {"AWS_ENDPOINT_URL": "http://b", "MLFLOW_S3_ENDPOINT_URL": "http://c", "MESWITCH_S3_PART_MB": "5.5"}
    config = RegistryConfig.from_env(env, home=tmp_path)
    assert config.s3_endpoint_url == "http://b" and config.s3_part_bytes == int(5.5 * (1 << 20))
    assert (config.retries, config.attempts, config.tracking_uri) == (5, 6, f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ValueError, match="MESWITCH_REGISTRY_RETRIES='many'"):
        RegistryConfig.from_env({"MESWITCH_REGISTRY_RETRIES": "many"}, home=tmp_path)
