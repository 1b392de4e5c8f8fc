"""`gateway backup DEST`: a copy of a store, taken while the gateway runs, that is a data_dir.

The backup works on the files, beside the gateway (it needs no control socket, and works as
well on a stopped gateway's store):

1. **Snapshot.** SQLite's online backup API copies `index.sqlite` in one step, inside one read
   transaction of the live index: a consistent picture of every table (instances, jobs and the
   delivery ledger, completions, retrievals, devices, sequences, tasks, MPPS, uploads: all of
   them live in this one file). In WAL mode the read does not stop the gateway's writer. Every
   C-STORE acknowledged before the backup started had its row committed (docs/storage.md), so
   it is in the snapshot.
2. **Files.** Every file a row of the snapshot names (instance files, uploaded result files,
   sequence files) is copied under the same relative path, fsynced, then every directory
   created. Instance files are immutable once renamed into place, and a replacement under
   `duplicate_policy = "overwrite"` goes to a new path, so a file is either there, whole, or
   gone. A file named by the snapshot that is gone (or shorter than its row says) by the time
   it is copied is looked up in the live index: an instance replaced meanwhile gets its new
   file copied and its row updated from the live row; one deleted meanwhile (`studies delete`,
   retention), or whose row the live index no longer backs, loses its row in the copy, with
   empty series, studies and patients pruned, as start-up reconciliation does.
3. **Audit.** The audit files (`audit/`) are copied as they are, up to their last whole line.
4. **Index last.** The copied index, edited as above and marked as cleanly stopped (nothing for
   start-up reconciliation to check), is written to a temp name, fsynced, and renamed to
   `DEST/index.sqlite`: a DEST holding `index.sqlite` is a complete backup.

Rows hold paths relative to data_dir, so DEST (or a copy of it) serves as data_dir anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from gateway.errors import GatewayError
from gateway.store.files import ensure_dirs, fsync_dir, replace_durably
from gateway.store.schema import connect
from gateway.store.store import RUNNING_KEY, prune_empty

__all__ = ["BackupError", "BackupReport", "backup"]

INDEX_NAME: Final = "index.sqlite"
_PARTIAL_NAME: Final = ".index.sqlite.partial"
_SNAPSHOT_KEY: Final = "backup_snapshot_at"  # meta of the copy: when its snapshot was taken
# Top-level entries of data_dir the backup knows: copied, or left out on purpose.
_KNOWN: Final = frozenset(
    {INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm", "objects", "tmp", "results",
     "sequences", "audit", "control.sock"}
)  # fmt: skip
_CHUNK: Final = 512  # index rows read, and files copied, per round
_LOOKUPS: Final = 3  # times a vanished instance is looked up again (replaced while copied)
_LIVE_COLUMNS: Final = (
    "path, size, checksum, transfer_syntax, sop_class_uid, instance_number, calling_ae,"
    " called_ae, peer_address, association_id, received_at"
)


class BackupError(GatewayError):
    """The backup was refused (DEST unusable, no store in data_dir) or could not complete."""


@dataclass(slots=True)
class BackupReport:
    """What `backup` copied. Sizes in bytes, times in seconds (since the epoch for
    `snapshot_at`)."""

    data_dir: str
    dest: str
    instances: int = 0  # instance files copied
    instance_bytes: int = 0
    files: int = 0  # other files the index names: uploads (results/), sequence files
    file_bytes: int = 0
    audit_files: int = 0
    audit_bytes: int = 0
    index_bytes: int = 0
    replaced: int = 0  # instances replaced while the backup ran: their newer file copied
    removed: int = 0  # instance rows dropped from the copy: file gone, row gone from the live index
    files_removed: int = 0  # upload and sequence file rows whose file was gone
    snapshot_at: float = 0.0
    seconds: float = 0.0
    gateway_running: bool = False
    not_copied: list[str] = field(default_factory=list)  # unknown entries at data_dir's top
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Every byte written to DEST."""
        return self.instance_bytes + self.file_bytes + self.audit_bytes + self.index_bytes

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-friendly values, `bytes` included."""
        return {**asdict(self), "bytes": self.bytes}


def backup(
    data_dir: Path, dest: Path, *, control_socket: Path | None = None, workers: int = 4
) -> BackupReport:
    """Copy the store in *data_dir* into *dest*, a new or empty directory, so that *dest* is a
    data_dir of its own (blocking; safe while the gateway runs and receives).

    *control_socket* (the gateway's) is only probed, to tell whether the gateway runs: a store
    whose last run did not stop cleanly and whose gateway is not running gets a warning.
    *workers* threads copy files at once. Returns the `BackupReport`. Raises `BackupError`
    when *dest* holds a store, is a file, lies inside *data_dir* (or holds it), when
    *data_dir* has no index, or when reading or writing fails; then what this call wrote to
    *dest* is removed.
    """
    started = time.monotonic()
    source_index = data_dir / INDEX_NAME
    _check_dest(data_dir, dest)
    if not source_index.is_file():
        raise BackupError(f"no store to back up: {source_index} does not exist")
    report = BackupReport(data_dir=str(data_dir), dest=str(dest))
    report.gateway_running = control_socket is not None and _answers(control_socket)
    created_dest = not dest.exists()
    made: list[Path] = []
    try:
        ensure_dirs(dest)
        for name in ("objects", "tmp"):
            (dest / name).mkdir()
            made.append(dest / name)
        _run(data_dir, dest, report, made, workers)
    except BaseException as exc:
        _undo(dest, created_dest, made)
        if isinstance(exc, OSError | sqlite3.Error):
            raise BackupError(f"the backup into {dest} failed: {exc}") from exc
        raise
    report.not_copied = sorted(
        entry.name for entry in os.scandir(data_dir) if entry.name not in _KNOWN
    )
    report.seconds = time.monotonic() - started
    return report


def _check_dest(data_dir: Path, dest: Path) -> None:
    data, target = data_dir.resolve(), dest.resolve()
    if target == data or data in target.parents:
        raise BackupError(f"{dest} is inside the data_dir {data_dir}: choose a place outside it")
    if target in data.parents:
        raise BackupError(f"{dest} holds the data_dir {data_dir}: choose a new directory")
    if dest.exists() and not dest.is_dir():
        raise BackupError(f"{dest} exists and is not a directory")
    for name in (INDEX_NAME, _PARTIAL_NAME, "objects"):
        if (dest / name).exists():
            raise BackupError(
                f"{dest} already holds a store ({name}): back up into a new or empty directory"
            )


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket *path* (nothing is sent)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _undo(dest: Path, created_dest: bool, made: Sequence[Path]) -> None:
    """Remove what a failed backup wrote: *dest* itself if it made it, else its entries."""
    if created_dest:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for path in made:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        (dest / f"{_PARTIAL_NAME}{suffix}").unlink(missing_ok=True)


def _run(data_dir: Path, dest: Path, report: BackupReport, made: list[Path], workers: int) -> None:
    partial = dest / _PARTIAL_NAME
    uri = f"file:{urllib.parse.quote(str(data_dir / INDEX_NAME))}?mode=ro"
    live = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
    try:
        report.snapshot_at = time.time()
        target = sqlite3.connect(partial)
        try:
            live.backup(target)  # every page in one step: one read transaction, one snapshot
        finally:
            target.close()
        copy = connect(partial)  # the gateway's own setup: foreign keys, the name-key function
        try:
            running = copy.execute("SELECT 1 FROM meta WHERE key = ?", (RUNNING_KEY,)).fetchone()
            if running is not None and not report.gateway_running:
                report.warnings.append(
                    "the gateway is not running and its last run did not stop cleanly: after a"
                    " machine crash, instances are indexed again only by start-up"
                    " reconciliation; start the gateway once, then back up again"
                )
            with _Copier(data_dir, dest, workers) as copier:
                made.extend(dest / name for name in ("results", "sequences", "audit"))
                _copy_instances(copy, live, copier, report)
                _copy_other_files(copy, copier, report)
                _copy_audit(data_dir, dest, copier, report)
            copy.execute("BEGIN IMMEDIATE")
            copy.execute("DELETE FROM meta WHERE key = ?", (RUNNING_KEY,))
            copy.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_SNAPSHOT_KEY, repr(report.snapshot_at)),
            )
            copy.execute("COMMIT")
            copy.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            mode = copy.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise BackupError(f"the copied index stayed in journal mode {mode}")
        finally:
            copy.close()
    finally:
        live.close()
    report.index_bytes = partial.stat().st_size
    replace_durably(partial, dest / INDEX_NAME)


class _Copier:
    """Copies files from under one root to the same relative paths under another, fsynced,
    on a pool of threads; `close` fsyncs every directory it created or wrote into."""

    def __init__(self, source: Path, dest: Path, workers: int) -> None:
        self.source = source
        self.dest = dest
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="backup")
        self._dirs: set[Path] = {dest, dest / "tmp"}
        self._lock = threading.Lock()

    def __enter__(self) -> _Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        if exc[0] is None:
            self.sync_dirs()

    def copy_many(self, jobs: Iterable[tuple[str, int]]) -> list[int | None]:
        """Copy each (relative path, least size) in parallel; per job the bytes copied, or None
        when the file is missing or shorter than its least size (nothing written then)."""
        return list(self._pool.map(lambda job: self.copy(*job), jobs))

    def copy(self, relpath: str, least: int = 0, *, whole_lines: bool = False) -> int | None:
        """Copy one file; the bytes copied, None when it is missing or shorter than *least*.

        *whole_lines*: copy only up to the last newline (a file being appended to)."""
        parts = PurePosixPath(relpath).parts
        if not parts or PurePosixPath(relpath).is_absolute() or ".." in parts:
            raise BackupError(f"the index names a file outside data_dir: {relpath!r}")
        try:
            src = os.open(self.source / relpath, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            size = os.fstat(src).st_size
            if size < least:
                return None
            if whole_lines and size:
                size = _last_newline(src, size)
            target = self.dest / relpath
            self._make_dir(target.parent)
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _send(src, out, size)
                os.fsync(out)
            finally:
                os.close(out)
            return size
        finally:
            os.close(src)

    def _make_dir(self, directory: Path) -> None:
        with self._lock:
            if directory in self._dirs:
                return
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            probe = directory
            while probe != self.dest and probe not in self._dirs:
                self._dirs.add(probe)
                probe = probe.parent

    def sync_dirs(self) -> None:
        """fsync every directory written into, the deepest first, then DEST's parent."""
        for directory in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(directory)
        fsync_dir(self.dest.parent)


def _send(src: int, out: int, size: int) -> None:
    offset = 0
    while offset < size:
        sent = os.sendfile(out, src, offset, min(size - offset, 1 << 30))
        if sent == 0:
            raise BackupError("a file shrank while it was copied")
        offset += sent


def _last_newline(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        found = block.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _copy_instances(
    copy: sqlite3.Connection, live: sqlite3.Connection, copier: _Copier, report: BackupReport
) -> None:
    """Copy the file of every instance row of the copy; fix or drop the rows whose file went."""
    vanished: list[tuple[int, str, str]] = []
    last = 0
    while True:
        rows = copy.execute(
            "SELECT pk, sop_uid, path, size FROM instances WHERE pk > ? ORDER BY pk LIMIT ?",
            (last, _CHUNK),
        ).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        for (pk, sop_uid, path, _), copied in zip(
            rows, copier.copy_many((row[2], row[3]) for row in rows), strict=True
        ):
            if copied is None:
                vanished.append((pk, sop_uid, path))
            else:
                report.instances += 1
                report.instance_bytes += copied
    for pk, sop_uid, path in vanished:
        _settle(copy, live, copier, report, pk, sop_uid, path)


def _settle(
    copy: sqlite3.Connection,
    live: sqlite3.Connection,
    copier: _Copier,
    report: BackupReport,
    pk: int,
    sop_uid: str,
    path: str,
) -> None:
    """An instance whose snapshot file is gone: copy the live index's newer file and update
    the row, or drop the row (deleted meanwhile, or a row the live index no longer backs)."""
    for _ in range(_LOOKUPS):
        row = live.execute(
            f"SELECT {_LIVE_COLUMNS} FROM instances WHERE sop_uid = ?", (sop_uid,)
        ).fetchone()
        if row is None or row[0] == path:
            break
        copied = copier.copy(row[0], row[1])
        if copied is not None:
            copy.execute("BEGIN IMMEDIATE")
            copy.execute(
                "UPDATE instances SET path=?, size=?, checksum=?, transfer_syntax=?,"
                " sop_class_uid=?, instance_number=?, calling_ae=?, called_ae=?,"
                " peer_address=?, association_id=?, received_at=? WHERE pk=?",
                (*row, pk),
            )
            copy.execute("COMMIT")
            report.replaced += 1
            report.instances += 1
            report.instance_bytes += copied
            return
        path = row[0]  # replaced again meanwhile: look once more
    copy.execute("BEGIN IMMEDIATE")
    copy.execute("DELETE FROM instances WHERE pk = ?", (pk,))  # its ledger rows cascade
    prune_empty(copy)
    copy.execute("COMMIT")
    report.removed += 1


def _has(copy: sqlite3.Connection, table: str, column: str) -> bool:
    """Whether *table* exists with *column* (an index of an older version may lack either)."""
    return any(row[1] == column for row in copy.execute(f"PRAGMA table_info({table})"))


def _copy_other_files(copy: sqlite3.Connection, copier: _Copier, report: BackupReport) -> None:
    """Uploaded result files (`result_files.path`) and sequence files
    (`sequences/<id>/<file name>`); a row whose file is gone loses it."""
    if _has(copy, "result_files", "path"):
        rows = copy.execute(
            "SELECT id, path, size FROM result_files WHERE path IS NOT NULL ORDER BY created_at"
        ).fetchall()
        for (row_id, _, _), copied in zip(
            rows, copier.copy_many((r[1], r[2]) for r in rows), strict=True
        ):
            if copied is None:
                copy.execute("DELETE FROM result_files WHERE id = ?", (row_id,))
                report.files_removed += 1
            else:
                report.files += 1
                report.file_bytes += copied
    if _has(copy, "sequences", "file"):
        sequences = copy.execute(
            "SELECT id, file FROM sequences WHERE file IS NOT NULL ORDER BY id"
        ).fetchall()
        for sequence_id, info in sequences:
            meta = json.loads(info)
            copied = copier.copy(f"sequences/{sequence_id}/{meta['name']}", int(meta["size"]))
            if copied is None:
                copy.execute("UPDATE sequences SET file = NULL WHERE id = ?", (sequence_id,))
                report.files_removed += 1
            else:
                report.files += 1
                report.file_bytes += copied


def _copy_audit(data_dir: Path, dest: Path, copier: _Copier, report: BackupReport) -> None:
    """The audit trail's files, each up to its last whole line."""
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(data_dir / "audit"), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False):
                copied = copier.copy(f"audit/{entry.name}", whole_lines=True)
                if copied is not None:
                    report.audit_files += 1
                    report.audit_bytes += copied
