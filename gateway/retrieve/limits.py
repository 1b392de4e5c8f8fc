"""Archive limits (rate of queries and moves, concurrent moves) and the secondary's time window.

Each archive gets an `ArchiveLimits`: two token buckets of capacity one (so "60 per minute"
means at most one every second, never a burst) and a capacity limiter for concurrent moves.
All three can be changed while running (the `retrieve.limits` control method); a waiter sees
the new rate at once. Waiting for a token or a slot is not a stall.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio

from gateway.config import DAYS, PeerSettings, WindowSettings

__all__ = ["ArchiveLimits", "TokenBucket", "window_opens_at"]


class TokenBucket:
    """At most `per_minute` acquisitions a minute, evenly spaced; 0 means no limit."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._next = 0.0  # when the next token is available
        self._changed = anyio.Event()

    def set_rate(self, per_minute: float) -> None:
        previous = self.per_minute
        self.per_minute = per_minute
        if per_minute <= 0:
            self._next = 0.0
        elif previous > 0:  # keep the spacing already promised, at the new rate
            self._next = min(self._next, self._clock() + 60.0 / per_minute)
        self._changed.set()
        self._changed = anyio.Event()

    async def acquire(self) -> None:
        while True:
            if self.per_minute <= 0:
                return
            now = self._clock()
            if now >= self._next:
                self._next = now + 60.0 / self.per_minute
                return
            changed = self._changed
            with anyio.move_on_after(self._next - now):
                await changed.wait()


class ArchiveLimits:
    """The limits of one archive peer."""

    def __init__(self, peer: PeerSettings) -> None:
        self.queries = TokenBucket(peer.queries_per_minute)
        self.moves = TokenBucket(peer.moves_per_minute)
        self.concurrent = anyio.CapacityLimiter(peer.max_concurrent_moves)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries_per_minute": self.queries.per_minute,
            "moves_per_minute": self.moves.per_minute,
            "max_concurrent_moves": int(self.concurrent.total_tokens),
            "moves_running": self.concurrent.borrowed_tokens,
        }


def window_opens_at(windows: list[WindowSettings], zone: ZoneInfo, now: float) -> float | None:
    """None when one of *windows* is open at *now*; else when the next one opens (Unix time).

    No windows: always open. A window whose end is at or before its start runs past midnight;
    it is open on the next morning of each of its days.
    """
    if not windows:
        return None
    local = datetime.fromtimestamp(now, zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    starts: list[float] = []
    for offset in range(-1, 8):
        day = midnight + timedelta(days=offset)
        weekday = DAYS[day.weekday()]
        for window in windows:
            if weekday not in window.days:
                continue
            start_min, end_min = window.minutes()
            if end_min <= start_min:
                end_min += 24 * 60
            start = _at(day, start_min, zone)
            end = _at(day, end_min, zone)
            if start <= now < end:
                return None
            if start > now:
                starts.append(start)
    return min(starts) if starts else None


def _at(day: datetime, minutes: int, zone: ZoneInfo) -> float:
    """*day* (local midnight) plus *minutes* of wall-clock time, as Unix time."""
    date = (day + timedelta(days=minutes // (24 * 60))).date()
    minute = minutes % (24 * 60)
    wall = datetime(date.year, date.month, date.day, minute // 60, minute % 60, tzinfo=zone)
    return wall.timestamp()
