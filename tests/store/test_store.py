"""The store: durable ingest, duplicate policies, start-up reconciliation, deletion."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest
import pytest_asyncio

from gateway.config import RetentionSettings
from gateway.errors import (
    DuplicateInstance,
    InstanceMismatch,
    InvalidInstance,
    SopInstanceConflict,
    StoreError,
)
from gateway.store.completions import CompletionStore
from gateway.store.index import Provenance
from gateway.store.jobs import JobQueue
from gateway.store.migrations import SCHEMA_VERSION
from gateway.store.names import pn_keys
from gateway.store.retention import Retention
from gateway.store.schema import connect
from gateway.store.store import Store
from tests.conftest import CHARSET_FILES, TEST_FILES, write_variant

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"


def crash(store: Store) -> None:
    """What a kill leaves of an open store: its writer gone without a clean close, and the
    data_dir's lock released (the process that held it is gone)."""
    store._writer.stop()
    store._unlock()


def stage(store: Store, source: Path) -> Path:
    """Copy a file into the store's tmp/ as the listener would have written it."""
    target = store.files.new_temp_path()
    shutil.copyfile(source, target)
    return target


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "data")
    await s.open()
    yield s
    await s.close()


def rows(store: Store, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(store.db_path) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.asyncio
async def test_ingest_indexes_and_places_the_file(store: Store) -> None:
    prov = Provenance("CT1", "GATEWAY", "127.0.0.1", "abc")
    result = await store.ingest(stage(store, CT), prov)
    assert result.outcome == "stored"
    assert result.path.startswith("objects/")
    placed = store.files.absolute(result.path)
    assert placed.read_bytes() == CT.read_bytes()
    assert list(store.files.tmp_dir.iterdir()) == []
    (row,) = rows(
        store,
        "SELECT sop_uid, sop_class_uid, transfer_syntax, size, calling_ae, called_ae,"
        " peer_address, association_id, length(checksum) FROM instances",
    )
    assert row == (
        "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        CT.stat().st_size - 336,
        "CT1",
        "GATEWAY",
        "127.0.0.1",
        "abc",
        64,
    )
    assert rows(store, "SELECT patient_id, patient_name, patient_sex FROM patients") == [
        ("1CT1", "CompressedSamples^CT1", "O")
    ]
    assert await store.counts() == {
        "patients": 1,
        "studies": 1,
        "series": 1,
        "instances": 1,
        "bytes": CT.stat().st_size - 336,
        "sop_instance_uid_conflicts": 0,
    }


@pytest.mark.asyncio
async def test_names_decoded_with_their_character_set(store: Store) -> None:
    await store.ingest(stage(store, CHARSET_FILES / "chrH31.dcm"), Provenance())
    await store.ingest(stage(store, CHARSET_FILES / "chrRuss.dcm"), Provenance())
    names = {r[0] for r in rows(store, "SELECT patient_name FROM patients")}
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in names
    assert "Люкceмбypг" in names  # noqa: RUF001 - the file's own spelling


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("no_meta.dcm", "not a DICOM Part 10 file"),
        ("UN_sequence.dcm", "SOPClassUID is missing"),
    ],
)
async def test_bad_files_refused_and_nothing_kept(store: Store, name: str, message: str) -> None:
    staged = stage(store, TEST_FILES / name)
    with pytest.raises(InvalidInstance, match=message):
        await store.ingest(staged, Provenance())
    assert await store.counts() == {
        "patients": 0, "studies": 0, "series": 0, "instances": 0, "bytes": 0,
        "sop_instance_uid_conflicts": 0,
    }  # fmt: skip
    assert list(store.files.objects_dir.rglob("*.dcm")) == []


@pytest.mark.asyncio
async def test_uid_that_escapes_the_store_is_refused(store: Store, tmp_path: Path) -> None:
    bad = write_variant(CT, tmp_path / "bad.dcm", SOPInstanceUID="../../x")
    with pytest.raises(InvalidInstance, match="SOPInstanceUID is not a valid UID"):
        await store.ingest(stage(store, bad), Provenance())
    assert not (tmp_path / "x").exists()


@pytest.mark.asyncio
async def test_request_uids_must_match_the_dataset(store: Store) -> None:
    with pytest.raises(InstanceMismatch, match="SOP Instance UID"):
        await store.ingest(stage(store, CT), Provenance(), expect=(
            "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
        ))  # fmt: skip
    with pytest.raises(InstanceMismatch, match="SOP Class UID"):
        await store.ingest(stage(store, CT), Provenance(), expect=(
            "1.2.840.10008.5.1.4.1.1.4",
            "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        ))  # fmt: skip
    assert (await store.counts())["instances"] == 0


def _variant(tmp_path: Path, description: str) -> Path:
    """CT_small with the same SOP Instance UID and different content."""
    return write_variant(CT, tmp_path / f"{description}.dcm", StudyDescription=description)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("policy", "second_outcome", "kept"),
    [("keep_first", "ignored", "FIRST"), ("overwrite", "replaced", "SECOND")],
)
async def test_duplicate_policy(
    tmp_path: Path, policy: str, second_outcome: str, kept: str
) -> None:
    store = Store(tmp_path / "data", policy)  # type: ignore[arg-type]
    await store.open()
    try:
        first, second = _variant(tmp_path, "FIRST"), _variant(tmp_path, "SECOND")
        assert (await store.ingest(stage(store, first), Provenance())).outcome == "stored"
        again = await store.ingest(stage(store, first), Provenance())
        assert again.outcome == "unchanged"
        assert (await store.ingest(stage(store, second), Provenance())).outcome == second_outcome
        assert rows(store, "SELECT study_description FROM studies") == [(kept,)]
        files = list(store.files.objects_dir.rglob("*.dcm"))
        assert len(files) == 1
        assert (
            b"FIRST" in files[0].read_bytes()
            if kept == "FIRST"
            else b"SECOND" in files[0].read_bytes()
        )
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_duplicate_policy_reject(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", "reject")
    await store.open()
    try:
        first, second = _variant(tmp_path, "FIRST"), _variant(tmp_path, "SECOND")
        await store.ingest(stage(store, first), Provenance())
        assert (await store.ingest(stage(store, first), Provenance())).outcome == "unchanged"
        with pytest.raises(DuplicateInstance):
            await store.ingest(stage(store, second), Provenance())
        assert len(list(store.files.objects_dir.rglob("*.dcm"))) == 1
    finally:
        await store.close()


@pytest.mark.parametrize("policy", ["keep_first", "overwrite", "reject"])
@pytest.mark.asyncio
async def test_one_uid_in_another_series_is_refused_whatever_the_policy(
    tmp_path: Path, policy: str
) -> None:
    """The same SOP Instance UID with other content in another series (or study) is another
    object, not a re-send: refused (0xC112) and counted; what is held stays as it was."""
    store = Store(tmp_path / "data", policy)  # type: ignore[arg-type]
    await store.open()
    try:
        held = await store.ingest(stage(store, CT), Provenance())
        other_series = write_variant(CT, tmp_path / "s.dcm", SeriesInstanceUID="1.2.3.7.1",
                                     SeriesDescription="other")  # fmt: skip
        other_study = write_variant(CT, tmp_path / "st.dcm", StudyInstanceUID="1.2.3.8",
                                    SeriesInstanceUID="1.2.3.8.1")  # fmt: skip
        for n, path in enumerate((other_series, other_study), start=1):
            with pytest.raises(SopInstanceConflict) as refused:
                await store.ingest(stage(store, path), Provenance())
            assert refused.value.status == 0xC112
            assert held.series_instance_uid in str(refused.value)
            assert (await store.counts())["sop_instance_uid_conflicts"] == n
        assert rows(store, "SELECT series_uid FROM series") == [(held.series_instance_uid,)]
        (placed,) = store.files.objects_dir.rglob("*.dcm")
        assert placed.read_bytes() == CT.read_bytes()
        assert not list(store.files.tmp_dir.iterdir())
        again = await store.ingest(stage(store, CT), Provenance())  # a true re-send
        assert again.outcome == "unchanged"
        await assert_consistent(store)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_reconcile_after_crash(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    await store.ingest(stage(store, CT), Provenance())
    lost = await store.ingest(stage(store, TEST_FILES / "JPEG2000.dcm"), Provenance())
    # Simulate a crash: no clean close, a partial temp file, a placed file without its row,
    # and a placed file that is garbage.
    crash(store)
    (store.files.tmp_dir / "partial.part").write_bytes(b"half an instance")
    bucket = next(store.files.objects_dir.glob("*/*"))
    shutil.copyfile(MR, bucket / "orphan.dcm")
    (bucket / "garbage.dcm").write_bytes(b"not dicom")
    store.files.absolute(lost.path).write_bytes(b"")  # its flush never reached the disk

    reopened = Store(tmp_path / "data")
    report = await reopened.open()
    try:
        assert report.temp_files_removed == 1
        assert report.orphans_indexed == 1
        assert report.orphans_removed == 2  # the garbage file, and the row of the empty file
        counts = await reopened.counts()
        assert counts["instances"] == 2
        assert counts["studies"] == 2  # the emptied study is gone too
        assert not (bucket / "garbage.dcm").exists()
    finally:
        await reopened.close()
    # A clean stop leaves nothing to scan.
    again = Store(tmp_path / "data")
    report = await again.open()
    await again.close()
    assert report.scanned == 0


@pytest.mark.asyncio
async def test_index_rebuilt_when_missing(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    await store.ingest(stage(store, CT), Provenance())
    await store.ingest(stage(store, MR), Provenance())
    await store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(store.db_path) + suffix).unlink(missing_ok=True)
    rebuilt = Store(tmp_path / "data")
    report = await rebuilt.open()
    try:
        assert report.orphans_indexed == 2
        assert (await rebuilt.counts())["instances"] == 2
    finally:
        await rebuilt.close()


@pytest.mark.asyncio
async def test_delete_study_removes_rows_and_files(store: Store) -> None:
    result = await store.ingest(stage(store, CT), Provenance())
    await store.ingest(stage(store, MR), Provenance())
    assert await store.delete_study(result.study_instance_uid) == 1
    assert not store.files.absolute(result.path).exists()
    counts = await store.counts()
    assert counts["studies"] == 1 and counts["instances"] == 1 and counts["patients"] == 1
    assert await store.delete_study("1.2.3.4.5") == 0


@pytest.mark.asyncio
async def test_disk_failure_is_a_store_error_and_nothing_indexed(store: Store) -> None:
    shutil.rmtree(store.files.objects_dir)
    store.files.objects_dir.write_bytes(b"")  # a file where the directory should be
    store.files._known_dirs.clear()
    with pytest.raises(StoreError):
        await store.ingest(stage(store, CT), Provenance())
    assert (await store.counts())["instances"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("with_other", [False, True])
async def test_a_file_that_cannot_be_flushed_is_refused_and_leaves_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch, with_other: bool
) -> None:
    """An fsync that fails (EIO: the disk, which no test can break for real) fails that
    placement only: its row, written meanwhile, and its file are gone; a placement of the same
    batch is stored; the same instance is stored once the disk works again."""
    real_fsync = os.fsync
    refused = CT.read_bytes()

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if stat.S_ISREG(os.fstat(fd).st_mode) and path.read_bytes() == refused:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    placements = [store.place(Provenance(), content=refused)]
    if with_other:
        placements.append(store.place(Provenance(), content=MR.read_bytes()))
    outcomes = await asyncio.gather(*placements, return_exceptions=True)
    assert isinstance(outcomes[0], StoreError) and "cannot flush" in str(outcomes[0])
    counts = await store.counts()
    assert counts["instances"] == counts["studies"] == int(with_other)
    files = [p for p in store.files.objects_dir.rglob("*.dcm")]
    assert [p.read_bytes() for p in files] == ([MR.read_bytes()] if with_other else [])
    monkeypatch.undo()
    assert (await store.place(Provenance(), content=refused)).outcome == "stored"


def name_keys(store: Store) -> tuple[set[tuple[str, object]], set[tuple[str, object]]]:
    """(the name keys the index holds, the keys its patients should have), as (key, patient)."""
    held = {(str(k), pk) for k, pk in rows(store, "SELECT key, patient_pk FROM patient_name_keys")}
    patients = rows(store, "SELECT pk, patient_name FROM patients")
    due = {(key, pk) for pk, name in patients for key in pn_keys(name)}  # type: ignore[arg-type]
    return held, due


@pytest.mark.asyncio
async def test_name_keys_follow_patients_and_are_rebuilt_at_open(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    ct = await store.ingest(stage(store, CT), Provenance())
    await store.ingest(stage(store, MR), Provenance())
    held, due = name_keys(store)
    assert held == due and ("compressedsamples^ct1", 1) in held
    renamed = write_variant(
        CT,
        tmp_path / "renamed.dcm",
        SOPInstanceUID="1.2.3.4.5.6",
        SeriesInstanceUID="1.2.3.4.5",
        PatientName="Roe^Richard",
    )
    # The study comes again under another name: another identity (3), and the one it had goes.
    await store.ingest(stage(store, renamed), Provenance())
    held, due = name_keys(store)
    assert held == due and ("roe^richard", 3) in held and {pk for _, pk in held} == {2, 3}
    conn = connect(store.db_path)  # a rename in place (no path does it today)
    conn.execute("UPDATE patients SET patient_name = 'Poe^Edgar' WHERE pk = 3")
    conn.close()
    held, due = name_keys(store)
    assert held == due and ("poe^edgar", 3) in held and ("roe^richard", 3) not in held
    await store.delete_study(ct.study_instance_uid)  # the CT patient goes with its study
    held, due = name_keys(store)
    assert held == due and {pk for _, pk in held} == {2}
    await store.close()
    with sqlite3.connect(store.db_path) as conn:  # as an index from before the keys existed
        conn.execute("DELETE FROM patient_name_keys")
        conn.execute("DELETE FROM meta WHERE key = 'name_keys_version'")
    reopened = Store(tmp_path / "data")
    await reopened.open()
    try:
        held, due = name_keys(reopened)
        assert held == due and len(held) == 1
    finally:
        await reopened.close()


async def assert_consistent(store: Store) -> None:
    """`counts()` (the running totals) equals a real count, and the name keys fit the patients."""
    ((patients, studies, series, instances, size),) = rows(
        store,
        "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
        " (SELECT count(*) FROM series), count(*), coalesce(sum(size), 0) FROM instances",
    )
    counts = await store.counts()
    keys = ("patients", "studies", "series", "instances", "bytes")
    assert {key: counts[key] for key in keys} == {
        "patients": patients, "studies": studies, "series": series, "instances": instances,
        "bytes": size,
    }  # fmt: skip
    held, due = name_keys(store)
    assert held == due


@pytest.mark.asyncio
async def test_totals_follow_every_path_that_changes_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", "overwrite")
    await store.open()
    await JobQueue(store).ensure_schema()
    await CompletionStore(store).ensure_schema()
    await store.ingest(stage(store, CT), Provenance())
    mr = await store.ingest(stage(store, MR), Provenance())
    await assert_consistent(store)
    assert (await store.counts())["instances"] == 2
    before = (await store.counts())["bytes"]
    longer = write_variant(CT, tmp_path / "longer.dcm", StudyDescription="A much longer one")
    assert (await store.ingest(stage(store, longer), Provenance())).outcome == "replaced"
    await assert_consistent(store)
    assert (await store.counts())["bytes"] > before  # the replacement's size, not the first's
    assert await store.delete_study(mr.study_instance_uid) == 1
    await assert_consistent(store)
    assert (await store.counts())["patients"] == 1
    swept = await Retention(store, RetentionSettings(delete_after_days=1)).sweep(
        now=time.time() + 2 * 86400
    )
    assert swept == 1
    await assert_consistent(store)
    assert await store.counts() == dict.fromkeys(
        ("patients", "studies", "series", "instances", "bytes", "sop_instance_uid_conflicts"), 0
    )
    # Reconciliation after a crash: an orphan file adopted, a row whose file is empty dropped.
    await store.ingest(stage(store, CT), Provenance())
    lost = await store.ingest(stage(store, TEST_FILES / "JPEG2000.dcm"), Provenance())
    crash(store)
    bucket = store.files.absolute(lost.path).parent
    shutil.copyfile(MR, bucket / "orphan.dcm")
    store.files.absolute(lost.path).write_bytes(b"")
    reopened = Store(tmp_path / "data", "overwrite")
    report = await reopened.open()
    try:
        assert (report.orphans_indexed, report.orphans_removed) == (1, 1)
        await assert_consistent(reopened)
        assert (await reopened.counts())["instances"] == 2
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_totals_counted_once_for_an_index_without_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    await store.ingest(stage(store, CT), Provenance())
    await store.ingest(stage(store, MR), Provenance())
    await store.close()
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("DELETE FROM totals")
    reopened = Store(tmp_path / "data")
    await reopened.open()
    try:
        await assert_consistent(reopened)
        assert (await reopened.counts())["instances"] == 2
    finally:
        await reopened.close()


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def numbered(tmp_path: Path, count: int, tag: int) -> list[Path]:
    """*count* variants of CT_small, each with a SOP Instance UID of its own."""
    return [
        write_variant(CT, tmp_path / f"{tag}{n}.dcm", SOPInstanceUID=f"1.2.826.0.1.99.{tag}.{n}")
        for n in range(count)
    ]


def bucket_of(store: Store, when: float) -> Path:
    return store.files.objects_dir / time.strftime("%Y%m%d/%H/%M", time.gmtime(when))


@pytest.mark.asyncio
async def test_unclean_stop_scans_only_what_follows_the_durable_mark(tmp_path: Path) -> None:
    clock = Clock(time.time() - 7200)
    store = Store(tmp_path / "data", clock=clock)
    await store.open()
    store._writer.mark_every = 0.0  # a mark after every batch (the default: once a second)
    for path in numbered(tmp_path, 40, 1):
        await store.ingest(stage(store, path), Provenance())
    clock.now += 3600
    recent = [await store.ingest(stage(store, p), Provenance()) for p in numbered(tmp_path, 2, 2)]
    ((mark,),) = rows(store, "SELECT value FROM meta WHERE key = 'durable_mark'")
    assert float(str(mark)) == clock.now  # the mark passed the old files
    # A crash: no clean close; a file moved in whose row never committed, and a row whose
    # file's flush never reached the disk.
    crash(store)
    shutil.copyfile(MR, bucket_of(store, clock.now) / "unindexed.dcm")
    store.files.absolute(recent[1].path).write_bytes(b"")
    clock.now += 5
    reopened = Store(tmp_path / "data", clock=clock)
    report = await reopened.open()
    try:
        assert report.scanned == 3  # not the 40 before the mark
        assert (report.orphans_indexed, report.orphans_removed) == (1, 1)
        await assert_consistent(reopened)
        assert (await reopened.counts())["instances"] == 40 + 1 + 1
        ((uid,),) = rows(reopened, "SELECT sop_uid FROM instances WHERE path LIKE '%unindexed%'")
        assert uid == "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"  # MR_small's
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_an_unclean_run_without_a_mark_is_scanned_whole_with_hour_buckets(
    tmp_path: Path,
) -> None:
    """An index left by a version before the mark (hour buckets, no `durable_mark`): the scan
    goes back an hour before that run started, through hour buckets and minute buckets."""
    clock = Clock(time.time() - 600)
    store = Store(tmp_path / "data", clock=clock)
    await store.open()
    first = await store.ingest(stage(store, CT), Provenance())
    crash(store)
    hour = store.files.objects_dir / time.strftime("%Y%m%d/%H", time.gmtime(clock.now))
    shutil.copyfile(MR, hour / "old-layout.dcm")  # a file of the hour layout, without a row
    (hour / "garbage.dcm").write_bytes(b"not dicom")
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'durable_mark'")
    reopened = Store(tmp_path / "data", clock=clock)
    report = await reopened.open()
    try:
        assert report.scanned == 3
        assert (report.orphans_indexed, report.orphans_removed) == (1, 1)
        paths = {str(r[0]) for r in rows(reopened, "SELECT path FROM instances")}
        assert paths == {first.path, f"{hour.relative_to(reopened.files.root)}/old-layout.dcm"}
        assert first.path.count("/") == 4  # objects/YYYYMMDD/HH/MM/name
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_a_row_older_than_the_window_keeps_its_file(tmp_path: Path) -> None:
    """A file in the first scanned bucket whose row was received before the window is held,
    not adopted as a duplicate of itself (which would remove it)."""
    clock = Clock(time.time() - 600)
    store = Store(tmp_path / "data", clock=clock)
    await store.open()
    store._writer.mark_every = 0.0
    held = await store.ingest(stage(store, CT), Provenance())
    crash(store)
    with sqlite3.connect(store.db_path) as conn:  # received long before the mark says
        conn.execute("UPDATE instances SET received_at = received_at - 3600")
    reopened = Store(tmp_path / "data", clock=clock)
    report = await reopened.open()
    try:
        assert (report.scanned, report.orphans_indexed, report.orphans_removed) == (1, 0, 0)
        assert reopened.files.absolute(held.path).exists()
        assert (await reopened.counts())["instances"] == 1
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_page_caches_are_bounded_whatever_the_index_holds(store: Store) -> None:
    """The writer keeps 2 MiB of index pages, each of the four readers 512 KiB: the process's
    memory does not grow with the store (SQLite reads a negative cache_size as KiB)."""
    readers = await asyncio.gather(
        *(
            store.read(lambda conn: conn.execute("PRAGMA cache_size").fetchone()[0])
            for _ in range(8)
        )
    )
    assert set(readers) == {-512}
    writer = store._writer.submit(lambda conn: conn.execute("PRAGMA cache_size").fetchone()[0])
    assert writer.result() == -2048


def _patient_of_each_study(store: Store) -> dict[str, tuple[object, ...]]:
    return {
        str(uid): tuple(rest)
        for uid, *rest in rows(
            store,
            "SELECT st.study_uid, p.patient_id, p.patient_name, p.patient_birth_date"
            " FROM studies st JOIN patients p ON st.patient_pk = p.pk",
        )
    }


@pytest.mark.asyncio
async def test_studies_under_one_patient_id_keep_their_own_patient(tmp_path: Path) -> None:
    """Two patients under the placeholder ID UNKNOWN stay two; a third study agreeing with the
    first joins its identity; the conflict is listed for each study that has one."""
    store = Store(tmp_path / "data")
    await store.open()
    try:
        doe = write_variant(CT, tmp_path / "doe.dcm", PatientID="UNKNOWN",
                            PatientName="Doe^Jane", PatientBirthDate="19700101")  # fmt: skip
        roe = write_variant(MR, tmp_path / "roe.dcm", PatientID="UNKNOWN",
                            PatientName="Roe^Richard", PatientBirthDate="19800202")  # fmt: skip
        doe2 = write_variant(
            MR, tmp_path / "doe2.dcm", PatientID="UNKNOWN", PatientName="Doe^Jane",
            PatientBirthDate="19700101", PatientSex=_CT_SEX, StudyInstanceUID="1.2.3.9",
            SeriesInstanceUID="1.2.3.9.1", SOPInstanceUID="1.2.3.9.1.1",
        )  # fmt: skip
        results = [await store.ingest(stage(store, f), Provenance()) for f in (doe, roe, doe2)]
        held = _patient_of_each_study(store)
        assert held == {
            results[0].study_instance_uid: ("UNKNOWN", "Doe^Jane", "19700101"),
            results[1].study_instance_uid: ("UNKNOWN", "Roe^Richard", "19800202"),
            "1.2.3.9": ("UNKNOWN", "Doe^Jane", "19700101"),
        }
        assert (await store.counts())["patients"] == 2
        (other,) = await store.patient_conflicts(results[1].study_instance_uid)
        assert other["patient_name"] == "Doe^Jane" and other["studies"] == 2
        assert set(other["study_uids"]) == {results[0].study_instance_uid, "1.2.3.9"}
        (other,) = await store.patient_conflicts("1.2.3.9")
        assert other["patient_name"] == "Roe^Richard" and other["studies"] == 1
        await assert_consistent(store)
    finally:
        await store.close()


_CT_SEX = str(pydicom.dcmread(CT, stop_before_pixels=True).get("PatientSex", ""))  # doe2 as doe


@pytest.mark.asyncio
async def test_an_index_that_merged_patients_is_split_by_their_files(tmp_path: Path) -> None:
    """Schema version 0 kept one patients row per Patient ID: opening such an index gives each
    study the identity its files carry again, keeping every row it held."""
    store = Store(tmp_path / "data")
    await store.open()
    doe = write_variant(CT, tmp_path / "doe.dcm", PatientID="0", PatientName="Doe^Jane")
    roe = write_variant(MR, tmp_path / "roe.dcm", PatientID="0", PatientName="Roe^Richard")
    for path in (doe, roe):
        await store.ingest(stage(store, path), Provenance())
    want = _patient_of_each_study(store)
    await store.close()
    conn = connect(store.db_path)  # as version 0 left it: the second study under the first row
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.executescript(
        "CREATE TABLE p0 (pk INTEGER PRIMARY KEY, patient_id TEXT NOT NULL,"
        " issuer_of_patient_id TEXT NOT NULL DEFAULT '', patient_name TEXT,"
        " patient_birth_date TEXT, patient_sex TEXT,"
        " UNIQUE (patient_id, issuer_of_patient_id));"
        "INSERT INTO p0 SELECT * FROM patients ORDER BY pk LIMIT 1;"
        "UPDATE studies SET patient_pk = (SELECT pk FROM p0);"
        "DROP TABLE patients; ALTER TABLE p0 RENAME TO patients;"
        "DELETE FROM patient_name_keys WHERE patient_pk NOT IN (SELECT pk FROM patients);"
        "DELETE FROM totals; PRAGMA user_version=0;"
    )
    conn.close()
    assert len(set(_patient_of_each_study(store).values())) == 1  # merged
    reopened = Store(tmp_path / "data")
    await reopened.open()
    try:
        assert _patient_of_each_study(reopened) == want
        assert rows(reopened, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        await assert_consistent(reopened)
    finally:
        await reopened.close()


def _slow_insert(key: str, seconds: float) -> Any:
    def write(conn: sqlite3.Connection) -> None:
        time.sleep(seconds)  # the writer thread is busy this long
        conn.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", (key,))

    return write


async def _meta_keys(store: Store) -> set[str]:
    return await store.read(lambda c: {row[0] for row in c.execute("SELECT key FROM meta")})


@pytest.mark.asyncio
async def test_a_cancelled_write_is_awaited_to_its_end(store: Store) -> None:
    """Plain Task.cancel() and an anyio cancel scope alike: the caller waits for the
    transaction, then sees the cancellation; a write queued behind another still runs."""
    first = asyncio.create_task(store.write(_slow_insert("first", 0.3)))
    queued = asyncio.create_task(store.write(_slow_insert("queued", 0.0)))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    first.cancel()
    queued.cancel()  # still waiting for the writer thread: it must not be dropped
    for task in (first, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.monotonic() - started >= 0.2  # cancelled only once its write had committed
    assert {"first", "queued"} <= await _meta_keys(store)

    with anyio.move_on_after(0.05) as scope:
        await store.write(_slow_insert("scoped", 0.3))
    assert scope.cancelled_caught and "scoped" in await _meta_keys(store)


@pytest.mark.asyncio
async def test_writes_queued_together_commit_together_each_alone_when_it_fails(
    store: Store,
) -> None:
    """Writes queued while the writer is busy share one transaction, each in a savepoint:
    one that raises leaves nothing of itself, the others commit."""
    await store.write(lambda c: c.execute("CREATE TABLE t (v INTEGER)"))
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hold(conn: sqlite3.Connection) -> None:  # keeps the writer busy while writes queue
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
        conn.execute("INSERT INTO t VALUES (0)")

    def insert(value: int, fail: bool = False) -> Any:
        def fn(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (value,))
            if fail:
                raise ValueError(f"write {value} refused")
            return value

        return fn

    held = asyncio.ensure_future(store.write(hold))
    await asyncio.sleep(0.1)
    queued = [asyncio.ensure_future(store.write(insert(n, fail=n == 2))) for n in (1, 2, 3)]
    await asyncio.sleep(0.1)
    gate.set()
    await held
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError)
    rows = await store.read(lambda c: [r[0] for r in c.execute("SELECT v FROM t ORDER BY v")])
    assert rows == [0, 1, 3]


@pytest.mark.asyncio
async def test_a_transaction_waits_for_the_disk_unless_none_of_its_writes_is_durable(
    store: Store,
) -> None:
    """`synchronous` of the commit (PRAGMA values: 1 NORMAL, 2 FULL): NORMAL only when every
    write of the transaction was submitted with durable=False."""
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def mode(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    def hold(conn: sqlite3.Connection) -> int:  # keeps the writer busy while writes queue
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
        return mode(conn)

    assert await store.write(mode, durable=False) == 1
    assert await store.write(mode) == 2
    assert await store.write(mode, durable=False) == 1
    held = asyncio.ensure_future(store.write(hold, durable=False))
    await asyncio.sleep(0.1)
    queued = [
        asyncio.ensure_future(store.write(mode, durable=False)),
        asyncio.ensure_future(store.write(mode)),
    ]
    await asyncio.sleep(0.1)
    gate.set()
    assert await held == 1
    assert await asyncio.gather(*queued) == [2, 2]  # one durable write makes the batch FULL
