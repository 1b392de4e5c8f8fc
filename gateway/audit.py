"""The audit trail: who did what with which studies, as append-only JSON lines.

One file a day under `data_dir/audit/` (`audit-YYYYMMDD.jsonl`), opened for appending only,
one record per line written whole and flushed to the kernel before the call returns. Each record
carries the DICOM PS3.15 A.5 / IHE ATNA event it is an instance of, where one applies (`code`,
`event`), the UTC time, its outcome, who (calling and called AE titles, address; a control
session's role and device), and the studies concerned:

| code | event | when |
|---|---|---|
| 110100 | Application Activity | the gateway starts, stops, reloads its configuration |
| 110107 | Import | an association stored instances (one record per association, its studies) |
| 110112 | Query | a C-FIND (its level and the keys it matched on, never their values) |
| 110104 | DICOM Instances Transferred | C-MOVE, C-GET, dispatch to a peer (retrieval forward too) |
| 110105 | DICOM Study Deleted | `studies.delete`, retention |
| 110114 | User Authentication | a control-socket login, accepted or refused |
| 110113 | Security Alert | a refused association, a refused service, a failed TLS handshake |
| (none) | Association Accepted | every accepted association |

Patient names never appear. Writing never raises into the work it records: a failed write is
logged as `audit_write_failed`. With `[audit] syslog` each record is also sent to a collector as
an RFC 5424 message (facility 10, security/authorization; severity notice, or warning for a
Security Alert; APP-NAME `dicom-gateway`, MSGID the event code, the record as JSON as MSG).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

__all__ = ["EVENTS", "AuditLog", "read_records"]

log = structlog.get_logger(__name__)

# Event name -> DICOM / IHE ATNA EventID code (DCM coding scheme), None where none applies.
EVENTS: dict[str, str | None] = {
    "Application Activity": "110100",
    "Import": "110107",
    "Query": "110112",
    "DICOM Instances Transferred": "110104",
    "DICOM Study Deleted": "110105",
    "User Authentication": "110114",
    "Security Alert": "110113",
    "Association Accepted": None,
}


@dataclass(frozen=True, slots=True)
class _Day:
    stamp: str
    fd: int


class AuditLog:
    """Appends audit records under *directory*; safe from any thread."""

    def __init__(self, directory: Path, syslog: tuple[str, str, int] | None = None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._day: _Day | None = None
        self._syslog = syslog
        self._sock: socket.socket | None = None
        self._hostname = socket.gethostname() or "-"

    def record(
        self,
        event: str,
        *,
        outcome: str = "success",
        studies: Iterable[str] = (),
        **details: Any,
    ) -> None:
        """Append one record of *event* (a key of `EVENTS`); *details* are JSON values
        (`calling_ae`, `called_ae`, `address`, `reason`...). Never raises."""
        now = time.time()
        entry = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "code": EVENTS.get(event),
            "outcome": outcome,
            **{key: value for key, value in details.items() if value is not None},
            "studies": sorted(set(studies)),
        }
        text = json.dumps(entry, default=str, ensure_ascii=False)
        try:
            with self._lock:
                os.write(self._fd_for(now), (text + "\n").encode("utf-8"))
        except OSError as exc:
            log.error("audit_write_failed", event=event, error=str(exc))
        if self._syslog is not None:
            self._send(entry, text)

    def _send(self, entry: dict[str, Any], text: str) -> None:
        """One RFC 5424 message in one UDP datagram (RFC 5426)."""
        severity = 4 if entry["event"] == "Security Alert" else 5
        message = (
            f"<{10 * 8 + severity}>1 {entry['time']} {self._hostname} dicom-gateway"
            f" {os.getpid()} {entry['code'] or '-'} - {text}"
        ).encode()
        assert self._syslog is not None
        _, host, port = self._syslog
        try:
            with self._lock:
                if self._sock is None:
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                    sock.connect((host, port))
                    self._sock = sock
                self._sock.send(message)
        except OSError as exc:
            log.warning("audit_syslog_failed", error=str(exc))
            with self._lock:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None

    def _fd_for(self, now: float) -> int:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
        if self._day is None or self._day.stamp != stamp:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"audit-{stamp}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if self._day is not None:
                os.close(self._day.fd)
            self._day = _Day(stamp, fd)
        return self._day.fd

    def close(self) -> None:
        with self._lock:
            if self._day is not None:
                os.close(self._day.fd)
                self._day = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def read_records(
    directory: Path,
    *,
    since: datetime | None = None,
    event: str | None = None,
    study: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The records under *directory*, oldest first, those at or after *since* (aware), of
    *event* (its name or its code), concerning *study*."""
    since_stamp = since.astimezone(UTC).strftime("%Y%m%d") if since else ""
    for path in sorted(directory.glob("audit-*.jsonl")):
        if path.stem.removeprefix("audit-") < since_stamp:
            continue
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if since and datetime.fromisoformat(entry["time"]) < since:
                    continue
                if event and event not in (entry.get("event"), entry.get("code")):
                    continue
                if study and study not in entry.get("studies", ()):
                    continue
                yield entry
