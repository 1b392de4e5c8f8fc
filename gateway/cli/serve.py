"""Running the gateway and checking its config: `gateway serve`, `gateway config check`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

from gateway.cli.common import config_path, settings

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = ["add_commands", "cmd_config_check", "cmd_serve"]


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """`serve` and `config check`."""
    add(sub, "serve", cmd_serve, "run the gateway in the foreground")
    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    add(config, "check", cmd_config_check, "validate the config without starting")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway in the foreground until SIGTERM or Ctrl-C; prints nothing of its own
    (the logs go where [log] says). Exit status 0 after a clean stop, 2 for a bad config
    (found before pynetdicom and the application are imported), 130 on Ctrl-C."""
    checked = settings(args)  # a bad config exits before the heavy imports
    _limit_malloc_arenas()
    from gateway.app import run
    from gateway.logs import configure_logging

    configure_logging(checked.log)
    asyncio.run(run(checked, config_path=config_path(args)))
    return 0


_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
_MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at two, before any thread starts (as MALLOC_ARENA_MAX=2 would).

    glibc gives threads that allocate at once arenas of their own, up to eight per core, and
    an arena keeps the peak it reached: with a thread pair per association, the scale
    benchmark's four senders, queries and the index's threads left ten arenas of 2-4 MiB each
    after 300,000 instances (anonymous RSS 58 -> 75 MiB in one process). Two arenas are reused
    by every thread. An explicit MALLOC_ARENA_MAX in the environment wins; other C
    libraries are left alone.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no arenas to cap)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_ARENA_MAX, _MALLOC_ARENAS)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the config without starting: print "PATH: valid" and a summary (listeners,
    control socket, metrics endpoint, peers, folders, rules). Exit status 0, or 2 with the
    first problem on stderr."""
    checked = settings(args)
    print(f"{config_path(args)}: valid")
    node = checked.node
    listeners = [f"{node.host}:{node.port}"] if node.plain else []
    if node.tls_port is not None:
        listeners.append(f"{node.host}:{node.tls_port} (TLS)")
    print(f"  node: {node.ae_title} on {', '.join(listeners)}, data in {node.data_dir}")
    print(f"  control socket: {checked.control_socket}")
    metrics = checked.metrics
    served = f"http://{metrics.host}:{metrics.port}/metrics" if metrics.port is not None else "off"
    print(f"  metrics: {served}")
    print(f"  peers: {', '.join(p.name for p in checked.peers) or 'none'}")
    print(f"  folders: {', '.join(f.name for f in checked.folders) or 'none'}")
    rules = [r.name if r.enabled else f"{r.name} (disabled)" for r in checked.rules]
    print(f"  rules: {', '.join(rules) or 'none'}")
    return 0
