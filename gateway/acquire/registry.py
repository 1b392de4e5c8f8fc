"""Devices, sequences, acquisition tasks and MPPS instances: ScanHub's model, in the index.

- A **device** (a scanner) has a name, modality, manufacturer, serial number, site and station
  AE title, and a token given once at registration. Only a salted SHA-256 of the token is kept
  (the token is 256 random bits, so a slow hash adds nothing); it is compared in constant time.
  A token can be rotated (a new one, given once) or revoked.
- A **sequence** is a named acquisition protocol: parameters as JSON, a description.
- An **acquisition task** is work for a device: a patient (ID, name, birth date, sex), a sequence
  and its parameters, a scheduled start. The gateway assigns its StudyInstanceUID,
  AccessionNumber, RequestedProcedureID and ScheduledProcedureStepID. Status NEW, STARTED,
  INPROGRESS, FINISHED or ERROR, with progress in percent. NEW and STARTED tasks are Modality
  Worklist items. A device has at most one *active* task (STARTED or INPROGRESS) at a time; only
  an active task takes reports and uploads.
- An **MPPS instance** (Modality Performed Procedure Step) records an N-CREATE and its N-SETs;
  the task it names (by its scheduled step, accession or study) follows its status.

docs/acquisition.md describes the model, the worklist and MPPS.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import anyio

from gateway.store.files import write_atomically
from gateway.store.query import prepare_connection
from gateway.store.store import Store

__all__ = [
    "ACQUIRE_SCHEMA",
    "ACTIVE_STATUSES",
    "FILE_NAME_RE",
    "TASK_STATUSES",
    "AcquisitionError",
    "DeviceState",
    "Registry",
    "TaskStatus",
    "hash_token",
]

TaskStatus = Literal["NEW", "STARTED", "INPROGRESS", "FINISHED", "ERROR"]
TASK_STATUSES: Final[tuple[TaskStatus, ...]] = ("NEW", "STARTED", "INPROGRESS", "FINISHED", "ERROR")
# The statuses of a task its device is running: the only ones that take reports and uploads.
ACTIVE_STATUSES: Final[tuple[TaskStatus, ...]] = ("STARTED", "INPROGRESS")
_ACTIVE_SQL: Final = "('STARTED', 'INPROGRESS')"
_UID_ROOT: Final = "2.25."
# A name a device or operator gives a file the gateway keeps (uploads, sequence files).
FILE_NAME_RE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
)  # UUID-derived UIDs (PS3.5 B.2): no registered root needed

ACQUIRE_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS devices (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        modality      TEXT NOT NULL,
        manufacturer  TEXT NOT NULL DEFAULT '',
        serial_number TEXT NOT NULL DEFAULT '',
        site          TEXT NOT NULL DEFAULT '',
        station_ae    TEXT NOT NULL DEFAULT '',
        state         TEXT NOT NULL DEFAULT 'OFFLINE',
        last_seen     REAL,
        token_salt    BLOB,
        token_hash    BLOB,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS sequences (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL DEFAULT '',
        parameters  TEXT NOT NULL DEFAULT '{}',
        file        TEXT,
        created_at  REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tasks (
        id                 TEXT PRIMARY KEY,
        device_id          TEXT NOT NULL REFERENCES devices (id),
        sequence_id        TEXT NOT NULL REFERENCES sequences (id),
        parameters         TEXT NOT NULL DEFAULT '{}',
        patient_id         TEXT NOT NULL,
        patient_name       TEXT NOT NULL DEFAULT '',
        patient_birth_date TEXT NOT NULL DEFAULT '',
        patient_sex        TEXT NOT NULL DEFAULT '',
        scheduled_date     TEXT NOT NULL,
        scheduled_time     TEXT NOT NULL,
        description        TEXT NOT NULL DEFAULT '',
        study_uid          TEXT NOT NULL UNIQUE,
        accession_number   TEXT NOT NULL UNIQUE,
        requested_procedure_id TEXT NOT NULL,
        sps_id             TEXT NOT NULL UNIQUE,
        status             TEXT NOT NULL DEFAULT 'NEW',
        progress           INTEGER NOT NULL DEFAULT 0,
        reason             TEXT,
        created_at         REAL NOT NULL,
        updated_at         REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, scheduled_date)",
    """CREATE TABLE IF NOT EXISTS mpps (
        sop_uid    TEXT PRIMARY KEY,
        task_id    TEXT,
        status     TEXT NOT NULL,
        attributes TEXT NOT NULL DEFAULT '{}',
        calling_ae TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
)

_DEVICE_FIELDS: Final = ("name", "modality", "manufacturer", "serial_number", "site", "station_ae")
_DEVICE_COLUMNS: Final = (
    "id, " + ", ".join(_DEVICE_FIELDS) + ", token_hash IS NOT NULL, state, last_seen"
)
DeviceState = Literal["ONLINE", "BUSY", "ERROR", "OFFLINE"]
_TASK_COLUMNS: Final = (
    "t.id, t.device_id, t.sequence_id, t.parameters, t.patient_id, t.patient_name,"
    " t.patient_birth_date, t.patient_sex, t.scheduled_date, t.scheduled_time, t.description,"
    " t.study_uid, t.accession_number, t.requested_procedure_id, t.sps_id, t.status,"
    " t.progress, t.reason, t.created_at, t.updated_at, s.name, d.name, d.modality,"
    " d.station_ae"
)
_TASK_KEYS: Final = (
    "id", "device_id", "sequence_id", "parameters", "patient_id", "patient_name",
    "patient_birth_date", "patient_sex", "scheduled_date", "scheduled_time", "description",
    "study_uid", "accession_number", "requested_procedure_id", "sps_id", "status", "progress",
    "reason", "created_at", "updated_at", "sequence", "device", "modality", "station_ae",
)  # fmt: skip


ErrorKind = Literal["invalid", "not_found", "conflict", "forbidden", "inactive"]


class AcquisitionError(Exception):
    """A request refused; `kind` says why ("invalid", "not_found", "conflict", "forbidden", or
    "inactive": a report or upload for a task that is not STARTED or INPROGRESS). `data`, when
    set, is the JSON-RPC error's `data`."""

    def __init__(self, kind: ErrorKind, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.data = data


def hash_token(token: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + token.encode("utf-8")).digest()


def _new_token() -> tuple[str, bytes, bytes]:
    token = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return token, salt, hash_token(token, salt)


def _text(fields: Mapping[str, Any], key: str, *, required: bool = False, limit: int = 64) -> str:
    value = fields.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise AcquisitionError("invalid", f"{key} must be a string")
    value = value.strip()
    if required and not value:
        raise AcquisitionError("invalid", f"{key} is required")
    if len(value) > limit or any(c in value for c in "\\\x00\r\n"):
        raise AcquisitionError(
            "invalid", f"{key} {value[:40]!r} is too long or has a control character"
        )
    return value


def _date(value: str, key: str) -> str:
    if value:
        try:
            datetime.strptime(value, "%Y%m%d")
        except ValueError:
            raise AcquisitionError(
                "invalid", f"{key} {value[:20]!r} is not a date YYYYMMDD"
            ) from None
    return value


def _uid() -> str:
    return _UID_ROOT + str(uuid.uuid4().int)


def _device(row: tuple[Any, ...]) -> dict[str, Any]:
    fields = dict(zip(_DEVICE_FIELDS, row[1:7], strict=True))
    return {"id": row[0], **fields, "has_token": bool(row[7]), "state": row[8],
            "last_seen": row[9]}  # fmt: skip


def _task(row: tuple[Any, ...]) -> dict[str, Any]:
    task = dict(zip(_TASK_KEYS, row, strict=True))
    task["parameters"] = json.loads(task["parameters"])
    return task


class Registry:
    """The acquisition tables of a `Store`, behind async methods (writes on the writer)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # The station AE titles of the registered devices (gateway.scp.access reads it from
        # association threads; replaced whole, never changed in place).
        self.station_aes: frozenset[str] = frozenset()

    async def _load_stations(self) -> None:
        rows = await self.store.read(
            lambda conn: conn.execute(
                "SELECT DISTINCT station_ae FROM devices WHERE station_ae != ''"
            ).fetchall()
        )
        self.station_aes = frozenset(str(title) for (title,) in rows)

    async def ensure_schema(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in ACQUIRE_SCHEMA:
                conn.execute(statement)
            conn.execute("UPDATE devices SET state = 'OFFLINE'")  # no connection survives a start

        await self.store.write(create)
        await self._load_stations()

    # -- devices ------------------------------------------------------------------------------

    async def register_device(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Create a device; return it with its token (the only time the token is given)."""
        values = {key: _text(fields, key, required=key in ("name", "modality"), limit=64)
                  for key in _DEVICE_FIELDS}  # fmt: skip
        if len(values["modality"]) > 16 or len(values["station_ae"]) > 16:
            raise AcquisitionError("invalid", "modality and station_ae are at most 16 characters")
        token, salt, digest = _new_token()
        device_id = uuid.uuid4().hex
        now = time.time()
        await self.store.write(
            lambda conn: conn.execute(
                "INSERT INTO devices (id, name, modality, manufacturer, serial_number, site,"
                " station_ae, token_salt, token_hash, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (device_id, *values.values(), salt, digest, now, now),
            )
        )
        await self._load_stations()
        return {"id": device_id, **values, "has_token": True, "state": "OFFLINE",
                "last_seen": None, "token": token}  # fmt: skip

    async def update_device(self, device_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        changes = {key: _text(fields, key, required=key in ("name", "modality"))
                   for key in _DEVICE_FIELDS if key in fields}  # fmt: skip
        unknown = set(fields) - set(_DEVICE_FIELDS)
        if unknown:
            raise AcquisitionError("invalid", f"unknown field(s): {', '.join(sorted(unknown))}")
        if changes:
            columns = ", ".join(f"{key} = ?" for key in changes)
            count = await self.store.write(
                lambda conn: (
                    conn.execute(
                        f"UPDATE devices SET {columns}, updated_at = ? WHERE id = ?",
                        (*changes.values(), time.time(), device_id),
                    ).rowcount
                )
            )
            if not count:
                raise AcquisitionError("not_found", f"no device {device_id[:40]!r}")
            await self._load_stations()
        return await self.device(device_id)

    async def rotate_token(self, device_id: str) -> str:
        token, salt, digest = _new_token()
        await self._set_token(device_id, salt, digest)
        return token

    async def revoke_token(self, device_id: str) -> None:
        await self._set_token(device_id, None, None)

    async def _set_token(self, device_id: str, salt: bytes | None, digest: bytes | None) -> None:
        count = await self.store.write(
            lambda conn: (
                conn.execute(
                    "UPDATE devices SET token_salt = ?, token_hash = ?, updated_at = ?"
                    " WHERE id = ?",
                    (salt, digest, time.time(), device_id),
                ).rowcount
            )
        )
        if not count:
            raise AcquisitionError("not_found", f"no device {device_id[:40]!r}")

    async def set_device_state(
        self, device_id: str, state: DeviceState, *, only_from: tuple[DeviceState, ...] = ()
    ) -> str:
        """Record a device's state (and that it was heard from now); return the state it has.

        ONLINE is recorded as BUSY while the device has an active task (STARTED, INPROGRESS).
        With *only_from*, the state changes only from one of those (else it is left as it is).
        """

        def update(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT state FROM devices WHERE id = ?", (device_id,)).fetchone()
            if row is None:
                return "OFFLINE"
            if only_from and row[0] not in only_from:
                return str(row[0])
            new = state
            if new == "ONLINE" and _active_task_id(conn, device_id) is not None:
                new = "BUSY"
            conn.execute(
                "UPDATE devices SET state = ?, last_seen = ? WHERE id = ?",
                (new, time.time(), device_id),
            )
            return new

        return await self.store.write(update)

    async def seen(self, device_id: str) -> str:
        """A heartbeat: the device was heard from now; return its state."""

        def touch(conn: sqlite3.Connection) -> str:
            conn.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (time.time(), device_id))
            row = conn.execute("SELECT state FROM devices WHERE id = ?", (device_id,)).fetchone()
            return "OFFLINE" if row is None else str(row[0])

        return await self.store.write(touch)

    async def check_token(self, device_id: str, token: str) -> bool:
        """Whether *token* is the device's current token (constant-time comparison)."""
        row = await self.store.read(
            lambda conn: conn.execute(
                "SELECT token_salt, token_hash FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
        )
        salt, digest = row if row is not None else (b"\0" * 16, None)
        candidate = hash_token(token, salt or b"")
        return hmac.compare_digest(candidate, digest or b"\0" * 32) and digest is not None

    async def device(self, device_id: str) -> dict[str, Any]:
        row = await self.store.read(
            lambda conn: conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
        )
        if row is None:
            raise AcquisitionError("not_found", f"no device {device_id[:40]!r}")
        return _device(row)

    async def devices(self) -> builtins.list[dict[str, Any]]:
        rows = await self.store.read(
            lambda conn: conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY name, id"
            ).fetchall()
        )
        return [_device(row) for row in rows]

    # -- sequences ----------------------------------------------------------------------------

    async def create_sequence(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Create a sequence; an attached file (`file`: name, base64 data, sha256) is verified
        and kept in `<data_dir>/sequences/<id>/`."""
        name = _text(fields, "name", required=True)
        description = _text(fields, "description", limit=1024)
        parameters = fields.get("parameters", {})
        if not isinstance(parameters, dict):
            raise AcquisitionError("invalid", "parameters must be a JSON object")
        sequence_id = uuid.uuid4().hex
        attached = fields.get("file")
        file_info = None
        if attached is not None:
            file_info = await anyio.to_thread.run_sync(
                _keep_sequence_file, self.store.files.root / "sequences" / sequence_id, attached
            )
        now = time.time()

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO sequences (id, name, description, parameters, file, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (sequence_id, name, description, json.dumps(parameters),
                     None if file_info is None else json.dumps(file_info), now),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise AcquisitionError("conflict", f"a sequence named {name!r} exists") from None

        await self.store.write(insert)
        return {"id": sequence_id, "name": name, "description": description,
                "parameters": parameters, "file": file_info, "created_at": now}  # fmt: skip

    async def sequences(self, sequence_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every sequence by name, or the one with *sequence_id* (an empty list if none)."""
        where, params = ("WHERE id = ?", (sequence_id,)) if sequence_id is not None else ("", ())
        rows = await self.store.read(
            lambda conn: conn.execute(
                "SELECT id, name, description, parameters, file, created_at FROM sequences"
                f" {where} ORDER BY name",
                params,
            ).fetchall()
        )
        return [{"id": r[0], "name": r[1], "description": r[2], "parameters": json.loads(r[3]),
                 "file": json.loads(r[4]) if r[4] else None, "created_at": r[5]}
                for r in rows]  # fmt: skip

    async def sequence(self, sequence_id: str) -> dict[str, Any]:
        found = await self.sequences(sequence_id)
        if not found:
            raise AcquisitionError("not_found", f"no sequence {sequence_id[:40]!r}")
        return found[0]

    async def sequence_file(self, sequence_id: str) -> dict[str, Any]:
        """The attached file of a sequence: its name, sha256 and base64 data."""
        sequence = await self.sequence(sequence_id)
        if sequence["file"] is None:
            raise AcquisitionError("not_found", f"sequence {sequence['name']!r} has no file")
        path = self.store.files.root / "sequences" / sequence_id / sequence["file"]["name"]
        data = await anyio.to_thread.run_sync(path.read_bytes)
        return {**sequence["file"], "data": base64.b64encode(data).decode()}

    # -- tasks --------------------------------------------------------------------------------

    async def create_task(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Create a NEW task; the gateway assigns its study and procedure identifiers."""
        device_id = _text(fields, "device_id", required=True)
        sequence_id = _text(fields, "sequence_id", required=True)
        patient = fields.get("patient")
        if not isinstance(patient, dict):
            raise AcquisitionError(
                "invalid", "patient must be an object with id, name, birth_date, sex"
            )
        patient_id = _text(patient, "id", required=True)
        patient_name = _text(patient, "name")
        birth_date = _date(_text(patient, "birth_date", limit=16), "patient.birth_date")
        sex = _text(patient, "sex", limit=1).upper()
        if sex not in ("", "M", "F", "O"):
            raise AcquisitionError("invalid", "patient.sex must be M, F or O")
        parameters = fields.get("parameters", {})
        if not isinstance(parameters, dict):
            raise AcquisitionError("invalid", "parameters must be a JSON object")
        now = time.time()
        scheduled = _text(fields, "scheduled_at", limit=32)
        try:
            when = datetime.fromisoformat(scheduled) if scheduled else datetime.fromtimestamp(now)
            if when.tzinfo is not None:  # a time with an offset: the gateway's local time
                when = when.astimezone().replace(tzinfo=None)
        except ValueError:
            raise AcquisitionError(
                "invalid", f"scheduled_at {scheduled!r} is not an ISO date-time"
            ) from None
        description = _text(fields, "description", limit=64)
        task_id = uuid.uuid4().hex
        number = secrets.randbelow(10**12)
        task = {
            "study_uid": _uid(),
            "accession_number": f"GW{number:012d}",
            "requested_procedure_id": f"RP{number:012d}",
            "sps_id": f"SPS{number:012d}",
        }

        def insert(conn: sqlite3.Connection) -> None:
            for table, key in (("devices", device_id), ("sequences", sequence_id)):
                if conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (key,)).fetchone() is None:
                    raise AcquisitionError("not_found", f"no {table[:-1]} {key[:40]!r}")
            conn.execute(
                "INSERT INTO tasks (id, device_id, sequence_id, parameters, patient_id,"
                " patient_name, patient_birth_date, patient_sex, scheduled_date, scheduled_time,"
                " description, study_uid, accession_number, requested_procedure_id, sps_id,"
                " status, progress, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?, 'NEW', 0, ?, ?)",
                (task_id, device_id, sequence_id, json.dumps(parameters), patient_id,
                 patient_name, birth_date, sex, when.strftime("%Y%m%d"), when.strftime("%H%M%S"),
                 description, task["study_uid"], task["accession_number"],
                 task["requested_procedure_id"], task["sps_id"], now, now),
            )  # fmt: skip

        await self.store.write(insert)
        return await self.task(task_id)

    async def task(self, task_id: str) -> dict[str, Any]:
        row = await self.store.read(
            lambda conn: conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks t JOIN sequences s ON s.id = t.sequence_id"
                " JOIN devices d ON d.id = t.device_id WHERE t.id = ?",
                (task_id,),
            ).fetchone()
        )
        if row is None:
            raise AcquisitionError("not_found", f"no task {task_id[:40]!r}")
        return _task(row)

    async def tasks(
        self, *, device_id: str | None = None, status: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        where, params = [], []
        if device_id:
            where.append("t.device_id = ?")
            params.append(device_id)
        if status:
            if status not in TASK_STATUSES:
                raise AcquisitionError(
                    "invalid", f"status must be one of {', '.join(TASK_STATUSES)}"
                )
            where.append("t.status = ?")
            params.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self.store.read(
            lambda conn: conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks t JOIN sequences s ON s.id = t.sequence_id"
                f" JOIN devices d ON d.id = t.device_id {clause}"
                " ORDER BY t.scheduled_date, t.scheduled_time, t.created_at",
                params,
            ).fetchall()
        )
        return [_task(row) for row in rows]

    async def active_task(self, device_id: str) -> dict[str, Any] | None:
        """The device's active task (STARTED or INPROGRESS), or None."""
        task_id = await self.store.read(lambda conn: _active_task_id(conn, device_id))
        return None if task_id is None else await self.task(task_id)

    async def device_task(self, task_id: str, device_id: str) -> dict[str, Any]:
        """The task a device reports on or uploads for: it must exist ("not_found"), be the
        device's ("forbidden") and be active, STARTED or INPROGRESS ("inactive")."""
        task = await self.task(task_id)
        if task["device_id"] != device_id:
            raise AcquisitionError("forbidden", f"task {task['id']} belongs to another device")
        if task["status"] not in ACTIVE_STATUSES:
            raise AcquisitionError("inactive", _inactive(task["id"], task["status"]))
        return task

    async def start_task(self, task_id: str) -> dict[str, Any]:
        """A NEW task becomes STARTED and its device BUSY, in one transaction: refused
        ("conflict") when the task is not NEW or the device has an active task already."""

        def start(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT t.status, t.device_id, d.name FROM tasks t JOIN devices d"
                " ON d.id = t.device_id WHERE t.id = ?",
                (task_id,),
            ).fetchone()
            if row is None:
                raise AcquisitionError("not_found", f"no task {task_id[:40]!r}")
            status, device_id, name = row
            if status != "NEW":
                raise AcquisitionError("conflict", f"task {task_id} is {status}, not NEW")
            running = _active_task_id(conn, device_id)
            if running is not None:
                raise AcquisitionError(
                    "conflict",
                    f"device {name!r} is busy with another task ({running}): it runs one task"
                    " at a time",
                    {"device_id": device_id, "state": "BUSY", "task_id": running},
                )
            now = time.time()
            conn.execute(
                "UPDATE tasks SET status = 'STARTED', updated_at = ? WHERE id = ?", (now, task_id)
            )
            conn.execute(
                "UPDATE devices SET state = 'BUSY', last_seen = ? WHERE id = ?"
                " AND state != 'OFFLINE'",
                (now, device_id),
            )

        await self.store.write(start)
        return await self.task(task_id)

    async def task_assignment(self, task: dict[str, Any]) -> dict[str, Any]:
        """What a device is told of a task it is to run (the `task.start` notification's
        params, `tasks.current`'s result): the task, its sequence, its parameters."""
        sequence = await self.sequence(task["sequence_id"])
        return {"task": task, "sequence": sequence, "parameters": task["parameters"]}

    async def set_task_status(
        self,
        task_id: str,
        status: TaskStatus,
        *,
        progress: int | None = None,
        reason: str | None = None,
        allowed_from: tuple[str, ...] = TASK_STATUSES,
        refused: Literal["conflict", "inactive"] = "conflict",
    ) -> dict[str, Any]:
        """Change a task's status, only from one of *allowed_from* (else an AcquisitionError of
        kind *refused*). A task that leaves STARTED or INPROGRESS for FINISHED or ERROR frees
        its device: BUSY becomes ONLINE."""

        def update(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT status, device_id FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise AcquisitionError("not_found", f"no task {task_id[:40]!r}")
            if row[0] not in allowed_from:
                message = (
                    _inactive(task_id, row[0])
                    if refused == "inactive"
                    else f"task {task_id} is {row[0]}, not {'/'.join(allowed_from)}"
                )
                raise AcquisitionError(refused, message)
            final = 100 if status == "FINISHED" else progress
            conn.execute(
                "UPDATE tasks SET status = ?, progress = coalesce(?, progress), reason = ?,"
                " updated_at = ? WHERE id = ?",
                (status, final, reason, time.time(), task_id),
            )
            if row[0] in ACTIVE_STATUSES and status in ("FINISHED", "ERROR"):
                _free_device(conn, row[1])

        await self.store.write(update)
        return await self.task(task_id)

    # -- MPPS ---------------------------------------------------------------------------------

    async def mpps_create(
        self, sop_uid: str, task_keys: Mapping[str, str], attributes: Mapping[str, Any],
        calling_ae: str,
    ) -> str | None:  # fmt: skip
        """Record an N-CREATE IN PROGRESS; the named task becomes INPROGRESS. Returns its id.

        Raises AcquisitionError("conflict") when the SOP Instance exists (a repeated N-CREATE).
        """

        def create(conn: sqlite3.Connection) -> str | None:
            if conn.execute("SELECT 1 FROM mpps WHERE sop_uid = ?", (sop_uid,)).fetchone():
                raise AcquisitionError("conflict", f"MPPS {sop_uid} exists")
            task_id = _find_task(conn, task_keys)
            now = time.time()
            conn.execute(
                "INSERT INTO mpps (sop_uid, task_id, status, attributes, calling_ae, created_at,"
                " updated_at) VALUES (?, ?, 'IN PROGRESS', ?, ?, ?, ?)",
                (sop_uid, task_id, json.dumps(dict(attributes)), calling_ae, now, now),
            )
            if task_id is not None:
                conn.execute(
                    "UPDATE tasks SET status = 'INPROGRESS', updated_at = ? WHERE id = ?"
                    " AND status IN ('NEW', 'STARTED', 'INPROGRESS')",
                    (now, task_id),
                )
            return task_id

        return await self.store.write(create)

    async def mpps_set(
        self, sop_uid: str, status: str, attributes: Mapping[str, Any], reason: str | None
    ) -> str | None:
        """Record an N-SET. COMPLETED finishes the task, DISCONTINUED sets it ERROR (*reason*).

        Raises AcquisitionError: "not_found" for an unknown SOP Instance, "conflict" when the
        step is COMPLETED or DISCONTINUED already.
        """

        def update(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT status, task_id, attributes FROM mpps WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
            if row is None:
                raise AcquisitionError("not_found", f"no MPPS {sop_uid}")
            if row[0] != "IN PROGRESS":
                raise AcquisitionError(
                    "conflict", f"MPPS {sop_uid} is {row[0]}: it may no longer be updated"
                )
            now = time.time()
            merged = {**json.loads(row[2]), **attributes}
            conn.execute(
                "UPDATE mpps SET status = ?, attributes = ?, updated_at = ? WHERE sop_uid = ?",
                (status, json.dumps(merged), now, sop_uid),
            )
            task_id = None if row[1] is None else str(row[1])
            if task_id is not None and status in ("COMPLETED", "DISCONTINUED"):
                device = conn.execute(
                    "SELECT device_id FROM tasks WHERE id = ?", (task_id,)
                ).fetchone()
                conn.execute(
                    "UPDATE tasks SET status = ?, progress = CASE WHEN ? THEN 100 ELSE progress"
                    " END, reason = ?, updated_at = ? WHERE id = ?",
                    ("FINISHED" if status == "COMPLETED" else "ERROR", status == "COMPLETED",
                     reason, now, task_id),
                )  # fmt: skip
                if device is not None:
                    _free_device(conn, str(device[0]))
            return task_id

        return await self.store.write(update)

    async def worklist(
        self, where: str, params: builtins.list[object]
    ) -> builtins.list[dict[str, Any]]:
        """NEW and STARTED tasks matching a WHERE clause over `t` (tasks) and `d` (devices)."""

        def select(conn: sqlite3.Connection) -> builtins.list[dict[str, Any]]:
            prepare_connection(conn)
            rows = conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks t JOIN sequences s ON s.id = t.sequence_id"
                " JOIN devices d ON d.id = t.device_id WHERE t.status IN ('NEW', 'STARTED')"
                f" AND {where} ORDER BY t.scheduled_date, t.scheduled_time",
                params,
            ).fetchall()
            return [_task(row) for row in rows]

        return await self.store.read(select)


def _keep_sequence_file(directory: Path, attached: Any) -> dict[str, Any]:
    """Verify an attached file (name, base64 data, sha256) and write it atomically."""
    if not isinstance(attached, dict):
        raise AcquisitionError("invalid", "file must be an object with name, data and sha256")
    name, data, sha = attached.get("name"), attached.get("data"), attached.get("sha256")
    if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name):
        raise AcquisitionError("invalid", "file.name must be a file name: letters, digits, . _ -")
    try:
        content = base64.b64decode(data if isinstance(data, str) else "", validate=True)
    except ValueError:
        raise AcquisitionError("invalid", "file.data must be base64") from None
    if not isinstance(sha, str) or hashlib.sha256(content).hexdigest() != sha.lower():
        raise AcquisitionError("invalid", "file.sha256 does not match the data: nothing kept")

    def fill(out: BinaryIO) -> None:
        out.write(content)

    write_atomically(directory / name, fill)
    return {"name": name, "size": len(content), "sha256": sha.lower()}


def _active_task_id(conn: sqlite3.Connection, device_id: str) -> str | None:
    """The id of the device's active task (the most recently changed, should there be two)."""
    row = conn.execute(
        f"SELECT id FROM tasks WHERE device_id = ? AND status IN {_ACTIVE_SQL}"
        " ORDER BY updated_at DESC LIMIT 1",
        (device_id,),
    ).fetchone()
    return None if row is None else str(row[0])


def _free_device(conn: sqlite3.Connection, device_id: str) -> None:
    """A device's task ended: BUSY becomes ONLINE (unless another task of it is active)."""
    if _active_task_id(conn, device_id) is None:
        conn.execute(
            "UPDATE devices SET state = 'ONLINE' WHERE id = ? AND state = 'BUSY'", (device_id,)
        )


def _inactive(task_id: str, status: str) -> str:
    return (
        f"task {task_id} is {status}: only a STARTED or INPROGRESS task takes reports and uploads"
    )


def _find_task(conn: sqlite3.Connection, keys: Mapping[str, str]) -> str | None:
    for column in ("sps_id", "accession_number", "study_uid"):
        value = keys.get(column)
        if value:
            row = conn.execute(f"SELECT id FROM tasks WHERE {column} = ?", (value,)).fetchone()
            if row is not None:
                return str(row[0])
    return None
