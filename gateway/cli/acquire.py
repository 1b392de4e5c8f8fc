"""Acquisition, for operators: `devices`, `sequences`, `tasks` (calls on the running gateway),
and `control hash-token` (made here: the gateway need not run).

A device is a scanner with a token; a sequence an acquisition protocol; a task a worklist
item for a device's station AE, started on the connected device and followed live
(docs/acquisition.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.common import call
from gateway.cli.output import print_listing, print_result
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.cli.parser import AddCommand, Subcommands

__all__ = [
    "add_commands",
    "cmd_control_hash_token",
    "cmd_devices_list",
    "cmd_devices_register",
    "cmd_devices_token",
    "cmd_devices_update",
    "cmd_sequences_create",
    "cmd_sequences_list",
    "cmd_tasks_cancel",
    "cmd_tasks_create",
    "cmd_tasks_list",
    "cmd_tasks_show",
    "cmd_tasks_start",
    "cmd_tasks_watch",
]


def add_commands(sub: Subcommands, add: AddCommand) -> None:
    """`control hash-token` and the `devices`, `sequences` and `tasks` commands."""
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


def cmd_devices_register(args: argparse.Namespace) -> int:
    """Register a device; print its id and its token, shown this once (or --json). Exit
    status 0, 1 when the gateway refuses."""
    fields = {k: getattr(args, k) for k in _DEVICE_OPTIONS if getattr(args, k)}
    result = call(args, "devices.register", fields)
    print_result(args, result, f"device {result['id']}\ntoken {result['token']}\n"
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
    """Print the registered devices, one row each: their state (from their live session) and
    whether each has a token (or --json). Exit status 0, 1 when the gateway cannot be reached."""
    columns = [("id", "ID"), ("name", "NAME"), ("modality", "MODALITY"),
               ("station_ae", "STATION AE"), ("site", "SITE"), ("state", "STATE"),
               ("has_token", "TOKEN")]  # fmt: skip
    return print_listing(args, call(args, "devices.list"), "devices", columns)


_DEVICE_OPTIONS = ("name", "modality", "manufacturer", "serial_number", "site", "station_ae")


def cmd_devices_update(args: argparse.Namespace) -> int:
    """Change a device's details; print "device ID updated" (or --json). Exit status 0, 1
    when there is no such device."""
    fields = {k: getattr(args, k) for k in _DEVICE_OPTIONS if getattr(args, k) is not None}
    result = call(args, "devices.update", {"device_id": args.device_id, **fields})
    print_result(args, result, f"device {result['id']} updated")
    return 0


def cmd_devices_token(args: argparse.Namespace) -> int:
    """`rotate-token`: print the device's new token, shown this once; `revoke`: print that
    its token is revoked (or --json). Exit status 0, 1 when there is no such device."""
    if args.devices_command == "rotate-token":
        result = call(args, "devices.rotate_token", {"device_id": args.device_id})
        print_result(args, result, f"token {result['token']}\n(shown once)")
    else:
        result = call(args, "devices.revoke", {"device_id": args.device_id})
        print_result(args, result, f"device {args.device_id}: token revoked")
    return 0


def cmd_sequences_create(args: argparse.Namespace) -> int:
    """Create a sequence, with --file attached inline; print its id and name (or --json).
    Exit status 0, 2 for --parameters that is not a JSON object or a file that cannot be read,
    1 when the gateway refuses."""
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
    result = call(args, "sequences.create", params)
    print_result(args, result, f"sequence {result['id']} ({result['name']})")
    return 0


def cmd_sequences_list(args: argparse.Namespace) -> int:
    """Print the sequences, one row each (or --json). Exit status 0, 1 when the gateway
    cannot be reached."""
    columns = [("id", "ID"), ("name", "NAME"), ("description", "DESCRIPTION")]
    return print_listing(args, call(args, "sequences.list"), "sequences", columns)


def cmd_tasks_create(args: argparse.Namespace) -> int:
    """Create an acquisition task (a worklist item); print its id, accession number and
    study (or --json). Exit status 0, 2 for --parameters that is not a JSON object, 1 when the
    gateway refuses."""
    parameters = _json_object(args.parameters, "--parameters")
    patient = {"id": args.patient_id, "name": args.patient_name or "",
               "birth_date": args.birth_date or "", "sex": args.sex or ""}  # fmt: skip
    params: dict[str, Any] = {"device_id": args.device, "sequence_id": args.sequence,
                              "patient": patient, "parameters": parameters}  # fmt: skip
    if args.scheduled_at:
        params["scheduled_at"] = args.scheduled_at
    result = call(args, "tasks.create", params)
    print_result(
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
    """Print the tasks, one row each, of a device or status if given (or --json). Exit
    status 0, 1 when the gateway cannot be reached."""
    params = {k: v for k, v in (("device_id", args.device), ("status", args.status)) if v}
    return print_listing(args, call(args, "tasks.list", params), "tasks", _TASK_COLUMNS)


def cmd_tasks_show(args: argparse.Namespace) -> int:
    """Print one task's fields, one a line (or --json). Exit status 0, 1 when there is no
    such task."""
    result = call(args, "tasks.get", {"task_id": args.task_id})
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for key, value in result.items():
        print(f"{key:24} {value}")
    return 0


def cmd_tasks_start(args: argparse.Namespace) -> int:
    """Send a NEW task to its connected device; print "task ID: STARTED on DEVICE" (or
    --json). Exit status 0, 1 when the gateway refuses (e.g. the device is not connected)."""
    result = call(args, "tasks.start", {"task_id": args.task_id})
    print_result(args, result, f"task {result['id']}: STARTED on {result['device']}")
    return 0


def cmd_tasks_watch(args: argparse.Namespace) -> int:
    """Print a task's status and progress as they change (with --json the task, as JSON on
    one line), every --interval seconds, until it ends. Exit status 0 when it FINISHED, 1 on
    ERROR."""
    shown = None
    while True:
        task = call(args, "tasks.get", {"task_id": args.task_id})
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
    """End a task that has not finished (ERROR, with the reason); print its status (or
    --json). Exit status 0, 1 when the gateway refuses."""
    params = {"task_id": args.task_id, **({"reason": args.reason} if args.reason else {})}
    result = call(args, "tasks.cancel", params)
    print_result(args, result, f"task {result['id']}: {result['status']} ({result['reason']})")
    return 0


def cmd_control_hash_token(args: argparse.Namespace) -> int:
    """Make an operator token for the TCP control listener: print the token (stored
    nowhere) and the hash line for [control] operator_token_hashes (or --json). Exit status 0."""
    from gateway.control.auth import new_operator_token

    token, line = new_operator_token()
    if args.json:
        print(json.dumps({"token": token, "hash": line}))
        return 0
    print(f"operator token (give it to the operator, it is not stored): {token}")
    print("add its hash to [control] operator_token_hashes in config.toml:")
    print(f'  "{line}"')
    return 0
