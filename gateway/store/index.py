"""The SQLite index's one writer thread, and the durable mark it keeps (schema: `schema.py`).

Every write goes through `IndexWriter`: a thread that owns the only write connection, drains its
queue into one transaction per batch (group commit) and resolves a future per request. Concurrent
associations therefore share commits. Reads use separate connections (WAL lets them run beside
the writer).

Received instances are placed here too (`IndexWriter.place`): the placements queued together are
checked and written into their buckets, each file fsynced, each directory once, then indexed in
one transaction, and their futures resolved in one call into the event loop. One thread for the
whole placement, rather than a placing thread per instance handing its row to this one, measured
on 10 KB instances over four associations: gateway CPU per instance 1.85 -> 1.27 ms (the GIL
and futex traffic of two hand-offs per instance), throughput +12 % (docs/performance.md).

Durability (docs/storage.md): an instance file is the durable record. It is in its bucket,
fsynced, with its directory fsynced, before its row is written; the batch that indexes it commits
with `synchronous=NORMAL` (visible at once to every reader, made durable by the next checkpoint
or FULL commit). Other writes (job and retrieval state, deletions, metadata) commit with
`synchronous=FULL`, those queued together in one transaction, each inside a savepoint of its
own (one that raises is rolled back alone): while a cohort is retrieved and forwarded, a FULL
commit per write was the writer's largest cost (profile in docs/performance.md). A write whose
loss in a power failure only repeats work (the delivery ledger, a retrieval's progress) is
submitted with durable=False; a transaction of only such writes commits with `NORMAL`.

About once a second after ingest batches, the writer commits the durable mark (`meta`
`durable_mark`) with `synchronous=FULL`: the oldest move-in time of the ingests still in flight,
or now. In WAL mode a FULL commit syncs the log up to and including itself, so it makes every
earlier NORMAL batch durable too: after it, every file moved in before the mark has its row on
disk, or was removed durably. After a crash, start-up reconciliation therefore checks only the
files and rows from the mark on (`store.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from gateway.errors import DuplicateInstance, GatewayError, SopInstanceConflict, StoreError
from gateway.store.files import FileStore, fsync_dir, start_writeback
from gateway.store.instance import CheckedInstance, read_received_file
from gateway.store.migrations import migrate_data, migrate_structure
from gateway.store.schema import SCHEMA, connect, identity_pk, patient_identity, upkeep

__all__ = [
    "MARK_KEY",
    "UID_CONFLICTS_KEY",
    "DuplicatePolicy",
    "InFlight",
    "IndexWriter",
    "IngestOutcome",
    "IngestResult",
    "Placed",
    "Provenance",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")
DuplicatePolicy = Literal["keep_first", "overwrite", "reject"]
IngestOutcome = Literal["stored", "replaced", "unchanged", "ignored"]


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where an instance came from."""

    calling_ae: str | None = None
    called_ae: str | None = None
    peer_address: str | None = None
    association_id: str | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What the index did with one received instance."""

    outcome: IngestOutcome
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str


@dataclass(slots=True)
class _Ingest:
    received: CheckedInstance
    provenance: Provenance
    future: Future[IngestResult]


@dataclass(frozen=True, slots=True)
class Placed:
    """A checked received file in its bucket, not yet flushed: open as `fd` (closed by the
    writer), its move-in registered with `InFlight` as `token`."""

    received: CheckedInstance
    fd: int
    token: int


@dataclass(slots=True)
class _Placement:
    """A received file for the writer to place, flush and index (`IndexWriter.place`)."""

    prepare: Callable[[], Placed]
    provenance: Provenance
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[IngestResult]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]
    durable: bool


_STOP = object()
_MAX_BATCH = 256
MARK_KEY = "durable_mark"
UID_CONFLICTS_KEY = "sop_instance_uid_conflicts"  # meta: instances refused as SopInstanceConflict
_MARK_EVERY = 1.0  # seconds between durable marks while batches commit (one FULL commit each)


class InFlight:
    """The wall-clock times at which ingests still in flight moved their files into buckets.

    An ingest registers (`begin`) before its move and leaves (`end`) when it returns or fails;
    `mark()` is then a time before which every moved-in file's ingest has finished.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._wall = clock  # wall-clock seconds since the epoch
        self._last = 0.0
        self._lock = threading.Lock()
        self._times: dict[int, float] = {}
        self._next = 0

    def clock(self) -> float:
        """The store's time, s since the epoch: the wall clock, never earlier than a time this
        store gave before (a clock stepped back would otherwise put later files before the
        mark). Every time the store keeps (move-in, received_at, the mark) is taken here."""
        with self._lock:
            return self._now()

    def _now(self) -> float:
        self._last = max(self._last, self._wall())
        return self._last

    def begin(self) -> tuple[int, float]:
        """Register an ingest; return its token and the time (s since the epoch) to move in at.

        The time is taken under the lock that `mark` takes, so no mark can pass it unseen.
        """
        with self._lock:
            self._next += 1
            now = self._now()
            self._times[self._next] = now
            return self._next, now

    def end(self, token: int) -> None:
        """The ingest of *token* returned or failed."""
        with self._lock:
            self._times.pop(token, None)

    def mark(self) -> float:
        """min(move-in times of the ingests in flight, now), in seconds since the epoch."""
        with self._lock:
            now = self._now()
            return min(min(self._times.values(), default=now), now)


class IndexWriter:
    """The writer thread: one connection, one transaction per batch of queued requests."""

    def __init__(
        self,
        db_path: Path,
        files: FileStore,
        policy: DuplicatePolicy,
        inflight: InFlight | None = None,
    ) -> None:
        self._db_path = db_path
        self._files = files
        self._policy = policy
        self._inflight = inflight or InFlight()
        self._marked_at = time.monotonic()
        self.mark_every = _MARK_EVERY  # seconds (monotonic) between durable marks
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        self._series_cache: dict[str, int] = {}
        # Patient identity conflicts of the batch in progress: (study UID, other study's UID).
        self._conflicts: list[tuple[str, str]] = []
        self._sync_mode = "FULL"
        self._lock = threading.Lock()
        self._stopped = False
        self._ready: Future[None] = Future()
        self.on_ingested: Callable[[list[IngestResult]], None] | None = None

    def start(self) -> None:
        """Open the connection, create the schema, and start the thread."""
        self._thread.start()
        self._ready.result()

    def stop(self) -> None:
        """Finish what is queued, then close the connection; later requests fail at once."""
        with self._lock:
            self._stopped = True
            if self._thread.is_alive():
                self._queue.put(_STOP)
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _put(self, item: _Ingest | _Call | _Placement) -> None:
        with self._lock:
            if self._stopped:
                error = StoreError("the store is closed")
                if isinstance(item, _Placement):
                    _settle(item.loop, [(item.future, error)])
                else:
                    item.future.set_exception(error)
                return
            self._queue.put(item)

    def place(
        self,
        prepare: Callable[[], Placed],
        provenance: Provenance,
        loop: asyncio.AbstractEventLoop,
    ) -> asyncio.Future[IngestResult]:
        """Queue a received file. On the writer thread, *prepare()* checks it and puts it in
        its bucket (or raises); then, with the placements queued meanwhile, each file is
        fsynced, each directory once, and their rows are committed in one transaction. The
        future (of *loop*) resolves once both are done, or with the refusal or failure; a file
        not indexed is removed. The futures of one batch are resolved in one call into *loop*.
        """
        future: asyncio.Future[IngestResult] = loop.create_future()
        self._put(_Placement(prepare, provenance, loop, future))
        return future

    def submit_ingest(
        self, received: CheckedInstance, provenance: Provenance
    ) -> Future[IngestResult]:
        """Queue an instance whose file is durably in its bucket.

        The future resolves once its row is committed, or with the refusal. A file that does not
        end up indexed (a duplicate, a refusal, a failed batch) is removed.
        """
        future: Future[IngestResult] = Future()
        self._put(_Ingest(received, provenance, future))
        return future

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> Future[T]:
        """Run *fn* on the write connection, in a savepoint of the next calls' transaction.

        The future resolves once that transaction is committed: with `synchronous=FULL` when
        *durable* (on disk when it resolves) or when another call of the transaction is;
        otherwise with `synchronous=NORMAL` (visible at once and kept through a process kill,
        made durable by the next FULL commit or checkpoint): for records whose loss in a power
        failure only repeats work, such as the delivery ledger.
        """
        future: Future[T] = Future()
        self._put(_Call(fn, future, durable))
        return future

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._conn = connect(self._db_path)
            migrate_structure(self._conn)
            self._conn.executescript(SCHEMA)
            self._conn.execute("BEGIN IMMEDIATE")
            migrate_data(self._conn, self._stored_patient)
            upkeep(self._conn)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn is not None:
                self._conn.close()
            self._ready.set_exception(StoreError(f"cannot open the index: {exc}"))
            return
        self._ready.set_result(None)
        try:
            pending: Any = None  # taken from the queue, not yet run (order kept)
            while True:
                item = pending if pending is not None else self._queue.get()
                pending = None
                if item is _STOP:
                    return
                if isinstance(item, _Call):
                    calls, pending = self._queued_alike(item)
                    self._run_calls(calls)
                    continue
                batch, pending = self._queued_alike(item)
                if isinstance(item, _Placement):
                    self._run_placements(batch)
                else:
                    self._run_ingest_batch(batch)
                if time.monotonic() - self._marked_at >= self.mark_every:
                    self._advance_mark()
        finally:
            self._conn.close()

    def _queued_alike(self, first: Any) -> tuple[list[Any], Any]:
        """*first* and the items queued behind it of its kind (calls, or ingests), at most
        `_MAX_BATCH`; and the next item of another kind taken meanwhile (None if none), to
        run after them in order."""
        items = [first]
        while len(items) < _MAX_BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return items, None
            if nxt is _STOP or type(nxt) is not type(first):
                return items, nxt
            items.append(nxt)
        return items, None

    def _stored_patient(self, relpath: str) -> dict[str, Any]:
        """The patient attributes of a stored file (its checksum is not recomputed)."""
        return read_received_file(self._files.absolute(relpath), checksum="").attributes.patient

    def _synchronous(self, conn: sqlite3.Connection, mode: str) -> None:
        if self._sync_mode != mode:
            conn.execute(f"PRAGMA synchronous={mode}")
            self._sync_mode = mode

    def _run_calls(self, calls: list[_Call]) -> None:
        """Run *calls* in one transaction, each in a savepoint of its own, and commit them with
        `synchronous=FULL` (`NORMAL` when none of them is durable); resolve each one's future
        once the commit is done (or failed)."""
        conn = self._conn
        assert conn is not None
        live = [call for call in calls if call.future.set_running_or_notify_cancel()]
        if not live:
            return  # their awaiting tasks were cancelled before the calls ran
        outcomes: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            self._synchronous(conn, "FULL" if any(call.durable for call in live) else "NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for call in live:
                conn.execute("SAVEPOINT call")
                try:
                    result = call.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                    outcomes.append((call, None, exc))
                else:
                    conn.execute("RELEASE call")
                    outcomes.append((call, result, None))
            conn.execute("COMMIT")
        except BaseException as exc:  # the transaction itself failed: none of it is kept
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for call in live:
                call.future.set_exception(exc)
            return
        finally:
            self._series_cache.clear()  # calls may delete series
        for call, result, error in outcomes:
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(result)

    def _advance_mark(self) -> None:
        """Commit the durable mark with synchronous=FULL (see the module docstring)."""
        conn = self._conn
        assert conn is not None
        self._marked_at = time.monotonic()
        mark = self._inflight.mark()
        try:
            self._synchronous(conn, "FULL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (MARK_KEY, repr(mark))
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # the next batch tries again; the old mark stays valid
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("durable_mark_failed", error=str(exc))

    def _discard(self, paths: list[Path]) -> None:
        """Remove files that will not be indexed, durably: a crash must not bring back a file
        older than the next mark without a row, where reconciliation would not look."""
        if not paths:
            return
        try:
            self._files.discard(paths)
        except OSError as exc:
            log.error("unindexed_files_not_removed", error=str(exc), files=len(paths))

    def _run_placements(self, batch: list[_Placement]) -> None:
        """Place, flush and index *batch*; settle each placement's future on its loop."""
        settled: list[tuple[_Placement, IngestResult | BaseException]] = []
        prepared: list[tuple[_Placement, Placed]] = []
        for item in batch:
            try:
                placed = item.prepare()
            except Exception as exc:
                settled.append((item, exc))
            else:
                start_writeback(placed.fd)  # the batch's writes go to the disk together
                prepared.append((item, placed))
        by_dir: dict[Path, list[tuple[_Placement, Placed]]] = {}
        for item, placed in prepared:
            try:
                os.fsync(placed.fd)
            except OSError as exc:
                self._not_flushed(item, placed, exc, settled)
            else:
                by_dir.setdefault(placed.received.path.parent, []).append((item, placed))
            finally:
                os.close(placed.fd)
        flushed: list[tuple[_Placement, Placed, _Ingest]] = []
        for directory, entries in by_dir.items():
            try:
                fsync_dir(directory)
            except OSError as exc:
                for item, placed in entries:
                    self._not_flushed(item, placed, exc, settled)
                continue
            for item, placed in entries:
                flushed.append((item, placed, _Ingest(placed.received, item.provenance, Future())))
        try:
            if flushed:
                self._run_ingest_batch([ingest for _, _, ingest in flushed])
        finally:
            for _, placed, _ in flushed:
                self._inflight.end(placed.token)
        for item, _, ingest in flushed:
            error = ingest.future.exception()
            settled.append((item, error if error is not None else ingest.future.result()))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for item, outcome in settled:
            by_loop.setdefault(item.loop, []).append((item.future, outcome))
        for loop, outcomes in by_loop.items():
            _settle(loop, outcomes)

    def _not_flushed(
        self,
        item: _Placement,
        placed: Placed,
        exc: OSError,
        settled: list[tuple[_Placement, IngestResult | BaseException]],
    ) -> None:
        """A placed file that could not be flushed: removed, and its placement failed."""
        self._discard([placed.received.path])
        self._inflight.end(placed.token)
        settled.append((item, StoreError(f"cannot flush the received file to disk: {exc}")))

    def _run_ingest_batch(self, batch: list[_Ingest]) -> None:
        discarded: list[Path] = []
        try:
            replies = self._ingest_batch(batch, discarded)
        finally:
            self._discard(discarded)  # before the replies: a refused file is gone when they go
        stored = []
        for item, outcome in replies:
            if isinstance(outcome, IngestResult):
                if _kept(outcome):
                    stored.append(outcome)
                item.future.set_result(outcome)
            else:
                item.future.set_exception(outcome)
        if stored and self.on_ingested is not None:
            self.on_ingested(stored)

    def _ingest_batch(
        self, batch: list[_Ingest], discarded: list[Path]
    ) -> list[tuple[_Ingest, IngestResult | GatewayError]]:
        """Index *batch* in one transaction; return each item's reply, and add to *discarded*
        the files that will not be indexed (a refusal, a duplicate, a failed batch)."""
        conn = self._conn
        assert conn is not None
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                discarded.append(item.received.path)  # nobody waits: leave nothing
        batch = [item for item in batch if item.future.running()]
        if not batch:
            return []
        now = self._inflight.clock()
        superseded: list[str] = []
        results: list[tuple[_Ingest, IngestResult | GatewayError]] = []
        try:
            self._synchronous(conn, "NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                results.append((item, self._ingest_one(conn, item, now, superseded)))
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._series_cache.clear()
            self._conflicts.clear()
            log.error("index_batch_failed", error=str(exc), instances=len(batch))
            error = StoreError(f"the index could not be updated: {exc}")
            discarded.extend(item.received.path for item in batch)
            return [(item, error) for item in batch]
        if superseded:
            self._files.remove(superseded)
        for study_uid, other_uid in self._conflicts:
            log.warning(
                "patient_identity_conflict",
                study_instance_uid=study_uid,
                other_study_instance_uid=other_uid,
                reason="same Patient ID and issuer, other patient attributes: kept apart",
            )
        self._conflicts.clear()
        discarded.extend(
            item.received.path
            for item, outcome in results
            if not (isinstance(outcome, IngestResult) and _kept(outcome))
        )
        return results

    def _ingest_one(
        self,
        conn: sqlite3.Connection,
        item: _Ingest,
        now: float,
        superseded: list[str],
    ) -> IngestResult | GatewayError:
        received = item.received
        attrs = received.attributes
        existing = conn.execute(
            "SELECT i.pk, i.checksum, i.path, s.series_uid, st.study_uid FROM instances i"
            " JOIN series s ON i.series_pk = s.pk JOIN studies st ON s.study_pk = st.pk"
            " WHERE i.sop_uid = ?",
            (attrs.sop_instance_uid,),
        ).fetchone()

        def result(outcome: IngestOutcome, path: str = "") -> IngestResult:
            return IngestResult(
                outcome,
                attrs.sop_instance_uid,
                attrs.series_instance_uid,
                attrs.study_instance_uid,
                path,
            )

        if existing is not None:
            if existing[1] == received.checksum:
                return result("unchanged")
            if (existing[3], existing[4]) != (
                attrs.series_instance_uid,
                attrs.study_instance_uid,
            ):
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, 1)"
                    " ON CONFLICT (key) DO UPDATE SET value = value + 1",
                    (UID_CONFLICTS_KEY,),
                )
                return SopInstanceConflict(
                    f"SOP Instance UID {attrs.sop_instance_uid} is held in series {existing[3]}"
                    f" of study {existing[4]}; this instance, of series"
                    f" {attrs.series_instance_uid} of study {attrs.study_instance_uid}, has other"
                    " content: two objects under one UID, not a re-send"
                )
            if self._policy == "keep_first":
                return result("ignored")
            if self._policy == "reject":
                return DuplicateInstance(
                    f"SOP Instance UID {attrs.sop_instance_uid} is held with other content"
                )
        relpath = self._files.relative(received.path)
        series_pk = self._series_pk(conn, item, now, refresh=existing is not None)
        prov = item.provenance
        row = (
            series_pk,
            attrs.sop_class_uid,
            attrs.instance.get("instance_number"),
            received.transfer_syntax,
            relpath,
            received.size,
            received.checksum,
            prov.calling_ae,
            prov.called_ae,
            prov.peer_address,
            prov.association_id,
            now,
        )
        if existing is None:
            conn.execute(
                "INSERT INTO instances (series_pk, sop_class_uid, instance_number,"
                " transfer_syntax, path, size, checksum, calling_ae, called_ae, peer_address,"
                " association_id, received_at, sop_uid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*row, attrs.sop_instance_uid),
            )
            return result("stored", relpath)
        conn.execute(
            "UPDATE instances SET series_pk=?, sop_class_uid=?, instance_number=?,"
            " transfer_syntax=?, path=?, size=?, checksum=?, calling_ae=?, called_ae=?,"
            " peer_address=?, association_id=?, received_at=? WHERE pk=?",
            (*row, existing[0]),
        )
        superseded.append(existing[2])
        return result("replaced", relpath)

    def _series_pk(
        self, conn: sqlite3.Connection, item: _Ingest, now: float, *, refresh: bool
    ) -> int:
        """Upsert the patient, study and series rows; cached per series UID.

        Instances of one series carry the same patient, study and series attributes, so only
        the first of a series (or a replacement, *refresh*) pays for the three upserts.
        """
        attrs = item.received.attributes
        cached = self._series_cache.get(attrs.series_instance_uid)
        if cached is not None and not refresh:
            return cached
        identity = patient_identity(attrs.patient)
        patient_pk = identity_pk(conn, identity)
        before = conn.execute(
            "SELECT patient_pk FROM studies WHERE study_uid = ?", (attrs.study_instance_uid,)
        ).fetchone()
        s = attrs.study
        (study_pk,) = conn.execute(
            "INSERT INTO studies (study_uid, patient_pk, study_date, study_time,"
            " accession_number, study_id, study_description, referring_physician_name,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (study_uid) DO UPDATE SET patient_pk=excluded.patient_pk,"
            " study_date=coalesce(excluded.study_date, study_date),"
            " study_time=coalesce(excluded.study_time, study_time),"
            " accession_number=coalesce(excluded.accession_number, accession_number),"
            " study_id=coalesce(excluded.study_id, study_id),"
            " study_description=coalesce(excluded.study_description, study_description),"
            " referring_physician_name="
            "coalesce(excluded.referring_physician_name, referring_physician_name),"
            " updated_at=excluded.updated_at RETURNING pk",
            (
                attrs.study_instance_uid,
                patient_pk,
                s["study_date"],
                s["study_time"],
                s["accession_number"],
                s["study_id"],
                s["study_description"],
                s["referring_physician_name"],
                now,
                now,
            ),
        ).fetchone()
        if before is None or before[0] != patient_pk:
            self._linked(conn, attrs.study_instance_uid, patient_pk, identity, before)
        r = attrs.series
        (series_pk,) = conn.execute(
            "INSERT INTO series (series_uid, study_pk, modality, series_number,"
            " series_description, body_part_examined, series_date, series_time, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (series_uid) DO UPDATE SET study_pk=excluded.study_pk,"
            " modality=coalesce(excluded.modality, modality),"
            " series_number=coalesce(excluded.series_number, series_number),"
            " series_description=coalesce(excluded.series_description, series_description),"
            " body_part_examined=coalesce(excluded.body_part_examined, body_part_examined),"
            " series_date=coalesce(excluded.series_date, series_date),"
            " series_time=coalesce(excluded.series_time, series_time),"
            " updated_at=excluded.updated_at RETURNING pk",
            (
                attrs.series_instance_uid,
                study_pk,
                r["modality"],
                r["series_number"],
                r["series_description"],
                r["body_part_examined"],
                r["series_date"],
                r["series_time"],
                now,
            ),
        ).fetchone()
        if len(self._series_cache) > 1024:
            self._series_cache.clear()
        self._series_cache[attrs.series_instance_uid] = series_pk
        return int(series_pk)

    def _linked(
        self,
        conn: sqlite3.Connection,
        study_uid: str,
        patient_pk: int,
        identity: tuple[Any, ...],
        before: tuple[int] | None,
    ) -> None:
        """A study now carries the patient identity *patient_pk*: drop the identity it had if no
        study keeps it, and note a conflict when another identity has its Patient ID and
        issuer (logged once the batch commits). An empty Patient ID identifies nobody."""
        if before is not None:
            conn.execute(
                "DELETE FROM patients WHERE pk = ? AND NOT EXISTS"
                " (SELECT 1 FROM studies WHERE patient_pk = ?)",
                (before[0], before[0]),
            )
        if not identity[0]:
            return
        other = conn.execute(
            "SELECT st.study_uid FROM patients p JOIN studies st ON st.patient_pk = p.pk"
            " WHERE p.patient_id = ? AND p.issuer_of_patient_id = ? AND p.pk != ? LIMIT 1",
            (identity[0], identity[1], patient_pk),
        ).fetchone()
        if other is not None:
            self._conflicts.append((study_uid, other[0]))


def _settle(
    loop: asyncio.AbstractEventLoop, outcomes: list[tuple[asyncio.Future[Any], Any]]
) -> None:
    """Resolve futures of *loop* from another thread, all in one call."""

    def settle() -> None:
        for future, outcome in outcomes:
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)


def _kept(result: IngestResult) -> bool:
    """Whether the index now points at the file of *result* (stored, or replacing another)."""
    return result.outcome in ("stored", "replaced")
