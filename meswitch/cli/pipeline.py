"""`meswitch pipeline run | serve` and `meswitch submit`: the Prefect pipeline from a shell.

Needs the ``pipeline`` extra (prefect, prefect-dask) and the ``registry`` extra; both are imported
only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from meswitch.cli import CommandError

ENV_HELP = (
    "The registry and MLflow come from the environment (MESWITCH_HOME, MLFLOW_TRACKING_URI, MESWITCH_ARTIFACT_URI, "
    "AWS_*; default: SQLite and a folder under ~/.meswitch). PREFECT_API_URL picks a Prefect server; without it "
    "Prefect's ephemeral API is used."
)


def register(sub) -> None:
    parser = sub.add_parser(
        "pipeline",
        help="run or serve the Prefect pipeline that validates, compresses, evaluates and registers new experts",
        description="Scan an inbox (a folder or s3://bucket/prefix of expert folders, each with an expert.yaml), "
        "and for every new expert: validate it against the base, calibrate, compress, evaluate against the gates, "
        "publish it to the registry (candidate, then production when every gate passes) and log an MLflow run; "
        "then retrain the router when the production domains changed. " + ENV_HELP,
    )
    pipe = parser.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    p = pipe.add_parser("run", help="run the pipeline now (no Prefect server needed)")
    _flow_args(p)
    p.add_argument(
        "--dask",
        metavar="local|ADDRESS",
        help="run experts on a Dask cluster: 'local' starts one "
        "(--dask-workers processes); else the address of a running scheduler (tcp://host:8786)",
    )
    p.add_argument("--dask-workers", type=int, default=2, help="workers of a local Dask cluster (default 2)")
    p.add_argument("--parallel", type=int, default=1, help="experts processed at once without Dask (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run)

    p = pipe.add_parser(
        "serve",
        help="serve the scheduled scan and the on-arrival deployments until interrupted",
        description="Serve two deployments of the pipeline for one inbox: a cron scan and a run triggered by the "
        "event meswitch.expert.arrived (emitted by `meswitch submit`). Without PREFECT_API_URL a local Prefect "
        "server is started for them (UI and API on loopback).",
    )
    _flow_args(p)
    p.add_argument(
        "--cron",
        default=os.environ.get("MESWITCH_PIPELINE_CRON", "0 * * * *"),
        help="schedule of the inbox scan (default: hourly, or $MESWITCH_PIPELINE_CRON)",
    )
    p.add_argument("--no-schedule", action="store_true", help="serve only the on-arrival deployment")
    p.add_argument("--no-events", action="store_true", help="serve only the scheduled scan")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "submit",
        help="copy an expert folder into the pipeline's inbox and emit meswitch.expert.arrived",
        description="Copy EXPERT_DIR (a Hugging Face folder with expert.yaml) into the inbox so that it appears "
        "whole, then emit the Prefect event meswitch.expert.arrived, which starts the on-arrival deployment of "
        "`meswitch pipeline serve`. Without PREFECT_API_URL no event is sent; the scheduled scan picks it up.",
    )
    p.add_argument("expert", type=Path, metavar="EXPERT_DIR")
    p.add_argument("--inbox", required=True, help="the inbox folder or s3://bucket/prefix")
    p.add_argument(
        "--name",
        help="folder name in the inbox: lowercase letters, digits, '.', '_', '-' (default: EXPERT_DIR's name, or "
        "where that has capitals or spaces the expert's name in its expert.yaml)",
    )
    p.add_argument("--replace", action="store_true", help="replace an entry of the same name already in the inbox")
    p.add_argument("--create-inbox", action="store_true", help="make the local inbox folder when it does not exist")
    p.add_argument("--no-event", action="store_true", help="copy only")
    p.set_defaults(func=_submit)


def _flow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inbox", required=True, help="folder or s3://bucket/prefix whose sub-folders are experts")
    p.add_argument(
        "--base",
        required=True,
        help="the base model folder the experts were fine-tuned from, or a "
        "registered base (meswitch-base-NAME@production)",
    )
    p.add_argument("--config", type=Path, help="pipeline settings (YAML; see meswitch/flows/config.py)")
    p.add_argument("--gates", type=Path, help="quality gates (YAML; defaults in meswitch/flows/gates.yaml)")
    p.add_argument("--work-dir", type=Path, help="artifacts in progress and cached results ($MESWITCH_HOME/pipeline)")
    p.add_argument("--router-test", type=Path, help="labelled queries (JSONL: text, domain) for router accuracy")
    p.add_argument("--report-dir", type=Path, help="where the run summary (JSON, Markdown) goes")
    p.add_argument("--base-name", help="register the base as meswitch-base-NAME (default: from its folder name)")


def _check(args) -> None:
    """Refuse what would fail the flow, in one line each, before Prefect starts (its traceback buries them)."""
    from meswitch.flows.config import is_registry_ref, load_config
    from meswitch.flows.runtime import quiet_defaults

    quiet_defaults()  # before Prefect is imported
    registered = is_registry_ref(args.base)
    if not registered and not (Path(args.base) / "config.json").is_file():
        raise CommandError(f"{args.base}: not a model folder (no config.json) nor a registered base")
    for flag in ("config", "gates", "router_test"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise CommandError(f"--{flag.replace('_', '-')} {path}: file not found")
    try:
        config = load_config(args.config, args.gates)
    except ValueError as e:
        raise CommandError(" ".join(str(e).split())) from e  # a YAML error's own lines, on one
    from meswitch.flows.inbox import InboxError, scan_inbox
    from meswitch.registry.errors import RegistryError
    from meswitch.registry.uri import parse_location

    try:
        inbox = parse_location(args.inbox)
    except RegistryError as e:
        raise CommandError(f"--inbox {e}") from e
    if not inbox.is_s3:
        if not inbox.path.is_dir():
            raise CommandError(f"--inbox {args.inbox}: folder not found")
        try:
            scan_inbox(inbox.path)  # an expert folder given as the inbox; S3 inboxes are scanned by the flow
        except InboxError as e:
            raise CommandError(f"--inbox {e}") from e
    if not registered:  # from the headers: a group size that fits no matrix is refused now, not after calibration
        from meswitch.checkpoints import Checkpoint, CheckpointError
        from meswitch.compression.config import ConfigError
        from meswitch.compression.expert import check_grouping

        try:
            check_grouping(Checkpoint(args.base), config.compression)
        except CheckpointError as e:
            raise CommandError(f"--base {e}") from e
        except ConfigError as e:
            raise CommandError(f"{args.config or 'pipeline config'}: compression: {e}") from e
    else:
        from meswitch.registry import open_registry

        try:
            open_registry().get(args.base)
        except RegistryError as e:
            raise CommandError(f"--base {args.base}: {e}") from e


def _params(args) -> dict:
    from meswitch.flows.config import is_registry_ref

    def opt(p: Path | None) -> str | None:
        return None if p is None else str(p.resolve())

    return dict(
        inbox=str(args.inbox),
        base=args.base if is_registry_ref(args.base) else str(Path(args.base).resolve()),
        config_file=opt(args.config),
        gates_file=opt(args.gates),
        work_dir=opt(args.work_dir),
        router_test_queries=opt(args.router_test),
        report_dir=opt(args.report_dir),
        base_name=args.base_name,
    )


def _quiet_http() -> None:
    import logging

    for name in ("httpx", "httpcore"):  # one INFO line per Prefect API call otherwise
        logging.getLogger(name).setLevel(logging.WARNING)


def _run(args) -> int:
    _check(args)
    _quiet_http()
    from meswitch.flows import run_pipeline

    params = _params(args)
    state = run_pipeline(
        params.pop("inbox"),
        params.pop("base"),
        **params,
        dask=args.dask,
        dask_workers=args.dask_workers,
        parallel=args.parallel,
        return_state=True,
    )
    if not state.is_completed():
        print(f"pipeline {state.name}: {state.message}")
        return 1
    summary = state.result()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from meswitch.flows.summary import PipelineSummary

        print(PipelineSummary.from_dict(summary).markdown())
        print(f"report: {summary['report_dir']}\nMLflow: {summary['mlflow']}")
    return 0


def _serve(args) -> int:
    _check(args)
    _quiet_http()
    if args.no_schedule and args.no_events:
        raise CommandError("--no-schedule and --no-events leave nothing to serve")
    from meswitch.flows.runtime import shared_api

    with shared_api(full=not args.no_schedule) as url:
        from meswitch.flows.deployments import serve_pipeline

        print(f"serving the expert pipeline for {args.inbox} against {url}")
        print(f"for `meswitch submit` to start a run at once, in its shell: export PREFECT_API_URL={url}", flush=True)
        serve_pipeline(_params(args), cron=None if args.no_schedule else args.cron, on_arrival=not args.no_events)
    return 0


def _submit(args) -> int:
    from meswitch.flows.runtime import quiet_defaults

    quiet_defaults()
    from meswitch.flows.deployments import emit_arrival
    from meswitch.flows.inbox import InboxError, submit

    if not args.expert.is_dir():
        raise CommandError(f"{args.expert}: not a folder")
    name = args.name or args.expert.resolve().name
    try:
        uri = submit(args.expert, args.inbox, name, replace=args.replace, create_inbox=args.create_inbox)
    except InboxError as e:
        raise CommandError(str(e)) from e
    print(f"copied {args.expert} to {uri}")
    if not args.no_event and emit_arrival(name, args.inbox, uri):  # it says itself why it sent none
        print("emitted meswitch.expert.arrived")
    return 0
