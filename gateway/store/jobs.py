"""The durable dispatch queue: one row per (series or study, target) to deliver.

The `jobs` table is the only record of what is to be sent, what is being sent and what was
sent; nothing that matters lives only in memory, so a kill -9 at any point loses no work (see
docs/dispatch.md). Every change is one write transaction on the store's writer thread
(`synchronous=FULL`); reads use the store's read-only connection.

States::

    queued -> running -> done
                      -> queued (attempt failed, retried after a backoff)
                      -> failed (max attempts reached, or a permanent error)
    queued | running  -> cancelled
    failed | cancelled -> queued (retry)
    running (lease expired) -> running (claimed again: another attempt)

A claimed job carries a lease (`gateway.work`): its worker's token (`lease_owner`) and a
deadline (`lease_until`) that the dispatcher moves `lease_seconds` ahead while the worker
acknowledges instances. A worker that dies or hangs stops renewing it; once the deadline
passes the job is claimed again, as another attempt, without waiting for a restart. Every
transition a worker makes is fenced by its token: the worker that lost its lease finds its
`finish` or `fail_attempt` refused (None), and only its acknowledgements, which are facts
about the target, still reach the ledger.

At most one *open* job (queued or running) exists per (scope, uid, target): a partial UNIQUE
index enforces it, and `enqueue` returns the open job instead of adding another. `deliveries` is
the ledger of what each target acknowledged (instance, content checksum): an attempt sends only
what the target does not hold yet, so a retry, a resumed job, or a second rule routing the same
data at another level sends nothing twice. Jobs of one study for one target run one at a time, so
each sees the ledger the other left.
"""

from __future__ import annotations

import builtins
import random as _random
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from gateway.store.store import Store, StoredInstance
from gateway.work import (
    DEFAULT_LEASE_SECONDS,
    LEASE_RELEASED,
    Backoff,
    lease_token,
    release_leases,
    renew_leases,
)

__all__ = [
    "JOBS_SCHEMA",
    "PRIORITIES",
    "Job",
    "JobQueue",
    "JobSpec",
    "JobState",
    "Scope",
    "enqueue_job",
]

Scope = Literal["series", "study"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]

PRIORITIES: Final[dict[str, int]] = {"urgent": 0, "normal": 1, "low": 2}

JOBS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id              INTEGER PRIMARY KEY,
    scope           TEXT NOT NULL CHECK (scope IN ('series', 'study')),
    uid             TEXT NOT NULL,
    study_uid       TEXT NOT NULL,
    target          TEXT NOT NULL,
    rule            TEXT NOT NULL,
    priority        INTEGER NOT NULL DEFAULT 1 CHECK (priority BETWEEN 0 AND 2),
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    rerun           INTEGER NOT NULL DEFAULT 0,
    delivered       INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    lease_owner     TEXT,
    lease_until     REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, priority, next_attempt_at, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_open ON jobs (scope, uid, target)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (target, study_uid) WHERE state = 'running';
-- Jobs by state and target (the metrics' gauge) counted from this index alone, not the table.
CREATE INDEX IF NOT EXISTS jobs_state_target ON jobs (state, target);
CREATE TABLE IF NOT EXISTS deliveries (
    instance_pk  INTEGER NOT NULL REFERENCES instances (pk) ON DELETE CASCADE,
    target       TEXT NOT NULL,
    checksum     TEXT NOT NULL,
    job_id       INTEGER NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (instance_pk, target)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id);
"""

# SQL over `i` (instances) that is true when *target* (the parameter) holds the instance as stored.
ACKNOWLEDGED: Final = (
    "EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_pk = i.pk AND d.target = ?"
    " AND d.checksum = i.checksum)"
)

_COLUMNS: Final = (
    "id, scope, uid, study_uid, target, rule, priority, state, attempts, next_attempt_at,"
    " last_error, delivered, created_at, updated_at, lease_owner, lease_until"
)


@dataclass(frozen=True, slots=True)
class Job:
    """One row of `jobs`, as claimed or listed."""

    id: int
    scope: Scope
    uid: str
    study_uid: str
    target: str
    rule: str
    priority: int
    state: JobState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    delivered: int
    created_at: float
    updated_at: float
    lease_owner: str | None = None  # who runs it: "host:pid/claim"; None unless running
    lease_until: float | None = None  # s since the epoch; renewed by each acknowledgement

    def as_dict(self) -> dict[str, Any]:
        """The job as JSON-friendly values (priority by name)."""
        names = {v: k for k, v in PRIORITIES.items()}
        return {
            "id": self.id,
            "scope": self.scope,
            "uid": self.uid,
            "study_uid": self.study_uid,
            "target": self.target,
            "rule": self.rule,
            "priority": names.get(self.priority, str(self.priority)),
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "delivered": self.delivered,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
        }


def _job(row: tuple[Any, ...]) -> Job:
    return Job(*row)


def _priority(value: int | str) -> int:
    if isinstance(value, str):
        try:
            return PRIORITIES[value]
        except KeyError:
            raise ValueError(f"unknown priority {value!r}: one of urgent, normal, low") from None
    if value not in (0, 1, 2):
        raise ValueError(f"priority {value} is not 0 (urgent), 1 (normal) or 2 (low)")
    return value


def _placeholders(values: Collection[Any]) -> str:
    return ",".join("?" * len(values))


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job to queue: deliver a series or study (*scope*, *uid*) to *target* for *rule*."""

    scope: Scope
    uid: str
    target: str
    rule: str
    priority: int | str = 1


def enqueue_job(conn: sqlite3.Connection, spec: JobSpec, at: float) -> int:
    """Queue *spec* inside the caller's write transaction; return the job id.

    The transition that creates work calls this in its own transaction (a completed wait, a
    retrieval's forward step), so the transition and its jobs commit together or not at all.
    When an open job for the same (scope, uid, target) exists, its id is returned: it keeps
    the more urgent of the two priorities, and a *running* one is marked to run once more when
    it finishes (instances stored since it selected its own are then sent too; what it
    delivered is not sent again). Raises ValueError for an unknown scope or priority.
    """
    if spec.scope not in ("series", "study"):
        raise ValueError(f"unknown scope {spec.scope!r}")
    level = _priority(spec.priority)
    row = conn.execute(
        "SELECT id, state FROM jobs WHERE scope = ? AND uid = ? AND target = ?"
        " AND state IN ('queued', 'running')",
        (spec.scope, spec.uid, spec.target),
    ).fetchone()
    if row is not None:
        conn.execute(
            "UPDATE jobs SET priority = min(priority, ?), rerun = (state = 'running'),"
            " updated_at = ? WHERE id = ?",
            (level, at, row[0]),
        )
        return int(row[0])
    cursor = conn.execute(
        "INSERT INTO jobs (scope, uid, study_uid, target, rule, priority, state,"
        " attempts, next_attempt_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?)",
        (spec.scope, spec.uid, _study_of(conn, spec.scope, spec.uid), spec.target, spec.rule,
         level, at, at, at),
    )  # fmt: skip
    assert cursor.lastrowid is not None
    return cursor.lastrowid


class JobQueue:
    """The `jobs` and `deliveries` tables of a `Store`, behind async methods."""

    def __init__(
        self,
        store: Store,
        *,
        random: _random.Random | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.store = store
        self._random = random or _random.Random()
        self.lease_seconds = lease_seconds

    async def ensure_schema(self) -> None:
        """Create the tables and indexes (idempotent); call once after `Store.open`."""

        def create(conn: sqlite3.Connection) -> None:
            # executescript would COMMIT the writer's transaction: run statement by statement.
            for statement in JOBS_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

        await self.store.write(create)

    # -- writes -------------------------------------------------------------------------------

    async def enqueue(
        self,
        scope: Scope,
        uid: str,
        target: str,
        rule: str,
        priority: int | str,
        now: float | None = None,
    ) -> int:
        """Queue delivering a series or study to a target, in a transaction of its own
        (`enqueue_job`, whose rules for an open job of the same series or study and target
        apply); return the job id."""
        at = time.time() if now is None else now
        return await self.store.write(
            lambda conn: enqueue_job(conn, JobSpec(scope, uid, target, rule, priority), at)
        )

    async def claim_due(
        self,
        now: float,
        limit: int,
        busy_targets: Collection[str] = (),
        *,
        free_slots: Mapping[str, int] | None = None,
        slots_per_target: int | None = None,
    ) -> builtins.list[Job]:
        """Mark up to *limit* due queued jobs running and return them.

        Order: priority, then next_attempt_at, then id. Jobs for *busy_targets* are left queued.
        With *slots_per_target*, at most that many jobs are claimed per target (at most
        ``free_slots[target]`` for a target listed there), so a later urgent job is not stuck
        behind claimed ones waiting for the same target. A job whose target is already sending
        the same study (a series job and a study job of two rules) waits for it to finish, and
        then finds in the ledger what that one delivered.
        """
        busy = builtins.list(dict.fromkeys(busy_targets))
        slots = dict(free_slots or {})
        lease = self.lease_seconds

        def claim(conn: sqlite3.Connection) -> builtins.list[Job]:
            sql = (
                f"SELECT {_COLUMNS} FROM jobs WHERE ((state = 'queued' AND next_attempt_at <= ?)"
                " OR (state = 'running' AND lease_until < ?))"
                + (f" AND target NOT IN ({_placeholders(busy)})" if busy else "")
                + " ORDER BY priority, next_attempt_at, id"
            )
            claimed: builtins.list[Job] = []
            sending = set(
                conn.execute(
                    "SELECT target, study_uid FROM jobs WHERE state = 'running'"
                    " AND (lease_until IS NULL OR lease_until >= ?)",
                    (now,),
                )
            )
            for row in conn.execute(sql, (now, now, *busy)):
                if len(claimed) >= limit:
                    break
                job = _job(row)
                if job.study_uid and (job.target, job.study_uid) in sending:
                    continue
                if slots_per_target is not None:
                    left = slots.get(job.target, slots_per_target)
                    if left <= 0:
                        continue
                    slots[job.target] = left - 1
                claimed.append(job)
                sending.add((job.target, job.study_uid))
            taken: builtins.list[Job] = []
            for job in claimed:
                token = lease_token()
                attempts, error = job.attempts, job.last_error
                if job.state == "running":  # its lease expired: the attempt it held failed
                    attempts += 1
                    error = f"lease expired: {job.lease_owner} acknowledged nothing for {lease:g} s"
                # A queued job starts a fresh run (rerun cleared); a reclaimed one keeps its own.
                conn.execute(
                    "UPDATE jobs SET rerun = CASE state WHEN 'queued' THEN 0 ELSE rerun END,"
                    " state = 'running', attempts = ?, last_error = ?, lease_owner = ?,"
                    " lease_until = ?, updated_at = ? WHERE id = ?",
                    (attempts, error, token, now + lease, now, job.id),
                )
                taken.append(
                    replace(job, state="running", attempts=attempts, last_error=error,
                            lease_owner=token, lease_until=now + lease, updated_at=now)
                )  # fmt: skip
            return taken

        return await self.store.write(claim)

    async def record_delivered(
        self,
        job_id: int,
        instances: Iterable[StoredInstance | str],
        now: float | None = None,
    ) -> int:
        """Record instances the job's target acknowledged (committed before returning).

        An `StoredInstance` is recorded with the checksum it was sent with; a SOP Instance UID
        with the checksum stored now. Returns how many were not in the ledger yet.

        The commit does not wait for the disk (`Store.write` with durable=False): it survives a
        kill of the process at once, and a power failure from the job's next durable write on
        (its end, a failed attempt). A record lost before that only sends its instance once
        more, which at-least-once delivery allows (docs/dispatch.md).
        """
        return await self.store.write(_recorder(job_id, instances, now), durable=False)

    def record_delivered_nowait(
        self,
        job_id: int,
        instances: Iterable[StoredInstance | str],
        now: float | None = None,
    ) -> Future[int]:
        """`record_delivered` without waiting: the commit's future (for a sender thread)."""
        return self.store.write_nowait(_recorder(job_id, instances, now), durable=False)

    async def finish(
        self, job_id: int, now: float | None = None, lease: str | None = None
    ) -> JobState | None:
        """A running job delivered everything: `done` (or `queued` again when re-enqueued
        while running). Returns the new state; None when the job was not running (cancelled),
        or, given its worker's *lease* token, when that worker no longer holds it.
        """
        at = time.time() if now is None else now

        def done(conn: sqlite3.Connection) -> JobState | None:
            row = conn.execute(
                "SELECT state, rerun, lease_owner FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None or row[0] != "running" or (lease is not None and row[2] != lease):
                return None
            state: JobState = "queued" if row[1] else "done"
            conn.execute(
                "UPDATE jobs SET state = ?, rerun = 0, last_error = NULL, next_attempt_at = ?,"
                f" updated_at = ?, {LEASE_RELEASED} WHERE id = ?",
                (state, at, at, job_id),
            )
            return state

        return await self.store.write(done)

    async def fail_attempt(
        self,
        job_id: int,
        error: str,
        now: float | None,
        backoff: Backoff,
        *,
        permanent: bool = False,
        lease: str | None = None,
    ) -> JobState | None:
        """Count a failed attempt of a running job: `queued` after a backoff, or `failed`.

        A *permanent* error (an unknown target) fails the job at once. Returns the new state;
        None when the job was not running (it was cancelled meanwhile), or, given its worker's
        *lease* token, when that worker no longer holds it.
        """
        at = time.time() if now is None else now

        def fail(conn: sqlite3.Connection) -> JobState | None:
            row = conn.execute(
                "SELECT state, attempts, lease_owner FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None or row[0] != "running" or (lease is not None and row[2] != lease):
                return None
            attempts = int(row[1]) + 1
            state: JobState
            if permanent or attempts >= backoff.max_attempts:
                state, due = "failed", at
            else:
                state, due = "queued", at + backoff.delay(attempts, self._random)
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
                f" rerun = 0, updated_at = ?, {LEASE_RELEASED} WHERE id = ?",
                (state, attempts, due, error, at, job_id),
            )
            return state

        return await self.store.write(fail)

    async def retry(
        self,
        job_ids: Iterable[int] | None = None,
        *,
        state: Literal["failed", "cancelled"] | None = None,
        targets: Iterable[str] | None = None,
        now: float | None = None,
    ) -> int:
        """Queue failed or cancelled jobs again, attempts reset; return how many.

        Selects *job_ids*, or every job in *state*, or (neither given) every failed job; only
        those of *targets* when given. A job whose (scope, uid, target) has an open job already
        is left as it is.
        """
        at = time.time() if now is None else now
        ids = None if job_ids is None else builtins.list(job_ids)
        states = (state,) if state is not None else ("failed", "cancelled")
        if ids is None and state is None:
            states = ("failed",)

        names = None if targets is None else builtins.list(targets)

        def requeue(conn: sqlite3.Connection) -> int:
            if (ids is not None and not ids) or (names is not None and not names):
                return 0
            candidates = conn.execute(
                f"SELECT id FROM jobs WHERE state IN ({_placeholders(states)})"
                + (f" AND id IN ({_placeholders(ids)})" if ids is not None else "")
                + (f" AND target IN ({_placeholders(names)})" if names is not None else "")
                + " ORDER BY id DESC",
                (*states, *(ids or ()), *(names or ())),
            ).fetchall()
            # One at a time, newest first: two closed jobs of one key must not both reopen.
            count = 0
            for (job_id,) in candidates:
                count += conn.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?,"
                    " rerun = 0, updated_at = ? WHERE id = ?"
                    " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.scope = jobs.scope"
                    " AND o.uid = jobs.uid AND o.target = jobs.target"
                    " AND o.state IN ('queued', 'running'))",
                    (at, at, job_id),
                ).rowcount
            return count

        return await self.store.write(requeue)

    async def cancel(self, job_ids: Iterable[int], now: float | None = None) -> int:
        """Cancel queued or running jobs; return how many. A running one stops being recorded
        as running at once; its sender finishes the instance in flight and is ignored."""
        at = time.time() if now is None else now
        ids = builtins.list(job_ids)
        if not ids:
            return 0

        def stop(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE jobs SET state = 'cancelled', rerun = 0, updated_at = ?, {LEASE_RELEASED}"
                f" WHERE state IN ('queued', 'running') AND id IN ({_placeholders(ids)})",
                (at, *ids),
            ).rowcount

        return await self.store.write(stop)

    async def recover_running(self, now: float | None = None) -> int:
        """At start-up: jobs left running by an earlier process are queued again, due now
        (their leases freed: `release_leases`)."""
        at = time.time() if now is None else now

        def requeue(conn: sqlite3.Connection) -> int:
            count = conn.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ?, updated_at = ?"
                " WHERE state = 'running'",
                (at, at),
            ).rowcount
            release_leases(conn, "jobs")
            return count

        return await self.store.write(requeue)

    async def renew(self, tokens: Collection[str], until: float) -> int:
        """Move the leases of *tokens* (running jobs whose workers made progress) to *until*;
        return how many are still held."""
        return await self.store.write(lambda conn: renew_leases(conn, "jobs", tokens, until))

    # -- reads --------------------------------------------------------------------------------

    async def delivered(self, job_id: int) -> set[str]:
        """SOP Instance UIDs whose ledger entry this job wrote (its target holds them)."""
        return await self.store.read(
            lambda conn: {
                row[0]
                for row in conn.execute(
                    "SELECT i.sop_uid FROM deliveries d JOIN instances i ON d.instance_pk = i.pk"
                    " WHERE d.job_id = ?",
                    (job_id,),
                )
            }
        )

    async def pending(self, job: Job) -> tuple[builtins.list[StoredInstance], int]:
        """The job's instances its target does not hold as stored; and how many it holds."""
        where = "s.series_uid = ?" if job.scope == "series" else "st.study_uid = ?"
        pending = await self.store.instance_files(
            f"{where} AND NOT {ACKNOWLEDGED}", (job.uid, job.target)
        )
        held = await self.store.read(
            lambda conn: int(
                conn.execute(
                    "SELECT count(*) FROM instances i JOIN series s ON i.series_pk = s.pk"
                    f" JOIN studies st ON s.study_pk = st.pk WHERE {where} AND {ACKNOWLEDGED}",
                    (job.uid, job.target),
                ).fetchone()[0]
            )
        )
        return pending, held

    async def get(self, job_id: int) -> Job | None:
        """One job, if it exists."""

        def one(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _job(row)

        return await self.store.read(one)

    async def list(
        self, state: JobState | None = None, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        """Jobs (newest first) with how many instances each has delivered."""

        def select(conn: sqlite3.Connection) -> builtins.list[dict[str, Any]]:
            where = "WHERE state = ?" if state is not None else ""
            params: tuple[Any, ...] = (state, limit) if state is not None else (limit,)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?", params
            ).fetchall()
            return [_job(row).as_dict() for row in rows]

        return await self.store.read(select)

    async def next_due_at(self, busy_targets: Collection[str] = ()) -> float | None:
        """When the earliest queued job (of a target not in *busy_targets*) is due, or the
        earliest lease of a running job expires, whichever comes first."""
        busy = builtins.list(dict.fromkeys(busy_targets))

        def earliest(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT min(next_attempt_at) FROM jobs WHERE state = 'queued'"
                + (f" AND target NOT IN ({_placeholders(busy)})" if busy else ""),
                tuple(busy),
            ).fetchone()
            lease = conn.execute(
                "SELECT min(lease_until) FROM jobs WHERE state = 'running'"
            ).fetchone()
            times = [float(r[0]) for r in (row, lease) if r is not None and r[0] is not None]
            return min(times, default=None)

        return await self.store.read(earliest)


def _recorder(
    job_id: int,
    instances: Iterable[StoredInstance | str],
    now: float | None,
) -> Callable[[sqlite3.Connection], int]:
    at = time.time() if now is None else now
    items = builtins.list(instances)

    def record(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT target FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or not items:
            return 0
        target = row[0]
        added = 0
        for item in items:
            if isinstance(item, str):
                found = conn.execute(
                    "SELECT pk, checksum FROM instances WHERE sop_uid = ?", (item,)
                ).fetchone()
                if found is None:
                    continue
                pk, checksum = found
            else:
                pk, checksum = item.pk, item.checksum
            known = conn.execute(
                "SELECT 1 FROM deliveries WHERE instance_pk = ? AND target = ? AND checksum = ?",
                (pk, target, checksum),
            ).fetchone()
            # INSERT ... SELECT: an instance deleted meanwhile is skipped, not a key error.
            inserted = conn.execute(
                "INSERT OR REPLACE INTO deliveries"
                " (instance_pk, target, checksum, job_id, delivered_at)"
                " SELECT pk, ?, ?, ?, ? FROM instances WHERE pk = ?",
                (target, checksum, job_id, at, pk),
            ).rowcount
            added += int(known is None and inserted > 0)
        if added:
            conn.execute("UPDATE jobs SET delivered = delivered + ? WHERE id = ?", (added, job_id))
        return added

    return record


def _study_of(conn: sqlite3.Connection, scope: Scope, uid: str) -> str:
    if scope == "study":
        return uid
    row = conn.execute(
        "SELECT st.study_uid FROM series s JOIN studies st ON s.study_pk = st.pk"
        " WHERE s.series_uid = ?",
        (uid,),
    ).fetchone()
    return "" if row is None else str(row[0])
