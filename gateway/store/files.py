"""The file half of the store: where instance files live and how they get there durably.

Layout under `data_dir`::

    tmp/                      files being received (same filesystem, so moving in is a rename)
    objects/YYYYMMDD/HH/MM/   one file per instance, named by its move-in time in ms and a random
                              UUID, bucketed by the UTC minute it arrived; start-up
                              reconciliation after an unclean stop lists only the buckets from
                              the index's durable mark on and skips earlier names unopened
    objects/YYYYMMDD/HH/      files named by a UUID alone, by hour, as earlier versions wrote
                              them (rows hold relative paths, so those files stay where they are)
    index.sqlite              the index (see `index.py`)
    gateway.lock              held (`flock`) by the one process serving this data_dir; holds
                              its PID

No name on disk comes from a DICOM value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import itertools
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DataDirInUse",
    "FileStore",
    "create_new",
    "ensure_dirs",
    "fsync_dir",
    "replace_durably",
    "start_writeback",
    "write_all",
    "write_atomically",
]

_BUCKET_FORMAT = "%Y%m%d/%H/%M"
_MS_DIGITS = 14  # milliseconds since the epoch, zero-padded: sortable until the year 5138
_KNOWN_DIRS = 64  # bucket directories remembered as existing (a new one each minute)
# Names of received files: 16 random hex digits per process, then a counter (32 hex digits, as a
# UUID's): unique without a getrandom call per file (two per instance cost as much as a rename).
_PROCESS_TOKEN = os.urandom(8).hex()
_SERIAL = itertools.count()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to start writing *length* bytes of *fd* from *offset* (0: to the end)
    to disk now, without waiting (`sync_file_range(2)`, Linux; elsewhere nothing). Not a
    durability step: the fsync that follows finds less left to write."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def create_new(path: str | Path) -> int:
    """A new file at *path* (it must not exist), open for writing; only this process's user
    may read it."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of *data* to *fd* (a write may take less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unique_name() -> str:
    """32 hex digits no other file name of this store has (see `_PROCESS_TOKEN`)."""
    return f"{_PROCESS_TOKEN}{next(_SERIAL):016x}"


class DataDirInUse(OSError):
    """Another process holds the data_dir's lock (its PID in `pid`, None if unreadable)."""

    def __init__(self, root: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"{root} is in use by {who} (another gateway serving it): stop that "
                         "one first, or give this one its own [node] data_dir")  # fmt: skip
        self.pid = pid


def fsync_dir(path: Path) -> None:
    """Make the entries of directory *path* (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dirs(directory: Path) -> None:
    """Create *directory* and its missing parents, each made durable in its parent."""
    created = []
    probe = directory
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    for path in reversed(created):
        path.mkdir(exist_ok=True)
        fsync_dir(path.parent)


def replace_durably(source: Path, target: Path) -> None:
    """Put the complete file *source* at *target* (same filesystem) so that *target* is either
    absent, its old content, or all of *source*: fsync the file, rename it over *target*, fsync
    the directory (created, durably, when missing)."""
    with source.open("rb") as f:
        os.fsync(f.fileno())
    ensure_dirs(target.parent)
    os.replace(source, target)
    fsync_dir(target.parent)


def write_atomically(target: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write *target* through *fill* so that it is either absent, old, or complete: the bytes
    go to a temp name beside it and `replace_durably` puts them in place."""
    ensure_dirs(target.parent)
    temp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        with temp.open("xb") as out:
            fill(out)
        replace_durably(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class FileStore:
    """Instance files under one root: temp files, durable moves into place, removal."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.objects_dir = root / "objects"
        self._known_dirs: set[Path] = set()

    def create_dirs(self) -> None:
        """Create the layout (idempotent) and make it durable."""
        for path in (self.root, self.tmp_dir, self.objects_dir):
            path.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)

    def lock(self) -> int:
        """Take the data_dir's lock for this process (an exclusive `flock` on `gateway.lock`,
        released when the returned descriptor is closed or the process ends, however it
        ends) and write this process's PID into it. Two gateways on one data_dir would
        remove each other's files being received and take each other's control socket.

        Raises `DataDirInUse` when another process holds it.
        """
        fd = os.open(self.root / "gateway.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataDirInUse(self.root, int(held) if held.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def new_temp_path(self) -> Path:
        """A fresh path in `tmp/` for a file being received."""
        return self.tmp_dir / f"{unique_name()}.part"

    def absolute(self, relpath: str) -> Path:
        """The file of an index row (rows hold paths relative to the root)."""
        return self.root / relpath

    def _bucket(self, when: float) -> Path:
        return self.objects_dir / time.strftime(_BUCKET_FORMAT, time.gmtime(when))

    def _ensure_dir(self, directory: Path) -> None:
        if directory not in self._known_dirs:
            ensure_dirs(directory)
            if len(self._known_dirs) >= _KNOWN_DIRS:
                self._known_dirs.clear()
            self._known_dirs.add(directory)

    def move_in(self, temp_path: Path, now: float) -> Path:
        """Rename a received file into its bucket (not yet durable); return its new path.

        The name is the move-in time in milliseconds, then a random UUID: start-up
        reconciliation lists a bucket and skips, by name alone, the files moved in before its
        window.
        """
        final = self._new_name(now)
        os.rename(temp_path, final)
        return final

    def _new_name(self, now: float) -> Path:
        """A new file's path in the bucket of *now* (created, durably, when missing)."""
        directory = self._bucket(now)
        self._ensure_dir(directory)
        return directory / f"{int(now * 1000):0{_MS_DIGITS}d}-{unique_name()}.dcm"

    def write_in(self, content: bytes, now: float) -> tuple[Path, int]:
        """Write a received file's bytes to a new file in `tmp/` and rename it into the bucket
        of *now* (named as `move_in` names; not yet durable); return its path and a descriptor
        still open on it for the fsync (the caller closes it). A name in a bucket only ever
        holds a whole file; a crash before the rename leaves a temp file that start-up removes.
        """
        temp = self.new_temp_path()
        fd = create_new(temp)
        try:
            write_all(fd, content)
            return self.move_in(temp, now), fd
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise

    def relative(self, path: Path) -> str:
        """The path an index row holds for *path* (relative to the root)."""
        return str(path.relative_to(self.root))

    def remove(self, relpaths: Iterable[str]) -> None:
        """Unlink files (missing ones are not an error) and make the unlinks durable."""
        dirs = set()
        for relpath in relpaths:
            path = self.root / relpath
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            dirs.add(path.parent)
        for directory in dirs:
            fsync_dir(directory)

    def clear_temp(self) -> int:
        """Remove every file left in `tmp/` (a crash's partial receives); return how many."""
        count = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                count += 1
        if count:
            fsync_dir(self.tmp_dir)
        return count

    def discard(self, paths: Iterable[Path]) -> None:
        """Unlink files under the root that will not be indexed, durably (`remove`)."""
        self.remove(self.relative(path) for path in paths)

    def files_since(self, since: float) -> Iterator[str]:
        """Relative paths of the files in the buckets from the minute of *since* onwards.

        Minute buckets (``YYYYMMDD/HH/MM``) before that minute are not listed; an hour bucket of
        the older layout (``YYYYMMDD/HH``, files directly inside) is listed whole from the hour
        of *since* on. Only the directories of days and hours from *since* on are read.
        """
        day0, hour0, minute0 = time.strftime(_BUCKET_FORMAT, time.gmtime(since)).split("/")
        if not self.objects_dir.exists():
            return
        first_name = f"{int(since * 1000):0{_MS_DIGITS}d}"
        for day in sorted(os.listdir(self.objects_dir)):
            if day < day0:
                continue
            for hour in sorted(os.listdir(self.objects_dir / day)):
                if (day, hour) < (day0, hour0):
                    continue
                first_minute = minute0 if (day, hour) == (day0, hour0) else ""
                for relpath in self._hour_files(f"objects/{day}/{hour}", first_minute):
                    name = relpath.rsplit("/", 1)[1]
                    # A timed name (see move_in) before *since* is skipped; older names are not
                    # timed and are listed.
                    if not (_is_timed(name) and name[:_MS_DIGITS] < first_name):
                        yield relpath

    def _hour_files(self, hour_dir: str, first_minute: str) -> Iterator[str]:
        """Files of an hour directory: its minute buckets from *first_minute* on, and files
        placed directly in it (the hour-bucket layout)."""
        minutes = []
        for entry in os.scandir(self.root / hour_dir):
            if entry.is_dir(follow_symlinks=False):
                if entry.name >= first_minute:
                    minutes.append(entry.name)
            elif entry.name.endswith(".dcm"):
                yield f"{hour_dir}/{entry.name}"
        for minute in sorted(minutes):
            for entry in os.scandir(self.root / hour_dir / minute):
                if entry.name.endswith(".dcm"):
                    yield f"{hour_dir}/{minute}/{entry.name}"

    def disk_usage(self) -> shutil._ntuple_diskusage:
        """Total, used and free bytes of the store's filesystem."""
        return shutil.disk_usage(self.root)


def _is_timed(name: str) -> bool:
    """Whether a file name starts with its move-in time (``<14 digits>-<uuid>.dcm``)."""
    return len(name) > _MS_DIGITS and name[_MS_DIGITS] == "-" and name[:_MS_DIGITS].isdigit()
