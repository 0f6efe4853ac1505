"""MLflow runs of the pipeline: one per expert processed (and one per router trained).

Each run holds the parameters, the metrics, the quality table, the quality-against-size plot, the
manifest and the expert's card (``expert.yaml`` + its calibration texts, which the router is later
retrained from). Runs are found again by a key tag, set last, so a retried or repeated log
returns the run already made instead of logging a second one; a run cut short never carries it.
MLflow is reached through the registry's client (``open_registry``), with its configuration and settings.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.registry.config import RegistryConfig
from meswitch.registry.uri import parse_location

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from meswitch.registry.client import Registry

log = logging.getLogger(__name__)

EXPERIMENT = "meswitch-pipeline"
RUN_KEY_TAG = "meswitch.run_key"
CARD_DIR = "card"


class Tracker:
    """The pipeline's runs in one MLflow experiment; calls are not retried here (Prefect retries the task)."""

    def __init__(self, registry: Registry | None = None, experiment: str = EXPERIMENT):
        if registry is None:
            from meswitch.registry.client import open_registry

            registry = open_registry()
        self.registry = registry
        self.experiment = experiment
        self._experiment_id: str | None = None

    @property
    def config(self) -> RegistryConfig:
        return self.registry.config

    @property
    def client(self) -> MlflowClient:
        return self.registry.client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, self._artifact_location())
                    return self._experiment_id
                except MlflowException:  # another worker created it first
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
            self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _artifact_location(self) -> str | None:
        """Beside the registry's artifacts for a local MLflow database; a tracking server decides its own."""
        if self.config.is_remote_tracking:
            return None
        root = parse_location(self.config.artifact_uri)
        if root.is_s3:
            return f"{root}/mlflow-runs"
        return (root.path.expanduser().resolve().parent / "mlflow-runs").as_uri()

    def find_run(self, key: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def log_run(
        self,
        key: str,
        run_name: str,
        *,
        params: dict[str, Any],
        metrics: dict[str, float | None],
        tags: dict[str, str],
        texts: dict[str, str] | None = None,
        files: list[tuple[str, Path]] | None = None,
        figures: dict[str, Any] | None = None,
    ) -> str:
        """Log one finished run (or return the one already logged under ``key``); return its run id.

        ``texts``: artifact path -> text; ``files``: (artifact folder, local file or folder) pairs;
        ``figures``: artifact path -> ``callable(path)`` that writes a picture there.
        """
        if existing := self.find_run(key):
            log.info("MLflow run %s already holds %s", existing, run_name)
            return existing
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        try:
            stamp = run.info.start_time
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), stamp, 0) for k, v in sorted(metrics.items()) if v is not None],
                params=[Param(k, _param(v)) for k, v in sorted(params.items())],
            )
            with tempfile.TemporaryDirectory() as tmp:
                for rel, text in (texts or {}).items():
                    path = Path(tmp) / "texts" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text, encoding="utf-8")
                for rel, write in (figures or {}).items():
                    path = Path(tmp) / "texts" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write(path)
                if (Path(tmp) / "texts").is_dir():
                    self.client.log_artifacts(run_id, str(Path(tmp) / "texts"))
            for folder, local in files or []:
                if Path(local).is_dir():
                    self.client.log_artifacts(run_id, str(local), folder)
                else:
                    self.client.log_artifact(run_id, str(local), folder)
            self.client.set_tag(run_id, RUN_KEY_TAG, key)  # last: only a complete run carries its key
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            try:
                self.client.set_terminated(run_id, "FAILED")
            except Exception:  # the server may be what failed
                log.debug("could not mark MLflow run %s failed", run_id, exc_info=True)
            raise
        return run_id

    def download(self, run_id: str, path: str, dest: Path) -> Path:
        """Download an artifact folder of a run into ``dest`` (created); return the local folder."""
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dest)))

    def ui_command(self) -> str:
        if self.config.is_remote_tracking:
            return f"open {self.config.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.config.tracking_uri}"


def _param(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text[:6000]
