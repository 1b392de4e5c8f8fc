"""The DICOM node: its presentation contexts, its listener and its shutdown.

`DicomNode` builds what the node accepts (every Storage SOP Class, retired ones included, in any
transfer syntax with Explicit VR Little Endian preferred and both SCP/SCU roles grantable; the
Query/Retrieve models; Modality Worklist; MPPS; Verification) and serves it with the asyncio
listener (`gateway.scp.acceptor`, on `gateway.net`; docs/network.md). It sets nothing
process-wide: neither pynetdicom's nor pydicom's settings are changed.
"""

from __future__ import annotations

import structlog
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import PresentationContext, build_context
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
from gateway.metrics import Metrics
from gateway.scp.acceptor import Acceptor
from gateway.scp.access import ServiceAccess
from gateway.scp.bridge import LoopBridge
from gateway.scp.handlers import DicomServices
from gateway.scp.storage_classes import STORAGE_SOP_CLASSES
from gateway.scp.worklist import AcquisitionServices
from gateway.store.store import Store

__all__ = ["DicomNode", "supported_contexts"]

log = structlog.get_logger(__name__)

_QR_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


def supported_contexts() -> list[PresentationContext]:
    """The presentation contexts the node accepts (PS3.8 9.3.2.2 as negotiated by
    `pynetdicom.presentation.negotiate_as_acceptor`)."""
    contexts = [build_context(Verification, ALL_TRANSFER_SYNTAXES)]
    # Explicit VR Little Endian first: where a proposed context offers several syntaxes, the
    # one that keeps the VRs is chosen. Whatever is accepted is stored as received.
    syntaxes = [ExplicitVRLittleEndian] + [
        ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian
    ]
    for sop_class in STORAGE_SOP_CLASSES:
        context = build_context(sop_class, syntaxes)
        # SCP/SCU Role Selection (PS3.7 D.3.3.4): a sender that states its roles may be the
        # storage SCU (a modality saying "SCU only", or both), and a C-GET requestor the
        # storage SCP; each proposed role is accepted, and none is claimed that was not
        # proposed.
        context.scu_role = context.scp_role = True
        contexts.append(context)
    contexts += [build_context(model, ALL_TRANSFER_SYNTAXES) for model in _QR_MODELS]
    # Modality Worklist and MPPS: acquisition tasks for standard modalities.
    contexts.append(build_context(ModalityWorklistInformationFind, ALL_TRANSFER_SYNTAXES))
    contexts.append(build_context(ModalityPerformedProcedureStep, ALL_TRANSFER_SYNTAXES))
    return contexts


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
        acquisition = AcquisitionServices(registry, bridge) if registry is not None else None
        self.services = DicomServices(settings, store, bridge, acquisition, metrics)
        # What each caller may use (gateway.scp.access), screened per request by the acceptor.
        stations = (lambda: registry.station_aes) if registry is not None else frozenset
        self.access = ServiceAccess(settings, stations)
        self._acceptor = Acceptor(settings, self.services, self.access, supported_contexts(),
                                  store.files.tmp_dir)  # fmt: skip

    @property
    def port(self) -> int:
        """The port the first listener is bound to (the plain one, unless `plain = false`)."""
        return self._acceptor.port

    @property
    def listening(self) -> bool:
        """Whether the listeners are up (between `open` and `close`)."""
        return self._acceptor.listening

    @property
    def open_associations(self) -> int:
        """Established associations (a connection still negotiating is not counted)."""
        return self._acceptor.open_associations

    async def open(self) -> None:
        """Start listening. Raises `GatewayError` naming the key of a port that is taken."""
        await self._acceptor.start()

    async def close(self, grace: float) -> None:
        """Stop listening, give open associations *grace* seconds, abort the rest."""
        aborted = await self._acceptor.stop(grace)
        log.info("dicom_node_stopped", aborted=aborted)
