"""C-FIND matching and C-MOVE / C-GET selection over a store holding real and synthesised files."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterable
from io import BytesIO
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest
import pytest_asyncio
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from gateway.errors import GatewayError, InvalidInstance, RejectedInstance
from gateway.store.index import Provenance
from gateway.store.query import (
    QueryError,
    _compile,
    _pn_match,
    find,
    prepare_connection,
    retrieve_filter,
    stream_capped,
)
from gateway.store.store import Store

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
REAL_FILES = [
    "test_files/CT_small.dcm",  # 1CT1, study 20040119 072730, CT
    "test_files/MR_small.dcm",  # 4MR1, study 20040826 185059, MR
    "test_files/rtplan.dcm",  # id00001, study 20030716 153557
    "test_files/rtdose.dcm",  # id11111, study 20030805 115747
    "test_files/waveform_ecg.dcm",  # 642341, study 20130125 105919
    "test_files/examples_overlay.dcm",  # 021234567, study 20051130 132645.921000
    "charset_files/chrH31.dcm",  # Yamada^Tarou=山田^太郎=やまだ^たろう
    "charset_files/chrH32.dcm",  # ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう
    "charset_files/chrJapMulti.dcm",  # やまだ^たろう, study 20080504 171715
    "charset_files/chrI2.dcm",  # Hong^Gildong=洪^吉洞=홍^길동
    "charset_files/chrX1.dcm",  # Wang^XiaoDong=王^小東=
    "charset_files/chrGerm.dcm",  # Äneas^Rüdiger
    "charset_files/chrRuss.dcm",
    "charset_files/chrFren.dcm",
    "charset_files/chrSQEncoding.dcm",  # no SOPClassUID: refused by ingest, skipped
]
SKIPPED = {"charset_files/chrSQEncoding.dcm"}

ROOT = "1.2.826.0.1.3680043.8.498.77."
MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PT_CLASS = "1.2.840.10008.5.1.4.1.1.128"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"

PATIENTS = {
    "SYN1": ("Doe^John", "19700101", "M"),
    "SYN2": ("doe^jane", "19800202", "F"),
    "SYN3": ("DOE^JOHNNY", "19900303", "M"),
}
# study number: patient, date, time, accession, study id, description, referring physician
STUDIES = {
    1: ("SYN1", "20040315", "101530.5", "ACC-1", "ST1", "Brain [MRI]", "Smith^Anna"),
    2: ("SYN1", "20041231", "2359", "ACC-2", "ST2", "Chest", "Jones^Bob"),
    3: ("SYN2", "20050101", "000000", "acc-3", "ST3", "Whole body", None),
    4: ("SYN3", "20031231", "120000", "ACC-4", "ST4", "Abdomen", None),
}
# (study, series): modality, series number, description, body part, SOP class, instance numbers
SERIES = {
    (1, 1): ("MR", 1, "T1 axial", "HEAD", MR_CLASS, (1, 2)),
    (1, 2): ("MR", 2, "T2 axial", "HEAD", MR_CLASS, (1,)),
    (1, 3): ("SR", 99, "Report", None, SR_CLASS, (1,)),
    (2, 1): ("CT", 1, "Chest CT", "CHEST", CT_CLASS, (1,)),
    (3, 1): ("PT", 1, "PET WB", "WHOLEBODY", PT_CLASS, (1,)),
    (4, 1): ("CT", 1, "Abdomen CT", "ABDOMEN", CT_CLASS, (1,)),
    (4, 2): ("PT", 2, "Abdomen PT", "ABDOMEN", PT_CLASS, (1,)),
}
ALL_STUDIES = 18  # 6 real test files, 8 charset files, 4 synthesised


def study_uid(study: int) -> str:
    return f"{ROOT}{study}"


def series_uid(study: int, series: int) -> str:
    return f"{ROOT}{study}.{series}"


def sop_uid(study: int, series: int, number: int) -> str:
    return f"{ROOT}{study}.{series}.{number}"


def synthesised() -> Iterable[dict[str, Any]]:
    """The attributes of each synthesised instance."""
    for (study, series), (modality, number, desc, body, sop_class, numbers) in SERIES.items():
        pid, date, time, accession, sid, sdesc, referring = STUDIES[study]
        name, birth, sex = PATIENTS[pid]
        for instance in numbers:
            attrs: dict[str, Any] = {
                "SOPClassUID": sop_class,
                "SOPInstanceUID": sop_uid(study, series, instance),
                "StudyInstanceUID": study_uid(study),
                "SeriesInstanceUID": series_uid(study, series),
                "PatientID": pid,
                "PatientName": name,
                "PatientBirthDate": birth,
                "PatientSex": sex,
                "StudyDate": date,
                "StudyTime": time,
                "AccessionNumber": accession,
                "StudyID": sid,
                "StudyDescription": sdesc,
                "Modality": modality,
                "SeriesNumber": number,
                "SeriesDescription": desc,
                "InstanceNumber": instance,
            }
            if referring:
                attrs["ReferringPhysicianName"] = referring
            if body:
                attrs["BodyPartExamined"] = body
            yield attrs


def write_part10(path: Path, attrs: dict[str, Any]) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = attrs["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


async def populate(data_dir: Path) -> None:
    store = Store(data_dir)
    await store.open()
    try:
        for name in REAL_FILES:
            temp = store.files.new_temp_path()
            shutil.copyfile(PYDICOM_DATA / name, temp)
            try:
                await store.ingest(temp, Provenance())
            except InvalidInstance:
                assert name in SKIPPED
                temp.unlink(missing_ok=True)
        for attrs in synthesised():
            temp = store.files.new_temp_path()
            write_part10(temp, attrs)
            await store.ingest(temp, Provenance())
    finally:
        await store.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store populated once per module; each test opens a copy of it."""
    data_dir = tmp_path_factory.mktemp("query") / "data"
    asyncio.run(populate(data_dir))
    return data_dir


@pytest_asyncio.fixture
async def store(template: Path, tmp_path: Path) -> AsyncIterator[Store]:
    data_dir = tmp_path / "data"
    shutil.copytree(template, data_dir)
    opened = Store(data_dir)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def unvalidated(ds: Dataset, keyword: str, value: str) -> Dataset:
    """Add a value pydicom would warn about (a malformed one, as a peer may send)."""
    ds[keyword] = DataElement(keyword, dictionary_VR(keyword), value, validation_mode=config.IGNORE)
    return ds


def values(results: list[Dataset], keyword: str) -> list[Any]:
    return [ds[keyword].value for ds in results]


def over_the_wire(ds: Dataset) -> Dataset:
    """*ds* encoded and decoded as a DIMSE identifier is (implicit VR little endian)."""
    data = encode(ds, True, True)
    assert data is not None
    decoded = decode(BytesIO(data), True, True)
    assert isinstance(decoded, Dataset)
    return decoded


# -- levels -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_store_holds_what_the_fixture_ingested(store: Store) -> None:
    counts = await store.counts()
    assert counts["patients"] == 17
    assert counts["studies"] == ALL_STUDIES
    assert counts["instances"] == 6 + 8 + 8


@pytest.mark.asyncio
async def test_patient_level_with_computed_counts(store: Store) -> None:
    results = await find(
        store,
        "patient",
        identifier(
            "PATIENT",
            PatientID="SYN*",
            PatientName="",
            PatientSex="",
            PatientBirthDate="",
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
        ),
    )
    assert values(results, "PatientID") == ["SYN1", "SYN2", "SYN3"]
    assert [str(v) for v in values(results, "PatientName")] == [
        "Doe^John",
        "doe^jane",
        "DOE^JOHNNY",
    ]
    assert values(results, "PatientSex") == ["M", "F", "M"]
    assert values(results, "PatientBirthDate") == ["19700101", "19800202", "19900303"]
    assert values(results, "NumberOfPatientRelatedStudies") == [2, 1, 1]
    assert values(results, "NumberOfPatientRelatedSeries") == [4, 1, 2]
    assert values(results, "NumberOfPatientRelatedInstances") == [5, 1, 2]
    first = results[0]
    assert first.QueryRetrieveLevel == "PATIENT"
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert first["NumberOfPatientRelatedStudies"].VR == "IS"
    assert "StudyInstanceUID" not in first


@pytest.mark.asyncio
@pytest.mark.parametrize("model", ["patient", "study"])
async def test_study_level_in_both_models(store: Store, model: Any) -> None:
    results = await find(
        store,
        model,
        identifier(
            "STUDY",
            PatientID="SYN1",
            PatientName="",
            StudyInstanceUID="",
            StudyDate="",
            StudyTime="",
            AccessionNumber="",
            StudyDescription="",
            ReferringPhysicianName="",
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
        ),
    )
    assert values(results, "StudyInstanceUID") == [study_uid(1), study_uid(2)]
    assert values(results, "StudyDate") == ["20040315", "20041231"]
    assert values(results, "StudyTime") == ["101530.5", "2359"]
    assert values(results, "AccessionNumber") == ["ACC-1", "ACC-2"]
    assert values(results, "StudyDescription") == ["Brain [MRI]", "Chest"]
    assert [str(v) for v in values(results, "ReferringPhysicianName")] == [
        "Smith^Anna",
        "Jones^Bob",
    ]
    assert list(results[0].ModalitiesInStudy) == ["MR", "SR"]
    assert results[1].ModalitiesInStudy == "CT"
    assert values(results, "NumberOfStudyRelatedSeries") == [3, 1]
    assert values(results, "NumberOfStudyRelatedInstances") == [4, 1]
    assert {str(v) for v in values(results, "PatientName")} == {"Doe^John"}
    assert all(ds.QueryRetrieveLevel == "STUDY" for ds in results)


@pytest.mark.asyncio
async def test_patient_root_study_level_returns_the_patient_id(store: Store) -> None:
    results = await find(store, "patient", identifier("STUDY", StudyID="ST3"))
    assert len(results) == 1
    assert results[0].PatientID == "SYN2"
    assert results[0].StudyInstanceUID == study_uid(3)
    assert results[0].StudyID == "ST3"
    study_root = await find(store, "study", identifier("STUDY", StudyID="ST3"))
    assert "PatientID" not in study_root[0]
    assert study_root[0].StudyInstanceUID == study_uid(3)


@pytest.mark.asyncio
@pytest.mark.parametrize("model", ["patient", "study"])
async def test_series_level(store: Store, model: Any) -> None:
    results = await find(
        store,
        model,
        identifier(
            "SERIES",
            StudyInstanceUID=study_uid(1),
            SeriesInstanceUID="",
            Modality="",
            SeriesNumber="",
            SeriesDescription="",
            BodyPartExamined="",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    assert values(results, "SeriesInstanceUID") == [series_uid(1, n) for n in (1, 2, 3)]
    assert values(results, "Modality") == ["MR", "MR", "SR"]
    assert values(results, "SeriesNumber") == [1, 2, 99]
    assert values(results, "SeriesDescription") == ["T1 axial", "T2 axial", "Report"]
    assert values(results, "BodyPartExamined") == ["HEAD", "HEAD", None]
    assert values(results, "NumberOfSeriesRelatedInstances") == [2, 1, 1]
    assert values(results, "StudyInstanceUID") == [study_uid(1)] * 3
    assert results[0]["SeriesNumber"].VR == "IS"
    if model == "patient":
        assert values(results, "PatientID") == ["SYN1"] * 3
    else:
        assert "PatientID" not in results[0]


@pytest.mark.asyncio
async def test_study_root_series_query_without_study_uid_is_answered(store: Store) -> None:
    results = await find(store, "study", identifier("SERIES", Modality="SR"))
    assert values(results, "SeriesInstanceUID") == [series_uid(1, 3)]
    assert values(results, "StudyInstanceUID") == [study_uid(1)]


@pytest.mark.asyncio
@pytest.mark.parametrize("model", ["patient", "study"])
async def test_image_level(store: Store, model: Any) -> None:
    results = await find(
        store,
        model,
        identifier(
            "IMAGE",
            StudyInstanceUID=study_uid(1),
            SeriesInstanceUID=series_uid(1, 1),
            SOPInstanceUID="",
            SOPClassUID="",
            InstanceNumber="",
        ),
    )
    assert values(results, "SOPInstanceUID") == [sop_uid(1, 1, 1), sop_uid(1, 1, 2)]
    assert values(results, "SOPClassUID") == [MR_CLASS, MR_CLASS]
    assert values(results, "InstanceNumber") == [1, 2]
    assert values(results, "SeriesInstanceUID") == [series_uid(1, 1)] * 2
    assert values(results, "StudyInstanceUID") == [study_uid(1)] * 2
    assert all(ds.QueryRetrieveLevel == "IMAGE" for ds in results)
    second = await find(
        store, model, identifier("IMAGE", SeriesInstanceUID=series_uid(1, 1), InstanceNumber="2")
    )
    assert values(second, "SOPInstanceUID") == [sop_uid(1, 1, 2)]


@pytest.mark.asyncio
async def test_image_level_of_a_real_file(store: Store) -> None:
    ct = pydicom.dcmread(PYDICOM_DATA / "test_files/CT_small.dcm", stop_before_pixels=True)
    results = await find(
        store, "study", identifier("IMAGE", StudyInstanceUID=ct.StudyInstanceUID, SOPClassUID="")
    )
    assert values(results, "SOPInstanceUID") == [ct.SOPInstanceUID]
    assert values(results, "SOPClassUID") == [CT_CLASS]
    assert values(results, "SeriesInstanceUID") == [ct.SeriesInstanceUID]


# -- matching ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_universal_matching_returns_every_study(store: Store) -> None:
    empty = await find(store, "study", identifier("STUDY", StudyDescription=""))
    star = await find(store, "study", identifier("STUDY", StudyDescription="*"))
    assert len(empty) == ALL_STUDIES
    assert values(star, "StudyInstanceUID") == values(empty, "StudyInstanceUID")
    descriptions = values(empty, "StudyDescription")
    assert "Brain [MRI]" in descriptions
    assert None in descriptions  # studies without a description are returned, key empty


@pytest.mark.asyncio
async def test_single_value_matching_is_case_sensitive_except_for_names(store: Store) -> None:
    found = await find(store, "study", identifier("STUDY", AccessionNumber="ACC-1"))
    assert values(found, "StudyInstanceUID") == [study_uid(1)]
    assert await find(store, "study", identifier("STUDY", AccessionNumber="acc-1")) == []
    by_name = await find(store, "patient", identifier("PATIENT", PatientName="doe^john"))
    assert values(by_name, "PatientID") == ["SYN1"]
    upper = await find(store, "patient", identifier("PATIENT", PatientName="DOE^JANE"))
    assert values(upper, "PatientID") == ["SYN2"]
    referring = await find(store, "study", identifier("STUDY", ReferringPhysicianName="SMITH^anna"))
    assert values(referring, "StudyInstanceUID") == [study_uid(1)]


@pytest.mark.asyncio
async def test_single_value_matching_of_series_numbers_and_unique_keys(store: Store) -> None:
    numbered = await find(store, "study", identifier("SERIES", SeriesNumber="99"))
    assert values(numbered, "SeriesInstanceUID") == [series_uid(1, 3)]
    by_uid = await find(store, "study", identifier("SERIES", SeriesInstanceUID=series_uid(4, 2)))
    assert values(by_uid, "StudyInstanceUID") == [study_uid(4)]
    assert "Modality" not in by_uid[0]  # not requested


@pytest.mark.asyncio
async def test_wildcard_matching(store: Store) -> None:
    star = await find(store, "patient", identifier("PATIENT", PatientName="doe^j*"))
    assert values(star, "PatientID") == ["SYN1", "SYN2", "SYN3"]
    question = await find(store, "patient", identifier("PATIENT", PatientName="Doe^J???"))
    assert values(question, "PatientID") == ["SYN1", "SYN2"]
    accession = await find(store, "study", identifier("STUDY", AccessionNumber="ACC-?"))
    assert values(accession, "AccessionNumber") == ["ACC-1", "ACC-2", "ACC-4"]
    middle = await find(store, "study", identifier("STUDY", StudyDescription="*o*y"))
    assert values(middle, "StudyDescription") == ["Whole body"]
    series = await find(store, "study", identifier("SERIES", SeriesDescription="T? axial"))
    assert values(series, "SeriesInstanceUID") == [series_uid(1, 1), series_uid(1, 2)]


@pytest.mark.asyncio
async def test_brackets_are_literal(store: Store) -> None:
    exact = await find(store, "study", identifier("STUDY", StudyDescription="Brain [MRI]"))
    assert values(exact, "StudyInstanceUID") == [study_uid(1)]
    wildcard = await find(store, "study", identifier("STUDY", StudyDescription="Brain [M*]"))
    assert values(wildcard, "StudyInstanceUID") == [study_uid(1)]
    # As a GLOB class "[MRI]" would match one letter; DICOM has no classes.
    assert await find(store, "study", identifier("STUDY", StudyDescription="Brain [MRI]*x")) == []
    assert await find(store, "study", identifier("STUDY", StudyDescription="Brain M*")) == []


@pytest.mark.asyncio
async def test_values_are_bound_not_formatted(store: Store) -> None:
    hostile = "x' OR '1'='1"
    assert await find(store, "study", identifier("STUDY", PatientID=hostile)) == []
    assert await find(store, "study", identifier("STUDY", PatientName=hostile)) == []
    dated = unvalidated(identifier("STUDY"), "StudyDate", "2004' OR '1'='1")
    assert await find(store, "study", dated) == []


@pytest.mark.asyncio
async def test_date_range_matching(store: Store) -> None:
    year = await find(
        store, "study", identifier("STUDY", StudyDate="20040101-20041231", StudyID="")
    )
    assert values(year, "StudyID") == ["1CT1", "4MR1", "ST1", "ST2"]
    after = await find(store, "study", identifier("STUDY", StudyDate="20050101-"))
    assert values(after, "StudyDate") == ["20130125", "20051130", "20080504", "20050101"]
    before = await find(store, "study", identifier("STUDY", StudyDate="-20031231"))
    assert values(before, "StudyDate") == ["20030716", "20030805", "20031231"]
    single = await find(store, "study", identifier("STUDY", StudyDate="20041231"))
    assert values(single, "StudyInstanceUID") == [study_uid(2)]
    assert await find(store, "study", identifier("STUDY", StudyDate="20041231-20040101")) == []
    born = await find(store, "patient", identifier("PATIENT", PatientBirthDate="19750101-19850101"))
    assert values(born, "PatientID") == ["SYN2"]


@pytest.mark.asyncio
async def test_time_range_matching(store: Store) -> None:
    morning = await find(store, "study", identifier("STUDY", StudyTime="1000-1100"))
    assert values(morning, "StudyTime") == ["105919", "101530.5"]
    early = await find(store, "study", identifier("STUDY", StudyTime="-0800"))
    assert values(early, "StudyTime") == ["072730", "000000"]
    # "2359" is the minute 23:59; it overlaps a range starting at 23:59:30
    late = await find(store, "study", identifier("STUDY", StudyTime="235930-", StudyID=""))
    assert values(late, "StudyID") == ["ST2"]
    fraction = await find(
        store, "study", identifier("STUDY", StudyTime="101530.4-101530.6", StudyID="")
    )
    assert values(fraction, "StudyID") == ["ST1"]
    assert await find(store, "study", identifier("STUDY", StudyTime="101530.6-101600")) == []
    noon = await find(store, "study", identifier("STUDY", StudyTime="1200", StudyID=""))
    assert values(noon, "StudyID") == ["ST4"]
    to_noon = await find(store, "study", identifier("STUDY", StudyTime="1130-1200", StudyID="ST*"))
    assert values(to_noon, "StudyID") == ["ST4"]


@pytest.mark.asyncio
async def test_uid_list_matching(store: Store) -> None:
    ds = identifier("STUDY", StudyDescription="")
    ds.StudyInstanceUID = [study_uid(3), study_uid(1), "1.2.3.404"]
    results = await find(store, "study", ds)
    assert values(results, "StudyInstanceUID") == [study_uid(1), study_uid(3)]
    assert values(results, "StudyDescription") == ["Brain [MRI]", "Whole body"]
    images = identifier("IMAGE", StudyInstanceUID=study_uid(1))
    images.SOPInstanceUID = [sop_uid(1, 1, 2), sop_uid(1, 3, 1)]
    found = await find(store, "study", over_the_wire(images))
    assert values(found, "SOPInstanceUID") == [sop_uid(1, 1, 2), sop_uid(1, 3, 1)]


@pytest.mark.asyncio
async def test_modalities_in_study_matches_any_modality(store: Store) -> None:
    sr = await find(store, "study", identifier("STUDY", ModalitiesInStudy="SR"))
    assert values(sr, "StudyInstanceUID") == [study_uid(1)]
    assert list(sr[0].ModalitiesInStudy) == ["MR", "SR"]  # every modality, not the matched one
    ds = identifier("STUDY", PatientID="SYN*", StudyID="")
    ds.ModalitiesInStudy = ["PT", "SR"]
    listed = await find(store, "study", ds)
    assert values(listed, "StudyID") == ["ST1", "ST3", "ST4"]
    assert [
        list(v) if not isinstance(v, str) else [v] for v in values(listed, "ModalitiesInStudy")
    ] == [
        ["MR", "SR"],
        ["PT"],
        ["CT", "PT"],
    ]
    rt = unvalidated(identifier("STUDY", StudyID=""), "ModalitiesInStudy", "RT*")
    wildcard = await find(store, "study", rt)
    assert values(wildcard, "StudyID") == ["study1", "S1"]


@pytest.mark.asyncio
async def test_keys_of_lower_levels_and_unknown_keys_are_returned_empty(store: Store) -> None:
    ds = identifier(
        "STUDY",
        AccessionNumber="ACC-2",
        SeriesDescription="no such series",
        SOPInstanceUID="1.2.3",
        InstitutionName="Nowhere",
        PatientAge="",
    )
    ds.ReferencedStudySequence = []
    results = await find(store, "study", ds)
    assert values(results, "StudyInstanceUID") == [study_uid(2)]
    result = results[0]
    assert result.SeriesDescription is None
    assert result.SOPInstanceUID is None
    assert result.InstitutionName is None
    assert result.PatientAge is None
    assert len(result.ReferencedStudySequence) == 0
    assert result.AccessionNumber == "ACC-2"


@pytest.mark.asyncio
async def test_limit_keeps_the_first_matches_in_order(store: Store) -> None:
    results = await find(store, "patient", identifier("PATIENT", PatientID="SYN*"), limit=2)
    assert values(results, "PatientID") == ["SYN1", "SYN2"]


async def streamed(
    store: Store, model: str, ds: Dataset, cap: int, cancelled: Any = lambda: False
) -> tuple[list[Dataset], bool]:
    """`stream_capped` iterated in a worker thread, as an association's thread does."""
    found = stream_capped(store, model, ds, cap, cancelled=cancelled)  # type: ignore[arg-type]
    matches = await anyio.to_thread.run_sync(lambda: list(found))
    return matches, found.truncated


@pytest.mark.asyncio
async def test_stream_capped_cuts_broad_queries_only(store: Store) -> None:
    broad = await streamed(store, "patient", identifier("PATIENT", PatientID="SYN*"), 2)
    assert (values(broad[0], "PatientID"), broad[1]) == (["SYN1", "SYN2"], True)
    exact = await streamed(store, "patient", identifier("PATIENT", PatientID="SYN*"), 3)
    assert (len(exact[0]), exact[1]) == (3, False)  # as many as the cap: whole
    unlimited = await streamed(store, "study", identifier("STUDY", StudyID=""), 0)
    assert (len(unlimited[0]), unlimited[1]) == (ALL_STUDIES, False)
    # A unique key named: bounded by what it names, not capped.
    one_patient = await streamed(store, "patient", identifier("STUDY", PatientID="SYN1"), 1)
    assert (len(one_patient[0]), one_patient[1]) == (2, False)
    one_study = identifier("IMAGE", StudyInstanceUID=study_uid(1), SOPInstanceUID="")
    listed = await streamed(store, "study", one_study, 1)
    assert (len(listed[0]), listed[1]) == (4, False)
    # Compiled at once: a bad identifier raises before any row is read.
    with pytest.raises(QueryError):
        stream_capped(store, "study", identifier("PATIENT", PatientID="x"), 0)


@pytest.mark.asyncio
async def test_stream_is_interrupted_by_cancel_and_gives_its_connection_back(
    store: Store,
) -> None:
    """A C-CANCEL (the *cancelled* callable turning true) interrupts the statement SQLite is
    running: a cross join that would read for minutes ends at once, the connection goes back
    to the pool, and every query connection serves again."""
    import time

    started = time.monotonic()
    deadline = started + 0.3

    def slow(conn: Any) -> Any:
        yield from conn.execute(
            "SELECT count(*) FROM instances a, instances b, instances c, instances d, instances e,"
            " instances f, instances g, instances h"
        )

    rows = await anyio.to_thread.run_sync(
        lambda: list(store.stream(slow, cancelled=lambda: time.monotonic() > deadline))
    )
    assert rows == [] and time.monotonic() - started < 5
    for _ in range(6):  # more than the pool holds: each came back
        matches, _ = await streamed(store, "study", identifier("STUDY", StudyID=""), 0)
        assert len(matches) == ALL_STUDIES


# -- character sets ---------------------------------------------------------------------------


def japanese_query(name: str, level: str = "PATIENT") -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.QueryRetrieveLevel = level
    ds.PatientName = name
    ds.PatientID = ""
    return over_the_wire(ds)


@pytest.mark.asyncio
async def test_person_name_matches_any_component_group(store: Store) -> None:
    kanji = await find(store, "patient", japanese_query("山田^太郎"))
    assert values(kanji, "PatientID") == ["H31EXAMPLE", "H32EXAMPLE"]
    assert str(kanji[0].PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    romaji = await find(store, "patient", japanese_query("Yamada^Tarou"))
    assert values(romaji, "PatientID") == ["H31EXAMPLE"]
    lower = await find(store, "patient", japanese_query("yamada^tarou"))
    assert values(lower, "PatientID") == ["H31EXAMPLE"]
    hiragana = await find(store, "patient", japanese_query("やまだ^たろう"))
    assert values(hiragana, "PatientID") == ["H31EXAMPLE", "H32EXAMPLE", "2008-4"]
    wildcard = await find(store, "patient", japanese_query("山田^*"))
    assert values(wildcard, "PatientID") == ["H31EXAMPLE", "H32EXAMPLE"]
    whole = await find(store, "patient", japanese_query("Yamada^Tarou=山田^太郎=やまだ^たろう"))
    assert values(whole, "PatientID") == ["H31EXAMPLE"]
    ideographic = await find(store, "patient", japanese_query("=山田^太郎"))
    assert values(ideographic, "PatientID") == ["H31EXAMPLE", "H32EXAMPLE"]
    misplaced = await find(store, "patient", japanese_query("山田^太郎=山田^太郎"))
    assert misplaced == []  # "山田^太郎" is not the alphabetic group of any name


NAME_QUERIES = [
    "Doe^John", "DOE^JOHN^", " doe^john ", "doe*", "DOE^J*", "doe^j???", "Doe^John*", "d*e^j*",
    "*john", "?oe^jane", "山田^太郎", "山田*", "=山田^太郎", "Yamada^Tarou=山田*", "やまだ*",
    "yamada*=*=やまだ^たろう", "äneas*", "ÄNEAS^RÜDIGER", "hong^gildong=洪^吉洞=홍^길동", "zz*",
    "Люк*", "x", "*",
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("level", ["PATIENT", "STUDY"])
async def test_patient_name_through_the_key_index_matches_as_the_function_does(
    store: Store, level: str
) -> None:
    """Every query answers exactly the patients `gateway_pn_match` accepts among all of them."""
    patients = await store.read(
        lambda c: c.execute("SELECT patient_id, patient_name FROM patients ORDER BY pk").fetchall()
    )
    for value in NAME_QUERIES:
        expected = {pid for pid, name in patients if _pn_match(name, value) or value == "*"}
        results = await find(store, "patient", identifier(level, PatientName=value, PatientID=""))
        assert set(values(results, "PatientID")) == expected, value
        assert expected or value in ("x", "zz*"), value  # the list exercises real matches
    listed = await find(store, "patient", identifier("PATIENT", PatientName=["doe^jane", "山田*"]))
    assert values(listed, "PatientID") == ["H31EXAMPLE", "H32EXAMPLE", "SYN2"]


@pytest.mark.asyncio
async def test_exact_and_prefix_names_read_the_key_index(store: Store) -> None:
    async def plan(value: str) -> str:
        query = _compile("patient", identifier("PATIENT", PatientName=value), None)

        def explain(conn: Any) -> str:
            prepare_connection(conn)
            rows = conn.execute("EXPLAIN QUERY PLAN " + query.sql, query.params).fetchall()
            return " | ".join(str(row[-1]) for row in rows)

        return await store.read(explain)

    for value in ("DOE^JOHN", "DOE^JOHN*", "doe*", "=山田^太郎"):
        text = await plan(value)
        assert "SEARCH patient_name_keys USING PRIMARY KEY" in text, (value, text)
        assert "SCAN p" not in text, (value, text)
    assert "SCAN p" in await plan("*JOHN")  # no literal start: every patient is checked


@pytest.mark.asyncio
async def test_person_name_in_other_character_sets(store: Store) -> None:
    korean = Dataset()
    korean.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    korean.QueryRetrieveLevel = "STUDY"
    korean.PatientName = "홍^길동"
    results = await find(store, "study", over_the_wire(korean))
    assert [str(v) for v in values(results, "PatientName")] == ["Hong^Gildong=洪^吉洞=홍^길동"]
    german = Dataset()
    german.SpecificCharacterSet = "ISO_IR 100"
    german.QueryRetrieveLevel = "PATIENT"
    german.PatientName = "äneas^rüdiger"  # case-insensitive beyond ASCII
    found = await find(store, "patient", over_the_wire(german))
    assert values(found, "PatientID") == ["SCSGERM"]
    chinese = await find(store, "patient", identifier("PATIENT", PatientName="王^小東"))
    assert values(chinese, "PatientID") == ["X1EXAMPLE"]


@pytest.mark.asyncio
async def test_responses_declare_utf8_and_survive_encoding(store: Store) -> None:
    results = await find(store, "patient", japanese_query("やまだ^たろう", "STUDY"))
    assert results
    for result in results:
        assert result.SpecificCharacterSet == "ISO_IR 192"
        decoded = over_the_wire(result)
        assert str(decoded.PatientName) == str(result.PatientName)
    assert str(results[0].PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    data = encode(results[0], True, True)
    assert data is not None
    assert "山田".encode() in data


# -- invalid identifiers ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_invalid_identifiers_raise_query_error(store: Store) -> None:
    no_level = Dataset()
    no_level.PatientID = "SYN1"
    with pytest.raises(QueryError, match="QueryRetrieveLevel is missing"):
        await find(store, "study", no_level)
    with pytest.raises(QueryError, match="QueryRetrieveLevel is missing"):
        await find(store, "study", identifier(""))
    with pytest.raises(
        QueryError, match="QueryRetrieveLevel 'FOO' is not one of PATIENT, STUDY, SERIES, IMAGE"
    ):
        await find(store, "study", identifier("FOO"))
    with pytest.raises(QueryError, match="PATIENT level is not in the Study Root model"):
        await find(store, "study", identifier("PATIENT", PatientID=""))
    with pytest.raises(QueryError, match="StudyDate '2004-01-01' is not a valid range"):
        await find(store, "study", unvalidated(identifier("STUDY"), "StudyDate", "2004-01-01"))


def test_query_error_is_refused_with_status_c000_and_is_no_instance_rejection() -> None:
    """An identifier that cannot be answered is a gateway error refused with 0xC000, not a
    rejected instance (nothing was stored or refused as an instance)."""
    with pytest.raises(QueryError) as caught:
        retrieve_filter("study", identifier("PATIENT", PatientID="SYN1"))
    assert isinstance(caught.value, GatewayError)
    assert not isinstance(caught.value, RejectedInstance)
    assert caught.value.status == 0xC000


# -- retrieve ---------------------------------------------------------------------------------


async def retrieved(store: Store, model: Any, ds: Dataset) -> list[str]:
    where, params = retrieve_filter(model, ds)
    return [f.sop_instance_uid for f in await store.instance_files(where, params)]


@pytest.mark.asyncio
async def test_retrieve_filter_at_study_level(store: Store) -> None:
    ds = identifier("STUDY")
    ds.StudyInstanceUID = [study_uid(1), study_uid(3)]
    assert retrieve_filter("study", ds) == (
        "st.study_uid IN (?, ?)",
        [study_uid(1), study_uid(3)],
    )
    assert await retrieved(store, "study", ds) == [
        sop_uid(1, 1, 1),
        sop_uid(1, 1, 2),
        sop_uid(1, 2, 1),
        sop_uid(1, 3, 1),
        sop_uid(3, 1, 1),
    ]
    ds.PatientID = "SYN2"  # narrows in the Patient Root model, not a key in Study Root
    assert await retrieved(store, "patient", ds) == [sop_uid(3, 1, 1)]
    assert len(await retrieved(store, "study", ds)) == 5


@pytest.mark.asyncio
async def test_retrieve_filter_at_series_level(store: Store) -> None:
    ds = identifier("SERIES", StudyInstanceUID=study_uid(4))
    ds.SeriesInstanceUID = [series_uid(4, 2), series_uid(1, 2)]
    # the study narrows: series 1.2 is not in study 4
    assert await retrieved(store, "study", ds) == [sop_uid(4, 2, 1)]
    del ds.StudyInstanceUID
    assert await retrieved(store, "study", over_the_wire(ds)) == [
        sop_uid(1, 2, 1),
        sop_uid(4, 2, 1),
    ]


@pytest.mark.asyncio
async def test_retrieve_filter_at_image_and_patient_level(store: Store) -> None:
    ds = identifier("IMAGE", StudyInstanceUID=study_uid(1), SeriesInstanceUID=series_uid(1, 1))
    ds.SOPInstanceUID = [sop_uid(1, 1, 2), sop_uid(2, 1, 1), "1.2.3.404"]
    assert await retrieved(store, "patient", ds) == [sop_uid(1, 1, 2)]
    only = identifier("IMAGE", SOPInstanceUID=sop_uid(2, 1, 1))
    assert await retrieved(store, "study", only) == [sop_uid(2, 1, 1)]
    patient = identifier("PATIENT", PatientID="SYN3")
    assert retrieve_filter("patient", patient) == ("p.patient_id IN (?)", ["SYN3"])
    assert await retrieved(store, "patient", patient) == [sop_uid(4, 1, 1), sop_uid(4, 2, 1)]


def test_retrieve_filter_needs_the_unique_key_of_its_level() -> None:
    with pytest.raises(QueryError, match="SeriesInstanceUID is missing"):
        retrieve_filter("study", identifier("SERIES", StudyInstanceUID=study_uid(1)))
    with pytest.raises(QueryError, match="SOPInstanceUID is missing"):
        retrieve_filter("patient", identifier("IMAGE", SOPInstanceUID=""))
    with pytest.raises(QueryError, match="StudyInstanceUID is missing"):
        retrieve_filter("study", identifier("STUDY", PatientID="SYN1"))
    with pytest.raises(QueryError, match="QueryRetrieveLevel is missing"):
        retrieve_filter("study", Dataset())
