"""Where the registry keeps things, read from the environment (one dataclass, documented in the README).

The embedded default needs no server: MLflow on a SQLite file and artifacts in a folder, both under
``$MESWITCH_HOME`` (default ``~/.meswitch``). Point ``MLFLOW_TRACKING_URI`` at a tracking server and
``MESWITCH_ARTIFACT_URI`` at ``s3://bucket/prefix`` to share a registry between machines.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meswitch.settings import env_value

MIB = 1 << 20


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the registry needs to reach MLflow and the object store.

    Environment variables (``from_env``):
      MESWITCH_HOME            root of the embedded default (default ``~/.meswitch``)
      MLFLOW_TRACKING_URI      MLflow tracking server or database (default ``sqlite:///$MESWITCH_HOME/mlflow.db``)
      MLFLOW_REGISTRY_URI      model registry, when not the tracking URI
      MESWITCH_ARTIFACT_URI    ``s3://bucket/prefix`` or a local folder (default ``$MESWITCH_HOME/artifacts``)
      MESWITCH_S3_BUCKET       shorthand for ``MESWITCH_ARTIFACT_URI=s3://<bucket>/meswitch``
      MESWITCH_CACHE_DIR       verified downloads, by content hash (default ``$MESWITCH_HOME/cache``)
      AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL
                               S3-compatible endpoint, first one set wins (default: AWS itself)
      AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
                               credentials (unset: boto3's usual chain, e.g. AWS_PROFILE or an instance role)
      AWS_REGION, AWS_DEFAULT_REGION  region (default us-east-1)
      MESWITCH_S3_PART_MB      multipart threshold and part size in MiB (default 64; S3's minimum is 5)
      MESWITCH_S3_CONCURRENCY  parallel part uploads per file (default 4)
      MESWITCH_REGISTRY_RETRIES  attempts after the first when an MLflow call or an S3 request fails
                               transiently (default 5; S3's are botocore's, see ``registry.retry``)
      MESWITCH_REGISTRY_BACKOFF_S first wait between MLflow attempts, doubled each time (default 1.0)
    """

    home: Path
    tracking_uri: str
    registry_uri: str
    artifact_uri: str
    cache_dir: Path
    s3_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    aws_region: str = "us-east-1"
    s3_part_bytes: int = 64 * MIB
    s3_concurrency: int = 4
    retries: int = 5
    backoff_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RegistryConfig:
        """Read the configuration from ``env`` (default ``os.environ``); keyword overrides win."""
        env = os.environ if env is None else env
        text = lambda *keys, default=None: env_value(env, keys, str, default)
        home = Path(overrides.pop("home", None) or text("MESWITCH_HOME", default="~/.meswitch")).expanduser()
        tracking = text("MLFLOW_TRACKING_URI", default=f"sqlite:///{(home / 'mlflow.db').as_posix()}")
        bucket = text("MESWITCH_S3_BUCKET")
        artifact_uri = text(
            "MESWITCH_ARTIFACT_URI", default=f"s3://{bucket}/meswitch" if bucket else str(home / "artifacts")
        )
        values: dict[str, Any] = dict(
            home=home,
            tracking_uri=tracking,
            registry_uri=text("MLFLOW_REGISTRY_URI", default=tracking),
            artifact_uri=artifact_uri,
            cache_dir=Path(text("MESWITCH_CACHE_DIR", default=home / "cache")).expanduser(),
            s3_endpoint_url=text("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
            aws_access_key_id=text("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=text("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=text("AWS_SESSION_TOKEN"),
            aws_region=text("AWS_REGION", "AWS_DEFAULT_REGION", default="us-east-1"),
            s3_part_bytes=int(env_value(env, "MESWITCH_S3_PART_MB", float, 64.0) * MIB),
            s3_concurrency=env_value(env, "MESWITCH_S3_CONCURRENCY", int, 4),
            retries=env_value(env, "MESWITCH_REGISTRY_RETRIES", int, 5),
            backoff_s=env_value(env, "MESWITCH_REGISTRY_BACKOFF_S", float, 1.0),
        )
        if "tracking_uri" in overrides and "registry_uri" not in overrides:
            overrides["registry_uri"] = overrides["tracking_uri"]
        values.update(overrides)
        values["home"] = Path(values["home"])
        values["cache_dir"] = Path(values["cache_dir"])
        config = cls(**values)
        config.check()
        return config

    def replace(self, **changes: Any) -> RegistryConfig:
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("MESWITCH_REGISTRY_RETRIES and MESWITCH_REGISTRY_BACKOFF_S must not be negative")
        if self.s3_part_bytes < 5 * MIB:
            raise ValueError("MESWITCH_S3_PART_MB must be at least 5 (the S3 minimum part size)")
        if self.s3_concurrency < 1:
            raise ValueError("MESWITCH_S3_CONCURRENCY must be at least 1")

    @property
    def attempts(self) -> int:
        """Attempts of one MLflow call or one S3 request before it is given up (``registry.retry``)."""
        return self.retries + 1

    @property
    def is_remote_tracking(self) -> bool:
        """True when MLflow is reached over HTTP (retries apply), False for a local database."""
        return self.tracking_uri.startswith(("http://", "https://"))

    def describe(self) -> dict[str, str]:
        """Where things go, without secrets (for logs and ``registry list --json``)."""
        return {
            "tracking_uri": _redact(self.tracking_uri),
            "registry_uri": _redact(self.registry_uri),
            "artifact_uri": self.artifact_uri,
            "s3_endpoint_url": self.s3_endpoint_url or "",
            "cache_dir": str(self.cache_dir),
        }


def _redact(uri: str) -> str:
    """Drop a password from ``scheme://user:password@host`` URIs."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.split("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return uri
