"""The asyncio association against real peers: pynetdicom AEs, and a scripted raw-socket peer
that drives the Upper Layer through states a well-behaved peer never shows (PS3.8 9.2)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as RqPdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from gateway.net import pdu as P
from gateway.net.association import (
    Aborted,
    Acceptance,
    Association,
    Message,
    Rejected,
    Rejection,
    Released,
    Timeouts,
)
from gateway.net.fsm import State
from tests.conftest import HOST, TEST_FILES, free_port

pytestmark = pytest.mark.asyncio

FAST = Timeouts(acse=0.5, idle=5.0)


def supported() -> list[Any]:
    return [
        build_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]


@dataclass
class Acceptor:
    """A server on a loopback port whose connections are served by `Association.accept`:
    it answers C-ECHO and C-STORE requests with success and keeps what it saw."""

    port: int
    timeouts: Timeouts = FAST
    max_pdu: int = 16384
    decide: Callable[[A_ASSOCIATE], Acceptance | Rejection] = lambda _: Acceptance(supported())
    outcomes: list[BaseException] = field(default_factory=list)  # how each association ended
    messages: list[Message] = field(default_factory=list)
    associations: list[Association] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assoc = await Association.accept(
                reader, writer, self.decide, timeouts=self.timeouts, max_pdu=self.max_pdu
            )
        except (Aborted, Rejected) as exc:
            self.outcomes.append(exc)
            self.ended.set()
            return
        self.associations.append(assoc)
        try:
            while True:
                message = await assoc.receive()
                self.messages.append(message)
                rsp = Dataset()
                request = message.command
                rsp.CommandField = int(request.CommandField) | 0x8000
                rsp.MessageIDBeingRespondedTo = request.MessageID
                rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
                if "AffectedSOPInstanceUID" in request:
                    rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
                rsp.Status = 0x0000
                await assoc.send(message.context_id, rsp)
        except (Released, Aborted) as exc:
            self.outcomes.append(exc)
            self.ended.set()


@pytest_asyncio.fixture
async def acceptor() -> AsyncIterator[Acceptor]:
    server_state = Acceptor(free_port())
    server = await asyncio.start_server(server_state.serve, HOST, server_state.port)
    yield server_state
    server.close()
    await server.wait_closed()


async def ended(acceptor: Acceptor, count: int = 1) -> list[BaseException]:
    async with asyncio.timeout(10):
        while len(acceptor.outcomes) < count:
            acceptor.ended.clear()
            await acceptor.ended.wait()
    return acceptor.outcomes


# -- pynetdicom as requestor ---------------------------------------------------------------------


async def test_pynetdicom_echoes_and_stores_through_the_acceptor(acceptor: Acceptor) -> None:
    import pydicom

    dataset = pydicom.dcmread(TEST_FILES / "CT_small.dcm")

    def client() -> tuple[int, int]:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(HOST, acceptor.port, ae_title="GATEWAY", max_pdu=4096)
        assert assoc.is_established
        echo = assoc.send_c_echo()
        store = assoc.send_c_store(dataset)
        assoc.release()
        return int(echo.Status), int(store.Status)

    assert await asyncio.to_thread(client) == (0, 0)
    (outcome,) = await ended(acceptor)
    assert isinstance(outcome, Released)
    echo, store = acceptor.messages
    assert (echo.command.CommandField, echo.has_data) == (0x0030, False)
    assert store.command.CommandField == 0x0001
    assert store.command.AffectedSOPInstanceUID == dataset.SOPInstanceUID
    # The data set arrived whole over many fragments (the acceptor's maximum was 16384, the
    # requestor's 4096: responses fragmented to it).
    assert len(store.data) > 4096
    (assoc,) = acceptor.associations
    assert assoc.calling_ae == "PYNETDICOM" and assoc.called_ae == "GATEWAY"
    assert assoc.peer_max_pdu == 4096
    await assoc.wait_closed()  # Sta13 until the requestor closes
    assert assoc.machine.state == State.STA1


async def test_a_rejection_reaches_pynetdicom_with_its_reason(acceptor: Acceptor) -> None:
    acceptor.decide = lambda _: Rejection(1, 1, 7)  # called AE title not recognised
    # ARTIM bounds how long the rejection waits for pynetdicom to close: a loaded machine may
    # keep pynetdicom's reader from the A-ASSOCIATE-RJ for longer than the usual 0.5 s.
    acceptor.timeouts = Timeouts(acse=5.0, idle=5.0)

    def client() -> tuple[bool, int | None]:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, acceptor.port, ae_title="NOBODY")
        return assoc.is_rejected, getattr(assoc.acceptor, "primitive", None) and int(
            assoc.acceptor.primitive.diagnostic
        )

    assert await asyncio.to_thread(client) == (True, 7)
    (outcome,) = await ended(acceptor)
    assert isinstance(outcome, Rejected) and outcome.reason == 7


# -- as requestor, against pynetdicom ----------------------------------------------------------


async def test_the_requestor_echoes_and_releases_against_pynetdicom() -> None:
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    port = free_port()
    seen: list[str] = []
    server = ae.start_server(
        (HOST, port), block=False,
        evt_handlers=[(evt.EVT_C_ECHO, lambda e: seen.append(e.assoc.requestor.ae_title) or 0)],
    )  # fmt: skip
    try:
        assoc = await Association.request(
            HOST, port, calling_ae="GATEWAY", called_ae="ECHOSCP",
            contexts=[build_context(Verification)], timeouts=FAST,
        )  # fmt: skip
        (context_id,) = assoc.contexts
        request = Dataset()
        request.CommandField = 0x0030
        request.MessageID = assoc.next_message_id()
        request.AffectedSOPClassUID = Verification
        with assoc.awaiting(request.MessageID) as responses:
            await assoc.send(context_id, request)
            response = await responses.next(5.0)
        assert (response.command.CommandField, response.command.Status) == (0x8030, 0)
        await assoc.release()
        assert assoc.machine.state == State.STA1
        assert seen == ["GATEWAY"]
    finally:
        server.shutdown()


async def test_the_requestor_learns_of_a_rejection() -> None:
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    port = free_port()
    server = ae.start_server((HOST, port), block=False)
    try:
        with pytest.raises(Rejected) as rejected:
            await Association.request(
                HOST, port, calling_ae="GATEWAY", called_ae="WRONG",
                contexts=[build_context(Verification)], timeouts=FAST,
            )  # fmt: skip
        assert (rejected.value.result, rejected.value.reason) == (1, 7)
    finally:
        server.shutdown()


# -- a scripted raw-socket peer ------------------------------------------------------------------


def association_rq(called: str = "GATEWAY", max_pdu: int = 16384, calling: str = "RAW") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    return bytes(RqPdu(primitive).encode())


class RawPeer:
    """A socket that writes bytes as scripted and reads PDUs back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._exactly(6)
        pdu_type, length = struct.unpack(">BxI", header)
        return pdu_type, self._exactly(length)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def associate(self) -> None:
        self.sock.sendall(association_rq())
        pdu_type, _ = self.read_pdu()
        assert pdu_type == P.A_ASSOCIATE_AC

    def close(self) -> None:
        self.sock.close()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def answer_to(port: int, request: bytes) -> tuple[int, bytes]:
    """The PDU (type, body) an acceptor on *port* answers *request* with, on a connection
    of its own, closed after."""

    def ask() -> tuple[int, bytes]:
        peer = RawPeer(port)
        try:
            peer.sock.sendall(request)
            return peer.read_pdu()
        finally:
            peer.close()

    return await in_thread(ask)


async def test_a_proposal_met_again_is_answered_as_the_first_time(acceptor: Acceptor) -> None:
    """The second association proposing the same items is answered from what the first
    negotiated: the same A-ASSOCIATE-AC as pynetdicom encodes it, its own AE titles sent back;
    a third with protocol version 2 is still rejected."""
    max_pdu = 12345 + free_port()  # items no other test proposed
    decision = Acceptance(supported())
    acceptor.decide = lambda _: decision

    async def associate(calling: str, version: int = 1) -> tuple[int, bytes]:
        request = bytearray(association_rq(max_pdu=max_pdu, calling=calling))
        struct.pack_into(">H", request, 6, version)
        return await answer_to(acceptor.port, bytes(request))

    first_type, first = await associate("FIRST")
    second_type, second = await associate("SECOND")
    assert (first_type, second_type) == (P.A_ASSOCIATE_AC, P.A_ASSOCIATE_AC)
    decoded = AcPdu()
    decoded.decode(struct.pack(">BxI", P.A_ASSOCIATE_AC, len(first)) + first)
    answer = decoded.to_primitive()
    answer.calling_ae_title = "SECOND"
    assert bytes(AcPdu(answer).encode())[6:] == second
    one, two = acceptor.associations[-2:]
    assert (one.calling_ae, two.calling_ae) == ("FIRST", "SECOND")
    assert one.contexts and one.contexts.keys() == two.contexts.keys()
    assert all(two.contexts[n] is c for n, c in one.contexts.items())  # negotiated once
    rejected_type, rejected = await associate("THIRD", version=2)
    assert rejected_type == P.A_ASSOCIATE_RJ
    assert rejected[1:4] == bytes([1, 2, 2])  # permanent, ACSE provider, protocol version


async def test_a_proposal_over_64_kib_is_negotiated_each_time(acceptor: Acceptor) -> None:
    """Large proposals are not kept: a peer sending them costs no memory of the acceptor's."""
    decision = Acceptance(supported())
    acceptor.decide = lambda _: decision
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAW"
    primitive.called_ae_title = "GATEWAY"
    contexts = [build_context(Verification)]
    for n in range(1, 127):  # unknown abstract syntaxes, 24 transfer syntaxes each: ~100 KB
        contexts.append(
            build_context(
                f"1.2.826.0.1.3680043.9.{n}", [f"1.2.826.0.1.3680043.9.{n}.{t}" for t in range(24)]
            )
        )
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    request = bytes(RqPdu(primitive).encode())
    assert len(request) > 64 * 1024

    assert (await answer_to(acceptor.port, request))[0] == P.A_ASSOCIATE_AC
    assert (await answer_to(acceptor.port, request))[0] == P.A_ASSOCIATE_AC
    one, two = acceptor.associations[-2:]
    assert list(one.contexts) == list(two.contexts) == [1]  # Verification only
    assert one.contexts[1] is not two.contexts[1]  # negotiated for each


async def test_artim_closes_a_connection_that_never_asks_to_associate(acceptor: Acceptor) -> None:
    peer = RawPeer(acceptor.port)
    try:
        assert await in_thread(peer.closed)  # Sta2, Evt18: AA-2 closes without a PDU
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Aborted) and "ARTIM" in str(outcome)
    finally:
        peer.close()


async def test_data_before_association_is_aborted(acceptor: Acceptor) -> None:
    peer = RawPeer(acceptor.port)
    try:
        peer.sock.sendall(P.p_data_tf(1, True, True, b"\x00" * 8))  # Sta2, Evt10: AA-1
        pdu_type, body = await in_thread(peer.read_pdu)
        assert pdu_type == P.A_ABORT and body[2] == 2  # source: the service provider
        assert await in_thread(peer.closed)
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Aborted)
    finally:
        peer.close()


async def test_a_pdu_longer_than_negotiated_is_refused_unread(acceptor: Acceptor) -> None:
    peer = RawPeer(acceptor.port)
    try:
        await in_thread(peer.associate)
        # Announce 1 MB more than the acceptor's 16384 maximum; send only the header.
        peer.sock.sendall(struct.pack(">BxI", P.P_DATA_TF, acceptor.max_pdu + (1 << 20)))
        pdu_type, body = await in_thread(peer.read_pdu)
        assert (pdu_type, body[2], body[3]) == (P.A_ABORT, 2, P.AbortReason.INVALID_PARAMETER)
        assert await in_thread(peer.closed)
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Aborted) and "exceeds 16384" in str(outcome)
    finally:
        peer.close()


async def test_a_peer_that_stops_mid_pdu_ends_the_association(acceptor: Acceptor) -> None:
    peer = RawPeer(acceptor.port)
    try:
        await in_thread(peer.associate)
        pdu = P.p_data_tf(1, True, True, b"\x00" * 64)
        peer.sock.sendall(pdu[:20])  # then nothing more: the connection is closed
        await asyncio.sleep(0.1)
        peer.close()
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Aborted) and "closed" in str(outcome)
        assert acceptor.associations[0].machine.state == State.STA1
    finally:
        peer.close()


async def test_a_fragment_on_a_context_never_accepted_aborts(acceptor: Acceptor) -> None:
    peer = RawPeer(acceptor.port)
    try:
        await in_thread(peer.associate)
        peer.sock.sendall(P.p_data_tf(99, True, True, b"\x00" * 8))
        pdu_type, body = await in_thread(peer.read_pdu)
        assert (pdu_type, body[3]) == (P.A_ABORT, P.AbortReason.INVALID_PARAMETER)
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Aborted) and "context 99" in str(outcome)
    finally:
        peer.close()


async def test_an_abort_from_the_peer_ends_the_association_at_once(acceptor: Acceptor) -> None:
    peer = RawPeer(acceptor.port)
    try:
        await in_thread(peer.associate)
        peer.sock.sendall(P.abort_pdu(0))
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Aborted) and outcome.source == 0
        assert await in_thread(peer.closed)
    finally:
        peer.close()


async def test_release_collision_as_acceptor(acceptor: Acceptor) -> None:
    """The acceptor asks to release (Sta7) while the requestor does too (AR-8: Sta10); the
    requestor answers first (AR-10: Sta12), then the acceptor answers (AR-4: Sta13)."""
    acceptor_release: list[BaseException | None] = []

    async def release_after_associated() -> None:
        async with asyncio.timeout(5):
            while not acceptor.associations:
                await asyncio.sleep(0.01)
        try:
            await acceptor.associations[0].release()
            acceptor_release.append(None)
        except Exception as exc:
            acceptor_release.append(exc)

    peer = RawPeer(acceptor.port)
    try:
        releasing = asyncio.create_task(release_after_associated())
        await in_thread(peer.associate)
        pdu_type, _ = await in_thread(peer.read_pdu)
        assert pdu_type == P.A_RELEASE_RQ  # the acceptor's request
        peer.sock.sendall(P.release_rq())  # ours crosses it: a collision
        await asyncio.sleep(0.2)
        peer.sock.sendall(P.release_rp())  # as requestor we answer first (Sta9 -> Sta11)
        pdu_type, _ = await in_thread(peer.read_pdu)
        assert pdu_type == P.A_RELEASE_RP  # then the acceptor answers ours
        peer.close()
        await releasing
        assert acceptor_release == [None]
        assert acceptor.associations[0].machine.state == State.STA1
    finally:
        peer.close()


async def test_a_peer_that_never_reads_is_aborted_after_the_idle_timeout() -> None:
    """The acceptor sends 16 MB to a requestor that never reads: once the socket buffers
    are full its write waits at most `idle` seconds, then the association is aborted."""
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    timeouts = Timeouts(acse=0.5, idle=1.0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assoc = await Association.accept(
            reader, writer, lambda _: Acceptance(supported()), timeouts=timeouts
        )
        (context_id, *_) = assoc.contexts
        response = Dataset()
        response.CommandField = 0x8030
        response.MessageIDBeingRespondedTo = 1
        response.Status = 0
        try:
            await assoc.send(context_id, response, bytes(16 << 20))
        except Aborted as exc:
            outcome.set_result(exc)

    port = free_port()
    server = await asyncio.start_server(serve, HOST, port)
    peer = RawPeer(port)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        await in_thread(peer.associate)
        began = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            aborted = await outcome
        assert "the peer read nothing for 1 s" in str(aborted)
        assert asyncio.get_running_loop().time() - began < 5
    finally:
        peer.close()
        server.close()
        await server.wait_closed()


# -- the requestor against a scripted raw-socket acceptor -----------------------------------------


class RawAcceptor(RawPeer):
    """A listening socket whose one connection is served by a script in a thread: it reads
    the A-ASSOCIATE-RQ, then does what the test says."""

    def __init__(self) -> None:
        self.server = socket.create_server((HOST, 0))
        self.port = int(self.server.getsockname()[1])

    async def serve(self, script: Callable[[RawAcceptor], Any]) -> asyncio.Future[Any]:
        def run() -> Any:
            self.server.settimeout(5)
            self.sock, _ = self.server.accept()
            self.sock.settimeout(5)
            pdu_type, _ = self.read_pdu()
            assert pdu_type == P.A_ASSOCIATE_RQ
            return script(self)

        return asyncio.ensure_future(asyncio.to_thread(run))

    def accept(self) -> None:
        """Answer with an A-ASSOCIATE-AC accepting context 1 (Verification, Implicit VR)."""
        from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu
        from pynetdicom.presentation import PresentationContext

        answer = A_ASSOCIATE()
        answer.application_context_name = "1.2.840.10008.3.1.1.1"
        answer.calling_ae_title = "GATEWAY"
        answer.called_ae_title = "RAW"
        answer.result, answer.result_source = 0x00, 0x01
        context = PresentationContext()
        context.context_id, context.result = 1, 0
        context.transfer_syntax = [ImplicitVRLittleEndian]
        answer.presentation_context_definition_results_list = [context]
        length = MaximumLengthNotification()
        length.maximum_length_received = 16384
        answer.user_information = [length]
        self.sock.sendall(bytes(AcPdu(answer).encode()))

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.sock.close()
        self.server.close()


async def _request(port: int, timeouts: Timeouts = FAST) -> Association:
    return await Association.request(
        HOST, port, calling_ae="GATEWAY", called_ae="RAW",
        contexts=[build_context(Verification)], timeouts=timeouts,
    )  # fmt: skip


def _echo_rq(assoc: Association) -> Dataset:
    command = Dataset()
    command.CommandField = 0x0030
    command.MessageID = assoc.next_message_id()
    command.AffectedSOPClassUID = Verification
    return command


async def test_an_abort_answering_the_request_is_the_requestors_aborted() -> None:
    raw = RawAcceptor()
    try:
        done = await raw.serve(lambda r: r.sock.sendall(P.abort_pdu(0)))  # Sta5, Evt16: AA-3
        with pytest.raises(Aborted) as aborted:
            await _request(raw.port)
        assert "aborted the association request" in str(aborted.value)
        await done
    finally:
        raw.close()


async def test_a_silent_acceptor_is_aborted_after_the_acse_timeout() -> None:
    raw = RawAcceptor()
    try:
        done = await raw.serve(lambda r: (r.read_pdu(), r.closed()))  # says nothing
        with pytest.raises(Aborted) as aborted:
            await _request(raw.port)
        assert "no answer to A-ASSOCIATE-RQ" in str(aborted.value)
        (pdu_type, body), closed = await done
        assert (pdu_type, body[2]) == (P.A_ABORT, 2) and closed
    finally:
        raw.close()


async def test_a_pdu_out_of_place_while_awaiting_the_answer_aborts() -> None:
    raw = RawAcceptor()
    try:
        done = await raw.serve(lambda r: (r.sock.sendall(P.release_rp()), r.read_pdu())[1])
        with pytest.raises(Aborted):  # Sta5, Evt14: AA-8
            await _request(raw.port)
        pdu_type, body = await done
        assert (pdu_type, body[2], body[3]) == (P.A_ABORT, 2, P.AbortReason.UNEXPECTED_PDU)
    finally:
        raw.close()


async def test_an_abort_while_a_response_is_awaited_ends_the_wait() -> None:
    raw = RawAcceptor()
    try:

        def script(r: RawAcceptor) -> int:
            r.accept()
            pdu_type, _ = r.read_pdu()  # the C-ECHO-RQ
            r.sock.sendall(P.abort_pdu(0))
            return pdu_type

        done = await raw.serve(script)
        assoc = await _request(raw.port)
        command = _echo_rq(assoc)
        with assoc.awaiting(command.MessageID) as responses:
            await assoc.send(1, command)
            with pytest.raises(Aborted) as aborted:
                await responses.next(5.0)
        assert "aborted by the peer" in str(aborted.value)
        assert await done == P.P_DATA_TF
        assert assoc.machine.state == State.STA1
    finally:
        raw.close()


async def test_release_collision_as_requestor() -> None:
    """The requestor asks to release (Sta7); the acceptor's A-RELEASE-RQ crosses it (AR-8:
    Sta9); the requestor answers it (AR-9: Sta11) and then gets the answer to its own (AR-3)."""
    raw = RawAcceptor()
    try:

        def script(r: RawAcceptor) -> list[int]:
            r.accept()
            seen = [r.read_pdu()[0]]  # the requestor's A-RELEASE-RQ
            r.sock.sendall(P.release_rq())  # ours crosses it
            seen.append(r.read_pdu()[0])  # the requestor answers first
            r.sock.sendall(P.release_rp())
            return seen

        done = await raw.serve(script)
        assoc = await _request(raw.port)
        await assoc.release()
        assert await done == [P.A_RELEASE_RQ, P.A_RELEASE_RP]
        assert assoc.machine.state == State.STA1
    finally:
        raw.close()


async def test_no_release_answer_aborts_after_the_acse_timeout() -> None:
    raw = RawAcceptor()
    try:

        def script(r: RawAcceptor) -> tuple[int, int]:
            r.accept()
            first = r.read_pdu()[0]  # the A-RELEASE-RQ, not answered
            return first, r.read_pdu()[0]

        done = await raw.serve(script)
        assoc = await _request(raw.port)
        with pytest.raises(Aborted) as aborted:
            await assoc.release()
        assert "no A-RELEASE-RP" in str(aborted.value)
        assert await done == (P.A_RELEASE_RQ, P.A_ABORT)
    finally:
        raw.close()


async def test_a_pdu_longer_than_negotiated_from_the_acceptor_is_refused_unread() -> None:
    raw = RawAcceptor()
    try:

        def script(r: RawAcceptor) -> tuple[int, bytes]:
            r.accept()
            r.sock.sendall(struct.pack(">BxI", P.P_DATA_TF, 16384 + (1 << 20)))
            return r.read_pdu()

        done = await raw.serve(script)
        assoc = await _request(raw.port)
        pdu_type, body = await done
        assert (pdu_type, body[2], body[3]) == (P.A_ABORT, 2, P.AbortReason.INVALID_PARAMETER)
        await assoc.wait_closed()
        assert assoc.machine.state == State.STA1
    finally:
        raw.close()


async def test_an_acceptor_that_stops_mid_pdu_ends_the_association() -> None:
    raw = RawAcceptor()
    try:

        def script(r: RawAcceptor) -> None:
            r.accept()
            r.sock.sendall(struct.pack(">BxI", P.P_DATA_TF, 100) + b"\x00" * 10)
            r.sock.close()

        done = await raw.serve(script)
        assoc = await _request(raw.port)
        await done
        command = _echo_rq(assoc)
        with assoc.awaiting(command.MessageID) as responses, pytest.raises(Aborted):
            await assoc.send(1, command)
            await responses.next(5.0)
        await assoc.wait_closed()
        assert assoc.machine.state == State.STA1
    finally:
        raw.close()


async def test_fragments_interleaved_across_contexts_are_assembled_per_context(
    acceptor: Acceptor,
) -> None:
    """A C-STORE on context 3 whose data set comes in two fragments, with a whole C-ECHO on
    context 1 sent between them (PS3.8 Annex E allows PDVs of different contexts in any
    order): both messages arrive whole, the echo first, the data set byte for byte."""
    from gateway.net.association import encode_command

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "RAW", "GATEWAY"
    echo_cx, store_cx = build_context(Verification), build_context(CTImageStorage)
    echo_cx.context_id, store_cx.context_id = 1, 3
    primitive.presentation_context_definition_list = [echo_cx, store_cx]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    store, echo = Dataset(), Dataset()
    store.CommandField, store.MessageID, store.AffectedSOPClassUID = 0x0001, 1, CTImageStorage
    store.AffectedSOPInstanceUID, store.Priority, store.CommandDataSetType = "1.2.3", 0, 1
    echo.CommandField, echo.MessageID, echo.AffectedSOPClassUID = 0x0030, 2, Verification
    echo.CommandDataSetType = 0x0101
    data = bytes(range(256)) * 40
    peer = RawPeer(acceptor.port)
    try:
        peer.sock.sendall(bytes(RqPdu(primitive).encode()))
        assert (await in_thread(peer.read_pdu))[0] == P.A_ASSOCIATE_AC
        peer.sock.sendall(
            P.p_data_tf(3, True, True, encode_command(store))
            + P.p_data_tf(3, False, False, data[:4000])
            + P.p_data_tf(1, True, True, encode_command(echo))
            + P.p_data_tf(3, False, True, data[4000:])
        )
        for _ in range(2):  # the two responses
            assert (await in_thread(peer.read_pdu))[0] == P.P_DATA_TF
        peer.sock.sendall(P.release_rq())
        assert (await in_thread(peer.read_pdu))[0] == P.A_RELEASE_RP
        (outcome,) = await ended(acceptor)
        assert isinstance(outcome, Released)
        first, second = acceptor.messages
        assert (first.context_id, int(first.command.CommandField)) == (1, 0x0030)
        assert (second.context_id, int(second.command.CommandField)) == (3, 0x0001)
        assert second.data == data
    finally:
        peer.close()
