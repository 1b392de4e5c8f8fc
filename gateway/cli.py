"""The `gateway` command: `serve`, `config check`, and verbs that talk to the control socket.

Exit status: 0 success, 1 the operation failed, 2 bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, ControlError, GatewayError

__all__ = ["main"]

_DEFAULT_CONFIG = "./config.toml"


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("GATEWAY_CONFIG") or _DEFAULT_CONFIG)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


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
    from gateway.app import run
    from gateway.logs import configure_logging

    configure_logging(settings.log)
    asyncio.run(run(settings))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"{_config_path(args)}: valid")
    node = settings.node
    print(f"  node: {node.ae_title} on {node.host}:{node.port}, data in {node.data_dir}")
    print(f"  control socket: {settings.control_socket}")
    print(f"  peers: {', '.join(p.name for p in settings.peers) or 'none'}")
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
    return 0


def cmd_studies_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    for name in ("patient_id", "patient_name", "study_date", "accession_number", "modality"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    result = _call(args, "studies.search", params)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    _print_table(
        result["studies"],
        [
            ("study_uid", "STUDY UID"),
            ("patient_id", "PATIENT ID"),
            ("patient_name", "NAME"),
            ("study_date", "DATE"),
            ("accession_number", "ACCESSION"),
            ("modalities", "MOD"),
            ("series", "SERIES"),
            ("instances", "INSTANCES"),
        ],
    )
    return 0


def cmd_studies_show(args: argparse.Namespace) -> int:
    result = _call(args, "studies.get", {"study_uid": args.study_uid})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for key, value in result.items():
        if key != "series_list":
            print(f"{key:26} {'' if value is None else _cell(value)}")
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


def cmd_echo(args: argparse.Namespace) -> int:
    result = _call(args, "echo", {"peer": args.peer})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['peer']}: status 0x{result['status']:04X} in {result['seconds']:.3f} s")
    return 0


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
    echo = add(sub, "echo", cmd_echo, "C-ECHO a configured peer from the gateway")
    echo.add_argument("peer", help="the name of a [[peers]] entry")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.fn(args))
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
