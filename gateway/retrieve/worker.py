"""The retriever: works retrieval requests step by step, durably (PIXL's imaging API).

One asyncio service. Its loop takes due requests (most urgent first, at most
`[retrieve] concurrency` at once) and runs each from its recorded step:

1. `query`: C-FIND the primary archive (Study Root, STUDY level) by StudyInstanceUID, else by
   PatientID + AccessionNumber; every matching study is retrieved.
2. `query_secondary`: not found there: the secondary archive, inside its time window (outside
   it the request is Queued until the window opens). Not found there either: Failed.
3. `compare`: C-FIND the archive's series, then the instances of each series; recorded.
4. `move`: C-MOVE to the gateway's own AE title (or C-GET, per peer) only what the store
   lacks: a whole series at SERIES level, a partial one at IMAGE level with the missing UIDs.
5. `verify`: wait until the store holds every instance the archive listed (they arrive on the
   archive's own association, possibly a moment after its final C-MOVE response).
6. `forward`: one dispatch job per study (or series) to the anonymiser; Successful when every
   job is done, i.e. every instance acknowledged.

A connection failure, a refused or failed move, or a step without progress for
`stall_seconds` (no response, no new instance) fails the attempt; the request stays
Processing and the step is retried after a backoff, until `max_attempts`. Waiting for a rate
token, a move slot, the window or the anonymiser's jobs is not a stall. docs/retrieve.md.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import anyio
import structlog
from pydicom.dataset import Dataset

from gateway.config import PeerSettings, Settings
from gateway.errors import GatewayError, PeerError
from gateway.retrieve.limits import ArchiveLimits, window_opens_at
from gateway.retrieve.requests import (
    NOT_RETRIED,
    ArchiveInstance,
    Request,
    RetrievalQueue,
    Step,
)
from gateway.scu.query import (
    FindSession,
    Progress,
    RetrieveResult,
    c_find,
    c_get,
    c_move,
    identifier,
)
from gateway.scu.requestor import IdleAssociations
from gateway.store.jobs import Job, JobQueue, JobSpec
from gateway.store.store import Store
from gateway.work import Backoff, WorkLoop

__all__ = ["Retriever", "dispatch_priority"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

_UIDS_PER_MOVE = 256  # SOP Instance UIDs in one IMAGE-level C-MOVE identifier
_FORWARD_POLL = 1.0  # seconds between looks at forwarding jobs (each one's end wakes it too)
_FORWARD_RULE = "retrieve:"  # the rule name of a request's forwarding jobs: + its project


def dispatch_priority(priority: int) -> str:
    """A request's priority (1-5, 5 the most urgent) as a dispatch job's."""
    return "urgent" if priority >= 4 else "normal" if priority >= 2 else "low"


class _Attempt(Exception):
    """The attempt failed for a reason that may pass (retried); *step* is where to resume."""

    def __init__(self, reason: str, step: Step | None = None) -> None:
        super().__init__(reason)
        self.step = step


class _Pause(Exception):
    """Come back later without counting an attempt (a window, the anonymiser's jobs)."""

    def __init__(self, at: float, reason: str, status: str = "Processing") -> None:
        super().__init__(reason)
        self.at = at
        self.status = status


class _Final(Exception):
    """The request ends Failed with this reason (not found)."""


class Retriever:
    """Runs retrieval requests until stopped; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        queue: RetrievalQueue,
        jobs: JobQueue,
        *,
        wake_dispatcher: Callable[[], None] = lambda: None,
        poll_seconds: float = 30.0,
        random: _random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.jobs = jobs
        self.wake_dispatcher = wake_dispatcher
        self._random = random or _random.Random()
        self._retrieves: set[Progress] = set()  # the C-MOVEs and C-GETs in flight
        # Archives' associations kept for the next C-FIND ([node] association_close_delay).
        self._idle = IdleAssociations(settings.node.association_close_delay)
        self._limits: dict[str, ArchiveLimits] = {}
        self._background: set[asyncio.Task[None]] = set()  # wakes after a forwarding job
        self._loop: WorkLoop[Request] = WorkLoop(
            "retriever",
            claim=self._claim,
            next_due=self._next_due,
            work=self._advance,
            token=_token,
            renew=queue.renew,
            lease_seconds=queue.lease_seconds,
            poll_seconds=poll_seconds,
        )

    # -- control ------------------------------------------------------------------------------

    def wake(self) -> None:
        self._loop.wake()

    def job_ended(self, job: Job) -> None:
        """A dispatch job's attempt ended (`Dispatcher.on_job_ended`): a request forwarding
        through it looks at it now rather than at its next poll (`_FORWARD_POLL`)."""
        if not job.rule.startswith(_FORWARD_RULE):
            return
        task = asyncio.get_running_loop().create_task(self._forwarded(job.id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _forwarded(self, job_id: int) -> None:
        try:
            if await self.queue.forwarded_through(job_id, time.time()):
                self.wake()
        except GatewayError as exc:  # the poll still finds it
            log.warning("retrieval_wake_failed", job=job_id, error=str(exc))

    def stop(self) -> None:
        """End `run()`; retrieves in flight are aborted and resume at the next start."""
        for progress in list(self._retrieves):
            progress.stop()
        self._loop.stop()

    def limits(self, peer: PeerSettings) -> ArchiveLimits:
        limits = self._limits.get(peer.name)
        if limits is None:
            limits = self._limits[peer.name] = ArchiveLimits(peer)
        return limits

    @property
    def backoff(self) -> Backoff:
        r = self.settings.retrieve
        return Backoff(r.retry_base_seconds, r.retry_max_seconds, r.max_attempts)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("retriever_started", concurrency=self.settings.retrieve.concurrency)
        try:
            await self._loop.run()
        finally:
            await self._idle.close()

    def _free(self) -> int:
        """Slots for more requests: a request whose worker reported nothing for its lease
        holds none (it is claimed again)."""
        live = [r for r in self._loop.running if not self._loop.stale(_token(r))]
        return self.settings.retrieve.concurrency - len(live)

    async def _claim(self, now: float) -> list[Request]:
        free = self._free()
        return await self.queue.claim_due(now, free) if free > 0 else []

    async def _next_due(self) -> float | None:
        # Full: a request that ends wakes the loop.
        return await self.queue.next_due_at() if self._free() > 0 else None

    def _progressed(self, request: Request) -> None:
        """The worker of *request* is making progress (any thread): its lease is renewed."""
        self._loop.progressed(_token(request))

    async def _waiting(self, request: Request, wait: Callable[[], Awaitable[object]]) -> None:
        """Await *wait* (a rate token, a move slot), the request's lease renewed meanwhile:
        waiting on purpose is not hanging."""
        async with anyio.create_task_group() as tg:

            async def beat() -> None:
                while True:
                    self._progressed(request)
                    await anyio.sleep(self._loop.lease_seconds / 8)

            tg.start_soon(beat)
            await wait()
            tg.cancel_scope.cancel()

    async def _advance(self, request: Request) -> None:
        steps: dict[str, Callable[[Request], Awaitable[Step]]] = {
            "query": self._query_primary,
            "query_secondary": self._query_secondary,
            "compare": self._compare,
            "move": self._move,
            "verify": self._verify,
        }
        resumed = request.status == "Queued"  # new, or resumed by an operator or a window
        log.info(
            "retrieval_claimed",
            request=request.id,
            project=request.project,
            step=request.step,
            attempt=request.attempts + 1,
            lease=request.lease_owner,
            previous_error=request.reason,  # "lease expired: ..." when another worker hung
        )
        step: Step = request.step
        timings = dict(request.timings)
        while step != "done":
            started = time.monotonic()
            self._progressed(request)
            try:
                if step == "forward":
                    following = await self._forward(request, resumed=resumed)
                else:
                    following = await steps[step](request)
            except _Pause as pause:
                await self.queue.update(
                    request,
                    release=True,
                    status=pause.status,
                    reason=str(pause),
                    next_attempt_at=pause.at,
                    timings=_add(timings, step, started),
                )
                return
            except _Final as final:
                await self._end(request, "Failed", str(final), timings, step, started)
                return
            except (_Attempt, PeerError) as exc:
                if isinstance(exc, PeerError) and exc.permanent:  # retrying cannot change it
                    reason = f"{exc}{NOT_RETRIED}"
                    await self._end(request, "Failed", reason, timings, step, started)
                    return
                resume = exc.step if isinstance(exc, _Attempt) and exc.step else step
                await self._failed_attempt(request, str(exc), resume, _add(timings, step, started))
                return
            except GatewayError as exc:  # the store, an unusable answer: retried like the rest
                log.warning("retrieval_step_error", request=request.id, step=step, error=str(exc))
                await self._failed_attempt(request, str(exc), step, _add(timings, step, started))
                return
            except Exception as exc:  # a bug: logged with its traceback, counted as an attempt
                log.exception("retrieval_crashed", request=request.id, step=step)
                reason = f"internal error: {type(exc).__name__}: {exc}"
                await self._failed_attempt(request, reason, step, _add(timings, step, started))
                return
            _add(timings, step, started)
            step = following
            await self.queue.update(request, step=step, timings=timings)  # LeaseLost: stop
            current = await self.queue.get(request.id)  # what the step recorded
            assert current is not None  # the update found it
            request = current
        await self._end(request, "Successful", None, timings, "done", None)

    async def _end(
        self,
        request: Request,
        status: str,
        reason: str | None,
        timings: dict[str, float],
        step: str,
        started: float | None,
    ) -> None:
        if started is not None:
            _add(timings, step, started)
        now = time.time()
        await self.queue.update(
            request,
            release=True,
            status=status,
            reason=reason,
            step="done" if status == "Successful" else step,
            finished_at=now,
            timings=timings,
        )
        log.info("retrieval_ended", request=request.id, project=request.project, status=status,
                 reason=reason, timings=timings)  # fmt: skip

    async def _failed_attempt(
        self, request: Request, reason: str, step: str, timings: dict[str, float]
    ) -> None:
        attempts = request.attempts + 1
        backoff = self.backoff
        if attempts >= backoff.max_attempts:
            await self.queue.update(
                request,
                release=True,
                status="Failed",
                reason=f"{reason} (after {attempts} attempts)",
                attempts=attempts,
                step=step,
                finished_at=time.time(),
                timings=timings,
            )
            log.warning("retrieval_failed", request=request.id, reason=reason, attempts=attempts)
            return
        due = time.time() + backoff.delay(attempts, self._random)
        await self.queue.update(
            request,
            release=True,
            status="Processing",
            reason=reason,
            attempts=attempts,
            step=step,
            next_attempt_at=due,
            timings=timings,
        )
        log.info("retrieval_attempt_failed", request=request.id, step=step, reason=reason,
                 attempt=attempts)  # fmt: skip

    # -- DICOM, rate-limited ---------------------------------------------------------------------

    def _peer(self, name: str | None, role: str) -> PeerSettings:
        peer = self.settings.peer(name) if name else None
        if peer is None:
            raise _Final(f"the {role} archive {name!r} is not a configured peer")
        return peer

    async def _find(self, request: Request, peer: PeerSettings, query: Dataset) -> list[Dataset]:
        await self._waiting(request, self.limits(peer).queries.acquire)
        node = self.settings.node
        answers = await c_find(node, peer, query, self._idle)
        self._progressed(request)
        return answers

    # -- the steps ----------------------------------------------------------------------------

    def _study_query(self, request: Request) -> Dataset:
        if request.study_uid:
            return identifier("STUDY", StudyInstanceUID=request.study_uid)
        return identifier(
            "STUDY",
            StudyInstanceUID="",
            PatientID=request.mrn,
            AccessionNumber=request.accession,
        )

    async def _found_studies(self, peer: PeerSettings, request: Request) -> list[str]:
        answers = await self._find(request, peer, self._study_query(request))
        uids = [str(a.get("StudyInstanceUID", "")) for a in answers]
        return list(dict.fromkeys(uid for uid in uids if uid))

    async def _query_primary(self, request: Request) -> Step:
        primary = self._peer(self.settings.retrieve.primary, "primary")
        studies = await self._found_studies(primary, request)
        if studies:
            await self.queue.update(request, archive=primary.name, studies=studies)
            return "compare"
        if self.settings.retrieve.secondary:
            return "query_secondary"
        raise _Final(f"not found in {primary.name}")

    async def _query_secondary(self, request: Request) -> Step:
        retrieve = self.settings.retrieve
        secondary = self._peer(retrieve.secondary, "secondary")
        opens = window_opens_at(retrieve.secondary_windows, retrieve.zone, time.time())
        if opens is not None:
            when = datetime.fromtimestamp(opens, retrieve.zone).isoformat(timespec="minutes")
            raise _Pause(opens, f"waiting for the window of {secondary.name} (opens {when})",
                         status="Queued")  # fmt: skip
        studies = await self._found_studies(secondary, request)
        if studies:
            await self.queue.update(request, archive=secondary.name, studies=studies)
            return "compare"
        raise _Final(f"not found in {retrieve.primary} or {secondary.name}")

    async def _compare(self, request: Request) -> Step:
        peer = self._peer(request.archive, "chosen")
        limits = self.limits(peer)
        series_uid = request.series_uid
        # One association for the study's series and each series' instances (the one the
        # study query used, where it is still open); every C-FIND takes a query token.
        listed: list[ArchiveInstance] = []
        async with FindSession(self.settings.node, peer, self._idle) as session:
            for study in request.studies:
                await self._waiting(request, limits.queries.acquire)
                query = identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series_uid)
                series = [str(a.get("SeriesInstanceUID", "")) for a in await session.find(query)]
                for uid in dict.fromkeys(s for s in series if s):
                    await self._waiting(request, limits.queries.acquire)
                    # SOP Class UIDs only for a C-GET, which proposes a context for each: an
                    # Orthanc reads every instance's file for them (15 ms for a study of 20
                    # instances here, 6-7 ms without).
                    classes = {"SOPClassUID": ""} if peer.retrieve == "get" else {}
                    image_query = identifier(
                        "IMAGE",
                        StudyInstanceUID=study,
                        SeriesInstanceUID=uid,
                        SOPInstanceUID="",
                        **classes,
                    )
                    answers = await session.find(image_query)
                    self._progressed(request)
                    for answer in answers:
                        sop = str(answer.get("SOPInstanceUID", ""))
                        sop_class = str(answer.get("SOPClassUID", ""))
                        if sop:
                            listed.append(ArchiveInstance(sop, uid, study, sop_class))
        if not listed:
            what = f"series {request.series_uid}" if request.series_uid else "any instance"
            studies = ", ".join(request.studies)
            raise _Final(f"{peer.name} lists no instance of {what} in study(ies) {studies}")
        await self.queue.set_instances(request, listed)
        return "move"

    async def _move(self, request: Request) -> Step:
        peer = self._peer(request.archive, "chosen")
        missing = await self.queue.missing(request.id)
        if not missing:
            return "verify"
        if peer.retrieve == "get" and any(not i.sop_class_uid for i in missing):
            return "compare"  # listed for a C-MOVE before a reload: again, with the classes
        listed = await self.store.read(
            lambda conn: {
                row[0]: row[1]
                for row in conn.execute(
                    "SELECT series_uid, count(*) FROM retrieval_instances WHERE request_id = ?"
                    " GROUP BY series_uid",
                    (request.id,),
                )
            }
        )
        by_series: dict[tuple[str, str], list[ArchiveInstance]] = {}
        for instance in missing:
            by_series.setdefault((instance.study_uid, instance.series_uid), []).append(instance)
        moved = request.moved
        for (study, series), instances in by_series.items():
            if len(instances) == listed.get(series):
                queries = [identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series)]
            else:
                uids = [i.sop_uid for i in instances]
                queries = [
                    identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                               SOPInstanceUID=uids[n : n + _UIDS_PER_MOVE])
                    for n in range(0, len(uids), _UIDS_PER_MOVE)
                ]  # fmt: skip
            classes = sorted({i.sop_class_uid for i in instances if i.sop_class_uid})
            for query in queries:
                result = await self._retrieve(request, peer, query, classes)
                moved += result.completed + result.warning
                await self.queue.update(request, moved=moved)
                if result.failed:
                    raise _Attempt(
                        f"{peer.name}: {result.failed} of the retrieve's sub-operations failed"
                    )
        return "verify"

    async def _retrieve(
        self, request: Request, peer: PeerSettings, query: Dataset, classes: list[str]
    ) -> RetrieveResult:
        limits = self.limits(peer)
        # The slot first, then the rate token, then the request at once: a token taken before
        # waiting for a slot would let two requests that waited reach the archive together.
        await self._waiting(request, limits.concurrent.acquire)
        try:
            await self._waiting(request, limits.moves.acquire)
        except BaseException:
            limits.concurrent.release()
            raise
        try:
            progress = Progress()
            self._retrieves.add(progress)
            node = self.settings.node
            stall = self.settings.retrieve.stall_seconds
            what = "C-GET" if peer.retrieve == "get" else "C-MOVE"
            stalled = False
            outcome: RetrieveResult | BaseException | None = None
            try:
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        nonlocal stalled
                        held = await self.queue.held(request.id)
                        last = time.monotonic()
                        while True:
                            self._progressed(request)  # alive, and watching for a stall
                            await anyio.sleep(min(1.0, stall / 4))
                            now_held = await self.queue.held(request.id)
                            if now_held != held:
                                held, last = now_held, time.monotonic()
                            if time.monotonic() - max(last, progress.last) > stall:
                                stalled = True
                                progress.stop()
                                return

                    tg.start_soon(watch)
                    try:
                        if peer.retrieve == "get":
                            outcome = await c_get(node, peer, query, classes, self.store, progress)
                        else:
                            outcome = await c_move(node, peer, query, progress)
                    except (PeerError, GatewayError) as exc:
                        outcome = exc  # raised below, outside the task group (not in a group)
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                self._retrieves.discard(progress)
            if isinstance(outcome, BaseException):
                if stalled:
                    reason = f"timeout: no progress for {stall:g} s during the {what}"
                    raise _Attempt(reason) from outcome
                raise outcome
            assert outcome is not None
            result = outcome
        finally:
            limits.concurrent.release()
        log.info(
            "retrieve_answered",
            request=request.id,
            peer=peer.name,
            method=what,
            completed=result.completed,
            failed=result.failed,
            warning=result.warning,
        )
        return result

    async def _verify(self, request: Request) -> Step:
        stall = self.settings.retrieve.stall_seconds
        expected = await self.queue.expected(request.id)  # fixed by compare: read it once
        seen = -1
        last = time.monotonic()
        while True:
            held = await self.queue.held(request.id)
            if held >= expected:
                return "forward"
            self._progressed(request)  # alive: a stall fails the attempt below
            if held != seen:
                seen, last = held, time.monotonic()
            elif time.monotonic() - last > stall:
                raise _Attempt(
                    f"timeout: {expected - held} instance(s) listed by {request.archive} did"
                    f" not arrive within {stall:g} s",
                    step="move",
                )
            await anyio.sleep(min(0.2, stall / 10))

    async def _forward(self, request: Request, *, resumed: bool = False) -> Step:
        project = self.settings.project(request.project)
        target = (project.anonymiser if project else None) or self.settings.retrieve.anonymiser
        if target is None or self.settings.peer(target) is None:
            raise _Final(f"no anonymiser configured for project {request.project!r}")
        if request.series_uid:
            scopes = [("series", request.series_uid)]
        else:
            scopes = [("study", uid) for uid in request.studies]
        latest = await self.queue.latest_jobs(request.id)
        jobs: list[JobSpec] = []
        waiting: list[str] = []
        for scope, uid in scopes:
            state, error = latest.get((scope, uid), (None, None))
            if state == "done":
                continue
            if state in ("failed", "cancelled") and not resumed:
                raise _Final(f"forward to {target} {state}: {error or 'no reason recorded'}")
            if state in (None, "failed", "cancelled"):
                rule = f"{_FORWARD_RULE}{request.project}"
                priority = dispatch_priority(request.priority)
                jobs.append(JobSpec(scope, uid, target, rule, priority))  # type: ignore[arg-type]
                waiting.append("queued")
            else:
                waiting.append(error or state or "queued")
        if jobs:
            await self.queue.forward(request, jobs)
            self.wake_dispatcher()
        if not waiting:
            return "done"
        errors = [w for w in waiting if w not in ("queued", "running")]
        reason = f"forwarding to {target}: " + (
            errors[0] if errors else f"{len(waiting)} job(s) open"
        )
        raise _Pause(time.time() + _FORWARD_POLL, reason)


def _token(request: Request) -> str:
    """The claim a request being worked is known by: its lease token."""
    return request.lease_owner or str(request.id)


def _add(timings: dict[str, float], step: str, started: float) -> dict[str, float]:
    timings[step] = round(timings.get(step, 0.0) + time.monotonic() - started, 3)
    return timings
