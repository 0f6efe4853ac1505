"""Prefect flows that turn newly arrived experts into validated, registered artifacts.

Thin orchestration over the library (``meswitch.compression``, ``evaluation``, ``routing``,
``registry``): see expert_pipeline.py for the flow, tasks.py for the tasks and their cache keys,
gates.py and gates.yaml for the quality gates, deployments.py for the schedule and the event trigger.
Needs the ``pipeline`` extra (prefect, prefect-dask).

    from meswitch.flows import run_pipeline
    summary = run_pipeline("inbox/", base="family/base")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_pipeline(
    inbox: str | Path,
    base: str | Path,
    *,
    config_file: str | Path | None = None,
    gates_file: str | Path | None = None,
    work_dir: str | Path | None = None,
    router_test_queries: str | Path | None = None,
    report_dir: str | Path | None = None,
    base_name: str | None = None,
    dask: str | None = None,
    dask_workers: int = 2,
    parallel: int = 1,
    return_state: bool = False,
) -> Any:
    """Run the expert pipeline now and return its summary (a dict), or its final state with ``return_state``.

    ``base`` is a model folder, or a registered base (``meswitch-base-NAME@production``).

    With no Prefect server configured, the ephemeral API is used (none is needed); ``dask`` ("local" for
    a local cluster of ``dask_workers`` processes, or a scheduler address) first starts an API that the
    workers can reach.
    """
    import contextlib

    from meswitch.flows.runtime import quiet_defaults, shared_api, start_ephemeral_api, task_runner

    quiet_defaults()
    from meswitch.flows.config import is_registry_ref
    from meswitch.flows.expert_pipeline import expert_pipeline

    params = dict(
        inbox=str(inbox),
        base=str(base) if is_registry_ref(str(base)) else str(Path(base).resolve()),
        config_file=None if config_file is None else str(config_file),
        gates_file=None if gates_file is None else str(gates_file),
        work_dir=None if work_dir is None else str(Path(work_dir).resolve()),
        router_test_queries=None if router_test_queries is None else str(Path(router_test_queries).resolve()),
        report_dir=None if report_dir is None else str(Path(report_dir).resolve()),
        base_name=base_name,
    )
    pipeline = expert_pipeline.with_options(task_runner=task_runner(dask, dask_workers, parallel))
    if not dask:
        start_ephemeral_api()  # started here, not by Prefect on the first call: stopped even if this process is killed
    api = shared_api() if dask else contextlib.nullcontext()
    with api:
        return pipeline(**params, return_state=return_state)


__all__ = ["run_pipeline"]
