"""Deployments of the expert pipeline, declared in code and served locally by ``meswitch pipeline serve``.

    scheduled-scan   cron (default hourly): scan the inbox, process whatever is new
    on-arrival       run when the event ``meswitch.expert.arrived`` names this inbox
                     (``meswitch submit`` copies an expert into the inbox and emits it)

Both take the same parameters (inbox, base, config and gates files, ...). A runner serving both
runs one pipeline at a time, so a burst of arrivals queues instead of racing. For a Kubernetes work
pool, the same two deployments are declared in ``prefect.yaml`` (see infra/k8s/README.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from meswitch.registry.uri import parse_location

log = logging.getLogger(__name__)

ARRIVED = "meswitch.expert.arrived"
DEFAULT_CRON = "0 * * * *"
SCHEDULED, ON_ARRIVAL = "scheduled-scan", "on-arrival"


def inbox_id(inbox: str | Path) -> str:
    """The inbox as events name it: an absolute local path, or the s3:// URI without a trailing slash."""
    where = parse_location(inbox)
    return str(where) if where.is_s3 else str(where.path.expanduser().resolve())


def arrival_trigger(inbox: str | Path):
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"expert arrived in {inbox_id(inbox)}",
        expect={ARRIVED},
        match={"prefect.resource.id": "meswitch.expert.*", "meswitch.inbox": inbox_id(inbox)},
        # one run per event; the pipeline itself skips what was already processed
    )


def build_deployments(parameters: dict[str, Any], cron: str | None = DEFAULT_CRON, on_arrival: bool = True) -> list:
    """The runner deployments for one inbox: a cron scan (unless ``cron`` is None) and the arrival trigger."""
    from prefect.types.entrypoint import EntrypointType

    from meswitch.flows.expert_pipeline import expert_pipeline

    params = {**parameters, "inbox": inbox_id(parameters["inbox"])}
    common = dict(parameters=params, tags=["meswitch"], entrypoint_type=EntrypointType.MODULE_PATH)
    out = []
    if cron:
        out.append(expert_pipeline.to_deployment(name=SCHEDULED, cron=cron, **common))
    if on_arrival:
        out.append(
            expert_pipeline.to_deployment(name=ON_ARRIVAL, triggers=[arrival_trigger(params["inbox"])], **common)
        )
    if not out:
        raise ValueError("nothing to serve: give a cron schedule, the arrival trigger, or both")
    return out


def serve_pipeline(parameters: dict[str, Any], cron: str | None = DEFAULT_CRON, on_arrival: bool = True) -> None:
    """Serve the deployments until interrupted, one flow run at a time."""
    from prefect import serve

    serve(*build_deployments(parameters, cron, on_arrival), limit=1)


def emit_arrival(name: str, inbox: str | Path, uri: str) -> bool:
    """Emit ``meswitch.expert.arrived`` for an expert now in ``inbox``; True once the event is sent.

    Needs a Prefect API (``PREFECT_API_URL``): an ephemeral one would vanish with this process.
    """
    import os

    if not os.environ.get("PREFECT_API_URL"):
        log.warning(
            "PREFECT_API_URL is not set: no event emitted, so the next scheduled scan picks %s up (to start a run at "
            "once, export PREFECT_API_URL as `meswitch pipeline serve` prints it)",
            name,
        )
        return False
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(
        ARRIVED,
        resource={
            "prefect.resource.id": f"meswitch.expert.{name}",
            "prefect.resource.name": name,
            "meswitch.inbox": inbox_id(inbox),
        },
        payload={"inbox": inbox_id(inbox), "expert": name, "uri": uri},
    )
    EventsWorker.drain_all(timeout=30)
    if event is None:
        log.warning(
            "Prefect at %s emitted no event for %s; the next scheduled scan picks it up",
            os.environ["PREFECT_API_URL"],
            name,
        )
    return event is not None
