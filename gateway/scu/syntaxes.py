"""Transfer syntaxes of outbound C-STOREs: what is proposed, and what goes out on what was accepted.

Every path that sends stored instances (dispatch, the retrieval forward, C-MOVE and C-GET
sub-operations) proposes and chooses here:

- `storage_contexts` proposes, per SOP class, one presentation context for each transfer syntax
  the instances are stored in, and (unless the peer is configured with ``transcode = false``)
  one more offering the uncompressed syntaxes, Explicit then Implicit VR Little Endian. The peer
  accepts a context per syntax it takes (PS3.8 9.3.2.2), so it can take the stored syntax and
  still have an uncompressed fallback.
- `outgoing` picks what to send for one instance on an established association: the stored file
  itself, bytes unchanged, when a context of its SOP class accepted its stored syntax; otherwise
  the dataset re-encoded in an accepted uncompressed syntax (Explicit VR Little Endian
  preferred), decompressed first if it is stored compressed (JPEG baseline, extended and
  lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE, through pydicom and its pylibjpeg plugins) or
  byte-swapped if it is stored as Explicit VR Big Endian. Nothing is ever compressed, so lossy
  data is never compressed again; a decompressed lossy image keeps Lossy Image Compression
  "01" (PS3.3 C.7.6.1.1.5). The SOP Instance UID never changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pynetdicom.presentation import PresentationContext, build_context

from gateway.errors import PeerError
from gateway.store.store import StoredInstance

__all__ = [
    "MAX_CONTEXTS",
    "UNCOMPRESSED",
    "context_count",
    "named",
    "outgoing",
    "reencode",
    "storage_contexts",
]

# Presentation contexts in one association at most (PS3.8 9.3.2.2: odd context IDs 1-255).
MAX_CONTEXTS = 128

# What a peer that takes none of an instance's stored syntaxes is offered, in order of preference.
UNCOMPRESSED: tuple[str, ...] = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# Syntaxes that are lossy whatever their parameters (JPEG 2000 and HTJ2K "Image Compression" may
# be either, and the image then says which in Lossy Image Compression).
_LOSSY = frozenset({str(JPEGBaseline8Bit), str(JPEGExtended12Bit), str(JPEGLSNearLossless)})

# Byte width of the values of each swappable VR (PS3.5 7.3): OB and UN are bytes as they are.
_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def named(uid: str) -> str:
    """A UID with its registry name, where it has one: ``CT Image Storage (1.2.840...)``."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def _by_class(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    by_class: dict[str, list[str]] = {}
    for sop_class, syntax in pairs:
        syntaxes = by_class.setdefault(sop_class, [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    return by_class


def context_count(pairs: Iterable[tuple[str, str]], *, transcode: bool) -> int:
    """How many presentation contexts `storage_contexts` proposes for these (SOP class,
    stored transfer syntax) pairs."""
    by_class = _by_class(pairs)
    return sum(len(syntaxes) for syntaxes in by_class.values()) + (
        len(by_class) if transcode else 0
    )


def storage_contexts(
    pairs: Iterable[tuple[str, str]], *, transcode: bool, limit: int = MAX_CONTEXTS
) -> list[PresentationContext]:
    """The presentation contexts to propose for instances of these (SOP class, stored transfer
    syntax) pairs: one per pair, then with *transcode* one per SOP class offering
    `UNCOMPRESSED`; at most *limit* of them (PS3.8 9.3.2.2: context IDs are odd numbers 1-255),
    the stored syntaxes first so that what is cut is a fallback."""
    by_class = _by_class(pairs)
    contexts = [
        build_context(sop_class, syntax)
        for sop_class, syntaxes in by_class.items()
        for syntax in syntaxes
    ]
    if transcode:
        contexts += [build_context(sop_class, list(UNCOMPRESSED)) for sop_class in by_class]
    return contexts[:limit]


def _proposed(instance: StoredInstance, transcode: bool) -> str:
    syntaxes = [instance.transfer_syntax]
    if transcode:
        syntaxes += [s for s in UNCOMPRESSED if s != instance.transfer_syntax]
    return ", ".join(named(s) for s in syntaxes)


def outgoing(
    instance: StoredInstance,
    accepted: Sequence[PresentationContext],
    *,
    transcode: bool,
    peer: str,
) -> Path | Dataset:
    """What to C-STORE for *instance* on an association whose *accepted* contexts are these:
    its file (sent as stored) or its dataset re-encoded in an accepted uncompressed syntax.

    Raises
    ------
    PeerError
        ``no_context`` when no context of its SOP class accepted its stored syntax nor (with
        *transcode*) an uncompressed one, naming the class and the syntaxes proposed;
        ``transcode`` (permanent) when the dataset cannot be decoded.
    """
    usable = [
        str(cx.transfer_syntax[0])
        for cx in accepted
        if cx.abstract_syntax == instance.sop_class_uid and cx.as_scu
    ]
    if instance.transfer_syntax in usable:
        return instance.path
    target = next((s for s in UNCOMPRESSED if s in usable), None) if transcode else None
    if target is None:
        limit = "" if transcode else " (transcode = false: stored syntaxes only)"
        raise PeerError(
            "no_context",
            f"peer {peer} accepted no presentation context for {named(instance.sop_class_uid)}"
            f" in {named(instance.transfer_syntax)} (proposed: {_proposed(instance, transcode)})"
            f"{limit}",
        )
    return reencode(instance.path, target)


def reencode(path: Path, target: str) -> Dataset:
    """The dataset of the file at *path*, ready to be sent in the uncompressed syntax *target*.

    Raises
    ------
    PeerError
        ``transcode`` (permanent) when the file cannot be read or its pixel data decoded (a
        syntax no installed decoder handles, or corrupt data).
    """
    stored = "the stored syntax"
    try:
        ds = dcmread(path)
        stored = named(str(ds.file_meta.TransferSyntaxUID))
        _decode_all(ds)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if syntax.is_encapsulated and "PixelData" in ds:
            # pydicom's decoders; the instance keeps its UID (a transfer syntax is only how the
            # same instance is encoded). Colour JPEG in YBR comes out as RGB.
            ds.decompress(generate_instance_uid=False)
            if str(syntax) in _LOSSY and "LossyImageCompression" not in ds:
                ds.LossyImageCompression = "01"
        elif syntax == ExplicitVRBigEndian:
            _to_little_endian(ds)
    except Exception as exc:  # pydicom and its plugins raise many kinds on bad data
        raise PeerError(
            "transcode",
            f"{path.name}: cannot re-encode {stored} as {named(target)}: {exc}",
            permanent=True,
        ) from exc
    syntax = UID(target)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.set_original_encoding(
        syntax.is_implicit_VR, syntax.is_little_endian, ds.original_character_set
    )
    return ds


def _decode_all(ds: Dataset) -> None:
    """Decode every element of *ds*, sequences included (pydicom writes an element it has not
    decoded as the bytes it read, in the encoding it read them), and drop Group Length elements
    (gggg,0000): retired outside the command set (PS3.5 7.2), and wrong once re-encoded."""
    for elem in list(ds):
        if elem.tag.element == 0x0000:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item)


def _to_little_endian(ds: Dataset) -> None:
    """Swap the bytes of every word-valued OW/OF/OL/OD/OV element of *ds* read as big endian.

    Reading each element decodes it with the encoding it was read in (numbers and text need no
    swap once decoded); bytes values are kept as read, so their words are swapped here. Pixel
    Data swaps by its Bits Allocated (a 32-bit image in OW is 4-byte words)."""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _to_little_endian(item)
            continue
        width = _WIDTH.get(str(elem.VR))
        if elem.tag == 0x7FE00010 and bits in (16, 32, 64):
            width = bits // 8
        elif elem.tag == 0x7FE00010 and bits == 8:
            width = None  # 8-bit samples are bytes in either order
        if width and isinstance(elem.value, bytes) and elem.value:
            elem.value = (
                np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
            )
