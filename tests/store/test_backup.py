"""`gateway backup DEST` against a running gateway, and a gateway restored from the copy.

Real peers: pynetdicom senders that record which C-STOREs got a success and when, a gateway
process receiving them while `gateway backup` runs, a second gateway started on a copy of DEST
in another directory, C-FIND at IMAGE level to find what it holds, DCMTK `storescu` and a
receiving pynetdicom AE for a dispatch job that resumes after the restore.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from gateway.store import backup as backup_module
from gateway.store.backup import BackupError, backup
from tests.conftest import HOST, TEST_FILES, GatewayProcess, free_port
from tests.scp.test_query_retrieve import log_events, stored_file
from tests.scu.test_sender import Recorder
from tests.test_routing import make_series, storescu, wait_until

CT = TEST_FILES / "CT_small.dcm"


class Sender(threading.Thread):
    """One association sending new CT instances of one series until stopped (or *limit*),
    recording each success: SOP Instance UID -> monotonic time its success arrived."""

    def __init__(self, gw: GatewayProcess, study: str, limit: int) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.study = study
        self.series = generate_uid()
        self.limit = limit
        self.acked: dict[str, float] = {}
        self.sent = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.template = pydicom.dcmread(CT)

    def run(self) -> None:
        try:
            ae = AE(ae_title="SENDER")
            ae.add_requested_context(CTImageStorage, self.template.file_meta.TransferSyntaxUID)
            assoc = ae.associate(HOST, self.gw.port, ae_title=self.gw.ae_title)
            assert assoc.is_established
            try:
                for n in range(1, self.limit + 1):
                    if self.halt.is_set():
                        break
                    ds = self.template.copy()
                    ds.StudyInstanceUID = self.study
                    ds.SeriesInstanceUID = self.series
                    ds.SOPInstanceUID = generate_uid()
                    ds.InstanceNumber = n
                    self.sent += 1
                    status = assoc.send_c_store(ds)
                    if status and status.Status == 0x0000:
                        self.acked[str(ds.SOPInstanceUID)] = time.monotonic()
            finally:
                assoc.release()
        except BaseException as exc:  # reported by the test
            self.error = exc


def find_instances(gw: GatewayProcess, study: str, series: str) -> set[str]:
    """SOP Instance UIDs a Study Root C-FIND at IMAGE level answers for one series."""
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = ""
    found = set()
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found.add(str(identifier.SOPInstanceUID))
    finally:
        assoc.release()
    return found


def restored(gateway_factory: Any, tmp_path: Path, dest: Path, **sections: Any) -> GatewayProcess:
    """A gateway on a copy of *dest* in another directory (paths in the index must be
    relative for it to find anything)."""
    data = tmp_path / "elsewhere" / "data"
    shutil.copytree(dest, data)
    gw: GatewayProcess = gateway_factory("restored", node={"data_dir": str(data)}, **sections)
    return gw


def opened_clean(gw: GatewayProcess) -> None:
    """Start-up found nothing to reconcile, nor to scan."""
    (opened,) = log_events(gw, "store_opened")
    assert (opened["temp_files_removed"], opened["orphans_indexed"], opened["orphans_removed"],
            opened["scanned"]) == (0, 0, 0, 0)  # fmt: skip


def test_backup_while_receiving_restores_every_acknowledged_instance(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory("source")
    study = generate_uid()
    senders = [Sender(gw, study, limit=1500) for _ in range(2)]
    for sender in senders:
        sender.start()
    wait_until(lambda: sum(len(s.acked) for s in senders) >= 80)
    began = time.monotonic()
    dest = tmp_path / "backup"
    result = gw.cli("backup", str(dest), "--json")
    ended = time.monotonic()
    for sender in senders:
        sender.halt.set()
        sender.join(30)
        assert sender.error is None, sender.error
    report = json.loads(result.stdout)
    acked = {uid: at for s in senders for uid, at in s.acked.items()}
    before = {uid for uid, at in acked.items() if at < began}
    during = [uid for uid, at in acked.items() if began <= at <= ended]
    print(f"sent {sum(s.sent for s in senders)}, acknowledged {len(acked)}, before the backup"
          f" {len(before)}, during it {len(during)}; backup copied {report['instances']}"
          f" instances, {report['bytes']} bytes in {report['seconds']:.2f} s")  # fmt: skip
    assert len(before) >= 80
    assert during, "the backup did not run while instances arrived"
    assert report["instances"] >= len(before)
    assert (report["removed"], report["replaced"]) == (0, 0)
    assert report["gateway_running"] is True and report["warnings"] == []
    assert report["audit_files"] >= 1
    assert (dest / "index.sqlite").is_file() and not (dest / ".index.sqlite.partial").exists()
    assert not list(dest.glob("index.sqlite-*"))  # one self-contained file, no WAL beside it
    gw.stop()

    new = restored(gateway_factory, tmp_path, dest)
    opened_clean(new)
    found: set[str] = set()
    for sender in senders:
        found |= find_instances(new, study, sender.series)
    assert before <= found  # every instance acknowledged before the backup began
    assert len(found) == report["instances"]
    assert new.call("status")["instances"] == report["instances"]
    for uid in before:  # the same bytes, found through the restored index's relative paths
        assert stored_file(new, uid).read_bytes() == stored_file(gw, uid).read_bytes()
    with sqlite3.connect(new.data_dir / "index.sqlite") as conn:
        paths = [row[0] for row in conn.execute("SELECT path FROM instances")]
    assert all(p.startswith("objects/") for p in paths)
    print(f"restored: {len(found)} instances found by C-FIND, {len(before)} of them"
          " acknowledged before the backup, bytes equal")  # fmt: skip


def test_queued_dispatch_job_resumes_after_restore(gateway_factory: Any, tmp_path: Path) -> None:
    port = free_port()  # the target: down while the source runs, up after the restore
    sections: dict[str, Any] = {
        "peers": [{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": port}],
        "rules": [{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"],
                   "quiet_seconds": 0.3}],
        "dispatch": {"retry_base_seconds": 0.5, "retry_max_seconds": 1.0},
    }  # fmt: skip
    gw = gateway_factory("source", **sections)
    files = make_series(tmp_path / "in", 4, generate_uid(), "AX")
    storescu(gw, files)
    wait_until(lambda: any(j["attempts"] >= 1 for j in gw.call("jobs.list")["jobs"]))
    (job,) = gw.call("jobs.list")["jobs"]  # as it was just before the backup
    dest = tmp_path / "backup"
    report = json.loads(gw.cli("backup", str(dest), "--json").stdout)
    assert report["instances"] == 4
    gw.stop()  # before the target comes up: only the restored gateway may deliver
    # Queued, or running its next attempt: a job the snapshot caught running is queued again
    # by the restored gateway's start-up, like one a crash left running.
    assert job["state"] in ("queued", "running") and job["attempts"] >= 1

    new = restored(gateway_factory, tmp_path, dest, **sections)
    opened_clean(new)
    (resumed,) = new.call("jobs.list")["jobs"]
    assert (resumed["id"], resumed["uid"], resumed["target"]) == (job["id"], job["uid"], "rec")
    assert resumed["attempts"] >= job["attempts"]
    recorder = Recorder(port=port)
    try:
        wait_until(lambda: new.call("jobs.list")["jobs"][0]["state"] == "done", timeout=20)
        uids = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
        assert sorted(uid for uid, _, _ in recorder.received) == uids
        (done,) = new.call("jobs.list")["jobs"]  # the same job, not a new one
        assert (done["id"], done["delivered"]) == (job["id"], 4)
    finally:
        recorder.stop()


def test_dest_refused_when_it_holds_a_store_or_is_inside_data_dir(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory("source")
    storescu(gw, make_series(tmp_path / "in", 2, generate_uid(), "AX"))
    first = tmp_path / "first"
    assert gw.cli("backup", str(first)).returncode == 0
    cases = {
        first: "already holds a store (index.sqlite)",  # a finished backup
        gw.data_dir: "is inside the data_dir",
        gw.data_dir / "backup": "is inside the data_dir",
        tmp_path: "holds the data_dir",
    }
    (tmp_path / "file").write_text("x")
    cases[tmp_path / "file"] = "is not a directory"
    partial = tmp_path / "partial"
    (partial / "objects").mkdir(parents=True)
    cases[partial] = "already holds a store (objects)"
    for dest, message in cases.items():
        result = gw.cli("backup", str(dest), check=False)
        assert result.returncode == 1, (dest, result.stdout)
        assert message in result.stderr, result.stderr
    assert not (gw.data_dir / "backup").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory (a mount point) is fine
    text = gw.cli("backup", str(empty)).stdout
    assert "instances     2," in text and (empty / "index.sqlite").is_file()


def test_files_replaced_or_deleted_meanwhile_are_settled_like_reconciliation(
    gateway_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway_factory("source")
    studies = [generate_uid() for _ in range(3)]
    files = [make_series(tmp_path / f"in{n}", 1, study, "AX")[0] for n, study in enumerate(studies)]
    storescu(gw, files)
    protocol = tmp_path / "t1.seq"
    protocol.write_bytes(b"protocol " * 100)
    sequence = gw.call("sequences.create", {"name": "T1", "file": {
        "name": protocol.name, "data": base64.b64encode(protocol.read_bytes()).decode(),
        "sha256": hashlib.sha256(protocol.read_bytes()).hexdigest()}})  # fmt: skip
    gw.stop()
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    index = gw.data_dir / "index.sqlite"
    # Two uploaded result files (a device's upload, as `Uploads.finish` records it): one kept,
    # one whose file is gone.
    (gw.data_dir / "results" / "task1").mkdir(parents=True)
    (gw.data_dir / "results" / "task1" / "raw.bin").write_bytes(b"raw" * 1000)
    with sqlite3.connect(index) as conn:
        for name in ("raw.bin", "gone.bin"):
            conn.execute(
                "INSERT INTO result_files (id, task_id, name, size, sha256, kind, sop_uid, path,"
                " created_at) VALUES (?, 'task1', ?, 3000, '', 'file', NULL, ?, 0)",
                (name, name, f"results/task1/{name}"),
            )
    with sqlite3.connect(index) as conn:
        paths = dict(conn.execute("SELECT sop_uid, path FROM instances"))
    replaced_bytes = stored_file(gw, uids[0]).read_bytes()
    real_copy_many = backup_module._Copier.copy_many
    calls = []

    def meanwhile(self: Any, jobs: Any) -> list[int | None]:
        # After the snapshot, before the first file is copied: instance 0 is replaced under a
        # new path (`overwrite`), study 1 is deleted (rows, then files), as the gateway does.
        if not calls:
            old = gw.data_dir / paths[uids[0]]
            new_rel = paths[uids[0]].replace(".dcm", "-new.dcm")
            shutil.copyfile(old, gw.data_dir / new_rel)
            with sqlite3.connect(index) as conn:
                conn.execute("UPDATE instances SET path = ? WHERE sop_uid = ?", (new_rel, uids[0]))
                conn.execute("DELETE FROM instances WHERE sop_uid = ?", (uids[1],))
            old.unlink()
            (gw.data_dir / paths[uids[1]]).unlink()
        calls.append(1)
        return real_copy_many(self, jobs)

    monkeypatch.setattr(backup_module._Copier, "copy_many", meanwhile)
    dest = tmp_path / "backup"
    report = backup(gw.data_dir, dest, control_socket=gw.socket)
    assert (report.instances, report.replaced, report.removed) == (2, 1, 0 + 1)
    assert report.warnings == [] and report.gateway_running is False
    assert (report.files, report.files_removed) == (2, 1)  # the sequence's file and raw.bin

    new = restored(gateway_factory, tmp_path, dest)
    opened_clean(new)
    assert new.call("status")["instances"] == 2
    assert new.call("status")["studies"] == 2  # study 1 pruned with its only instance
    assert stored_file(new, uids[0]).read_bytes() == replaced_bytes
    assert stored_file(new, uids[0]).name.endswith("-new.dcm")
    assert stored_file(new, uids[2]).is_file()
    copied = new.data_dir / "sequences" / sequence["id"] / protocol.name
    assert copied.read_bytes() == protocol.read_bytes()
    assert (new.data_dir / "results" / "task1" / "raw.bin").read_bytes() == b"raw" * 1000
    with sqlite3.connect(new.data_dir / "index.sqlite") as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM result_files")] == ["raw.bin"]
    with pytest.raises(BackupError, match="already holds a store"):
        backup(gw.data_dir, dest)
