"""Cohort retrieval from the archives: `retrieve submit`, `status`, `retry`, `cancel`, `limits`
(calls on the running gateway)."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.common import call
from gateway.cli.output import print_table
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = [
    "add_commands",
    "cmd_retrieve_cancel",
    "cmd_retrieve_limits",
    "cmd_retrieve_retry",
    "cmd_retrieve_status",
    "cmd_retrieve_submit",
]

_CSV_COLUMNS = ("project", "mrn", "accession", "study_uid", "series_uid", "priority")


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """The `retrieve` commands."""
    retrieve = sub.add_parser("retrieve", help="cohort retrieval from the archives").add_subparsers(
        dest="retrieve_command", required=True, metavar="COMMAND"
    )
    submit = add(
        retrieve, "submit", cmd_retrieve_submit, "request studies: one, or a CSV file of them"
    )
    submit.add_argument("--project", help="the project (a CSV row's own project wins)")
    submit.add_argument("--study-uid", dest="study_uid")
    submit.add_argument("--mrn", help="PatientID, with --accession")
    submit.add_argument("--accession", help="AccessionNumber, with --mrn")
    submit.add_argument("--series-uid", dest="series_uid", help="only this series")
    submit.add_argument("--priority", type=int, choices=range(1, 6), help="1-5, 5 most urgent")
    submit.add_argument(
        "file", nargs="?", metavar="FILE.csv",
        help="columns project, mrn, accession, study_uid, series_uid, priority",
    )  # fmt: skip
    for name, fn, text in (
        ("status", cmd_retrieve_status, "a project's requests and where each is"),
        ("retry", cmd_retrieve_retry, "requeue a project's failed requests"),
        ("cancel", cmd_retrieve_cancel, "stop a project's unfinished requests"),
    ):
        p = add(retrieve, name, fn, text)
        p.add_argument("--project", required=True)
        if name == "status":
            p.add_argument(
                "--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                help="print progress every SECONDS (default 2) until nothing is open",
            )  # fmt: skip
    limits = add(retrieve, "limits", cmd_retrieve_limits, "show or change an archive's limits")
    limits.add_argument("peer", nargs="?", help="the archive whose limits change")
    limits.add_argument("--queries-per-minute", dest="queries_per_minute", type=float)
    limits.add_argument("--moves-per-minute", dest="moves_per_minute", type=float)
    limits.add_argument("--max-concurrent-moves", dest="max_concurrent_moves", type=int)


def _csv_requests(path: Path) -> list[dict[str, str]]:
    """The rows of a cohort CSV as request objects (empty cells left out)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            unknown = [c for c in columns if c not in _CSV_COLUMNS]
            if not columns or unknown:
                raise ConfigError(
                    f"{path}: unknown column(s) {', '.join(unknown) or '(no header)'}; the"
                    f" columns are {', '.join(_CSV_COLUMNS)}"
                )
            rows = []
            for row in reader:
                cells = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k}
                if any(cells.values()):
                    rows.append({k: v for k, v in cells.items() if v})
            return rows
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable CSV file: {exc}") from exc


def cmd_retrieve_submit(args: argparse.Namespace) -> int:
    """Request one study (--study-uid, or --mrn and --accession) or the rows of a CSV file;
    print how many were queued and refused, with each refused row's reason (or --json). Exit
    status 0, 2 for bad options or an unreadable CSV file, 1 when the gateway refuses."""
    single = {
        "study_uid": args.study_uid,
        "mrn": args.mrn,
        "accession": args.accession,
        "series_uid": args.series_uid,
        "priority": args.priority,
    }
    if args.file is not None:
        if any(v is not None for v in single.values()):
            raise ConfigError("give a CSV file or the identifiers of one study, not both")
        requests: list[dict[str, Any]] = list(_csv_requests(Path(args.file)))
    else:
        if args.project is None:
            raise ConfigError("--project is required for a single study")
        if args.study_uid is None and (args.mrn is None or args.accession is None):
            raise ConfigError("give --study-uid, or --mrn and --accession (or a CSV file)")
        requests = [{k: v for k, v in single.items() if v is not None}]
    params: dict[str, Any] = {"requests": requests}
    if args.project:
        params["project"] = args.project
    result = call(args, "retrieve.submit", params)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    counts = result["counts"]
    print(
        f"{len(result['submitted'])} request(s): {counts.get('Queued', 0)} queued,"
        f" {counts.get('QueueFailed', 0)} refused"
    )
    for number, entry in enumerate(result["submitted"], start=1):
        if entry["status"] == "QueueFailed":
            print(f"  row {number}: refused: {entry['reason']}")
        elif entry.get("reason"):
            print(f"  row {number}: {entry['reason']} (request {entry['id']})")
    return 0


def _progress_line(result: dict[str, Any]) -> str:
    counts = result["counts"]
    stored = sum(r["instances"]["stored"] for r in result["requests"])
    expected = sum(r["instances"]["expected"] for r in result["requests"])
    forwarded = sum(r["instances"]["forwarded"] for r in result["requests"])
    parts = "  ".join(f"{name} {count}" for name, count in counts.items())
    return f"{parts}  (instances: {stored}/{expected} stored, {forwarded} forwarded)"


def cmd_retrieve_status(args: argparse.Namespace) -> int:
    """Print a project's counts per status, then a row per request (status, step, study,
    priority, archive, progress, reason), or --json; with --watch a progress line every
    SECONDS until nothing is queued or processing, first. Exit status 0, 1 when the gateway
    refuses or cannot be reached."""
    result = call(args, "retrieve.status", {"project": args.project})
    while args.watch and any(result["counts"][s] for s in ("Queued", "Processing")):
        print(_progress_line(result), flush=True)
        time.sleep(args.watch)
        result = call(args, "retrieve.status", {"project": args.project})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"project {result['project']}: {_progress_line(result)}")
    rows = []
    for r in result["requests"]:
        study = r["study_uid"] or f"{r['mrn']} / {r['accession']}"
        held = r["instances"]
        rows.append(
            {
                **r,
                "study": study + (f" series {r['series_uid']}" if r["series_uid"] else ""),
                "progress": f"{held['stored']}/{held['expected']} -> {held['forwarded']}",
                "reason": r["reason"] or "",
            }
        )
    print_table(
        rows,
        [
            ("id", "ID"),
            ("status", "STATUS"),
            ("step", "STEP"),
            ("study", "STUDY"),
            ("priority", "PRIORITY"),
            ("archive", "ARCHIVE"),
            ("progress", "STORED/LISTED -> FORWARDED"),
            ("reason", "REASON"),
        ],
    )
    return 0


def cmd_retrieve_retry(args: argparse.Namespace) -> int:
    """Requeue a project's failed requests; print how many (or --json). Exit status 0, 1
    when the gateway refuses or cannot be reached."""
    result = call(args, "retrieve.retry", {"project": args.project})
    print(json.dumps(result) if args.json else f"{result['requeued']} request(s) requeued")
    return 0


def cmd_retrieve_cancel(args: argparse.Namespace) -> int:
    """Stop a project's unfinished requests; print how many (or --json). Exit status 0, 1
    when the gateway refuses or cannot be reached."""
    result = call(args, "retrieve.cancel", {"project": args.project})
    print(json.dumps(result) if args.json else f"{result['cancelled']} request(s) cancelled")
    return 0


def cmd_retrieve_limits(args: argparse.Namespace) -> int:
    """Change an archive's limits (with PEER and options), then print each archive's limits
    and the moves running (or --json). Exit status 0, 1 when the gateway refuses."""
    params: dict[str, Any] = {}
    if args.peer:
        params["peer"] = args.peer
    for key in ("queries_per_minute", "moves_per_minute", "max_concurrent_moves"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    result = call(args, "retrieve.limits", params)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, limits in result["archives"].items():
        rate = {k: (v or "unlimited") for k, v in limits.items()}
        print(
            f"{name}: queries/min {rate['queries_per_minute']}, moves/min"
            f" {rate['moves_per_minute']}, concurrent moves {limits['max_concurrent_moves']}"
            f" ({limits['moves_running']} running)"
        )
    return 0
