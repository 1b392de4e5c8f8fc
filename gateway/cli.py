"""The `gateway` command: `serve`, `config check`, `rules test`, and control socket verbs.

Exit status: 0 success, 1 the operation failed, 2 bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, ControlError, GatewayError
from gateway.rules.engine import RuleSet, fact_text, outcome_report
from gateway.rules.expr import facts_from_dataset

__all__ = ["main"]

_DEFAULT_CONFIG = "./config.toml"


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("GATEWAY_CONFIG") or _DEFAULT_CONFIG)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def _print_listing(
    args: argparse.Namespace, result: dict[str, Any], key: str, columns: list[tuple[str, str]]
) -> int:
    """A listing method's result: as JSON with --json, else as a table of *columns*."""
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        _print_table(result[key], columns)
    return 0


def _print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [
        [("" if r.get(key) is None else _cell(r.get(key))) for key, _ in columns] for r in rows
    ]
    widths = [
        max(len(title), *(len(row[i]) for row in cells)) for i, (_, title) in enumerate(columns)
    ]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{count} B"


# -- commands -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)  # a bad config exits before the heavy imports
    _limit_malloc_arenas()
    from gateway.app import run
    from gateway.logs import configure_logging

    configure_logging(settings.log)
    asyncio.run(run(settings, config_path=_config_path(args)))
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
    settings = _settings(args)
    print(f"{_config_path(args)}: valid")
    node = settings.node
    listeners = [f"{node.host}:{node.port}"] if node.plain else []
    if node.tls_port is not None:
        listeners.append(f"{node.host}:{node.tls_port} (TLS)")
    print(f"  node: {node.ae_title} on {', '.join(listeners)}, data in {node.data_dir}")
    print(f"  control socket: {settings.control_socket}")
    metrics = settings.metrics
    served = f"http://{metrics.host}:{metrics.port}/metrics" if metrics.port is not None else "off"
    print(f"  metrics: {served}")
    print(f"  peers: {', '.join(p.name for p in settings.peers) or 'none'}")
    print(f"  folders: {', '.join(f.name for f in settings.folders) or 'none'}")
    rules = [r.name if r.enabled else f"{r.name} (disabled)" for r in settings.rules]
    print(f"  rules: {', '.join(rules) or 'none'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail (`gateway.audit`), read from the files; the gateway need not run."""
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
    directory = _settings(args).node.data_dir / "audit"
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
    data_dir's files itself, so the gateway need not run."""
    import signal
    from datetime import UTC, datetime

    from gateway.store.backup import backup

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the backup removes what it wrote, then exit status 130

    signal.signal(signal.SIGTERM, interrupted)
    settings = _settings(args)
    report = backup(settings.node.data_dir, Path(args.dest),
                    control_socket=settings.control_socket)  # fmt: skip
    for warning in report.warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    snapshot = datetime.fromtimestamp(report.snapshot_at, UTC).isoformat(timespec="seconds")
    print(f"backup of {report.data_dir} in {report.dest} ({report.seconds:.1f} s)")
    print(f"  index         snapshot at {snapshot}, {_human_bytes(report.index_bytes)}")
    print(f"  instances     {report.instances}, {_human_bytes(report.instance_bytes)}")
    print(f"  other files   {report.files}, {_human_bytes(report.file_bytes)} (uploads, sequences)")
    print(f"  audit files   {report.audit_files}, {_human_bytes(report.audit_bytes)}")
    print(f"  total         {_human_bytes(report.bytes)}")
    if report.replaced or report.removed or report.files_removed:
        print(f"  meanwhile     {report.replaced} instance(s) replaced (newer file copied),"
              f" {report.removed} removed (deleted: dropped from the copy),"
              f" {report.files_removed} other file(s) gone")  # fmt: skip
    if report.not_copied:
        print(f"  not copied    {', '.join(report.not_copied)} (not part of the store)")
    return 0


def _call(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None) -> Any:
    from gateway.control.client import ControlClient

    with ControlClient(_settings(args).control_socket) as client:
        return client.call(method, params)


def cmd_status(args: argparse.Namespace) -> int:
    result = _call(args, "status")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"gateway {result['version']}  {result['ae_title']} port {result['port']}")
    print(f"  uptime        {result['uptime_seconds']:.0f} s")
    print(f"  associations  {result['associations_open']} open")
    print(
        f"  held          {result['studies']} studies, {result['series']} series,"
        f" {result['instances']} instances, {_human_bytes(result['bytes'])}"
    )
    print(f"  disk free     {_human_bytes(result['disk_free_bytes'])}")
    metrics = result.get("metrics")
    if metrics is None:  # a gateway of an earlier version
        return 0
    associations, instances = metrics["associations"], metrics["instances"]
    print(
        f"  since start   {associations['accepted']} associations accepted,"
        f" {sum(associations['rejected'].values())} rejected;"
        f" {instances['received']} instances received"
        f" ({_human_bytes(instances['received_bytes'])}),"
        f" {sum(instances['refused'].values())} refused"
    )
    print("  jobs          " + ", ".join(f"{n} {state}" for state, n in metrics["jobs"].items()))
    retrievals = ", ".join(f"{n} {status}" for status, n in metrics["retrievals"].items())
    print(f"  retrievals    {retrievals}")
    print(f"  metrics       {metrics['endpoint'] or 'off'}")
    return 0


def cmd_studies_list(args: argparse.Namespace) -> int:
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
    _print_listing(args, _call(args, "studies.search", params), "studies", columns)
    return 0


def cmd_studies_show(args: argparse.Namespace) -> int:
    result = _call(args, "studies.get", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for key, value in result.items():
        if key not in ("series_list", "patient_conflicts"):
            print(f"{key:26} {'' if value is None else _cell(value)}")
    for other in result.get("patient_conflicts", []):
        print(
            f"{'patient_conflict':26} same Patient ID as {other['patient_name'] or '(no name)'},"
            f" born {other['patient_birth_date'] or '?'}, sex {other['patient_sex'] or '?'}:"
            f" {other['studies']} studies, e.g. {other['study_uids'][0]}"
        )
    print()
    _print_table(
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
    result = _call(args, "studies.delete", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"deleted study {result['study_uid']} ({result['instances_removed']} instances)")
    return 0


def cmd_studies_force_complete(args: argparse.Namespace) -> int:
    result = _call(args, "studies.force_complete", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"study {result['study_uid']}: {result['completed']} pending rule wait(s) completed")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.state:
        params["state"] = args.state
    result = _call(args, "jobs.list", params)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_table(
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
            ("last_error", "LAST ERROR"),
        ],
    )
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    result = _call(args, "jobs.retry", {"ids": args.ids} if args.ids else {})
    print(json.dumps(result, indent=2) if args.json else f"{result['requeued']} job(s) requeued")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    result = _call(args, "jobs.cancel", {"ids": args.ids})
    print(json.dumps(result, indent=2) if args.json else f"{result['cancelled']} job(s) cancelled")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    result = _call(args, "echo", {"peer": args.peer})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['peer']}: status 0x{result['status']:04X} in {result['seconds']:.3f} s")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the running gateway answers `status` within 5 s and accepts instances; 1
    with the reason otherwise (the container's HEALTHCHECK)."""
    from gateway.control.client import ControlClient

    with ControlClient(_settings(args).control_socket, timeout=_HEALTH_TIMEOUT) as client:
        result = client.call("status")
    if args.json:
        print(json.dumps({"healthy": bool(result["accepting_instances"])}))
    if not result["accepting_instances"]:
        print(
            f"gateway: refusing instances: {_human_bytes(result['disk_free_bytes'])} free,"
            f" below min_free_mb ({_human_bytes(result['min_free_bytes'])})",
            file=sys.stderr,
        )
        return 1
    if not args.json:
        print("healthy")
    return 0


_HEALTH_TIMEOUT = 5.0


# -- rules dry runs -----------------------------------------------------------------------------

_OUTCOME_TEXT = {
    "disabled": "disabled",
    "skipped": "skipped (a discard rule fired before it)",
    "fallback_not_needed": "fallback not needed",
}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _describe_outcome(rule: dict[str, Any]) -> str:
    outcome = rule["outcome"]
    if outcome == "not_fired":
        return f"no (failed: {rule['failed']})"
    if outcome != "fired":
        return _OUTCOME_TEXT.get(outcome, str(outcome))
    details = [
        f"{rule['action']} to {', '.join(rule['targets'])}" if rule["targets"] else rule["action"]
    ]
    required = rule.get("required_series")
    if required is not None:
        details.append(
            "required_series met"
            if required["met"]
            else f"required_series not met: {required['failed']}"
        )
    return f"FIRES ({'; '.join(details)})"


def _print_series_blocks(study_uid: str | None, series: list[dict[str, Any]]) -> None:
    """One block per series: what it is, then each rule's outcome."""
    for index, entry in enumerate(series):
        if index:
            print()
        print(f"series {entry['series_uid']}")
        fields = [
            ("study", entry.get("study_uid", study_uid)),
            ("description", entry["series_description"]),
            ("modality", entry["modality"]),
            ("instances", entry["instances"]),
        ]
        if "file" in entry:
            fields.append(("first file", entry["file"]))
        for label, value in fields:
            print(f"  {label:12} {'(none)' if value is None else value}")
        print("  rules")
        if not entry["rules"]:
            print("    (no rules configured)")
        width = max((len(rule["name"]) for rule in entry["rules"]), default=0)
        for rule in entry["rules"]:
            print(f"    {rule['name']:{width}}  {_describe_outcome(rule)}")


@dataclass
class _Series:
    """What the dry run keeps of one series: its first instance's facts and a count."""

    study_uid: str
    series_uid: str
    series_number: float
    first: tuple[int, int, str]  # (no instance number, instance number, path): lowest is first
    file: Path
    facts: dict[str, object]
    instances: int = 1


def _walk(root: Path) -> Iterator[Path]:
    """Every file under *root* (or *root* itself), in a stable order; symlinked dirs not entered."""
    if not root.is_dir():
        yield root
        return
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield Path(directory) / name


def _read_header(path: Path, keywords: list[str]) -> Dataset | None:
    """The dataset of a DICOM Part 10 file without its pixels, or None for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd values in a scanned file are not our concern
            return dcmread(path, stop_before_pixels=True, specific_tags=keywords)
    except Exception:  # not DICOM, truncated, unreadable: skipped and counted
        return None


def _first_key(ds: Dataset, path: Path) -> tuple[int, int, str]:
    try:
        return (0, int(ds.get("InstanceNumber")), str(path))
    except (TypeError, ValueError, OverflowError):
        return (1, 0, str(path))


def _series_number(ds: Dataset) -> float:
    try:
        return float(int(ds.get("SeriesNumber")))
    except (TypeError, ValueError, OverflowError):
        return float("inf")


def _scan(
    root: Path, ruleset: RuleSet, connection: dict[str, str]
) -> tuple[int, int, dict[str, _Series]]:
    """Files looked at, files skipped, and each series found with its first instance's facts."""
    keywords = sorted(ruleset.keywords | {"InstanceNumber", "SeriesNumber"})
    found: dict[str, _Series] = {}
    files = skipped = 0
    for path in _walk(root):
        files += 1
        ds = _read_header(path, keywords)
        series_uid = fact_text(ds.get("SeriesInstanceUID")) if ds is not None else None
        if ds is None or series_uid is None:
            skipped += 1
            continue
        key = _first_key(ds, path)
        known = found.get(series_uid)
        if known is not None:
            known.instances += 1
            if key >= known.first:
                continue
        facts = facts_from_dataset(ds, ruleset.keywords, connection)
        sample = _Series(
            study_uid=fact_text(facts.get("StudyInstanceUID")) or "",
            series_uid=series_uid,
            series_number=_series_number(ds),
            first=key,
            file=path,
            facts=facts,
            instances=known.instances if known is not None else 1,
        )
        found[series_uid] = sample
    return files, skipped, found


def cmd_rules_test(args: argparse.Namespace) -> int:
    ruleset = RuleSet(_settings(args).rules)
    root = Path(args.path)
    try:
        if root.is_dir():
            os.scandir(root).close()
        else:
            with root.open("rb"):
                pass
    except OSError as exc:
        raise GatewayError(f"cannot read {root}: {exc.strerror or exc}") from exc
    connection = {
        fact: value
        for fact, value in (
            ("CallingAE", args.calling_ae),
            ("CalledAE", args.called_ae),
            ("PeerAddress", args.peer_address),
        )
        if value is not None
    }
    files, skipped, found = _scan(root, ruleset, connection)
    ordered = sorted(found.values(), key=lambda s: (s.study_uid, s.series_number, s.series_uid))
    descriptions: dict[str, list[str]] = {}
    for sample in ordered:
        descriptions.setdefault(sample.study_uid, []).append(
            fact_text(sample.facts.get("SeriesDescription")) or ""
        )
    series: list[dict[str, Any]] = [
        {
            "study_uid": sample.study_uid or None,
            "series_uid": sample.series_uid,
            "series_description": fact_text(sample.facts.get("SeriesDescription")),
            "modality": fact_text(sample.facts.get("Modality")),
            "instances": sample.instances,
            "file": str(sample.file),
            "rules": [
                outcome_report(outcome, descriptions[sample.study_uid])
                for outcome in ruleset.explain(sample.facts)
            ],
        }
        for sample in ordered
    ]
    if args.json:
        report = {"path": str(root), "files": files, "skipped": skipped, "series": series}
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    _print_series_blocks(None, series)
    if series:
        print()
    instances = sum(sample.instances for sample in ordered)
    print(
        f"{_count(files, 'file')}: {_count(instances, 'DICOM instance')} in {len(series)} series,"
        f" {skipped} skipped (not DICOM, or without a SeriesInstanceUID)"
    )
    return 0


def cmd_rules_test_study(args: argparse.Namespace) -> int:
    result = _call(args, "rules.test", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    _print_series_blocks(result["study_uid"], result["series"])
    return 0


def cmd_rules_reload(args: argparse.Namespace) -> int:
    result = _call(args, "rules.reload", {})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    rules = ", ".join(result["rules"]) or "none"
    print(f"reloaded {', '.join(result['applied'])}; rules now: {rules}")
    if result["restart_needed"]:
        print(f"changed but applied only at the next start: {', '.join(result['restart_needed'])}")
    return 0


# -- retrieval ----------------------------------------------------------------------------------

_CSV_COLUMNS = ("project", "mrn", "accession", "study_uid", "series_uid", "priority")


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
    result = _call(args, "retrieve.submit", params)
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
    result = _call(args, "retrieve.status", {"project": args.project})
    while args.watch and any(result["counts"][s] for s in ("Queued", "Processing")):
        print(_progress_line(result), flush=True)
        time.sleep(args.watch)
        result = _call(args, "retrieve.status", {"project": args.project})
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
    _print_table(
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
    result = _call(args, "retrieve.retry", {"project": args.project})
    print(json.dumps(result) if args.json else f"{result['requeued']} request(s) requeued")
    return 0


def cmd_retrieve_cancel(args: argparse.Namespace) -> int:
    result = _call(args, "retrieve.cancel", {"project": args.project})
    print(json.dumps(result) if args.json else f"{result['cancelled']} request(s) cancelled")
    return 0


def cmd_retrieve_limits(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.peer:
        params["peer"] = args.peer
    for key in ("queries_per_minute", "moves_per_minute", "max_concurrent_moves"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    result = _call(args, "retrieve.limits", params)
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


# -- acquisition (operators) ---------------------------------------------------------------------


def _print_result(args: argparse.Namespace, result: Any, text: str) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else text)


def cmd_devices_register(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in _DEVICE_OPTIONS if getattr(args, k)}
    result = _call(args, "devices.register", fields)
    _print_result(args, result, f"device {result['id']}\ntoken {result['token']}\n"
                  "(the token is shown once: give it to the device now)")  # fmt: skip
    return 0


def _json_object(text: str | None, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


def cmd_devices_list(args: argparse.Namespace) -> int:
    columns = [("id", "ID"), ("name", "NAME"), ("modality", "MODALITY"),
               ("station_ae", "STATION AE"), ("site", "SITE"), ("has_token", "TOKEN")]  # fmt: skip
    return _print_listing(args, _call(args, "devices.list"), "devices", columns)


_DEVICE_OPTIONS = ("name", "modality", "manufacturer", "serial_number", "site", "station_ae")


def cmd_devices_update(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in _DEVICE_OPTIONS if getattr(args, k) is not None}
    result = _call(args, "devices.update", {"device_id": args.device_id, **fields})
    _print_result(args, result, f"device {result['id']} updated")
    return 0


def cmd_devices_token(args: argparse.Namespace) -> int:
    if args.devices_command == "rotate-token":
        result = _call(args, "devices.rotate_token", {"device_id": args.device_id})
        _print_result(args, result, f"token {result['token']}\n(shown once)")
    else:
        result = _call(args, "devices.revoke", {"device_id": args.device_id})
        _print_result(args, result, f"device {args.device_id}: token revoked")
    return 0


def cmd_sequences_create(args: argparse.Namespace) -> int:
    parameters = _json_object(args.parameters, "--parameters")
    params: dict[str, Any] = {
        "name": args.name,
        "description": args.description or "",
        "parameters": parameters,
    }
    if args.file:
        import base64
        import hashlib

        path = Path(args.file)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        params["file"] = {
            "name": path.name,
            "data": base64.b64encode(content).decode(),
            "sha256": hashlib.sha256(content).hexdigest(),
        }
    result = _call(args, "sequences.create", params)
    _print_result(args, result, f"sequence {result['id']} ({result['name']})")
    return 0


def cmd_sequences_list(args: argparse.Namespace) -> int:
    columns = [("id", "ID"), ("name", "NAME"), ("description", "DESCRIPTION")]
    return _print_listing(args, _call(args, "sequences.list"), "sequences", columns)


def cmd_tasks_create(args: argparse.Namespace) -> int:
    parameters = _json_object(args.parameters, "--parameters")
    patient = {"id": args.patient_id, "name": args.patient_name or "",
               "birth_date": args.birth_date or "", "sex": args.sex or ""}  # fmt: skip
    params: dict[str, Any] = {"device_id": args.device, "sequence_id": args.sequence,
                              "patient": patient, "parameters": parameters}  # fmt: skip
    if args.scheduled_at:
        params["scheduled_at"] = args.scheduled_at
    result = _call(args, "tasks.create", params)
    _print_result(
        args, result,
        f"task {result['id']}: accession {result['accession_number']},"
        f" study {result['study_uid']}",
    )  # fmt: skip
    return 0


_TASK_COLUMNS = [
    ("id", "ID"), ("status", "STATUS"), ("progress", "%"), ("device", "DEVICE"),
    ("patient_id", "PATIENT"), ("sequence", "SEQUENCE"), ("scheduled_date", "DATE"),
    ("accession_number", "ACCESSION"), ("reason", "REASON"),
]  # fmt: skip


def cmd_tasks_list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("device_id", args.device), ("status", args.status)) if v}
    return _print_listing(args, _call(args, "tasks.list", params), "tasks", _TASK_COLUMNS)


def cmd_tasks_show(args: argparse.Namespace) -> int:
    result = _call(args, "tasks.get", {"task_id": args.task_id})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for key, value in result.items():
        print(f"{key:24} {value}")
    return 0


def cmd_tasks_start(args: argparse.Namespace) -> int:
    result = _call(args, "tasks.start", {"task_id": args.task_id})
    _print_result(args, result, f"task {result['id']}: STARTED on {result['device']}")
    return 0


def cmd_tasks_watch(args: argparse.Namespace) -> int:
    """Print a task's status and progress as they change, until it ends (exit 1 on ERROR)."""
    shown = None
    while True:
        task = _call(args, "tasks.get", {"task_id": args.task_id})
        line = f"{task['status']:10} {task['progress']:3d}%" + (
            f"  {task['reason']}" if task["reason"] else ""
        )
        if line != shown:
            print(json.dumps(task) if args.json else line, flush=True)
            shown = line
        if task["status"] in ("FINISHED", "ERROR"):
            return 0 if task["status"] == "FINISHED" else 1
        time.sleep(args.interval)


def cmd_tasks_cancel(args: argparse.Namespace) -> int:
    params = {"task_id": args.task_id, **({"reason": args.reason} if args.reason else {})}
    result = _call(args, "tasks.cancel", params)
    _print_result(args, result, f"task {result['id']}: {result['status']} ({result['reason']})")
    return 0


def cmd_control_hash_token(args: argparse.Namespace) -> int:
    from gateway.control.auth import new_operator_token

    token, line = new_operator_token()
    if args.json:
        print(json.dumps({"token": token, "hash": line}))
        return 0
    print(f"operator token (give it to the operator, it is not stored): {token}")
    print("add its hash to [control] operator_token_hashes in config.toml:")
    print(f'  "{line}"')
    return 0


def _add_acquisition(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    control = sub.add_parser("control", help="the control socket").add_subparsers(
        dest="control_command", required=True, metavar="COMMAND"
    )
    add(control, "hash-token", cmd_control_hash_token, "make an operator token and its hash")
    devices = sub.add_parser("devices", help="scanners and their tokens").add_subparsers(
        dest="devices_command", required=True, metavar="COMMAND"
    )
    register = add(
        devices, "register", cmd_devices_register, "register a device (token shown once)"
    )
    register.add_argument("--name", required=True)
    register.add_argument("--modality", required=True)
    for option in ("manufacturer", "serial-number", "site", "station-ae"):
        register.add_argument(f"--{option}", dest=option.replace("-", "_"))
    add(devices, "list", cmd_devices_list, "registered devices")
    update = add(devices, "update", cmd_devices_update, "change a device's details")
    update.add_argument("device_id")
    for option in ("name", "modality", "manufacturer", "serial-number", "site", "station-ae"):
        update.add_argument(f"--{option}", dest=option.replace("-", "_"))
    for name, text in (("rotate-token", "give a device a new token"),
                       ("revoke", "revoke a device's token")):  # fmt: skip
        p = add(devices, name, cmd_devices_token, text)
        p.add_argument("device_id")
    sequences = sub.add_parser("sequences", help="acquisition protocols").add_subparsers(
        dest="sequences_command", required=True, metavar="COMMAND"
    )
    create = add(sequences, "create", cmd_sequences_create, "create a sequence")
    create.add_argument("--name", required=True)
    create.add_argument("--description")
    create.add_argument("--parameters", help="a JSON object")
    create.add_argument("--file", metavar="PATH", help="a protocol file to attach (sent inline)")
    add(sequences, "list", cmd_sequences_list, "sequences")
    tasks = sub.add_parser("tasks", help="acquisition tasks").add_subparsers(
        dest="tasks_command", required=True, metavar="COMMAND"
    )
    task = add(tasks, "create", cmd_tasks_create, "create an acquisition task (a worklist item)")
    task.add_argument("--device", required=True, help="device id")
    task.add_argument("--sequence", required=True, help="sequence id")
    task.add_argument("--patient-id", dest="patient_id", required=True)
    task.add_argument("--patient-name", dest="patient_name", help="DICOM PN, e.g. Doe^Jane")
    task.add_argument("--birth-date", dest="birth_date", help="YYYYMMDD")
    task.add_argument("--sex", choices=["M", "F", "O"])
    task.add_argument("--scheduled-at", dest="scheduled_at", help="ISO date-time (default now)")
    task.add_argument("--parameters", help="a JSON object")
    listing = add(tasks, "list", cmd_tasks_list, "tasks")
    listing.add_argument("--device")
    listing.add_argument("--status", choices=["NEW", "STARTED", "INPROGRESS", "FINISHED", "ERROR"])
    show = add(tasks, "show", cmd_tasks_show, "one task")
    show.add_argument("task_id")
    start = add(tasks, "start", cmd_tasks_start, "send a NEW task to its (connected) device")
    start.add_argument("task_id")
    watch = add(tasks, "watch", cmd_tasks_watch, "follow a task's progress until it ends")
    watch.add_argument("task_id")
    watch.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    cancel = add(tasks, "cancel", cmd_tasks_cancel, "end a task that has not finished (ERROR)")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason")


# -- parser -------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--config and --json; a subcommand's copies must not overwrite values given before it."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS if suppress else None,
        help=f"config file (default: $GATEWAY_CONFIG or {_DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON for scripts",
    )


def _parser() -> argparse.ArgumentParser:
    # Both `gateway --config X status` and `gateway status --config X` work.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="gateway", description="DICOM gateway: node, router and retrieval in one process."
    )
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(fn=fn)
        return p

    add(sub, "serve", cmd_serve, "run the gateway in the foreground")
    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    add(config, "check", cmd_config_check, "validate the config without starting")
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
    add(sub, "health", cmd_health, "exit 0 if the running gateway answers and accepts instances")
    echo = add(sub, "echo", cmd_echo, "C-ECHO a configured peer from the gateway")
    echo.add_argument("peer", help="the name of a [[peers]] entry")
    rules = sub.add_parser("rules", help="routing rules: dry runs, reload").add_subparsers(
        dest="rules_command", required=True, metavar="COMMAND"
    )
    test = add(
        rules, "test", cmd_rules_test, "which rules fire for DICOM files (no gateway needed)"
    )
    test.add_argument("path", metavar="PATH", help="a DICOM file, or a folder searched recursively")
    test.add_argument("--calling-ae", dest="calling_ae", metavar="AE", help="the CallingAE fact")
    test.add_argument("--called-ae", dest="called_ae", metavar="AE", help="the CalledAE fact")
    test.add_argument(
        "--peer-address", dest="peer_address", metavar="ADDR", help="the PeerAddress fact"
    )
    test_study = add(
        rules, "test-study", cmd_rules_test_study, "which rules fire for a stored study"
    )
    test_study.add_argument("study_uid")
    _add_retrieve(sub, add)
    _add_acquisition(sub, add)
    add(
        rules,
        "reload",
        cmd_rules_reload,
        "apply the config file's rules, peers, folders and webhooks (a bad file is refused)",
    )
    return parser


def _add_retrieve(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # a reader that went away shows here, not at the exit
        return code
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"gateway: {exc.message} (error {exc.code})", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gateway audit | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
