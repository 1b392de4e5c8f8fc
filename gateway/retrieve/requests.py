"""Retrieval requests: the durable record of each study a project asked for, and where it is.

One row per request in `retrievals`, in the index beside the dispatch jobs. A request names a
project and a study (a StudyInstanceUID, or a PatientID (MRN) + AccessionNumber, optionally a
SeriesInstanceUID) and a priority 1-5 (5 the most urgent). Its `status` is FLIP's:

- `Queued`: accepted, not started, or waiting for the secondary archive's time window;
- `Processing`: a step is running or will be retried after a transient failure;
- `Successful`: every instance acknowledged by the anonymiser;
- `Failed`: not found in either archive, out of attempts, or cancelled (the reason says which);
- `QueueFailed`: refused at submission (bad or incomplete identifiers, unknown project).

Its `step` is where it is: `query` (primary archive), `query_secondary`, `compare`, `move`,
`verify`, `forward`, `done`. A restart resumes every request at its step: each step is
idempotent (what it needs is re-derived from the archive and the store). A request being worked
carries its worker's lease (`gateway.work`): `claim_due` takes it, every write of the worker is
fenced by the lease token (`LeaseLost` otherwise), and a request whose lease ran out is claimed
again as another attempt. `retrieval_instances`
lists what the archive holds for the request (written by `compare`, checked by `verify`);
`retrieval_jobs` the dispatch jobs of its `forward` step. docs/retrieve.md describes it all.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from gateway.store.instance import is_valid_uid
from gateway.store.jobs import JobSpec, enqueue_job
from gateway.store.store import Store
from gateway.work import (
    DEFAULT_LEASE_SECONDS,
    FENCE,
    LEASE_RELEASED,
    LeaseLost,
    lease_token,
    release_leases,
    renew_leases,
)

__all__ = [
    "RETRIEVE_SCHEMA",
    "STATUSES",
    "ArchiveInstance",
    "Request",
    "RetrievalQueue",
    "Status",
    "Step",
    "validate",
]

Status = Literal["Queued", "Processing", "Successful", "Failed", "QueueFailed"]
Step = Literal["submit", "query", "query_secondary", "compare", "move", "verify", "forward", "done"]
STATUSES: Final[tuple[Status, ...]] = (
    "Successful",
    "Processing",
    "Failed",
    "Queued",
    "QueueFailed",
)

RETRIEVE_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS retrievals (
        id              INTEGER PRIMARY KEY,
        project         TEXT NOT NULL,
        mrn             TEXT NOT NULL DEFAULT '',
        accession       TEXT NOT NULL DEFAULT '',
        study_uid       TEXT NOT NULL DEFAULT '',
        series_uid      TEXT NOT NULL DEFAULT '',
        priority        INTEGER NOT NULL DEFAULT 1,
        status          TEXT NOT NULL,
        step            TEXT NOT NULL,
        reason          TEXT,
        archive         TEXT,
        studies         TEXT NOT NULL DEFAULT '[]',
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        moved           INTEGER NOT NULL DEFAULT 0,
        timings         TEXT NOT NULL DEFAULT '{}',
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        finished_at     REAL,
        lease_owner     TEXT,
        lease_until     REAL
    )""",
    "CREATE INDEX IF NOT EXISTS retrievals_due ON retrievals (status, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS retrievals_project ON retrievals (project, id)",
    # Requests by project and status (the metrics' gauge) counted from this index alone.
    "CREATE INDEX IF NOT EXISTS retrievals_project_status ON retrievals (project, status)",
    """CREATE TABLE IF NOT EXISTS retrieval_instances (
        request_id    INTEGER NOT NULL,
        sop_uid       TEXT NOT NULL,
        series_uid    TEXT NOT NULL,
        study_uid     TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (request_id, sop_uid)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS retrieval_jobs (
        request_id INTEGER NOT NULL,
        job_id     INTEGER NOT NULL,
        PRIMARY KEY (request_id, job_id)
    ) WITHOUT ROWID""",
)

_COLUMNS: Final = (
    "id, project, mrn, accession, study_uid, series_uid, priority, status, step, reason, archive,"
    " studies, attempts, next_attempt_at, moved, timings, created_at, updated_at, finished_at,"
    " lease_owner, lease_until"
)
_OPEN: Final = "status IN ('Queued', 'Processing')"
_MAX_ID_LENGTH: Final = 64
# How the reason of a request a permanent peer error failed ends (`RetrievalQueue.retry_blocked`).
NOT_RETRIED: Final = " (not retried: it lasts until the configuration changes)"


@dataclass(frozen=True, slots=True)
class Request:
    """One row of `retrievals`."""

    id: int
    project: str
    mrn: str
    accession: str
    study_uid: str
    series_uid: str
    priority: int
    status: Status
    step: Step
    reason: str | None
    archive: str | None
    studies: tuple[str, ...]
    attempts: int
    next_attempt_at: float
    moved: int
    timings: dict[str, float]
    created_at: float
    updated_at: float
    finished_at: float | None
    lease_owner: str | None = None  # who works it: "host:pid/claim"; None unless claimed
    lease_until: float | None = None  # s since the epoch; renewed while its worker progresses

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "status": self.status,
            "step": self.step,
            "reason": self.reason,
            "mrn": self.mrn,
            "accession": self.accession,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "priority": self.priority,
            "archive": self.archive,
            "studies": list(self.studies),
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "moved": self.moved,
            "timings": self.timings,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
        }


def _request(row: tuple[Any, ...]) -> Request:
    values = list(row)
    values[11] = tuple(json.loads(values[11]))
    values[15] = json.loads(values[15])
    return Request(*values)


@dataclass(frozen=True, slots=True)
class ArchiveInstance:
    """An instance the archive listed for a request (an IMAGE-level C-FIND answer)."""

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def validate(
    fields: Mapping[str, Any], known_project: Callable[[str], bool]
) -> tuple[dict[str, Any], str | None]:
    """Normalise a request's fields; return them and the reason it is refused (None if fine).

    Refused: an unknown or missing project; neither a StudyInstanceUID nor both MRN and
    accession; a malformed UID; an identifier with a wildcard or backslash, or over 64
    characters; a priority that is not an integer 1-5.
    """
    unknown = set(fields) - {"project", "mrn", "accession", "study_uid", "series_uid", "priority"}
    clean: dict[str, Any] = {
        "project": _text(fields.get("project")),
        "mrn": _text(fields.get("mrn")),
        "accession": _text(fields.get("accession")),
        "study_uid": _text(fields.get("study_uid")),
        "series_uid": _text(fields.get("series_uid")),
        "priority": 1,
    }
    raw_priority = fields.get("priority")
    if unknown:
        return clean, f"unknown field(s): {', '.join(sorted(unknown))}"
    if not clean["project"]:
        return clean, "no project"
    if not known_project(clean["project"]):
        return clean, f"unknown project {clean['project'][:64]!r}"
    if raw_priority not in (None, ""):
        try:
            priority = int(str(raw_priority).strip())
        except ValueError:
            priority = 0
        if isinstance(raw_priority, bool) or not 1 <= priority <= 5:
            return (
                clean,
                f"priority must be an integer from 1 to 5 (got {str(raw_priority)[:20]!r})",
            )
        clean["priority"] = priority
    for key in ("study_uid", "series_uid"):
        if clean[key] and not is_valid_uid(clean[key]):
            return clean, f"{key} {clean[key][:70]!r} is not a valid UID"
    for key in ("mrn", "accession"):
        value = clean[key]
        if len(value) > _MAX_ID_LENGTH or any(c in value for c in "*?\\"):
            return clean, f"{key} {value[:70]!r} is not usable as a query key"
    if not clean["study_uid"]:
        missing = [key for key in ("mrn", "accession") if not clean[key]]
        if missing:
            return clean, "needs a study_uid, or both mrn and accession (missing: " + (
                ", ".join(missing) + ")"
            )
    return clean, None


class RetrievalQueue:
    """The retrieval tables of a `Store`, behind async methods."""

    def __init__(self, store: Store, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.store = store
        self.lease_seconds = lease_seconds

    async def ensure_schema(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in RETRIEVE_SCHEMA:
                conn.execute(statement)

        await self.store.write(create)

    # -- submission, operator actions ---------------------------------------------------------

    async def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        known_project: Callable[[str], bool],
        now: float | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Record each request: Queued, or QueueFailed with the reason. One transaction.

        A request identical to an open one of the same project (same identifiers) is not added
        twice: the open one's id is returned (with the more urgent priority).
        """
        at = time.time() if now is None else now
        checked = [validate(item, known_project) for item in items]

        def put(conn: sqlite3.Connection) -> builtins.list[dict[str, Any]]:
            out: builtins.list[dict[str, Any]] = []
            for clean, reason in checked:
                keys = (clean["mrn"], clean["accession"], clean["study_uid"], clean["series_uid"])
                if reason is None:
                    row = conn.execute(
                        "SELECT id, status FROM retrievals WHERE project = ? AND mrn = ?"
                        " AND accession = ? AND study_uid = ? AND series_uid = ?"
                        " AND status IN ('Queued', 'Processing')",
                        (clean["project"], *keys),
                    ).fetchone()
                    if row is not None:
                        conn.execute(
                            "UPDATE retrievals SET priority = max(priority, ?) WHERE id = ?",
                            (clean["priority"], row[0]),
                        )
                        out.append({"id": row[0], "status": row[1], "reason": "already requested"})
                        continue
                status, step = ("Queued", "query") if reason is None else ("QueueFailed", "submit")
                cursor = conn.execute(
                    "INSERT INTO retrievals (project, mrn, accession, study_uid, series_uid,"
                    " priority, status, step, reason, next_attempt_at, created_at, updated_at,"
                    " finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (clean["project"], *keys, clean["priority"], status, step, reason, at, at, at,
                     None if reason is None else at),
                )  # fmt: skip
                out.append({"id": cursor.lastrowid, "status": status, "reason": reason})
            return out

        return await self.store.write(put)

    async def retry(self, project: str, now: float | None = None) -> int:
        """Queue the project's Failed requests again (attempts reset, at the step they failed in;
        a request that was not found starts over with the primary query). Returns how many."""
        return await self._requeue_failed("project = ?", (project,), now)

    async def retry_blocked(self, peers: Iterable[str], now: float | None = None) -> int:
        """Queue again, as `retry` does, the Failed requests that a permanent error of one of
        *peers* ended (a peer that did not know the gateway's AE title): their reason names the
        peer and ends with `NOT_RETRIED`. For a reload that changed those peers' settings."""
        names = list(peers)
        if not names:
            return 0
        named = " OR ".join("instr(reason, 'peer ' || ? || ' (') > 0" for _ in names)
        where = f"substr(reason, -{len(NOT_RETRIED)}) = ? AND ({named})"
        return await self._requeue_failed(where, (NOT_RETRIED, *names), now)

    async def _requeue_failed(self, where: str, params: tuple[Any, ...], now: float | None) -> int:
        at = time.time() if now is None else now
        return await self.store.write(
            lambda conn: (
                conn.execute(
                    "UPDATE retrievals SET status = 'Queued', attempts = 0, next_attempt_at = ?,"
                    " updated_at = ?, finished_at = NULL,"
                    " step = CASE WHEN step IN ('query', 'query_secondary', 'done') THEN 'query'"
                    f" ELSE step END WHERE status = 'Failed' AND ({where})",
                    (at, at, *params),
                ).rowcount
            )
        )

    async def cancel(self, project: str, now: float | None = None) -> builtins.list[int]:
        """Fail every open request of the project with reason "cancelled"; return their ids."""
        at = time.time() if now is None else now

        def stop(conn: sqlite3.Connection) -> builtins.list[int]:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM retrievals WHERE project = ? AND status IN"
                    " ('Queued', 'Processing')",
                    (project,),
                )
            ]
            conn.execute(
                "UPDATE retrievals SET status = 'Failed', reason = 'cancelled by an operator',"
                f" updated_at = ?, finished_at = ?, {LEASE_RELEASED} WHERE project = ?"
                f" AND {_OPEN}",
                (at, at, project),
            )
            return ids

        return await self.store.write(stop)

    # -- the worker's bookkeeping -------------------------------------------------------------

    async def claim_due(self, now: float, limit: int) -> builtins.list[Request]:
        """Claim up to *limit* requests, most urgent first: open ones due by *now* that nobody
        holds, and those whose lease ran out (another attempt: their worker died or hangs).

        Each is `Processing` under a new lease (`lease_owner`, `lease_until` = *now* +
        `lease_seconds`); the returned `Request` keeps the status it had before the claim
        (`Queued`: a new or resumed request).
        """
        lease = self.lease_seconds

        def claim(conn: sqlite3.Connection) -> builtins.list[Request]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM retrievals WHERE {_OPEN} AND ("
                "(lease_owner IS NULL AND next_attempt_at <= ?) OR lease_until < ?)"
                " ORDER BY priority DESC, next_attempt_at, id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            claimed: builtins.list[Request] = []
            for row in rows:
                request = _request(row)
                attempts, reason = request.attempts, request.reason
                if request.lease_owner is not None:  # the attempt it held failed
                    attempts += 1
                    reason = (
                        f"lease expired: {request.lease_owner} reported no progress for"
                        f" {lease:g} s (step {request.step})"
                    )
                token = lease_token()
                conn.execute(
                    "UPDATE retrievals SET status = 'Processing', attempts = ?, reason = ?,"
                    " lease_owner = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                    (attempts, reason, token, now + lease, now, request.id),
                )
                claimed.append(
                    replace(request, attempts=attempts, reason=reason, lease_owner=token,
                            lease_until=now + lease, updated_at=now)
                )  # fmt: skip
            return claimed

        return await self.store.write(claim)

    async def next_due_at(self) -> float | None:
        """When the earliest unclaimed open request is due, or the earliest lease runs out."""

        def earliest(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT min(CASE WHEN lease_owner IS NULL THEN next_attempt_at"
                f" ELSE lease_until END) FROM retrievals WHERE {_OPEN}"
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self.store.read(earliest)

    async def renew(self, tokens: Collection[str], until: float) -> int:
        """Move the leases of *tokens* to *until*; return how many are still held."""
        return await self.store.write(lambda conn: renew_leases(conn, "retrievals", tokens, until))

    async def recover(self) -> int:
        """At start-up: free the leases of the process before (its requests are due again at
        their own times; a claimed request was due when it was claimed)."""
        return await self.store.write(lambda conn: release_leases(conn, "retrievals"))

    async def update(self, request: Request, *, release: bool = False, **changes: Any) -> None:
        """Set columns of a request its worker holds (*request*'s lease token), and end the
        lease with *release* (the attempt ends: paused, failed or finished).

        An update that releases the request or sets its status is durable when this returns.
        Progress within an attempt (its step, studies, timings, moved count) is committed
        without waiting for the disk (`Store.write` with durable=False): it survives a kill at
        once, and a power failure from the next durable write on; one lost to a power failure
        resumes the request at the step recorded before it, and every step is safe to repeat.

        Raises `LeaseLost` when the request is no longer the worker's: its lease passed to
        another worker, or an operator cancelled it meanwhile.
        """
        if "studies" in changes:
            changes["studies"] = json.dumps(list(changes["studies"]))
        if "timings" in changes:
            changes["timings"] = json.dumps(changes["timings"])
        changes.setdefault("updated_at", time.time())
        columns = ", ".join(f"{key} = ?" for key in changes)
        if release:
            columns += f", {LEASE_RELEASED}"
        await self.store.write(
            lambda conn: _fenced(
                conn,
                request,
                f"UPDATE retrievals SET {columns} WHERE id = ? AND {_OPEN} AND {FENCE}",
                (*changes.values(), request.id, request.lease_owner),
            ),
            durable=release or "status" in changes,
        )

    async def get(self, request_id: int) -> Request | None:
        def one(conn: sqlite3.Connection) -> Request | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM retrievals WHERE id = ?", (request_id,)
            ).fetchone()
            return None if row is None else _request(row)

        return await self.store.read(one)

    async def set_instances(self, request: Request, instances: Iterable[ArchiveInstance]) -> None:
        """Record what the archive lists for *request* (held by its worker: `update`), as
        progress within the attempt: not waiting for the disk, like `update`'s."""
        rows = [
            (request.id, i.sop_uid, i.series_uid, i.study_uid, i.sop_class_uid) for i in instances
        ]

        def put(conn: sqlite3.Connection) -> None:
            _fenced(conn, request)
            conn.execute("DELETE FROM retrieval_instances WHERE request_id = ?", (request.id,))
            conn.executemany("INSERT OR IGNORE INTO retrieval_instances VALUES (?,?,?,?,?)", rows)

        await self.store.write(put, durable=False)

    async def missing(self, request_id: int) -> builtins.list[ArchiveInstance]:
        """The archive's instances for the request that the store does not hold."""
        return await self.store.read(
            lambda conn: [
                ArchiveInstance(*row)
                for row in conn.execute(
                    "SELECT r.sop_uid, r.series_uid, r.study_uid, r.sop_class_uid"
                    " FROM retrieval_instances r WHERE r.request_id = ? AND NOT EXISTS"
                    " (SELECT 1 FROM instances i WHERE i.sop_uid = r.sop_uid)"
                    " ORDER BY r.study_uid, r.series_uid, r.sop_uid",
                    (request_id,),
                )
            ]
        )

    async def expected(self, request_id: int) -> int:
        return await self.store.read(
            lambda conn: int(
                conn.execute(
                    "SELECT count(*) FROM retrieval_instances WHERE request_id = ?", (request_id,)
                ).fetchone()[0]
            )
        )

    async def forward(self, request: Request, jobs: Sequence[JobSpec]) -> list[int]:
        """Queue the request's forwarding *jobs* and link them to it, in one transaction (a
        kill leaves both or neither), if its worker still holds it (`update`); return the job
        ids."""

        def put(conn: sqlite3.Connection) -> list[int]:
            _fenced(conn, request)
            now = time.time()
            ids = [enqueue_job(conn, job, now) for job in jobs]
            conn.executemany(
                "INSERT OR IGNORE INTO retrieval_jobs VALUES (?, ?)",
                [(request.id, job_id) for job_id in ids],
            )
            return ids

        return await self.store.write(put)

    async def forwarded_through(self, job_id: int, now: float) -> int:
        """The requests waiting in their forward step on dispatch job *job_id* (paused, not
        held by a worker) are due at *now*; return how many."""

        def due(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE retrievals SET next_attempt_at = ? WHERE step = 'forward'"
                " AND status = 'Processing' AND lease_owner IS NULL AND next_attempt_at > ?"
                " AND id IN (SELECT request_id FROM retrieval_jobs WHERE job_id = ?)",
                (now, now, job_id),
            ).rowcount

        return await self.store.write(due)

    async def latest_jobs(self, request_id: int) -> dict[tuple[str, str], tuple[str, str | None]]:
        """Per (scope, uid) the request forwards: the state and last error of its newest job."""
        rows = await self.store.read(
            lambda conn: conn.execute(
                "SELECT j.scope, j.uid, j.state, j.last_error FROM retrieval_jobs r"
                " JOIN jobs j ON j.id = r.job_id WHERE r.request_id = ? ORDER BY j.id",
                (request_id,),
            ).fetchall()
        )
        return {(row[0], row[1]): (row[2], row[3]) for row in rows}

    async def held(self, request_id: int) -> int:
        """How many of the archive's instances for the request the store holds."""
        return await self.store.read(
            lambda conn: int(
                conn.execute(
                    "SELECT count(*) FROM retrieval_instances r JOIN instances i"
                    " ON i.sop_uid = r.sop_uid WHERE r.request_id = ?",
                    (request_id,),
                ).fetchone()[0]
            )
        )

    # -- status -------------------------------------------------------------------------------

    async def status(self, project: str) -> dict[str, Any]:
        """`{"project", "counts", "requests"}`: every request of the project, oldest first, each
        with its instance counts (expected from the archive, held in the store, forwarded)."""

        def select(conn: sqlite3.Connection) -> dict[str, Any]:
            rows = conn.execute(
                f"SELECT {_COLUMNS},"
                " (SELECT count(*) FROM retrieval_instances r WHERE r.request_id = retrievals.id),"
                " (SELECT count(*) FROM retrieval_instances r JOIN instances i"
                "  ON i.sop_uid = r.sop_uid WHERE r.request_id = retrievals.id),"
                " (SELECT coalesce(sum(j.delivered), 0) FROM retrieval_jobs rj"
                "  JOIN jobs j ON j.id = rj.job_id WHERE rj.request_id = retrievals.id)"
                " FROM retrievals WHERE project = ? ORDER BY id",
                (project,),
            ).fetchall()
            counts = dict.fromkeys(STATUSES, 0)
            requests = []
            for row in rows:
                request = _request(row[:-3])
                counts[request.status] += 1
                entry = request.as_dict()
                entry["instances"] = {"expected": row[-3], "stored": row[-2], "forwarded": row[-1]}
                requests.append(entry)
            return {"project": project, "counts": counts, "requests": requests}

        return await self.store.read(select)


def _fenced(
    conn: sqlite3.Connection,
    request: Request,
    sql: str = f"UPDATE retrievals SET id = id WHERE id = ? AND {_OPEN} AND {FENCE}",
    params: Sequence[Any] | None = None,
) -> None:
    """Run *sql* (by default, a no-op on the request's row) and raise `LeaseLost` unless it
    changed the row: the request is open and held by *request*'s lease token."""
    values = (request.id, request.lease_owner) if params is None else params
    if conn.execute(sql, values).rowcount == 0:
        row = conn.execute(
            "SELECT status, lease_owner FROM retrievals WHERE id = ?", (request.id,)
        ).fetchone()
        state = "gone" if row is None else f"{row[0]}, held by {row[1] or 'nobody'}"
        raise LeaseLost(f"retrieval {request.id} is no longer {request.lease_owner}'s ({state})")
