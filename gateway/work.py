"""Durable work: what every kind of claimed work in the index shares.

Dispatch jobs (`gateway.store.jobs`) and retrieval requests (`gateway.retrieve.requests`) are
rows that a worker claims, works on and ends. They share, from this module:

- **Leases.** A claim writes the worker's token (`lease_owner`, "host:pid/random") and a
  deadline (`lease_until`, s since the epoch) on the row, in the transaction that claims it.
  A worker that dies or hangs stops renewing its lease; once the deadline passes, the row is
  due again and the next claim takes it as another attempt, without a restart. Every write a
  worker makes to its row names its token (`FENCE`), so the worker that lost the lease finds
  its writes refused; `LEASE_RELEASED` ends a lease in the write that ends the attempt. At
  start-up, `release_leases` frees the leases of the earlier process at once.
- **Backoff** with full jitter between attempts (`Backoff`).
- **The worker loop** (`WorkLoop`): claim what is due, run each item in a task, renew the
  leases of the items that made progress, sleep until the next item is due, a lease runs out
  or `wake()` is called. The kinds supply the claim (their order and limits), the next due
  time and the work; the loop keeps the only "running" bookkeeping.

A kind's own table keeps its states and transitions; a transition and the work it creates are
one transaction there (a completed wait and its jobs, a retrieval's forward step and its jobs).

Completion waits and acquisition tasks are durable rows too, but nobody claims them: a wait
is a deadline that the one completion engine settles (close and jobs in one transaction,
replayed from the arrivals after a restart), and an acquisition task belongs to the device
session it was given to, which `ControlServer.end_session` ends (docs/acquisition.md); neither
can be held by a worker that died.
"""

from __future__ import annotations

import os
import random as _random
import secrets
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

from gateway.errors import GatewayError

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FENCE",
    "LEASE_RELEASED",
    "Backoff",
    "LeaseLost",
    "WorkLoop",
    "lease_token",
    "release_leases",
    "renew_leases",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

# How long a claimed item is its worker's without progress (`[dispatch]` and `[retrieve]`
# `lease_seconds`).
DEFAULT_LEASE_SECONDS: Final = 300.0
# SQL: the row is held by the token given as the parameter.
FENCE: Final = "lease_owner = ?"
# SQL assignments that end a lease.
LEASE_RELEASED: Final = "lease_owner = NULL, lease_until = NULL"
_HOST: Final = socket.gethostname()


class LeaseLost(GatewayError):
    """The worker's lease on its row passed to another worker (it expired), or the row was
    ended meanwhile (cancelled by an operator): the worker stops and writes nothing more."""


def lease_token() -> str:
    """A new claim's token: "host:pid/8 hex digits"."""
    return f"{_HOST}:{os.getpid()}/{secrets.token_hex(4)}"


def renew_leases(
    conn: sqlite3.Connection, table: str, tokens: Collection[str], until: float
) -> int:
    """Move the deadline of the leases held by *tokens* in *table* to *until*; return how many
    rows still held one (a lease another claim took is not renewed)."""
    if not tokens:
        return 0
    marks = ",".join("?" * len(tokens))
    return conn.execute(
        f"UPDATE {table} SET lease_until = ? WHERE lease_owner IN ({marks})", (until, *tokens)
    ).rowcount


def release_leases(conn: sqlite3.Connection, table: str) -> int:
    """Free every lease in *table* (at start-up: the process that held them is gone)."""
    return conn.execute(
        f"UPDATE {table} SET {LEASE_RELEASED} WHERE lease_owner IS NOT NULL"
    ).rowcount


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter between attempts.

    The delay before attempt *n + 1* (after *n* failed attempts) is uniform in
    ``[0, min(max_seconds, base_seconds * 2 ** (n - 1))]``. After *max_attempts* failed
    attempts the item is failed (until an operator retries it).
    """

    base_seconds: float = 5.0
    max_seconds: float = 600.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.base_seconds < 0 or self.max_seconds < 0 or self.max_attempts < 1:
            raise ValueError("backoff needs base, max >= 0 and max_attempts >= 1")

    def delay(self, attempt: int, random: _random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based)."""
        exponent = min(max(attempt, 1) - 1, 62)
        ceiling = min(self.max_seconds, self.base_seconds * (2.0**exponent))
        return (random or _random).uniform(0.0, ceiling)


class WorkLoop(Generic[T]):
    """Claims and runs one kind of durable work until stopped.

    Each pass: renew the leases of running items that reported progress (`progressed`) since
    the last renewal, `claim(now)` what is due, start `work(item)` for each in a task of its
    own, then sleep until `next_due()` (None: nothing), at most *poll_seconds* and, while
    items run, at most a quarter of *lease_seconds*, or until `wake()`. An item whose worker
    reported nothing for *lease_seconds* is `stale`: its lease is not renewed, it runs out and
    the kind's claim takes the row again. *token* names an item's claim (its lease token).
    """

    def __init__(
        self,
        name: str,
        *,
        claim: Callable[[float], Awaitable[list[T]]],
        next_due: Callable[[], Awaitable[float | None]],
        work: Callable[[T], Awaitable[None]],
        token: Callable[[T], str],
        renew: Callable[[list[str], float], Awaitable[int]],
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_seconds: float = 30.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.name = name
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self._claim = claim
        self._next_due = next_due
        self._work = work
        self._token = token
        self._renew = renew
        self._wake = anyio.Event()
        self._stopping = False
        self._running: dict[str, T] = {}  # by token: an item claimed again is another
        self._progress: dict[str, float] = {}  # token -> last progress (time.time)
        self._renewed_at = 0.0
        self._task_group: TaskGroup | None = None

    # -- control ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due work now (on the event loop's thread)."""
        self._wake.set()

    def stop(self) -> None:
        """End `run()`: the running items' tasks are cancelled (their rows stay claimed until
        the next start frees them, or their leases run out)."""
        self._stopping = True
        self._wake.set()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    @property
    def running(self) -> list[T]:
        """The items this loop is running now."""
        return list(self._running.values())

    def progressed(self, token: str) -> None:
        """The worker of *token* made progress (callable from any thread)."""
        if token in self._running:
            self._progress[token] = time.time()

    def stale(self, token: str) -> bool:
        """Whether the worker of *token* reported nothing for a whole lease."""
        return self._progress.get(token, 0.0) < time.time() - self.lease_seconds

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Until `stop()` (even one called before `run()`) or cancellation."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                while not self._stopping:
                    self._wake = anyio.Event()
                    timeout = await self._pass(tg)
                    if timeout > 0:
                        with anyio.move_on_after(timeout):
                            await self._wake.wait()
        finally:
            self._task_group = None
            log.info(f"{self.name}_stopped", interrupted=len(self._running))
            self._running.clear()
            self._progress.clear()

    async def _pass(self, tg: TaskGroup) -> float:
        now = time.time()
        try:
            await self._renew_progressed(now)
            items = await self._claim(now)
            for item in items:
                token = self._token(item)
                self._running[token] = item
                self._progress[token] = time.time()
                tg.start_soon(self._run_one, token, item, name=f"{self.name}-{token}")
            due = 0.0 if items else await self._next_due()
        except GatewayError as exc:
            log.error(f"{self.name}_claim_failed", error=str(exc))
            return self.poll_seconds
        timeout = self.poll_seconds
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.time()))
        if self._running:
            timeout = min(timeout, max(0.0, self._renewed_at + self.lease_seconds / 4 - now))
        return timeout

    async def _renew_progressed(self, now: float) -> None:
        if now - self._renewed_at < self.lease_seconds / 4:
            return
        tokens = [t for t, at in self._progress.items() if at >= self._renewed_at]
        self._renewed_at = now
        if tokens:
            await self._renew(tokens, now + self.lease_seconds)

    async def _run_one(self, token: str, item: T) -> None:
        try:
            await self._work(item)
        except LeaseLost as exc:
            log.warning(f"{self.name}_lease_lost", lease=token, reason=str(exc))
        except Exception as exc:
            # The index could not be written: the lease runs out, and the row is claimed again.
            log.error(f"{self.name}_bookkeeping_failed", lease=token, error=str(exc))
        finally:
            self._running.pop(token, None)
            self._progress.pop(token, None)
            self._wake.set()
