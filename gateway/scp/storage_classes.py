"""The Storage SOP Classes the gateway accepts and proposes (PS3.4 Annex B, PS3.6 Annex A).

Every Storage SOP Class of the Storage Service Class in the DICOM registry, retired ones
included: older ultrasound and nuclear medicine equipment still sends the retired classes
(Ultrasound Image Storage 1.2.840.10008.5.1.4.1.1.6, Nuclear Medicine Image Storage ...1.5) and
archives hold them. pynetdicom's tables list the current ones; the retired ones are listed here
and accepted like the others by the node and by a C-GET of retrieval. Private and unknown
classes are `[node] accept_unknown_sop_classes`.
"""

from __future__ import annotations

from pynetdicom import AllStoragePresentationContexts

__all__ = ["RETIRED_STORAGE_CLASSES", "STORAGE_SOP_CLASSES"]

# Retired Storage SOP Classes of PS3.6 Table A-1 that pynetdicom does not know: (UID, keyword).
RETIRED_STORAGE_CLASSES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.1.27", "StoredPrintStorage"),
    ("1.2.840.10008.5.1.1.29", "HardcopyGrayscaleImageStorage"),
    ("1.2.840.10008.5.1.1.30", "HardcopyColorImageStorage"),
    ("1.2.840.10008.5.1.4.1.1.3", "UltrasoundMultiFrameImageStorageRetired"),
    ("1.2.840.10008.5.1.4.1.1.5", "NuclearMedicineImageStorageRetired"),
    ("1.2.840.10008.5.1.4.1.1.6", "UltrasoundImageStorageRetired"),
    ("1.2.840.10008.5.1.4.1.1.8", "StandaloneOverlayStorage"),
    ("1.2.840.10008.5.1.4.1.1.9", "StandaloneCurveStorage"),
    ("1.2.840.10008.5.1.4.1.1.9.1", "WaveformStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.10", "StandaloneModalityLUTStorage"),
    ("1.2.840.10008.5.1.4.1.1.11", "StandaloneVOILUTStorage"),
    ("1.2.840.10008.5.1.4.1.1.12.3", "XRayAngiographicBiPlaneImageStorage"),
    ("1.2.840.10008.5.1.4.1.1.77.1", "VLImageStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.77.2", "VLMultiFrameImageStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.88.1", "TextSRStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.88.2", "AudioSRStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.88.3", "DetailSRStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.88.4", "ComprehensiveSRStorageTrial"),
    ("1.2.840.10008.5.1.4.1.1.129", "StandalonePETCurveStorage"),
    ("1.2.840.10008.5.1.4.34.1", "RTBeamsDeliveryInstructionStorageTrial"),
)

# Every Storage SOP Class UID, pynetdicom's current ones first (the order contexts are listed).
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        + [uid for uid, _ in RETIRED_STORAGE_CLASSES]
    )
)
