"""PDU framing of PS3.8 section 9.3: reading PDUs with bounds, and the fixed-layout PDUs.

Every PDU starts with a 6-byte header: type (1 byte), reserved (1), length (4, big endian) of
what follows. `read_pdu` reads one from an asyncio stream and refuses, before reading its body,
one longer than the reader allows (`PduTooLong`: the negotiated maximum for P-DATA-TF, a fixed
bound for the rest), so a peer cannot make the gateway buffer what it claims. A-ASSOCIATE-RQ,
-AC and -RJ are decoded and encoded by pynetdicom's PDU classes (`pynetdicom.pdu`: their items
are many and variable); the PDUs with a fixed layout (P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT) are
encoded here with `struct`, which is what each DIMSE message costs on the wire.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from gateway.errors import GatewayError
from gateway.net.fsm import Event

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "EVENT_OF",
    "MAX_NEGOTIATION_PDU",
    "P_DATA_TF",
    "AbortReason",
    "Pdu",
    "PduTooLong",
    "Pdv",
    "abort_pdu",
    "p_data_tf",
    "pdvs",
    "read_pdu",
    "release_rp",
    "release_rq",
]

A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07

# The state machine's event for a PDU of each type (PS3.8 Table 9-2); any other type is Evt19.
EVENT_OF: Final[dict[int, Event]] = {
    A_ASSOCIATE_RQ: Event.A_ASSOCIATE_RQ_PDU,
    A_ASSOCIATE_AC: Event.A_ASSOCIATE_AC_PDU,
    A_ASSOCIATE_RJ: Event.A_ASSOCIATE_RJ_PDU,
    P_DATA_TF: Event.P_DATA_TF_PDU,
    A_RELEASE_RQ: Event.A_RELEASE_RQ_PDU,
    A_RELEASE_RP: Event.A_RELEASE_RP_PDU,
    A_ABORT: Event.A_ABORT_PDU,
}
# Bytes after the header the other PDUs may have. An A-ASSOCIATE-RQ of 128 presentation
# contexts with 20 transfer syntaxes each and user identity is well under it.
MAX_NEGOTIATION_PDU: Final = 1 << 20
_FIXED_LENGTH: Final = {A_RELEASE_RQ: 4, A_RELEASE_RP: 4, A_ABORT: 4}
_HEADER: Final = struct.Struct(">BxI")
_PDV_HEADER: Final = struct.Struct(">IBB")


class AbortReason:
    """A-ABORT Reason/Diagnostic values with source 2, the service provider (PS3.8 9.3.8)."""

    NOT_SPECIFIED: Final = 0
    UNRECOGNIZED_PDU: Final = 1
    UNEXPECTED_PDU: Final = 2
    UNRECOGNIZED_PARAMETER: Final = 4
    UNEXPECTED_PARAMETER: Final = 5
    INVALID_PARAMETER: Final = 6


class PduTooLong(GatewayError):
    """A PDU announced a length over what the reader allows (its body was not read)."""

    def __init__(self, pdu_type: int, length: int, limit: int) -> None:
        super().__init__(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds {limit}")
        self.pdu_type = pdu_type
        self.length = length
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Pdu:
    """One PDU as read: its type, and its bytes after the 6-byte header."""

    type: int
    body: bytes

    @property
    def event(self) -> Event:
        """The state machine's event for it (Evt19 for an unknown type or a bad length)."""
        event = EVENT_OF.get(self.type, Event.INVALID_PDU)
        fixed = _FIXED_LENGTH.get(self.type)
        if fixed is not None and len(self.body) != fixed:
            return Event.INVALID_PDU
        return event

    def encoded(self) -> bytes:
        """The whole PDU, header included (what pynetdicom's `PDU.decode` takes)."""
        return _HEADER.pack(self.type, len(self.body)) + self.body


async def read_pdu(reader: asyncio.StreamReader, max_p_data: int) -> Pdu:
    """Read one PDU. A P-DATA-TF may carry at most *max_p_data* bytes after its header (the
    maximum length this side negotiated; 0: no limit), any other PDU `MAX_NEGOTIATION_PDU`.

    Raises `PduTooLong` (the body left unread), `asyncio.IncompleteReadError` when the peer
    closes mid-PDU, and what the stream raises.
    """
    pdu_type, length = _HEADER.unpack(await reader.readexactly(6))
    limit = (max_p_data or (1 << 32)) if pdu_type == P_DATA_TF else MAX_NEGOTIATION_PDU
    if length > limit:
        raise PduTooLong(pdu_type, length, limit)
    return Pdu(pdu_type, await reader.readexactly(length) if length else b"")


@dataclass(frozen=True, slots=True)
class Pdv:
    """A presentation data value item of a P-DATA-TF (PS3.8 9.3.5.1, Annex E.2)."""

    context_id: int
    command: bool  # the Message Control Header's bit 0: a command fragment, else data set
    last: bool  # bit 1: the message's last fragment of this kind
    data: memoryview


def pdvs(body: bytes) -> Iterator[Pdv]:
    """The PDV items of a P-DATA-TF's body, in order. Raises ValueError for an item whose
    length runs past the PDU or is under 2 (context ID and control header), or a PDU with
    no item."""
    view = memoryview(body)
    offset, end = 0, len(body)
    if end == 0:
        raise ValueError("a P-DATA-TF with no presentation data value")
    while offset < end:
        if end - offset < 6:
            raise ValueError("a truncated presentation data value item")
        length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"a presentation data value item of length {length} in {end} bytes")
        yield Pdv(context_id, bool(control & 1), bool(control & 2),
                  view[offset + 6 : offset + 4 + length])  # fmt: skip
        offset += 4 + length


def p_data_tf(context_id: int, command: bool, last: bool, data: bytes | memoryview) -> bytes:
    """A P-DATA-TF PDU of one PDV item."""
    control = (1 if command else 0) | (2 if last else 0)
    return b"".join(
        (
            _HEADER.pack(P_DATA_TF, len(data) + 6),
            _PDV_HEADER.pack(len(data) + 2, context_id, control),
            data,
        )
    )


def release_rq() -> bytes:
    return _HEADER.pack(A_RELEASE_RQ, 4) + b"\x00" * 4


def release_rp() -> bytes:
    return _HEADER.pack(A_RELEASE_RP, 4) + b"\x00" * 4


def abort_pdu(source: int, reason: int = 0) -> bytes:
    """A-ABORT: *source* 0 the service user (reason then 0), 2 the service provider."""
    return _HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason if source == 2 else 0))
