"""Control methods for dispatch: jobs.list, jobs.retry, jobs.cancel, studies.force_complete."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.control.methods import _no_unknown, _study_uid
from gateway.control.server import INVALID_PARAMS, ControlServer
from gateway.errors import ControlError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["register_job_methods"]

_STATES = ("queued", "running", "done", "failed", "cancelled")


def _ids(params: dict[str, Any]) -> list[int] | None:
    ids = params.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise ControlError(INVALID_PARAMS, "parameter 'ids' must be a list of job ids")
    return ids


def register_job_methods(server: ControlServer, gateway: Gateway) -> None:
    """Register the dispatch and completion methods."""

    async def list_jobs(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"state", "limit"})
        state = params.get("state")
        if state is not None and state not in _STATES:
            raise ControlError(INVALID_PARAMS, f"parameter 'state' must be one of {_STATES}")
        limit = params.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            raise ControlError(INVALID_PARAMS, "parameter 'limit' must be an integer 1..10000")
        jobs = await gateway.jobs.list(state, limit)
        return {"jobs": jobs, "count": len(jobs)}

    async def retry(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"ids"})
        count = await gateway.jobs.retry(_ids(params))
        gateway.dispatcher.wake()
        return {"requeued": count}

    async def cancel(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"ids"})
        ids = _ids(params)
        if not ids:
            raise ControlError(INVALID_PARAMS, "parameter 'ids' is required")
        return {"cancelled": await gateway.jobs.cancel(ids)}

    async def force_complete(params: dict[str, Any]) -> dict[str, Any]:
        uid = _study_uid(params)
        return {"study_uid": uid, "completed": await gateway.completion.force_study(uid)}

    server.register("jobs.list", list_jobs)
    server.register("jobs.retry", retry)
    server.register("jobs.cancel", cancel)
    server.register("studies.force_complete", force_complete)
