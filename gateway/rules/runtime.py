"""The completion engine: feeds arrivals and timers to the rules, and says when work is complete.

Arrivals come from the store (each committed batch of stored instances). A series is evaluated
once, on its first instance's attributes and connection facts; the rules that fired are
remembered with it. Each fired `route` or `notify` rule opens, or prolongs, a wait on the series
(level `series`) or on its study (level `study`), kept as a row in the index (`store/
completions.py`): every arrival resets the deadline, and a restart re-derives the timers from the
rows. A `discard` rule opens no wait: discarded data is never dispatched.

A wait completes:

- series level: `quiet_seconds` after the series' last instance;
- study level without `required_series`: `quiet_seconds` after the study's last instance;
- study level with `required_series`: as soon as the descriptions of the study's complete series
  (each quiet for `quiet_seconds`) satisfy the expression;
- either study form: at `force_seconds` after the first instance, whatever it waits for, which
  then `proceed`s or `discard`s (`force_action`); and when an operator forces it.

Arrivals reach the engine through a buffer in memory (the store's writer thread must not wake
the event loop for every instance); a checkpoint in the index lets a restart take again what
arrived after it, so a crash loses no arrival. The checkpoint moves with every committed batch,
whether or not a rule waits on it (with no rules the instances are not even kept: the batch only
moves the checkpoint), so what a restart reads again is what arrived in the last seconds, not
everything since the last rule fired. A batch that opens or prolongs no wait moves it at most
once per `_CHECKPOINT_EVERY` (one FULL commit each).

A completed wait is closed and its dispatch jobs (one per target of the rule) are queued in the
same transaction, so a kill never leaves a completed wait without its jobs; `on_complete` is
told afterwards (the application wakes the dispatcher). Instances that arrive
after completion open a new wait for what they belong to: the whole series, or the whole study,
is sent again when that wait completes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import anyio
import structlog

from gateway.rules.engine import RuleSet, required_series_satisfied
from gateway.rules.facts import connection_facts, read_facts
from gateway.rules.model import RuleSettings
from gateway.store.completions import Completion, CompletionStore, FirstInstance, Touch
from gateway.store.index import IngestResult
from gateway.store.jobs import JobSpec
from gateway.store.store import Store

__all__ = ["CompletedWork", "CompletionEngine"]

log = structlog.get_logger(__name__)

_COALESCE_SECONDS = 0.1
_CHECKPOINT_MARGIN = 5.0
_CHECKPOINT_EVERY = 1.0  # seconds (engine clock) between checkpoint-only writes


# Series whose fired rules stay in memory (a few hundred bytes each); the index holds them all,
# so a series evicted costs one read. Unbounded, it kept an entry for every series the process
# ever received.
_FIRED_CACHE = 4096


@dataclass(frozen=True, slots=True)
class CompletedWork:
    """A series or study a rule waited on, now complete."""

    rule: RuleSettings
    scope: Literal["series", "study"]
    uid: str
    study_uid: str


class CompletionEngine:
    """Waits on series and studies for the rules, durably; see the module docstring."""

    def __init__(
        self,
        rules: Sequence[RuleSettings],
        store: Store,
        on_complete: Callable[[CompletedWork], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ruleset = RuleSet(rules)
        self._rules = {rule.name: rule for rule in rules}
        self._store = store
        self._completions = CompletionStore(store)
        self._on_complete = on_complete
        self._clock = clock
        self._created_at = clock()  # on the very first run, arrivals count from here
        self._arrivals: asyncio.Queue[list[IngestResult]] = asyncio.Queue()
        self._fired: dict[str, list[str]] = {}  # series UID -> rules fired; a bounded cache
        self._waiting: list[Completion] = []
        # Arrivals may come before `run` starts: they are buffered for it from the first one.
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()
        self._buffer: list[IngestResult] = []
        self._buffer_lock = threading.Lock()
        self._drain_scheduled = False
        self._committed = False  # a batch committed since the arrivals were last taken
        self._checkpointed_at = float("-inf")

    def arrived(self, results: list[IngestResult]) -> None:
        """Queue a committed batch of stored instances (call on the event loop).

        With no rules the instances are dropped (there is nothing to wait for) but the batch
        still counts: it moves the arrivals checkpoint.
        """
        self._committed = True
        self._arrivals.put_nowait(results if self._rules else [])

    def arrived_from_thread(self, results: list[IngestResult]) -> None:
        """Buffer a committed batch from the store's writer thread.

        The event loop is woken at most once per `_COALESCE_SECONDS` however many batches
        commit: measured, waking it for every instance cost the receive path ~15% (its thread
        competes for the GIL with the association threads). Deadlines are seconds, so the
        delay does not matter.
        """
        if self._loop is None:
            return
        with self._buffer_lock:
            if self._rules:  # with none, the wake-up alone moves the checkpoint
                self._buffer.extend(results)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._loop.call_soon_threadsafe(self._loop.call_later, _COALESCE_SECONDS, self._drain)

    def _drain(self) -> None:
        with self._buffer_lock:
            results, self._buffer = self._buffer, []
            self._drain_scheduled = False
        self.arrived(results)

    def set_rules(self, rules: Sequence[RuleSettings]) -> None:
        """Use a reloaded rule set from now on (call on the event loop's thread).

        Series not yet evaluated are evaluated with the new rules. A series evaluated before
        keeps the rules that fired for it; its open waits complete with the new definition of
        a rule of the same name, and end unsent when that rule is gone.
        """
        self._ruleset = RuleSet(rules)
        self._rules = {rule.name: rule for rule in rules}

    async def force_study(self, study_uid: str) -> int:
        """Complete every wait of a study now; return how many there were."""
        count = await self._completions.force_study(study_uid, self._clock())
        self._arrivals.put_nowait([])  # wake the loop
        return count

    async def run(self) -> None:
        """Serve arrivals and deadlines until cancelled."""
        self._loop = asyncio.get_running_loop()
        await self._completions.ensure_schema()
        # Arrivals are buffered in memory on their way here: what arrived after the last
        # checkpoint is taken again (touching a wait twice only prolongs it a little).
        missed = await self._completions.arrivals_since_checkpoint(self._created_at)
        if missed and self._rules:
            # A wait that closed after these arrived covered them: it is not opened again.
            await self._on_arrivals(
                [IngestResult("stored", "", series, study, "") for series, study, _ in missed],
                replayed={series: at for series, _, at in missed},
            )
        self._waiting = await self._completions.waiting()
        log.info("completion_engine_started", waiting=len(self._waiting))
        while True:
            await self._settle_due()
            batch = await self._next_arrivals()
            committed, self._committed = self._committed, False
            touched = (batch or committed) and await self._on_arrivals(batch or [])
            if touched:
                self._waiting = await self._completions.waiting()

    async def _next_arrivals(self) -> list[IngestResult] | None:
        deadlines = [c.due_at for c in self._waiting] + [
            c.force_at for c in self._waiting if c.force_at is not None
        ]
        timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else None
        try:
            first = await asyncio.wait_for(self._arrivals.get(), timeout)
        except TimeoutError:
            return None
        batch = list(first)
        while not self._arrivals.empty():
            batch.extend(self._arrivals.get_nowait())
        if not batch:  # a wake-up (forced completion): re-read the waits
            self._waiting = await self._completions.waiting()
        return batch

    # -- arrivals -----------------------------------------------------------------------------

    async def _on_arrivals(
        self, results: list[IngestResult], replayed: dict[str, float] | None = None
    ) -> bool:
        """Open or prolong the waits of *results* and move the checkpoint; True if any wait
        was touched. A batch that touches none moves the checkpoint at most once per
        `_CHECKPOINT_EVERY`. *replayed* (series UID -> newest received-at) marks arrivals
        taken again at start-up (`Touch.arrived_at`)."""
        now = self._clock()
        series = {r.series_instance_uid: r.study_instance_uid for r in results}
        touches: list[Touch] = []
        for series_uid, study_uid in series.items():
            for name in await self._rules_for(series_uid):
                rule = self._rules.get(name)
                if rule is None or rule.action == "discard":
                    continue
                study_level = rule.level == "study"
                touches.append(
                    Touch(
                        rule=name,
                        scope="study" if study_level else "series",
                        uid=study_uid if study_level else series_uid,
                        study_uid=study_uid,
                        now=now,
                        quiet_seconds=rule.quiet_seconds,
                        force_seconds=rule.force_seconds if study_level else None,
                        arrived_at=None if replayed is None else replayed.get(series_uid),
                    )
                )
        if not touches and now - self._checkpointed_at < _CHECKPOINT_EVERY:
            return False  # an older checkpoint is still right: a restart reads a little more
        # The checkpoint trails by a margin: batches committed while this one was buffered
        # carry earlier received-at times than `now`.
        await self._completions.touch(touches, now - _CHECKPOINT_MARGIN)
        self._checkpointed_at = now
        return bool(touches)

    async def _rules_for(self, series_uid: str) -> list[str]:
        """The rules that fired for a series, evaluated on its first instance once."""
        cached = self._fired.get(series_uid)
        if cached is None:
            cached = await self._completions.fired_rules(series_uid)
        if cached is None:
            first = await self._completions.first_instance(series_uid)
            if first is None:
                return []
            try:
                facts = await anyio.to_thread.run_sync(self._read_facts, first)
            except (OSError, ValueError) as exc:
                log.error("rule_evaluation_failed", series_uid=series_uid, error=str(exc))
                return []
            decision = self._ruleset.evaluate(facts)
            cached = list(decision.names)
            await self._completions.remember_fired(series_uid, cached)
            log.info(
                "series_evaluated",
                series_uid=series_uid,
                fired=cached,
                discarded=decision.discarded,
            )
        if len(self._fired) >= _FIRED_CACHE:
            self._fired.clear()  # bounded: the index keeps every series' rules
        self._fired[series_uid] = cached
        return cached

    def _read_facts(self, first: FirstInstance) -> dict[str, object]:
        connection = connection_facts(first.calling_ae, first.called_ae, first.peer_address)
        path = self._store.files.absolute(first.path)
        return read_facts(path, self._ruleset.keywords, connection)

    # -- deadlines ----------------------------------------------------------------------------

    async def _settle_due(self) -> None:
        now = self._clock()
        changed = False
        for completion in self._waiting:
            forced = completion.force_at is not None and completion.force_at <= now
            if not forced and completion.due_at > now:
                continue
            changed = True
            rule = self._rules.get(completion.rule)
            if rule is None:  # the rule is gone from the config: its wait ends unsent
                await self._completions.close(completion.id, "discarded", now)
                continue
            if forced:
                await self._finish(completion, rule, now, rule.force_action == "discard")
            elif completion.scope == "study" and rule.required_series_expression is not None:
                await self._check_required(completion, rule, now)
            else:
                await self._finish(completion, rule, now, False)
        if changed:
            self._waiting = await self._completions.waiting()

    async def _check_required(self, completion: Completion, rule: RuleSettings, now: float) -> None:
        """Complete when the complete series satisfy `required_series`; else look again later."""
        series = await self._completions.study_series(completion.study_uid)
        quiet = rule.quiet_seconds
        complete = [s.description for s in series if s.last_received_at + quiet <= now]
        if required_series_satisfied(rule, complete):
            await self._finish(completion, rule, now, False)
            return
        pending = [s.last_received_at + quiet for s in series if s.last_received_at + quiet > now]
        # Look again when the next series becomes complete, or after another quiet period.
        await self._completions.reschedule(completion.id, min(pending, default=now + quiet))

    async def _finish(
        self, completion: Completion, rule: RuleSettings, now: float, discard: bool
    ) -> None:
        """Close the wait and queue its jobs in one transaction, then tell `on_complete`."""
        jobs = [
            JobSpec(completion.scope, completion.uid, target, rule.name, rule.priority)
            for target in rule.targets
        ]
        queued = await self._completions.close(
            completion.id, "discarded" if discard else "done", now, [] if discard else jobs
        )
        if queued is None:
            return
        log.info(
            "completion_discarded" if discard else "completion_reached",
            rule=rule.name,
            scope=completion.scope,
            uid=completion.uid,
            waited=round(now - completion.first_at, 3),
            jobs=queued,
        )
        if discard:
            return
        # A new cycle re-evaluates nothing: the series' fired rules stay as they were.
        await self._on_complete(
            CompletedWork(rule, completion.scope, completion.uid, completion.study_uid)
        )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
