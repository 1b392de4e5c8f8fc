"""How a received dataset reaches its file: kept in memory while small, else streamed,
hashed and flushed while it arrives.

A C-STORE's data set (received by the node, or by a C-GET of retrieval) goes, fragment by
fragment as the association assembles it (`gateway.net.association.DataSink`), into a
`DatasetSpool` behind its Part 10 preamble and File Meta Information (`c_store_sink`):

- up to `IN_MEMORY_BYTES` it stays in memory, and the event loop touches no file for it: the
  index writer's thread (`place_received`, `Store.place`) checks and hashes the bytes and
  writes them to `tmp/` and renames them into their bucket. Measured on 10 KB instances over
  four associations: the loop's own open, write, close, unlink and hash calls were ~0.5 ms of
  each instance, and every one of them gave the GIL away to wait for it again;
- past that, it streams to a spool file in the store's `tmp/`, hashed as it is written (the
  check after the last fragment then need not read it again), and the kernel is asked to start
  writing every 256 KB back as soon as it is written (`sync_file_range`), so the fsync before
  the reply finds little left to write. Measured on 512 KB instances received in four PDUs
  each: the handler's time fell from ~1.9 ms to ~1.1 ms;
- the File Meta is encoded directly (`encode_file_meta`, bytes identical to pydicom's): through
  pydicom Datasets it cost ~0.3 ms of each instance.

Memory: at most `IN_MEMORY_BYTES` per C-STORE in flight (one per association).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.errors import GatewayError, RejectedInstance
from gateway.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.net.association import Association, Message
from gateway.net.dimse import C_STORE_RQ, uid_value
from gateway.store.files import create_new, start_writeback, unique_name, write_all

if TYPE_CHECKING:
    from gateway.store.index import IngestResult, Provenance
    from gateway.store.store import Store

__all__ = ["IN_MEMORY_BYTES", "DatasetSpool", "c_store_sink", "encode_file_meta",
           "place_received"]  # fmt: skip

log = structlog.get_logger(__name__)

IN_MEMORY_BYTES = 256 * 1024  # a received file up to this size is kept in memory
_WRITEBACK_BYTES = 256 * 1024


class DatasetSpool:
    """Where a received file goes as it arrives (a `DataSink`: `write`, `close`, `discard`):
    in memory up to *in_memory* bytes, then a spool file in *directory*; the data set's
    digest once it spilled to the file (`dataset_digest`, hashed as written).

    A dataset that grows past *max_bytes* is not kept: what it had is dropped at once, the rest
    of the dataset is counted and dropped as it arrives (the sender still gets its answer and
    the association goes on), and `too_large` tells the C-STORE handler to refuse it.
    """

    def __init__(
        self, directory: Path, max_bytes: int | None = None, in_memory: int = IN_MEMORY_BYTES
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.too_large = False
        self._in_memory = in_memory
        self._buffer: bytearray | None = bytearray()  # None once spilled to the file
        self._dataset_at = -1  # offset of the dataset in the file (-1: File Meta still)
        self._dataset_bytes = 0
        self._name: str | None = None
        self._fd = -1
        self._digest: Any = None
        self._written = 0
        self._queued = 0  # bytes already handed to writeback

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._dataset_at >= 0:
            self._dataset_bytes += len(data)
            if self.too_large:
                return len(data)  # read and dropped
            if self.max_bytes is not None and self._dataset_bytes > self.max_bytes:
                self.too_large = True
                self.abandon()
                return len(data)
        buffer = self._buffer
        if buffer is not None:
            if len(buffer) + len(data) <= self._in_memory:
                buffer += data
                return len(data)
            self._spill(buffer)
        self._write_file(data)
        return len(data)

    def _spill(self, buffer: bytearray) -> None:
        """Too large for memory: the file from here on, the bytes so far first."""
        self._buffer = None
        self._fd = create_new(self.name)
        if self._dataset_at >= 0:
            self._digest = hashlib.sha256(memoryview(buffer)[self._dataset_at :])
        self._write_file(buffer, hashed=True)

    def _write_file(self, data: bytes | bytearray | memoryview, *, hashed: bool = False) -> None:
        write_all(self._fd, data)
        if self._digest is not None and not hashed:
            self._digest.update(data)
        self._written += len(data)
        if self._written - self._queued >= _WRITEBACK_BYTES:
            start_writeback(self._fd, self._queued, self._written - self._queued)
            self._queued = self._written

    def begin_dataset(self) -> None:
        """What is written from now on is the dataset."""
        if self._buffer is not None:
            self._dataset_at = len(self._buffer)
        else:
            self._dataset_at = self._written
            self._digest = hashlib.sha256()

    @property
    def name(self) -> str:
        """The spool file's path (named on first use; the file exists once spilled)."""
        if self._name is None:
            self._name = str(self.directory / f"{unique_name()}.part")
        return self._name

    @property
    def content(self) -> bytes | None:
        """The whole file's bytes while they are kept in memory, else None."""
        return None if self._buffer is None else bytes(self._buffer)

    @property
    def dataset_bytes(self) -> int:
        """Bytes of the dataset received so far (File Meta excluded), kept or dropped."""
        return self._dataset_bytes

    @property
    def dataset_digest(self) -> str | None:
        """SHA-256 (hex) of the dataset bytes written to the file; None while they are in
        memory (the check hashes them) or before the dataset began."""
        return None if self._digest is None else str(self._digest.hexdigest())

    def close(self) -> None:
        """The dataset is complete (before the handler takes the file)."""
        self._close_fd()

    def discard(self) -> None:
        """The association ended mid-dataset (`gateway.net.association.DataSink`)."""
        self.abandon()

    def abandon(self) -> None:
        """Drop what was received: free the memory, close and remove the spool file."""
        if self._buffer is not None:
            self._buffer = bytearray()
        self._close_fd()
        if self._name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._name)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


async def place_received(
    store: Store,
    spool: DatasetSpool,
    provenance: Provenance,
    expect: tuple[str, str],
) -> tuple[int, IngestResult | None]:
    """Check, place, fsync and index a C-STORE's received file (`Store.place`; *expect* is
    the request's (SOP Class UID, SOP Instance UID)): its bytes if they were kept in memory,
    else its spool file; nothing of it stays in `tmp/`. Every C-STORE the gateway takes, as
    the node or as a C-GET's requestor, is answered from here.

    Returns the C-STORE status (PS3.4 B.2.3, GG.4-1) and, when stored, the index's result:
    0x0000 once the file is durably in place and indexed (a duplicate the policy keeps
    included); the refusal's own status for what the instance is (`RejectedInstance`: 0xC000
    and its kin, 0xA900); 0xA700 (Out of Resources) for a data set past
    `node.max_instance_bytes` (dropped as it arrived) and for what the store could not do.
    A refusal is logged as `instance_refused` (warning), a failure as `instance_not_stored`
    (error), with *provenance*'s association id.
    """
    sop_instance = expect[1][:64]
    association = provenance.association_id
    if spool.too_large:
        spool.abandon()
        log.warning("instance_refused", association_id=association, sop_instance_uid=sop_instance,
                    status="0xA700", reason="the dataset is larger than node.max_instance_bytes"
                    f" ({spool.max_bytes} bytes): dropped as it arrived")  # fmt: skip
        return 0xA700, None
    try:
        content = spool.content
        if content is not None:
            result = await store.place(provenance, content=content, expect=expect)
        else:
            result = await store.place(
                provenance, path=Path(spool.name), expect=expect, checksum=spool.dataset_digest
            )
    except RejectedInstance as exc:
        log.warning("instance_refused", association_id=association, sop_instance_uid=sop_instance,
                    status=f"0x{exc.status:04X}", reason=str(exc))  # fmt: skip
        return exc.status, None
    except (GatewayError, OSError) as exc:
        log.error("instance_not_stored", association_id=association,
                  sop_instance_uid=sop_instance, status="0xA700", reason=str(exc))  # fmt: skip
        return 0xA700, None
    return 0x0000, result


def c_store_sink(
    assoc: Association, message: Message, directory: Path, max_bytes: int | None
) -> DatasetSpool | None:
    """Where *message*'s data set goes (`Association.sinks`): a C-STORE's into a
    `DatasetSpool` in *directory*, behind the Part 10 preamble, prefix (PS3.10 7.1) and the
    File Meta Information the request announces, so the file is a DICOM file once the data set
    has arrived (the association discards it if it ends before that); any other message's
    stays in memory (None)."""
    command = message.command
    if int(command.CommandField) != C_STORE_RQ:
        return None
    spool = DatasetSpool(directory, max_bytes)
    spool.write(b"\x00" * 128 + b"DICM")
    spool.write(encode_file_meta(str(command.AffectedSOPClassUID),
                                 str(command.AffectedSOPInstanceUID),
                                 str(assoc.transfer_syntax(message.context_id))))  # fmt: skip
    spool.begin_dataset()
    return spool


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version: str = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """File Meta group 0002 (Explicit VR Little Endian, PS3.10 7.1), as pynetdicom's
    `create_file_meta` plus pydicom's `write_file_meta_info` would write it, naming the gateway
    (`gateway.identity`) as the implementation that wrote the file."""

    def element(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value

    version = str(implementation_version).encode("ascii")
    body = b"".join(
        (
            element(0x0001, b"OB", b"\x00\x01"),
            element(0x0002, b"UI", uid_value(sop_class_uid)),
            element(0x0003, b"UI", uid_value(sop_instance_uid)),
            element(0x0010, b"UI", uid_value(transfer_syntax)),
            element(0x0012, b"UI", uid_value(implementation_uid)),
            element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    return element(0x0000, b"UL", struct.pack("<I", len(body))) + body
