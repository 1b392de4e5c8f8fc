"""Which DICOM services a caller may use, decided per request.

A caller is known by its calling AE title (and, where `[security] allowed_callers` binds that
title to a host, by coming from that host, which the association's acceptance already checked):

- a `[[peers]]` entry with that `ae_title`: its `services`, or every service without the key
  (as Orthanc's known modalities may use all);
- a registered device's station AE title: echo, store, worklist, mpps;
- anyone else: `[security] default_services` (default echo and store: an unknown modality may
  send, but neither query, retrieve nor read the worklist, which holds patient names).

A title that is several of these gets the union. The association and its presentation
contexts are accepted as negotiated; a request for a service the caller may not use is answered
0x0124 (Refused: Not Authorized, PS3.7 C.5.X) by the transport, and the association goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pynetdicom.sop_class import ModalityWorklistInformationFind

from gateway.audit import AuditLog
from gateway.config import DEVICE_SERVICES, SERVICES, Settings

__all__ = ["Grant", "ServiceAccess", "log_refusal", "service_of"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one caller may use, and who the gateway took it for (for the refusal's log)."""

    services: frozenset[str]
    caller: str  # "peer pacs", "device station", "peer ws1 and device station", "unknown caller"


class ServiceAccess:
    """The services each calling AE title may use, from the settings and the device registry.

    *stations* gives the station AE titles of the registered devices now (read on each new
    association, so a device registered while the gateway runs is known at once).
    """

    def __init__(
        self, settings: Settings, stations: Callable[[], frozenset[str]] = frozenset
    ) -> None:
        self._stations = stations
        self.use(settings)

    def use(self, settings: Settings) -> None:
        """Take the peers and defaults of *settings* (at start and on each reload)."""
        by_title: dict[str, list[tuple[str, frozenset[str]]]] = {}
        for peer in settings.peers:
            services = SERVICES if peer.services is None else peer.services
            by_title.setdefault(peer.ae_title, []).append((peer.name, frozenset(services)))
        self._peers = by_title
        self._default = frozenset(settings.security.default_services)

    def grant(self, calling_ae: str) -> Grant:
        """What *calling_ae* (as received, padding stripped here) may use."""
        title = calling_ae.strip()
        services: set[str] = set()
        who: list[str] = []
        for name, allowed in self._peers.get(title, ()):
            services |= allowed
            who.append(f"peer {name}")
        if title and title in self._stations():
            services |= set(DEVICE_SERVICES)
            who.append("device station")
        if not who:
            return Grant(self._default, "unknown caller")
        return Grant(frozenset(services), " and ".join(who))


def service_of(message_type: str, sop_class: str) -> str | None:
    """The service a DIMSE request belongs to, by its message type (``C_FIND``...) and SOP
    class; None for one this module does not govern."""
    if message_type == "C_FIND":
        return "worklist" if sop_class == ModalityWorklistInformationFind else "find"
    return _BY_MESSAGE.get(message_type)


_BY_MESSAGE = {
    "C_ECHO": "echo",
    "C_STORE": "store",
    "C_MOVE": "move",
    "C_GET": "get",
    "N_CREATE": "mpps",
    "N_SET": "mpps",
}


def log_refusal(
    grant: Grant, service: str, calling_ae: str, address: str | None, audit: AuditLog | None
) -> None:
    """Log (and audit) a request refused 0x0124 because *grant* does not cover *service*."""
    log.warning(
        "service_refused",
        calling_ae=calling_ae.strip(),
        peer=address,
        service=service,
        status="0x0124",
        reason=f"{grant.caller} may use {', '.join(sorted(grant.services))}",
    )
    if audit is not None:
        audit.record("Security Alert", outcome="refused", what="service refused",
                     service=service, calling_ae=calling_ae.strip(), address=address,
                     reason=f"{grant.caller} may not use {service}")  # fmt: skip
