"""Modality Worklist (C-FIND) and MPPS (N-CREATE, N-SET) service providers.

Called on the node's association threads; the registry's async methods run on the event loop
through the `LoopBridge`.

Worklist: NEW and STARTED acquisition tasks are the items. The matching keys are PatientID,
PatientName (case-insensitive, wildcards), AccessionNumber, StudyInstanceUID,
RequestedProcedureID, and inside ScheduledProcedureStepSequence: ScheduledStationAETitle,
Modality, ScheduledProcedureStepStartDate and -Time (ranges), ScheduledProcedureStepID; with the
matching rules of `gateway.store.query`. Every item carries every Type 1 and Type 2 return key
of the Modality Worklist Information Model (PS3.4 K.6.1.2.2), plus any other requested key,
empty.

MPPS (PS3.4 F.7): an N-CREATE must be IN PROGRESS; its Scheduled Step Attributes name the task
(ScheduledProcedureStepID, else AccessionNumber, else StudyInstanceUID), which becomes
INPROGRESS. An N-SET to COMPLETED finishes the task; to DISCONTINUED sets it ERROR with the
discontinuation reason. A repeated N-CREATE answers 0x0111, an N-SET of an unknown instance
0x0112, an N-SET after COMPLETED or DISCONTINUED 0x0110. The two may arrive on different
associations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import structlog
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from gateway.acquire.registry import AcquisitionError, Registry
from gateway.errors import GatewayError
from gateway.scp.bridge import LoopBridge
from gateway.store.query import QueryError, match_term

__all__ = ["AcquisitionServices"]

log = structlog.get_logger(__name__)

# keyword -> (kind, SQL column) for the top-level and the step-level matching keys
_TOP_KEYS: dict[str, tuple[Any, str]] = {
    "PatientID": ("text", "t.patient_id"),
    "PatientName": ("pn", "t.patient_name"),
    "AccessionNumber": ("text", "t.accession_number"),
    "StudyInstanceUID": ("uid", "t.study_uid"),
    "RequestedProcedureID": ("text", "t.requested_procedure_id"),
}
_STEP_KEYS: dict[str, tuple[Any, str]] = {
    "ScheduledStationAETitle": ("text", "d.station_ae"),
    "Modality": ("text", "d.modality"),
    "ScheduledProcedureStepStartDate": ("date", "t.scheduled_date"),
    "ScheduledProcedureStepStartTime": ("time", "t.scheduled_time"),
    "ScheduledProcedureStepID": ("text", "t.sps_id"),
}


def _values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip() for v in items if str(v).strip() not in ("", "*")]


def _where(identifier: Dataset) -> tuple[str, list[object]]:
    terms: list[str] = ["1"]
    params: list[object] = []

    def add(dataset: Dataset, keys: dict[str, tuple[Any, str]]) -> None:
        for keyword, (kind, column) in keys.items():
            if keyword in dataset:
                values = _values(dataset[keyword])
                if values:
                    term, term_params = match_term(kind, column, values, keyword)
                    terms.append(term)
                    params.extend(term_params)

    add(identifier, _TOP_KEYS)
    steps = identifier.get("ScheduledProcedureStepSequence")
    if steps:
        add(steps[0], _STEP_KEYS)
    return " AND ".join(terms), params


def _item(task: dict[str, Any], identifier: Dataset) -> Dataset:
    step = Dataset()
    step.ScheduledStationAETitle = task["station_ae"]
    step.ScheduledProcedureStepStartDate = task["scheduled_date"]
    step.ScheduledProcedureStepStartTime = task["scheduled_time"]
    step.Modality = task["modality"]
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = task["description"] or task["sequence"]
    step.ScheduledStationName = task["device"][:16]
    step.ScheduledProcedureStepID = task["sps_id"]
    step.ScheduledProcedureStepStatus = "SCHEDULED" if task["status"] == "NEW" else "STARTED"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = task["accession_number"]
    ds.ReferringPhysicianName = ""
    ds.PatientName = task["patient_name"]
    ds.PatientID = task["patient_id"]
    ds.PatientBirthDate = task["patient_birth_date"]
    ds.PatientSex = task["patient_sex"]
    ds.StudyInstanceUID = task["study_uid"]
    ds.RequestedProcedureID = task["requested_procedure_id"]
    ds.RequestedProcedureDescription = task["sequence"][:64]
    ds.ScheduledProcedureStepSequence = DicomSequence([step])
    _add_requested(ds, identifier)
    requested_steps = identifier.get("ScheduledProcedureStepSequence")
    if requested_steps:
        _add_requested(step, requested_steps[0])
    return ds


def _add_requested(response: Dataset, request: Dataset) -> None:
    """Keys the request named that the response lacks: returned empty (PS3.4 C.2.2.1.2)."""
    for elem in request:
        if elem.tag not in response and elem.tag.group not in (0x0000, 0x0002):
            if elem.VR == "SQ":
                response.add(DataElement(elem.tag, "SQ", DicomSequence([])))
            else:
                response.add(DataElement(elem.tag, elem.VR, None))


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _as_json(ds: Dataset) -> dict[str, Any]:
    try:
        return ds.to_json_dict()
    except Exception:  # an attribute pydicom cannot express in JSON: keep the rest out
        return {}


class AcquisitionServices:
    """The worklist and MPPS handlers of the node."""

    def __init__(self, registry: Registry, bridge: LoopBridge) -> None:
        self._registry = registry
        self._bridge = bridge

    def worklist_find(
        self, identifier: Dataset, calling_ae: str, cancelled: Callable[[], bool]
    ) -> Iterator[tuple[int, Dataset | None]]:
        """A Modality Worklist C-FIND (PS3.4 K.6.1.2): one pending answer per task matching
        *identifier*, from the registry; blocks (a thread)."""
        try:
            where, params = _where(identifier)
            tasks = self._bridge.call(self._registry.worklist, where, params)
        except QueryError as exc:
            log.warning("worklist_query_refused", reason=str(exc))
            yield exc.status, None
            return
        except GatewayError as exc:
            log.error("worklist_query_failed", reason=str(exc))
            yield 0xA700, None
            return
        log.info("worklist_queried", items=len(tasks), calling_ae=calling_ae)
        for task in tasks:
            if cancelled():
                yield 0xFE00, None
                return
            yield 0xFF00, _item(task, identifier)

    def mpps_create(
        self, attributes: Dataset, requested: str | None, calling_ae: str
    ) -> tuple[int, str]:
        """`on_n_create` on plain values: (status, the SOP Instance UID created, assigned here
        when *requested* is None). Blocks (a thread)."""
        sop_uid = requested or generate_uid()
        status = _text(attributes, "PerformedProcedureStepStatus")
        if status != "IN PROGRESS":
            log.warning("mpps_refused", reason=f"N-CREATE with status {status!r}")
            return 0x0106, sop_uid  # invalid attribute value
        steps = attributes.get("ScheduledStepAttributesSequence") or [None]
        keys = {
            "sps_id": _text(steps[0], "ScheduledProcedureStepID"),
            "accession_number": _text(steps[0], "AccessionNumber"),
            "study_uid": _text(steps[0], "StudyInstanceUID"),
        }
        try:
            task_id = self._bridge.call(
                self._registry.mpps_create,
                sop_uid,
                keys,
                _as_json(attributes),
                calling_ae,
            )
        except AcquisitionError as exc:
            log.warning("mpps_refused", sop_instance_uid=sop_uid, reason=str(exc))
            return 0x0111, sop_uid  # duplicate SOP instance
        except GatewayError as exc:
            log.error("mpps_failed", reason=str(exc))
            return 0x0110, sop_uid
        log.info("mpps_created", sop_instance_uid=sop_uid, task=task_id, assigned=not requested)
        return 0x0000, sop_uid

    def mpps_set(self, changes: Dataset, sop_uid: str) -> int:
        """`on_n_set` on plain values: the status. Blocks (a thread)."""
        status = _text(changes, "PerformedProcedureStepStatus") or "IN PROGRESS"
        if status not in ("IN PROGRESS", "COMPLETED", "DISCONTINUED"):
            return 0x0106
        reason = None
        if status == "DISCONTINUED":
            codes = changes.get("PerformedProcedureStepDiscontinuationReasonCodeSequence")
            reason = _text(codes[0], "CodeMeaning") if codes else ""
            reason = reason or "discontinued by the modality"
        try:
            task_id = self._bridge.call(
                self._registry.mpps_set, sop_uid, status, _as_json(changes), reason
            )
        except AcquisitionError as exc:
            log.warning("mpps_set_refused", sop_instance_uid=sop_uid, reason=str(exc))
            return 0x0112 if exc.kind == "not_found" else 0x0110
        except GatewayError as exc:
            log.error("mpps_failed", reason=str(exc))
            return 0x0110
        log.info("mpps_set", sop_instance_uid=sop_uid, status=status, task=task_id)
        return 0x0000
