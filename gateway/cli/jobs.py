"""Dispatch jobs on the running gateway: `jobs list`, `jobs retry`, `jobs cancel`."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from gateway.cli.common import call
from gateway.cli.output import print_table

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = ["add_commands", "cmd_jobs_cancel", "cmd_jobs_list", "cmd_jobs_retry"]


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """The `jobs` commands."""
    jobs = sub.add_parser("jobs", help="dispatch jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND"
    )
    jobs_list = add(jobs, "list", cmd_jobs_list, "dispatch jobs, newest first")
    jobs_list.add_argument("--state", choices=["queued", "running", "done", "failed", "cancelled"])
    jobs_list.add_argument("--limit", type=int, default=100)
    jobs_retry = add(jobs, "retry", cmd_jobs_retry, "requeue failed jobs (all, or these ids)")
    jobs_retry.add_argument("ids", nargs="*", type=int)
    jobs_cancel = add(jobs, "cancel", cmd_jobs_cancel, "cancel queued or running jobs")
    jobs_cancel.add_argument("ids", nargs="+", type=int)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """Print the dispatch jobs, newest first, one row each with who holds a running job's
    lease and for how long (or --json). Exit status 0, 1 when the gateway cannot be reached."""
    params: dict[str, Any] = {"limit": args.limit}
    if args.state:
        params["state"] = args.state
    result = call(args, "jobs.list", params)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for job in result["jobs"]:
        until = job.get("lease_until")
        if job.get("lease_owner") and until is not None:
            left = until - time.time()
            job["lease"] = f"{job['lease_owner']} {left:.0f} s" if left >= 0 else "expired"
    print_table(
        result["jobs"],
        [
            ("id", "ID"),
            ("state", "STATE"),
            ("scope", "SCOPE"),
            ("uid", "UID"),
            ("target", "TARGET"),
            ("rule", "RULE"),
            ("priority", "PRIORITY"),
            ("attempts", "ATTEMPTS"),
            ("delivered", "DELIVERED"),
            ("lease", "LEASE"),
            ("last_error", "LAST ERROR"),
        ],
    )
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    """Requeue the failed jobs (all, or those of the ids given); print how many (or --json).
    Exit status 0, 1 when the gateway refuses or cannot be reached."""
    result = call(args, "jobs.retry", {"ids": args.ids} if args.ids else {})
    print(json.dumps(result, indent=2) if args.json else f"{result['requeued']} job(s) requeued")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    """Cancel queued or running jobs; print how many (or --json). Exit status 0, 1 when the
    gateway refuses or cannot be reached."""
    result = call(args, "jobs.cancel", {"ids": args.ids})
    print(json.dumps(result, indent=2) if args.json else f"{result['cancelled']} job(s) cancelled")
    return 0
