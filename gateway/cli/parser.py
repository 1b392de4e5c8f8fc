"""The `gateway` command line: the common options, then each command group's commands.

To add a command: write its `cmd_*` function in the module of its group and register it in
that module's `add_commands` with `add(parent, name, cmd_function, help_text)`. The groups are
added below in the order `gateway --help` lists them.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol, TypeAlias

from gateway.cli import acquire, health, jobs, retrieve, rules, serve, store
from gateway.cli.common import DEFAULT_CONFIG, Command

__all__ = ["AddCommand", "Subcommands", "build_parser"]

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""Where commands are added: the top level, or a group such as `studies`."""


class AddCommand(Protocol):
    """Adds command *name* running *fn* under *parent*, with the common options; returns its
    parser for the command's own arguments."""

    def __call__(
        self, parent: Subcommands, name: str, fn: Command, help_text: str
    ) -> argparse.ArgumentParser: ...


def _add_common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--config and --json; a subcommand's copies must not overwrite values given before it."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS if suppress else None,
        help=f"config file (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON for scripts",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets `fn`, the `cmd_*` function that runs it."""
    # Both `gateway --config X status` and `gateway status --config X` work.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="gateway", description="DICOM gateway: node, router and retrieval in one process."
    )
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(fn=fn)
        return p

    serve.add_commands(sub, add)  # serve, config check
    store.add_commands(sub, add)  # status, audit, backup, studies
    jobs.add_commands(sub, add)  # jobs
    health.add_commands(sub, add)  # health, echo
    rules.add_commands(sub, add)  # rules test, test-study, reload
    retrieve.add_commands(sub, add)  # retrieve
    acquire.add_commands(sub, add)  # control hash-token, devices, sequences, tasks
    return parser
