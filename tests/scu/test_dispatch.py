"""The durable job queue and the dispatcher, against a real store and a recording peer."""

from __future__ import annotations

import contextlib
import gc
import random
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import pytest
import pytest_asyncio
from pynetdicom import _config

from gateway.config import FolderSettings, PeerSettings, Settings
from gateway.scu.dispatch import Dispatcher, copy_atomically, folder_path
from gateway.store.index import Provenance
from gateway.store.jobs import JobQueue
from gateway.store.migrations import SCHEMA_VERSION
from gateway.store.store import Store
from gateway.work import Backoff
from tests.conftest import HOST, TEST_FILES, dataset_bytes, free_port, write_variant
from tests.scu.test_sender import NODE, Recorder

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_B = "1.2.826.0.1.3680043.8.498.1.2"
FAST = Backoff(base_seconds=0.05, max_seconds=0.1, max_attempts=50)

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def _restore_send_mode() -> Iterator[None]:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "data")
    await s.open()
    yield s
    await s.close()


@pytest_asyncio.fixture
async def queue(store: Store) -> JobQueue:
    q = JobQueue(store, random=random.Random(7))
    await q.ensure_schema()
    return q


async def ingest(store: Store, source: Path) -> str:
    temp = store.files.new_temp_path()
    shutil.copyfile(source, temp)
    result = await store.ingest(temp, Provenance())
    return result.sop_instance_uid


async def populate(store: Store, tmp_path: Path) -> dict[str, list[str]]:
    """Study STUDY: series A (3 CTs), series B (2 CTs); and MR_small, a study of its own."""
    variants = tmp_path / "variants"
    variants.mkdir()
    made: dict[str, list[str]] = {SERIES_A: [], SERIES_B: []}
    for series, count in ((SERIES_A, 3), (SERIES_B, 2)):
        for n in range(count):
            sop = f"{series}.{n + 1}"
            path = write_variant(
                CT,
                variants / f"{sop}.dcm",
                StudyInstanceUID=STUDY,
                SeriesInstanceUID=series,
                SOPInstanceUID=sop,
                InstanceNumber=n + 1,
            )
            made[series].append(await ingest(store, path))
    await ingest(store, MR)
    return made


def settings(*peers: PeerSettings, folders: tuple[FolderSettings, ...] = ()) -> Settings:
    return Settings(node=NODE, peers=list(peers), folders=list(folders))


@contextlib.asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[Dispatcher]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.run)
        try:
            yield dispatcher
        finally:
            dispatcher.stop()


async def wait_state(queue: JobQueue, job_id: int, *states: str, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = await queue.get(job_id)
        assert job is not None
        if job.state in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job.state}, not {states}: {job}")
        await anyio.sleep(0.02)


def stored_bytes(store: Store, sop_uid: str) -> bytes:
    with sqlite3.connect(store.db_path) as conn:
        (relpath,) = conn.execute(
            "SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,)
        ).fetchone()
    return dataset_bytes(store.files.absolute(relpath))


# -- the queue ------------------------------------------------------------------------------


async def test_an_expired_lease_is_claimed_again_and_fences_the_stalled_worker(
    store: Store,
) -> None:
    queue = JobQueue(store, lease_seconds=10.0)
    await queue.ensure_schema()
    job_id = await queue.enqueue("series", SERIES_A, "pacs", "rule-a", "normal", now=1.0)
    (first,) = await queue.claim_due(2.0, 10)
    assert first.lease_owner and first.lease_until == 12.0
    listed = (await queue.list())[0]
    assert (listed["lease_owner"], listed["lease_until"]) == (first.lease_owner, 12.0)
    assert await queue.claim_due(11.0, 10) == []  # still held
    assert await queue.next_due_at() == 12.0  # the dispatcher wakes when it runs out
    (second,) = await queue.claim_due(12.5, 10)  # the worker made no progress: claimed again
    assert second.id == job_id and second.lease_owner != first.lease_owner
    assert second.attempts == 1 and second.last_error is not None
    assert second.last_error.startswith(f"lease expired: {first.lease_owner}")
    # The stalled worker wakes up: nothing it says changes the job any more.
    assert await queue.finish(job_id, 13.0, lease=first.lease_owner) is None
    backoff = Backoff(1, 1, 3)
    assert await queue.fail_attempt(job_id, "x", 13.0, backoff, lease=first.lease_owner) is None
    job = await queue.get(job_id)
    assert job is not None and (job.state, job.lease_owner) == ("running", second.lease_owner)
    assert await queue.finish(job_id, 14.0, lease=second.lease_owner) == "done"
    job = await queue.get(job_id)
    assert job is not None and (job.state, job.lease_owner, job.lease_until) == ("done", None, None)


async def test_enqueue_dedupes_open_jobs_and_a_new_cycle_makes_a_new_job(queue: JobQueue) -> None:
    first = await queue.enqueue("series", SERIES_A, "pacs", "rule-a", "low", now=1.0)
    again = await queue.enqueue("series", SERIES_A, "pacs", "rule-b", "urgent", now=2.0)
    other = await queue.enqueue("series", SERIES_A, "archive", "rule-a", "normal", now=2.0)
    assert again == first and other != first
    assert [j["priority"] for j in await queue.list() if j["id"] == first] == ["urgent"]
    (claimed,) = await queue.claim_due(3.0, 10, busy_targets=["archive"])
    assert claimed.id == first and claimed.state == "running"
    assert await queue.enqueue("series", SERIES_A, "pacs", "rule-a", 1, now=4.0) == first
    assert await queue.finish(first, 5.0) == "queued"  # re-enqueued while running: once more
    (claimed,) = await queue.claim_due(6.0, 10, busy_targets=["archive"])
    assert await queue.finish(first, 7.0) == "done"
    newer = await queue.enqueue("series", SERIES_A, "pacs", "rule-a", "normal", now=8.0)
    assert newer not in (first, other)
    with pytest.raises(ValueError):
        await queue.enqueue("series", SERIES_A, "pacs", "rule-a", "asap")


async def test_claim_order_busy_targets_and_slots(queue: JobQueue) -> None:
    low = await queue.enqueue("series", "1.1", "pacs", "r", "low", now=1.0)
    urgent = await queue.enqueue("series", "1.2", "pacs", "r", "urgent", now=2.0)
    normal = await queue.enqueue("series", "1.3", "pacs", "r", "normal", now=0.5)
    later = await queue.enqueue("series", "1.4", "pacs", "r", "urgent", now=50.0)
    other = await queue.enqueue("series", "1.5", "archive", "r", "low", now=1.0)
    assert await queue.next_due_at() == 0.5
    claimed = await queue.claim_due(10.0, 10, slots_per_target=2, free_slots={"archive": 0})
    assert [j.id for j in claimed] == [urgent, normal]
    claimed = await queue.claim_due(10.0, 10, busy_targets=["archive"])
    assert [j.id for j in claimed] == [low]
    assert await queue.next_due_at(busy_targets=["archive"]) == 50.0
    assert [j.id for j in await queue.claim_due(100.0, 1)] == [later]
    assert [j.id for j in await queue.claim_due(100.0, 1)] == [other]


async def test_backoff_fail_attempts_then_failed_retry_and_cancel(queue: JobQueue) -> None:
    backoff = Backoff(base_seconds=10, max_seconds=15, max_attempts=3)
    rng = random.Random(1)
    assert all(0 <= backoff.delay(n, rng) <= min(15, 10 * 2 ** (n - 1)) for n in range(1, 9))
    job = await queue.enqueue("study", STUDY, "pacs", "r", "normal", now=0.0)
    for attempt in (1, 2):
        await queue.claim_due(1000.0 * attempt, 1)
        state = await queue.fail_attempt(job, "peer pacs could not be reached", 1000.0, backoff)
        assert state == "queued"
        current = await queue.get(job)
        assert current is not None and current.attempts == attempt
        assert 1000.0 <= current.next_attempt_at <= 1015.0
        assert current.last_error == "peer pacs could not be reached"
    await queue.claim_due(5000.0, 1)
    assert await queue.fail_attempt(job, "still down", 5000.0, backoff) == "failed"
    assert await queue.claim_due(9000.0, 1) == []
    assert await queue.retry(state="failed", now=9000.0) == 1
    current = await queue.get(job)
    assert current is not None and (current.state, current.attempts) == ("queued", 0)
    assert await queue.cancel([job]) == 1
    assert await queue.cancel([job]) == 0
    # A closed job whose key has an open job again stays closed.
    newer = await queue.enqueue("study", STUDY, "pacs", "r", "normal", now=9100.0)
    assert newer != job
    assert await queue.retry([job]) == 0
    assert await queue.cancel([newer]) == 1
    assert await queue.retry(state="cancelled") == 1  # one of the two only
    assert sorted(j["state"] for j in await queue.list()) == ["cancelled", "queued"]
    assert [j["id"] for j in await queue.list(state="queued")] == [newer]


async def test_recover_running_after_a_crash(store: Store, queue: JobQueue, tmp_path: Path) -> None:
    await populate(store, tmp_path)
    job = await queue.enqueue("series", SERIES_A, "pacs", "r", "normal", now=1.0)
    await queue.claim_due(2.0, 5)
    await queue.record_delivered(job, [f"{SERIES_A}.1"], 2.5)
    # A new process: a fresh queue over the same store finds the job still running.
    fresh = JobQueue(store)
    await fresh.ensure_schema()
    assert await fresh.claim_due(3.0, 5) == []
    assert await fresh.recover_running(4.0) == 1
    (resumed,) = await fresh.claim_due(4.0, 5)
    assert resumed.id == job
    assert await fresh.delivered(job) == {f"{SERIES_A}.1"}


# -- the dispatcher -------------------------------------------------------------------------


async def test_series_job_delivers_every_instance_once_with_its_bytes(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    dispatcher = Dispatcher(settings(recorder.peer), store, queue, backoff=FAST)
    async with running(dispatcher):
        job = await queue.enqueue("series", SERIES_A, "recorder", "r", "normal")
        dispatcher.wake()
        await wait_state(queue, job, "done")
    assert [uid for uid, _, _ in recorder.received] == made[SERIES_A]
    for uid, _, data in recorder.received:
        assert data == stored_bytes(store, uid)
    assert await queue.delivered(job) == set(made[SERIES_A])


async def test_study_job_sends_all_its_series(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    dispatcher = Dispatcher(settings(recorder.peer), store, queue, backoff=FAST)
    async with running(dispatcher):
        job = await queue.enqueue("study", STUDY, "recorder", "r", "normal")
        dispatcher.wake()
        await wait_state(queue, job, "done")
        gone = await queue.enqueue("study", "1.2.3.999", "recorder", "r", "normal")
        dispatcher.wake()
        await wait_state(queue, gone, "done")  # nothing stored: done, nothing sent
    assert sorted(uid for uid, _, _ in recorder.received) == sorted(made[SERIES_A] + made[SERIES_B])


async def test_series_and_study_jobs_of_one_target_share_the_ledger(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    series_job = await queue.enqueue("series", SERIES_A, "recorder", "a", "normal")
    study_job = await queue.enqueue("study", STUDY, "recorder", "b", "normal")
    # Never side by side: the study job waits while the series job of its study runs.
    assert [j.id for j in await queue.claim_due(time.time(), 10)] == [series_job]
    assert await queue.claim_due(time.time(), 10) == []
    await queue.recover_running()
    dispatcher = Dispatcher(settings(recorder.peer), store, queue, backoff=FAST)
    async with running(dispatcher):
        dispatcher.wake()
        await wait_state(queue, series_job, "done")
        await wait_state(queue, study_job, "done")
        again = await queue.enqueue("study", STUDY, "recorder", "b", "normal")  # a new cycle
        dispatcher.wake()
        await wait_state(queue, again, "done")
    everything = made[SERIES_A] + made[SERIES_B]
    assert sorted(uid for uid, _, _ in recorder.received) == sorted(everything)
    jobs = {j["id"]: j["delivered"] for j in await queue.list()}
    assert jobs[series_job] + jobs[study_job] == 5 and jobs[again] == 0
    # A study deleted and received again is new to the target: its ledger rows went with it.
    await store.delete_study(STUDY)
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)


async def test_a_version_0_1_queue_is_migrated(store: Store, tmp_path: Path) -> None:
    """The first dispatch build's jobs table and per-job delivery list, in an index of
    version 1, are brought to version 2 when the store opens (`gateway.store.migrations`)."""
    made = await populate(store, tmp_path)

    def old_schema(conn: sqlite3.Connection) -> None:
        conn.execute("DROP TABLE IF EXISTS jobs")
        conn.execute("DROP TABLE IF EXISTS deliveries")
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY, scope TEXT NOT NULL, uid TEXT NOT NULL,"
            " target TEXT NOT NULL, rule TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 1,"
            " state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt_at REAL NOT NULL, last_error TEXT, rerun INTEGER NOT NULL DEFAULT 0,"
            " created_at REAL NOT NULL, updated_at REAL NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE job_deliveries (job_id INTEGER NOT NULL, sop_uid TEXT NOT NULL,"
            " delivered_at REAL NOT NULL, PRIMARY KEY (job_id, sop_uid))"
        )
        conn.execute(
            "INSERT INTO jobs (scope, uid, target, rule, next_attempt_at, created_at, updated_at)"
            " VALUES ('series', ?, 'pacs', 'r', 1, 1, 1)",
            (SERIES_A,),
        )
        conn.execute("INSERT INTO job_deliveries VALUES (1, ?, 2)", (made[SERIES_A][0],))

    await store.write(old_schema)
    await store.close()
    store = Store(tmp_path / "data")
    await store.open()
    queue = JobQueue(store)
    await queue.ensure_schema()
    (job,) = await queue.claim_due(time.time(), 5)
    assert (job.study_uid, job.target) == (STUDY, "pacs")
    assert await queue.delivered(job.id) == {made[SERIES_A][0]}
    pending, held = await queue.pending(job)
    assert held == 1 and [i.sop_instance_uid for i in pending] == made[SERIES_A][1:]
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert not conn.execute(
            "SELECT name FROM sqlite_master WHERE name = 'job_deliveries'"
        ).fetchall()
    await store.close()


# pynetdicom drops a refused connection's socket without closing it (the GC closes it).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_target_down_backs_off_then_completes_once_it_is_up(
    store: Store, queue: JobQueue, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    port = free_port()
    peer = PeerSettings(name="pacs", ae_title="RECORDER", host=HOST, port=port)
    dispatcher = Dispatcher(settings(peer), store, queue, backoff=FAST)
    recorder: Recorder | None = None
    try:
        async with running(dispatcher):
            job = await queue.enqueue("series", SERIES_A, "pacs", "r", "urgent")
            dispatcher.wake()
            deadline = time.monotonic() + 3
            while True:
                current = await queue.get(job)
                assert current is not None
                if current.attempts >= 2 and current.state == "queued":
                    break
                assert time.monotonic() < deadline, current
                await anyio.sleep(0.02)
            assert current.last_error is not None
            assert "peer pacs" in current.last_error and current.last_error.startswith(
                "unreachable: "
            )
            with mock.patch("tests.scu.test_sender.free_port", return_value=port):
                recorder = Recorder()
            done = await wait_state(queue, job, "done")
            assert done.last_error is None
        assert [uid for uid, _, _ in recorder.received] == made[SERIES_A]
    finally:
        if recorder is not None:
            recorder.stop()
        gc.collect()  # collect the dropped sockets here, under this test's filters


async def test_a_retry_sends_only_what_was_not_acknowledged(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    job = await queue.enqueue("study", STUDY, "recorder", "r", "normal")
    acknowledged = [made[SERIES_A][0], made[SERIES_B][1]]
    await queue.record_delivered(job, acknowledged)
    dispatcher = Dispatcher(settings(recorder.peer), store, queue, backoff=FAST)
    async with running(dispatcher):
        await wait_state(queue, job, "done")
    sent = [uid for uid, _, _ in recorder.received]
    assert sorted(sent) == sorted(set(made[SERIES_A] + made[SERIES_B]) - set(acknowledged))
    assert await queue.delivered(job) == set(made[SERIES_A] + made[SERIES_B])


async def test_failure_status_fails_after_max_attempts_and_retry_requeues(
    store: Store, queue: JobQueue, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    refusing = Recorder(answer=0xA700)
    try:
        backoff = Backoff(base_seconds=0.01, max_seconds=0.02, max_attempts=2)
        dispatcher = Dispatcher(settings(refusing.peer), store, queue, backoff=backoff)
        async with running(dispatcher):
            job = await queue.enqueue("series", SERIES_B, "recorder", "r", "low")
            dispatcher.wake()
            failed = await wait_state(queue, job, "failed")
            assert failed.attempts == 2
            assert failed.last_error == "status: peer recorder answered C-STORE with 0xA700"
            assert len(refusing.received) == 2 * len(made[SERIES_B])
            refusing.answer = 0x0000
            assert await queue.retry([job]) == 1
            dispatcher.wake()
            await wait_state(queue, job, "done")
    finally:
        refusing.stop()


async def test_cancelled_job_is_not_sent(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    await populate(store, tmp_path)
    job = await queue.enqueue("series", SERIES_A, "recorder", "r", "normal")
    kept = await queue.enqueue("series", SERIES_B, "recorder", "r", "normal")
    assert await queue.cancel([job]) == 1
    dispatcher = Dispatcher(settings(recorder.peer), store, queue, backoff=FAST)
    async with running(dispatcher):
        await wait_state(queue, kept, "done")
    assert all(uid.startswith(SERIES_B) for uid, _, _ in recorder.received)
    assert (await queue.get(job)).state == "cancelled"  # type: ignore[union-attr]


async def test_crash_mid_dispatch_resumes_without_resending(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    job = await queue.enqueue("series", SERIES_A, "recorder", "r", "normal")
    await queue.claim_due(time.time(), 5)  # the killed process had claimed it
    await queue.record_delivered(job, made[SERIES_A][:1])  # and delivered one instance
    fresh = JobQueue(store)
    await fresh.ensure_schema()
    assert await fresh.recover_running() == 1
    dispatcher = Dispatcher(settings(recorder.peer), store, fresh, backoff=FAST)
    async with running(dispatcher):
        await wait_state(fresh, job, "done")
    assert [uid for uid, _, _ in recorder.received] == made[SERIES_A][1:]


async def test_urgent_before_low_with_one_slot_per_target(
    store: Store, queue: JobQueue, recorder: Recorder, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    low = await queue.enqueue("series", SERIES_A, "recorder", "r", "low", now=1.0)
    urgent = await queue.enqueue("series", SERIES_B, "recorder", "r", "urgent", now=2.0)
    dispatcher = Dispatcher(
        settings(recorder.peer), store, queue, backoff=FAST, per_target_concurrency=1
    )
    async with running(dispatcher):
        await wait_state(queue, low, "done")
        await wait_state(queue, urgent, "done")
    assert [uid for uid, _, _ in recorder.received] == made[SERIES_B] + made[SERIES_A]


async def test_folder_target_writes_the_tree_atomically(
    store: Store, queue: JobQueue, tmp_path: Path
) -> None:
    made = await populate(store, tmp_path)
    root = tmp_path / "export"
    folder = FolderSettings(name="export", path=root)
    dispatcher = Dispatcher(settings(folders=(folder,)), store, queue, backoff=FAST)
    async with running(dispatcher):
        job = await queue.enqueue("study", STUDY, "export", "r", "normal")
        dispatcher.wake()
        await wait_state(queue, job, "done")
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    expected = sorted(
        f"{STUDY}/{series}/{sop}.dcm" for series in (SERIES_A, SERIES_B) for sop in made[series]
    )
    assert written == expected  # no temp file left
    for series in (SERIES_A, SERIES_B):
        for sop in made[series]:
            data = (root / STUDY / series / f"{sop}.dcm").read_bytes()
            assert dataset_bytes_of(data) == stored_bytes(store, sop)
    with pytest.raises(ValueError):
        folder_path(root, "../..", SERIES_A, "1.2")


def dataset_bytes_of(data: bytes) -> bytes:
    meta_len = int.from_bytes(data[140:144], "little")
    return data[144 + meta_len :]


async def test_copy_atomically_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a" / "x.dcm"
    copy_atomically(CT, target)
    assert target.read_bytes() == CT.read_bytes()
    with pytest.raises(FileNotFoundError):
        copy_atomically(tmp_path / "missing.dcm", tmp_path / "out" / "a" / "y.dcm")
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.dcm"]
