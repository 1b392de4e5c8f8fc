"""pydicom's real-world files through the gateway, with DCMTK `storescp` as the reference.

Every Part 10 file pydicom ships (odd syntaxes, big endian, retired classes, private sequences,
a dataset whose SOP class differs from its meta) is sent by DCMTK `dcmsend` to `storescp`, to
Orthanc and to the gateway. What `storescp` accepts the gateway accepts; what `storescp` answers
with a failure status the gateway answers with a failure status, never an aborted association.
The one difference is Orthanc's too: an instance without a Study or Series Instance UID (Type 1,
PS3.3 C.7.2.1 and C.7.3.1), which `storescp` writes to disk without looking, cannot be placed in
an index, and is refused with 0xC000.
Everything the gateway accepted comes back by C-MOVE: byte for byte to a destination that takes
every syntax, and with the same elements and decoded pixels to one that takes Implicit VR Little
Endian only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import (
    HOST,
    TEST_FILES,
    OrthancProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk_env,
    require,
)
from tests.scp.test_query_retrieve import (
    BitPreservingStoreSCP,
    index_rows,
    log_events,
    movescu,
    stored_dataset,
    stored_file,
)
from tests.scu.test_sender import IMPLICIT, assert_same_instance

FILES = sorted(TEST_FILES.glob("*.dcm"))


def dcmsend_outcomes(port: int, ae_title: str, report: Path) -> dict[str, str]:
    """`dcmsend` every file (going on past bad ones); per file name: ``success`` (a success or
    warning status), ``failure`` (any other status) or ``not sent`` (dcmsend found no context for
    it, or could not read it)."""
    result = subprocess.run(
        [require("dcmsend"), "-nh", "-aec", ae_title, "+crf", str(report), HOST, str(port),
         *map(str, FILES)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Abort" not in result.stdout + result.stderr, result.stdout + result.stderr
    outcomes = {path.name: "not sent" for path in FILES}
    for block in report.read_text().split("\n\n"):
        fields = {
            key.strip(): value.strip()
            for key, value in (line.split(" : ", 1) for line in block.splitlines() if " : " in line)
        }
        if "Filename" not in fields:
            continue
        status = re.match(r"0x([0-9a-fA-F]{4})", fields.get("DIMSE Status", ""))
        name = Path(fields["Filename"]).name
        if status is not None:
            code = int(status.group(1), 16)
            outcomes[name] = "success" if code == 0 or 0xB000 <= code <= 0xBFFF else "failure"
    return outcomes


def move_everything(gw: Any, destination: str) -> str:
    """C-MOVE every study the gateway holds to *destination*; movescu's final response."""
    studies = [uid for (uid,) in index_rows(gw, "SELECT study_uid FROM studies")]
    result = movescu(gw, destination, "S", "QueryRetrieveLevel=STUDY",
                     "StudyInstanceUID=" + "\\".join(studies))  # fmt: skip
    output = result.stdout + result.stderr
    assert "Received Final Move Response" in output, output
    return output[output.rindex("Received Final Move Response") :]


@pytest.mark.timeout(600)
def test_real_world_files_as_storescp_takes_them_and_back_by_c_move(
    gateway_factory: Any, tmp_path: Path
) -> None:
    reference = StoreSCP(tmp_path / "reference", ae_title="REFERENCE")
    everything = BitPreservingStoreSCP(tmp_path / "everything", tmp_path / "everything.log",
                                       ae_title="EVERYTHING")  # fmt: skip
    legacy = StoreSCP(tmp_path / "legacy", ae_title="LEGACY", syntaxes="+xi")
    orthanc = OrthancProcess(tmp_path / "orthanc")
    try:
        expected = dcmsend_outcomes(reference.port, "REFERENCE", tmp_path / "reference.txt")
        assert list(expected.values()).count("success") >= 50  # the bulk of them are valid
        assert expected["rtdose_rle.dcm"] == "failure"  # its meta names another class
        by_orthanc = dcmsend_outcomes(orthanc.port, orthanc.ae_title, tmp_path / "orthanc.txt")
        orthanc.terminate()  # no longer needed: it shuts down (~3 s) while the test goes on
        unplaceable = {name for name in expected if not _placeable(TEST_FILES / name)}
        assert unplaceable, "no file without Study or Series Instance UID: the test lost its case"
        for name in unplaceable:
            if expected[name] == "success":
                assert by_orthanc[name] == "failure", name
                expected[name] = "failure"
        gw = gateway_factory(peers=[
            {"name": "everything", "ae_title": "EVERYTHING", "host": HOST,
             "port": everything.port},
            {"name": "legacy", "ae_title": "LEGACY", "host": HOST, "port": legacy.port},
        ])  # fmt: skip
        got = dcmsend_outcomes(gw.port, gw.ae_title, tmp_path / "gateway.txt")
        assert got == expected
        held = dict(index_rows(gw, "SELECT sop_uid, transfer_syntax FROM instances"))
        accepted = {
            str(pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).SOPInstanceUID)
            for name, outcome in expected.items()
            if outcome == "success"
        }
        assert set(held) == accepted  # some files share a SOP Instance UID (re-sends)

        # Back to a destination that takes every syntax: each byte for byte as stored.
        final = move_everything(gw, "EVERYTHING")
        assert re.search(r"DIMSE Status\s*:\s*0x0000: Success", final), final
        assert re.search(rf"Completed Suboperations\s*:\s*{len(held)}\n", final), final
        received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in everything.files()}
        assert set(received) == set(held)
        for uid, path in received.items():
            assert dataset_bytes(path) == stored_dataset(gw, uid), uid

        # To an Implicit VR Little Endian only destination: each re-encoded, same elements and
        # decoded pixels. Pixel data that no installed decoder reads (two of pydicom's files
        # are broken on purpose: J2K fragments cut by a delimiter, a JPEG with scan parameters
        # only IJG tolerates) fails its sub-operation with the reason logged.
        undecodable = {uid for uid in held if not _decodable(stored_file(gw, uid))}
        assert len(undecodable) <= 2, undecodable
        final = move_everything(gw, "LEGACY")
        status = "0x0000: Success" if not undecodable else "0xb000: Warning"
        assert re.search(rf"DIMSE Status\s*:\s*{status}", final), final
        completed = len(held) - len(undecodable)
        assert re.search(rf"Completed Suboperations\s*:\s*{completed}\n", final), final
        assert re.search(rf"Failed Suboperations\s*:\s*{len(undecodable)}\n", final), final
        assert all(uid in final for uid in undecodable)  # Failed SOP Instance UID List
        not_sent = [e["reason"] for e in log_events(gw, "sub_operation_not_sent")]
        assert len(not_sent) == len(undecodable)
        assert all(r.startswith("transcode: ") and "cannot re-encode" in r for r in not_sent)
        received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in legacy.files()}
        assert set(received) == set(held) - undecodable
        for uid, path in received.items():
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == IMPLICIT, uid
            assert_same_instance(ds, stored_file(gw, uid))
    finally:
        for scp in (reference, everything, legacy):
            scp.stop()
        orthanc.stop()


def _decodable(path: Path) -> bool:
    """Whether pydicom, with the plugins the gateway has, decodes the file's pixel data."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds or not ds.file_meta.TransferSyntaxUID.is_compressed:
            return True
        try:
            ds.pixel_array  # noqa: B018
        except Exception:
            return False
    return True


def _placeable(path: Path) -> bool:
    """Whether a readable file has the UIDs an index places an instance by."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return True  # not a Part 10 file: dcmsend does not send it
    return all(ds.get(key) for key in ("StudyInstanceUID", "SeriesInstanceUID"))
