"""Access by service: what a peer, a device's station and an unknown caller may use.

The gateway runs with the shipped defaults (`[security] default_services = ["echo",
"store"]`). DCMTK's tools call it under the AE titles of an unknown caller, of a peer limited
to some services, of a peer without `services`, and of a registered device's station; each
refused request is answered 0x0124 (Refused: Not Authorized) and logged, and the association
goes on (a pynetdicom requestor refused a C-FIND stores on the same association).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityPerformedProcedureStep,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import HOST, TEST_FILES, GatewayProcess, StoreSCP, dcmtk_env, require

CT = TEST_FILES / "CT_small.dcm"
STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
NOT_AUTHORIZED = 0x0124


def run(
    tool: str, *args: str, calling: str, gw: GatewayProcess, files: tuple[str, ...] = ()
) -> str:
    result = subprocess.run(
        [require(tool), "-v", "-aet", calling, "-aec", gw.ae_title, *args, HOST, str(gw.port),
         *files],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    return result.stdout + result.stderr


def find(gw: GatewayProcess, calling: str) -> str:
    return run("findscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
               calling=calling, gw=gw)  # fmt: skip


def worklist(gw: GatewayProcess, calling: str) -> str:
    return run("findscu", "-W", "-k", "ScheduledProcedureStepSequence[0].Modality=MR",
               calling=calling, gw=gw)  # fmt: skip


def move(gw: GatewayProcess, calling: str) -> str:
    return run("movescu", "-S", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={STUDY}", calling=calling, gw=gw)  # fmt: skip


def get(gw: GatewayProcess, calling: str, out: Path) -> str:
    return run("getscu", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={STUDY}", calling=calling, gw=gw)  # fmt: skip


def store(gw: GatewayProcess, calling: str) -> str:
    return run("storescu", calling=calling, gw=gw, files=(str(CT),))


def refused(output: str) -> bool:
    """DCMTK's tools print 0x0124 by its name or as "Unknown Status: 0x124"."""
    return bool(re.search(r"NotAuthorized|Status: 0x0?124\b", output, re.IGNORECASE))


def refusals(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in gw.log_text().splitlines()
        if line.startswith("{") and '"service_refused"' in line
    ]  # fmt: skip


@pytest.fixture
def dest(tmp_path: Path) -> Any:
    scp = StoreSCP(tmp_path / "dest")
    yield scp
    scp.stop()


def test_who_may_use_what(gateway_factory: Any, dest: StoreSCP, tmp_path: Path) -> None:
    peers = [
        {"name": "dest", "ae_title": "STORESCP", "host": HOST, "port": dest.port,
         "services": ["echo"]},
        {"name": "ws1", "ae_title": "WS1", "host": HOST, "port": dest.port,
         "services": ["echo", "find", "move"]},
        {"name": "pacs", "ae_title": "PACS", "host": HOST, "port": dest.port},
    ]  # fmt: skip
    gw = gateway_factory(peers=peers, security={"default_services": ["echo", "store"]})
    gw.call("devices.register", {"name": "MR 1", "modality": "MR", "station_ae": "MR1"})

    # An unknown caller: echo and store, nothing else.
    assert "Received Echo Response (Success)" in run("echoscu", calling="SOMEONE", gw=gw)
    assert "Received Store Response (Success)" in store(gw, "SOMEONE")
    assert refused(find(gw, "SOMEONE"))
    assert refused(move(gw, "SOMEONE"))
    assert refused(get(gw, "SOMEONE", tmp_path))
    assert refused(worklist(gw, "SOMEONE"))
    assert {(r["calling_ae"], r["service"]) for r in refusals(gw)} == {
        ("SOMEONE", "find"),
        ("SOMEONE", "move"),
        ("SOMEONE", "get"),
        ("SOMEONE", "worklist"),
    }
    assert all(r["status"] == "0x0124" for r in refusals(gw))
    assert "unknown caller may use echo, store" in refusals(gw)[0]["reason"]
    assert dest.files() == []

    # A peer limited to echo, find and move: it queries and retrieves, and may not store.
    output = find(gw, "WS1")
    assert not refused(output) and STUDY in output
    assert "Received Final Move Response (Success)" in move(gw, "WS1")
    assert len(dest.files()) == 1
    assert refused(get(gw, "WS1", tmp_path))
    assert refused(store(gw, "WS1"))

    # A peer without `services` may use them all.
    out = tmp_path / "pacs"
    out.mkdir()
    assert not refused(get(gw, "PACS", out))
    assert len(list(out.iterdir())) == 1

    # A registered device's station: worklist (and MPPS), not Q/R.
    output = worklist(gw, "MR1")
    assert not refused(output) and "Received Final Find Response (Success)" in output
    assert refused(find(gw, "MR1"))

    # A reload that gives WS1 C-GET lets it retrieve at once.
    peers[1]["services"] = ["echo", "find", "move", "get"]
    gw.write_config(peers=peers, security={"default_services": ["echo", "store"]})
    assert gw.call("rules.reload")["peers_changed"] == ["ws1"]
    out = tmp_path / "ws1"
    out.mkdir()
    assert not refused(get(gw, "WS1", out))
    assert len(list(out.iterdir())) == 1


def test_a_refused_request_leaves_the_association_going(gateway_factory: Any) -> None:
    """On one association an unknown caller's C-FIND and MPPS N-CREATE are refused 0x0124,
    and its C-STORE after them is stored."""
    import pydicom

    gw = gateway_factory(security={"default_services": ["echo", "store"]})
    ae = AE(ae_title="SOMEONE")
    for sop_class in (StudyRootQueryRetrieveInformationModelFind, CTImageStorage,
                      ModalityPerformedProcedureStep):  # fmt: skip
        ae.add_requested_context(sop_class)
    assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        assert [int(status.Status) for status, _ in responses] == [NOT_AUTHORIZED]
        mpps = Dataset()
        mpps.PerformedProcedureStepStatus = "IN PROGRESS"
        status, _ = assoc.send_n_create(mpps, ModalityPerformedProcedureStep, "1.2.826.0.1.9")
        assert int(status.Status) == NOT_AUTHORIZED
        stored = assoc.send_c_store(pydicom.dcmread(CT))
        assert int(stored.Status) == 0x0000
    finally:
        assoc.release()
    assert gw.call("status")["instances"] == 1
    assert {r["service"] for r in refusals(gw)} == {"find", "mpps"}
    (ended,) = [
        json.loads(line) for line in gw.log_text().splitlines()
        if line.startswith("{") and '"association_released"' in line
    ]  # fmt: skip
    assert (ended["stored"], ended["refused"]) == (1, 2)
