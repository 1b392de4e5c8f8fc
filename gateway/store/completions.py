"""Completion state in the index: which series and studies rules are waiting on, and until when.

Rows here are the durable half of the completion engine (`gateway/rules/runtime.py`): every
arrival resets a row's deadline, and a restart re-derives its timers from the rows, so pending
series and studies complete on time after a restart.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.store.jobs import JobSpec, enqueue_job
from gateway.store.store import Store

__all__ = [
    "ARRIVALS_SINCE",
    "COMPLETIONS_SCHEMA",
    "Completion",
    "CompletionStore",
    "FirstInstance",
    "SeriesProgress",
    "Touch",
]

Scope = Literal["series", "study"]

COMPLETIONS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS completions (
        id         INTEGER PRIMARY KEY,
        rule       TEXT NOT NULL,
        scope      TEXT NOT NULL,
        uid        TEXT NOT NULL,
        study_uid  TEXT NOT NULL,
        first_at   REAL NOT NULL,
        last_at    REAL NOT NULL,
        due_at     REAL NOT NULL,
        force_at   REAL,
        state      TEXT NOT NULL DEFAULT 'waiting',
        closed_at  REAL
    )""",
    """CREATE UNIQUE INDEX IF NOT EXISTS completions_open
        ON completions (rule, scope, uid) WHERE state = 'waiting'""",
    "CREATE INDEX IF NOT EXISTS completions_due ON completions (state, due_at)",
    "CREATE INDEX IF NOT EXISTS completions_study ON completions (study_uid)",
    """CREATE TABLE IF NOT EXISTS series_rules (
        series_uid TEXT PRIMARY KEY,
        fired      TEXT NOT NULL
    )""",
)
_CHECKPOINT_KEY = "completion_checkpoint"
# What arrived from a time on: the index on instances.received_at finds it without a scan.
ARRIVALS_SINCE = (
    "SELECT s.series_uid, st.study_uid, max(i.received_at) FROM instances i"
    " JOIN series s ON i.series_pk = s.pk JOIN studies st ON s.study_pk = st.pk"
    " WHERE i.received_at >= ? GROUP BY s.pk ORDER BY s.pk"
)


@dataclass(frozen=True, slots=True)
class Touch:
    """An arrival for (rule, scope, uid): open the wait if none is open, else reset its deadline."""

    rule: str
    scope: Scope
    uid: str
    study_uid: str
    now: float
    quiet_seconds: float
    force_seconds: float | None
    # Set for an arrival taken again at start-up (`arrivals_since_checkpoint`): the newest
    # received-at of what it stands for. A wait for the same (rule, scope, uid) that closed
    # after it already covered it, so none is opened again.
    arrived_at: float | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """An open wait."""

    id: int
    rule: str
    scope: Scope
    uid: str
    study_uid: str
    first_at: float
    last_at: float
    due_at: float
    force_at: float | None


@dataclass(frozen=True, slots=True)
class SeriesProgress:
    """A series of a study: its description and when its last instance arrived."""

    series_uid: str
    description: str
    last_received_at: float


@dataclass(frozen=True, slots=True)
class FirstInstance:
    """What rule evaluation reads for a series: its first instance and how it arrived."""

    path: str
    calling_ae: str
    called_ae: str
    peer_address: str


class CompletionStore:
    """Reads and writes of the completion tables, through the store's connections."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def ensure_schema(self) -> None:
        def create(conn: sqlite3.Connection) -> None:
            for statement in COMPLETIONS_SCHEMA:
                conn.execute(statement)

        await self._store.write(create)

    async def touch(self, touches: Sequence[Touch], checkpoint: float) -> None:
        """Apply *touches* and move the arrivals checkpoint to *checkpoint*, in one transaction."""

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_CHECKPOINT_KEY, repr(checkpoint)),
            )
            for t in touches:
                updated = conn.execute(
                    "UPDATE completions SET last_at = ?, due_at = ? WHERE rule = ? AND scope = ?"
                    " AND uid = ? AND state = 'waiting'",
                    (t.now, t.now + t.quiet_seconds, t.rule, t.scope, t.uid),
                ).rowcount
                if not updated and t.arrived_at is not None and _closed_after(conn, t):
                    continue
                if not updated:
                    force_at = None if t.force_seconds is None else t.now + t.force_seconds
                    conn.execute(
                        "INSERT INTO completions (rule, scope, uid, study_uid, first_at, last_at,"
                        " due_at, force_at) VALUES (?,?,?,?,?,?,?,?)",
                        (t.rule, t.scope, t.uid, t.study_uid, t.now, t.now,
                         t.now + t.quiet_seconds, force_at),
                    )  # fmt: skip

        await self._store.write(apply)

    async def arrivals_since_checkpoint(self, now: float) -> list[tuple[str, str, float]]:
        """(series UID, study UID, newest received-at) of what arrived since the last
        checkpoint; on the very first run, nothing (the checkpoint starts at *now*, s since the
        epoch: existing data is not routed).

        Both reads go to a read connection, so the writer (and the instances it commits) does
        not wait for them; the arrivals are found through the index on received_at.
        """
        row = await self._store.read(
            lambda c: c.execute(
                "SELECT value FROM meta WHERE key = ?", (_CHECKPOINT_KEY,)
            ).fetchone()
        )
        if row is None:
            await self._store.write(
                lambda c: c.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    (_CHECKPOINT_KEY, repr(now)),
                )
            )
            return []
        since = float(row[0])
        return await self._store.read(
            lambda c: [(r[0], r[1], float(r[2])) for r in c.execute(ARRIVALS_SINCE, (since,))]
        )

    async def waiting(self) -> list[Completion]:
        def select(conn: sqlite3.Connection) -> list[Completion]:
            rows = conn.execute(
                "SELECT id, rule, scope, uid, study_uid, first_at, last_at, due_at, force_at"
                " FROM completions WHERE state = 'waiting' ORDER BY id"
            ).fetchall()
            return [Completion(*row) for row in rows]

        return await self._store.read(select)

    async def reschedule(self, completion_id: int, due_at: float) -> None:
        await self._store.write(
            lambda c: c.execute(
                "UPDATE completions SET due_at = ? WHERE id = ?", (due_at, completion_id)
            )
        )

    async def close(
        self, completion_id: int, state: str, now: float, jobs: Sequence[JobSpec] = ()
    ) -> list[int] | None:
        """Close a wait (`done` or `discarded`) and queue *jobs*, in one transaction: a kill
        at any moment leaves either the wait open (it completes again after the restart) or
        the wait closed with its jobs. Returns the jobs' ids, or None when the wait was no
        longer open (nothing is queued then)."""

        def update(conn: sqlite3.Connection) -> list[int] | None:
            closed = conn.execute(
                "UPDATE completions SET state = ?, closed_at = ? WHERE id = ?"
                " AND state = 'waiting'",
                (state, now, completion_id),
            ).rowcount
            if not closed:
                return None
            return [enqueue_job(conn, job, now) for job in jobs]

        return await self._store.write(update)

    async def force_study(self, study_uid: str, now: float) -> int:
        """Make every open wait of a study due now; return how many."""
        return await self._store.write(
            lambda c: (
                c.execute(
                    "UPDATE completions SET due_at = ?, force_at = NULL WHERE study_uid = ?"
                    " AND state = 'waiting'",
                    (now, study_uid),
                ).rowcount
            )
        )

    async def fired_rules(self, series_uid: str) -> list[str] | None:
        row = await self._store.read(
            lambda c: c.execute(
                "SELECT fired FROM series_rules WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        )
        return None if row is None else list(json.loads(row[0]))

    async def remember_fired(self, series_uid: str, rules: list[str]) -> None:
        await self._store.write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO series_rules (series_uid, fired) VALUES (?, ?)",
                (series_uid, json.dumps(rules)),
            )
        )

    async def first_instance(self, series_uid: str) -> FirstInstance | None:
        row = await self._store.read(
            lambda c: c.execute(
                "SELECT i.path, coalesce(i.calling_ae, ''), coalesce(i.called_ae, ''),"
                " coalesce(i.peer_address, '') FROM instances i JOIN series s"
                " ON i.series_pk = s.pk WHERE s.series_uid = ?"
                " ORDER BY i.instance_number IS NULL, i.instance_number, i.pk LIMIT 1",
                (series_uid,),
            ).fetchone()
        )
        return None if row is None else FirstInstance(*row)

    async def study_series(self, study_uid: str) -> list[SeriesProgress]:
        rows = await self._store.read(
            lambda c: c.execute(
                "SELECT s.series_uid, coalesce(s.series_description, ''), max(i.received_at)"
                " FROM series s JOIN studies st ON s.study_pk = st.pk"
                " JOIN instances i ON i.series_pk = s.pk WHERE st.study_uid = ?"
                " GROUP BY s.pk ORDER BY s.pk",
                (study_uid,),
            ).fetchall()
        )
        return [SeriesProgress(*row) for row in rows]


def _closed_after(conn: sqlite3.Connection, touch: Touch) -> bool:
    """Whether a wait for a replayed *touch* closed after its instances arrived: they were
    part of it (its jobs select what the index holds when they run)."""
    row = conn.execute(
        "SELECT 1 FROM completions WHERE rule = ? AND scope = ? AND uid = ?"
        " AND state != 'waiting' AND closed_at >= ? LIMIT 1",
        (touch.rule, touch.scope, touch.uid, touch.arrived_at),
    ).fetchone()
    return row is not None
