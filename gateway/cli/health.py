"""Is it answering: `health` (the running gateway itself, the container's HEALTHCHECK) and
`echo` (a configured peer, C-ECHO sent by the gateway)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from gateway.cli.common import call
from gateway.cli.output import human_bytes, print_result

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = ["add_commands", "cmd_echo", "cmd_health"]

_HEALTH_TIMEOUT = 5.0


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """`health` and `echo`."""
    add(sub, "health", cmd_health, "exit 0 if the running gateway answers and accepts instances")
    echo = add(sub, "echo", cmd_echo, "C-ECHO a configured peer from the gateway")
    echo.add_argument("peer", help="the name of a [[peers]] entry")


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the running gateway answers `status` within 5 s and accepts instances; 1
    with the reason otherwise (the container's HEALTHCHECK).

    Prints "healthy" (with --json `{"healthy": true|false}`); the reason goes to stderr.
    """
    result = call(args, "status", timeout=_HEALTH_TIMEOUT)
    if args.json:
        print(json.dumps({"healthy": bool(result["accepting_instances"])}))
    if not result["accepting_instances"]:
        print(
            f"gateway: refusing instances: {human_bytes(result['disk_free_bytes'])} free,"
            f" below min_free_mb ({human_bytes(result['min_free_bytes'])})",
            file=sys.stderr,
        )
        return 1
    if not args.json:
        print("healthy")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a `[[peers]]` entry from the running gateway; print "PEER: status 0xNNNN in S s"
    (or --json). Exit status 0, 1 when the peer does not answer or is unknown."""
    result = call(args, "echo", {"peer": args.peer})
    text = f"{result['peer']}: status 0x{result['status']:04X} in {result['seconds']:.3f} s"
    print_result(args, result, text)
    return 0
