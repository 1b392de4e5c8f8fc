"""Control methods for retrieval: retrieve.submit, .status, .retry, .cancel, .limits.

`retrieve.submit` answers -32012 when retrieval is not configured (`[retrieve] primary`). Each
method answers -32602 for parameters that do not validate; a request's own fields are checked
per request (a refused one is QueueFailed with its reason, not an error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Self

from pydantic import AfterValidator, Field, model_validator

from gateway.config import Settings
from gateway.control.params import Explain, Params
from gateway.control.server import INVALID_PARAMS, ControlServer
from gateway.errors import ControlError
from gateway.retrieve.requests import RetrievalQueue
from gateway.retrieve.worker import Retriever

__all__ = [
    "NOT_CONFIGURED",
    "LimitsParams",
    "ProjectParams",
    "SubmitParams",
    "register_retrieve_methods",
]

NOT_CONFIGURED = -32012
_FIELDS = ("project", "mrn", "accession", "study_uid", "series_uid", "priority")
_MAX_REQUESTS = 100_000
_LIMIT_KEYS = ("queries_per_minute", "moves_per_minute", "max_concurrent_moves")


def _at_most(requests: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if requests is not None and len(requests) > _MAX_REQUESTS:
        raise ValueError(f"parameter 'requests': at most {_MAX_REQUESTS} in one call")
    return requests


class SubmitParams(Params):
    """`retrieve.submit`: the fields of one request (`project`, `mrn`, `accession`,
    `study_uid`, `series_uid`, `priority`), or `requests` (a list of such objects, at most
    100000) with `project` as their default. Each request needs a `study_uid`, or both `mrn`
    and `accession`: that is checked per request (a refused one is QueueFailed with its
    reason), as are the values, which may be any JSON (a CSV gives strings)."""

    project: Any = None
    mrn: Any = None
    accession: Any = None
    study_uid: Any = None
    series_uid: Any = None
    priority: Any = None
    requests: Annotated[
        list[dict[str, Any]] | None,
        AfterValidator(_at_most),
        Explain("must be a list of objects"),
    ] = None

    def items(self) -> list[dict[str, Any]]:
        """The requests to record, each with the default `project` when it has none."""
        given = self.given()
        if self.requests is None:
            return [{k: v for k, v in given.items() if k in _FIELDS}]
        default = self.project
        if not default:
            return [dict(r) for r in self.requests]
        return [{**r, "project": r.get("project") or default} for r in self.requests]


def _project(value: str) -> str:
    if not value.strip():
        raise ValueError("is required (a project name)")
    return value.strip()


class ProjectParams(Params):
    """`retrieve.status`, `.retry`, `.cancel`: `project`, required, a project name (its
    surrounding blanks ignored)."""

    project: Annotated[
        str,
        AfterValidator(_project),
        Explain("is required (a project name)", missing="is required (a project name)"),
    ]


Rate = Annotated[Annotated[float, Field(ge=0)] | None, Explain("must be a number >= 0")]


class LimitsParams(Params):
    """`retrieve.limits`: without parameters, every archive's limits; `peer` (a retrieval
    archive) with any of `queries_per_minute`, `moves_per_minute` (numbers >= 0: 0 is no
    limit) and `max_concurrent_moves` (an integer 1..64) changes that archive's. A limit
    without `peer` is -32602."""

    peer: str | None = None
    queries_per_minute: Rate = None
    moves_per_minute: Rate = None
    max_concurrent_moves: Annotated[
        Annotated[int, Field(ge=1, le=64)] | None, Explain("must be an integer 1..64")
    ] = None

    @model_validator(mode="after")
    def _peer_to_change(self) -> Self:
        if self.changes() and self.peer is None:
            raise ValueError("parameter 'peer' is required to change limits")
        return self

    def changes(self) -> dict[str, float]:
        """The limits to set: name -> value."""
        return {k: v for k in _LIMIT_KEYS if (v := getattr(self, k)) is not None}


def register_retrieve_methods(
    server: ControlServer,
    retrievals: RetrievalQueue,
    retriever: Retriever,
    settings: Callable[[], Settings],
) -> None:
    """Register the retrieval methods (docs/control.md, docs/retrieve.md): *retrievals* holds
    the requests, *retriever* works on them, *settings* gives the running settings (a reload
    replaces them)."""

    def check_configured() -> None:
        if settings().retrieve.primary is None:
            raise ControlError(NOT_CONFIGURED, "retrieval is not configured: [retrieve] primary")

    async def submit(params: SubmitParams) -> dict[str, Any]:
        check_configured()
        results = await retrievals.submit(
            params.items(), lambda name: settings().project(name) is not None
        )
        retriever.wake()
        counts = {"Queued": 0, "QueueFailed": 0, "Processing": 0}
        for result in results:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        return {"submitted": results, "counts": counts}

    async def status(params: ProjectParams) -> dict[str, Any]:
        return await retrievals.status(params.project)

    async def retry(params: ProjectParams) -> dict[str, Any]:
        count = await retrievals.retry(params.project)
        retriever.wake()
        return {"requeued": count}

    async def cancel(params: ProjectParams) -> dict[str, Any]:
        ids = await retrievals.cancel(params.project)
        return {"cancelled": len(ids)}

    async def limits(params: LimitsParams) -> dict[str, Any]:
        running = settings()
        retrieve = running.retrieve
        archives = [n for n in (retrieve.primary, retrieve.secondary) if n]
        name = params.peer
        if name is not None:
            if name not in archives:
                known = ", ".join(archives) or "none configured"
                message = f"peer {name!r} is not a retrieval archive (archives: {known})"
                raise ControlError(INVALID_PARAMS, message)
            peer = running.peer(name)
            assert peer is not None
            archive = retriever.limits(peer)
            if params.max_concurrent_moves is not None:
                archive.concurrent.total_tokens = params.max_concurrent_moves
            if params.queries_per_minute is not None:
                archive.queries.set_rate(params.queries_per_minute)
            if params.moves_per_minute is not None:
                archive.moves.set_rate(params.moves_per_minute)
        result: dict[str, Any] = {}
        for archive_name in archives:
            peer = running.peer(archive_name)
            if peer is not None:
                result[archive_name] = retriever.limits(peer).as_dict()
        return {"archives": result}

    server.register("retrieve.submit", SubmitParams, submit)
    server.register("retrieve.status", ProjectParams, status)
    server.register("retrieve.retry", ProjectParams, retry)
    server.register("retrieve.cancel", ProjectParams, cancel)
    server.register("retrieve.limits", LimitsParams, limits)
