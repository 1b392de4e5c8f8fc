"""Who may associate with the node: the association policy the acceptor applies to each
A-ASSOCIATE-RQ (PS3.8 9.3.4), before any presentation context is looked at."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import CallerSettings

__all__ = ["AssociationPolicy"]


@dataclass(frozen=True, slots=True)
class AssociationPolicy:
    """Who may associate with the node: the called AE title (unless `check_called_ae` is
    off), the calling AE titles of `[security] allowed_callers` bound to their hosts, and
    `[node] max_associations` established at once."""

    ae_title: str
    check_called_ae: bool
    allowed_callers: tuple[CallerSettings, ...]
    max_associations: int

    def rejection(
        self, calling: str, called: str, host: str, active: int
    ) -> tuple[str, int, int, int] | None:
        """(reason, result, source, diagnostic) of the A-ASSOCIATE-RJ when the association
        must be refused (*active*: established associations counting this one); else None.
        A full node is a transient rejection (result 2, source 3, reason 2): try again."""
        if self.check_called_ae and called.strip() != self.ae_title:
            return ("called_ae_title_not_recognised", 0x01, 0x01, 0x07)
        if self.allowed_callers:
            calling = calling.strip()
            matches = [c for c in self.allowed_callers if c.ae_title == calling]
            if not matches:
                return ("calling_ae_title_not_allowed", 0x01, 0x01, 0x03)
            if not any(c.host is None or c.host == host for c in matches):
                return ("calling_host_not_allowed", 0x01, 0x01, 0x03)
        if active > self.max_associations:
            return ("association_limit_reached", 0x02, 0x03, 0x02)
        return None
