"""Hot reload: a version promoted during a stream, a corrupt version refused, and the registry's aliases."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest
from serving_fixtures import base_artifact, compress, torch_threads

from meswitch.artifacts import staging_dir
from meswitch.serving.api import Server, ServerConfig, ServerThread
from meswitch.serving.batching import SchedulerConfig
from meswitch.serving.engine import EngineConfig
from meswitch.serving.loader import LocalSource, ModelManager, RegistrySource, folder_version


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _install(src, dest) -> None:
    """Replace ``dest`` with a copy of ``src`` atomically, as the artifact writers do."""
    with staging_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _corrupt_copy(src, dest) -> None:
    shutil.copytree(src, dest)
    shard = next(dest.glob("delta-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def test_promotion_during_a_stream_and_a_corrupt_version(served_family, tmp_path):
    name, other = sorted(served_family.artifacts)[:2]
    domain = served_family.domains[name]
    live = tmp_path / "live"
    for n, art in served_family.artifacts.items():
        shutil.copytree(art, live / n)
    # The new version is another fine-tune under the same name, so its answers visibly differ.
    v2 = compress(served_family.base, served_family.experts[other], tmp_path / "v2", name, domain)
    bad = compress(served_family.base, served_family.experts[name], tmp_path / "v3", name, domain, bits=4)
    _corrupt_copy(bad, tmp_path / "v3-corrupt")

    manager = ModelManager(LocalSource(served_family.base, [live]), EngineConfig(device="cpu"),
                           SchedulerConfig(max_batch=8, window_s=0.002))  # fmt: skip
    manager.start()
    server = ServerThread(Server(manager, ServerConfig()).app).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        v1 = manager.current.experts[name].version
        prompt = "The"
        ask = dict(model=name, prompt=prompt, max_tokens=40, temperature=0)
        before = client.completions.create(**ask)
        assert before.model_extra["meswitch"]["version"] == v1

        stream = iter(client.completions.create(**ask, stream=True))
        head = [next(stream)]
        with manager.current.engine.hold():  # the stream is mid-way while the new version goes live
            _install(v2, live / name)
            report = httpx.post(f"{server.url}/admin/reload", timeout=60).json()
            assert report["changed"] and report["error"] is None
            assert f"{name}@{folder_version(v2)}" in report["loaded"] and report["refused"] == {}
            assert manager.current.scheduler.load["running"] == 1
        rest = list(stream)
        chunks = head + rest
        assert all(ch.model_extra["meswitch"]["version"] == v1 for ch in chunks)  # finished on its version
        assert "".join(ch.choices[0].text for ch in chunks) == before.choices[0].text
        assert chunks[-1].choices[0].finish_reason == before.choices[0].finish_reason

        after = client.completions.create(**ask)
        assert after.model_extra["meswitch"]["version"] == folder_version(v2) != v1
        assert after.choices[0].text != before.choices[0].text
        deadline = time.monotonic() + 30  # the old version's deltas are freed once its last stream ended
        while f"{name}@{v1}" in manager.current.engine.tiers.slots:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        _install(tmp_path / "v3-corrupt", live / name)
        r = httpx.post(f"{server.url}/admin/reload", timeout=60)
        report = r.json()
        assert "sha256" in report["refused"][name] and name in report["kept"]
        again = client.completions.create(**ask)
        assert again.model_extra["meswitch"]["version"] == folder_version(v2)  # the old one keeps serving
        assert again.choices[0].text == after.choices[0].text
        health = httpx.get(f"{server.url}/healthz").json()
        assert "sha256" in health["refused"][name] and health["experts"][name]["version"] == folder_version(v2)
        # Polling sees nothing new: the refused version is not retried until its alias moves again.
        assert not manager.reload().changed
    finally:
        server.stop()
        manager.close()


@pytest.fixture(scope="module")
def own_mlflow_server(tmp_path_factory, s3_server):
    """An MLflow server of this module's own.

    The session's server also holds the pipeline tests' production experts, built from the same micro
    family (same seed, so the same base fingerprint): on it this test would rightly serve those too.
    """
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-serving"), s3=s3_server).start()
    yield server
    server.stop()


def test_registry_production_aliases_are_served_and_followed(served_family, s3_server, own_mlflow_server, tmp_path):
    from meswitch.registry import Registry, RegistryConfig

    env = {**s3_server.env("serving-test"), "MLFLOW_TRACKING_URI": own_mlflow_server.url}
    registry = Registry(RegistryConfig.from_env(env, home=tmp_path / "home", backoff_s=0.2))
    registry.publish(served_family.base_artifact, "meswitch-base-servingtest", alias="production")
    names = sorted(served_family.artifacts)
    for n in names[:2]:
        registry.publish(served_family.artifacts[n], f"meswitch-expert-{n}", alias="production")
    # A candidate that was never promoted is not served.
    registry.publish(served_family.artifacts[names[2]], f"meswitch-expert-{names[2]}", alias="candidate")

    manager = ModelManager(RegistrySource(registry, base="servingtest"), EngineConfig(device="cpu"))
    manager.start()
    try:
        dep = manager.current
        assert set(dep.experts) == set(names[:2]) and dep.base.name == "servingtest"
        assert dep.engine.fingerprint == registry.resolve("meswitch-base-servingtest").manifest.base_fingerprint
        assert not manager.reload().changed

        v2 = compress(served_family.base, served_family.experts[names[0]], tmp_path / "v2", names[0],
                      served_family.domains[names[0]], bits=3)  # fmt: skip
        version = registry.publish(v2, f"meswitch-expert-{names[0]}")
        assert not manager.reload().changed  # published but not promoted
        registry.promote(f"meswitch-expert-{names[0]}", version)
        registry.promote(f"meswitch-expert-{names[2]}", 1)
        report = manager.reload()
        assert report.changed and names[1] in report.kept
        assert manager.current.experts[names[0]].version == str(version)
        assert set(manager.current.experts) == set(names[:3])

        # A base artifact whose weights do not hash to its manifest's fingerprint is refused at load.
        other = base_artifact(served_family.base, tmp_path / "lying-base", name="liar")
        manifest = (
            (other / "manifest.json")
            .read_text()
            .replace(manager.current.engine.fingerprint, "0" * len(manager.current.engine.fingerprint))
        )
        (other / "manifest.json").write_text(manifest)
        with pytest.raises(Exception, match="hash"):
            ModelManager(LocalSource(other, [])).start()
    finally:
        manager.close()


def test_a_new_base_without_loadable_experts_is_refused(tmp_path):
    from tiny_models import calib_file, make_base, make_expert

    old_base = make_base(tmp_path / "base-a")
    expert = make_expert(old_base, tmp_path / "expert")
    calib_file(expert / "calib.jsonl")
    compress(old_base, expert, tmp_path / "arts" / "e", "e", "d")
    live_base = tmp_path / "live-base"
    _install(old_base, live_base)
    manager = ModelManager(LocalSource(live_base, [tmp_path / "arts"]), EngineConfig(device="cpu"))
    manager.start()
    try:
        before = manager.current
        _install(make_base(tmp_path / "base-b", seed=7), live_base)  # the base moves; its experts are not there yet
        report = manager.reload()
        assert not report.changed and "no expert that loads" in report.error and "made for base" in report.error
        assert manager.current is before and "e" in before.experts  # the old base and its expert keep serving
        assert not manager.reload().changed  # and the refused base is not reloaded at every poll
    finally:
        manager.close()
