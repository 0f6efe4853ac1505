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
import signal
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
    """Serve the deployments until interrupted, one flow run at a time (``prefect.serve``'s runner, which pauses
    their schedules as it shuts down). Ctrl-C and SIGTERM both stop it by raising where it waits, so whoever called
    sees them: a command of ours exits 130 or 143 (:func:`meswitch.processes.exit_status_of`)."""
    import asyncio

    deployments = build_deployments(parameters, cron, on_arrival)
    runner = _pipeline_runner()(pause_on_shutdown=True, limit=1)
    for deployment in deployments:
        runner.add_deployment(deployment)
    runner.banner = "serving deployments: " + ", ".join(d.full_name for d in deployments)
    asyncio.run(runner.start())


def _pipeline_runner() -> type:
    """The runner class, made where it is used: Prefect is imported then, not with this module."""
    from prefect.runner import Runner

    class PipelineRunner(Runner):
        """Prefect's runner with SIGTERM left to the handler in place before it started. Its own calls the async
        ``stop`` without awaiting it, then ``sys.exit(0)``: a supervisor stopping ``meswitch pipeline serve`` saw a
        RuntimeWarning and a success."""

        banner = ""  # printed once the runner has started: from then on a stop pauses the schedules

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._sigterm_before = signal.getsignal(signal.SIGTERM)

        async def __aenter__(self) -> Any:
            entered = await super().__aenter__()
            if self.banner:
                print(self.banner, flush=True)
            return entered

        def handle_sigterm(self, signum: int, frame: Any) -> None:
            before = self._sigterm_before
            if callable(before):  # a command's: raised as Ctrl-C is, so the runner shuts down as on Ctrl-C
                before(signum, frame)
            elif before != signal.SIG_IGN:  # none: the runner shuts down, and the process exits as SIGTERM's would
                raise SystemExit(128 + signum)

    return PipelineRunner


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
