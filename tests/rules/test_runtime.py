"""The completion engine on a real store: quiet periods, required series, force, restarts.

The engine and the store run on a clock the test moves (`Clock`): a quiet period or a force
timeout passes when the test says so, not after a wall-clock sleep, and a check that nothing
completed yet is made once the engine has looked at its deadlines at that time.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydicom.uid import generate_uid

from gateway.config import PeerSettings, Settings
from gateway.rules.runtime import CompletedWork, CompletionEngine
from gateway.store.completions import ARRIVALS_SINCE, CompletionStore
from gateway.store.index import IngestResult, Provenance
from gateway.store.jobs import JobQueue
from gateway.store.store import Store
from tests.conftest import TEST_FILES, write_variant

CT = TEST_FILES / "CT_small.dcm"
PEER = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


def rules(*tables: dict[str, Any]) -> Settings:
    return Settings(peers=[PEER], rules=list(tables))  # type: ignore[arg-type]


class Clock:
    """A wall clock the test moves, shared by the store and the engine."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SteppedEngine(CompletionEngine):
    """The engine, for a test that moves its clock: moving it wakes nothing, so `wake()` has
    the engine look at its deadlines again (as `force_study` does); `taken` counts the
    arrivals it has taken (replayed ones too), `settled` the last wake-up it has settled
    what was due after."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0
        self.woken = 0
        self.settled = 0

    def wake(self) -> int:
        self.woken += 1
        self._arrivals.put_nowait([])
        return self.woken

    async def _on_arrivals(
        self, results: list[IngestResult], replayed: dict[str, float] | None = None
    ) -> bool:
        touched = await super()._on_arrivals(results, replayed)
        self.taken += len(results)
        return touched

    async def _settle_due(self) -> None:
        woken = self.woken  # the clock was moved before this wake-up
        await super()._settle_due()
        self.settled = woken


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until *condition()* (the engine runs on this loop), 10 s at most."""
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not {what} in time"
        await asyncio.sleep(0.01)


class Harness:
    """A store, an engine fed by the store's ingest events, and the completions it reports."""

    def __init__(self, tmp: Path, settings: Settings, clock: Clock) -> None:
        self.tmp = tmp
        self.clock = clock
        self.store = Store(tmp / "data", clock=clock)
        self.settings = settings
        self.completed: list[tuple[str, str, str]] = []
        self.task: asyncio.Task[None] | None = None
        self.engine: SteppedEngine | None = None

    async def start(self) -> Harness:
        await self.store.open()
        await JobQueue(self.store).ensure_schema()  # completions queue their jobs
        self.engine = SteppedEngine(self.settings.rules, self.store, self._done, clock=self.clock)
        self.store.set_ingest_listener(self.engine.arrived_from_thread)
        self.task = asyncio.create_task(self.engine.run())
        return self

    async def _done(self, work: CompletedWork) -> None:
        self.completed.append((work.rule.name, work.scope, work.uid))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.store.close()

    async def send(self, *, taken: bool = True, **attributes: Any) -> None:
        """Store an instance; with *taken*, return once the engine has taken it (opened or
        reset its waits at the clock's time)."""
        assert self.engine is not None
        engine, before = self.engine, self.engine.taken
        source = write_variant(CT, self.tmp / f"{generate_uid()}.dcm", **attributes)
        temp = self.store.files.new_temp_path()
        shutil.copyfile(source, temp)
        await self.store.ingest(temp, Provenance(calling_ae="CT1"))
        if taken:
            await until(lambda: engine.taken > before, "taken")

    async def until_taken(self, count: int) -> None:
        """Wait until the engine has taken *count* arrivals (a restart takes some again)."""
        assert self.engine is not None
        engine = self.engine
        await until(lambda: engine.taken >= count, f"{count} taken")

    async def advance(self, seconds: float) -> None:
        """Move the clock on; return once the engine has completed what was due by then."""
        assert self.engine is not None
        engine = self.engine
        self.clock.now += seconds
        woken = engine.wake()
        await until(lambda: engine.settled >= woken, "settled")

    async def open_waits(self) -> list[tuple[str, str]]:
        """(rule, scope) of the waits open in the index."""
        return await self.store.read(
            lambda c: c.execute(
                "SELECT rule, scope FROM completions WHERE state = 'waiting' ORDER BY id"
            ).fetchall()
        )


@pytest_asyncio.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Harness] = []
    clock = Clock(time.time())  # one per test: a restarted harness goes on from its time

    async def make(settings: Settings, name: str = "h") -> Harness:
        h = await Harness(tmp_path / name, settings, clock).start()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.stop()


def series(study: str, description: str) -> dict[str, str]:
    return {"StudyInstanceUID": study, "SeriesInstanceUID": generate_uid(),
            "SeriesDescription": description}  # fmt: skip


@pytest.mark.asyncio
async def test_series_completes_after_its_quiet_period_and_arrivals_reset_it(harness: Any) -> None:
    h = await harness(rules({"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"],
                             "quiet_seconds": 0.4}))  # fmt: skip
    s = series(generate_uid(), "AX")
    for _ in range(3):
        await h.send(SOPInstanceUID=generate_uid(), **s)
        await h.advance(0.25)  # each arrival resets the 0.4 s wait
    assert h.completed == []  # 0.75 s after the first arrival
    await h.advance(0.1)
    assert h.completed == []  # 0.35 s after the last
    await h.advance(0.1)
    assert h.completed == [("ct", "series", s["SeriesInstanceUID"])]


@pytest.mark.asyncio
async def test_rules_that_do_not_match_or_discard_open_no_wait(harness: Any) -> None:
    h = await harness(rules(
        {"name": "drop-ct", "match": 'CallingAE == "CT1"', "action": "discard"},
        {"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"], "quiet_seconds": 0.2},
        {"name": "mr", "match": 'Modality == "MR"', "targets": ["pacs"], "quiet_seconds": 0.2},
    ))  # fmt: skip
    await h.send(SOPInstanceUID=generate_uid(), **series(generate_uid(), "AX"))
    await h.advance(0.6)
    assert h.completed == [] and await h.open_waits() == []


@pytest.mark.asyncio
async def test_fallback_fires_only_when_nothing_else_did(harness: Any) -> None:
    h = await harness(rules(
        {"name": "mr", "match": 'Modality == "MR"', "targets": ["pacs"], "quiet_seconds": 0.2},
        {"name": "rest", "match": 'Modality != ""', "targets": ["pacs"], "quiet_seconds": 0.2,
         "fallback": True},
    ))  # fmt: skip
    s = series(generate_uid(), "AX")
    await h.send(SOPInstanceUID=generate_uid(), **s)
    await h.advance(0.6)
    assert h.completed == [("rest", "series", s["SeriesInstanceUID"])]


@pytest.mark.asyncio
async def test_study_with_required_series(harness: Any) -> None:
    h = await harness(rules({"name": "mr", "match": 'Modality == "CT"', "level": "study",
                             "targets": ["pacs"], "quiet_seconds": 0.3,
                             "required_series": '"T1" and ("T2" or "FLAIR")',
                             "force_seconds": 30}))  # fmt: skip
    study = generate_uid()
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "T1 AXIAL"))
    await h.advance(0.8)
    assert h.completed == []  # T1 alone is not enough, however quiet
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "FLAIR"))
    await h.advance(0.8)
    assert h.completed == [("mr", "study", study)]


@pytest.mark.asyncio
@pytest.mark.parametrize(("action", "expected"), [("proceed", 1), ("discard", 0)])
async def test_force_timeout(harness: Any, action: str, expected: int) -> None:
    h = await harness(rules({"name": "mr", "match": 'Modality == "CT"', "level": "study",
                             "targets": ["pacs"], "quiet_seconds": 30,
                             "required_series": '"T2"', "force_seconds": 0.5,
                             "force_action": action}))  # fmt: skip
    study = generate_uid()
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "T1"))
    await h.advance(0.4)
    assert h.completed == [] and await h.open_waits() == [("mr", "study")]
    await h.advance(0.6)
    assert len(h.completed) == expected
    assert await h.open_waits() == []  # ended either way


@pytest.mark.asyncio
async def test_operator_forces_completion(harness: Any) -> None:
    h = await harness(rules({"name": "st", "match": 'Modality == "CT"', "level": "study",
                             "targets": ["pacs"], "quiet_seconds": 60}))  # fmt: skip
    study = generate_uid()
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "AX"))
    assert await h.engine.force_study(study) == 1  # the clock does not move
    await until(lambda: bool(h.completed), "completed")
    assert h.completed == [("st", "study", study)]


@pytest.mark.asyncio
async def test_pending_waits_survive_a_restart(harness: Any, tmp_path: Path) -> None:
    settings = rules({"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"],
                      "quiet_seconds": 0.8})  # fmt: skip
    first = await harness(settings, "a")
    s = series(generate_uid(), "AX")
    await first.send(SOPInstanceUID=generate_uid(), **s)
    await first.advance(0.1)
    await first.stop()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = await harness(settings, "b")
    await second.until_taken(1)  # what arrived after the checkpoint, again
    await second.advance(0.3)
    assert second.completed == []
    await second.advance(0.8)
    assert second.completed == [("ct", "series", s["SeriesInstanceUID"])]


async def jobs_of(store: Store) -> list[tuple[str, str, str, str]]:
    return await store.read(
        lambda c: c.execute("SELECT scope, uid, target, rule FROM jobs ORDER BY id").fetchall()
    )


@pytest.mark.asyncio
async def test_a_completion_and_its_jobs_are_one_transaction(harness: Any) -> None:
    """The wait closes and one job per target is queued in the same commit."""
    settings = Settings(
        peers=[PEER, PeerSettings(name="ris", ae_title="RIS", host="127.0.0.1", port=105)],
        rules=[{"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs", "ris"],  # type: ignore[list-item]
                "quiet_seconds": 0.2}],
    )  # fmt: skip
    h = await harness(settings)
    s = series(generate_uid(), "AX")
    await h.send(SOPInstanceUID=generate_uid(), **s)
    await h.advance(0.6)
    assert h.completed == [("ct", "series", s["SeriesInstanceUID"])]
    uid = s["SeriesInstanceUID"]
    assert await jobs_of(h.store) == [("series", uid, "pacs", "ct"), ("series", uid, "ris", "ct")]
    # Both written by the statement that closed the wait: created when it closed.
    closed, created = await h.store.read(
        lambda c: c.execute(
            "SELECT (SELECT closed_at FROM completions), (SELECT min(created_at) FROM jobs)"
        ).fetchone()
    )
    assert closed == created


@pytest.mark.asyncio
async def test_a_restart_does_not_complete_again_what_completed(
    harness: Any, tmp_path: Path
) -> None:
    """Arrivals a restart takes again (those after the checkpoint) do not reopen a wait that
    closed after they arrived: no second job, no second webhook."""
    settings = rules({"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"],
                      "quiet_seconds": 0.2})  # fmt: skip
    first = await harness(settings, "a")
    done, pending = series(generate_uid(), "AX"), series(generate_uid(), "COR")
    await first.send(SOPInstanceUID=generate_uid(), **done)
    await first.advance(0.6)
    assert first.completed == [("ct", "series", done["SeriesInstanceUID"])]
    # Stopped before it completes: before the engine even takes it (it waits 0.1 s to).
    await first.send(SOPInstanceUID=generate_uid(), taken=False, **pending)
    await first.stop()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = await harness(settings, "b")
    await second.until_taken(2)  # both arrived after the checkpoint: taken again
    await second.advance(0.8)
    assert second.completed == [("ct", "series", pending["SeriesInstanceUID"])]
    assert [uid for _, uid, _, _ in await jobs_of(second.store)] == [
        done["SeriesInstanceUID"],
        pending["SeriesInstanceUID"],
    ]


@pytest.mark.asyncio
async def test_instances_after_completion_open_a_new_cycle(harness: Any) -> None:
    h = await harness(rules({"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"],
                             "quiet_seconds": 0.2}))  # fmt: skip
    s = series(generate_uid(), "AX")
    await h.send(SOPInstanceUID=generate_uid(), **s)
    await h.advance(0.5)
    await h.send(SOPInstanceUID=generate_uid(), **s)
    await h.advance(0.5)
    assert h.completed == [("ct", "series", s["SeriesInstanceUID"])] * 2


async def checkpoint(store: Store) -> float | None:
    row = await store.read(
        lambda c: c.execute("SELECT value FROM meta WHERE key = 'completion_checkpoint'").fetchone()
    )
    return None if row is None else float(row[0])


async def checkpoint_reaches(store: Store, value: float) -> None:
    """Wait until the checkpoint is *value* (the engine wakes within 0.1 s of a commit)."""
    deadline = asyncio.get_running_loop().time() + 10
    while await checkpoint(store) != value:
        assert asyncio.get_running_loop().time() < deadline, await checkpoint(store)
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "settings",
    [rules(), rules({"name": "mr", "match": 'Modality == "MR"', "targets": ["pacs"]})],
    ids=["no rules", "a rule that does not fire"],
)
async def test_checkpoint_moves_with_every_batch_rules_or_not(
    tmp_path: Path, settings: Settings
) -> None:
    clock = Clock(time.time())
    h = await Harness(tmp_path, settings, clock).start()
    try:
        old, new = series(generate_uid(), "OLD"), series(generate_uid(), "NEW")
        # With no rule firing nothing is taken: the checkpoint alone moves.
        await h.send(SOPInstanceUID=generate_uid(), taken=False, **old)
        await checkpoint_reaches(h.store, clock.now - 5.0)
        clock.now += 60
        await h.send(SOPInstanceUID=generate_uid(), taken=False, **new)
        await checkpoint_reaches(h.store, clock.now - 5.0)
    finally:
        await h.stop()
    # What a restart takes again: the second series only, found on a read connection.
    reopened = Store(tmp_path / "data", clock=clock)
    await reopened.open()
    try:
        missed = await CompletionStore(reopened).arrivals_since_checkpoint(clock.now)
        assert [(series, study) for series, study, _ in missed] == [
            (new["SeriesInstanceUID"], new["StudyInstanceUID"])
        ]
        plan = await reopened.read(
            lambda c: c.execute("EXPLAIN QUERY PLAN " + ARRIVALS_SINCE, (0.0,)).fetchall()
        )
        assert "USING INDEX instances_received" in " ".join(str(row[-1]) for row in plan)
    finally:
        await reopened.close()
