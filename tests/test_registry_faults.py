"""Faults against real servers: the S3 server killed in the middle of a multipart upload (restarted, or
not), stored bytes altered or missing, wrong credentials, MLflow unreachable. Each checks that nothing
half-done is registered or cached and that a retry completes without duplicating."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("boto3")

from servers import free_ports

from meswitch.registry import (
    AccessDenied,
    IntegrityError,
    NotFound,
    Registry,
    RegistryConfig,
    Unavailable,
    content_hash,
)

MIB = 1 << 20


@pytest.fixture
def servers_config(s3_server, mlflow_server, tmp_path):
    """Build a configuration for the session's MLflow + S3 servers, with overrides."""

    def make(**overrides) -> RegistryConfig:
        env = {**s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.url}
        overrides.setdefault("home", tmp_path / "home")
        overrides.setdefault("backoff_s", 0.2)
        return RegistryConfig.from_env(env, **overrides)

    return make


@pytest.fixture
def name(request) -> str:
    return f"meswitch-expert-{request.node.name.split('[')[0].removeprefix('test_').replace('_', '-')[:40]}"


def _versions(registry: Registry, name: str) -> list[int]:
    try:
        return [v.version for v in registry.get_model(name).versions]
    except NotFound:
        return []


def test_s3_restarted_mid_multipart_upload_publish_completes(servers_config, s3_server, make_artifact, name, caplog):
    """Kill the S3 server after the first part of a multipart upload and start it again: botocore
    retries the request, the publish completes, verifies, and registers exactly one version."""
    caplog.set_level(logging.DEBUG, logger="botocore.retries.standard")
    # botocore waits at most 0.05 s * 2**i between attempts: 13 attempts ride out a restart of ~25 s and more
    config = servers_config(s3_part_bytes=5 * MIB, s3_concurrency=1, retries=12)
    registry = Registry(config)
    folder = make_artifact("big", size=16 * MIB)
    sent, killed_at, restarted = [0], [], threading.Event()

    def restart() -> None:
        time.sleep(0.5)
        s3_server.start()
        restarted.set()

    def progress(n: int) -> None:
        sent[0] += n
        if sent[0] >= 6 * MIB and not killed_at:  # the first 5 MiB part is done, the second under way
            killed_at.append(sent[0])
            s3_server.kill()
            threading.Thread(target=restart, daemon=True).start()

    version = registry.publish(folder, name, alias="candidate", progress=progress)
    assert killed_at and killed_at[0] < 16 * MIB, "the server must have been killed mid-upload"
    assert restarted.wait(60)
    assert any("Retry needed" in r.getMessage() for r in caplog.records), "botocore must have retried the upload"
    assert version == 1 and _versions(registry, name) == [1]
    resolved = registry.resolve(name, "candidate")
    assert resolved.content_hash == content_hash(folder)
    assert (resolved.path / "delta.safetensors").read_bytes() == (folder / "delta.safetensors").read_bytes()


def test_s3_down_publish_fails_clearly_then_retry_completes(servers_config, s3_server, make_artifact, name):
    config = servers_config(s3_part_bytes=5 * MIB, s3_concurrency=1, retries=1, backoff_s=0.2)
    registry = Registry(config)
    folder = make_artifact("big", size=11 * MIB)
    killed = []

    def progress(n: int) -> None:
        if not killed:
            killed.append(n)
            s3_server.kill()

    try:
        with pytest.raises(Unavailable, match="nothing was registered"):
            registry.publish(folder, name, alias="candidate", progress=progress)
        assert killed
        assert _versions(registry, name) == [], "a failed publish must register nothing"
    finally:
        s3_server.start()
    assert Registry(servers_config()).publish(folder, name, alias="candidate") == 1
    assert _versions(registry, name) == [1]
    assert registry.resolve(name, "candidate").content_hash == content_hash(folder)


class _Injected:
    """A botocore ``before-send`` hook: counts the attempts of each operation and answers the first
    ``fail`` of them with an HTTP 500 ``InternalError`` instead of sending them to the server."""

    def __init__(self, fail: int = 0):
        self.fail, self.attempts = fail, {}

    def __call__(self, request, **kwargs):
        from botocore.awsrequest import AWSResponse

        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        self.attempts[operation] = self.attempts.get(operation, 0) + 1
        if self.attempts[operation] > self.fail:
            return None
        body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
        return AWSResponse(request.url, 500, {}, type("Raw", (), {"stream": lambda self, **kw: iter([body])})())


def _store(config, hook: _Injected):
    from meswitch.registry.store import S3Store

    store = S3Store(config.artifact_uri, config)
    store.client.meta.events.register("before-send.s3", hook)
    return store


def test_s3_retries_are_botocore_s_and_bounded(servers_config, s3_server, make_artifact, name, monkeypatch):
    """The documented worst case (registry/retry.py): botocore alone retries an S3 request, ``retries + 1``
    attempts in all, waiting under 0.05 s * (2**retries - 1) when the server fails (not throttling); a
    permanent error is not retried; what still fails is ``Unavailable``."""
    config = servers_config(retries=4)
    assert _store(config, _Injected()).client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}

    # A transient answer from the real server's address is retried by botocore, then the request succeeds.
    flaky = _Injected(fail=2)
    _store(config, flaky).ping()
    assert flaky.attempts == {"HeadBucket": 3}

    # A permanent one (a missing object, refused credentials) is tried once.
    once = _Injected()
    with pytest.raises(NotFound):
        _store(config, once).check(f"{config.artifact_uri}/{name}/{'0' * 64}", "0" * 64)
    assert once.attempts == {"GetObject": 1}
    once = _Injected()
    with pytest.raises(AccessDenied):
        _store(config.replace(aws_secret_access_key="wrong-secret"), once).ping()
    assert once.attempts == {"HeadBucket": 1}

    # Always failing: exactly ``retries + 1`` attempts, then Unavailable, within the documented waits.
    always = _Injected(fail=99)
    start = time.monotonic()
    with pytest.raises(Unavailable, match="5 times"):
        _store(config, always).ping()
    assert always.attempts == {"HeadBucket": 5}
    assert time.monotonic() - start < 0.05 * (2**4 - 1) + 2.0
    (port,) = free_ports(1)
    dead = _Injected()
    start = time.monotonic()
    with pytest.raises(Unavailable, match="is unavailable"):
        _store(config.replace(s3_endpoint_url=f"http://127.0.0.1:{port}"), dead).ping()
    assert dead.attempts == {"HeadBucket": 5}, "a refused connection is retried the same way"
    assert time.monotonic() - start < 0.05 * (2**4 - 1) + 2.0

    # Publishing through the registry adds no retries of its own around botocore's.
    from meswitch.registry.store import S3Store

    failing, client = _Injected(fail=99), S3Store.client.fget

    def hooked(store):
        fresh = store._client is None
        if fresh:
            client(store).meta.events.register("before-send.s3", failing)
        return client(store)

    monkeypatch.setattr(S3Store, "client", property(hooked))
    with pytest.raises(Unavailable, match="nothing was registered"):
        Registry(config).publish(make_artifact("e"), name)
    assert failing.attempts == {"HeadBucket": 5}, "the first request that fails for good ends the publish"
    assert _versions(Registry(config), name) == []


def test_wrong_credentials_are_refused(servers_config, s3_server, make_artifact, name, tmp_path):
    good = Registry(servers_config())
    good.publish(make_artifact("e"), name, alias="candidate")

    # The server really checks signatures: a raw request with a wrong secret is refused.
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        s3_server.client(secret_key="wrong-secret").list_objects_v2(Bucket=s3_server.bucket)

    for overrides in ({"aws_secret_access_key": "wrong-secret"}, {"aws_access_key_id": "nobody"}):
        bad = Registry(servers_config(cache_dir=tmp_path / "bad-cache", **overrides))
        with pytest.raises(AccessDenied, match="refused the credentials"):
            bad.publish(make_artifact("other"), name)
        with pytest.raises(AccessDenied, match="refused the credentials"):
            bad.resolve(name, "candidate")
        assert not (tmp_path / "bad-cache").exists() or not any((tmp_path / "bad-cache").iterdir())
    assert _versions(good, name) == [1], "a refused publish registers nothing"


def test_checksum_mismatch_on_download_caches_nothing(servers_config, s3_server, make_artifact, name, tmp_path):
    registry = Registry(servers_config(cache_dir=tmp_path / "cache"))
    folder = make_artifact("e", b"the real delta")
    registry.publish(folder, name, alias="candidate")
    source = registry.get_version(name, alias="candidate").source
    bucket, prefix = source.removeprefix("s3://").split("/", 1)
    s3 = s3_server.client()
    key = f"{prefix}/delta.safetensors"
    meta = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=bucket, Key=key, Body=b"silently corrupted", Metadata=meta)  # same claimed sha256

    with pytest.raises(IntegrityError, match="nothing was cached"):
        registry.resolve(name, "candidate")
    assert list((tmp_path / "cache").iterdir()) == [], "the cache must not be poisoned"

    # Publishing the same content again repairs the stored copy (checks, finds it bad, rewrites).
    registry._store_verified(folder, source, content_hash(folder), None)
    assert (registry.resolve(name, "candidate").path / "delta.safetensors").read_bytes() == b"the real delta"


def test_missing_object_is_clear_and_republish_repairs(servers_config, s3_server, make_artifact, name, tmp_path):
    registry = Registry(servers_config(cache_dir=tmp_path / "cache"))
    folder = make_artifact("e", b"delta")
    registry.publish(folder, name, alias="candidate")
    source = registry.get_version(name, alias="candidate").source
    bucket, prefix = source.removeprefix("s3://").split("/", 1)
    s3_server.client().delete_object(Bucket=bucket, Key=f"{prefix}/extra/notes.txt")

    with pytest.raises(NotFound, match=r"notes\.txt"):
        registry.resolve(name, "candidate")
    assert list((tmp_path / "cache").iterdir()) == []

    assert registry.publish(folder, name) == 1, "republishing returns the existing version..."
    assert registry.resolve(name, "candidate").version == 1, "...and restores the missing file"
    assert _versions(registry, name) == [1]


def test_mlflow_unreachable_retries_then_fails_clearly(servers_config, make_artifact, s3_server, name):
    (port,) = free_ports(1)
    config = servers_config(tracking_uri=f"http://127.0.0.1:{port}", retries=3, backoff_s=0.2)
    registry = Registry(config)
    start = time.monotonic()
    with pytest.raises(Unavailable, match=rf"127\.0\.0\.1:{port}.*4 attempts"):
        registry.publish(make_artifact("e"), name)
    assert time.monotonic() - start >= 0.2 + 0.4 + 0.8, "it must back off between attempts"
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"meswitch/{name}/")
    assert listed.get("KeyCount", 0) == 0, "nothing is uploaded while MLflow is unreachable"


def test_mlflow_server_artifact_root_is_on_s3(mlflow_server, s3_server, monkeypatch):
    """The tracking server's own artifact root is the S3 bucket (runs log there with the S3 credentials)."""
    from mlflow import MlflowClient

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.create_experiment(f"artifact-root-{time.time_ns()}")
    assert client.get_experiment(exp).artifact_location.startswith(f"s3://{s3_server.bucket}/mlflow-artifacts")
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "hello", "note.txt")
    prefix = run.info.artifact_uri.removeprefix(f"s3://{s3_server.bucket}/")
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{prefix}/note.txt")["Body"].read()
    assert body == b"hello"


def test_infra_script_starts_answers_and_stops(tmp_path):
    """infra/registry-servers.sh up / status / down: both servers answer, PIDs are written, all stop."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "infra" / "registry-servers.sh"
    s3_port, mlflow_port = free_ports(2)
    state = tmp_path / "servers"
    env = {**os.environ, "PYTHON": sys.executable}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [str(script), *args, "--dir", str(state)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    up = run("up", "--s3-port", str(s3_port), "--mlflow-port", str(mlflow_port))
    pids = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pids = [int((state / d / f"{d}.pid").read_text()) for d in ("seaweedfs", "mlflow")]
        assert run("status").returncode == 0
        env_sh = (state / "env.sh").read_text()
        assert f"MLFLOW_TRACKING_URI='http://127.0.0.1:{mlflow_port}'" in env_sh
        assert oct((state / "env.sh").stat().st_mode & 0o777) == "0o600"
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5) as r:
            assert r.read() == b"OK"
    finally:
        down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert run("status").returncode == 1
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
