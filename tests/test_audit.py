"""The audit trail against real peers: DCMTK tools do what sites do, `gateway audit` shows it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from gateway.control.auth import new_operator_token
from tests.conftest import HOST, TEST_FILES, StoreSCP, dcmtk_env, free_port, require
from tests.control.test_tcp import Line
from tests.scp.test_query_retrieve import movescu

CT = TEST_FILES / "CT_small.dcm"
STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require(tool), *args], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)  # fmt: skip


def test_audit_trail_of_a_session(gateway_factory: Any, tmp_path: Path) -> None:
    """Each kind of record from what DCMTK's tools and a control login do; the same records as
    RFC 5424 messages to a UDP syslog collector on loopback."""
    import socket

    dest = StoreSCP(tmp_path / "dest")
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind((HOST, 0))
    collector.settimeout(5)
    try:
        _, hashed = new_operator_token()
        port = free_port()
        gw = gateway_factory(
            peers=[{"name": "dest", "ae_title": "STORESCP", "host": HOST, "port": dest.port}],
            security={"default_services": ["echo", "store", "find", "move"]},
            control={"tcp_port": port, "operator_token_hashes": [hashed]},
            audit={"syslog": f"udp://{HOST}:{collector.getsockname()[1]}"},
        )
        gateway = ("-aec", gw.ae_title, HOST, str(gw.port))
        assert dcmtk("storescu", "-aet", "CT1", *gateway, str(CT)).returncode == 0
        found = dcmtk(
            "findscu",
            "-S",
            "-aet",
            "WS1",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=Compressed*",
            "-k",
            "StudyInstanceUID",
            *gateway,
        )
        assert found.returncode == 0
        moved = movescu(
            gw, "STORESCP", "S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}"
        )
        assert "Received Final Move Response" in moved.stdout + moved.stderr
        out = tmp_path / "get"
        out.mkdir()
        dcmtk(
            "getscu",
            "-S",
            "-aet",
            "WS1",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={STUDY}",
            *gateway,
        )  # refused: not a default service
        assert dcmtk("echoscu", "-aec", "SOMEONE_ELSE", HOST, str(gw.port)).returncode != 0
        bad = Line(port)
        assert bad.call("auth.login", {"operator_token": "guess"})["error"]["code"] == -32001
        assert bad.closed()
        gw.call("studies.delete", {"study_uid": STUDY})

        records = [json.loads(line) for line in gw.cli("audit", "--json").stdout.splitlines()]
        by_event: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_event.setdefault(record["event"], []).append(record)
        (started,) = by_event["Application Activity"]
        assert (started["code"], started["what"]) == ("110100", "started")
        (imported,) = by_event["Import"]
        assert (imported["code"], imported["studies"], imported["calling_ae"]) == (
            "110107",
            [STUDY],
            "CT1",
        )
        (query,) = by_event["Query"]
        assert query["code"] == "110112" and query["level"] == "STUDY"
        assert query["keys"] == ["PatientName"] and query["calling_ae"] == "WS1"
        (moved_record,) = by_event["DICOM Instances Transferred"]
        assert moved_record["code"] == "110104" and moved_record["service"] == "move"
        assert (moved_record["destination"], moved_record["studies"]) == ("dest", [STUDY])
        alerts = {(r["what"], r.get("service")) for r in by_event["Security Alert"]}
        assert alerts == {("association rejected", None), ("service refused", "get")}
        assert all(r["code"] == "110113" for r in by_event["Security Alert"])
        (login,) = by_event["User Authentication"]
        assert (login["code"], login["outcome"]) == ("110114", "refused")
        (deleted,) = by_event["DICOM Study Deleted"]
        assert (deleted["code"], deleted["studies"], deleted["by"]) == (
            "110105",
            [STUDY],
            "operator",
        )
        assert len(by_event["Association Accepted"]) >= 4
        # Filters, and the human form.
        for_study = [json.loads(line) for line in
                     gw.cli("audit", "--json", "--study", STUDY).stdout.splitlines()]  # fmt: skip
        assert {r["event"] for r in for_study} == {"Import", "DICOM Instances Transferred",
                                                   "DICOM Study Deleted"}  # fmt: skip
        queries = gw.cli("audit", "--event", "110112").stdout.splitlines()
        assert len(queries) == 1 and "Query" in queries[0] and "WS1" in queries[0]
        refusal = next(r for r in by_event["Security Alert"] if r["what"] == "service refused")
        assert refusal["reason"] == "unknown caller may not use get"
        # Read by a pager or `head`: the reader going away ends it quietly.
        import sys

        piped = subprocess.run(
            f"set -o pipefail; {sys.executable} -m gateway audit --json --config {gw.config}"
            " | head -1",
            shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert piped.returncode == 0 and piped.stderr == "", piped.stderr
        assert json.loads(piped.stdout)["event"] == "Application Activity"
        # No patient name is written, only what the records above say.
        text = "".join(p.read_text() for p in (gw.data_dir / "audit").iterdir())
        assert "CompressedSamples" not in text and "Compressed*" not in text
        # The collector got every record as RFC 5424: <PRI>1 TIME HOST APP PROCID MSGID - MSG.
        received = []
        while len(received) < len(records):
            datagram = collector.recv(65536).decode()
            *header, structured, message = datagram.split(" ", 7)
            assert structured == "-"  # no structured data
            received.append((header, json.loads(message)))
        assert [message for _, message in received] == records
        for fields, message in received:
            alert = message["event"] == "Security Alert"
            assert fields[0] == ("<84>1" if alert else "<85>1")
            assert (fields[1], fields[3], fields[5]) == (message["time"], "dicom-gateway",
                                                         message["code"] or "-")  # fmt: skip
    finally:
        dest.stop()
        collector.close()
