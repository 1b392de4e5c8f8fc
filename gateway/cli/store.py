"""What the gateway holds: `status`, `audit`, `backup`, and `studies list/show/delete/
force-complete`.

`audit` and `backup` read data_dir's files themselves (the gateway need not run); the others
are calls on the running gateway's control socket.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.common import call, settings
from gateway.cli.output import cell_text, human_bytes, print_listing, print_result, print_table

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = [
    "add_commands",
    "cmd_audit",
    "cmd_backup",
    "cmd_status",
    "cmd_studies_delete",
    "cmd_studies_force_complete",
    "cmd_studies_list",
    "cmd_studies_show",
]


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """`status`, `audit`, `backup` and the `studies` commands."""
    add(sub, "status", cmd_status, "what the running gateway holds and does")
    audit = add(sub, "audit", cmd_audit, "the audit trail (DICOM PS3.15 A.5 / IHE ATNA events)")
    audit.add_argument("--since", help="ISO 8601 date or time (UTC unless it says)")
    audit.add_argument("--event", help="an event name (Query, Import...) or its code (110112)")
    audit.add_argument("--study", help="a Study Instance UID")
    backup = add(sub, "backup", cmd_backup, "copy the store, even while it runs, into DEST")
    backup.add_argument("dest", metavar="DEST", help="a new or empty directory, outside data_dir")
    studies = sub.add_parser("studies", help="stored studies").add_subparsers(
        dest="studies_command", required=True, metavar="COMMAND"
    )
    listing = add(studies, "list", cmd_studies_list, "search stored studies")
    listing.add_argument("--patient-id", dest="patient_id")
    listing.add_argument("--patient-name", dest="patient_name", help="wildcards * and ? allowed")
    listing.add_argument("--date", dest="study_date", help="YYYYMMDD or a range A-B")
    listing.add_argument("--accession", dest="accession_number")
    listing.add_argument("--modality")
    listing.add_argument("--limit", type=int, default=100)
    show = add(studies, "show", cmd_studies_show, "one study and its series")
    show.add_argument("study_uid")
    delete = add(studies, "delete", cmd_studies_delete, "delete a study from the store")
    delete.add_argument("study_uid")
    force = add(
        studies, "force-complete", cmd_studies_force_complete, "complete a study's rule waits now"
    )
    force.add_argument("study_uid")


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running gateway's version, uptime, open associations, what it holds, the
    disk free and (from a gateway that reports them) the counts since its start; with --json
    the `status` method's result. Exit status 0, 1 when the gateway cannot be reached."""
    result = call(args, "status")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"gateway {result['version']}  {result['ae_title']} port {result['port']}")
    print(f"  uptime        {result['uptime_seconds']:.0f} s")
    print(f"  associations  {result['associations_open']} open")
    print(
        f"  held          {result['studies']} studies, {result['series']} series,"
        f" {result['instances']} instances, {human_bytes(result['bytes'])}"
    )
    print(f"  disk free     {human_bytes(result['disk_free_bytes'])}")
    metrics = result.get("metrics")
    if metrics is None:  # a gateway of an earlier version
        return 0
    associations, instances = metrics["associations"], metrics["instances"]
    print(
        f"  since start   {associations['accepted']} associations accepted,"
        f" {sum(associations['rejected'].values())} rejected;"
        f" {instances['received']} instances received"
        f" ({human_bytes(instances['received_bytes'])}),"
        f" {sum(instances['refused'].values())} refused"
    )
    print("  jobs          " + ", ".join(f"{n} {state}" for state, n in metrics["jobs"].items()))
    retrievals = ", ".join(f"{n} {status}" for status, n in metrics["retrievals"].items())
    print(f"  retrievals    {retrievals}")
    print(f"  metrics       {metrics['endpoint'] or 'off'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail (`gateway.audit`), read from the files; the gateway need not run.

    Prints one line per record (time, event code, event, outcome, who, address, what,
    studies), or with --json one JSON object per line. Exit status 0, 2 for a --since that is
    not ISO 8601.
    """
    from datetime import UTC, datetime

    from gateway.audit import read_records

    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            print(f"gateway: --since {args.since!r} is not an ISO 8601 date or time",
                  file=sys.stderr)  # fmt: skip
            return 2
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
    directory = settings(args).node.data_dir / "audit"
    for entry in read_records(directory, since=since, event=args.event, study=args.study):
        if args.json:
            print(json.dumps(entry, ensure_ascii=False))
            continue
        who = entry.get("calling_ae") or entry.get("role") or ""
        where = entry.get("address") or ""
        what = entry.get("what") or entry.get("service") or entry.get("level") or ""
        studies = ",".join(entry.get("studies", []))
        line = (
            f"{entry['time']}  {entry.get('code') or '-':>6}  {entry['event']:<28}"
            f" {entry['outcome']:<8} {who:<16} {where:<15} {what} {studies}"
        )
        print(line.rstrip())
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the store into DEST while the gateway runs (`gateway.store.backup`); it reads
    data_dir's files itself, so the gateway need not run.

    Prints what was copied (index, instances, other files, audit files, sizes, what changed
    meanwhile), or with --json the report; warnings go to stderr. Exit status 0, 1 when the
    backup failed, 130 when interrupted (SIGTERM or Ctrl-C: what it wrote is removed).
    """
    import signal
    from datetime import UTC, datetime

    from gateway.store.backup import backup

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the backup removes what it wrote, then exit status 130

    signal.signal(signal.SIGTERM, interrupted)
    configured = settings(args)
    report = backup(configured.node.data_dir, Path(args.dest),
                    control_socket=configured.control_socket)  # fmt: skip
    for warning in report.warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    snapshot = datetime.fromtimestamp(report.snapshot_at, UTC).isoformat(timespec="seconds")
    print(f"backup of {report.data_dir} in {report.dest} ({report.seconds:.1f} s)")
    print(f"  index         snapshot at {snapshot}, {human_bytes(report.index_bytes)}")
    print(f"  instances     {report.instances}, {human_bytes(report.instance_bytes)}")
    print(f"  other files   {report.files}, {human_bytes(report.file_bytes)} (uploads, sequences)")
    print(f"  audit files   {report.audit_files}, {human_bytes(report.audit_bytes)}")
    print(f"  total         {human_bytes(report.bytes)}")
    if report.replaced or report.removed or report.files_removed:
        print(f"  meanwhile     {report.replaced} instance(s) replaced (newer file copied),"
              f" {report.removed} removed (deleted: dropped from the copy),"
              f" {report.files_removed} other file(s) gone")  # fmt: skip
    if report.not_copied:
        print(f"  not copied    {', '.join(report.not_copied)} (not part of the store)")
    return 0


def cmd_studies_list(args: argparse.Namespace) -> int:
    """Print the stored studies matching the options, one row each (or --json). Exit status
    0, 1 for a refused search or an unreachable gateway."""
    params: dict[str, Any] = {"limit": args.limit}
    for name in ("patient_id", "patient_name", "study_date", "accession_number", "modality"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    columns = [
        ("study_uid", "STUDY UID"),
        ("patient_id", "PATIENT ID"),
        ("patient_name", "NAME"),
        ("study_date", "DATE"),
        ("accession_number", "ACCESSION"),
        ("modalities", "MOD"),
        ("series", "SERIES"),
        ("instances", "INSTANCES"),
    ]
    print_listing(args, call(args, "studies.search", params), "studies", columns)
    return 0


def cmd_studies_show(args: argparse.Namespace) -> int:
    """Print one study's attributes, any other patient with its Patient ID, then a table of
    its series (or --json). Exit status 0, 1 when there is no such study."""
    result = call(args, "studies.get", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for key, value in result.items():
        if key not in ("series_list", "patient_conflicts"):
            print(f"{key:26} {'' if value is None else cell_text(value)}")
    for other in result.get("patient_conflicts", []):
        print(
            f"{'patient_conflict':26} same Patient ID as {other['patient_name'] or '(no name)'},"
            f" born {other['patient_birth_date'] or '?'}, sex {other['patient_sex'] or '?'}:"
            f" {other['studies']} studies, e.g. {other['study_uids'][0]}"
        )
    print()
    print_table(
        result["series_list"],
        [
            ("series_uid", "SERIES UID"),
            ("modality", "MOD"),
            ("series_number", "NUMBER"),
            ("series_description", "DESCRIPTION"),
            ("instances", "INSTANCES"),
        ],
    )
    return 0


def cmd_studies_delete(args: argparse.Namespace) -> int:
    """Remove a study from the store; print "deleted study UID (N instances)" (or --json).
    Exit status 0, 1 when there is no such study."""
    result = call(args, "studies.delete", {"study_uid": args.study_uid})
    text = f"deleted study {result['study_uid']} ({result['instances_removed']} instances)"
    print_result(args, result, text)
    return 0


def cmd_studies_force_complete(args: argparse.Namespace) -> int:
    """Complete a study's pending rule waits now; print how many (or --json). Exit status 0,
    1 when the gateway refuses or cannot be reached."""
    result = call(args, "studies.force_complete", {"study_uid": args.study_uid})
    text = f"study {result['study_uid']}: {result['completed']} pending rule wait(s) completed"
    print_result(args, result, text)
    return 0
