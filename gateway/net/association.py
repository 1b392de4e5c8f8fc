"""One DICOM association over an asyncio stream: the Upper Layer of PS3.8 and DIMSE framing.

`Association.accept` (acceptor) and `Association.request` (requestor) negotiate an
association and return it established (Sta6). One reader task per association reads PDUs
(`gateway.net.pdu.read_pdu`, bounded), feeds each to the protocol machine
(`gateway.net.fsm`), assembles DIMSE messages from P-DATA-TF fragments (PS3.7 section 6.3.1,
PS3.8 Annex E) and queues them for `receive()`; `send()` fragments a message into PDUs no
longer than the peer's maximum. A data set's fragments go, as they arrive, to the
`DataSink` the association's user gives for that message (a C-STORE's spool file), or are
kept in memory for small messages (queries, responses).

Timers (`Timeouts`): ARTIM (`acse` seconds) bounds the wait for an A-ASSOCIATE-RQ after a
connection is accepted and for the close after a reject, a release response or an A-ABORT;
`acse` also bounds the wait for A-ASSOCIATE-AC/RJ and for A-RELEASE-RP; `idle` closes (A-ABORT)
an established association the peer sent nothing on for that long, and bounds how long a
write may wait for a peer that does not read.

How it ends, for the user: `receive()` raises `Released` once the peer asked to release and
the release response was sent (after the user's `send()`s in flight: P-DATA is still allowed
in Sta8), or `Aborted` (an A-ABORT from the peer, an A-P-ABORT: invalid PDU, timeout, the
connection lost). Every path closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu
from pynetdicom.pdu import A_ASSOCIATE_RJ as RjPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as RqPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_as_requestor,
    negotiate_unrestricted,
)

from gateway.errors import GatewayError
from gateway.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.net import pdu as P
from gateway.net.dimse import Command, decode_command
from gateway.net.fsm import Event, ProtocolMachine, State

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "Aborted",
    "Acceptance",
    "Association",
    "DataSink",
    "Message",
    "Rejected",
    "Rejection",
    "Released",
    "Responses",
    "Timeouts",
    "encode_command",
]

log = structlog.get_logger(__name__)

APPLICATION_CONTEXT_NAME: Final = UID("1.2.840.10008.3.1.1.1")  # PS3.7 Annex A.2.1
_NO_DATA_SET: Final = 0x0101  # (0000,0800) CommandDataSetType: no data set (PS3.7 E.1)
_UNLIMITED_FRAGMENT: Final = 1 << 20  # data per PDU when the peer sets no maximum


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: `acse` (ARTIM, and the wait for an association or release answer), `idle`
    (an established association the peer is silent on, and a peer that does not read)."""

    acse: float = 30.0
    idle: float | None = 60.0


class Aborted(GatewayError):
    """The association ended by an A-ABORT (`source` 0 the peer's user, 2 a provider) or an
    A-P-ABORT (the connection lost, an invalid PDU, a timeout: `source` None)."""

    def __init__(self, reason: str, source: int | None = None, diagnostic: int = 0) -> None:
        super().__init__(reason)
        self.source = source
        self.diagnostic = diagnostic


class Released(GatewayError):
    """The association was released (at the peer's request, or by `release()`)."""


class Rejected(GatewayError):
    """The acceptor answered A-ASSOCIATE-RJ: `result` (1 permanent, 2 transient), `source`
    and `reason` as in PS3.8 Table 9-21."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"association rejected (result {result}, source {source}, "
                         f"reason {reason})")  # fmt: skip
        self.result = result
        self.source = source
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rejection:
    """An acceptor's answer refusing an A-ASSOCIATE-RQ (PS3.8 Table 9-21)."""

    result: int  # 1 rejected-permanent, 2 rejected-transient
    source: int  # 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)
    reason: int  # e.g. source 1: 3 calling AE title, 7 called AE title not recognised


@dataclass(frozen=True, slots=True)
class Acceptance:
    """An acceptor's answer taking an A-ASSOCIATE-RQ: the contexts it supports (and SCP/SCU
    roles it grants per abstract syntax: (SCU, SCP))."""

    supported: list[PresentationContext]
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    # Any storage SOP class proposed is accepted, private or unknown ones included, with the
    # transfer syntaxes supported for storage (pynetdicom's `negotiate_unrestricted`).
    unrestricted: bool = False


class DataSink(Protocol):
    """Where a message's data set fragments go as they arrive."""

    def write(self, data: memoryview) -> object: ...

    def close(self) -> None:
        """The last fragment arrived."""

    def discard(self) -> None:
        """The association ended before the last fragment."""


@dataclass(slots=True)
class Message:
    """A received DIMSE message: the presentation context, the command set, and the data set
    (its encoded bytes; empty when it had none or when a `DataSink` took it)."""

    context_id: int
    command: Command
    data: bytes = b""
    sink: DataSink | None = None

    @property
    def has_data(self) -> bool:
        return int(self.command.get("CommandDataSetType", _NO_DATA_SET)) != _NO_DATA_SET


@dataclass(slots=True)
class _Assembly:
    command: bytearray = field(default_factory=bytearray)
    message: Message | None = None
    data: bytearray | None = None


_END: Final = object()  # queued once the association has ended


class Responses:
    """The responses to one request of this side (`Association.awaiting`)."""

    def __init__(self, assoc: Association, queue: asyncio.Queue[Any]) -> None:
        self._assoc = assoc
        self._queue = queue

    async def next(self, timeout: float | None) -> Message:
        """The next response. Raises `Aborted` when the association ends first, and aborts
        it (A-ABORT) when none comes within *timeout* seconds (the DIMSE timeout)."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            item = None
        try:
            if item is None:
                async with asyncio.timeout(timeout):
                    item = await self._queue.get()
        except TimeoutError:
            await self._assoc.abort()
            raise Aborted(f"timeout: no response within {timeout:g} s") from None
        if item is _END:
            self._queue.put_nowait(_END)
            ended = self._assoc._ended
            raise ended if isinstance(ended, Aborted) else Aborted(str(ended))
        assert isinstance(item, Message)
        return item


class Association:
    """An established association; see the module docstring."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        machine: ProtocolMachine,
        timeouts: Timeouts,
        max_pdu: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.machine = machine
        self.timeouts = timeouts
        self.max_pdu = max_pdu  # what this side receives: the longest P-DATA-TF body
        self.peer_max_pdu = 0  # what the peer receives (0: no limit)
        self.calling_ae = ""
        self.called_ae = ""
        self.proposal: A_ASSOCIATE | None = None  # the A-ASSOCIATE-RQ as a primitive
        self._proposed_items = b""  # its variable items, as received
        self.contexts: dict[int, PresentationContext] = {}  # accepted, by ID
        self._syntaxes: dict[int, UID] = {}  # their transfer syntaxes, as asked for
        self.sinks: Callable[[Message], DataSink | None] = lambda _: None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._assembly: dict[int, _Assembly] = {}
        self._write_lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None
        self._read_deadline: float | None = None  # loop time the awaited PDU is due by
        self._read_expired = False  # the watchdog cancelled the read
        self._watchdog: asyncio.TimerHandle | None = None
        self._ended: BaseException | None = None
        self._release_answered = asyncio.Event()
        self._sending = 0  # send() calls in flight (a release response waits for them)
        self._sent = asyncio.Condition()
        self._message_id = 0
        # Responses awaited by this side's requests, by Message ID Being Responded To.
        self._awaited: dict[int, asyncio.Queue[Any]] = {}

    # -- establishment ------------------------------------------------------------------------

    @classmethod
    async def accept(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decide: Callable[[A_ASSOCIATE], Acceptance | Rejection],
        *,
        timeouts: Timeouts = Timeouts(),
        max_pdu: int = 16384,
    ) -> Association:
        """Serve an accepted connection up to an established association (Sta6).

        *decide* sees the A-ASSOCIATE-RQ as a pynetdicom primitive (AE titles, proposed
        contexts, user information) and accepts or rejects it. Raises `Rejected` (the
        rejection was sent), `Aborted` (ARTIM expired, the peer aborted or closed, an invalid
        or unexpected PDU: the connection is closed).
        """
        _nodelay(writer)  # small responses go at once (Nagle would hold them for an ACK)
        assoc = cls(reader, writer, ProtocolMachine("acceptor"), timeouts, max_pdu)
        assoc.machine.handle(Event.TRANSPORT_INDICATION)  # AE-5: ARTIM runs
        try:
            pdu = await asyncio.wait_for(P.read_pdu(reader, max_pdu), timeouts.acse)
        except TimeoutError:
            assoc.machine.handle(Event.ARTIM_EXPIRED)  # AA-2
            await assoc._close()
            raise Aborted("no A-ASSOCIATE-RQ within the ARTIM timeout") from None
        except (P.PduTooLong, asyncio.IncompleteReadError, OSError) as exc:
            await assoc._provider_abort(Event.INVALID_PDU, P.AbortReason.INVALID_PARAMETER)
            raise Aborted(f"before association: {exc}") from None
        primitive: A_ASSOCIATE | None = None
        if pdu.type == P.A_ASSOCIATE_RQ:
            assoc._proposed_items = _items_of(pdu)
            try:
                primitive = _PROPOSALS.decode(pdu, assoc._proposed_items)
            except Exception:
                primitive = None
        action = assoc.machine.handle(pdu.event, acceptable=primitive is not None)
        if action.name != "AE-6":  # AA-1 / AA-2 / AA-8: not an association request
            await assoc._after_abort_sent(action.name, "an unexpected PDU before association")
            raise Aborted(f"PDU type 0x{pdu.type:02X} before A-ASSOCIATE-RQ", 2)
        if primitive is None:  # not acceptable (Sta13): rejected by the provider
            await assoc._send_rejection(Rejection(1, 2, 2), sent_by_machine=True)
            raise Rejected(1, 2, 2)
        assoc.proposal = primitive
        assoc.calling_ae = str(primitive.calling_ae_title).strip()
        assoc.called_ae = str(primitive.called_ae_title).strip()
        decision = decide(primitive)
        if isinstance(decision, Rejection):
            assoc.machine.handle(Event.A_ASSOCIATE_REJECT)  # AE-8
            await assoc._send_rejection(decision, sent_by_machine=True)
            raise Rejected(decision.result, decision.source, decision.reason)
        await assoc._send_acceptance(primitive, decision)
        assoc._start_reader()
        return assoc

    def _user_information(self, request: A_ASSOCIATE) -> list[Any]:
        items: dict[type, Any] = {type(item): item for item in request.user_information}
        peer_max = items.get(MaximumLengthNotification)
        self.peer_max_pdu = int(peer_max.maximum_length_received or 0) if peer_max else 0
        return list(request.user_information)

    async def _send_acceptance(self, request: A_ASSOCIATE, decision: Acceptance) -> None:
        self._user_information(request)
        negotiated = _PROPOSALS.negotiated(self._proposed_items, decision, self.max_pdu)
        if negotiated is None:
            negotiated = self._negotiate(request, decision)
            _PROPOSALS.keep(self._proposed_items, negotiated)
        self.contexts = {c.context_id: c for c in negotiated.results if c.result == 0}
        self.machine.handle(Event.A_ASSOCIATE_ACCEPT)  # AE-7
        await self._write(negotiated.answer_to(request))

    def _negotiate(self, request: A_ASSOCIATE, decision: Acceptance) -> _Negotiated:
        roles = {
            str(item.sop_class_uid): (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        supported = list(decision.supported)
        for index, context in enumerate(supported):
            granted = decision.roles.get(str(context.abstract_syntax))
            if granted is not None:  # on a copy: the supported contexts are shared
                supported[index] = context = copy.copy(context)
                context.scu_role, context.scp_role = granted
        negotiate = negotiate_unrestricted if decision.unrestricted else negotiate_as_acceptor
        results, role_items = negotiate(
            request.presentation_context_definition_list,
            supported,
            {UID(k): v for k, v in roles.items()} if roles else None,
        )
        answer = A_ASSOCIATE()
        answer.application_context_name = APPLICATION_CONTEXT_NAME
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = request.called_ae_title
        answer.result = 0x00
        answer.result_source = 0x01
        answer.presentation_context_definition_results_list = results
        answer.user_information = _identity(self.max_pdu) + list(role_items or [])
        return _Negotiated(decision.supported, decision.unrestricted, dict(decision.roles),
                           self.max_pdu, results, AcPdu(answer).encode())  # fmt: skip

    async def _send_rejection(self, rejection: Rejection, *, sent_by_machine: bool) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = rejection.result
        primitive.result_source = rejection.source
        primitive.diagnostic = rejection.reason
        with contextlib.suppress(Aborted):
            await self._write(RjPdu(primitive).encode())
        await self._await_close()  # Sta13: ARTIM bounds the wait for the peer's close

    @classmethod
    async def request(
        cls,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        contexts: list[PresentationContext],
        roles: dict[str, tuple[bool, bool]] | None = None,
        timeouts: Timeouts = Timeouts(),
        max_pdu: int = 16384,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float | None = None,
    ) -> Association:
        """Connect and negotiate as requestor; return the established association.

        Raises `Rejected`, `Aborted`, or OSError / TimeoutError when the connection fails.
        """
        machine = ProtocolMachine("requestor")
        machine.handle(Event.A_ASSOCIATE_REQUEST)  # AE-1
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context),
            connect_timeout or timeouts.acse,
        )
        _nodelay(writer)
        assoc = cls(reader, writer, machine, timeouts, max_pdu)
        assoc.calling_ae, assoc.called_ae = calling_ae, called_ae
        for number, context in enumerate(contexts):
            context.context_id = 2 * number + 1
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = calling_ae
        primitive.called_ae_title = called_ae
        primitive.presentation_context_definition_list = contexts
        items = _identity(max_pdu)
        for uid, (scu, scp) in (roles or {}).items():
            item = SCP_SCU_RoleSelectionNegotiation()
            item.sop_class_uid = UID(uid)
            item.scu_role, item.scp_role = scu, scp
            items.append(item)
        primitive.user_information = items
        assoc.proposal = primitive
        machine.handle(Event.TRANSPORT_CONNECTED)  # AE-2
        await assoc._write(RqPdu(primitive).encode())
        try:
            pdu = await asyncio.wait_for(P.read_pdu(reader, max_pdu), timeouts.acse)
        except (TimeoutError, P.PduTooLong, asyncio.IncompleteReadError, OSError) as exc:
            await assoc._provider_abort(Event.INVALID_PDU, P.AbortReason.NOT_SPECIFIED)
            raise Aborted(f"no answer to A-ASSOCIATE-RQ: {exc or type(exc).__name__}") from None
        action = machine.handle(pdu.event)
        if action.name == "AE-4":  # rejected
            rj = RjPdu()
            rj.decode(pdu.encoded())
            await assoc._close()
            raise Rejected(int(rj.result), int(rj.source), int(rj.reason_diagnostic))
        if action.name == "AA-3":
            await assoc._close()
            raise Aborted("the acceptor aborted the association request", *_abort_fields(pdu))
        if action.name != "AE-3":
            await assoc._after_abort_sent(action.name, "an unexpected answer")
            raise Aborted(f"unexpected PDU type 0x{pdu.type:02X} in Sta5", 2)
        ac = AcPdu()
        ac.decode(pdu.encoded())
        answer = ac.to_primitive()
        assoc._user_information(answer)
        results = negotiate_as_requestor(
            contexts,
            answer.presentation_context_definition_results_list,
            {
                UID(item.sop_class_uid): (item.scu_role, item.scp_role)
                for item in answer.user_information
                if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
            },
        )
        assoc.contexts = {c.context_id: c for c in results if c.result == 0}
        assoc._start_reader()
        return assoc

    # -- data transfer ------------------------------------------------------------------------

    def transfer_syntax(self, context_id: int) -> UID:
        """The transfer syntax accepted for presentation context *context_id*."""
        syntax = self._syntaxes.get(context_id)
        if syntax is None:
            syntax = UID(str(self.contexts[context_id].transfer_syntax[0]))
            self._syntaxes[context_id] = syntax
        return syntax

    def encode_dataset(self, context_id: int, dataset: Dataset) -> bytes:
        """*dataset* encoded in *context_id*'s transfer syntax (an identifier, an answer)."""
        syntax = self.transfer_syntax(context_id)
        data = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        if data is None:
            raise ValueError(f"cannot encode the data set in {syntax.name}")
        return bytes(data)

    def decode_dataset(self, message: Message) -> Dataset:
        """*message*'s data set (kept in memory) decoded in its context's transfer syntax.
        Raises what pydicom raises for bytes that are not a data set in it."""
        syntax = self.transfer_syntax(message.context_id)
        decoded: Dataset = decode(io.BytesIO(message.data), syntax.is_implicit_VR,
                                  syntax.is_little_endian, syntax.is_deflated)  # fmt: skip
        return decoded

    async def receive(self) -> Message:
        """The next complete message (its data set complete too, or handed to its sink as
        it came). Raises `Released` or `Aborted` once the association has ended."""
        item = await self._inbox.get()
        if item is _END:
            self._inbox.put_nowait(_END)  # every later receive() ends too
            assert self._ended is not None
            raise self._ended
        assert isinstance(item, Message)
        return item

    async def send(
        self, context_id: int, command: Dataset, data: bytes | memoryview | None = None
    ) -> None:
        """Send a DIMSE message on *context_id*: the command set (encoded Implicit VR Little
        Endian, PS3.7 6.3.1) and its data set's encoded bytes, if any, fragmented to the
        peer's maximum PDU length. Raises `Aborted` when the association is gone."""
        command.CommandDataSetType = _NO_DATA_SET if data is None else 0x0001
        await self.send_encoded(context_id, encode_command(command), data)

    async def send_encoded(
        self,
        context_id: int,
        command: bytes,
        data: bytes | memoryview | AsyncIterator[bytes] | None = None,
    ) -> None:
        """`send` with the command set already encoded (its CommandDataSetType must say
        whether *data* follows): for messages built without a pydicom Dataset. *data* may come
        in chunks (a stored file read piece by piece): each is fragmented as it comes."""
        self._sending += 1
        try:
            await self._send_fragments(context_id, True, memoryview(command), last=True)
            if isinstance(data, (bytes, bytearray, memoryview)):
                await self._send_fragments(context_id, False, memoryview(data), last=True)
            elif data is not None:
                await self._send_chunks(context_id, data)
        finally:
            self._sending -= 1
            async with self._sent:
                self._sent.notify_all()

    async def _send_chunks(self, context_id: int, chunks: AsyncIterator[bytes]) -> None:
        held: bytes | None = None  # one chunk behind, to know which is the last
        async for chunk in chunks:
            if held is not None:
                await self._send_fragments(context_id, False, memoryview(held), last=False)
            held = chunk
        await self._send_fragments(context_id, False, memoryview(held or b""), last=True)

    async def _send_fragments(
        self, context_id: int, command: bool, data: memoryview, *, last: bool
    ) -> None:
        size = (self.peer_max_pdu - 6) if self.peer_max_pdu else _UNLIMITED_FRAGMENT
        size = max(size, 1)
        offset = 0
        while True:
            chunk = data[offset : offset + size]
            offset += len(chunk)
            final = offset >= len(data)
            if self.machine.state not in (State.STA6, State.STA8):
                raise self._ended or Aborted("the association is no longer established")
            self.machine.handle(Event.P_DATA_REQUEST)  # DT-1 / AR-7
            await self._write(P.p_data_tf(context_id, command, final and last, chunk))
            if final:
                return

    def next_message_id(self) -> int:
        """A Message ID for this side's next request (1-65535, then round again)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    @contextlib.contextmanager
    def awaiting(self, message_id: int) -> Iterator[Responses]:
        """Route the responses to *message_id* to the `Responses` yielded, from before its
        request is sent until the block ends (the responses then go nowhere)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if self._ended is not None:
            queue.put_nowait(_END)
        self._awaited[message_id] = queue
        try:
            yield Responses(self, queue)
        finally:
            self._awaited.pop(message_id, None)

    # -- ending -------------------------------------------------------------------------------

    async def release(self) -> None:
        """Release the association (A-RELEASE-RQ, then wait for A-RELEASE-RP within the ACSE
        timeout; a release collision is answered as PS3.8 9.2.3 says). Raises `Aborted` if it
        does not complete."""
        if self.machine.state != State.STA6:
            raise self._ended or Aborted("the association is no longer established")
        self.machine.handle(Event.A_RELEASE_REQUEST)  # AR-1
        await self._write(P.release_rq())
        try:
            await asyncio.wait_for(self._release_answered.wait(), self.timeouts.acse)
        except TimeoutError:
            await self.abort()
            raise Aborted("no A-RELEASE-RP within the ACSE timeout") from None
        if self._reader_task is not None:
            with contextlib.suppress(BaseException):
                await self._reader_task

    async def abort(self) -> None:
        """A-ABORT (service user) and close."""
        if self.machine.state in (State.STA1, State.STA13):
            await self._close()
            return
        self.machine.handle(Event.A_ABORT_REQUEST)  # AA-1 (AA-2 in Sta4)
        with contextlib.suppress(Aborted):
            await self._write(P.abort_pdu(0))
        self._end(Aborted("aborted by this side", 0))
        await self._close()

    def abort_nowait(self) -> None:
        """A-ABORT (service user) and close, from code that cannot wait (a stop request): the
        A-ABORT PDU is written without waiting for the peer to take it."""
        if self.machine.state not in (State.STA1, State.STA13):
            self.machine.handle(Event.A_ABORT_REQUEST)  # AA-1
            with contextlib.suppress(Exception):
                self._writer.write(P.abort_pdu(0))
        self._end(Aborted("aborted by this side", 0))
        self.machine.state = State.STA1
        if not self._writer.is_closing():
            self._writer.close()
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()

    async def wait_closed(self) -> None:
        """Until the connection is closed (after a release response, the peer's close or
        the ARTIM timeout)."""
        if self._reader_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._reader_task)

    @property
    def is_established(self) -> bool:
        return self.machine.state == State.STA6

    # -- the reader ---------------------------------------------------------------------------

    def _start_reader(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.machine.state not in (State.STA1,):
                self._expect_pdu(loop, self._read_timeout())
                try:
                    try:
                        pdu = await P.read_pdu(self._reader, self.max_pdu)
                    finally:
                        self._read_deadline = None
                except asyncio.CancelledError:
                    task = self._reader_task
                    if not self._read_expired or task is None or task.cancelling() > 1:
                        raise
                    task.uncancel()  # the watchdog's, not the user's: the read timed out
                    await self._timed_out()
                    return
                except P.PduTooLong as exc:  # its body is unread: nothing after it can be
                    self._end(Aborted(str(exc), 2, P.AbortReason.INVALID_PARAMETER))
                    await self._provider_abort(Event.INVALID_PDU, P.AbortReason.INVALID_PARAMETER)
                    return
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    self._transport_closed()
                    return
                await self._on_pdu(pdu)
        except asyncio.CancelledError:
            self._end(Aborted("the association was closed"))
            raise
        finally:
            self._stop_watchdog()
            await self._close()

    def _expect_pdu(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        """The next PDU must arrive within *timeout* seconds (None: no limit). One timer per
        association, the watchdog, enforces it: it is moved only when the deadline comes
        earlier, and when it fires before the deadline it sleeps until it (a timer per read, or
        `asyncio.wait_for`'s task per read, cost ~10 % of the event loop's time)."""
        if timeout is None:
            self._read_deadline = None
            return
        deadline = loop.time() + timeout
        self._read_deadline = deadline
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > deadline:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._watch, loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        deadline, task = self._read_deadline, self._reader_task
        if deadline is None or task is None or task.done():
            return
        if loop.time() < deadline:
            self._watchdog = loop.call_at(deadline, self._watch, loop)
            return
        self._read_expired = True
        task.cancel()

    def _stop_watchdog(self) -> None:
        self._read_deadline = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _read_timeout(self) -> float | None:
        if self.machine.state == State.STA6:
            return self.timeouts.idle
        return self.timeouts.acse  # ARTIM (Sta13), or an awaited release answer

    async def _timed_out(self) -> None:
        if self.machine.state == State.STA13:
            self.machine.handle(Event.ARTIM_EXPIRED)  # AA-2
            return
        await self._user_abort_on_timeout()

    async def _user_abort_on_timeout(self) -> None:
        state = self.machine.state
        self.machine.handle(Event.A_ABORT_REQUEST)  # AA-1
        with contextlib.suppress(Aborted):
            await self._write(P.abort_pdu(2, P.AbortReason.NOT_SPECIFIED))
        what = "idle" if state == State.STA6 else f"no answer in Sta{state.value}"
        self._end(Aborted(f"timeout: {what}"))

    def _transport_closed(self) -> None:
        state = self.machine.state
        if state == State.STA1:  # this side closed it (an abort) while the read was under way
            return
        self.machine.handle(Event.TRANSPORT_CLOSED)  # AA-4 / AR-5 / AA-5
        if state == State.STA13:
            return
        self._end(Aborted("the peer closed the connection"))

    async def _on_pdu(self, pdu: P.Pdu) -> None:
        event = pdu.event
        action = self.machine.handle(event)
        name = action.name
        if name in ("DT-2", "AR-6"):  # P-DATA indication
            try:
                self._take_p_data(pdu.body)
            except ValueError as exc:
                await self._provider_abort_now(P.AbortReason.INVALID_PARAMETER, str(exc))
        elif name == "AR-2":  # the peer asks to release: answer once our sends are done
            await self._answer_release()
        elif name in ("AR-3", "AR-10"):  # our release answered (AR-10: collision, acceptor)
            self._release_answered.set()
            if name == "AR-10":
                self.machine.handle(Event.A_RELEASE_RESPONSE)  # AR-4
                await self._write(P.release_rp())
            self._end(Released("released"))
        elif name == "AR-8":  # release collision
            if self.machine.role == "requestor":  # Sta9: answer, then await the peer's RP
                self.machine.handle(Event.A_RELEASE_RESPONSE)  # AR-9
                await self._write(P.release_rp())
        elif name == "AA-3":  # A-ABORT from the peer
            self._end(Aborted("aborted by the peer", *_abort_fields(pdu)))
        elif name == "AA-8":  # invalid or unexpected: A-ABORT, A-P-ABORT, ARTIM
            with contextlib.suppress(Aborted):
                await self._write(P.abort_pdu(2, P.AbortReason.UNEXPECTED_PDU))
            self._end(Aborted(f"unexpected PDU type 0x{pdu.type:02X}", 2,
                              P.AbortReason.UNEXPECTED_PDU))  # fmt: skip
        elif name == "AA-7":
            with contextlib.suppress(Aborted):
                await self._write(P.abort_pdu(2, P.AbortReason.UNEXPECTED_PDU))
        # AA-6 (ignore), AA-2 (close): nothing more to do here

    async def _answer_release(self) -> None:
        async with self._sent:
            await self._sent.wait_for(lambda: self._sending == 0)
        self.machine.handle(Event.A_RELEASE_RESPONSE)  # AR-4: ARTIM runs
        await self._write(P.release_rp())
        self._end(Released("released by the peer"))

    async def _provider_abort_now(self, reason: int, why: str) -> None:
        """Abort for a malformed P-DATA-TF in Sta6/7 (as Evt19: AA-8)."""
        self.machine.handle(Event.INVALID_PDU)  # AA-8
        with contextlib.suppress(Aborted):
            await self._write(P.abort_pdu(2, reason))
        self._end(Aborted(why, 2, reason))

    def _take_p_data(self, body: bytes) -> None:
        for pdv in P.pdvs(body):
            if pdv.context_id not in self.contexts:
                raise ValueError(f"a fragment on presentation context {pdv.context_id}, "
                                 "which was not accepted")  # fmt: skip
            assembly = self._assembly.setdefault(pdv.context_id, _Assembly())
            if pdv.command:
                if assembly.message is not None:
                    raise ValueError("a command fragment while a data set was expected")
                assembly.command += pdv.data
                if pdv.last:
                    command = decode_command(assembly.command)
                    assembly.command.clear()
                    message = Message(pdv.context_id, command)
                    if not message.has_data:
                        self._deliver(message)
                        continue
                    message.sink = self.sinks(message)
                    assembly.message = message
                    assembly.data = None if message.sink is not None else bytearray()
            else:
                pending = assembly.message
                if pending is None:
                    raise ValueError("a data set fragment with no command before it")
                message = pending
                if message.sink is not None:
                    message.sink.write(pdv.data)
                else:
                    assert assembly.data is not None
                    assembly.data += pdv.data
                if pdv.last:
                    if message.sink is not None:
                        message.sink.close()
                    else:
                        assert assembly.data is not None
                        message.data = bytes(assembly.data)
                    assembly.message, assembly.data = None, None
                    self._deliver(message)

    def _deliver(self, message: Message) -> None:
        """A request (or C-CANCEL) to `receive()`; a response to the request awaiting it
        (`responses`); a response nothing awaits (after its request timed out) is dropped."""
        command = message.command
        if not int(command.CommandField) & 0x8000:
            self._inbox.put_nowait(message)
            return
        awaiting = self._awaited.get(int(command.get("MessageIDBeingRespondedTo", -1)))
        if awaiting is not None:
            awaiting.put_nowait(message)
            return
        log.info("dimse_response_unexpected", command=f"0x{int(command.CommandField):04X}",
                 message_id=command.get("MessageIDBeingRespondedTo"))  # fmt: skip

    # -- I/O ----------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        """Write and wait until the peer takes it, at most `idle` seconds: a peer that does not
        read, or a lost connection, ends the association (`Aborted`, the connection closed)."""
        async with self._write_lock:
            try:
                self._writer.write(data)
                if self._writer.transport.get_write_buffer_size():
                    async with asyncio.timeout(self.timeouts.idle):
                        await self._writer.drain()
                else:  # all taken: drain returns at once, or raises for a lost connection
                    await self._writer.drain()
            except TimeoutError:
                reason = f"timeout: the peer read nothing for {self.timeouts.idle:g} s"
            except (ConnectionError, OSError) as exc:
                reason = f"the connection was lost: {exc}"
            else:
                return
        self._end(Aborted(reason))
        await self._close()
        raise Aborted(reason)

    async def _provider_abort(self, event: Event, reason: int) -> None:
        action = self.machine.handle(event)
        if action.name in ("AA-1", "AA-7", "AA-8"):
            with contextlib.suppress(Aborted):
                await self._write(P.abort_pdu(2, reason))
        await self._close()

    async def _after_abort_sent(self, action: str, why: str) -> None:
        if action in ("AA-1", "AA-7", "AA-8"):
            with contextlib.suppress(Aborted):
                await self._write(P.abort_pdu(2, P.AbortReason.UNEXPECTED_PDU))
        await self._close()

    async def _await_close(self) -> None:
        """Sta13: wait for the peer to close, at most the ARTIM timeout, then close."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader.read(), self.timeouts.acse)
        await self._close()

    def _end(self, reason: BaseException) -> None:
        if self._ended is None:
            self._ended = reason
            self._release_answered.set()
            for assembly in self._assembly.values():
                if assembly.message is not None and assembly.message.sink is not None:
                    assembly.message.sink.discard()
            self._assembly.clear()
            self._inbox.put_nowait(_END)
            for awaiting in self._awaited.values():
                awaiting.put_nowait(_END)

    async def _close(self) -> None:
        self._end(Aborted("the connection was closed"))
        if self.machine.state != State.STA1:
            self.machine.state = State.STA1
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()


# A-ASSOCIATE-RQ / -AC fixed fields (PS3.8 Tables 9-11, 9-17), as offsets in the PDU: the
# protocol version, the Called and Calling AE Titles, the first variable item.
_VERSION_AT, _AE_TITLES_AT, _ITEMS_AT = 6, 10, 74


def _items_of(pdu: P.Pdu) -> bytes:
    return bytes(pdu.body[_ITEMS_AT - 6 :])


def _ae_field(title: str) -> bytes:
    """An AE title as the fixed 16-byte field of an A-ASSOCIATE PDU (padded with spaces)."""
    return title.encode("ascii").ljust(16, b" ")


@dataclass(slots=True)
class _Negotiated:
    """What an A-ASSOCIATE-RQ's proposal was answered with under one `Acceptance` and
    maximum PDU length: the presentation context results and the A-ASSOCIATE-AC."""

    supported: list[PresentationContext]
    unrestricted: bool
    roles: dict[str, tuple[bool, bool]]
    max_pdu: int
    results: list[PresentationContext]  # shared by the associations that reuse it: read only
    answer: bytes

    def answer_to(self, request: A_ASSOCIATE) -> bytes:
        """The A-ASSOCIATE-AC for *request*: its AE titles sent back (PS3.8 9.3.3.2)."""
        titles = _ae_field(str(request.called_ae_title)) + _ae_field(str(request.calling_ae_title))
        at = _AE_TITLES_AT
        return self.answer[:at] + titles + self.answer[at + 32 :]


@dataclass(slots=True)
class _Proposal:
    application_context_name: Any
    contexts: list[PresentationContext]  # shared: read only
    user_information: list[Any]  # shared: read only
    answers: list[_Negotiated] = field(default_factory=list)


class _Proposals:
    """The A-ASSOCIATE-RQ proposals (variable items: application context, presentation
    contexts, user information) met lately, decoded, and what they were answered with.

    A modality or an archive proposes the same contexts on every association; decoding 128 of
    them through pynetdicom's PDU classes, negotiating them and encoding the answer took ~14 ms
    (pydicom checks every UID it is given), measured on this project's machine, for each
    association of DCMTK's storescu. A proposal met again costs a dictionary lookup and the
    AE titles. At most `size` proposals (least recently used dropped), `_ANSWERS` answers
    each, and only proposals of at most `_LARGEST` bytes of items (storescu's is 9.6 KB, kept
    as ~77 KiB of objects): a peer sending large proposals, each different, costs no memory
    here."""

    _ANSWERS = 4
    _LARGEST = 64 * 1024

    def __init__(self, size: int) -> None:
        self._size = size
        self._kept: dict[bytes, _Proposal] = {}

    def decode(self, pdu: P.Pdu, items: bytes) -> A_ASSOCIATE | None:
        """*pdu* (an A-ASSOCIATE-RQ, its variable *items* as `_items_of` gives them) as a
        primitive, or None when its protocol version is not 1 (PS3.8 9.3.2). Raises for what
        pynetdicom cannot decode."""
        proposal = self._kept.pop(items, None)
        if proposal is None:
            request = RqPdu()
            request.decode(pdu.encoded())
            if request.protocol_version != 1:
                return None
            primitive = request.to_primitive()
            if len(items) <= self._LARGEST:
                proposal = _Proposal(
                    primitive.application_context_name,
                    list(primitive.presentation_context_definition_list),
                    list(primitive.user_information),
                )
                self._remember(items, proposal)
            return primitive
        self._remember(items, proposal)
        data = pdu.encoded()
        if struct.unpack_from(">H", data, _VERSION_AT)[0] != 1:
            return None
        fields = RqPdu()  # pynetdicom's checks and decoding of the AE titles
        at = _AE_TITLES_AT
        fields.called_ae_title = data[at : at + 16]
        fields.calling_ae_title = data[at + 16 : at + 32]
        primitive = A_ASSOCIATE()
        primitive.calling_ae_title = fields.calling_ae_title
        primitive.called_ae_title = fields.called_ae_title
        primitive.application_context_name = proposal.application_context_name
        primitive.presentation_context_definition_list = list(proposal.contexts)
        primitive.user_information = list(proposal.user_information)
        return primitive

    def _remember(self, items: bytes, proposal: _Proposal) -> None:
        self._kept[items] = proposal  # the most recent last
        while len(self._kept) > self._size:
            del self._kept[next(iter(self._kept))]

    def negotiated(self, items: bytes, decision: Acceptance, max_pdu: int) -> _Negotiated | None:
        """The answer already negotiated for *items* under *decision* (its supported contexts
        the same list) and *max_pdu*, or None."""
        proposal = self._kept.get(items)
        if proposal is None:
            return None
        for answer in proposal.answers:
            if (answer.supported is decision.supported and answer.max_pdu == max_pdu
                    and answer.unrestricted == decision.unrestricted
                    and answer.roles == decision.roles):  # fmt: skip
                return answer
        return None

    def keep(self, items: bytes, answer: _Negotiated) -> None:
        proposal = self._kept.get(items)
        if proposal is not None:
            proposal.answers = [*proposal.answers[-(self._ANSWERS - 1) :], answer]


_PROPOSALS = _Proposals(16)


def _identity(max_pdu: int) -> list[Any]:
    """The user information every A-ASSOCIATE this side sends carries (PS3.7 Annex D.3.3)."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    name = ImplementationVersionNameNotification()
    name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [length, uid, name]


def _abort_fields(pdu: P.Pdu) -> tuple[int, int]:
    if len(pdu.body) == 4:
        return pdu.body[2], pdu.body[3]
    return 2, 0


def encode_command(command: Dataset) -> bytes:
    """A command set's bytes: Implicit VR Little Endian with its (0000,0000) Command Group
    Length (PS3.7 6.3.1, E.1); the set gets a CommandGroupLength element."""
    command.CommandGroupLength = 0
    encoded = encode(command, True, True)
    assert encoded is not None
    # The group length counts the bytes after its own element (8 + 4 bytes).
    return bytes(encoded[:8]) + struct.pack("<I", len(encoded) - 12) + bytes(encoded[12:])


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
