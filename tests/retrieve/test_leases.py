"""Retrieval requests under leases: claimed, renewed, fenced, and claimed again when they run out.

A retrieval whose worker hangs loses its lease and is done by another attempt, no restart.

Real peers: an Orthanc VNA reached through a TCP relay that holds back everything the VNA
answers on the first connection (the worker's first C-FIND association hangs in a thread, as
behind a stuck firewall, well inside the node's ACSE timeout), a recording anonymiser
(pynetdicom), the gateway as a process with `[retrieve] lease_seconds = 1.5`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.retrieve.requests import RetrievalQueue
from gateway.store.jobs import JobQueue, JobSpec
from gateway.store.store import Store
from gateway.work import LeaseLost
from tests.conftest import HOST, OrthancProcess, free_port
from tests.scu.test_sender import Recorder
from tests.test_retrieve import make_study
from tests.test_routing import wait_until

STUDY = "1.2.826.0.1.3680043.8.498.4242"
HANG_SECONDS = 8.0  # the first connection's answers held back this long (ACSE timeout 30 s)
LEASE_SECONDS = 1.5


@pytest.mark.asyncio
async def test_a_claimed_request_is_fenced_and_claimed_again_when_its_lease_runs_out(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    try:
        queue = RetrievalQueue(store, lease_seconds=10.0)
        await queue.ensure_schema()
        (submitted,) = await queue.submit(
            [{"project": "P1", "study_uid": STUDY}], lambda _: True, now=1.0
        )
        (first,) = await queue.claim_due(2.0, 4)
        assert first.id == submitted["id"] and first.status == "Queued"  # as it was claimed
        assert first.lease_owner and first.lease_until == 12.0
        held = await queue.get(first.id)
        assert held is not None and (held.status, held.lease_owner) == (
            "Processing",
            first.lease_owner,
        )
        assert await queue.claim_due(11.0, 4) == []  # still held
        assert await queue.next_due_at() == 12.0  # the retriever wakes when it runs out
        assert await queue.renew([first.lease_owner], 15.0) == 1  # progress: held longer
        assert await queue.claim_due(13.0, 4) == []
        await queue.update(first, step="compare")  # the holder writes
        (second,) = await queue.claim_due(15.5, 4)  # no progress since: claimed again
        assert second.lease_owner != first.lease_owner and second.attempts == 1
        assert second.status == "Processing" and second.step == "compare"
        assert second.reason is not None
        assert second.reason.startswith(f"lease expired: {first.lease_owner}")
        # The first worker wakes up: nothing it writes changes the request any more.
        with pytest.raises(LeaseLost):
            await queue.update(first, release=True, status="Successful", step="done")
        with pytest.raises(LeaseLost):
            await queue.set_instances(first, [])
        with pytest.raises(LeaseLost):
            await queue.forward(first, [])
        assert await queue.renew([first.lease_owner], 99.0) == 0
        now = await queue.get(first.id)
        assert now is not None and (now.status, now.lease_owner) == (
            "Processing",
            second.lease_owner,
        )
        # An operator's cancel ends the lease: its worker's next write stops it.
        await queue.cancel("P1", now=16.0)
        with pytest.raises(LeaseLost, match="Failed, held by nobody"):
            await queue.update(second, step="move")
        # A restart frees the leases of the process before.
        await queue.submit([{"project": "P1", "study_uid": STUDY}], lambda _: True, 17.0)
        (claimed,) = await queue.claim_due(17.0, 4)
        assert await queue.recover() == 1
        again = await queue.get(claimed.id)
        assert again is not None and (again.lease_owner, again.lease_until) == (None, None)
        assert await queue.next_due_at() == 17.0
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_forwarding_jobs_end_makes_its_paused_request_due_at_once(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    try:
        await JobQueue(store).ensure_schema()
        queue = RetrievalQueue(store, lease_seconds=10.0)
        await queue.ensure_schema()
        await queue.submit([{"project": "P1", "study_uid": STUDY}], lambda _: True, now=1.0)
        await queue.submit([{"project": "P1", "study_uid": STUDY + ".2"}], lambda _: True, 1.0)
        first, second = await queue.claim_due(2.0, 4)
        spec = JobSpec("study", STUDY, "anon", "retrieve:P1", "normal")
        (job_id,) = await queue.forward(first, [spec])
        await queue.update(first, release=True, step="forward", next_attempt_at=30.0)
        await queue.update(second, release=True, step="forward", next_attempt_at=30.0)
        assert await queue.forwarded_through(job_id + 1, 3.0) == 0  # no request waits on it
        assert await queue.forwarded_through(job_id, 3.0) == 1
        assert await queue.next_due_at() == 3.0
        (claimed,) = await queue.claim_due(3.0, 4)  # the other still waits for its poll
        assert claimed.id == first.id
        assert await queue.forwarded_through(job_id, 4.0) == 0  # held by its worker now
    finally:
        await store.close()


class StallingRelay:
    """Relays loopback TCP connections to *port*; the first one's answers (peer -> client)
    are held back for *hold* seconds, the rest relayed at once."""

    def __init__(self, port: int, hold: float) -> None:
        self.target = port
        self.hold = hold
        self.port = free_port()
        self.connections = 0
        self._listener = socket.create_server((HOST, self.port))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection((HOST, self.target))
            self._sockets += [client, upstream]
            hold = self.hold if self.connections == 1 else 0.0
            self._start(self._pump, client, upstream, 0.0)
            self._start(self._pump, upstream, client, hold)

    def _pump(self, source: socket.socket, sink: socket.socket, hold: float) -> None:
        try:
            while data := source.recv(65536):
                if hold and self._stopping.wait(hold):
                    return
                hold = 0.0
                sink.sendall(data)
        except OSError:
            return
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def anonymiser() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.stop()


def test_a_hung_retrieval_worker_loses_its_lease_and_another_attempt_finishes(
    gateway_factory: Any, tmp_path: Path, anonymiser: Recorder
) -> None:
    gw = gateway_factory(start=False)
    vna = OrthancProcess(tmp_path / "vna", "VNA", {"gateway": ("GATEWAY", HOST, gw.port)})
    relay = StallingRelay(vna.port, HANG_SECONDS)
    try:
        study = make_study(tmp_path / "study", "MRN-L", "ACC-L", (3, 2))
        vna.upload(*study.files)
        gw.write_config(
            peers=[
                {"name": "vna", "ae_title": "VNA", "host": HOST, "port": relay.port},
                {"name": "anon", "ae_title": "RECORDER", "host": HOST, "port": anonymiser.port},
            ],
            retrieve={"primary": "vna", "anonymiser": "anon", "lease_seconds": LEASE_SECONDS,
                      "stall_seconds": 30, "retry_base_seconds": 0.2,
                      "retry_max_seconds": 1.0},
            projects=[{"name": "P1"}],
            dispatch={"retry_base_seconds": 0.2, "retry_max_seconds": 1.0},
        )  # fmt: skip
        gw.start()
        began = time.monotonic()
        gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})

        def request() -> dict[str, Any]:
            (found,) = gw.call("retrieve.status", {"project": "P1"})["requests"]
            return dict(found)

        # Claimed under a lease; the first C-FIND hangs, so the lease runs out and another
        # attempt takes the request while the first worker still waits for the VNA.
        wait_until(lambda: relay.connections >= 1, timeout=15)
        first = request()
        assert first["status"] == "Processing" and first["lease_owner"], first
        wait_until(lambda: request()["status"] == "Successful", timeout=HANG_SECONDS + 20)
        done_in = time.monotonic() - began
        done = request()
        assert done_in < HANG_SECONDS, f"done in {done_in:.1f} s: it waited for the hung worker"
        assert done["attempts"] == 1, done  # the hung attempt, counted when its lease ran out
        assert (done["lease_owner"], done["lease_until"]) == (None, None), done
        assert done["instances"] == {"expected": 5, "stored": 5, "forwarded": 5}, done
        assert Counter(uid for uid, _, _ in anonymiser.received) == Counter(study.sops)

        # The hung worker's C-FIND returns: it finds the request no longer its own, and
        # changes nothing (no second forward, no second success).
        lost = '"retriever_lease_lost"'
        wait_until(lambda: lost in gw.log_text(), timeout=HANG_SECONDS + 30)
        events = [json.loads(line) for line in gw.log_text().splitlines() if lost in line]
        assert events[0]["lease"] == first["lease_owner"], events
        time.sleep(1.0)
        assert request() == done
        assert len(anonymiser.received) == len(study.sops)
        claims = [
            json.loads(line) for line in gw.log_text().splitlines() if '"retrieval_claimed"' in line
        ]
        assert [c["lease"] for c in claims[:1]] == [first["lease_owner"]], claims
        second = claims[1]
        assert second["attempt"] == 2 and second["step"] == "query", claims
        assert second["previous_error"].startswith(f"lease expired: {first['lease_owner']}")
    finally:
        relay.stop()
        vna.stop()
