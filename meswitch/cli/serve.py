"""`meswitch serve`: the OpenAI-style HTTP server over the base, every production expert and the router."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from pathlib import Path

from meswitch.cli import CommandError
from meswitch.devices import DEVICE_HELP, device_arg

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve every production expert of one base through an OpenAI-style API (model=auto routes)",
        description="Load the registry's production base, experts and router (or local folders with --base), "
        "batch requests for different experts into one forward pass, and serve /v1/models, /v1/chat/completions, "
        "/v1/completions, /healthz and /metrics. Alias moves are picked up by polling and POST /admin/reload.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_arg, default=8000, help="port, 1-65535 (default 8000)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument(
        "--gpu-memory-budget",
        type=float,
        metavar="GB",
        help="bytes of expert deltas kept on the compute device (GiB); the rest wait in host memory or on disk",
    )
    p.add_argument("--host-memory-budget", type=float, metavar="GB", help="GiB of packed deltas kept in host memory")
    src = p.add_argument_group("what to serve (default: the registry's production aliases)")
    src.add_argument("--alias", default="production", help="registry alias to serve (default production)")
    src.add_argument("--base-name", help="registered base to serve when the registry holds several")
    src.add_argument("--base", type=Path, help="serve local folders instead: the base model folder")
    src.add_argument("--experts", type=Path, nargs="*", default=[], help="expert artifact folders, or folders of them")
    src.add_argument("--router", type=Path, help="router artifact folder (enables model=auto)")
    p.add_argument(
        "--reload-interval", type=float, default=30.0, help="seconds between checks for moved aliases (0: only on POST)"
    )
    p.add_argument("--api-key", default=os.environ.get("MESWITCH_API_KEY"), help="bearer token (env MESWITCH_API_KEY)")
    p.add_argument(
        "--allow-no-experts",
        action="store_true",
        help="start even when there is no expert to serve (the base alone); otherwise that is an error",
    )
    p.add_argument(
        "--allow-no-auth",
        action="store_true",
        help="bind an address other than loopback without --api-key (anyone who reaches it can use the GPU)",
    )
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default 1024)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before 429 (default 64)")
    p.add_argument(
        "--shutdown-timeout", type=float, default=25.0,
        help="on Ctrl-C or SIGTERM, seconds to let the answers in progress finish before they are cut short (each "
        "ends with what it has; default 25, inside Kubernetes' 30 s of grace; a second Ctrl-C cuts them at once)",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="when idle, wait this long to batch (default 5)")
    p.add_argument(
        "--decode",
        choices=("auto", "static", "dynamic"),
        default="auto",
        help="static: a static KV cache, each decode step replayed from a CUDA graph on a GPU; dynamic: the eager "
        "engine over a growing cache; auto (default): static on a GPU with the packed payload, else dynamic",
    )
    p.add_argument(
        "--kv-positions",
        type=int,
        default=2048,
        help="static decode: positions per sequence (prompt plus answer); the cache of --max-batch x this many "
        "positions is reserved at start (default 2048)",
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="static decode: capture each batch size's CUDA graph on its first batch instead of at start "
        "(starts sooner; the first requests of each size wait seconds)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_serve)


def _gib(value: float | None) -> int | None:
    return None if value is None else int(value * (1 << 30))


def port_arg(text: str) -> int:
    """An argparse ``type`` for ``--port``: a TCP port, refused by name when the flags are parsed."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a whole number from 1 to 65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be from 1 to 65535, got {port}")
    return port


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` and let go, so a busy port is refused in a second, not after minutes of loading models.

    SO_REUSEADDR as uvicorn sets it: a port that only lingers in TIME_WAIT is free to it, and so to this check.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CommandError(f"--host {host}: cannot resolve it ({e.strerror})") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is in use: another process holds it (another meswitch serve?); "
                    "stop it or pick another --port"
                ) from e
            raise CommandError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _serve(args) -> int:
    if args.host not in LOOPBACK and not args.api_key and not args.allow_no_auth:
        raise CommandError(
            f"--host {args.host} exposes the server beyond this machine without authentication: pass --api-key "
            "(or set MESWITCH_API_KEY), or --allow-no-auth if that is what you want"
        )
    check_port_free(args.host, args.port)
    try:
        import uvicorn  # noqa: F401 (the extra's check: serve_forever imports it)

        from meswitch.serving.api import Server, ServerConfig, serve_forever
        from meswitch.serving.metrics import ServingMetrics
    except ImportError as e:
        raise CommandError(f"serving needs the 'serve' extra (pip install 'meswitch[serve]'): {e}") from e
    import torch

    if args.kv_positions < 1:
        raise CommandError(f"--kv-positions must be at least 1, got {args.kv_positions}")
    if args.shutdown_timeout < 0:
        raise CommandError(f"--shutdown-timeout must be 0 or more seconds, got {args.shutdown_timeout:g}")
    if args.decode == "static" and not (args.device != "cpu" and torch.cuda.is_available()):
        raise CommandError("--decode static needs a GPU (it decodes the packed payload, kept on a GPU); use auto")

    from meswitch.serving.batching import SchedulerConfig
    from meswitch.serving.engine import EngineConfig
    from meswitch.serving.loader import LoadError, LocalSource, ModelManager, RegistrySource

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base is not None:
        source = LocalSource(args.base, args.experts, args.router)
        try:
            source.check()
        except LoadError as e:
            raise CommandError(f"cannot serve the folders given: {e}") from e
    else:
        if args.experts or args.router:
            raise CommandError("--experts and --router need --base (local folders); without it the registry is used")
        try:
            source = RegistrySource(alias=args.alias, base=args.base_name)
        except ImportError as e:
            raise CommandError(f"serving from the registry needs the 'registry' extra: {e}") from e
    metrics = ServingMetrics()
    manager = ModelManager(
        source,
        EngineConfig(
            device=args.device,
            dtype=args.dtype,
            device_budget_bytes=_gib(args.gpu_memory_budget),
            host_budget_bytes=_gib(args.host_memory_budget),
        ),
        SchedulerConfig(
            max_batch=args.max_batch,
            window_s=args.batch_window_ms / 1000,
            static={"auto": None, "static": True, "dynamic": False}[args.decode],
            static_max_len=args.kv_positions,
            warm_up=args.warm_up,
        ),
        router_device="cpu" if args.device == "auto" else args.device,
        observer=metrics,
    )
    try:
        manager.start()
    except LoadError as e:
        raise CommandError(f"nothing to serve from {source.describe()}: {e}") from e
    if args.router is not None and manager.current.router is None:
        manager.close()
        raise CommandError(f"--router {args.router}: {manager.current.refused.get('router', 'not loaded')}")
    if not manager.current.experts and not args.allow_no_experts:
        manager.close()
        if args.base:
            given = ", ".join(map(str, args.experts)) or "none given"
            hint = f"--experts ({given}): give compressed expert artifacts or folders of them"
        else:
            hint = "the registry's experts (meswitch registry list)"
        raise CommandError(
            f"no expert to serve from {source.describe()}: check {hint}, or pass --allow-no-experts to serve the "
            "base alone"
        )
    manager.start_polling(args.reload_interval)
    server = Server(
        manager,
        ServerConfig(
            api_key=args.api_key,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_limit=args.max_tokens,
            max_concurrent=args.max_concurrent,
        ),
        metrics,
    )
    dep = manager.current
    log.info(
        "serving %s (base %s, %d experts%s) on http://%s:%d",
        source.describe(),
        dep.base.name,
        len(dep.experts),
        ", router" if dep.router is not None else "",
        args.host,
        args.port,
    )
    try:
        serve_forever(server, args.host, args.port, args.shutdown_timeout)
    finally:
        manager.close()
    return 0
