"""The control socket over TCP: authentication first, operator and device roles, TLS."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.control.auth import new_operator_token
from gateway.errors import ControlError
from tests.conftest import HOST, GatewayProcess, free_port, self_signed_certificate


class Line:
    """A raw JSON-lines client over TCP (optionally TLS). Notifications the gateway pushes
    (lines without an "id") are kept aside while a call waits for its answer, for
    `notification` to return in order."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((HOST, port), timeout=10)
        self.sock = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.file = self.sock.makefile("rwb")
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []

    def send_raw(self, data: bytes) -> Any:
        self.file.write(data)
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                return None
            message = json.loads(line)
            if "id" in message or "method" not in message:
                return message
            self.notifications.append(message)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        return self.send_raw(json.dumps(request).encode() + b"\n")

    def notification(self) -> dict[str, Any]:
        """The next notification the gateway pushed (waiting for it up to the timeout)."""
        if self.notifications:
            return self.notifications.pop(0)
        line = self.file.readline()
        assert line, "the connection closed instead"
        message: dict[str, Any] = json.loads(line)
        assert "id" not in message, message
        return message

    def closed(self) -> bool:
        """Whether the gateway closed the connection with nothing more to say (this side is
        closed either way)."""
        try:
            return not self.notifications and self.file.readline() == b""
        except (ConnectionError, ssl.SSLError):
            return True
        finally:
            self.close()

    def closed_by_gateway(self) -> dict[str, Any]:
        """The `session.closed` notification's params, once the connection is closed after
        it (this side is closed either way)."""
        notice = self.notification()
        assert notice["method"] == "session.closed", notice
        assert self.closed()
        params: dict[str, Any] = notice["params"]
        return params

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def tcp_gateway(gateway_factory: Any) -> tuple[GatewayProcess, int, str]:
    token, hashed = new_operator_token()
    port = free_port()
    gw = gateway_factory(control={"tcp_port": port, "operator_token_hashes": [hashed],
                                  "max_line_bytes": 4096})  # fmt: skip
    return gw, port, token


def test_unauthenticated_malformed_and_oversized_requests_are_refused_and_closed(
    tcp_gateway: tuple[GatewayProcess, int, str],
) -> None:
    gw, port, _ = tcp_gateway
    client = Line(port)
    answer = client.call("status")
    assert answer["error"] == {"code": -32001, "message": "authenticate first: call auth.login"}
    assert client.closed()
    client = Line(port)
    assert client.send_raw(b'{"jsonrpc": "2.0", "id": 1, "method": \n')["error"]["code"] == -32700
    assert client.closed()
    client = Line(port)
    answer = client.send_raw(b'{"x": "' + b"a" * 5000 + b'"}\n')
    assert (
        answer["error"]["code"] == -32600 and "longer than 4096 bytes" in answer["error"]["message"]
    )
    assert client.closed()
    client = Line(port)
    answer = client.call("auth.login", {"operator_token": "guess"})
    failed = "authentication failed: unknown operator token"
    assert answer["error"] == {"code": -32001, "message": failed}
    assert client.closed()
    assert "control_auth_failed" in gw.log_text()


def test_operator_and_device_roles(tcp_gateway: tuple[GatewayProcess, int, str]) -> None:
    gw, port, token = tcp_gateway
    operator = Line(port)
    assert operator.call("auth.login", {"operator_token": token})["result"]["role"] == "operator"
    device = operator.call("devices.register", {"name": "MR 1", "modality": "MR",
                                                "station_ae": "MR1"})["result"]  # fmt: skip
    assert operator.call("status")["result"]["version"]
    assert operator.call("devices.heartbeat")["error"]["code"] == -32003  # a device method

    scanner = Line(port)
    login = scanner.call("auth.login", {"device_id": device["id"], "token": device["token"]})
    assert login["result"] == {"role": "device", "device_id": device["id"],
                               "max_line_bytes": 4096}  # fmt: skip
    assert gw.call("devices.get", {"device_id": device["id"]})["state"] == "ONLINE"
    assert scanner.call("devices.heartbeat")["result"]["state"] == "ONLINE"
    forbidden = scanner.call("devices.list")["error"]
    assert forbidden == {"code": -32003, "message": "devices.list is for operators only"}
    assert scanner.call("auth.login", {"operator_token": token})["error"]["code"] == -32600
    scanner.close()

    def offline() -> bool:
        return gw.call("devices.get", {"device_id": device["id"]})["state"] == "OFFLINE"

    deadline = time.monotonic() + 5
    while not offline():
        assert time.monotonic() < deadline, "the device stayed ONLINE after its connection closed"
        time.sleep(0.05)
    # A revoked token no longer logs in.
    gw.call("devices.revoke", {"device_id": device["id"]})
    again = Line(port)
    refused = again.call("auth.login", {"device_id": device["id"], "token": device["token"]})
    assert refused["error"]["message"] == "authentication failed: unknown device or token"
    assert again.closed()
    operator.close()


def test_tls(gateway_factory: Any, tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    token, hashed = new_operator_token()
    port = free_port()
    gateway_factory(control={"tcp_port": port, "operator_token_hashes": [hashed],
                             "tls_cert": str(cert), "tls_key": str(key)})  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    client = Line(port, context)
    assert client.call("auth.login", {"operator_token": token})["result"]["role"] == "operator"
    assert client.call("status")["result"]["version"]
    client.close()
    plain = Line(port)  # no TLS: the handshake fails, nothing is served
    try:
        answer = plain.call("status")
    except (ConnectionError, json.JSONDecodeError):
        answer = None
    finally:
        plain.close()
    assert answer is None


def test_a_scripted_device_runs_its_task(tcp_gateway: tuple[GatewayProcess, int, str]) -> None:
    gw, port, _ = tcp_gateway
    mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR", "station_ae": "MR1"})
    ct = gw.call("devices.register", {"name": "CT 1", "modality": "CT", "station_ae": "CT1"})
    seq = gw.call("sequences.create", {"name": "T2 TSE", "parameters": {"TR": 4000}})
    task = gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                    "parameters": {"slices": 30},
                                    "patient": {"id": "P1", "name": "Doe^Jane"}})  # fmt: skip
    second = gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                      "patient": {"id": "P2"}})  # fmt: skip
    with pytest.raises(ControlError, match="device 'MR 1' is offline"):
        gw.call("tasks.start", {"task_id": task["id"]})

    device = Line(port)
    device.call("auth.login", {"device_id": mr["id"], "token": mr["token"]})
    other = Line(port)
    other.call("auth.login", {"device_id": ct["id"], "token": ct["token"]})

    started = gw.call("tasks.start", {"task_id": task["id"]})
    assert started["status"] == "STARTED"
    notification = device.notification()  # pushed to the device's connection
    assert notification["method"] == "task.start" and "id" not in notification
    assert notification["params"]["task"]["id"] == task["id"]
    assert notification["params"]["task"]["study_uid"] == task["study_uid"]
    assert notification["params"]["sequence"]["parameters"] == {"TR": 4000}
    assert notification["params"]["parameters"] == {"slices": 30}
    assert gw.call("devices.get", {"device_id": mr["id"]})["state"] == "BUSY"
    with pytest.raises(ControlError, match="device 'MR 1' is busy") as busy:
        gw.call("tasks.start", {"task_id": second["id"]})
    assert busy.value.code == -32013 and busy.value.data["task_id"] == task["id"]

    # Only the task's own device may report on it.
    refused = other.call("tasks.report", {"task_id": task["id"], "progress": 10})["error"]
    assert refused == {"code": -32003, "message": f"task {task['id']} belongs to another device"}
    bad = device.call("tasks.report", {"task_id": task["id"], "progress": 101})["error"]
    assert bad["code"] == -32602
    assert (
        device.call("tasks.report", {"task_id": task["id"], "progress": 50})["result"]["progress"]
        == 50
    )
    assert gw.call("tasks.get", {"task_id": task["id"]})["status"] == "INPROGRESS"
    watcher = subprocess.Popen(
        [sys.executable, "-m", "gateway", "tasks", "watch", task["id"], "--interval", "0.1",
         "--config", str(gw.config)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    done = device.call("tasks.report", {"task_id": task["id"], "status": "FINISHED"})["result"]
    assert (done["status"], done["progress"]) == ("FINISHED", 100)
    assert gw.call("devices.get", {"device_id": mr["id"]})["state"] == "ONLINE"
    out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 0 and out.splitlines()[-1].split() == ["FINISHED", "100%"]
    again = device.call("tasks.report", {"task_id": task["id"], "progress": 60})["error"]
    assert again["code"] == -32014  # a finished task takes no more reports

    # A device disconnecting mid-task: OFFLINE, the task kept as it was.
    gw.call("tasks.start", {"task_id": second["id"]})
    assert device.notification()["params"]["task"]["id"] == second["id"]
    device.call("tasks.report", {"task_id": second["id"], "progress": 20})
    device.close()
    deadline = time.monotonic() + 5
    while gw.call("devices.get", {"device_id": mr["id"]})["state"] != "OFFLINE":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kept = gw.call("tasks.get", {"task_id": second["id"]})
    assert (kept["status"], kept["progress"]) == ("INPROGRESS", 20)
    other.close()


def test_a_device_whose_heartbeats_stop_goes_offline(gateway_factory: Any) -> None:
    port = free_port()
    gw = gateway_factory(control={"tcp_port": port, "device_heartbeat_timeout": 1.5})
    ct = gw.call("devices.register", {"name": "CT 1", "modality": "CT"})
    device = Line(port)
    device.call("auth.login", {"device_id": ct["id"], "token": ct["token"]})
    time.sleep(1.0)
    assert device.call("devices.heartbeat")["result"]["state"] == "ONLINE"
    time.sleep(1.0)  # 2 s since the login, 1 s since the heartbeat: still connected
    assert gw.call("devices.get", {"device_id": ct["id"]})["state"] == "ONLINE"
    assert device.closed_by_gateway() == {"code": "silent", "reason": "silent for 1.5 s"}
    deadline = time.monotonic() + 5
    while gw.call("devices.get", {"device_id": ct["id"]})["state"] != "OFFLINE":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert '"device_silent"' in gw.log_text()


def test_results_are_linked_and_uploads_verified(
    tcp_gateway: tuple[GatewayProcess, int, str], tmp_path: Path
) -> None:
    import base64
    import hashlib

    from pydicom.uid import generate_uid

    from tests.conftest import TEST_FILES, write_variant
    from tests.test_routing import storescu

    gw, port, _ = tcp_gateway
    mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR", "station_ae": "MR1"})
    seq = gw.call("sequences.create", {"name": "T1"})
    task = gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                    "patient": {"id": "P1"}})  # fmt: skip
    device = Line(port)
    device.call("auth.login", {"device_id": mr["id"], "token": mr["token"]})
    gw.call("tasks.start", {"task_id": task["id"]})
    device.notification()  # the start notification

    # The scanner's images by C-STORE (DCMTK), into the task's study: linked automatically.
    images = [
        write_variant(TEST_FILES / "MR_small.dcm", tmp_path / f"{n}.dcm",
                      StudyInstanceUID=task["study_uid"], SOPInstanceUID=generate_uid(),
                      AccessionNumber=task["accession_number"], InstanceNumber=n)
        for n in (1, 2, 3)
    ]  # fmt: skip
    storescu(gw, images, calling="MR1")
    linked = device.call("tasks.results", {"task_id": task["id"]})["result"]
    assert linked["instances"] == 3 and linked["dicom"][0]["modality"] == "MR"

    def upload(name: str, data: bytes, sha: str | None = None, chunk: int = 1000) -> Any:
        digest = sha or hashlib.sha256(data).hexdigest()
        announced = {"task_id": task["id"], "name": name, "size": len(data), "sha256": digest}
        begin = device.call("uploads.begin", announced)
        upload_id = begin["result"]["upload_id"]
        for offset in range(0, len(data), chunk):
            piece = base64.b64encode(data[offset : offset + chunk]).decode()
            sent = device.call("uploads.chunk", {"upload_id": upload_id, "offset": offset,
                                                 "data": piece})  # fmt: skip
            assert "result" in sent, sent
        return device.call("uploads.finish", {"upload_id": upload_id})

    raw = bytes(range(256)) * 20
    kept = upload("kspace.raw", raw)["result"]
    assert (kept["kind"], kept["size"]) == ("file", len(raw))
    stored = gw.data_dir / "results" / task["id"] / "kspace.raw"
    assert stored.read_bytes() == raw
    # A wrong sha256: refused, nothing kept.
    bad = upload("log.txt", b"scan log\n" * 100, sha="0" * 64)["error"]
    assert bad == {"code": -32602, "message": "sha256 does not match the bytes: nothing kept"}
    assert not (gw.data_dir / "results" / task["id"] / "log.txt").exists()
    assert list((gw.data_dir / "tmp").iterdir()) == []
    # A DICOM upload goes into the store, if it is the task's study.
    dicom = write_variant(
        TEST_FILES / "MR_small.dcm", tmp_path / "up.dcm",
        StudyInstanceUID=task["study_uid"], SOPInstanceUID=generate_uid(),
    )  # fmt: skip
    assert upload("extra.dcm", dicom.read_bytes(), chunk=2000)["result"]["kind"] == "dicom"
    other = write_variant(TEST_FILES / "MR_small.dcm", tmp_path / "other.dcm",
                          StudyInstanceUID=generate_uid(), AccessionNumber="X",
                          SOPInstanceUID=generate_uid())  # fmt: skip
    refused = upload("other.dcm", other.read_bytes(), chunk=2000)["error"]
    assert "belongs to another study" in refused["message"]
    results = gw.call("tasks.results", {"task_id": task["id"]})
    assert results["instances"] == 4
    assert [f["name"] for f in results["files"]] == ["kspace.raw", "extra.dcm"]
    device.close()


def test_scripted_device_end_to_end(
    tcp_gateway: tuple[GatewayProcess, int, str], tmp_path: Path
) -> None:
    """Register, connect, get the start notification, report progress, send the images by
    C-STORE (DCMTK), see them linked, finish; then an upload with a wrong sha256 is refused."""
    import base64
    import hashlib

    from pydicom.uid import generate_uid

    from tests.conftest import TEST_FILES, write_variant
    from tests.test_routing import storescu

    gw, port, operator_token = tcp_gateway
    operator = Line(port)  # a remote operator, over TCP like the device
    operator.call("auth.login", {"operator_token": operator_token})
    device_info = operator.call("devices.register", {"name": "MR 9", "modality": "MR",
                                                     "station_ae": "MR9"})["result"]  # fmt: skip
    seq = operator.call("sequences.create", {"name": "FLAIR"})["result"]
    task = operator.call("tasks.create", {"device_id": device_info["id"], "sequence_id": seq["id"],
                                          "patient": {"id": "E2E"}})["result"]  # fmt: skip
    device = Line(port)
    device.call("auth.login", {"device_id": device_info["id"], "token": device_info["token"]})
    assert operator.call("tasks.start", {"task_id": task["id"]})["result"]["status"] == "STARTED"
    start = device.notification()
    assert start["method"] == "task.start" and start["params"]["task"]["id"] == task["id"]
    assert (
        device.call("tasks.report", {"task_id": task["id"], "progress": 40})["result"]["status"]
        == "INPROGRESS"
    )
    images = [
        write_variant(TEST_FILES / "MR_small.dcm", tmp_path / f"i{n}.dcm",
                      StudyInstanceUID=start["params"]["task"]["study_uid"],
                      SOPInstanceUID=generate_uid(), InstanceNumber=n)
        for n in (1, 2)
    ]  # fmt: skip
    storescu(gw, images, calling="MR9")
    results = device.call("tasks.results", {"task_id": task["id"]})["result"]
    assert results["instances"] == 2
    data = b"raw" * 100
    begin = device.call("uploads.begin", {"task_id": task["id"], "name": "raw.dat",
                                          "size": len(data), "sha256": "f" * 64})  # fmt: skip
    upload_id = begin["result"]["upload_id"]
    device.call("uploads.chunk", {"upload_id": upload_id, "offset": 0,
                                  "data": base64.b64encode(data).decode()})  # fmt: skip
    refused = device.call("uploads.finish", {"upload_id": upload_id})["error"]
    assert refused["message"] == "sha256 does not match the bytes: nothing kept"
    assert hashlib.sha256(data).hexdigest() != "f" * 64
    assert operator.call("tasks.results", {"task_id": task["id"]})["result"]["files"] == []
    finished = device.call("tasks.report", {"task_id": task["id"], "status": "FINISHED"})
    assert finished["result"]["status"] == "FINISHED"
    device.close()
    operator.close()


def test_revoked_rotated_and_removed_credentials_close_their_sessions(
    gateway_factory: Any,
) -> None:
    """A device's connection closes the moment its token is rotated or revoked; an operator's
    the moment a reload removes its token's hash, and a hash a reload adds logs in at once.
    Other sessions stay."""
    first, first_hash = new_operator_token()
    second, second_hash = new_operator_token()
    port = free_port()
    control = {"tcp_port": port, "operator_token_hashes": [first_hash]}
    gw = gateway_factory(control=control)
    device = gw.call("devices.register", {"name": "MR 1", "modality": "MR"})
    other = gw.call("devices.register", {"name": "CT 1", "modality": "CT"})

    def device_session(entry: dict[str, Any], token: str) -> Line:
        line = Line(port)
        assert line.call("auth.login", {"device_id": entry["id"], "token": token})["result"]
        return line

    scanner, bystander = (
        device_session(device, device["token"]),
        device_session(other, other["token"]),
    )
    rotated = gw.call("devices.rotate_token", {"device_id": device["id"]})["token"]
    assert scanner.closed_by_gateway() == {"code": "token_rotated",
                                           "reason": "device token rotated"}  # fmt: skip
    scanner = device_session(device, rotated)  # the new token logs in
    gw.call("devices.revoke", {"device_id": device["id"]})
    assert scanner.closed_by_gateway()["code"] == "token_revoked"
    assert bystander.call("devices.heartbeat")["result"]["state"] == "ONLINE"

    operator = Line(port)
    assert operator.call("auth.login", {"operator_token": first})["result"]["role"] == "operator"
    gw.write_config(control={**gw._base["control"], "operator_token_hashes": [second_hash]})
    result = gw.call("rules.reload")
    assert "control.operator_token_hashes" in result["applied"]
    assert "control" not in result["restart_needed"]
    assert operator.closed()
    newcomer = Line(port)
    assert newcomer.call("auth.login", {"operator_token": second})["result"]["role"] == "operator"
    stale = Line(port)
    refused = stale.call("auth.login", {"operator_token": first})
    assert refused["error"]["message"] == "authentication failed: unknown operator token"
    assert stale.closed()
    reasons = [
        json.loads(line)["reason"] for line in gw.log_text().splitlines()
        if '"control_session_closed"' in line
    ]  # fmt: skip
    assert reasons == ["device token rotated", "device token revoked",
                       "operator token removed from the configuration"]  # fmt: skip
    newcomer.close()
    bystander.close()


def test_idle_uploads_expire_and_uploads_pass_the_disk_guard(gateway_factory: Any) -> None:
    """`upload_idle_timeout = 1`: an upload left after one chunk is dropped and its partial
    file removed while the device stays connected. With `min_free_mb` beyond the disk, an
    upload is refused when it begins, as a C-STORE would be."""
    import base64
    import hashlib

    def device_with_task(gw: GatewayProcess, port: int) -> tuple[Line, dict[str, Any]]:
        mr = gw.call("devices.register", {"name": "MR 1", "modality": "MR"})
        seq = gw.call("sequences.create", {"name": "T1"})
        task = gw.call("tasks.create", {"device_id": mr["id"], "sequence_id": seq["id"],
                                        "patient": {"id": "P1"}})  # fmt: skip
        device = Line(port)
        device.call("auth.login", {"device_id": mr["id"], "token": mr["token"]})
        gw.call("tasks.start", {"task_id": task["id"]})  # uploads only for a running task
        return device, task

    port = free_port()
    gw = gateway_factory(control={"tcp_port": port, "upload_idle_timeout": 1})
    device, task = device_with_task(gw, port)
    data = b"k" * 4000
    begin = device.call("uploads.begin", {"task_id": task["id"], "name": "k.raw",
                                          "size": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    upload_id = begin["result"]["upload_id"]
    piece = base64.b64encode(data[:1000]).decode()
    sent = device.call("uploads.chunk", {"upload_id": upload_id, "offset": 0, "data": piece})
    assert sent["result"]["received"] == 1000
    assert len(list((gw.data_dir / "tmp").iterdir())) == 1
    deadline = time.monotonic() + 10
    while list((gw.data_dir / "tmp").iterdir()):
        assert time.monotonic() < deadline, "the idle upload's file stayed"
        device.call("devices.heartbeat")  # the device is connected and alive throughout
        time.sleep(0.2)
    late = device.call("uploads.chunk", {"upload_id": upload_id, "offset": 1000, "data": piece})
    assert late["error"]["message"] == "no such upload in progress"
    assert '"upload_expired"' in gw.log_text()
    device.close()
    gw.stop()

    full = gateway_factory("full", control={"tcp_port": port}, node={"min_free_mb": 2**40})
    device, task = device_with_task(full, port)
    refused = device.call(
        "uploads.begin",
        {
            "task_id": task["id"],
            "name": "k.raw",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    )
    assert refused["error"]["code"] == -32000
    assert (
        "low disk" in refused["error"]["message"]
        and "node.min_free_mb" in refused["error"]["message"]
    )
    assert list((full.data_dir / "tmp").iterdir()) == []
    device.close()
