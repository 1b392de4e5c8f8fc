"""The DICOM node: the pynetdicom AE, its presentation contexts, its listener and its shutdown.

`DicomNode` is the only place that configures pynetdicom. Some of pynetdicom's settings are
process-wide (`pynetdicom._config`); the node sets them when it starts and restores them when it
stops:

- `STORE_RECV_CHUNKED_DATASET`: a received dataset is streamed to a file in the store's `tmp/` as
  it arrives (bounded memory for any instance size; moving it into place is a rename on the same
  filesystem). How that file is written is `receiving.py`;
- `STORE_SEND_CHUNKED_DATASET`: C-MOVE / C-GET send a stored file's dataset bytes as they are,
  without decoding and re-encoding them;
- `UNRESTRICTED_STORAGE_SERVICE`: only when `accept_unknown_sop_classes` is set;
- `LOG_HANDLER_LEVEL = "none"`: pynetdicom's own per-PDU and per-DIMSE debug handlers are not
  bound (the node logs associations itself);
- `pynetdicom.transport.deepcopy`: pynetdicom deep-copies the acceptor's presentation contexts
  for every association it accepts; negotiation only reads them, and copying the node's ~200
  contexts (every storage class, every transfer syntax, each UID re-validated) was 23% of the
  gateway's CPU with archives opening an association per C-MOVE. The node passes a new list
  of the same contexts instead.

It also turns off pydicom's value validation on element assignment: pynetdicom builds every
command set through it, and the regular-expression checks were ~0.2 ms of each C-STORE. Received
datasets are never re-encoded, so nothing the node stores depends on that validation.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import pydicom.config
import pynetdicom.transport
import structlog
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.acquire.registry import Registry
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.scp.acceptor import Acceptor
from gateway.scp.access import ServiceAccess
from gateway.scp.bridge import LoopBridge
from gateway.scp.handlers import DicomServices
from gateway.scp.receiving import install_receive_path
from gateway.scp.storage_classes import STORAGE_SOP_CLASSES, register_storage_classes
from gateway.scp.tls import server_context
from gateway.scp.transport import MIN_PDU_LIMIT, AssociationPolicy, EventDrivenAE, GatewayServer
from gateway.scp.worklist import AcquisitionServices
from gateway.store.store import Store

__all__ = ["DicomNode"]

log = structlog.get_logger(__name__)

_QR_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


class DicomNode:
    """Accepts associations and serves them with `DicomServices`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        bridge: LoopBridge,
        registry: Registry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        acquisition = AcquisitionServices(registry, bridge) if registry is not None else None
        self.services = DicomServices(settings, store, bridge, acquisition, metrics)
        # What each caller may use (gateway.scp.access), screened per request by the transport.
        stations = (lambda: registry.station_aes) if registry is not None else frozenset
        self.access = ServiceAccess(settings, stations)
        self._ae = self._make_ae()
        # Which layer accepts associations: pynetdicom's threads, or the asyncio layer
        # (gateway.net, gateway.scp.acceptor) while it is being brought to every service
        # (docs/network.md). Chosen by GATEWAY_NETWORK=asyncio for now.
        self.network = os.environ.get("GATEWAY_NETWORK", "threads")
        self._acceptor: Acceptor | None = None
        if self.network == "asyncio":
            self._acceptor = Acceptor(settings, self.services, self.access,
                                      self._ae.supported_contexts, store.files.tmp_dir)  # fmt: skip
        self._listeners: list[tuple[GatewayServer, threading.Thread]] = []
        self._saved_settings: list[tuple[Any, str, Any]] = []
        self._restore_receive_path: Callable[[], None] | None = None

    def _make_ae(self) -> AE:
        node = self._settings.node
        # Event driven also as a requestor: C-MOVE sub-associations are requested by this AE.
        ae = EventDrivenAE(ae_title=node.ae_title)
        ae.pdu_limit = max(MIN_PDU_LIMIT, node.max_pdu_size + 6)
        # The limit is the policy's (transport.py), counting established associations;
        # pynetdicom's own count includes connections still negotiating, so it only backstops.
        ae.maximum_associations = node.max_associations + 64
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.connection_timeout = node.connection_timeout
        # The policy is applied by the server's ACSE (transport.py), which logs the reason.
        ae.require_called_aet = False
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # Explicit VR Little Endian first: where a proposed context offers several syntaxes,
        # the one that keeps the VRs is chosen. Whatever is accepted is stored as received.
        syntaxes = [ExplicitVRLittleEndian] + [
            ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian
        ]
        register_storage_classes()
        for sop_class in STORAGE_SOP_CLASSES:
            # SCP/SCU Role Selection (PS3.7 D.3.3.4): a sender that states its roles may be the
            # storage SCU (a modality saying "SCU only", or both), and a C-GET requestor the
            # storage SCP; each proposed role is accepted, and none is claimed that was not
            # proposed (pynetdicom answers a role proposed as 0 with 0).
            ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
        for model in _QR_MODELS:
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        # Modality Worklist and MPPS: acquisition tasks for standard modalities.
        ae.add_supported_context(ModalityWorklistInformationFind, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(ModalityPerformedProcedureStep, ALL_TRANSFER_SYNTAXES)
        # Contexts the node proposes as a requestor (C-ECHO of peers).
        ae.add_requested_context(Verification)
        return ae

    @property
    def port(self) -> int:
        """The port the first listener is bound to (the plain one, unless `plain = false`)."""
        if self._acceptor is not None:
            return self._acceptor.port
        assert self._listeners
        return int(self._listeners[0][0].server_address[1])

    @property
    def listening(self) -> bool:
        """Whether the listeners are up (between `start` and `stop`)."""
        if self._acceptor is not None:
            return self._acceptor.listening
        return bool(self._listeners)

    @property
    def open_associations(self) -> int:
        """Established associations (a connection still negotiating is not counted)."""
        if self._acceptor is not None:
            return self._acceptor.open_associations
        return len([a for a in self._ae.active_associations if a.is_acceptor and a.is_established])

    async def open(self) -> None:
        """Start listening (on the event loop: the asyncio layer, or the threaded one)."""
        if self._acceptor is None:
            self.start()
            return
        self._apply_process_settings()  # the outbound services still use pynetdicom
        await self._acceptor.start()

    async def close(self, grace: float) -> None:
        """Stop listening, give open associations *grace* seconds, abort the rest."""
        if self._acceptor is None:
            await anyio.to_thread.run_sync(self.stop, grace)
            return
        aborted = await self._acceptor.stop(grace)
        log.info("dicom_node_stopped", aborted=aborted)
        self._restore_process_settings()

    def start(self) -> None:
        """Bind the listener and serve associations in background threads."""
        node = self._settings.node
        self._apply_process_settings()
        policy = AssociationPolicy(
            ae_title=node.ae_title,
            check_called_ae=node.check_called_ae,
            allowed_callers=tuple(self._settings.security.allowed_callers),
            max_associations=node.max_associations,
        )
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if node.plain:
            listeners.append((node.port, None))
        if node.tls_port is not None:
            listeners.append((node.tls_port, server_context(node)))
        for port, context in listeners:
            try:
                server = self._ae.make_server(
                    (node.host, port),
                    evt_handlers=self.services.handlers(),
                    server_class=GatewayServer,
                    ssl_context=context,
                )
            except OSError as exc:
                key = "tls_port" if context is not None else "port"
                raise GatewayError(
                    f"cannot listen on {node.host}:{port} ([node] {key}): {exc.strerror or exc}"
                ) from None
            server.policy = policy
            server.on_reject = self.services.on_rejected
            server.access = self.access
            server.audit = self.services.audit
            server.metrics = self.services.metrics
            self._ae._servers.append(server)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="dicom-tls-listener" if context else "dicom-listener",
                daemon=True,
            )
            thread.start()
            self._listeners.append((server, thread))
            log.info(
                "dicom_node_listening",
                ae_title=node.ae_title,
                host=node.host,
                port=int(server.server_address[1]),
                tls=context is not None,
            )

    def stop(self, grace: float) -> None:
        """Stop accepting; give open associations *grace* seconds; abort what is left.

        Blocking: run it in a worker thread.
        """
        listeners, self._listeners = self._listeners, []
        if not listeners:
            return
        for server, thread in listeners:
            server.shutdown()  # stops serve_forever and closes the listening socket only
            thread.join()
        deadline = time.monotonic() + grace
        while self.open_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = [a for a in self._ae.active_associations if a.is_acceptor]
        aborted = len([a for a in remaining if a.is_established])
        for assoc in remaining:
            assoc.abort()
        log.info("dicom_node_stopped", aborted=aborted)
        self._restore_process_settings()

    def _apply_process_settings(self) -> None:
        """Set the process-wide settings of the module docstring, remembering the old ones."""
        node = self._settings.node
        values: dict[tuple[Any, str], Any] = {
            (_config, "STORE_RECV_CHUNKED_DATASET"): True,
            (_config, "STORE_SEND_CHUNKED_DATASET"): True,
            (_config, "UNRESTRICTED_STORAGE_SERVICE"): node.accept_unknown_sop_classes,
            (_config, "LOG_HANDLER_LEVEL"): "none",
            (pynetdicom.transport, "deepcopy"): list,
            (pydicom.config.settings, "writing_validation_mode"): pydicom.config.IGNORE,
            (pydicom.config.settings, "reading_validation_mode"): pydicom.config.IGNORE,
        }
        self._saved_settings = [(obj, name, getattr(obj, name)) for obj, name in values]
        for (obj, name), value in values.items():
            setattr(obj, name, value)
        self._restore_receive_path = install_receive_path(
            self._store.files.tmp_dir, self._settings.node.max_instance_bytes
        )

    def _restore_process_settings(self) -> None:
        """Put back what `_apply_process_settings` changed (for a process embedding the node)."""
        for obj, name, value in self._saved_settings:
            setattr(obj, name, value)
        self._saved_settings = []
        if self._restore_receive_path is not None:
            self._restore_receive_path()
            self._restore_receive_path = None
