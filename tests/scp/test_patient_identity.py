"""Patient identity: studies under one Patient ID that name different patients stay apart.

Sent with DCMTK storescu and queried with DCMTK findscu against a gateway process: every study
is answered with the patient attributes it was received with, matching on them finds it, the
PATIENT level lists each identity once, and the conflict is logged and shown by `studies show`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from tests.conftest import TEST_FILES, write_variant
from tests.scp.test_query_retrieve import findscu, log_events, storescu

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"
ROOT = "1.2.826.0.1.3680043.8.498"


def test_one_placeholder_patient_id_two_patients(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory("identity")
    common = {"PatientID": "UNKNOWN", "PatientSex": "O"}
    doe = write_variant(CT, tmp_path / "doe.dcm", PatientName="Doe^Jane",
                        PatientBirthDate="19700101", **common)  # fmt: skip
    roe = write_variant(MR, tmp_path / "roe.dcm", PatientName="Roe^Richard",
                        PatientBirthDate="19800202", **common)  # fmt: skip
    doe2 = write_variant(
        MR, tmp_path / "doe2.dcm", PatientName="Doe^Jane", PatientBirthDate="19700101",
        StudyInstanceUID=f"{ROOT}.9001", SeriesInstanceUID=f"{ROOT}.9001.1",
        SOPInstanceUID=f"{ROOT}.9001.1.1", **common,
    )  # fmt: skip
    sent = storescu(gw, doe, roe, doe2)
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    study_of = {
        name: str(findscu(gw, "S", "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={sop}",
                          "StudyInstanceUID", workdir=tmp_path)[0].StudyInstanceUID)
        for name, sop in (("doe", _sop(doe)), ("roe", _sop(roe)), ("doe2", _sop(doe2)))
    }  # fmt: skip

    answers = findscu(
        gw, "S", "QueryRetrieveLevel=STUDY", "PatientID=UNKNOWN", "PatientName",
        "PatientBirthDate", "StudyInstanceUID", workdir=tmp_path,
    )  # fmt: skip
    assert {(str(a.StudyInstanceUID), str(a.PatientName), a.PatientBirthDate) for a in answers} == {
        (study_of["doe"], "Doe^Jane", "19700101"),
        (study_of["roe"], "Roe^Richard", "19800202"),
        (study_of["doe2"], "Doe^Jane", "19700101"),
    }
    by_name = findscu(gw, "S", "QueryRetrieveLevel=STUDY", "PatientName=ROE*",
                      "StudyInstanceUID", workdir=tmp_path)  # fmt: skip
    assert [str(a.StudyInstanceUID) for a in by_name] == [study_of["roe"]]
    by_birth = findscu(gw, "S", "QueryRetrieveLevel=STUDY", "PatientBirthDate=19700101",
                       "StudyInstanceUID", workdir=tmp_path)  # fmt: skip
    assert {str(a.StudyInstanceUID) for a in by_birth} == {study_of["doe"], study_of["doe2"]}
    for keys in (
        ["QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={_sop(roe)}"],
        ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_of['roe']}"],
    ):
        (answer,) = findscu(gw, "S", *keys, "PatientName", workdir=tmp_path)
        assert str(answer.PatientName) == "Roe^Richard"

    patients = findscu(
        gw, "P", "QueryRetrieveLevel=PATIENT", "PatientID=UNKNOWN", "PatientName",
        "PatientBirthDate", "NumberOfPatientRelatedStudies", workdir=tmp_path,
    )  # fmt: skip
    assert sorted((str(p.PatientName), int(p.NumberOfPatientRelatedStudies)) for p in patients) == [
        ("Doe^Jane", 2),
        ("Roe^Richard", 1),
    ]

    conflicts = log_events(gw, "patient_identity_conflict")
    assert conflicts and all(c["level"] == "warning" for c in conflicts)
    assert {(c["study_instance_uid"], c["other_study_instance_uid"]) for c in conflicts} >= {
        (study_of["roe"], study_of["doe"])
    }
    shown = gw.call("studies.get", {"study_uid": study_of["roe"]})
    assert shown["patient_name"] == "Roe^Richard"
    (other,) = shown["patient_conflicts"]
    assert other["patient_name"] == "Doe^Jane" and other["studies"] == 2
    assert set(other["study_uids"]) == {study_of["doe"], study_of["doe2"]}
    text = gw.cli("studies", "show", study_of["roe"]).stdout
    assert "patient_conflict" in text and "Doe^Jane" in text and "2 studies" in text


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
