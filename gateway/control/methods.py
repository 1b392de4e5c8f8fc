"""The core control methods (status, studies.search, studies.get, studies.delete, echo) and
the rules' dry run and reload (rules.test, rules.reload).

Each method's parameters are a model (`SearchParams`, `StudyParams`, `EchoParams`, `NoParams`)
the server validates before the call (-32602 naming the parameter); each method is given the
parts it uses, the running settings through a getter (`rules.reload` replaces them). Later
features register their own methods beside these (see `ControlServer.register`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
from pydicom.dataset import Dataset

from gateway.config import Settings
from gateway.control.params import Limit, NoParams, Params, StudyUid
from gateway.control.server import INVALID_PARAMS, ControlServer
from gateway.errors import ConfigError, ControlError, GatewayError, PeerError
from gateway.metrics import Figures, Metrics, MetricsEndpoint, Probe
from gateway.rules.engine import RuleSet, fact_text, outcome_report
from gateway.rules.facts import connection_facts, read_facts
from gateway.scu.echo import echo_peer
from gateway.store.query import QueryError, find
from gateway.store.store import Store

__all__ = [
    "EchoParams",
    "SearchParams",
    "StatusSources",
    "StudyParams",
    "register_core_methods",
    "register_rule_methods",
]

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


class SearchParams(Params):
    """`studies.search`: C-FIND matching on each key given (strings), at most `limit` studies.
    A key the query refuses (a malformed date range) is -32602 naming it."""

    patient_id: str | None = None
    patient_name: str | None = None
    study_uid: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modality: str | None = None
    limit: Limit = 100


class StudyParams(Params):
    """One stored study: `study_uid`, required, a valid UID (`studies.get`, `studies.delete`,
    `studies.force_complete`, `rules.test`)."""

    study_uid: StudyUid


class EchoParams(Params):
    """`echo`: `peer`, required, the name of a `[[peers]]` entry (else -32602 listing them)."""

    peer: str


class Node(Protocol):
    """What `status` reads of the DICOM node."""

    @property
    def port(self) -> int: ...

    @property
    def open_associations(self) -> int: ...


@dataclass(frozen=True, slots=True)
class StatusSources:
    """What `status` reports on: the node, the index's figures (`probe`), the counters
    (`metrics`) and the metrics endpoint (a getter: it is made after the methods)."""

    version: str
    started_at: float
    node: Node
    probe: Probe
    metrics: Metrics
    endpoint: Callable[[], MetricsEndpoint | None]


def _value(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword.startswith("NumberOf") or keyword == "SeriesNumber":
        return int(value)
    if keyword == "ModalitiesInStudy":
        return list(value) if not isinstance(value, str) else [value]
    return str(value)


def register_core_methods(
    server: ControlServer,
    store: Store,
    settings: Callable[[], Settings],
    sources: StatusSources,
    reload: Callable[[], dict[str, Any]],
) -> None:
    """Register the methods of the DICOM node and its store (status, studies.search / get /
    delete, echo), then `register_rule_methods`. *settings* gives the running settings (a
    reload replaces them)."""

    async def status(params: NoParams) -> dict[str, Any]:
        figures = await sources.probe.figures()
        counts = figures.counts
        node = sources.node
        return {
            "version": sources.version,
            "ae_title": settings().node.ae_title,
            "port": node.port,
            "uptime_seconds": round(time.time() - sources.started_at, 3),
            "associations_open": node.open_associations,
            "patients": counts["patients"],
            "studies": counts["studies"],
            "series": counts["series"],
            "instances": counts["instances"],
            "bytes": counts["bytes"],
            "sop_instance_uid_conflicts": counts["sop_instance_uid_conflicts"],
            "disk_free_bytes": figures.disk_free,
            "disk_total_bytes": figures.disk_total,
            "min_free_bytes": store.min_free_bytes,
            "accepting_instances": not store.below_floor(figures.disk_free),
            "metrics": _metrics(sources, figures),
        }

    async def search(params: SearchParams) -> dict[str, Any]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        for keyword in _RETURN_KEYS.values():
            setattr(identifier, keyword, "")
        for name, keyword in _SEARCH_KEYS.items():
            value = getattr(params, name)
            if value is not None:
                setattr(identifier, keyword, value)
        try:
            matches = await find(store, "study", identifier, limit=params.limit)
        except QueryError as exc:
            # The query speaks DICOM keywords; name the parameter the caller actually sent.
            message = str(exc)
            param = next((n for n, k in _SEARCH_KEYS.items() if message.startswith(f"{k} ")), None)
            if param is not None:
                message = f"parameter {param!r}: {message}"
            raise ControlError(INVALID_PARAMS, message) from exc
        studies = [{k: _value(ds, kw) for k, kw in _RETURN_KEYS.items()} for ds in matches]
        return {"studies": studies, "count": len(studies)}

    async def get(params: StudyParams) -> dict[str, Any]:
        uid = params.study_uid
        found = await search(SearchParams(study_uid=uid, limit=1))
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

    async def delete(params: StudyParams) -> dict[str, Any]:
        uid = params.study_uid
        removed = await store.delete_study(uid)
        if not removed:
            raise ControlError(NOT_FOUND, f"no study {uid}")
        return {"study_uid": uid, "instances_removed": removed}

    async def echo(params: EchoParams) -> dict[str, Any]:
        name = params.peer
        running = settings()
        peer = running.peer(name)
        if peer is None:
            known = ", ".join(p.name for p in running.peers) or "none configured"
            raise ControlError(INVALID_PARAMS, f"unknown peer {name!r} (peers: {known})")
        try:
            result = await echo_peer(running.node, peer)
        except PeerError as exc:
            raise ControlError(PEER_ERROR, str(exc)) from exc
        return {"peer": name, "status": result.status, "seconds": round(result.seconds, 4)}

    server.register("status", NoParams, status)
    server.register("studies.search", SearchParams, search)
    server.register("studies.get", StudyParams, get)
    server.register("studies.delete", StudyParams, delete)
    server.register("echo", EchoParams, echo)
    register_rule_methods(server, store, settings, reload)


def _metrics(sources: StatusSources, figures: Figures) -> dict[str, Any]:
    """What the metrics endpoint serves, as one JSON object: the counters since the start
    (`Metrics.snapshot`), and the index's figures (`Probe.figures`)."""
    snapshot = sources.metrics.snapshot()
    snapshot["associations"]["open"] = sources.node.open_associations
    by_target: dict[str, dict[str, int]] = {}
    for (state, target), count in sorted(figures.jobs.items()):
        by_target.setdefault(target, {})[state] = count
    by_project: dict[str, dict[str, int]] = {}
    for (project, state), count in sorted(figures.retrievals.items()):
        by_project.setdefault(project, {})[state] = count
    endpoint = sources.endpoint()
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


def register_rule_methods(
    server: ControlServer,
    store: Store,
    settings: Callable[[], Settings],
    reload: Callable[[], dict[str, Any]],
) -> None:
    """Register `rules.test` (the running rules' dry run on a stored study) and
    `rules.reload` (*reload*: apply the config file's rules, peers, folders and webhooks, or
    raise ConfigError, answered -32011)."""

    def facts_of(first: _FirstInstance, ruleset: RuleSet) -> dict[str, object]:
        try:
            return read_facts(first.path, ruleset.keywords, first.connection)
        except Exception as exc:  # missing, truncated: the store should not hold such a file
            raise GatewayError(
                f"cannot read instance {first.sop_uid} of series {first.series_uid}: {exc}"
            ) from exc

    async def rules_test(params: StudyParams) -> dict[str, Any]:
        uid = params.study_uid
        found = await store.read(lambda conn: _first_instances(conn, uid, store.files.absolute))
        if found is None:
            raise ControlError(NOT_FOUND, f"no study {uid}")
        ruleset = RuleSet(settings().rules)
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

    async def rules_reload(params: NoParams) -> dict[str, Any]:
        try:
            return reload()
        except ConfigError as exc:
            raise ControlError(CONFIG_INVALID, f"config not reloaded: {exc}") from None

    server.register("rules.test", StudyParams, rules_test)
    server.register("rules.reload", NoParams, rules_reload)
