"""`meswitch registry publish | list | show | promote | rollback | pull | prune-cache`: the registry from a shell.

The registry needs the ``registry`` extra (mlflow, boto3); it is imported only when one of these
commands runs, so ``meswitch --help`` and the other commands work without it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from meswitch.cli import CommandError


def register(sub) -> None:
    parser = sub.add_parser(
        "registry",
        help="publish, list, promote, roll back and pull artifacts in the MLflow model registry",
        description="Artifacts are stored by content hash in the object store (MESWITCH_ARTIFACT_URI: a folder or "
        "s3://bucket/prefix) and registered as MLflow model versions (MLFLOW_TRACKING_URI; default: SQLite under "
        "MESWITCH_HOME). Names: meswitch-expert-<name>, meswitch-base-<name>, meswitch-router.",
    )
    reg = parser.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    p = reg.add_parser("publish", help="store an artifact folder and register it as a new version")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    p.add_argument("--name", required=True, help="registered model name, e.g. meswitch-expert-math")
    p.add_argument("--alias", help="also point this alias at the version (e.g. candidate)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra version tag (repeatable)")
    p.add_argument("--rejected", metavar="REASONS", help="register as rejected, with the reasons")
    p.set_defaults(func=_handler(_publish))

    p = reg.add_parser("list", help="every meswitch model with its versions and aliases")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_handler(_list))

    p = reg.add_parser("show", help="one model (NAME), or one version (NAME@ALIAS or NAME/VERSION)")
    p.add_argument("ref", metavar="NAME[@ALIAS|/VERSION]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_handler(_show))

    p = reg.add_parser("promote", help="point an alias (default production) at a version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--alias", default="production", help="alias to move (default production)")
    p.set_defaults(func=_handler(_promote))

    p = reg.add_parser("rollback", help="point an alias (default production) back at its previous version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--alias", default="production", help="alias to roll back (default production)")
    p.set_defaults(func=_handler(_rollback))

    p = reg.add_parser("pull", help="download a version, verify every checksum, and copy it to a folder")
    p.add_argument("ref", metavar="NAME@ALIAS|NAME/VERSION")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder to write: new, empty, or an artifact of the same kind (replaced atomically)",
    )
    p.add_argument("--base-fingerprint", help="refuse an artifact made for another base")
    p.set_defaults(func=_handler(_pull))

    p = reg.add_parser(
        "prune-cache",
        help="free the download cache of versions no alias needs",
        description="Resolving a version (serving, pull) keeps a verified copy in the download cache "
        "(MESWITCH_CACHE_DIR; default: MESWITCH_HOME/cache), one folder per content hash, and never removes it. "
        "This removes every cached version that no alias points at and that no alias would roll back to, and the "
        "staging folders of downloads killed on this host. What it removes stays in the object store and is "
        "fetched again (and verified) when resolved.",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_handler(_prune_cache))


def _handler(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the registry's user-facing errors into CommandError (one line, exit status 2)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            import meswitch.registry.client  # noqa: F401 - imports mlflow: is the extra installed?
            from meswitch.registry import RegistryError
        except ImportError as e:  # pragma: no cover - depends on the installation
            msg = f"the registry needs the 'registry' extra: pip install 'meswitch[registry]' ({e})"
            raise CommandError(msg) from e
        try:
            return fn(args)
        except (RegistryError, ValueError) as e:
            raise CommandError(str(e)) from e

    return run


def _registry():
    from meswitch.registry import open_registry

    return open_registry()


def _parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def _publish(args: argparse.Namespace) -> int:
    if not args.artifact.is_dir():
        raise CommandError(f"{args.artifact}: not a folder")
    from tqdm import tqdm

    tags = _parse_tags(args.tag)
    total = sum(p.stat().st_size for p in args.artifact.rglob("*") if p.is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not sys.stderr.isatty()) as bar:
        version = _registry().publish(
            args.artifact, args.name, alias=args.alias, tags=tags, rejected=args.rejected, progress=bar.update
        )
    print(version)
    return 0


def _list(args: argparse.Namespace) -> int:
    reg = _registry()
    models = reg.list_models()
    if args.json:
        out = {"registry": reg.config.describe(), "models": [m.to_dict() for m in models]}
        json.dump(out, sys.stdout, indent=2, sort_keys=False)
        print()
        return 0
    if not models:
        print("no meswitch models registered")
        return 0
    for m in models:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(m.aliases.items())) or "no aliases"
        count = f"{len(m.versions)} version{'' if len(m.versions) == 1 else 's'}"
        print(f"{m.name}  ({count}; {aliases})")
        for v in m.versions:
            print("  " + _version_line(v))
    return 0


def _version_line(v) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.created_ms / 1000)) if v.created_ms else "?"
    bits = v.tags.get("bits_per_param")
    parts = [
        f"v{v.version}",
        created,
        v.tags.get("domain") or "-",
        f"{bits} bits/param" if bits else "",
        f"gates {'passed' if v.tags.get('gates_passed') == 'true' else 'failed'}" if "gates_passed" in v.tags else "",
        f"REJECTED: {v.rejected}" if v.rejected else "",
        f"[{', '.join(v.aliases)}]" if v.aliases else "",
    ]
    return "  ".join(p for p in parts if p)


def _show(args: argparse.Namespace) -> int:
    from meswitch.registry import ModelInfo

    item = _registry().get(args.ref)
    if args.json:
        json.dump(item.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    if isinstance(item, ModelInfo):
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(item.aliases.items())) or "none"
        print(f"{item.name}\n  aliases: {aliases}")
        for v in item.versions:
            print("  " + _version_line(v))
        return 0
    print(f"{item.name} version {item.version}")
    print(f"  aliases: {', '.join(item.aliases) or 'none'}")
    print(f"  source:  {item.source}")
    if item.rejected:
        print(f"  REJECTED: {item.rejected}")
    for key, value in sorted(item.tags.items()):
        print(f"  {key}: {value}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    reg = _registry()
    reg.promote(args.name, args.version, alias=args.alias)
    print(f"{args.name}@{args.alias} -> version {int(args.version)}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    version = _registry().rollback(args.name, alias=args.alias)
    print(f"{args.name}@{args.alias} -> version {version}")
    return 0


def _prune_cache(args: argparse.Namespace) -> int:
    reg = _registry()
    done = reg.prune_cache(dry_run=args.dry_run)
    if args.json:
        json.dump({"cache": str(reg.config.cache_dir), **done.to_dict()}, sys.stdout, indent=2)
        print()
        return 0
    verb = "would remove" if done.dry_run else "removed"
    for digest in done.removed:
        print(f"{verb} {digest[:16]}… (no alias needs it)")
    for name in done.abandoned:
        print(f"{verb} {name} (a download killed mid-way)")
    for digest, aliases in done.kept.items():
        print(f"kept {digest[:16]}… ({', '.join(aliases)})")
    n, k = len(done.removed), len(done.abandoned)
    what = f"{n} version{'s' * (n != 1)} and {k} abandoned download{'s' * (k != 1)}"
    print(f"{reg.config.cache_dir}: {verb} {what}, {done.freed_bytes / 1e6:.1f} MB")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from meswitch.artifacts import KINDS, check_out

    # before the download: --out may hold an artifact (of the pulled kind, checked again when it is replaced)
    out = check_out(args.out, KINDS)
    resolved = _registry().pull(args.ref, out, base_fingerprint=args.base_fingerprint)
    print(f"{resolved.name} version {resolved.version} -> {resolved.path} (verified)")
    return 0
