"""The ``meswitch`` command. Each sub-command lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from meswitch.processes import exit_status_of

# Modules under meswitch.cli, each defining register(subparsers) -> None.
COMMAND_MODULES = ["compress", "demo", "registry", "router", "pipeline", "serve"]
# The status a shell gives a writer killed by SIGPIPE (128 + 13): what `meswitch ... | head` ends with
BROKEN_PIPE_STATUS = 141


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meswitch",
        description="Compress fine-tuned experts into salient-aware low-bit deltas of one base, "
        "route queries to them, and serve many at once.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"meswitch.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status. A reader that stops early (``meswitch inspect A | head -1``)
    ends it quietly, as it ends any Unix filter, not with a BrokenPipeError traceback."""
    try:
        try:
            return _run(build_parser(), argv)
        finally:
            sys.stdout.flush()  # output still buffered meets a closed pipe here, not in the interpreter's last flush
    except BrokenPipeError:
        # what is left in the buffer goes nowhere: the interpreter's own flush at exit must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_STATUS


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run its command; a user-facing failure is one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return exit_status_of(lambda: int(args.func(args) or 0))
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _user_errors() -> tuple[type[BaseException], ...]:
    from meswitch.artifacts import ArtifactError
    from meswitch.checkpoints import CheckpointError

    return (CommandError, ArtifactError, CheckpointError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
