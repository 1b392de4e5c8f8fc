"""Today's gateway on a data_dir written by the gateway of an earlier release.

Each migration (gateway/store/migrations.py) is tested from a database made by the release
before it. `data/make_previous_index.py` made both tarballs, after a clean stop, with the same
work: two studies under one PatientID with other names, a queued dispatch job with failed
attempts, a done one and its delivery ledger, a retrieval request, a device, a sequence and a
task (the facts are listed in that script's docstring):

- `data/previous-index.tar.gz`, by the code of commit 42e6ab0 (`de3d6ad^`): schema version 0,
  which merged the two patients sharing a PatientID (migration 1 splits them);
- `data/index-v1.tar.gz`, by the code of commit d3163ed: schema version 1, whose jobs have no
  lease (migration 2 adds `lease_owner`, `lease_until`);
- `data/index-v2.tar.gz`, by the code of commit 6af9dc9: schema version 2, whose retrieval
  requests have no lease (migration 3 adds the same two columns to `retrievals`).

The same checks run on all three; versions 1 and 2 also show that their first open adds the
lease columns and changes nothing else.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from gateway.store.migrations import SCHEMA_VERSION
from gateway.store.store import ReconcileReport, Store
from tests.conftest import HOST, GatewayProcess, dataset_bytes, free_port

StudyRootGet = StudyRootQueryRetrieveInformationModelGet
StudyRootFind = StudyRootQueryRetrieveInformationModelFind
PatientRootFind = PatientRootQueryRetrieveInformationModelFind

DATA = Path(__file__).parent / "data"
TARBALLS = {  # by schema version
    0: DATA / "previous-index.tar.gz",
    1: DATA / "index-v1.tar.gz",
    2: DATA / "index-v2.tar.gz",
}
ROOT = "1.2.826.0.1.3680043.8.498.7070"
STUDY_CT, STUDY_MR, STUDY_POE = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"
# Each study's series and their instances, as the generator sent them.
SOP_UIDS = {
    STUDY_CT: {f"{ROOT}.1.1": {f"{ROOT}.1.1.1", f"{ROOT}.1.1.2"}},
    STUDY_MR: {f"{ROOT}.2.1": {f"{ROOT}.2.1.1", f"{ROOT}.2.1.2"}},
    STUDY_POE: {f"{ROOT}.3.1": {f"{ROOT}.3.1.1"}, f"{ROOT}.3.2": {f"{ROOT}.3.2.1"}},
}
PATIENTS = {  # study: (PatientID, PatientName, PatientBirthDate, PatientSex)
    STUDY_CT: ("UPG-0", "Doe^Jane", "19700101", "F"),
    STUDY_MR: ("UPG-0", "Roe^Richard", "19650505", "M"),
    STUDY_POE: ("UPG-3", "Poe^Edgar", "19800808", "M"),
}
# Tables whose rows no open may change (retrievals and meta change as the gateway works).
STABLE_TABLES = (
    "patients", "studies", "series", "instances", "patient_name_keys", "totals", "jobs",
    "deliveries", "completions", "series_rules", "devices", "sequences", "tasks",
)  # fmt: skip
REPAIRS = ("temp_files_removed", "orphans_indexed", "orphans_removed", "scanned")
LEASE_COLUMNS = ["lease_owner", "lease_until"]  # what migrations 2 and 3 add
# Schema version: its tables without the lease columns (migration 2: jobs; 3: retrievals).
UNLEASED = {0: ("jobs", "retrievals"), 1: ("jobs", "retrievals"), 2: ("retrievals",)}
# Tables the gateway's work in this test writes to (jobs run, rules re-see arrivals, the
# retrieval is tried, every open moves the durable mark); no other table's rows may change.
WORKED_TABLES = ("jobs", "deliveries", "completions", "series_rules", "retrievals", "meta")


class Recorder:
    """A storage SCP (pynetdicom) recording (SOP Instance UID, dataset bytes) per C-STORE.

    *held*: each C-STORE is answered only once `release` was called (`holding` is set when
    one waits), so a job sending to it stays running meanwhile."""

    def __init__(self, port: int, *, held: bool = False) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.holding = threading.Event()
        self._released = threading.Event()
        if not held:
            self._released.set()
        self.ae = AE(ae_title="ARCHIVE")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(
            (HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        if not self._released.is_set():
            self.holding.set()
            self._released.wait(30)
        with self._lock:
            self.received.append(
                (str(event.request.AffectedSOPInstanceUID), event.request.DataSet.getvalue())
            )
        return 0x0000

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()


def wait_until(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_index(db: Path, fn: Callable[[sqlite3.Connection], Any], *, immutable: bool) -> Any:
    """*fn* on a read-only connection (*immutable*: an index no process has open)."""
    mode = "immutable=1" if immutable else "mode=ro"
    conn = sqlite3.connect(f"file:{db}?{mode}", uri=True)
    try:
        return fn(conn)
    finally:
        conn.close()


def snapshot(conn: sqlite3.Connection) -> dict[str, Any]:
    """The schema objects, user_version and the rows of `STABLE_TABLES`."""
    state: dict[str, Any] = {
        "schema": conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall(),
        "user_version": conn.execute("PRAGMA user_version").fetchone()[0],
    }
    for table in STABLE_TABLES:
        state[table] = sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
    return state


def shape(conn: sqlite3.Connection) -> dict[str, Any]:
    """Every table's columns (name, type, not null, default, primary key) and indexes (name,
    unique, origin, partial, columns), SQLite's own tables left out."""
    found: dict[str, Any] = {}
    for (table,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ):
        indexes = []
        for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
            info = conn.execute(f"PRAGMA index_info({name})").fetchall()
            indexes.append((name, unique, origin, partial, [row[2] for row in info]))
        found[table] = (
            [row[1:] for row in conn.execute(f"PRAGMA table_info({table})")],
            sorted(indexes, key=repr),
        )
    return found


def tables(conn: sqlite3.Connection) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every table's column names and rows (sorted), SQLite's own tables left out."""
    found = {}
    for (table,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ):
        columns = [str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")]
        rows = sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        found[table] = (columns, rows)
    return found


def without_mark(meta: tuple[list[str], list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    """The rows of `meta` but the durable mark, which every open moves."""
    return [row for row in meta[1] if row[0] != "durable_mark"]


def open_store(data_dir: Path) -> ReconcileReport:
    """Open the store in this process (the index's migrations run) and close it cleanly."""

    async def run() -> ReconcileReport:
        store = Store(data_dir)
        report = await store.open()
        await store.close()
        return report

    return anyio.run(run)


def file_digests(data_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((data_dir / "objects").rglob("*"))
        if p.is_file()
    }


def store_opened(gw: GatewayProcess) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "store_opened"]


def _identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(assoc: Any, model: Any, **keys: Any) -> list[Dataset]:
    answers = []
    for status, ds in assoc.send_c_find(_identifier(**keys), model):
        assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
        if status.Status in (0xFF00, 0xFF01):
            answers.append(ds)
    return answers


def c_get_study(gw: GatewayProcess, study_uid: str) -> dict[str, bytes]:
    """C-GET (pynetdicom) of a study: SOP Instance UID -> the dataset bytes received."""
    received: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        assert uid not in received, uid
        received[uid] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="UPGRADE")
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(c) for c in (CTImageStorage, MRImageStorage)]
    roles = [build_role(c, scp_role=True) for c in (CTImageStorage, MRImageStorage)]
    assoc = ae.associate(
        HOST, gw.port, ae_title=gw.ae_title, contexts=contexts, ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid)
        statuses = [s.Status for s, _ in assoc.send_c_get(identifier, StudyRootGet)]
        assert statuses[-1] == 0x0000, statuses
    finally:
        assoc.release()
    return received


@pytest.fixture
def archive_port() -> int:
    return free_port()


@pytest.fixture
def recorder_at(archive_port: int) -> Iterator[Callable[..., Recorder]]:
    started: list[Recorder] = []

    def start(*, held: bool = False) -> Recorder:
        started.append(Recorder(archive_port, held=held))
        return started[-1]

    yield start
    for recorder in started:
        recorder.stop()


@pytest.mark.parametrize("release", sorted(TARBALLS), ids=lambda v: f"v{v}")
def test_an_index_made_by_the_previous_release_is_upgraded_in_place(
    release: int, tmp_path: Path, archive_port: int, recorder_at: Callable[..., Recorder]
) -> None:
    root = tmp_path / "gw"
    root.mkdir()
    with tarfile.open(TARBALLS[release]) as tar:
        tar.extractall(root, filter="data")
    data_dir = root / "data"
    db = data_dir / "index.sqlite"

    # What the previous release left: version 0, one patients row for the two UPG-0 studies.
    def before(conn: sqlite3.Connection) -> dict[str, Any]:
        return {
            "user_version": conn.execute("PRAGMA user_version").fetchone()[0],
            "patients_of_upg0": conn.execute(
                "SELECT count(DISTINCT s.patient_pk) FROM studies s"
                " JOIN patients p ON s.patient_pk = p.pk WHERE p.patient_id = 'UPG-0'"
            ).fetchone()[0],
            "instances": conn.execute(
                "SELECT sop_uid, path, size, checksum FROM instances ORDER BY sop_uid"
            ).fetchall(),
            "ct_job": conn.execute(
                "SELECT id, state, attempts, last_error, created_at FROM jobs"
                " WHERE rule = 'ct-to-archive'"
            ).fetchone(),
        }

    old = read_index(db, before, immutable=True)
    old_tables = read_index(db, tables, immutable=True)
    assert old["user_version"] == release < SCHEMA_VERSION
    # Merged by version 0; one row per identity from version 1 on.
    assert old["patients_of_upg0"] == (1 if release == 0 else 2)
    job_columns = old_tables["jobs"][0]
    for table, (columns, _) in old_tables.items():
        assert bool(set(LEASE_COLUMNS) & set(columns)) == (
            table in ("jobs", "retrievals") and table not in UNLEASED[release]
        ), table
    job_id, state, old_attempts, last_error, created_at = old["ct_job"]
    assert state == "queued" and old_attempts >= 1 and last_error
    files = file_digests(data_dir)
    assert len(files) == len(old["instances"]) == 6

    if release >= 1:
        # Migrations 2 and 3 alone (the store opened and closed, no part or worker running):
        # the lease columns are added, empty, and nothing else changes.
        assert open_store(data_dir) == ReconcileReport()
        migrated = read_index(db, tables, immutable=False)
        assert read_index(db, lambda c: c.execute("PRAGMA user_version").fetchone()[0],
                          immutable=False) == SCHEMA_VERSION == 3  # fmt: skip
        for table in UNLEASED[release]:
            columns, rows = migrated.pop(table)
            old_columns, old_rows = old_tables[table]
            assert columns == old_columns + LEASE_COLUMNS, table
            assert [row[: len(old_columns)] for row in rows] == old_rows, table
            assert [row[len(old_columns) :] for row in rows] == [(None, None)] * len(rows)
        assert without_mark(migrated.pop("meta")) == without_mark(old_tables["meta"])
        assert migrated == {
            table: content
            for table, content in old_tables.items()
            if table not in (*UNLEASED[release], "meta")
        }
        assert file_digests(data_dir) == files

    gw = GatewayProcess(
        root,
        node={"data_dir": str(data_dir), "min_free_mb": 0},
        peers=[
            {"name": "archive", "ae_title": "ARCHIVE", "host": HOST, "port": archive_port},
            {"name": "vna", "ae_title": "VNA", "host": HOST, "port": free_port()},
        ],
        folders=[{"name": "export", "path": str(tmp_path / "export")}],
        rules=[
            {"name": "ct-to-archive", "match": 'Modality == "CT"', "level": "study",
             "targets": ["archive"], "quiet_seconds": 1},
            {"name": "poe-to-export", "match": 'PatientID == "UPG-3"', "level": "study",
             "targets": ["export"], "quiet_seconds": 1},
        ],
        # An attempt against the stopped archive fails in milliseconds: enough attempts that
        # the job is still retrying, not failed, however long a loaded machine takes to get to
        # the check below.
        dispatch={"retry_base_seconds": 0.3, "retry_max_seconds": 0.3, "max_attempts": 500},
        retrieve={"primary": "vna", "anonymiser": "archive", "max_attempts": 20,
                  "retry_base_seconds": 3600, "retry_max_seconds": 3600},
        projects=[{"name": "cohort"}],
    )  # fmt: skip
    gw.start()
    try:
        (opened,) = store_opened(gw)
        assert {key: opened[key] for key in REPAIRS} == dict.fromkeys(REPAIRS, 0)

        # The schema: this version's, and every table, column and index a new index has.
        upgraded = read_index(db, shape, immutable=False)
        assert read_index(db, lambda c: c.execute("PRAGMA user_version").fetchone()[0],
                          immutable=False) == SCHEMA_VERSION  # fmt: skip
        assert "patients_identity" in [index[0] for index in upgraded["patients"][1]]
        fresh = GatewayProcess(tmp_path / "fresh")
        try:
            fresh.start()
        finally:
            assert fresh.stop() == 0
        assert read_index(fresh.data_dir / "index.sqlite", shape, immutable=True) == upgraded

        # The index still describes the very files the previous release stored.
        assert file_digests(data_dir) == files
        rows = read_index(db, lambda c: before(c)["instances"], immutable=False)
        assert rows == old["instances"]
        for _, path, size, checksum in rows:
            body = dataset_bytes(data_dir / path)
            assert (len(body), hashlib.sha256(body).hexdigest()) == (size, checksum)

        ae = AE(ae_title="UPGRADE")
        ae.add_requested_context(StudyRootFind)
        ae.add_requested_context(PatientRootFind)
        assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
        assert assoc.is_established
        try:
            # Every instance, level by level.
            for study_uid, series in SOP_UIDS.items():
                found = c_find(assoc, StudyRootFind, QueryRetrieveLevel="SERIES",
                               StudyInstanceUID=study_uid, SeriesInstanceUID="")  # fmt: skip
                assert {ds.SeriesInstanceUID for ds in found} == set(series)
                for series_uid, sop_uids in series.items():
                    found = c_find(
                        assoc, StudyRootFind, QueryRetrieveLevel="IMAGE",
                        StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                        SOPInstanceUID="",
                    )  # fmt: skip
                    assert sorted(ds.SOPInstanceUID for ds in found) == sorted(sop_uids)
            # Two patients under PatientID UPG-0 again, each study with its own.
            found = c_find(assoc, StudyRootFind, QueryRetrieveLevel="STUDY", PatientID="UPG-0",
                           StudyInstanceUID="", PatientName="", PatientBirthDate="",
                           PatientSex="")  # fmt: skip
            assert {
                ds.StudyInstanceUID: (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate,
                                      ds.PatientSex)
                for ds in found
            } == {uid: PATIENTS[uid] for uid in (STUDY_CT, STUDY_MR)}  # fmt: skip
            found = c_find(assoc, PatientRootFind, QueryRetrieveLevel="PATIENT",
                           PatientID="UPG-0", PatientName="")  # fmt: skip
            assert sorted(str(ds.PatientName) for ds in found) == ["Doe^Jane", "Roe^Richard"]
            found = c_find(assoc, StudyRootFind, QueryRetrieveLevel="STUDY",
                           PatientName="Doe*", StudyInstanceUID="")  # fmt: skip
            assert [ds.StudyInstanceUID for ds in found] == [STUDY_CT]
        finally:
            assoc.release()

        # Served with the bytes stored.
        stored = {sop: dataset_bytes(data_dir / path) for sop, path, _, _ in old["instances"]}
        for study_uid in SOP_UIDS:
            got = c_get_study(gw, study_uid)
            assert got == {sop: stored[sop] for s in SOP_UIDS[study_uid].values() for sop in s}

        # Devices, sequences, tasks and the retrieval request are there.
        devices = gw.call("devices.list")["devices"]
        assert [(d["name"], d["station_ae"], d["state"]) for d in devices] == [
            ("MR scanner 1", "MR1", "OFFLINE")
        ]
        assert [s["name"] for s in gw.call("sequences.list")["sequences"]] == ["T1 MPRAGE"]
        (task,) = gw.call("tasks.list")["tasks"]
        assert (task["status"], task["patient_id"]) == ("NEW", "UPG-7")
        assert task["device_id"] == devices[0]["id"]
        (request,) = gw.call("retrieve.status", {"project": "cohort"})["requests"]
        assert request["study_uid"] == f"{ROOT}.9" and request["attempts"] >= 1
        assert request["status"] in ("Queued", "Processing")
        assert (request["lease_owner"], request["lease_until"]) == (None, None)  # not due

        # The queued job resumes, its attempts counted on from where they were.
        def jobs() -> dict[int, dict[str, Any]]:
            return {j["id"]: j for j in gw.call("jobs.list")["jobs"]}

        def tried_again() -> dict[str, Any] | None:
            job = jobs()[job_id]
            return job if job["state"] == "queued" and job["attempts"] > old_attempts else None

        job = wait_until("an attempt of the queued job by today's gateway", tried_again)
        assert (job["target"], job["study_uid"], job["created_at"]) == (
            "archive", STUDY_CT, created_at
        )  # fmt: skip
        # Claimed with a lease: while the archive holds its first C-STORE, the job is running
        # under this gateway's token, its deadline ahead; the lease ends with the job.
        recorder = recorder_at(held=True)
        assert recorder.holding.wait(15), "no C-STORE reached the archive"
        job = jobs()[job_id]
        assert job["state"] == "running", job
        assert job["lease_owner"].startswith(f"{socket.gethostname()}:{gw.pid}/"), job
        assert job["lease_until"] > time.time(), job
        lease = read_index(
            db, lambda c: c.execute(
                "SELECT lease_owner, lease_until FROM jobs WHERE id = ?", (job_id,)
            ).fetchone(),
            immutable=False,
        )  # fmt: skip
        assert lease == (job["lease_owner"], job["lease_until"])
        recorder.release()
        wait_until("the job's delivery", lambda: jobs()[job_id]["state"] == "done")
        job = jobs()[job_id]
        assert (job["lease_owner"], job["lease_until"]) == (None, None), job

        # The rules' arrivals checkpoint of the previous release lies before its last arrivals,
        # so their rules may fire again: the delivery ledger it kept holds those sends back.
        def settled() -> bool:
            waiting = read_index(
                db, lambda c: c.execute(
                    "SELECT count(*) FROM completions WHERE state = 'waiting'"
                ).fetchone()[0],
                immutable=False,
            )  # fmt: skip
            return (
                '"completion_engine_started"' in gw.log_text() and waiting == 0
                and all(j["state"] == "done" for j in jobs().values())
            )  # fmt: skip

        wait_until("no rule waiting and every job done", settled)
        ct = SOP_UIDS[STUDY_CT][f"{ROOT}.1.1"]
        assert sorted(uid for uid, _ in recorder.received) == sorted(ct)  # each once
        assert dict(recorder.received) == {sop: stored[sop] for sop in ct}
        assert jobs()[job_id]["delivered"] == len(ct)
        delivered = {}
        for j in jobs().values():
            delivered[j["rule"]] = delivered.get(j["rule"], 0) + j["delivered"]
        assert delivered == {"ct-to-archive": len(ct), "poe-to-export": 2}
        assert not [p for p in (tmp_path / "export").rglob("*") if p.is_file()]
        first = read_index(db, snapshot, immutable=False)
        now = read_index(db, tables, immutable=False)
        # No job but the queued one changed; every job carries the lease columns, emptied.
        columns, rows = now["jobs"]
        assert columns == job_columns + (LEASE_COLUMNS if "jobs" in UNLEASED[release] else [])
        assert all(row[-2:] == (None, None) for row in rows)
        old_jobs = {row[0]: row for row in old_tables["jobs"][1]}
        kept = {row[0]: row[: len(job_columns)] for row in rows if row[0] in old_jobs}
        assert kept.pop(job_id) != old_jobs.pop(job_id)
        assert kept == old_jobs
        # The ledger only grew, by what the queued job delivered.
        assert set(old_tables["deliveries"][1]) <= set(now["deliveries"][1])
        assert len(now["deliveries"][1]) == len(old_tables["deliveries"][1]) + len(ct)
        if release >= 1:  # no data migration: the tables the work leaves alone are as they were
            assert {t: c for t, c in now.items() if t not in WORKED_TABLES} == {
                t: c for t, c in old_tables.items() if t not in WORKED_TABLES
            }
    finally:
        assert gw.stop() == 0

    # A second open changes nothing.
    gw.start()
    try:
        wait_until(
            "the rules' restart", lambda: gw.log_text().count('"completion_engine_started"') == 2
        )
        assert len(store_opened(gw)) == 2
        assert {key: store_opened(gw)[1][key] for key in REPAIRS} == dict.fromkeys(REPAIRS, 0)
        assert read_index(db, snapshot, immutable=False) == first
        assert gw.call("status")["instances"] == 6
    finally:
        assert gw.stop() == 0
    assert not db.with_name("index.sqlite-wal").exists()  # a clean stop: read it as it is
    assert read_index(db, snapshot, immutable=True) == first
    assert file_digests(data_dir) == files
    assert len(recorder.received) == len(ct)  # nothing sent again
