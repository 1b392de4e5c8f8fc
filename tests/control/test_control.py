"""The control socket over a raw Unix socket, against a real `gateway serve` process.

Protocol errors, framing limits, misbehaving clients, concurrency, and each core method
(status, studies.search, studies.get, studies.delete, echo) with DICOM data sent by DCMTK.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway import __version__
from gateway.control.methods import NOT_FOUND, PEER_ERROR
from gateway.control.server import (
    GATEWAY_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk_env,
    free_port,
    require,
    running_gateway,
)

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"
CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"


# -- helpers ------------------------------------------------------------------------------------


class Conn:
    """One raw connection to the control socket: send lines, read JSON answers."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes | dict[str, Any] | list[Any]) -> None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.sock.sendall(raw + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\n"), f"no complete answer: {line!r}"
        answer: dict[str, Any] = json.loads(line)
        assert answer["jsonrpc"] == "2.0"
        return answer

    def request(self, data: bytes | dict[str, Any] | list[Any]) -> dict[str, Any]:
        self.send(data)
        return self.recv()

    def call(self, method: str, params: dict[str, Any] | None = None, id: int = 1) -> Any:
        answer = self.request({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        assert "error" not in answer, answer
        assert answer["id"] == id
        return answer["result"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rpc(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        request["params"] = params
    return request


def error_of(answer: dict[str, Any], code: int, *words: str) -> str:
    """Assert *answer* is an error with *code* whose message holds every word; return it."""
    assert "result" not in answer, answer
    assert answer["error"]["code"] == code, answer
    message: str = answer["error"]["message"]
    for word in words:
        assert word in message, answer
    return message


def storescu(gw: GatewayProcess, *files: Path) -> None:
    result = subprocess.run(
        [require("storescu"), "-R", "-aec", gw.ae_title, HOST, str(gw.port), *map(str, files)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=120,
    )
    assert result.returncode == 0 and "Failed" not in result.stderr, result.stderr


def findscu_study(gw: GatewayProcess, study_uid: str, out: Path) -> list[pydicom.Dataset]:
    """The C-FIND responses (by DCMTK findscu) to a STUDY query for *study_uid*."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    result = subprocess.run(
        [require("findscu"), "-S", "-X", "-od", str(out), "-aec", gw.ae_title,
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "-k", "PatientID", HOST, str(gw.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def stored_files(gw: GatewayProcess) -> list[Path]:
    return sorted(p for p in (gw.data_dir / "objects").rglob("*") if p.is_file())


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """An empty gateway for the protocol tests, which change nothing in it."""
    with running_gateway(tmp_path_factory.mktemp("shared")) as gw:
        yield gw


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway holding CT_small.dcm and MR_small.dcm, for read-only method tests."""
    with running_gateway(tmp_path_factory.mktemp("loaded")) as gw:
        storescu(gw, CT, MR)
        yield gw


@pytest.fixture(scope="module")
def peered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with two peers: `archive` (DCMTK storescp, up) and `offline` (nothing there)."""
    scp = StoreSCP(tmp_path_factory.mktemp("storescp"))
    try:
        peers = [
            {"name": "archive", "ae_title": scp.ae_title, "host": HOST, "port": scp.port},
            {"name": "offline", "ae_title": "NOBODY", "host": HOST, "port": free_port()},
        ]
        with running_gateway(tmp_path_factory.mktemp("peered"), peers=peers) as gw:
            yield gw
    finally:
        scp.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[GatewayProcess]:
    """An empty gateway of this test's own."""
    with running_gateway(tmp_path / "gw") as gw:
        yield gw


# -- the socket ----------------------------------------------------------------------------------


def test_socket_is_private(shared: GatewayProcess) -> None:
    mode = os.stat(shared.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


# -- protocol errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"{bad", ["not valid JSON"]),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "status"', ["not valid JSON"]),
        (b"\xff\xfe\x00", ["not valid JSON"]),
        (b"[" * 100_000, ["not valid JSON", "nested too deeply"]),
    ],
    ids=["garbage", "truncated", "not-utf8", "deep-nesting"],
)
def test_parse_error(shared: GatewayProcess, line: bytes, words: list[str]) -> None:
    with Conn(shared.socket) as conn:
        answer = conn.request(line)
        error_of(answer, PARSE_ERROR, *words)
        assert answer["id"] is None
        assert conn.call("status")["version"] == __version__  # the connection stays usable


@pytest.mark.parametrize(
    ("request_", "words", "answer_id"),
    [
        ('"status"', ["a request is a JSON object"], None),
        ("42", ["a request is a JSON object"], None),
        ("null", ["a request is a JSON object"], None),
        ('{"id": 1, "method": "status"}', ['"jsonrpc" must be "2.0"'], 1),
        ('{"jsonrpc": "1.0", "id": "a", "method": "status"}', ['"jsonrpc" must be "2.0"'], "a"),
        ('{"jsonrpc": 2.0, "id": 3, "method": "status"}', ['"jsonrpc" must be "2.0"'], 3),
        ('{"jsonrpc": "2.0", "id": 1.5, "method": "status"}', ['"id" must be'], None),
        ('{"jsonrpc": "2.0", "id": true, "method": "status"}', ['"id" must be'], None),
        ('{"jsonrpc": "2.0", "id": {"a": 1}, "method": "status"}', ['"id" must be'], None),
        ('{"id": [1], "method": "status"}', ['"id" must be'], None),
        ('{"jsonrpc": "2.0", "id": 4}', ['"method" must be a string'], 4),
        ('{"jsonrpc": "2.0", "id": 5, "method": 7}', ['"method" must be a string'], 5),
    ],
)
def test_invalid_request(
    shared: GatewayProcess, request_: str, words: list[str], answer_id: object
) -> None:
    with Conn(shared.socket) as conn:
        answer = conn.request(request_.encode())
        error_of(answer, INVALID_REQUEST, *words)
        assert answer["id"] == answer_id  # an invalid id is never echoed back
        assert conn.call("status", id=99)["instances"] == 0


def test_batch_is_refused_clearly(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        for batch in ([rpc("status", id=1), rpc("status", id=2)], []):
            answer = conn.request(batch)
            error_of(answer, INVALID_REQUEST, "batch requests are not supported")
            assert answer["id"] is None
        assert conn.call("status")["instances"] == 0


def test_unknown_method(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        answer = conn.request(rpc("studies.frobnicate", id="x-1"))
        error_of(answer, METHOD_NOT_FOUND, "unknown method 'studies.frobnicate'")
        assert answer["id"] == "x-1"


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("status", [1], ['"params" must be an object']),
        ("status", "x", ['"params" must be an object']),
        ("status", {"verbose": True}, ["unknown parameter 'verbose'"]),
        ("studies.search", {"patientid": "1CT1"}, ["unknown parameter 'patientid'"]),
        ("studies.search", {"patient_id": 5}, ["'patient_id' must be a string"]),
        ("studies.search", {"limit": 0}, ["'limit' must be an integer 1..10000"]),
        ("studies.search", {"limit": "5"}, ["'limit' must be an integer"]),
        ("studies.search", {"limit": True}, ["'limit' must be an integer"]),
        ("studies.search", {"limit": 10001}, ["'limit' must be an integer"]),
        ("studies.search", {"study_date": "2004-01-2005"}, ["'study_date'", "not a valid range"]),
        ("studies.get", {}, ["'study_uid' is required"]),
        ("studies.get", {"study_uid": "1.2.x"}, ["'study_uid' is not a valid UID"]),
        ("studies.get", {"study_uid": 1.2}, ["'study_uid' must be a string"]),
        ("studies.delete", {"study_uid": "../../etc"}, ["'study_uid' is not a valid UID"]),
        ("studies.delete", {"uid": "1.2.3"}, ["unknown parameter 'uid'"]),
        ("echo", {}, ["'peer' is required"]),
    ],
)
def test_invalid_params_name_the_parameter(
    shared: GatewayProcess, method: str, params: Any, words: list[str]
) -> None:
    with Conn(shared.socket) as conn:
        answer = conn.request(rpc(method, params, id=12))
        error_of(answer, INVALID_PARAMS, *words)
        assert answer["id"] == 12


def test_params_may_be_omitted_or_null(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        assert conn.request(rpc("status"))["result"]["studies"] == 0
        answer = conn.request(b'{"jsonrpc": "2.0", "id": 2, "method": "status", "params": null}')
        assert answer["result"]["studies"] == 0
        answer = conn.request(b'{"jsonrpc": "2.0", "id": null, "method": "status"}')
        assert answer["id"] is None and answer["result"]["studies"] == 0  # a request, answered


def test_notifications_get_no_answer(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        conn.send({"jsonrpc": "2.0", "method": "status"})
        conn.send({"jsonrpc": "2.0", "method": "no.such.method"})  # no error answer either
        conn.send({"jsonrpc": "2.0", "method": "status", "params": {"bogus": 1}})
        # Lines are answered in order, so the next answer is this request's.
        answer = conn.request(rpc("status", id=7))
        assert answer["id"] == 7
        assert answer["result"]["version"] == __version__
        conn.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.file.readline()  # nothing else was answered


def test_blank_lines_are_ignored(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        conn.sock.sendall(b"\n  \n\r\n")
        assert conn.call("status", id=3)["studies"] == 0


def test_several_requests_on_one_connection(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        conn.sock.sendall(
            b"".join(json.dumps(rpc("status", id=i)).encode() + b"\n" for i in range(1, 6))
        )
        assert [conn.recv()["id"] for _ in range(5)] == [1, 2, 3, 4, 5]


# -- framing limits and misbehaving clients ------------------------------------------------------


def test_line_just_under_the_limit_is_served(shared: GatewayProcess) -> None:
    # Unknown members of the request object are ignored; this pads it to ~1000 KB (limit 1 MiB).
    request = rpc("status", id=8)
    request["padding"] = "x" * 1_000_000
    with Conn(shared.socket) as conn:
        assert conn.request(request)["result"]["instances"] == 0


def test_oversized_line_is_refused_without_being_held(shared: GatewayProcess) -> None:
    shared.call("status")
    before = rss_kib(shared.pid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(shared.socket))
    sent = 0

    def send_20_mb_line() -> None:
        nonlocal sent
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(20):
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"\n")
        except OSError:
            pass  # the gateway closed the connection mid-line: expected

    sender = threading.Thread(target=send_20_mb_line)
    sender.start()
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass  # closed with our unread bytes still queued: also a close
    finally:
        sender.join(30)
        sock.close()
    assert not sender.is_alive()
    answer = json.loads(received)  # exactly one answer line, then the connection closed
    assert received.count(b"\n") == 1
    error_of(answer, INVALID_REQUEST, "request line longer than 1048576 bytes")
    assert sent < 20 << 20  # refused before the line ended
    grown = rss_kib(shared.pid) - before
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
    assert shared.call("status")["instances"] == 0  # and it still serves everyone else


def test_silent_client_stalls_no_one(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as silent:
        time.sleep(0.2)
        with Conn(shared.socket, timeout=5) as other:
            assert other.call("status")["version"] == __version__
        silent.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            silent.file.readline()  # the gateway waits for it and sends nothing


def test_half_a_line_stalls_no_one(shared: GatewayProcess) -> None:
    line = json.dumps(rpc("status", id=21)).encode()
    with Conn(shared.socket) as slow:
        slow.sock.sendall(line[:15])
        time.sleep(0.2)
        with Conn(shared.socket, timeout=5) as other:
            assert other.call("status", id=2)["studies"] == 0
        slow.sock.sendall(line[15:] + b"\n")  # the slow client finishes and is answered
        answer = slow.recv()
        assert answer["id"] == 21 and answer["result"]["studies"] == 0


def test_half_a_line_then_eof_is_a_parse_error(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        conn.sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')
        conn.sock.shutdown(socket.SHUT_WR)
        error_of(conn.recv(), PARSE_ERROR, "not valid JSON")
        assert conn.file.readline() == b""  # then closed


def test_twenty_concurrent_clients(shared: GatewayProcess) -> None:
    barrier = threading.Barrier(20)

    def client(n: int) -> list[tuple[Any, Any]]:
        with Conn(shared.socket, timeout=30) as conn:
            barrier.wait(10)
            answers = []
            for i in range(5):
                request_id = f"client{n}-{i}"
                if i % 2:
                    answer = conn.request(rpc("studies.search", {"limit": n + 1}, id=request_id))
                    answers.append((answer["id"], answer["result"]["count"]))
                else:
                    answer = conn.request(rpc("status", id=request_id))
                    answers.append((answer["id"], answer["result"]["version"]))
            return answers

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(client, range(20)))
    for n, answers in enumerate(results):
        assert answers == [(f"client{n}-{i}", 0 if i % 2 else __version__) for i in range(5)]


def test_client_limit(tmp_path: Path) -> None:
    root = tmp_path / "limited"
    control = {"socket": str(root / "control.sock"), "max_clients": 2}
    with running_gateway(root, control=control) as gw:
        with Conn(gw.socket) as first, Conn(gw.socket) as second:
            time.sleep(0.2)
            with Conn(gw.socket) as third:
                error_of(third.recv(), GATEWAY_ERROR, "too many control clients")
                assert third.file.readline() == b""
            assert first.call("status")["studies"] == 0
            assert second.call("status")["studies"] == 0
        wait_until(lambda: _status_or_none(gw) is not None)


def _status_or_none(gw: GatewayProcess) -> dict[str, Any] | None:
    try:
        with Conn(gw.socket, timeout=5) as conn:
            answer = conn.request(rpc("status"))
    except OSError:
        return None
    return answer.get("result")


# -- status --------------------------------------------------------------------------------------


def test_status_counts_what_is_stored(fresh: GatewayProcess) -> None:
    started = time.monotonic()
    with Conn(fresh.socket) as conn:
        empty = conn.call("status")
        assert empty["version"] == __version__
        assert empty["ae_title"] == "GATEWAY" and empty["port"] == fresh.port
        for key in ("patients", "studies", "series", "instances", "bytes"):
            assert empty[key] == 0, key
        storescu(fresh, CT, MR)
        held = conn.call("status")
    assert (held["patients"], held["studies"], held["series"], held["instances"]) == (2, 2, 2, 2)
    files = stored_files(fresh)
    assert len(files) == 2
    # `bytes` counts the datasets held, without their Part 10 preamble and File Meta.
    assert held["bytes"] == sum(len(dataset_bytes(p)) for p in files)
    usage = shutil.disk_usage(fresh.data_dir)
    assert held["disk_total_bytes"] == usage.total
    assert 0 < held["disk_free_bytes"] <= usage.total
    assert abs(held["disk_free_bytes"] - usage.free) < max(512 << 20, usage.total // 100)
    assert 0 < empty["uptime_seconds"] <= held["uptime_seconds"]
    assert held["uptime_seconds"] < time.monotonic() - started + 60


def test_status_counts_open_associations(fresh: GatewayProcess) -> None:
    assert fresh.call("status")["associations_open"] == 0
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, fresh.port, ae_title=fresh.ae_title)
    assert assoc.is_established
    try:
        assert fresh.call("status")["associations_open"] == 1
    finally:
        assoc.release()
    wait_until(lambda: fresh.call("status")["associations_open"] == 0)


# -- studies.search / studies.get ----------------------------------------------------------------


def _search(gw: GatewayProcess, **params: Any) -> list[str]:
    result = gw.call("studies.search", params)
    assert result["count"] == len(result["studies"])
    return sorted(study["study_uid"] for study in result["studies"])


def test_search_everything(loaded: GatewayProcess) -> None:
    result = loaded.call("studies.search")
    assert result["count"] == 2
    by_uid = {study["study_uid"]: study for study in result["studies"]}
    ct = by_uid[CT_STUDY]
    assert ct["patient_id"] == "1CT1"
    assert ct["patient_name"] == "CompressedSamples^CT1"
    assert ct["study_date"] == "20040119"
    assert ct["modalities"] == ["CT"]
    assert (ct["series"], ct["instances"]) == (1, 1)
    assert by_uid[MR_STUDY]["modalities"] == ["MR"]
    assert set(ct) == {
        "study_uid", "patient_id", "patient_name", "patient_birth_date", "patient_sex",
        "study_date", "study_time", "accession_number", "study_id", "study_description",
        "referring_physician_name", "modalities", "series", "instances",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"patient_id": "1CT1"}, [CT_STUDY]),
        ({"patient_id": "4MR1"}, [MR_STUDY]),
        ({"patient_id": "nobody"}, []),
        ({"patient_id": "*1"}, [CT_STUDY, MR_STUDY]),
        ({"patient_name": "CompressedSamples*"}, [CT_STUDY, MR_STUDY]),
        ({"patient_name": "compressedsamples^mr*"}, [MR_STUDY]),  # PN is case-insensitive
        ({"patient_name": "*^CT?"}, [CT_STUDY]),
        ({"study_date": "20040119"}, [CT_STUDY]),
        ({"study_date": "20040101-20040331"}, [CT_STUDY]),
        ({"study_date": "20040801-"}, [MR_STUDY]),
        ({"study_date": "-20041231"}, [CT_STUDY, MR_STUDY]),
        ({"study_date": "20050101-"}, []),
        ({"modality": "MR"}, [MR_STUDY]),
        ({"modality": "CT\\MR"}, [CT_STUDY, MR_STUDY]),
        ({"modality": "US"}, []),
        ({"study_uid": CT_STUDY}, [CT_STUDY]),
        ({"study_uid": f"{CT_STUDY}\\{MR_STUDY}"}, [CT_STUDY, MR_STUDY]),
        ({"study_description": "e+*"}, [CT_STUDY]),
        ({"patient_id": "*", "patient_name": ""}, [CT_STUDY, MR_STUDY]),  # universal matching
        ({"patient_id": "1CT1", "modality": "MR"}, []),
        ({"patient_name": "Compressed*", "study_date": "20040801-20041231"}, [MR_STUDY]),
    ],
)
def test_search_filters(
    loaded: GatewayProcess, params: dict[str, Any], expected: list[str]
) -> None:
    assert _search(loaded, **params) == sorted(expected)


def test_search_limit(loaded: GatewayProcess) -> None:
    assert len(_search(loaded, limit=1)) == 1
    assert len(_search(loaded, limit=2)) == 2
    assert len(_search(loaded, limit=10000)) == 2


def test_get_returns_the_series(loaded: GatewayProcess) -> None:
    study = loaded.call("studies.get", {"study_uid": CT_STUDY})
    assert study["study_uid"] == CT_STUDY
    assert study["patient_id"] == "1CT1"
    assert study["series"] == 1
    assert study["series_list"] == [
        {
            "series_uid": CT_SERIES,
            "modality": "CT",
            "series_number": 1,
            "series_description": None,
            "instances": 1,
        }
    ]


def test_get_unknown_study(loaded: GatewayProcess) -> None:
    with Conn(loaded.socket) as conn:
        answer = conn.request(rpc("studies.get", {"study_uid": "1.2.3.4"}, id=5))
    error_of(answer, NOT_FOUND, "no study 1.2.3.4")
    assert answer["id"] == 5


# -- studies.delete ------------------------------------------------------------------------------


def test_delete_removes_the_study(fresh: GatewayProcess, tmp_path: Path) -> None:
    storescu(fresh, CT, MR)
    found = findscu_study(fresh, CT_STUDY, tmp_path / "before")
    assert [str(ds.StudyInstanceUID) for ds in found] == [CT_STUDY]

    with Conn(fresh.socket) as conn:
        assert conn.call("studies.delete", {"study_uid": CT_STUDY}) == {
            "study_uid": CT_STUDY,
            "instances_removed": 1,
        }
        assert conn.call("studies.search", {"study_uid": CT_STUDY})["studies"] == []
        assert [s["study_uid"] for s in conn.call("studies.search")["studies"]] == [MR_STUDY]
        status = conn.call("status")
        assert (status["patients"], status["studies"], status["instances"]) == (1, 1, 1)
        error_of(conn.request(rpc("studies.get", {"study_uid": CT_STUDY})), NOT_FOUND)
        again = conn.request(rpc("studies.delete", {"study_uid": CT_STUDY}, id=9))
        error_of(again, NOT_FOUND, f"no study {CT_STUDY}")
        assert again["id"] == 9
    assert len(stored_files(fresh)) == 1  # the CT file is gone from disk
    assert findscu_study(fresh, CT_STUDY, tmp_path / "after") == []


def test_delete_unknown_study(shared: GatewayProcess) -> None:
    with Conn(shared.socket) as conn:
        answer = conn.request(rpc("studies.delete", {"study_uid": "1.2.840.99999.1"}, id="d"))
    error_of(answer, NOT_FOUND, "no study 1.2.840.99999.1")
    assert answer["id"] == "d"


# -- echo ----------------------------------------------------------------------------------------


def test_echo_peer_that_is_up(peered: GatewayProcess) -> None:
    result = peered.call("echo", {"peer": "archive"})
    assert result["peer"] == "archive"
    assert result["status"] == 0
    assert 0 < result["seconds"] < 30


def test_echo_unknown_peer(peered: GatewayProcess) -> None:
    with Conn(peered.socket) as conn:
        answer = conn.request(rpc("echo", {"peer": "pacs"}))
    error_of(answer, INVALID_PARAMS, "unknown peer 'pacs'", "archive", "offline")


def test_echo_peer_that_is_down(peered: GatewayProcess) -> None:
    with Conn(peered.socket, timeout=60) as conn:
        answer = conn.request(rpc("echo", {"peer": "offline"}))
        message = error_of(answer, PEER_ERROR, "unreachable: peer offline", "connection refused")
        assert f"{HOST}:" in message
        assert conn.call("status")["version"] == __version__
