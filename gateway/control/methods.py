"""The core control methods (status, studies.search, studies.get, studies.delete, echo) and
the rules' dry run (rules.test).

Later features register their own methods beside these (see `ControlServer.register`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydicom.dataset import Dataset

from gateway.control.server import INVALID_PARAMS, ControlServer
from gateway.errors import ConfigError, ControlError, GatewayError, PeerError
from gateway.metrics import Figures
from gateway.rules.engine import RuleSet, fact_text, outcome_report
from gateway.rules.facts import connection_facts, read_facts
from gateway.scu.echo import echo_peer
from gateway.store.instance import is_valid_uid
from gateway.store.query import QueryError, find

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["register_core_methods", "register_rule_methods"]

PEER_ERROR = -32010
CONFIG_INVALID = -32011
NOT_FOUND = -32004

# Search parameter -> DICOM keyword in the Study Root C-FIND identifier.
_SEARCH_KEYS = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "study_uid": "StudyInstanceUID",
    "study_date": "StudyDate",
    "accession_number": "AccessionNumber",
    "study_description": "StudyDescription",
    "modality": "ModalitiesInStudy",
}
_RETURN_KEYS = {
    "study_uid": "StudyInstanceUID",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
    "modalities": "ModalitiesInStudy",
    "series": "NumberOfStudyRelatedSeries",
    "instances": "NumberOfStudyRelatedInstances",
}


def _string(params: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise ControlError(INVALID_PARAMS, f"parameter {name!r} is required")
        return None
    if not isinstance(value, str):
        raise ControlError(INVALID_PARAMS, f"parameter {name!r} must be a string")
    return value


def _no_unknown(params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ControlError(INVALID_PARAMS, f"unknown parameter {unknown[0]!r}")


def _value(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword.startswith("NumberOf") or keyword == "SeriesNumber":
        return int(value)
    if keyword == "ModalitiesInStudy":
        return list(value) if not isinstance(value, str) else [value]
    return str(value)


def _study_uid(params: dict[str, Any]) -> str:
    _no_unknown(params, {"study_uid"})
    uid = _string(params, "study_uid", required=True)
    assert uid is not None
    if not is_valid_uid(uid):
        raise ControlError(INVALID_PARAMS, "parameter 'study_uid' is not a valid UID")
    return uid


def register_core_methods(server: ControlServer, gateway: Gateway) -> None:
    """Register the methods of the DICOM node and its store, then `register_rule_methods`."""
    store = gateway.store

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        figures = await gateway.probe.figures()
        counts = figures.counts
        return {
            "version": gateway.version,
            "ae_title": gateway.settings.node.ae_title,
            "port": gateway.node.port,
            "uptime_seconds": round(time.time() - gateway.started_at, 3),
            "associations_open": gateway.node.open_associations,
            "patients": counts["patients"],
            "studies": counts["studies"],
            "series": counts["series"],
            "instances": counts["instances"],
            "bytes": counts["bytes"],
            "sop_instance_uid_conflicts": counts["sop_instance_uid_conflicts"],
            "disk_free_bytes": figures.disk_free,
            "disk_total_bytes": figures.disk_total,
            "min_free_bytes": store.min_free_bytes,
            "accepting_instances": figures.disk_free >= store.min_free_bytes,
            "metrics": _metrics(gateway, figures),
        }

    async def search(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {*_SEARCH_KEYS, "limit"})
        limit = params.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            raise ControlError(INVALID_PARAMS, "parameter 'limit' must be an integer 1..10000")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        for keyword in _RETURN_KEYS.values():
            setattr(identifier, keyword, "")
        for name, keyword in _SEARCH_KEYS.items():
            value = _string(params, name)
            if value is not None:
                setattr(identifier, keyword, value)
        try:
            matches = await find(store, "study", identifier, limit=limit)
        except QueryError as exc:
            # The query speaks DICOM keywords; name the parameter the caller actually sent.
            message = str(exc)
            param = next((n for n, k in _SEARCH_KEYS.items() if message.startswith(f"{k} ")), None)
            if param is not None:
                message = f"parameter {param!r}: {message}"
            raise ControlError(INVALID_PARAMS, message) from exc
        studies = [{k: _value(ds, kw) for k, kw in _RETURN_KEYS.items()} for ds in matches]
        return {"studies": studies, "count": len(studies)}

    async def get(params: dict[str, Any]) -> dict[str, Any]:
        uid = _study_uid(params)
        found = await search({"study_uid": uid, "limit": 1})
        if not found["studies"]:
            raise ControlError(NOT_FOUND, f"no study {uid}")
        study: dict[str, Any] = found["studies"][0]
        study["patient_conflicts"] = await store.patient_conflicts(uid)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = uid
        for keyword in (
            "SeriesInstanceUID",
            "Modality",
            "SeriesNumber",
            "SeriesDescription",
            "NumberOfSeriesRelatedInstances",
        ):
            setattr(identifier, keyword, "")
        series = await find(store, "study", identifier)
        study["series_list"] = [
            {
                "series_uid": _value(s, "SeriesInstanceUID"),
                "modality": _value(s, "Modality"),
                "series_number": _value(s, "SeriesNumber"),
                "series_description": _value(s, "SeriesDescription"),
                "instances": _value(s, "NumberOfSeriesRelatedInstances"),
            }
            for s in series
        ]
        return study

    async def delete(params: dict[str, Any]) -> dict[str, Any]:
        uid = _study_uid(params)
        removed = await store.delete_study(uid)
        if not removed:
            raise ControlError(NOT_FOUND, f"no study {uid}")
        return {"study_uid": uid, "instances_removed": removed}

    async def echo(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"peer"})
        name = _string(params, "peer", required=True)
        assert name is not None
        peer = gateway.settings.peer(name)
        if peer is None:
            known = ", ".join(p.name for p in gateway.settings.peers) or "none configured"
            raise ControlError(INVALID_PARAMS, f"unknown peer {name!r} (peers: {known})")
        try:
            result = await anyio.to_thread.run_sync(echo_peer, gateway.settings.node, peer)
        except PeerError as exc:
            raise ControlError(PEER_ERROR, str(exc)) from exc
        return {"peer": name, "status": result.status, "seconds": round(result.seconds, 4)}

    server.register("status", status)
    server.register("studies.search", search)
    server.register("studies.get", get)
    server.register("studies.delete", delete)
    server.register("echo", echo)
    register_rule_methods(server, gateway)


def _metrics(gateway: Gateway, figures: Figures) -> dict[str, Any]:
    """What the metrics endpoint serves, as one JSON object: the counters since the start
    (`Metrics.snapshot`), and the index's figures (`Probe.figures`)."""
    snapshot = gateway.metrics.snapshot()
    snapshot["associations"]["open"] = gateway.node.open_associations
    by_target: dict[str, dict[str, int]] = {}
    for (state, target), count in sorted(figures.jobs.items()):
        by_target.setdefault(target, {})[state] = count
    by_project: dict[str, dict[str, int]] = {}
    for (project, state), count in sorted(figures.retrievals.items()):
        by_project.setdefault(project, {})[state] = count
    endpoint = gateway.endpoint
    return {
        "endpoint": endpoint.url if endpoint is not None else None,
        **snapshot,
        "jobs": figures.jobs_by_state(),
        "jobs_by_target": by_target,
        "retrievals": figures.retrievals_by_status(),
        "retrievals_by_project": by_project,
        "completion_waits": figures.waits,
        "devices": figures.devices,
    }


@dataclass(frozen=True, slots=True)
class _FirstInstance:
    """A series of a stored study and the instance its rules are evaluated on."""

    series_uid: str
    instances: int
    sop_uid: str
    path: Path
    connection: dict[str, str]


def _first_instances(
    conn: sqlite3.Connection, study_uid: str, absolute: Callable[[str], Path]
) -> list[_FirstInstance] | None:
    """Each series of the study with its first instance (lowest instance_number, then pk)."""
    study = conn.execute("SELECT pk FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    if study is None:
        return None
    rows = conn.execute(
        "SELECT s.series_uid,"
        " (SELECT count(*) FROM instances c WHERE c.series_pk = s.pk),"
        " i.sop_uid, i.path, i.calling_ae, i.called_ae, i.peer_address"
        " FROM series s JOIN instances i ON i.pk = ("
        "   SELECT f.pk FROM instances f WHERE f.series_pk = s.pk"
        "   ORDER BY f.instance_number IS NULL, f.instance_number, f.pk LIMIT 1)"
        " WHERE s.study_pk = ? ORDER BY s.series_number IS NULL, s.series_number, s.pk",
        (study[0],),
    ).fetchall()
    first: list[_FirstInstance] = []
    for series_uid, count, sop_uid, path, calling, called, address in rows:
        connection = connection_facts(calling, called, address)
        first.append(_FirstInstance(series_uid, count, sop_uid, absolute(path), connection))
    return first


def register_rule_methods(server: ControlServer, gateway: Gateway) -> None:
    """Register `rules.test` (the running rules' dry run on a stored study) and
    `rules.reload` (apply the config file's rules, peers, folders and webhooks, or refuse)."""
    store = gateway.store

    def facts_of(first: _FirstInstance, ruleset: RuleSet) -> dict[str, object]:
        try:
            return read_facts(first.path, ruleset.keywords, first.connection)
        except Exception as exc:  # missing, truncated: the store should not hold such a file
            raise GatewayError(
                f"cannot read instance {first.sop_uid} of series {first.series_uid}: {exc}"
            ) from exc

    async def rules_test(params: dict[str, Any]) -> dict[str, Any]:
        uid = _study_uid(params)
        found = await store.read(lambda conn: _first_instances(conn, uid, store.files.absolute))
        if found is None:
            raise ControlError(NOT_FOUND, f"no study {uid}")
        ruleset = RuleSet(gateway.settings.rules)
        facts = [await anyio.to_thread.run_sync(facts_of, first, ruleset) for first in found]
        descriptions = [fact_text(f.get("SeriesDescription")) or "" for f in facts]
        series = [
            {
                "series_uid": first.series_uid,
                "series_description": fact_text(f.get("SeriesDescription")),
                "modality": fact_text(f.get("Modality")),
                "instances": first.instances,
                "rules": [outcome_report(o, descriptions) for o in ruleset.explain(f)],
            }
            for first, f in zip(found, facts, strict=True)
        ]
        return {"study_uid": uid, "series": series}

    async def rules_reload(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return gateway.reload()
        except ConfigError as exc:
            raise ControlError(CONFIG_INVALID, f"config not reloaded: {exc}") from None

    server.register("rules.test", rules_test)
    server.register("rules.reload", rules_reload)
