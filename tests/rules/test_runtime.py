"""The completion engine on a real store: quiet periods, required series, force, restarts."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydicom.uid import generate_uid

from gateway.config import PeerSettings, Settings
from gateway.rules.runtime import CompletedWork, CompletionEngine
from gateway.store.completions import ARRIVALS_SINCE, CompletionStore
from gateway.store.index import Provenance
from gateway.store.jobs import JobQueue
from gateway.store.store import Store
from tests.conftest import TEST_FILES, write_variant

CT = TEST_FILES / "CT_small.dcm"
PEER = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


def rules(*tables: dict[str, Any]) -> Settings:
    return Settings(peers=[PEER], rules=list(tables))  # type: ignore[arg-type]


class Harness:
    """A store, an engine fed by the store's ingest events, and the completions it reports."""

    def __init__(self, tmp: Path, settings: Settings) -> None:
        self.tmp = tmp
        self.store = Store(tmp / "data")
        self.settings = settings
        self.completed: list[tuple[str, str, str]] = []
        self.task: asyncio.Task[None] | None = None
        self.engine: CompletionEngine | None = None

    async def start(self) -> Harness:
        await self.store.open()
        await JobQueue(self.store).ensure_schema()  # completions queue their jobs
        self.engine = CompletionEngine(self.settings.rules, self.store, self._done)
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

    async def send(self, **attributes: Any) -> None:
        source = write_variant(CT, self.tmp / f"{generate_uid()}.dcm", **attributes)
        temp = self.store.files.new_temp_path()
        shutil.copyfile(source, temp)
        await self.store.ingest(temp, Provenance(calling_ae="CT1"))


@pytest_asyncio.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Harness] = []

    async def make(settings: Settings, name: str = "h") -> Harness:
        h = await Harness(tmp_path / name, settings).start()
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
        await asyncio.sleep(0.25)  # each arrival resets the 0.4 s wait
    assert h.completed == []
    await asyncio.sleep(0.6)
    assert h.completed == [("ct", "series", s["SeriesInstanceUID"])]


@pytest.mark.asyncio
async def test_rules_that_do_not_match_or_discard_open_no_wait(harness: Any) -> None:
    h = await harness(rules(
        {"name": "drop-ct", "match": 'CallingAE == "CT1"', "action": "discard"},
        {"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"], "quiet_seconds": 0.2},
        {"name": "mr", "match": 'Modality == "MR"', "targets": ["pacs"], "quiet_seconds": 0.2},
    ))  # fmt: skip
    await h.send(SOPInstanceUID=generate_uid(), **series(generate_uid(), "AX"))
    await asyncio.sleep(0.6)
    assert h.completed == []


@pytest.mark.asyncio
async def test_fallback_fires_only_when_nothing_else_did(harness: Any) -> None:
    h = await harness(rules(
        {"name": "mr", "match": 'Modality == "MR"', "targets": ["pacs"], "quiet_seconds": 0.2},
        {"name": "rest", "match": 'Modality != ""', "targets": ["pacs"], "quiet_seconds": 0.2,
         "fallback": True},
    ))  # fmt: skip
    s = series(generate_uid(), "AX")
    await h.send(SOPInstanceUID=generate_uid(), **s)
    await asyncio.sleep(0.6)
    assert h.completed == [("rest", "series", s["SeriesInstanceUID"])]


@pytest.mark.asyncio
async def test_study_with_required_series(harness: Any) -> None:
    h = await harness(rules({"name": "mr", "match": 'Modality == "CT"', "level": "study",
                             "targets": ["pacs"], "quiet_seconds": 0.3,
                             "required_series": '"T1" and ("T2" or "FLAIR")',
                             "force_seconds": 30}))  # fmt: skip
    study = generate_uid()
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "T1 AXIAL"))
    await asyncio.sleep(0.8)
    assert h.completed == []  # T1 alone is not enough, however quiet
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "FLAIR"))
    await asyncio.sleep(0.8)
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
    await asyncio.sleep(1.0)
    assert len(h.completed) == expected


@pytest.mark.asyncio
async def test_operator_forces_completion(harness: Any) -> None:
    h = await harness(rules({"name": "st", "match": 'Modality == "CT"', "level": "study",
                             "targets": ["pacs"], "quiet_seconds": 60}))  # fmt: skip
    study = generate_uid()
    await h.send(SOPInstanceUID=generate_uid(), **series(study, "AX"))
    await asyncio.sleep(0.2)
    assert await h.engine.force_study(study) == 1
    await asyncio.sleep(0.2)
    assert h.completed == [("st", "study", study)]


@pytest.mark.asyncio
async def test_pending_waits_survive_a_restart(harness: Any, tmp_path: Path) -> None:
    settings = rules({"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"],
                      "quiet_seconds": 0.8})  # fmt: skip
    first = await harness(settings, "a")
    s = series(generate_uid(), "AX")
    await first.send(SOPInstanceUID=generate_uid(), **s)
    await asyncio.sleep(0.1)
    await first.stop()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = await harness(settings, "b")
    await asyncio.sleep(0.3)
    assert second.completed == []
    await asyncio.sleep(0.8)
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
    await asyncio.sleep(0.6)
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
    await asyncio.sleep(0.6)
    assert first.completed == [("ct", "series", done["SeriesInstanceUID"])]
    await first.send(SOPInstanceUID=generate_uid(), **pending)  # stopped before it completes
    await asyncio.sleep(0.05)
    await first.stop()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second = await harness(settings, "b")
    await asyncio.sleep(0.8)
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
    await asyncio.sleep(0.5)
    await h.send(SOPInstanceUID=generate_uid(), **s)
    await asyncio.sleep(0.5)
    assert h.completed == [("ct", "series", s["SeriesInstanceUID"])] * 2


class Clock:
    """A wall clock the test moves, shared by the store and the engine."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    h = Harness(tmp_path, settings)
    h.store = Store(tmp_path / "data", clock=clock)
    await h.store.open()
    h.engine = CompletionEngine(settings.rules, h.store, h._done, clock=clock)
    h.store.set_ingest_listener(h.engine.arrived_from_thread)
    h.task = asyncio.create_task(h.engine.run())
    try:
        old, new = series(generate_uid(), "OLD"), series(generate_uid(), "NEW")
        await h.send(SOPInstanceUID=generate_uid(), **old)
        await checkpoint_reaches(h.store, clock.now - 5.0)
        clock.now += 60
        await h.send(SOPInstanceUID=generate_uid(), **new)
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
