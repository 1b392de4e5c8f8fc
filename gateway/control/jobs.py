"""Control methods for dispatch: jobs.list, jobs.retry, jobs.cancel, studies.force_complete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator

from gateway.control.methods import StudyParams
from gateway.control.params import Explain, Limit, Params
from gateway.control.server import ControlServer
from gateway.rules.runtime import CompletionEngine
from gateway.store.jobs import JobQueue

__all__ = ["CancelJobsParams", "ListJobsParams", "RetryJobsParams", "register_job_methods"]

_STATES = ("queued", "running", "done", "failed", "cancelled")

_IDS = Explain("must be a list of job ids")


def _not_empty(ids: list[int]) -> list[int]:
    if not ids:
        raise ValueError("is required")
    return ids


class ListJobsParams(Params):
    """`jobs.list`: `state` (optional, one of queued, running, done, failed, cancelled) and
    `limit` (1..10000, 100 by default)."""

    state: Annotated[
        Literal["queued", "running", "done", "failed", "cancelled"] | None,
        Explain(f"must be one of {_STATES}"),
    ] = None
    limit: Limit = 100


class RetryJobsParams(Params):
    """`jobs.retry`: `ids` (optional; none or null: every failed job)."""

    ids: Annotated[list[int] | None, _IDS] = None


class CancelJobsParams(Params):
    """`jobs.cancel`: `ids`, required, not empty."""

    ids: Annotated[list[int], AfterValidator(_not_empty), _IDS]


def register_job_methods(
    server: ControlServer,
    jobs: JobQueue,
    wake_dispatcher: Callable[[], None],
    completion: CompletionEngine,
) -> None:
    """Register the dispatch and completion methods: *jobs* is the dispatch queue,
    *wake_dispatcher* makes the dispatcher look at it now, *completion* the rule waits."""

    async def list_jobs(params: ListJobsParams) -> dict[str, Any]:
        found = await jobs.list(params.state, params.limit)
        return {"jobs": found, "count": len(found)}

    async def retry(params: RetryJobsParams) -> dict[str, Any]:
        count = await jobs.retry(params.ids)
        wake_dispatcher()
        return {"requeued": count}

    async def cancel(params: CancelJobsParams) -> dict[str, Any]:
        return {"cancelled": await jobs.cancel(params.ids)}

    async def force_complete(params: StudyParams) -> dict[str, Any]:
        uid = params.study_uid
        return {"study_uid": uid, "completed": await completion.force_study(uid)}

    server.register("jobs.list", ListJobsParams, list_jobs)
    server.register("jobs.retry", RetryJobsParams, retry)
    server.register("jobs.cancel", CancelJobsParams, cancel)
    server.register("studies.force_complete", StudyParams, force_complete)
