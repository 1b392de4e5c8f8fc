"""Numbered migrations of the index: what an index made by an earlier release gets at open.

`PRAGMA user_version` holds the number of the last migration applied; `SCHEMA_VERSION` is the
number this code brings an index to. `migrate_structure` runs before the tables are created
(`CREATE ... IF NOT EXISTS` of `schema.SCHEMA` and of each part: jobs, completions, retrievals,
devices, uploads), outside a transaction: rebuilds and `ALTER TABLE`s of tables an earlier
release made, each step skipped once done. `migrate_data` runs after, in the opening
transaction: row changes, then `user_version` moves to `SCHEMA_VERSION`. A new index runs the
same steps, finding nothing to change.

Each migration is tested from a database made by the release before it
(tests/store/test_upgrade.py). There are no downgrades: the way back is a backup taken before
the upgrade (docs/operations.md#upgrades).

1. One patients row per identity (PatientID, issuer, name, birth date, sex): `patients` is
   rebuilt without its UNIQUE (PatientID, issuer); studies that an earlier index merged under
   one row get the identity their files carry again.
2. Dispatch jobs carry a lease (`lease_owner`, `lease_until`). The columns added to jobs,
   devices and sequences by the builds before version numbers were kept (`study_uid`,
   `delivered`; `state`, `last_seen`; `file`) and the per-job delivery list of the first
   dispatch build (`job_deliveries`, turned into the `deliveries` ledger) are brought in here,
   so that no part changes tables on its own.
3. Retrieval requests carry a lease too (`retrievals.lease_owner`, `lease_until`): a request
   is claimed like a dispatch job (`gateway.work`) instead of being marked running in memory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Final

from gateway.store.schema import PatientReader, rebuild_patients, split_merged_patients

__all__ = ["SCHEMA_VERSION", "migrate_data", "migrate_structure", "version"]

SCHEMA_VERSION: Final = 3


def version(conn: sqlite3.Connection) -> int:
    """The index's `PRAGMA user_version`."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate_structure(conn: sqlite3.Connection) -> None:
    """The structural steps of every migration after the index's version (no transaction)."""
    current = version(conn)
    for number, step in _STRUCTURE:
        if current < number:
            step(conn)


def migrate_data(conn: sqlite3.Connection, read_patient: PatientReader) -> None:
    """The data steps after the index's version, then `user_version = SCHEMA_VERSION` (in the
    caller's transaction, after the tables exist)."""
    current = version(conn)
    if current < 1:
        split_merged_patients(conn, read_patient)
    if current < 2:
        _ledger_from_job_deliveries(conn)
    if current < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}


# (table, column, its definition): columns migration 2 adds where an earlier build lacks them.
_V2_COLUMNS: Final = (
    ("jobs", "study_uid", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "delivered", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "lease_owner", "TEXT"),
    ("jobs", "lease_until", "REAL"),
    ("devices", "state", "TEXT NOT NULL DEFAULT 'OFFLINE'"),
    ("devices", "last_seen", "REAL"),
    ("sequences", "file", "TEXT"),
)


# Columns migration 3 adds.
_V3_COLUMNS: Final = (
    ("retrievals", "lease_owner", "TEXT"),
    ("retrievals", "lease_until", "REAL"),
)


def _v2_columns(conn: sqlite3.Connection) -> None:
    _add_columns(conn, _V2_COLUMNS)


def _v3_columns(conn: sqlite3.Connection) -> None:
    _add_columns(conn, _V3_COLUMNS)


def _add_columns(conn: sqlite3.Connection, columns: tuple[tuple[str, str, str], ...]) -> None:
    """Add each missing (table, column, definition) of a table that exists, in one
    transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, definition in columns:
            if not _table_exists(conn, table) or column in _columns(conn, table):
                continue
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            if (table, column) == ("jobs", "study_uid"):  # the study of each series job
                conn.execute(
                    "UPDATE jobs SET study_uid = CASE scope WHEN 'study' THEN uid ELSE coalesce("
                    "(SELECT st.study_uid FROM series s JOIN studies st ON s.study_pk = st.pk"
                    " WHERE s.series_uid = jobs.uid), '') END"
                )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _ledger_from_job_deliveries(conn: sqlite3.Connection) -> None:
    """The first dispatch build's per-job list of delivered SOP Instance UIDs becomes the
    ledger of what each target holds (the `deliveries` table, as of version 2)."""
    if not _table_exists(conn, "job_deliveries"):
        return
    conn.execute(
        """CREATE TABLE IF NOT EXISTS deliveries (
            instance_pk  INTEGER NOT NULL REFERENCES instances (pk) ON DELETE CASCADE,
            target       TEXT NOT NULL,
            checksum     TEXT NOT NULL,
            job_id       INTEGER NOT NULL,
            delivered_at REAL NOT NULL,
            PRIMARY KEY (instance_pk, target)
        ) WITHOUT ROWID"""
    )
    conn.execute(
        "INSERT OR IGNORE INTO deliveries (instance_pk, target, checksum, job_id, delivered_at)"
        " SELECT i.pk, j.target, i.checksum, j.id, d.delivered_at"
        " FROM job_deliveries d JOIN jobs j ON d.job_id = j.id"
        " JOIN instances i ON i.sop_uid = d.sop_uid"
    )
    conn.execute("DROP TABLE job_deliveries")


_STRUCTURE: Final[tuple[tuple[int, Callable[[sqlite3.Connection], Any]], ...]] = (
    (1, rebuild_patients),
    (2, _v2_columns),
    (3, _v3_columns),
)
