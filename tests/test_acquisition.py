"""Acquisition: devices, sequences and tasks over the control socket; DCMTK findscu -W on the
Modality Worklist; a pynetdicom MPPS SCU moving tasks through their states."""

from __future__ import annotations

import subprocess
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from gateway.errors import ControlError
from tests.conftest import HOST, GatewayProcess, dcmtk_env, require

TODAY = date.today()
TOMORROW = TODAY + timedelta(days=1)


def setup_site(gw: GatewayProcess) -> dict[str, Any]:
    mr = gw.call("devices.register", {"name": "MR scanner 1", "modality": "MR",
                                      "manufacturer": "ACME", "serial_number": "SN-1",
                                      "site": "Main", "station_ae": "MR1"})  # fmt: skip
    ct = gw.call("devices.register", {"name": "CT scanner", "modality": "CT",
                                      "station_ae": "CT1"})  # fmt: skip
    seq = gw.call("sequences.create", {"name": "T1 MPRAGE", "parameters": {"TR": 2300},
                                       "description": "3D T1"})  # fmt: skip
    first = gw.call("tasks.create", {
        "device_id": mr["id"], "sequence_id": seq["id"], "parameters": {"TE": 2.98},
        "patient": {"id": "P001", "name": "Doe^Jane", "birth_date": "19800101", "sex": "F"},
        "scheduled_at": f"{TODAY.isoformat()}T09:00:00",
    })  # fmt: skip
    second = gw.call("tasks.create", {
        "device_id": ct["id"], "sequence_id": seq["id"],
        "patient": {"id": "P002", "name": "Roe^Richard", "sex": "M"},
        "scheduled_at": f"{TOMORROW.isoformat()}T14:30:00",
    })  # fmt: skip
    return {"mr": mr, "ct": ct, "sequence": seq, "first": first, "second": second}


def findscu(gw: GatewayProcess, tmp_path: Path, *keys: str) -> list[Dataset]:
    out = tmp_path / f"wl-{len(list(tmp_path.glob('wl-*')))}"
    out.mkdir()
    defaults = [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
        "StudyInstanceUID", "RequestedProcedureID",
        "ScheduledProcedureStepSequence[0].Modality",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
    ]  # fmt: skip
    given = {k.split("=")[0] for k in keys}
    args = [a for k in (*keys, *(d for d in defaults if d not in given)) for a in ("-k", k)]
    result = subprocess.run(
        [require("findscu"), "-W", "-X", "-od", str(out), "-aet", "MR1", "-aec", gw.ae_title,
         HOST, str(gw.port), *args],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_devices_sequences_tasks_over_the_control_socket(gateway: GatewayProcess) -> None:
    site = setup_site(gateway)
    mr, first = site["mr"], site["first"]
    assert len(mr["token"]) >= 40 and mr["has_token"]
    listed = gateway.call("devices.list")["devices"]
    assert [d["name"] for d in listed] == ["CT scanner", "MR scanner 1"]
    assert all("token" not in d for d in listed)  # given once, never listed
    assert first["status"] == "NEW" and first["progress"] == 0
    assert first["study_uid"].startswith("2.25.") and first["accession_number"].startswith("GW")
    assert first["requested_procedure_id"] and first["sps_id"]
    assert (first["station_ae"], first["modality"], first["sequence"]) == ("MR1", "MR", "T1 MPRAGE")
    assert first["parameters"] == {"TE": 2.98}
    assert gateway.call("tasks.list", {"device_id": mr["id"]})["count"] == 1
    updated = gateway.call("devices.update", {"device_id": mr["id"], "site": "Annex"})
    assert updated["site"] == "Annex"
    rotated = gateway.call("devices.rotate_token", {"device_id": mr["id"]})
    assert rotated["token"] != mr["token"]
    assert gateway.call("devices.revoke", {"device_id": mr["id"]}) == {"id": mr["id"],
                                                                       "revoked": True}  # fmt: skip
    assert gateway.call("devices.get", {"device_id": mr["id"]})["has_token"] is False
    for method, params, code, message in (
        ("devices.register", {"name": "X"}, -32602, "'modality' is required"),
        ("devices.register", {"name": "X", "modality": "MR", "colour": "red"}, -32602, "colour"),
        ("tasks.create", {"device_id": "nope", "sequence_id": site["sequence"]["id"],
                          "patient": {"id": "P9"}}, -32004, "no device 'nope'"),
        ("tasks.create", {"device_id": mr["id"], "sequence_id": site["sequence"]["id"],
                          "patient": {"id": "P9", "birth_date": "1980-01-01"}}, -32602,
         "not a date YYYYMMDD"),
        ("sequences.create", {"name": "T1 MPRAGE"}, -32013, "exists"),
        ("tasks.get", {"task_id": "missing"}, -32004, "no task"),
    ):  # fmt: skip
        with pytest.raises(ControlError) as caught:
            gateway.call(method, params)
        assert caught.value.code == code and message in caught.value.message, caught.value.message


def test_findscu_sees_the_worklist_and_each_key_narrows_it(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    site = setup_site(gateway)
    first, second = site["first"], site["second"]
    items = findscu(gateway, tmp_path)
    assert sorted(i.PatientID for i in items) == ["P001", "P002"]
    item = next(i for i in items if i.PatientID == "P001")
    step = item.ScheduledProcedureStepSequence[0]
    assert (item.AccessionNumber, item.StudyInstanceUID, item.RequestedProcedureID) == (
        first["accession_number"],
        first["study_uid"],
        first["requested_procedure_id"],
    )
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledProcedureStepID) == (
        "MR",
        "MR1",
        first["sps_id"],
    )
    assert step.ScheduledProcedureStepStartDate == TODAY.strftime("%Y%m%d")
    assert str(item.PatientName) == "Doe^Jane" and item.PatientSex == "F"

    def ids(*keys: str) -> list[str]:
        return sorted(i.PatientID for i in findscu(gateway, tmp_path, *keys))

    today, tomorrow = TODAY.strftime("%Y%m%d"), TOMORROW.strftime("%Y%m%d")
    assert ids("ScheduledProcedureStepSequence[0].ScheduledStationAETitle=MR1") == ["P001"]
    assert ids("ScheduledProcedureStepSequence[0].Modality=CT") == ["P002"]
    assert ids(f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={today}") == [
        "P001"
    ]
    assert ids(
        f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={tomorrow}-"
    ) == ["P002"]
    assert ids(
        f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={today}-{tomorrow}"
    ) == ["P001", "P002"]
    assert (
        ids("ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20000101-20001231")
        == []
    )
    assert ids("PatientName=doe*") == ["P001"]  # wildcard, case-insensitive
    assert ids("PatientName=R?e^Richard") == ["P002"]
    assert ids(f"AccessionNumber={second['accession_number']}") == ["P002"]
    assert ids("AccessionNumber=NOPE") == []
    assert ids("PatientID=P001", "ScheduledProcedureStepSequence[0].Modality=CT") == []


def mpps_create(port: int, task: dict[str, Any], sop_uid: str | None) -> int:
    return mpps_create_response(port, task, sop_uid)[0]


def mpps_create_response(
    port: int, task: dict[str, Any], sop_uid: str | None
) -> tuple[int, str | None]:
    """N-CREATE IN PROGRESS for *task* (no Affected SOP Instance UID when *sop_uid* is None):
    the response's status and Affected SOP Instance UID."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MR1"
    ds.PerformedProcedureStepStartDate = TODAY.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = "090500"
    ds.PatientID = task["patient_id"]
    step = Dataset()
    step.StudyInstanceUID = task["study_uid"]
    step.AccessionNumber = task["accession_number"]
    step.RequestedProcedureID = task["requested_procedure_id"]
    step.ScheduledProcedureStepID = task["sps_id"]
    ds.ScheduledStepAttributesSequence = DicomSequence([step])
    answered: list[Any] = []

    def on_received(event: Any) -> None:  # the N-CREATE-RSP primitive, command set decoded
        answered.append(getattr(event.message.command_set, "AffectedSOPInstanceUID", None))

    status = _mpps(
        port,
        lambda assoc: assoc.send_n_create(ds, ModalityPerformedProcedureStep, sop_uid),
        handlers=[(evt.EVT_DIMSE_RECV, on_received)],
    )
    return status, (str(answered[-1]) if answered and answered[-1] else None)


def mpps_set(port: int, sop_uid: str, status: str, reason: str | None = None) -> int:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = TODAY.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = "093000"
    if reason:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "110514", "DCM", reason
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = DicomSequence([code])
    return _mpps(port, lambda assoc: assoc.send_n_set(ds, ModalityPerformedProcedureStep, sop_uid))


def _mpps(port: int, send: Any, handlers: list[Any] | None = None) -> int:
    ae = AE(ae_title="MR1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    # each call a separate association
    assoc = ae.associate(HOST, port, ae_title="GATEWAY", evt_handlers=handlers or [])
    assert assoc.is_established
    try:
        status, _ = send(assoc)
    finally:
        assoc.release()
    return int(status.Status)


def test_mpps_moves_tasks_through_their_states(gateway: GatewayProcess, tmp_path: Path) -> None:
    site = setup_site(gateway)
    first, second = site["first"], site["second"]

    def state(task: dict[str, Any]) -> tuple[str, int, str | None]:
        t = gateway.call("tasks.get", {"task_id": task["id"]})
        return t["status"], t["progress"], t["reason"]

    done, stopped = generate_uid(), generate_uid()
    assert mpps_create(gateway.port, first, done) == 0x0000
    assert state(first) == ("INPROGRESS", 0, None)
    assert [i.PatientID for i in findscu(gateway, tmp_path)] == ["P002"]  # no longer scheduled
    assert mpps_create(gateway.port, first, done) == 0x0111  # a repeated N-CREATE
    assert mpps_set(gateway.port, generate_uid(), "COMPLETED") == 0x0112  # unknown instance
    assert mpps_set(gateway.port, done, "COMPLETED") == 0x0000
    assert state(first) == ("FINISHED", 100, None)
    assert mpps_set(gateway.port, done, "DISCONTINUED") == 0x0110  # no longer updatable
    assert mpps_create(gateway.port, second, stopped) == 0x0000
    assert mpps_set(gateway.port, stopped, "DISCONTINUED", "Patient refused") == 0x0000
    assert state(second) == ("ERROR", 0, "Patient refused")
    assert findscu(gateway, tmp_path) == []


def test_mpps_n_create_without_an_instance_uid_gets_one(gateway: GatewayProcess) -> None:
    """PS3.7 10.1.5.1.4: the gateway assigns the Affected SOP Instance UID and returns it; the
    N-SET naming it finishes the task. A refused N-CREATE leaves the task as it was."""
    site = setup_site(gateway)
    first, second = site["first"], site["second"]
    status, assigned = mpps_create_response(gateway.port, first, None)
    assert status == 0x0000 and assigned is not None and len(assigned) <= 64
    assert gateway.call("tasks.get", {"task_id": first["id"]})["status"] == "INPROGRESS"
    assert mpps_set(gateway.port, assigned, "COMPLETED") == 0x0000
    assert gateway.call("tasks.get", {"task_id": first["id"]})["status"] == "FINISHED"
    given = generate_uid()
    assert mpps_create_response(gateway.port, second, given) == (0x0000, given)
    assert mpps_create(gateway.port, second, given) == 0x0111  # refused: nothing changes
    assert mpps_set(gateway.port, given, "DISCONTINUED", "Patient refused") == 0x0000
    assert gateway.call("tasks.get", {"task_id": second["id"]})["status"] == "ERROR"


def test_operator_cli(gateway: GatewayProcess, tmp_path: Path) -> None:
    import base64
    import json

    out = gateway.cli("devices", "register", "--name", "MR 2", "--modality", "MR",
                      "--station-ae", "MR2").stdout  # fmt: skip
    assert "(the token is shown once" in out
    device_id = out.split()[1]
    sequence = json.loads(gateway.cli("sequences", "create", "--name", "DWI", "--parameters",
                                      '{"b": [0, 1000]}', "--json").stdout)  # fmt: skip
    assert sequence["parameters"] == {"b": [0, 1000]}
    protocol = tmp_path / "dwi.exar1"
    protocol.write_bytes(b"<protocol b='1000'/>\n" * 50)
    attached = json.loads(gateway.cli("sequences", "create", "--name", "DWI file", "--file",
                                      str(protocol), "--json").stdout)  # fmt: skip
    assert attached["file"]["name"] == "dwi.exar1" and attached["file"]["size"] == 1050
    fetched = gateway.call("sequences.file", {"sequence_id": attached["id"]})
    assert base64.b64decode(fetched["data"]) == protocol.read_bytes()
    with pytest.raises(ControlError, match="sha256 does not match the data: nothing kept"):
        gateway.call(
            "sequences.create",
            {
                "name": "Bad",
                "file": {
                    "name": "x.txt",
                    "data": base64.b64encode(b"abc").decode(),
                    "sha256": "0" * 64,
                },
            },
        )
    assert not any(q["name"] == "Bad" for q in gateway.call("sequences.list")["sequences"])
    created = gateway.cli(
        "tasks", "create", "--device", device_id, "--sequence", sequence["id"],
        "--patient-id", "P7", "--patient-name", "Poe^Ed", "--sex", "M",
    ).stdout  # fmt: skip
    task_id = created.split()[1].rstrip(":")
    assert "accession GW" in created
    assert "NEW" in gateway.cli("tasks", "list", "--status", "NEW").stdout
    assert "Poe^Ed" in gateway.cli("tasks", "show", task_id).stdout
    cancelled = gateway.cli("tasks", "cancel", task_id, "--reason", "scanner down").stdout
    assert f"task {task_id}: ERROR (scanner down)" in cancelled
    bad = gateway.cli("tasks", "cancel", task_id, check=False)
    assert bad.returncode == 1 and "is ERROR, not NEW/STARTED/INPROGRESS" in bad.stderr
    assert "updated" in gateway.cli("devices", "update", device_id, "--site", "Annex").stdout
    assert (
        "MR 2" in gateway.cli("devices", "list").stdout
        and "Annex" in gateway.cli("devices", "list").stdout
    )
    assert "token revoked" in gateway.cli("devices", "revoke", device_id).stdout
