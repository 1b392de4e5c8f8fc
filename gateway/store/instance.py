"""What the store learns from one received file: structure check, checksum and index attributes.

A received file is a DICOM Part 10 file: the File Meta the listener wrote, then the dataset bytes
exactly as the sender encoded them. `read_received_file` checks that the dataset's element
structure is complete (pydicom reads truncated values without complaint), hashes the dataset bytes,
and decodes the attributes the index needs with the dataset's SpecificCharacterSet.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import PersonName

from gateway.errors import InvalidInstance

__all__ = [
    "CheckedInstance",
    "IndexAttributes",
    "is_valid_uid",
    "read_received_file",
    "split_file_meta",
]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_HASH_CHUNK = 4 * 1024 * 1024
_IN_MEMORY_BYTES = 4 * 1024 * 1024  # files up to this size are read whole
_INDEXED_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
    "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "Modality", "SeriesNumber", "SeriesDescription",
    "BodyPartExamined", "SeriesDate", "SeriesTime", "InstanceNumber",
)  # fmt: skip
_TAGS = {keyword: int(Tag(keyword)) for keyword in _INDEXED_KEYWORDS}
_INDEXED_TAGS = frozenset(_TAGS.values())
_VRS = {tag: dictionary_VR(tag) for tag in _INDEXED_TAGS}  # for implicit VR datasets
_CHARSET_TAG = _TAGS["SpecificCharacterSet"]
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT"})
_TEXT_DELIMS = {0x5C}  # backslash: resets ISO 2022 escapes between values


def is_valid_uid(value: str, *, strict: bool = False) -> bool:
    """True for a UID of dot-separated digit groups, at most 64 characters.

    Real-world files carry UIDs with leading zeros in a component; they are accepted unless
    *strict*. Anything with other characters (``../../x``) is refused.
    """
    if not value or len(value) > 64:
        return False
    return bool((_UID_RE if strict else _LENIENT_UID_RE).match(value))


@dataclass(frozen=True, slots=True)
class IndexAttributes:
    """The attributes of one instance that the index keeps, decoded to text."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckedInstance:
    """A checked Part 10 file: its transfer syntax, dataset size, checksum and attributes."""

    path: Path
    transfer_syntax: str
    size: int
    checksum: str
    attributes: IndexAttributes


def split_file_meta(data: Any) -> tuple[int, str]:
    """Return (offset of the dataset, transfer syntax UID) of a Part 10 file's bytes."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 file (no DICM prefix)")
    group, elem, vr = struct.unpack_from("<HH2s", data, 132)
    if (group, elem) != (2, 0) or vr != b"UL":
        raise InvalidInstance("the File Meta has no group length")
    (meta_len,) = struct.unpack_from("<I", data, 140)
    offset = 144 + meta_len
    if offset > len(data):
        raise InvalidInstance("the File Meta is truncated")
    pos, syntax = 144, ""
    while pos + 8 <= offset:
        group, elem, vr = struct.unpack_from("<HH2s", data, pos)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8
        if (group, elem) == (2, 0x10):
            syntax = bytes(data[pos : pos + length]).decode("ascii", "replace").rstrip("\x00 ")
        pos += length
    if not syntax:
        raise InvalidInstance("the File Meta has no TransferSyntaxUID")
    return offset, syntax


_HEADERS = {  # (little endian, implicit VR) -> element header layouts
    (True, False): (struct.Struct("<I2sH"), struct.Struct("<I")),
    (False, False): (struct.Struct(">HH2sH"), struct.Struct(">I")),
    (True, True): (struct.Struct("<II"), None),
    (False, True): (struct.Struct(">HHI"), None),
}
_ITEM_HEADERS = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}


def _check_elements(
    buf: Any,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    in_item: bool,
    collect: dict[int, tuple[str, bytes]] | None = None,
) -> int:
    """Walk element headers from *pos*; return where the element list ends.

    Value lengths are checked against *end* without reading values, so a 500 MB file costs a
    handful of page reads. Undefined lengths (sequences, encapsulated pixel data) are walked
    through their items. At the top level, returns the offset of the first element at or past
    (7FE0,0010) Pixel Data instead, after checking the rest. Top-level elements whose tag is in
    `_INDEXED_TAGS` are put into *collect* undecoded, as (VR, value bytes).
    """
    header, long_length = _HEADERS[(little, implicit)]
    unpack_header = header.unpack_from
    unpack_long = long_length.unpack_from if long_length is not None else None
    pixels_at = -1
    while pos < end:
        if end - pos < 8:
            raise InvalidInstance(f"dataset truncated at byte {pos} (partial element header)")
        vr = b""
        if implicit:
            if little:
                tag, length = unpack_header(buf, pos)
                tag = ((tag & 0xFFFF) << 16) | (tag >> 16)
            else:
                group, elem, length = unpack_header(buf, pos)
                tag = (group << 16) | elem
        elif little:
            tag, vr, length = unpack_header(buf, pos)
            tag = ((tag & 0xFFFF) << 16) | (tag >> 16)  # (group, element) read as one uint32
        else:
            group, elem, vr, length = unpack_header(buf, pos)
            tag = (group << 16) | elem
        if tag == _ITEM_END and in_item:
            return pos + 8
        if not in_item and pixels_at < 0 and tag >= 0x7FE00010:
            pixels_at = pos
        if tag >> 16 == 0xFFFE:
            raise InvalidInstance(
                f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}"
            )
        if vr and vr in _LONG_VRS:
            if end - pos < 12:
                raise InvalidInstance(f"dataset truncated at byte {pos} (element header)")
            assert unpack_long is not None
            (length,) = unpack_long(buf, pos + 8)
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED:
            # Content of an undefined-length UN element is implicit VR little endian.
            if vr == b"UN":
                pos = _check_items(buf, pos, end, True, True)
            else:
                pos = _check_items(buf, pos, end, implicit, little)
            continue
        if pos + length > end:
            raise InvalidInstance(
                f"dataset truncated: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares "
                f"{length} bytes, {end - pos} remain"
            )
        if collect is not None and tag in _INDEXED_TAGS:
            collect[tag] = (vr.decode("ascii", "replace") if vr else _VRS[tag],
                            bytes(buf[pos : pos + length]))  # fmt: skip
        pos += length
    if in_item:
        raise InvalidInstance("dataset truncated inside a sequence item")
    return pixels_at if pixels_at >= 0 else pos


def _check_items(buf: Any, pos: int, end: int, implicit: bool, little: bool) -> int:
    unpack_item = _ITEM_HEADERS[little].unpack_from
    while True:
        if end - pos < 8:
            raise InvalidInstance(f"dataset truncated at byte {pos} (inside a sequence)")
        group, elem, length = unpack_item(buf, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise InvalidInstance(f"expected an item tag, found ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            pos = _check_elements(buf, pos, end, implicit, little, in_item=True)
        elif pos + length > end:
            raise InvalidInstance(f"dataset truncated: an item declares {length} bytes")
        else:
            pos += length


class _Values:
    """Text values of the collected elements, decoded with the SpecificCharacterSet."""

    def __init__(self, raw: dict[int, tuple[str, bytes]]) -> None:
        self._raw = raw
        charset = raw.get(_CHARSET_TAG)
        terms = charset[1].decode("ascii", "replace").split("\\") if charset and charset[1] else []
        try:
            self._encodings = convert_encodings([t.strip() for t in terms] or ["ISO_IR 6"])
        except LookupError as exc:
            raise InvalidInstance(f"unknown SpecificCharacterSet: {exc}") from exc

    def text(self, keyword: str) -> str | None:
        element = self._raw.get(_TAGS[keyword])
        if element is None or not element[1]:
            return None
        vr, value = element
        try:
            if value.isascii() and b"\x1b" not in value:
                text = value.decode("ascii")
            elif vr == "PN":
                text = str(PersonName(value, self._encodings))
            elif vr in _CHARSET_VRS:
                text = decode_bytes(value, self._encodings, _TEXT_DELIMS)
            else:
                text = value.decode("latin-1")
        except (UnicodeDecodeError, LookupError, ValueError) as exc:
            raise InvalidInstance(f"{keyword} cannot be decoded: {exc}") from exc
        text = text.rstrip("\x00 ").lstrip(" ") if vr not in ("UT", "ST", "LT") else text
        if vr == "PN" and not text.strip("^= "):
            return None  # a name of separators only is no name
        return text or None

    def integer(self, keyword: str) -> int | None:
        text = self.text(keyword)
        try:
            return int(text.split("\\")[0]) if text else None
        except ValueError:
            return None


def _attributes(raw: dict[int, tuple[str, bytes]]) -> IndexAttributes:
    values = _Values(raw)
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = values.text(keyword)
        if value is None:
            raise InvalidInstance(f"{keyword} is missing")
        if not is_valid_uid(value):
            raise InvalidInstance(f"{keyword} is not a valid UID: {value[:80]!r}")
        uids[keyword] = value
    text = values.text
    return IndexAttributes(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        patient={
            "patient_id": text("PatientID") or "",
            "issuer_of_patient_id": text("IssuerOfPatientID"),
            "patient_name": text("PatientName"),
            "patient_birth_date": text("PatientBirthDate"),
            "patient_sex": text("PatientSex"),
        },
        study={
            "study_date": text("StudyDate"),
            "study_time": text("StudyTime"),
            "accession_number": text("AccessionNumber"),
            "study_id": text("StudyID"),
            "study_description": text("StudyDescription"),
            "referring_physician_name": text("ReferringPhysicianName"),
        },
        series={
            "modality": text("Modality"),
            "series_number": values.integer("SeriesNumber"),
            "series_description": text("SeriesDescription"),
            "body_part_examined": text("BodyPartExamined"),
            "series_date": text("SeriesDate"),
            "series_time": text("SeriesTime"),
        },
        instance={"instance_number": values.integer("InstanceNumber")},
    )


def _check_dataset(
    buf: Any, offset: int, size: int, syntax: str, raw: dict[int, tuple[str, bytes]]
) -> None:
    """Walk the dataset's structure, collecting the indexed elements into *raw*."""
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            body = zlib.decompress(bytes(buf[offset:size]), -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InvalidInstance(f"deflated dataset cannot be inflated: {exc}") from exc
        _check_elements(body, 0, len(body), False, True, False, raw)
        return
    _check_elements(
        buf,
        offset,
        size,
        syntax == ImplicitVRLittleEndian,
        syntax != ExplicitVRBigEndian,
        False,
        raw,
    )


def read_received_file(
    path: Path, *, checksum: str | None = None, content: bytes | None = None
) -> CheckedInstance:
    """Check, hash and decode the Part 10 file at *path*.

    *checksum*, when given, is the dataset's SHA-256 computed as the file was written; the
    dataset is then not read again to hash it (for a large file only its element headers are).
    *content*, when given, is the file's bytes, checked instead of reading the file.

    Raises
    ------
    InvalidInstance
        The file is not Part 10, its dataset is truncated or undecodable, or a UID the index
        needs is missing or malformed.
    """
    if content is not None:
        return _checked_bytes(path, content, checksum)
    raw: dict[int, tuple[str, bytes]] = {}
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= _IN_MEMORY_BYTES:
            return _checked_bytes(path, fh.read(), checksum)
        # Large files: walk element headers through a map (only the pages holding headers
        # are touched) and hash through a fixed buffer, so memory stays flat.
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            offset, syntax = split_file_meta(mm)
            _check_dataset(mm, offset, size, syntax, raw)
        if checksum is None:
            digest = hashlib.sha256()
            buffer = bytearray(_HASH_CHUNK)
            fh.seek(offset)
            while count := fh.readinto(buffer):
                digest.update(memoryview(buffer)[:count])
            checksum = digest.hexdigest()
    return CheckedInstance(
        path=path,
        transfer_syntax=syntax,
        size=size - offset,
        checksum=checksum,
        attributes=_attributes(raw),
    )


def _checked_bytes(path: Path, data: bytes, checksum: str | None) -> CheckedInstance:
    """`read_received_file` on the file's bytes, *data*."""
    if not data:
        raise InvalidInstance("empty file")
    raw: dict[int, tuple[str, bytes]] = {}
    offset, syntax = split_file_meta(data)
    if checksum is None:
        checksum = hashlib.sha256(memoryview(data)[offset:]).hexdigest()
    _check_dataset(data, offset, len(data), syntax, raw)
    return CheckedInstance(
        path=path,
        transfer_syntax=syntax,
        size=len(data) - offset,
        checksum=checksum,
        attributes=_attributes(raw),
    )
