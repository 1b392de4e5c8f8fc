"""The index's schema: its tables, indexes and the triggers that keep derived tables in step,
how every connection is opened, the steps of migration 1 (`gateway.store.migrations` numbers and
runs them) and the upkeep every open does (`upkeep`).

Derived tables, changed by triggers in the transaction that changes the rows they derive from:

- `patient_name_keys`: the PatientName match candidates of each patient (`names.pn_keys`),
  through the SQL function `gateway_pn_keys` that `connect` registers on every connection;
- `totals`: patients, studies, series, instances and bytes, for `status`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.store.names import pn_keys_json

__all__ = [
    "IDENTITY_CONFLICT",
    "SCHEMA",
    "PatientReader",
    "connect",
    "identity_pk",
    "patient_identity",
    "rebuild_patients",
    "split_merged_patients",
    "upkeep",
]

_PN_KEYS_FUNCTION = "gateway_pn_keys"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per patient identity: the patient attributes a study was received with. Two studies
-- share a row only when all of them agree; a Patient ID alone never merges two patients.
CREATE TABLE IF NOT EXISTS patients (
    pk                   INTEGER PRIMARY KEY,
    patient_id           TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    patient_name         TEXT,
    patient_birth_date   TEXT,
    patient_sex          TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS patients_identity ON patients (
    patient_id, issuer_of_patient_id, ifnull(patient_name, ''), ifnull(patient_birth_date, ''),
    ifnull(patient_sex, '')
);
CREATE TABLE IF NOT EXISTS studies (
    pk                       INTEGER PRIMARY KEY,
    study_uid                TEXT NOT NULL UNIQUE,
    patient_pk               INTEGER NOT NULL REFERENCES patients (pk),
    study_date               TEXT,
    study_time               TEXT,
    accession_number         TEXT,
    study_id                 TEXT,
    study_description        TEXT,
    referring_physician_name TEXT,
    created_at               REAL NOT NULL,
    updated_at               REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_pk);
CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession_number);
CREATE TABLE IF NOT EXISTS series (
    pk                 INTEGER PRIMARY KEY,
    series_uid         TEXT NOT NULL UNIQUE,
    study_pk           INTEGER NOT NULL REFERENCES studies (pk),
    modality           TEXT,
    series_number      INTEGER,
    series_description TEXT,
    body_part_examined TEXT,
    series_date        TEXT,
    series_time        TEXT,
    updated_at         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_pk);
CREATE TABLE IF NOT EXISTS instances (
    pk              INTEGER PRIMARY KEY,
    sop_uid         TEXT NOT NULL UNIQUE,
    series_pk       INTEGER NOT NULL REFERENCES series (pk),
    sop_class_uid   TEXT NOT NULL,
    instance_number INTEGER,
    transfer_syntax TEXT NOT NULL,
    path            TEXT NOT NULL UNIQUE,
    size            INTEGER NOT NULL,
    checksum        TEXT NOT NULL,
    calling_ae      TEXT,
    called_ae       TEXT,
    peer_address    TEXT,
    association_id  TEXT,
    received_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_pk);
CREATE INDEX IF NOT EXISTS instances_received ON instances (received_at);
-- PatientName matching reads patient_name_keys; this index of earlier versions served nothing.
DROP INDEX IF EXISTS patients_name;

-- PatientName match candidates per patient (gateway/store/names.py), kept by triggers on every
-- path that inserts, renames or deletes a patient.
CREATE TABLE IF NOT EXISTS patient_name_keys (
    key        TEXT NOT NULL,
    patient_pk INTEGER NOT NULL,
    PRIMARY KEY (key, patient_pk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS patient_name_keys_patient ON patient_name_keys (patient_pk);
CREATE TRIGGER IF NOT EXISTS patients_keys_insert AFTER INSERT ON patients BEGIN
    INSERT OR IGNORE INTO patient_name_keys (key, patient_pk)
        SELECT value, NEW.pk FROM json_each(gateway_pn_keys(NEW.patient_name));
END;
CREATE TRIGGER IF NOT EXISTS patients_keys_update AFTER UPDATE OF patient_name ON patients
    WHEN OLD.patient_name IS NOT NEW.patient_name BEGIN
    DELETE FROM patient_name_keys WHERE patient_pk = OLD.pk;
    INSERT OR IGNORE INTO patient_name_keys (key, patient_pk)
        SELECT value, NEW.pk FROM json_each(gateway_pn_keys(NEW.patient_name));
END;
CREATE TRIGGER IF NOT EXISTS patients_keys_delete AFTER DELETE ON patients BEGIN
    DELETE FROM patient_name_keys WHERE patient_pk = OLD.pk;
END;

-- Running totals for `status`, changed by triggers in the transaction that changes the rows.
CREATE TABLE IF NOT EXISTS totals (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    patients  INTEGER NOT NULL,
    studies   INTEGER NOT NULL,
    series    INTEGER NOT NULL,
    instances INTEGER NOT NULL,
    bytes     INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS totals_patient_in AFTER INSERT ON patients BEGIN
    UPDATE totals SET patients = patients + 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_patient_out AFTER DELETE ON patients BEGIN
    UPDATE totals SET patients = patients - 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_study_in AFTER INSERT ON studies BEGIN
    UPDATE totals SET studies = studies + 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_study_out AFTER DELETE ON studies BEGIN
    UPDATE totals SET studies = studies - 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_series_in AFTER INSERT ON series BEGIN
    UPDATE totals SET series = series + 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_series_out AFTER DELETE ON series BEGIN
    UPDATE totals SET series = series - 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_instance_in AFTER INSERT ON instances BEGIN
    UPDATE totals SET instances = instances + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS totals_instance_out AFTER DELETE ON instances BEGIN
    UPDATE totals SET instances = instances - 1, bytes = bytes - OLD.size;
END;
CREATE TRIGGER IF NOT EXISTS totals_instance_size AFTER UPDATE OF size ON instances BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
END;
"""
# The conflict target of an upsert into `patients`: the expressions of `patients_identity`.
IDENTITY_CONFLICT = (
    "(patient_id, issuer_of_patient_id, ifnull(patient_name, ''),"
    " ifnull(patient_birth_date, ''), ifnull(patient_sex, ''))"
)
_NAME_KEYS_VERSION = "1"  # bump when names.pn_keys changes: the keys are recomputed at open
_NAME_KEYS_VERSION_KEY = "name_keys_version"


def patient_identity(patient: dict[str, Any]) -> tuple[Any, ...]:
    """(PatientID, issuer, name, birth date, sex) of `IndexAttributes.patient`: the columns of
    the patients row the identity is, the issuer '' when absent."""
    return (
        patient["patient_id"],
        patient["issuer_of_patient_id"] or "",
        patient["patient_name"],
        patient["patient_birth_date"],
        patient["patient_sex"],
    )


def identity_pk(conn: sqlite3.Connection, identity: tuple[Any, ...]) -> int:
    """The key of the patients row of *identity* (`patient_identity`), inserted if new."""
    (pk,) = conn.execute(
        "INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name,"
        " patient_birth_date, patient_sex) VALUES (?,?,?,?,?)"
        f" ON CONFLICT {IDENTITY_CONFLICT} DO UPDATE SET patient_id=excluded.patient_id"
        " RETURNING pk",
        identity,
    ).fetchone()
    return int(pk)


PatientReader = Callable[[str], dict[str, Any]]
"""The patient attributes (`IndexAttributes.patient`) of the stored file at a relative path."""


def rebuild_patients(conn: sqlite3.Connection) -> None:
    """Migration 1, before `SCHEMA` runs (outside a transaction; skipped once done): `patients`
    loses its UNIQUE (patient_id, issuer_of_patient_id) constraint,
    which SQLite only drops by rebuilding the table (sqlite.org/lang_altertable.html, section 7);
    the rows keep their keys, so studies and name keys still point at them.
    """
    table = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'patients'"
    ).fetchone()
    if table is None or "UNIQUE (patient_id, issuer_of_patient_id)" not in table[0]:
        return
    conn.execute("PRAGMA foreign_keys=OFF")  # studies reference patients while it is rebuilt
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "CREATE TABLE patients_v1 (pk INTEGER PRIMARY KEY, patient_id TEXT NOT NULL,"
            " issuer_of_patient_id TEXT NOT NULL DEFAULT '', patient_name TEXT,"
            " patient_birth_date TEXT, patient_sex TEXT)"
        )
        conn.execute(
            "INSERT INTO patients_v1 SELECT pk, patient_id, issuer_of_patient_id,"
            " patient_name, patient_birth_date, patient_sex FROM patients"
        )
        conn.execute("DROP TABLE patients")  # its triggers go too; SCHEMA makes them again
        conn.execute("ALTER TABLE patients_v1 RENAME TO patients")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute("PRAGMA foreign_keys=ON")


def upkeep(conn: sqlite3.Connection) -> None:
    """What every open brings up to date (after `SCHEMA`, in the caller's transaction): the
    totals are counted once when their row is absent (a new index, or one from before they
    existed); the name keys are recomputed from the patients when they were made by another
    definition of `pn_keys`, or never.
    """
    if conn.execute("SELECT 1 FROM totals").fetchone() is None:
        conn.execute(
            "INSERT INTO totals (id, patients, studies, series, instances, bytes)"
            " SELECT 1, (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
            " (SELECT count(*) FROM series), count(*), coalesce(sum(size), 0) FROM instances"
        )
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_NAME_KEYS_VERSION_KEY,)).fetchone()
    if row is None or row[0] != _NAME_KEYS_VERSION:
        conn.execute("DELETE FROM patient_name_keys")
        conn.execute(
            "INSERT OR IGNORE INTO patient_name_keys (key, patient_pk)"
            " SELECT k.value, p.pk FROM patients p, json_each(gateway_pn_keys(p.patient_name)) k"
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (_NAME_KEYS_VERSION_KEY, _NAME_KEYS_VERSION),
        )


def split_merged_patients(conn: sqlite3.Connection, read_patient: PatientReader) -> None:
    """Migration 1, after `SCHEMA`: an earlier index merged every study under one Patient ID
    into one patients row; each study of a row shared by several studies gets the identity its
    files carry again (one file read per study, through *read_patient*)."""
    rows = conn.execute(
        "SELECT st.pk, (SELECT i.path FROM series s JOIN instances i ON i.series_pk = s.pk"
        " WHERE s.study_pk = st.pk ORDER BY i.pk LIMIT 1)"
        " FROM studies st WHERE st.patient_pk IN"
        " (SELECT patient_pk FROM studies GROUP BY patient_pk HAVING count(*) > 1)"
    ).fetchall()
    for study_pk, path in rows:
        if path is None:
            continue
        try:
            p = read_patient(path)
        except Exception:  # a missing or unreadable file keeps the study where it was
            continue
        patient_pk = identity_pk(conn, patient_identity(p))
        conn.execute("UPDATE studies SET patient_pk = ? WHERE pk = ?", (patient_pk, study_pk))
    if rows:
        conn.execute(
            "DELETE FROM patients WHERE NOT EXISTS"
            " (SELECT 1 FROM studies WHERE patient_pk = patients.pk)"
        )


# Page cache per connection, in KiB (SQLite reads a negative cache_size as KiB). The writer's
# keeps the hot index pages of every insert; a reader's is dropped whenever another connection
# commits, so a small one costs queries nothing during ingest and bounds the process's memory
# however large the index grows: 2 MiB + 4 x 512 KiB.
_WRITER_CACHE_KIB = 2048
_READER_CACHE_KIB = 512


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the index with the pragmas every connection needs.

    *readonly* connections (the read pool) get ``query_only`` and a smaller page cache.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    # The name-key triggers call it: every connection that may write patients needs it.
    conn.create_function(_PN_KEYS_FUNCTION, 1, pn_keys_json, deterministic=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    cache_kib = _READER_CACHE_KIB if readonly else _WRITER_CACHE_KIB
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    return conn
