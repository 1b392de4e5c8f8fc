"""Outbound transfer syntaxes end to end: destinations that take Implicit VR Little Endian only.

DCMTK `storescp +xi` accepts Implicit VR Little Endian only, as many research and legacy
systems do. The gateway holds a study stored as Explicit VR Little Endian, one as
JPEG 2000, one as RLE and one as lossy JPEG baseline, each sent by `dcmsend` in its own syntax;
a routing rule, a C-MOVE, a C-GET and a retrieval forward must each deliver all four, re-encoded
(decompressed where stored compressed) with the same elements and the same decoded pixels
(`getscu` takes the uncompressed syntaxes, of which Explicit VR Little Endian is chosen). A peer
with ``transcode = false`` gets stored syntaxes only, and the C-MOVE fails with counts.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    StoreSCP,
    dcmtk_env,
    require,
)
from tests.scp.test_query_retrieve import index_rows, log_events, movescu
from tests.scu.test_sender import EXPLICIT, IMPLICIT, assert_same_instance
from tests.test_retrieve import Site
from tests.test_routing import wait_until

FILES = {
    name: TEST_FILES / name
    for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm")
}
HEADERS = {name: pydicom.dcmread(path, stop_before_pixels=True) for name, path in FILES.items()}
SOPS = {str(ds.SOPInstanceUID): name for name, ds in HEADERS.items()}
STUDIES = sorted({str(ds.StudyInstanceUID) for ds in HEADERS.values()})
STUDY_LIST = "\\".join(STUDIES)  # a list of UIDs in one key
LOSSY = "SC_rgb_jpeg_dcmtk.dcm"  # JPEG baseline: decompressed, never compressed again


def dcmsend(gw: GatewayProcess, *files: Path) -> None:
    """DCMTK dcmsend, each file in its own transfer syntax (never decompressed)."""
    result = subprocess.run(
        [require("dcmsend"), "-v", "-dn", "-aec", gw.ae_title, HOST, str(gw.port),
         *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "legacy", ae_title="LEGACY", syntaxes="+xi")
    yield scp
    scp.stop()


def peers(scp: StoreSCP) -> list[dict[str, Any]]:
    """The legacy destination twice: as LEGACY, and as STRICT with ``transcode = false``."""
    return [
        {"name": "legacy", "ae_title": "LEGACY", "host": HOST, "port": scp.port},
        {"name": "strict", "ae_title": "STRICT", "host": HOST, "port": scp.port,
         "transcode": False},
    ]  # fmt: skip


def assert_all_re_encoded(directory: Path, syntax: str = IMPLICIT) -> None:
    """*directory* holds the four instances, each in *syntax* with the elements and decoded
    pixels it was sent to the gateway with."""
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in directory.iterdir()}
    assert set(received) == set(SOPS)
    for uid, path in received.items():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax, SOPS[uid]
        assert_same_instance(ds, FILES[SOPS[uid]])
        if SOPS[uid] == LOSSY:
            assert ds.LossyImageCompression == "01"


def clear(directory: Path) -> None:
    for path in directory.iterdir():
        path.unlink()


def test_rule_move_and_get_to_implicit_only_destinations(
    gateway_factory: Any, legacy: StoreSCP, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=peers(legacy),
        rules=[{"name": "all", "match": 'Modality not in ["SR"]', "targets": ["legacy"],
                "quiet_seconds": 0.5}],
    )  # fmt: skip
    dcmsend(gw, *FILES.values())
    stored = dict(index_rows(gw, "SELECT sop_uid, transfer_syntax FROM instances"))
    assert stored == {
        uid: str(HEADERS[name].file_meta.TransferSyntaxUID) for uid, name in SOPS.items()
    }
    # The routing rule.
    try:
        wait_until(lambda: len(legacy.files()) == len(FILES), timeout=60)
    except AssertionError:
        raise AssertionError(gw.log_text()[-5000:] + str(gw.call("jobs.list", {}))) from None
    assert_all_re_encoded(legacy.directory)
    # A job is done once the last acknowledgement is recorded, just after the peer stored it.
    wait_until(lambda: "running" not in {j["state"] for j in gw.call("jobs.list", {})["jobs"]})
    jobs = gw.call("jobs.list", {})["jobs"]
    assert {job["state"] for job in jobs} == {"done"}, jobs

    # A C-MOVE of the four studies.
    clear(legacy.directory)
    keys = ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_LIST}")
    result = movescu(gw, "LEGACY", "S", *keys)
    output = result.stdout + result.stderr
    final = output[output.rindex("Received Final Move Response") :]
    assert re.search(r"DIMSE Status\s*:\s*0x0000: Success", final), final
    assert re.search(rf"Completed Suboperations\s*:\s*{len(FILES)}\n", final), final
    assert re.search(r"Failed Suboperations\s*:\s*0\n", final), final
    assert_all_re_encoded(legacy.directory)

    # The same destination configured with transcode = false: every sub-operation fails (it
    # takes none of the stored syntaxes), 0xA702 with the counts, each failure logged.
    clear(legacy.directory)
    result = movescu(gw, "STRICT", "S", *keys)
    output = result.stdout + result.stderr
    final = output[output.rindex("Received Final Move Response") :]
    assert re.search(r"DIMSE Status\s*:\s*0xa702", final), final
    assert re.search(rf"Failed Suboperations\s*:\s*{len(FILES)}\n", final), final
    assert legacy.files() == []
    not_sent = log_events(gw, "sub_operation_not_sent")
    assert len(not_sent) == len(FILES)
    assert all("(transcode = false: stored syntaxes only)" in e["reason"] for e in not_sent)

    # A C-GET by DCMTK getscu, which takes the storage role for the uncompressed syntaxes only
    # (Explicit VR Little and Big Endian, Implicit VR): Explicit VR Little Endian is preferred.
    out = tmp_path / "getscu"
    out.mkdir()
    result = subprocess.run(
        [require("getscu"), "-v", "+B", "-S", "-aec", gw.ae_title, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY_LIST}",
         HOST, str(gw.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(rf"Number of Completed Suboperations\s*:\s*{len(FILES)}\b", output), output
    assert re.search(r"Number of Failed Suboperations\s*:\s*0\b", output), output
    assert_all_re_encoded(out, EXPLICIT)


def test_retrieval_forward_to_an_implicit_only_anonymiser(
    gateway_factory: Any, legacy: StoreSCP, tmp_path: Path
) -> None:
    """The VNA (Orthanc) holds the four studies in their own syntaxes; the gateway retrieves
    them (stored as received) and forwards them to an anonymiser that takes Implicit only."""
    site = Site(gateway_factory, tmp_path, anonymiser=legacy)
    try:
        site.vna.upload(*FILES.values())
        site.gw.call("retrieve.submit", {"project": "P1", "requests": [
            {"study_uid": study} for study in STUDIES
        ]})  # fmt: skip
        status = site.wait_settled()
        assert status["counts"]["Successful"] == len(STUDIES), status
        stored = dict(index_rows(site.gw, "SELECT sop_uid, transfer_syntax FROM instances"))
        assert stored == {
            uid: str(HEADERS[name].file_meta.TransferSyntaxUID) for uid, name in SOPS.items()
        }
        assert_all_re_encoded(legacy.directory)
    finally:
        site.stop()
