"""A task's results: the DICOM instances it produced, and files its device uploaded.

- **DICOM results are linked automatically.** Every stored instance whose StudyInstanceUID is the
  task's, or whose AccessionNumber is the task's, is the task's: however it arrived (C-STORE from
  the scanner, an upload). `task_results` reads the link from the index when asked, so it is
  never stale and survives any restart.
- **Uploads** come over the control socket in chunks (`uploads.begin` with the name, size and
  SHA-256; `uploads.chunk` with base64 data at an offset; `uploads.finish`). The bytes go to a
  temp file in the store's `tmp/`; at the end the size and the SHA-256 are checked. A mismatch
  is refused and nothing is kept. A DICOM Part 10 file then goes into the store like any
  received instance (its study is the task's, or it is refused). Any other file (raw data, a
  log) is written atomically beside the task's results, in `<data_dir>/results/<task id>/`.
- **Only for a running task.** Each upload call checks that the task is STARTED or INPROGRESS
  (`Registry.device_task`); once it has ended (FINISHED, or ERROR: reported, cancelled, MPPS
  DISCONTINUED) its uploads are refused ("inactive") and an open one is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import structlog

from gateway.acquire.registry import FILE_NAME_RE, AcquisitionError, Registry
from gateway.errors import StoreError
from gateway.store.files import replace_durably
from gateway.store.index import Provenance
from gateway.store.store import Store

log = structlog.get_logger(__name__)

__all__ = ["RESULTS_SCHEMA", "Uploads", "task_results"]

RESULTS_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS result_files (
    id         TEXT PRIMARY KEY,
    task_id    TEXT NOT NULL,
    name       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    sop_uid    TEXT,
    path       TEXT,
    created_at REAL NOT NULL
)"""

_MAX_UPLOAD: Final = 64 * 1024**3
_SERIES_KEYS: Final = (
    "study_uid", "series_uid", "series_number", "modality", "series_description", "instances",
)  # fmt: skip
_FILE_KEYS: Final = ("id", "name", "size", "sha256", "kind", "sop_uid", "created_at")


async def task_results(store: Store, task: dict[str, Any]) -> dict[str, Any]:
    """The task's DICOM results (from the index) and uploaded files."""

    def read(conn: sqlite3.Connection) -> dict[str, Any]:
        series = conn.execute(
            "SELECT st.study_uid, s.series_uid, s.series_number, s.modality,"
            " s.series_description, count(i.pk) FROM studies st JOIN series s ON s.study_pk = st.pk"
            " JOIN instances i ON i.series_pk = s.pk"
            " WHERE st.study_uid = ? OR st.accession_number = ?"
            " GROUP BY s.pk ORDER BY s.series_number, s.pk",
            (task["study_uid"], task["accession_number"]),
        ).fetchall()
        files = conn.execute(
            "SELECT id, name, size, sha256, kind, sop_uid, created_at FROM result_files"
            " WHERE task_id = ? ORDER BY created_at",
            (task["id"],),
        ).fetchall()
        return {
            "task_id": task["id"],
            "dicom": [dict(zip(_SERIES_KEYS, r, strict=True)) for r in series],
            "instances": sum(r[5] for r in series),
            "files": [dict(zip(_FILE_KEYS, r, strict=True)) for r in files],
        }

    return await store.read(read)


@dataclass
class _Upload:
    id: str
    task: dict[str, Any]
    device_id: str
    name: str
    size: int
    sha256: str
    path: Path
    received: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    touched: float = field(default_factory=time.monotonic)


class Uploads:
    """Uploads in progress (in memory: an upload interrupted by a restart starts again).

    An upload passes the store's disk guard (`Store.check_free`, `node.min_free_mb`) for its
    announced size when it begins and for each chunk; one that gets no chunk for *idle_seconds*
    (`[control] upload_idle_timeout`) is dropped and its partial file removed (`expire`, run
    with every upload call and by `run_expiry`), as is every upload of a device whose
    connection closes.
    """

    def __init__(self, store: Store, registry: Registry, idle_seconds: float = 600.0) -> None:
        self.store = store
        self.registry = registry
        self.idle_seconds = idle_seconds
        self._open: dict[str, _Upload] = {}

    async def ensure_schema(self) -> None:
        await self.store.write(lambda conn: conn.execute(RESULTS_SCHEMA))

    async def begin(self, device_id: str, params: dict[str, Any]) -> dict[str, Any]:
        task = await self.registry.device_task(str(params.get("task_id", "")), device_id)
        name, size, sha = params.get("name"), params.get("size"), params.get("sha256")
        if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name):
            raise AcquisitionError("invalid", "name must be a file name: letters, digits, . _ -")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_UPLOAD:
            raise AcquisitionError("invalid", "size must be a number of bytes")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise AcquisitionError("invalid", "sha256 must be 64 lower-case hex digits")
        self.expire()
        await anyio.to_thread.run_sync(self.store.check_free, size)  # StoreError: refused
        upload = _Upload(uuid.uuid4().hex, task, device_id, name, size, sha,
                         self.store.files.new_temp_path())  # fmt: skip
        upload.path.touch()
        self._open[upload.id] = upload
        return {"upload_id": upload.id, "received": 0}

    def expire(self, now: float | None = None) -> int:
        """Drop the uploads idle for `idle_seconds` (monotonic *now*); how many."""
        now = time.monotonic() if now is None else now
        idle = [u for u in self._open.values() if now - u.touched > self.idle_seconds]
        for upload in idle:
            log.warning("upload_expired", upload=upload.id, device=upload.device_id,
                        received=upload.received, size=upload.size)  # fmt: skip
            self._drop(upload)
        return len(idle)

    async def run_expiry(self) -> None:
        """Expire idle uploads until cancelled, looking every quarter of `idle_seconds` (at
        most every minute)."""
        while True:
            await asyncio.sleep(min(60.0, self.idle_seconds / 4))
            self.expire()

    async def _get(self, device_id: str, params: dict[str, Any]) -> _Upload:
        """The device's open upload *params* name, for a task still running (else the upload
        is dropped and refused, "inactive")."""
        self.expire()
        upload = self._open.get(str(params.get("upload_id", "")))
        if upload is None or upload.device_id != device_id:
            raise AcquisitionError("not_found", "no such upload in progress")
        try:
            await self.registry.device_task(upload.task["id"], device_id)
        except AcquisitionError as exc:
            self._drop(upload)
            raise AcquisitionError(exc.kind, f"{exc}: upload dropped") from None
        return upload

    async def chunk(self, device_id: str, params: dict[str, Any]) -> dict[str, Any]:
        upload = await self._get(device_id, params)
        offset, data = params.get("offset"), params.get("data")
        if offset != upload.received:
            raise AcquisitionError(
                "invalid", f"offset must be {upload.received} (the bytes received so far)"
            )
        try:
            chunk = base64.b64decode(data if isinstance(data, str) else "", validate=True)
        except ValueError:
            raise AcquisitionError("invalid", "data must be base64") from None
        if upload.received + len(chunk) > upload.size:
            self._drop(upload)
            raise AcquisitionError("invalid", "more bytes than the announced size: upload dropped")
        try:
            await anyio.to_thread.run_sync(self.store.check_free, len(chunk))
        except StoreError as exc:
            self._drop(upload)
            raise StoreError(f"{exc}: upload dropped") from None

        def append() -> None:
            with upload.path.open("ab") as f:
                f.write(chunk)

        await anyio.to_thread.run_sync(append)
        upload.digest.update(chunk)
        upload.received += len(chunk)
        upload.touched = time.monotonic()
        return {"upload_id": upload.id, "received": upload.received}

    async def finish(self, device_id: str, params: dict[str, Any]) -> dict[str, Any]:
        upload = await self._get(device_id, params)
        self._open.pop(upload.id, None)
        if upload.received != upload.size:
            upload.path.unlink(missing_ok=True)
            raise AcquisitionError(
                "invalid", f"received {upload.received} of {upload.size} bytes: nothing kept"
            )
        if upload.digest.hexdigest() != upload.sha256:
            upload.path.unlink(missing_ok=True)
            raise AcquisitionError("invalid", "sha256 does not match the bytes: nothing kept")
        head = await anyio.to_thread.run_sync(_head, upload.path)
        record: dict[str, Any] = {"id": uuid.uuid4().hex, "kind": "file", "sop_uid": None}
        if head[128:132] == b"DICM":
            ids = await anyio.to_thread.run_sync(_study_keys, upload.path)
            if ids[0] != upload.task["study_uid"] and ids[1] != upload.task["accession_number"]:
                upload.path.unlink(missing_ok=True)
                raise AcquisitionError(
                    "invalid",
                    "the DICOM file belongs to another study (neither the task's"
                    " StudyInstanceUID nor its AccessionNumber): nothing kept",
                )
            result = await self.store.ingest(
                upload.path, Provenance(calling_ae=f"device:{device_id}"[:64])
            )
            record.update(kind="dicom", sop_uid=result.sop_instance_uid)
            relpath = None
        else:
            relpath = await anyio.to_thread.run_sync(self._keep, upload)
        now = time.time()
        await self.store.write(
            lambda conn: conn.execute(
                "INSERT INTO result_files (id, task_id, name, size, sha256, kind, sop_uid, path,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    record["id"],
                    upload.task["id"],
                    upload.name,
                    upload.size,
                    upload.sha256,
                    record["kind"],
                    record["sop_uid"],
                    relpath,
                    now,
                ),
            )
        )
        return {"id": record["id"], "name": upload.name, "size": upload.size,
                "sha256": upload.sha256, "kind": record["kind"], "sop_uid": record["sop_uid"],
                "created_at": now}  # fmt: skip

    def _keep(self, upload: _Upload) -> str:
        target = self.store.files.root / "results" / upload.task["id"] / upload.name
        replace_durably(upload.path, target)
        return str(target.relative_to(self.store.files.root))

    def _drop(self, upload: _Upload) -> None:
        self._open.pop(upload.id, None)
        upload.path.unlink(missing_ok=True)

    def drop_device(self, device_id: str) -> None:
        """The device's connection closed: its unfinished uploads are dropped."""
        for upload in [u for u in self._open.values() if u.device_id == device_id]:
            self._drop(upload)

    def drop_task(self, task_id: str) -> None:
        """The task ended (cancelled): its unfinished uploads are dropped."""
        for upload in [u for u in self._open.values() if u.task["id"] == task_id]:
            self._drop(upload)


def _study_keys(path: Path) -> tuple[str, str]:
    from pydicom import dcmread

    try:
        ds = dcmread(
            path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "AccessionNumber"]
        )
    except Exception:  # not readable: the store's own checks refuse it with the reason
        return "", ""
    return str(ds.get("StudyInstanceUID", "")), str(ds.get("AccessionNumber", ""))  # fmt: skip


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(132)
