"""DIMSE command sets coded without a pydicom Dataset (PS3.7 section 9.3, 10.3, Annex E).

A command set is always Implicit VR Little Endian, its elements in ascending tag order behind
(0000,0000) Command Group Length. The few commands the gateway sends on every instance (the
C-STORE request of a sub-operation or a dispatch, and every response) are packed here from
plain values: measured on this project's machine, building and encoding an eight-element
C-STORE-RQ as a pydicom Dataset takes ~300 us, packing it ~4 us. Requests sent rarely
(C-FIND, C-MOVE, C-GET, C-ECHO as requestor) use `gateway.net.association.encode_command` on
a pydicom Dataset instead.

Every command set received is decoded here (`decode_command`) into a `Command`: decoding one
through pydicom and reading its elements as Dataset attributes was a third of the event
loop's time while four associations sent small instances (profile in docs/performance.md).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_FIND_RQ",
    "C_GET_RQ",
    "C_MOVE_RQ",
    "C_STORE_RQ",
    "N_CREATE_RQ",
    "N_SET_RQ",
    "Command",
    "SubOperations",
    "c_store_rq",
    "decode_command",
    "response",
    "uid_value",
]

# Command Field values (PS3.7 E.1); a response is its request's value | 0x8000.
C_STORE_RQ: Final = 0x0001
C_GET_RQ: Final = 0x0010
C_FIND_RQ: Final = 0x0020
C_MOVE_RQ: Final = 0x0021
C_ECHO_RQ: Final = 0x0030
C_CANCEL_RQ: Final = 0x0FFF
N_SET_RQ: Final = 0x0120
N_CREATE_RQ: Final = 0x0140


def uid_value(uid: str) -> bytes:
    """A UI value as encoded: ASCII, padded with NUL to an even length (PS3.5 6.2)."""
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _ae_value(title: str) -> bytes:
    """An AE value: ASCII, padded with a space to an even length (PS3.5 6.2)."""
    raw = title.encode("ascii", "replace")[:16]
    return raw + b" " if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    """Group 0000 elements (element number, value), in ascending order, with the group
    length before them."""
    body = b"".join(struct.pack("<HHI", 0, elem, len(v)) + v for elem, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


class SubOperations:
    """The counts of a C-MOVE's or C-GET's C-STORE sub-operations (PS3.4 C.4.2.1.5,
    C.4.3.1.5); each is an US value, so at most 65535."""

    __slots__ = ("completed", "failed", "remaining", "warning")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.completed = 0
        self.failed = 0
        self.warning = 0


def response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class: str = "",
    sop_instance: str = "",
    *,
    has_data: bool = False,
    counts: SubOperations | None = None,
    remaining: bool = True,
) -> bytes:
    """A response's command set: Affected SOP Class UID, Command Field, Message ID Being
    Responded To, Command Data Set Type (0x0101: none; 0x0001 with *has_data*), Status,
    Affected SOP Instance UID, and for a C-MOVE / C-GET response the Number of Remaining (unless
    not *remaining*: a final response has none but after a cancel, PS3.4 C.4.2.3.1),
    Completed, Failed and Warning Sub-operations."""
    elements: list[tuple[int, bytes]] = []
    if sop_class:
        elements.append((0x0002, uid_value(sop_class)))
    elements += [
        (0x0100, _us(command_field)),
        (0x0120, _us(message_id)),
        (0x0800, b"\x01\x00" if has_data else b"\x01\x01"),
        (0x0900, _us(status)),
    ]
    if sop_instance:
        elements.append((0x1000, uid_value(sop_instance)))
    if counts is not None:
        if remaining:
            elements.append((0x1020, _us(counts.remaining)))
        elements += [(0x1021, _us(counts.completed)), (0x1022, _us(counts.failed)),
                     (0x1023, _us(counts.warning))]  # fmt: skip
    return _command(elements)


def c_store_rq(
    message_id: int,
    sop_class: str,
    sop_instance: str,
    *,
    priority: int = 0x0000,
    move_originator: tuple[str, int] | None = None,
) -> bytes:
    """A C-STORE-RQ's command set (PS3.7 9.3.1.1), a data set following; *move_originator*
    is the (AE title, Message ID) of the C-MOVE a sub-operation serves."""
    elements = [
        (0x0002, uid_value(sop_class)),
        (0x0100, _us(C_STORE_RQ)),
        (0x0110, _us(message_id)),
        (0x0700, _us(priority)),
        (0x0800, b"\x01\x00"),
        (0x1000, uid_value(sop_instance)),
    ]
    if move_originator is not None:
        title, originator_id = move_originator
        elements += [(0x1030, _ae_value(title)), (0x1031, _us(originator_id))]
    return _command(elements)


# Group 0000 of the data dictionary (PS3.7 E.1, E.2 for the retired), as met: element ->
# (keyword, VR). Only the dictionary's elements are kept: one a peer makes up is looked up
# each time, so no peer grows this beyond the dictionary.
_COMMAND_ELEMENTS: dict[int, tuple[str, str]] = {}
_HEADER = struct.Struct("<HHI")
_NUMBERS: Final = {"US": "H", "UL": "I", "SS": "h", "SL": "i"}


class Command:
    """A received command set (PS3.7 E.1): each element by its keyword, as an attribute or
    with `get`: US and UL values as int, UI / AE / LO and the other text as str (padding
    removed), AT as an int (group << 16 | element) or a list of them for VM > 1, an empty
    value as None, an element outside the dictionary as its bytes under ``"(0000,eeee)"``.
    A keyword the command set does not carry raises AttributeError."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self._values[keyword]
        except KeyError:
            raise AttributeError(f"the command set has no {keyword}") from None

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values

    def __repr__(self) -> str:
        return f"Command({self._values!r})"


def decode_command(data: bytes | bytearray) -> Command:
    """The command set in *data* (Implicit VR Little Endian, group 0000 only). Raises
    ValueError for an element that runs past the end, an undefined length or an element
    outside group 0000."""
    values: dict[str, Any] = {}
    view = memoryview(data)
    end = len(view)
    pos = 0
    while pos < end:
        if end - pos < 8:
            raise ValueError("a command set ends inside an element header")
        group, elem, length = _HEADER.unpack_from(view, pos)
        pos += 8
        if group != 0:
            raise ValueError(f"a command set element ({group:04X},{elem:04X}) outside group 0000")
        if length > end - pos:  # an undefined length (0xFFFFFFFF) included
            raise ValueError(f"command element (0000,{elem:04X}) runs past the command set")
        raw = bytes(view[pos : pos + length])
        pos += length
        known = _COMMAND_ELEMENTS.get(elem) or _dictionary_entry(elem)
        if known is None:
            values[f"(0000,{elem:04X})"] = raw
            continue
        keyword, vr = known
        values[keyword] = _value(raw, vr)
    return Command(values)


def _dictionary_entry(elem: int) -> tuple[str, str] | None:
    if not dictionary_has_tag(elem):
        return None
    entry = _COMMAND_ELEMENTS[elem] = dictionary_keyword(elem), dictionary_VR(elem)
    return entry


def _value(raw: bytes, vr: str) -> Any:
    if not raw:
        return None
    number = _NUMBERS.get(vr)
    if number is not None:
        size = struct.calcsize(number)
        if len(raw) % size:
            raise ValueError(f"a {vr} value of {len(raw)} bytes")
        numbers = struct.unpack(f"<{len(raw) // size}{number}", raw)
        return numbers[0] if len(numbers) == 1 else list(numbers)
    if vr == "AT":
        if len(raw) % 4:
            raise ValueError(f"an AT value of {len(raw)} bytes")
        pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
        tags = [pairs[n] << 16 | pairs[n + 1] for n in range(0, len(pairs), 2)]
        return tags[0] if len(tags) == 1 else tags
    text = raw.decode("latin-1").rstrip("\x00 ")
    if vr == "UI":
        return text
    return text.strip() if vr == "AE" else text
