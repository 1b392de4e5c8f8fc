"""The store: files plus index behind one async API, and start-up reconciliation.

A received instance is placed by `place` (check, put in its bucket, fsync, index) on the index
writer's thread, with the others queued meanwhile: the acceptor's C-STOREs, a C-GET's
sub-operations, device uploads. Reads run on a small pool of
read-only connections in worker threads, so the event loop never blocks on SQLite and one slow
query (a PatientName pattern that scans) does not hold the others up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog

from gateway.audit import AuditLog
from gateway.errors import GatewayError, InstanceMismatch, InvalidInstance, StoreError
from gateway.store.files import DataDirInUse, FileStore
from gateway.store.index import (
    MARK_KEY,
    UID_CONFLICTS_KEY,
    DuplicatePolicy,
    IndexWriter,
    InFlight,
    IngestResult,
    Placed,
    Provenance,
)
from gateway.store.instance import CheckedInstance, read_received_file
from gateway.store.schema import connect

__all__ = [
    "RUNNING_KEY",
    "ReconcileReport",
    "Store",
    "StoredInstance",
    "finish_then_cancel",
    "prune_empty",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

RUNNING_KEY = "running_since"  # meta: set while a gateway has the store open (unclean if left)
_READERS = 4  # read connections for the control plane, dispatch, retrieval, C-MOVE / C-GET
_QUERY_STREAMS = 3  # read connections C-FIND answers stream from (`Store.stream`)
_PROGRESS_STEPS = 1000  # SQLite VM steps between checks for a cancelled stream
_READ_WAIT = 30.0  # seconds a read waits for a free connection before it fails
_RECONCILE_MARGIN = 3600.0  # seconds before an unmarked unclean run's start scanned too
# Seconds before the durable mark that are scanned too. Within a run the store's clock never goes
# back (`InFlight.clock`), so every file moved in after the mark is timed at or after it; the
# margin covers only the rounding of times to milliseconds in file names.
_CLOCK_MARGIN = 1.0


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One stored instance as a sender needs it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    checksum: str = ""
    pk: int = 0


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What start-up found of an earlier crash."""

    temp_files_removed: int = 0
    orphans_indexed: int = 0
    orphans_removed: int = 0
    scanned: int = 0


class Store:
    """Instance files under `data_dir` and their SQLite index."""

    def __init__(
        self,
        data_dir: Path,
        duplicate_policy: DuplicatePolicy = "keep_first",
        *,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """*clock* gives the wall-clock time (s since the epoch) of buckets, rows and marks."""
        self.files = FileStore(data_dir)
        self._lock: int | None = None  # the data_dir lock's descriptor while open
        self.min_free_bytes = min_free_bytes
        self._free_checked_at = -1.0
        self._free_bytes = 0
        self.db_path = data_dir / "index.sqlite"
        self._inflight = InFlight(clock)
        self._writer = IndexWriter(self.db_path, self.files, duplicate_policy, self._inflight)
        self._readers = _ReadPool(self.db_path, _READERS, "read")
        self._streams = _ReadPool(self.db_path, _QUERY_STREAMS, "query")
        self.reconcile_report = ReconcileReport()
        self.audit: AuditLog | None = None  # set by the application

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> ReconcileReport:
        """Create the layout, start the writer, reconcile what a crash left; return the counts."""
        new_index = not self.db_path.exists()
        try:
            await anyio.to_thread.run_sync(self.files.create_dirs)
            self._lock = await anyio.to_thread.run_sync(self.files.lock)
        except DataDirInUse as exc:
            raise StoreError(str(exc)) from None
        except OSError as exc:
            raise StoreError(f"cannot open the store in {self.files.root}: {exc}") from exc
        try:
            await anyio.to_thread.run_sync(self._writer.start)
            await anyio.to_thread.run_sync(self._readers.open)
            await anyio.to_thread.run_sync(self._streams.open)
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise StoreError(f"cannot open the store in {self.files.root}: {exc}") from exc
        self.reconcile_report = await anyio.to_thread.run_sync(self._reconcile, new_index)
        log.info(
            "store_opened",
            data_dir=str(self.files.root),
            temp_files_removed=self.reconcile_report.temp_files_removed,
            orphans_indexed=self.reconcile_report.orphans_indexed,
            orphans_removed=self.reconcile_report.orphans_removed,
            scanned=self.reconcile_report.scanned,
        )
        return self.reconcile_report

    async def close(self) -> None:
        """Mark the run as cleanly stopped and close everything (again: nothing happens)."""
        if not self._readers.is_open:
            return
        try:
            await self.write(lambda c: c.execute("DELETE FROM meta WHERE key=?", (RUNNING_KEY,)))
        except GatewayError as exc:
            log.warning("store_close_mark_failed", error=str(exc))
        await anyio.to_thread.run_sync(self._writer.stop)
        self._readers.close()
        self._streams.close()
        self._unlock()
        log.info("store_closed")

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def set_ingest_listener(self, listener: Callable[[list[IngestResult]], None]) -> None:
        """Called on the writer thread with each committed batch of stored instances."""
        self._writer.on_ingested = listener

    # -- writes -------------------------------------------------------------------------------

    def free_bytes(self, max_age: float = 1.0) -> int:
        """Bytes free for the store on its file system, measured at most *max_age* s ago."""
        now = time.monotonic()
        if now - self._free_checked_at > max_age:
            stat = os.statvfs(self.files.root)
            self._free_bytes = stat.f_bavail * stat.f_frsize
            self._free_checked_at = now
        return self._free_bytes

    def below_floor(self, free: int) -> bool:
        """Whether *free* bytes are less than the store keeps (`node.min_free_mb`; 0: no
        floor): instances are refused then, and the node is not healthy."""
        return bool(self.min_free_bytes) and free < self.min_free_bytes

    def check_free(self, adding: int = 0) -> None:
        """Raise `StoreError` when, with *adding* more bytes written, the store's disk would have
        less free than `node.min_free_mb` (the guard received instances and device uploads pass).
        """
        free = self.free_bytes()
        if self.below_floor(free - adding):
            raise StoreError(
                f"low disk: {free // 2**20} MB free in {self.files.root}"
                + (f", {adding // 2**20} MB more asked" if adding >= 2**20 else "")
                + f", below the {self.min_free_bytes // 2**20} MB the store keeps free"
                " (node.min_free_mb)"
            )

    async def ingest(
        self, temp_path: Path, provenance: Provenance, *, expect: tuple[str, str] | None = None
    ) -> IngestResult:
        """`place` a complete file written into `tmp/` (moved into its bucket from there)."""
        return await self.place(provenance, path=temp_path, expect=expect)

    async def place(
        self,
        provenance: Provenance,
        *,
        content: bytes | None = None,
        path: Path | None = None,
        expect: tuple[str, str] | None = None,
        checksum: str | None = None,
    ) -> IngestResult:
        """Check, place durably and index one received Part 10 file: either *content* (the
        file's bytes, written to `tmp/` and renamed into its bucket) or *path* (a complete
        file in `tmp/`, renamed into its bucket). *expect* is the (SOP Class UID, SOP Instance
        UID) the C-STORE request announced; the dataset must carry the same. *checksum* is the
        dataset's SHA-256 when the receiver hashed it as it arrived (otherwise it is hashed
        here).

        The work runs on the index writer's thread with every placement queued meanwhile
        (`IndexWriter.place`): their files fsynced, each directory once, their rows committed
        in one transaction. Returns once the row is committed and the file is durably in
        place; a caller cancelled meanwhile waits for that, then sees the cancellation.
        Raises `RejectedInstance` for what the instance is and `StoreError` for what the store
        could not do; in both cases nothing of the file is left in the store.
        """
        if (content is None) == (path is None):
            raise TypeError("place() takes content or path")
        prepare = functools.partial(self._prepare, content, path, expect, checksum)
        future = self._writer.place(prepare, provenance, asyncio.get_running_loop())
        return await finish_then_cancel(future)

    def _prepare(
        self,
        content: bytes | None,
        path: Path | None,
        expect: tuple[str, str] | None,
        checksum: str | None,
    ) -> Placed:
        """On the writer thread: check the file and put it in its bucket, not yet flushed
        (`place`); the `InFlight` token is taken before it appears there."""
        source = path if path is not None else self.files.tmp_dir / "(received)"
        try:
            self.check_free()
            received = read_received_file(source, checksum=checksum, content=content)
            if expect is not None:
                _check_announced(received, expect)
        except BaseException:
            if path is not None:
                path.unlink(missing_ok=True)
            raise
        token, now = self._inflight.begin()
        try:
            if content is not None:
                final, fd = self.files.write_in(content, now)
            else:
                assert path is not None
                final = self.files.move_in(path, now)
                try:
                    fd = os.open(final, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    with contextlib.suppress(OSError):
                        self.files.discard([final])  # moved in, never to be indexed
                    raise
        except OSError as exc:
            self._inflight.end(token)
            if path is not None:
                path.unlink(missing_ok=True)
            raise StoreError(f"cannot write the received file into the store: {exc}") from exc
        return Placed(dataclasses.replace(received, path=final), fd, token)

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run *fn* on the write connection in a savepoint of its own (the writes queued
        together share one transaction and its commit; one that raises is rolled back alone).
        Not *durable*: committed without waiting for the disk (`IndexWriter.submit`), for a
        record whose loss in a power failure only repeats work.

        Once submitted, a write runs to its end and is awaited to its end: a caller cancelled
        meanwhile (an anyio cancel scope or a plain `Task.cancel()`) waits for the transaction
        to commit or fail, then sees the cancellation. Nothing is left half-known: the caller
        never goes on believing a write did not happen that the writer is about to commit.
        Raises StoreError when the transaction fails.
        """
        try:
            return await finish_then_cancel(self._writer.submit(fn, durable=durable))
        except sqlite3.Error as exc:
            raise StoreError(f"the index could not be updated: {exc}") from exc

    def write_nowait(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True
    ) -> Future[T]:
        """Queue *fn* like `write` and return its future at once (for worker threads)."""
        return self._writer.submit(fn, durable=durable)

    async def delete_study(self, study_uid: str, by: str = "operator") -> int:
        """Remove a study's rows and files; return how many instances it had. *by* (operator,
        retention) goes into the audit record."""

        def delete(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT i.path FROM instances i JOIN series s ON i.series_pk = s.pk"
                " JOIN studies st ON s.study_pk = st.pk WHERE st.study_uid = ?",
                (study_uid,),
            ).fetchall()
            study = conn.execute(
                "SELECT pk, patient_pk FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if study is None:
                return []
            conn.execute(
                "DELETE FROM instances WHERE series_pk IN"
                " (SELECT pk FROM series WHERE study_pk = ?)",
                (study[0],),
            )
            prune_empty(conn)
            return [row[0] for row in rows]

        paths = await self.write(delete)
        await anyio.to_thread.run_sync(self.files.remove, paths)
        log.info("study_deleted", instances=len(paths))
        if self.audit is not None and paths:
            self.audit.record("DICOM Study Deleted", studies=[study_uid], by=by,
                              instances=len(paths))  # fmt: skip
        return len(paths)

    # -- reads --------------------------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* on a read-only connection of the pool in a worker thread.

        At most `_READERS` reads run at once, each on a connection of its own; more wait for one.
        Raises `StoreError` when the store is not open or SQLite fails.
        """
        if not self._readers.is_open:
            raise StoreError("the store is not open")
        return await anyio.to_thread.run_sync(self._readers.run, fn, limiter=self._readers.limiter)

    def stream(
        self,
        fn: Callable[[sqlite3.Connection], Iterator[T]],
        *,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Generator[T, None, None]:
        """Iterate *fn*'s rows in the calling thread (an association's), on a connection of
        its own: a query connection, one of `_QUERY_STREAMS` kept apart from `read`'s, so long
        answers or slow requesters hold up no one else. Blocking; for threads, not the loop.

        The connection is held until the iteration ends or the generator is closed. When
        *cancelled()* turns true (a C-CANCEL), SQLite interrupts the statement running and the
        iteration ends. Raises `StoreError` when the store is not open, no query connection
        is free within `_READ_WAIT` s, or SQLite fails.
        """
        with self._streams.checkout() as conn:
            conn.set_progress_handler(lambda: 1 if cancelled() else 0, _PROGRESS_STEPS)
            try:
                yield from fn(conn)
            except sqlite3.OperationalError as exc:
                if not cancelled():
                    raise StoreError(f"the index could not be read: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"the index could not be read: {exc}") from exc
            finally:
                conn.set_progress_handler(None, 0)

    async def study_uids_of(self, instance_pks: Sequence[int]) -> list[str]:
        """The distinct Study Instance UIDs of the instances with these row ids."""

        def select(conn: sqlite3.Connection) -> list[str]:
            found: set[str] = set()
            for start in range(0, len(instance_pks), 500):
                chunk = list(instance_pks[start : start + 500])
                found.update(
                    str(uid)
                    for (uid,) in conn.execute(
                        "SELECT DISTINCT st.study_uid FROM instances i"
                        " JOIN series s ON i.series_pk = s.pk JOIN studies st"
                        f" ON s.study_pk = st.pk WHERE i.pk IN ({','.join('?' * len(chunk))})",
                        chunk,
                    )
                )
            return sorted(found)

        return await self.read(select)

    async def counts(self) -> dict[str, int]:
        """Patients, studies, series, instances and bytes (of datasets) held, and how many
        instances were refused as another object under a held SOP Instance UID
        (`sop_instance_uid_conflicts`, since the index was made).

        Read from the running totals the index keeps (`totals`, changed by triggers in the
        transaction that changes the rows), so the cost does not grow with the store.
        """

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            row = conn.execute(
                "SELECT patients, studies, series, instances, bytes,"
                " (SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?) FROM totals",
                (UID_CONFLICTS_KEY,),
            ).fetchone()
            keys = ("patients", "studies", "series", "instances", "bytes")
            return {**dict(zip(keys, row[:5], strict=True)), UID_CONFLICTS_KEY: row[5] or 0}

        return await self.read(count)

    async def patient_conflicts(self, study_uid: str, limit: int = 20) -> list[dict[str, Any]]:
        """The other patient identities under the Patient ID and issuer of *study_uid*'s.

        Each: patient_name, patient_birth_date, patient_sex, studies (how many carry it) and
        study_uids (up to 5). Empty for a study without a Patient ID, or none held.
        """

        def select(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT o.patient_name, o.patient_birth_date, o.patient_sex, count(*),"
                " json_group_array(ost.study_uid)"
                " FROM studies st JOIN patients p ON st.patient_pk = p.pk"
                " JOIN patients o ON o.patient_id = p.patient_id"
                " AND o.issuer_of_patient_id = p.issuer_of_patient_id AND o.pk != p.pk"
                " JOIN studies ost ON ost.patient_pk = o.pk"
                " WHERE st.study_uid = ? AND p.patient_id != '' GROUP BY o.pk ORDER BY o.pk"
                " LIMIT ?",
                (study_uid, limit),
            ).fetchall()
            keys = ("patient_name", "patient_birth_date", "patient_sex", "studies")
            return [
                {**dict(zip(keys, row[:4], strict=True)), "study_uids": json.loads(row[4])[:5]}
                for row in rows
            ]

        return await self.read(select)

    async def instance_files(self, where: str, params: Sequence[Any]) -> list[StoredInstance]:
        """Stored instances selected by a WHERE clause over `st` (studies), `s` (series), `i`."""

        def select(conn: sqlite3.Connection) -> list[StoredInstance]:
            rows = conn.execute(
                "SELECT i.sop_uid, i.sop_class_uid, i.transfer_syntax, i.path, i.size,"
                " i.checksum, i.pk FROM instances i JOIN series s ON i.series_pk = s.pk"
                " JOIN studies st ON s.study_pk = st.pk"
                " JOIN patients p ON st.patient_pk = p.pk"
                f" WHERE {where} ORDER BY st.pk, s.series_number, s.pk, i.instance_number, i.pk",
                tuple(params),
            ).fetchall()
            return [
                StoredInstance(r[0], r[1], r[2], self.files.absolute(r[3]), r[4], r[5], r[6])
                for r in rows
            ]

        return await self.read(select)

    # -- start-up reconciliation --------------------------------------------------------------

    def _reconcile(self, new_index: bool) -> ReconcileReport:
        """Make files and rows agree after an unclean stop (blocking).

        Temp files are removed. From the scan window on (`_scan_window`), a file without a row
        is checked and indexed (or removed), and a row whose file is missing or shorter than the
        row says is removed: its instance was never acknowledged, since a success waits for the
        file's flush. Then the new run is marked as running, its durable mark set to now.
        """
        removed_temp = self.files.clear_temp()
        window = self._writer.submit(lambda c: _scan_window(c, new_index)).result()
        indexed = removed = scanned = 0
        if window is not None:
            indexed, removed, scanned = self._reconcile_since(window)
        now = self._inflight.clock()

        def start_run(conn: sqlite3.Connection) -> None:
            for key in (RUNNING_KEY, MARK_KEY):
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, repr(now))
                )

        self._writer.submit(start_run).result()
        return ReconcileReport(removed_temp, indexed, removed, scanned)

    def _reconcile_since(self, window: float) -> tuple[int, int, int]:
        """Check the files of the buckets from *window* (s since the epoch) on, and the rows
        received from then on; return (files indexed, files or rows removed, files scanned)."""
        known: dict[str, int] = self._writer.submit(
            lambda c: dict(
                c.execute("SELECT path, size FROM instances WHERE received_at >= ?", (window,))
            )
        ).result()
        indexed = removed = scanned = 0
        on_disk = set()
        for relpath in list(self.files.files_since(window)):
            scanned += 1
            on_disk.add(relpath)
            size = known[relpath] if relpath in known else self._row_size(relpath)
            if size is None:
                if self._adopt(relpath):
                    indexed += 1
                else:
                    removed += 1
            elif self._size_on_disk(relpath) < size:
                removed += self._drop_row(relpath)
        # Rows whose file lies in a bucket before the window (moved in just before it, indexed
        # just after) are looked up one by one: a row is dropped only if its file is short.
        for relpath in known.keys() - on_disk:
            if self._size_on_disk(relpath) < known[relpath]:
                removed += self._drop_row(relpath)
        return indexed, removed, scanned

    def _row_size(self, relpath: str) -> int | None:
        """The size the row of *relpath* records, for a file whose row is older than the window
        (adopting it would find its own row a duplicate and remove the file)."""
        row = self._writer.submit(
            lambda c: c.execute("SELECT size FROM instances WHERE path = ?", (relpath,)).fetchone()
        ).result()
        return None if row is None else int(row[0])

    def _size_on_disk(self, relpath: str) -> int:
        """The file's size in bytes, -1 when it is missing."""
        try:
            return self.files.absolute(relpath).stat().st_size
        except FileNotFoundError:
            return -1

    def _drop_row(self, relpath: str) -> int:
        log.warning("unflushed_instance_removed", path=relpath)

        def drop(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM instances WHERE path = ?", (relpath,))
            prune_empty(conn)

        self._writer.submit(drop).result()
        self.files.absolute(relpath).unlink(missing_ok=True)
        return 1

    def _adopt(self, relpath: str) -> bool:
        path = self.files.absolute(relpath)
        try:
            received: CheckedInstance = read_received_file(path)
        except (InvalidInstance, OSError) as exc:
            log.warning("orphan_file_removed", path=relpath, reason=str(exc))
            path.unlink(missing_ok=True)
            return False
        try:
            result = self._writer.submit_ingest(received, Provenance()).result()
        except GatewayError as exc:
            log.warning("orphan_file_removed", path=relpath, reason=str(exc))
            path.unlink(missing_ok=True)
            return False
        return bool(result.path)


class _ReadPool:
    """Read-only connections, each used by one thread at a time.

    `checkout` lends one to the calling thread (waiting up to *wait* seconds for one to be
    free); `limiter` bounds the loop's worker threads that wait for one through `run`.
    """

    def __init__(self, db_path: Path, size: int, name: str) -> None:
        self._db_path = db_path
        self._size = size
        self._name = name
        self._idle: list[sqlite3.Connection] = []
        self._free = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.is_open = False
        self.limiter = anyio.CapacityLimiter(size)

    def open(self) -> None:
        """Open every connection (blocking)."""
        conns = [connect(self._db_path, readonly=True) for _ in range(self._size)]
        with self._lock:
            self._idle, self.is_open = conns, True
        for _ in conns:
            self._free.release()

    @contextlib.contextmanager
    def checkout(self, wait: float = _READ_WAIT) -> Iterator[sqlite3.Connection]:
        """A connection of the pool for this thread until the block ends.

        Raises `StoreError` when the store is not open or none is free within *wait* s."""
        if not self._free.acquire(timeout=wait):
            raise StoreError(f"no {self._name} connection free within {wait:g} s")
        with self._lock:
            if not self.is_open:
                self._free.release()
                raise StoreError("the store is not open")
            conn = self._idle.pop()
        try:
            yield conn
        finally:
            with self._lock:
                if self.is_open:
                    self._idle.append(conn)
                else:
                    conn.close()  # closed while this read ran
            self._free.release()

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* on a connection of the pool; return its result."""
        with self.checkout() as conn:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                raise StoreError(f"the index could not be read: {exc}") from exc

    def close(self) -> None:
        """Close the idle connections now and the busy ones when their read ends."""
        with self._lock:
            idle, self._idle, self.is_open = self._idle, [], False
        for conn in idle:
            conn.close()


def _check_announced(received: CheckedInstance, expect: tuple[str, str]) -> None:
    """Raise `InstanceMismatch` unless the dataset's SOP Class and Instance UIDs are *expect*
    (those the C-STORE request announced)."""
    attrs = received.attributes
    for name, announced, actual in (
        ("SOP Class UID", expect[0], attrs.sop_class_uid),
        ("SOP Instance UID", expect[1], attrs.sop_instance_uid),
    ):
        if announced.rstrip("\x00 ") != actual:
            raise InstanceMismatch(
                f"dataset {name} {actual[:64]!r} differs from the request's {announced[:64]!r}"
            )


async def finish_then_cancel(future: Future[T] | asyncio.Future[T]) -> T:
    """Await *future* (running in a thread) to its end, even when cancelled meanwhile, by
    anyio or by a plain `Task.cancel()`; then raise the cancellation, or return its result.

    The one place work that must finish is shielded: anyio's shielded scopes do not stop a
    plain asyncio cancellation, and cancelling `asyncio.wrap_future` would cancel a write still
    queued for the writer thread, so the future is shielded from both.
    """
    inner = future if isinstance(future, asyncio.Future) else asyncio.wrap_future(future)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            while not inner.done():
                try:
                    await asyncio.wait([inner])
                except asyncio.CancelledError:
                    continue  # cancelled again: still wait for the write
        if not inner.cancelled():
            inner.exception()  # retrieved: its error is not logged as never retrieved
        raise


def prune_empty(conn: sqlite3.Connection) -> None:
    """Remove series without instances, studies without series, patients without studies."""
    conn.execute(
        "DELETE FROM series WHERE NOT EXISTS (SELECT 1 FROM instances WHERE series_pk = series.pk)"
    )
    conn.execute(
        "DELETE FROM studies WHERE NOT EXISTS (SELECT 1 FROM series WHERE study_pk = studies.pk)"
    )
    conn.execute(
        "DELETE FROM patients"
        " WHERE NOT EXISTS (SELECT 1 FROM studies WHERE patient_pk = patients.pk)"
    )


def _forget(sop_uid: str, relpath: str) -> Callable[[sqlite3.Connection], None]:
    """A write that removes an instance row, if it still points at *relpath*."""

    def forget(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM instances WHERE sop_uid = ? AND path = ?", (sop_uid, relpath))
        prune_empty(conn)

    return forget


def _meta_time(conn: sqlite3.Connection, key: str) -> float | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return float(row[0]) if row else None


def _scan_window(conn: sqlite3.Connection, new_index: bool) -> float | None:
    """From when (s since the epoch) files and rows are checked at start-up; None: nothing.

    - a new index: from the beginning (it is rebuilt from every file);
    - a clean stop (no `running_since`): nothing;
    - an unclean stop of a run that kept a durable mark: from the mark, less
      `_CLOCK_MARGIN`;
    - otherwise (a run of a version without the mark, or a mark older than its run's start,
      which a clock set back makes): from an hour before that run started.
    """
    if new_index:
        return 0.0
    running = _meta_time(conn, RUNNING_KEY)
    if running is None:
        return None
    mark = _meta_time(conn, MARK_KEY)
    if mark is not None and mark >= running:
        return max(0.0, mark - _CLOCK_MARGIN)
    return max(0.0, running - _RECONCILE_MARGIN)
