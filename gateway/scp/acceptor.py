"""The DICOM node's listener, on the asyncio network layer (`gateway.net`).

One asyncio server per listening port (plain, and TLS when `[node] tls_port` is set); each
connection is served by `Association.accept` in a task of its own: the association policy
(`AssociationPolicy`: called AE title, callers bound to hosts, the association limit) decides
in the A-ASSOCIATE-RQ, then the association's messages are served one at a time:

- C-ECHO: answered at once;
- C-STORE: the data set is collected, fragment by fragment as it arrives, into a
  `DatasetSpool` behind its File Meta Information (in memory while small, else streamed to
  the store's `tmp/` and hashed on the way); `DicomServices.store_received` has the store
  check, place, fsync and index it on the index writer's thread, with whatever arrived
  meanwhile (`Store.place`: one fsync per directory, one commit); the C-STORE-RSP is packed
  without a pydicom Dataset (`gateway.net.dimse`);
- C-FIND (Patient Root, Study Root, Modality Worklist): `DicomServices.find` reads the answers
  in a worker thread and hands them over as they come (64 ahead at most); each is sent as a
  pending response. A request runs in a task of its own while the association's next
  messages are read, so a C-CANCEL stops it (0xFE00);
- C-MOVE and C-GET: the instances the identifier names are sent as C-STORE sub-operations
  (`gateway.scu.requestor.store_instance`), to the Move Destination on an association of
  their own, or on this association in the SCU role the C-GET requestor granted; a pending
  response with the counts after each, and the final status of PS3.4 C.4.2.1.5 / C.4.3.1.5;
- MPPS N-CREATE and N-SET: `DicomServices.n_create` / `n_set` in a worker thread; the
  response names the SOP Instance the gateway created.

A request whose SOP class is not its presentation context's is refused 0x0122, one the caller
may not use (`ServiceAccess`) 0x0124, and the association goes on; an operation the node does
not offer is refused 0x0211 (unrecognised operation). docs/network.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
import threading
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread
import structlog
from pydicom.dataset import Dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from gateway.config import PeerSettings, Settings
from gateway.errors import GatewayError, PeerError
from gateway.metrics import status_text
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
from gateway.net.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    N_CREATE_RQ,
    N_SET_RQ,
    SubOperations,
    response,
)
from gateway.scp.access import ServiceAccess, log_refusal, service_of
from gateway.scp.handlers import AssociationStats, DicomServices
from gateway.scp.policy import AssociationPolicy
from gateway.scp.receiving import DatasetSpool, c_store_sink
from gateway.scp.tls import handshake_failed, server_context
from gateway.scu.requestor import open_association, store_instance
from gateway.scu.syntaxes import MAX_CONTEXTS, storage_contexts
from gateway.store.query import QueryError

__all__ = ["Acceptor"]

log = structlog.get_logger(__name__)

_UNRECOGNISED_OPERATION = 0x0211
_NOT_AUTHORISED = 0x0124
_SOP_CLASS_NOT_SUPPORTED = 0x0122
# Command Field -> the message type `gateway.scp.access` governs (PS3.7 E.1).
_MESSAGE_TYPES = {0x0001: "C_STORE", 0x0030: "C_ECHO", 0x0020: "C_FIND", 0x0021: "C_MOVE",
                  0x0010: "C_GET", 0x0140: "N_CREATE", 0x0120: "N_SET"}  # fmt: skip


class Acceptor:
    """Listens and serves associations on the event loop; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        services: DicomServices,
        access: ServiceAccess,
        supported: list[PresentationContext],
        tmp_dir: Path,
    ) -> None:
        node = settings.node
        self._settings = settings
        self._services = services
        self._access = access
        self._supported = supported
        self._tmp_dir = tmp_dir
        self._max_bytes = node.max_instance_bytes
        # Storage of any SOP class proposed, private ones included (`accept_unknown_sop_classes`)
        self._unrestricted = node.accept_unknown_sop_classes
        self._timeouts = Timeouts(acse=node.acse_timeout, idle=node.network_timeout)
        self._policy = AssociationPolicy(
            ae_title=node.ae_title,
            check_called_ae=node.check_called_ae,
            allowed_callers=tuple(settings.security.allowed_callers),
            max_associations=node.max_associations,
        )
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._established: set[Association] = set()

    @property
    def port(self) -> int:
        """The port of the first listener."""
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return bool(self._servers)

    @property
    def open_associations(self) -> int:
        return len(self._established)

    async def start(self) -> None:
        node = self._settings.node
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if node.plain:
            listeners.append((node.port, None))
        if node.tls_port is not None:
            listeners.append((node.tls_port, server_context(node)))
        for port, context in listeners:
            # TLS is started per connection in its task (`_serve`), so that a handshake that
            # fails is logged, counted and audited, and holds up no other connection.
            try:
                server = await asyncio.start_server(
                    functools.partial(self._connected, tls=context),
                    node.host, port, limit=1 << 20, backlog=128,
                )  # fmt: skip
            except OSError as exc:
                from gateway.errors import GatewayError

                key = "tls_port" if context is not None else "port"
                # asyncio words it "error while attempting to bind on address ...": the errno's
                # own text says it plainly.
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise GatewayError(
                    f"cannot listen on {node.host}:{port} ([node] {key}): {reason}"
                ) from None
            self._servers.append(server)
            log.info("dicom_node_listening", ae_title=node.ae_title, host=node.host,
                     port=int(server.sockets[0].getsockname()[1]),
                     tls=context is not None)  # fmt: skip

    async def stop(self, grace: float) -> int:
        """Stop accepting; let open associations end within *grace* seconds; abort the rest
        (A-ABORT); return how many were aborted."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        if not self._connections:
            return 0
        _, pending = await asyncio.wait(set(self._connections), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    # -- one connection -----------------------------------------------------------------------

    def _connected(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ssl.SSLContext | None,
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer, tls))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ssl.SSLContext | None,
    ) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        if tls is not None:
            try:
                await writer.start_tls(tls, ssl_handshake_timeout=self._timeouts.acse)
            except (OSError, ValueError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                handshake_failed(host, str(exc) or type(exc).__name__,
                                 self._services.metrics, self._services.audit)  # fmt: skip
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                return
        decided: list[str] = []

        def decide(request: A_ASSOCIATE) -> Acceptance | Rejection:
            calling = str(request.calling_ae_title)
            called = str(request.called_ae_title)
            refusal = self._policy.rejection(calling, called, host, len(self._established) + 1)
            if refusal is not None:
                reason, result, source, diagnostic = refusal
                self._services.rejected(reason, calling, called, host)
                decided.append(reason)
                return Rejection(result, source, diagnostic)
            return Acceptance(self._supported, unrestricted=self._unrestricted)

        try:
            assoc = await Association.accept(
                reader, writer, decide, timeouts=self._timeouts,
                max_pdu=self._settings.node.max_pdu_size,
            )  # fmt: skip
        except (Aborted, Rejected) as exc:
            if not decided:
                log.info("association_not_established", peer=host, reason=str(exc))
            return
        stats = self._services.accepted(assoc.calling_ae, assoc.called_ae, host,
                                        len(assoc.contexts))  # fmt: skip
        assoc.sinks = functools.partial(c_store_sink, assoc, directory=self._tmp_dir,
                                        max_bytes=self._max_bytes)  # fmt: skip
        self._established.add(assoc)
        released = False
        # One request at a time (no asynchronous operations window is negotiated, PS3.7
        # D.3.3.3), answered in a task of its own so that a C-CANCEL can reach it meanwhile.
        active: asyncio.Task[None] | None = None
        active_id = -1
        cancel = threading.Event()
        try:
            while True:
                message = await assoc.receive()
                command = message.command
                if int(command.CommandField) == C_CANCEL_RQ:
                    if int(command.get("MessageIDBeingRespondedTo", -2)) == active_id:
                        cancel.set()
                    continue
                if active is not None:
                    await active  # a requestor that did not wait for the answer
                cancel = threading.Event()
                active_id = int(command.get("MessageID", -1))
                active = asyncio.get_running_loop().create_task(
                    self._answer_or_abort(assoc, stats, message, cancel)
                )
        except Released:
            released = True
        except Aborted:
            pass
        finally:
            if active is not None:
                if not released:
                    active.cancel()
                await asyncio.gather(active, return_exceptions=True)
            self._established.discard(assoc)
            if not released:
                await assoc.abort()
            await assoc.wait_closed()
            self._services.ended(stats, released=released)

    async def _answer_or_abort(
        self,
        assoc: Association,
        stats: AssociationStats,
        message: Message,
        cancel: threading.Event,
    ) -> None:
        """`_answer`; a request that fails unforeseen (a bug) aborts its association at once,
        logged with its traceback, instead of leaving the requestor waiting for an answer."""
        try:
            await self._answer(assoc, stats, message, cancel)
        except Aborted:
            raise
        except Exception:
            log.exception("request_failed", association_id=stats.association_id,
                          command=f"0x{int(message.command.CommandField):04X}")  # fmt: skip
            await assoc.abort()

    async def _answer(
        self,
        assoc: Association,
        stats: AssociationStats,
        message: Message,
        cancel: threading.Event,
    ) -> None:
        command = message.command
        field = int(command.CommandField)
        message_id = int(command.MessageID)
        # N-SET names its object as Requested, the others as Affected (PS3.7 10.1.1.1).
        sop_class = str(
            command.get("AffectedSOPClassUID", "") or command.get("RequestedSOPClassUID", "")
        )
        sop_instance = str(command.get("AffectedSOPInstanceUID", "")
                           or command.get("RequestedSOPInstanceUID", ""))  # fmt: skip
        spool = message.sink if isinstance(message.sink, DatasetSpool) else None
        status = self._refusal(assoc, stats, message, field, sop_class)
        if status is not None:
            if spool is not None:
                spool.abandon()
            stats.refused += 1
            metrics = self._services.metrics
            if field == C_STORE_RQ:
                metrics.instances_refused.labels(status=status_text(status)).inc()
            else:
                service = service_of(_MESSAGE_TYPES.get(field, ""), sop_class) or "other"
                metrics.dimse_refused.labels(service=service, status=status_text(status)).inc()
        elif field == C_ECHO_RQ:
            self._services.count("echo")
            status = 0x0000
        elif field == C_FIND_RQ:
            status = await self._find(assoc, stats, message, sop_class, cancel)
        elif field in (C_MOVE_RQ, C_GET_RQ):
            await self._retrieve(assoc, stats, message, field, sop_class, cancel)
            return  # its responses are sent
        elif field in (N_CREATE_RQ, N_SET_RQ):
            status, sop_instance = await self._mpps(assoc, stats, message, field, sop_instance)
        elif field == C_STORE_RQ and spool is not None:
            status = await self._services.store_received(stats, sop_class, sop_instance, spool)
        else:
            if spool is not None:
                spool.abandon()
            status = _UNRECOGNISED_OPERATION
        await assoc.send_encoded(
            message.context_id, response(field | 0x8000, message_id, status, sop_class,
                                         sop_instance)
        )  # fmt: skip

    async def _retrieve(
        self,
        assoc: Association,
        stats: AssociationStats,
        message: Message,
        field: int,
        sop_class: str,
        cancel: threading.Event,
    ) -> None:
        """C-MOVE (PS3.4 C.4.2) and C-GET (C.4.3): the instances the identifier names are
        sent as C-STORE sub-operations, to the Move Destination on an association of their
        own, or on this association in the SCU role the requestor granted; a pending response
        with the counts after each; the final response says Success, 0xB000 (some failed or
        had a warning: the Failed SOP Instance UID List names the failed), 0xA702 (all
        failed) or 0xFE00 (cancelled, with what remained)."""
        kind = "move" if field == C_MOVE_RQ else "get"
        services = self._services
        message_id = int(message.command.MessageID)

        async def answer(
            status: int,
            counts: SubOperations | None = None,
            failed: list[str] | None = None,
            *,
            final: bool = True,
        ) -> None:
            identifier = None
            if failed:
                listed = Dataset()
                listed.FailedSOPInstanceUIDList = failed
                identifier = assoc.encode_dataset(message.context_id, listed)
            command = response(field | 0x8000, message_id, status, sop_class,
                               has_data=identifier is not None, counts=counts,
                               remaining=not final or status == 0xFE00)  # fmt: skip
            await assoc.send_encoded(message.context_id, command, identifier)

        identifier = self._decoded(assoc, message, stats)
        services.count(kind, identifier)
        if identifier is None:
            await answer(0xC000)  # unable to process
            return
        peer: PeerSettings | None = None
        if field == C_MOVE_RQ:
            destination = str(message.command.get("MoveDestination", "")).strip()
            peer = services.move_destination(stats, destination)
            if peer is None:
                await answer(0xA801)  # Move Destination unknown
                return
        try:
            instances = await anyio.to_thread.run_sync(
                services.retrieve, stats, kind, sop_class, identifier
            )
        except QueryError as exc:
            await answer(exc.status, SubOperations(0))
            return
        except GatewayError:  # out of resources: unable to calculate the matches
            await answer(0xA701, SubOperations(0))
            return
        counts = SubOperations(len(instances))
        if not instances:
            await answer(0x0000, counts)
            return
        if len(instances) > 0xFFFF:  # the counts are US values (PS3.4 C.4.2.1.5)
            reason = f"{len(instances)} instances: more than 65535 sub-operations"
            log.warning(f"{kind}_refused", association_id=stats.association_id, reason=reason)
            await answer(0xA701)
            return
        node = self._settings.node
        if peer is not None:
            pairs = sorted({(i.sop_class_uid, i.transfer_syntax) for i in instances})
            contexts = storage_contexts(pairs, transcode=peer.transcode, limit=MAX_CONTEXTS - 1)
            # Verification too: a destination that accepts none of the others still
            # associates, and each instance fails as a sub-operation (never 0xA801).
            contexts.append(build_context(Verification))
            try:
                target = await open_association(node, peer, contexts)
            except PeerError as exc:
                log.warning("move_destination_unreachable", association_id=stats.association_id,
                            destination=peer.name, reason=str(exc))  # fmt: skip
                await answer(0xA801)
                return
            transcode, name = peer.transcode, peer.name
            originator: tuple[str, int] | None = (stats.calling_ae, message_id)
        else:
            target = assoc
            transcode, name = services.get_transcode(stats.calling_ae), stats.calling_ae
            originator = None
        await anyio.to_thread.run_sync(services.transferred, stats, instances, kind, name)
        failed: list[str] = []
        try:
            for instance in instances:
                if cancel.is_set():
                    log.info(f"{kind}_cancelled", association_id=stats.association_id)
                    await answer(0xFE00, counts, failed)
                    return
                stats.sent += 1
                try:
                    status: int | None = await store_instance(
                        target, instance, transcode=transcode, peer=name,
                        dimse_timeout=node.dimse_timeout, move_originator=originator,
                    )  # fmt: skip
                except PeerError as exc:
                    log.warning("sub_operation_not_sent", peer=name, reason=str(exc))
                    status = None
                counts.remaining -= 1
                if status == 0x0000:
                    counts.completed += 1
                elif status is not None and (0xB000 <= status <= 0xBFFF or status == 0x0001):
                    counts.warning += 1
                else:
                    counts.failed += 1
                    failed.append(instance.sop_instance_uid)
                await answer(0xFF00, counts, final=False)
        finally:
            if target is not assoc and target.is_established:
                with contextlib.suppress(Aborted):
                    await target.release()
            elif target is not assoc:
                await target.abort()
        log.info(f"{kind}_done", association_id=stats.association_id, instances=len(instances))
        if not counts.failed and not counts.warning:
            await answer(0x0000, counts)
        elif counts.failed == len(instances):
            if kind == "move":
                log.warning("move_failed", association_id=stats.association_id,
                            destination=name, reason="the destination stored none of the "
                            f"{len(instances)} instances")  # fmt: skip
            await answer(0xA702, counts, failed)
        else:
            await answer(0xB000, counts, failed)

    async def _mpps(
        self, assoc: Association, stats: AssociationStats, message: Message, field: int,
        sop_instance: str,
    ) -> tuple[int, str]:  # fmt: skip
        """MPPS N-CREATE / N-SET (PS3.4 F.7): `DicomServices.n_create` / `n_set` in a worker
        thread; (status, the SOP Instance UID the response names: one
        the gateway assigned when the N-CREATE named none)."""
        dataset = self._decoded(assoc, message, stats)
        if dataset is None:
            return 0x0106, sop_instance  # invalid attribute value: not decodable
        if field == N_SET_RQ:
            status = await anyio.to_thread.run_sync(self._services.n_set, dataset, sop_instance)
            return status, sop_instance
        status, created = await anyio.to_thread.run_sync(
            self._services.n_create, dataset, sop_instance or None, stats.calling_ae
        )
        return status, created or sop_instance

    def _decoded(
        self, assoc: Association, message: Message, stats: AssociationStats
    ) -> Dataset | None:
        """A request's data set decoded in its context's transfer syntax (None, logged, when it
        cannot be)."""
        try:
            return assoc.decode_dataset(message)
        except Exception as exc:
            log.warning("request_undecodable", association_id=stats.association_id,
                        reason=str(exc))  # fmt: skip
            return None

    async def _find(
        self,
        assoc: Association,
        stats: AssociationStats,
        message: Message,
        sop_class: str,
        cancel: threading.Event,
    ) -> int:
        """C-FIND (Patient Root, Study Root, Modality Worklist): `DicomServices.find` runs in
        a worker thread and hands each answer over as it is read (at most 64 ahead of the
        network); each is sent as a pending response; returns the final status."""
        identifier = self._decoded(assoc, message, stats)
        if identifier is None:
            return 0xC000
        send, receive = anyio.create_memory_object_stream[tuple[int, Dataset | None]](64)
        final = 0x0000

        def produce() -> None:
            with send:
                for answer in self._services.find(stats, sop_class, identifier, cancel.is_set):
                    anyio.from_thread.run(send.send, answer)

        message_id = int(message.command.MessageID)
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, produce)
            async with receive:
                async for status, answer in receive:
                    if status not in (0xFF00, 0xFF01) or answer is None:
                        final = status
                        continue
                    encoded = assoc.encode_dataset(message.context_id, answer)
                    await assoc.send_encoded(message.context_id, response(
                        C_FIND_RQ | 0x8000, message_id, status, sop_class, has_data=True,
                    ), encoded)  # fmt: skip
        return final

    def _refusal(
        self,
        assoc: Association,
        stats: AssociationStats,
        message: Message,
        field: int,
        sop_class: str,
    ) -> int | None:
        """0x0122 for a SOP class other than its presentation context's, 0x0124 for a service
        the caller may not use (the association goes on); None when the request may be
        served."""
        context = assoc.contexts[message.context_id]
        if sop_class and sop_class != str(context.abstract_syntax):
            log.warning("dimse_request_refused", peer=stats.peer_address,
                        message=_MESSAGE_TYPES.get(field, f"0x{field:04X}").replace("_", "-"),
                        status="0x0122", reason=f"SOP Class {sop_class[:64]} on presentation "
                        f"context {message.context_id}, which was negotiated for "
                        f"{context.abstract_syntax}")  # fmt: skip
            return _SOP_CLASS_NOT_SUPPORTED
        service = service_of(_MESSAGE_TYPES.get(field, ""), sop_class)
        if service is None:
            return None
        grant = self._access.grant(stats.calling_ae)
        if service in grant.services:
            return None
        log_refusal(grant, service, stats.calling_ae, stats.peer_address, self._services.audit)
        return _NOT_AUTHORISED
