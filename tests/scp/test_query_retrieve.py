"""Query/Retrieve against a running gateway process: C-FIND, C-MOVE, C-GET and C-CANCEL.

The peers are DCMTK (findscu, movescu into storescp, getscu) and pynetdicom. One gateway, fed with
real files from pydicom's test data, serves the read-only tests of this module; the C-CANCEL test
starts a gateway of its own.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import (
    CHARSET_FILES,
    HOST,
    TEST_FILES,
    GatewayProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk_env,
    free_port,
    require,
    wait_for_port,
    write_variant,
)

CT = TEST_FILES / "CT_small.dcm"  # CT, explicit VR little endian
MR = TEST_FILES / "MR_small.dcm"  # MR, explicit VR little endian
NM = TEST_FILES / "JPEG2000.dcm"  # secondary capture, JPEG 2000
SC = TEST_FILES / "SC_rgb_rle.dcm"  # secondary capture, RLE
JP = CHARSET_FILES / "chrH31.dcm"  # ISO 2022 IR 87: Yamada^Tarou=山田^太郎=やまだ^たろう


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


_CT, _MR, _NM, _SC, _JP = map(_header, (CT, MR, NM, SC, JP))
CT_STUDY, MR_STUDY, NM_STUDY, SC_STUDY, JP_STUDY = (
    str(ds.StudyInstanceUID) for ds in (_CT, _MR, _NM, _SC, _JP)
)
ALL_STUDIES = {CT_STUDY, MR_STUDY, NM_STUDY, SC_STUDY, JP_STUDY}
CT_SERIES = str(_CT.SeriesInstanceUID)
CT_SOP, MR_SOP, NM_SOP, SC_SOP = (str(ds.SOPInstanceUID) for ds in (_CT, _MR, _NM, _SC))
# A second series in the CT study: two more instances, Modality OT.
CT2_SERIES = generate_uid(entropy_srcs=["query-retrieve", "ct-series-2"])
CT2_SOPS = [generate_uid(entropy_srcs=["query-retrieve", "ct-series-2", str(n)]) for n in (1, 2)]
CT_STUDY_SOPS = [CT_SOP, *CT2_SOPS]
INSTANCES = 7

SUCCESS, PENDING, CANCEL = 0x0000, 0xFF00, 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801


def ct2_copies(directory: Path) -> list[Path]:
    """The second series of the CT study (CT2_SERIES, CT2_SOPS, as OT), written to *directory*."""
    return [
        write_variant(
            CT, directory / f"ct2_{n}.dcm", SeriesInstanceUID=CT2_SERIES, SOPInstanceUID=uid,
            SeriesNumber=2, InstanceNumber=n, Modality="OT",
        )
        for n, uid in enumerate(CT2_SOPS, start=1)
    ]  # fmt: skip


def _unable_to_process(status: int) -> bool:
    """The failure class of an identifier that cannot be answered: 0xCxxx."""
    return 0xC000 <= status <= 0xCFFF


# -- peers -----------------------------------------------------------------------------------


def _run(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=dcmtk_env(), timeout=timeout
    )


def storescu(gw: GatewayProcess, *files: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        [require("storescu"), "-R", "-aec", gw.ae_title, HOST, str(gw.port), *map(str, files)]
    )


def _keys(keys: Sequence[str]) -> list[str]:
    return [arg for key in keys for arg in ("-k", key)]


def findscu(gw: GatewayProcess, model: str, *keys: str, workdir: Path) -> list[Dataset]:
    """DCMTK findscu (`model` "S" or "P"): the response identifiers, extracted with -X."""
    out = Path(tempfile.mkdtemp(prefix="find", dir=workdir))
    result = _run(
        [require("findscu"), f"-{model}", "-aec", gw.ae_title, "-X", "-od", str(out),
         *_keys(keys), HOST, str(gw.port)],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed" not in result.stderr, result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def movescu(
    gw: GatewayProcess, destination: str, model: str, *keys: str
) -> subprocess.CompletedProcess[str]:
    return _run(
        [require("movescu"), "-d", f"-{model}", "-aec", gw.ae_title, "-aem", destination,
         *_keys(keys), HOST, str(gw.port)],
    )  # fmt: skip


def index_rows(gw: GatewayProcess, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(gw.data_dir / "index.sqlite") as conn:
        return conn.execute(sql, params).fetchall()


def stored_file(gw: GatewayProcess, sop_uid: str) -> Path:
    """The file the gateway holds for *sop_uid*, found through its index."""
    rows = index_rows(gw, "SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,))
    assert len(rows) == 1, sop_uid
    return gw.data_dir / rows[0][0]


def stored_dataset(gw: GatewayProcess, sop_uid: str) -> bytes:
    """The dataset bytes of the file the gateway holds for *sop_uid*."""
    return dataset_bytes(stored_file(gw, sop_uid))


def log_events(gw: GatewayProcess, event: str) -> list[dict[str, Any]]:
    """The gateway's JSON log records of *event* (other lines are pynetdicom's)."""
    records = []
    for line in gw.log_text().splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            records.append(json.loads(line))
    return records


def _identifier(**keys: Any) -> Dataset:
    """A Q/R identifier; values are not validated (some tests send bad ones on purpose)."""
    ds = Dataset()
    for keyword, value in keys.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE))
    return ds


def _associate(gw: GatewayProcess, contexts: list[Any], **kwargs: Any) -> Any:
    ae = AE(ae_title="PYQRSCU")
    assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title, contexts=contexts, **kwargs)
    assert assoc.is_established
    return assoc


def c_store(gw: GatewayProcess, path: Path) -> int:
    """pynetdicom C-STORE of a file, in its own transfer syntax."""
    ds = pydicom.dcmread(path)
    assoc = _associate(gw, [build_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)])
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def c_find(gw: GatewayProcess, identifier: Dataset, model: Any) -> list[tuple[int, Any]]:
    """pynetdicom C-FIND: every (status, identifier) response."""
    assoc = _associate(gw, [build_context(model)])
    try:
        return [(int(status.Status), ds) for status, ds in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def c_move(gw: GatewayProcess, identifier: Dataset, destination: str, model: Any) -> list[Dataset]:
    """pynetdicom C-MOVE: every response's status dataset."""
    assoc = _associate(gw, [build_context(model)])
    try:
        return [status for status, _ in assoc.send_c_move(identifier, destination, model)]
    finally:
        assoc.release()


@dataclass
class GetResult:
    responses: list[Dataset]  # the status datasets, the final one last
    received: dict[str, bytes]  # SOP Instance UID: the dataset bytes as sent
    syntaxes: dict[str, str]  # SOP Instance UID: the transfer syntax it came in

    @property
    def final(self) -> Dataset:
        return self.responses[-1]


def c_get(
    gw: GatewayProcess,
    identifier: Dataset,
    model: Any,
    *,
    store_delay: float = 0.0,
    cancel_after: int | None = None,
) -> GetResult:
    """pynetdicom C-GET, taking the storage SCP role for every (SOP class, transfer syntax) the
    gateway holds; C-CANCEL after *cancel_after* pending responses when given."""
    pairs = index_rows(gw, "SELECT DISTINCT sop_class_uid, transfer_syntax FROM instances")
    contexts = [build_context(model)] + [build_context(cls, ts) for cls, ts in sorted(pairs)]
    roles = [build_role(cls, scp_role=True) for cls in sorted({cls for cls, _ in pairs})]
    result = GetResult([], {}, {})

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        result.received[uid] = event.request.DataSet.getvalue()
        result.syntaxes[uid] = str(event.context.transfer_syntax)
        time.sleep(store_delay)
        return SUCCESS

    assoc = _associate(gw, contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        (context_id,) = (
            cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == model
        )
        pending = 0
        for status, _ in assoc.send_c_get(identifier, model, msg_id=7):
            result.responses.append(status)
            if status.Status == PENDING:
                pending += 1
                if pending == cancel_after:
                    assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    return result


# -- the gateway under test ------------------------------------------------------------------


class BitPreservingStoreSCP(StoreSCP):
    """DCMTK `storescp +xa +B -v`: each dataset is written exactly as it was received (plain
    `storescp` re-encodes, e.g. the lengths of sequences and items); its log tells how many
    associations it received."""

    def __init__(self, directory: Path, log: Path, ae_title: str = "STORESCP") -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.ae_title = ae_title
        self.port = free_port()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [require("storescp"), "-v", "+xa", "+B", "-aet", ae_title, "-od", str(directory),
                 str(self.port)],
                env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_port(self.port, 10, self.proc)
        deadline = time.monotonic() + 10
        while self.associations() == 0:  # wait_for_port's connection: let it be logged first
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        self.seen = self.associations()

    def associations(self) -> int:
        return self.log.read_text().count("Association Received")

    def new_associations(self) -> int:
        """Associations received since the last call."""
        count, self.seen = self.associations() - self.seen, self.associations()
        return count


@dataclass
class Archive:
    gw: GatewayProcess
    scp: BitPreservingStoreSCP  # a configured peer: the move destination


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """A gateway holding 5 patients / 5 studies / 6 series / 7 instances, with storescp as a peer.

    The CT study has two series: CT_small.dcm and two copies of it in a series of Modality OT.
    """
    root = tmp_path_factory.mktemp("query_retrieve")
    scp = BitPreservingStoreSCP(root / "storescp", root / "storescp.log")
    peer = {"name": "dest", "ae_title": scp.ae_title, "host": HOST, "port": scp.port}
    gw = GatewayProcess(root / "gw", peers=[peer])
    try:
        gw.start()
        result = storescu(gw, CT, *ct2_copies(root), MR, JP)
        assert result.returncode == 0 and "Failed" not in result.stderr, result.stderr
        for path in (NM, SC):  # storescu -R offers only uncompressed syntaxes for these
            assert c_store(gw, path) == SUCCESS, path.name
        assert gw.call("status")["instances"] == INSTANCES
        yield Archive(gw, scp)
    finally:
        gw.stop()
        scp.stop()


@pytest.fixture
def dest(archive: Archive) -> BitPreservingStoreSCP:
    """The module's storescp, emptied of what earlier tests moved into it."""
    for path in archive.scp.files():
        path.unlink()
    archive.scp.new_associations()
    return archive.scp


def _received(scp: StoreSCP) -> dict[str, Path]:
    files = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.files()
    }
    assert len(files) == len(scp.files())
    return files


def _public(ds: Dataset) -> dict[Any, Any]:
    """The values of a dataset's public elements."""
    return {elem.tag: elem.value for elem in ds if not elem.tag.is_private}


def _as_list(value: Any) -> list[str]:
    """A multi-valued element's values; one value as a list of one."""
    return [value] if isinstance(value, str) else [str(v) for v in value]


# -- C-FIND with findscu -------------------------------------------------------------------------


def test_find_study_root_universal_match_and_computed_keys(
    archive: Archive, tmp_path: Path
) -> None:
    responses = findscu(
        archive.gw, "S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID",
        "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances", workdir=tmp_path,
    )  # fmt: skip
    by_study = {str(ds.StudyInstanceUID): ds for ds in responses}
    assert len(responses) == 5
    assert set(by_study) == ALL_STUDIES
    for ds in responses:
        assert ds.QueryRetrieveLevel == "STUDY"
        assert ds.RetrieveAETitle == archive.gw.ae_title
        assert ds.SpecificCharacterSet == "ISO_IR 192"
    ct = by_study[CT_STUDY]
    assert (ct.PatientID, ct.StudyDate) == ("1CT1", "20040119")
    assert _as_list(ct.ModalitiesInStudy) == ["CT", "OT"]
    assert (ct.NumberOfStudyRelatedSeries, ct.NumberOfStudyRelatedInstances) == (2, 3)
    mr = by_study[MR_STUDY]
    assert (mr.PatientID, mr.StudyDate) == ("4MR1", "20040826")
    assert _as_list(mr.ModalitiesInStudy) == ["MR"]
    assert (mr.NumberOfStudyRelatedSeries, mr.NumberOfStudyRelatedInstances) == (1, 1)
    assert by_study[JP_STUDY].StudyDate == ""  # empty in the file: returned empty


def test_find_patient_root_patient_level(archive: Archive, tmp_path: Path) -> None:
    everyone = findscu(archive.gw, "P", "QueryRetrieveLevel=PATIENT", "PatientID", workdir=tmp_path)
    assert sorted(str(ds.PatientID) for ds in everyone) == sorted(
        ["1CT1", "4MR1", "8NM1", "ID1", "H31EXAMPLE"]
    )
    (ct,) = findscu(
        archive.gw, "P", "QueryRetrieveLevel=PATIENT", "PatientID=1CT1", "PatientName",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances", workdir=tmp_path,
    )  # fmt: skip
    assert ct.QueryRetrieveLevel == "PATIENT"
    assert str(ct.PatientName) == "CompressedSamples^CT1"
    assert (
        ct.NumberOfPatientRelatedStudies,
        ct.NumberOfPatientRelatedSeries,
        ct.NumberOfPatientRelatedInstances,
    ) == (1, 2, 3)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("PatientID=4MR1", {MR_STUDY}),
        ("PatientName=CompressedSamples*", {CT_STUDY, MR_STUDY, NM_STUDY}),
        ("PatientName=CompressedSamples^?R1", {MR_STUDY}),
        ("PatientName=*^NM?", {NM_STUDY}),
        ("PatientName=compressedsamples^ct1", {CT_STUDY}),  # PN: case-insensitive
        ("PatientName=Yamada^Tarou", {JP_STUDY}),  # one component group of three
        ("PatientName=Nobody*", set()),
        ("StudyDate=20040826", {MR_STUDY, NM_STUDY}),
        ("StudyDate=20040101-20041231", {CT_STUDY, MR_STUDY, NM_STUDY}),
        ("StudyDate=20040826-", {MR_STUDY, NM_STUDY, SC_STUDY}),
        ("StudyDate=-20040119", {CT_STUDY}),
        (f"StudyInstanceUID={CT_STUDY}\\{SC_STUDY}", {CT_STUDY, SC_STUDY}),
        ("ModalitiesInStudy=OT", {CT_STUDY, SC_STUDY, JP_STUDY}),
        ("ModalitiesInStudy=MR\\NM", {MR_STUDY, NM_STUDY}),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else None,
)
def test_find_study_level_matching(
    archive: Archive, tmp_path: Path, key: str, expected: set[str]
) -> None:
    responses = findscu(
        archive.gw, "S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", key, workdir=tmp_path
    )
    assert {str(ds.StudyInstanceUID) for ds in responses} == expected
    keyword = key.split("=")[0]
    if keyword != "StudyInstanceUID":
        assert all(keyword in ds for ds in responses)  # the matching key is returned


def test_find_series_level(archive: Archive, tmp_path: Path) -> None:
    keys = ("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
    study = findscu(
        archive.gw, "S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={CT_STUDY}", *keys,
        workdir=tmp_path,
    )  # fmt: skip
    assert {
        (str(ds.SeriesInstanceUID), ds.Modality, ds.SeriesNumber, ds.NumberOfSeriesRelatedInstances)
        for ds in study
    } == {(CT_SERIES, "CT", 1, 1), (CT2_SERIES, "OT", 2, 2)}
    assert all(ds.StudyInstanceUID == CT_STUDY for ds in study)
    patient = findscu(
        archive.gw, "P", "QueryRetrieveLevel=SERIES", "PatientID=1CT1",
        f"StudyInstanceUID={CT_STUDY}", "SeriesInstanceUID", "Modality=OT", workdir=tmp_path,
    )  # fmt: skip
    assert [str(ds.SeriesInstanceUID) for ds in patient] == [CT2_SERIES]
    assert patient[0].PatientID == "1CT1"


def test_find_image_level(archive: Archive, tmp_path: Path) -> None:
    study = findscu(
        archive.gw, "S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={CT_STUDY}",
        f"SeriesInstanceUID={CT2_SERIES}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
        workdir=tmp_path,
    )  # fmt: skip
    assert sorted((str(ds.SOPInstanceUID), ds.InstanceNumber) for ds in study) == sorted(
        zip(CT2_SOPS, (1, 2), strict=True)
    )
    assert all(ds.SOPClassUID == _CT.SOPClassUID for ds in study)
    # A UID list at IMAGE level, narrowed by the keys above it: MR_SOP is not in that series.
    patient = findscu(
        archive.gw, "P", "QueryRetrieveLevel=IMAGE", "PatientID=1CT1",
        f"StudyInstanceUID={CT_STUDY}", f"SeriesInstanceUID={CT2_SERIES}",
        f"SOPInstanceUID={CT2_SOPS[1]}\\{MR_SOP}", workdir=tmp_path,
    )  # fmt: skip
    assert [str(ds.SOPInstanceUID) for ds in patient] == [CT2_SOPS[1]]


def test_find_romanised_name_returns_the_name_in_utf8(archive: Archive, tmp_path: Path) -> None:
    (ds,) = findscu(
        archive.gw, "P", "QueryRetrieveLevel=PATIENT", "PatientName=Yamada^Tarou", "PatientID",
        workdir=tmp_path,
    )  # fmt: skip
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == str(_JP.PatientName)
    assert ds.PatientName.ideographic == "山田^太郎"
    assert ds.PatientID == "H31EXAMPLE"


@pytest.mark.parametrize("name", ["山田^太郎", "やまだ^*"])
def test_find_japanese_name_with_pynetdicom(archive: Archive, name: str) -> None:
    query = _identifier(
        SpecificCharacterSet="ISO_IR 192", QueryRetrieveLevel="PATIENT", PatientName=name,
        PatientID="",
    )  # fmt: skip
    responses = c_find(archive.gw, query, PatientRootQueryRetrieveInformationModelFind)
    assert [status for status, _ in responses] == [PENDING, SUCCESS]
    match = responses[0][1]
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert str(match.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert match.PatientName.phonetic == "やまだ^たろう"
    assert match.PatientID == "H31EXAMPLE"


# -- C-MOVE -------------------------------------------------------------------------------------

RETRIEVES = [
    pytest.param("S", ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={CT_STUDY}"),
                 CT_STUDY_SOPS, id="study"),
    pytest.param("S", ("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={CT_STUDY}",
                       f"SeriesInstanceUID={CT2_SERIES}"), CT2_SOPS, id="series"),
    pytest.param("P", ("QueryRetrieveLevel=IMAGE", "PatientID=1CT1", f"StudyInstanceUID={CT_STUDY}",
                       f"SeriesInstanceUID={CT2_SERIES}", f"SOPInstanceUID={CT2_SOPS[1]}"),
                 CT2_SOPS[1:], id="image-patient-root"),
    pytest.param("S", ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={NM_STUDY}\\{SC_STUDY}"),
                 [NM_SOP, SC_SOP], id="jpeg2000-and-rle-studies"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "keys", "expected"), RETRIEVES)
def test_move_with_movescu_into_storescp(
    archive: Archive,
    dest: BitPreservingStoreSCP,
    model: str,
    keys: tuple[str, ...],
    expected: list[str],
) -> None:
    result = movescu(archive.gw, dest.ae_title, model, *keys)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    final = output[output.rindex("Received Final Move Response") :]  # movescu -d dumps it
    assert re.search(r"DIMSE Status\s*:\s*0x0000: Success", final), final
    assert re.search(rf"Completed Suboperations\s*:\s*{len(expected)}\n", final), final
    assert re.search(r"Failed Suboperations\s*:\s*0\n", final), final
    assert output.count("Received Move Response") == len(expected)  # one Pending each
    assert dest.new_associations() == 1
    received = _received(dest)
    assert set(received) == set(expected)
    for uid, path in received.items():
        assert dataset_bytes(path) == stored_dataset(archive.gw, uid), uid


@pytest.mark.parametrize("destination", ["NOWHERE", "dest"])  # "dest": the peer's name, no AE
def test_move_to_unknown_destination(
    archive: Archive, dest: BitPreservingStoreSCP, destination: str
) -> None:
    query = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=CT_STUDY)
    responses = c_move(archive.gw, query, destination, StudyRootQueryRetrieveInformationModelMove)
    assert [int(status.Status) for status in responses] == [MOVE_DESTINATION_UNKNOWN]
    assert dest.new_associations() == 0
    assert dest.files() == []
    unknown = log_events(archive.gw, "move_destination_unknown")
    assert destination in {record["destination"] for record in unknown}


# -- C-GET --------------------------------------------------------------------------------------

_GET_MODELS = {"S": StudyRootQueryRetrieveInformationModelGet,
               "P": PatientRootQueryRetrieveInformationModelGet}  # fmt: skip


@pytest.mark.parametrize(("model", "keys", "expected"), RETRIEVES)
def test_get_with_pynetdicom(
    archive: Archive, model: str, keys: tuple[str, ...], expected: list[str]
) -> None:
    query = _identifier(**dict(key.split("=", 1) for key in keys))
    result = c_get(archive.gw, query, _GET_MODELS[model])
    statuses = [int(status.Status) for status in result.responses]
    assert statuses == [PENDING] * len(expected) + [SUCCESS]
    remaining = [status.NumberOfRemainingSuboperations for status in result.responses[:-1]]
    assert remaining == list(range(len(expected) - 1, -1, -1))
    final = result.final
    assert final.NumberOfCompletedSuboperations == len(expected)
    assert final.NumberOfFailedSuboperations == 0
    assert final.NumberOfWarningSuboperations == 0
    assert set(result.received) == set(expected)
    stored_syntax = dict(index_rows(archive.gw, "SELECT sop_uid, transfer_syntax FROM instances"))
    for uid, data in result.received.items():
        assert data == stored_dataset(archive.gw, uid), uid
        assert result.syntaxes[uid] == stored_syntax[uid]


def test_get_with_getscu(archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "getscu"
    out.mkdir()
    result = _run(
        [require("getscu"), "-v", "+B", "-S", "-aec", archive.gw.ae_title, "-od", str(out),
         *_keys(("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={CT_STUDY}",
                 f"SeriesInstanceUID={CT2_SERIES}")),
         HOST, str(archive.gw.port)],
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Number of Completed Suboperations\s*:\s*2\b", output), output
    assert re.search(r"Number of Failed Suboperations\s*:\s*0\b", output), output
    files = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert set(files) == set(CT2_SOPS)
    for uid, path in files.items():
        got, stored = pydicom.dcmread(path), pydicom.dcmread(stored_file(archive.gw, uid))
        if got.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID:
            assert dataset_bytes(path) == stored_dataset(archive.gw, uid), uid
        else:  # getscu offers several syntaxes per class: the gateway converts to the accepted one
            assert _public(got) == _public(stored), uid


def test_get_cancel_is_honoured(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory("cancel")
    series = generate_uid()
    copies = [
        write_variant(CT, tmp_path / f"copy{n:02}.dcm", SeriesInstanceUID=series,
                      SOPInstanceUID=generate_uid(), InstanceNumber=n)
        for n in range(1, 61)
    ]  # fmt: skip
    sent = storescu(gw, *copies)
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    assert gw.call("status")["instances"] == 60
    query = _identifier(
        QueryRetrieveLevel="SERIES", StudyInstanceUID=CT_STUDY, SeriesInstanceUID=series
    )
    # Each C-STORE takes the requestor 20 ms: the C-CANCEL lands long before the 60th.
    result = c_get(
        gw, query, StudyRootQueryRetrieveInformationModelGet, store_delay=0.02, cancel_after=1
    )
    final = result.final
    assert final.Status == CANCEL
    completed = final.NumberOfCompletedSuboperations
    assert 1 <= completed < 60
    assert final.NumberOfRemainingSuboperations == 60 - completed
    assert final.NumberOfFailedSuboperations == 0
    assert len(result.received) == completed
    for uid, data in result.received.items():
        assert data == stored_dataset(gw, uid)
    assert '"get_cancelled"' in gw.log_text()


# -- the cap on C-FIND answers --------------------------------------------------------------------


def test_find_answers_capped_with_findscu(gateway_factory: Any, tmp_path: Path) -> None:
    """`[node] max_find_results` = 2 on 3 studies: findscu gets 2 answers and the final status
    0xFE00; a query inside one study (a unique key named) is answered whole."""
    gw = gateway_factory("capped", node={"max_find_results": 2})
    sent = storescu(gw, CT, *ct2_copies(tmp_path), MR, JP)
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    out = tmp_path / "answers"
    out.mkdir()
    result = _run(
        [require("findscu"), "-v", "-S", "-aec", gw.ae_title, "-X", "-od", str(out),
         *_keys(["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]), HOST, str(gw.port)],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Final Find Response (Cancel" in result.stdout + result.stderr
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert len(answers) == 2
    assert {a.StudyInstanceUID for a in answers} < {CT_STUDY, MR_STUDY, JP_STUDY}
    (capped,) = log_events(gw, "find_results_capped")
    assert capped["level"] == "warning" and capped["sent"] == 2
    assert "node.max_find_results" in capped["reason"]
    whole = findscu(
        gw, "S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={CT_STUDY}", "SOPInstanceUID",
        workdir=tmp_path,
    )  # fmt: skip
    assert {str(ds.SOPInstanceUID) for ds in whole} == set(CT_STUDY_SOPS)
    assert len(log_events(gw, "find_results_capped")) == 1


# -- identifiers that cannot be answered ----------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "model", "reason"),
    [
        ({"PatientID": "1CT1"}, StudyRootQueryRetrieveInformationModelFind,
         "QueryRetrieveLevel is missing"),
        ({"QueryRetrieveLevel": "FRAME", "PatientID": "1CT1"},
         StudyRootQueryRetrieveInformationModelFind, "is not one of"),
        ({"QueryRetrieveLevel": "PATIENT", "PatientID": "1CT1"},
         StudyRootQueryRetrieveInformationModelFind, "not in the Study Root model"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2004-2005-2006"},
         PatientRootQueryRetrieveInformationModelFind, "not a valid range"),
    ],
    ids=["no-level", "unknown-level", "patient-level-study-root", "bad-range"],
)  # fmt: skip
def test_find_bad_identifier_fails(
    archive: Archive, keys: dict[str, str], model: Any, reason: str
) -> None:
    responses = c_find(archive.gw, _identifier(**keys), model)
    assert [status for status, _ in responses] == [0xC000]
    assert any(reason in record["reason"] for record in log_events(archive.gw, "query_refused"))


@pytest.mark.parametrize(
    ("keys", "model", "reason"),
    [
        ({"QueryRetrieveLevel": "STUDY", "PatientID": "1CT1"},
         StudyRootQueryRetrieveInformationModelMove, "StudyInstanceUID is missing"),
        ({"QueryRetrieveLevel": "SERIES", "PatientID": "1CT1", "StudyInstanceUID": CT_STUDY},
         PatientRootQueryRetrieveInformationModelMove, "SeriesInstanceUID is missing"),
    ],
    ids=["study-without-study-uid", "series-without-series-uid"],
)  # fmt: skip
def test_move_without_unique_key_fails(
    archive: Archive, dest: BitPreservingStoreSCP, keys: dict[str, str], model: Any, reason: str
) -> None:
    responses = c_move(archive.gw, _identifier(**keys), dest.ae_title, model)
    assert len(responses) == 1
    assert _unable_to_process(responses[0].Status)
    assert dest.new_associations() == 0  # the destination is not even connected to
    assert dest.files() == []
    assert any(reason in record["reason"] for record in log_events(archive.gw, "move_refused"))


def test_get_study_level_without_study_uid_fails(archive: Archive) -> None:
    query = _identifier(QueryRetrieveLevel="STUDY", PatientID="1CT1")
    result = c_get(archive.gw, query, StudyRootQueryRetrieveInformationModelGet)
    assert len(result.responses) == 1
    assert _unable_to_process(result.final.Status)
    assert result.final.NumberOfCompletedSuboperations == 0
    assert result.received == {}
    refused = log_events(archive.gw, "get_refused")
    assert any("StudyInstanceUID is missing" in record["reason"] for record in refused)


class _CTOnlySCP:
    """A pynetdicom storage SCP that accepts CT Image Storage only (DCMTK storescp cannot be
    narrowed to one class without a configuration file)."""

    def __init__(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import CTImageStorage, Verification

        self.received: list[str] = []
        self.ae = AE(ae_title="CTONLY")
        self.ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.port = free_port()
        self.server = self.ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _final_move(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    return output[output.rindex("Received Final Move Response") :]


def test_move_to_a_destination_that_refuses_a_sop_class(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """The destination accepts CT only. Moving the MR study: the association is made, the one
    sub-operation fails, final 0xA702 with the count (never 0xA801, which says the destination
    is unknown). Moving both studies: CT arrives, MR fails, final 0xB000 with the counts."""
    dest = _CTOnlySCP()
    try:
        gw = gateway_factory("moves", peers=[{"name": "ctonly", "ae_title": "CTONLY",
                                              "host": HOST, "port": dest.port}])  # fmt: skip
        sent = storescu(gw, CT, MR)
        assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
        final = _final_move(movescu(gw, "CTONLY", "S", "QueryRetrieveLevel=STUDY",
                                    f"StudyInstanceUID={MR_STUDY}"))  # fmt: skip
        assert re.search(r"DIMSE Status\s*:\s*0xa702", final), final
        assert re.search(r"Completed Suboperations\s*:\s*0\n", final), final
        assert re.search(r"Failed Suboperations\s*:\s*1\n", final), final
        assert MR_SOP in final  # Failed SOP Instance UID List
        assert dest.received == []
        final = _final_move(movescu(gw, "CTONLY", "S", "QueryRetrieveLevel=STUDY",
                                    f"StudyInstanceUID={CT_STUDY}\\{MR_STUDY}"))  # fmt: skip
        assert re.search(r"DIMSE Status\s*:\s*0xb000", final), final
        assert re.search(r"Completed Suboperations\s*:\s*1\n", final), final
        assert re.search(r"Failed Suboperations\s*:\s*1\n", final), final
        assert dest.received == [CT_SOP]
        (failed,) = log_events(gw, "move_failed")
        assert "stored none of the 1 instances" in failed["reason"]
    finally:
        dest.stop()


# -- wildcards that cannot stall the node --------------------------------------------------------


def test_pathological_wildcard_answers_at_once(
    gateway_factory: Any, tmp_path: Path, wildcard_files: list[Path]
) -> None:
    """2,000 patients whose names are 64 characters (the PN maximum) of one letter; a
    PatientName query of many ``*`` would backtrack for hours in Python's `re`, once per
    patient. RE2 matches in time linear in the name: findscu has the 77 answers (the names
    ending in B) in well under a second, and another pattern finds the names ending in Z."""
    gw = gateway_factory("wildcards")
    sent = storescu(gw, *wildcard_files)
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    assert gw.call("status")["patients"] == 2000
    started = time.monotonic()
    answers = findscu(gw, "S", "QueryRetrieveLevel=STUDY", "PatientName=*a*a*a*a*a*a*a*a*ab",
                      "PatientID", workdir=tmp_path)  # fmt: skip
    elapsed = time.monotonic() - started
    assert sorted(str(ds.PatientID) for ds in answers) == [
        f"WILD{n:04}" for n in range(2000) if n % 26 == 1
    ]
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    answers = findscu(gw, "S", "QueryRetrieveLevel=STUDY", "PatientName=*a?a*a*a*a*a*a*aZ",
                      "PatientID", workdir=tmp_path)  # fmt: skip
    assert sorted(str(ds.PatientID) for ds in answers) == [
        f"WILD{n:04}" for n in range(2000) if n % 26 == 25
    ]
    # A C-CANCEL after the first answer of a query matching all 2,000: the gateway stops
    # reading the index and answers 0xFE00; far fewer than 2,000 answers came.
    query = _identifier(QueryRetrieveLevel="PATIENT", PatientID="WILD*", PatientName="")
    assoc = _associate(gw, [build_context(PatientRootQueryRetrieveInformationModelFind)])
    statuses: list[int] = []
    try:
        (context_id,) = (cx.context_id for cx in assoc.accepted_contexts)
        for status, _ in assoc.send_c_find(
            query, PatientRootQueryRetrieveInformationModelFind, msg_id=9
        ):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(9, context_id)
    finally:
        assoc.release()
    assert statuses[-1] == CANCEL and statuses[:-1] == [PENDING] * (len(statuses) - 1)
    assert len(statuses) < 1000, len(statuses)
    assert '"find_cancelled"' in gw.log_text()
