"""A device's state follows its live session, over real TCP (TLS, with the CA of
`scripts/make-certs`): the gateway ending a session makes the device OFFLINE at once; one
session per device (a second login replaces the first, and a device that reconnects is told its
running task again); cancelling a running task tells the device and frees it; reports and
uploads only for a running task."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from gateway.control.auth import new_operator_token
from gateway.errors import ControlError
from tests.conftest import GatewayProcess, free_port, make_pki
from tests.control.test_tcp import Line

LINE_LIMIT = 4096


@pytest.fixture
def tls_gateway(gateway_factory: Any, tmp_path: Path) -> tuple[GatewayProcess, Callable[[], Line]]:
    """A gateway whose TCP control listener speaks TLS with a certificate signed by a CA made
    by `scripts/make-certs`, and a way to connect to it trusting that CA (as a device does)."""
    pki = make_pki(tmp_path / "tls", ("gateway",))
    cert, key = pki.pair("gateway")
    _, hashed = new_operator_token()
    port = free_port()
    gw = gateway_factory(control={"tcp_port": port, "operator_token_hashes": [hashed],
                                  "tls_cert": str(cert), "tls_key": str(key),
                                  "max_line_bytes": LINE_LIMIT,
                                  "device_heartbeat_timeout": 1.5})  # fmt: skip
    context = ssl.create_default_context(cafile=str(pki.ca))

    def connect() -> Line:
        return Line(port, context)

    return gw, connect


def login(connect: Callable[[], Line], device: dict[str, Any]) -> Line:
    line = connect()
    answer = line.call("auth.login", {"device_id": device["id"], "token": device["token"]})
    assert answer["result"] == {"role": "device", "device_id": device["id"],
                                "max_line_bytes": LINE_LIMIT}, answer  # fmt: skip
    return line


def state(gw: GatewayProcess, device: dict[str, Any]) -> str:
    value: str = gw.call("devices.get", {"device_id": device["id"]})["state"]
    return value


def listed_state(gw: GatewayProcess, device: dict[str, Any]) -> str:
    """The device's state as `gateway devices list --json` prints it."""
    rows = json.loads(gw.cli("devices", "list", "--json").stdout)["devices"]
    return str(next(d["state"] for d in rows if d["id"] == device["id"]))


def soon(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_every_gateway_side_close_makes_the_device_offline_at_once(
    tls_gateway: tuple[GatewayProcess, Callable[[], Line]],
) -> None:
    """Heartbeat timeout, an oversized line, a revoked and a rotated token: the device is
    OFFLINE in `devices.get` and `gateway devices list` without the device closing its side
    (each client here keeps its socket open and unread until the checks are done; a TLS close
    waits for the peer's answer, which must not hold the state)."""
    gw, connect = tls_gateway
    ct = gw.call("devices.register", {"name": "CT 1", "modality": "CT"})
    seq = gw.call("sequences.create", {"name": "S"})
    task = gw.call("tasks.create", {"device_id": ct["id"], "sequence_id": seq["id"],
                                    "patient": {"id": "P1"}})  # fmt: skip

    # Silent past device_heartbeat_timeout (1.5 s).
    silent = login(connect, ct)
    assert state(gw, ct) == "ONLINE" and listed_state(gw, ct) == "ONLINE"
    soon(lambda: state(gw, ct) == "OFFLINE", 4.0, "a silent device stayed ONLINE")
    assert listed_state(gw, ct) == "OFFLINE"
    with pytest.raises(ControlError, match="device 'CT 1' is offline") as offline:
        gw.call("tasks.start", {"task_id": task["id"]})
    assert offline.value.code == -32013 and offline.value.data["state"] == "OFFLINE"
    assert silent.closed_by_gateway() == {"code": "silent", "reason": "silent for 1.5 s"}

    # An oversized line: refused, and OFFLINE by the time the refusal is read.
    oversized = login(connect, ct)
    answer = oversized.send_raw(b'{"x": "' + b"a" * (LINE_LIMIT + 10) + b'"}\n')
    assert answer["error"]["code"] == -32600
    soon(lambda: state(gw, ct) == "OFFLINE", 1.0, "stayed ONLINE after an oversized line")
    assert listed_state(gw, ct) == "OFFLINE"
    assert oversized.closed_by_gateway()["code"] == "line_too_long"

    # A revoked token: OFFLINE when devices.revoke answers (no waiting).
    revoked = login(connect, ct)
    gw.call("devices.revoke", {"device_id": ct["id"]})
    assert state(gw, ct) == "OFFLINE" and listed_state(gw, ct) == "OFFLINE"
    assert revoked.closed_by_gateway() == {"code": "token_revoked",
                                           "reason": "device token revoked"}  # fmt: skip

    # A rotated token: the same.
    ct["token"] = gw.call("devices.rotate_token", {"device_id": ct["id"]})["token"]
    rotated = login(connect, ct)
    assert state(gw, ct) == "ONLINE"
    ct["token"] = gw.call("devices.rotate_token", {"device_id": ct["id"]})["token"]
    assert state(gw, ct) == "OFFLINE"
    assert rotated.closed_by_gateway()["code"] == "token_rotated"
    fresh = login(connect, ct)
    assert fresh.call("devices.heartbeat")["result"]["state"] == "ONLINE"
    fresh.close()


def test_one_session_per_device_and_a_reconnecting_device_is_told_its_task(
    tls_gateway: tuple[GatewayProcess, Callable[[], Line]],
) -> None:
    gw, connect = tls_gateway
    mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR"})
    seq = gw.call("sequences.create", {"name": "T1", "parameters": {"TR": 2300}})
    first, second = (
        gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                 "parameters": {"n": n}, "patient": {"id": f"P{n}"}})
        for n in (1, 2)
    )  # fmt: skip
    old = login(connect, mr)
    assert old.call("tasks.current") == {"jsonrpc": "2.0", "id": 2, "result": None}
    gw.call("tasks.start", {"task_id": first["id"]})
    told = old.notification()
    assert told["method"] == "task.start" and told["params"]["task"]["id"] == first["id"]
    old.call("tasks.report", {"task_id": first["id"], "progress": 10})

    # A second login with the same token: the first session is told why, then closed; the
    # device stays BUSY through the new one, which is told its task again.
    new = login(connect, mr)
    again = new.notification()
    assert again["method"] == "task.start"
    assert again["params"]["task"]["id"] == first["id"]
    assert (again["params"]["task"]["status"], again["params"]["task"]["progress"]) == (
        "INPROGRESS", 10,
    )  # fmt: skip
    assert again["params"]["sequence"]["parameters"] == {"TR": 2300}
    assert again["params"]["parameters"] == {"n": 1}
    assert old.closed_by_gateway() == {
        "code": "replaced", "reason": "the device logged in again on another connection",
    }  # fmt: skip
    time.sleep(0.3)  # the old session's end has run: it did not make the device OFFLINE
    assert state(gw, mr) == "BUSY"
    current = new.call("tasks.current")["result"]
    assert current["task"]["id"] == first["id"] and current["parameters"] == {"n": 1}
    assert new.call("devices.heartbeat")["result"]["state"] == "BUSY"

    # No second task meanwhile.
    with pytest.raises(ControlError, match="device 'MR 1' is busy with another task") as busy:
        gw.call("tasks.start", {"task_id": second["id"]})
    assert busy.value.code == -32013
    assert busy.value.data == {"device_id": mr["id"], "state": "BUSY", "task_id": first["id"]}
    assert gw.call("tasks.get", {"task_id": second["id"]})["status"] == "NEW"

    # A device that disconnects mid-task and logs in again is told its task again too.
    new.close()
    soon(lambda: state(gw, mr) == "OFFLINE", 3.0, "stayed BUSY after its connection closed")
    back = login(connect, mr)
    assert back.notification()["params"]["task"]["id"] == first["id"]
    assert state(gw, mr) == "BUSY"
    done = back.call("tasks.report", {"task_id": first["id"], "status": "FINISHED"})["result"]
    assert done["status"] == "FINISHED" and state(gw, mr) == "ONLINE"
    assert back.call("tasks.current")["result"] is None
    assert gw.call("tasks.start", {"task_id": second["id"]})["status"] == "STARTED"
    assert back.notification()["params"]["task"]["id"] == second["id"]
    back.close()


def test_cancelling_a_running_task_tells_the_device_and_frees_it(
    tls_gateway: tuple[GatewayProcess, Callable[[], Line]],
) -> None:
    gw, connect = tls_gateway
    mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR"})
    seq = gw.call("sequences.create", {"name": "T1"})
    tasks = [
        gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                 "patient": {"id": f"P{n}"}})
        for n in range(3)
    ]  # fmt: skip
    device = login(connect, mr)
    # INPROGRESS, then cancelled.
    gw.call("tasks.start", {"task_id": tasks[0]["id"]})
    assert device.notification()["method"] == "task.start"
    device.call("tasks.report", {"task_id": tasks[0]["id"], "progress": 30})
    assert state(gw, mr) == "BUSY"
    cancelled = gw.call("tasks.cancel", {"task_id": tasks[0]["id"], "reason": "patient moved"})
    assert (cancelled["status"], cancelled["reason"]) == ("ERROR", "patient moved")
    notice = device.notification()
    assert notice["method"] == "task.cancel"
    assert notice["params"]["task_id"] == tasks[0]["id"]
    assert notice["params"]["reason"] == "patient moved"
    assert notice["params"]["task"]["status"] == "ERROR"
    assert state(gw, mr) == "ONLINE"
    late = device.call("tasks.report", {"task_id": tasks[0]["id"], "progress": 40})["error"]
    assert late["code"] == -32014 and "is ERROR" in late["message"]
    # STARTED (no report yet), then cancelled: the same; the next task starts.
    gw.call("tasks.start", {"task_id": tasks[1]["id"]})
    assert device.notification()["params"]["task"]["id"] == tasks[1]["id"]
    gw.call("tasks.cancel", {"task_id": tasks[1]["id"]})
    notice = device.notification()
    assert notice["method"] == "task.cancel"
    assert notice["params"]["reason"] == "cancelled by an operator"
    assert state(gw, mr) == "ONLINE"
    assert gw.call("tasks.start", {"task_id": tasks[2]["id"]})["status"] == "STARTED"
    assert device.notification()["params"]["task"]["id"] == tasks[2]["id"]
    assert state(gw, mr) == "BUSY"
    device.close()


def test_reports_and_uploads_only_while_the_task_runs(
    tls_gateway: tuple[GatewayProcess, Callable[[], Line]],
) -> None:
    gw, connect = tls_gateway
    mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR"})
    seq = gw.call("sequences.create", {"name": "T1"})
    task = gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                    "patient": {"id": "P1"}})  # fmt: skip
    device = login(connect, mr)
    data = b"k" * 3000
    announced = {"task_id": task["id"], "name": "k.raw", "size": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip

    def refused(method: str, params: dict[str, Any]) -> dict[str, Any]:
        error: dict[str, Any] = device.call(method, params)["error"]
        assert error["code"] == -32014, error
        return error

    # NEW: not running yet.
    assert "is NEW" in refused("tasks.report", {"task_id": task["id"], "progress": 5})["message"]
    refused("uploads.begin", announced)
    # STARTED: an upload begins; the task finishes; the rest of the upload is refused, and the
    # open upload dropped with its partial file.
    gw.call("tasks.start", {"task_id": task["id"]})
    device.notification()
    upload_id = device.call("uploads.begin", announced)["result"]["upload_id"]
    piece = base64.b64encode(data[:1000]).decode()
    chunk = {"upload_id": upload_id, "offset": 0, "data": piece}
    assert device.call("uploads.chunk", chunk)["result"]["received"] == 1000
    device.call("tasks.report", {"task_id": task["id"], "status": "FINISHED"})
    error = refused("uploads.chunk", {**chunk, "offset": 1000})
    assert error["message"].endswith("upload dropped") and "is FINISHED" in error["message"]
    assert list((gw.data_dir / "tmp").iterdir()) == []
    gone = device.call("uploads.finish", {"upload_id": upload_id})["error"]
    assert gone == {"code": -32004, "message": "no such upload in progress"}
    refused("uploads.begin", announced)
    refused("tasks.report", {"task_id": task["id"], "status": "ERROR"})
    assert gw.call("tasks.results", {"task_id": task["id"]})["files"] == []
    device.close()


DOC = Path(__file__).resolve().parents[2] / "docs" / "acquisition.md"


def documented(heading: str) -> set[str]:
    """The members named in the first column of the table under `### heading` in
    docs/acquisition.md."""
    section = DOC.read_text().split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, f"no table under {heading!r}"
    return {row.split("`")[1] for row in rows}


def test_the_documented_objects_are_what_the_gateway_returns(
    tls_gateway: tuple[GatewayProcess, Callable[[], Line]],
) -> None:
    """docs/acquisition.md's tables of the device, task, sequence, result file, upload progress
    and login result objects name exactly the members the gateway returns; the scheduled
    start is the gateway's local time; a chunk sized by the documented rule fits the line."""
    gw, connect = tls_gateway
    device_keys, task_keys = documented("Device object"), documented("Task object")
    sequence_keys = documented("Sequence object")
    mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR", "station_ae": "MR1"})
    assert set(mr) == device_keys | {"token"}
    assert set(gw.call("devices.get", {"device_id": mr["id"]})) == device_keys
    assert all(set(d) == device_keys for d in gw.call("devices.list")["devices"])
    protocol = {"name": "p.xml", "data": base64.b64encode(b"<p/>").decode(),
                "sha256": hashlib.sha256(b"<p/>").hexdigest()}  # fmt: skip
    seq = gw.call("sequences.create", {"name": "T1", "file": protocol})
    assert set(seq) == sequence_keys and set(seq["file"]) == {"name", "size", "sha256"}
    assert all(set(q) == sequence_keys for q in gw.call("sequences.list")["sequences"])
    task = gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                    "patient": {"id": "P1"},
                                    "scheduled_at": "2026-11-23T09:00:00+05:00"})  # fmt: skip
    assert set(task) == task_keys
    assert all(set(t) == task_keys for t in gw.call("tasks.list")["tasks"])
    local = datetime(2026, 11, 23, 9, 0, tzinfo=timezone(timedelta(hours=5))).astimezone()
    assert (task["scheduled_date"], task["scheduled_time"]) == (
        local.strftime("%Y%m%d"), local.strftime("%H%M%S"),
    )  # fmt: skip

    device = connect()
    login = device.call("auth.login", {"device_id": mr["id"], "token": mr["token"]})["result"]
    assert set(login) == documented("Login result")
    assert set(device.call("devices.report_state", {"state": "ONLINE"})["result"]) == device_keys
    started = gw.call("tasks.start", {"task_id": task["id"]})
    assert set(started) == task_keys
    notice = device.notification()["params"]
    assert set(notice) == {"task", "sequence", "parameters"}
    assert set(notice["task"]) == task_keys and set(notice["sequence"]) == sequence_keys
    assert device.call("tasks.current")["result"] == notice
    report = device.call("tasks.report", {"task_id": task["id"], "progress": 5})["result"]
    assert set(report) == task_keys

    # An upload in chunks of the documented size: (max_line_bytes - 512) // 4 * 3 bytes.
    chunk = (login["max_line_bytes"] - 512) // 4 * 3
    data = bytes(range(256)) * (2 * chunk // 256 + 1)
    begin = device.call("uploads.begin", {"task_id": task["id"], "name": "raw.bin",
                                          "size": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    assert set(begin["result"]) == documented("Upload progress object")
    upload_id = begin["result"]["upload_id"]
    for offset in range(0, len(data), chunk):
        piece = base64.b64encode(data[offset : offset + chunk]).decode()
        sent = device.call("uploads.chunk", {"upload_id": upload_id, "offset": offset,
                                             "data": piece})  # fmt: skip
        assert set(sent["result"]) == documented("Upload progress object"), sent
    kept = device.call("uploads.finish", {"upload_id": upload_id})["result"]
    assert set(kept) == documented("Result file object")
    files = gw.call("tasks.results", {"task_id": task["id"]})["files"]
    assert files == [kept]

    cancelled = gw.call("tasks.cancel", {"task_id": task["id"]})
    assert set(cancelled) == task_keys
    cancel = device.notification()["params"]
    assert set(cancel) == {"task_id", "reason", "task"} and set(cancel["task"]) == task_keys
    gw.call("devices.revoke", {"device_id": mr["id"]})
    assert set(device.closed_by_gateway()) == {"code", "reason"}
