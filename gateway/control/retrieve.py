"""Control methods for retrieval: retrieve.submit, .status, .retry, .cancel, .limits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.control.methods import _no_unknown
from gateway.control.server import INVALID_PARAMS, ControlServer
from gateway.errors import ControlError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["NOT_CONFIGURED", "register_retrieve_methods"]

NOT_CONFIGURED = -32012
_FIELDS = ("project", "mrn", "accession", "study_uid", "series_uid", "priority")
_MAX_REQUESTS = 100_000
_LIMIT_KEYS = ("queries_per_minute", "moves_per_minute", "max_concurrent_moves")


def _project(params: dict[str, Any]) -> str:
    project = params.get("project")
    if not isinstance(project, str) or not project.strip():
        raise ControlError(INVALID_PARAMS, "parameter 'project' is required (a project name)")
    return project.strip()


def register_retrieve_methods(server: ControlServer, gateway: Gateway) -> None:
    """Register the retrieval methods (docs/control.md, docs/retrieve.md)."""

    def check_configured() -> None:
        if gateway.settings.retrieve.primary is None:
            raise ControlError(NOT_CONFIGURED, "retrieval is not configured: [retrieve] primary")

    async def submit(params: dict[str, Any]) -> dict[str, Any]:
        check_configured()
        _no_unknown(params, {*_FIELDS, "requests"})
        requests = params.get("requests")
        if requests is None:
            requests = [{k: v for k, v in params.items() if k in _FIELDS}]
        elif not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
            raise ControlError(INVALID_PARAMS, "parameter 'requests' must be a list of objects")
        elif len(requests) > _MAX_REQUESTS:
            message = f"parameter 'requests': at most {_MAX_REQUESTS} in one call"
            raise ControlError(INVALID_PARAMS, message)
        default = params.get("project")
        items = [
            {**r, "project": r.get("project") or default} if default else dict(r) for r in requests
        ]
        results = await gateway.retrievals.submit(
            items, lambda name: gateway.settings.project(name) is not None
        )
        gateway.retriever.wake()
        counts = {"Queued": 0, "QueueFailed": 0, "Processing": 0}
        for result in results:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        return {"submitted": results, "counts": counts}

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"project"})
        return await gateway.retrievals.status(_project(params))

    async def retry(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"project"})
        count = await gateway.retrievals.retry(_project(params))
        gateway.retriever.wake()
        return {"requeued": count}

    async def cancel(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"project"})
        ids = await gateway.retrievals.cancel(_project(params))
        return {"cancelled": len(ids)}

    async def limits(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"peer", *_LIMIT_KEYS})
        name = params.get("peer")
        changes = {key: params[key] for key in _LIMIT_KEYS if key in params}
        if changes and name is None:
            raise ControlError(INVALID_PARAMS, "parameter 'peer' is required to change limits")
        retrieve = gateway.settings.retrieve
        archives = [n for n in (retrieve.primary, retrieve.secondary) if n]
        if name is not None:
            if name not in archives:
                known = ", ".join(archives) or "none configured"
                message = f"peer {name!r} is not a retrieval archive (archives: {known})"
                raise ControlError(INVALID_PARAMS, message)
            peer = gateway.settings.peer(name)
            assert peer is not None
            archive = gateway.retriever.limits(peer)
            for key, value in changes.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    message = f"parameter {key!r} must be a number >= 0"
                    raise ControlError(INVALID_PARAMS, message)
                if key == "max_concurrent_moves":
                    if not isinstance(value, int) or not 1 <= value <= 64:
                        message = "parameter 'max_concurrent_moves' must be an integer 1..64"
                        raise ControlError(INVALID_PARAMS, message)
                    archive.concurrent.total_tokens = value
                elif key == "queries_per_minute":
                    archive.queries.set_rate(float(value))
                else:
                    archive.moves.set_rate(float(value))
        result: dict[str, Any] = {}
        for archive_name in archives:
            peer = gateway.settings.peer(archive_name)
            if peer is not None:
                result[archive_name] = gateway.retriever.limits(peer).as_dict()
        return {"archives": result}

    server.register("retrieve.submit", submit)
    server.register("retrieve.status", status)
    server.register("retrieve.retry", retry)
    server.register("retrieve.cancel", cancel)
    server.register("retrieve.limits", limits)
