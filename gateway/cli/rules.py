"""The routing rules: `rules test` (DICOM files on disk, no gateway needed), `rules test-study`
(a stored study, on the running gateway) and `rules reload`.

Both dry runs print one block per series: what it is, then each rule's outcome, evaluated on
the facts of the series' first instance (`gateway.rules.facts`), as the gateway would.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from gateway.cli.common import call, settings
from gateway.errors import GatewayError
from gateway.rules.engine import RuleSet, fact_text, outcome_report
from gateway.rules.expr import facts_from_dataset
from gateway.rules.facts import (
    ORDER_KEYWORDS,
    connection_facts,
    first_instance_key,
    read_header,
    series_number_key,
)

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = ["add_commands", "cmd_rules_reload", "cmd_rules_test", "cmd_rules_test_study"]


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """The `rules` commands."""
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
    add(
        rules,
        "reload",
        cmd_rules_reload,
        "apply the config file's rules, peers, folders and webhooks (a bad file is refused)",
    )


def cmd_rules_test(args: argparse.Namespace) -> int:
    """Dry run of the configured rules on the DICOM files under PATH (or PATH itself).

    Prints a block per series found (study, description, modality, instance count, its first
    file, each rule's outcome), then a count of the files, instances and files skipped (not
    DICOM, or without a SeriesInstanceUID); with --json one report object. Exit status 0, 1
    when PATH cannot be read, 2 for a bad config.
    """
    ruleset = RuleSet(settings(args).rules)
    root = Path(args.path)
    try:
        if root.is_dir():
            os.scandir(root).close()
        else:
            with root.open("rb"):
                pass
    except OSError as exc:
        raise GatewayError(f"cannot read {root}: {exc.strerror or exc}") from exc
    connection = connection_facts(args.calling_ae, args.called_ae, args.peer_address)
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
    """Dry run of the running gateway's rules on a stored study (the `rules.test` method):
    a block per series as `rules test` prints, or --json. Exit status 0, 1 when there is no
    such study or the gateway cannot be reached."""
    result = call(args, "rules.test", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    _print_series_blocks(result["study_uid"], result["series"])
    return 0


def cmd_rules_reload(args: argparse.Namespace) -> int:
    """Apply the config file's rules, peers, folders and webhooks to the running gateway;
    print what was reloaded, the rules now in force and what changed but waits for a restart
    (or --json). Exit status 0, 1 when the file does not load (nothing is applied)."""
    result = call(args, "rules.reload", {})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    rules = ", ".join(result["rules"]) or "none"
    print(f"reloaded {', '.join(result['applied'])}; rules now: {rules}")
    if result["restart_needed"]:
        print(f"changed but applied only at the next start: {', '.join(result['restart_needed'])}")
    return 0


# -- printing -----------------------------------------------------------------------------------

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


# -- scanning files -----------------------------------------------------------------------------


@dataclass
class _Series:
    """What the dry run keeps of one series: its first instance's facts and a count."""

    study_uid: str
    series_uid: str
    series_number: float
    first: tuple[int, int, str]  # `first_instance_key`: the lowest is first
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


def _read_header(path: Path, keywords: frozenset[str]) -> Dataset | None:
    """`read_header` of a file found on disk, or None for anything that is not DICOM."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd values in a scanned file are not our concern
            return read_header(path, keywords)
    except Exception:  # not DICOM, truncated, unreadable: skipped and counted
        return None


def _scan(
    root: Path, ruleset: RuleSet, connection: dict[str, str]
) -> tuple[int, int, dict[str, _Series]]:
    """Files looked at, files skipped, and each series found with its first instance's facts."""
    keywords = ruleset.keywords | ORDER_KEYWORDS
    found: dict[str, _Series] = {}
    files = skipped = 0
    for path in _walk(root):
        files += 1
        ds = _read_header(path, keywords)
        series_uid = fact_text(ds.get("SeriesInstanceUID")) if ds is not None else None
        if ds is None or series_uid is None:
            skipped += 1
            continue
        key = first_instance_key(ds, path)
        known = found.get(series_uid)
        if known is not None:
            known.instances += 1
            if key >= known.first:
                continue
        facts = facts_from_dataset(ds, ruleset.keywords, connection)
        sample = _Series(
            study_uid=fact_text(facts.get("StudyInstanceUID")) or "",
            series_uid=series_uid,
            series_number=series_number_key(ds),
            first=key,
            file=path,
            facts=facts,
            instances=known.instances if known is not None else 1,
        )
        found[series_uid] = sample
    return files, skipped, found
