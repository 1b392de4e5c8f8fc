"""The dispatcher: runs the durable jobs of `gateway.store.jobs` against peers and folders.

One asyncio service. Its loop claims due jobs (most urgent first, at most
`per_target_concurrency` running per target), runs each in a task, and sleeps until the next job
is due, the earliest lease runs out, or `wake()` is called (an enqueue, a retry, a job that
finished). A job selects its instances from the index, skips
those its target already holds (the `deliveries` ledger), and sends the rest: C-STORE to a peer
(`send_instances`, on the event loop over the asyncio network layer), or an atomic copy into
a folder (in a worker thread). Acknowledgements are
recorded as they come, group-committed by `_Ledger`. docs/dispatch.md describes the model.
"""

from __future__ import annotations

import contextlib
import random as _random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.from_thread
import anyio.to_thread
import structlog

from gateway.audit import AuditLog
from gateway.config import FolderSettings, PeerSettings, Settings, WebhookSettings
from gateway.metrics import Metrics
from gateway.scu.notify import NotifyError, post_json, summary
from gateway.scu.requestor import IdleAssociations
from gateway.scu.sender import Delivery, send_instances
from gateway.store.files import write_atomically
from gateway.store.instance import is_valid_uid
from gateway.store.jobs import Job, JobQueue
from gateway.store.store import Store, StoredInstance
from gateway.work import Backoff, WorkLoop

__all__ = ["Dispatcher", "folder_path"]

log = structlog.get_logger(__name__)


class _Stopping(Exception):
    """Raised by a sender's acknowledgement callback to end a send early (the dispatcher is
    stopping)."""


def _token(job: Job) -> str:
    """The claim a running job is known by: its lease token."""
    return job.lease_owner or str(job.id)


def folder_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where a folder target keeps an instance: `<root>/<study>/<series>/<sop>.dcm`.

    Raises ValueError for a UID that is not a digit-dot string (no name on disk is taken from
    anything else).
    """
    for uid in (study_uid, series_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"{uid[:70]!r} is not a UID usable as a file name")
    return root / study_uid / series_uid / f"{sop_uid}.dcm"


def copy_atomically(source: Path, target: Path) -> None:
    """Copy *source* to *target* so *target* is either absent, an old copy, or complete
    (`write_atomically`)."""

    def copy(out: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)

    write_atomically(target, copy)


class _Ledger:
    """Records a job's acknowledged instances as its sender reports them, group-committed.

    One ledger transaction is in flight at a time; acknowledgements that arrive while it
    commits go into the next one, which starts as soon as it has committed (from the writer
    thread's completion callback: an acknowledgement never waits for the next one, nor for the
    association's release). The sender never waits for the disk between instances, and a kill
    loses at most the acknowledgements of the commit in flight and those queued behind it
    (those instances are sent once more). `close()` waits for everything to be committed; a
    failed commit fails the attempt (raised by the next `add` or by `close`).
    """

    def __init__(
        self, queue: JobQueue, job: Job, progress: Callable[[], None] = lambda: None
    ) -> None:
        self._queue = queue
        self._job_id = job.id
        self._progress = progress  # told of each acknowledgement (renews the job's lease)
        self._lock = threading.RLock()  # the sender (loop or copy thread), the writer's callbacks
        self._waiting: list[StoredInstance] = []
        self._in_flight: Future[int] | None = None
        self._failed: BaseException | None = None

    def add(self, instance: StoredInstance) -> None:
        self._progress()
        with self._lock:
            if self._failed is not None:
                raise self._failed
            self._waiting.append(instance)
            if self._in_flight is None:
                self._submit()

    def _submit(self) -> None:
        """Commit what waits (holding the lock)."""
        batch, self._waiting = self._waiting, []
        future = self._queue.record_delivered_nowait(self._job_id, batch)
        self._in_flight = future
        future.add_done_callback(self._committed)  # at once, re-entrantly, if already done

    def _committed(self, future: Future[int]) -> None:
        with self._lock:
            if self._in_flight is future:
                self._in_flight = None
            error = future.exception()
            if error is not None and self._failed is None:
                self._failed = error
            if self._waiting and self._failed is None and self._in_flight is None:
                self._submit()

    def close(self) -> None:
        while True:
            with self._lock:
                future = self._in_flight
                if future is None and self._waiting and self._failed is None:
                    self._submit()
                    continue
            if future is None:
                break
            with contextlib.suppress(Exception):
                future.result()  # its error, if any, is kept by _committed
        if self._failed is not None:
            raise self._failed


class Dispatcher:
    """Runs queued jobs until stopped; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        queue: JobQueue,
        *,
        backoff: Backoff | None = None,
        per_target_concurrency: int = 2,
        poll_seconds: float = 30.0,
        claim_limit: int = 32,
        random: _random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if per_target_concurrency < 1:
            raise ValueError("per_target_concurrency must be at least 1")
        self.settings = settings
        self.store = store
        self.queue = queue
        self.backoff = backoff or Backoff()
        self.audit: AuditLog | None = None  # set by the application
        self.metrics = metrics or Metrics()
        self.per_target_concurrency = per_target_concurrency
        self.claim_limit = claim_limit
        self._random = random or _random.Random()
        # Told of each attempt that ended (done, or failed: retried or not); set by the
        # application (retrieval waits on its forwarding jobs).
        self.on_job_ended: Callable[[Job], None] = lambda job: None
        self._stopping = threading.Event()  # read by senders (the folder copy's thread too)
        # Peers' associations kept between jobs ([node] association_close_delay).
        self._idle = IdleAssociations(settings.node.association_close_delay)
        self._loop: WorkLoop[Job] = WorkLoop(
            "dispatcher",
            claim=self._claim,
            next_due=self._next_due,
            work=self._execute,
            token=_token,
            renew=queue.renew,
            lease_seconds=queue.lease_seconds,
            poll_seconds=poll_seconds,
        )

    # -- control ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due jobs now (call on the event loop's thread after an enqueue or retry)."""
        self._loop.wake()

    def stop(self) -> None:
        """End `run()`: senders stop after the instance in flight, tasks are cancelled.

        Jobs interrupted stay `running` in the queue; `JobQueue.recover_running` at the next
        start queues them again, and what they delivered is not sent twice.
        """
        self._stopping.set()
        self._loop.stop()

    # -- the loop -----------------------------------------------------------------------------

    def _busy(self) -> tuple[set[str], dict[str, int]]:
        """Targets with no free slot, and the free slots of each target with running jobs. A
        job whose worker made no progress for its lease holds no slot: it is claimed again."""
        counts: dict[str, int] = {}
        for job in self._loop.running:
            if not self._loop.stale(_token(job)):
                counts[job.target] = counts.get(job.target, 0) + 1
        free = {t: self.per_target_concurrency - n for t, n in counts.items()}
        return {t for t, n in free.items() if n <= 0}, free

    async def run(self) -> None:
        """Claim and run due jobs until `stop()` is called (or the task is cancelled).

        A dispatcher runs once: after `stop()` (even one called before `run()`), `run()` returns.
        """
        log.info("dispatcher_started", per_target_concurrency=self.per_target_concurrency)
        try:
            await self._loop.run()
        finally:
            await self._idle.close()

    async def _claim(self, now: float) -> list[Job]:
        busy, free = self._busy()
        return await self.queue.claim_due(
            now,
            self.claim_limit,
            busy,
            free_slots=free,
            slots_per_target=self.per_target_concurrency,
        )

    async def _next_due(self) -> float | None:
        busy, _ = self._busy()
        return await self.queue.next_due_at(busy)

    # -- one job ------------------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        started = time.monotonic()
        log.info(
            "job_started",
            job=job.id,
            target=job.target,
            scope=job.scope,
            rule=job.rule,
            attempt=job.attempts + 1,
            lease=job.lease_owner,
            previous_error=job.last_error,  # "lease expired: ..." when another worker hung
        )
        hook = self.settings.webhook(job.target)
        if hook is not None:
            await self._notify(job, hook, started)
            return
        where = "s.series_uid = ?" if job.scope == "series" else "st.study_uid = ?"
        pending, skipped = await self.queue.pending(job)
        peer = self.settings.peer(job.target)
        folder = self.settings.folder(job.target)
        if not pending:
            note = "the target holds all of it" if skipped else "nothing stored (deleted?)"
            await self._done(job, started, delivered=0, skipped=skipped, note=note)
            return
        if peer is None and folder is None:
            unknown = f"target {job.target!r} is not a configured peer, folder or webhook"
            await self._failed(job, unknown, 0, skipped, started, permanent=True)
            return
        error: str | None
        permanent = False  # an error retrying cannot change (the peer does not know our AE)
        try:
            if peer is not None:
                delivered, error, permanent = await self._send_to_peer(job, peer, pending)
            else:
                assert folder is not None
                delivered, error = await self._copy_to_folder(job, folder, pending, where)
        except _Stopping:
            return  # stop() was called; the job resumes at the next start
        except Exception as exc:  # a bug or an unforeseen error: count it as a failed attempt
            log.exception("job_crashed", job=job.id, target=job.target)
            delivered, error = 0, f"{type(exc).__name__}: {exc}"
        if error is None:
            await self._done(job, started, delivered=delivered, skipped=skipped)
        else:
            await self._failed(job, error, delivered, skipped, started, permanent=permanent)

    async def _failed(
        self,
        job: Job,
        error: str,
        delivered: int,
        skipped: int,
        started: float,
        *,
        permanent: bool = False,
    ) -> None:
        state = await self.queue.fail_attempt(
            job.id, error, time.time(), self.backoff, permanent=permanent, lease=job.lease_owner
        )
        self.on_job_ended(job)
        self.metrics.dispatch_failures.labels(target=job.target).inc()
        self.metrics.dispatch_delivered.labels(target=job.target).inc(delivered)
        log.warning(
            "job_failed",
            job=job.id,
            target=job.target,
            lease=job.lease_owner,
            attempt=job.attempts + 1,
            state=state,
            delivered=delivered,
            skipped=skipped,
            error=error,
            duration=round(time.monotonic() - started, 3),
        )

    async def _notify(self, job: Job, hook: WebhookSettings, started: float) -> None:
        body = await summary(
            self.store,
            job.scope,
            job.uid,
            rule=job.rule,
            ae_title=self.settings.node.ae_title,
            patient=hook.patient_names,
        )
        if body is None:
            await self._done(job, started, note="nothing stored")
            return
        try:
            status = await anyio.to_thread.run_sync(post_json, hook, body)
        except NotifyError as exc:
            await self._failed(job, str(exc), 0, 0, started)
            return
        await self._done(job, started, http_status=status)

    async def _done(
        self, job: Job, started: float, *, delivered: int | None = None, **fields: object
    ) -> None:
        """The attempt delivered everything (*delivered* instances: None for a webhook):
        finish the job, count and log it."""
        state = await self.queue.finish(job.id, time.time(), lease=job.lease_owner)
        self.on_job_ended(job)
        if state is not None:  # None: cancelled while it ran, or its lease passed to another
            self.metrics.dispatch_completed.labels(target=job.target).inc()
        if delivered is not None:
            self.metrics.dispatch_delivered.labels(target=job.target).inc(delivered)
            fields = {"delivered": delivered, **fields}
        duration = round(time.monotonic() - started, 3)
        log.info("job_done", job=job.id, target=job.target, state=state, duration=duration,
                 lease=job.lease_owner, **fields)  # fmt: skip

    async def _send_to_peer(
        self, job: Job, peer: PeerSettings, pending: Sequence[StoredInstance]
    ) -> tuple[int, str | None, bool]:
        """C-STORE *pending* to *peer*: (delivered, the first error or None, whether that error
        is permanent)."""
        ledger = _Ledger(self.queue, job, lambda: self._loop.progressed(_token(job)))
        by_uid = {instance.sop_instance_uid: instance for instance in pending}
        errors: list[str] = []
        delivered = 0
        permanent = False

        def on_result(delivery: Delivery) -> None:
            nonlocal delivered, permanent
            if delivery.delivered:
                ledger.add(by_uid[delivery.sop_instance_uid])
                delivered += 1
            elif not errors:
                errors.append(delivery.error or f"status: 0x{delivery.status or 0:04X}")
                permanent = delivery.permanent
            if self._stopping.is_set():
                raise _Stopping

        try:
            await send_instances(self.settings.node, peer, pending, on_result=on_result,
                                 idle=self._idle)  # fmt: skip
        finally:
            await anyio.to_thread.run_sync(ledger.close)
        if self.audit is not None and delivered:
            self.audit.record("DICOM Instances Transferred", studies=[job.study_uid],
                              outcome="success" if not errors else "partial",
                              service="dispatch", destination=peer.name, job=job.id,
                              rule=job.rule, instances=delivered)  # fmt: skip
        return delivered, errors[0] if errors else None, permanent

    async def _copy_to_folder(
        self, job: Job, folder: FolderSettings, pending: Sequence[StoredInstance], where: str
    ) -> tuple[int, str | None]:
        def uids(conn: Any) -> dict[str, tuple[str, str]]:
            rows = conn.execute(
                "SELECT i.sop_uid, st.study_uid, s.series_uid FROM instances i"
                " JOIN series s ON i.series_pk = s.pk JOIN studies st ON s.study_pk = st.pk"
                f" WHERE {where}",
                (job.uid,),
            )
            return {row[0]: (row[1], row[2]) for row in rows}

        location = await self.store.read(uids)
        ledger = _Ledger(self.queue, job, lambda: self._loop.progressed(_token(job)))

        def copy_all() -> tuple[int, str | None]:
            try:
                return copy_each()
            finally:
                ledger.close()

        def copy_each() -> tuple[int, str | None]:
            delivered = 0
            for instance in pending:
                if self._stopping.is_set():
                    raise _Stopping
                sop = instance.sop_instance_uid
                if sop not in location:
                    return delivered, f"instance {sop} is no longer stored"
                study, series = location[sop]
                try:
                    target = folder_path(folder.path, study, series, sop)
                    copy_atomically(instance.path, target)
                except (OSError, ValueError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    return delivered, f"folder {folder.name}: cannot write {sop}: {reason}"
                ledger.add(instance)
                delivered += 1
            return delivered, None

        return await anyio.to_thread.run_sync(copy_all)
