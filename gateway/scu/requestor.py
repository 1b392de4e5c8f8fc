"""Outbound DICOM on the asyncio network layer (`gateway.net`): associations and C-STORE.

`open_association` requests an association with a configured peer (the node's AE title,
timeouts, maximum PDU length, DICOM TLS where the peer has ``tls = true``) and fails with a
`PeerError` of the kind each failure is (unreachable, rejected, no_context, aborted), which
dispatch and retrieval record and retry by. `store_instance` sends one stored instance as a
C-STORE on an established association: its file's data set bytes as stored, read in pieces
(never the whole file in memory) where the peer accepted its stored syntax, else re-encoded
(`gateway.scu.syntaxes.outgoing`) in a worker thread; it waits for the C-STORE-RSP within the
DIMSE timeout. The same call serves dispatch, a C-MOVE's sub-association and a C-GET's own
association (the acceptor's, in the SCU role the requestor granted by SCP/SCU Role
Selection). `IdleAssociations` keeps associations open between uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio.to_thread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import PeerError
from gateway.net.association import Aborted, Association, Rejected, Timeouts
from gateway.net.dimse import c_store_rq
from gateway.scp.tls import client_context
from gateway.scu.syntaxes import named, outgoing
from gateway.store.store import StoredInstance

__all__ = [
    "IdleAssociations",
    "Proposal",
    "dataset_offset",
    "end_association",
    "no_answer",
    "open_association",
    "proposal_of",
    "request_command",
    "store_instance",
    "stored_dataset",
]

# Read size of a stored file being sent: large enough that a small instance is one read (one
# worker-thread hop), small enough that a 500 MB instance costs a few MB of memory.
_READ_SIZE = 4 << 20

# A-ASSOCIATE-RJ (result, source, reason) that retrying cannot change (PS3.8 9.3.4).
_PERMANENT_REJECTIONS = frozenset({(1, 1, 2), (1, 1, 3), (1, 1, 7)})


Proposal = frozenset[tuple[str, tuple[str, ...]]]


def proposal_of(contexts: Sequence[PresentationContext]) -> Proposal:
    """The presentation contexts proposed, as (abstract syntax, transfer syntaxes) pairs."""
    return frozenset((str(cx.abstract_syntax), tuple(cx.transfer_syntax)) for cx in contexts)


def _peer_key(peer: PeerSettings) -> tuple[object, ...]:
    """What makes two peers the same association partner (a reload may change any of it)."""
    return (peer.name, peer.ae_title, peer.host, peer.port, peer.tls, peer.tls_check_hostname)


class IdleAssociations:
    """Established associations with peers, each kept *delay* seconds after its last use (then
    released, A-RELEASE; `[node] association_close_delay`, as Orthanc's
    DicomAssociationCloseDelay); `close()` releases them all. An idle association is used
    again only for a use that proposes no context it was not proposed, so what is sent in which
    syntax is what a new association would give; one the peer released or aborted meanwhile is
    dropped. At most one is kept per peer (the latest): each holds one of the peer's
    association slots (Orthanc serves `DicomThreadsCount` associations at once, 4 by default),
    and idle ones must not keep the peer from taking new ones. Event-loop only."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._idle: dict[tuple[object, ...], tuple[Association, Proposal, asyncio.Task[None]]] = {}

    def take(self, peer: PeerSettings, proposal: Proposal) -> Association | None:
        """The idle association with *peer*, now in use, if it was proposed at least
        *proposal* and is still established."""
        key = _peer_key(peer)
        kept = self._idle.get(key)
        if kept is None:
            return None
        assoc, proposed, expiry = kept
        if assoc.is_established and not proposal <= proposed:
            return None
        del self._idle[key]
        expiry.cancel()
        return assoc if assoc.is_established else None

    async def give(self, peer: PeerSettings, assoc: Association, proposal: Proposal) -> None:
        """*assoc* is free again: kept for the next use (the one kept before it is released),
        or released now (no delay, or it is not established any more)."""
        if self.delay <= 0 or not assoc.is_established:
            await end_association(assoc)
            return
        key = _peer_key(peer)
        previous = self._idle.pop(key, None)
        expiry = asyncio.get_running_loop().create_task(self._expire(key, assoc))
        self._idle[key] = (assoc, proposal, expiry)
        if previous is not None:
            previous[2].cancel()
            await end_association(previous[0])

    async def _expire(self, key: tuple[object, ...], assoc: Association) -> None:
        await asyncio.sleep(self.delay)
        kept = self._idle.get(key)
        if kept is not None and kept[0] is assoc:
            del self._idle[key]
        await end_association(assoc)

    async def close(self) -> None:
        """Release every idle association."""
        idle = list(self._idle.values())
        self._idle.clear()
        for _, _, expiry in idle:
            expiry.cancel()
        await asyncio.gather(*(end_association(a) for a, _, _ in idle), return_exceptions=True)


def no_answer(peer: str, what: str, exc: Aborted) -> PeerError:
    """The `PeerError` (``aborted``) of a request of this side that *peer* (its name) did not
    answer: the association ended first, or no answer came within the DIMSE timeout."""
    return PeerError(
        "aborted", f"peer {peer} did not answer the {what}: the association ended ({exc})"
    )


def request_command(field: int, message_id: int, sop_class: str, **elements: object) -> Dataset:
    """The command set of a request sent rarely (C-ECHO, C-FIND, C-MOVE, C-GET: PS3.7 9.3) as a
    pydicom Dataset, medium priority where the request has one; *elements* by keyword."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = field
    command.MessageID = message_id
    if field != 0x0030:  # C-ECHO-RQ has no Priority (PS3.7 9.3.5.1)
        command.Priority = 0x0000
    for keyword, value in elements.items():
        setattr(command, keyword, value)
    return command


async def end_association(assoc: Association) -> None:
    """Release *assoc* if it is established, else close it (A-ABORT where still open)."""
    if assoc.is_established:
        with contextlib.suppress(Aborted):
            await assoc.release()
    else:
        await assoc.abort()


async def open_association(
    node: NodeSettings,
    peer: PeerSettings,
    contexts: Sequence[PresentationContext],
    *,
    roles: dict[str, tuple[bool, bool]] | None = None,
) -> Association:
    """Request an association with *peer* proposing *contexts* (and SCP/SCU Role Selection
    items *roles*: SOP Class UID -> (SCU, SCP)); return it established, TCP_NODELAY set.

    Raises
    ------
    PeerError
        ``unreachable`` (refused, or no connection within `connection_timeout`), ``rejected``
        (with the A-ASSOCIATE-RJ result, source and reason; `permanent` when the peer does not
        know either AE title), ``no_context`` (accepted, but none of the contexts; the
        association is aborted), ``aborted`` (the peer ended it while it was negotiated).
    """
    where = f"peer {peer.name} ({peer.ae_title} at {peer.host}:{peer.port})"
    try:
        assoc = await Association.request(
            peer.host, peer.port, calling_ae=node.ae_title, called_ae=peer.ae_title,
            contexts=[_copy(cx) for cx in contexts], roles=roles,
            timeouts=Timeouts(acse=node.acse_timeout, idle=node.network_timeout),
            max_pdu=node.max_pdu_size,
            ssl_context=client_context(node, peer) if peer.tls else None,
            connect_timeout=node.connection_timeout,
        )  # fmt: skip
    except Rejected as exc:
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source = exc.result, exc.source
        primitive.diagnostic = exc.reason
        raise PeerError(
            "rejected",
            f"{where} rejected the association: {primitive.result_str}, {primitive.source_str},"
            f" {primitive.reason_str} (A-ASSOCIATE-RJ result {exc.result}, source"
            f" {exc.source}, reason {exc.reason})",
            permanent=(exc.result, exc.source, exc.reason) in _PERMANENT_REJECTIONS,
        ) from None
    except Aborted:
        raise PeerError(
            "aborted", f"{where} aborted the association while it was negotiated"
        ) from None
    except TimeoutError:
        raise PeerError(
            "unreachable", f"{where}: no connection within {node.connection_timeout:g} s"
        ) from None
    except OSError:  # ssl.SSLError included: a TLS handshake that failed
        raise PeerError(
            "unreachable", f"{where}: connection refused or the host is unreachable"
        ) from None
    if not assoc.contexts:
        await assoc.abort()
        proposed = sorted({str(cx.abstract_syntax) for cx in contexts})
        raise PeerError(
            "no_context",
            f"{where} accepted none of the presentation contexts proposed, for"
            f" {', '.join(named(uid) for uid in proposed)}",
        )
    return assoc


def _copy(context: PresentationContext) -> PresentationContext:
    """A context of our own to number (`Association.request` assigns the IDs)."""
    copy = PresentationContext()
    copy.abstract_syntax = context.abstract_syntax
    copy.transfer_syntax = list(context.transfer_syntax)
    return copy


def dataset_offset(path: Path) -> int:
    """Where the data set starts in the DICOM file at *path*: after its File Meta Information
    (PS3.10 7.1), read from its group length where it leads the group as PS3.10 requires."""
    with path.open("rb") as fp:
        return _offset(fp.read(144), path)


def _offset(head: bytes, path: Path) -> int:
    """`dataset_offset` from the file's first bytes (*head*, 144 or more)."""
    if len(head) >= 144 and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
        (length,) = struct.unpack("<I", head[140:144])
        return 144 + int(length)
    return int(split_dataset(path)[1])


async def stored_dataset(path: Path, offset: int) -> AsyncIterator[bytes]:
    """The bytes of *path* from *offset* on, read in a worker thread `_READ_SIZE` at a
    time."""
    with path.open("rb") as fp:
        fp.seek(offset)
        while chunk := await anyio.to_thread.run_sync(fp.read, _READ_SIZE):
            yield chunk


def _prepare(
    instance: StoredInstance,
    accepted: list[PresentationContext],
    *,
    transcode: bool,
    peer: str,
) -> tuple[str, bytes | AsyncIterator[bytes]]:
    """In a worker thread: the transfer syntax to send *instance* in and its data set, as
    stored (whole when it is small, else in pieces as it is sent) or re-encoded."""
    payload = outgoing(instance, accepted, transcode=transcode, peer=peer)
    if isinstance(payload, Path):
        with payload.open("rb") as fp:  # one open and, for a small file, one read
            if os.fstat(fp.fileno()).st_size <= _READ_SIZE:
                whole = fp.read()
                return instance.transfer_syntax, whole[_offset(whole, payload) :]
            offset = _offset(fp.read(144), payload)
        return instance.transfer_syntax, stored_dataset(payload, offset)
    syntax = UID(str(payload.file_meta.TransferSyntaxUID))
    encoded = encode(payload, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise PeerError("transcode", f"{instance.path.name}: cannot encode as {named(syntax)}",
                        permanent=True)  # fmt: skip
    return str(syntax), encoded


async def store_instance(
    assoc: Association,
    instance: StoredInstance,
    *,
    transcode: bool,
    peer: str,
    dimse_timeout: float | None,
    move_originator: tuple[str, int] | None = None,
) -> int:
    """C-STORE *instance* on *assoc* (PS3.4 B.2, PS3.7 9.1.1); the status the peer answered.

    Raises
    ------
    PeerError
        ``no_context`` / ``transcode`` (`gateway.scu.syntaxes.outgoing`: nothing sent);
        ``aborted`` when the association ended, or no response came within *dimse_timeout*
        seconds (the association is then aborted).
    """
    accepted = list(assoc.contexts.values())
    syntax, data = await anyio.to_thread.run_sync(
        functools.partial(_prepare, instance, accepted, transcode=transcode, peer=peer)
    )
    context_id = next(
        cx.context_id for cx in accepted
        if cx.abstract_syntax == instance.sop_class_uid and cx.transfer_syntax[0] == syntax
        and cx.as_scu
    )  # fmt: skip
    message_id = assoc.next_message_id()
    command = c_store_rq(message_id, instance.sop_class_uid, instance.sop_instance_uid,
                         move_originator=move_originator)  # fmt: skip
    try:
        with assoc.awaiting(message_id) as responses:
            await assoc.send_encoded(context_id, command, data)
            answer = await responses.next(dimse_timeout)
    except Aborted as exc:
        raise no_answer(peer, "C-STORE", exc) from None
    return int(answer.command.Status)
